"""Load a Stable Diffusion model for the diffusers host without downloading anything.

Two sources:

* a local **diffusers folder** (``unet/``, ``text_encoder/``, ``tokenizer/``, ``vae/``, ``scheduler/``):
  :meth:`DiffusersHost.from_pretrained`;
* a **single-file LDM checkpoint** (``.safetensors``; ``.ckpt``/``.pt`` only through
  ``torch.load(weights_only=True)``), as A1111/ComfyUI users keep them: :func:`load_single_file`.

Single files carry weights but no configs and no tokenizer. The configs ship with the pack as data
(``configs/<arch>_{unet,vae,text_encoder,scheduler}.json``, copied from the released models' configs); the key
conversion is diffusers' own (``diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint``), so LDM names
are never re-derived here. diffusers' ``from_single_file`` itself is not used because it fetches configs (and,
for CLIP, a config repository) from the Hugging Face Hub.

The CLIP tokenizer (BPE ``vocab.json`` + ``merges.txt``) cannot be downloaded and transformers ships none; it is
resolved by :func:`resolve_tokenizer` in this order: an explicit argument (a tokenizer object, or a folder with
``vocab.json`` + ``merges.txt``, e.g. a diffusers model's ``tokenizer/`` or ComfyUI's ``comfy/sd1_tokenizer``),
``$COMFYUI_PATH/comfy/sd1_tokenizer``, the ComfyUI checkout this pack is installed in
(``ComfyUI/custom_nodes/<pack>`` → ``ComfyUI/comfy/sd1_tokenizer``), else a :class:`TokenizerNotFound` error
saying how to supply one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..formats.keys import detect_architecture
from ..formats.safetensors_io import WeightFile

__all__ = ["CONFIGS_DIR", "SUPPORTED_ARCHS", "CheckpointLoadError", "TokenizerNotFound", "SingleFileModel",
           "load_configs", "load_single_file", "resolve_tokenizer", "load_tokenizer", "load_host"]

#: the JSON configs shipped with the pack (``<arch>_<part>.json``)
CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
#: the pack's root folder (in ComfyUI: ``ComfyUI/custom_nodes/<pack>``; not symlink-resolved, since a pack is
#: often linked into custom_nodes/)
PACK_DIR = Path(os.path.abspath(__file__)).parents[1]
SUPPORTED_ARCHS = ("sd1", "sd2", "sdxl")
PARTS = ("unet", "vae", "text_encoder", "scheduler")
#: parts only some families have (SDXL's OpenCLIP-G text encoder)
EXTRA_PARTS = {"sdxl": ("text_encoder_2",)}

# single-file LDM prefixes per component (original CompVis / Stability layouts; ComfyUI's CheckpointSave writes
# the same)
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."      # SD1: HF CLIPTextModel names under it
OPEN_CLIP_PREFIX = "cond_stage_model.model."       # SD2: OpenCLIP names under it
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."  # SDXL te1: HF CLIP names under it
SDXL_CLIP_G_PREFIX = "conditioner.embedders.1.model."        # SDXL te2: OpenCLIP names under it
#: ComfyUI's v-prediction / zero-terminal-SNR marker keys in SDXL single files (comfy/supported_models.py
#: SDXL.model_type: "v_pred", "ztsnr"; NoobAI-XL v-pred and other "zsnr anime checkpoints" carry them)
V_PRED_KEY, ZTSNR_KEY = "v_pred", "ztsnr"

# ComfyUI's SD2 v-prediction heuristic (comfy/supported_models.py, SD20.model_type): the std of this bias is
# > 0.09 in the 768-v models and smaller in the 512 epsilon ones.
_SD2_V_PROBE = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
_SD2_V_THRESHOLD = 0.09


class CheckpointLoadError(ValueError):
    """A checkpoint that cannot be turned into diffusers models (wrong family, missing/extra keys, bad shapes)."""


class TokenizerNotFound(FileNotFoundError):
    """No CLIP tokenizer files could be found (none can be downloaded)."""


@dataclass
class SingleFileModel:
    """The parts of a single-file checkpoint, as diffusers/transformers modules.

    ``unet``: ``UNet2DConditionModel``; ``text_encoder``: ``CLIPTextModel``; ``vae``: ``AutoencoderKL`` (all on
    CPU, eval mode, weights in the requested dtype; the VAE in float32). ``alphas_cumprod``: float32 ``[T]`` from
    the scheduler config. ``prediction_type``: ``"epsilon"`` | ``"v_prediction"`` and ``prediction_source``: why
    (``"argument"``, ``"metadata"``, ``"sd2 heuristic"``, ``"config"``). ``arch``: ``"sd1"`` | ``"sd2"``.
    ``text_encoder_2``: SDXL's ``CLIPTextModelWithProjection`` (``None`` otherwise); ``zero_terminal_snr``: the file
    says its schedule is zero-terminal-SNR (ComfyUI's ``ztsnr`` marker key).
    ``unused_keys``: component -> checkpoint keys under that component's prefix the conversion did not use
    (e.g. SD2's dropped last OpenCLIP layer, ``logit_scale``); keys of other prefixes (``model_ema.``,
    ``alphas_cumprod``...) are ignored silently.
    """

    unet: Any
    text_encoder: Any
    vae: Any
    alphas_cumprod: torch.Tensor
    prediction_type: str
    prediction_source: str
    arch: str
    unused_keys: dict[str, list[str]] = field(default_factory=dict)
    text_encoder_2: Any = None
    zero_terminal_snr: bool = False


# -------------------------------------------------------------------------------------------------------------
# configs
# -------------------------------------------------------------------------------------------------------------
def load_configs(arch: str, configs_dir: str | os.PathLike | None = None) -> dict[str, dict]:
    """The configs of ``arch`` as dicts: ``{"unet", "vae", "text_encoder", "scheduler"}`` (+ ``"text_encoder_2"``
    for SDXL).

    Read from ``<configs_dir>/<arch>_<part>.json`` (default: the pack's ``configs/``); keys starting with ``_``
    (``_class_name``, ``_comment``) are dropped. Raises ``FileNotFoundError`` naming a missing file and
    ``ValueError`` for invalid JSON.
    """
    root = Path(configs_dir) if configs_dir is not None else CONFIGS_DIR
    out = {}
    for part in PARTS + EXTRA_PARTS.get(arch, ()):
        f = root / f"{arch}_{part}.json"
        if not f.is_file():
            raise FileNotFoundError(f"model config not found: {f} (the pack ships configs/{arch}_{part}.json)")
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{f}: invalid JSON: {exc}") from None
        out[part] = {k: v for k, v in data.items() if not k.startswith("_")}
    return out


# -------------------------------------------------------------------------------------------------------------
# tokenizer
# -------------------------------------------------------------------------------------------------------------
def _is_tokenizer_dir(p: Path) -> bool:
    return (p / "vocab.json").is_file() and (p / "merges.txt").is_file()


def tokenizer_candidates(comfyui_path: str | os.PathLike | None = None,
                         pack_dir: str | os.PathLike | None = None) -> list[Path]:
    """The folders :func:`resolve_tokenizer` tries after an explicit argument, in order:
    ``<comfyui_path or $COMFYUI_PATH>/comfy/sd1_tokenizer``, then ``<pack_dir>/../../comfy/sd1_tokenizer``
    (the ComfyUI checkout holding ``custom_nodes/<pack>``)."""
    out = []
    cp = comfyui_path if comfyui_path is not None else os.environ.get("COMFYUI_PATH")
    if cp:
        out.append(Path(cp) / "comfy" / "sd1_tokenizer")
    pack = Path(os.path.abspath(pack_dir if pack_dir is not None else PACK_DIR))
    for root in (pack, pack.resolve()):  # as linked into custom_nodes/, and the link's target
        cand = root.parent.parent / "comfy" / "sd1_tokenizer"
        if cand not in out:
            out.append(cand)
    return out


def load_tokenizer(folder: str | os.PathLike, arch: str = "sd1"):
    """A transformers ``CLIPTokenizer`` from a folder holding ``vocab.json`` + ``merges.txt``.

    ``model_max_length`` is forced to 77 (CLIP's context; ComfyUI's copy says 8192). For ``arch="sd2"`` the pad
    token is ``"!"`` (id 0), as in Stable Diffusion 2's tokenizer and ComfyUI's SD2 tokenizer
    (``pad_with_end=False``); SD1 pads with ``<|endoftext|>``. Raises :class:`TokenizerNotFound`.
    """
    from transformers import CLIPTokenizer

    p = Path(folder)
    if not _is_tokenizer_dir(p):
        raise TokenizerNotFound(f"{p}: not a CLIP tokenizer folder (needs vocab.json and merges.txt)")
    kw: dict[str, Any] = {"model_max_length": 77}
    if arch == "sd2":
        kw["pad_token"] = "!"
    return CLIPTokenizer.from_pretrained(str(p), local_files_only=True, **kw)


def resolve_tokenizer(tokenizer: Any = None, *, arch: str = "sd1", comfyui_path: str | os.PathLike | None = None,
                      pack_dir: str | os.PathLike | None = None):
    """Find the CLIP tokenizer for a single-file checkpoint (nothing can be downloaded).

    Order: ``tokenizer`` itself when it is a tokenizer object or callable ``tok(list[str]) -> LongTensor[B, 77]``;
    ``tokenizer`` as a folder (``vocab.json`` + ``merges.txt``: a diffusers model's ``tokenizer/``, ComfyUI's
    ``comfy/sd1_tokenizer``, any CLIP tokenizer folder); then :func:`tokenizer_candidates` (``$COMFYUI_PATH`` and
    the ComfyUI checkout the pack sits in, followed through a symlink too). SD1 and SD2 share the CLIP BPE vocabulary.

    Raises:
        TokenizerNotFound: an explicit folder is not a tokenizer folder, or no candidate exists (the message says
            how to supply one).
        TypeError: ``tokenizer`` is neither a folder path nor a callable.
    """
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        if not callable(tokenizer):
            raise TypeError(f"tokenizer must be a folder or a callable tokenizer, not {type(tokenizer).__name__}")
        return tokenizer
    if tokenizer is not None:
        return load_tokenizer(tokenizer, arch)
    tried = tokenizer_candidates(comfyui_path, pack_dir)
    for cand in tried:
        if _is_tokenizer_dir(cand):
            return load_tokenizer(cand, arch)
    raise TokenizerNotFound(
        "no CLIP tokenizer found for this single-file checkpoint (none can be downloaded). Pass a folder holding "
        "vocab.json and merges.txt: --tokenizer DIR on the command line (or tokenizer=DIR), e.g. a diffusers "
        "model's tokenizer/ folder or ComfyUI's comfy/sd1_tokenizer; or set COMFYUI_PATH to a ComfyUI checkout. "
        "Tried: " + ", ".join(str(t) for t in tried))


# -------------------------------------------------------------------------------------------------------------
# single-file checkpoints
# -------------------------------------------------------------------------------------------------------------
def _instantiate(cls_factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build a model with parameters on the meta device (no random init of ~1 B weights); buffers stay real."""
    try:
        from accelerate import init_empty_weights
    except ImportError:  # accelerate is optional: a normal (slower) construction gives the same result
        return cls_factory()
    with init_empty_weights():
        return cls_factory()


def _load_strict(model: torch.nn.Module, sd: dict[str, torch.Tensor], what: str, path: Path,
                 dtype: torch.dtype) -> None:
    """Load ``sd`` into ``model`` requiring exactly its state-dict keys and shapes; raise a clear error."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    bad_shape = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}" for k in expected
                 if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or bad_shape:
        def few(xs):
            return ", ".join(xs[:6]) + (f" ... (+{len(xs) - 6})" if len(xs) > 6 else "")
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {few(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {few(unexpected)}")
        if bad_shape:
            parts.append(f"{len(bad_shape)} shape mismatch(es): {few(bad_shape)}")
        raise CheckpointLoadError(f"{path.name}: the {what} does not match the shipped config "
                                  f"(is this a fine-tune with another architecture?): " + "; ".join(parts))
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()},
                          strict=True, assign=True)


@contextlib.contextmanager
def _conversion_errors(path: Path, what: str):
    # diffusers' converters index keys they expect; a file of another layout fails inside them with a bare
    # KeyError/IndexError: name the file and the part instead.
    try:
        yield
    except (KeyError, IndexError, RuntimeError, AttributeError, TypeError) as exc:
        raise CheckpointLoadError(f"{path.name}: diffusers could not convert the {what} with the shipped config "
                                  f"({type(exc).__name__}: {exc}); not an SD 1.x/2.x checkpoint?") from exc


def _read_component(wf: WeightFile, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {k: wf.get(k) for k in wf.keys() if k.startswith(prefixes)}


def _unused(source: Mapping[str, torch.Tensor], converted: Mapping[str, torch.Tensor],
            also_used: Callable[[str], bool] = lambda k: False) -> list[str]:
    # diffusers' converters rename (or slice) tensors without copying, so a source tensor is used when its
    # storage reappears in the output; cloned slices (OpenCLIP in_proj) are named by ``also_used``.
    used = {t.untyped_storage().data_ptr() for t in converted.values() if isinstance(t, torch.Tensor)}
    return sorted(k for k, t in source.items()
                  if t.untyped_storage().data_ptr() not in used and not also_used(k))


def _detect_prediction_type(arch: str, wf: WeightFile, sched_cfg: Mapping,
                            prediction_type: str | None) -> tuple[str, str]:
    if prediction_type is not None:
        pt = {"v": "v_prediction", "v-prediction": "v_prediction", "eps": "epsilon"}.get(prediction_type,
                                                                                         prediction_type)
        if pt not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', not {prediction_type!r}")
        return pt, "argument"
    meta = wf.metadata or {}
    mp = str(meta.get("modelspec.prediction_type", "")).lower()
    if mp in ("v", "v_prediction", "v-prediction"):
        return "v_prediction", "metadata"
    if mp in ("epsilon", "eps"):
        return "epsilon", "metadata"
    if str(meta.get("ss_v_parameterization", "")).lower() == "true":
        return "v_prediction", "metadata"
    if arch == "sdxl" and V_PRED_KEY in wf:
        return "v_prediction", "v_pred key"
    if arch == "sd2" and _SD2_V_PROBE in wf:
        std = float(wf.get(_SD2_V_PROBE).float().std(unbiased=False))
        return ("v_prediction" if std > _SD2_V_THRESHOLD else "epsilon"), "sd2 heuristic"
    return str(sched_cfg.get("prediction_type", "epsilon")), "config"


def load_single_file(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                     prediction_type: str | None = None, configs_dir: str | os.PathLike | None = None,
                     config_overrides: Mapping[str, Mapping] | None = None) -> SingleFileModel:
    """Read a single-file Stable Diffusion 1.x / 2.x checkpoint into diffusers/transformers modules.

    Args:
        path: ``.safetensors`` (read tensor by tensor) or ``.ckpt``/``.pt`` (``torch.load(weights_only=True)``
            only; a file that needs full unpickling is refused).
        dtype: dtype of the UNet and text-encoder weights (VAE weights are kept in float32).
        prediction_type: ``"epsilon"`` | ``"v_prediction"`` to override detection. Detection order: this
            argument; safetensors metadata (``modelspec.prediction_type``, kohya ``ss_v_parameterization``);
            for SD2, ComfyUI's heuristic (std of ``output_blocks.11.1.transformer_blocks.0.norm1.bias`` > 0.09 →
            768-v; comfy/supported_models.py ``SD20.model_type``); else the scheduler config (epsilon). SD1 is
            always epsilon unless told otherwise.
        configs_dir: folder of ``<arch>_{unet,vae,text_encoder,scheduler}.json`` (default: the pack's
            ``configs/``; tests pass tiny configs).
        config_overrides: ``{"unet": {...}, ...}`` merged into the loaded configs.

    Returns:
        :class:`SingleFileModel`.

    Raises:
        FileNotFoundError, formats.safetensors_io.WeightFileError: unreadable file.
        CheckpointLoadError: not SD1/SD2/SDXL (Flux, the SDXL refiner, inpainting, a LoRA...), or keys/shapes that
            do not match the
            configs (the message lists missing / unexpected keys and shape mismatches).
        ValueError: ``prediction_type`` not ``"epsilon"`` / ``"v_prediction"``, an unknown ``config_overrides``
            part, or an invalid shipped config (see :func:`load_configs`).

    Source: the key conversion is ``diffusers.loaders.single_file_utils`` (convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint, convert_open_clip_checkpoint; diffusers 0.42).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
    from transformers import CLIPTextConfig, CLIPTextModel

    path = Path(path)
    with WeightFile(path) as wf:
        keys = wf.keys()
        probe = [k for k in keys if re.search(r"attn2\.to_k\.weight$", k)][:1]
        arch = detect_architecture(keys, {k: wf.shape(k) for k in probe})
        if arch not in SUPPORTED_ARCHS:
            hint = {"flux": "Flux is not supported by the diffusers host: train inside ComfyUI",
                    }.get(arch, "no Stable Diffusion UNet/CLIP/VAE keys found (a LoRA or an unrelated file?)")
            raise CheckpointLoadError(f"{path.name}: architecture {arch!r} is not supported here; {hint}. "
                                      "Supported single files: SD 1.x, SD 2.x and SDXL checkpoints.")
        if arch == "sdxl" and not any(k.startswith(SDXL_CLIP_L_PREFIX) for k in keys):
            raise CheckpointLoadError(f"{path.name}: an SDXL checkpoint without the CLIP-L text encoder "
                                      f"('{SDXL_CLIP_L_PREFIX}'): the SDXL refiner is not supported (Concept Lab "
                                      "trains and erases SDXL base models: SDXL 1.0, Illustrious, NoobAI, Pony)")
        if not any(k.startswith(UNET_PREFIX) for k in keys):
            raise CheckpointLoadError(f"{path.name}: no '{UNET_PREFIX}' keys: not a full single-file checkpoint")
        conv_in = UNET_PREFIX + "input_blocks.0.0.weight"
        if conv_in in wf and wf.shape(conv_in)[1] != 4:
            raise CheckpointLoadError(f"{path.name}: UNet has {wf.shape(conv_in)[1]} input channels "
                                      "(inpainting/instruct model); only 4-channel text-to-image models train here")
        cfgs = load_configs(arch, configs_dir)
        for part, extra in (config_overrides or {}).items():
            if part not in cfgs:
                raise ValueError(f"config_overrides: unknown part {part!r} (use {', '.join(PARTS)})")
            cfgs[part].update(extra)
        pred, source = _detect_prediction_type(arch, wf, cfgs["scheduler"], prediction_type)
        ztsnr = arch == "sdxl" and ZTSNR_KEY in wf
        te_prefix = {"sd1": CLIP_PREFIX, "sd2": OPEN_CLIP_PREFIX, "sdxl": SDXL_CLIP_L_PREFIX}[arch]
        unet_src = _read_component(wf, (UNET_PREFIX,))
        vae_src = _read_component(wf, (VAE_PREFIX,))
        te_src = _read_component(wf, (te_prefix,))
        te2_src = _read_component(wf, (SDXL_CLIP_G_PREFIX,)) if arch == "sdxl" else {}
    for what, src, pre in (("UNet", unet_src, UNET_PREFIX), ("VAE", vae_src, VAE_PREFIX),
                           ("text encoder", te_src, te_prefix)):
        if not src:
            raise CheckpointLoadError(f"{path.name}: no {what} weights (no '{pre}' keys); a single file must hold "
                                      "UNet, VAE and text encoder")
    unused: dict[str, list[str]] = {}

    # UNet
    unet = _instantiate(lambda: UNet2DConditionModel.from_config(cfgs["unet"]))
    with warnings.catch_warnings(), _conversion_errors(path, "UNet"):
        warnings.simplefilter("ignore")
        unet_sd = convert_ldm_unet_checkpoint(unet_src, dict(unet.config))
    unused["unet"] = _unused(unet_src, unet_sd)
    _load_strict(unet, unet_sd, "UNet", path, dtype)

    # VAE (diffusers' converter also turns the mid-block attention's 1x1 convs into linear weights)
    vae = _instantiate(lambda: AutoencoderKL.from_config(cfgs["vae"]))
    with _conversion_errors(path, "VAE"):
        vae_sd = convert_ldm_vae_checkpoint(vae_src, dict(vae.config))
    unused["vae"] = _unused(vae_src, vae_sd)
    _load_strict(vae, vae_sd, "VAE", path, torch.float32)

    # text encoder
    te_cfg = CLIPTextConfig.from_dict({k: v for k, v in cfgs["text_encoder"].items() if k != "model_type"})
    te = _instantiate(lambda: CLIPTextModel(te_cfg))
    if arch in ("sd1", "sdxl"):
        te_sd = convert_ldm_clip_checkpoint(te_src)
        # very old files store CLIP without the "text_model." level; canonicalise first
        te_sd = {(k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in te_sd.items()}
        te_sd.pop("text_model.embeddings.position_ids", None)  # a buffer (arange), not a weight
        unused["text_encoder"] = _unused(te_src, te_sd, lambda k: k.endswith("embeddings.position_ids"))
    else:
        with _conversion_errors(path, "text encoder"):
            te_sd = convert_open_clip_checkpoint(te, te_src, prefix=OPEN_CLIP_PREFIX)
        te_sd.pop("text_projection.weight", None)  # CLIPTextModel has no projection (the context is unprojected)
        unused["text_encoder"] = _unused(te_src, te_sd,
                                         lambda k: k.endswith(("in_proj_weight", "in_proj_bias"))
                                         and not k.startswith(OPEN_CLIP_PREFIX + "transformer.resblocks.23."))
    # transformers >= 5 CLIPTextModel has no "text_model." level (state-dict keys start at "embeddings.")
    if not hasattr(te, "text_model"):
        te_sd = {k.removeprefix("text_model."): v for k, v in te_sd.items()}
    _load_strict(te, te_sd, "text encoder", path, dtype)

    te2 = None
    if arch == "sdxl":
        from transformers import CLIPTextModelWithProjection

        if not te2_src:
            raise CheckpointLoadError(f"{path.name}: SDXL checkpoint without the OpenCLIP-G text encoder "
                                      f"('{SDXL_CLIP_G_PREFIX}' keys)")
        te2_cfg = CLIPTextConfig.from_dict({k: v for k, v in cfgs["text_encoder_2"].items()
                                            if k not in ("model_type", "architectures")})
        te2 = _instantiate(lambda: CLIPTextModelWithProjection(te2_cfg))
        with _conversion_errors(path, "second text encoder (OpenCLIP-G)"):
            te2_sd = convert_open_clip_checkpoint(te2, te2_src, prefix=SDXL_CLIP_G_PREFIX)
        unused["text_encoder_2"] = _unused(te2_src, te2_sd, lambda k: k.endswith(("in_proj_weight", "in_proj_bias")))
        _load_strict(te2, te2_sd, "second text encoder (OpenCLIP-G)", path, dtype)

    sched = DDPMScheduler.from_config(cfgs["scheduler"])
    ac = sched.alphas_cumprod.float().clone()
    for m in (unet, vae, te) + ((te2,) if te2 is not None else ()):
        m.eval().requires_grad_(False)
    return SingleFileModel(unet=unet, text_encoder=te, vae=vae, alphas_cumprod=ac, prediction_type=pred,
                           prediction_source=source, arch=arch, unused_keys={k: v for k, v in unused.items() if v},
                           text_encoder_2=te2, zero_terminal_snr=ztsnr)


def load_host(path_or_folder: str | os.PathLike, *, flux: Mapping[str, Any] | None = None,
              quantize: str | None = None, blocks_to_swap: int = 0, **kw):
    """The training host for a local model: the one router the CLIs share (nothing is ever downloaded).

    * ``flux`` given (a mapping, possibly empty, of the Flux companion files ``clip_l`` / ``t5xxl`` / ``ae`` and
      ``t5_tokenizer``; the caller trains or erases Flux too): a diffusers Flux.1 folder goes to
      :meth:`.flux_host.FluxHost.from_pretrained`, a Flux transformer file with its three companions to
      :func:`.flux_loading.load_flux_single_files` (``tokenizer`` is then the CLIP-L tokenizer), both with
      ``quantize`` (``quantize_base``: ``"int8"`` / ``"int4"`` / ``"fp8"``, see :mod:`.quantize`) and
      ``blocks_to_swap`` (kohya's block swap, :meth:`.flux_host.FluxHost.enable_block_swap`). Companions,
      ``quantize`` or ``blocks_to_swap`` given for a model that is not Flux are refused by name.
    * otherwise, and for every SD model: a :class:`~.diffusers_host.DiffusersHost`; a folder goes to
      :meth:`DiffusersHost.from_pretrained` (``device``, ``dtype`` only), a file to
      :meth:`DiffusersHost.from_single_file` (also ``tokenizer``, ``prediction_type``, ``configs_dir``,
      ``config_overrides``). Without ``flux`` a Flux model is refused there ("train inside ComfyUI").

    Raises ``FileNotFoundError`` for a missing path (a Hub id is not accepted), ``ValueError`` when single-file-only
    options are given for a folder, a Flux file lacks a companion, or Flux-only settings are given for another
    model, and the errors of the chosen loader.
    """
    from .diffusers_host import DiffusersHost

    p = Path(path_or_folder)
    if flux is not None:
        from .flux_loading import is_flux_checkpoint, is_flux_folder, load_flux_single_files

        flux = {k: v for k, v in flux.items() if v}
        device, dtype = kw.get("device", "cpu"), kw.get("dtype") or torch.float32
        if is_flux_folder(p):
            from .flux_host import FluxHost

            if kw.get("tokenizer") is not None:
                raise ValueError("tokenizer = ... is for single-file checkpoints; a Flux folder has tokenizer/ and "
                                 "tokenizer_2/")
            return FluxHost.from_pretrained(p, device=device, dtype=dtype, quantize=quantize,
                                            blocks_to_swap=blocks_to_swap)
        if is_flux_checkpoint(p):
            missing = [k for k in ("clip_l", "t5xxl", "ae") if not flux.get(k)]
            if missing:
                raise ValueError(f"{p.name} is a Flux transformer file: also give {', '.join(missing)} (the CLIP-L, "
                                 "T5-XXL and VAE files, as kohya's flux_train_network.py takes them)")
            return load_flux_single_files(p, clip_l=flux["clip_l"], t5xxl=flux["t5xxl"], ae=flux["ae"],
                                          clip_tokenizer=kw.get("tokenizer"), t5_tokenizer=flux.get("t5_tokenizer"),
                                          device=device, dtype=dtype, quantize=quantize,
                                          blocks_to_swap=blocks_to_swap)
        if quantize:
            raise ValueError("quantize_base applies to Flux models only")
        given = sorted(k for k in ("clip_l", "t5xxl", "ae", "t5_tokenizer") if flux.get(k))
        if given:
            raise ValueError(f"{given} are for Flux transformer files; {p.name} is not one")
    elif quantize:
        raise ValueError("quantize_base applies to Flux models only")
    if blocks_to_swap:
        raise ValueError("blocks_to_swap applies to Flux models only (kohya flux_train_network.py); for SD/SDXL use "
                         "gradient_checkpointing")
    if p.is_dir():
        allowed = {"device", "dtype"}
        extra = sorted(k for k, v in kw.items() if k not in allowed and v is not None)
        if extra:
            raise ValueError(f"{p}: options {extra} apply to single-file checkpoints only, not diffusers folders")
        return DiffusersHost.from_pretrained(p, **{k: v for k, v in kw.items() if k in allowed})
    if p.is_file():
        return DiffusersHost.from_single_file(p, **kw)
    raise FileNotFoundError(f"model not found: {p} (a local diffusers folder or a single-file .safetensors/.ckpt; "
                            "nothing is downloaded)")
