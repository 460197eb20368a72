"""Flux.1's fused BFL layers over diffusers' split ones, for the diffusers Flux host (:mod:`.flux_host`).

BFL's checkpoints (and ComfyUI's module tree) fuse some layers that diffusers' ``FluxTransformer2DModel`` stores as
several ``nn.Linear`` (``img_attn.qkv`` → ``attn.to_q/to_k/to_v``; ``linear1`` → ``to_q/to_k/to_v/proj_mlp``;
``final_layer.adaLN_modulation.1`` with its halves swapped). The host names every layer by its BFL path; here:
:func:`bfl_modules` (BFL path → diffusers module or :class:`FusedLinear` view), :class:`FusedLinear` (a read-only
view of the fused weight) and :class:`PieceDelta` (the weight-space parametrization that puts a BFL-shaped ΔW's rows
on each diffusers piece). The row / swap maps themselves are :mod:`conceptlab.formats.flux_keys`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..formats.flux_keys import CANONICAL_PREFIX, FluxDims, Piece, piece_of
from .host import DeltaModule


class FusedLinear(nn.Module):
    """A read-only view of a fused BFL ``Linear`` (``img_attn.qkv``, ``txt_attn.qkv``, ``linear1``) that diffusers
    stores as several ``nn.Linear`` row blocks.

    ``weight`` / ``bias`` are the row-concatenation of the pieces (computed on access, no copy kept), so
    ``weight.shape`` is the BFL shape ``[Σ rows, in]``; ``in_features`` / ``out_features`` as ``nn.Linear``.
    ``pieces``: ``[(diffusers nn.Linear, Piece)]`` in row order. Not callable (the model calls the pieces).
    """

    def __init__(self, pieces: list[tuple[nn.Linear, Piece]]):
        super().__init__()
        self._pieces = pieces  # plain list: the pieces stay registered under the transformer only
        self.in_features = int(pieces[0][0].in_features)
        self.out_features = int(sum(m.out_features for m, _ in pieces))

    @property
    def pieces(self) -> list[tuple[nn.Linear, Piece]]:
        """``[(diffusers nn.Linear, Piece of the fused BFL tensor)]`` in row order."""
        return list(self._pieces)

    @property
    def weight(self) -> torch.Tensor:
        """The fused weight ``[Σ rows, in]`` (a new tensor: the pieces concatenated, dequantized if quantized)."""
        from .quantize import dense

        return torch.cat([dense(m.weight) for m, _ in self._pieces], dim=0)

    @property
    def bias(self) -> torch.Tensor | None:
        """The fused bias ``[Σ rows]``, or None when a piece has no bias."""
        if any(m.bias is None for m, _ in self._pieces):
            return None
        return torch.cat([m.bias for m, _ in self._pieces], dim=0)

    def forward(self, *a, **k):  # pragma: no cover - never called by the model
        raise RuntimeError("FusedLinear is a view of split diffusers weights; call the transformer instead")


class PieceDelta(nn.Module):
    """Parametrization of one diffusers tensor that is a :class:`~conceptlab.formats.flux_keys.Piece` (row slice,
    half swap) of a BFL tensor carrying ``parent`` (a :class:`~.host.DeltaModule` shaped like the BFL tensor).

    ``forward(W) = W + multiplier · piece.cut(parent.delta())``, honouring ``parent.enabled`` / ``multiplier``.
    When the parent has ``delta_rows(start, stop)`` (LoRA: ``up[start:stop] @ down``) only those rows are
    computed; otherwise the full ΔW is computed and sliced.
    """

    def __init__(self, parent: DeltaModule, piece: Piece):
        super().__init__()
        self.parent = parent
        self.piece = piece

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        p = self.parent
        if not p.enabled or p.multiplier == 0.0:
            return weight
        from .quantize import dense

        weight = dense(weight)  # quantized frozen base: dequantize, then add ΔW
        rows = self.piece.rows
        if rows is not None and not self.piece.swap and hasattr(p, "delta_rows"):
            d = p.delta_rows(rows[0], rows[1])
        else:
            d = p.delta()
            if d.dim() > 0:
                d = self.piece.cut(d)
        if p.multiplier != 1.0:
            d = d * p.multiplier
        return weight + d.to(device=weight.device, dtype=weight.dtype)


def bfl_modules(transformer: nn.Module, dims: FluxDims) -> dict[str, nn.Module]:
    """``{BFL module path: module}`` of a diffusers ``FluxTransformer2DModel``: the diffusers ``nn.Linear`` itself
    where a BFL layer is one diffusers layer (``img_in``, ``double_blocks.0.img_mlp.0`` …), a :class:`FusedLinear`
    over its row pieces where diffusers splits a fused BFL layer (``double_blocks.N.img_attn.qkv``,
    ``single_blocks.N.linear1``, ``final_layer.adaLN_modulation.1`` …), by
    :func:`conceptlab.formats.flux_keys.piece_of`. Linear layers with no BFL counterpart are left out;
    parametrization internals are skipped. In model order (as diffusers enumerates modules: double blocks, then
    single blocks, the global layers around them)."""
    dm = {n: m for n, m in transformer.named_modules()
          if isinstance(m, nn.Linear) and ".parametrizations." not in f".{n}."}
    groups: dict[str, list[tuple[nn.Linear, Piece]]] = {}
    for name, mod in dm.items():
        p = piece_of(name + ".weight", dims)
        if p is None:
            continue
        bfl = p.canonical[len(CANONICAL_PREFIX):-len(".weight")]
        groups.setdefault(bfl, []).append((mod, p))
    out: dict[str, nn.Module] = {}
    for bfl, items in groups.items():
        if len(items) == 1 and items[0][1].rows is None and not items[0][1].swap:
            out[bfl] = items[0][0]
        else:
            out[bfl] = FusedLinear(sorted(items, key=lambda it: (it[1].rows or (0, 0))[0]))
    return out
