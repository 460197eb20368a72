"""ComfyUI's folders, progress bar, Cancel button and IMAGE tensors, for every node module.

Everything here imports ComfyUI (``folder_paths``, ``comfy.*``) inside functions, so node classes import
without ComfyUI. Node modules use these helpers instead of touching ComfyUI directly:

* paths: :func:`input_dir`, :func:`output_dir`, :func:`safe_join`, :func:`resolve_input`,
  :func:`output_file`, :func:`model_file`, :func:`model_list`: every file a node reads or writes stays inside
  ComfyUI's input / output / models folders, because ``/prompt`` can be reached over the network;
* progress and cancel: :class:`Progress` (ComfyUI ``ProgressBar`` + interrupt check), :func:`check_interrupt`;
* images: :func:`image_to_numpy` / :func:`numpy_to_image` between IMAGE ``[B,H,W,3]`` float 0..1 and
  uint8 arrays.

The models side of the bridge is :mod:`.comfy_host` (``ComfyHost``) with :mod:`.comfy_patchers`,
:mod:`.comfy_keys` and :mod:`.comfy_hooks`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .policy import PathOutsideError, check_name, confine  # noqa: F401 - PathOutsideError is re-exported for callers


def _folder_paths():
    import folder_paths  # ComfyUI

    return folder_paths


def input_dir() -> Path:
    """ComfyUI's input directory."""
    return Path(_folder_paths().get_input_directory())


def output_dir() -> Path:
    """ComfyUI's output directory."""
    return Path(_folder_paths().get_output_directory())


def safe_join(base: str | os.PathLike, relative: str) -> Path:
    """Join ``relative`` under ``base`` and refuse anything that escapes it (:func:`.policy.confine`).

    Absolute paths, ``..`` segments, backslashes, NUL, over-long names and symlinks resolving outside ``base``
    raise :class:`PathOutsideError`; an empty ``relative`` names ``base`` itself.
    """
    return confine(base, relative, "path", allow_root=True)


def resolve_input(relative: str, must_exist: bool = True) -> Path:
    """A path inside ComfyUI's input directory (see :func:`safe_join`); ``FileNotFoundError`` if missing."""
    p = safe_join(input_dir(), relative)
    if must_exist and not p.exists():
        raise FileNotFoundError(f"{relative!r} not found in ComfyUI's input folder ({input_dir()})")
    return p


def output_file(subfolder: str, filename: str) -> Path:
    """A path ``output/<subfolder>/<filename>`` inside ComfyUI's output directory (folders created)."""
    p = confine(output_dir(), f"{subfolder}/{filename}" if subfolder else filename, "output name")
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def model_file(folder_name: str, filename: str) -> Path:
    """Full path of a file listed by ComfyUI for ``folder_name`` (``"checkpoints"``, ``"loras"``, ...).

    Only names from ComfyUI's own lists resolve, so no input can name an arbitrary path.
    Raises ``FileNotFoundError``.
    """
    fp = _folder_paths()
    filename = check_name(filename, f"{folder_name} file")
    path = fp.get_full_path(folder_name, filename)
    if not path:
        raise FileNotFoundError(f"{filename!r} is not in ComfyUI's {folder_name} folder")
    return Path(path)


def model_list(folder_name: str) -> list[str]:
    """ComfyUI's file list for a models folder, or ``[]`` without ComfyUI (contract checks)."""
    try:
        return list(_folder_paths().get_filename_list(folder_name))
    except Exception:  # noqa: BLE001 - outside ComfyUI
        return []


def check_interrupt() -> None:
    """Raise ComfyUI's interrupt exception if the user pressed Cancel (no-op outside ComfyUI)."""
    try:
        import comfy.model_management as mm
    except ImportError:
        return
    mm.throw_exception_if_processing_interrupted()


class Progress:
    """ComfyUI progress bar that is also a cancel point; works (silently) outside ComfyUI.

    ``update(n=1, preview=None)``: advance, optionally with a PIL preview image; then checks interrupt.
    """

    def __init__(self, total: int):
        self.total = max(int(total), 1)
        self.done = 0
        try:
            import comfy.utils

            self._bar = comfy.utils.ProgressBar(self.total)
        except ImportError:
            self._bar = None

    def update(self, n: int = 1, preview=None) -> None:
        """Advance by ``n`` steps (optionally with a PIL preview); raises ComfyUI's interrupt if Cancel was pressed."""
        self.done = min(self.done + int(n), self.total)
        if self._bar is not None:
            if preview is not None:
                self._bar.update_absolute(self.done, self.total, ("JPEG", preview, 512))
            else:
                self._bar.update_absolute(self.done, self.total)
        check_interrupt()

    def set(self, value: int, preview=None) -> None:
        """Set the absolute step count (see :meth:`update`)."""
        self.update(int(value) - self.done, preview)


def image_to_numpy(image: torch.Tensor) -> list[np.ndarray]:
    """IMAGE ``[B,H,W,C]`` float 0..1 → list of uint8 ``[H,W,3]`` arrays (alpha dropped, gray expanded)."""
    if image.dim() == 3:
        image = image.unsqueeze(0)
    arr = (image.detach().float().clamp(0, 1).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
    out = []
    for a in arr:
        if a.shape[-1] == 1:
            a = np.repeat(a, 3, axis=-1)
        out.append(np.ascontiguousarray(a[..., :3]))
    return out


def numpy_to_image(arrays: Sequence[np.ndarray] | np.ndarray) -> torch.Tensor:
    """uint8 (or float 0..1) ``[H,W,3]`` arrays of one size → IMAGE ``[B,H,W,3]`` float32 0..1.

    Arrays of different sizes are padded (bottom/right, black) to the largest, since IMAGE is one tensor.
    """
    if isinstance(arrays, np.ndarray) and arrays.ndim == 3:
        arrays = [arrays]
    arrs = [a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32) for a in arrays]
    h = max(a.shape[0] for a in arrs)
    w = max(a.shape[1] for a in arrs)
    batch = np.zeros((len(arrs), h, w, 3), dtype=np.float32)
    for i, a in enumerate(arrs):
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=-1)
        batch[i, : a.shape[0], : a.shape[1]] = a[..., :3]
    return torch.from_numpy(batch)
