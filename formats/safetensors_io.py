"""Weight-file I/O: streaming safetensors reads, safe torch-pickle reads, atomic and streaming writes.

Reading goes tensor by tensor through ``safetensors.safe_open`` (memory-mapped), so a per-tensor pass never
materialises a whole checkpoint. ``.ckpt`` / ``.pt`` / ``.pth`` / ``.bin`` files are read only with
``torch.load(weights_only=True)``: this module never unpickles arbitrary objects.

Writes are atomic: data goes to a temporary file in the destination folder, is flushed and fsynced, then
``os.replace``-d over the destination; on any error the temporary file is removed and nothing is left behind.

:class:`SafetensorsStreamWriter` writes a safetensors file tensor by tensor with a header computed up front
from the declared dtypes and shapes. The ``safetensors`` library only writes from a complete in-memory dict,
which would hold a whole 2 GB checkpoint in RAM during a streaming merge; the file format itself is a fixed,
documented layout (8-byte little-endian header length, JSON header, raw little-endian tensor bytes; see
https://github.com/huggingface/safetensors#format), so the writer follows it directly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Iterator, Mapping

import torch

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

# torch dtype <-> safetensors dtype code (safetensors format spec)
_DTYPE_TO_ST = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        _DTYPE_TO_ST[getattr(torch, _name)] = _code
_ST_TO_DTYPE = {v: k for k, v in _DTYPE_TO_ST.items()}

DTYPE_NAMES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "float32": torch.float32,
               "float16": torch.float16, "bfloat16": torch.bfloat16}


class WeightFileError(ValueError):
    """A weight file that cannot be read: missing, corrupt, truncated, or in a format that is not allowed."""


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """Map ``"fp16" | "bf16" | "fp32"`` (or a torch dtype) to a torch dtype; raises ``ValueError`` otherwise."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPE_NAMES[str(name).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of fp16, bf16, fp32") from None


def dtype_to_safetensors(dtype: torch.dtype) -> str:
    """The safetensors dtype code (``"F16"``, ``"BF16"``, ...) of a torch dtype; ``ValueError`` if none."""
    try:
        return _DTYPE_TO_ST[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be stored in safetensors") from None


def safetensors_to_dtype(code: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype code; ``ValueError`` for codes torch lacks."""
    try:
        return _ST_TO_DTYPE[code]
    except KeyError:
        raise ValueError(f"safetensors dtype {code!r} is not supported by this torch build") from None


class WeightFile:
    """Read-only, tensor-by-tensor access to a safetensors or (weights-only) torch checkpoint.

    Use as a context manager. For safetensors files, :meth:`get` reads one tensor from the memory map; shapes
    and dtypes come from the header without reading data. Torch pickles (``.ckpt/.pt/.pth/.bin``) are loaded
    with ``torch.load(weights_only=True, mmap=True)`` (a ``state_dict`` entry is unwrapped), which never runs
    pickled code; a file that needs arbitrary unpickling is refused with a message suggesting conversion.

    Raises:
        FileNotFoundError: the path does not exist.
        WeightFileError: the file is corrupt, truncated, empty, or not a weight file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"weight file not found: {self.path}")
        self._st = None
        self._sd: dict[str, torch.Tensor] | None = None
        self.metadata: dict[str, str] = {}
        suffix = self.path.suffix.lower()
        if suffix in PICKLE_SUFFIXES:
            self.format = "torch"
            self._sd = _load_torch_weights_only(self.path)
        else:
            self.format = "safetensors"
            self._open_safetensors()

    def _open_safetensors(self) -> None:
        from safetensors import safe_open

        size = self.path.stat().st_size
        if size < 8:
            raise WeightFileError(f"{self.path.name}: not a safetensors file (only {size} bytes)")
        try:
            self._st = safe_open(str(self.path), framework="pt", device="cpu")
            self.metadata = dict(self._st.metadata() or {})
            self._keys = list(self._st.keys())
        except Exception as exc:  # safetensors raises SafetensorError (not exported stably)
            hint = ""
            with open(self.path, "rb") as fh:
                head = fh.read(2)
            if head[:1] == b"\x80" or head == b"PK":
                hint = " (this looks like a pickled torch file; rename it to .ckpt to read it weights-only)"
            raise WeightFileError(f"{self.path.name}: corrupt or truncated safetensors file: {exc}{hint}") from exc

    # -- mapping-like API -------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """All tensor names, in file order."""
        return list(self._sd.keys()) if self._sd is not None else list(self._keys)

    def __contains__(self, key: str) -> bool:
        return key in (self._sd if self._sd is not None else set(self._keys))

    def __len__(self) -> int:
        return len(self.keys())

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of ``key`` without reading its data."""
        if self._sd is not None:
            return tuple(self._sd[key].shape)
        return tuple(self._st.get_slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        """Stored dtype of ``key`` without reading its data."""
        if self._sd is not None:
            return self._sd[key].dtype
        return safetensors_to_dtype(self._st.get_slice(key).get_dtype())

    def get(self, key: str) -> torch.Tensor:
        """Read one tensor (CPU, stored dtype). Raises ``KeyError`` / :class:`WeightFileError`."""
        if self._sd is not None:
            return self._sd[key]
        try:
            return self._st.get_tensor(key)
        except KeyError:
            raise
        except Exception as exc:
            raise WeightFileError(f"{self.path.name}: cannot read tensor {key!r}: {exc}") from exc

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Iterate ``(key, tensor)`` one tensor at a time."""
        for k in self.keys():
            yield k, self.get(k)

    def close(self) -> None:
        """Release the memory map / loaded tensors; the object cannot be read afterwards."""
        self._st = None
        self._sd = None

    def __enter__(self) -> "WeightFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _load_torch_weights_only(path: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # mmap needs the zip format; legacy files load without it
            if "mmap" not in str(exc):
                raise
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        # torch's own message suggests weights_only=False, which is exactly what we refuse: keep only the reason.
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        keep = [ln for ln in lines if "weights_only" not in ln and not ln.startswith("Check the documentation")]
        reason = (keep[0].split("WeightsUnpickler error:", 1)[-1].strip() if keep
                  else (lines[0] if lines else type(exc).__name__)).rstrip(".")
        raise WeightFileError(
            f"{path.name}: refused to load with torch.load(weights_only=True): {reason}. "
            "Files that need full unpickling can run arbitrary code, so Concept Lab never loads them; "
            "convert the file to .safetensors with a tool you trust."
        ) from exc
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise WeightFileError(f"{path.name}: holds a {type(obj).__name__}, not a state dict")
    sd = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise WeightFileError(f"{path.name}: holds no tensors")
    return sd


def open_weights(path: str | os.PathLike) -> WeightFile:
    """Open a weight file for tensor-by-tensor reading (see :class:`WeightFile`)."""
    return WeightFile(path)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` dict of a safetensors file (``{}`` for torch pickles)."""
    with WeightFile(path) as wf:
        return dict(wf.metadata)


def load_state_dict(path: str | os.PathLike, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Load every tensor of a (small) weight file into a dict, optionally cast to ``dtype``.

    Meant for LoRA-sized files; use :func:`open_weights` for checkpoints.
    """
    with WeightFile(path) as wf:
        out = {}
        for k in wf.keys():
            t = wf.get(k)
            out[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return out


def _new_file_mode() -> int:
    """``0o666 & ~umask``: the mode a plainly created file gets (0644 with the usual umask 022)."""
    mask = None
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    mask = int(line.split()[1], 8)
    except OSError:
        pass
    if mask is None:
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; on success fsync and ``os.replace`` it onto ``path``.

    On any exception the temporary file is deleted and ``path`` is left untouched. The file gets the mode a plain
    ``open()`` would give it (``0o666 & ~umask``, 0644 usually), not ``mkstemp``'s 0600.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite and dest.exists():
        raise FileExistsError(f"{dest} already exists (pass overwrite to replace it)")
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=str(dest.parent))
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        if not overwrite and dest.exists():
            raise FileExistsError(f"{dest} appeared while writing; not overwritten")
        os.chmod(tmp_path, _new_file_mode())  # mkstemp makes 0600; files get the mode open() would give (0644)
        os.replace(tmp_path, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_text(path: str | os.PathLike, text: str, overwrite: bool = True) -> Path:
    """Write UTF-8 text atomically (JSON reports, captions, stats). Returns the destination path."""
    with atomic_output(path, overwrite=overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def _stringify_metadata(metadata: Mapping | None) -> dict[str, str]:
    out = {}
    for k, v in (metadata or {}).items():
        out[str(k)] = v if isinstance(v, str) else json.dumps(v)
    return out


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Mapping | None = None, overwrite: bool = True) -> Path:
    """Save a dict of tensors as safetensors, atomically; non-string metadata values are JSON-encoded.

    Tensors are made contiguous and moved to CPU. Raises ``FileExistsError`` (see :func:`atomic_output`).
    """
    from safetensors.torch import save_file

    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_output(path, overwrite=overwrite) as tmp:
        save_file(clean, str(tmp), metadata=_stringify_metadata(metadata))
    return Path(path)


class SafetensorsStreamWriter:
    """Write a safetensors file one tensor at a time, in constant memory, atomically.

    Args:
        path: destination file.
        specs: ordered mapping ``key -> (torch dtype, shape)`` of every tensor that will be written; the
            header (offsets) is computed from it up front.
        metadata: ``__metadata__`` (values JSON-encoded when not strings).
        overwrite: replace an existing file (default False: ``FileExistsError``).

    Call :meth:`write` for each key in ``specs`` order with a tensor of the declared dtype and shape, then
    :meth:`close` (or use as a context manager). If the block raises, or not every tensor was written, the
    temporary file is deleted and no output appears.

    Raises:
        ValueError: wrong key order, dtype or shape; missing tensors at close.
        FileExistsError: see ``overwrite``.
        OSError: disk full or other write error (no partial file is left).
    """

    def __init__(self, path: str | os.PathLike, specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: Mapping | None = None, overwrite: bool = False):
        self.path = Path(path)
        self._specs = [(k, d, tuple(int(s) for s in shp)) for k, (d, shp) in specs.items()]
        header: dict[str, object] = {}
        md = _stringify_metadata(metadata)
        if md:
            header["__metadata__"] = md
        offset = 0
        for key, dtype, shape in self._specs:
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[key] = {"dtype": dtype_to_safetensors(dtype), "shape": list(shape),
                           "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * ((8 - len(raw) % 8) % 8)
        self._header = struct.pack("<Q", len(raw)) + raw
        self._ctx = atomic_output(self.path, overwrite=overwrite)
        self._tmp = self._ctx.__enter__()
        self._fh = open(self._tmp, "wb")
        self._fh.write(self._header)
        self._next = 0
        self._closed = False

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` as ``key``; must match the next declared key, dtype and shape."""
        if self._next >= len(self._specs):
            raise ValueError(f"unexpected extra tensor {key!r}")
        exp_key, exp_dtype, exp_shape = self._specs[self._next]
        if key != exp_key:
            raise ValueError(f"tensor {key!r} written out of order; expected {exp_key!r}")
        if tensor.dtype != exp_dtype or tuple(tensor.shape) != exp_shape:
            raise ValueError(f"{key}: got {tensor.dtype} {tuple(tensor.shape)}, declared {exp_dtype} {exp_shape}")
        t = tensor.detach().to("cpu").contiguous()
        if t.numel():
            # write straight from the tensor's memory (a byte view, no ``tobytes()`` copy of the data)
            flat = t.reshape(-1)
            data = memoryview(flat.numpy()).cast("B") if t.dtype == torch.bool else \
                memoryview(flat.view(torch.uint8).numpy())
            self._fh.write(data)
        self._next += 1

    def replace_in_header(self, placeholder: str, value: str) -> None:
        """Overwrite a same-length ``placeholder`` string in the already written header with ``value``.

        For metadata only known after the data is streamed (e.g. input hashes computed during a merge):
        reserve a unique placeholder in ``metadata`` at construction, then patch it before :meth:`close`.
        Offsets and the header length do not change. Raises ``ValueError`` if the lengths differ or the
        placeholder is not found exactly once.
        """
        ph, val = placeholder.encode("utf-8"), value.encode("utf-8")
        if len(ph) != len(val):
            raise ValueError(f"placeholder and value differ in length ({len(ph)} vs {len(val)} bytes)")
        pos = self._header.find(ph)
        if pos < 0 or self._header.find(ph, pos + 1) >= 0:
            raise ValueError(f"placeholder {placeholder!r} must occur exactly once in the header")
        self._fh.flush()
        os.pwrite(self._fh.fileno(), val, pos)
        self._header = self._header[:pos] + val + self._header[pos + len(ph):]

    def close(self) -> Path:
        """Finish the file and move it into place. Raises ``ValueError`` if tensors are missing."""
        if self._closed:
            return self.path
        self._closed = True
        try:
            if self._next != len(self._specs):
                raise ValueError(f"only {self._next} of {len(self._specs)} declared tensors were written")
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
        except BaseException as exc:
            self._fh.close()
            self._ctx.__exit__(type(exc), exc, exc.__traceback__)
            raise
        self._ctx.__exit__(None, None, None)
        return self.path

    def abort(self) -> None:
        """Discard the partial file (called automatically when the ``with`` block raises)."""
        if self._closed:
            return
        self._closed = True
        self._fh.close()
        err = RuntimeError("aborted")
        with contextlib.suppress(RuntimeError):
            self._ctx.__exit__(RuntimeError, err, None)

    def __enter__(self) -> "SafetensorsStreamWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a whole file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
