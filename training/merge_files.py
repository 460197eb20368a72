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
known. Input hashes are computed in a background thread while the merge runs (the header reserves their
64 hex digits and they are filled in before the file is moved into place).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import queue
import threading
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch

from ..formats.safetensors_io import SafetensorsStreamWriter, WeightFile, WeightFileError, parse_dtype, sha256_file
from .merge import METHODS, METHODS_NEED_C, MergePlan, check_alpha, merge_tensor, parse_block_weights

RECIPE_KEY = "conceptlab.recipe"
RECIPE_FORMAT = "conceptlab.merge/1"

MODELSPEC_ARCH = {
    "sd1": "stable-diffusion-v1",
    "sd2": "stable-diffusion-v2-768-v",
    "sdxl": "stable-diffusion-xl-v1-base",
    "flux": "flux-1-dev",
}


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
        return asdict(self)


# ----------------------------------------------------------------------------------------------------
# shared planning
# ----------------------------------------------------------------------------------------------------
class _Source:
    """Uniform view of a WeightFile or an in-memory dict."""

    def __init__(self, obj):
        self.obj = obj
        self.is_file = isinstance(obj, WeightFile)
        self.reader = None  # a _PreadSafetensors, set by the streaming merge

    def keys(self) -> list[str]:
        return list(self.obj.keys())

    def shape(self, k):
        return tuple(self.obj.shape(k)) if self.is_file else tuple(self.obj[k].shape)

    def dtype(self, k):
        return self.obj.dtype(k) if self.is_file else self.obj[k].dtype

    def get(self, k):
        if self.reader is not None:
            return self.reader.get(k)
        return self.obj.get(k) if self.is_file else self.obj[k]

    def has(self, k) -> bool:
        return k in self.obj


class _PreadSafetensors:
    """Tensor reads from a safetensors file with ``os.pread`` into fresh buffers.

    ``safetensors.safe_open`` memory-maps the whole file, and every page a merge touches then counts in the
    process's resident set until the map is closed (≈ the size of all inputs for a full pass). Reading each
    tensor with ``pread`` into its own buffer keeps the resident set at the tensors in flight. The header is
    the documented safetensors layout (8-byte little-endian length + JSON); the file was already validated by
    :class:`WeightFile` (offsets within the file).
    """

    def __init__(self, wf: WeightFile):
        import struct

        self.wf = wf
        self._fd = os.open(str(wf.path), os.O_RDONLY)
        (n,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
        header = json.loads(os.pread(self._fd, n, 8))
        header.pop("__metadata__", None)
        self._base = 8 + n
        self._offsets = {k: tuple(v["data_offsets"]) for k, v in header.items()}

    def get(self, key: str) -> torch.Tensor:
        begin, end = self._offsets[key]
        dtype, shape = self.wf.dtype(key), tuple(self.wf.shape(key))
        out = torch.empty(shape, dtype=dtype)
        if end > begin:
            view = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.dtype != torch.bool else \
                memoryview(out.view(-1).numpy()).cast("B")
            got = os.preadv(self._fd, [view], self._base + begin)
            if got != end - begin:
                raise WeightFileError(f"{self.wf.path.name}: short read for tensor {key!r} (file truncated?)")
        return out

    def data_offset(self, key: str) -> int:
        return self._offsets[key][0]

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _fast_reader(src: "_Source"):
    if src is None or not src.is_file or src.obj.format != "safetensors":
        return None
    return _PreadSafetensors(src.obj)


def _detect_arch(src: _Source) -> str:
    from ..formats.keys import detect_architecture

    keys = src.keys()
    return detect_architecture(keys, {k: src.shape(k) for k in keys})


@dataclass
class _KeyJob:
    key: str
    action: str  # "merge" | "a"
    weight: float | None
    out_dtype: torch.dtype
    shape: tuple


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


def _read(job: _KeyJob, a: _Source, b: _Source | None, c: _Source | None):
    ta = a.get(job.key)
    if job.action != "merge":
        return ta, None, None
    tc = c.get(job.key) if (c is not None and c.has(job.key)) else None
    return ta, b.get(job.key), tc


def _compute(job: _KeyJob, tensors, method: str, density: float, seed: int,
             lora: Mapping[str, torch.Tensor] | None, report: MergeReport) -> torch.Tensor:
    ta, tb, tc = tensors
    if job.action == "merge":
        out = merge_tensor(method, job.key, ta, tb, tc, job.weight, density=density, seed=seed,
                           out_dtype=job.out_dtype)
    else:
        out = ta
    if lora is not None and job.key in lora:
        delta = lora[job.key]
        if tuple(delta.shape) != tuple(job.shape):
            if delta.numel() != out.numel():
                raise ValueError(f"LoRA delta for {job.key} has shape {list(delta.shape)}, weight is {list(job.shape)}")
            delta = delta.reshape(job.shape)
        out = out.to(torch.float32) + delta.to(torch.float32)
        report.lora_applied += 1
    return out.to(job.out_dtype)


def _setup(a, b, c, method, alpha, block_weights, te, vae, te_alpha, vae_alpha, report) -> MergePlan:
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
    if b is None and method != "weighted_sum":
        raise ValueError(f"{method} needs model B (give B, or only --lora to bake a LoRA into A)")
    if method in METHODS_NEED_C and c is None:
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
    for w in caught:
        report.warnings.append(str(w.message))
        warnings.warn(str(w.message), UserWarning, stacklevel=3)
    return MergePlan(arch=arch, alpha=float(alpha), block_weights=bw, te=te, vae=vae,
                     te_alpha=te_alpha, vae_alpha=vae_alpha)


def _lora(lora, strength, arch, report) -> tuple[dict | None, dict]:
    if lora is None:
        return None, {}
    from ..formats.lora_files import lora_deltas

    res = lora_deltas(lora, strength=float(strength), arch=arch)
    report.lora_skipped = dict(res.skipped)
    info = {"strength": float(strength), "format": res.format}
    if isinstance(lora, (str, os.PathLike)):
        info["name"] = Path(lora).name
    return dict(res.deltas), info


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


def _modelspec(arch: str, title: str) -> dict[str, str]:
    spec = {"modelspec.sai_model_spec": "1.0.0", "modelspec.title": title,
            "modelspec.date": _dt.date.today().isoformat()}
    if arch in MODELSPEC_ARCH:
        spec["modelspec.architecture"] = MODELSPEC_ARCH[arch]
    return spec


def _recipe(method, plan, density, seed, dtype_name, inputs, lora_info, report) -> dict:
    from .. import __version__

    r = {"format": RECIPE_FORMAT, "tool": f"conceptlab {__version__}", "method": report.method,
         "convention": "alpha is the weight of B: (1-alpha)*A + alpha*B",
         "arch": plan.arch, **plan.describe(), "dtype": dtype_name, "inputs": inputs}
    if method in ("ties", "dare"):
        r["density"] = float(density)
    if method == "dare":
        r["seed"] = int(seed)
    if lora_info:
        r["lora"] = lora_info
    return r


def read_recipe(path: str | os.PathLike) -> dict:
    """The ``conceptlab.recipe`` of a merged file as a dict (``{}`` if it has none)."""
    with WeightFile(path) as wf:
        raw = wf.metadata.get(RECIPE_KEY)
    return json.loads(raw) if raw else {}


# ----------------------------------------------------------------------------------------------------
# streaming
# ----------------------------------------------------------------------------------------------------
_PLACEHOLDER = "sha256-pending-{}"


def _placeholder(tag: str) -> str:
    s = _PLACEHOLDER.format(tag)
    return s + "-" * (64 - len(s))


class _Hasher(threading.Thread):
    """SHA-256 of input files on a second thread (hashlib releases the GIL on large buffers)."""

    def __init__(self, paths: Mapping[str, Path]):
        super().__init__(daemon=True)
        self.paths = dict(paths)
        self.result: dict[str, str] = {}
        self.error: BaseException | None = None
        self._cancel = threading.Event()

    def run(self):
        try:
            for tag, p in self.paths.items():
                if self._cancel.is_set():
                    return
                self.result[tag] = sha256_file(p)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            self.error = exc

    def stop(self):
        self._cancel.set()


def merge_checkpoints(a: str | os.PathLike, b: str | os.PathLike | None, output: str | os.PathLike,
                      c: str | os.PathLike | None = None, method: str = "weighted_sum", alpha: float = 0.5,
                      block_weights=None, density: float = 0.2, seed: int = 0, dtype: str = "fp16",
                      te: str = "merge", vae: str = "a", te_alpha: float | None = None,
                      vae_alpha: float | None = None, lora: str | os.PathLike | None = None,
                      lora_strength: float = 1.0, overwrite: bool = False, on_shape_mismatch: str = "error",
                      hash_inputs: bool = True,
                      progress: Callable[[int, int], None] | None = None) -> MergeReport:
    """Merge checkpoint files tensor by tensor into ``output`` (safetensors), in constant memory.

    Args:
        a, b, c: input checkpoints (safetensors, or ``.ckpt``/``.pt`` read with ``weights_only=True``);
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
        hash_inputs: store inputs' SHA-256 in the recipe (computed concurrently).
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
    files = {tag: WeightFile(p) for tag, p in paths.items()}
    hasher = None
    try:
        sa = _Source(files["A"])
        sb = _Source(files["B"]) if "B" in files else None
        sc = _Source(files["C"]) if "C" in files else None
        plan = _setup(sa, sb, sc, method, alpha, block_weights, te, vae, te_alpha, vae_alpha, report)
        jobs = _plan_keys(sa, sb, sc, method, plan, out_dtype, on_shape_mismatch, report)
        lora_map, lora_info = _lora(lora, lora_strength, plan.arch, report)
        _check_lora_targets(lora_map, jobs, report)
        all_paths = dict(paths)
        if lora is not None:
            all_paths["LoRA"] = Path(lora)
        inputs = {tag: {"name": p.name, "sha256": _placeholder(tag) if hash_inputs else None}
                  for tag, p in paths.items()}
        if lora_info:
            lora_info["sha256"] = _placeholder("LoRA") if hash_inputs else None
        recipe = _recipe(method, plan, density, seed, dtype_name, inputs, lora_info, report)
        metadata = {RECIPE_KEY: json.dumps(recipe, sort_keys=True), **_modelspec(plan.arch, out_path.stem)}
        for src in (sa, sb, sc):
            if src is not None:
                src.reader = _fast_reader(src)
        if sa.reader is not None:  # A's storage order: sequential reads of A (and of B/C when laid out alike)
            jobs.sort(key=lambda j: sa.reader.data_offset(j.key))
        specs = {j.key: (j.out_dtype, j.shape) for j in jobs}
        if hash_inputs:
            hasher = _Hasher(all_paths)
            hasher.start()
        with SafetensorsStreamWriter(out_path, specs, metadata=metadata, overwrite=overwrite) as writer:
            _pipeline(jobs, lambda j: _read(j, sa, sb, sc),
                      lambda j, t: _compute(j, t, method, density, seed, lora_map, report),
                      writer.write, progress)
            if hasher is not None:
                hasher.join()
                if hasher.error is not None:
                    raise hasher.error
                _patch_hashes(writer, hasher.result)
                for tag, h in hasher.result.items():
                    if tag == "LoRA":
                        recipe["lora"]["sha256"] = h
                    else:
                        recipe["inputs"][tag]["sha256"] = h
        report.recipe = recipe
        report.output = str(out_path)
        return report
    finally:
        if hasher is not None:
            hasher.stop()
        for src in (locals().get("sa"), locals().get("sb"), locals().get("sc")):
            if src is not None and src.reader is not None:
                src.reader.close()
        for f in files.values():
            f.close()


_DONE = object()


def _pipeline(jobs, read, compute, write, progress, depth: int = 2) -> None:
    """Read (thread) → compute (caller's thread) → write (thread), each stage ``depth`` tensors ahead.

    File reads and writes release the GIL, so on a 2-core machine I/O overlaps the arithmetic. Any exception
    in a stage stops the others and is re-raised here (the caller's writer then removes its temporary file).
    """
    stop = threading.Event()
    errors: list[BaseException] = []
    q_in: queue.Queue = queue.Queue(maxsize=depth)
    q_out: queue.Queue = queue.Queue(maxsize=depth)

    def put(q, item):
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(q):
        while True:
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                if stop.is_set():
                    return _DONE

    def reader():
        try:
            for job in jobs:
                if not put(q_in, (job, read(job))):
                    return
            put(q_in, _DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            errors.append(exc)
            stop.set()

    def writer():
        try:
            while True:
                item = get(q_out)
                if item is _DONE:
                    return
                write(*item)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=reader, daemon=True), threading.Thread(target=writer, daemon=True)]
    for t in threads:
        t.start()
    try:
        total = len(jobs)
        done = 0
        while True:
            item = get(q_in)
            if item is _DONE:
                break
            job, tensors = item
            if not put(q_out, (job.key, compute(job, tensors))):
                break
            done += 1
            if progress is not None:
                progress(done, total)
        put(q_out, _DONE)
    except BaseException:
        stop.set()
        raise
    finally:
        for t in threads:
            t.join()
    if errors:
        raise errors[0]


def _patch_hashes(writer: SafetensorsStreamWriter, hashes: Mapping[str, str]) -> None:
    """Overwrite the reserved 64-character placeholders in the already written header with the hashes
    (same length, so offsets and the header length do not change)."""
    for tag, digest in hashes.items():
        try:
            writer.replace_in_header(_placeholder(tag), digest)
        except ValueError as exc:
            raise RuntimeError(f"cannot place the hash of input {tag} in the header: {exc}") from exc


# ----------------------------------------------------------------------------------------------------
# in memory (same per-key code)
# ----------------------------------------------------------------------------------------------------
def merge_state_dicts(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor] | None,
                      c: Mapping[str, torch.Tensor] | None = None, method: str = "weighted_sum",
                      alpha: float = 0.5, block_weights=None, density: float = 0.2, seed: int = 0,
                      dtype: str = "fp16", te: str = "merge", vae: str = "a", te_alpha: float | None = None,
                      vae_alpha: float | None = None, lora: Mapping[str, torch.Tensor] | None = None,
                      lora_strength: float = 1.0,
                      on_shape_mismatch: str = "error") -> tuple[dict[str, torch.Tensor], MergeReport]:
    """In-memory twin of :func:`merge_checkpoints` (same arguments and key rules; ``lora`` is a LoRA state
    dict). Returns ``(merged state dict, report)``; every floating tensor is cast to ``dtype``."""
    out_dtype = parse_dtype(dtype)
    report = MergeReport()
    sa, sb = _Source(dict(a)), (_Source(dict(b)) if b is not None else None)
    sc = _Source(dict(c)) if c is not None else None
    plan = _setup(sa, sb, sc, method, alpha, block_weights, te, vae, te_alpha, vae_alpha, report)
    jobs = _plan_keys(sa, sb, sc, method, plan, out_dtype, on_shape_mismatch, report)
    lora_map, _ = _lora(lora, lora_strength, plan.arch, report)
    _check_lora_targets(lora_map, jobs, report)
    out = {j.key: _compute(j, _read(j, sa, sb, sc), method, density, seed, lora_map, report) for j in jobs}
    return out, report
