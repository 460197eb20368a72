"""The soft-upscale hypothesis of grid detection: a uniform cell grid whose edges were drawn by an interpolating
resize (bilinear, bicubic, Lanczos — Pillow, OpenCV, torch ``interpolate`` and the latent upscalers all use one of
these kernels), so edges are gradients rather than steps (issue 13).

Why hand-written: no library recovers the sampling lattice of an upscaled image; the model is textbook resampling
as Pillow implements it (``libImaging/Resample.c``: ``bilinear_filter`` (triangle), ``bicubic_filter`` — Keys,
"Cubic convolution interpolation for digital image processing", IEEE TASSP 29(6), 1981, eq. 15 with a = −0.5 —
and ``lanczos_filter``, Duchon 1979, a = 3; ``precompute_coeffs``: output pixel ``x`` reads source pixel ``j``
with weight ``K(j + ½ − (x + ½)·in/out)`` normalised to sum 1, the support is widened only when reducing, so an
upscale by any — fractional — factor ``s`` puts native cell ``k``'s centre at ``(k + ½)·s`` px).

**The model.** An interpolating kernel ``K`` (``K(0) = 1``, ``K(k) = 0`` at other integers) keeps the native
colour at each cell centre, and every pixel between centres is ``Σ_m K(t − m)·v[j+m] / Σ_m K(t − m)`` of the
neighbouring centre values. A hypothesis (cell ``s`` px, first cut ``a`` px) is checked by sampling the image at
its centres ``a + (k + ½)·s`` (linear between pixels) and re-drawing every pixel with the kernel
(:mod:`.grid_redraw`: :func:`render`, :func:`redraw`): the true lattice re-draws the image to rounding error;
a coarser one cannot (it misses native cells); a finer one also re-draws it (it over-samples a band-limited
signal) and loses on the coarsest-explaining rule. The re-drawing error is smooth and single-minimum in phase
over a whole cell and in period over ±2–3 % (measured on the fixtures), so each search only needs a start within
that basin.

**The search** (:func:`detect_soft`), all on 1-D lines sampled from the image:

1. *Edge crossings* (:func:`edge_crossings`): every monotone run of a line (one channel) between two turning
   points crosses the midpoint of its two end values once; for a symmetric kernel and an isolated step that
   crossing is exactly on the cell boundary (the step response is odd about the cut; Lanczos/bicubic overshoot
   is symmetric, so the run's ends include it symmetrically). Sub-pixel by linear interpolation. Runs about a
   cell wide are the soft signature: where they are ~1 px (sharp, noisy, JPEG'd renders) the search stops.
2. *Period candidates* (:func:`crossing_spectrum`): the weighted crossings' periodogram
   ``|Σ w·exp(2πi·x/p)| / Σ w`` (a histogram at 1/8 px and one FFT), both axes pooled (square cells), its
   strongest local maxima in [:data:`MIN_CELL_PX`, L/3], plus ×2, ×3 of the coarsest explaining one and ×1.5,
   ×2 of the best (harmonics); each gets phase and period from a least-squares fit of the crossings
   (:func:`crossing_lattice`) and a screening error (sampled re-drawing, four kernels).
3. *Precise fit* (:func:`local_phase`): at a candidate period the re-drawing error is computed at
   :data:`PHASES` phases across a cell; in each window of ~3 cells the best phase is read (parabolic peak); the
   phases drift linearly along the axis when the period is off, so a weighted line fit through the unwrapped
   window phases gives period and phase at once (a parabolic polish, :func:`_polish`, is available but off:
   :data:`POLISH_ROUNDS`).
4. *Choice*: the coarsest candidate whose least-squares re-drawing error (:func:`redraw`) is within a margin of
   the best (finer lattices tie); candidates less than :data:`SAME_GRID` apart are one grid read two ways and
   compete on the error. Accepted as soft only when the re-drawing beats the nearest-neighbour reconstruction
   of the same lattice clearly (a sharp render is re-drawn badly by ramps) and leaves few pixels off
   (:func:`soft_residual`). The y axis first tries the x cell (square cells), then the full search.

**Cost** (issue 13: ≤ 20 ms CPU per 512 px image): :func:`.grid.detect_grid` runs this search first when the
edges look soft (:func:`looks_soft`, ~0.1 ms) and skips the sharp detectors when it explains both axes; the
re-drawings share their gathers across kernels (:func:`.grid_redraw._tap_sums`), the crossing lattices of all
candidates are one pass (:func:`.grid_crossings.crossing_lattices`).
"""

from __future__ import annotations

import math

import numpy as np

from .grid_crossings import (_BINS_PER_PX, _peaks, crossing_lattice, crossing_lattices, crossing_spectrum,
                             edge_crossings, line_fit)
from .grid_redraw import (ERROR_CLIP, KERNELS, _clip_mask, _error, _error_fast, _errors_fast_lattices,
                          _errors_fast_many, _nn_error, _nn_share, _phase_errors, kernel_weights, redraw, render,
                          soft_residual, uniform_cuts)

__all__ = ["KERNELS", "kernel_weights", "render", "soft_residual", "fit_soft", "uniform_cuts", "edge_crossings",
           "crossing_spectrum", "crossing_lattice", "local_phase", "detect_soft", "looks_soft", "MIN_CELL_PX",
           "SOFT_TRY"]

#: Smallest cell searched (px) — the same floor as :data:`.grid_cuts.MIN_CELL_PX`.
MIN_CELL_PX = 5.0
#: Fewest cells per axis.
MIN_CELLS = 3
#: Lines (per axis) the searches re-draw: the ones with the most edge energy among those sampled.
SEARCH_LINES = 8
#: :func:`.grid.detect_grid` tries soft lattices unless the single-period grid's confidence is ≥ this on both
#: axes (soft fixtures: ≤ 0.3; the detector rejects sharp, noisy, JPEG and blurred renders itself, whatever
#: their confidence — on the fixtures it accepted none of 200 blurred / JPEG renders).
SOFT_TRY = 0.5
#: Lines (the strongest of the search lines) that screen the period candidates.
SCREEN_LINES = 6
#: Soft renders only: the amplitude-weighted median width of the monotone edge runs must reach this share of
#: the finest period candidate (an interpolated step spans a cell or more: ≥ 1.4 on the fixtures; sharp, noisy
#: or JPEG nearest-neighbour renders ≤ 1.0).
MIN_SOFT_WIDTH = 1.0
#: Rounds of the (sampled re-drawing) phase / period polish after the local-phase fit: none — the least-squares
#: comparison with the crossings' own lattice that follows settles the fit; on the tuning renders (seeds 0–99,
#: four soft conditions) one round changed no grid and cost ~10 % of the soft search.
POLISH_ROUNDS = 0
#: Phases per cell in the local-phase scan.
PHASES = 8
#: Period candidates (periodogram peaks) screened per image.
N_CANDIDATES = 4
#: Coarsest-explaining rule: a coarser lattice wins when its error ≤ best·(1 + HARMONIC_REL) + HARMONIC_ABS.
HARMONIC_REL, HARMONIC_ABS = 2.0, 0.3
#: Smallest edge zone (share of pixels) the separation is divided by.
MIN_ZONE = 0.05
#: Periods closer than this ratio are one grid read two ways (harmonics are ≥ 1.5× apart): the better fit wins.
SAME_GRID = 1.3
#: A soft lattice is accepted when its error ≤ SHARP_RATIO × the nearest-neighbour error of the same lattice and
#: its thresholded residual (:func:`soft_residual`) ≤ MAX_RESIDUAL.
SHARP_RATIO = 0.5
MAX_RESIDUAL = 0.05
#: Early exit of the soft search (before the precise fits): the least-squares error of the best screened lattice
#: must be ≤ EARLY_RATIO × its nearest-neighbour error. Measured on condition_render (25 renders each, both
#: axes): soft upscales (bilinear / bicubic / Lanczos) ≤ 0.17, blurred+noisy+JPEG sharp renders ≥ 0.45 (all of
#: which the final SHARP_RATIO test rejected anyway); 0.35 keeps a 2× margin on the soft side.
EARLY_RATIO = 0.35
#: :func:`looks_soft`: effective edge width (px) from which :func:`.grid.detect_grid` runs the soft search first
#: (and skips the sharp detectors when it explains both axes). Measured on condition_render, seeds 0–99, 512 px:
#: sharp conditions ≤ 2.33 (blur σ 1.5 + noise + JPEG; clean 1.0), soft upscales ≥ 3.06 (cells ≥ 12.8 px).
#: Below it the old order stands (sharp detectors first, the soft search when their confidence is low).
SOFT_FIRST_WIDTH = 2.8
#: Search lines the local-phase scans read (the strongest; all :data:`SEARCH_LINES` cost a third more, and on
#: the tuning renders (seeds 0–99, four soft conditions) chose the same lattices).
PHASE_LINES = 6
#: :func:`soft_residual` of the accepted lattice reads every RESIDUAL_STEP-th sampled line (12 of 24 per axis:
#: a share of ~18 k pixel values, ample for a share, at half the cost).
RESIDUAL_STEP = 2
NOISE_STEP = 2
CROSS_STEP = 1


# ----------------------------------------------------------------------------------------------------------------
# phase and period by re-drawing
# ----------------------------------------------------------------------------------------------------------------


def local_phase(sub: np.ndarray, w: float, kernel: str = "cubic", phases: int = PHASES,
                window_cells: float = 3.0) -> tuple[float, float, float]:
    """Phase and period of the soft lattice near period ``w`` px: ``(first cut a px in [0, s), period s px,
    mean error at the best global phase)`` for lines ``sub`` ``[r, L]`` float32.

    The re-drawing error at ``phases`` phases is summed per window of ``window_cells`` cells; each window's best
    phase (parabolic peak, weight = depth of its minimum) is unwrapped along the axis; a period off by δ makes
    the phase drift by δ per cell, so the slope of a weighted line fit (one outlier-trimming pass) corrects the
    period: ``s = w / (1 − slope)``. Valid for ``w`` within ~±8 % of the truth (drift ≤ ¼ cell per window)."""
    r, L = sub.shape
    E = _phase_errors(sub, w, kernel, phases)
    tot = E.sum(1)
    g = int(np.argmin(tot))
    err = float(tot[g] / (r * L))
    nwin = max(1, int(L // max(8.0, window_cells * w)))
    bounds = np.linspace(0, L, nwin + 1).astype(np.int64)
    W = np.add.reduceat(E, bounds[:-1], axis=1)  # [phases, nwin]
    j = np.argmin(W, axis=0)
    cols = np.arange(nwin)
    y0, y1, y2 = W[(j - 1) % phases, cols], W[j, cols], W[(j + 1) % phases, cols]
    den = y0 - 2 * y1 + y2
    off = np.where(den > 0, np.clip(0.5 * (y0 - y2) / np.where(den > 0, den, 1.0), -0.5, 0.5), 0.0)
    phi = (j + off) / phases * w
    depth = W.mean(0) - y1
    x = 0.5 * (bounds[:-1] + bounds[1:])
    ok = depth > 1e-6 * max(1.0, float(W.max()))
    if ok.sum() < 2:
        a = (g / phases) * w
        return a % w, w, err
    x, phi, wt = x[ok], phi[ok], depth[ok]
    un = phi.copy()
    for i in range(1, un.size):  # sequential unwrap (adjacent windows drift < w/2)
        un[i] -= w * np.round((un[i] - un[i - 1]) / w)
    b0, slope = line_fit(x, un, wt)
    keep = np.abs(un - (b0 + slope * x)) < max(0.15 * w, 1.5)
    if 2 <= keep.sum() < keep.size:
        b0, slope = line_fit(x[keep], un[keep], wt[keep])
    if not abs(slope) < 0.25:
        a = (g / phases) * w
        return a % w, w, err
    s = w / (1.0 - slope)
    # the fitted phase is where the lattice sits mod w near each x: at the axis centre that is a cut itself
    xm = L / 2.0
    ph = (b0 + slope * xm) % w
    c = xm + ((ph - xm + w / 2.0) % w) - w / 2.0
    return c % s, s, err


def _polish(sub: np.ndarray, a: float, s: float, kernel: str, rounds: int = 2,
            err=None) -> tuple[float, float, float]:
    """Phase and period refined on the re-drawing error ``err`` (default :func:`_error`): per round, the error at
    ± a step in phase (s/12, then s/36) and in period (0.5 %, then 0.17 %; the lattice point nearest the axis
    centre fixed), a parabola through each pair and the centre, a move to its vertex (kept only if the error
    drops). ``(a, s, error)``."""
    L = sub.shape[1]
    mid = L / 2.0

    def at(da, dw):
        s1 = s * (1.0 + dw)
        return mid - (mid - a) * (1.0 + dw) + da, s1

    err = err or _error
    e = err(sub, a, s, kernel)
    for k in range(rounds):
        step, rel = s / (12 * 3**k), 0.005 / 3**k
        moves = []
        probes = [at(-step, 0.0), at(step, 0.0), at(0.0, -rel), at(0.0, rel)]
        if err is _error_fast:  # the four probes in one pass
            pe = _errors_fast_many(sub, probes, kernel)
        else:
            pe = [err(sub, *p, kernel) for p in probes]
        for d, (em, ep) in ((step, pe[:2]), (rel, pe[2:])):
            den = em - 2 * e + ep
            moves.append(float(np.clip(0.5 * (em - ep) / den, -1.5, 1.5)) * d if den > 0 else
                         (-d if em < min(e, ep) else d if ep < e else 0.0))
        a1, s1 = at(*moves)
        e1 = err(sub, a1, s1, kernel)
        if e1 < e:
            a, s, e = a1, s1, e1
    return a % s, s, e


def _search_lines(lines: np.ndarray, count: int = SEARCH_LINES) -> np.ndarray:
    """The ``count`` single-channel lines (of ``[3, r, L]``) with the most edge energy, strongest first: float32
    ``[≤count, L]``.
    Channels stay separate: a channel Pillow clipped at 0 / 255 (a Lanczos overshoot) is left out pixel by pixel
    (see :func:`_error`), which a luminance mix could not do; lines without edges only add cost."""
    y = lines.reshape(-1, lines.shape[-1]).astype(np.float32)
    if y.shape[0] > count:
        energy = np.abs(np.diff(y, axis=1)).sum(1)
        y = y[np.argsort(-energy, kind="stable")[:count]]  # most edge energy first
    return np.ascontiguousarray(y)


def fit_lattice(sub: np.ndarray, w: float, kernel: str = "cubic") -> tuple[float, float, float]:
    """Soft lattice near period ``w`` px on lines ``sub`` ``[r, L]`` float32: two :func:`local_phase` passes and
    a :func:`_polish`: ``(first cut a px, period px, mean re-drawing error with ``kernel``)``."""
    a, s, _ = local_phase(sub, w, kernel)
    if abs(s / w - 1.0) > 0.02:
        a, s, _ = local_phase(sub, s, kernel)
    return _polish(sub, a, s, kernel)


def fit_soft(lines: np.ndarray, p1: np.ndarray, p2: np.ndarray, w: float, thr: float,
             refine_period: bool = True) -> tuple[np.ndarray, float, float, str]:
    """Best uniform soft lattice near period ``w`` px for lines ``[3, r, L]`` int16: ``(cuts, period,
    residual, kernel)`` — with ``refine_period``, :func:`fit_lattice` (phase and period); without, the best of
    :data:`PHASES` phases at period ``w`` (parabolic peak). ``residual``: :func:`soft_residual` on all lines with
    all kernels. (``p1``/``p2``, the edge profiles of :mod:`.grid_cuts`, are accepted for its call signature; the
    re-drawing search does not need them.)"""
    L = lines.shape[2]
    sub = _search_lines(lines)
    if refine_period:
        a, ww, _ = fit_lattice(sub, w)
    else:
        tot = _phase_errors(sub, w, "cubic", PHASES).sum(1)
        j = int(np.argmin(tot))
        y0, y1, y2 = tot[(j - 1) % PHASES], tot[j], tot[(j + 1) % PHASES]
        den = y0 - 2 * y1 + y2
        off = float(np.clip(0.5 * (y0 - y2) / den, -0.5, 0.5)) if den > 0 else 0.0
        a, ww = (j + off) / PHASES * w, float(w)
    r, kern = soft_residual(lines, a, ww, thr)
    return uniform_cuts(L, a % ww, ww), float(ww), float(r), kern


# ----------------------------------------------------------------------------------------------------------------
# the detector
# ----------------------------------------------------------------------------------------------------------------


def _axis_lines(rgb: np.ndarray, count: int) -> np.ndarray:
    h = rgb.shape[0]
    step = max(1, h // count)
    return np.ascontiguousarray(rgb[np.arange(step // 2, h, step)].transpose(2, 0, 1), dtype=np.int16)


def _soft_axis(lines: np.ndarray, noise: float, pos: np.ndarray, amp: np.ndarray, cands: list, L: int):
    """One axis of :func:`detect_soft`: the coarsest soft lattice that re-draws the lines, or ``None``."""
    from .grid_cuts import AxisFit, threshold

    sub = _search_lines(lines)
    if sub.shape[0] == 0 or not np.any(np.diff(sub, axis=1)):
        return None
    ok = lambda s: MIN_CELL_PX <= s <= L / MIN_CELLS  # noqa: E731
    msk = _clip_mask(sub)
    nmsk = max(1, int(msk.sum()))
    drawn: dict = {}  # (first cut, period, kernel) -> least-squares re-drawing of sub: each lattice solved once

    def redrawn(a, s, k):
        key = (float(a), float(s), k)
        if key not in drawn:
            drawn[key] = redraw(sub, a, s, k)
        return drawn[key]

    def ls_error(a, s, k):  # :func:`_error` on sub, from the cached re-drawing
        return float((np.minimum(np.abs(redrawn(a, s, k) - sub), ERROR_CLIP) * msk).sum() / nmsk)

    def sub_residual(a, s, k, thr):  # :func:`soft_residual` of sub[None] with one kernel, cached
        return float((np.abs(sub - redrawn(a, s, k)) > thr).mean())

    hyp: dict = {}  # period -> (error, first cut, kernel); the lattice from the crossings

    pending: list = []

    def add(ws):  # the crossings' lattices near periods ws (one batch), screened later (one pass)
        ws = [w for w in ws if ok(w) and all(abs(w / o - 1.0) >= 0.04 for o in hyp)]
        for w, (a, s) in zip(ws, crossing_lattices(pos, amp, ws)):
            if all(abs(w / o - 1.0) >= 0.04 for o in hyp) and ok(s) and all(abs(s / o - 1.0) >= 0.04 for o in hyp):
                hyp[s] = None
                pending.append((a, s))

    def screen():
        if pending:
            for (a, s), (e, k) in zip(pending, _errors_fast_lattices(sub[:SCREEN_LINES], pending)):
                hyp[s] = (e, a, k)
            pending.clear()

    # with a single candidate (the other axis' cell) its multiples are screened with it (below, they would be
    # the only coarser lattices added)
    add(list(cands) + ([2 * cands[0], 3 * cands[0]] if len(cands) == 1 else []))
    screen()
    if not hyp:
        return None
    best = min(v[0] for v in hyp.values())
    s0 = max(s for s, v in hyp.items() if v[0] <= best * (1 + HARMONIC_REL) + HARMONIC_ABS)
    sb = min(hyp, key=lambda c: hyp[c][0])
    # coarser lattices the periodogram peaks missed (it peaks at harmonics k/s, and at 3/(2s) when every other
    # cell is flat); with a single candidate (the other axis' cell) only its multiples
    add((2 * s0, 3 * s0) + ((1.5 * sb, 2 * sb) if len(cands) > 1 else ()))
    screen()
    # precise fits, coarsest first, of the lattices within a loose margin (crossing lattices are not exact);
    # the first that re-draws within the strict margin of the best wins (finer lattices re-draw a soft image too)
    loose = best * (1 + 2 * HARMONIC_REL) + 2 * HARMONIC_ABS
    sbest = min(hyp, key=lambda c: hyp[c][0])
    e_ls = ls_error(hyp[sbest][1], sbest, hyp[sbest][2])  # the least-squares error the fits compare with
    # cheap early exit before the precise fits: a render the lattice does not explain far better than its own
    # nearest-neighbour reconstruction (blurred / JPEG sharp renders) is never accepted (SHARP_RATIO below)
    if e_ls > EARLY_RATIO * _nn_error(sub, hyp[sbest][1], sbest):
        return None
    strict = e_ls * (1 + HARMONIC_REL) + HARMONIC_ABS
    def precise(s):
        e, a, k = hyp[s]
        a1, s1, _ = local_phase(sub[:PHASE_LINES], s, k)
        if abs(s1 / s - 1.0) > 0.02:
            a1, s1, _ = local_phase(sub[:PHASE_LINES], s1, k)
        if POLISH_ROUNDS:
            a1, s1, _ = _polish(sub, a1, s1, k, rounds=POLISH_ROUNDS, err=_error_fast)
        # the crossings' own lattice is often already exact (isolated steps): the better least-squares fit stays
        e1, a1, s1 = min((ls_error(a1, s1, k), a1, s1), (ls_error(a, s, k), a, s))
        return a1, s1, e1, k

    found = None
    pool = sorted((s for s, v in hyp.items() if v[0] <= loose), reverse=True)
    for i, s in enumerate(pool[:3]):
        fit = precise(s)
        if ok(fit[1]) and fit[2] <= strict:
            # candidates less than SAME_GRID finer are rival readings of the same grid, not harmonics: the
            # best-fitting one wins (a spurious peak a few % off can pass the margin before the truth is tried)
            rivals = [precise(c) for c in pool[i + 1:] if c * SAME_GRID > s]
            found = min([fit] + [r for r in rivals if ok(r[1])], key=lambda r: r[2])
            break
    if found is None:
        return None
    a, s, e, kern = found
    nn = _nn_error(sub, a, s)
    thr = threshold(noise)
    res, _ = soft_residual(lines[:, ::RESIDUAL_STEP], a, s, thr, (kern,))
    if not (e <= SHARP_RATIO * nn and res <= MAX_RESIDUAL):
        return None
    # separation as a share of the edge zone (the pixels the nearest-neighbour reconstruction of the lattice gets
    # wrong by > thr: the ramps), so a small sprite on a wide plain frame is not read as a weak grid
    zone = max(_nn_share(sub[None], a, s, thr), MIN_ZONE)  # on the search lines (the edge-rich ones)
    coarser = [c for c in hyp if c > 1.3 * s]
    e_c = None
    if coarser:
        c = min(coarser)
        sep = min(1.0, (sub_residual(hyp[c][1], c, hyp[c][2], thr) - sub_residual(a, s, kern, thr)) / zone)
        e_c = ls_error(hyp[c][1], c, hyp[c][2])
    else:
        sep = 1.0
    tried = {s2: v[0] for s2, v in hyp.items()}
    fit = AxisFit(L, uniform_cuts(L, a, s), float(s), "soft", float(res), 0.0, float(sep), float(noise),
                  {f"{k2:g}/soft": round(v, 4) for k2, v in tried.items()})
    fit.kernel = kern
    fit.error, fit.coarser_error, fit.nn_error = float(e), e_c, float(nn)
    return fit


def looks_soft(lines: np.ndarray) -> bool:
    """Cheap test (~0.1 ms) that sampled lines ``[3, r, L]`` int16 show the soft signature of an interpolating
    upscale: the effective edge width ``2·Σ|Δ|/Σ|Δ²|`` (px; a step drawn over ``W`` px has first differences
    summing to its height and second differences to ≈ 2·height/W; a sharp step gives 1) of every third line is
    ≥ :data:`SOFT_FIRST_WIDTH`. Noise raises ``Σ|Δ²|`` more than ``Σ|Δ|``, so it only ever says "not soft"."""
    y = lines[:, ::3]
    d1 = np.diff(y, axis=-1)
    e1 = int(np.abs(d1).sum(dtype=np.int64))
    e2 = int(np.abs(np.diff(d1, axis=-1)).sum(dtype=np.int64))
    return e1 > 0 and 2.0 * e1 >= SOFT_FIRST_WIDTH * max(e2, 1)


def detect_soft(rgb: np.ndarray, lines_per_axis: int = 24, candidates: int = N_CANDIDATES,
                lines: tuple | None = None, x_first: bool = False) -> list:
    """Soft lattices of an RGB uint8 image ``[H, W, 3]``, per axis (x then y): a :class:`.grid_cuts.AxisFit`
    with ``mode="soft"`` where an interpolating upscale explains that axis, else ``None`` (the caller falls back
    to the sharp / per-line detectors). See the module docstring for the method.

    ``lines_per_axis`` evenly spaced rows (columns) are read per axis — or ``lines``, the ``(x, y)`` sampled
    lines ``[3, r, L]`` int16 when the caller already has them (as :func:`.grid_uniform._lines` reads them);
    ``candidates`` periodogram peaks are screened. The fit's ``residual`` is :func:`soft_residual` (share of
    pixels of every 2nd line, its kernel, noise-adapted threshold of :func:`.grid_cuts.threshold`), ``error``
    its mean least-squares re-drawing error (0..255 units) and ``coarser_error`` that of the next coarser
    screened lattice (``None`` when none fits 3 cells; both feed the confidence, see
    :func:`.grid._soft_confidence`), ``nn_error`` the nearest-neighbour reconstruction's error, ``separation``
    the residual gain over that coarser lattice per edge-zone pixel, ``score`` the periodogram value at the cell
    (0..1), ``candidates`` the screened ``{"period/soft": error}``. ``x_first``: return ``[None, None]`` as soon
    as the x axis is not soft (the caller wants both axes, else runs its own order). Cost: ~O(candidates · PHASES ·
    SEARCH_LINES · L) per axis. Raises ValueError for a non-RGB-uint8 array."""
    from .grid_cuts import AxisFit, noise_level, threshold  # grid_cuts imports this module

    if not (isinstance(rgb, np.ndarray) and rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.dtype == np.uint8):
        raise ValueError("expected an RGB uint8 array [H, W, 3]")
    H, W = rgb.shape[:2]
    lines_xy = lines
    axes, widths = [], []
    for ax, img in enumerate((rgb, np.swapaxes(rgb, 0, 1))):
        L = img.shape[1]
        lines = _axis_lines(img, lines_per_axis) if lines_xy is None else lines_xy[ax]
        noise = noise_level(lines[:, ::NOISE_STEP])
        y = lines[:, ::CROSS_STEP].reshape(-1, L).astype(np.float32)
        if noise > 1.5:  # a symmetric [1, 2, 1] smoothing keeps crossings in place and monotone runs whole
            y[:, 1:-1] = 0.25 * y[:, :-2] + 0.5 * y[:, 1:-1] + 0.25 * y[:, 2:]
        pos, amp, width = edge_crossings(y, max(12.0, 4.0 * noise), with_width=True)
        axes.append((L, lines, noise, pos, amp))
        widths.append((width, amp))
    size = 1 << int(math.ceil(math.log2(4 * _BINS_PER_PX * max(H, W))))
    specs = [crossing_spectrum(pos, amp, L, size) for L, _, _, pos, amp in axes]
    wsum = [amp.sum() for *_, amp in axes]
    out: list = [None, None]
    if sum(wsum) <= 0:
        return out
    joint = sum(s * ws for s, ws in zip(specs, wsum)) / sum(wsum)
    hi = min(H, W) / MIN_CELLS
    cands = _peaks(joint, size, MIN_CELL_PX, hi, candidates)
    for sp, (L, *_) in zip(specs, axes):  # non-square cells: each axis' own strongest peak too
        for p in _peaks(sp, size, MIN_CELL_PX, L / MIN_CELLS, 1):
            if all(abs(p / o - 1.0) > 0.04 for o in cands):
                cands.append(p)
    if not cands:
        return out
    # sharp edges (runs ~1 px wide) can't come from an interpolating upscale of cells ≥ MIN_CELL_PX: stop early
    wd = np.concatenate([w for w, _ in widths])
    wa = np.concatenate([a for _, a in widths])
    order = np.argsort(wd)
    cum = np.cumsum(wa[order])
    if cum.size == 0 or wd[order][np.searchsorted(cum, 0.5 * cum[-1])] < MIN_SOFT_WIDTH * min(cands):
        return out
    f = np.arange(joint.size) * _BINS_PER_PX / size
    for ax, (L, lines, noise, pos, amp) in enumerate(axes):
        fit = None
        if ax == 1 and out[0] is not None:  # square cells first: the x cell (and its multiples) screened alone
            fit = _soft_axis(lines, noise, pos, amp, [out[0].cell], L)
            if fit is not None and abs(fit.cell / out[0].cell - 1.0) > 0.03:
                fit = None
        if fit is None:
            fit = _soft_axis(lines, noise, pos, amp, cands, L)
        if fit is None and ax == 0 and x_first:
            break  # the caller only wants both axes (and runs the full search itself otherwise)
        if fit is not None:
            s = fit.cell
            fit.score = float(joint[int(round(size / (s * _BINS_PER_PX)))]) if 1.0 / s <= f[-1] else 0.0
        out[ax] = fit
    return out
