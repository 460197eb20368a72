"""Sharded weight folders (diffusers ``transformer/``, ``unet/`` ... saved by ``save_pretrained``) read as one file.

A diffusers model folder holds ``diffusion_pytorch_model.safetensors`` or shards
``diffusion_pytorch_model-0000N-of-0000M.safetensors`` listed in ``diffusion_pytorch_model.safetensors.index.json``
(``{"weight_map": {key: shard file}}``, the layout of ``huggingface_hub``'s ``split_torch_state_dict_into_shards``).
:class:`ShardedWeights` exposes them through the reader API of one file (``keys/shape/dtype/get`` plus
``release/prefetch`` where the per-file reader has them), so the diff and the merge read a folder like a file,
tensor by tensor. A pipeline folder (``FLUX.1-dev/``) is taken as its ``transformer/`` (else ``unet/``) subfolder.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

from .safetensors_io import WeightFileError, sha256_file

__all__ = ["weight_files_in", "ShardedWeights", "open_weight_source", "sha256_source"]

_MODEL_SUBFOLDERS = ("transformer", "unet")


def _model_folder(path: Path) -> Path:
    if not any(path.glob("*.safetensors")):
        for sub in _MODEL_SUBFOLDERS:
            if (path / sub).is_dir():
                return path / sub
    return path


def weight_files_in(folder: str | os.PathLike) -> list[Path]:
    """The safetensors files of a model folder, in shard order.

    ``folder``: a diffusers model folder, or a pipeline folder with a ``transformer/`` or ``unet/`` subfolder.
    Uses ``*.safetensors.index.json`` when present (every shard it names must exist), else every
    ``*.safetensors`` file. Raises ``FileNotFoundError`` (no folder / no weights) or :class:`WeightFileError`
    (unreadable index).
    """
    p = Path(folder)
    if not p.is_dir():
        raise FileNotFoundError(f"model folder not found: {p}")
    p = _model_folder(p)
    indexes = sorted(p.glob("*.safetensors.index.json"))
    if indexes:
        try:
            wmap = json.loads(indexes[0].read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise WeightFileError(f"{indexes[0].name}: not a safetensors shard index ({exc})") from exc
        files = [p / f for f in sorted(set(wmap.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{p}: shards named in {indexes[0].name} are missing: {missing}")
        return files
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{p}: no .safetensors weights in this folder (a diffusers model folder holds "
                                "diffusion_pytorch_model*.safetensors)")
    return files


class ShardedWeights:
    """Several weight files read as one (see module docstring).

    Args:
        folder: model folder (see :func:`weight_files_in`).
        opener: per-file reader class, e.g. :class:`~.safetensors_io.WeightFile` or
            ``metrics.diff_io.StreamingWeights``.

    Attributes: ``path`` (the model folder), ``name`` (``parent/folder``), ``metadata`` (first shard's),
    ``format`` (``"folder"``), ``files``.

    Raises ``FileNotFoundError`` / :class:`WeightFileError` like the opener, and :class:`WeightFileError` when two
    shards hold the same key.
    """

    format = "folder"

    def __init__(self, folder: str | os.PathLike, opener: Callable):
        self.files = weight_files_in(folder)
        self.path = self.files[0].parent
        self.name = f"{self.path.parent.name}/{self.path.name}" if self.path.parent.name else self.path.name
        self._readers = []
        self._where: dict = {}
        try:
            for f in self.files:
                r = opener(f)
                self._readers.append(r)
                for k in r.keys():
                    if k in self._where:
                        raise WeightFileError(f"{self.name}: tensor {k!r} is in two shards")
                    self._where[k] = r
        except BaseException:
            self.close()
            raise
        self.metadata = dict(getattr(self._readers[0], "metadata", {}) or {})

    def keys(self) -> list[str]:
        """Every tensor name, shard by shard."""
        return list(self._where)

    def __contains__(self, key) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, key: str):
        return self._where[key].shape(key)

    def dtype(self, key: str):
        return self._where[key].dtype(key)

    def get(self, key: str):
        return self._where[key].get(key)

    def release(self, key: str) -> None:
        r = self._where.get(key)
        if r is not None and hasattr(r, "release"):
            r.release(key)

    def prefetch(self, key: str) -> None:
        r = self._where.get(key)
        if r is not None and hasattr(r, "prefetch"):
            r.prefetch(key)

    def close(self) -> None:
        for r in self._readers:
            r.close()
        self._readers = []

    def __enter__(self) -> "ShardedWeights":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_weight_source(path: str | os.PathLike, opener: Callable):
    """``opener(path)`` for a file, :class:`ShardedWeights` for a folder."""
    return ShardedWeights(path, opener) if Path(path).is_dir() else opener(path)


def sha256_source(path: str | os.PathLike) -> str:
    """SHA-256 of a weight file; for a folder, of its shards' bytes in shard order (one stream)."""
    p = Path(path)
    if not p.is_dir():
        return sha256_file(p)
    h = hashlib.sha256()
    for f in weight_files_in(p):
        with open(f, "rb") as fh:
            while True:
                b = fh.read(1 << 20)
                if not b:
                    break
                h.update(b)
    return h.hexdigest()
