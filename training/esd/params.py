"""Which tensors ESD trains: the parameter sets (``esd-x``, ``esd-x-strict``, ``esd-u``, ``esd-all``) per denoiser
layout, as data. :mod:`.erase` re-exports :class:`Target`, :func:`select_targets` and :func:`count_parameters`.

The layout comes from the family table (:attr:`..families.Family.denoiser`): ``"unet"`` (SD1.x / SD2.x / SDXL) or
``"flux-dit"`` (Flux.1's double/single-stream transformer, BFL module paths; :mod:`conceptlab.formats.flux_keys`).

**UNet** (rohitgandikota/erasing ``esd_sd.py`` ``get_esd_trainable_parameters``, lines 24–49; SDXL:
``esd_sdxl.py``): ``esd-x`` every cross-attention (``attn2``) Linear — to_q, to_k, to_v, to_out.0 weights and
biases; ``esd-x-strict`` attn2 to_k / to_v; ``esd-u`` every Linear / Conv2d outside attn2; ``esd-all`` every
Linear / Conv2d (SDXL esd-u / esd-all: only modules inside blocks, no embedding).

**Flux** (this project's analogue; the reference repository has no Flux script). Flux.1 has no cross-attention:
each of the 19 *double* blocks runs one joint attention over ``[text tokens; image tokens]`` where the text stream
and the image stream have their own projections (``txt_attn.qkv`` / ``txt_attn.proj`` and ``img_attn.qkv`` /
``img_attn.proj``), and the 38 *single* blocks process the concatenated sequence with one shared ``linear1`` /
``linear2``. What ESD-x trains in a UNet is the part of the network that *reads the text*: in cross-attention the
image queries (to_q) read text keys and values (to_k, to_v) and to_out writes the result back. In a double block
the only parameters that act on text tokens alone are the text stream's attention projections:

* ``txt_attn.qkv`` rows ``[h, 2h)`` (K) and ``[2h, 3h)`` (V): the keys and values every image query reads the
  prompt through — exactly the role of cross-attention to_k / to_v. These rows are ``esd-x-strict``.
* ``txt_attn.qkv`` rows ``[0, h)`` (Q) and ``txt_attn.proj``: how text tokens attend and how their attention
  output updates the text stream, i.e. the text representation the *next* blocks' K/V (and the single blocks)
  are computed from. Together with K/V they make ``esd-x``: every tensor of the double blocks' text attention
  (weight and bias), so the change is a function of the prompt only.

Left out on purpose: ``img_attn.qkv`` — its Q rows are the image queries, but in joint attention the same
queries also attend to every image key, so changing them changes image-image attention for every prompt
(including the empty one) — the opposite of ESD-x's "only what the text reaches" (cross-attention to_q, in
contrast, only ever meets text keys); ``img_attn.proj`` mixes text-value and image-value outputs likewise;
``txt_mlp`` / ``txt_mod`` are not attention; single blocks have no text-only weights (``linear1`` holds the
shared Q/K/V of both streams).

Counts on Flux.1-dev shapes (hidden 3072, 19 double blocks; :func:`flux_counts` computes them from
:class:`conceptlab.formats.flux_keys.FluxDims`): ``esd-x`` 76 tensors / 717,459,456 parameters;
``esd-x-strict`` 38 tensors (K/V rows of ``txt_attn.qkv`` weight and bias) / 358,729,728 parameters.

Public ports differ: the Flux ports of ``esd_sd.py`` (``esd_flux.py`` with ``utils/flux_utils.esd_flux_call``)
train every Linear whose name contains ``attn`` (image and text streams, double and single blocks: 2,511,108,096
parameters on Flux.1-dev) as their "esd-x" and ``to_k``/``to_v`` of every attention (image keys too) as "esd-x-strict";
EraseAnything (Gao et al., ICML 2025; tomguluson92/EraseAnything ``train_flux_lora.py``) trains a LoRA on
``attn.add_q_proj`` and ``attn.add_k_proj`` — the Q and K rows of ``txt_attn.qkv`` — i.e. the text stream's
*attention pattern* but not its values (its attention-map loss needs the pattern to move). README "ESD on Flux"
compares them.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from ..host import DeltaModule, DiffusionHost

METHODS = ("esd-x", "esd-x-strict", "esd-u", "esd-all")


@dataclass(frozen=True)
class Target:
    """One trained tensor: ``<component>.<path>.<attr>`` (``attr`` ``"weight"``/``"bias"``) of ``shape``.

    ``rows``: ``(start, stop)`` when only those rows (dim 0) of a fused tensor are trained (Flux ``esd-x-strict``:
    the K and V rows of ``txt_attn.qkv``); ``None`` for the whole tensor. The saved ΔW always has ``shape``
    (zeros outside ``rows``), so loaders apply it to the fused weight unchanged.
    """

    component: str
    path: str
    attr: str
    shape: tuple[int, ...]
    rows: tuple[int, int] | None = None

    @property
    def numel(self) -> int:
        """Number of trained scalar parameters (``rows`` only, when set)."""
        if self.rows is None:
            return int(math.prod(self.shape))
        return int((self.rows[1] - self.rows[0]) * math.prod(self.shape[1:]))


class RowsDelta(DeltaModule):
    """A full-rank trainable ΔW on rows ``[start, stop)`` of a tensor of ``shape`` (zeros elsewhere).

    ``weight`` is the fp32 parameter ``[stop − start, *shape[1:]]`` (zeros at first); :meth:`delta` pads it to
    ``shape``. Used where only part of a fused tensor is trained (Flux ``txt_attn.qkv`` K/V rows).
    """

    def __init__(self, shape: Sequence[int], rows: tuple[int, int], device: torch.device | str | None = None):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        self.rows = (int(rows[0]), int(rows[1]))
        if not 0 <= self.rows[0] < self.rows[1] <= self.shape[0]:
            raise ValueError(f"rows {rows} outside 0..{self.shape[0]}")
        self.weight = nn.Parameter(torch.zeros((self.rows[1] - self.rows[0], *self.shape[1:]),
                                               dtype=torch.float32, device=device))

    def delta(self) -> torch.Tensor:
        """``[*shape]`` fp32: the parameter in rows ``[start, stop)``, zeros elsewhere (differentiable)."""
        before = self.rows[0]
        after = self.shape[0] - self.rows[1]
        pad = [0, 0] * (len(self.shape) - 1) + [before, after]
        return torch.nn.functional.pad(self.weight, pad)


def make_delta(target: Target, device=None) -> DeltaModule:
    """The trainable delta module for ``target`` (:class:`..host.FullDelta` or :class:`RowsDelta`)."""
    from ..host import FullDelta

    if target.rows is None:
        return FullDelta(target.shape, device=device)
    return RowsDelta(target.shape, target.rows, device=device)


# -- UNet (SD1.x / SD2.x / SDXL) -------------------------------------------------------------------------------

def _unet_selected(path: str, method: str, arch: str) -> bool:
    parts = path.split(".")
    in_attn2 = "attn2" in parts
    if arch == "sdxl" and method in ("esd-u", "esd-all"):
        # esd_sdxl.py get_esd_trainable_parameters: only modules inside blocks, never an embedding
        # ('emb' not in name and 'block' in name: no conv_in/out, time/add embedding, resnet time_emb_proj)
        if "emb" in path or "block" not in path:
            return False
    if method == "esd-x":
        return in_attn2
    if method == "esd-x-strict":
        return in_attn2 and parts[-1] in ("to_k", "to_v")
    if method == "esd-u":
        return not in_attn2
    return True  # esd-all


def _unet_targets(modules: Mapping[str, nn.Module], method: str, component: str, arch: str) -> list[Target]:
    if not any("attn2" in p.split(".") for p in modules):
        raise ValueError("this model has no cross-attention (no 'attn2' modules): ESD erases a text concept "
                         "through cross-attention, so it needs a text-conditioned UNet (SD1.x/SD2.x/SDXL)")
    out = []
    for path in sorted(modules):
        if _unet_selected(path, method, arch):
            out.extend(_whole(component, path, modules[path]))
    return out


def _whole(component: str, path: str, mod: nn.Module) -> list[Target]:
    out = []
    for attr in ("weight", "bias"):
        p = getattr(mod, attr, None)
        if p is not None:
            out.append(Target(component, path, attr, tuple(p.shape)))
    return out


# -- Flux double/single-stream DiT -----------------------------------------------------------------------------

_FLUX_BLOCK = re.compile(r"^(double|single)_blocks\.(\d+)\.(.+)$")
#: the text stream's attention in a double block (module docstring): esd-x
FLUX_TEXT_ATTENTION = ("txt_attn.qkv", "txt_attn.proj")


def _block_sort_key(path: str):
    m = _FLUX_BLOCK.match(path)
    return (m[1], int(m[2]), m[3]) if m else ("", -1, path)


def _flux_targets(modules: Mapping[str, nn.Module], method: str, component: str) -> list[Target]:
    doubles = [p for p in modules if p.startswith("double_blocks.")]
    if not any(p.endswith("txt_attn.qkv") for p in doubles):
        raise ValueError("this Flux-family model has no double_blocks.N.txt_attn.qkv module: ESD on Flux trains the "
                         "text stream's attention of the double blocks")
    out: list[Target] = []
    for path in sorted(modules, key=_block_sort_key):
        m = _FLUX_BLOCK.match(path)
        if m is None:
            continue  # esd-u / esd-all: only modules inside blocks (as esd_sdxl.py), no embeddings / final layer
        kind, tail = m[1], m[3]
        text_attn = kind == "double" and tail in FLUX_TEXT_ATTENTION
        mod = modules[path]
        if method == "esd-x" and text_attn:
            out.extend(_whole(component, path, mod))
        elif method == "esd-x-strict" and kind == "double" and tail == "txt_attn.qkv":
            h = mod.weight.shape[0] // 3  # [q; k; v] along dim 0, ``hidden`` rows each (formats.flux_keys)
            for attr in ("weight", "bias"):
                p = getattr(mod, attr, None)
                if p is not None:
                    out.append(Target(component, path, attr, tuple(p.shape), (h, 3 * h)))
        elif method == "esd-u" and not text_attn:
            out.extend(_whole(component, path, mod))
        elif method == "esd-all":
            out.extend(_whole(component, path, mod))
    return out


_LAYOUTS = {"unet": _unet_targets, "flux-dit": lambda mods, method, comp, arch: _flux_targets(mods, method, comp)}


def select_targets(modules: Mapping[str, nn.Module], method: str = "esd-x",
                   component: str = "unet", arch: str = "sd1") -> list[Target]:
    """The tensors a method trains, from ``{canonical module path: nn.Linear | nn.Conv2d}`` of the denoiser.

    The layout's rules come from ``families.family(arch).denoiser`` (module docstring): UNet paths are diffusers
    paths; Flux paths are BFL paths (``double_blocks.0.txt_attn.qkv``). ``arch="sdxl"`` follows ``esd_sdxl.py``
    (SDXL base: esd-x 350 tensors / 545,670,400 parameters; esd-x-strict 140 / 340,787,200). Every selected module
    contributes its ``weight`` and, when present, its ``bias`` (``module.named_parameters()`` in the reference).
    Works on meta-device modules (shapes only).

    Raises:
        ValueError: unknown method or family; a model without the text-reading modules of its layout (no ``attn2``
            in a UNet, no ``txt_attn.qkv`` in a Flux DiT) — ESD is defined through the text conditioning; or an
            empty selection.
    """
    from ..families import FAMILIES

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    fam = FAMILIES.get(arch)
    layout = fam.denoiser if fam is not None else "unet"
    try:
        rule = _LAYOUTS[layout]
    except KeyError:
        raise ValueError(f"ESD has no parameter sets for the {layout!r} denoiser of {arch!r}") from None
    out = rule(modules, method, component, arch)
    if not out:
        raise ValueError(f"method {method!r} selects no tensor in this model")
    return out


def count_parameters(targets: Sequence[Target]) -> tuple[int, int]:
    """``(number of tensors, number of trained scalar parameters)`` of a target list."""
    return len(targets), sum(t.numel for t in targets)


def flux_counts(method: str = "esd-x", n_double: int = 19, dims=None) -> tuple[int, int]:
    """``(tensors, parameters)`` a method trains on a Flux.1-shaped model, from the shapes alone (meta tensors).

    ``dims``: :class:`conceptlab.formats.flux_keys.FluxDims` (default Flux.1: hidden 3072); ``n_double``: double
    blocks (19 in Flux.1-dev / schnell). Only ``esd-x`` / ``esd-x-strict`` (double-block modules) are counted here.
    """
    from ...formats.flux_keys import FluxDims

    if method not in ("esd-x", "esd-x-strict"):
        raise ValueError("flux_counts covers esd-x and esd-x-strict")
    h = (dims or FluxDims()).hidden
    mods: dict[str, nn.Module] = {}
    for i in range(int(n_double)):
        mods[f"double_blocks.{i}.txt_attn.qkv"] = nn.Linear(h, 3 * h, device="meta")
        mods[f"double_blocks.{i}.txt_attn.proj"] = nn.Linear(h, h, device="meta")
        mods[f"double_blocks.{i}.img_attn.qkv"] = nn.Linear(h, 3 * h, device="meta")
    return count_parameters(_flux_targets(mods, method, "unet"))


def base_weights_hash(host: DiffusionHost, targets: Sequence[Target]) -> str:
    """sha256 (hex) of the base values of the trained tensors (names + raw bytes, in target order).

    Identifies the base model the deltas apply to without hashing a multi-GB file. Call before installing deltas.
    A quantized weight (``quantize_base``) is hashed dequantized, so it differs from the full-precision base's hash.
    """
    from ..quantize import dense

    h = hashlib.sha256()
    mods = {c: host.modules(c) for c in {t.component for t in targets}}
    for t in targets:
        # a quantized base (quantize_base) is hashed as the dequantized values the deltas were trained against
        v = dense(getattr(mods[t.component][t.path], t.attr)).detach().cpu().contiguous()
        h.update(f"{t.component}.{t.path}.{t.attr}:{tuple(v.shape)}:{v.dtype}".encode())
        h.update(v.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
