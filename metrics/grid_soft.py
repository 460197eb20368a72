"""The soft-upscale hypothesis of grid detection: a uniform cell grid whose edges were drawn by an interpolating
resize (bilinear, bicubic, Lanczos — Pillow, OpenCV, torch ``interpolate`` and the latent upscalers all use one of
these kernels), so edges are gradients rather than steps (issue 13).

Why hand-written: no library recovers the sampling lattice of an upscaled image; the model is textbook resampling
(Keys, "Cubic convolution interpolation for digital image processing", IEEE TASSP 29(6), 1981, eq. 15 with
a = −0.5, the kernel Pillow's ``BICUBIC`` uses — ``libImaging/Resample.c``, ``bicubic_filter``; Lanczos
(Duchon 1979) with a = 3 — ``lanczos_filter`` there; the triangle kernel for bilinear).

An interpolating kernel ``K`` (``K(0) = 1``, ``K(k) = 0`` at other integers) keeps the native colour at each
cell centre, and every pixel between centres is ``Σ_m K(t − m)·v[j+m] / Σ_m K(t − m)`` of the neighbouring centre
values. So a hypothesis (cell ``w`` px, first cut ``a`` px) is checked by sampling the image at the hypothesised
centres ``a + (k + ½)·w`` (linear interpolation between pixels), re-rendering every pixel with each kernel, and
counting the pixels that differ by more than a noise-adapted threshold (:func:`soft_residual`). The true lattice
re-renders the image almost exactly; a coarser one cannot (it misses native cells); a finer one also re-renders
it (it over-samples a band-limited signal) and loses on the harmonic rule of :mod:`.grid_cuts` (coarsest
explaining period) and the mixture test there. Phase and period are refined by a coarse-to-fine search on this
residual (:func:`fit_soft`), because a band-limited upscale (Lanczos) leaves almost no periodic energy in the
edge profile to read them from.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["KERNELS", "kernel_weights", "soft_residual", "fit_soft", "uniform_cuts"]

#: Interpolating kernels tried, with their taps relative to the centre left of a pixel.
KERNELS = {"linear": (0, 1), "cubic": (-1, 2), "lanczos3": (-2, 3)}
#: Sampled lines used while searching phase / period (the final residual uses all lines it is given).
SEARCH_LINES = 12


def _kernel(name: str, x: np.ndarray) -> np.ndarray:
    ax = np.abs(x)
    if name == "linear":
        return np.maximum(1.0 - ax, 0.0)
    if name == "cubic":  # Keys (1981) eq. 15, a = -0.5
        a = -0.5
        return np.where(ax <= 1, (a + 2) * ax**3 - (a + 3) * ax**2 + 1,
                        np.where(ax < 2, a * ax**3 - 5 * a * ax**2 + 8 * a * ax - 4 * a, 0.0))
    return np.where(ax < 3, np.sinc(x) * np.sinc(x / 3.0), 0.0)


_LUT_STEPS = 256
_LUT: dict = {}


def kernel_weights(name: str, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(offsets [taps] int64, weights [len(t), taps] float32)`` of kernel ``name`` (:data:`KERNELS`) for
    fractional positions ``t`` in [0, 1] between the centre on the left (offset 0) and the next; rows sum to 1.
    Read from a table at 1/256 steps (≤ 0.2 % weight error)."""
    lo, hi = KERNELS[name]
    m = np.arange(lo, hi + 1)
    if name not in _LUT:
        tt = np.arange(_LUT_STEPS + 1) / _LUT_STEPS
        w = _kernel(name, tt[:, None] - m[None, :])
        _LUT[name] = (w / w.sum(axis=1, keepdims=True)).astype(np.float32)
    return m, _LUT[name][np.rint(np.clip(t, 0.0, 1.0) * _LUT_STEPS).astype(np.int64)]


def _centre_values(lines: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Values of ``lines`` ``[3, r, L]`` at positions ``pos`` px (pixel ``i`` spans [i, i+1)), linear between
    pixel centres, clamped at the ends: float32 ``[3, r, len(pos)]``."""
    L = lines.shape[2]
    u = np.clip(pos - 0.5, 0.0, L - 1.0)
    i0 = np.minimum(np.floor(u).astype(np.int64), L - 2) if L > 1 else np.zeros(u.size, np.int64)
    t = (u - i0).astype(np.float32)
    a = lines[:, :, i0].astype(np.float32)
    if L < 2:
        return a
    return a + (lines[:, :, i0 + 1] - a) * t


def _render(lines: np.ndarray, a: float, w: float, kernels) -> list[tuple[str, np.ndarray]]:
    """Re-renderings ``[(kernel, float32 [c, r, L])]`` of the uniform lattice (first cut ``a``, cell ``w`` px)."""
    L = lines.shape[2]
    k0 = int(math.floor(-a / w)) - 4
    k1 = int(math.ceil((L - a) / w)) + 4
    ks = np.arange(k0, k1 + 1)
    vals = _centre_values(lines, a + (ks + 0.5) * w)
    u = (np.arange(L) + 0.5 - a) / w - 0.5 - k0
    j = np.floor(u).astype(np.int64)
    t = u - j
    out = []
    for name in kernels:
        m, wt = kernel_weights(name, t)
        idx = np.clip(j[:, None] + m[None, :], 0, ks.size - 1)
        out.append((name, np.einsum("crlm,lm->crl", vals[:, :, idx], wt, optimize=False)))
    return out


def soft_residual(lines: np.ndarray, a: float, w: float, thr: float, kernels=tuple(KERNELS)) -> tuple[float, str]:
    """Share of pixels of ``lines`` ``[3, r, L]`` int16 that differ (max channel, 0..255 units) by more than
    ``thr`` from the re-rendering of the uniform lattice (first cut ``a`` px, cell ``w`` px) with each kernel in
    ``kernels``; returns ``(smallest share 0..1, its kernel name)``. Cost O(3·r·L·taps) per kernel."""
    ref = lines.astype(np.float32)
    best = (1.0, "")
    for name, rec in _render(lines, a, w, kernels):
        r = float((np.abs(ref - rec).max(axis=0) > thr).mean())
        if r < best[0]:
            best = (r, name)
    return best


def _error(ref: np.ndarray, lines: np.ndarray, a: float, w: float, kernels) -> tuple[float, str]:
    """Search objective: mean of min(|error|, 48) over pixels and channels (continuous in phase and period,
    unlike the thresholded residual), for the best kernel."""
    best = (np.inf, "")
    for name, rec in _render(lines, a, w, kernels):
        e = float(np.minimum(np.abs(ref - rec), 48.0).mean())
        if e < best[0]:
            best = (e, name)
    return best


def uniform_cuts(length: int, a: float, w: float) -> np.ndarray:
    """Interior cuts ``a + k·w`` in [1, length − 1] px (float64)."""
    k = np.arange(int(math.floor((1.0 - a) / w)), int(math.ceil((length - 1.0 - a) / w)) + 1)
    c = a + k * w
    return c[(c >= 1.0) & (c <= length - 1.0)]


def _circ_phase(p: np.ndarray, pos: np.ndarray, w: float) -> float:
    z = np.sum(p * np.exp(2j * np.pi * pos / w))
    return float((np.angle(z) / (2 * np.pi) * w) % w)


def fit_soft(lines: np.ndarray, p1: np.ndarray, p2: np.ndarray, w: float, thr: float,
             refine_period: bool = True) -> tuple[np.ndarray, float, float, str]:
    """Best uniform soft lattice near period ``w`` px: ``(cuts, period, residual, kernel)``.

    Start phases: the energy-weighted circular mean of the boundary-energy profile ``p1`` at period ``w`` (soft
    edges are symmetric about the cut), that of the curvature profile ``p2`` minus half a cell (a bilinear
    upscale kinks at the centres) and four evenly spaced phases; the kernel is chosen there. Then, with
    ``refine_period``, a scan of the period over ±6 % (steps of 1 %, lattice centre fixed) and a coarse-to-fine
    coordinate search of phase (w/8 … w/64) and period (0.3 % … 0.04 %: a period off by δ moves the last of n
    cuts by n·δ·w). The search minimises the mean clipped re-rendering error on :data:`SEARCH_LINES` lines (one
    luminance-like channel mix); the returned residual is :func:`soft_residual` on all ``lines``."""
    L = lines.shape[2]
    sub = lines[:, :: max(1, lines.shape[1] // SEARCH_LINES)]
    sub = (sub[0] * 2 + sub[1] * 3 + sub[2] * 1)[None] // 6  # one channel: the search is linear in the signal
    sub = sub.astype(np.int16)
    ref = sub.astype(np.float32)
    pos = np.arange(p1.size, dtype=np.float64)
    starts = [w * k / 2 for k in range(2)]
    if p1.sum() > 0:
        starts.append(_circ_phase(p1, pos, w))
    if p2.sum() > 0:
        starts.append((_circ_phase(p2, pos - 0.5, w) - w / 2) % w)
    first = tuple(KERNELS) if refine_period else ("cubic",)
    scored = [(_error(ref, sub, a, w, first), a) for a in starts]
    (e, kern), a = min(scored, key=lambda s: s[0][0])
    if not refine_period:  # quick look: best start phase, no search
        r, kern = soft_residual(lines, a, w, thr)
        return uniform_cuts(L, a % w, w), float(w), float(r), kern
    kk = (kern,)
    ww = w
    mid = L / 2.0

    def at(a0, w0, w1):  # keep the lattice point nearest the frame centre fixed while the period changes
        return mid - (mid - a0) * w1 / w0

    if refine_period:
        a0, e0 = a, e
        for f in np.linspace(-0.06, 0.06, 13):
            if f == 0:
                continue
            a1 = at(a0, w, w * (1 + f))
            e1, _ = _error(ref, sub, a1, w * (1 + f), kk)
            if e1 < e:
                e, a, ww = e1, a1, w * (1 + f)
    for k in range(4 if refine_period else 2):
        step, rel = ww / (8 * 2**k), 0.003 / 2**k
        for _ in range(3):
            moved = False
            for da in (-step, step):
                e1, _ = _error(ref, sub, a + da, ww, kk)
                if e1 < e:
                    e, a, moved = e1, a + da, True
            if refine_period:
                for dw in (-rel * ww, rel * ww):
                    a1 = at(a, ww, ww + dw)
                    e1, _ = _error(ref, sub, a1, ww + dw, kk)
                    if e1 < e:
                        e, a, ww, moved = e1, a1, ww + dw, True
            if not moved:
                break
    r, kern = soft_residual(lines, a, ww, thr)
    return uniform_cuts(L, a % ww, ww), float(ww), float(r), kern
