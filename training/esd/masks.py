"""Grid masks for ESD: an N×N grid of latent cells plus a centre mask, with per-mask weights.

The mask extension of ESD (this project's, not the paper's): instead of one mean-squared error over the whole
latent, the loss of an iteration is a *masked* mean over one or several spatial masks, so the erasure is pushed
harder where the concept tends to live (the centre, small regions) and the optimiser sees local as well as
global evidence. Masks are plain ``[M, h, w]`` float tensors in ``[0, 1]`` (ComfyUI's MASK type, so users can
see, edit or replace them).

Default weights (:func:`default_mask_weights`): ``w_i ∝ (1 + closeness_i)² / sqrt(area_i)`` where ``area_i`` is
the mask's area as a fraction of the latent and ``closeness_i = 1 − d_i / d_max`` (``d_i`` the distance of the
mask's centroid from the latent centre, ``d_max`` the centre-to-corner distance). Small masks and masks near the
centre therefore weigh more; the weights are normalised to sum to 1. For the default 3×3 grid + a centre mask
of half the side on a 64×64 latent: corner cells 0.078, edge cells 0.101, centre cell 0.169, centre mask
0.116.

Nothing here is available in a library (kornia / torchvision have no weighted grid-mask sampler), so it is
written by hand; it is a few lines of indexing.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F


def _edges(n_px: int, n: int) -> list[int]:
    """Integer cell boundaries ``[0, ..., n_px]`` that split ``n_px`` into ``n`` near-equal parts exactly."""
    return [round(i * n_px / n) for i in range(n + 1)]


def grid_masks(height: int, width: int, n: int = 3, centre_size: float = 0.5) -> tuple[torch.Tensor, list[str]]:
    """Build the N×N cell masks plus one centre mask.

    Args:
        height, width: mask size in cells (latent cells for the loss, or pixels for display), ≥ ``n``.
        n: grid cells per side (≥ 1). The ``n*n`` cell masks tile the area exactly: every position belongs to
            exactly one cell (integer boundaries ``round(i*size/n)``).
        centre_size: side of the centre mask as a fraction of each side, in ``(0, 1]``; ``0`` means no centre
            mask. It is the centred rectangle of ``round(centre_size*height) × round(centre_size*width)``
            (at least 1 cell).

    Returns:
        ``(masks, names)``: float32 ``[n*n (+1), height, width]`` with values 0/1, and names ``"r0c0"``, …,
        ``"centre"``.

    Raises:
        ValueError: ``n < 1``, a side smaller than ``n``, or ``centre_size`` outside ``[0, 1]``.
    """
    n = int(n)
    if n < 1:
        raise ValueError(f"grid size n must be ≥ 1, got {n}")
    if height < n or width < n:
        raise ValueError(f"a {height}×{width} area cannot hold a {n}×{n} grid (each side must be ≥ n)")
    if not 0.0 <= float(centre_size) <= 1.0:
        raise ValueError(f"centre_size must be in [0, 1] (fraction of the side), got {centre_size}")
    ys, xs = _edges(height, n), _edges(width, n)
    masks, names = [], []
    for r in range(n):
        for c in range(n):
            m = torch.zeros(height, width)
            m[ys[r]:ys[r + 1], xs[c]:xs[c + 1]] = 1.0
            masks.append(m)
            names.append(f"r{r}c{c}")
    if centre_size > 0:
        ch = max(1, round(centre_size * height))
        cw = max(1, round(centre_size * width))
        y0, x0 = (height - ch) // 2, (width - cw) // 2
        m = torch.zeros(height, width)
        m[y0:y0 + ch, x0:x0 + cw] = 1.0
        masks.append(m)
        names.append("centre")
    return torch.stack(masks), names


def default_mask_weights(masks: torch.Tensor) -> torch.Tensor:
    """Weights that favour small masks and masks near the centre (module docstring), normalised to sum 1.

    Args:
        masks: ``[M, h, w]`` float in ``[0, 1]``.

    Returns:
        float32 ``[M]``, positive, summing to 1. Raises ``ValueError`` for an empty mask.
    """
    m = masks.float()
    M, h, w = m.shape
    area = m.flatten(1).sum(1)
    if (area <= 0).any():
        raise ValueError("a mask is empty (all zeros); every mask needs at least one non-zero cell")
    yy = (torch.arange(h, dtype=torch.float32) + 0.5).view(1, h, 1)
    xx = (torch.arange(w, dtype=torch.float32) + 0.5).view(1, 1, w)
    cy = (m * yy).flatten(1).sum(1) / area
    cx = (m * xx).flatten(1).sum(1) / area
    d = torch.sqrt((cy - h / 2) ** 2 + (cx - w / 2) ** 2)
    closeness = 1.0 - d / math.hypot(h / 2, w / 2)
    wts = (1.0 + closeness) ** 2 / torch.sqrt(area / (h * w))
    return wts / wts.sum()


def normalize_weights(weights: Sequence[float] | torch.Tensor | None, masks: torch.Tensor) -> torch.Tensor:
    """Validate per-mask weights and normalise them to sum 1 (``None`` → :func:`default_mask_weights`).

    Raises ``ValueError`` for a count that differs from the number of masks, negative / non-finite weights, or
    weights summing to 0.
    """
    if weights is None:
        return default_mask_weights(masks)
    w = torch.as_tensor([float(x) for x in weights] if not torch.is_tensor(weights) else weights,
                        dtype=torch.float32).flatten()
    if w.numel() != masks.shape[0]:
        raise ValueError(f"{w.numel()} mask weights given for {masks.shape[0]} masks")
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"mask weights must be finite and ≥ 0, got {w.tolist()}")
    if float(w.sum()) <= 0:
        raise ValueError("mask weights sum to 0")
    return w / w.sum()


def parse_weights(text: str) -> list[float] | None:
    """Parse ``"1, 2, 0.5"`` (commas / spaces / newlines) into floats; empty text → ``None`` (defaults).

    Raises ``ValueError`` naming the bad item.
    """
    items = [t for t in str(text or "").replace(",", " ").split() if t]
    if not items:
        return None
    out = []
    for t in items:
        try:
            out.append(float(t))
        except ValueError:
            raise ValueError(f"mask weight {t!r} is not a number") from None
    return out


def prepare_masks(masks: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Bring user masks to the latent size used by the loss.

    Args:
        masks: ``[M, H, W]`` (or ``[H, W]``) float in ``[0, 1]`` — latent-sized, or pixel-sized (e.g. a ComfyUI
            MASK at image resolution).
        latent_hw: ``(h, w)`` of the latent.

    Returns:
        float32 ``[M, h, w]`` in ``[0, 1]``; masks of another size with the same aspect ratio (±2 %) are
        resized with area averaging (``F.interpolate(mode="area")`` for downscaling, bilinear for upscaling).

    Raises:
        ValueError: no masks, a different aspect ratio, non-finite values, or a mask that becomes all zero.
    """
    if masks is None:
        raise ValueError("no masks given")
    m = masks.detach().float().cpu().clone()
    if m.dim() == 2:
        m = m.unsqueeze(0)
    if m.dim() != 3 or m.shape[0] == 0:
        raise ValueError(f"masks must be a non-empty [M, H, W] batch, got shape {tuple(masks.shape)}")
    if not torch.isfinite(m).all():
        raise ValueError("masks contain NaN or infinite values")
    h, w = int(latent_hw[0]), int(latent_hw[1])
    H, W = m.shape[-2:]
    if (H, W) != (h, w):
        if abs((H / W) / (h / w) - 1.0) > 0.02:
            raise ValueError(f"masks are {H}×{W} but the latent is {h}×{w} (aspect ratio differs): make masks "
                             f"of the training size ({h * 8}×{w * 8} px or {h}×{w} latent cells)")
        mode = "area" if H >= h and W >= w else "bilinear"
        kw = {} if mode == "area" else {"align_corners": False}
        m = F.interpolate(m.unsqueeze(1), size=(h, w), mode=mode, **kw).squeeze(1)
    m = m.clamp(0, 1)
    empty = (m.flatten(1).sum(1) <= 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"mask(s) {empty} are empty (all zeros) at the latent size {h}×{w}")
    return m


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Masked mean squared error ``Σ m·(pred−target)² / (C · Σ m)`` per sample, averaged over the batch.

    Shapes: ``pred``/``target`` ``[B, C, h, w]``; ``mask`` ``[h, w]`` or ``[B, h, w]`` in ``[0, 1]`` (``None``:
    plain MSE, the paper's loss). Returns a scalar fp32 tensor.
    """
    err = (pred.float() - target.float()) ** 2
    if mask is None:
        return err.mean()
    m = mask.to(device=err.device, dtype=err.dtype)
    if m.dim() == 2:
        m = m.unsqueeze(0)
    m = m.unsqueeze(1)  # [B|1, 1, h, w]
    num = (err * m).flatten(1).sum(1)
    den = m.flatten(1).sum(1) * err.shape[1]
    return (num / den.clamp_min(1e-12)).mean()


def mask_preview(masks: torch.Tensor, weights: torch.Tensor | Sequence[float] | None = None,
                 names: Sequence[str] | None = None, cell: int = 128):
    """A picture of the masks side by side with their weights, as a uint8 ``[H, W, 3]`` numpy array.

    Each mask is drawn white-on-dark in a ``cell``-pixel tile labelled ``name: weight``.
    """
    import numpy as np
    from PIL import Image, ImageDraw

    m = masks.detach().float().cpu().clamp(0, 1)
    M = m.shape[0]
    cols = min(M, 5)
    rows = math.ceil(M / cols)
    label_h = 18
    canvas = Image.new("RGB", (cols * (cell + 4) + 4, rows * (cell + label_h + 4) + 4), (30, 30, 30))
    draw = ImageDraw.Draw(canvas)
    wl = None if weights is None else [float(x) for x in weights]
    for i in range(M):
        r, c = divmod(i, cols)
        x0, y0 = 4 + c * (cell + 4), 4 + r * (cell + label_h + 4)
        tile = F.interpolate(m[i][None, None], size=(cell, cell), mode="nearest")[0, 0].numpy()
        rgb = np.stack([40 + tile * 215, 40 + tile * 200, 60 + tile * 120], -1).astype(np.uint8)
        canvas.paste(Image.fromarray(rgb), (x0, y0 + label_h))
        label = names[i] if names is not None and i < len(names) else f"m{i}"
        if wl is not None and i < len(wl):
            label += f": {wl[i]:.3f}"
        draw.text((x0 + 2, y0 + 3), label, fill=(230, 230, 230))
    return np.asarray(canvas)
