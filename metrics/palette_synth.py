"""Synthetic pixel-art renders with known truth, for tests and the benchmark.

:func:`make_render` places a native sprite on a canvas with a known background, upscales it with
nearest-neighbour at any (fractional) scale and sub-cell phase, then optionally blurs (Gaussian, scipy),
adds Gaussian noise and JPEG-compresses (Pillow) — the degradations a diffusion render / screenshot shows.
Real sprites come from DawnLike (CC-BY 4.0, DragonDePlatino & DawnBringer; credit kept wherever derived).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Render", "make_render", "load_sprite", "degraded_suite", "DB16_DAWNLIKE"]

#: The DawnBringer 16 palette as stored in the DawnLike sprite files (CC-BY 4.0, DawnBringer).
DB16_DAWNLIKE = (
    "#140c1c", "#452434", "#30346d", "#4d494d", "#864d30", "#346524", "#d34549", "#757161",
    "#597dcf", "#d37d2c", "#8696a2", "#6daa2c", "#d3aa9a", "#6dc3cb", "#dbd75d", "#dfefd7",
)


@dataclass
class Render:
    """A synthetic render and its truth: ``image`` uint8 ``[H, W, 3]``; ``native`` ``[cells_y, cells_x, 3]``;
    ``cell_w/cell_h`` px; ``phase_x/phase_y`` px (grid lines at ``phase + k·cell``); ``background`` (r, g, b);
    ``colors``: hex codes present in the native canvas."""

    image: np.ndarray
    native: np.ndarray
    cell_w: float
    cell_h: float
    phase_x: float
    phase_y: float
    background: tuple
    colors: list = field(default_factory=list)
    params: dict = field(default_factory=dict)


def load_sprite(path) -> np.ndarray:
    """A sprite file → RGBA uint8 ``[h, w, 4]`` (palette / transparency resolved by Pillow).

    Raises ``FileNotFoundError`` for a missing file and ``PIL.UnidentifiedImageError`` for a non-image.
    """
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGBA")).copy()


def make_render(sprite_rgba: np.ndarray, background=(60, 120, 200), canvas=(24, 24), size=(512, 512),
                phase=(0.0, 0.0), blur: float = 0.0, noise: float = 0.0, jpeg: int | None = None,
                seed: int = 0) -> Render:
    """Build a render with known truth.

    ``sprite_rgba`` ``[h, w, 4]`` uint8 is centred on a ``canvas=(cells_y, cells_x)`` of colour ``background``
    (alpha < 128 shows the background); the canvas is upscaled nearest-neighbour to ``size=(H, W)`` px with
    grid lines at ``phase + k·cell`` (pixel centre rule), then Gaussian blur ``blur`` (σ px,
    ``scipy.ndimage.gaussian_filter``), Gaussian noise ``noise`` (σ in 0..255 units, seeded) and JPEG quality
    ``jpeg`` (Pillow, 4:2:0). Raises ValueError if the sprite does not fit the canvas.
    """
    cy, cx = canvas
    sh, sw = sprite_rgba.shape[:2]
    if sh > cy or sw > cx:
        raise ValueError(f"sprite {sw}×{sh} does not fit a {cx}×{cy} canvas")
    nat = np.empty((cy, cx, 3), dtype=np.uint8)
    nat[:] = np.asarray(background, dtype=np.uint8)
    oy, ox = (cy - sh) // 2, (cx - sw) // 2
    opaque = sprite_rgba[..., 3] >= 128
    region = nat[oy : oy + sh, ox : ox + sw]
    region[opaque] = sprite_rgba[..., :3][opaque]
    H, W = size
    cw, ch = W / cx, H / cy
    xs = np.clip(np.floor((np.arange(W) + 0.5 - phase[0]) / cw), 0, cx - 1).astype(np.int64)
    ys = np.clip(np.floor((np.arange(H) + 0.5 - phase[1]) / ch), 0, cy - 1).astype(np.int64)
    img = nat[ys[:, None], xs[None, :]]
    if blur > 0 or noise > 0:
        f = img.astype(np.float32)
        if blur > 0:
            from scipy.ndimage import gaussian_filter

            f = gaussian_filter(f, sigma=(blur, blur, 0), mode="nearest")
        if noise > 0:
            f += np.random.default_rng(seed).normal(0.0, noise, f.shape).astype(np.float32)
        img = np.clip(np.round(f), 0, 255).astype(np.uint8)
    if jpeg:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=int(jpeg))
        buf.seek(0)
        with Image.open(buf) as im:
            img = np.asarray(im.convert("RGB")).copy()
    colors = sorted({"#%02x%02x%02x" % tuple(int(v) for v in c) for c in nat.reshape(-1, 3)})
    return Render(img, nat, cw, ch, float(phase[0]), float(phase[1]), tuple(int(v) for v in background), colors,
                  {"blur": blur, "noise": noise, "jpeg": jpeg, "seed": seed})


def degraded_suite(files, n: int = 200, seed: int = 0, cells=(16, 20, 24, 32), sizes=(384, 512)):
    """``n`` degraded renders with known truth, for the hand-run accuracy check and the tests.

    Each: a random sprite from ``files`` (paths; skipped when larger than the canvas) centred on a square canvas of
    ``cells`` (cycled: 16, 20, 24, 32 cells) with a random background, upscaled to a random square size in
    ``sizes`` (px, inclusive range) at a random sub-cell phase, then blur σ 0.5–1.5, noise σ 2–6, JPEG q 75–95
    (:func:`make_render`). Deterministic for a given ``seed``. Returns a list of :class:`Render` (``params`` also
    holds ``cells``).
    """
    import random

    rng = random.Random(seed)
    files = sorted(files)
    out = []
    i = 0
    while len(out) < n:
        c = cells[i % len(cells)]
        i += 1
        sp = load_sprite(rng.choice(files))
        if sp.shape[0] > c or sp.shape[1] > c:
            continue
        size = rng.randint(sizes[0], sizes[1])
        w = size / c
        r = make_render(sp, tuple(rng.randrange(256) for _ in range(3)), (c, c), (size, size),
                        (rng.uniform(0, w), rng.uniform(0, w)), blur=rng.uniform(0.5, 1.5),
                        noise=rng.uniform(2, 6), jpeg=rng.randint(75, 95), seed=seed * 100003 + i)
        r.params["cells"] = c
        out.append(r)
    return out
