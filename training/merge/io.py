"""Reading and hashing for the streaming merge (:mod:`training.merge.files`): ``preadv`` tensor reads into
pooled buffers with SHA-256 of the input fed from the same bytes, a hashing thread for inputs that cannot be read
that way, and the hash cache lookups.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import torch

from ...formats.safetensors_io import WeightFile, WeightFileError
from ...formats.weight_folders import sha256_source

if TYPE_CHECKING:  # annotations only: files.py imports this module
    from .files import _Source


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


def _cached_hashes(paths: Mapping[str, Path]) -> dict[str, str]:
    from .hashes import lookup

    found = {tag: lookup(p) for tag, p in paths.items()}
    return {tag: h for tag, h in found.items() if h}


def _remember_hashes(paths: Mapping[str, Path], hashes: Mapping[str, str]) -> None:
    from .hashes import store

    store({paths[tag]: h for tag, h in hashes.items() if tag in paths})


def _collect_hashes(sources: Mapping[str, object], cached: Mapping[str, str], hasher, paths: Mapping[str, Path],
                    *, hash_inputs: bool, hash_cache: bool) -> dict[str, str]:
    """The inputs' SHA-256 hex digests after a streaming merge, ``{tag: hex}``.

    ``sources``: ``{tag: source}`` whose ``reader`` (when not None) hashed the bytes the merge read; ``cached``:
    digests found in the hash cache before the merge (those inputs were not hashed again); ``hasher``: the
    background thread hashing inputs the merge did not read whole (or None) — its error, if any, is raised here.
    New digests are stored in the hash cache when ``hash_cache``. Raises whatever the hasher thread raised."""
    hashes: dict[str, str] = {}
    if hash_inputs:
        for tag, src in sources.items():
            if src is not None and src.reader is not None and tag not in cached:
                hashes[tag] = src.reader.hexdigest()
    if hasher is not None:
        hasher.join()
        if hasher.error is not None:
            raise hasher.error
        hashes.update(hasher.result)
    if hash_inputs and hash_cache:
        _remember_hashes(paths, hashes)
    hashes.update(cached)
    return hashes
