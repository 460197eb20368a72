"""LoRA files: decode any common LoRA layout to per-weight deltas, write kohya LoRA and ``.diff`` files.

Decoding (:func:`lora_deltas`) turns a LoRA into full-rank ``ΔW`` tensors keyed by the single-file (LDM)
checkpoint keys they patch (``model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight``,
``cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight``, ...). Supported layouts:

* kohya / LyCORIS LoCon: ``<name>.lora_down.weight``, ``<name>.lora_up.weight``, ``<name>.alpha``, optional
  ``<name>.lora_mid.weight`` (Tucker core of a 3x3 LoCon); ΔW = up @ down × alpha / rank.
* diffusers / peft: ``<path>.lora_A.weight`` / ``<path>.lora_B.weight`` with ``unet.`` / ``text_encoder.`` /
  ``text_encoder_2.`` / ``transformer.`` prefixes (or none), alpha from ``<path>.alpha`` or from the
  ``lora_adapter_metadata`` safetensors metadata diffusers writes (``<prefix>.lora_alpha``/``r``/patterns);
  old diffusers attention-processor names (``attn1.processor.to_q_lora.down.weight``) too.
* ComfyUI native: ``diffusion_model.<ldm path>.lora_up.weight`` ... and ``text_encoders.<...>``.
* full-rank ``<name>.diff`` / ``<name>.diff_b`` (and ComfyUI's ``w_norm`` / ``b_norm``).
* LyCORIS LoHa (``hada_w1_a`` ..., CP ``hada_t1/t2``) and LoKr (``lokr_w1`` / ``lokr_w1_a,b`` / ``lokr_w2*`` /
  ``lokr_t2``): decoded with the same formulas as ComfyUI's ``comfy/weight_adapter/{loha,lokr}.py``.
* DoRA (``dora_scale``) and ``set_weight`` patches are *listed as skipped* - their effect depends on the base
  weight, so a ΔW cannot be given without the checkpoint.

The per-format math follows ComfyUI's ``comfy/weight_adapter/lora.py`` (``alpha / lora_down.shape[0]``, LoCon Tucker core
``ΔW[o,c,k,l] = Σ up[o,i] mid[i,j,k,l] down[j,c]``), which is what a user's ComfyUI applies. No library decodes every
layout to LDM-keyed deltas without a live model (peft / diffusers need the model instance, ComfyUI is not a
dependency of the core), hence this module.

Writing: :func:`save_kohya_lora` and :func:`save_diff_file` write atomically (``formats.safetensors_io``),
with ``sshs_model_hash`` / ``sshs_legacy_hash`` computed as kohya-ss/sd-scripts ``library/train_util.py``
(``precalculate_safetensors_hashes``) does.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from .keys import _layer_type_of, detect_architecture, split_component
from .kohya_keys import (CheckpointTarget, _arch_or_sd1, CHECKPOINT_PREFIXES, kohya_target, normalize_te_path,
                         unet_checkpoint_target)
from .ldm_keys import _OPENCLIP_WIDTH, openclip_ldm_to_hf
from .flux_keys import FluxDims, flux_lora_target, infer_dims, t5_lora_target
from .safetensors_io import WeightFile, _stringify_metadata, save_safetensors

__all__ = ["LoraDeltas", "LoraFormatError", "lora_deltas", "save_kohya_lora", "save_diff_file", "model_hashes",
           "read_lora", "resolve_lora_module", "SUFFIXES"]


class LoraFormatError(ValueError):
    """A LoRA file (or dict) that holds nothing usable, or arguments that cannot be written as a LoRA."""


@dataclass
class LoraDeltas:
    """Decoded LoRA.

    ``deltas``: LDM checkpoint key (``...weight`` / ``...bias`` / fused ``...in_proj_weight``) -> ΔW, float32, CPU,
    shaped like the checkpoint tensor, already multiplied by ``strength`` and the LoRA scale (alpha/rank). It is
    a read-only *lazy* mapping: each ΔW is computed when looked up (not cached), so a full-size LoRA never holds
    all its full-rank deltas at once; ``deltas.shape(key)`` gives the shape for free, ``dict(deltas)`` materialises.
    ``skipped``: LoRA module or key -> reason it was not decoded. ``format``: "kohya" | "peft" | "comfy" | "diff" |
    "loha" | "lokr" | "mixed". ``arch``: the architecture used for the key map. ``metadata``: the file's metadata.
    ``sources``: checkpoint key -> LoRA module name(s) that produced it.
    """

    deltas: Mapping[str, torch.Tensor]
    skipped: dict[str, str]
    format: str
    arch: str = "sd1"
    metadata: dict[str, str] = field(default_factory=dict)
    sources: dict[str, list[str]] = field(default_factory=dict)


# Suffix -> (role, format). Ordered longest first so ".lora_A.default.weight" wins over ".weight"-like endings.
SUFFIXES: dict[str, tuple[str, str]] = {
    ".lora_down.weight": ("down", "kohya"), ".lora_up.weight": ("up", "kohya"), ".lora_mid.weight": ("mid", "kohya"),
    ".lora_A.default.weight": ("down", "peft"), ".lora_B.default.weight": ("up", "peft"),
    ".lora_A.weight": ("down", "peft"), ".lora_B.weight": ("up", "peft"),
    ".lora_linear_layer.down.weight": ("down", "peft"), ".lora_linear_layer.up.weight": ("up", "peft"),
    "_lora.down.weight": ("down", "peft"), "_lora.up.weight": ("up", "peft"),
    ".lora.down.weight": ("down", "peft"), ".lora.up.weight": ("up", "peft"),
    ".alpha": ("alpha", ""), ".dora_scale": ("dora", ""),
    ".diff_b": ("diff_b", "diff"), ".diff": ("diff", "diff"), ".w_norm": ("diff", "diff"), ".b_norm": ("diff_b", "diff"),
    ".set_weight": ("set", ""), ".reshape_weight": ("reshape", ""),
    ".hada_w1_a": ("hada_w1_a", "loha"), ".hada_w1_b": ("hada_w1_b", "loha"), ".hada_w2_a": ("hada_w2_a", "loha"),
    ".hada_w2_b": ("hada_w2_b", "loha"), ".hada_t1": ("hada_t1", "loha"), ".hada_t2": ("hada_t2", "loha"),
    ".lokr_w1_a": ("lokr_w1_a", "lokr"), ".lokr_w1_b": ("lokr_w1_b", "lokr"), ".lokr_w1": ("lokr_w1", "lokr"),
    ".lokr_w2_a": ("lokr_w2_a", "lokr"), ".lokr_w2_b": ("lokr_w2_b", "lokr"), ".lokr_w2": ("lokr_w2", "lokr"),
    ".lokr_t2": ("lokr_t2", "lokr"),
}
_SUFFIX_ORDER = sorted(SUFFIXES, key=len, reverse=True)
_PEFT_PREFIXES = ("unet.", "text_encoder.", "text_encoder_2.", "transformer.")


# ---------------------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------------------
def read_lora(source: str | os.PathLike | Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a LoRA file (safetensors, or ``.ckpt/.pt/.bin`` weights-only) or take a dict; returns (tensors, metadata).

    Raises ``FileNotFoundError``, :class:`~.safetensors_io.WeightFileError` (corrupt, truncated, pickle needing
    full unpickling) or :class:`LoraFormatError` (no tensors at all: an empty LoRA).
    """
    if isinstance(source, Mapping):
        tensors = {str(k): v for k, v in source.items() if isinstance(v, torch.Tensor)}
        metadata: dict[str, str] = {}
        name = "LoRA dict"
    else:
        path = Path(source)
        name = path.name
        with WeightFile(path) as wf:
            metadata = dict(wf.metadata)
            tensors = {k: wf.get(k) for k in wf.keys()}
    if not tensors:
        raise LoraFormatError(f"{name}: empty LoRA (it holds no tensors)")
    return tensors, metadata


def _split_suffix(key: str) -> tuple[str, str] | None:
    for suf in _SUFFIX_ORDER:
        if key.endswith(suf) and len(key) > len(suf):
            return key[: -len(suf)], suf
    return None


def _clean_diffusers_path(path: str) -> str:
    p = path.replace(".processor.", ".")
    p = re.sub(r"\.to_out$", ".to_out.0", p)
    return p


def resolve_lora_module(module: str, arch: str, flux_dims: FluxDims | None = None) -> CheckpointTarget:
    """Map a LoRA module name in any supported spelling to the checkpoint tensor(s) it patches.

    Accepts kohya names (``lora_unet_...``), peft/diffusers paths (``unet.down_blocks...``,
    ``text_encoder.text_model...``, bare diffusers UNet paths, old ``.processor.`` names), ComfyUI names
    (``diffusion_model.input_blocks...``, ``text_encoders.clip_l.transformer...``) and LDM checkpoint module
    paths. Flux transformer modules in every spelling go through ``formats.flux_keys.flux_lora_target``
    (``flux_dims``: widths that place split q/k/v in fused tensors; default Flux.1's).
    Raises ``ValueError`` (with the reason) when the module does not exist in ``arch``.
    """
    arch = _arch_or_sd1(arch)
    if arch == "flux" and module.startswith(("lora_te3_", "lora_te2_", "text_encoder_2.")):
        return t5_lora_target(module)
    if arch == "flux" and not module.startswith(("lora_te", "text_encoder", "text_encoders.", "clip_l.")):
        return flux_lora_target(module, flux_dims or FluxDims())
    if module.startswith("lycoris_"):
        module = "lora_unet_" + module[len("lycoris_"):]
    if module.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")):
        return kohya_target(module, arch)
    if module.startswith("base_model.model."):
        module = module[len("base_model.model."):]
    if module.startswith("text_encoders."):
        module = module[len("text_encoders."):]
    comp, rel = split_component(module + ".weight")
    rel = rel[: -len(".weight")]
    if comp == "te" and arch in ("sdxl", "flux"):
        comp = "te1"
    if comp == "unet":
        return unet_checkpoint_target(rel if arch == "flux" else _clean_diffusers_path(rel), arch)
    if comp in ("te", "te1", "te2"):
        if (arch, comp) not in CHECKPOINT_PREFIXES:
            raise ValueError(f"text encoder {comp!r} does not exist in architecture {arch}")
        pre = CHECKPOINT_PREFIXES[(arch, comp)]
        openclip = comp == "te2" or (arch == "sd2" and comp == "te")
        if rel.startswith(("transformer.resblocks.", "token_embedding", "positional_embedding", "ln_final",
                           "text_projection")):
            if not openclip:
                raise ValueError(f"OpenCLIP module {rel!r} does not fit {comp} of {arch}")
            if rel.endswith(".attn.in_proj"):
                return CheckpointTarget(pre + rel + "_weight", pre + rel + "_bias")
            return CheckpointTarget(pre + rel + ".weight", pre + rel + ".bias")
        rel = normalize_te_path(_clean_diffusers_path(rel).replace("to_q", "q_proj").replace("to_k", "k_proj")
                                .replace("to_v", "v_proj").replace("to_out.0", "out_proj").replace("to_out", "out_proj"))
        if not openclip:
            return CheckpointTarget(f"{pre}{rel}.weight", f"{pre}{rel}.bias")
        width, layers = _OPENCLIP_WIDTH[arch]
        table = openclip_ldm_to_hf(width, layers)
        if rel + ".weight" not in table:
            raise ValueError(f"text-encoder module {rel!r} has no OpenCLIP counterpart")
        src, rows, transpose = table[rel + ".weight"]
        bias = table.get(rel + ".bias")
        return CheckpointTarget(pre + src, pre + bias[0] if bias else None, rows, transpose)
    raise ValueError(f"module {module!r} belongs to no known model component")


def _kernel_of(target_key: str, arch: str) -> tuple[int, ...] | None:
    """Spatial kernel of an SD UNet weight from its LDM key: () linear, (1, 1) or (3, 3) conv; None if unknown."""
    comp, rel = split_component(target_key)
    if comp in ("te", "te1", "te2"):
        return ()
    if comp != "unet":
        return None
    lt = _layer_type_of("unet", rel)
    if lt in ("conv", "conv_in", "conv_out", "downsample", "upsample"):
        return (3, 3)
    if lt == "skip":
        return (1, 1)
    if lt in ("proj_in", "proj_out"):
        return (1, 1) if arch == "sd1" else ()
    if lt in ("norm",):
        return None
    return ()


def _reshape_to_target(delta: torch.Tensor, target: CheckpointTarget, arch: str) -> torch.Tensor:
    """Give a 2-D (out, in*k*k) product its checkpoint shape using the known kernel of the target layer."""
    if delta.ndim != 2:
        return delta
    kernel = _kernel_of(target.weight_key, arch)
    if not kernel:
        return delta
    kk = kernel[0] * kernel[1]
    if delta.shape[1] % kk:
        raise ValueError(f"ΔW of shape {tuple(delta.shape)} cannot be a {kernel} conv weight")
    return delta.reshape(delta.shape[0], delta.shape[1] // kk, *kernel)


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu" if t.device.type != "meta" else "meta", dtype=torch.float32)


def _lora_updown(up: torch.Tensor, down: torch.Tensor, mid: torch.Tensor | None) -> torch.Tensor:
    up, down = _f32(up), _f32(down)
    if mid is not None:
        # LoCon Tucker: ΔW[p, r, k, l] = Σ_ij mid[i, j, k, l] down[j, r] up[p, i] (what ComfyUI's weight_adapter/lora.py computes)
        return torch.einsum("oi,ijkl,jc->ockl", up.flatten(1), _f32(mid), down.flatten(1))
    if up.shape[1] != down.shape[0]:
        raise ValueError(f"rank mismatch: up {tuple(up.shape)} vs down {tuple(down.shape)}")
    prod = up.flatten(1) @ down.flatten(1)
    if down.ndim == 4:
        return prod.reshape(up.shape[0], down.shape[1], down.shape[2], down.shape[3])
    return prod


def _peft_scale(module: str, rank: int, adapter_md: dict | None) -> float | None:
    """lora_alpha / r (or / sqrt(r) with use_rslora) from diffusers' ``lora_adapter_metadata``; None if absent."""
    if not adapter_md:
        return None
    for pre in _PEFT_PREFIXES:
        if module.startswith(pre):
            comp = pre[:-1]
            path = module[len(pre):]
            break
    else:
        comp, path = "unet", module
    alpha = adapter_md.get(f"{comp}.lora_alpha")
    if alpha is None:
        return None
    for pk, pv in (adapter_md.get(f"{comp}.alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pk})$", path):  # peft's get_pattern_key rule
            alpha = pv
            break
    if adapter_md.get(f"{comp}.use_rslora"):
        return float(alpha) / rank ** 0.5
    return float(alpha) / rank


def lora_deltas(source: str | os.PathLike | Mapping[str, torch.Tensor], strength: float = 1.0,
                arch: str | None = None, flux_dims: FluxDims | None = None) -> LoraDeltas:
    """Decode a LoRA (file or dict) into full-rank weight deltas keyed by single-file checkpoint keys.

    Args:
        source: path of a ``.safetensors`` (or weights-only ``.ckpt/.pt/.bin``) LoRA, or a ``name -> tensor`` dict.
        strength: multiplier applied to every ΔW (ComfyUI's LoraLoader strength; 1.0 = as trained).
        arch: "sd1" | "sd2" | "sdxl" | "flux"; ``None`` detects it from the keys and shapes (cross-attention
            context dim 768/1024/2048 read from an ``attn2.to_k`` down weight); "unknown" falls back to sd1 names.
        flux_dims: Flux widths (``formats.flux_keys.FluxDims``) placing split q/k/v/mlp modules in the fused
            ``qkv`` / ``linear1`` weights; default read from the LoRA's own shapes (``infer_dims``). Flux ΔW are
            keyed by canonical ``model.diffusion_model.<BFL name>`` keys whatever the LoRA's naming.

    Returns:
        :class:`LoraDeltas`; ``deltas[k]`` is float32, shaped like checkpoint tensor ``k``, equal to
        ``strength × scale × B @ A`` (kohya/peft; scale = alpha / rank, 1 without alpha), ``strength × diff``
        (``.diff``/``.diff_b``), ``strength × alpha/rank × (W1a W1b) ⊙ (W2a W2b)`` (LoHa) or
        ``strength × scale × kron(W1, W2)`` (LoKr). For OpenCLIP q/k/v the delta is the full fused
        ``in_proj_weight``-shaped tensor with the other rows zero. Modules that target the same tensor add up.

    Raises:
        FileNotFoundError, WeightFileError: unreadable file (corrupt, truncated, pickle-only).
        LoraFormatError: no tensors (empty LoRA), or no module could be decoded (the message lists why).

    Source of the formulas: ComfyUI ``comfy/weight_adapter/{lora,loha,lokr}.py`` and ``comfy/lora.py``
    (``load_lora``: ``.diff`` / ``.diff_b``); kohya-ss/sd-scripts ``networks/lora.py`` (scale = alpha / lora_dim).
    """
    tensors, metadata = read_lora(source)
    if arch is None:
        arch = detect_architecture(tensors.keys(), {k: tuple(v.shape) for k, v in tensors.items()})
    arch = _arch_or_sd1(arch)
    if arch == "flux" and flux_dims is None:
        flux_dims = infer_dims({k: tuple(v.shape) for k, v in tensors.items()})
    adapter_md = None
    if metadata.get("lora_adapter_metadata"):
        try:
            adapter_md = json.loads(metadata["lora_adapter_metadata"])
        except ValueError:
            adapter_md = None

    groups: dict[str, dict[str, torch.Tensor]] = {}
    fmt_of: dict[str, set[str]] = {}
    skipped: dict[str, str] = {}
    for key, t in tensors.items():
        sp = _split_suffix(key)
        if sp is None:
            skipped[key] = "not a recognised LoRA tensor name"
            continue
        module, suf = sp
        role, fmt = SUFFIXES[suf]
        groups.setdefault(module, {})[role] = t
        if fmt:
            fmt_of.setdefault(module, set()).add(fmt)

    plans: dict[str, tuple[dict[str, torch.Tensor], CheckpointTarget, float | None, str]] = {}
    sources: dict[str, list[str]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    formats: set[str] = set()
    for module, parts in groups.items():
        roles = set(parts)
        if "dora" in roles:
            skipped[module] = "DoRA (dora_scale): the change depends on the base weight, not decoded"
            continue
        if "set" in roles:
            skipped[module] = "set_weight patch replaces the weight; it is not a delta"
            continue
        if roles <= {"alpha", "reshape"}:
            skipped[module] = "alpha without LoRA weights"
            continue
        try:
            target = resolve_lora_module(module, arch, flux_dims)
        except ValueError as exc:
            skipped[module] = f"unknown target: {exc}"
            continue
        alpha_t = parts.get("alpha")
        alpha = float(alpha_t.float().item()) if alpha_t is not None else None
        weights = {r: t for r, t in parts.items() if r != "alpha"}
        fmts = fmt_of.get(module, set())
        try:
            # dry run on the meta device: checks every shape without computing or allocating anything
            meta = {r: t.to("meta") for r, t in weights.items()}
            out, fmt_used = _decode_module(module, meta, target, alpha, fmts, arch, adapter_md, 1.0)
        except (ValueError, RuntimeError, IndexError) as exc:
            skipped[module] = f"cannot decode: {exc}"
            continue
        if not out:
            skipped[module] = f"incomplete or unsupported LoRA module (parts: {sorted(roles)})"
            continue
        clash = [k for k, t in out.items() if k in shapes and shapes[k] != tuple(t.shape)]
        if clash:
            skipped[module] = f"patches {clash[0]} with a shape different from another module"
            continue
        plans[module] = (weights, target, alpha, fmt_used)
        formats.update(fmt_used.split("+"))
        for k, t in out.items():
            shapes[k] = tuple(t.shape)
            sources.setdefault(k, []).append(module)

    if not sources:
        some = "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:5])
        raise LoraFormatError(f"no LoRA module could be decoded for architecture {arch} "
                              f"({len(skipped)} skipped: {some})")
    fmt = formats.pop() if len(formats) == 1 else "mixed"
    deltas = _LazyDeltas(sources, shapes, plans, arch, adapter_md, fmt_of, float(strength))
    return LoraDeltas(deltas, skipped, fmt, arch, metadata, sources)


class _LazyDeltas(Mapping):
    """Read-only mapping checkpoint key -> ΔW that computes each delta when it is looked up (nothing cached), so a
    full-size LoRA never holds all its full-rank deltas in memory at once. ``dict(m)`` materialises everything."""

    def __init__(self, sources, shapes, plans, arch, adapter_md, fmt_of, strength):
        self._sources, self._shapes, self._plans = sources, shapes, plans
        self._arch, self._adapter_md, self._fmt_of, self._strength = arch, adapter_md, fmt_of, strength

    def __getitem__(self, key: str) -> torch.Tensor:
        total = None
        for module in self._sources[key]:
            weights, target, alpha, _ = self._plans[module]
            out, _ = _decode_module(module, weights, target, alpha, self._fmt_of.get(module, set()), self._arch,
                                    self._adapter_md, self._strength, only=key)
            total = out[key] if total is None else total + out[key]
        return total

    def __iter__(self):
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)

    def __contains__(self, key) -> bool:
        return key in self._sources

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of ΔW for ``key`` without computing it."""
        return self._shapes[key]


def _place(delta: torch.Tensor, target: CheckpointTarget, key: str) -> torch.Tensor:
    if target.transpose:
        delta = delta.t()
    if target.swap_halves:  # diffusers Flux norm_out.linear = BFL final_layer.adaLN_modulation.1 with halves swapped
        if delta.shape[0] % 2:
            raise ValueError(f"ΔW rows {delta.shape[0]} cannot be the two halves of {key}")
        delta = torch.cat(delta.chunk(2, dim=0)[::-1], dim=0)
    if target.rows is not None:
        start, stop = target.rows
        width = stop - start
        if delta.shape[0] != width:
            raise ValueError(f"ΔW rows {delta.shape[0]} do not fit the {width}-row slice of {key}")
        total = target.total_rows if target.total_rows is not None else 3 * width
        full = torch.zeros((total, *delta.shape[1:]), dtype=torch.float32, device=delta.device)
        full[start:stop] = delta
        delta = full
    return delta


def _decode_module(module: str, parts: Mapping[str, torch.Tensor], target: CheckpointTarget, alpha: float | None,
                   fmts: set[str], arch: str, adapter_md: dict | None, strength: float,
                   only: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """ΔW (float32, × strength × scale, placed into the checkpoint tensor's shape) per checkpoint key patched by one
    LoRA module; ``only`` skips the weight or bias computation not asked for. Returns (deltas, format label)."""
    roles = set(parts)
    out: dict[str, torch.Tensor] = {}
    used: list[str] = []
    want_w = only is None or only == target.weight_key
    want_b = only is None or only == target.bias_key
    if "up" in roles and "down" in roles:
        fmt = "kohya" if "kohya" in fmts else "peft"
        if fmt == "kohya" and not module.startswith(("lora_unet_", "lora_te", "lora_transformer_")):
            fmt = "comfy"
        used.append(fmt)
        if want_w:
            delta = _lora_updown(parts["up"], parts["down"], parts.get("mid"))
            rank = parts["down"].shape[0]
            if alpha is not None:
                scale = alpha / rank
            elif fmt == "peft":
                scale = _peft_scale(module, rank, adapter_md) or 1.0
            else:
                scale = 1.0
            out[target.weight_key] = _place(_reshape_to_target(delta, target, arch) * (scale * strength), target,
                                            target.weight_key)
    elif {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= roles:
        used.append("loha")
        if want_w:
            w1a, w1b, w2a, w2b = (_f32(parts[r]) for r in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
            if "hada_t1" in roles and "hada_t2" in roles:  # CP form, as comfy/weight_adapter/loha.py
                m1 = torch.einsum("i j k l, j r, i p -> p r k l", _f32(parts["hada_t1"]), w1b, w1a)
                m2 = torch.einsum("i j k l, j r, i p -> p r k l", _f32(parts["hada_t2"]), w2b, w2a)
            else:
                m1, m2 = w1a @ w1b, w2a @ w2b
            scale = alpha / w1b.shape[0] if alpha is not None else 1.0
            out[target.weight_key] = _place(_reshape_to_target(m1 * m2, target, arch) * (scale * strength), target,
                                            target.weight_key)
    elif roles & {"lokr_w1", "lokr_w1_a"} and roles & {"lokr_w2", "lokr_w2_a"}:
        used.append("lokr")
        if want_w:
            dim = None
            if "lokr_w1" in roles:
                w1 = _f32(parts["lokr_w1"])
            else:
                dim = parts["lokr_w1_b"].shape[0]
                w1 = _f32(parts["lokr_w1_a"]) @ _f32(parts["lokr_w1_b"])
            if "lokr_w2" in roles:
                w2 = _f32(parts["lokr_w2"])
            else:
                dim = parts["lokr_w2_b"].shape[0]
                if "lokr_t2" in roles:
                    w2 = torch.einsum("i j k l, j r, i p -> p r k l", _f32(parts["lokr_t2"]),
                                      _f32(parts["lokr_w2_b"]), _f32(parts["lokr_w2_a"]))
                else:
                    w2 = _f32(parts["lokr_w2_a"]) @ _f32(parts["lokr_w2_b"])
            if w2.ndim == 4:
                w1 = w1[:, :, None, None]
            scale = alpha / dim if (alpha is not None and dim is not None) else 1.0
            kron = torch.kron(w1, w2)
            out[target.weight_key] = _place(_reshape_to_target(kron, target, arch) * (scale * strength), target,
                                            target.weight_key)
    if "diff" in roles:
        used.append("diff")
        if want_w:
            d = _f32(parts["diff"]) * strength
            prev = out.get(target.weight_key)
            d = _place(d, target, target.weight_key)
            out[target.weight_key] = d if prev is None else prev + d
    if "diff_b" in roles:
        used.append("diff")
        if target.bias_key is None:
            raise ValueError("a bias delta for a module without bias")
        if want_b:
            out[target.bias_key] = _place(_f32(parts["diff_b"]) * strength, target, target.bias_key)
    return out, "+".join(sorted(set(used)))


# ---------------------------------------------------------------------------------------------------------------
# hashes (kohya sd-scripts / sd-webui-additional-networks semantics)
# ---------------------------------------------------------------------------------------------------------------
def _serialize(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> bytes:
    from safetensors.torch import save

    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return save(clean, metadata=dict(metadata) if metadata else None)


def _hashes_of_bytes(blob: bytes) -> tuple[str, str]:
    n = int.from_bytes(blob[:8], "little")
    model_hash = hashlib.sha256(blob[8 + n:]).hexdigest()
    legacy_hash = hashlib.sha256(blob[0x100000:0x100000 + 0x10000]).hexdigest()[:8]
    return model_hash, legacy_hash


def model_hashes(path_or_tensors: str | os.PathLike | Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None) -> tuple[str, str]:
    """``(sshs_model_hash, sshs_legacy_hash)`` of a LoRA, as kohya's trainer stores them in its metadata.

    Semantics (kohya-ss/sd-scripts ``library/train_util.py``: ``precalculate_safetensors_hashes``,
    ``addnet_hash_safetensors``, ``addnet_hash_legacy``): serialise the tensors with safetensors keeping only the
    ``ss_*`` metadata; ``sshs_model_hash`` = hex SHA-256 of everything after the header (8-byte length + JSON),
    i.e. of the tensor data only; ``sshs_legacy_hash`` = first 8 hex digits of SHA-256 of the 64 KiB at offset
    1 MiB of that serialisation (empty input, hence ``e3b0c442``, for files under 1 MiB).

    Args:
        path_or_tensors: a safetensors LoRA file (its own metadata is used) or a dict of tensors.
        metadata: metadata for a dict input (only ``ss_*`` entries matter).
    Raises: like :func:`read_lora`.
    """
    if isinstance(path_or_tensors, Mapping):
        tensors, md = dict(path_or_tensors), dict(metadata or {})
    else:
        tensors, md = read_lora(path_or_tensors)
        if metadata is not None:
            md = dict(metadata)
    ss = {k: v for k, v in _stringify_metadata(md).items() if k.startswith("ss_")}
    return _hashes_of_bytes(_serialize(tensors, ss))


# ---------------------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------------------
_KOHYA_NAME = re.compile(r"^lora_(?:unet|te|te1|te2|te3)_[A-Za-z0-9_]+$")  # te3: Flux T5-XXL (kohya lora_flux.py)


def _check_finite(name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise LoraFormatError(f"{name} holds NaN or Inf values; refusing to write a broken LoRA")


def save_kohya_lora(path: str | os.PathLike, modules: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]],
                    metadata: Mapping[str, str] | None = None, dtype: torch.dtype = torch.float16,
                    overwrite: bool = True) -> Path:
    """Write a kohya-format LoRA safetensors file atomically.

    Args:
        path: destination ``.safetensors``.
        modules: kohya name (``lora_unet_...`` / ``lora_te_...`` / ``lora_te1_`` / ``lora_te2_`` / Flux T5 ``lora_te3_``) ->
            ``(lora_down [r, in] or [r, in, kh, kw], lora_up [out, r] or [out, r, 1, 1], alpha)``.
            ΔW = up @ down × alpha / r.
        metadata: ``ss_*`` / ``modelspec.*`` / other entries, kept (non-strings JSON-encoded);
            ``sshs_model_hash`` and ``sshs_legacy_hash`` are added (:func:`model_hashes`).
        dtype: storage dtype of the weights and alphas (fp16 default, like kohya's ``save_precision``).
        overwrite: replace an existing file.

    Writes ``<name>.lora_down.weight``, ``<name>.lora_up.weight``, ``<name>.alpha`` (0-dim). Returns the path.

    Raises:
        LoraFormatError: no modules, a bad name, mismatched ranks/shapes, NaN/Inf. FileExistsError: see overwrite.
    Nothing is written on error.
    """
    if not modules:
        raise LoraFormatError("refusing to write an empty LoRA (no modules)")
    tensors: dict[str, torch.Tensor] = {}
    for name, spec in modules.items():
        if not _KOHYA_NAME.match(name):
            raise LoraFormatError(f"{name!r} is not a kohya LoRA module name (lora_unet_/lora_te_/lora_te1_/lora_te2_/lora_te3_)")
        try:
            down, up, alpha = spec
        except (TypeError, ValueError):
            raise LoraFormatError(f"{name}: expected (lora_down, lora_up, alpha)") from None
        if down.ndim not in (2, 4) or up.ndim not in (2, 4):
            raise LoraFormatError(f"{name}: lora_down/lora_up must be 2-D or 4-D, got {tuple(down.shape)}, "
                                  f"{tuple(up.shape)}")
        if up.shape[1] != down.shape[0]:
            raise LoraFormatError(f"{name}: rank mismatch, lora_down {tuple(down.shape)} vs lora_up {tuple(up.shape)}")
        if down.ndim == 4 and (up.ndim != 4 or tuple(up.shape[2:]) != (1, 1)):
            raise LoraFormatError(f"{name}: a conv lora_down needs a [out, r, 1, 1] lora_up, got {tuple(up.shape)}")
        _check_finite(name + ".lora_down.weight", down)
        _check_finite(name + ".lora_up.weight", up)
        alpha = float(alpha.item() if isinstance(alpha, torch.Tensor) else alpha)
        if not (alpha == alpha) or alpha in (float("inf"), float("-inf")):
            raise LoraFormatError(f"{name}: alpha must be finite")
        tensors[f"{name}.lora_down.weight"] = down.detach().to("cpu", dtype, copy=True).contiguous()
        tensors[f"{name}.lora_up.weight"] = up.detach().to("cpu", dtype, copy=True).contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=dtype)
    md = _stringify_metadata(metadata)
    md["sshs_model_hash"], md["sshs_legacy_hash"] = model_hashes(tensors, md)
    return save_safetensors(tensors, path, metadata=md, overwrite=overwrite)


def save_diff_file(path: str | os.PathLike, diffs: Mapping[str, torch.Tensor],
                   metadata: Mapping[str, str] | None = None, dtype: torch.dtype = torch.float16,
                   overwrite: bool = True) -> Path:
    """Write full-rank deltas as ``<kohya name>.diff`` / ``<kohya name>.diff_b`` (ComfyUI's LoraLoader adds
    them × strength: ``comfy/lora.py`` ``load_lora``), atomically, with sshs hashes added to ``metadata``.

    Args:
        diffs: ``"lora_unet_..._attn2_to_k.diff" -> ΔW`` shaped like the weight, ``"....diff_b" -> Δbias``.
        dtype: storage dtype (fp16 default; note small deltas below the dtype's resolution round to zero).
    Raises:
        LoraFormatError: empty, key without ``.diff``/``.diff_b`` or not a kohya name, NaN/Inf.
    """
    if not diffs:
        raise LoraFormatError("refusing to write an empty diff file")
    tensors = {}
    for key, t in diffs.items():
        base, _, suf = key.rpartition(".")
        if suf not in ("diff", "diff_b") or not _KOHYA_NAME.match(base):
            raise LoraFormatError(f"{key!r}: keys must be <kohya name>.diff or <kohya name>.diff_b")
        _check_finite(key, t)
        tensors[key] = t.detach().to("cpu", dtype, copy=True).contiguous()
    md = _stringify_metadata(metadata)
    md["sshs_model_hash"], md["sshs_legacy_hash"] = model_hashes(tensors, md)
    return save_safetensors(tensors, path, metadata=md, overwrite=overwrite)

