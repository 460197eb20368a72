"""Edge crossings of soft-upscaled lines and their periodogram: where the cell boundaries of an interpolating
upscale are, and which cell sizes they repeat at — the candidate stage of :mod:`.grid_soft` (issue 13).

Why hand-written: no library reads cell boundaries off a resampled image; the pieces are textbook (the step
response of a symmetric interpolating kernel is odd about the step, so a monotone run crosses the midpoint of its
ends on the boundary; a weighted periodogram by FFT, Wiener–Khinchin; a weighted least-squares line fit).
"""

from __future__ import annotations

import numpy as np

__all__ = ["edge_crossings", "crossing_spectrum", "crossing_lattice"]




def edge_crossings(y: np.ndarray, min_amp: float = 12.0, with_width: bool = False) -> tuple:
    """Mid-level crossings of the monotone runs of lines ``y`` ``[R, L]`` (float, 0..255 units, one channel per
    line): ``(positions px float64, amplitudes)``.

    A run is a maximal stretch of pixel steps of one sign (a single flat step inside a run continues it; two end
    it — a plateau). A run from value ``v0`` to ``v1`` with ``|v1 − v0| ≥ min_amp`` that does not touch the line
    ends yields the position (pixel ``i`` spans [i, i+1), linear between centres) where it crosses
    ``(v0 + v1) / 2``: the cell boundary for an isolated step drawn by any symmetric kernel. ``with_width``: also
    each run's width (px; ≈ 1 for a sharp step, ≈ the cell for an interpolated one). Vectorised, O(R·L)."""
    R, L = y.shape
    none = (np.zeros(0),) * (3 if with_width else 2)
    if L < 4:
        return none
    y = np.asarray(y, np.float32)
    d = np.diff(y, axis=1)  # pair q between pixels q and q+1
    sg = np.sign(d).astype(np.int8)
    iso = np.zeros(sg.shape, bool)
    iso[:, 1:-1] = (sg[:, 1:-1] == 0) & (sg[:, :-2] == sg[:, 2:])
    sg[iso] = np.roll(sg, 1, axis=1)[iso]
    nz = sg != 0
    st = nz.copy()
    st[:, 1:] &= sg[:, 1:] != sg[:, :-1]
    en = nz.copy()
    en[:, :-1] &= sg[:, :-1] != sg[:, 1:]
    P = L - 1
    s_idx, e_idx = np.flatnonzero(st), np.flatnonzero(en)
    if s_idx.size == 0:
        return none
    row, c0, c1 = s_idx // P, s_idx % P, e_idx % P + 1  # pixel columns of the run's two ends
    v0, v1 = y[row, c0], y[row, c1]
    amp = np.abs(v1 - v0)
    mid = 0.5 * (v0 + v1)
    gid = np.cumsum(st.ravel()) - 1  # run id of each step (valid where nz)
    yf, yn = y[:, :-1].ravel(), y[:, 1:].ravel()
    m = mid[np.maximum(gid, 0)]
    cr = np.flatnonzero(nz.ravel() & ((yf - m) * (yn - m) <= 0) & (yf != yn))
    if cr.size == 0:
        return none
    first = np.searchsorted(cr, s_idx)
    has = first < cr.size
    q = cr[np.minimum(first, cr.size - 1)]
    keep = has & (q <= e_idx) & (amp >= min_amp) & (c0 > 0) & (c1 < L - 1)
    q, mq = q[keep], mid[keep]
    pos = (q % P) + 0.5 + (mq - yf[q]) / (yn[q] - yf[q])
    if with_width:
        return pos.astype(np.float64), amp[keep].astype(np.float64), (c1 - c0)[keep].astype(np.float64)
    return pos.astype(np.float64), amp[keep].astype(np.float64)


_BINS_PER_PX = 8


def crossing_spectrum(pos: np.ndarray, weight: np.ndarray, length: int, size: int) -> np.ndarray:
    """Periodogram ``|Σ w·exp(2πi·f·x)| / Σ w`` (0..1) of weighted crossings ``pos`` (px, on an axis of
    ``length`` px) at frequencies ``f = k·8/size`` cycles/px, ``k < size // 2 + 1``: a histogram at 1/8 px and
    one real FFT of ``size`` points (zero-padded: ``size`` ≥ 4·8·length gives ¼-cycle steps over the axis)."""
    nb = length * _BINS_PER_PX
    if pos.size == 0 or weight.sum() <= 0:
        return np.zeros(size // 2 + 1)
    h = np.bincount(np.clip((pos * _BINS_PER_PX).astype(np.int64), 0, nb - 1), weight, nb)
    return np.abs(np.fft.rfft(h, size)) / weight.sum()


def _peaks(spec: np.ndarray, size: int, lo_px: float, hi_px: float, k: int) -> list[float]:
    """Up to ``k`` periods (px) of the strongest local maxima of ``spec`` with periods in [lo_px, hi_px],
    refined by a 3-point parabola, at least 4 % apart."""
    f = np.arange(spec.size) * _BINS_PER_PX / size
    idx = np.nonzero((f >= 1.0 / hi_px) & (f <= 1.0 / lo_px))[0]
    idx = idx[(idx > 0) & (idx < spec.size - 1)]
    if idx.size == 0:
        return []
    pk = idx[(spec[idx] > spec[idx - 1]) & (spec[idx] >= spec[idx + 1])]
    out: list[float] = []
    for i in pk[np.argsort(-spec[pk], kind="stable")]:
        y0, y1, y2 = spec[i - 1], spec[i], spec[i + 1]
        den = y0 - 2 * y1 + y2
        off = float(np.clip(0.5 * (y0 - y2) / den, -0.5, 0.5)) if den < 0 else 0.0
        p = size / ((i + off) * _BINS_PER_PX)
        if all(abs(p / o - 1.0) > 0.04 for o in out):
            out.append(p)
            if len(out) == k:
                break
    return out


def crossing_lattice(pos: np.ndarray, weight: np.ndarray, w: float, iters: int = 2) -> tuple[float, float]:
    """Uniform lattice ``(first cut a px in [0, s), period s px)`` near period ``w`` through weighted crossings
    ``pos`` (px): phase from their circular mean at period ``w``, then ``iters`` rounds of weighted least squares
    ``pos ≈ a + k·s`` over the crossings within w/4 of their nearest lattice cut (staircases of several cells
    cross mid-cell and are left out)."""
    if pos.size < 2:
        return 0.0, float(w)
    z = np.sum(weight * np.exp(2j * np.pi * pos / w))
    a, s = float((np.angle(z) / (2 * np.pi) * w) % w), float(w)
    for _ in range(iters):
        k = np.rint((pos - a) / s)
        keep = np.abs(pos - a - k * s) < 0.25 * s
        ww, kk, xx = weight[keep], k[keep], pos[keep]
        sw = ww.sum()
        if sw <= 0:
            break
        km, xm = (ww * kk).sum() / sw, (ww * xx).sum() / sw
        var = (ww * (kk - km) ** 2).sum()
        if var <= 1e-9:  # crossings on a single cut: no period information
            break
        s1 = float((ww * (kk - km) * (xx - xm)).sum() / var)
        if not s1 > 0:
            return 0.0, float(w)
        a, s = float(xm - s1 * km), s1
    return a % s, s


def line_fit(x: np.ndarray, y: np.ndarray, weight: np.ndarray | None = None) -> tuple[float, float]:
    """Weighted least-squares line ``y ≈ a + slope·x`` of 1-D float arrays ``x``, ``y`` (``weight`` ≥ 0, default
    1): returns ``(a, slope)`` (``slope`` 0 and ``a`` the weighted mean where ``x`` does not vary). Closed-form
    sums instead of ``np.polyfit`` / ``np.linalg.lstsq``: on a handful of points LAPACK's thread pool costs far
    more than the work on a busy machine (same result to rounding)."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    wt = np.ones_like(x) if weight is None else np.asarray(weight, np.float64)
    sw = float(wt.sum())
    if sw <= 0:
        return 0.0, 0.0
    mx = float((wt * x).sum()) / sw
    my = float((wt * y).sum()) / sw
    dx = x - mx
    sxx = float((wt * dx * dx).sum())
    if sxx <= 1e-12 * max(1.0, sw * mx * mx):
        return my, 0.0
    slope = float((wt * dx * (y - my)).sum()) / sxx
    return my - slope * mx, slope


def crossing_lattices(pos: np.ndarray, weight: np.ndarray, ws, iters: int = 2) -> list[tuple[float, float]]:
    """:func:`crossing_lattice` for several start periods ``ws`` (px) at once: ``[(a, s), ...]`` in their order,
    the same arithmetic on ``[len(ws), len(pos)]`` arrays (one pass instead of a Python loop per period)."""
    w = np.asarray(ws, np.float64)
    if w.size == 0:
        return []
    if pos.size < 2:
        return [(0.0, float(x)) for x in w]
    z = (weight[None, :] * np.exp(2j * np.pi * pos[None, :] / w[:, None])).sum(1)
    a = (np.angle(z) / (2 * np.pi) * w) % w
    s = w.copy()
    live = np.ones(w.size, bool)  # rows still iterating (the scalar version's ``break``)
    bad = np.zeros(w.size, bool)  # rows whose fit collapsed (the scalar version returns (0, w))
    for _ in range(iters):
        k = np.rint((pos[None, :] - a[:, None]) / s[:, None])
        keep = np.abs(pos[None, :] - a[:, None] - k * s[:, None]) < 0.25 * s[:, None]
        ww = weight[None, :] * keep
        sw = ww.sum(1)
        go = live & (sw > 0)
        swd = np.where(go, sw, 1.0)
        km = (ww * k).sum(1) / swd
        xm = (ww * pos[None, :]).sum(1) / swd
        var = (ww * (k - km[:, None]) ** 2).sum(1)
        go &= var > 1e-9
        s1 = (ww * (k - km[:, None]) * (pos[None, :] - xm[:, None])).sum(1) / np.where(go, var, 1.0)
        bad |= go & ~(s1 > 0)
        go &= s1 > 0
        a = np.where(go, xm - s1 * km, a)
        s = np.where(go, s1, s)
        live = go
    return [(0.0, float(x)) if b else (float(ai % si), float(si)) for ai, si, x, b in zip(a, s, w, bad)]
