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

This module holds the report: :class:`TensorPair`, :class:`DiffOptions`, :func:`diff_pairs` (grouping, top tensors,
histogram, ranks) and :func:`compare_reports`. The per-tensor kernel is :mod:`.diff_stats`; the file and model
sources (:func:`~.diff_models.diff_files`, :func:`~.diff_models.diff_sources`) are :mod:`.diff_models`; streaming
reads :mod:`.diff_io`; Markdown :mod:`.diff_report`; plots :mod:`.diff_plots`.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from .diff_stats import Histogram, ShapeMismatchError, Sums, dtype_name, effective_rank, tensor_sums

SCHEMA = "conceptlab.weight_diff/1"
COMPARE_SCHEMA = "conceptlab.weight_diff_compare/1"


class ArchitectureMismatchError(ValueError):
    """The two inputs are different model families (e.g. SD1.5 vs SDXL) and cannot be diffed key by key."""


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
    overall = Sums()
    groups: dict[str, dict[str, Sums]] = {"by_layer_type": {}, "by_block": {}, "by_component": {}}
    cells: dict[tuple[str, str], Sums] = {}
    rows: list[dict] = []
    only_in = {"a": [], "b": []}
    hist = Histogram()
    dtypes_a: dict[str, int] = {}
    dtypes_b: dict[str, int] = {}
    rank_computed = rank_skipped = 0
    rank_deadline = t0 + opt.rank_time_budget_s
    done = 0

    def work(p: TensorPair):
        try:
            h = Histogram()
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
                groups[gname].setdefault(gkey, Sums()).add(s)
            cells.setdefault((block or "none", ltype), Sums()).add(s)
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
        r1, r2: reports (dicts, JSON strings or paths) from :func:`.diff_models.diff_files` / :func:`diff_pairs`;
            typically two runs against the same base (e.g. a 100- and a 500-iteration erasure).
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
