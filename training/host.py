"""The small protocol the training and erasure loops see, so they never know which program holds the model.

Two hosts implement :class:`DiffusionHost`: ComfyUI (``nodes/comfy_host.py``: a cloned ModelPatcher, weight
wrappers, ``diffusion_model`` forward) and diffusers (:mod:`.diffusers_host`: ``UNet2DConditionModel``,
``CLIPTextModel``, ``AutoencoderKL``; tests and the CLI).

Conventions every host follows:

* **Module paths** are diffusers-style for the UNet (``down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q``)
  and transformers-4-style, with the ``text_model.`` level, for CLIP text encoders
  (``text_model.encoder.layers.0.self_attn.q_proj``), whatever the host's own module tree is. Components are
  ``"unet"``, ``"te"`` (SD1/SD2) or ``"te1"``/``"te2"`` (SDXL). Kohya names are derived from these paths with
  :func:`conceptlab.formats.kohya_keys.kohya_lora_name`.
* **Trainable deltas** are :class:`DeltaModule` objects installed on a module's ``weight`` or ``bias``. The shared
  base weights are never modified; switching deltas off (:meth:`DiffusionHost.deltas_disabled`) gives the frozen
  model, so ESD needs one model copy, not two. A delta has two equivalent applications (:data:`DELTA_SPACES`):

  - ``"activation"`` (every host's default): the layer runs on its frozen weight and the delta's contribution is
    added to its output, ``y = layer(x) + F.linear(x, ΔW)`` (Conv2d: the layer's own stride / padding / dilation /
    groups; bias: ``+ Δb``), computed by :meth:`DeltaModule.output_delta` — for LoRA ``((x·downᵀ)·upᵀ)·scale``
    without ever forming ΔW, as kohya-ss/sd-scripts ``networks/lora.py`` ``LoRAModule.forward`` and peft
    ``lora.Linear.forward`` do. Nothing weight-sized is materialised or saved for backward beyond what the frozen
    layer saves itself: with weight-space application ``F.linear(x, W + ΔW)`` keeps ``W + ΔW`` alive until
    backward, one extra copy of every trained tensor. Hosts install it as a forward hook (:class:`OutputDeltaHook`).
  - ``"weight"``: a callable ``f(weight) -> weight + delta`` (:meth:`DeltaModule.forward`; the contract of
    ComfyUI's ``ModelPatcher.add_weight_wrapper`` and of ``torch.nn.utils.parametrize``). Hosts offer it with
    ``delta_space="weight"``; baking a delta into weights (file writers, ``iter_patched_weights``) always uses it.

  Both give the same predictions and gradients to float rounding (tests/test_activation_deltas.py).
* **Conditioning** is one :class:`~.conditioning.Conditioning` object per batch, made by
  :meth:`DiffusionHost.encode_prompts` and consumed by :meth:`DiffusionHost.predict`: SD1/SD2 read its
  ``context``; SDXL also its ``pooled`` embedding and ``extras["size_ids"]``; the loops only select rows,
  concatenate and attach per-image sizes, so a new family (:mod:`.families`) needs no new loop. ``predict`` still
  accepts a bare ``[B, L, D]`` context tensor (SD1/SD2).
* **Noise schedule**: discrete DDPM ``alphas_cumprod`` (float32, shape ``[T]``, usually T = 1000). ``x_t`` is
  the DDPM-scaled noisy latent ``sqrt(a_t)·x0 + sqrt(1−a_t)·ε`` and ``timesteps`` are integer indices in
  ``[0, T)``. :meth:`DiffusionHost.predict` returns the raw network output in the model's own parameterization
  (``prediction_type`` ``"epsilon"`` or ``"v_prediction"``), not ComfyUI's denoised x0.

Flow-matching families (``families.family(host.arch).objective == "flow"``: Flux.1 now; Flux.2, Z-Image, Qwen-Image
next) keep the same methods with these meanings (one protocol, no new loop methods):

* **Denoiser component** is still ``"unet"`` (kohya names Flux LoRA modules ``lora_unet_…`` too) and its module
  paths are the **BFL / ComfyUI names** of the DiT (``double_blocks.0.img_attn.qkv``, ``single_blocks.3.linear1``,
  ``img_in``, ``final_layer.linear``…; :mod:`conceptlab.formats.flux_keys`), i.e. what kohya ``lora_flux.py`` and
  ComfyUI both name, with fused ``qkv`` / ``linear1``. A host whose model is split (diffusers
  ``FluxTransformer2DModel``: ``to_q``/``to_k``/``to_v``/``proj_mlp``) exposes the fused BFL paths and installs a
  fused delta as row slices on the split weights (:func:`conceptlab.formats.flux_keys.diffusers_pieces`), so a
  rank-r LoRA on ``qkv`` is the same function in both hosts. Text encoders: ``"te1"`` (CLIP-L, transformers paths)
  and ``"t5"`` (T5-XXL encoder, transformers ``T5EncoderModel`` paths ``encoder.block.0.layer.0.SelfAttention.q``).
* **Schedule**: rectified flow. ``timesteps`` are float32 sigmas ``σ ∈ [0, 1]`` shaped ``[B]`` (not integer
  indices; ``alphas_cumprod`` is unused), ``x_t = (1 − σ)·x0 + σ·ε`` (:func:`conceptlab.training.flow.noisy_input`)
  and ``predict`` returns the raw velocity prediction (target ``ε − x0``) in the **unpacked** latent shape
  ``[B, 16, h, w]``: 2×2 patch packing, position ids and the model's own ×1000 timestep scale are the host's
  business. :attr:`prediction_type` is ``"flow"`` and :meth:`configure_schedule` refuses ε/v.
* **Conditioning**: ``context`` = T5 hidden states ``[B, L, 4096]``, ``pooled`` = CLIP-L pooled ``[B, 768]``,
  ``extras["guidance"]`` ``[B]`` (Flux-dev guidance embedding; hosts use their default, 3.5 for dev, when absent;
  ignored by schnell, which has no guidance embedding).
* **Latents**: ``encode_images`` returns ``(mean − shift_factor)·scaling_factor`` (the Flux VAE's 16-channel latent
  normalisation, as diffusers ``FluxPipeline`` and ComfyUI ``latent_formats.Flux`` apply it); ``sample`` uses
  the family's flow sampler (Euler on the shifted schedule) instead of DDIM.
"""

from __future__ import annotations

import abc
import contextlib
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .conditioning import Conditioning

#: how a host applies installed deltas (module docstring): ``"activation"`` (default) or ``"weight"``
DELTA_SPACES = ("activation", "weight")


def check_delta_space(space: str) -> str:
    """Return ``space`` if it is one of :data:`DELTA_SPACES`, else raise ``ValueError`` naming the choices."""
    if space not in DELTA_SPACES:
        raise ValueError(f"delta_space must be one of {', '.join(DELTA_SPACES)}, not {space!r}")
    return space


def autograd_usable(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a normal copy of it when it is an inference tensor used outside inference mode (a delta loaded
    inside a ComfyUI node): autograd cannot save inference tensors for backward, and an activation-space delta's
    tensors are saved whenever the layer's input requires grad."""
    if t.is_inference() and not torch.is_inference_mode_enabled():
        return t.clone()
    return t


def weight_delta_output(layer: nn.Module, x: torch.Tensor, d: torch.Tensor, attr: str) -> torch.Tensor:
    """``layer``'s output change when its ``attr`` tensor changes by ``d``, for input ``x`` (activation space).

    ``attr == "weight"``: ``F.linear(x, d)`` for a Linear (``x`` ``[..., in]`` → ``[..., out]``), the layer's own
    ``_conv_forward(x, d, None)`` for a Conv2d (its stride, padding, padding_mode, dilation and groups; ``x``
    ``[B, in, H, W]``); ``attr == "bias"``: ``d`` ``[out]`` broadcast over the output (last dim for Linear, channel
    dim for Conv2d). ``d`` is cast to ``x``'s dtype and device; rows of ``d`` may be a slice of the layer's output
    features (then the result has that many output features). Raises ``TypeError`` for other layer types.
    """
    d = autograd_usable(d.to(device=x.device, dtype=x.dtype))
    conv = isinstance(layer, nn.Conv2d)
    if not conv and not isinstance(layer, nn.Linear):
        raise TypeError(f"activation-space deltas need a Linear or Conv2d layer, not {type(layer).__name__}")
    if attr == "bias":
        return d.view(1, -1, 1, 1) if conv else d
    if conv:
        return layer._conv_forward(x, d, None)
    return F.linear(x, d)


class OutputDeltaHook:
    """A forward hook adding the output contributions of the deltas installed on one layer (activation space).

    ``entries``: ``[(attr, delta, piece)]`` — ``piece`` a :class:`conceptlab.formats.flux_keys.Piece` when the layer
    holds rows of a fused tensor the delta is shaped for (diffusers Flux ``to_q`` of BFL ``qkv``), else ``None``.
    ``gate``: optional ``() -> bool``; while it returns False the hook adds nothing (ComfyHost: only calls made
    through its own ModelPatcher see its deltas). ``handle``: the ``RemovableHandle`` once registered.
    """

    def __init__(self, gate=None):
        self.entries: list[tuple[str, "DeltaModule", object]] = []
        self.gate = gate
        self.handle = None

    def __call__(self, module: nn.Module, args, output):
        if self.gate is not None and not self.gate():
            return None
        if not args or not isinstance(args[0], torch.Tensor) or not isinstance(output, torch.Tensor):
            return None
        x = args[0]
        add = None
        for attr, delta, piece in self.entries:
            o = delta.output_delta(x, module, attr, piece)
            if o is not None:
                add = o if add is None else add + o
        if add is None:
            return None
        return output + add.to(output.dtype)

    def register(self, module: nn.Module) -> "OutputDeltaHook":
        """Register on ``module`` (``register_forward_hook``) and return self."""
        self.handle = module.register_forward_hook(self)
        return self

    def remove(self) -> None:
        """Unregister (idempotent)."""
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


class DeltaModule(nn.Module):
    """A trainable change to one weight tensor, applied as ``weight + delta()`` (weight space, :meth:`forward`) or
    as ``layer(x) + output_delta(x)`` (activation space, :meth:`output_delta`) while :attr:`enabled`.

    Subclasses implement :meth:`delta` returning a tensor of the target weight's shape (any float dtype; it is
    cast to the weight's dtype, keeping the graph for autograd), and may override :meth:`_output_delta` to apply
    the change to activations without forming ΔW (LoRA). The module is callable with the weight, which makes it
    usable as a ComfyUI weight wrapper and as a ``torch.nn.utils.parametrize`` parametrization.
    """

    def __init__(self) -> None:
        super().__init__()
        self.enabled = True
        self.multiplier = 1.0

    @abc.abstractmethod
    def delta(self) -> torch.Tensor:
        """The change ΔW, shaped like the target weight."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:  # noqa: D401 - callable contract
        """Return ``weight + multiplier·delta()`` (any shape; result has ``weight``'s device and dtype).

        Returns ``weight`` itself, unchanged, when :attr:`enabled` is False or :attr:`multiplier` is 0.
        """
        if not self.enabled or self.multiplier == 0.0:
            return weight
        if type(weight) not in (torch.Tensor, nn.Parameter) and hasattr(weight, "dequantize"):
            weight = weight.dequantize()  # a quantized frozen base (training/quantize.py): W_q → W, then W + ΔW
        d = self.delta()
        if self.multiplier != 1.0:
            d = d * self.multiplier
        return weight + d.to(device=weight.device, dtype=weight.dtype)

    def output_delta(self, x: torch.Tensor, layer: nn.Module, attr: str = "weight", piece=None
                     ) -> torch.Tensor | None:
        """The change of ``layer(x)`` this delta makes (activation space): ``multiplier · (layer with W + ΔW)(x) −
        layer(x)``, i.e. ``F.linear(x, ΔW)`` / the layer's conv with ΔW for ``attr="weight"``, ``Δb`` for ``"bias"``
        (:func:`weight_delta_output`).

        ``x``: the layer's input (``[..., in]`` Linear, ``[B, in, H, W]`` Conv2d), any float dtype; the result is in
        ``x``'s dtype, shaped like the layer's output (or broadcastable to it for a bias). ``piece``: the layer holds
        only ``piece`` of the tensor this delta is shaped for (a :class:`conceptlab.formats.flux_keys.Piece`: row
        slice and/or half swap of a fused weight); the result then covers the layer's own output features.
        Returns ``None`` when the delta is off (:attr:`enabled` False, :attr:`multiplier` 0, module dropout).
        """
        if not self.enabled or self.multiplier == 0.0:
            return None
        out = self._output_delta(x, layer, attr, piece)
        if out is not None and self.multiplier != 1.0:
            out = out * self.multiplier
        return out

    def _output_delta(self, x: torch.Tensor, layer: nn.Module, attr: str, piece) -> torch.Tensor | None:
        """:meth:`output_delta` before the multiplier. Default: form ΔW (:meth:`delta`, or only the piece's rows via
        ``delta_rows`` when the subclass has it) and apply it with :func:`weight_delta_output`."""
        rows = getattr(piece, "rows", None)
        if rows is not None and not piece.swap and hasattr(self, "delta_rows"):
            d = self.delta_rows(rows[0], rows[1])
        else:
            d = self.delta()
            if piece is not None and d.dim() > 0:
                d = piece.cut(d)
        if d.dim() == 0:  # a 0-d zero: the module is off for this step (module dropout)
            return None
        return weight_delta_output(layer, x, d, attr)

    # ComfyUI's weight-wrapper bookkeeping (see comfy_extras/nodes_train.py BiasDiff): report memory use and
    # follow the model between devices.
    def passive_memory_usage(self) -> int:
        """Bytes held by this module's parameters (ComfyUI weight-wrapper contract)."""
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def move_to(self, device=None) -> int:
        """Move the parameters to ``device`` (no-op for None) and return :meth:`passive_memory_usage` bytes."""
        if device is not None:
            self.to(device=device)
        return self.passive_memory_usage()


class FullDelta(DeltaModule):
    """A full-rank trainable ΔW (fp32 parameter initialised to zeros), as ESD trains its parameter set.

    Args:
        shape: the target tensor's shape (weight ``[out, in]`` / ``[out, in, kh, kw]`` or bias ``[out]``).
        device: where the parameter lives.
    """

    def __init__(self, shape: Sequence[int], device: torch.device | str | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(tuple(shape), dtype=torch.float32, device=device))

    def delta(self) -> torch.Tensor:
        """The fp32 parameter itself, shaped like the target tensor (zeros until trained)."""
        return self.weight


class DiffusionHost(abc.ABC):
    """What the training and erasure loops need from a diffusion model; see the module docstring.

    Attributes:
        arch: ``"sd1" | "sd2" | "sdxl"`` (the naming used by :mod:`conceptlab.formats.keys`; the family's data is
            :func:`conceptlab.training.families.family` of it).
        prediction_type: ``"epsilon"`` or ``"v_prediction"``.
        alphas_cumprod: float32 CPU tensor ``[T]``.
        device: compute device; ``dtype``: compute dtype of the frozen weights.
        latent_channels: 4 for SD1/SD2/SDXL; ``vae_scale``: pixels per latent cell (8).
    """

    arch: str = "sd1"
    prediction_type: str = "epsilon"
    alphas_cumprod: torch.Tensor
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    latent_channels: int = 4
    vae_scale: int = 8
    #: the sampler :meth:`sample` uses when the host has no ``sampler_name`` argument (kohya ``sample_sampler``)
    native_sampler: str = "ddim"
    #: how deltas installed from now on are applied: ``"activation"`` or ``"weight"`` (module docstring)
    delta_space: str = "activation"

    # -- modules and deltas ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def modules(self, component: str) -> dict[str, nn.Module]:
        """Leaf ``nn.Linear`` / ``nn.Conv2d`` modules of ``component`` keyed by the canonical path (module doc).

        Raises ``ValueError`` for a component the model does not have.
        """

    def unet_ldm_paths(self) -> dict[str, str]:
        """``{canonical diffusers UNet module path: LDM (``openaimodel.UNetModel``) module path}`` for this model's
        own layout (e.g. ``down_blocks.1.attentions.0.proj_in`` → ``input_blocks.4.1.proj_in`` on SDXL). Used
        where a family's files name UNet modules the LDM way (kohya SDXL LoRA keys). Hosts override it; the
        default raises ``NotImplementedError``."""
        raise NotImplementedError(f"{type(self).__name__} cannot map UNet paths to LDM names")

    def components(self) -> list[str]:
        """The components this host can adapt, e.g. ``["unet", "te"]``."""
        return ["unet", "te"]

    @abc.abstractmethod
    def install_delta(self, component: str, path: str, attr: str, delta: DeltaModule) -> None:
        """Apply ``delta`` to ``<component>.<path>.<attr>`` (``attr`` is ``"weight"`` or ``"bias"``)."""

    def _delta_target(self, component: str, path: str, attr: str) -> nn.Module:
        """The module a new delta on ``<component>.<path>.<attr>`` goes to, after the checks every host makes.

        Raises ``ValueError`` (``attr`` not weight/bias, the module has no such tensor, a delta is already installed
        there) or ``KeyError`` (``path`` is not a module of ``component``)."""
        if attr not in ("weight", "bias"):
            raise ValueError(f"attr must be 'weight' or 'bias', not {attr!r}")
        mods = self.modules(component)
        if path not in mods:
            raise KeyError(f"{component} has no module {path!r}")
        mod = mods[path]
        if getattr(mod, attr, None) is None:
            raise ValueError(f"{component}.{path} has no {attr}")
        if (component, path, attr) in self.installed_deltas():
            raise ValueError(f"a delta is already installed on {component}.{path}.{attr}")
        return mod

    @abc.abstractmethod
    def clear_deltas(self) -> None:
        """Remove every installed delta (the host returns to the frozen model)."""

    @abc.abstractmethod
    def installed_deltas(self) -> dict[tuple[str, str, str], DeltaModule]:
        """``{(component, path, attr): delta}`` currently installed."""

    @contextlib.contextmanager
    def deltas_disabled(self) -> Iterator[None]:
        """Within the block every installed delta is off: predictions are the frozen model's."""
        deltas = list(self.installed_deltas().values())
        prev = [d.enabled for d in deltas]
        for d in deltas:
            d.enabled = False
        try:
            yield
        finally:
            for d, p in zip(deltas, prev):
                d.enabled = p

    # -- schedule -----------------------------------------------------------------------------------------------
    def configure_schedule(self, prediction_type: str | None = None, zero_terminal_snr: bool = False) -> None:
        """Declare the model's parameterization and/or rescale its schedule to zero terminal SNR, for training,
        erasure and sampling alike (kohya ``--v_parameterization`` / ``--zero_terminal_snr``).

        ``prediction_type``: ``"epsilon"`` / ``"v_prediction"`` / ``None`` (keep). ``zero_terminal_snr``: apply
        :func:`zero_terminal_snr_alphas_cumprod` to :attr:`alphas_cumprod` (idempotent). Hosts whose native
        sampler owns the schedule (ComfyUI) override this to patch it there too. Raises ``ValueError`` for an
        unknown prediction type.
        """
        if prediction_type is not None:
            if prediction_type not in ("epsilon", "v_prediction"):
                raise ValueError(f"unsupported prediction_type {prediction_type!r} (epsilon or v_prediction)")
            self.prediction_type = prediction_type
        if zero_terminal_snr:
            self.alphas_cumprod = zero_terminal_snr_alphas_cumprod(self.alphas_cumprod)

    #: kohya ``clip_skip`` (None = last layer) and ``max_token_length`` (None = 75 tokens, or 150 / 225)
    clip_skip: int | None = None
    max_token_length: int | None = None

    def configure_text(self, clip_skip: int | None = None, max_token_length: int | None = None) -> list[str]:
        """Set kohya's text-encoding options for every later :meth:`encode_prompts` (training, validation and
        samples alike). ``clip_skip``: use the output of the n-th layer from the end (1 = last), followed by the
        final layer norm (kohya ``strategy_sd.SdTextEncodingStrategy``); ``max_token_length``: 75, 150 or 225
        caption tokens, encoded as 77-token chunks whose interior BOS/EOS are dropped (kohya
        ``strategy_base._get_input_ids`` / ``encode_tokens``).

        Returns messages for settings this host or family cannot honour exactly (the caller logs them by name).
        Raises ``ValueError`` for ``clip_skip`` < 1 or a ``max_token_length`` other than 75/150/225.
        """
        if clip_skip is not None and int(clip_skip) < 1:
            raise ValueError(f"clip_skip must be >= 1, got {clip_skip}")
        if max_token_length is not None and int(max_token_length) not in (75, 150, 225):
            raise ValueError(f"max_token_length must be 75, 150 or 225 (kohya's choices), got {max_token_length}")
        self.clip_skip = None if clip_skip is None else int(clip_skip)
        self.max_token_length = None if max_token_length in (None, 75) else int(max_token_length)
        return []

    # -- conditioning, prediction, VAE ----------------------------------------------------------------------
    @abc.abstractmethod
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """The :class:`~.conditioning.Conditioning` of ``prompts`` (``context`` ``[B, 77·k, D]`` in the compute
        dtype on :attr:`device`; ``pooled`` ``[B, P]`` for families that have one).

        Differentiable when text-encoder deltas are installed and grad is enabled.
        """

    @abc.abstractmethod
    def predict(self, x_t: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning | torch.Tensor) -> torch.Tensor:
        """Raw network output ``[B, C, h, w]`` for DDPM-scaled ``x_t`` ``[B, C, h, w]`` at integer ``timesteps``
        ``[B]`` with conditioning ``cond`` (a :class:`~.conditioning.Conditioning` of ``B`` rows, or a bare
        context ``[B, L, D]`` for SD1/SD2); parameterization :attr:`prediction_type`. SDXL hosts use
        ``cond.extras["size_ids"]`` when present, else the latent's size with no crop."""

    @abc.abstractmethod
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """VAE-encode ``pixels`` ``[B, 3, H, W]`` float in ``[-1, 1]`` to scaled latents ``[B, 4, H/8, W/8]``
        (the mean of the posterior times the VAE scaling factor, fp32 on CPU)."""

    @abc.abstractmethod
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode scaled latents ``[B, 4, h, w]`` to images ``[B, 3, 8h, 8w]`` float in ``[0, 1]`` (CPU)."""

    def sample(self, prompts: Sequence[str], negative: str = "", *, width: int = 512, height: int = 512,
               steps: int = 20, cfg: float = 7.0, seed: int = 0) -> torch.Tensor:
        """Generate images ``[B, 3, H, W]`` in ``[0, 1]`` with the current deltas (DDIM by default).

        Hosts with a native sampler (ComfyUI) override this; the default runs :func:`ddim_sample`.
        """
        cond = self.encode_prompts(list(prompts))
        uncond = self.encode_prompts([negative] * len(prompts))
        g = torch.Generator("cpu").manual_seed(int(seed))
        shape = (len(prompts), self.latent_channels, height // self.vae_scale, width // self.vae_scale)
        x = torch.randn(shape, generator=g).to(self.device)
        lat = ddim_sample(self, x, cond, uncond, steps=steps, cfg=cfg)
        return self.decode_latents(lat)


# -- schedule helpers shared by the loops --------------------------------------------------------------------

def add_noise(x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
              alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """DDPM forward process ``x_t = sqrt(ᾱ_t)·x0 + sqrt(1−ᾱ_t)·ε`` (Ho et al. 2020, Eq. 4).

    Shapes: ``x0``/``noise`` ``[B, C, h, w]``; ``timesteps`` int ``[B]``; ``alphas_cumprod`` ``[T]``.
    """
    a = alphas_cumprod.to(device=x0.device, dtype=torch.float32)[timesteps.to(x0.device).long()]
    a = a.view(-1, *([1] * (x0.dim() - 1)))
    return (a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()).to(x0.dtype)


def prediction_target(x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                      alphas_cumprod: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The regression target for the model's parameterization.

    ``"epsilon"``: ε. ``"v_prediction"``: ``v = sqrt(ᾱ_t)·ε − sqrt(1−ᾱ_t)·x0`` (Salimans & Ho 2022, §4).
    Raises ``ValueError`` for other parameterizations.
    """
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        a = alphas_cumprod.to(device=x0.device, dtype=torch.float32)[timesteps.to(x0.device).long()]
        a = a.view(-1, *([1] * (x0.dim() - 1)))
        return (a.sqrt() * noise.float() - (1 - a).sqrt() * x0.float()).to(noise.dtype)
    raise ValueError(f"unsupported prediction_type {prediction_type!r} (epsilon or v_prediction)")


def eps_from_prediction(output: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor,
                        alphas_cumprod: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Convert a model output to ε (``"v_prediction"``: ε = sqrt(ᾱ)·v + sqrt(1−ᾱ)·x_t).

    Inverse of the v-parameterization of Salimans & Ho 2022 (§4, Eq. 9-10 rearranged). Shapes: ``output`` and
    ``x_t`` ``[B, C, h, w]``; ``timesteps`` int ``[B]``; ``alphas_cumprod`` ``[T]``. ``"epsilon"`` returns
    ``output`` itself; the v path computes in fp32 and returns ``output``'s dtype.
    Raises ``ValueError`` for a ``prediction_type`` other than ``"epsilon"`` / ``"v_prediction"``.
    """
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        a = alphas_cumprod.to(device=x_t.device, dtype=torch.float32)[timesteps.to(x_t.device).long()]
        a = a.view(-1, *([1] * (x_t.dim() - 1)))
        return (a.sqrt() * output.float() + (1 - a).sqrt() * x_t.float()).to(output.dtype)
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def zero_terminal_snr_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Rescale a DDPM schedule to zero terminal SNR (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample
    Steps are Flawed", Algorithm 1), exactly as kohya-ss/sd-scripts ``library/custom_train_functions.py``
    ``fix_noise_scheduler_betas_for_zero_terminal_snr`` (``--zero_terminal_snr``) does.

    √ᾱ is shifted so its last value is 0 and scaled so its first value is unchanged; the betas are recovered from
    the new ᾱ and ᾱ is re-accumulated in float32 as kohya does. Input/output: ``[T]`` float32 CPU; the result
    ends in exactly 0 (SNR 0: pure noise at t = T−1, which only v-prediction can learn). ComfyUI's
    ``rescale_zero_terminal_snr_sigmas`` is the same map but clamps the last ᾱ to 4.897e-8 (σ finite): a
    ComfyUI-hosted model uses ComfyUI's own table. Raises ``ValueError`` for a non-decreasing-noise schedule.
    """
    ac = alphas_cumprod.detach().float().cpu()
    if ac.dim() != 1 or len(ac) < 2 or not bool((ac[1:] <= ac[:-1]).all()):
        raise ValueError("alphas_cumprod must be a decreasing [T] schedule")
    betas = 1 - ac / torch.cat([torch.ones(1), ac[:-1]])
    alphas_bar_sqrt = torch.cumprod(1 - betas, 0).sqrt()
    a0, aT = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - aT) * (a0 / (a0 - aT))
    alphas_bar = alphas_bar_sqrt ** 2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return torch.cumprod(alphas, dim=0)


def ddim_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """Descending DDIM timesteps with diffusers' "leading" spacing (``DDIMScheduler.set_timesteps``).

    ``steps_offset=1`` as in the SD1 scheduler config, so for T=1000, 50 steps → ``[981, 961, …, 1]``.
    Returns ``steps`` Python ints in ``[0, num_train_timesteps)``; diffusers raises ``ValueError`` when
    ``steps > num_train_timesteps``.
    """
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=num_train_timesteps, timestep_spacing="leading",
                          steps_offset=1)
    sched.set_timesteps(steps)
    return [int(t) for t in sched.timesteps]


@torch.no_grad()
def ddim_sample(host: DiffusionHost, x_T: torch.Tensor, cond: Conditioning | torch.Tensor,
                uncond: Conditioning | torch.Tensor, *,
                steps: int = 50, cfg: float = 7.5, stop_at: int | None = None, eta: float = 0.0) -> torch.Tensor:
    """Deterministic DDIM sampling (Song et al. 2021, Eq. 12 with η=0) with classifier-free guidance.

    Uses diffusers' ``DDIMScheduler`` built on the host's ``alphas_cumprod`` (so any schedule works).
    ``stop_at``: return after that many steps (ESD's "sample up to a random step k"). Returns latents
    ``[B, C, h, w]`` fp32. ``x_T``: ``[B, C, h, w]`` standard normal; ``cond`` / ``uncond``: conditionings of
    ``B`` rows (see :meth:`DiffusionHost.predict`).
    """
    from diffusers import DDIMScheduler

    ac = host.alphas_cumprod.float()
    betas = 1 - ac / torch.cat([torch.ones(1), ac[:-1]])
    sched = DDIMScheduler(num_train_timesteps=len(ac), trained_betas=betas.numpy(), clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
                          prediction_type=host.prediction_type)
    sched.set_timesteps(steps)
    x = x_T.to(host.device, torch.float32)
    n = len(sched.timesteps) if stop_at is None else min(int(stop_at), len(sched.timesteps))
    for t in sched.timesteps[:n]:
        tt = torch.full((x.shape[0],), int(t), device=host.device, dtype=torch.long)
        xin = x.to(host.dtype)
        if cfg == 1.0:
            out = host.predict(xin, tt, cond).float()
        else:
            out_c = host.predict(xin, tt, cond).float()
            out_u = host.predict(xin, tt, uncond).float()
            out = out_u + cfg * (out_c - out_u)
        x = sched.step(out, t, x, eta=eta).prev_sample
    return x
