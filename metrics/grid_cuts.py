"""Per-line cut detection for pixel-art renders whose cells are not a clean uniform grid (issue 13).

A diffusion model draws cells of slightly different widths that drift across the frame, the frame rarely
holds a whole number of cells, and edges may be soft (bilinear / bicubic / Lanczos upscales). So instead of
one period and phase, each axis gets its own list of **cuts** (cell boundaries, px): :func:`detect_axis`.

Why hand-written: no maintained library detects pixel-art grids (kornia / scikit-image / OpenCV offer edge
filters and Hough lines, not a period-constrained cut sequence); the pieces are textbook:

1. **Profiles** (from ≤ ``lines`` rows): ``p1[c]`` = Σ |I[c] − I[c−1]| (edge energy on the boundary at
   position ``c`` px) and ``p2[x]`` = Σ |I[x+1] − 2 I[x] + I[x−1]| (curvature at pixel ``x``'s centre; a
   bilinear upscale is piecewise linear with its kinks at the native cell *centres*). JPEG block steps are
   removed (``_deblock``), then a low percentile (the noise floor).
2. **Period candidates**: local maxima of the autocorrelation of the profile (Wiener–Khinchin, one FFT),
   refined to sub-pixel lag by a parabola; edges of drifting cells still correlate at one mean cell.
3. **Cuts for a period w**: dynamic programming over cut positions maximising Σ energy(cut) − λ Σ
   log²(gap / w), gaps in w·(1 ± :data:`GAP_SLACK`) — the beat-tracking DP of Ellis, "Beat tracking by dynamic
   programming", J. New Music Research 36(1), 2007, eq. 1–3, with onsets replaced by edge energy. The first
   and last cells may be partial (a cropped frame); cuts in blank borders (no pixel shows them) are predicted
   from the visible lattice by :mod:`.grid_borders` (mean cell of both axes, or a significant width trend).
   Soft renders (one interpolating resize: a uniform lattice) are fitted by :func:`.grid_soft.fit_soft`
   instead — re-rendering with the bilinear / bicubic / Lanczos kernels, phase and period searched on the
   re-rendering error.
4. **Which period** (harmonics): every candidate's cuts are scored by a reconstruction residual on ≤ 24
   sampled lines: the share of pixels that differ (max channel, 0..255 units) by more than a noise-adapted
   threshold from the reconstruction by their cell's centre value — nearest-neighbour for sharp hypotheses,
   the best of the three interpolating kernels for soft ones (they keep the native colour at each cell
   centre). Both models compete at every period only where no sharp grid concentrates the edges (``pool``);
   otherwise the model is chosen at the fundamental. Coarse harmonics leave real edges inside cells; the truth
   and its refinements tie near the minimum; the **coarsest candidate within a margin of the best** wins; the margin scales with the noise.
5. **Confidence**: see ``_sharp_confidence`` / ``_axis_confidence`` in :mod:`.grid` (edge evidence:
   :func:`cut_support`) — calibrated per condition on the fixtures of
   :func:`conceptlab.metrics.palette_synth.condition_render` (tests/test_grid_conditions.py).

Speed: the DP is the costliest step (one Python iteration per ≈ 0.7 cell), so candidates are tried coarse to
fine and the finer ones are skipped once they cannot change the pick (:func:`_settled`; same result as trying
all of them), and :mod:`.grid` computes the sampled lines and profiles once for both hypotheses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .grid_borders import ANCHOR, _norm, anchored, border_cuts, lattice_through, pool_borders, recount_runs
from .grid_crossings import line_fit
from .grid_soft import fit_soft

__all__ = ["AxisFit", "detect_axis", "axis_profiles", "period_candidates", "dp_cuts", "border_cuts", "pool_borders",
           "lattice_through", "anchored", "GAP_SLACK", "MIN_CELL_PX"]

#: Cell gaps allowed by the DP, relative to the period: w·(1 ± GAP_SLACK) (covers ±15 % drift plus slack).
GAP_SLACK = 0.3
#: DP tightness λ (energy is normalised so a strong cut ≈ 1): 15 % off the period costs λ·0.0195.
DP_LAMBDA = 3.0
#: Smallest cell searched (px).
MIN_CELL_PX = 5.0
#: Fewest cells per axis.
MIN_CELLS = 3
#: Solver modes: boundary energy + nearest-neighbour, boundary energy + linear, curvature (centres) + linear.
MODES = ("sharp", "soft")
#: The fundamental: the smallest candidate whose autocorrelation is ≥ this share of the strongest peak's.
FUNDAMENTAL_FRAC = 0.6
#: Period candidates taken from the autocorrelation.
N_CANDIDATES = 4
#: Harmonic rule: candidate residual ≤ best + max(HARMONIC_MARGIN·best, floor(noise)).
HARMONIC_MARGIN = 0.5
RESIDUAL_LINES = 24
#: Soft-lattice candidates that get the full phase + period search (the others a quick phase fit).
SOFT_REFINE = 2
#: Weight of :func:`mixture_fraction` added to the residual (a too-fine grid on a soft render).
MIX_WEIGHT = 0.2
#: Cell sizes closer than this ratio are one grid (harmonics are ≥ 1.5× apart).
SAME_PERIOD = 1.4


@dataclass
class AxisFit:
    """Detection result for one axis of ``length`` px.

    ``cuts``: interior cell boundaries (px, float64, increasing, in (0, length)); ``cell``: mean cell size
    (median interior gap, px); ``mode``: ``"sharp"`` or ``"soft"``; ``residual``: reconstruction residual of
    the chosen cuts (share of sampled pixels, 0..1); ``score``: chance-corrected edge concentration on the
    cuts (−1..1); ``separation``: residual gain over the next coarser candidate (0..1); ``candidates``:
    ``{period: residual}`` checked. ``cuts`` is empty (and ``cell`` 0) when the axis shows no grid.
    """

    length: int
    cuts: np.ndarray
    cell: float
    mode: str = "sharp"
    residual: float = 1.0
    score: float = 0.0
    separation: float = 0.0
    noise: float = 0.0
    candidates: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------------
# profiles
# ------------------------------------------------------------------------------------------------------------


def _deblock(p: np.ndarray, first: int) -> np.ndarray:
    """Remove JPEG's uniform 8 / 16 px block-boundary steps from profile ``p`` whose entry ``i`` sits at
    position ``first + i`` px: if the median on positions ≡ 0 (mod block) exceeds the median elsewhere by
    15 %..4×, that excess is subtracted there (floored at 0); real edges on those positions keep most of their
    energy, a true sharp 8-px grid (ratio ≫ 4) is left alone."""
    if p.size < 32:
        return p
    coord = np.arange(first, first + p.size)
    q = p
    for block in (8, 16):
        on = (coord % block) == 0
        m_on, m_off = np.median(q[on]), np.median(q[~on])
        if 1.15 * m_off + 1e-9 < m_on < 4.0 * m_off:
            q = q.copy()
            q[on] = np.maximum(q[on] - (m_on - m_off), 0.0)
    return q


def axis_profiles(lines: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edge profiles of sampled lines ``[3, r, L]`` int16 (channel-first, 0..255 values).

    Returns ``(p1, p2)`` float64, both of length ``L + 1`` indexed by position in px: ``p1[c]`` (1 ≤ c ≤ L−1)
    = Σ over lines and channels |I[c] − I[c−1]| — energy on the boundary at ``c``; ``p2[c]`` = Σ |I[c] − 2·I[c−1]
    + I[c−2]| placed at the centre of pixel ``c − 1`` (so at position ``c − 0.5``; stored at index ``c`` for
    1 ≤ c ≤ L−1 and read as a centre). JPEG blocking removed and the 25th percentile subtracted (noise floor).
    """
    L = lines.shape[2]
    p1 = np.zeros(L + 1)
    p2 = np.zeros(L + 1)
    if L < 3:
        return p1, p2
    d = np.diff(lines, axis=2)  # [3, r, L-1], position c = index + 1
    a = np.abs(d).sum(axis=(0, 1), dtype=np.int64).astype(np.float64)
    dd = np.abs(np.diff(d, axis=2)).sum(axis=(0, 1), dtype=np.int64).astype(np.float64)  # centre of pixel i+1
    a = _deblock(a, 1)
    a = np.maximum(a - np.percentile(a, 25), 0.0)
    dd = np.maximum(dd - np.percentile(dd, 25), 0.0)
    p1[1:L] = a
    p2[2:L] = dd  # dd[i] is the kink at pixel i+1 -> index i+2 = "c" with centre c-0.5 = i+1.5 ... see docstring
    return p1, p2


def period_candidates(p: np.ndarray, length: int, k: int = N_CANDIDATES) -> list[float]:
    """Up to ``k`` candidate cell sizes ``[(lag px, autocorrelation 0..1)]``, strongest first, for a profile ``p`` over an axis of ``length`` px: the
    highest local maxima of its autocorrelation (computed by FFT, Wiener–Khinchin) at lags in
    [:data:`MIN_CELL_PX`, length / :data:`MIN_CELLS`], each refined by a 3-point parabola. Empty when the
    profile is flat."""
    x = p - p.mean()
    n = x.size
    if n < 8 or not np.any(x):
        return []
    f = np.fft.rfft(x, 2 * n)
    ac = np.fft.irfft(f * np.conj(f))[:n]
    if ac[0] <= 0:
        return []
    ac = ac / ac[0]
    lo, hi = int(math.floor(MIN_CELL_PX)), int(min(n - 2, length / MIN_CELLS))
    if hi <= lo + 1:
        return []
    seg = ac[lo - 1 : hi + 2]
    inner = seg[1:-1]
    peaks = np.nonzero((inner > seg[:-2]) & (inner >= seg[2:]) & (inner > 0))[0] + lo
    if peaks.size == 0:
        return []
    peaks = peaks[np.argsort(-ac[peaks], kind="stable")][: 2 * k]
    out = []
    for t in peaks:
        y0, y1, y2 = ac[t - 1], ac[t], ac[t + 1]
        den = y0 - 2 * y1 + y2
        off = 0.5 * (y0 - y2) / den if den < 0 else 0.0
        lag = float(t + np.clip(off, -0.5, 0.5))
        if all(abs(lag - o) > 0.04 * lag for o, _ in out):
            out.append((lag, float(y1)))
            if len(out) == k:
                break
    return out


# ------------------------------------------------------------------------------------------------------------
# dynamic programming
# ------------------------------------------------------------------------------------------------------------


def dp_cuts(e: np.ndarray, length: int, w: float, lam: float = DP_LAMBDA, slack: float = GAP_SLACK) -> np.ndarray:
    """Cut positions (px, int64, increasing) maximising Σ e[cut] − λ Σ log²(gap / w) over an axis of
    ``length`` px, every gap in [w(1−slack), w(1+slack)], the first cut within w(1+slack) of 0 and the last
    within w(1+slack) of ``length`` (partial border cells). ``e``: non-negative energy per position, length
    ``length + 1`` (entries 1..length−1 used), normalised to ≈ 1 for a strong cut.

    Ellis (2007), "Beat tracking by dynamic programming", eq. 2–3 (onset strength → edge energy, tempo →
    period). Positions are processed in blocks of ⌊w(1−slack)⌋, each block depending only on earlier ones,
    so the Python loop runs ≈ length / (0.7 w) times with a vectorised max inside."""
    gmin = max(2, int(math.floor(w * (1 - slack))))
    gmax = max(gmin, int(math.ceil(w * (1 + slack))))
    if length <= 2:
        return np.zeros(0, np.int64)
    G = np.arange(gmin, gmax + 1)
    pen = lam * np.log(G / w) ** 2
    off = gmax + 1  # D is stored shifted by `off`; entries for positions ≤ 0 stay -inf
    D = np.full(length + off, -np.inf)
    back = np.zeros(length, np.int64)  # gap to the previous cut (px); 0 = first cut
    rows = np.arange(gmin)
    T = rows[:, None] - G[None, :] + off  # [gmin, nG] predecessor offsets within a block, as indices into D
    for s in range(1, length, gmin):
        n = min(gmin, length - s)
        V = D[T[:n] + s]
        V -= pen
        j = V.argmax(1)
        best = V.max(1)
        gap = G[j]
        if s <= gmax:  # a first cut within gmax of the frame start has no predecessor (partial border cell)
            use = (np.arange(s, s + n) <= gmax) & (best <= 0.0)
            best[use] = 0.0
            gap[use] = 0
        D[s + off : s + n + off] = e[s : s + n] + best
        back[s : s + n] = gap
    D = D[off:]
    ends = np.arange(max(1, length - gmax), length)
    c = int(ends[np.argmax(D[ends])])
    out = []
    while c > 0:
        out.append(c)
        g = int(back[c])
        c = c - g if g else 0
    return np.array(out[::-1], np.int64)


def _refine(e: np.ndarray, cuts: np.ndarray) -> np.ndarray:
    """Sub-pixel cut positions: vertex of the parabola through e[c−1], e[c], e[c+1] (clipped to ±0.5)."""
    c = cuts.astype(np.int64)
    ok = (c >= 1) & (c + 1 < e.size)
    out = c.astype(np.float64)
    if ok.any():
        y0, y1, y2 = e[c[ok] - 1], e[c[ok]], e[c[ok] + 1]
        den = y0 - 2 * y1 + y2
        off = np.where(den < 0, 0.5 * (y0 - y2) / np.where(den < 0, den, -1.0), 0.0)
        out[ok] += np.clip(off, -0.5, 0.5)
    return out


def _extend(cuts: np.ndarray, length: int, w: float) -> np.ndarray:
    """Extrapolate cuts at the mean gap ``w`` into empty border stretches longer than one cell."""
    if cuts.size == 0:
        return cuts
    lead = []
    c = cuts[0] - w
    while c >= 1.0:
        lead.append(c)
        c -= w
    tail = []
    c = cuts[-1] + w
    while c <= length - 1.0:
        tail.append(c)
        c += w
    return np.concatenate([np.array(lead[::-1]), cuts, np.array(tail)])


def _midpoints(centres: np.ndarray, length: int, w: float) -> np.ndarray:
    """Cuts between consecutive cell centres (soft hypothesis), plus the border cuts half a gap outside."""
    if centres.size == 0:
        return centres
    mids = 0.5 * (centres[1:] + centres[:-1])
    lead = centres[0] - w / 2 if centres.size < 2 else centres[0] - 0.5 * (centres[1] - centres[0])
    tail = centres[-1] + w / 2 if centres.size < 2 else centres[-1] + 0.5 * (centres[-1] - centres[-2])
    c = np.concatenate([[lead], mids, [tail]])
    return c[(c >= 1.0) & (c <= length - 1.0)]


def _anchor(e: np.ndarray, idx: np.ndarray, pos: np.ndarray, length: int, w: float, reach: float = 0.0,
            sharp: bool = False):
    """Keep the DP positions that sit on real edges (normalised energy ≥ :data:`ANCHOR`), place the others by
    linear interpolation between the neighbouring anchors (a cell boundary in a flat area has no evidence of
    its own), and re-extrapolate the border stretches at the anchors' mean gap — least squares, or for
    ``sharp`` cells the span between the outermost anchors over its cell count (the mean of the visible
    widths, see :func:`border_cuts`), out to :data:`.grid_borders.BORDER_PX` from the ends.
    Returns ``(positions, mean gap)``."""
    if pos.size == 0:
        return pos, w
    a = e[idx] >= ANCHOR
    if a.sum() < 2:
        return pos, w
    k = np.arange(pos.size, dtype=np.float64)
    ka, pa = k[a], pos[a]
    if sharp:
        ka = recount_runs(ka, pa)
        k = np.arange(ka[-1] - ka[0] + 1, dtype=np.float64) + ka[0]
        slope = float(pa[-1] - pa[0]) / float(ka[-1] - ka[0])
    else:
        slope = line_fit(ka, pa)[1]
    if not (0.7 * w <= slope <= 1.3 * w):
        slope = w
    inner = (k >= ka[0]) & (k <= ka[-1])
    out = np.interp(k[inner], ka, pa)
    if sharp:
        return border_cuts(out, length, slope), slope
    lead, c = [], out[0] - slope
    while c >= 1.0 - reach:
        lead.append(c)
        c -= slope
    tail, c = [], out[-1] + slope
    while c <= length - 1.0 + reach:
        tail.append(c)
        c += slope
    return np.concatenate([np.array(lead[::-1]), out, np.array(tail)]), slope


def cuts_for_period(p1: np.ndarray, p2: np.ndarray, length: int, w: float, mode: str) -> np.ndarray:
    """Cuts (px, float64) for period ``w`` under ``mode``: ``"sharp"`` / ``"soft_edges"`` (DP on boundary energy
    ``p1``) or ``"soft"`` (DP on curvature ``p2`` = cell centres, cuts at the midpoints). See :func:`dp_cuts`.
    (:func:`detect_axis` fits soft lattices with :func:`.grid_soft.fit_soft`; the DP soft modes remain for
    callers that need cuts for a given period without a re-rendering search.)"""
    if mode == "sharp":
        e = _norm(p1, length, w)
        idx = dp_cuts(e, length, w)
        return _anchor(e, idx, _refine(e, idx), length, w, sharp=True)[0]
    if mode == "soft_edges":
        e = _norm(p1, length, w)
        idx = dp_cuts(e, length, w)
        return _regular(_anchor(e, idx, _refine(e, idx), length, w)[0], length, w)
    e = _norm(p2, length, w)
    idx = dp_cuts(e, length, w)
    centres, slope = _anchor(e, idx, _refine(e, idx) - 0.5, length, w, w / 2)
    # p2 index c = centre of pixel c-1 = position c-0.5
    return _regular(_midpoints(centres, length, slope), length, w)


def _regular(cuts: np.ndarray, length: int, w: float) -> np.ndarray:
    """Least-squares uniform grid ``a + k·slope`` through ``cuts`` (soft renders come from one resize: a single
    scale; single soft-edge peaks are biased by their neighbours, the fit averages that out). Cut indices come
    from the median gap, so a skipped or doubled cut does not bend the fit; ``w`` is the candidate period."""
    if cuts.size < 3:
        return cuts
    g = float(np.median(np.diff(cuts)))
    if g <= 1.0:
        return cuts
    k = np.round((cuts - cuts[0]) / g)
    a, slope = line_fit(k, cuts)
    if not 0.85 * w <= slope <= 1.15 * w:
        return cuts
    k0 = int(np.floor((1.0 - a) / slope))
    kk = np.arange(k0, int(np.ceil((length - 1.0 - a) / slope)) + 1)
    c = a + kk * slope
    return c[(c >= 1.0) & (c <= length - 1.0)]


# ------------------------------------------------------------------------------------------------------------
# reconstruction residual
# ------------------------------------------------------------------------------------------------------------


def _chanmax_abs(d: np.ndarray) -> np.ndarray:
    """max over the channel axis (axis 0, length 3) of |d|, in place on ``d``."""
    np.abs(d, out=d)
    return np.maximum(np.maximum(d[0], d[1]), d[2])


def noise_level(lines: np.ndarray) -> float:
    """Robust noise σ estimate (0..255 units) of sampled lines ``[3, r, L]`` int16: 1.4826 × MAD of second
    differences / √6 (the second difference of white noise has variance 6σ²), median over channels; edges are
    sparse, so the median ignores them."""
    if lines.shape[2] < 3:
        return 0.0
    dd = np.diff(lines, 2, axis=2).astype(np.float32)
    med = np.median(np.abs(dd), axis=(1, 2))
    return float(np.median(med) * 1.4826 / math.sqrt(6.0))


def threshold(noise: float) -> float:
    """"Differs" threshold (0..255): 5σ of noise + 12, clipped to 24..48."""
    return float(np.clip(5.0 * noise + 12.0, 24.0, 48.0))


def cell_index(length: int, cuts: np.ndarray) -> np.ndarray:
    """Cell of every pixel of an axis (pixel-centre rule: pixel ``x`` is in cell ``k`` when
    ``cuts[k−1] ≤ x + 0.5 < cuts[k]``), int64 ``[length]``."""
    return np.searchsorted(cuts, np.arange(length) + 0.5, side="right")


def residual(lines: np.ndarray, cuts: np.ndarray, mode: str, thr: float) -> float:
    """Share of pixels of ``lines`` ``[3, r, L]`` int16 differing by more than ``thr`` (max channel) from the
    reconstruction by cell-centre values: nearest-neighbour (``mode="sharp"``) or linear between centres
    (``"soft"``). Cost O(r·L·3)."""
    L = lines.shape[2]
    bounds = np.concatenate([[0.0], cuts, [float(L)]])
    centres = 0.5 * (bounds[1:] + bounds[:-1])
    cpix = np.clip(np.floor(centres).astype(np.int64), 0, L - 1)
    vals = lines[:, :, cpix]  # [3, r, cells]
    if mode == "sharp":
        rec = vals[:, :, cell_index(L, cuts)]
    else:
        x = np.arange(L) + 0.5
        j = np.clip(np.searchsorted(centres, x) - 1, 0, max(0, centres.size - 2))
        if centres.size < 2:
            rec = vals[:, :, np.zeros(L, np.int64)]
        else:
            t = np.clip((x - centres[j]) / np.maximum(centres[j + 1] - centres[j], 1e-6), 0.0, 1.0)
            v0 = vals[:, :, j].astype(np.float32)
            rec = v0 + (vals[:, :, j + 1] - v0) * t.astype(np.float32)
            rec = np.rint(rec).astype(np.int16)
    return float((_chanmax_abs(lines - rec) > thr).mean())


def mixture_fraction(lines: np.ndarray, cuts: np.ndarray) -> float:
    """Share of cells (whose two neighbours differ by > 48 units, max channel) whose centre colour is the
    midpoint of its neighbours' (within 15 % of their difference) — ``[3, r, L]`` int16 lines, ``cuts`` px.
    A grid twice too fine puts every other centre on a soft edge, where an interpolating upscale draws
    exactly that mixture; the true grid samples the drawn colours (pixel-art ramps are rarely that exact)."""
    L = lines.shape[2]
    b = np.concatenate([[0.0], cuts, [float(L)]])
    c = np.clip(np.floor(0.5 * (b[1:] + b[:-1])).astype(np.int64), 0, L - 1)
    if c.size < 3:
        return 0.0
    v = lines[:, :, c].astype(np.float32)  # [3, r, n]
    a, m, z = v[:, :, :-2], v[:, :, 1:-1], v[:, :, 2:]
    diff = np.abs(z - a).max(0)
    dev = np.abs(m - 0.5 * (a + z)).max(0)
    big = diff > 48
    if not big.any():
        return 0.0
    return float((dev[big] < 0.15 * diff[big]).mean())


# ------------------------------------------------------------------------------------------------------------
# one axis
# ------------------------------------------------------------------------------------------------------------


def edge_score(p: np.ndarray, cuts: np.ndarray, length: int, win: float) -> float:
    """Chance-corrected share of profile energy within ``win`` px of the cuts: (f − f0) / (1 − f0) with f0 the
    share of positions that close to a cut (−1..1; 0 = no better than chance)."""
    tot = p.sum()
    if tot <= 0 or cuts.size == 0:
        return 0.0
    pos = np.arange(p.size, dtype=np.float64)
    j = np.clip(np.searchsorted(cuts, pos), 1, cuts.size) if cuts.size > 1 else np.zeros(p.size, np.int64)
    d = np.abs(pos - cuts[np.clip(j, 0, cuts.size - 1)])
    if cuts.size > 1:
        d = np.minimum(d, np.abs(pos - cuts[j - 1]))
    near = d <= win
    f = p[near].sum() / tot
    f0 = near[1:length].mean()
    return float((f - f0) / (1.0 - f0)) if f0 < 1 else 0.0


def detect_axis(lines: np.ndarray, p1: np.ndarray, p2: np.ndarray, extra: tuple = (),
                prefer: float = 0.0, modes: tuple = MODES, pool: bool = False) -> AxisFit:
    """Cuts of one axis (see the module docstring). ``lines`` ``[3, r, L]`` int16 sampled along the axis;
    ``p1``/``p2`` from :func:`axis_profiles` (may use more lines); ``extra``: more candidate periods (px) to
    check (e.g. the other axis' cell size); ``prefer``: a period (px) that wins residual ties; ``modes``: the
    edge models to try (the caller drops the soft ones when the edges are known to be sharp); ``pool``: every
    (period, model) pair competes (the caller sets it when no sharp grid concentrates the edges). Returns an :class:`AxisFit` (empty cuts when no grid shows)."""
    L = lines.shape[2]
    noise = noise_level(lines)
    thr = threshold(noise)
    cands = period_candidates(p1, L)
    for c, v in period_candidates(p2, L, 2) + [(float(c), 0.0) for c in extra]:
        if all(abs(c - o) > 0.04 * c for o, _ in cands):
            cands.append((c, v * 0.9))
    cands.sort(key=lambda t: -t[1])
    fit = AxisFit(L, np.zeros(0), 0.0, noise=noise)
    if not cands:
        return fit
    tried: dict = {}

    def run(w, mode, refine=False):
        if (w, mode) not in tried or refine:
            if mode == "sharp":
                cuts = cuts_for_period(p1, p2, L, w, mode)
                r = residual(lines, cuts, mode, thr) if cuts.size else 1.0
            else:
                cuts, ws, r, _ = fit_soft(lines, p1, p2, w, thr, refine_period=refine)
                if ws < MIN_CELL_PX:
                    cuts, r = np.zeros(0), 1.0
                if cuts.size:
                    r += MIX_WEIGHT * mixture_fraction(lines, cuts)
            tried[(w, mode)] = (r, cuts)
        return tried[(w, mode)][0]

    strong = [c for c, v in cands if v >= FUNDAMENTAL_FRAC * cands[0][1]]
    w0 = min(strong)
    # the edge model is chosen at the fundamental (the smallest strong period), as the residuals of the two
    # models are not comparable across periods (a soft lattice of half the cells re-renders a blurred sharp render)
    # — unless ``pool`` (no sharp grid concentrates the edges: an interpolating upscale), where a sharp grid of
    # tiny cells re-renders the smooth image too and every (period, model) pair competes on the harmonic rule
    floor = 0.008 + 0.5 * min(noise, 20.0) / 255.0
    if pool and "sharp" in modes and run(w0, "sharp") <= floor:
        # a line-by-line sharp grid re-renders the image within the noise floor at the fundamental, with its
        # edges on the cuts: nearest-neighbour cells whose widths drift (no single period concentrates their
        # edges, which is why ``pool`` was asked) — an interpolating upscale leaves gradients inside every cell
        # that a sharp grid at its fundamental cannot re-render. Soft lattices are not tried (they cost most).
        c0 = tried[(w0, "sharp")][1]
        if c0.size and edge_score(p1, c0, L, max(1.0, min(2.0, w0 / 6))) >= 0.5:
            pool, modes = False, ("sharp",)
    mode = min(modes, key=lambda m: (run(w0, m), MODES.index(m)))
    ws = [w for w in [c for c, _ in cands] + [w0 / 2] if MIN_CELL_PX <= w <= min(L / MIN_CELLS * 1.001, 4.5 * w0)]
    if pool:
        for w in ws:
            for m in modes:
                run(w, m)
    else:  # coarse to fine, stopping once finer periods cannot change the outcome (see _settled)
        ws = sorted(set(ws), reverse=True)
        for i, w in enumerate(ws):
            run(w, mode)
            if mode == "sharp" and _settled(tried, mode, floor, [u for u in ws[i + 1 :] if (u, mode) not in tried]):
                break
    if not pool:
        tried = {k: v for k, v in tried.items() if k[1] == mode}
    # soft lattices: a quick phase fit for every candidate, the full phase + period search for the contenders
    best = min(r for r, _ in tried.values())
    soft = sorted((r, w) for (w, m), (r, _) in tried.items() if m == "soft" and r <= 2.0 * best + 0.03)
    for r, w in soft[:SOFT_REFINE]:
        run(w, "soft", refine=True)
    acf = dict(cands)

    def pick():
        best = min(r for r, _ in tried.values())
        lim = best + max(HARMONIC_MARGIN * best, floor)
        ok = [(float(np.median(np.diff(c))) if c.size > 1 else w, r, w, mode) for (w, mode), (r, c) in tried.items()
              if r <= lim]
        top = max(o[0] for o in ok)
        # the coarsest explaining cell size wins over its refinements (w/2, w/3 tie); periods within the DP's
        # slack of it (ratio < SAME_PERIOD) are the same grid drawn with other gaps: the best residual among them
        group = [o for o in ok if o[0] * SAME_PERIOD >= top]
        rmin = min(o[1] for o in group)
        tie = [o for o in group if o[1] <= rmin + max(0.001, 0.1 * rmin)]
        # among ties: the preferred period (the uniform hypothesis' cell, when the caller has one), then the
        # strongest autocorrelation peak
        return min(tie, key=lambda o: (not (prefer and abs(o[2] / prefer - 1) < 0.03), MODES.index(o[3]),
                                       -acf.get(o[2], 0.0), o[1]))[2:]

    w, mode = pick()
    if mode == "sharp" and not pool:
        # periods read back from the fitted cuts (drifting cells decorrelate the autocorrelation, so its peaks
        # can sit a few % off the mean cell or miss it): the mean gap over the edge-anchored span (a period whose
        # DP slack is too narrow for the widest cells inserts cuts, and the mean gap shows it), and the typical
        # gap between consecutive edge-anchored cuts when it is ≥ 1.6× the period (a fine harmonic that the
        # candidates left without its fundamental). Each is one more candidate; a mean-gap period that ties its
        # source inherits the source's place among ties.
        cuts0 = tried[(w, mode)][1]
        on, _ = anchored(p1, cuts0, w)
        if on.sum() >= 4:
            i = np.nonzero(on)[0]
            mg = float(cuts0[i[-1]] - cuts0[i[0]]) / (i[-1] - i[0])  # mean gap over the visible span
            if abs(mg / w - 1.0) > 0.04 and MIN_CELL_PX <= mg <= L / MIN_CELLS:
                run(mg, mode)
                acf[mg] = acf.get(w, 0.0) + 1e-9
            g = float(np.percentile(np.diff(cuts0[on]), 25))
            if g >= 1.6 * w and MIN_CELL_PX <= g <= L / MIN_CELLS:
                run(g, mode)
            w, mode = pick()
    r, cuts = tried[(w, mode)]
    cell = float(np.median(np.diff(cuts))) if cuts.size > 1 else float(w)
    coarser = [rr for (ww, mm), (rr, cc) in tried.items() if ww > 1.3 * w]
    sep = float(min(coarser) - r) if coarser else 1.0
    win = max(1.0, min(2.0, cell / 6))
    score = edge_score(p1 if mode == "sharp" else p2, cuts if mode == "sharp" else _centres(cuts, L) + 0.5, L, win)
    fit.cuts, fit.cell, fit.mode, fit.residual, fit.score, fit.separation = cuts, cell, mode, r, score, sep
    fit.candidates = {f"{ww:g}/{mm}": round(rr, 4) for (ww, mm), (rr, _) in tried.items()}
    return fit


def _settled(tried: dict, mode: str, floor: float, rest: list) -> bool:
    """True when evaluating the periods ``rest`` (all finer than every period tried so far, besides the
    fundamental) cannot change what :func:`detect_axis` picks — so their DP (the costliest step; the finest
    periods cost most) is skipped, and the result is the one the full candidate set gives. The harmonic rule
    keeps the candidates with residual ≤ lim = best + max(margin·best, floor); residuals are ≥ 0, so lim can
    only fall to ``floor`` as more candidates are tried: a candidate with residual ≤ ``floor`` stays in, one
    above the current lim stays out. If every tried candidate is one of these two kinds, at least one is in,
    and no period in ``rest`` can reach the coarsest kept cell size within :data:`SAME_PERIOD` (its DP gaps are
    ≤ 1.3·w + 1 px), the kept set, the coarsest group and its ties are final; the separation uses only
    coarser periods."""
    rs = [(r, c, w) for (w, m), (r, c) in tried.items() if m == mode]
    best = min(r for r, _, _ in rs)
    lim = best + max(HARMONIC_MARGIN * best, floor)
    if any(floor < r <= lim for r, _, _ in rs):
        return False
    kept = [float(np.median(np.diff(c))) if c.size > 1 else w for r, c, w in rs if r <= floor]
    if not kept:
        return False
    top = max(kept)
    return all(((1.0 + GAP_SLACK) * u + 1.0) * SAME_PERIOD < top for u in rest)


def _centres(cuts: np.ndarray, length: int) -> np.ndarray:
    b = np.concatenate([[0.0], cuts, [float(length)]])
    return 0.5 * (b[1:] + b[:-1])


def off_grid(p: np.ndarray, cuts: np.ndarray, other: np.ndarray, cell: float, strong: float = 0.3) -> int:
    """How many of ``cuts`` that sit on a clear edge (normalised energy ≥ ``strong``, see :func:`anchored`; noise
    and blur leave weaker maxima than a real cell boundary) lie farther than max(2 px, 12 % of
    ``cell``) from every cut of ``other`` (px) — e.g. the visible cuts of a drifting grid that a single
    period misses."""
    _, v = anchored(p, cuts, cell)
    c = np.asarray(cuts, np.float64)[v >= strong]
    o = np.asarray(other, np.float64)
    if c.size == 0:
        return 0
    if o.size == 0:
        return int(c.size)
    j = np.clip(np.searchsorted(o, c), 1, max(1, o.size - 1)) if o.size > 1 else np.zeros(c.size, np.int64)
    d = np.abs(o[j] - c)
    if o.size > 1:
        d = np.minimum(d, np.abs(o[j - 1] - c))
    return int((d > max(2.0, 0.12 * cell)).sum())


def cut_support(p: np.ndarray, cuts: np.ndarray, cell: float) -> tuple[int, float]:
    """Evidence the edge profile ``p`` (boundary energy per position, length L + 1, see :func:`axis_profiles`)
    gives a sharp axis' ``cuts`` (px): ``(anchored, alternation)``.

    ``anchored``: how many cuts sit on an edge (:func:`anchored`) — a period read from one or two edges (a tiny
    sprite on a plain canvas) is a guess. ``alternation`` 0..1: how much of the energy on the cuts falls on
    every k-th cut only (k = 2, 3; the largest share of one residue class mod k, chance-corrected:
    (share − 1/k) / (1 − 1/k), shrunk by n/(n + 4) for n anchored cuts so a handful of edges does not look
    periodic by chance): a grid k times too fine puts the real edges on one residue class, the true grid
    spreads them over all."""
    c = np.asarray(cuts, np.float64)
    on, v = anchored(p, c, cell)
    n = int(on.sum())
    tot = float(v[on].sum())
    if n < 2 or tot <= 0:
        return n, 0.0
    idx = np.arange(c.size)
    alt = 0.0
    for k in (2, 3):
        if c.size < 2 * k:
            continue
        share = max(float(v[on & (idx % k == r)].sum()) for r in range(k)) / tot
        alt = max(alt, (share - 1.0 / k) / (1.0 - 1.0 / k))
    return n, float(alt * n / (n + 4.0))
