"""Load Flux.1 for the diffusers Flux host (:class:`.flux_host.FluxHost`) from the files users have, offline.

Two sources:

* a diffusers **Flux folder** (``transformer/``, ``text_encoder/`` + ``tokenizer/``, ``text_encoder_2/`` +
  ``tokenizer_2/``, ``vae/``): :meth:`.flux_host.FluxHost.from_pretrained`;
* the **single files** people download for ComfyUI: the BFL transformer (``flux1-dev.safetensors`` /
  ``flux1-schnell.safetensors``; also ComfyUI's ``model.diffusion_model.`` and diffusers-named single files), plus
  ``clip_l.safetensors``, ``t5xxl_fp16.safetensors`` (or fp8 variants stored in a float dtype) and ``ae.safetensors``:
  :func:`load_flux_single_files`. kohya's ``flux_train_network.py`` takes the same four files
  (``pretrained_model_name_or_path``, ``clip_l``, ``t5xxl``, ``ae``).

Configs ship with the pack (``configs/flux1_{transformer,vae,clip_l,t5xxl}.json``, the released FLUX.1-dev configs);
the transformer's block counts, widths and ``guidance_embeds`` are read from the checkpoint itself (dev vs schnell
by the presence of ``guidance_in`` keys, as kohya ``flux_utils.analyze_checkpoint_state`` and ComfyUI's
``model_detection`` decide). Key conversion: the transformer with :func:`conceptlab.formats.flux_views.
to_diffusers_state_dict` (diffusers' ``convert_flux_transformer_checkpoint_to_diffusers`` hard-codes Flux.1's
3072 width, so it cannot load other widths; ours is checked against it in ``tests/test_flux_files.py``), the VAE
with diffusers' ``convert_ldm_vae_checkpoint``; CLIP-L and T5 files already use transformers' names.

Tokenizers (no file carries one): CLIP's BPE from :func:`.model_loading.resolve_tokenizer`; T5's SentencePiece
``tokenizer.json`` from an explicit folder or ComfyUI's ``comfy/text_encoders/t5_tokenizer`` (``$COMFYUI_PATH`` or
the ComfyUI holding this pack).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from ..formats.flux_keys import flux_layout, infer_dims
from ..formats.flux_views import to_diffusers_state_dict
from ..formats.safetensors_io import WeightFile
from .model_loading import CONFIGS_DIR, CheckpointLoadError, TokenizerNotFound, _instantiate, _load_strict

__all__ = ["is_flux_checkpoint", "is_flux_folder", "load_flux_single_files", "flux_configs", "resolve_t5_tokenizer"]


def is_flux_folder(path: str | os.PathLike) -> bool:
    """A diffusers Flux folder: ``transformer/config.json`` naming ``FluxTransformer2DModel``."""
    cfg = Path(path) / "transformer" / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text(encoding="utf-8")).get("_class_name") == "FluxTransformer2DModel"
    except (OSError, json.JSONDecodeError):
        return False


def is_flux_checkpoint(path: str | os.PathLike) -> bool:
    """A single file whose keys are a Flux transformer in any layout (:func:`formats.flux_keys.flux_layout`).
    Never raises for unreadable files (returns False)."""
    p = Path(path)
    if not p.is_file() or p.suffix.lower() not in (".safetensors", ".sft"):
        return False
    try:
        with WeightFile(p) as wf:
            return flux_layout(wf.keys()) not in ("none", "mixed")
    except Exception:  # noqa: BLE001 - not a readable safetensors file: not ours to judge here
        return False


def flux_configs(configs_dir: str | os.PathLike | None = None) -> dict[str, dict]:
    """The shipped configs ``{"transformer", "vae", "clip_l", "t5xxl"}`` (keys starting with ``_`` dropped).
    Raises ``FileNotFoundError`` naming a missing file."""
    root = Path(configs_dir) if configs_dir is not None else CONFIGS_DIR
    out = {}
    for part in ("transformer", "vae", "clip_l", "t5xxl"):
        f = root / f"flux1_{part}.json"
        if not f.is_file():
            raise FileNotFoundError(f"model config not found: {f} (the pack ships configs/flux1_{part}.json)")
        out[part] = {k: v for k, v in json.loads(f.read_text(encoding="utf-8")).items() if not k.startswith("_")}
    return out


def resolve_t5_tokenizer(tokenizer: Any = None, comfyui_path: str | os.PathLike | None = None):
    """The T5 tokenizer: a tokenizer object / callable as given, a folder (``tokenizer.json`` or ``spiece.model``),
    else ComfyUI's ``comfy/text_encoders/t5_tokenizer``. Raises :class:`.model_loading.TokenizerNotFound`."""
    from transformers import AutoTokenizer

    from .model_loading import tokenizer_candidates

    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    tried = []
    cands = [Path(tokenizer)] if tokenizer is not None else [
        Path(c).parent / "text_encoders" / "t5_tokenizer" for c in tokenizer_candidates(comfyui_path)]
    for c in cands:
        tried.append(str(c))
        if (c / "tokenizer.json").is_file() or (c / "spiece.model").is_file():
            return AutoTokenizer.from_pretrained(str(c), local_files_only=True)
    raise TokenizerNotFound("no T5 tokenizer found: pass t5_tokenizer = DIR (a folder with tokenizer.json, e.g. a "
                            "diffusers Flux model's tokenizer_2/ or ComfyUI's comfy/text_encoders/t5_tokenizer) or "
                            "set COMFYUI_PATH. Tried: " + ", ".join(tried))


def _read(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    with WeightFile(path) as wf:
        return {k: wf.get(k) for k in wf.keys()}


def _transformer_config(sd: Mapping[str, torch.Tensor], base: dict) -> dict:
    """Flux.1 transformer config with block counts, widths and guidance read from BFL-named tensors."""
    cfg = dict(base)
    rel = {re.sub(r"^(?:model\.diffusion_model\.|diffusion_model\.|model\.)", "", k): v for k, v in sd.items()}
    doubles = {int(m[1]) for k in rel if (m := re.match(r"double_blocks\.(\d+)\.", k))}
    singles = {int(m[1]) for k in rel if (m := re.match(r"single_blocks\.(\d+)\.", k))}
    cfg["num_layers"], cfg["num_single_layers"] = len(doubles), len(singles)
    cfg["guidance_embeds"] = any(k.startswith("guidance_in.") for k in rel)
    if "img_in.weight" in rel:
        hidden, cfg["in_channels"] = (int(s) for s in rel["img_in.weight"].shape)
        cfg["joint_attention_dim"] = int(rel["txt_in.weight"].shape[1])
        cfg["pooled_projection_dim"] = int(rel["vector_in.in_layer.weight"].shape[1])
        qn = rel.get("double_blocks.0.img_attn.norm.query_norm.scale")
        head = int(qn.shape[0]) if qn is not None else cfg["attention_head_dim"]
        cfg["attention_head_dim"], cfg["num_attention_heads"] = head, hidden // head
    return cfg


def load_flux_single_files(transformer: str | os.PathLike, *, clip_l: str | os.PathLike, t5xxl: str | os.PathLike,
                           ae: str | os.PathLike, clip_tokenizer: Any = None, t5_tokenizer: Any = None,
                           device: str = "cpu", dtype: torch.dtype = torch.float32,
                           t5xxl_max_token_length: int | None = None, configs_dir: str | os.PathLike | None = None,
                           config_overrides: Mapping[str, Mapping] | None = None, quantize: str | None = None,
                           blocks_to_swap: int = 0):
    """A :class:`.flux_host.FluxHost` from the four Flux.1 single files (module docstring).

    Args:
        transformer: ``flux1-dev.safetensors`` / ``flux1-schnell.safetensors`` (BFL, ComfyUI or diffusers names).
        clip_l, t5xxl, ae: the text encoders and the VAE (``clip_l.safetensors``, ``t5xxl_fp16.safetensors``,
            ``ae.safetensors``).
        clip_tokenizer, t5_tokenizer: tokenizer objects or folders (default: ComfyUI's, see module docstring).
        dtype: compute dtype of the transformer and text encoders (VAE fp32).
        config_overrides: ``{"transformer": {...}, "vae": {...}, "clip_l": {...}, "t5xxl": {...}}`` merged into the
            shipped configs (tests use tiny ones; ``axes_dims_rope`` must sum to the head dim).
        quantize: ``None`` or a :mod:`.quantize` scheme applied to the transformer's frozen Linear weights.
        blocks_to_swap: kohya's block swap (:meth:`.flux_host.FluxHost.enable_block_swap`).

    Raises:
        FileNotFoundError, formats.safetensors_io.WeightFileError: a missing or unreadable file.
        CheckpointLoadError: a file whose keys / shapes do not fit (the message names it and the mismatches).
        TokenizerNotFound: no CLIP / T5 tokenizer.
    """
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from .flux_host import FluxHost
    from .model_loading import resolve_tokenizer

    cfgs = flux_configs(configs_dir)
    for part, over in (config_overrides or {}).items():
        if part not in cfgs:
            raise ValueError(f"config_overrides: unknown part {part!r} (transformer, vae, clip_l, t5xxl)")
        cfgs[part].update(over)
    tp = Path(transformer)
    raw = _read(tp)
    if flux_layout(raw.keys()) in ("none", "mixed"):
        raise CheckpointLoadError(f"{tp.name}: not a Flux transformer (no double_blocks / transformer_blocks keys)")
    shapes = {k: tuple(v.shape) for k, v in raw.items()}
    dims = infer_dims(shapes)
    from ..formats.flux_views import canonical_state_dict

    canon = canonical_state_dict(raw, dims, keep_other=False)
    tcfg = _transformer_config({k[len("model.diffusion_model."):]: v for k, v in canon.items()},
                               cfgs["transformer"])
    tcfg.update((config_overrides or {}).get("transformer", {}))
    tr = _instantiate(lambda: FluxTransformer2DModel(**tcfg))
    _load_strict(tr, to_diffusers_state_dict(canon, dims), "Flux transformer", tp, dtype)
    del raw, canon

    cp = Path(clip_l)
    clip = _instantiate(lambda: CLIPTextModel(CLIPTextConfig(**cfgs["clip_l"])))
    want = set(clip.state_dict())
    csd = {}
    for k, v in _read(cp).items():
        for cand in (k, k[len("text_model."):] if k.startswith("text_model.") else "text_model." + k):
            if cand in want:
                csd[cand] = v
                break
    _load_strict(clip, csd, "CLIP-L text encoder", cp, dtype)

    t5p = Path(t5xxl)
    t5 = _instantiate(lambda: T5EncoderModel(T5Config(**cfgs["t5xxl"])))
    tsd = {k: v for k, v in _read(t5p).items() if not k.startswith("decoder.")}
    if "encoder.embed_tokens.weight" not in tsd and "shared.weight" in tsd:
        tsd["encoder.embed_tokens.weight"] = tsd["shared.weight"]  # tied in T5; files store one of them
    if "shared.weight" not in tsd and "encoder.embed_tokens.weight" in tsd:
        tsd["shared.weight"] = tsd["encoder.embed_tokens.weight"]
    _load_strict(t5, tsd, "T5-XXL text encoder", t5p, dtype)

    ap = Path(ae)
    vae = _instantiate(lambda: AutoencoderKL(**cfgs["vae"]))
    try:
        vsd = convert_ldm_vae_checkpoint(_read(ap), dict(vae.config))
    except (KeyError, IndexError, RuntimeError) as exc:
        raise CheckpointLoadError(f"{ap.name}: diffusers could not convert the Flux VAE ({exc}); not ae.safetensors?"
                                  ) from exc
    _load_strict(vae, vsd, "Flux VAE", ap, torch.float32)

    host = FluxHost(tr, clip, resolve_tokenizer(clip_tokenizer, arch="sd1"), t5, resolve_t5_tokenizer(t5_tokenizer),
                    vae, t5xxl_max_token_length=t5xxl_max_token_length, device=device, dtype=dtype,
                    blocks_to_swap=blocks_to_swap)
    if quantize:
        host.quantize_base(quantize)
    host.load_report = {"path": str(tp), "arch": "flux", "variant": host.variant, "layout": flux_layout(shapes),
                        "blocks": (tcfg["num_layers"], tcfg["num_single_layers"])}
    return host
