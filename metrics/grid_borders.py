"""Blank border stretches and lattice extrapolation for per-line cut detection (issue 13).

Where every line of a render is constant along an axis — the plain background between the art and the frame
edge — no pixel shows where the cells are: the cuts there are *predicted* from the visible lattice. This
module holds that prediction and the lattice fits that feed it; :mod:`.grid_cuts` (the beat-tracking DP) and
:mod:`.grid` (both axes together) call it.

- :func:`anchored`: which cuts sit on an edge of the boundary-energy profile (the visible lattice).
- :func:`recount_runs`: the cell count of a long flat run between two visible cuts, re-read from the cell
  measured where visible cuts are close.
- :func:`border_cuts`: the visible lattice extended into the blank borders, at the mean cell or along a
  significant trend of the widths (:func:`width_trend`).
- :func:`pool_borders`: the mean cell of both axes (square cells) for the blank borders of both.
- :func:`lattice_through`: the single period and phase through the visible edges (a cropped frame).

Why hand-written: the pieces are textbook (least squares, a t-test on a regression slope) on a handful of
points; what is particular is which points, and that is the project's own model of a render (see the
docstrings). When cells drift, what a detector can know stops at the last visible cut: under widths drawn
independently the border cuts are a random walk around its prediction, so any detector scores below 100 % on
them (``conceptlab.metrics.palette_synth.reference_cuts`` measures that ceiling).
"""

from __future__ import annotations

import math

import numpy as np

from .grid_crossings import line_fit

__all__ = ["ANCHOR", "BORDER_PX", "anchored", "recount_runs", "border_cuts", "width_trend", "pool_borders",
           "lattice_through"]

#: Normalised edge energy at which a DP cut counts as evidenced (others are interpolated).
ANCHOR = 0.12
#: Sharp cuts extrapolated into a blank border are kept down to this distance from the ends (px): a cut at
#: c ∈ (0.5, 1) still puts pixel 0 (centre 0.5) in a cell of its own; at c ≤ 0.5 no pixel centre precedes it.
BORDER_PX = 0.5
#: Border stretches are extrapolated at the mean cell of both axes when their visible means agree within this
#: share (square cells; the mean of m drifting widths scatters by ≈ 9 %/√m), else at each axis' own.
SQUARE_POOL = 0.1
#: A linear trend of the visible widths is carried into blank borders when its t-statistic exceeds TREND_T
#: and it changes the width by ≥ TREND_MIN of the mean across the visible span (see :func:`width_trend`); the
#: extrapolated widths are clipped to the mean·(1 ± TREND_CLIP).
TREND_T = 3.0
TREND_MIN = 0.04
TREND_CLIP = 0.2
#: The lattice through the visible edges replaces a given one when their periods differ by more than this many
#: standard errors of the fitted period (:func:`lattice_through`).
LATTICE_SE = 3.0
#: A long flat run is recounted when its span lies within this many cells of a whole number of measured cells.
RECOUNT_FIT = 0.3


def _norm(e: np.ndarray, length: int, w: float) -> np.ndarray:
    """Energy normalised so the mean of the strongest ⌈cells/2⌉ positions is 1."""
    k = max(1, int(round(length / w / 2)))
    top = np.partition(e, e.size - k)[e.size - k :] if e.size > k else e
    s = float(top.mean()) if top.size else 0.0
    return e / s if s > 0 else e


def anchored(p: np.ndarray, cuts: np.ndarray, cell: float) -> tuple[np.ndarray, np.ndarray]:
    """``(on, v)``: which ``cuts`` (px) sit on an edge of the boundary-energy profile ``p`` (length L + 1, see
    :func:`.grid_cuts.axis_profiles`) — normalised energy (:func:`_norm` at period ``cell``) ≥ :data:`ANCHOR` within 1 px —
    and that energy per cut (float64)."""
    c = np.asarray(cuts, np.float64)
    L = p.size - 1
    if c.size == 0 or L < 2:
        return np.zeros(c.size, bool), np.zeros(c.size)
    e = _norm(p, L, cell)
    i = np.clip(np.rint(c).astype(np.int64), 0, L)
    v = np.maximum(np.maximum(e[i], e[np.maximum(i - 1, 0)]), e[np.minimum(i + 1, L)])
    return v >= ANCHOR, v


def recount_runs(ka: np.ndarray, pa: np.ndarray) -> np.ndarray:
    """Cut indices ``ka`` (float, increasing) of the edge-anchored positions ``pa`` (px) with the cell count of
    every long flat run (≥ 3 cells between consecutive anchors) re-read from the cell measured where anchors
    are close (runs of 1–2 cells: their count is unambiguous): the DP spans a long run at its candidate period,
    which can be a few % off the drawn cells, and over ten cells that is one cell too many or too few. A run
    is recounted only when its span is within :data:`RECOUNT_FIT` cells of a whole number of measured cells and
    the DP's count is farther than 0.5 from it; needs ≥ 3 short runs."""
    dk = np.diff(ka)
    short = dk <= 2
    n_short = int(np.count_nonzero(short))
    if n_short < 3 or n_short == dk.size:
        return ka
    gaps = np.diff(pa)
    wm = float(np.median(gaps[short] / dk[short]))
    if wm <= 0:
        return ka
    x = gaps / wm
    m = np.maximum(np.rint(x), 1.0)
    fix = ~short & (np.abs(x - m) <= RECOUNT_FIT) & (np.abs(x - dk) > 0.5) & (m >= 2)
    if not fix.any():
        return ka
    dk = np.where(fix, m, dk)
    return ka[0] + np.concatenate([[0.0], np.cumsum(dk)])


def border_cuts(core: np.ndarray, length: int, slope: float, trend: float = 0.0, centre: float = 0.0) -> np.ndarray:
    """``core`` (px, increasing: the cuts from the first to the last one that sits on an edge, indices 0..m)
    extended into the blank border stretches on both sides, keeping every cut farther than :data:`BORDER_PX`
    from the ends (a cut closer than half a pixel has no pixel centre beyond it). The cell whose mid index
    (in core indices: the cell between cuts j−1 and j has mid j − ½) is q gets the width
    ``slope + trend·(q − centre)`` px, clipped to ``slope``·(1 ± :data:`TREND_CLIP`) — ``trend = 0``: every
    border cell at the mean cell ``slope``.

    In a blank border stretch every line of the image is constant along the axis, so no pixel shows where
    its cuts are: they are predicted from the visible lattice. When widths vary independently around a mean,
    the best predictor of the next cut is the last visible one plus the mean cell (estimated by the visible
    widths' mean: span / cell count); when the cell size drifts smoothly across the frame (a significant
    linear trend of the visible widths, :func:`width_trend`), the trend carries on into the border."""
    if core.size == 0 or slope <= 0:
        return core
    if not trend:
        lead = core[0] - slope * np.arange(1, int((core[0] - BORDER_PX) / slope) + 2)
        tail = core[-1] + slope * np.arange(1, int((length - BORDER_PX - core[-1]) / slope) + 2)
    else:
        lo, hi = (1 - TREND_CLIP) * slope, (1 + TREND_CLIP) * slope
        q = -0.5 - np.arange(int((core[0] - BORDER_PX) / lo) + 1)
        lead = core[0] - np.cumsum(np.clip(slope + trend * (q - centre), lo, hi))
        q = core.size - 0.5 + np.arange(int((length - BORDER_PX - core[-1]) / lo) + 1)
        tail = core[-1] + np.cumsum(np.clip(slope + trend * (q - centre), lo, hi))
    lead, tail = lead[lead > BORDER_PX][::-1], tail[tail < length - BORDER_PX]
    return np.concatenate([lead, core, tail])


def width_trend(pos: np.ndarray, k: np.ndarray) -> tuple[float, float, float]:
    """Linear trend of the cell widths between edge-anchored cuts at positions ``pos`` (px) with cut indices
    ``k`` (increasing ints): the mean width of each run of cells between consecutive anchors, ``gap / Δk``,
    regressed on the run's mid index with weights Δk (weighted least squares). Returns ``(mean width, slope
    px per cell, centre index)``; the slope is 0 unless its t-statistic exceeds :data:`TREND_T` (under widths
    drawn independently around one mean a chance trend that large is rare), it changes the width by ≥
    :data:`TREND_MIN` of the mean across the anchored span, and ≥ 4 runs are measured."""
    pos = np.asarray(pos, np.float64)
    k = np.asarray(k, np.float64)
    dk = np.diff(k)
    mean = float(pos[-1] - pos[0]) / float(k[-1] - k[0])
    if dk.size < 4:
        return mean, 0.0, 0.0
    wid = np.diff(pos) / dk
    mid = 0.5 * (k[1:] + k[:-1])
    a, b = line_fit(mid, wid, dk)
    res = wid - (a + b * mid)
    mx = float((dk * mid).sum() / dk.sum())
    sxx = float((dk * (mid - mx) ** 2).sum())
    s2 = float((dk * res * res).sum()) / (dk.size - 2)
    if (sxx <= 0 or s2 <= 0 or abs(b) * math.sqrt(sxx / s2) < TREND_T
            or abs(b) * float(k[-1] - k[0]) < TREND_MIN * mean):
        return mean, 0.0, mx
    return float(a + b * mx), float(b), mx


def pool_borders(fits: list, profiles: list) -> None:
    """Re-extrapolate the blank border stretches of sharp cut sequences from the visible lattice of **both**
    axes (see :func:`border_cuts`).

    ``fits``: the two :class:`.grid_cuts.AxisFit` (x, y); ``profiles``: their boundary-energy profiles ``p1`` (see
    :func:`.grid_cuts.axis_profiles`). An axis takes part when its cuts are its own (sharp, not the uniform hypothesis, not
    borrowed) with ≥ 2 edge-anchored cuts (:func:`anchored`); its visible span is first → last anchored cut.
    Where no pixel shows the cuts (the stretches beyond the outermost anchors) each border cell gets the mean
    cell — pixel-art cells are square, so the pooled visible widths of both axes (Σ span / Σ cells), unless the
    two axes' means differ by more than :data:`SQUARE_POOL` (non-square cells) — or, where the axis' visible
    widths show a significant linear trend (:func:`width_trend`: the cell size drifting across the frame), its
    own trend carried on. Updates the fits' ``cuts`` in place; the visible cuts are unchanged."""
    use = []
    for f, p in zip(fits, profiles):
        if f.mode != "sharp" or getattr(f, "uniform", False) or not getattr(f, "edges", True) or f.cuts.size < 2:
            continue
        i = np.nonzero(anchored(p, f.cuts, f.cell)[0])[0]
        if i.size >= 2:
            use.append((f, i))
    if not use:
        return
    spans = [(float(f.cuts[i[-1]] - f.cuts[i[0]]), int(i[-1] - i[0])) for f, i in use]
    pooled = sum(s for s, _ in spans) / sum(n for _, n in spans)
    square = len(use) == 2 and abs(spans[0][0] / spans[0][1] / (spans[1][0] / spans[1][1]) - 1.0) <= SQUARE_POOL
    for (f, i), (span, n) in zip(use, spans):
        mean, trend, centre = width_trend(f.cuts[i], i - i[0])
        slope = mean if trend or not square else pooled
        if 0.7 * f.cell <= slope <= 1.3 * f.cell:
            f.cuts = border_cuts(f.cuts[i[0] : i[-1] + 1], f.length, slope, trend, centre)


def lattice_through(p: np.ndarray, cuts: np.ndarray, cell: float, length: int,
                    period: float | None = None) -> np.ndarray | None:
    """A uniform lattice ``a + k·s`` (px, interior, farther than :data:`BORDER_PX` from the ends) fitted by least
    squares through the edge-anchored ``cuts`` (:func:`anchored` on the boundary-energy profile ``p``) of a
    line-by-line fit, with ``k`` their cut indices — the single period and phase the visible edges say, not
    one that a whole number of cells must span (a cropped frame). ``None`` when fewer than 4 cuts are anchored,
    the fitted period is more than 10 % off ``cell``, or — given the ``period`` of another lattice — the fitted
    one is within :data:`LATTICE_SE` standard errors of it (the visible edges do not tell the two apart:
    blurred edges seen over a few cells; a period found from the whole frame is then the better one)."""
    c = np.asarray(cuts, np.float64)
    i = np.nonzero(anchored(p, c, cell)[0])[0]
    if i.size < 4:
        return None
    k = i.astype(np.float64)
    a, s = line_fit(k, c[i])
    if not (0.9 * cell <= s <= 1.1 * cell):
        return None
    if period is not None:
        res = c[i] - (a + s * k)
        sxx = float(((k - k.mean()) ** 2).sum())
        se = math.sqrt(max(float((res * res).sum()) / (i.size - 2), 0.25 / 12) / sxx)  # ≥ rounding to ½ px
        if abs(s - period) <= LATTICE_SE * se:
            return None
    kk = np.arange(int(np.floor((BORDER_PX - a) / s)), int(np.ceil((length - BORDER_PX - a) / s)) + 1)
    out = a + kk * s
    return out[(out > BORDER_PX) & (out < length - BORDER_PX)]
