"""The per-tensor statistics kernel of the weight diff (:mod:`.weight_diff`): Δ = B − A of one tensor streamed in
float32 chunks into float64 sums (:class:`Sums`, :func:`tensor_sums`), the sampled log10|Δ| histogram
(:class:`Histogram`), the effective rank of ΔW (:func:`effective_rank`) and the dtype helpers the reports use.

The arithmetic and its precision are described in :mod:`.weight_diff`'s docstring; :class:`Sums` recombine exactly
across tensors, which is how the grouped report is built.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch

CHUNK = 1 << 17  # elements per chunk (512 KiB as fp32): cache-sized, and Python overhead per op stays small

# log10 |Δ| histogram bins: 1e-12 .. 1e2 in 0.1-decade steps (values outside land in the edge bins)
HIST_LO, HIST_HI, HIST_BINS = -12.0, 2.0, 140
HIST_SAMPLE_STRIDE = 256  # tensors above CHUNK elements contribute every 256th |Δ| (weighted ×256)

#: mantissa bits (precision) of each float dtype
MANTISSA_BITS = {torch.float64: 53, torch.float32: 24, torch.float16: 11, torch.bfloat16: 8}
_DTYPE_NAMES = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class ShapeMismatchError(ValueError):
    """Tensors with the same name have different shapes on the two sides."""


def dtype_name(dtype: torch.dtype) -> str:
    """Short name of a torch dtype: ``fp16``, ``bf16``, ``fp32``, ``fp64``; else torch's own (``int64``...)."""
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def coarser_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """Of two float dtypes, the one with fewer mantissa bits (bf16 < fp16 < fp32 < fp64)."""
    return a if MANTISSA_BITS.get(a, 64) <= MANTISSA_BITS.get(b, 64) else b


@dataclass
class Sums:
    """Additive float64 sums of one tensor or one group (exact recombination across groups)."""

    params: int = 0
    tensors: int = 0
    identical_tensors: int = 0
    changed_params: int = 0          # elements of tensors that are not identical
    sum_abs: float = 0.0
    sum_d: float = 0.0
    sum_d2: float = 0.0
    sum_a2: float = 0.0
    sum_b2: float = 0.0
    sum_ab: float = 0.0
    max_abs: float = 0.0
    n_changed: int = 0               # elements with |Δ| > tolerance
    below_resolution: int = 0
    nonfinite_a: int = 0
    nonfinite_b: int = 0

    def add(self, o: "Sums") -> None:
        for f in ("params", "tensors", "identical_tensors", "changed_params", "sum_abs", "sum_d", "sum_d2",
                  "sum_a2", "sum_b2", "sum_ab", "n_changed", "below_resolution", "nonfinite_a", "nonfinite_b"):
            setattr(self, f, getattr(self, f) + getattr(o, f))
        self.max_abs = max(self.max_abs, o.max_abs)

    def stats(self, total: "Sums | None" = None) -> dict:
        """The report fields of these sums (see README for meanings); shares relative to ``total``."""
        n = self.params
        mean = self.sum_d / n if n else 0.0
        out = {
            "params": n,
            "tensors": self.tensors,
            "changed_tensors": self.tensors - self.identical_tensors,
            "identical_tensors": self.identical_tensors,
            "changed_params": self.changed_params,
            "mean_abs": self.sum_abs / n if n else 0.0,
            "mean_abs_changed": (self.sum_abs / self.changed_params) if self.changed_params else 0.0,
            "max_abs": self.max_abs,
            "std": math.sqrt(max(self.sum_d2 / n - mean * mean, 0.0)) if n else 0.0,
            "rms": math.sqrt(self.sum_d2 / n) if n else 0.0,
            "mean": mean,
            "rel_change": math.sqrt(self.sum_d2) / math.sqrt(self.sum_a2) if self.sum_a2 > 0 else None,
            "cosine": (self.sum_ab / math.sqrt(self.sum_a2 * self.sum_b2)) if self.sum_a2 > 0 and self.sum_b2 > 0
            else None,
            "frac_changed": self.n_changed / n if n else 0.0,
            "below_resolution": self.below_resolution,
            "nonfinite_a": self.nonfinite_a,
            "nonfinite_b": self.nonfinite_b,
            "sum_abs": self.sum_abs,
            "sum_sq": self.sum_d2,
        }
        if total is not None:
            out["param_share"] = n / total.params if total.params else 0.0
            out["change_share"] = self.sum_abs / total.sum_abs if total.sum_abs > 0 else 0.0
            out["energy_share"] = self.sum_d2 / total.sum_d2 if total.sum_d2 > 0 else 0.0
        return out


class Histogram:
    """Histogram of log10|Δ| over fixed bins (zeros counted apart); see HIST_* constants."""

    def __init__(self):
        self.counts = torch.zeros(HIST_BINS, dtype=torch.float64)
        self.zeros = 0

    def add(self, absd: torch.Tensor, weight: float) -> None:
        """Count the finite, non-negative values ``absd`` (float32, any shape), each standing for ``weight``."""
        if not absd.numel():
            return
        n0 = absd.numel() - int(torch.count_nonzero(absd))
        lg = torch.log10(absd).clamp_(HIST_LO, HIST_HI - 1e-6)  # zeros: -inf → first bin, taken out below
        h = torch.histc(lg, bins=HIST_BINS, min=HIST_LO, max=HIST_HI).double()
        h[0] -= n0
        self.counts += h * weight
        self.zeros += round(n0 * weight)

    def to_json(self) -> dict:
        step = (HIST_HI - HIST_LO) / HIST_BINS
        return {"log10_edges": [round(HIST_LO + i * step, 6) for i in range(HIST_BINS + 1)],
                "counts": [round(float(c)) for c in self.counts], "zeros": self.zeros,
                "sample_stride": HIST_SAMPLE_STRIDE,
                "note": f"log10|Δ| counts; tensors over {CHUNK} elements are sampled every "
                        f"{HIST_SAMPLE_STRIDE}th element (counts weighted back)"}


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1) if t.is_contiguous() else t.contiguous().reshape(-1)


def _bit_identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a is b:
        return True
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point() and a.element_size() in (2, 4, 8):
        iv = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(_flat(a).view(iv), _flat(b).view(iv))
    return torch.equal(a, b)


# Per-chunk partial results of the fast path (float32, one row per chunk, summed in float64 per tensor).
_F_MIN, _F_MAX, _F_SUM, _F_SQ, _F_A2, _F_AD, _F_ABS, _F_CNT = range(8)
_N_FIELDS = 8
_scratch = threading.local()


def _buffers(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three float32 scratch vectors of ``n`` elements, reused per thread (no allocation or page faults per
    chunk)."""
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None or bufs[0].numel() < n:
        bufs = tuple(torch.empty(max(n, CHUNK), dtype=torch.float32) for _ in range(3))
        _scratch.bufs = bufs
    return tuple(x[:n] for x in bufs)  # type: ignore[return-value]


def _chunk_rows(nchunks: int) -> tuple[torch.Tensor, list]:
    res = torch.empty(nchunks, _N_FIELDS, dtype=torch.float32)
    return res, [row.unbind() for row in res.unbind(0)]


def _fold(res: torch.Tensor, s: Sums) -> bool:
    """Add the per-chunk float32 partials ``res`` into ``s`` (float64); False if any partial is not finite."""
    r64 = res.double()
    if not bool(torch.isfinite(r64).all()):
        return False
    tot = r64.sum(0).tolist()
    lo, hi = float(r64[:, _F_MIN].min()), float(r64[:, _F_MAX].max())
    s.max_abs = max(s.max_abs, -lo, hi)
    sa2, sad, sd2 = tot[_F_A2], tot[_F_AD], tot[_F_SQ]
    s.sum_d += tot[_F_SUM]
    s.sum_d2 += sd2
    s.sum_a2 += sa2
    s.sum_ab += sa2 + sad                 # Σ A·B = Σ A² + Σ A·Δ
    s.sum_b2 += max(sa2 + 2.0 * sad + sd2, 0.0)  # Σ B² = Σ (A + Δ)²
    s.sum_abs += tot[_F_ABS]
    s.n_changed += round(tot[_F_CNT])
    return True


def tensor_sums(a: torch.Tensor | None, b: torch.Tensor | None, delta: torch.Tensor | None = None, *,
                tolerance: float = 0.0, resolution_dtype: torch.dtype | None = None,
                hist: Histogram | None = None, keep_delta: bool = False) -> tuple[Sums, torch.Tensor | None]:
    """Statistics sums of Δ = B − A for one tensor, streamed in float32 chunks with float64 accumulation.

    Args:
        a: A's weight (any float dtype/shape) or ``None`` (= zeros, e.g. a LoRA that does not touch the weight).
        b: B's weight (same shape) or ``None`` (= zeros); ignored when ``delta`` is given.
        delta: B − A directly (B = A + delta), float32 of A's shape (LoRA ΔW × strength).
        tolerance: |Δ| above it counts toward ``n_changed`` (0 ⇒ any non-zero change).
        resolution_dtype: count elements with Δ ≠ 0 whose A and B round to the same value in this dtype (exact
            count, every element).
        hist: optional histogram receiving |Δ| (every element for tensors of at most ``CHUNK`` elements, else
            every ``HIST_SAMPLE_STRIDE``-th element, weighted back).
        keep_delta: also return Δ as a float32 tensor of A's shape (for the effective rank).

    Returns:
        (``Sums``, Δ or ``None``). NaN/Inf elements (either side) are counted in ``nonfinite_a/b`` and excluded
        from every sum.

    Raises:
        ShapeMismatchError: shapes differ.

    Method (written here because no library computes these streamed multi-statistic reductions): each chunk of
    ``CHUNK`` elements is converted to float32 once into per-thread scratch buffers (A, Δ = B − A, work); then
    min/max of Δ (one ``aminmax`` pass), ΣΔ, ΣΔ², ΣA², ΣA·Δ, Σ|Δ| and the count of |Δ| > tolerance are one
    reduction each, every sum a pairwise (cascade) float32 ``torch.sum`` over the chunk (relative error ≈1e-7;
    BLAS ``sdot`` was measured at ≈1e-5 on 131,072 elements, so it is not used), written into a per-tensor table
    of float32 partials that is summed in float64. ΣB² and ΣA·B follow exactly from ΣA², ΣA·Δ, ΣΔ². A tensor with
    any non-finite partial is redone by the masked float64 path (:func:`_tensor_sums_masked`).
    """
    ref = a if a is not None else (delta if delta is not None else b)
    if ref is None:
        raise ValueError("tensor_sums needs at least one tensor")
    shape = tuple(ref.shape)
    for other in (b if delta is None else None, delta):
        if other is not None and tuple(other.shape) != shape:
            raise ShapeMismatchError(f"shape {tuple(other.shape)} vs {shape}")
    n = ref.numel()
    s = Sums(params=n, tensors=1)
    if n == 0:
        s.identical_tensors = 1
        return s, (torch.zeros(shape) if keep_delta else None)
    nchunks = (n + CHUNK - 1) // CHUNK
    if delta is None and a is not None and b is not None and _bit_identical(a, b):
        # fast path: identical tensors only need their norm (rel_change / cosine denominators)
        s.identical_tensors = 1
        fa = _flat(a)
        res, rows = _chunk_rows(nchunks)
        res.zero_()
        av, _, work = _buffers(min(n, CHUNK))
        for xa, r in zip(fa.split(CHUNK), rows):
            m = xa.numel()
            A, W = (av, work) if m == av.numel() else (av[:m], work[:m])
            A.copy_(xa)
            torch.sum(torch.mul(A, A, out=W), 0, out=r[_F_A2])
        if _fold(res, s):
            if hist is not None:
                hist.zeros += n
            return s, (torch.zeros(shape) if keep_delta else None)
        s = Sums(params=n, tensors=1)  # NaN/Inf: redo masked (identical flag from the masked path)
        return _tensor_sums_masked(a, b, None, s, tolerance, None, hist, keep_delta, identical=True)

    fa = _flat(a) if a is not None else None
    fb = _flat(b) if (b is not None and delta is None) else None
    fd = _flat(delta) if delta is not None else None
    out = torch.empty(n, dtype=torch.float32) if keep_delta else None
    res, rows = _chunk_rows(nchunks)
    res.zero_()
    lost_total = 0
    av, dv, work = _buffers(min(n, CHUNK))
    stride = 1 if n <= CHUNK else HIST_SAMPLE_STRIDE
    per = CHUNK // stride
    samples = torch.empty(nchunks * per, dtype=torch.float32) if hist is not None and stride > 1 else None
    sample_rows = samples.split(per) if samples is not None else [None] * nchunks
    # chunk views made in one call each (per-op Python/dispatcher overhead is a large part of the cost)
    ca = fa.split(CHUNK) if fa is not None else [None] * nchunks
    cd = fd.split(CHUNK) if fd is not None else (fb.split(CHUNK) if fb is not None else [None] * nchunks)
    co = out.split(CHUNK) if out is not None else [None] * nchunks
    for xa, xd, r, srow, orow in zip(ca, cd, rows, sample_rows, co):
        m = (xa if xa is not None else xd).numel()
        A, D, W = (av, dv, work) if m == av.numel() else (av[:m], dv[:m], work[:m])
        if xd is not None:
            D.copy_(xd)  # fp16/bf16/fp32 → fp32, once
        else:
            D.zero_()
        if xa is not None:
            A.copy_(xa)
            if fd is None:
                D.sub_(A)  # Δ = B − A (exact for fp16/bf16 inputs)
            torch.sum(torch.mul(A, A, out=W), 0, out=r[_F_A2])
            torch.sum(torch.mul(A, D, out=W), 0, out=r[_F_AD])
        torch.aminmax(D, out=(r[_F_MIN], r[_F_MAX]))
        torch.sum(D, 0, out=r[_F_SUM])
        torch.sum(torch.mul(D, D, out=W), 0, out=r[_F_SQ])
        torch.sum(torch.abs(D, out=W), 0, out=r[_F_ABS])
        if tolerance > 0:
            torch.gt(W, tolerance, out=W)  # W = |Δ| → 1.0 / 0.0
        else:
            torch.sign(W, out=W)  # |Δ| → 1.0 / 0.0
        torch.sum(W, 0, out=r[_F_CNT])  # exact: a chunk has < 2**24 elements
        if orow is not None:
            orow.copy_(D)
        if srow is not None:  # histogram sample while the chunk is in cache (CHUNK is a multiple of stride)
            k = (m + stride - 1) // stride
            (srow if k == per else srow[:k]).copy_(D[::stride])
        if resolution_dtype is not None:
            # exact, every element: changes that vanish when A and B are rounded to the coarser stored dtype
            av_ = A if xa is not None else torch.zeros_like(D)
            torch.add(av_, D, out=W)  # W = B
            lost = (D != 0) & (W.to(resolution_dtype) == av_.to(resolution_dtype))
            lost_total += int(torch.count_nonzero(lost))
    if not _fold(res, s):
        s = Sums(params=n, tensors=1)
        return _tensor_sums_masked(a, b, delta, s, tolerance, resolution_dtype, hist, keep_delta)
    s.below_resolution = lost_total
    if s.max_abs == 0.0:
        s.identical_tensors = 1  # value-identical (e.g. fp16 vs the same values in fp32, or an all-zero ΔW)
    else:
        s.changed_params = n
    if hist is not None:
        if samples is None:  # one chunk: D still holds all of Δ
            sample = D.abs()
        else:
            sample = samples[:(n + stride - 1) // stride].abs_()
        hist.add(sample, float(stride))
    return s, (out.view(shape) if out is not None else None)


def _tensor_sums_masked(a, b, delta, s: Sums, tolerance: float, resolution_dtype, hist, keep_delta: bool,
                        identical: bool = False) -> tuple[Sums, torch.Tensor | None]:
    """Slow path of :func:`tensor_sums` for tensors holding NaN/Inf (or whose float32 partials overflow):
    non-finite elements of either side are counted and masked out, everything else is summed in float64."""
    ref = a if a is not None else (delta if delta is not None else b)
    shape, n = tuple(ref.shape), ref.numel()
    fa = _flat(a) if a is not None else None
    fb = _flat(b) if (b is not None and delta is None) else None
    fd = _flat(delta) if delta is not None else None
    out = torch.empty(n, dtype=torch.float64) if keep_delta else None
    stride = 1 if n <= CHUNK else HIST_SAMPLE_STRIDE
    any_nonzero = False
    for i in range(0, n, CHUNK):
        j = min(i + CHUNK, n)
        af = fa[i:j].double() if fa is not None else torch.zeros(j - i, dtype=torch.float64)
        if fd is not None:
            d = fd[i:j].double()
            bf = af + d
        else:
            bf = fb[i:j].double() if fb is not None else torch.zeros(j - i, dtype=torch.float64)
            d = bf - af
        fin_a, fin_b = torch.isfinite(af), torch.isfinite(bf)
        if fd is not None:
            fin_b = fin_b & torch.isfinite(d)
        s.nonfinite_a += int((~fin_a).sum())
        s.nonfinite_b += int((~fin_b).sum())
        ok = fin_a & fin_b
        af = torch.where(ok, af, 0.0)
        bf = torch.where(ok, bf, 0.0)
        d = torch.where(ok, d, 0.0)
        absd = d.abs()
        s.max_abs = max(s.max_abs, float(absd.max()))
        s.sum_d += float(d.sum())
        s.sum_d2 += float(torch.dot(d, d))
        s.sum_a2 += float(torch.dot(af, af))
        s.sum_b2 += float(torch.dot(bf, bf))
        s.sum_ab += float(torch.dot(af, bf))
        s.sum_abs += float(absd.sum())
        s.n_changed += int(torch.count_nonzero(absd > tolerance)) if tolerance > 0 else int(torch.count_nonzero(d))
        any_nonzero = any_nonzero or bool((d != 0).any())
        if resolution_dtype is not None:
            lost = (d != 0) & (bf.to(resolution_dtype) == af.to(resolution_dtype))
            s.below_resolution += int(torch.count_nonzero(lost))
        if out is not None:
            out[i:j] = d
        if hist is not None:
            hist.add(absd[::stride].float() if stride > 1 else absd.float(), float(stride))
    if identical or not any_nonzero:
        s.identical_tensors = 1
    else:
        s.changed_params = n
    return s, (out.float().view(shape) if out is not None else None)


def effective_rank(delta: torch.Tensor, energy: float = 0.9, q: int = 64, niter: int = 2,
                   total_energy: float | None = None, seed: int = 0) -> tuple[int | None, bool]:
    """Number of singular values of ΔW holding ``energy`` of ‖ΔW‖F².

    Args:
        delta: ΔW, float32, ``[out, in]`` or conv ``[out, in, kh, kw]`` (flattened to ``[out, in·kh·kw]``); 1-D
            tensors give ``(None, False)``.
        energy: fraction of the squared Frobenius norm (0..1].
        q: number of singular values estimated by the randomized SVD (exact ``svdvals`` when min dim ≤ 2q).
        niter: subspace iterations of ``torch.svd_lowrank``.
        total_energy: ‖ΔW‖F² if known (else computed).
        seed: RNG seed (the global RNG state is preserved).

    Returns:
        ``(rank, lower_bound)``: ``lower_bound`` is True when the top-q singular values hold less than
        ``energy`` (the rank is then reported as "> q"). ``(0, False)`` for ΔW = 0.

    Source: randomized range finder + SVD, Halko, Martinsson & Tropp (2011), Algorithm 4.4/5.1, as implemented
    by ``torch.svd_lowrank``.
    """
    if delta.dim() < 2:
        return None, False
    m = delta.reshape(delta.shape[0], -1).float()
    tot = float(total_energy) if total_energy is not None else float(torch.dot(m.reshape(-1), m.reshape(-1)))
    if tot <= 0:
        return 0, False
    k = min(m.shape)
    if k <= 2 * q:
        sv = torch.linalg.svdvals(m.double())
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            _, sv, _ = torch.svd_lowrank(m, q=q, niter=niter)
        sv = sv.double()
    cum = torch.cumsum(sv * sv, 0) / tot
    hit = torch.nonzero(cum >= energy - 1e-12)
    if hit.numel():
        return int(hit[0, 0]) + 1, False
    return int(sv.numel()), True
