"""A cache of input files' SHA-256 for merge recipes, keyed by the file's identity on disk.

A merge records the SHA-256 of every input in its recipe. Hashing is computed from the very buffers the merge
reads (:class:`training.merge_files._PreadSafetensors`), but it still costs CPU time the I/O floor does not
pay (SHA-256 of 2 × 2 GB on a busy 2-core machine is seconds). Users merge the same inputs again and again
(ratio sweeps, block-weight tuning), so each digest is kept in a small JSON cache and reused while the file is
unchanged -- as A1111 does for its model hashes (``modules/hashes.py``: ``cache("hashes")`` keyed by the file
name and its mtime). A file counts as unchanged when its resolved path, size, mtime (ns), inode and device are the
same; a file rewritten in place with the same size and a restored mtime would defeat this (a deliberate act:
pass ``--no-hash-cache`` / ``CONCEPTLAB_HASH_CACHE=off`` to distrust the cache).

Location: ``$CONCEPTLAB_HASH_CACHE`` (a file path, or ``off``), else ``$XDG_CACHE_HOME/conceptlab/sha256.json``
(``~/.cache/conceptlab/sha256.json``). Writes are atomic (temp file + ``os.replace``); two merges finishing at
once may lose one's new entries (they are recomputed next time), never corrupt the file. At most
:data:`MAX_ENTRIES` are kept (oldest dropped).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import time
from pathlib import Path

MAX_ENTRIES = 2000
_LOCK = threading.Lock()


def cache_path() -> Path | None:
    """Where the cache lives, or ``None`` when disabled (``CONCEPTLAB_HASH_CACHE=off``)."""
    env = os.environ.get("CONCEPTLAB_HASH_CACHE", "").strip()
    if env.lower() in ("off", "0", "false", "none"):
        return None
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "conceptlab" / "sha256.json"


def file_identity(path: str | os.PathLike) -> str:
    """``"<resolved path>|<size>|<mtime ns>|<inode>|<device>"`` of ``path`` (raises OSError if it is missing)."""
    p = Path(path).resolve()
    st = p.stat()
    return f"{p}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{st.st_dev}"


def _load(cp: Path) -> dict:
    try:
        data = json.loads(cp.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def lookup(path: str | os.PathLike) -> str | None:
    """The cached SHA-256 (64 hex digits) of ``path`` if the file is unchanged since it was stored, else None."""
    cp = cache_path()
    if cp is None:
        return None
    try:
        ident = file_identity(path)
    except OSError:
        return None
    entry = _load(cp).get(ident)
    if isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == 64:
        return entry["sha256"]
    return None


def store(digests: dict[str | os.PathLike, str]) -> None:
    """Remember ``{path: sha256}`` (silently does nothing when the cache is disabled or not writable)."""
    cp = cache_path()
    if cp is None or not digests:
        return
    with _LOCK, contextlib.suppress(OSError):
        data = _load(cp)
        now = time.time()
        for path, digest in digests.items():
            with contextlib.suppress(OSError):
                data[file_identity(path)] = {"sha256": digest, "stored": now}
        if len(data) > MAX_ENTRIES:
            keep = sorted(data.items(), key=lambda kv: kv[1].get("stored", 0) if isinstance(kv[1], dict) else 0)
            data = dict(keep[-MAX_ENTRIES:])
        cp.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".sha256.", suffix=".tmp", dir=str(cp.parent))
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(data, fh)
            os.replace(tmp, cp)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
