"""Interop with the reference repositories' saved erasures: ``esd-*.safetensors`` ↔ this project's ``.diff`` files.

The reference scripts save the *trained tensors themselves*, not deltas: rohitgandikota/erasing ``esd_sd.py``
(line 198–204) writes ``{"<diffusers module path>.<weight|bias>": absolute tensor}`` for every trained parameter
to ``esd-<concept>-from-<from>-<method without dashes>.safetensors`` (in the training dtype, bf16 there), and
rohitgandikota/unified-concept-editing ``uce_sd_erase.py`` (lines 85–88) writes ``"<path>.weight"`` of every
attn2 to_k / to_v the same way (fp32). Users apply them with ``unet.load_state_dict(file, strict=False)``.

This project's files hold deltas ΔW under kohya names (``<kohya name>.diff`` / ``.diff_b``, applied by any
ComfyUI LoRA loader with a strength). Converting needs the base weights the reference trained from (for
esd_sd.py: CompVis/stable-diffusion-v1-4): ``ΔW = W_file − W_base`` and back ``W_file = W_base + ΔW``.
Precision: a bf16 reference file carries its absolute weights' bf16 rounding (relative error ≤ 2⁻⁹) into ΔW;
convert with the same base in fp32 and the round trip ``.diff → reference → .diff`` is exact up to the file
dtypes. Keys are checked against the base model: unknown names or wrong shapes raise ``ValueError``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping

import torch

from ...formats.kohya_keys import kohya_lora_name

Deltas = dict[tuple[str, str, str], torch.Tensor]


def reference_file_name(concept: str, erase_from: str | None = None, method: str = "esd-x") -> str:
    """The file name ``esd_sd.py`` gives a run (line 204): ``esd-<concept>-from-<from>-<method>.safetensors``
    with spaces → ``_`` and the method's dashes removed (``esd-x`` → ``esdx``). UCE runs (``method="uce"``)
    are named ``uce-<concept>.safetensors`` (the script's ``--exp_name`` is free)."""
    c = re.sub(r"[\\/]", "_", str(concept)).replace(" ", "_")
    if method == "uce":
        return f"uce-{c}.safetensors"
    f = re.sub(r"[\\/]", "_", str(erase_from or concept)).replace(" ", "_")
    return f"esd-{c}-from-{f}-{method.replace('-', '')}.safetensors"


def base_tensors(modules: Mapping[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """``{"<path>.weight" | "<path>.bias": tensor}`` of a host's ``modules("unet")`` (the names the reference
    files use)."""
    out = {}
    for path, m in modules.items():
        for attr in ("weight", "bias"):
            t = getattr(m, attr, None)
            if t is not None:
                out[f"{path}.{attr}"] = t
    return out


def to_reference(deltas: Mapping[tuple[str, str, str], torch.Tensor], base: Mapping[str, torch.Tensor],
                 dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Absolute tensors ``{"<path>.<attr>": W_base + ΔW}`` (``dtype``, CPU) for UNet deltas
    ``{("unet", path, attr): ΔW}``. Raises ``ValueError`` for a non-UNet delta, a name the base lacks or a
    shape mismatch."""
    out = {}
    for (comp, path, attr), d in deltas.items():
        if comp != "unet":
            raise ValueError(f"the reference format holds UNet tensors only, not {comp}.{path}")
        key = f"{path}.{attr}"
        if key not in base:
            raise ValueError(f"{key} is not a tensor of the base model")
        b = base[key].detach().float().cpu()
        if tuple(b.shape) != tuple(d.shape):
            raise ValueError(f"{key}: delta {tuple(d.shape)} vs base {tuple(b.shape)}")
        out[key] = (b + d.detach().float().cpu()).to(dtype).contiguous()
    if not out:
        raise ValueError("nothing to write")
    return out


def from_reference(tensors: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> Deltas:
    """Deltas ``{("unet", path, attr): W_file − W_base}`` (fp32 CPU) from a reference file's tensors.

    Tensors equal to the base (e.g. untrained entries of ``esd-all``) are kept — a zero delta is harmless.
    Raises ``ValueError`` listing names the base lacks (a file for another model family, or our own ``.diff``
    file passed by mistake) and for shape mismatches.
    """
    unknown = sorted(k for k in tensors if k not in base)
    if unknown:
        hint = " (this looks like a .diff file: convert it the other way)" if any(
            k.endswith((".diff", ".diff_b")) for k in unknown) else ""
        raise ValueError(f"{len(unknown)} tensor name(s) are not in the base UNet, e.g. {unknown[:3]}{hint}")
    out: Deltas = {}
    for k, t in tensors.items():
        b = base[k].detach().float().cpu()
        if tuple(t.shape) != tuple(b.shape):
            raise ValueError(f"{k}: file tensor {tuple(t.shape)} vs base {tuple(b.shape)}")
        path, _, attr = k.rpartition(".")
        out[("unet", path, attr)] = t.detach().float().cpu() - b
    if not out:
        raise ValueError("the file holds no tensor")
    return out


def diff_keys(deltas: Mapping[tuple[str, str, str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{"<kohya name>.diff" | ".diff_b": ΔW}`` — this project's file keys for deltas (as
    :func:`.outputs.diff_state_dict`)."""
    return {kohya_lora_name(c, p) + (".diff" if a == "weight" else ".diff_b"): d for (c, p, a), d in deltas.items()}


def deltas_from_diff(tensors: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> Deltas:
    """Inverse of :func:`diff_keys` for UNet entries, resolving kohya names against the base model's module
    paths. Raises ``ValueError`` for keys that are not ``.diff`` / ``.diff_b`` of a base UNet module."""
    by_name = {}
    for key in base:
        path, _, attr = key.rpartition(".")
        by_name[kohya_lora_name("unet", path) + (".diff" if attr == "weight" else ".diff_b")] = (path, attr)
    bad = sorted(k for k in tensors if k not in by_name)
    if bad:
        raise ValueError(f"{len(bad)} key(s) are not .diff entries of this base UNet, e.g. {bad[:3]}")
    out: Deltas = {}
    for k, t in tensors.items():
        path, attr = by_name[k]
        if tuple(t.shape) != tuple(base[f"{path}.{attr}"].shape):
            raise ValueError(f"{k}: shape {tuple(t.shape)} vs base {tuple(base[f'{path}.{attr}'].shape)}")
        out[("unet", path, attr)] = t.detach().float().cpu()
    return out


def is_diff_file(tensors: Mapping[str, torch.Tensor]) -> bool:
    """True when every key ends in ``.diff`` / ``.diff_b`` (this project's format)."""
    return bool(tensors) and all(k.endswith((".diff", ".diff_b")) for k in tensors)


def convert_file(src: str | os.PathLike, dst: str | os.PathLike, base: Mapping[str, torch.Tensor], *,
                 dtype: torch.dtype = torch.float32, overwrite: bool = False) -> str:
    """Convert a file to the other format: a ``.diff`` file → reference (absolute weights), a reference
    ``esd-*`` / UCE file → ``.diff``. Returns ``"to_reference"`` or ``"to_diff"``. Written atomically;
    metadata of the source is carried over (plus ``conceptlab_converted_from``).

    Raises ``FileNotFoundError``, ``FileExistsError`` (unless ``overwrite``), ``ValueError`` (see
    :func:`from_reference` / :func:`deltas_from_diff`).
    """
    from safetensors import safe_open

    from ...formats.lora_files import save_diff_file
    from ...formats.safetensors_io import save_safetensors

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"{src} not found")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists")
    with safe_open(str(src), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata() or {})
    meta["conceptlab_converted_from"] = src.name
    if is_diff_file(tensors):
        ref = to_reference(deltas_from_diff(tensors, base), base, dtype)
        save_safetensors(ref, dst, metadata=meta, overwrite=True)
        return "to_reference"
    deltas = from_reference(tensors, base)
    meta.setdefault("ss_network_module", "conceptlab.esd")
    save_diff_file(dst, diff_keys(deltas), meta, dtype=dtype)
    return "to_diff"
