"""Text conditioning as one object per batch: what every model family needs, carried by the host protocol.

The training and erasure loops never look inside: they get a :class:`Conditioning` from
``host.encode_prompts(prompts)``, select rows of it, concatenate it, attach per-image size information and hand it
back to ``host.predict(x_t, t, cond)``. Each host reads the fields its family needs (see
:mod:`conceptlab.training.families`):

=========  ===========================================  ============================================================
family     ``context``                                  other fields
=========  ===========================================  ============================================================
SD1/SD2    CLIP hidden states ``[B, 77·k, 768|1024]``   —
SDXL       CLIP-L ‖ OpenCLIP-G penultimate hidden       ``pooled`` OpenCLIP-G projected pooled ``[B, 1280]``;
           states ``[B, 77·k, 2048]``                   ``extras["size_ids"]`` ``[B, 6]`` (see below)
Flux       T5-XXL hidden states ``[B, L, 4096]``        ``pooled`` CLIP-L pooled ``[B, 768]``; ``extras["guidance"]``
                                                        ``[B]`` (Flux-dev guidance embedding)
=========  ===========================================  ============================================================

``extras["size_ids"]`` is SDXL's micro-conditioning in pixels, in the order of the ``add_time_ids`` of diffusers'
``StableDiffusionXLPipeline._get_add_time_ids`` and of kohya ``sdxl_train_util.get_size_embeddings``:
``(original_h, original_w, crop_top, crop_left, target_h, target_w)``, float32. When it is absent a host uses
the latent's own size and no crop (what both diffusers and ComfyUI do for text-to-image).

Why not a library type: ComfyUI's CONDITIONING is a list of ``[tensor, dict]`` pairs tied to ComfyUI's sampler,
and diffusers passes the same information as loose keyword arguments; neither can be cached, row-indexed and
concatenated by a host-neutral loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import torch

#: per-image fields hosts may read from :attr:`Conditioning.extras` (name → meaning); a loop may set only these
KNOWN_EXTRAS: Mapping[str, str] = {
    "size_ids": "SDXL (original_h, original_w, crop_top, crop_left, target_h, target_w) in pixels, [B, 6] float32",
    "guidance": "Flux-dev distilled guidance scale, [B] float32",
}


@dataclass
class Conditioning:
    """The conditioning of a batch of ``B`` prompts (see the module docstring for the fields per family).

    Attributes:
        context: token embeddings ``[B, L, D]`` (cross-attention context / T5 sequence), any float dtype.
        pooled: pooled text embedding ``[B, P]`` or ``None`` (SD1/SD2).
        extras: per-row tensors whose first dimension is ``B`` (keys from :data:`KNOWN_EXTRAS`).

    Raises:
        ValueError: a field whose first dimension differs from ``context``'s, or a ``context`` that is not 3-D.
    """

    context: torch.Tensor
    pooled: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.context, torch.Tensor) or self.context.dim() != 3:
            raise ValueError(f"context must be a [B, L, D] tensor, got "
                             f"{tuple(self.context.shape) if isinstance(self.context, torch.Tensor) else self.context!r}")
        b = self.context.shape[0]
        if self.pooled is not None and self.pooled.shape[0] != b:
            raise ValueError(f"pooled has {self.pooled.shape[0]} rows, context has {b}")
        for k, v in self.extras.items():
            if v.shape[0] != b:
                raise ValueError(f"extras[{k!r}] has {v.shape[0]} rows, context has {b}")

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def wrap(cls, cond: "Conditioning | torch.Tensor") -> "Conditioning":
        """``cond`` itself, or a bare context tensor ``[B, L, D]`` wrapped (the SD1/SD2 protocol before SDXL)."""
        return cond if isinstance(cond, Conditioning) else cls(cond)

    @classmethod
    def cat(cls, items: Sequence["Conditioning | torch.Tensor"]) -> "Conditioning":
        """Concatenate along the batch dimension.

        Token sequences of different lengths (prompts longer than 77 tokens come in 77-token chunks) are repeated
        to their least common multiple, as ComfyUI's ``comfy/conds.py`` ``CONDCrossAttn.concat`` batches them.
        ``pooled`` and each extra must be present in all items or in none. Raises ``ValueError`` otherwise or for
        an empty sequence.
        """
        items = [cls.wrap(c) for c in items]
        if not items:
            raise ValueError("nothing to concatenate")
        n = math.lcm(*[c.context.shape[1] for c in items])
        ctx = torch.cat([c.context if c.context.shape[1] == n else c.context.repeat(1, n // c.context.shape[1], 1)
                         for c in items])
        has_pooled = {c.pooled is not None for c in items}
        if len(has_pooled) != 1:
            raise ValueError("cannot concatenate conditionings with and without a pooled embedding")
        pooled = torch.cat([c.pooled for c in items]) if has_pooled == {True} else None
        keys = {frozenset(c.extras) for c in items}
        if len(keys) != 1:
            raise ValueError(f"cannot concatenate conditionings with different extras {sorted(map(sorted, keys))}")
        extras = {k: torch.cat([c.extras[k] for c in items]) for k in items[0].extras}
        return cls(ctx, pooled, extras)

    # -- views ------------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.context.shape[0])

    def __getitem__(self, idx) -> "Conditioning":
        """Rows ``idx`` (int, slice, list or index tensor) as a new Conditioning; an int keeps the batch dim."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1 if idx != -1 else None)
        return Conditioning(self.context[idx], None if self.pooled is None else self.pooled[idx],
                            {k: v[idx] for k, v in self.extras.items()})

    def rows(self) -> list["Conditioning"]:
        """One single-row Conditioning per batch row (for per-prompt caches)."""
        return [self[i] for i in range(len(self))]

    def to(self, device=None, dtype: torch.dtype | None = None) -> "Conditioning":
        """Move every tensor to ``device``; cast ``context`` and ``pooled`` (not the extras, kept fp32) to
        ``dtype`` when given."""
        return Conditioning(self.context.to(device=device, dtype=dtype),
                            None if self.pooled is None else self.pooled.to(device=device, dtype=dtype),
                            {k: v.to(device=device) for k, v in self.extras.items()})

    def detach(self) -> "Conditioning":
        """The same tensors detached from autograd."""
        return Conditioning(self.context.detach(), None if self.pooled is None else self.pooled.detach(),
                            {k: v.detach() for k, v in self.extras.items()})

    def map_tensors(self, fn) -> "Conditioning":
        """Apply ``fn(tensor) -> tensor`` to every tensor (e.g. ComfyUI's inference-tensor clone)."""
        return Conditioning(fn(self.context), None if self.pooled is None else fn(self.pooled),
                            {k: fn(v) for k, v in self.extras.items()})

    def with_extras(self, **extras: torch.Tensor) -> "Conditioning":
        """A copy with ``extras`` set (keys from :data:`KNOWN_EXTRAS`; ``ValueError`` for unknown keys)."""
        unknown = set(extras) - set(KNOWN_EXTRAS)
        if unknown:
            raise ValueError(f"unknown conditioning extras {sorted(unknown)}; known: {sorted(KNOWN_EXTRAS)}")
        new = dict(self.extras)
        new.update({k: torch.as_tensor(v, dtype=torch.float32) for k, v in extras.items()})
        return Conditioning(self.context, self.pooled, new)

    def repeat_rows(self, n: int) -> "Conditioning":
        """Each row repeated ``n`` times in place (``[a, b]`` → ``[a, a, b, b]`` for n = 2)."""
        return Conditioning(self.context.repeat_interleave(n, 0),
                            None if self.pooled is None else self.pooled.repeat_interleave(n, 0),
                            {k: v.repeat_interleave(n, 0) for k, v in self.extras.items()})


def size_ids(original_hw: Iterable[Sequence[int]], crop_top_left: Iterable[Sequence[int]],
             target_hw: Iterable[Sequence[int]]) -> torch.Tensor:
    """SDXL micro-conditioning rows ``[B, 6]`` float32 ``(orig_h, orig_w, crop_top, crop_left, target_h,
    target_w)`` in pixels, from per-image ``(h, w)`` / ``(top, left)`` pairs (kohya ``train_util.py``
    ``original_sizes_hw`` / ``crop_top_lefts`` / ``target_sizes_hw``; diffusers ``_get_add_time_ids``)."""
    rows = [list(map(float, o)) + list(map(float, c)) + list(map(float, t))
            for o, c, t in zip(original_hw, crop_top_left, target_hw)]
    return torch.tensor(rows, dtype=torch.float32).view(-1, 6)


def default_size_ids(batch: int, height: int, width: int) -> torch.Tensor:
    """``[batch, 6]`` size ids for text-to-image at ``height × width`` px: original = target, no crop."""
    return size_ids([(height, width)] * batch, [(0, 0)] * batch, [(height, width)] * batch)
