"""Flux checkpoints read under another layout's key names, and whole-state-dict conversions.

:class:`FluxKeyView` wraps any tensor reader (a file, a sharded folder, a dict) so that a Flux checkpoint in one
layout (BFL, ComfyUI, diffusers; see :mod:`formats.flux_keys`) is read under the names of another -- the canonical
``model.diffusion_model.<BFL>`` keys for the weight diff, or model A's own names when B and C are merged into A.
Split diffusers q/k/v(/mlp) tensors are fused with one ``torch.cat`` when a fused key is asked for, fused tensors are
sliced when a split key is asked for; every other tensor is passed through as the source returns it.
:func:`deltas_for_keys` does the same for canonical LoRA ΔW. Nothing here imports ComfyUI.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch

from .flux_keys import CANONICAL_PREFIX, FluxDims, Piece, diffusers_pieces, infer_dims, is_flux_key, piece_of

__all__ = ["FluxKeyView", "canonical_state_dict", "to_diffusers_state_dict", "deltas_for_keys", "DictSource"]

# ---------------------------------------------------------------------------------------------------------------
# whole state dicts (small models, tests, conversions)
# ---------------------------------------------------------------------------------------------------------------
def canonical_state_dict(sd: Mapping[str, torch.Tensor], dims: FluxDims | None = None,
                         keep_other: bool = True) -> dict[str, torch.Tensor]:
    """Any Flux layout -> canonical keys (``model.diffusion_model.<BFL name>``), fusing split q / k / v (/ mlp)
    along dim 0 and swapping ``norm_out.linear`` halves back. Non-Flux keys are kept (``keep_other``) unchanged.

    Raises ``ValueError`` when the parts of a fused tensor do not cover it, or two keys name the same tensor.
    """
    view = FluxKeyView(DictSource(sd), dims=dims)
    return {k: view.get(k) for k in view.keys() if keep_other or view.is_flux(k)}


def to_diffusers_state_dict(sd: Mapping[str, torch.Tensor], dims: FluxDims | None = None,
                            prefix: str = "") -> dict[str, torch.Tensor]:
    """Any Flux layout -> diffusers ``FluxTransformer2DModel`` names (with ``prefix``); non-Flux keys dropped.
    The inverse of :func:`canonical_state_dict` on the transformer."""
    dims = dims or infer_dims({k: tuple(v.shape) for k, v in sd.items()})
    canon = canonical_state_dict(sd, dims, keep_other=False)
    out: dict[str, torch.Tensor] = {}
    for ck, t in canon.items():
        for dk, piece in diffusers_pieces(ck[len(CANONICAL_PREFIX):], dims):
            out[prefix + dk] = piece.cut(t).contiguous()
    return out


class DictSource:
    """Reader API (``keys/shape/dtype/get``) over an in-memory state dict."""

    def __init__(self, sd: Mapping[str, torch.Tensor]):
        self.sd = sd
        self.name = "state dict"

    def keys(self):
        return list(self.sd.keys())

    def shape(self, k):
        return tuple(self.sd[k].shape)

    def dtype(self, k):
        return self.sd[k].dtype

    def get(self, k):
        return self.sd[k]


# ---------------------------------------------------------------------------------------------------------------
# a reader in another layout
# ---------------------------------------------------------------------------------------------------------------
class FluxKeyView:
    """Read-only view of a Flux weight source under the key names of another layout.

    Args:
        source: any reader with ``keys()``, ``shape(k)``, ``dtype(k)``, ``get(k)`` (``release(k)`` optional):
            :class:`~.safetensors_io.WeightFile`, ``metrics.diff_io.StreamingWeights``, a folder reader.
        keys: the names to serve (e.g. model A's keys when B is merged into A's layout); default: the canonical
            keys (``model.diffusion_model.<BFL>``) of every Flux tensor of ``source``, in source order. Non-Flux
            keys are served under their own names either way.
        dims: widths for fused tensors; default :func:`infer_dims` of ``source``.

    A wanted key is served when ``source`` holds its tensor in any layout: as is, as a row slice of a fused
    tensor (BFL ``qkv`` -> diffusers ``to_q``), or fused from split parts (diffusers ``to_q/to_k/to_v`` -> ``qkv``).
    Keys ``source`` cannot give are left out of :meth:`keys` (callers treat them as missing).
    Other attributes (``name``, ``path``, ``metadata``) are those of ``source``.

    Raises ``ValueError`` at construction when two source keys name the same tensor or the parts found for a fused
    tensor do not tile it (a damaged file).
    """

    format = "flux-view"

    def __init__(self, source, keys: Iterable[str] | None = None, dims: FluxDims | None = None):
        self.source = source
        src_keys = list(source.keys())
        self.dims = dims or infer_dims({k: tuple(source.shape(k)) for k in src_keys if is_flux_key(k)})
        self._parts: dict[str, list[tuple[str, Piece]]] = {}  # canonical -> source pieces
        other: list[str] = []
        order: list[str] = []
        for k in src_keys:
            p = piece_of(k, self.dims)
            if p is None:
                other.append(k)
                continue
            lst = self._parts.setdefault(p.canonical, [])
            if not lst:
                order.append(p.canonical)
            for k2, p2 in lst:
                if p2.rows == p.rows:
                    raise ValueError(f"{k2!r} and {k!r} name the same Flux tensor {p.canonical!r}")
            lst.append((k, p))
        self._shape: dict[str, tuple[int, ...]] = {}
        for ck, lst in self._parts.items():
            lst.sort(key=lambda kp: (kp[1].rows or (0, 0))[0])
            if len(lst) == 1 and lst[0][1].rows is None:
                self._shape[ck] = tuple(source.shape(lst[0][0]))
                continue
            total = lst[0][1].total
            pos = 0
            for k, p in lst:
                if p.rows is None or p.rows[0] != pos or tuple(source.shape(k))[0] != p.rows[1] - p.rows[0]:
                    raise ValueError(f"the parts of {ck!r} in this file ({[kk for kk, _ in lst]}) do not fit its "
                                     f"{total} rows (hidden {self.dims.hidden}, mlp {self.dims.mlp_hidden})")
                pos = p.rows[1]
            if pos != total:
                missing = [dk for dk, pp in diffusers_pieces(ck[len(CANONICAL_PREFIX):], self.dims)
                           if pp.rows is not None and pp.rows[0] >= pos]
                raise ValueError(f"{ck!r} is incomplete in this file: missing {missing}")
            self._shape[ck] = (total, *tuple(source.shape(lst[0][0]))[1:])
        self._other = set(other)
        self._want: dict[str, Piece | None] = {}
        if keys is None:
            for ck in order:
                self._want[ck] = Piece(ck)
            for k in other:
                self._want[k] = None
        else:
            for k in keys:
                if k in self._other:
                    self._want[k] = None
                    continue
                p = piece_of(k, self.dims)
                if p is not None and p.canonical in self._parts:
                    self._want[k] = p

    def __getattr__(self, name):
        return getattr(self.source, name)

    def keys(self) -> list[str]:
        """The served keys (wanted keys the source holds, in the order asked for)."""
        return list(self._want)

    def __contains__(self, key) -> bool:
        return key in self._want

    def is_flux(self, key: str) -> bool:
        """True for Flux transformer keys (False for passed-through text encoder / VAE keys)."""
        return self._want.get(key) is not None

    def sources_of(self, key: str) -> list[str]:
        """Source keys read to serve ``key``."""
        p = self._want[key]
        if p is None:
            return [key]
        exact = self._exact(p)
        return [exact] if exact else [k for k, _ in self._parts[p.canonical]]

    def _exact(self, p: Piece) -> str | None:
        for k, sp in self._parts[p.canonical]:
            if sp.rows == p.rows and sp.swap == p.swap:
                return k
        return None

    def shape(self, key: str) -> tuple[int, ...]:
        p = self._want[key]
        if p is None:
            return tuple(self.source.shape(key))
        full = self._shape[p.canonical]
        return ((p.rows[1] - p.rows[0]) if p.rows else full[0], *full[1:])

    def dtype(self, key: str) -> torch.dtype:
        return self.source.dtype(self.sources_of(key)[0])

    def get(self, key: str) -> torch.Tensor:
        """The tensor ``key`` (stored dtype). Fused or sliced tensors are new tensors; others come from the source
        as it returns them (possibly read-only views)."""
        p = self._want[key]
        if p is None:
            return self.source.get(key)
        exact = self._exact(p)
        if exact is not None:
            return self.source.get(exact)
        lst = self._parts[p.canonical]
        if len(lst) == 1:
            full = lst[0][1].cut(self.source.get(lst[0][0]))  # swap is its own inverse
        else:
            full = torch.cat([self.source.get(k) for k, _ in lst], dim=0)
        return p.cut(full)

    def release(self, key: str) -> None:
        rel = getattr(self.source, "release", None)
        if rel is not None and key in self._want:
            for k in self.sources_of(key):
                rel(k)

    def prefetch(self, key: str) -> None:
        pf = getattr(self.source, "prefetch", None)
        if pf is not None and key in self._want:
            for k in self.sources_of(key):
                pf(k)


def deltas_for_keys(deltas: Mapping[str, torch.Tensor], keys: Iterable[str],
                    dims: FluxDims) -> dict[str, torch.Tensor]:
    """Re-key canonical ΔW (as :func:`formats.lora_files.lora_deltas` gives for Flux) to the names of a
    checkpoint in another layout (``keys``: its tensor names), slicing fused ΔW for split diffusers tensors.
    Canonical keys that match no given key are returned under their canonical name (callers report them)."""
    out: dict[str, torch.Tensor] = {}
    used = set()
    for k in keys:
        p = piece_of(k, dims)
        if p is not None and p.canonical in deltas:
            out[k] = p.cut(deltas[p.canonical])
            used.add(p.canonical)
        elif k in deltas:
            out[k] = deltas[k]
            used.add(k)
    for k, d in deltas.items():
        if k not in used:
            out[k] = d
    return out

