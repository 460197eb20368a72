"""Native pixel-grid detection for pixel-art renders: per-line cuts (drifting cells, cropped frames), soft
lattices (interpolating upscales), a status and a calibrated confidence — :func:`detect_grid` (issue 13).

Modules: :mod:`.grid_model` (the :class:`Grid` and snapping), :mod:`.grid_uniform` (the single-period detector,
one hypothesis here and the benchmark's baseline), :mod:`.grid_cuts` (per-line cuts by dynamic programming),
:mod:`.grid_soft` (soft lattices re-rendered with the bilinear / bicubic / Lanczos kernels), :mod:`.grid_borders`
(cuts in blank border stretches, predicted from the visible lattice). Everything public in
those modules is re-exported here.
"""

from __future__ import annotations

import numpy as np

from .grid_model import (LOW_CONFIDENCE, SAMPLES_PER_SIDE, STATUSES, Grid, GridError, _check_rgb, _uniform_cuts,
                         median_of_samples, no_grid, sample_cells, snap, upscale_native)
from .grid_uniform import (HARMONIC_MARGIN, MAX_CELLS, MIN_SCORE, PROFILE_LINES, _confidence, _lines,
                           axis_scores, detect_grid_uniform, edge_profiles, grid_from_cells)

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
    "SAMPLES_PER_SIDE",
]

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
#: Soft-lattice residual (share of pixels) at which its confidence reaches 0 (see ``_axis_confidence``).
SOFT_RESIDUAL_FULL = 0.01
#: Residual gain over the next coarser grid at which the confidence saturates (share of pixels).
SEPARATION_FULL = 0.02
#: Soft-search axes (:func:`_soft_confidence`): the confidence rises linearly from 0 to 1 as the next coarser
#: lattice's re-drawing error grows from SOFT_RATIO_RANGE[0] to [1] times the found one's (0.5 — the
#: low-confidence line — at 3×). Tuned on condition_render seeds 0–199 (random 320–512 px frames, bilinear /
#: bicubic / Lanczos / torch bicubic, 800 renders): flags 2 right grids of 785 and 5 of 15 wrong ones. The error
#: floor (0..255 units; 8-bit rounding alone leaves ~0.25) keeps a near-perfect fit from inflating the ratio.
SOFT_RATIO_RANGE = (2.0, 4.0)
SOFT_ERROR_FLOOR = 0.3
#: Sharp axes: the confidence falls linearly from 1 to 0 as the cut alternation (:func:`.grid_cuts.cut_support`:
#: the edges on every 2nd / 3rd cut only — a grid 2–3× too fine) rises from ALTERNATION_RANGE[0] to [1]
#: (right grids on the tuning seeds 0–99: ≤ 0.64; grids twice too fine: 0.72–0.83).
ALTERNATION_RANGE = (0.6, 0.8)
#: Sharp grids: the confidence is scaled by clip((n − EDGES_RANGE[0]) / (EDGES_RANGE[1] − EDGES_RANGE[0]), 0, 1)
#: for n = the most edge-anchored cuts on one axis — a period read from ≤ 3 edges (two gaps) is any common
#: divisor of them (tiny sprites on a plain canvas: the wrong grids at full confidence on the tuning seeds).
EDGES_RANGE = (1.5, 5.5)


def _profile_lines(rgb: np.ndarray, count: int) -> np.ndarray:
    h = rgb.shape[0]
    step = max(1, h // count)
    return np.ascontiguousarray(rgb[np.arange(step // 2, h, step)].transpose(2, 0, 1), dtype=np.int16)


def _lattice_gap(a: np.ndarray, b: np.ndarray) -> float:
    """Largest distance (px) from a cut of ``a`` to the nearest cut of ``b`` (both increasing)."""
    j = np.clip(np.searchsorted(b, a), 1, max(1, b.size - 1)) if b.size > 1 else np.zeros(a.size, np.int64)
    d = np.abs(b[j] - a)
    if b.size > 1:
        d = np.minimum(d, np.abs(b[j - 1] - a))
    return float(d.max()) if d.size else 0.0


def _axis_confidence(score: float, separation: float, mode: str = "sharp", residual: float = 0.0) -> float:
    """Confidence of one axis, 0..1, times how clearly the next coarser grid explains the image worse
    (``separation``, residual gain, saturating at :data:`SEPARATION_FULL`): for a sharp grid, the edge
    concentration on the cuts (``score``, chance-corrected, see :func:`.grid_cuts.edge_score`, square root); for a
    soft lattice (whose edges are spread over the cell by design, so their concentration says little) how
    exactly it re-renders the image: 1 − ``residual`` / :data:`SOFT_RESIDUAL_FULL` (0.5 at half of it; on the
    tuning seeds a soft lattice re-rendering all but ≤ 0.5 % of the pixels was right 90 % of the time)."""
    sep = np.clip(separation / SEPARATION_FULL, 0.0, 1.0)
    if mode == "soft":
        return float(np.clip(1.0 - residual / SOFT_RESIDUAL_FULL, 0.0, 1.0) * sep)
    return float(np.clip(score, 0.0, 1.0) ** 0.5 * sep)


def _soft_confidence(error: float, coarser_error: float | None) -> float:
    """Confidence of an axis found by :func:`.grid_soft.detect_soft`, 0..1: how much worse the next coarser
    screened lattice re-draws the image than the found one — ``ratio = coarser_error / max(error,
    SOFT_ERROR_FLOOR)`` (mean least-squares re-drawing errors, 0..255 units; 1.0 when no coarser lattice fits
    3 cells), mapped linearly from ``SOFT_RATIO_RANGE[0]`` (0) to ``[1]`` (1) (:data:`SOFT_RATIO_RANGE`). A
    wrong soft grid is mostly a harmonic or a spurious period that a coarser lattice explains almost as well;
    a right one leaves the coarser lattice far behind. The thresholded residual share
    (:func:`.grid_redraw.soft_residual`) is left out: it is ~0 for right and wrong lattices alike, and Lanczos
    renders whose clipped overshoot leaves 0.5–0.9 % of pixels off were right (it only gates acceptance,
    :data:`.grid_soft.MAX_RESIDUAL`)."""
    if coarser_error is None:
        return 1.0
    lo, hi = SOFT_RATIO_RANGE
    return float(np.clip((coarser_error / max(error, SOFT_ERROR_FLOOR) - lo) / (hi - lo), 0.0, 1.0))


def _sharp_confidence(score: float, alternation: float, edges: int) -> float:
    """Confidence of a sharp (nearest-neighbour) axis, 0..1 — calibrated per condition on the fixtures
    (tests/test_grid_conditions.py): the edge concentration on the cuts (``score``, chance-corrected, see
    :func:`.grid_cuts.edge_score`, square root), times a fall-off with the cut ``alternation``
    (:data:`ALTERNATION_RANGE`; a grid 2–3× too fine puts every edge on one cut in 2 or 3), times
    :func:`_edges_factor` of ``edges`` (the most edge-anchored cuts on either axis). The residual gain over
    the next coarser grid (``separation``, which :func:`_axis_confidence` uses) is left out for sharp axes: on
    the fixtures it was small for right grids whenever the art is small (few pixels change) and large for the
    wrong ones, so it flagged right grids."""
    lo, hi = ALTERNATION_RANGE
    alt = float(np.clip((hi - alternation) / (hi - lo), 0.0, 1.0))
    return float(np.clip(score, 0.0, 1.0) ** 0.5 * alt * _edges_factor(edges))


def _edges_factor(n: int) -> float:
    """Confidence scale for a sharp grid whose best axis has ``n`` edge-anchored cuts (:data:`EDGES_RANGE`)."""
    lo, hi = EDGES_RANGE
    return float(np.clip((n - lo) / (hi - lo), 0.0, 1.0))


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
        if a.mode == "soft":
            cuts, _, r, _ = gc.fit_soft(lines, p1, p2, b.cell, gc.threshold(a.noise), refine_period=False)
        else:
            cuts = gc.cuts_for_period(p1, p2, a.length, b.cell, a.mode)
            r = gc.residual(lines, cuts, a.mode, gc.threshold(a.noise)) if cuts.size else 1.0
        if cuts.size < 2 or float(np.median(np.diff(cuts))) < gc.MIN_CELL_PX:
            continue
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
    # sampled lines and edge profiles per axis, computed once: the uniform and cut-sequence hypotheses use them
    views = (rgb, np.swapaxes(rgb, 0, 1))
    lines_xy = [_lines(img) for img in views]
    # an interpolating upscale (soft edges, issue 13): grid_soft's lattices win on the axes they explain. Edges
    # wide enough for one (looks_soft): searched first, and the sharp detectors are skipped when both axes are
    # explained; otherwise tried unless both axes show a clearly sharp grid (the soft search rejects sharp,
    # noisy, JPEG and blurred renders itself)
    from .grid_soft import SOFT_TRY, detect_soft, looks_soft

    soft = detect_soft(rgb, lines=tuple(lines_xy), x_first=True) if looks_soft(lines_xy[0]) else None
    if soft is not None and None not in soft and abs(soft[0].cell / soft[1].cell - 1.0) <= 0.1 and \
            min(f.cell for f in soft) >= gc.MIN_CELL_PX:  # what the steps below would keep as they are
        return _grid_from_fits(w, h, *soft, [(0, 0.0), (0, 0.0)])
    if soft is not None and soft[0] is None:  # (x_first: y not searched) the full search as before, if asked
        soft = None
    prof_xy = [gc.axis_profiles(_profile_lines(img, PROFILE_LINES // 2)) for img in views]
    u = detect_grid_uniform(rgb, None, margin, max_cells, profiles=tuple(p1[1:-1] for p1, _ in prof_xy),
                            lines=tuple(lines_xy))
    uc = [c if u.method == "uniform" and cell > 1 else 0.0 for c, cell in ((u.confidence_x, u.cell_w),
                                                                         (u.confidence_y, u.cell_h))]
    if soft is None:
        soft = detect_soft(rgb, lines=tuple(lines_xy)) if min(uc) < SOFT_TRY else [None, None]
    fits = []
    for axis, img in enumerate(views):
        L = img.shape[1]
        lines = lines_xy[axis]
        p1, p2 = prof_xy[axis]
        ucell = (u.cell_w if axis == 0 else u.cell_h) if u.method == "uniform" else 0.0
        # edges concentrated on a sharp grid (uniform confidence ≥ SOFT_POOL): no soft lattices
        uconf = (u.confidence_x if axis == 0 else u.confidence_y) if ucell > 1 else 0.0
        sfit = soft[axis]
        if sfit is None:
            modes = ("sharp",) if uconf >= SOFT_POOL else gc.MODES
            fit = gc.detect_axis(lines, p1, p2, (ucell,) if ucell >= gc.MIN_CELL_PX else (), ucell, modes,
                                 pool=uconf < SOFT_POOL)
        else:
            fit = sfit
        if ucell > 1 and sfit is None:
            ucuts = np.asarray(u.cuts_x if axis == 0 else u.cuts_y, np.float64)
            uphase = u.phase_x if axis == 0 else u.phase_y
            thr = gc.threshold(fit.noise)
            ru = gc.residual(lines, ucuts, fit.mode, thr)
            same = fit.cuts.size > 0 and abs(ucell / fit.cell - 1.0) < 0.1  # a harmonic was already ruled out
            # ... and one period reaches every visible cut (no edge-anchored cut of the line-by-line fit off it):
            # otherwise the cells drift, and the tie goes to the cut sequence
            same = same and gc.off_grid(p1, fit.cuts, ucuts, fit.cell) == 0
            if same and ru <= UNIFORM_TIE[0] * fit.residual + UNIFORM_TIE[1]:
                # one period fits: the lattice through the visible edges (the uniform detector's period is
                # length / whole cells, a few % off on a cropped frame, and that adds up across blank borders)
                lat = gc.lattice_through(p1, fit.cuts, fit.cell, L, ucell)
                if lat is not None and lat.size and ucuts.size and _lattice_gap(ucuts, lat) > 1.0:
                    rl = gc.residual(lines, lat, fit.mode, thr)
                    if rl <= ru:
                        ucuts, ucell, ru = lat, float(np.median(np.diff(lat))) if lat.size > 1 else ucell, rl
                        uphase = _phase_of(tuple(lat), ucell)
            if (fit.cuts.size == 0 or (same and ru <= UNIFORM_TIE[0] * fit.residual + UNIFORM_TIE[1])
                    or ru < fit.residual - UNIFORM_TIE[2]):
                conf_u = _confidence(p1[1:L], L, ucell, uphase)
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
            a.edges = False  # its cuts are borrowed: no edges of its own to count
    gc.pool_borders([fx, fy], [p1 for p1, _ in prof_xy])  # blank borders: the mean cell of both axes
    support = [gc.cut_support(prof_xy[i][0], f.cuts, f.cell) if f.mode == "sharp" and getattr(f, "edges", True)
               else (0, 0.0) for i, f in enumerate((fx, fy))]
    for i, f in enumerate((fx, fy)):  # blurred edges spread beyond ±2 px: also count energy within ±2..3 px
        if f.mode == "sharp" and getattr(f, "edges", True) and f.cuts.size:
            f.score = max(f.score, gc.edge_score(prof_xy[i][0], f.cuts, f.length, max(2.0, min(3.0, f.cell / 4))))
    return _grid_from_fits(w, h, fx, fy, support)


def _grid_from_fits(w: int, h: int, fx, fy, support) -> Grid:
    """The :class:`Grid` of two axis fits (``support``: ``(edge-anchored cuts, alternation)`` per axis of
    :func:`.grid_cuts.cut_support`, ``(0, 0.0)`` for soft axes): confidence, status, diagnostics."""
    edges = max(n for n, _ in support)
    cx, cy = (_sharp_confidence(f.score, a, edges) if f.mode == "sharp" else
              _soft_confidence(f.error, f.coarser_error) if getattr(f, "error", None) is not None else
              _axis_confidence(f.score, f.separation, f.mode, f.residual) for f, (_, a) in zip((fx, fy), support))
    conf = min(cx, cy)
    status = "detected" if conf >= LOW_CONFIDENCE else "low_confidence"
    method = "uniform" if getattr(fx, "uniform", False) and getattr(fy, "uniform", False) else "detected"
    mode = fx.mode if fx.mode == fy.mode else f"{fx.mode}/{fy.mode}"
    g = Grid(w, h, fx.cuts.size + 1, fy.cuts.size + 1, float(fx.cell), float(fy.cell),
             _phase_of(tuple(fx.cuts), fx.cell), _phase_of(tuple(fy.cuts), fy.cell), conf, cx, cy, method,
             {"residual_x": fx.residual, "residual_y": fy.residual, "separation_x": fx.separation,
              "separation_y": fy.separation, "score_x": fx.score, "score_y": fy.score,
              "candidates_x": fx.candidates, "candidates_y": fy.candidates, "edges_x": support[0][0],
              "edges_y": support[1][0], "alternation_x": round(support[0][1], 4),
              "alternation_y": round(support[1][1], 4), "error_x": getattr(fx, "error", None),
              "error_y": getattr(fy, "error", None), "coarser_error_x": getattr(fx, "coarser_error", None),
              "coarser_error_y": getattr(fy, "coarser_error", None), "nn_error_x": getattr(fx, "nn_error", None),
              "nn_error_y": getattr(fy, "nn_error", None)},
             tuple(float(c) for c in fx.cuts), tuple(float(c) for c in fy.cuts), status,
             "" if status == "detected" else f"confidence {conf:.2f} < {LOW_CONFIDENCE}", mode)
    return g

