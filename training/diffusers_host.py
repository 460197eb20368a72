"""The diffusers implementation of :class:`~.host.DiffusionHost` (tests and the CLI).

Wraps ``UNet2DConditionModel``, ``CLIPTextModel`` (+ tokenizer) and ``AutoencoderKL`` from a local diffusers
folder (:meth:`DiffusersHost.from_pretrained`), a single-file SD 1.x/2.x checkpoint with the configs shipped in
``configs/`` (:meth:`DiffusersHost.from_single_file`, see :mod:`.model_loading`; ``load_host`` picks one), or
built in memory. Trainable deltas are applied in activation space by default (a forward hook adds
``DeltaModule.output_delta`` to the layer's output: :class:`~.host.OutputDeltaHook`), or with
``delta_space="weight"`` through ``torch.nn.utils.parametrize`` (the weight seen by the module becomes
``delta(weight)``); both leave the stored weights untouched and are removed cleanly (hook handles;
``remove_parametrizations(..., leave_parametrized=False)``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from .conditioning import Conditioning, default_size_ids
from .host import DeltaModule, DiffusionHost, OutputDeltaHook, check_delta_space


def sd_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                      beta_end: float = 0.012) -> torch.Tensor:
    """ᾱ_t of Stable Diffusion's "scaled_linear" schedule (LDM config: linear in sqrt(β)), float32 ``[T]``.

    β_t = linspace(√β_start, √β_end, T)², ᾱ_t = ∏(1 − β_s) — as CompVis ``ldm/modules/diffusionmodules/util.py``
    ``make_beta_schedule("linear")`` and diffusers ``DDPMScheduler(beta_schedule="scaled_linear")``.
    Values decrease from ≈0.99915 to ≈0.0047 for the SD defaults.
    """
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


def check_tokenizer_length(tokenizer, text_encoder, where) -> None:
    """Raise a clear ``ValueError`` when the tokenizer's ``model_max_length`` is not the text encoder's window.

    CLIP text encoders have ``max_position_embeddings`` (77) positions; a ``tokenizer_config.json`` with another
    ``model_max_length`` (or none: transformers then uses 1e30) makes every caption fail deep inside the text
    encoder. kohya's ``max_token_length`` (150/225) is a separate setting that chunks captions into 77-token
    windows; it is not read from the tokenizer.
    """
    n = getattr(getattr(text_encoder, "config", None), "max_position_embeddings", None)
    m = getattr(tokenizer, "model_max_length", None)
    if n is not None and m is not None and int(m) != int(n):
        raise ValueError(f"{where}: the tokenizer says model_max_length = {m}, but the text encoder takes {n} "
                         f"tokens; set \"model_max_length\": {n} in tokenizer_config.json (for longer captions use "
                         "kohya's max_token_length = 150 or 225)")


def _canonical_te_path(name: str) -> str:
    # transformers 5.x CLIPTextModel has no "text_model." level (CLIPTextModelWithProjection keeps it); kohya and
    # ComfyUI names need it. The projection head sits beside text_model, never under it.
    if name.startswith("text_model.") or name == "text_projection":
        return name
    return f"text_model.{name}"


def is_sdxl_unet(unet: nn.Module) -> bool:
    """True for an SDXL-style ``UNet2DConditionModel`` (``addition_embed_type == "text_time"``: it needs the pooled
    text embedding and the six size ids)."""
    return getattr(getattr(unet, "config", None), "addition_embed_type", None) == "text_time"


def kohya_chunked_ids(tokenizer, text: str, max_token_length: int) -> torch.Tensor:
    """kohya's token ids for long captions, ``[n, 77]`` with n = max_token_length / 75 (kohya-ss/sd-scripts
    ``library/strategy_base.py`` ``_get_input_ids``, lines 221–272 at 48d368f).

    The caption is tokenized to ``max_token_length + 2`` ids (padded, truncated) and cut into 77-id chunks
    ``<BOS> + 75 ids + last id``. When the pad id equals the eos id (SD1's tokenizer) that is all; otherwise (SD2,
    SDXL's OpenCLIP tokenizer pads with ``!``) a chunk ending in ``x <PAD/EOS>`` gets ``<EOS>`` as its last id and
    a chunk starting ``<BOS> <PAD>`` gets ``<EOS>`` second, as kohya does.
    """
    m = tokenizer.model_max_length
    max_length = int(max_token_length) + 2
    ids = tokenizer(text, padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="pt").input_ids[0]
    chunks = []
    for i in range(1, max_length - m + 2, m - 2):
        c = torch.cat([ids[:1], ids[i:i + m - 2], ids[-1:]])
        if tokenizer.pad_token_id != tokenizer.eos_token_id:
            if c[-2] != tokenizer.eos_token_id and c[-2] != tokenizer.pad_token_id:
                c[-1] = tokenizer.eos_token_id
            if c[1] == tokenizer.pad_token_id:
                c[1] = tokenizer.eos_token_id
        chunks.append(c)
    return torch.stack(chunks)


class DiffusersHost(DiffusionHost):
    """A :class:`DiffusionHost` over diffusers / transformers modules.

    Args:
        unet: ``UNet2DConditionModel``.
        text_encoder: ``CLIPTextModel`` (hidden states of the last layer are the context).
        tokenizer: a ``CLIPTokenizer`` or any callable ``tok(list[str]) -> LongTensor [B, 77]``.
        vae: ``AutoencoderKL`` (``config.scaling_factor`` is applied), or ``None`` when latents are given.
        alphas_cumprod: ``[T]`` float32; default SD's scaled_linear schedule.
        prediction_type: ``"epsilon"`` or ``"v_prediction"``.
        arch: ``"sd1"``, ``"sd2"`` or ``"sdxl"`` (naming / metadata); an SDXL UNet (:func:`is_sdxl_unet`) makes it
            ``"sdxl"`` whatever is passed.
        device, dtype: where and in which dtype the frozen weights run (the VAE always runs in fp32).
        delta_space: ``"activation"`` (default) or ``"weight"``: how installed deltas are applied (:mod:`.host`).
        text_encoder_2, tokenizer_2: SDXL's OpenCLIP-G ``CLIPTextModelWithProjection`` and its tokenizer. With them
            the components are ``"te1"`` (``text_encoder``, CLIP-L) and ``"te2"``; the context is both encoders'
            penultimate hidden states concatenated (``[B, 77, 768 + 1280]``) and ``pooled`` is te2's projected
            pooled output, as diffusers ``StableDiffusionXLPipeline.encode_prompt`` (``clip_skip=None``) and kohya
            ``sdxl_train_util`` compute them.

    Raises:
        ValueError: ``prediction_type`` other than ``"epsilon"`` / ``"v_prediction"``; an SDXL UNet given one text
            encoder; two text encoders for a non-SDXL UNet; an SDXL refiner UNet (not supported: its conditioning
            is an aesthetic score, and kohya trains no LoRA for it).
    """

    def __init__(self, unet: nn.Module, text_encoder: nn.Module | None, tokenizer: Callable | None,
                 vae: nn.Module | None, *, alphas_cumprod: torch.Tensor | None = None,
                 prediction_type: str = "epsilon", arch: str = "sd1", device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, text_encoder_2: nn.Module | None = None,
                 tokenizer_2: Callable | None = None, delta_space: str = "activation"):
        self.delta_space = check_delta_space(delta_space)
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction_type {prediction_type!r}")
        sdxl = is_sdxl_unet(unet)
        if sdxl and int(getattr(unet.config, "projection_class_embeddings_input_dim", 0) or 0) == 2560:
            raise ValueError("this is an SDXL refiner UNet (aesthetic-score conditioning); Concept Lab trains and "
                             "erases SDXL base models (SDXL 1.0, Illustrious, NoobAI, Pony), not the refiner")
        if sdxl and text_encoder is not None and text_encoder_2 is None:
            raise ValueError("an SDXL UNet needs both text encoders (text_encoder = CLIP-L, text_encoder_2 = "
                             "OpenCLIP-G with projection)")
        if text_encoder_2 is not None and not sdxl:
            raise ValueError("two text encoders were given but the UNet is not SDXL (no text_time embedding)")
        self.text_encoder_2 = (text_encoder_2.to(torch.device(device), dtype).eval().requires_grad_(False)
                               if text_encoder_2 is not None else None)
        self.tokenizer_2 = tokenizer_2 if tokenizer_2 is not None else tokenizer
        self.device = torch.device(device)
        self.dtype = dtype
        self.unet = unet.to(self.device, dtype).eval().requires_grad_(False)
        self.text_encoder = (text_encoder.to(self.device, dtype).eval().requires_grad_(False)
                             if text_encoder is not None else None)
        self.tokenizer = tokenizer
        self.vae = vae.to(self.device, torch.float32).eval().requires_grad_(False) if vae is not None else None
        self.alphas_cumprod = (alphas_cumprod if alphas_cumprod is not None else sd_alphas_cumprod()).float().cpu()
        self.prediction_type = prediction_type
        self.arch = "sdxl" if sdxl else arch
        self.latent_channels = int(getattr(self.unet.config, "in_channels", 4))
        if self.vae is not None:
            self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self._installed: dict[tuple[str, str, str], DeltaModule] = {}
        self._hooks: dict[int, tuple[nn.Module, OutputDeltaHook]] = {}  # id(layer) -> activation-space hook

    # -- construction -----------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, device: str = "cpu",
                        dtype: torch.dtype = torch.float32) -> "DiffusersHost":
        """Load a local diffusers folder (``unet/``, ``text_encoder/``, ``tokenizer/``, ``vae/``, ``scheduler/``;
        SDXL folders also ``text_encoder_2/`` + ``tokenizer_2/``).

        Nothing is downloaded (``local_files_only``). Raises ``FileNotFoundError`` for a missing part and
        ``ValueError`` for an SDXL refiner (see the class docstring).
        """
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        root = Path(folder)
        for part in ("unet", "text_encoder", "tokenizer", "vae"):
            if not (root / part).is_dir():
                raise FileNotFoundError(f"{root}: not a diffusers model folder (missing {part}/)")
        unet = UNet2DConditionModel.from_pretrained(root / "unet", local_files_only=True)
        te = CLIPTextModel.from_pretrained(root / "text_encoder", local_files_only=True)
        tok = CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
        check_tokenizer_length(tok, te, root / "tokenizer")
        vae = AutoencoderKL.from_pretrained(root / "vae", local_files_only=True)
        te2 = tok2 = None
        if is_sdxl_unet(unet):
            from transformers import CLIPTextModelWithProjection

            for part in ("text_encoder_2", "tokenizer_2"):
                if not (root / part).is_dir():
                    raise FileNotFoundError(f"{root}: an SDXL diffusers folder needs {part}/")
            te2 = CLIPTextModelWithProjection.from_pretrained(root / "text_encoder_2", local_files_only=True)
            tok2 = CLIPTokenizer.from_pretrained(root / "tokenizer_2", local_files_only=True)
        ac, pred = None, "epsilon"
        sched_cfg = root / "scheduler" / "scheduler_config.json"
        if sched_cfg.is_file():
            import json

            cfg = json.loads(sched_cfg.read_text())
            pred = cfg.get("prediction_type", "epsilon")
            if cfg.get("beta_schedule", "scaled_linear") == "scaled_linear":
                ac = sd_alphas_cumprod(cfg.get("num_train_timesteps", 1000), cfg.get("beta_start", 0.00085),
                                       cfg.get("beta_end", 0.012))
        arch = "sd2" if getattr(unet.config, "cross_attention_dim", 768) == 1024 else "sd1"
        return cls(unet, te, tok, vae, alphas_cumprod=ac, prediction_type=pred, arch=arch, device=device,
                   dtype=dtype, text_encoder_2=te2, tokenizer_2=tok2)

    @classmethod
    def from_single_file(cls, path: str | os.PathLike, *, tokenizer=None, device: str = "cpu",
                         dtype: torch.dtype = torch.float32, prediction_type: str | None = None,
                         configs_dir: str | os.PathLike | None = None, config_overrides=None) -> "DiffusersHost":
        """Load a single-file SD 1.x / 2.x checkpoint (``.safetensors``; ``.ckpt`` weights-only) with the configs
        shipped in the pack's ``configs/`` folder; nothing is downloaded.

        ``tokenizer``: a tokenizer object/callable or a folder with ``vocab.json`` + ``merges.txt``; when omitted,
        ``$COMFYUI_PATH/comfy/sd1_tokenizer`` and then the ComfyUI checkout the pack is installed in are tried
        (see :func:`.model_loading.resolve_tokenizer`). ``prediction_type`` overrides detection (metadata, SD2
        heuristic; see :func:`.model_loading.load_single_file`). ``configs_dir`` / ``config_overrides`` replace
        the shipped configs (tests use tiny ones). The returned host has ``load_report`` (prediction-type source,
        unused checkpoint keys per component).

        Raises ``FileNotFoundError``, ``formats.safetensors_io.WeightFileError``,
        :class:`.model_loading.CheckpointLoadError` (SDXL/Flux/inpainting, key or shape mismatch) and
        :class:`.model_loading.TokenizerNotFound`.
        """
        from .model_loading import load_single_file, resolve_tokenizer

        sf = load_single_file(path, dtype=dtype, prediction_type=prediction_type, configs_dir=configs_dir,
                              config_overrides=config_overrides)
        tok = resolve_tokenizer(tokenizer, arch=sf.arch)
        tok2 = None
        if sf.text_encoder_2 is not None:  # SDXL: the OpenCLIP-G tokenizer is CLIP's BPE padded with "!" (id 0)
            explicit_object = tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike))
            tok2 = tok if explicit_object else resolve_tokenizer(tokenizer, arch="sd2")
        host = cls(sf.unet, sf.text_encoder, tok, sf.vae, alphas_cumprod=sf.alphas_cumprod,
                   prediction_type=sf.prediction_type, arch=sf.arch, device=device, dtype=dtype,
                   text_encoder_2=sf.text_encoder_2, tokenizer_2=tok2)
        if sf.zero_terminal_snr:
            host.configure_schedule(zero_terminal_snr=True)
        host.load_report = {"path": str(path), "arch": sf.arch, "prediction_type": sf.prediction_type,
                            "zero_terminal_snr": sf.zero_terminal_snr,
                            "prediction_source": sf.prediction_source, "unused_keys": sf.unused_keys}
        return host

    # -- modules and deltas -------------------------------------------------------------------------------------
    def components(self) -> list[str]:
        """``["unet", "te"]`` (SD1/SD2), ``["unet", "te1", "te2"]`` (SDXL), or ``["unet"]`` without text encoders."""
        if self.text_encoder is None:
            return ["unet"]
        return ["unet", "te1", "te2"] if self.text_encoder_2 is not None else ["unet", "te"]

    def _root(self, component: str) -> nn.Module:
        roots = {"unet": self.unet}
        if self.text_encoder is not None:
            if self.text_encoder_2 is not None:
                roots.update(te1=self.text_encoder, te2=self.text_encoder_2)
            else:
                roots["te"] = self.text_encoder
        if component not in roots:
            raise ValueError(f"this model has no component {component!r} (has {self.components()})")
        return roots[component]

    def modules(self, component: str) -> dict[str, nn.Module]:
        """Leaf ``nn.Linear`` / ``nn.Conv2d`` modules of ``"unet"`` or a text encoder (``"te"``, ``"te1"``,
        ``"te2"``) keyed by their diffusers path.

        Text-encoder paths always start with ``text_model.`` (transformers 5.x drops that level; kohya and
        ComfyUI names need it). Modules inside installed parametrizations are skipped.
        Raises ``ValueError`` for a component this host does not have.
        """
        root = self._root(component)
        out = {}
        for name, mod in root.named_modules():
            # skip modules inside installed deltas (registered under <module>.parametrizations.<attr>)
            if ".parametrizations." in f".{name}." or not isinstance(mod, (nn.Linear, nn.Conv2d)):
                continue
            out[name if component == "unet" else _canonical_te_path(name)] = mod
        return out

    def unet_ldm_paths(self) -> dict[str, str]:
        """Diffusers → LDM UNet module paths for this UNet's own config, from
        :func:`conceptlab.formats.ldm_keys.diffusers_to_ldm_unet` (checked there against diffusers' converter).
        Raises ``ValueError`` for a UNet layout diffusers' converter does not describe."""
        if getattr(self, "_ldm_paths", None) is None:
            from ..formats.ldm_keys import diffusers_to_ldm_unet

            pmap = diffusers_to_ldm_unet("sdxl" if self.arch == "sdxl" else "sd1", dict(self.unet.config))
            self._ldm_paths = {d.rpartition(".")[0]: l.rpartition(".")[0] for d, l in pmap.items()
                               if d.endswith((".weight", ".bias"))}
        return self._ldm_paths

    def install_delta(self, component: str, path: str, attr: str, delta: DeltaModule) -> None:
        """Apply ``delta`` to ``<component>.<path>.<attr>``: in activation space (:attr:`delta_space`
        ``"activation"``) as an entry of the layer's :class:`~.host.OutputDeltaHook` forward hook; in weight space as
        a ``torch.nn.utils.parametrize`` parametrization (the frozen weight is kept as
        ``parametrizations.<attr>.original``). The delta is moved to :attr:`device`.

        Raises:
            ValueError: ``attr`` not ``"weight"``/``"bias"``, the module has no such tensor (e.g. ``bias=False``),
                a delta is already installed there, or an unknown ``component``.
            KeyError: ``path`` is not a module of ``component`` (see :meth:`modules`).
        """
        mod = self._delta_target(component, path, attr)
        key = (component, path, attr)
        delta.to(self.device)
        if check_delta_space(self.delta_space) == "activation":
            if id(mod) not in self._hooks:
                self._hooks[id(mod)] = (mod, OutputDeltaHook().register(mod))
            self._hooks[id(mod)][1].entries.append((attr, delta, None))
        else:
            parametrize.register_parametrization(mod, attr, delta, unsafe=True)
        self._installed[key] = delta

    def clear_deltas(self) -> None:
        """Remove every installed delta (hooks and parametrizations), restoring the original (frozen) model."""
        for _mod, hook in self._hooks.values():
            hook.remove()
        self._hooks.clear()
        for (component, path, attr) in list(self._installed):
            mod = self.modules(component)[path]
            if parametrize.is_parametrized(mod, attr):
                parametrize.remove_parametrizations(mod, attr, leave_parametrized=False)
        self._installed.clear()

    def installed_deltas(self) -> dict[tuple[str, str, str], DeltaModule]:
        """A copy of ``{(component, path, attr): delta}`` for the installed deltas."""
        return dict(self._installed)

    def set_gradient_checkpointing(self, on: bool) -> None:
        """diffusers' ``enable_gradient_checkpointing`` / ``disable_gradient_checkpointing`` on the UNet (each block
        recomputed in backward: same gradients, fewer activations kept; deltas of either space are recomputed
        with it)."""
        (self.unet.enable_gradient_checkpointing if on else self.unet.disable_gradient_checkpointing)()

    # -- conditioning, prediction, VAE --------------------------------------------------------------------------
    def _tokenize(self, prompts: Sequence[str], tokenizer=None) -> torch.Tensor:
        """Token ids ``[B, n, 77]`` (n = 1, or max_token_length / 75 kohya chunks)."""
        tokenizer = self.tokenizer if tokenizer is None else tokenizer
        if tokenizer is None:
            raise ValueError("this host has no tokenizer")
        if not hasattr(tokenizer, "model_max_length"):
            if self.max_token_length:
                raise ValueError("max_token_length needs a transformers CLIPTokenizer (pad/eos ids)")
            return tokenizer(list(prompts)).to(self.device)[:, None]
        if self.max_token_length:
            return torch.stack([kohya_chunked_ids(tokenizer, str(p), self.max_token_length)
                                for p in prompts]).to(self.device)
        ids = tokenizer(list(prompts), padding="max_length", truncation=True,
                        max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
        return ids.to(self.device)[:, None]

    def _hidden(self, encoder: nn.Module, ids: torch.Tensor, layer: int | None, final_norm: bool):
        """Encode ``[B, n, 77]`` ids chunk by chunk; the hidden states of ``layer`` (None = last hidden state),
        re-joined like kohya (BOS, every chunk's 75 tokens, last EOS/PAD). Returns ``(states [B, L, D], output)``."""
        b, n, t = ids.shape
        out = encoder(ids.reshape(b * n, t), output_hidden_states=layer is not None)
        if layer is None:
            h = out[0]
        else:
            h = out.hidden_states[layer]
            if final_norm:
                tm = encoder.text_model if hasattr(encoder, "text_model") else encoder
                h = tm.final_layer_norm(h)
        h = h.reshape(b, n * t, h.shape[-1])
        if n > 1:  # kohya encode_tokens: <BOS> + 75 tokens of each chunk + the last <EOS>/<PAD>
            parts = [h[:, :1]] + [h[:, i:i + t - 2] for i in range(1, n * t, t)] + [h[:, -1:]]
            h = torch.cat(parts, dim=1)
        return h, out

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """The :class:`~.conditioning.Conditioning` of ``prompts`` (compute dtype, on :attr:`device`).

        SD1/SD2: ``context`` = CLIP hidden states ``[B, 77, D]`` (last layer, or layer ``-clip_skip`` followed by
        the final layer norm, kohya ``strategy_sd.SdTextEncodingStrategy``). SDXL: CLIP-L and OpenCLIP-G
        penultimate hidden states concatenated ``[B, 77, 2048]`` and ``pooled`` = OpenCLIP-G's projected pooled
        output of the first chunk ``[B, 1280]`` (diffusers ``StableDiffusionXLPipeline.encode_prompt``; kohya
        ``strategy_sdxl._get_hidden_states_sdxl``, which has no clip_skip). With ``max_token_length`` 150/225 the
        context has 152/227 tokens (kohya's chunking, :func:`kohya_chunked_ids`). Raises ``ValueError`` when the
        host has no text encoder or no tokenizer.
        """
        if self.text_encoder is None:
            raise ValueError("this host has no text encoder")
        if self.text_encoder_2 is None:
            layer = None if not self.clip_skip or self.clip_skip == 1 else -self.clip_skip
            h, _ = self._hidden(self.text_encoder, self._tokenize(prompts), layer, final_norm=True)
            return Conditioning(h)
        ids1, ids2 = self._tokenize(prompts), self._tokenize(prompts, self.tokenizer_2)
        h1, _ = self._hidden(self.text_encoder, ids1, -2, final_norm=False)
        h2, out2 = self._hidden(self.text_encoder_2, ids2, -2, final_norm=False)
        pooled = out2.text_embeds.reshape(ids2.shape[0], ids2.shape[1], -1)[:, 0]  # kohya: pool2[::n_size]
        return Conditioning(torch.cat([h1, h2], dim=-1), pooled)

    def configure_text(self, clip_skip: int | None = None, max_token_length: int | None = None) -> list[str]:
        """See :meth:`.host.DiffusionHost.configure_text`; SDXL has no clip_skip in kohya (a warning is returned)."""
        msgs = super().configure_text(clip_skip, max_token_length)
        if self.text_encoder_2 is not None and self.clip_skip not in (None, 1):
            msgs.append("clip_skip has no effect on SDXL (kohya's SDXL trainer always uses the penultimate layers "
                        "of both text encoders and warns the same)")
            self.clip_skip = None
        return msgs

    def predict(self, x_t: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning | torch.Tensor) -> torch.Tensor:
        """UNet output ``[B, C, h, w]`` (compute dtype) for ``x_t`` ``[B, C, h, w]``, int ``timesteps`` ``[B]`` and
        ``cond`` (a :class:`~.conditioning.Conditioning` or a bare context ``[B, L, D]``); inputs are moved/cast
        to :attr:`device` / :attr:`dtype`. SDXL: ``added_cond_kwargs = {"text_embeds": cond.pooled, "time_ids":
        size_ids}`` with ``cond.extras["size_ids"]`` or, when absent, the latent's pixel size and no crop.
        Raises ``ValueError`` for an SDXL UNet given a conditioning without ``pooled``."""
        cond = Conditioning.wrap(cond)
        kwargs = {}
        if is_sdxl_unet(self.unet):
            if cond.pooled is None:
                raise ValueError("an SDXL UNet needs a pooled text embedding (encode prompts with this host)")
            ids = cond.extras.get("size_ids")
            if ids is None:
                ids = default_size_ids(x_t.shape[0], x_t.shape[-2] * self.vae_scale, x_t.shape[-1] * self.vae_scale)
            kwargs["added_cond_kwargs"] = {"text_embeds": cond.pooled.to(self.device, self.dtype),
                                           "time_ids": ids.to(self.device, self.dtype)}
        return self.unet(x_t.to(self.device, self.dtype), timesteps.to(self.device),
                         encoder_hidden_states=cond.context.to(self.device, self.dtype), **kwargs).sample

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """VAE posterior mean × ``vae.config.scaling_factor``: ``[B, 3, H, W]`` in ``[-1, 1]`` → fp32 CPU
        ``[B, latent_channels, H/8, W/8]``. Raises ``ValueError`` when the host has no VAE."""
        if self.vae is None:
            raise ValueError("this host has no VAE")
        dist = self.vae.encode(pixels.to(self.device, torch.float32)).latent_dist
        return (dist.mean * self.vae.config.scaling_factor).float().cpu()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents ``[B, 4, h, w]`` → fp32 CPU images ``[B, 3, 8h, 8w]`` clamped to ``[0, 1]``.

        Raises ``ValueError`` when the host has no VAE.
        """
        if self.vae is None:
            raise ValueError("this host has no VAE")
        img = self.vae.decode(latents.to(self.device, torch.float32) / self.vae.config.scaling_factor).sample
        return ((img.float() + 1) / 2).clamp(0, 1).cpu()
