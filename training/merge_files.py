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
SHA-256, both release the GIL), the weighted sum computed in place over A's buffer, and a writer thread that
writes straight from the tensor's memory, so reading, hashing, arithmetic and writing overlap.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import queue
import threading
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch

from ..formats.safetensors_io import SafetensorsStreamWriter, WeightFile, WeightFileError, parse_dtype
from ..formats.weight_folders import open_weight_source, sha256_source
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


class _PreadSafetensors:
    """Tensor reads from a safetensors file with ``os.preadv`` into buffers of their own, hashing the file on
    the way (POSIX; elsewhere the merge reads through :class:`WeightFile` and hashes on a separate thread).

    ``safetensors.safe_open`` memory-maps the whole file, and every page a merge touches then counts in the
    process's resident set until the map is closed (≈ the size of all inputs for a full pass). Reading each
    tensor with ``preadv`` straight into the buffer of a tensor (one copy, page cache → tensor; the buffer new
    or lent by a :class:`_BufferPool`) keeps the resident set at the tensors in flight, and the tensor is the
    merge's own: it may be computed in place. ``posix_fadvise(WILLNEED)`` keeps the disk reading ahead.

    SHA-256 while reading: every data byte of the file passes through memory here anyway, so the input hash
    is fed from the same buffers instead of reading the files a second time. The hash needs the bytes in
    file order; reads are in A's storage order, so a cursor follows them: a read that starts at the cursor
    is hashed, a small gap (a key this merge skips) is read and hashed to catch up, and anything else (B laid
    out in another order) is left for :meth:`hexdigest`, which hashes whatever lies past the cursor at the
    end — correct in every case, and a second pass only where the order made it necessary. The header is the
    documented safetensors layout (8-byte little-endian length + JSON); the file was already validated by
    :class:`WeightFile` (offsets within the file).
    """

    CATCH_UP_MAX = 64 << 20  # bytes read just to keep the hash sequential over a skipped key
    READ_AHEAD = 64 << 20  # bytes the kernel is asked to prefetch past the last read

    def __init__(self, wf: WeightFile, hash_file: bool = False):
        import struct

        self.wf = wf
        self._fd = os.open(str(wf.path), os.O_RDONLY)
        with contextlib.suppress(AttributeError, OSError):  # Linux: larger read-ahead for the sequential pass
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        head = os.pread(self._fd, 8, 0)
        (n,) = struct.unpack("<Q", head)
        raw = os.pread(self._fd, n, 8)
        header = json.loads(raw)
        header.pop("__metadata__", None)
        self._base = 8 + n
        self._offsets = {k: tuple(v["data_offsets"]) for k, v in header.items()}
        self._size = os.fstat(self._fd).st_size
        self._sha = hashlib.sha256(head + raw) if hash_file else None
        self._cursor = 8 + n  # file position up to which ``_sha`` has consumed the bytes
        self._ahead = 0  # file position up to which read-ahead was requested

    def get(self, key: str, pool: _BufferPool | None = None) -> torch.Tensor:
        """The tensor ``key`` in its stored dtype and shape, in a buffer of its own (CPU): a new one, or one
        from ``pool`` (lent under the token ``key`` until ``pool.release(key)``). Raises WeightFileError."""
        begin, end = self._offsets[key]
        dtype, shape = self.wf.dtype(key), tuple(self.wf.shape(key))
        if pool is not None and end - begin >= pool.MIN_BYTES:
            out = pool.acquire(end - begin, key).view(dtype).view(shape)
        else:
            out = torch.empty(shape, dtype=dtype)
        if end > begin:
            view = _byte_view(out)
            got = os.preadv(self._fd, [view], self._base + begin)
            if got != end - begin:
                raise WeightFileError(f"{self.wf.path.name}: short read for tensor {key!r} (file truncated?)")
            self._read_ahead(self._base + end)
            self._hash(self._base + begin, view)
        return out

    def _read_ahead(self, pos: int) -> None:
        """Ask the kernel to start reading the next ``READ_AHEAD`` bytes after ``pos`` (asynchronously), so the
        disk keeps working while this thread hashes and the others compute and write (Linux; no-op elsewhere)."""
        if self._ahead >= pos + self.READ_AHEAD // 2 or not hasattr(os, "posix_fadvise"):
            return
        start = max(self._ahead, pos)
        with contextlib.suppress(OSError):
            os.posix_fadvise(self._fd, start, pos + self.READ_AHEAD - start, os.POSIX_FADV_WILLNEED)
        self._ahead = pos + self.READ_AHEAD

    def _hash(self, pos: int, view: memoryview) -> None:
        if self._sha is None:
            return
        gap = pos - self._cursor
        if 0 < gap <= self.CATCH_UP_MAX:
            self._hash_range(self._cursor, pos)
        if pos == self._cursor:
            self._sha.update(view)  # releases the GIL for large buffers
            self._cursor += len(view)

    def _hash_range(self, start: int, stop: int, chunk: int = 8 << 20) -> None:
        buf = bytearray(min(chunk, max(stop - start, 1)))
        mv = memoryview(buf)
        pos = start
        while pos < stop:
            got = os.preadv(self._fd, [mv[:min(len(buf), stop - pos)]], pos)
            if got <= 0:
                raise WeightFileError(f"{self.wf.path.name}: unexpected end of file at byte {pos}")
            self._sha.update(mv[:got])
            pos += got
        self._cursor = stop

    def finish_hash(self) -> None:
        """Hash whatever the reads did not cover, up to the end of the file (the pipeline's reader thread
        calls it after its last tensor, while the other stages are still busy). No-op without hashing."""
        if self._sha is not None and self._cursor < self._size:
            self._hash_range(self._cursor, self._size)

    def hexdigest(self) -> str:
        """SHA-256 of the whole file (first hashing, in order, the bytes the reads did not cover)."""
        if self._sha is None:
            raise RuntimeError("this reader was opened without hashing")
        self.finish_hash()
        return self._sha.hexdigest()

    def data_offset(self, key: str) -> int:
        return self._offsets[key][0]

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _BufferPool:
    """Reusable byte buffers for the streaming merge's tensors.

    A fresh ``torch.empty`` of tens of MB is new memory from the kernel: every 4 KiB page faults and is
    zeroed before ``preadv`` overwrites it (≈ a third of the reading's system time in ``benchmarks/merge.py``).
    Buffers are lent per job (token = key) and given back by :meth:`release` once the job's output has been
    written — never earlier, so no view of a buffer can still be in use when it is lent again. Requests are
    rounded up to 1 MiB so buffers fit many tensor sizes; at most ``keep_bytes`` of free buffers are kept.
    Thread-safe (readers acquire, the writer releases).
    """

    MIN_BYTES = 1 << 20  # smaller tensors come from malloc's heap, which reuses memory by itself
    _ROUND = 1 << 20

    def __init__(self, keep_bytes: int = 512 << 20):
        self.keep_bytes = keep_bytes
        self._free: list[torch.Tensor] = []
        self._free_bytes = 0
        self._lent: dict[str, list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def acquire(self, nbytes: int, token: str) -> torch.Tensor:
        """A uint8 tensor of exactly ``nbytes`` (a view of a pooled buffer), lent under ``token``."""
        with self._lock:
            best = None
            for i, buf in enumerate(self._free):  # smallest free buffer that fits
                if buf.numel() >= nbytes and (best is None or buf.numel() < self._free[best].numel()):
                    best = i
            if best is not None:
                buf = self._free.pop(best)
                self._free_bytes -= buf.numel()
            else:
                buf = None
        if buf is None:
            buf = torch.empty(-(-nbytes // self._ROUND) * self._ROUND, dtype=torch.uint8)
        with self._lock:
            self._lent.setdefault(token, []).append(buf)
        return buf[:nbytes]

    def release(self, token: str) -> None:
        """Take back every buffer lent under ``token`` (call when nothing uses them any more)."""
        with self._lock:
            for buf in self._lent.pop(token, ()):
                if self._free_bytes + buf.numel() <= self.keep_bytes:
                    self._free.append(buf)
                    self._free_bytes += buf.numel()


def _byte_view(t: torch.Tensor) -> memoryview:
    """A writable byte ``memoryview`` of a contiguous CPU tensor's storage (no copy)."""
    flat = t.view(-1)
    if t.dtype == torch.bool:
        return memoryview(flat.numpy()).cast("B")
    return memoryview(flat.view(torch.uint8).numpy())


def _fast_reader(src: _Source, hash_file: bool = False):
    if src is None or not src.is_file or src.obj.format != "safetensors" or not hasattr(os, "preadv"):
        return None  # (Windows has no pread/preadv: WeightFile's memory map is used there)
    return _PreadSafetensors(src.obj, hash_file=hash_file)


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
             lora: Mapping[str, torch.Tensor] | None, report: MergeReport, inplace: bool = False) -> torch.Tensor:
    """Merge one key. ``inplace=True`` (the streaming merge, whose A tensor is a fresh buffer of its own)
    lets the weighted sum write its result over A's buffer: the same ``torch.lerp`` kernel and arguments as
    :func:`training.merge.weighted_sum` takes for these dtypes, so the bits are identical (tested), without
    allocating an output tensor per key."""
    ta, tb, tc = tensors
    if (inplace and job.action == "merge" and method == "weighted_sum" and ta.dtype == tb.dtype == job.out_dtype
            and job.out_dtype in (torch.float16, torch.bfloat16, torch.float32)):
        out = torch.lerp(ta, tb, float(job.weight), out=ta)  # == weighted_sum(ta, tb, w, out_dtype), in place
    elif job.action == "merge":
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


def _lora(lora, strength, arch, report, a: _Source | None = None) -> tuple[dict | None, dict]:
    if lora is None:
        return None, {}
    from ..formats.lora_files import lora_deltas

    dims = _flux_dims(a) if arch == "flux" and a is not None else None
    res = lora_deltas(lora, strength=float(strength), arch=arch, flux_dims=dims)
    report.lora_skipped = dict(res.skipped)
    info = {"strength": float(strength), "format": res.format}
    if isinstance(lora, (str, os.PathLike)):
        info["name"] = Path(lora).name
    deltas = dict(res.deltas)
    if dims is not None:  # canonical Flux ΔW -> A's layout (a split diffusers to_q gets its rows of the qkv ΔW)
        from ..formats.flux_views import deltas_for_keys

        deltas = deltas_for_keys(deltas, a.keys(), dims)
    return deltas, info


def _flux_dims(src: _Source):
    from ..formats.flux_keys import infer_dims, is_flux_key

    return infer_dims({k: src.shape(k) for k in src.keys() if is_flux_key(k)})


def _align_flux(arch: str, a: _Source, *others: _Source | None) -> list[_Source | None]:
    """Flux inputs in another key layout than A (BFL / ComfyUI / diffusers) are read under A's key names
    (``formats.flux_views.FluxKeyView``: split q/k/v fused or fused sliced), so the output keeps A's layout."""
    if arch != "flux":
        return list(others)
    from ..formats.flux_keys import flux_layout
    from ..formats.flux_views import FluxKeyView

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
                self.result[tag] = sha256_source(p)
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
        recipe = _recipe(method, plan, density, seed, dtype_name, inputs, lora_info, report)
        metadata = {RECIPE_KEY: json.dumps(recipe, sort_keys=True), **_modelspec(plan.arch, out_path.stem)}
        for src in (sa, sb, sc):
            if src is not None:
                src.reader = _fast_reader(src, hash_file=hash_inputs)
        if sa.reader is not None:  # A's storage order: sequential reads of A (and of B/C when laid out alike)
            jobs.sort(key=lambda j: sa.reader.data_offset(j.key))
        specs = {j.key: (j.out_dtype, j.shape) for j in jobs}
        if hash_inputs:  # safetensors inputs hash while they are read; torch pickles and the LoRA on a thread
            srcs = {"A": sa, "B": sb, "C": sc}
            rest = {tag: p for tag, p in all_paths.items() if srcs.get(tag) is None or srcs[tag].reader is None}
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
                return _compute(j, t, method, density, seed, lora_map, report, inplace=owned)

            with _torch_threads(1 if method in _MEMORY_BOUND or sb is None else None):
                _pipeline(jobs, readers, compute, write, progress)
            hashes = {}
            if hash_inputs:
                for src, tag in ((sa, "A"), (sb, "B"), (sc, "C")):
                    if src is not None and src.reader is not None:
                        hashes[tag] = src.reader.hexdigest()
            if hasher is not None:
                hasher.join()
                if hasher.error is not None:
                    raise hasher.error
                hashes.update(hasher.result)
            _patch_hashes(writer, hashes)
            for tag, h in hashes.items():
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

# methods whose per-tensor arithmetic is one or two passes over memory: torch's OpenMP threads gain nothing
# there, and between the thousands of short parallel regions they spin-wait on the cores the reader, hash and
# writer threads need (benchmarks/merge.py on 2 cores: 7.4 s → 3.3 s user CPU for the same merge).
_MEMORY_BOUND = ("weighted_sum", "add_difference")


@contextlib.contextmanager
def _torch_threads(n: int | None):
    """Run the block with ``torch.set_num_threads(n)`` (``None``: unchanged) and restore the previous count.
    Results do not depend on it (torch's element-wise kernels give the same bits for any thread count)."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _pipeline(jobs, readers, compute, write, progress, depth: int = 3) -> None:
    """One reader thread per input → compute (caller's thread) → write (thread), each ``depth`` tensors ahead.

    ``readers[i] = (read, finish)``: ``read(job)`` returns input ``i``'s tensor for ``job`` (or ``None`` when
    the job does not need it), ``finish()`` (or ``None``) runs on that reader's thread after its last job;
    ``compute(job, [t_0, t_1, …])`` returns the tensor ``write(key, tensor)`` appends. One thread per input
    lets A and B be read and hashed (page-cache copies and SHA-256 release the GIL) on both cores at once
    while the arithmetic and the output writes overlap them. Any exception in a stage stops the others and is
    re-raised here (the caller's writer then removes its temporary file).
    """
    stop = threading.Event()
    errors: list[BaseException] = []
    q_ins = [queue.Queue(maxsize=depth) for _ in readers]
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

    def reader(read, finish, q):
        try:
            for job in jobs:
                if not put(q, read(job)):
                    return
            if finish is not None:
                finish()
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

    threads = [threading.Thread(target=reader, args=(r, f, q), daemon=True) for (r, f), q in zip(readers, q_ins)]
    threads.append(threading.Thread(target=writer, daemon=True))
    for t in threads:
        t.start()
    try:
        total = len(jobs)
        for done, job in enumerate(jobs, 1):
            tensors = [get(q) for q in q_ins]
            if any(t is _DONE for t in tensors):
                break
            if not put(q_out, (job.key, compute(job, tensors))):
                break
            del tensors
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
    sb, sc = _align_flux(plan.arch, sa, sb, sc)
    jobs = _plan_keys(sa, sb, sc, method, plan, out_dtype, on_shape_mismatch, report)
    lora_map, _ = _lora(lora, lora_strength, plan.arch, report, sa)
    _check_lora_targets(lora_map, jobs, report)
    out = {j.key: _compute(j, _read(j, sa, sb, sc), method, density, seed, lora_map, report) for j in jobs}
    return out, report
