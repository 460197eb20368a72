"""The single-period grid detector (the project's detector before issue 13): one cell size and phase per axis.

Kept as one hypothesis of :func:`.grid.detect_grid` and as the benchmark's baseline.

A pixel-art render is a small native image (e.g. 24×24 cells) upscaled, often by a fractional factor (24 cells
in 512 px = 21.33 px per cell), maybe shifted by a sub-cell phase, blurred, noised and JPEG-compressed.
:func:`detect_grid` recovers the cell grid; :func:`snap` takes one robust colour per cell.

Algorithm (per axis; projection of gradient energy + period scoring, as used for barcode / halftone period
estimation, plus a reconstruction check — written here because no maintained library offers pixel-grid
detection):

1. **Profile**: ``p[d] = Σ_rows Σ_channels |I[·, d+1] − I[·, d]|`` (edge energy on the boundary between pixel
   ``d`` and ``d+1``, coordinate ``d+1``), computed once per axis on at most :data:`PROFILE_LINES` evenly
   spaced rows, in chunks, so memory and time stay bounded for 8000×8000 images. JPEG block boundaries
   (coordinates ≡ 0 mod 8 / 16) are de-biased (:func:`_deblock`), then a low percentile (noise floor) is
   subtracted.
2. **Edge-concentration score** for every integer cell count ``n`` at once (cell ``w = L / n`` ≥ 6 px, so
   fractional sizes are exact): boundary coordinates folded modulo ``w`` into ≤ 1 px phase bins; ``f`` = the
   largest energy share in 3 adjacent bins (best phase), score = (f − 3/B) / (1 − 3/B), chance-corrected.
   One ``bincount`` over (candidate, bin) pairs + ``reduceat``: no per-candidate Python loop
   (:func:`axis_scores`).
3. **Harmonic rule**: the true grid and its refinements (48, 72 for 24) score alike, and a coarse harmonic
   (12 or 8) can score about as high when a sprite centred on a plain canvas puts most edges on every 2nd or
   3rd line. So only a shortlist — the :data:`SHORTLIST` best local maxima of the score curve scoring ≥
   :data:`SHORTLIST_FRAC` × best — goes to the costly reconstruction check (:func:`_residual`: share of
   pixels on ≤ 24 sampled lines differing from their cell's centre pixel by more than a noise-adapted
   threshold, 24..40 units). Coarse or misaligned grids leave true edges inside cells (high residual); the
   truth and its refinements tie near the minimum. We take the **smallest cell count whose residual is
   within ``margin`` (:data:`HARMONIC_MARGIN` = 0.5, relative, with a 0.01 floor) of the best** — among
   the candidates that explain the render equally well, the coarsest, which is the native grid. (This is the
   "within a documented margin of the best" rule, applied to a residual so that it is the *finest* harmonic
   that loses, not the true one.) If the best score is below :data:`MIN_SCORE` (pure noise scores ≈ 0.1)
   the axis is taken as native (1 px cells).
4. **Phase**: circular mean of boundary coordinates (weighted by energy) modulo ``w`` near the strongest
   phase, reported in (−w/2, w/2]: grid lines are at ``phase + k·w``.
5. **Square-cell consistency**: an axis without periodic edges borrows the other axis' cell size; if the two
   axes disagree, the larger cell size that *both* axes accept (residual within the margin) wins.

Measured on 240 synthetic renders (:func:`.palette_synth.degraded_suite`, seed 1: DawnLike sprites,
16/20/24/32 cells in 384–512 px, random phase, blur σ 0.5–1.5, noise σ 2–6, JPEG q 75–95): 234 grids
exact (97.5 %; count and phase within 15 % of a cell); ≈ 4 ms CPU per 512 px image. Run
``python benchmarks/palette.py --suite 240`` to reproduce.

Confidence per axis = (f − f0) / (1 − f0), where f is the share of profile energy within ±1.5 px of the
chosen grid lines and f0 = 3 px / w the share expected by chance; the grid confidence is the smaller of the
two axes (0 = no evidence, 1 = every edge on a grid line).
"""

from __future__ import annotations

import math

import numpy as np

from .grid_cuts import _chanmax_abs
from .grid_cuts import _deblock as _deblock_at
from .grid_model import Grid, GridError, _check_rgb

__all__ = ["detect_grid_uniform", "grid_from_cells", "edge_profiles", "axis_scores", "HARMONIC_MARGIN", "MIN_SCORE",
           "PROFILE_LINES", "MAX_CELLS"]

#: Harmonic rule: the smallest shortlisted cell count whose residual is ≤ best + HARMONIC_MARGIN × max(best,
#: 0.01) wins (see module docstring, step 3).
HARMONIC_MARGIN = 0.5
#: Shortlist for the residual check: local score maxima ≥ SHORTLIST_FRAC × best, the SHORTLIST best of them.
SHORTLIST_FRAC = 0.5
SHORTLIST = 4
RESIDUAL_LINES = 24
RESIDUAL_THRESHOLD = 40
#: Below this edge-concentration score an axis shows no grid: native 1-px cells.
MIN_SCORE = 0.15
#: Rows (columns) used for the x (y) profile at most; evenly spaced.
PROFILE_LINES = 256
#: Largest cell count searched per axis.
MAX_CELLS = 2048
#: Smallest cell count searched per axis.
MIN_CELLS = 4
#: Smallest cell size searched (px): the comb needs room between its teeth.
MIN_CELL_PX = 6.0
_CHUNK = 1 << 21  # elements per bincount chunk


def _profile_x(rgb: np.ndarray, lines: int) -> np.ndarray:
    """Edge energy between columns d and d+1 (length W-1), float64, from ≤ ``lines`` evenly spaced rows."""
    h, w, _ = rgb.shape
    if w < 2:
        return np.zeros(0)
    step = max(1, h // lines)
    rows = np.arange(step // 2, h, step)
    out = np.zeros((w - 1) * 3, dtype=np.int64)
    per_chunk = max(1, (1 << 22) // (w * 3))
    for i in range(0, len(rows), per_chunk):
        a = rgb[rows[i : i + per_chunk]].reshape(-1, w * 3)
        d = np.subtract(a[:, 3:], a[:, :-3], dtype=np.int16)
        np.abs(d, out=d)
        out += d.sum(axis=0, dtype=np.int64)
    return out.reshape(w - 1, 3).sum(axis=1).astype(np.float64)


def _profile_y(rgb: np.ndarray, lines: int) -> np.ndarray:
    """Edge energy between rows d and d+1 (length H-1), float64, from ≤ ``lines`` evenly spaced columns.
    Works row-pair by row-pair chunk on a strided column subset (no transposed copy of the image)."""
    h, w, _ = rgb.shape
    if h < 2:
        return np.zeros(0)
    step = max(1, w // lines)
    sub = rgb[:, step // 2 :: step]  # [H, w', 3] view
    out = np.empty(h - 1, dtype=np.int64)
    per_chunk = max(2, (1 << 22) // max(1, sub.shape[1] * 3))
    for i in range(0, h - 1, per_chunk - 1):
        a = sub[i : i + per_chunk].reshape(-1, sub.shape[1] * 3)
        d = np.subtract(a[1:], a[:-1], dtype=np.int16)
        np.abs(d, out=d)
        out[i : i + a.shape[0] - 1] = d.sum(axis=1, dtype=np.int64)
    return out.astype(np.float64)


def edge_profiles(rgb: np.ndarray, lines: int = PROFILE_LINES) -> tuple[np.ndarray, np.ndarray]:
    """Gradient-energy projections ``(px, py)`` of an RGB uint8 image ``[H, W, 3]``.

    ``px[d]`` (length W−1) = Σ over ≤ ``lines`` evenly spaced rows and the 3 channels of |I[y,d+1] − I[y,d]|
    (0..255 units); ``py`` likewise for rows using ≤ ``lines`` columns. Memory: O(lines·max(H, W)) per chunk,
    never a float copy of the whole image.
    """
    _check_rgb(rgb)
    return _profile_x(rgb, lines), _profile_y(rgb, lines)


def _deblock(p: np.ndarray) -> np.ndarray:
    """Remove JPEG block-boundary energy from a profile when it is there.

    JPEG codes 8×8 blocks independently (16×16 for 4:2:0 chroma), leaving small steps on boundaries at
    coordinates ≡ 0 (mod 8) even in flat areas — a uniform period-8 comb that would win the period search.
    For block = 8, then 16: if the median energy on those boundaries exceeds the median elsewhere by 15 % to
    4× (measured JPEG blocking at q 75–95 under noise: 1.4–2.7×), that median excess (the uniform blocking
    step) is subtracted from every boundary value (floored at 0). Real edges on those coordinates are large
    and keep most of their energy; a true sharp 8-px grid (ratio ≫ 4, or nothing off the lines) is left
    alone."""
    return _deblock_at(p, 1)  # entry i of a first-difference profile sits at coordinate i + 1


def _prepare(p: np.ndarray) -> np.ndarray:
    if p.size == 0:
        return p
    p = _deblock(p)
    base = np.percentile(p, 25)
    return np.maximum(p - base, 0.0)


def axis_scores(profile: np.ndarray, length: int, max_cells: int = MAX_CELLS,
                min_cells: int = MIN_CELLS) -> tuple[np.ndarray, np.ndarray]:
    """Chance-corrected edge concentration of every cell count ``n`` (``min_cells ≤ n ≤ max_cells``, cell
    ``w = length / n ≥`` :data:`MIN_CELL_PX` px).

    ``profile``: boundary energies (length ``length − 1``, noise floor removed, see :func:`edge_profiles`).
    Boundary coordinates are folded modulo ``w`` into ``B = ceil(w)`` phase bins (≤ 1 px each); ``f`` = the
    largest share of the total energy in 3 circularly adjacent bins (the best phase), ``f0 = 3 / B`` the
    share expected by chance; score = (f − f0) / (1 − f0) in [−1, 1]. The true grid and its refinements
    (48 for 24) score high, coarse harmonics (12, 8) lose the edges between their lines, other periods
    drift off the lines. All candidates in one vectorised pass: one ``bincount`` over (candidate, bin) pairs
    (chunked to ≤ 2M entries), circular 3-bin windows by index arithmetic, per-candidate maxima by
    ``np.maximum.reduceat``. Returns ``(ns, scores)`` int64 / float64.
    """
    n_hi = min(int(length / MIN_CELL_PX), max_cells)
    ns = np.arange(min_cells, n_hi + 1, dtype=np.int64)
    tot = float(profile.sum()) if profile.size else 0.0
    if ns.size == 0 or tot <= 0:
        return ns, np.zeros(ns.size)
    pos = np.arange(1, length, dtype=np.float64)  # boundary coordinates
    ws = length / ns
    nb = np.ceil(ws).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(nb)])
    e = np.zeros(int(offsets[-1]))
    per = max(1, _CHUNK // pos.size)
    for s in range(0, ns.size, per):
        sl = slice(s, s + per)
        w = ws[sl, None]
        b = nb[sl, None]
        idx = np.minimum((np.mod(pos[None, :], w) * (b / w)).astype(np.int64), b - 1) + offsets[:-1][sl, None]
        e += np.bincount(idx.ravel(), weights=np.broadcast_to(profile, idx.shape).ravel(), minlength=e.size)
    seg = np.repeat(np.arange(ns.size), nb)
    start = offsets[:-1][seg]
    loc = np.arange(e.size) - start
    win = e + e[start + (loc - 1) % nb[seg]] + e[start + (loc + 1) % nb[seg]]
    f = np.maximum.reduceat(win, offsets[:-1]) / tot
    f0 = np.minimum(3.0 / nb, 0.999)
    return ns, (f - f0) / (1.0 - f0)


def _phase(profile: np.ndarray, length: int, w: float) -> float:
    """Energy-weighted circular mean of boundary coordinates modulo ``w``, in (−w/2, w/2]."""
    if profile.size == 0 or profile.sum() <= 0:
        return 0.0
    pos = np.arange(1, length, dtype=np.float64)
    ang = 2.0 * np.pi * pos / w
    z = np.exp(1j * ang)
    # coarse phase from all energy, then refine with energy near it (drops off-grid energy)
    c0 = np.angle(np.sum(profile * z))
    near = np.cos(ang - c0) > math.cos(math.pi / 2)  # within ±w/4
    c1 = np.angle(np.sum(profile[near] * z[near])) if near.any() else c0
    ph = c1 / (2.0 * np.pi) * w
    ph = (ph + w / 2.0) % w - w / 2.0
    if ph <= -w / 2.0:
        ph += w
    return float(ph)


def _confidence(profile: np.ndarray, length: int, w: float, phase: float) -> float:
    if profile.size == 0 or profile.sum() <= 0 or w <= 1.0:
        return 0.0
    pos = np.arange(1, length, dtype=np.float64)
    d = np.abs((pos - phase + w / 2.0) % w - w / 2.0)
    win = min(1.5, w / 4.0)
    f = profile[d <= win].sum() / profile.sum()
    f0 = min(1.0, (2 * win) / w)
    if f0 >= 1.0:
        return 0.0
    return float(np.clip((f - f0) / (1.0 - f0), 0.0, 1.0))


def _lines(rgb: np.ndarray, count: int = RESIDUAL_LINES) -> np.ndarray:
    """≤ ``count`` evenly spaced rows of ``rgb`` as int16, channel-first ``[3, r, W]`` (contiguous, so the
    per-channel work below runs on long contiguous rows)."""
    h = rgb.shape[0]
    step = max(1, h // count)
    return np.ascontiguousarray(rgb[np.arange(step // 2, h, step)].transpose(2, 0, 1), dtype=np.int16)


def _residual(lines: np.ndarray, w: float, phase: float, thr: int = RESIDUAL_THRESHOLD) -> float:
    """Share of pixels of ``lines`` ``[3, r, L]`` int16 whose colour differs by more than ``thr`` (any channel,
    0..255 units) from the centre pixel of their cell on the same line, for cells of ``w`` px at ``phase``.
    ≈ noise level for the true grid and its refinements (ties, resolved toward fewer cells); higher for coarse
    or misaligned grids, whose cells contain true edges. Cost O(r·L·3), one gather."""
    L = lines.shape[2]
    cell = np.floor((np.arange(L) + 0.5 - phase) / w)
    centre = np.clip(np.floor(phase + (cell + 0.5) * w), 0, L - 1).astype(np.intp)
    return float((_chanmax_abs(lines - lines[:, :, centre]) > thr).mean())


def _noise_threshold(lines: np.ndarray) -> int:
    """"Differs" threshold adapted to the noise: 4 × the median adjacent-pixel difference (mostly inside
    cells) + 8, clipped to 24..:data:`RESIDUAL_THRESHOLD`."""
    noise = float(np.median(_chanmax_abs(np.diff(lines, axis=2)))) if lines.shape[2] > 1 else 0.0
    return int(np.clip(4.0 * noise + 8.0, 24, RESIDUAL_THRESHOLD))


def _candidates(ns: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Shortlist for the residual check: local maxima of the score curve scoring ≥ :data:`SHORTLIST_FRAC` ×
    best, the :data:`SHORTLIST` highest."""
    b = scores.max()
    left = np.r_[-np.inf, scores[:-1]]
    right = np.r_[scores[1:], -np.inf]
    c = np.nonzero((scores >= SHORTLIST_FRAC * b) & (scores >= left) & (scores >= right))[0]
    c = c[np.argsort(-scores[c], kind="stable")][:SHORTLIST]
    return ns[c]


class _Axis:
    """Per-axis state of the harmonic rule: residuals are computed lazily and cached per cell count."""

    def __init__(self, profile, length, lines, ns, scores, margin):
        self.p, self.L, self.lines, self.ns, self.scores, self.margin = profile, length, lines, ns, scores, margin
        self.thr = _noise_threshold(lines)
        self.res: dict[int, float] = {}

    def residual(self, n: int) -> float:
        if n not in self.res:
            w = self.L / n
            self.res[n] = _residual(self.lines, w, _phase(self.p, self.L, w), self.thr)
        return self.res[n]

    def limit(self) -> float:
        best = min(self.res.values())
        return best + self.margin * max(best, 0.01)

    def pick(self) -> int | None:
        if self.scores.size == 0 or self.scores.max() < MIN_SCORE:
            return None
        for n in _candidates(self.ns, self.scores):
            self.residual(int(n))
        lim = self.limit()
        return min(n for n, r in self.res.items() if r <= lim)

    def accepts(self, n: int) -> bool:
        """True if ``n`` cells explain this axis within the margin of the best checked candidate."""
        if not (1 <= n <= self.L) or not self.res:
            return False
        return self.residual(n) <= self.limit()


def grid_from_cells(width: int, height: int, cells_x: int, cells_y: int | None = None, rgb=None) -> Grid:
    """A user-specified grid (override): ``cells_x`` (and ``cells_y``, default: square cells → ``round(height /
    (width / cells_x))``) cells spanning the image. If ``rgb`` is given the phase is still estimated from it.

    Raises :class:`GridError` if a count is < 1 or larger than the image size on that axis.
    """
    if cells_x is None or int(cells_x) < 1:
        raise GridError(f"cells must be ≥ 1, got {cells_x}")
    cells_x = int(cells_x)
    if cells_y is None:
        cells_y = max(1, int(round(height / (width / cells_x))))
    cells_y = int(cells_y)
    if cells_x > width or cells_y > height or cells_y < 1:
        raise GridError(
            f"a grid of {cells_x}×{cells_y} cells does not fit a {width}×{height} image (cells must be ≥ 1 px)"
        )
    cw, ch = width / cells_x, height / cells_y
    px = py = 0.0
    cx = cy = 1.0
    if rgb is not None and (cw > 1 or ch > 1):
        prx, pry = edge_profiles(rgb)
        prx, pry = _prepare(prx), _prepare(pry)
        if cw > 1:
            px = _phase(prx, width, cw)
            cx = _confidence(prx, width, cw, px)
        if ch > 1:
            py = _phase(pry, height, ch)
            cy = _confidence(pry, height, ch, py)
    return Grid(width, height, cells_x, cells_y, cw, ch, px, py, min(cx, cy), cx, cy, "override", status="override")


def detect_grid_uniform(rgb: np.ndarray, cells: int | tuple[int, int] | None = None,
                        margin: float = HARMONIC_MARGIN, max_cells: int = MAX_CELLS, profiles=None,
                        lines=None) -> Grid:
    """The single-period detector (the project's detector before issue 13; kept as one hypothesis of
    :func:`detect_grid` and as the benchmark's baseline): one integer cell count per axis spanning the frame,
    one phase (see the module docstring, steps 1–5).

    ``cells``: user override — an int (cells along x, square cells) or ``(cells_x, cells_y)``; the phase is
    still estimated. ``margin``: harmonic margin (0..1]. ``profiles`` / ``lines``: optional precomputed
    ``(px, py)`` boundary profiles with JPEG blocking and noise floor removed (float64, lengths W−1 / H−1, as
    :func:`edge_profiles` + deblocking + 25th-percentile floor; :func:`.grid.detect_grid` passes the ones it
    derives from its own sampled lines, so they are computed once) and ``(lines_x, lines_y)`` residual lines
    (int16 ``[3, r, W]`` / ``[3, r, H]``, see ``_lines``). Returns a :class:`Grid`; an image without a detectable
    grid gets native 1-px cells (``method="native"``, confidence 0) — :func:`detect_grid` turns that into
    ``status="none"``. Raises ValueError for a non-RGB-uint8 array, :class:`GridError` for an impossible override.
    """
    _check_rgb(rgb)
    h, w, _ = rgb.shape
    if cells is not None:
        if isinstance(cells, (tuple, list)):
            return grid_from_cells(w, h, cells[0], cells[1], rgb)
        return grid_from_cells(w, h, cells, None, rgb)
    if not (0 < margin <= 1):
        raise ValueError(f"margin must be in (0, 1], got {margin}")
    if profiles is None:
        prx, pry = edge_profiles(rgb)
        prx, pry = _prepare(prx), _prepare(pry)
    else:
        prx, pry = profiles
    lx, ly = lines if lines is not None else (_lines(rgb), _lines(np.swapaxes(rgb, 0, 1)))
    nsx, scx = axis_scores(prx, w, max_cells)
    nsy, scy = axis_scores(pry, h, max_cells)
    ax = _Axis(prx, w, lx, nsx, scx, margin)
    ay = _Axis(pry, h, ly, nsy, scy, margin)
    nx, ny = ax.pick(), ay.pick()

    def score_at(ns, sc, n):
        i = np.searchsorted(ns, n)
        return float(sc[i]) if 0 <= i < ns.size and ns[i] == n else 0.0

    if nx is None and ny is None:
        return Grid(w, h, w, h, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, "native",
                    {"best_x": float(scx.max(initial=0)), "best_y": float(scy.max(initial=0))})
    if nx is None:  # no periodicity across x (e.g. only horizontal stripes): borrow square cells
        nx = min(w, max(1, int(round(w / (h / ny)))))
    elif ny is None:
        ny = min(h, max(1, int(round(h / (w / nx)))))
    else:
        cwx, cwy = w / nx, h / ny
        if abs(cwx - cwy) > 0.03 * max(cwx, cwy):
            # square-cell consistency: an axis whose checked candidates tie (little evidence, e.g. a sprite
            # with few vertical edges) adopts the other axis' cell size if that explains it within the margin.
            # Prefer the larger common cell (the coarsest grid both axes accept).
            opts = []
            for n2x, n2y in ((nx, int(round(h / cwx))), (int(round(w / cwy)), ny)):
                if ax.accepts(n2x) and ay.accepts(n2y) and abs(w / n2x - h / n2y) <= 0.03 * max(w / n2x, h / n2y):
                    opts.append((w / n2x, n2x, n2y))
            if opts:
                _, nx, ny = max(opts)
    cw, ch = w / nx, h / ny
    phx = _phase(prx, w, cw) if cw > 1 else 0.0
    phy = _phase(pry, h, ch) if ch > 1 else 0.0
    cx = _confidence(prx, w, cw, phx) if cw > 1 else 0.0
    cy = _confidence(pry, h, ch, phy) if ch > 1 else 0.0
    if prx.sum() <= 0:
        cx = cy
    if pry.sum() <= 0:
        cy = cx
    scores = {"best_x": float(scx.max(initial=0)), "best_y": float(scy.max(initial=0)),
              "chosen_x": score_at(nsx, scx, nx), "chosen_y": score_at(nsy, scy, ny)}
    return Grid(w, h, nx, ny, cw, ch, phx, phy, min(cx, cy), cx, cy, "uniform", scores)

