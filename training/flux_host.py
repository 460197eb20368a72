"""The diffusers implementation of :class:`~.host.DiffusionHost` for Flux.1 (dev / schnell): tests and the CLI.

Wraps diffusers' ``FluxTransformer2DModel``, transformers' ``CLIPTextModel`` (CLIP-L, pooled output) and
``T5EncoderModel`` (T5-XXL, hidden states) with their tokenizers, and the 16-channel ``AutoencoderKL``; follows the
"Flow-matching families" contract of :mod:`.host`:

* the denoiser component is ``"unet"`` and its module paths are the **BFL** names
  (``double_blocks.0.img_attn.qkv``, ``single_blocks.0.linear1``, ``img_in`` …): a fused BFL module that diffusers
  splits (``img_attn.qkv`` → ``attn.to_q/to_k/to_v``; ``linear1`` → ``to_q/to_k/to_v/proj_mlp``) is exposed as a
  :class:`~.flux_fused.FusedLinear` view (:mod:`.flux_fused`) and a delta installed on it becomes row slices on the
  split diffusers weights (:func:`conceptlab.formats.flux_keys.diffusers_pieces`), so one ΔW means the same function
  in every host;
* ``predict`` packs the ``[B, 16, h, w]`` latent into 2×2 patches and builds the image / text position ids with
  diffusers' own ``FluxPipeline._pack_latents`` / ``_unpack_latents`` / ``_prepare_latent_image_ids``, feeds the
  σ ∈ [0, 1] timesteps (the transformer scales them ×1000 itself, as ``FluxPipeline`` passes ``t / 1000``) and the
  guidance embedding (dev only; schnell has none), and returns the velocity unpacked;
* ``encode_prompts`` gives ``context`` = T5 last hidden state ``[B, t5xxl_max_token_length, 4096]`` and
  ``pooled`` = CLIP-L ``pooler_output`` ``[B, 768]``, as diffusers ``FluxPipeline.encode_prompt`` and kohya
  ``library/strategy_flux.py`` ``FluxTextEncodingStrategy.encode_tokens`` compute them;
* ``encode_images`` / ``decode_latents`` apply the Flux VAE's ``shift_factor`` / ``scaling_factor``;
* ``sample`` runs diffusers' ``FluxPipeline`` (``FlowMatchEulerDiscreteScheduler``) on the host's own prompt
  embeddings, so installed deltas (including text-encoder deltas) take effect.

Why hand-written glue and not ``FluxPipeline`` alone: the pipeline has no training forward (σ in, velocity out on an
unpacked latent) and no per-module delta installation; every Flux-specific tensor operation here is still the
pipeline's own static method.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..formats.flux_keys import FluxDims, diffusers_pieces
from .conditioning import Conditioning
from .diffusers_host import _canonical_te_path
from .flux_fused import PieceDelta, bfl_modules
from .host import DeltaModule, DiffusionHost, OutputDeltaHook, check_delta_space

#: kohya ``flux_train_network.py`` lines 171-177: T5-XXL tokens when ``t5xxl_max_token_length`` is unset
T5_DEFAULT_TOKENS = {"dev": 512, "schnell": 256}
#: Flux-dev's default distilled guidance (diffusers ``FluxPipeline.__call__`` guidance_scale=3.5; kohya
#: ``flux_train_network.py`` ``--guidance_scale`` default 3.5 for training, sample prompts ``--g`` default 3.5)
DEFAULT_GUIDANCE = 3.5


def _device_of(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (CPU for a module without parameters)."""
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _hf_tokenize(tokenizer, prompts: Sequence[str], max_length: int) -> torch.Tensor:
    """Token ids ``[B, max_length]``: a transformers tokenizer (padding to ``max_length``, truncation, as
    ``FluxPipeline._get_t5_prompt_embeds`` / kohya ``FluxTokenizeStrategy``) or a callable
    ``tok(prompts, max_length=n) -> LongTensor`` (test stand-ins)."""
    if hasattr(tokenizer, "model_max_length") or hasattr(tokenizer, "pad_token_id"):
        return tokenizer(list(prompts), padding="max_length", max_length=int(max_length), truncation=True,
                         return_tensors="pt").input_ids
    return tokenizer(list(prompts), max_length=int(max_length))


class FluxHost(DiffusionHost):
    """A Flux.1 :class:`~.host.DiffusionHost` over diffusers / transformers modules (see the module docstring).

    Args:
        transformer: ``FluxTransformer2DModel``; ``config.guidance_embeds`` True = Flux-dev (guidance embedding),
            False = schnell.
        clip: ``CLIPTextModel`` (CLIP-L); ``clip_tokenizer``: ``CLIPTokenizer`` (77 tokens) or a callable
            ``tok(prompts, max_length=77)``.
        t5: ``T5EncoderModel`` (T5-XXL v1.1); ``t5_tokenizer``: ``T5TokenizerFast`` or a callable.
        vae: 16-channel ``AutoencoderKL`` with ``shift_factor`` / ``scaling_factor`` in its config (None when
            latents are given).
        t5xxl_max_token_length: kohya's ``t5xxl_max_token_length``; ``None`` = 512 for dev, 256 for schnell
            (kohya ``flux_train_network.py`` 171-177).
        guidance: default ``extras["guidance"]`` for dev when a conditioning has none (kohya ``guidance_scale``,
            3.5); ignored for schnell.
        device, dtype: where and in which dtype the frozen weights run (the VAE runs in fp32).
        blocks_to_swap: kohya's ``blocks_to_swap`` (:meth:`enable_block_swap`); the swapped blocks go from the
            CPU straight to their offloaded place, never all at once to ``device``.
        delta_space: ``"activation"`` (default: forward hooks adding :meth:`~.host.DeltaModule.output_delta`; a
            fused delta adds its rows to each split layer's output) or ``"weight"`` (``torch.nn.utils.parametrize``;
            :class:`~.flux_fused.PieceDelta` row slices on the split weights).

    Attributes: ``arch = "flux"``, ``prediction_type = "flow"``, ``variant`` (``"dev"`` / ``"schnell"``),
    ``latent_channels = 16``, ``vae_scale`` (8 for the real VAE), ``dims`` (:class:`FluxDims`).

    Raises:
        ValueError: a transformer that is not Flux-shaped (``in_channels`` not 4 × latent channels), or a
            ``t5xxl_max_token_length`` < 1.
    """

    arch = "flux"
    prediction_type = "flow"
    latent_channels = 16
    native_sampler = "euler"  # FlowMatchEulerDiscreteScheduler (sample())

    def __init__(self, transformer: nn.Module, clip: nn.Module | None, clip_tokenizer: Callable | None,
                 t5: nn.Module | None, t5_tokenizer: Callable | None, vae: nn.Module | None, *,
                 t5xxl_max_token_length: int | None = None, guidance: float = DEFAULT_GUIDANCE,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 delta_space: str = "activation", blocks_to_swap: int = 0):
        self.delta_space = check_delta_space(delta_space)
        self.device = torch.device(device)
        self.dtype = dtype
        cfg = transformer.config
        if int(cfg.in_channels) % 4:
            raise ValueError(f"not a Flux transformer: in_channels {cfg.in_channels} is not 4 × latent channels")
        self.latent_channels = int(cfg.in_channels) // 4
        if blocks_to_swap:  # kohya move_to_device_except_swap_blocks: the swapped blocks never visit the device
            from .block_swap import flux_swap_counts, move_frozen

            nd, ns = len(transformer.transformer_blocks), len(transformer.single_transformer_blocks)
            d, s_ = flux_swap_counts(blocks_to_swap, nd, ns)
            self.transformer = transformer.to(dtype=dtype).eval().requires_grad_(False)
            move_frozen(self.transformer, self.device,
                        skip=[*transformer.transformer_blocks[nd - d:], *transformer.single_transformer_blocks[ns - s_:]])
        else:
            self.transformer = transformer.to(self.device, dtype).eval().requires_grad_(False)
        self.clip = clip.to(self.device, dtype).eval().requires_grad_(False) if clip is not None else None
        self.t5 = t5.to(self.device, dtype).eval().requires_grad_(False) if t5 is not None else None
        self.clip_tokenizer, self.t5_tokenizer = clip_tokenizer, t5_tokenizer
        self.vae = vae.to(self.device, torch.float32).eval().requires_grad_(False) if vae is not None else None
        if self.vae is not None:
            self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.variant = "dev" if bool(getattr(cfg, "guidance_embeds", False)) else "schnell"
        self.guidance = float(guidance)
        self.alphas_cumprod = torch.zeros(0)  # flow family: no DDPM schedule (host.py "Flow-matching families")
        self.set_t5xxl_max_token_length(t5xxl_max_token_length)
        inner = int(cfg.num_attention_heads) * int(cfg.attention_head_dim)
        mlp = inner * 4
        if len(self.transformer.single_transformer_blocks):
            mlp = int(self.transformer.single_transformer_blocks[0].proj_mlp.out_features)
        self.dims = FluxDims(inner, mlp)
        self._bfl_modules: dict[str, nn.Module] | None = None
        self._installed: dict[tuple[str, str, str], DeltaModule] = {}
        self._registered: dict[tuple[str, str, str], list[tuple[nn.Module, str]]] = {}
        self._hooks: dict[int, OutputDeltaHook] = {}  # id(layer) -> activation-space hook
        self._swaps, self._swap_hook = [], None
        self._prompt_cache: dict[str, Conditioning] = {}  # offload_text_encoders
        if blocks_to_swap:
            self.enable_block_swap(blocks_to_swap)

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                        t5xxl_max_token_length: int | None = None, transformer: nn.Module | None = None,
                        guidance: float = DEFAULT_GUIDANCE, quantize: str | None = None,
                        blocks_to_swap: int = 0) -> "FluxHost":
        """Load a local diffusers Flux folder (``transformer/``, ``text_encoder/`` + ``tokenizer/`` (CLIP-L),
        ``text_encoder_2/`` + ``tokenizer_2/`` (T5), ``vae/``), as ``black-forest-labs/FLUX.1-dev`` ships it.
        Nothing is downloaded (``local_files_only``). ``transformer`` replaces ``transformer/`` (e.g. a quantized
        or single-file one); ``quantize``: a :mod:`.quantize` scheme for the frozen transformer weights;
        ``blocks_to_swap``: kohya's block swap (:meth:`enable_block_swap`).
        Raises ``FileNotFoundError`` naming a missing part."""
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

        root = Path(folder)
        need = ["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "vae"]
        if transformer is None:
            need.insert(0, "transformer")
        for part in need:
            if not (root / part).is_dir():
                raise FileNotFoundError(f"{root}: not a diffusers Flux folder (missing {part}/)")
        if transformer is None:
            transformer = FluxTransformer2DModel.from_pretrained(root / "transformer", local_files_only=True,
                                                                 torch_dtype=dtype)
        clip = CLIPTextModel.from_pretrained(root / "text_encoder", local_files_only=True, torch_dtype=dtype)
        tok = CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
        t5 = T5EncoderModel.from_pretrained(root / "text_encoder_2", local_files_only=True, torch_dtype=dtype)
        tok2 = AutoTokenizer.from_pretrained(root / "tokenizer_2", local_files_only=True)
        vae = AutoencoderKL.from_pretrained(root / "vae", local_files_only=True)
        host = cls(transformer, clip, tok, t5, tok2, vae, t5xxl_max_token_length=t5xxl_max_token_length,
                   guidance=guidance, device=device, dtype=dtype, blocks_to_swap=blocks_to_swap)
        if quantize:
            host.quantize_base(quantize)
        return host

    def quantize_base(self, scheme: str) -> int:
        """Store the frozen transformer's and T5-XXL's Linear weights quantized (:func:`.quantize.quantize_frozen`,
        torchao; T5 is 4.9 B parameters, frozen unless ``train_t5xxl``), before any delta is installed. CLIP-L and
        the VAE stay dense. Returns the number of layers quantized."""
        from .block_swap import move_frozen
        from .quantize import quantize_frozen

        self.quantized = scheme
        n, skip = 0, []
        for sw, prefix in zip(getattr(self, "_swaps", ()), ("transformer_blocks", "single_transformer_blocks")):
            for i, block in enumerate(sw.blocks):  # offloaded blocks: quantized on the device one at a time
                if sw.location[i] != self.device:
                    move_frozen(block, self.device)
                    n += quantize_frozen(block, scheme)
                    move_frozen(block, sw.location[i])
                    skip.append(f"{prefix}.{i}.")
        n += quantize_frozen(self.transformer, scheme, skip=tuple(skip))
        if self.t5 is not None:
            n += quantize_frozen(self.t5, scheme)
        return n

    def set_t5xxl_max_token_length(self, n: int | None) -> None:
        """kohya ``t5xxl_max_token_length`` (None = 512 dev / 256 schnell). Raises ``ValueError`` for n < 1."""
        if n is not None and int(n) < 1:
            raise ValueError(f"t5xxl_max_token_length must be >= 1, got {n}")
        self.t5xxl_max_token_length = int(n) if n is not None else T5_DEFAULT_TOKENS[self.variant]

    # -- modules and deltas -------------------------------------------------------------------------------------
    def components(self) -> list[str]:
        """``["unet", "te1", "t5"]`` (those present): the transformer, CLIP-L, T5-XXL."""
        out = ["unet"]
        if self.clip is not None:
            out.append("te1")
        if self.t5 is not None:
            out.append("t5")
        return out

    def _unet_modules(self) -> dict[str, nn.Module]:
        if self._bfl_modules is None:
            self._bfl_modules = bfl_modules(self.transformer, self.dims)
        return self._bfl_modules

    def modules(self, component: str) -> dict[str, nn.Module]:
        """``"unet"``: ``{BFL path: nn.Linear or FusedLinear}`` (module docstring, :func:`.flux_fused.bfl_modules`);
        ``"te1"``: CLIP-L Linear modules keyed ``text_model.…``; ``"t5"``: T5 Linear modules keyed as in
        ``T5EncoderModel`` (``encoder.block.0.layer.0.SelfAttention.q``). Raises ``ValueError`` for a component the
        host lacks."""
        if component == "unet":
            return dict(self._unet_modules())
        root = {"te1": self.clip, "t5": self.t5}.get(component)
        if root is None:
            raise ValueError(f"this model has no component {component!r} (has {self.components()})")
        out = {}
        for name, mod in root.named_modules():
            if ".parametrizations." in f".{name}." or not isinstance(mod, nn.Linear):
                continue
            out[_canonical_te_path(name) if component == "te1" else name] = mod
        return out

    def install_delta(self, component: str, path: str, attr: str, delta: DeltaModule) -> None:
        """Install ``delta`` on ``<component>.<path>.<attr>``. Activation space (:attr:`delta_space`, default): an
        entry of the layer's :class:`~.host.OutputDeltaHook`; on a :class:`~.flux_fused.FusedLinear` one entry per
        diffusers piece, each adding its rows of the fused output (``F.linear(x, ΔW[rows])``; LoRA ``up[rows]``).
        Weight space: ``torch.nn.utils.parametrize``; on a :class:`~.flux_fused.FusedLinear` one
        :class:`~.flux_fused.PieceDelta` per piece (row slices; the swapped halves of
        ``final_layer.adaLN_modulation.1``). Raises ``ValueError`` (bad attr, tensor absent, already installed, unknown
        component) or ``KeyError`` (unknown path)."""
        mod = self._delta_target(component, path, attr)
        key = (component, path, attr)
        delta.to(self.device)
        activation = check_delta_space(self.delta_space) == "activation"
        regs = []
        if component == "unet":
            bfl = f"{path}.{attr}"
            pieces = [(self.transformer.get_submodule(dname.rsplit(".", 1)[0]), piece)
                      for dname, piece in diffusers_pieces(bfl, self.dims)]
        else:
            pieces = [(mod, None)]
        for target, piece in pieces:
            whole = piece is None or (piece.rows is None and not piece.swap)
            if activation:
                hook = self._hooks.get(id(target))
                if hook is None:
                    hook = self._hooks[id(target)] = OutputDeltaHook().register(target)
                hook.entries.append((attr, delta, None if whole else piece))
            else:
                parametrize.register_parametrization(target, attr, delta if whole else PieceDelta(delta, piece),
                                                     unsafe=True)
            regs.append((target, attr))
        self._installed[key] = delta
        self._registered[key] = regs

    def clear_deltas(self) -> None:
        """Remove every installed delta (hooks and parametrizations), restoring the frozen model."""
        for hook in self._hooks.values():
            hook.remove()
        self._hooks.clear()
        for key, regs in list(self._registered.items()):
            for mod, attr in regs:
                if parametrize.is_parametrized(mod, attr):
                    parametrize.remove_parametrizations(mod, attr, leave_parametrized=False)
        self._installed.clear()
        self._registered.clear()

    def installed_deltas(self) -> dict[tuple[str, str, str], DeltaModule]:
        """A copy of ``{(component, path, attr): delta}``."""
        return dict(self._installed)

    # -- block swap -------------------------------------------------------------------------------------------
    blocks_to_swap: int = 0

    def enable_block_swap(self, blocks_to_swap: int) -> tuple[int, int]:
        """kohya ``--blocks_to_swap N`` (``flux_train_network.py``; :mod:`.block_swap`): the last ``N // 2`` double
        and ``(N − N // 2) · 2`` single blocks keep their frozen weights on the CPU and are moved to :attr:`device`
        just before they compute, in forward and in backward, so the device holds ``19 − N // 2`` double and
        ``38 − (N − N // 2) · 2`` single blocks at a time (Flux.1). ``0`` turns it off. Deltas installed on a
        swapped block stay on the device. Use it with gradient checkpointing: block swap moves weights, not
        activations (autograd's saved references to a swapped weight follow its in-place move, and the schedule
        brings the block back before its backward; with weight-space deltas the dense ``W + ΔW`` copies autograd
        keeps are not moved).

        Returns ``(double, single)`` blocks swapped. Raises ``ValueError`` for N < 0 or more than kohya allows
        (``flux_models.py`` 977: at most n − 2 blocks of each kind; Flux.1: N ≤ 35)."""
        from .block_swap import BlockSwap, flux_swap_counts

        tr = self.transformer
        double, single = flux_swap_counts(blocks_to_swap, len(tr.transformer_blocks),
                                          len(tr.single_transformer_blocks))
        self.disable_block_swap()
        if not double and not single:
            return 0, 0
        self._swaps = [BlockSwap(tr.transformer_blocks, double, self.device),
                       BlockSwap(tr.single_transformer_blocks, single, self.device)]

        def prepare(module, args, kwargs):  # kohya prepare_block_swap_before_forward, once per transformer call
            for sw in self._swaps:
                sw.prepare(forward_only=not torch.is_grad_enabled())
        self._swap_hook = tr.register_forward_pre_hook(prepare, with_kwargs=True)
        for sw in self._swaps:
            sw.prepare()
        self.blocks_to_swap = int(blocks_to_swap)
        return double, single

    def disable_block_swap(self) -> None:
        """Remove block swapping and bring every block back to :attr:`device`."""
        for sw in getattr(self, "_swaps", ()):
            sw.remove()
        if getattr(self, "_swap_hook", None) is not None:
            self._swap_hook.remove()
        self._swaps, self._swap_hook, self.blocks_to_swap = [], None, 0

    def set_gradient_checkpointing(self, on: bool) -> None:
        """diffusers' ``enable_gradient_checkpointing`` / ``disable_gradient_checkpointing`` on the transformer
        (recomputes each block in backward; same gradients, less activation memory)."""
        (self.transformer.enable_gradient_checkpointing if on else self.transformer.disable_gradient_checkpointing)()

    # -- schedule / text settings -------------------------------------------------------------------------------
    def configure_schedule(self, prediction_type: str | None = None, zero_terminal_snr: bool = False) -> None:
        """Flux is a rectified-flow model: only ``prediction_type`` None / ``"flow"`` is accepted. Raises
        ``ValueError`` for ε / v-prediction or ``zero_terminal_snr`` (DDPM options with no meaning for Flux; kohya's
        flux_train_network.py has neither)."""
        if prediction_type not in (None, "flow"):
            raise ValueError(f"Flux predicts a flow velocity; prediction_type {prediction_type!r} "
                             "(v_parameterization) does not apply")
        if zero_terminal_snr:
            raise ValueError("zero_terminal_snr is a DDPM schedule option; Flux's flow schedule already ends at "
                             "pure noise (σ = 1)")

    def configure_text(self, clip_skip: int | None = None, max_token_length: int | None = None) -> list[str]:
        """kohya's Flux trainer uses neither ``clip_skip`` nor ``max_token_length`` (``flux_train_network.py``
        line 74-75 warns for max_token_length; the T5 length is ``t5xxl_max_token_length``): both are returned as
        warnings and ignored."""
        msgs = []
        if clip_skip not in (None, 1):
            msgs.append("clip_skip has no effect on Flux (CLIP-L's pooled output is used; kohya's Flux trainer has "
                        "no clip_skip)")
        if max_token_length not in (None, 75):
            msgs.append("max_token_length is not used in Flux training (kohya warns the same); set "
                        "t5xxl_max_token_length for the T5 sequence length")
        return msgs

    # -- conditioning, prediction, VAE --------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """``Conditioning(context = T5 last hidden state [B, t5xxl_max_token_length, D_t5], pooled = CLIP-L
        pooler_output [B, D_clip])`` in the compute dtype on :attr:`device` (diffusers
        ``FluxPipeline._get_t5_prompt_embeds`` / ``_get_clip_prompt_embeds``; kohya ``strategy_flux.py``
        ``FluxTextEncodingStrategy.encode_tokens`` without the T5 attention mask, its default). Raises
        ``ValueError`` when a text encoder or tokenizer is missing."""
        if self.clip is None or self.t5 is None or self.clip_tokenizer is None or self.t5_tokenizer is None:
            raise ValueError("this Flux host has no text encoders / tokenizers (CLIP-L and T5-XXL are both needed)")
        cache = self._prompt_cache
        if cache and all(p in cache for p in prompts) and not self._te_deltas():
            return Conditioning.cat([cache[p] for p in prompts]).to(self.device, self.dtype)
        n_clip = int(getattr(self.clip.config, "max_position_embeddings", 77))
        dev_l, dev_t5 = _device_of(self.clip), _device_of(self.t5)  # the CPU after offload_text_encoders
        ids_l = _hf_tokenize(self.clip_tokenizer, prompts, n_clip).to(dev_l)
        pooled = self.clip(ids_l, output_hidden_states=False).pooler_output
        ids_t5 = _hf_tokenize(self.t5_tokenizer, prompts, self.t5xxl_max_token_length).to(dev_t5)
        ctx = self.t5(ids_t5, output_hidden_states=False)[0]
        return Conditioning(ctx.to(self.device, self.dtype), pooled.to(self.device, self.dtype))

    # -- text encoders off the accelerator --------------------------------------------------------------------
    @contextlib.contextmanager
    def denoiser_parked(self, device: str | torch.device = "cpu") -> Iterator[None]:
        """Within the block the transformer's frozen weights are on ``device`` (the CPU), so the text encoders can
        run on :attr:`device` without the transformer beside them — kohya ``cache_text_encoder_outputs_if_needed``
        (``flux_train_network.py`` 231-237: "move vae and unet to cpu to save memory"). Afterwards every block is
        back where it was (block swap's offloaded blocks stay offloaded); installed deltas never move. A no-op when
        ``device`` is :attr:`device`."""
        from . import block_swap

        device = torch.device(device)
        if device == self.device:
            yield
            return
        away = [sw.blocks[i] for sw in self._swaps for i in range(sw.n) if sw.location[i] != sw.device]
        block_swap.move_frozen(self.transformer, device, skip=away)
        try:
            yield
        finally:
            block_swap.move_frozen(self.transformer, self.device, skip=away)

    def _te_deltas(self) -> bool:
        return any(c in ("te1", "t5") for c, _, _ in self._installed)

    def offload_text_encoders(self, prompts: Sequence[str] = (), device: str | torch.device = "cpu") -> int:
        """Encode ``prompts`` (e.g. the sample prompts) while CLIP-L and T5-XXL are still on :attr:`device`, keep
        their conditionings, then move both encoders to ``device`` (the CPU) — kohya ``flux_train_network.py``
        ``cache_text_encoder_outputs_if_needed`` (lines 226-282: T5-XXL and, unless trained, CLIP-L "back to cpu"
        after caching, sample prompts cached first). Afterwards :meth:`encode_prompts` returns the kept
        conditionings for those prompts and runs the encoders where they now are for any other prompt (slower on
        the CPU, same result). Returns the number of bytes of encoder weights moved off the device.

        Raises ``ValueError`` when text-encoder deltas are installed (a trained encoder must stay on the device,
        as kohya keeps CLIP-L there when it is trained)."""
        if self._te_deltas():
            raise ValueError("text-encoder deltas are installed: the text encoders are trained and stay on the device")
        device = torch.device(device)
        cache = dict(self._prompt_cache)
        todo = [p for p in dict.fromkeys(prompts) if p not in cache]
        if todo and self.clip is not None and self.t5 is not None:
            with torch.no_grad():
                for p, row in zip(todo, self.encode_prompts(todo).detach().rows()):
                    cache[p] = row.to("cpu")
        self._prompt_cache = cache
        moved = 0
        for enc in (self.clip, self.t5):
            if enc is not None and _device_of(enc) != device:
                moved += sum(t.numel() * t.element_size() for t in [*enc.parameters(), *enc.buffers()])
                enc.to(device)
        if moved and self.device.type == "cuda":
            torch.cuda.empty_cache()
        return moved

    def _guidance(self, cond: Conditioning, batch: int) -> torch.Tensor | None:
        if not self.transformer.config.guidance_embeds:
            return None
        g = cond.extras.get("guidance")
        if g is None:
            return torch.full((batch,), self.guidance, device=self.device, dtype=torch.float32)
        return g.to(self.device, torch.float32).reshape(batch)

    def predict(self, x_t: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning | torch.Tensor) -> torch.Tensor:
        """Velocity ``[B, 16, h, w]`` (compute dtype) for ``x_t = (1 − σ)·x0 + σ·ε`` ``[B, 16, h, w]`` (h, w even),
        float σ ``timesteps`` ``[B]`` in [0, 1] and a Flux :class:`Conditioning` (``context`` T5, ``pooled``
        CLIP-L, optional ``extras["guidance"]`` ``[B]``; default :attr:`guidance` on dev, none on schnell).

        Packing, ids and the transformer call are diffusers ``FluxPipeline.__call__``'s (``_pack_latents``,
        ``_prepare_latent_image_ids`` at the packed size, ``txt_ids`` zeros ``[L, 3]``, ``timestep`` = σ).
        Raises ``ValueError`` for odd h / w, integer timesteps or a conditioning without ``pooled``.
        """
        from diffusers import FluxPipeline

        cond = Conditioning.wrap(cond)
        if cond.pooled is None:
            raise ValueError("Flux needs the CLIP-L pooled embedding (encode prompts with a Flux host)")
        if timesteps.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError("Flux timesteps are float sigmas in [0, 1], not integer DDPM indices")
        b, c, h, w = x_t.shape
        if h % 2 or w % 2:
            raise ValueError(f"Flux latents need even height and width (2×2 patches), got {h}×{w}")
        x = x_t.to(self.device, self.dtype)
        packed = FluxPipeline._pack_latents(x, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, self.device, self.dtype)
        ctx = cond.context.to(self.device, self.dtype)
        txt_ids = torch.zeros(ctx.shape[1], 3, device=self.device, dtype=self.dtype)
        out = self.transformer(hidden_states=packed, timestep=timesteps.to(self.device, self.dtype).reshape(b),
                               guidance=self._guidance(cond, b), pooled_projections=cond.pooled.to(self.device, self.dtype),
                               encoder_hidden_states=ctx, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return FluxPipeline._unpack_latents(out, h, w, 1)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(posterior mean − shift_factor) · scaling_factor``: ``[B, 3, H, W]`` in ``[-1, 1]`` → fp32 CPU
        ``[B, 16, H/8, W/8]`` (diffusers ``FluxPipeline`` / ComfyUI ``latent_formats.Flux``). Raises ``ValueError``
        without a VAE."""
        if self.vae is None:
            raise ValueError("this host has no VAE")
        mean = self.vae.encode(pixels.to(self.device, torch.float32)).latent_dist.mean
        c = self.vae.config
        return ((mean - (c.shift_factor or 0.0)) * c.scaling_factor).float().cpu()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """``latents / scaling_factor + shift_factor`` decoded: ``[B, 16, h, w]`` → fp32 CPU ``[B, 3, 8h, 8w]`` in
        ``[0, 1]``. Raises ``ValueError`` without a VAE."""
        if self.vae is None:
            raise ValueError("this host has no VAE")
        c = self.vae.config
        z = latents.to(self.device, torch.float32) / c.scaling_factor + (c.shift_factor or 0.0)
        img = self.vae.decode(z).sample
        return ((img.float() + 1) / 2).clamp(0, 1).cpu()

    def scheduler(self, shift: float | None = None):
        """The sampling ``FlowMatchEulerDiscreteScheduler``: dev uses Flux's resolution-dependent shift
        (``use_dynamic_shifting``, mu = lin(256 → 0.5, 4096 → 1.15) of the packed sequence length: diffusers'
        FLUX.1-dev ``scheduler_config.json``, BFL ``flux/sampling.py`` ``get_schedule(shift=True)``, kohya
        ``flux_train_utils.py`` line 245); schnell none (BFL samples schnell with ``shift=False``); a float
        ``shift`` fixes σ' = shift·σ / (1 + (shift − 1)·σ) instead (SD3-style)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        if shift is not None:
            return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=float(shift),
                                                   use_dynamic_shifting=False)
        if self.variant == "schnell":
            return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                               base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                               max_image_seq_len=4096)

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], negative: str = "", *, width: int = 1024, height: int = 1024,
               steps: int = 20, cfg: float = 1.0, seed: int = 0, guidance: float | None = None,
               shift: float | None = None) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in ``[0, 1]`` from diffusers ``FluxPipeline`` with the current deltas.

        Flux sampling settings as kohya's ``sample_image_inference`` (``flux_train_utils.py`` 150-270) names them:
        ``guidance`` = the embedded (distilled) guidance, kohya ``--g`` (default :attr:`guidance`, dev only);
        ``cfg`` = kohya ``--l`` / ``scale``: true classifier-free guidance with ``negative`` when ≠ 1 (diffusers
        ``true_cfg_scale``; kohya's Flux default 1.0, i.e. off); ``steps``; ``shift`` (see :meth:`scheduler`).
        ``width`` / ``height`` are rounded down to multiples of 2·vae_scale. Noise from ``seed`` on the CPU.
        """
        from diffusers import FluxPipeline

        m = 2 * self.vae_scale
        width, height = max(m, int(width) // m * m), max(m, int(height) // m * m)
        cond = self.encode_prompts(list(prompts))
        kw = {}
        if cfg != 1.0:
            neg = self.encode_prompts([negative] * len(prompts))
            kw = dict(negative_prompt_embeds=neg.context, negative_pooled_prompt_embeds=neg.pooled,
                      true_cfg_scale=float(cfg))
        pipe = FluxPipeline(scheduler=self.scheduler(shift), vae=self.vae, text_encoder=None, tokenizer=None,
                            text_encoder_2=None, tokenizer_2=None, transformer=self.transformer)
        pipe.set_progress_bar_config(disable=True)
        h, w = height // self.vae_scale, width // self.vae_scale
        g = torch.Generator("cpu").manual_seed(int(seed))
        noise = torch.randn((len(prompts), self.latent_channels, h, w), generator=g)
        latents = FluxPipeline._pack_latents(noise, len(prompts), self.latent_channels, h, w).to(self.device, self.dtype)
        out = pipe(prompt_embeds=cond.context, pooled_prompt_embeds=cond.pooled, height=height, width=width,
                   num_inference_steps=int(steps), guidance_scale=self.guidance if guidance is None else float(guidance),
                   latents=latents, output_type="latent", **kw).images
        lat = FluxPipeline._unpack_latents(out, height, width, self.vae_scale)
        return self.decode_latents(lat.float())
