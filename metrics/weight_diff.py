"""Weight-diff analysis: what changed between two models, per tensor, layer type, block and component.

The statistics engine (:func:`diff_pairs`) consumes an iterator of :class:`TensorPair` — one weight at a time
from each side — and never needs either model whole. Sources:

* two checkpoint files (``.safetensors`` read zero-copy with bounded RSS, see :mod:`.diff_io`; ``.ckpt``/``.pt``
  only via ``torch.load(weights_only=True)``);
* a checkpoint and a LoRA file: B = A + strength·ΔW, with ΔW decoded by
  :func:`conceptlab.formats.lora_files.lora_deltas` (kohya, peft/diffusers, ComfyUI-native, ``.diff``);
* two LoRA files: their ΔW are compared with each other;
* in ComfyUI, two MODELs/CLIPs: ``nodes/diff.py`` feeds their *patched* weights key by key.

Per tensor (streamed in chunks of 131,072 elements converted to float32 once into reusable per-thread buffers;
every within-chunk sum is a pairwise float32 ``torch.sum``, relative error ≈1e-7, and the per-chunk partials are
added in float64 — whatever the stored dtype): mean |Δ|, max |Δ|, std of Δ (population), RMS, relative change
‖Δ‖F/‖W_a‖F, cosine similarity of the two weights, fraction of elements with |Δ| > tolerance, element count,
bit-identity (``torch.equal`` on the raw stored bits first), NaN/Inf counts, the exact number of non-zero changes
that vanish when rounded to the coarser dtype ("below resolution", every element), and optionally the effective
rank of ΔW (singular values holding 90 % of ‖Δ‖F², randomized SVD of Halko, Martinsson & Tropp 2011, "Finding
structure with randomness", via ``torch.svd_lowrank``; bounded by a time budget). Only the |Δ| histogram is
sampled (every 256th element of tensors over one chunk, weighted back; stated in the report).

Aggregates (``by_layer_type``, ``by_block``, ``by_component``, ``overall``) are exact re-combinations of the
per-tensor sums (Σ|Δ|, ΣΔ, ΣΔ², ΣW_a², ΣW_b², ΣW_a·W_b): std = sqrt(ΣΔ²/N − (ΣΔ/N)²), rel_change =
sqrt(ΣΔ²)/sqrt(ΣW_a²), cosine = ΣW_a·W_b / sqrt(ΣW_a² ΣW_b²). No library computes this grouped, streamed
report, so the arithmetic is written here; each statistic is one torch reduction per chunk.

The report is a JSON-able dict; its schema is ``SCHEMA`` (documented in the README section of this capability).
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import torch

from ..formats.safetensors_io import WeightFileError

SCHEMA = "conceptlab.weight_diff/1"
COMPARE_SCHEMA = "conceptlab.weight_diff_compare/1"
CHUNK = 1 << 17  # elements per chunk (512 KiB as fp32): cache-sized, and Python overhead per op stays small

# log10 |Δ| histogram bins: 1e-12 .. 1e2 in 0.1-decade steps (values outside land in the edge bins)
HIST_LO, HIST_HI, HIST_BINS = -12.0, 2.0, 140
HIST_SAMPLE_STRIDE = 256  # tensors above CHUNK elements contribute every 256th |Δ| (weighted ×256)

_MANTISSA_BITS = {torch.float64: 53, torch.float32: 24, torch.float16: 11, torch.bfloat16: 8}
_DTYPE_NAMES = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class ArchitectureMismatchError(ValueError):
    """The two inputs are different model families (e.g. SD1.5 vs SDXL) and cannot be diffed key by key."""


class ShapeMismatchError(ValueError):
    """Tensors with the same name have different shapes on the two sides."""


def dtype_name(dtype: torch.dtype) -> str:
    """Short name of a torch dtype: ``fp16``, ``bf16``, ``fp32``, ``fp64``; else torch's own (``int64``...)."""
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def coarser_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """Of two float dtypes, the one with fewer mantissa bits (bf16 < fp16 < fp32 < fp64)."""
    return a if _MANTISSA_BITS.get(a, 64) <= _MANTISSA_BITS.get(b, 64) else b


# --------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------
@dataclass
class TensorPair:
    """One weight seen from both sides.

    Attributes:
        key: canonical key used for classification (LDM checkpoint spelling, e.g.
            ``model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight``).
        a: weight on side A (any float dtype, any shape) or ``None``.
        b: weight on side B, or ``None``. ``a is b`` marks a tensor known to be unchanged.
        delta: instead of ``b``: B = A + delta (float32, shape of ``a``; LoRA ΔW already × strength).
        only_in: ``"a"`` / ``"b"`` when the key exists on one side only (listed in ``only_in_a``/``only_in_b``);
            such a pair is counted in the statistics only if tensors are given (e.g. a partial file: b = a).
        resolution_dtype: if set, count non-zero changes that vanish when A and B are rounded to this dtype.
        shape: shape to report when no tensor is given.
        on_done: called (from a worker thread) once the pair's statistics are computed, e.g. to drop the
            tensors' pages from memory.
    """

    key: str
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    delta: torch.Tensor | None = None
    only_in: str | None = None
    resolution_dtype: torch.dtype | None = None
    shape: tuple[int, ...] | None = None
    on_done: Callable[[], None] | None = None


@dataclass
class _Sums:
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

    def add(self, o: "_Sums") -> None:
        for f in ("params", "tensors", "identical_tensors", "changed_params", "sum_abs", "sum_d", "sum_d2",
                  "sum_a2", "sum_b2", "sum_ab", "n_changed", "below_resolution", "nonfinite_a", "nonfinite_b"):
            setattr(self, f, getattr(self, f) + getattr(o, f))
        self.max_abs = max(self.max_abs, o.max_abs)

    def stats(self, total: "_Sums | None" = None) -> dict:
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


class _Histogram:
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


def _fold(res: torch.Tensor, s: _Sums) -> bool:
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
                hist: _Histogram | None = None, keep_delta: bool = False) -> tuple[_Sums, torch.Tensor | None]:
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
        (``_Sums``, Δ or ``None``). NaN/Inf elements (either side) are counted in ``nonfinite_a/b`` and excluded
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
    s = _Sums(params=n, tensors=1)
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
        s = _Sums(params=n, tensors=1)  # NaN/Inf: redo masked (identical flag from the masked path)
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
        s = _Sums(params=n, tensors=1)
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


def _tensor_sums_masked(a, b, delta, s: _Sums, tolerance: float, resolution_dtype, hist, keep_delta: bool,
                        identical: bool = False) -> tuple[_Sums, torch.Tensor | None]:
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


# --------------------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------------------
@dataclass
class DiffOptions:
    """Options of :func:`diff_pairs` (all optional).

    tolerance: |Δ| threshold for ``frac_changed`` (default 0: any change); top_n: most changed tensors listed;
    rank: compute the effective rank of each changed ≥2-D ΔW; rank_energy (0.9); rank_time_budget_s: wall-clock
    budget for all rank computations (later tensors are skipped and counted); rank_q: singular values estimated.
    include_tensors: put every tensor's row in the JSON (``tensors``).
    workers: tensors processed in parallel by a thread pool (0: min(4, 2 × CPU count), so disk reads by page
    fault in one worker overlap with arithmetic in another); torch runs single-threaded
    inside each worker during the pass (restored after): per-op OpenMP barriers on 131,072-element chunks cost
    more than they save, and stall badly when the machine is busy (measured 25× slower on a loaded 2-core box).
    """

    tolerance: float = 0.0
    top_n: int = 20
    rank: bool = False
    rank_energy: float = 0.9
    rank_time_budget_s: float = 60.0
    rank_q: int = 64
    include_tensors: bool = True
    workers: int = 0


def _default_classifier(arch: str) -> Callable[[str], tuple[str, str | None, str]]:
    from ..formats.keys import classify_key

    def classify(key: str):
        info = classify_key(key, arch)
        return info.component, info.block, info.layer_type

    return classify


def diff_pairs(pairs: Iterable[TensorPair], *, arch: str = "unknown", options: DiffOptions | None = None,
               classify: Callable[[str], tuple[str, str | None, str]] | None = None,
               a_info: Mapping | None = None, b_info: Mapping | None = None, mode: str = "pairs",
               notes: Iterable[str] = (), progress: Callable[[int, int], None] | None = None,
               total: int | None = None, extra: Mapping | None = None) -> dict:
    """Stream tensor pairs through the statistics and build the report dict (schema :data:`SCHEMA`).

    Args:
        pairs: :class:`TensorPair` items, consumed one at a time (a generator may free each pair's memory when
            resumed).
        arch: architecture used for block ids (``formats.keys.classify_key``).
        options: :class:`DiffOptions`.
        classify: ``key -> (component, block, layer_type)``; default ``formats.keys.classify_key(key, arch)``.
        a_info / b_info: descriptions of the two sides (name, kind, arch, dtypes...), copied into the report.
        mode: "checkpoints" | "checkpoint+lora" | "loras" | "models" (free text, copied).
        notes: human-readable remarks to include.
        progress: called as ``progress(done, total)`` after each pair.
        total: number of pairs expected (for ``progress``).
        extra: more top-level fields to copy into the report.

    Returns:
        The report dict (JSON-serialisable).

    Raises:
        ShapeMismatchError: a pair's shapes differ (the key is named).
    """
    opt = options or DiffOptions()
    classify = classify or _default_classifier(arch)
    t0 = time.perf_counter()
    overall = _Sums()
    groups: dict[str, dict[str, _Sums]] = {"by_layer_type": {}, "by_block": {}, "by_component": {}}
    cells: dict[tuple[str, str], _Sums] = {}
    rows: list[dict] = []
    only_in = {"a": [], "b": []}
    hist = _Histogram()
    dtypes_a: dict[str, int] = {}
    dtypes_b: dict[str, int] = {}
    rank_computed = rank_skipped = 0
    rank_deadline = t0 + opt.rank_time_budget_s
    done = 0

    def work(p: TensorPair):
        try:
            h = _Histogram()
            s, dfull = tensor_sums(p.a, p.b, p.delta, tolerance=opt.tolerance,
                                   resolution_dtype=p.resolution_dtype, hist=h, keep_delta=opt.rank)
            return s, dfull, h
        except ShapeMismatchError as exc:
            raise ShapeMismatchError(f"{p.key}: {exc}") from None
        finally:
            if p.on_done is not None:
                p.on_done()

    def consume(p: TensorPair, result) -> None:
        nonlocal done, rank_computed, rank_skipped
        done += 1
        if p.only_in:
            only_in[p.only_in].append(p.key)
        if result is not None:
            s, dfull, h = result
            hist.counts += h.counts
            hist.zeros += h.zeros
            comp, block, ltype = classify(p.key)
            for t, dd in ((p.a, dtypes_a), (p.b if p.delta is None else p.a, dtypes_b)):
                if t is not None:
                    dn = dtype_name(t.dtype)
                    dd[dn] = dd.get(dn, 0) + t.numel()
            overall.add(s)
            for gname, gkey in (("by_layer_type", ltype), ("by_block", block or "none"),
                                ("by_component", comp)):
                groups[gname].setdefault(gkey, _Sums()).add(s)
            cells.setdefault((block or "none", ltype), _Sums()).add(s)
            row = {"key": p.key, "component": comp, "block": block, "layer_type": ltype,
                   "shape": list((p.a if p.a is not None else (p.delta if p.delta is not None else p.b)).shape)}
            row.update({k: v for k, v in s.stats().items()
                        if k not in ("tensors", "changed_tensors", "identical_tensors", "changed_params", "sum_sq")})
            row["identical"] = bool(s.identical_tensors)
            if opt.rank and dfull is not None and not s.identical_tensors and dfull.dim() >= 2:
                if time.perf_counter() < rank_deadline:
                    r, lb = effective_rank(dfull, opt.rank_energy, q=opt.rank_q, total_energy=s.sum_d2)
                    row["effective_rank"] = r
                    row["effective_rank_lower_bound"] = lb
                    rank_computed += 1
                else:
                    row["effective_rank"] = None
                    rank_skipped += 1
            rows.append(row)
        if progress is not None:
            progress(done, total or done)

    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    workers = opt.workers if opt.workers > 0 else min(4, 2 * (os.cpu_count() or 1))
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="weight_diff")
    inflight: deque = deque()
    try:
        for p in pairs:
            counted = p.a is not None or p.b is not None or p.delta is not None
            inflight.append((p, pool.submit(work, p) if counted else None))
            while len(inflight) > workers + 1:
                q, fut = inflight.popleft()
                consume(q, fut.result() if fut is not None else None)
        while inflight:
            q, fut = inflight.popleft()
            consume(q, fut.result() if fut is not None else None)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(prev_threads)

    if overall.tensors == 0:
        raise ValueError("nothing to compare: the two inputs have no tensors in common")
    report: dict = {"schema": SCHEMA, "mode": mode, "arch": arch,
                    "a": dict(a_info or {}), "b": dict(b_info or {}),
                    "tolerance": opt.tolerance}
    if dtypes_a:
        report["a"].setdefault("dtype", max(dtypes_a, key=dtypes_a.get))
        report["a"].setdefault("dtype_params", dtypes_a)
    if dtypes_b:
        report["b"].setdefault("dtype", max(dtypes_b, key=dtypes_b.get))
        report["b"].setdefault("dtype_params", dtypes_b)
    report["overall"] = overall.stats(overall)
    for gname, g in groups.items():
        report[gname] = {k: v.stats(overall) for k, v in sorted(g.items(), key=lambda kv: _group_order(gname, kv[0],
                                                                                                     arch))}
    report["by_block_layer_type"] = {
        blk: {lt: cells[(blk, lt)].stats(overall)["mean_abs"] for (b2, lt) in sorted(cells) if b2 == blk}
        for blk in report["by_block"]}
    changed_rows = [r for r in rows if not r["identical"]]
    report["top_tensors"] = [
        {k: r[k] for k in ("key", "component", "block", "layer_type", "params", "mean_abs", "max_abs", "rms",
                           "rel_change", "frac_changed") if k in r}
        for r in sorted(changed_rows, key=lambda r: r["mean_abs"], reverse=True)[: max(opt.top_n, 0)]]
    report["only_in_a"] = only_in["a"]
    report["only_in_b"] = only_in["b"]
    report["identical_tensors"] = overall.identical_tensors
    report["changed_tensors"] = overall.tensors - overall.identical_tensors
    report["below_resolution"] = overall.below_resolution
    nonfin = {"a": {r["key"]: r["nonfinite_a"] for r in rows if r["nonfinite_a"]},
              "b": {r["key"]: r["nonfinite_b"] for r in rows if r["nonfinite_b"]}}
    report["nonfinite"] = nonfin
    report["histogram"] = hist.to_json()
    if opt.rank:
        report["rank"] = {"energy": opt.rank_energy, "q": opt.rank_q, "computed": rank_computed,
                          "skipped_time_budget": rank_skipped, "time_budget_s": opt.rank_time_budget_s}
    notes = list(notes)
    if nonfin["a"] or nonfin["b"]:
        notes.append(f"NaN/Inf found: {sum(nonfin['a'].values())} elements in A "
                     f"({len(nonfin['a'])} tensors), {sum(nonfin['b'].values())} in B ({len(nonfin['b'])} tensors); "
                     "they are excluded from every statistic.")
    if overall.below_resolution:
        notes.append(f"{overall.below_resolution} changed elements "
                     f"({overall.below_resolution / max(overall.n_changed, 1):.1%} of changed elements) are below the "
                     "resolution of the stored dtype: rounding the changed weight to that dtype gives back the "
                     "original value, so these changes are lost when the result is stored in that dtype.")
    if rank_skipped:
        notes.append(f"effective rank skipped for {rank_skipped} tensors (time budget "
                     f"{opt.rank_time_budget_s:g} s spent).")
    report["notes"] = notes
    if extra:
        report.update(extra)
    if opt.include_tensors:
        report["tensors"] = rows
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return report


def _group_order(gname: str, key: str, arch: str):
    if gname == "by_block":
        from ..formats.keys import BLOCK_IDS

        ids = BLOCK_IDS.get(arch) or []
        return (0, ids.index(key), "") if key in ids else (1 if key != "none" else 2, 0, key)
    if gname == "by_component":
        order = ["unet", "te", "te1", "te2", "vae", "other"]
        return (order.index(key) if key in order else 99, 0, key)
    return (0, 0, key)


# --------------------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------------------
def looks_like_lora(keys: Iterable[str]) -> bool:
    """True when at least half the tensor names end like LoRA tensors (the suffix table of
    ``formats.lora_files.SUFFIXES``: kohya ``lora_down/lora_up/alpha``, peft ``lora_A/lora_B``, LoHa/LoKr,
    ``.diff``/``.diff_b`` full-rank deltas)."""
    from ..formats.lora_files import SUFFIXES

    keys = list(keys)
    if not keys:
        return False
    ends = tuple(SUFFIXES)
    hits = sum(1 for k in keys if k.endswith(ends))
    return hits >= max(1, (len(keys) + 1) // 2)


_DIFFUSERS_UNET_HEADS = ("down_blocks.", "up_blocks.", "mid_block.", "conv_in.", "conv_out.", "conv_norm_out.",
                         "time_embedding.", "add_embedding.", "class_embedding.")


def canonical_keys(keys: Iterable[str], arch: str) -> dict[str, str]:
    """Map a file's tensor names to canonical single-file LDM keys: ``diffusion_model.*`` (ComfyUI state dicts)
    → ``model.diffusion_model.*``; bare or ``unet.``-prefixed diffusers UNet names → LDM names via
    ``formats.keys.diffusers_to_ldm_unet`` (diffusers' own converter). Other keys are kept.

    Returns ``canonical key -> original key``. Raises ``ValueError`` if two names map to the same key.
    """
    from ..formats.keys import diffusers_to_ldm_unet

    keys = list(keys)
    d2l = None
    out: dict[str, str] = {}
    for k in keys:
        c = k
        if k.startswith("diffusion_model."):
            c = "model." + k
        else:
            rel = k[len("unet."):] if k.startswith("unet.") else k
            if rel.startswith(_DIFFUSERS_UNET_HEADS) and arch in ("sd1", "sd2", "sdxl"):
                if d2l is None:
                    d2l = diffusers_to_ldm_unet(arch)
                if rel in d2l:
                    c = "model.diffusion_model." + d2l[rel]
        if c in out:
            raise ValueError(f"two tensors map to the same key {c!r}: {out[c]!r} and {k!r}")
        out[c] = k
    return out


def _file_info(reader, kind: str, arch: str, fmt: str | None = None) -> dict:
    info = {"name": reader.name, "kind": kind, "arch": arch}
    if getattr(reader, "path", None) is not None:
        info["path"] = str(reader.path)
    counts: dict[str, int] = {}
    params = 0
    for k in reader.keys():
        n = 1
        for s in reader.shape(k):
            n *= int(s)
        dn = dtype_name(_stored_dtype(reader, k))
        counts[dn] = counts.get(dn, 0) + n
        params += n
    info["file_dtype_params"] = counts
    info["file_dtype"] = max(counts, key=counts.get) if counts else None
    info["file_tensors"] = len(reader.keys())
    info["file_params"] = params
    if getattr(reader, "format", None):
        info["format"] = reader.format
    if fmt is not None:
        info["lora_format"] = fmt
    return info


def _arch_mismatch(name_a: str, arch_a: str, name_b: str, arch_b: str, only_a: list[str], only_b: list[str],
                   shape_diff: list[str]) -> ArchitectureMismatchError:
    bits = [f"cannot diff {name_a} ({arch_a}) against {name_b} ({arch_b}): different model architectures"]
    if only_a:
        bits.append(f"keys only in {name_a}: " + ", ".join(only_a[:3]) + (" ..." if len(only_a) > 3 else ""))
    if only_b:
        bits.append(f"keys only in {name_b}: " + ", ".join(only_b[:3]) + (" ..." if len(only_b) > 3 else ""))
    if shape_diff:
        bits.append("same keys, different shapes: " + "; ".join(shape_diff[:3]))
    return ArchitectureMismatchError(". ".join(bits))


def _shape_lines(keys: list[str], sa, sb) -> list[str]:
    return [f"{k} {tuple(sa(k))} vs {tuple(sb(k))}" for k in keys]


def _arch_of_reader(r) -> str:
    from ..formats.keys import detect_architecture

    keys = r.keys()
    shapes = {k: r.shape(k) for k in keys if "attn2" in k and "to_k" in k}
    return detect_architecture(keys, shapes)


def _flux_canonical(reader, arch: str):
    """A Flux checkpoint in any layout (BFL, ComfyUI, diffusers) seen under canonical ``model.diffusion_model.``
    BFL keys, split q/k/v fused (``formats.flux_views.FluxKeyView``); other readers unchanged."""
    if arch != "flux":
        return reader
    from ..formats.flux_views import FluxKeyView

    return FluxKeyView(reader)


def _load_lora(path: Path, strength: float, arch: str | None, flux_dims=None):
    from ..formats.lora_files import LoraFormatError, lora_deltas

    try:
        ld = lora_deltas(path, strength=strength, arch=arch, flux_dims=flux_dims)
    except LoraFormatError as exc:
        msg = str(exc)
        raise ValueError(msg if path.name in msg else f"{path.name}: {msg}") from None
    if not ld.deltas:
        why = ""
        if ld.skipped:
            items = list(ld.skipped.items())[:3]
            why = " (skipped: " + "; ".join(f"{k}: {v}" for k, v in items) + ")"
        raise ValueError(f"{path.name}: the LoRA holds no weight changes that can be decoded{why}")
    return ld


def diff_files(path_a: str | os.PathLike, path_b: str | os.PathLike, *, lora_strength: float = 1.0,
               options: DiffOptions | None = None, allow_shape_mismatch: bool = False,
               progress: Callable[[int, int], None] | None = None) -> dict:
    """Diff two weight files (checkpoint vs checkpoint, checkpoint vs LoRA, LoRA vs LoRA) in one streamed pass.

    Args:
        path_a, path_b: ``.safetensors`` (or weights-only ``.ckpt/.pt/.bin``) checkpoints or LoRA files, or diffusers
            model folders (``transformer/``, sharded or not; a pipeline folder means its ``transformer/``). Flux
            checkpoints in BFL, ComfyUI and diffusers layouts line up (``formats.flux_keys``). Kinds are
            detected from tensor names. With one checkpoint and one LoRA the checkpoint is the base (A) and
            B = A + ``lora_strength``·ΔW, whichever order they were given in.
        lora_strength: multiplier of every LoRA ΔW (kohya/ComfyUI semantics: ΔW = strength·alpha/rank·up·down).
        options: :class:`DiffOptions`.
        allow_shape_mismatch: list same-name tensors with different shapes (``shape_mismatch``) and skip them
            instead of raising.
        progress: ``progress(done, total)`` callback.

    Returns:
        The report dict (see :func:`diff_pairs`).

    Raises:
        FileNotFoundError; WeightFileError (corrupt/truncated/pickle-only file); ArchitectureMismatchError
        (e.g. SD1.5 vs SDXL: names both architectures and a few mismatched keys); ShapeMismatchError;
        ValueError (empty LoRA, nothing in common).
    """
    from .diff_io import StreamingWeights

    from ..formats.weight_folders import open_weight_source

    pa, pb = Path(path_a), Path(path_b)
    ra = open_weight_source(pa, StreamingWeights)  # a diffusers model folder (shards) reads as one file
    try:
        rb = open_weight_source(pb, StreamingWeights)
    except BaseException:
        ra.close()
        raise
    try:
        for r in (ra, rb):
            if not r.keys():
                raise WeightFileError(f"{r.path.name}: holds no tensors")
        lora_a, lora_b = looks_like_lora(ra.keys()), looks_like_lora(rb.keys())
        if not lora_a and not lora_b:
            return diff_sources(ra, rb, options=options, allow_shape_mismatch=allow_shape_mismatch,
                                progress=progress)
        if lora_a and lora_b:
            return _diff_loras(ra, rb, lora_strength, options, progress)
        ck, lo = (rb, ra) if lora_a else (ra, rb)
        return _diff_checkpoint_lora(ck, lo, lora_strength, options, progress, swapped=lora_a)
    finally:
        ra.close()
        rb.close()


def _stored_dtype(src, key: str) -> torch.dtype:
    try:
        return src.dtype(key)
    except Exception:  # noqa: BLE001 - sources without dtype info
        return torch.float32


def diff_sources(ra, rb, *, options: DiffOptions | None = None, allow_shape_mismatch: bool = False,
                 progress: Callable[[int, int], None] | None = None, mode: str = "checkpoints",
                 kind: str = "checkpoint", a_info: Mapping | None = None, b_info: Mapping | None = None) -> dict:
    """Diff two tensor sources key by key (two checkpoints, or two ComfyUI MODEL/CLIP weight readers).

    Args:
        ra, rb: sources with ``name`` (str), ``keys()``, ``shape(key)``, ``dtype(key)`` (stored dtype),
            ``get(key) -> Tensor`` and ``release(key)`` (called when the pair is done; may free memory), e.g.
            :class:`.diff_io.StreamingWeights`. ``get`` may return float32 values of a lower-precision stored
            weight (patched weights): changes that vanish in the stored dtype are then counted
            (``below_resolution``), as they are when the two files' dtypes differ.
        options, progress: see :func:`diff_pairs`.
        allow_shape_mismatch: list and skip same-name tensors of different shapes instead of raising.
        mode, kind: labels in the report; a_info / b_info: extra fields for the ``a`` / ``b`` descriptions.

    Key names are canonicalised (:func:`canonical_keys`), so an LDM single file, a ComfyUI-saved file, a ComfyUI
    MODEL state dict and a diffusers UNet file of the same model line up. When one side's keys are a strict
    subset of the other's (a partial file such as an ESD or UNet-only output), the missing tensors are counted
    as unchanged and the report says so.

    Raises:
        ArchitectureMismatchError: the sides are different families (names both and a few mismatched keys).
        ShapeMismatchError: same-name tensors with different shapes (unless ``allow_shape_mismatch``).
        ValueError: no key in common.
    """
    arch_a, arch_b = _arch_of_reader(ra), _arch_of_reader(rb)
    file_a, file_b = ra, rb
    ra, rb = _flux_canonical(ra, arch_a), _flux_canonical(rb, arch_b)
    ca = canonical_keys(ra.keys(), arch_a)
    cb = canonical_keys(rb.keys(), arch_b)
    only_a = [k for k in ca if k not in cb]
    only_b = [k for k in cb if k not in ca]
    common = [k for k in ca if k in cb]
    shape_diff = [k for k in common if tuple(ra.shape(ca[k])) != tuple(rb.shape(cb[k]))]
    na, nb = ra.name, rb.name
    if arch_a != arch_b and "unknown" not in (arch_a, arch_b):
        raise _arch_mismatch(na, arch_a, nb, arch_b, only_a, only_b,
                             _shape_lines(shape_diff, lambda k: ra.shape(ca[k]), lambda k: rb.shape(cb[k])))
    arch = arch_a if arch_a != "unknown" else arch_b
    if not common:
        raise ValueError(f"{na} and {nb} have no tensor names in common (e.g. {only_a[:2]} vs {only_b[:2]}); "
                         "they are not two versions of one model")
    if shape_diff and not allow_shape_mismatch:
        raise ShapeMismatchError(
            f"{len(shape_diff)} tensors have the same name but different shapes in {na} and {nb}: "
            + "; ".join(_shape_lines(shape_diff[:5], lambda k: ra.shape(ca[k]), lambda k: rb.shape(cb[k])))
            + (" ..." if len(shape_diff) > 5 else "") + " (use --skip-mismatched to diff the rest)")
    notes = []
    partial_b = bool(only_a) and not only_b
    partial_a = bool(only_b) and not only_a
    if partial_b:
        notes.append(f"{nb} holds {len(common)} of {na}'s {len(ca)} tensors: a partial file (e.g. an ESD or "
                     f"UNet-only output). The rest is unchanged: the {len(only_a)} missing tensors are counted as "
                     "identical to A.")
    elif partial_a:
        notes.append(f"{na} holds {len(common)} of {nb}'s {len(cb)} tensors: a partial file. The rest is "
                     f"unchanged: the {len(only_b)} missing tensors are counted as identical to B.")
    elif only_a or only_b:
        notes.append(f"{len(only_a)} tensors only in A and {len(only_b)} only in B are listed but not compared.")
    if shape_diff:
        notes.append(f"{len(shape_diff)} tensors with different shapes were skipped (see shape_mismatch).")
    skip = set(shape_diff)

    def as_float(t: torch.Tensor) -> torch.Tensor:
        return t if t.is_floating_point() else t.double()

    def done_cb(*pairs_of_src_key):
        def cb():
            for src, key in pairs_of_src_key:
                src.release(key)
        return cb

    def gen() -> Iterator[TensorPair]:
        for k in list(ca) + (only_b if partial_a else []):
            if k in skip:
                continue
            if k in cb and k in ca:
                ka, kb = ca[k], cb[k]
                for src, key in ((ra, ka), (rb, kb)):
                    if hasattr(src, "prefetch"):
                        src.prefetch(key)
                a, b = ra.get(ka), rb.get(kb)
                cbk = done_cb((ra, ka), (rb, kb))
                if not (a.is_floating_point() and b.is_floating_point()):
                    yield TensorPair(k, as_float(a), as_float(b), on_done=cbk)
                else:
                    sa, sb = _stored_dtype(ra, ka), _stored_dtype(rb, kb)
                    rd = None
                    if sa != sb or a.dtype != sa or b.dtype != sb:
                        rd = coarser_dtype(sa, sb) if sa.is_floating_point and sb.is_floating_point else None
                        if rd is not None and _MANTISSA_BITS.get(rd, 64) >= max(
                                _MANTISSA_BITS.get(a.dtype, 64), _MANTISSA_BITS.get(b.dtype, 64)):
                            rd = None  # values are not finer than the storage: nothing can vanish
                    yield TensorPair(k, a, b, resolution_dtype=rd, on_done=cbk)
            elif k in ca:  # only in A
                if partial_b:
                    a = as_float(ra.get(ca[k]))
                    yield TensorPair(k, a, a, only_in="a", on_done=done_cb((ra, ca[k])))
                else:
                    yield TensorPair(k, only_in="a", shape=tuple(ra.shape(ca[k])))
            else:  # only in B, A partial
                b = as_float(rb.get(cb[k]))
                yield TensorPair(k, b, b, only_in="b", on_done=done_cb((rb, cb[k])))
        if not partial_a:
            for k in only_b:
                yield TensorPair(k, only_in="b", shape=tuple(rb.shape(cb[k])))

    total = len(ca) + len(only_b)
    extra = {"shape_mismatch": _shape_lines(shape_diff, lambda k: ra.shape(ca[k]), lambda k: rb.shape(cb[k])),
             "partial": "b" if partial_b else ("a" if partial_a else None)}
    info_a = _file_info(file_a, kind, arch_a)
    info_a.update(a_info or {})
    info_b = _file_info(file_b, kind, arch_b)
    info_b.update(b_info or {})
    return diff_pairs(gen(), arch=arch, options=options, mode=mode, a_info=info_a, b_info=info_b, notes=notes,
                      progress=progress, total=total, extra=extra)


def _diff_checkpoint_lora(ck, lo, strength, options, progress, swapped: bool) -> dict:
    arch = _arch_of_reader(ck)
    ck_file, ck = ck, _flux_canonical(ck, arch)
    ld = _load_lora(lo.path, strength, arch if arch != "unknown" else None, getattr(ck, "dims", None))
    cmap = canonical_keys(ck.keys(), arch)
    deltas = dict(ld.deltas)
    missing = [k for k in deltas if k not in cmap]
    if len(missing) == len(deltas):
        lora_arch = ld.arch if hasattr(ld, "arch") else _arch_of_reader(lo)
        raise _arch_mismatch(ck.path.name, arch, lo.path.name, lora_arch, [], missing, [])
    bad = [k for k in deltas if k in cmap and tuple(deltas[k].shape) != tuple(ck.shape(cmap[k]))]
    if bad:
        raise ShapeMismatchError(
            f"{lo.path.name}: {len(bad)} LoRA targets do not fit {ck.path.name}'s shapes: "
            + "; ".join(f"{k} ΔW {tuple(deltas[k].shape)} vs weight {tuple(ck.shape(cmap[k]))}" for k in bad[:5]))
    notes = [f"B = A + {strength:g} × ΔW of {lo.path.name} ({ld.format} LoRA, {len(deltas)} target weights); "
             f"weights the LoRA does not touch are identical."]
    if swapped:
        notes.append("The files were given as LoRA, checkpoint: the checkpoint is taken as the base (A).")
    if missing:
        notes.append(f"{len(missing)} LoRA targets are not in the checkpoint (listed in only_in_b, not compared).")
    if ld.skipped:
        notes.append(f"{len(ld.skipped)} LoRA entries could not be decoded and are ignored: "
                     + "; ".join(f"{k}: {v}" for k, v in list(ld.skipped.items())[:3]))

    def gen() -> Iterator[TensorPair]:
        for c, k in cmap.items():
            a = ck.get(k)
            if not a.is_floating_point():
                a = a.float()
            d = deltas.pop(c, None)
            rel = (lambda key=k: ck.release(key))
            if d is None:
                yield TensorPair(c, a, a, on_done=rel)
            else:
                yield TensorPair(c, a, delta=d, resolution_dtype=a.dtype, on_done=rel)
        for k in missing:
            yield TensorPair(k, only_in="b", shape=tuple(ld.deltas[k].shape))

    info_b = {"name": f"{ck.name} + {strength:g}×{lo.name}", "kind": "checkpoint+lora",
              "lora": _file_info(lo, "lora", arch, fmt=ld.format), "lora_strength": strength}
    return diff_pairs(gen(), arch=arch, options=options, mode="checkpoint+lora",
                      a_info=_file_info(ck_file, "checkpoint", arch), b_info=info_b, notes=notes,
                      progress=progress, total=len(cmap) + len(missing),
                      extra={"lora_strength": strength, "skipped_lora_keys": dict(ld.skipped), "partial": None,
                             "shape_mismatch": []})


def _diff_loras(ra, rb, strength, options, progress) -> dict:
    la = _load_lora(ra.path, strength, None)
    lb = _load_lora(rb.path, strength, None)
    from ..formats.keys import detect_architecture

    da, db = la.deltas, lb.deltas
    arch_a = detect_architecture(ra.keys(), {k: ra.shape(k) for k in ra.keys() if "attn2" in k})
    arch_b = detect_architecture(rb.keys(), {k: rb.shape(k) for k in rb.keys() if "attn2" in k})
    only_a = [k for k in da if k not in db]
    only_b = [k for k in db if k not in da]
    common = [k for k in da if k in db]
    shape_diff = [k for k in common if tuple(da[k].shape) != tuple(db[k].shape)]
    if arch_a != arch_b and "unknown" not in (arch_a, arch_b):
        raise _arch_mismatch(ra.path.name, arch_a, rb.path.name, arch_b, only_a, only_b,
                             _shape_lines(shape_diff, lambda k: da[k].shape, lambda k: db[k].shape))
    if shape_diff:
        raise ShapeMismatchError(f"{len(shape_diff)} LoRA targets have different shapes: "
                                 + "; ".join(_shape_lines(shape_diff[:5], lambda k: da[k].shape,
                                                          lambda k: db[k].shape)))
    arch = arch_a if arch_a != "unknown" else arch_b
    notes = [f"Both inputs are LoRAs (strength {strength:g}): A and B are their ΔW; rel_change is ‖ΔW_B − ΔW_A‖ / "
             "‖ΔW_A‖ and cosine compares the two ΔW. A weight only one LoRA touches has ΔW = 0 on the other side."]

    def gen() -> Iterator[TensorPair]:
        for k in list(da) + only_b:
            a, b = da.get(k), db.get(k)
            yield TensorPair(k, a, b, only_in="a" if b is None else ("b" if a is None else None))

    return diff_pairs(gen(), arch=arch, options=options, mode="loras",
                      a_info=_file_info(ra, "lora", arch_a, fmt=la.format),
                      b_info=_file_info(rb, "lora", arch_b, fmt=lb.format), notes=notes,
                      progress=progress, total=len(da) + len(only_b),
                      extra={"lora_strength": strength, "partial": None, "shape_mismatch": [],
                             "skipped_lora_keys": {**{f"A:{k}": v for k, v in la.skipped.items()},
                                                   **{f"B:{k}": v for k, v in lb.skipped.items()}}})


# --------------------------------------------------------------------------------------------------------------
# Comparing two reports
# --------------------------------------------------------------------------------------------------------------
COMPARE_METRICS = ("mean_abs", "mean_abs_changed", "max_abs", "std", "rms", "rel_change", "frac_changed")


def load_report(source: str | os.PathLike | Mapping) -> dict:
    """A diff report from a dict, a JSON string, or a JSON file path. Raises ``ValueError`` if it is not one."""
    import json

    if isinstance(source, Mapping):
        rep = dict(source)
    else:
        text = str(source)
        if not text.lstrip().startswith("{"):
            p = Path(text)
            if not p.is_file():
                raise FileNotFoundError(f"report not found: {p}")
            text = p.read_text(encoding="utf-8")
        try:
            rep = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"not a JSON diff report: {exc}") from None
    if not isinstance(rep, dict) or "overall" not in rep or "by_layer_type" not in rep:
        raise ValueError("not a weight-diff report (needs 'overall' and 'by_layer_type'; make one with "
                         "`conceptlab diff --json`)")
    return rep


def _ratio(x, y) -> float | None:
    if x is None or y is None:
        return None
    if x == 0:
        return None if y == 0 else math.inf
    return y / x


def compare_reports(r1: Mapping | str, r2: Mapping | str, metrics: Iterable[str] = COMPARE_METRICS,
                    label1: str | None = None, label2: str | None = None) -> dict:
    """Ratio table R2 / R1 per metric and group (overall, components, blocks, layer types).

    Args:
        r1, r2: reports (dicts, JSON strings or paths) from :func:`diff_files` / :func:`diff_pairs`; typically two
            runs against the same base (e.g. a 100- and a 500-iteration erasure).
        metrics: fields to compare.
        label1, label2: names shown in tables (default: B-side names of the reports).

    Returns:
        ``{"schema", "label1", "label2", "metrics", "overall": {metric: {"r1", "r2", "ratio"}},
        "by_component"/"by_block"/"by_layer_type": {group: {metric: {...}}}, "only_in_1"/"only_in_2": {section:
        [groups]}, "notes"}``. ``ratio`` = r2/r1 (``inf`` when r1 is 0 and r2 not, ``None`` when both are 0).
    """
    a, b = load_report(r1), load_report(r2)
    metrics = tuple(metrics)
    l1 = label1 or str((a.get("b") or {}).get("name") or "report 1")
    l2 = label2 or str((b.get("b") or {}).get("name") or "report 2")

    def cmp(ga: Mapping, gb: Mapping) -> dict:
        return {m: {"r1": ga.get(m), "r2": gb.get(m), "ratio": _ratio(ga.get(m), gb.get(m))} for m in metrics}

    out = {"schema": COMPARE_SCHEMA, "label1": l1, "label2": l2, "metrics": list(metrics),
           "overall": cmp(a["overall"], b["overall"]), "only_in_1": {}, "only_in_2": {}, "notes": []}
    for sec in ("by_component", "by_block", "by_layer_type"):
        ga, gb = a.get(sec) or {}, b.get(sec) or {}
        out[sec] = {g: cmp(ga[g], gb[g]) for g in ga if g in gb}
        out["only_in_1"][sec] = [g for g in ga if g not in gb]
        out["only_in_2"][sec] = [g for g in gb if g not in ga]
    if a.get("arch") != b.get("arch"):
        out["notes"].append(f"the reports are for different architectures ({a.get('arch')} vs {b.get('arch')})")
    an, bn = (a.get("a") or {}).get("name"), (b.get("a") or {}).get("name")
    if an and bn and an != bn:
        out["notes"].append(f"the reports have different bases ({an} vs {bn}): ratios compare unlike things")
    return out
