"""Re-drawing a soft-upscaled image from a candidate cell lattice: the model :mod:`.grid_soft` judges lattices
by (issue 13). An interpolating kernel ``K`` (``K(0) = 1``, ``K(k) = 0`` at other integers) keeps the native
colour at each cell centre, and every pixel between centres is ``Σ_m K(t − m)·v[j+m] / Σ_m K(t − m)`` of the
neighbouring centre values; a lattice (cell ``w`` px, first cut ``a`` px) is checked by re-drawing every pixel
from its centre values — sampled (:func:`render`, cheap) or least-squares (:func:`redraw`, exact at kinked
centres) — and measuring what is left (:func:`soft_residual`, the ``_error*`` helpers).

Why hand-written: no library re-draws an image from a hypothesised sampling lattice at a fractional scale and
phase; the kernels are textbook resampling as Pillow implements them (``libImaging/Resample.c``:
``bilinear_filter`` (triangle), ``bicubic_filter`` — Keys, "Cubic convolution interpolation for digital image
processing", IEEE TASSP 29(6), 1981, eq. 15 with a = −0.5 —, ``lanczos_filter``, Duchon 1979, a = 3;
``precompute_coeffs``: output pixel ``x`` reads source pixel ``j`` with weight ``K(j + ½ − (x + ½)·in/out)``
normalised to sum 1) and as torch / OpenCV implement bicubic (a = −0.75: ``aten/src/ATen/native/UpSample.h``
``cubic_convolution1/2``, OpenCV ``interpolateCubic``).

All work is on 1-D lines (the kernels are separable and the lattice is global, so each row / column is re-drawn
on its own): arrays ``[r, L]`` or ``[..., L]`` of 0..255 values, positions in px (pixel ``i`` spans [i, i+1)).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.linalg import solveh_banded

__all__ = ["KERNELS", "ERROR_CLIP", "kernel_weights", "render", "redraw", "soft_residual", "uniform_cuts"]

#: Interpolating kernels tried, with their taps relative to the centre left of a pixel.
KERNELS = {"linear": (0, 1), "cubic": (-1, 2), "cubic75": (-1, 2), "lanczos3": (-2, 3)}
#: Re-drawing errors are clipped here (0..255 units) so one occluded spot cannot dominate.
ERROR_CLIP = 48.0


def _kernel(name: str, x: np.ndarray) -> np.ndarray:
    ax = np.abs(x)
    if name == "linear":
        return np.maximum(1.0 - ax, 0.0)
    if name in ("cubic", "cubic75"):  # Keys (1981) eq. 15: a = -0.5 (Pillow's bicubic_filter), a = -0.75 (torch
        a = -0.5 if name == "cubic" else -0.75  # upsample_bicubic2d, OpenCV INTER_CUBIC)
        return np.where(ax <= 1, (a + 2) * ax**3 - (a + 3) * ax**2 + 1,
                        np.where(ax < 2, a * ax**3 - 5 * a * ax**2 + 8 * a * ax - 4 * a, 0.0))
    return np.where(ax < 3, np.sinc(x) * np.sinc(x / 3.0), 0.0)  # Pillow's lanczos_filter, a = 3


_LUT_STEPS = 256
_LUT: dict = {}


def kernel_weights(name: str, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(offsets [taps] int64, weights [len(t), taps] float32)`` of kernel ``name`` (:data:`KERNELS`) for
    fractional positions ``t`` in [0, 1] between the centre on the left (offset 0) and the next; rows sum to 1
    (Pillow normalises its taps the same way). Read from a table at 1/256 steps (≤ 0.2 % weight error)."""
    lo, hi = KERNELS[name]
    m = np.arange(lo, hi + 1)
    if name not in _LUT:
        tt = np.arange(_LUT_STEPS + 1) / _LUT_STEPS
        w = _kernel(name, tt[:, None] - m[None, :])
        _LUT[name] = (w / w.sum(axis=1, keepdims=True)).astype(np.float32)
    return m, _LUT[name][np.rint(np.minimum(np.maximum(t, 0.0), 1.0) * _LUT_STEPS).astype(np.int64)]


_LUT_T: dict = {}


def _kernel_weights_t(name: str, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`kernel_weights` with the weights transposed: ``(offsets [taps], weights [taps, len(t)] float32)``,
    each tap's weights contiguous (the tap sums below multiply whole rows)."""
    if name not in _LUT_T:
        kernel_weights(name, np.zeros(1))
        _LUT_T[name] = np.ascontiguousarray(_LUT[name].T)
    lo, hi = KERNELS[name]
    i = np.rint(np.minimum(np.maximum(t, 0.0), 1.0) * _LUT_STEPS).astype(np.int64)
    return np.arange(lo, hi + 1), _LUT_T[name][:, i]


def _tap_sums(vals: np.ndarray, idx: np.ndarray, t: np.ndarray, kernels) -> dict:
    """Sampled re-drawings for several kernels sharing one gather: ``vals`` ``[r, M]`` centre values, ``idx``
    ``[N]`` the centre left of each output pixel (into ``vals``' last axis), ``t`` ``[N]`` its fraction to the
    next centre; returns ``{kernel: [r, N] float32}`` with ``out[:, x] = Σ_m w_m(t[x])·vals[:, idx[x] + m]``.
    The taps of every kernel in :data:`KERNELS` lie in −2…3, so one gather of those offsets serves all."""
    offs = range(min(KERNELS[k][0] for k in kernels), max(KERNELS[k][1] for k in kernels) + 1)
    hi = vals.shape[1] - 1
    G = {o: np.take(vals, np.clip(idx + o, 0, hi), axis=1) for o in offs}  # [r, N] per tap offset
    out = {}
    for name in kernels:
        m, W = _kernel_weights_t(name, t)
        o = G[int(m[0])] * W[0]
        for i in range(1, m.size):
            o += G[int(m[i])] * W[i]
        out[name] = o
    return out


def _abs_err(out: np.ndarray, sub: np.ndarray, msk: np.ndarray) -> np.ndarray:
    """``min(|out − sub|, ERROR_CLIP) · msk`` for ``out`` ``[r, P, L]`` against ``sub`` / ``msk`` ``[r, L]``,
    in place on ``out`` (float32)."""
    d = np.subtract(out, sub[:, None, :], out=out)
    np.abs(d, out=d)
    np.minimum(d, ERROR_CLIP, out=d)
    d *= msk[:, None, :]
    return d


def _centre_values(lines: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Values of ``lines`` ``[..., L]`` at positions ``pos`` ``[...]`` px (pixel ``i`` spans [i, i+1)), linear
    between pixel centres, clamped at the ends: float32 ``[..., *pos.shape]``."""
    L = lines.shape[-1]
    if L < 2:
        return np.repeat(lines[..., :1].astype(np.float32), pos.size, axis=-1).reshape(lines.shape[:-1] + pos.shape)
    u = np.minimum(np.maximum(pos - 0.5, 0.0), L - 1.0)
    i0 = np.minimum(np.floor(u).astype(np.int64), L - 2)
    t = (u - i0).astype(np.float32)
    a = lines[..., i0].astype(np.float32)
    return a + (lines[..., i0 + 1] - a) * t


def _lattice(L: int, a: float, w: float):
    """Centre indices ``ks``, the centre index left of each pixel (relative to ``ks[0]``) and the pixel's
    fraction of the way to the next centre, for the lattice with cuts at ``a + k·w`` on an axis of ``L`` px."""
    k0 = int(math.floor(-a / w)) - 4
    k1 = int(math.ceil((L - a) / w)) + 4
    ks = np.arange(k0, k1 + 1)
    u = (np.arange(L) + 0.5 - a) / w - 0.5 - k0
    j = np.floor(u).astype(np.int64)
    return ks, j, u - j


def render(lines: np.ndarray, a: float, w: float, kernel: str) -> np.ndarray:
    """Re-drawing of ``lines`` ``[..., L]`` (any leading shape, 0..255 values) from their values at the centres
    of the uniform lattice with cuts at ``a + k·w`` px, with interpolating ``kernel`` (:data:`KERNELS`):
    float32, same shape. Cost O(lines · L · taps)."""
    L = lines.shape[-1]
    ks, j, t = _lattice(L, a, w)
    vals = _centre_values(lines, a + (ks + 0.5) * w)
    m, wt = kernel_weights(kernel, t)
    out = np.zeros(lines.shape, np.float32)
    for i, off in enumerate(m):
        out += vals[..., np.minimum(np.maximum(j + off, 0), ks.size - 1)] * wt[:, i]
    return out


def _taps(L: int, a: float, w: float, kernel: str):
    """``(K centres, centre index of each pixel's first tap j [L] int64, tap offsets m, weights [L, taps])`` of
    the lattice with cuts at ``a + k·w``: pixel ``x`` = ``Σ_m wt[x, m]·v[j[x] + m]`` (Pillow's normalised kernel
    taps; the lattice extends 4 centres beyond each end, so every tap has its centre)."""
    ks, j, t = _lattice(L, a, w)
    m, wt = kernel_weights(kernel, t)
    return ks.size, j, m, wt.astype(np.float64)


_TRIU: dict = {}


def redraw(lines: np.ndarray, a: float, w: float, kernel: str) -> np.ndarray:
    """Least-squares re-drawing of ``lines`` ``[..., L]``: the centre values ``v`` minimising ``‖y − A·v‖²``
    (``A``: the kernel taps of :func:`_taps`; a small ridge for centres that only tails reach), then ``A·v``;
    float32, same shape. Unlike sampling the centres (:func:`render`), this is exact at a kinked centre (a
    bilinear spike) and sub-pixel in phase; a finer lattice fits at least as well, so callers take the coarsest
    that explains. ``A`` is banded and ``j`` non-decreasing, so ``AᵀA`` and ``Aᵀy`` are segmented sums per tap
    (pair) — no dense BLAS products (whose thread pools cost more than the work on a busy
    machine)."""
    L = lines.shape[-1]
    K, j, m, wt = _taps(L, a, w, kernel)
    Y = np.ascontiguousarray(lines.reshape(-1, L).T, dtype=np.float32)  # [L, n]
    cols = j[:, None] + m[None, :]  # [L, T]
    # AᵀA is symmetric and banded (half-bandwidth T − 1), kept as its upper bands in LAPACK's banded layout
    # (ab[T−1−d, c+d] = G[c, c+d]). Pixels with the same first tap j form one segment; j steps by 0 or 1 per
    # pixel (cells ≥ 1 px), so segment k's taps are centres j0 + k + m: per-segment sums of the tap-pair
    # products and of the weighted lines, added to AᵀA and Aᵀy as slices
    T = m.size
    iu, ju = _TRIU.get(T) or _TRIU.setdefault(T, np.triu_indices(T))
    starts = np.flatnonzero(np.r_[True, j[1:] != j[:-1]])
    S, j0 = starts.size, int(j[0])
    w32 = wt.astype(np.float32)
    ab = np.zeros((T, K))
    B = np.zeros((K, Y.shape[1]))
    seg = np.add.reduceat(Y[:, None, :] * w32[:, :, None], starts, axis=0)  # [segments, T, n]: every tap at once
    if int(j[-1]) - j0 == S - 1:
        pair = np.add.reduceat(wt[:, iu] * wt[:, ju], starts, axis=0)  # [segments, pairs]
        for p, (i0, i1) in enumerate(zip(iu.tolist(), ju.tolist())):
            c = j0 + int(m[i0]) + i1 - i0
            ab[T - 1 - (i1 - i0), c:c + S] += pair[:, p]
        for i in range(T):
            c = j0 + int(m[i])
            B[c:c + S] += seg[:, i]
    else:  # (a lattice finer than the pixels: general scatter)
        d = ju - iu
        ab = np.bincount((((T - 1 - d) * K)[None, :] + cols[:, ju]).ravel(), (wt[:, iu] * wt[:, ju]).ravel(),
                         minlength=T * K).reshape(T, K)
        for i in range(T):
            B[j[starts] + m[i]] += seg[:, i]
    ab[T - 1] += 1e-6 + 1e-9 * ab[T - 1].sum()
    # a banded Cholesky solve, O(K·T²) and single-threaded (a dense LAPACK solve on a few dozen centres wakes
    # OpenBLAS' thread pool, which on a busy machine costs up to tens of ms per call)
    try:
        V = solveh_banded(ab, B, check_finite=False).astype(np.float32)  # [K, n]
    except np.linalg.LinAlgError:
        G = np.zeros((K, K))
        for dd in range(T):
            G[np.arange(K - dd), np.arange(dd, K)] = ab[T - 1 - dd, dd:]
        V = np.linalg.solve(G + np.triu(G, 1).T, B).astype(np.float32)
    out = V[cols[:, 0]] * w32[:, 0, None]
    for i in range(1, m.size):
        out += V[cols[:, i]] * w32[:, i, None]
    return out.T.reshape(lines.shape)


def _clip_mask(sub: np.ndarray) -> np.ndarray:
    """Pixels whose value is not at the 0 / 255 ends (there Pillow clipped an overshoot; the model can't say)."""
    return (sub > 0.5) & (sub < 254.5)


def _error(sub: np.ndarray, a: float, w: float, kernel: str) -> float:
    """Mean least-squares re-drawing error (:func:`redraw`; |·| clipped at :data:`ERROR_CLIP`, 0..255 units;
    pixels at 0 / 255 left out) of ``sub`` ``[r, L]`` float32."""
    m = _clip_mask(sub)
    return float((np.minimum(np.abs(redraw(sub, a, w, kernel) - sub), ERROR_CLIP) * m).sum() / max(1, m.sum()))


def _errors_fast(sub: np.ndarray, a: float, w: float) -> tuple[float, str]:
    """``(smallest error, kernel)`` of :func:`_error_fast` over :data:`KERNELS` (centres sampled and their taps
    gathered once: the kernels' taps are nested, −2…3 ⊃ −1…2 ⊃ 0…1)."""
    return _errors_fast_lattices(sub, [(a, w)])[0]


def _lattices_sampled(sub: np.ndarray, lattices):
    """Shared set-up of the one-pass lattice errors: for ``sub`` ``[r, L]`` and lattices ``[(first cut, period),
    ...]`` (px), returns ``(vals [r, P·K], j [P, L] int64, t [P, L], K, P)``: the image sampled at each lattice's
    cell centres (K per lattice, 4 spare on each side), each pixel's cell index and its fraction within the cell
    (the same arithmetic as :func:`render`)."""
    L = sub.shape[-1]
    a = np.array([p[0] for p in lattices], np.float64)
    w = np.array([p[1] for p in lattices], np.float64)
    P = a.size
    k0 = np.floor(-a / w).astype(np.int64) - 4
    K = int((np.ceil((L - a) / w).astype(np.int64) + 4 - k0).max()) + 1
    ks = k0[:, None] + np.arange(K)[None, :]  # [P, K]
    vals = _centre_values(sub, a[:, None] + (ks + 0.5) * w[:, None]).reshape(sub.shape[0], P * K)
    u = (np.arange(L)[None, :] + 0.5 - a[:, None]) / w[:, None] - 0.5 - k0[:, None]  # [P, L]
    j = np.floor(u).astype(np.int64)
    return vals, j, u - j, K, P


def _errors_fast_lattices(sub: np.ndarray, lattices) -> list[tuple[float, str]]:
    """:func:`_errors_fast` for several lattices ``[(first cut, period), ...]`` in one pass (each lattice on its
    own centres, the same arithmetic as :func:`render`)."""
    L = sub.shape[-1]
    vals, j, frac, K, P = _lattices_sampled(sub, lattices)
    idx = (j + (np.arange(P) * K)[:, None]).ravel()
    outs = _tap_sums(vals, idx, frac.ravel(), tuple(KERNELS))
    msk = _clip_mask(sub)
    n = max(1, int(msk.sum()))
    best = [(np.inf, "")] * P
    for name, out in outs.items():
        e = _abs_err(out.reshape(sub.shape[0], P, L), sub, msk).sum((0, 2)) / n
        best = [(float(x), name) if x < b[0] else b for x, b in zip(e, best)]
    return best


def _error_fast(sub: np.ndarray, a: float, w: float, kernel: str) -> float:
    """Like :func:`_error` but re-drawing from the image sampled at the centres (:func:`render`, no solve):
    ~3× cheaper, biased up at kinked centres; used where only a loose comparison is needed (screening, phase
    scans)."""
    m = _clip_mask(sub)
    return float((np.minimum(np.abs(render(sub, a, w, kernel) - sub), ERROR_CLIP) * m).sum() / max(1, m.sum()))


def _errors_fast_many(sub: np.ndarray, lattices, kernel: str) -> list[float]:
    """:func:`_error_fast` of ``sub`` ``[r, L]`` for several lattices ``[(first cut, period), ...]`` in one pass
    (the same arithmetic as :func:`render` per lattice, each on its own centres)."""
    L = sub.shape[-1]
    vals, j, frac, K, P = _lattices_sampled(sub, lattices)
    out = _tap_sums(vals, (j + (np.arange(P) * K)[:, None]).ravel(), frac.ravel(), (kernel,))[kernel]
    m = _clip_mask(sub)
    e = _abs_err(out.reshape(sub.shape[0], P, L), sub, m).sum((0, 2))
    return [float(x) / max(1, int(m.sum())) for x in e]


def _nn_error(sub: np.ndarray, a: float, w: float) -> float:
    """Mean error (clipped like :func:`_error`) of the nearest-neighbour reconstruction of the same lattice
    (every pixel takes its cell's centre value): what a sharp render would show."""
    L = sub.shape[-1]
    ks, j, t = _lattice(L, a, w)
    vals = _centre_values(sub, a + (ks + 0.5) * w)
    rec = vals[..., np.clip(j + (t >= 0.5), 0, ks.size - 1)]
    return float(np.minimum(np.abs(rec - sub), ERROR_CLIP).mean())


def _nn_share(lines: np.ndarray, a: float, w: float, thr: float) -> float:
    """Share of pixels of ``lines`` ``[3, r, L]`` whose nearest-neighbour reconstruction (their cell's centre
    value) differs by more than ``thr`` (max channel): the soft ramps of the lattice."""
    L = lines.shape[-1]
    ks, j, t = _lattice(L, a, w)
    vals = _centre_values(lines, a + (ks + 0.5) * w)
    rec = vals[..., np.minimum(j + (t >= 0.5), ks.size - 1)]
    return float((np.abs(rec - lines).max(axis=0) > thr).mean())


def soft_residual(lines: np.ndarray, a: float, w: float, thr: float, kernels=tuple(KERNELS)) -> tuple[float, str]:
    """Share of pixels of ``lines`` ``[3, r, L]`` int16 that differ (max channel, 0..255 units) by more than
    ``thr`` from the re-drawing of the uniform lattice (first cut ``a`` px, cell ``w`` px) with each kernel in
    ``kernels``; returns ``(smallest share 0..1, its kernel name)``. Cost O(3·r·L·taps) per kernel."""
    ref = lines.astype(np.float32)
    best = (1.0, "")
    for name in kernels:
        r = float((np.abs(ref - redraw(ref, a, w, name)).max(axis=0) > thr).mean())
        if r < best[0]:
            best = (r, name)
    return best


def uniform_cuts(length: int, a: float, w: float) -> np.ndarray:
    """Interior cuts ``a + k·w`` in [1, length − 1] px (float64)."""
    k = np.arange(int(math.floor((1.0 - a) / w)), int(math.ceil((length - 1.0 - a) / w)) + 1)
    c = a + k * w
    return c[(c >= 1.0) & (c <= length - 1.0)]


def _phase_errors(sub: np.ndarray, w: float, kernel: str, phases: int) -> np.ndarray:
    """Per-pixel re-drawing error summed over lines, ``[phases, L]``, for cuts at ``(i / phases)·w``."""
    m = _clip_mask(sub)
    L = sub.shape[-1]
    # all phases in one pass (the same arithmetic as :func:`render` per phase, on one lattice wide enough for
    # every phase: its extra centres are never tapped)
    a = np.arange(phases) * (w / phases)
    k0 = int(math.floor(-a[-1] / w)) - 4
    ks = np.arange(k0, int(math.ceil(L / w)) + 5)
    u = (np.arange(L)[None, :] + 0.5 - a[:, None]) / w - 0.5 - k0  # [phases, L]
    j = np.floor(u).astype(np.int64)
    vals = _centre_values(sub, a[:, None] + (ks[None, :] + 0.5) * w)  # [r, phases, K]
    K = ks.size
    idx = (j + (np.arange(phases) * K)[:, None]).ravel()
    out = _tap_sums(vals.reshape(sub.shape[0], phases * K), idx, (u - j).ravel(), (kernel,))[kernel]
    return _abs_err(out.reshape(sub.shape[0], phases, L), sub, m).sum(0)
