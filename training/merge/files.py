"""File-to-file checkpoint merging in constant memory, and the same computation in memory.

:func:`merge_checkpoints` opens the inputs with :class:`formats.safetensors_io.WeightFile` (memory-mapped,
tensor by tensor), merges each key with :func:`training.merge.merge_tensor` and streams the result into
:class:`formats.safetensors_io.SafetensorsStreamWriter` (atomic: an error or a cancel leaves no file). Peak
memory is a few copies of the largest tensor, not a model.

:func:`merge_state_dicts` runs exactly the same per-key code on in-memory dicts (tests compare the two bit
for bit; the in-graph nodes use :func:`training.merge.merge_tensor` directly).

Key rules (documented, reported in :class:`MergeReport`):

* the output has A's keys, in A's order; a key only in A is copied from A; a key only in B (or C) is
  dropped; a key missing from C is copied from A for add/train difference, and merged with A as the base
  for TIES/DARE;
* non-floating tensors (``position_ids`` …) and keys outside UNet / text encoder / VAE come from A; the text
  encoder and VAE follow :class:`training.merge.MergePlan` (``te``: merge or A, ``vae``: A or merge);
* a shape mismatch between inputs is an error (``on_shape_mismatch="a"`` copies A's tensor instead);
* different architectures (``formats.keys.detect_architecture``) are an error.

Metadata: ``conceptlab.recipe`` (JSON: method, parameters, input names + SHA-256, LoRA, dtype, tool
version) and ``modelspec.*`` (SAI model spec 1.0.0: architecture, title, date) where the architecture is
known. Input hashes are computed from the very buffers the merge reads (no second pass over the inputs;
see :class:`_PreadSafetensors`); the header reserves their 64 hex digits and they are filled in before the
file is moved into place.

Speed (``benchmarks/merge.py``): one reader thread per input (``preadv`` into the tensor's own buffer +
SHA-256, both release the GIL), the weighted sum computed in place over A's buffer, the compute-heavy methods
on one worker per core (one torch thread each), and a writer thread that writes straight from the tensor's
memory, so reading, hashing, arithmetic and writing overlap.

Layout: this module plans and merges; :mod:`training.merge.io` reads and hashes the inputs,
:mod:`training.merge.pipeline` runs the reader / compute / writer threads, :mod:`training.merge.recipe` writes
the recipe and modelspec metadata. Their public names (and the private ones the other merge modules use) are
re-exported here, so ``from conceptlab.training.merge.files import ...`` keeps working.
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch

from ...formats.safetensors_io import SafetensorsStreamWriter, WeightFile, parse_dtype
from ...formats.weight_folders import open_weight_source
from .blocks import parse_block_weights
from .methods import METHODS, METHODS_NEED_C, MergePlan, MethodOptions, check_alpha, merge_tensor
from .io import (_BufferPool, _byte_view, _cached_hashes, _fast_reader, _Hasher,  # noqa: F401 - re-exported
                       _PreadSafetensors, _collect_hashes, _remember_hashes)
from .pipeline import (_MEMORY_BOUND, _pipeline, _torch_threads, arithmetic_threads,  # noqa: F401
                             available_cores, compute_workers, thread_budget)
from .recipe import (MODELSPEC_ARCH, RECIPE_FORMAT, RECIPE_KEY, SD2_V_NORM_STD, _modelspec,  # noqa: F401
                           _SD2_V_PROBE, _patch_hashes, _placeholder, _recipe, modelspec_architecture, read_recipe)

@dataclass
class MergeReport:
    """What a merge did. Lists hold key names; ``warnings`` human-readable lines."""

    output: str | None = None
    arch: str = "unknown"
    method: str = ""
    keys_total: int = 0
    merged: int = 0
    from_a: int = 0
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    missing_c: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)
    input_channels_merged: list[str] = field(default_factory=list)
    lora_applied: int = 0
    lora_unmatched: list[str] = field(default_factory=list)
    lora_skipped: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    recipe: dict = field(default_factory=dict)

    def summary(self) -> str:
        """A few lines for a CLI / node text output."""
        lines = [f"{self.method} merge ({self.arch}): {self.keys_total} keys, {self.merged} merged, "
                 f"{self.from_a} taken from A"]
        if self.only_a:
            lines.append(f"{len(self.only_a)} keys only in A (copied from A), e.g. {self.only_a[0]}")
        if self.only_b:
            lines.append(f"{len(self.only_b)} keys only in B (dropped), e.g. {self.only_b[0]}")
        if self.missing_c:
            lines.append(f"{len(self.missing_c)} keys missing from C (add/train difference: copied from A; "
                         f"TIES/DARE: A used as their base), e.g. {self.missing_c[0]}")
        if self.input_channels_merged:
            lines.append(f"{len(self.input_channels_merged)} keys where A has extra input channels (inpainting / "
                         f"instruct-pix2pix): the first 4 merged, the rest kept from A, e.g. "
                         f"{self.input_channels_merged[0]}")
        if self.shape_mismatch:
            lines.append(f"{len(self.shape_mismatch)} keys with mismatched shapes (copied from A)")
        if self.lora_applied or self.lora_unmatched or self.lora_skipped:
            lines.append(f"LoRA: {self.lora_applied} weights changed, {len(self.lora_unmatched)} unmatched, "
                         f"{len(self.lora_skipped)} skipped")
        lines += [f"warning: {w}" for w in self.warnings]
        if self.output:
            lines.append(f"wrote {self.output}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        """The report as a JSON-serialisable dict (what the CLI writes to ``--report``)."""
        return asdict(self)


# ----------------------------------------------------------------------------------------------------
# shared planning
# ----------------------------------------------------------------------------------------------------
class _Source:
    """Uniform view of a WeightFile or an in-memory dict."""

    def __init__(self, obj):
        self.obj = obj
        self.is_file = not isinstance(obj, Mapping)  # WeightFile, a sharded folder or a Flux layout view
        self.reader = None  # a _PreadSafetensors, set by the streaming merge

    def keys(self) -> list[str]:
        return list(self.obj.keys())

    def shape(self, k):
        return tuple(self.obj.shape(k)) if self.is_file else tuple(self.obj[k].shape)

    def dtype(self, k):
        return self.obj.dtype(k) if self.is_file else self.obj[k].dtype

    def get(self, k, pool=None):
        if self.reader is not None:
            return self.reader.get(k, pool)
        return self.obj.get(k) if self.is_file else self.obj[k]

    def has(self, k) -> bool:
        return k in self.obj


def _detect_arch(src: _Source) -> str:
    from ...formats.keys import detect_architecture

    keys = src.keys()
    return detect_architecture(keys, {k: src.shape(k) for k in keys})


@dataclass
class _KeyJob:
    key: str
    action: str  # "merge" | "a"
    weight: float | None
    out_dtype: torch.dtype
    shape: tuple
    channels: int | None = None  # inpainting / instruct-pix2pix A with a normal B: merge A[:, :channels] only


def _plan_keys(a: _Source, b: _Source | None, c: _Source | None, method: str, plan: MergePlan,
               out_dtype: torch.dtype, on_shape_mismatch: str, report: MergeReport) -> list[_KeyJob]:
    """Decide per key (headers only, no tensor data read) what happens; raise before anything is written."""
    if on_shape_mismatch not in ("error", "a"):
        raise ValueError(f"on_shape_mismatch must be 'error' or 'a', got {on_shape_mismatch!r}")
    a_keys = a.keys()
    a_set = set(a_keys)
    b_set = set(b.keys()) if b is not None else set()
    c_set = set(c.keys()) if c is not None else set()
    if b is not None:
        report.only_b = sorted(b_set - a_set)
    needs_c = method in METHODS_NEED_C
    jobs: list[_KeyJob] = []
    mismatches: list[str] = []
    for k in a_keys:
        shape = a.shape(k)
        dt = a.dtype(k)
        floating = dt.is_floating_point
        odt = out_dtype if floating else dt
        action = "a"
        weight = None
        if b is not None and floating:
            weight = plan.weight_for(k)
            if weight is not None:
                if k not in b_set:
                    report.only_a.append(k)
                elif c is not None and k not in c_set and needs_c:
                    report.missing_c.append(k)  # add/train difference without C: copy A
                elif b.shape(k) != shape or (c is not None and k in c_set and c.shape(k) != shape):
                    shapes = f"A {list(shape)}, B {list(b.shape(k))}"
                    if c is not None and k in c_set:
                        shapes += f", C {list(c.shape(k))}"
                    ch = _extra_channels(shape, b.shape(k), c.shape(k) if c is not None and k in c_set else None)
                    if ch is not None:
                        action = "merge"
                        report.input_channels_merged.append(k)
                        jobs.append(_KeyJob(k, action, weight, odt, shape, channels=ch))
                        continue
                    if _extra_channels(b.shape(k), shape, None) is not None:
                        shapes += " -- an inpainting / instruct-pix2pix model must be A, the normal model B"
                    mismatches.append(f"{k} ({shapes})")
                else:
                    action = "merge"
                    if c is not None and k not in c_set:
                        report.missing_c.append(k)  # TIES / DARE: base falls back to A for this key
        jobs.append(_KeyJob(k, action, weight, odt, shape))
    if mismatches:
        if on_shape_mismatch == "error":
            more = f" and {len(mismatches) - 5} more" if len(mismatches) > 5 else ""
            raise ValueError("inputs have different tensor shapes: " + "; ".join(mismatches[:5]) + more +
                             " (are they the same architecture / variant? pass on_shape_mismatch='a' "
                             "(CLI --shape-mismatch a) to copy these keys from A)")
        report.shape_mismatch = [m.split(" (")[0] for m in mismatches]
    report.keys_total = len(jobs)
    report.merged = sum(j.action == "merge" for j in jobs)
    report.from_a = len(jobs) - report.merged
    return jobs


def _extra_channels(a_shape: tuple, b_shape: tuple, c_shape: tuple | None) -> int | None:
    """B's input-channel count when A is an inpainting (9 input channels) or instruct-pix2pix (8) UNet whose
    other dimensions equal B's (4 channels) -- A1111 ``modules/extras.py`` ``run_modelmerger`` then merges the
    first 4 channels and keeps A's extra ones (so does supermerger, ``assert_inpaint``); else ``None``."""
    a_shape, b_shape = tuple(a_shape), tuple(b_shape)
    if len(a_shape) != 4 or len(b_shape) != 4 or a_shape[:1] + a_shape[2:] != b_shape[:1] + b_shape[2:]:
        return None
    if b_shape[1] != 4 or a_shape[1] not in (8, 9):
        return None
    if c_shape is not None and tuple(c_shape) != b_shape:
        return None
    return 4


def _read(job: _KeyJob, a: _Source, b: _Source | None, c: _Source | None):
    ta = a.get(job.key)
    if job.action != "merge":
        return ta, None, None
    tc = c.get(job.key) if (c is not None and c.has(job.key)) else None
    return ta, b.get(job.key), tc


_REPORT_LOCK = threading.Lock()


def _compute(job: _KeyJob, tensors, method: str, density: float, seed: int,
             lora: Mapping[str, torch.Tensor] | None, report: MergeReport, inplace: bool = False,
             options: MethodOptions | None = None) -> torch.Tensor:
    """Merge one key. ``inplace=True`` (the streaming merge, whose A tensor is a fresh buffer of its own)
    lets the weighted sum write its result over A's buffer: the same ``torch.lerp`` kernel and arguments as
    :func:`training.merge.weighted_sum` takes for these dtypes, so the bits are identical (tested), without
    allocating an output tensor per key."""
    ta, tb, tc = tensors
    if job.channels is not None and job.action == "merge":  # inpainting A: merge its first channels only
        full = ta.to(torch.float32, copy=True)
        part = ta[:, :job.channels]
        full[:, :job.channels] = merge_tensor(method, job.key, part, tb, tc, job.weight, density=density, seed=seed,
                                              options=options)
        ta, tb, tc = full, None, None
        job = _KeyJob(job.key, "a", job.weight, job.out_dtype, job.shape)
    if (inplace and job.action == "merge" and method == "weighted_sum" and ta.dtype == tb.dtype == job.out_dtype
            and job.out_dtype in (torch.float16, torch.bfloat16, torch.float32)):
        out = torch.lerp(ta, tb, float(job.weight), out=ta)  # == weighted_sum(ta, tb, w, out_dtype), in place
    elif job.action == "merge":
        out = merge_tensor(method, job.key, ta, tb, tc, job.weight, density=density, seed=seed,
                           out_dtype=job.out_dtype, options=options)
    else:
        out = ta
    if lora is not None and job.key in lora:
        delta = lora[job.key]
        if tuple(delta.shape) != tuple(job.shape):
            if delta.numel() != out.numel():
                raise ValueError(f"LoRA delta for {job.key} has shape {list(delta.shape)}, weight is {list(job.shape)}")
            delta = delta.reshape(job.shape)
        out = out.to(torch.float32) + delta.to(torch.float32)
        with _REPORT_LOCK:  # keys may be computed on several worker threads
            report.lora_applied += 1
    return out.to(job.out_dtype)


def _setup(a, b, c, method, alpha, block_weights, te, vae, te_alpha, vae_alpha, report) -> MergePlan:
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
    if b is None and method != "weighted_sum":
        raise ValueError(f"{method} needs model B (give B, or only --lora to bake a LoRA into A)")
    if method in METHODS_NEED_C and c is None:
        if method == "model_stock":
            raise ValueError("model_stock needs a third model C: the pre-trained base A and B were fine-tuned from")
        raise ValueError(f"{method} needs a third model C: A + α·(B − C) where C is the base B was trained from")
    arch = _detect_arch(a)
    for name, src in (("B", b), ("C", c)):
        if src is None:
            continue
        other = _detect_arch(src)
        if other != arch:
            raise ValueError(f"model A is {arch} but model {name} is {other}: models of different architectures "
                             "cannot be merged")
    report.arch = arch
    report.method = method if b is not None else "bake_lora"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_alpha(alpha)
        for nm, v in (("te_alpha", te_alpha), ("vae_alpha", vae_alpha)):
            if v is not None:
                check_alpha(v, nm)
        bw = None
        if block_weights:
            bw = block_weights if not isinstance(block_weights, str) else parse_block_weights(block_weights, arch, alpha)
    if method == "model_stock":
        caught.append(warnings.WarningMessage(
            "model_stock does not use alpha" + (" or block weights" if bw is not None else "") +
            ": its ratio t comes from the angle between A − C and B − C", UserWarning, __file__, 0))
    for w in caught:
        report.warnings.append(str(w.message))
        warnings.warn(str(w.message), UserWarning, stacklevel=3)
    return MergePlan(arch=arch, alpha=float(alpha), block_weights=bw, te=te, vae=vae,
                     te_alpha=te_alpha, vae_alpha=vae_alpha)


def _lora(lora, strength, arch, report, a: _Source | None = None) -> tuple[dict | None, dict]:
    if lora is None:
        return None, {}
    from ...formats.lora_files import lora_deltas

    dims = _flux_dims(a) if arch == "flux" and a is not None else None
    res = lora_deltas(lora, strength=float(strength), arch=arch, flux_dims=dims)
    report.lora_skipped = dict(res.skipped)
    info = {"strength": float(strength), "format": res.format}
    if isinstance(lora, (str, os.PathLike)):
        info["name"] = Path(lora).name
    deltas = dict(res.deltas)
    if dims is not None:  # canonical Flux ΔW -> A's layout (a split diffusers to_q gets its rows of the qkv ΔW)
        from ...formats.flux_views import deltas_for_keys

        deltas = deltas_for_keys(deltas, a.keys(), dims)
    return deltas, info


def _flux_dims(src: _Source):
    from ...formats.flux_keys import infer_dims, is_flux_key

    return infer_dims({k: src.shape(k) for k in src.keys() if is_flux_key(k)})


def _align_flux(arch: str, a: _Source, *others: _Source | None) -> list[_Source | None]:
    """Flux inputs in another key layout than A (BFL / ComfyUI / diffusers) are read under A's key names
    (``formats.flux_views.FluxKeyView``: split q/k/v fused or fused sliced), so the output keeps A's layout."""
    if arch != "flux":
        return list(others)
    from ...formats.flux_keys import flux_layout
    from ...formats.flux_views import FluxKeyView

    la = flux_layout(a.keys())
    dims = _flux_dims(a)
    return [s if s is None or flux_layout(s.keys()) == la else _Source(FluxKeyView(s, keys=a.keys(), dims=dims))
            for s in others]


def _check_lora_targets(lora: dict | None, jobs: list[_KeyJob], report: MergeReport) -> None:
    if lora is None:
        return
    keys = {j.key for j in jobs}
    report.lora_unmatched = sorted(k for k in lora if k not in keys)
    if lora and len(report.lora_unmatched) == len(lora):
        raise ValueError(f"none of the LoRA's {len(lora)} weights matches a key of model A "
                         f"(e.g. {report.lora_unmatched[0]}): is it for another architecture?")
    if report.lora_unmatched:
        report.warnings.append(f"{len(report.lora_unmatched)} LoRA weights have no target in model A")


# ----------------------------------------------------------------------------------------------------
# streaming
# ----------------------------------------------------------------------------------------------------
def merge_checkpoints(a: str | os.PathLike, b: str | os.PathLike | None, output: str | os.PathLike,
                      c: str | os.PathLike | None = None, method: str = "weighted_sum", alpha: float = 0.5,
                      block_weights=None, density: float = 0.2, seed: int = 0, dtype: str = "fp16",
                      te: str = "merge", vae: str = "a", te_alpha: float | None = None,
                      vae_alpha: float | None = None, lora: str | os.PathLike | None = None,
                      lora_strength: float = 1.0, overwrite: bool = False, on_shape_mismatch: str = "error",
                      hash_inputs: bool = True, options: MethodOptions | None = None,
                      progress: Callable[[int, int], None] | None = None, hash_cache: bool = True) -> MergeReport:
    """Merge checkpoint files tensor by tensor into ``output`` (safetensors), in constant memory.

    Args:
        a, b, c: input checkpoints (safetensors, or ``.ckpt``/``.pt`` read with ``weights_only=True``, or diffusers
            model folders, sharded or not). Flux inputs may mix BFL, ComfyUI and diffusers layouts: B, C and the
            LoRA are read under A's key names (``formats.flux_views``), so the output has A's layout;
            ``b=None`` with ``lora`` bakes the LoRA into A alone. ``c`` is the base for add/train difference
            (required) and TIES/DARE (optional; A is the base otherwise).
        method: one of :data:`training.merge.METHODS`; α (``alpha``) is B's weight.
        block_weights: ``None``, a :class:`training.merge.BlockWeights`, or a string for
            :func:`training.merge.parse_block_weights` (list or preset).
        density: TIES keep fraction / DARE keep probability, in [0, 1]. ``seed``: DARE seed.
        dtype: ``"fp16" | "bf16" | "fp32"`` for every floating tensor of the output.
        te / vae / te_alpha / vae_alpha: see :class:`training.merge.MergePlan`.
        lora, lora_strength: a LoRA file baked into the result (ΔW from ``formats.lora_files.lora_deltas``,
            × strength), after merging.
        overwrite: replace an existing ``output`` (default: ``FileExistsError``).
        on_shape_mismatch: ``"error"`` (default) or ``"a"``.
        hash_inputs: store inputs' SHA-256 in the recipe (computed from the buffers as they are read).
        hash_cache: reuse / remember those digests in :mod:`training.merge.hashes` (keyed by path, size, mtime,
            inode), so merging the same unchanged inputs again costs no hashing.
        options: :class:`training.merge.MethodOptions` (TIES sign election, SLERP norm, DELLA ε / rescale).
        progress: ``progress(done, total)`` after each tensor; may raise to cancel (no file is left).
    Returns:
        :class:`MergeReport`.
    Raises:
        FileExistsError, FileNotFoundError, ValueError (architecture / shape / parameter errors, before any
        byte is written), ``formats.safetensors_io.WeightFileError`` (corrupt input), OSError (write error:
        no partial file is left).
    """
    out_path = Path(output)
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path} already exists (pass overwrite / --overwrite to replace it)")
    out_dtype = parse_dtype(dtype)
    dtype_name = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}.get(out_dtype, str(dtype))
    paths = {"A": Path(a)}
    if b is not None:
        paths["B"] = Path(b)
    if c is not None:
        paths["C"] = Path(c)
    for tag, p in paths.items():
        if p.resolve() == out_path.resolve():
            raise ValueError(f"output {out_path} is the same file as input {tag}")
    report = MergeReport(output=None)
    files = {}
    hasher = None
    try:
        for tag, p in paths.items():
            files[tag] = open_weight_source(p, WeightFile)  # a diffusers model folder (shards) reads as one file
        sa = _Source(files["A"])
        sb = _Source(files["B"]) if "B" in files else None
        sc = _Source(files["C"]) if "C" in files else None
        plan = _setup(sa, sb, sc, method, alpha, block_weights, te, vae, te_alpha, vae_alpha, report)
        sb, sc = _align_flux(plan.arch, sa, sb, sc)
        jobs = _plan_keys(sa, sb, sc, method, plan, out_dtype, on_shape_mismatch, report)
        lora_map, lora_info = _lora(lora, lora_strength, plan.arch, report, sa)
        _check_lora_targets(lora_map, jobs, report)
        all_paths = dict(paths)
        if lora is not None:
            all_paths["LoRA"] = Path(lora)
        inputs = {tag: {"name": p.name, "sha256": _placeholder(tag) if hash_inputs else None}
                  for tag, p in paths.items()}
        if lora_info:
            lora_info["sha256"] = _placeholder("LoRA") if hash_inputs else None
        recipe = _recipe(method, plan, density, seed, dtype_name, inputs, lora_info, report, options)
        metadata = {RECIPE_KEY: json.dumps(recipe, sort_keys=True), **_modelspec(plan.arch, out_path.stem, sa)}
        cached = _cached_hashes(all_paths) if hash_inputs and hash_cache else {}
        for src, tag in ((sa, "A"), (sb, "B"), (sc, "C")):
            if src is not None:
                src.reader = _fast_reader(src, hash_file=hash_inputs and tag not in cached)
        if sa.reader is not None:  # A's storage order: sequential reads of A (and of B/C when laid out alike)
            jobs.sort(key=lambda j: sa.reader.data_offset(j.key))
        specs = {j.key: (j.out_dtype, j.shape) for j in jobs}
        if hash_inputs:  # safetensors inputs hash while they are read; torch pickles and the LoRA on a thread
            srcs = {"A": sa, "B": sb, "C": sc}
            rest = {tag: p for tag, p in all_paths.items()
                    if tag not in cached and (srcs.get(tag) is None or srcs[tag].reader is None)}
            if rest:
                hasher = _Hasher(rest)
                hasher.start()
        with SafetensorsStreamWriter(out_path, specs, metadata=metadata, overwrite=overwrite) as writer:
            pool = _BufferPool()
            readers = [(lambda j: sa.get(j.key, pool), sa)]
            if sb is not None:
                readers.append((lambda j: sb.get(j.key, pool) if j.action == "merge" else None, sb))
            if sc is not None:
                readers.append((lambda j: sc.get(j.key, pool) if j.action == "merge" and sc.has(j.key) else None, sc))
            readers = [(read, src.reader.finish_hash if src.reader is not None else None) for read, src in readers]

            def write(key, tensor):
                writer.write(key, tensor)
                del tensor
                pool.release(key)  # the job is finished: its input buffers may be lent again
            owned = sa.reader is not None  # A's tensors are fresh buffers: compute may overwrite them

            def compute(j, t):
                t = tuple(t) + (None,) * (3 - len(t))
                return _compute(j, t, method, density, seed, lora_map, report, inplace=owned, options=options)

            memory_bound = method in _MEMORY_BOUND or sb is None
            workers = compute_workers(memory_bound)
            with _torch_threads(arithmetic_threads(workers, len(readers) + 1, memory_bound)):
                _pipeline(jobs, readers, compute, write, progress, workers=workers)
            hashes = _collect_hashes({"A": sa, "B": sb, "C": sc}, cached, hasher, all_paths,
                                     hash_inputs=hash_inputs, hash_cache=hash_cache)
            _patch_hashes(writer, hashes)
            for tag, h in hashes.items():
                if tag == "LoRA":
                    recipe["lora"]["sha256"] = h
                else:
                    recipe["inputs"][tag]["sha256"] = h
        report.recipe = recipe
        report.output = str(out_path)
        return report
    except OSError as exc:
        renamed = _name_output(exc, out_path)
        if renamed is exc:
            raise
        raise renamed from exc
    finally:
        if hasher is not None:
            hasher.stop()
        for src in (locals().get("sa"), locals().get("sb"), locals().get("sc")):
            if src is not None and src.reader is not None:
                src.reader.close()
        for f in files.values():
            f.close()


def _name_output(exc: OSError, out_path: Path) -> OSError:
    """An error about the temporary file the output is written to, re-worded to name the output file and its
    folder (a read-only folder, a full disk); any other error is returned unchanged."""
    fname = getattr(exc, "filename", None)
    if not fname or not Path(str(fname)).name.startswith(f".{out_path.name}."):
        return exc
    what = exc.strerror or str(exc)
    new = type(exc)(exc.errno, f"cannot write the output {out_path}: {what} (in folder {out_path.parent}; "
                               "nothing was written)")
    return new


# ----------------------------------------------------------------------------------------------------
# in memory (same per-key code)
# ----------------------------------------------------------------------------------------------------
def merge_state_dicts(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor] | None,
                      c: Mapping[str, torch.Tensor] | None = None, method: str = "weighted_sum",
                      alpha: float = 0.5, block_weights=None, density: float = 0.2, seed: int = 0,
                      dtype: str = "fp16", te: str = "merge", vae: str = "a", te_alpha: float | None = None,
                      vae_alpha: float | None = None, lora: Mapping[str, torch.Tensor] | None = None,
                      lora_strength: float = 1.0, on_shape_mismatch: str = "error",
                      options: MethodOptions | None = None) -> tuple[dict[str, torch.Tensor], MergeReport]:
    """In-memory twin of :func:`merge_checkpoints` (same arguments and key rules; ``lora`` is a LoRA state
    dict). Returns ``(merged state dict, report)``; every floating tensor is cast to ``dtype``."""
    out_dtype = parse_dtype(dtype)
    report = MergeReport()
    sa, sb = _Source(dict(a)), (_Source(dict(b)) if b is not None else None)
    sc = _Source(dict(c)) if c is not None else None
    plan = _setup(sa, sb, sc, method, alpha, block_weights, te, vae, te_alpha, vae_alpha, report)
    sb, sc = _align_flux(plan.arch, sa, sb, sc)
    jobs = _plan_keys(sa, sb, sc, method, plan, out_dtype, on_shape_mismatch, report)
    lora_map, _ = _lora(lora, lora_strength, plan.arch, report, sa)
    _check_lora_targets(lora_map, jobs, report)
    out = {j.key: _compute(j, _read(j, sa, sb, sc), method, density, seed, lora_map, report, options=options)
           for j in jobs}
    return out, report
