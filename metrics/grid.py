"""Native pixel-grid detection and snapping for upscaled pixel art.

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
from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = [
    "Grid",
    "GridError",
    "detect_grid",
    "detect_grid_uniform",
    "grid_from_cells",
    "no_grid",
    "STATUSES",
    "LOW_CONFIDENCE",
    "edge_profiles",
    "axis_scores",
    "snap",
    "upscale_native",
    "sample_cells",
    "median_of_samples",
    "HARMONIC_MARGIN",
    "MIN_SCORE",
    "PROFILE_LINES",
]

#: Harmonic rule: the smallest shortlisted cell count whose residual is ≤ best + HARMONIC_MARGIN × max(best,
#: 0.01) wins (see module docstring, step 3).
HARMONIC_MARGIN = 0.5
#: Shortlist for the residual check: local score maxima ≥ SHORTLIST_FRAC × best, the SHORTLIST best of them.
SHORTLIST_FRAC = 0.5
SHORTLIST = 4
RESIDUAL_LINES = 24
RESIDUAL_THRESHOLD = 40
#: Most samples per cell side used by :func:`snap` / :func:`sample_cells` (m×m samples per cell).
SAMPLES_PER_SIDE = 5
#: Below this edge-concentration score an axis shows no grid: native 1-px cells.
MIN_SCORE = 0.15
#: The uniform hypothesis wins when its residual is ≤ a·r + b (same cell size as the cut sequence's, whose
#: residual is r; it is more regular where the art is flat), or < r − c whatever its cell size (shares of pixels).
UNIFORM_TIE = (1.5, 0.01, 0.002)
#: An axis shows no grid when the edge concentration on its cuts is below MIN_AXIS_SCORE (noise: ≈ 0..0.05,
#: true grids on the fixtures: ≥ 0.06, 98 % ≥ 0.11) or its reconstruction misses more than MAX_AXIS_RESIDUAL of
#: the pixels (pure noise: 0.8–0.95).
MIN_AXIS_SCORE = 0.08
MAX_AXIS_RESIDUAL = 0.5
#: Below this uniform-hypothesis confidence no sharp grid concentrates the edges (interpolating upscales:
#: ≤ 0.25 on the fixtures, blurred nearest-neighbour renders ≥ 0.28): both edge models compete at every period;
#: at or above it the axis is taken as sharp (soft lattices are not tried).
SOFT_POOL = 0.2
#: Residual gain over the next coarser grid at which the confidence saturates (share of pixels).
SEPARATION_FULL = 0.02
#: Rows (columns) used for the x (y) profile at most; evenly spaced.
PROFILE_LINES = 256
#: Largest cell count searched per axis.
MAX_CELLS = 2048
#: Smallest cell count searched per axis.
MIN_CELLS = 4
#: Smallest cell size searched (px): the comb needs room between its teeth.
MIN_CELL_PX = 6.0
_CHUNK = 1 << 21  # elements per bincount chunk


class GridError(ValueError):
    """Bad grid request (e.g. a cell count larger than the image)."""


#: Grid status values (``Grid.status``).
STATUSES = ("detected", "low_confidence", "none", "override")
#: Below this confidence a detected grid is reported ``low_confidence`` (calibrated on the issue-13 fixtures:
#: see tests/test_grid_conditions.py::test_confidence_is_calibrated).
LOW_CONFIDENCE = 0.5


@dataclass
class Grid:
    """A cell grid over an ``H×W`` image.

    The grid is given by its **cuts**: ``cuts_x`` / ``cuts_y`` are the interior cell boundaries in px (floats,
    increasing, in (0, W) / (0, H)); cell ``i`` along x covers the pixels whose centre ``x + 0.5`` lies in
    ``[cuts_x[i−1], cuts_x[i])`` (with 0 and W as the outer ends), so ``cells_x = len(cuts_x) + 1`` — cells of
    varying width (drift) and partial cells at cropped borders are described exactly. ``cell_w × cell_h``: the
    mean cell size (median interior gap, px); ``phase_x/phase_y``: the first cut modulo the mean cell, in
    (−cell/2, cell/2] (a uniform grid has lines at ``phase + k·cell``). ``partial``: ``{"left", "right", "top",
    "bottom"}`` → border cell width as a fraction of the mean cell, listed when < 0.85 (a cropped frame).
    ``confidence`` in 0..1 (calibrated, see :data:`LOW_CONFIDENCE`); ``status`` one of :data:`STATUSES`
    (``"none"``: no grid found — then ``cells_x = cells_y = 0``, ``reason`` says why, and cell metrics must not
    be computed); ``method``: ``"detected"``, ``"uniform"`` (a single period fits best), ``"override"`` or
    ``"none"``; ``mode``: ``"sharp"``, ``"soft_edges"`` or ``"soft"`` (the edge model that fits: nearest-
    neighbour, or an interpolating upscale with soft edges).
    """

    width: int
    height: int
    cells_x: int
    cells_y: int
    cell_w: float
    cell_h: float
    phase_x: float = 0.0
    phase_y: float = 0.0
    confidence: float = 1.0
    confidence_x: float = 1.0
    confidence_y: float = 1.0
    method: str = "detected"
    scores: dict = field(default_factory=dict, repr=False)
    cuts_x: tuple = ()
    cuts_y: tuple = ()
    status: str = "detected"
    reason: str = ""
    mode: str = "sharp"
    partial: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.status != "none" and not self.cuts_x and self.cells_x > 1:
            self.cuts_x = _uniform_cuts(self.width, self.cell_w, self.phase_x)
        if self.status != "none" and not self.cuts_y and self.cells_y > 1:
            self.cuts_y = _uniform_cuts(self.height, self.cell_h, self.phase_y)
        if self.status != "none":
            self.cells_x, self.cells_y = len(self.cuts_x) + 1, len(self.cuts_y) + 1
            self.partial = _partial(self)

    @property
    def ok(self) -> bool:
        """True when the grid has cells (status is not ``"none"``)."""
        return self.status != "none"

    def bounds(self, axis: int) -> np.ndarray:
        """Cell boundaries including the frame ends along ``axis`` (0 = x, 1 = y): float64 ``[cells + 1]``."""
        L, cuts = (self.width, self.cuts_x) if axis == 0 else (self.height, self.cuts_y)
        return np.concatenate([[0.0], np.asarray(cuts, np.float64), [float(L)]])

    def cell_of(self, axis: int) -> np.ndarray:
        """Cell index of every pixel along ``axis`` (pixel-centre rule), int64 ``[W]`` or ``[H]``."""
        L, cuts = (self.width, self.cuts_x) if axis == 0 else (self.height, self.cuts_y)
        return np.searchsorted(np.asarray(cuts, np.float64), np.arange(L) + 0.5, side="right")

    def to_dict(self) -> dict:
        """JSON-ready dict: status, reason, cells_x, cells_y, cell_w, cell_h (mean, px), phase [x, y], cuts_x,
        cuts_y (px, 2 decimals), partial, confidence (+ per axis), method, mode."""
        d = asdict(self)
        d.pop("scores")
        d["phase"] = [round(self.phase_x, 3), round(self.phase_y, 3)]
        for k in ("cell_w", "cell_h", "phase_x", "phase_y", "confidence", "confidence_x", "confidence_y"):
            d[k] = round(float(d[k]), 4)
        d["cuts_x"] = [round(float(c), 2) for c in self.cuts_x]
        d["cuts_y"] = [round(float(c), 2) for c in self.cuts_y]
        if not d["reason"]:
            d.pop("reason")
        return d


def _uniform_cuts(length: int, cell: float, phase: float) -> tuple:
    if cell <= 0:
        return ()
    k = np.arange(-2, int(length / cell) + 3)
    c = phase + k * cell
    c = c[(c > 0.5) & (c < length - 0.5)]
    return tuple(float(v) for v in c)


def _partial(g: "Grid") -> dict:
    out = {}
    for axis, (lo, hi), cell in ((0, ("left", "right"), g.cell_w), (1, ("top", "bottom"), g.cell_h)):
        b = g.bounds(axis)
        if b.size < 3 or cell <= 1:
            continue
        for name, width in ((lo, b[1] - b[0]), (hi, b[-1] - b[-2])):
            if width < 0.85 * cell:
                out[name] = round(float(width / cell), 3)
    return out


def no_grid(width: int, height: int, reason: str, scores: dict | None = None) -> Grid:
    """The ``status="none"`` grid: no cells (``cells_x = cells_y = 0``), confidence 0, ``reason`` saying why."""
    return Grid(width, height, 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, "none", scores or {}, (), (), "none",
                reason)


# ----------------------------------------------------------------------------------------------------------------
# profiles and scores
# ----------------------------------------------------------------------------------------------------------------


def _check_rgb(rgb: np.ndarray) -> None:
    if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(
            "expected an RGB uint8 array [H, W, 3]; got "
            + (f"{rgb.dtype} {rgb.shape}" if isinstance(rgb, np.ndarray) else type(rgb).__name__)
        )
    if rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ValueError(f"empty image {rgb.shape}")


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
    if p.size < 32:
        return p
    coord = np.arange(1, p.size + 1)
    q = p
    for block in (8, 16):
        on = (coord % block) == 0
        m_on, m_off = np.median(q[on]), np.median(q[~on])
        if 1.15 * m_off + 1e-9 < m_on < 4.0 * m_off:
            q = q.copy()
            q[on] = np.maximum(q[on] - (m_on - m_off), 0.0)
    return q


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


def _chanmax_abs(d: np.ndarray) -> np.ndarray:
    """max over the channel axis (axis 0, length 3) of |d|, in place on ``d``."""
    np.abs(d, out=d)
    return np.maximum(np.maximum(d[0], d[1]), d[2])


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
                        margin: float = HARMONIC_MARGIN, max_cells: int = MAX_CELLS) -> Grid:
    """The single-period detector (the project's detector before issue 13; kept as one hypothesis of
    :func:`detect_grid` and as the benchmark's baseline): one integer cell count per axis spanning the frame,
    one phase (see the module docstring, steps 1–5).

    ``cells``: user override — an int (cells along x, square cells) or ``(cells_x, cells_y)``; the phase is
    still estimated. ``margin``: harmonic margin (0..1]. Returns a :class:`Grid`; an image without a detectable
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
    prx, pry = edge_profiles(rgb)
    prx, pry = _prepare(prx), _prepare(pry)
    nsx, scx = axis_scores(prx, w, max_cells)
    nsy, scy = axis_scores(pry, h, max_cells)
    ax = _Axis(prx, w, _lines(rgb), nsx, scx, margin)
    ay = _Axis(pry, h, _lines(np.swapaxes(rgb, 0, 1)), nsy, scy, margin)
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


def _profile_lines(rgb: np.ndarray, count: int) -> np.ndarray:
    h = rgb.shape[0]
    step = max(1, h // count)
    return np.ascontiguousarray(rgb[np.arange(step // 2, h, step)].transpose(2, 0, 1), dtype=np.int16)


def _axis_confidence(score: float, separation: float) -> float:
    """Confidence of one axis, 0..1: edge concentration on the cuts (``score``, chance-corrected, see
    :func:`.grid_cuts.edge_score`) times how clearly the next coarser grid explains the image worse
    (``separation``, residual gain, saturating at :data:`SEPARATION_FULL`)."""
    return float(np.clip(score, 0.0, 1.0) ** 0.5 * np.clip(separation / SEPARATION_FULL, 0.0, 1.0))


def _phase_of(cuts: tuple, cell: float) -> float:
    if not cuts or cell <= 0:
        return 0.0
    ph = (cuts[0] + cell / 2.0) % cell - cell / 2.0
    return float(ph + cell if ph <= -cell / 2.0 else ph)


def _square_cells(rgb: np.ndarray, fx, fy) -> None:
    """Square-cell consistency: when the axes disagree, an axis adopts the other's cell size if that explains
    it about as well (residual ≤ 1.2·own + 0.002: e.g. a sprite with few vertical edges, where every period
    ties); the axis with the clearer evidence (higher edge score) is asked first. Updates the fits in place."""
    from . import grid_cuts as gc

    order = sorted(((fx, fy, rgb), (fy, fx, np.swapaxes(rgb, 0, 1))), key=lambda t: t[0].score)
    for a, b, img in order:
        lines = _lines(img)
        p1, p2 = gc.axis_profiles(_profile_lines(img, PROFILE_LINES // 2))
        cuts = gc.cuts_for_period(p1, p2, a.length, b.cell, a.mode)
        if cuts.size == 0:
            continue
        r = gc.residual(lines, cuts, a.mode, gc.threshold(a.noise))
        if r <= 1.2 * a.residual + 0.002:
            a.cuts, a.cell, a.residual = cuts, float(np.median(np.diff(cuts))) if cuts.size > 1 else b.cell, r
            a.score = gc.edge_score(p1, cuts, a.length, max(1.0, min(2.0, a.cell / 6))) if a.mode == "sharp" else a.score
            return


def detect_grid(rgb: np.ndarray, cells: int | tuple[int, int] | None = None, margin: float = HARMONIC_MARGIN,
                max_cells: int = MAX_CELLS) -> Grid:
    """Detect the native cell grid of an RGB uint8 image ``[H, W, 3]``: per-line cuts (cells of varying width,
    partial border cells, soft upscales), mean cell size, status and confidence.

    Two hypotheses per axis, the better reconstruction wins (ties: the uniform one, which is more regular where
    the art is flat): the single-period grid of :func:`detect_grid_uniform`, and the cut sequence of
    :func:`.grid_cuts.detect_axis` (autocorrelation candidates, beat-tracking DP, reconstruction residual; see
    :mod:`.grid_cuts`). An axis without edges borrows the other axis' cell size (square cells).

    ``cells``: user override — an int (cells along x, square cells) or ``(cells_x, cells_y)`` (status
    ``"override"``, uniform cells, phase still estimated). ``margin``: harmonic margin of the uniform hypothesis
    (0..1]. Returns a :class:`Grid`: ``status`` ``"detected"`` / ``"low_confidence"`` (confidence <
    :data:`LOW_CONFIDENCE`) / ``"none"`` (no grid: no cells, ``reason`` set; never a silent 1-px grid).
    Raises ValueError for a non-RGB-uint8 array, :class:`GridError` for an impossible override.
    """
    from . import grid_cuts as gc

    _check_rgb(rgb)
    h, w, _ = rgb.shape
    if cells is not None:
        return detect_grid_uniform(rgb, cells, margin, max_cells)
    if not (0 < margin <= 1):
        raise ValueError(f"margin must be in (0, 1], got {margin}")
    if min(h, w) < 2 * gc.MIN_CELL_PX:
        return no_grid(w, h, f"image {w}x{h} is too small to hold a grid of cells >= {gc.MIN_CELL_PX:g} px")
    u = detect_grid_uniform(rgb, None, margin, max_cells)
    fits = []
    for axis, img in ((0, rgb), (1, np.swapaxes(rgb, 0, 1))):
        L = img.shape[1]
        lines = _lines(img)
        p1, p2 = gc.axis_profiles(_profile_lines(img, PROFILE_LINES // 2))
        ucell = (u.cell_w if axis == 0 else u.cell_h) if u.method == "uniform" else 0.0
        # edges concentrated on a sharp grid (uniform confidence ≥ SOFT_POOL): no soft lattices
        uconf = (u.confidence_x if axis == 0 else u.confidence_y) if ucell > 1 else 0.0
        modes = ("sharp",) if uconf >= SOFT_POOL else gc.MODES
        fit = gc.detect_axis(lines, p1, p2, (ucell,) if ucell >= gc.MIN_CELL_PX else (), ucell, modes,
                             pool=uconf < SOFT_POOL)
        if ucell > 1:
            ucuts = np.asarray(u.cuts_x if axis == 0 else u.cuts_y, np.float64)
            thr = gc.threshold(fit.noise)
            ru = gc.residual(lines, ucuts, fit.mode, thr)
            same = fit.cuts.size > 0 and abs(ucell / fit.cell - 1.0) < 0.1  # a harmonic was already ruled out
            if (fit.cuts.size == 0 or (same and ru <= UNIFORM_TIE[0] * fit.residual + UNIFORM_TIE[1])
                    or ru < fit.residual - UNIFORM_TIE[2]):
                conf_u = _confidence(_prepare(_profile_x(img, PROFILE_LINES)), L, ucell,
                                     u.phase_x if axis == 0 else u.phase_y)
                fit = gc.AxisFit(L, ucuts, ucell, fit.mode if fit.cuts.size else "sharp", ru, conf_u, fit.separation if fit.cuts.size else 1.0,
                                 fit.noise, fit.candidates)
                fit.uniform = True
        if fit.cuts.size and ((fit.mode == "sharp" and fit.score < MIN_AXIS_SCORE) or fit.residual > MAX_AXIS_RESIDUAL
                              or fit.cell < gc.MIN_CELL_PX):
            fit.cuts = np.zeros(0)  # no evidence of a grid on this axis (noise, flat, or no pixel art)
        fits.append(fit)
    fx, fy = fits
    if fx.cuts.size and fy.cuts.size and abs(fx.cell / fy.cell - 1.0) > 0.1:
        _square_cells(rgb, fx, fy)
    if fx.cuts.size == 0 and fy.cuts.size == 0:
        return no_grid(w, h, "no periodic cell edges found (flat image, noise only, or no pixel grid)",
                       {"candidates_x": fx.candidates, "candidates_y": fy.candidates})
    for a, b, L in ((fx, fy, w), (fy, fx, h)):
        if a.cuts.size == 0:  # no edges across this axis: square cells from the other one
            a.cell = b.cell
            a.cuts = np.asarray(_uniform_cuts(L, b.cell, 0.0))
            a.score, a.separation, a.mode = b.score, b.separation, b.mode
    cx, cy = _axis_confidence(fx.score, fx.separation), _axis_confidence(fy.score, fy.separation)
    conf = min(cx, cy)
    status = "detected" if conf >= LOW_CONFIDENCE else "low_confidence"
    method = "uniform" if getattr(fx, "uniform", False) and getattr(fy, "uniform", False) else "detected"
    mode = fx.mode if fx.mode == fy.mode else f"{fx.mode}/{fy.mode}"
    g = Grid(w, h, fx.cuts.size + 1, fy.cuts.size + 1, float(fx.cell), float(fy.cell),
             _phase_of(tuple(fx.cuts), fx.cell), _phase_of(tuple(fy.cuts), fy.cell), conf, cx, cy, method,
             {"residual_x": fx.residual, "residual_y": fy.residual, "separation_x": fx.separation,
              "separation_y": fy.separation, "score_x": fx.score, "score_y": fy.score,
              "candidates_x": fx.candidates, "candidates_y": fy.candidates},
             tuple(float(c) for c in fx.cuts), tuple(float(c) for c in fy.cuts), status,
             "" if status == "detected" else f"confidence {conf:.2f} < {LOW_CONFIDENCE}", mode)
    return g


# ----------------------------------------------------------------------------------------------------------------
# snapping
# ----------------------------------------------------------------------------------------------------------------


def _sample_coords(bounds: np.ndarray, length: int, m: int, inner: float) -> np.ndarray:
    """``[n, m]`` int pixel coordinates of ``m`` samples in the inner ``inner`` fraction of each of the ``n``
    cells between consecutive ``bounds`` (px)."""
    t = 0.5 - inner / 2.0 + inner * (np.arange(m) + 0.5) / m
    lo, hi = bounds[:-1, None], bounds[1:, None]
    x = lo + t[None, :] * (hi - lo)
    return np.clip(np.floor(x), 0, length - 1).astype(np.int64)


def _default_m(grid: Grid) -> int:
    if grid.cell_w <= 1.0 and grid.cell_h <= 1.0:
        return 1
    return int(np.clip(round(min(grid.cell_w, grid.cell_h) / 4.0), 1, SAMPLES_PER_SIDE))


def _require_cells(grid: Grid) -> None:
    if not grid.ok:
        raise GridError(f"no pixel grid to snap to: {grid.reason or 'status none'} (give the cell count to override)")


def _gather(rgb: np.ndarray, grid: Grid, m: int | None, inner: float) -> tuple[np.ndarray, int]:
    """``[cells_y, m, cells_x, m, 3]`` uint8 samples (one fancy-indexing gather, no per-cell loop) and ``m``."""
    _check_rgb(rgb)
    _require_cells(grid)
    if m is None:
        m = _default_m(grid)
    m = max(1, int(m))
    ys = _sample_coords(grid.bounds(1), rgb.shape[0], m, inner)
    xs = _sample_coords(grid.bounds(0), rgb.shape[1], m, inner)
    return rgb[ys[:, :, None, None], xs[None, None, :, :]], m


def sample_cells(rgb: np.ndarray, grid: Grid, m: int | None = None, inner: float = 0.5) -> np.ndarray:
    """Pixels sampled inside each cell: ``[cells_y, cells_x, m*m, 3]`` uint8.

    ``m×m`` samples on a regular lattice in the central ``inner`` fraction of each cell (between its cuts, so
    cells of different widths and partial border cells are sampled inside; default the middle 50 %, away from
    blurred / JPEG-rung edges); ``m`` defaults to ``clip(round(min(cell_w, cell_h)/4), 1,``
    :data:`SAMPLES_PER_SIDE` ``)`` (≈ one sample per 2 px of the inner part; 25 samples for 21 px cells).
    Memory: cells × m² × 3 bytes. Raises :class:`GridError` for a ``status="none"`` grid.
    """
    s, m = _gather(rgb, grid, m, inner)
    return s.transpose(0, 2, 1, 3, 4).reshape(grid.cells_y, grid.cells_x, m * m, 3)


def median_of_samples(samples: np.ndarray) -> np.ndarray:
    """Per-channel median over axis 2 of ``[h, w, k, 3]`` uint8 samples → ``[h, w, 3]`` uint8 (mean of the two
    middle values, rounded half up, for even ``k``). ``np.partition`` on a channel-last-contiguous copy: O(k)
    per cell, no full sort."""
    k = samples.shape[2]
    if k == 1:
        return np.ascontiguousarray(samples[:, :, 0, :])
    t = np.ascontiguousarray(samples.transpose(0, 1, 3, 2))  # [h, w, 3, k]
    if k % 2:
        return np.partition(t, k // 2, axis=-1)[..., k // 2]
    pt = np.partition(t, (k // 2 - 1, k // 2), axis=-1)
    lo = pt[..., k // 2 - 1].astype(np.uint16)
    hi = pt[..., k // 2].astype(np.uint16)
    return ((lo + hi + 1) // 2).astype(np.uint8)


def snap(rgb: np.ndarray, grid: Grid, m: int | None = None, inner: float = 0.5) -> np.ndarray:
    """One robust colour per cell → the native image ``[cells_y, cells_x, 3]`` uint8.

    The cell colour is the per-channel median (:func:`median_of_samples`) of :func:`sample_cells` (the cell's
    inner part). A per-channel median in sRGB equals the per-channel median in linear light (the sRGB transfer
    is monotonic per channel), and ignores up to half the samples being outliers (noise, JPEG ringing, a
    mis-registered edge).
    """
    return median_of_samples(sample_cells(rgb, grid, m, inner))


def upscale_native(native: np.ndarray, grid: Grid | None = None, size: tuple[int, int] | None = None) -> np.ndarray:
    """Clean upscaled render: nearest-neighbour upscale of ``native`` ``[cy, cx, 3]`` back onto the grid.

    With ``grid``, every output pixel takes the colour of the cell holding its centre (same size and cuts
    as the analysed render; :class:`GridError` for a ``status="none"`` grid); otherwise ``size=(H, W)`` with cells spanning the image. Returns ``native``'s dtype
    (uint8 for :func:`snap` output) ``[H, W, 3]``. Raises ``ValueError`` when neither ``grid`` nor ``size`` is
    given.
    """
    cy, cx = native.shape[:2]
    if grid is not None:
        _require_cells(grid)
        xs = np.minimum(grid.cell_of(0), cx - 1)
        ys = np.minimum(grid.cell_of(1), cy - 1)
    else:
        if size is None:
            raise ValueError("upscale_native needs a grid or a size")
        h, w = size
        xs = np.minimum((np.arange(w) * cx) // w, cx - 1)
        ys = np.minimum((np.arange(h) * cy) // h, cy - 1)
    return native[ys[:, None], xs[None, :]]
