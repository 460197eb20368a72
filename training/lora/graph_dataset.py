"""Datasets from images in memory (a ComfyUI IMAGE batch or list) plus captions, processed exactly as a folder.

The images and captions are written once as a kohya folder — ``<root>/<content hash>/<repeats>_<name>/`` with
``img_00000.png`` + ``img_00000<caption_extension>`` per image, in input order — and that folder is scanned by
:meth:`conceptlab.training.lora.dataset.KohyaDataset.scan`. So buckets, resizing, caption processing, repeats, the
validation split and the per-epoch batches are the folder path's by construction, not a second implementation of
kohya's rules, and the latent disk cache next to the images works across runs (the folder name is a hash of the
pixels, captions and repeats, so the same inputs reuse it; different inputs never collide).

* Pixels: float ``[H, W, 3]`` in 0..1 (ComfyUI IMAGE rows) are stored as 8-bit PNG, ``round(x·255)`` — exact for
  images that were 8-bit files (ComfyUI's LoadImage divides by 255). PNG is lossless.
* Transparency: a mask in ComfyUI's convention (LoadImage's MASK = 1 − alpha, 1 = transparent) is stored as the PNG
  alpha channel ``round((1 − mask)·255)``, so it is composited on the dataset's ``background`` exactly as a
  transparent image in a folder is.
* Captions: an empty caption writes no caption file, so the class token ``name`` is used — as for a folder image
  without one. A caption file holds the caption text as given (kohya reads its first line, or all lines with
  ``enable_wildcard``).

Writing is atomic: a temporary sibling folder is renamed into place, so a crash never leaves half a dataset.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

_NAME_RE = re.compile(r"[\w\- ]+")


def to_uint8_rgb(image, mask=None) -> np.ndarray:
    """``[H, W, 3]`` (or RGBA ``[H, W, 4]``) float 0..1 (torch or numpy) and an optional ``[H, W]`` mask
    (1 = transparent) → uint8 ``[H, W, 3]`` or ``[H, W, 4]`` (RGBA, alpha = 1 − mask; an RGBA image without a mask
    keeps its own alpha, a mask wins over it). Raises ``ValueError`` for a bad shape or a mask of another size."""
    a = image.detach().cpu().float().numpy() if hasattr(image, "detach") else np.asarray(image, dtype=np.float32)
    if a.ndim != 3 or a.shape[-1] not in (3, 4):
        raise ValueError(f"an image must be [H, W, 3] (ComfyUI IMAGE row), got shape {tuple(a.shape)}")
    rgb = np.clip(np.rint(np.nan_to_num(a[..., :3]) * 255.0), 0, 255).astype(np.uint8)
    if mask is None:
        if a.shape[-1] == 4:  # an RGBA IMAGE carries its own alpha
            alpha = np.clip(np.rint(np.nan_to_num(a[..., 3]) * 255.0), 0, 255).astype(np.uint8)
            return np.concatenate([rgb, alpha[..., None]], axis=-1)
        return rgb
    m = mask.detach().cpu().float().numpy() if hasattr(mask, "detach") else np.asarray(mask, dtype=np.float32)
    if m.shape != rgb.shape[:2]:
        raise ValueError(f"mask {tuple(m.shape)} does not match its image {tuple(rgb.shape[:2])}")
    alpha = np.clip(np.rint((1.0 - np.nan_to_num(m)) * 255.0), 0, 255).astype(np.uint8)
    return np.concatenate([rgb, alpha[..., None]], axis=-1)


def match_captions(captions: Sequence[str] | str | None, n_images: int) -> list[str]:
    """One caption per image from: a list with one entry per image; one string with one caption per line (blank
    lines are kept as empty captions only inside the list, trailing ones are ignored); or a single caption (used
    for every image). ``None`` / empty → every image uses the class token.

    Raises ``ValueError`` when the counts do not match (naming both).
    """
    if captions is None:
        return [""] * n_images
    if isinstance(captions, str):
        lines = captions.replace("\r\n", "\n").split("\n")
        while lines and not lines[-1].strip():
            lines.pop()
        items = [ln.strip() for ln in lines]
    else:
        items = [str(c).strip() for c in captions]
        if len(items) == 1 and n_images > 1 and "\n" in items[0]:
            return match_captions(items[0], n_images)
    if not items:
        return [""] * n_images
    if len(items) == 1:
        return items * n_images
    if len(items) != n_images:
        raise ValueError(f"{len(items)} captions for {n_images} images: give one caption per image (one per line), "
                         "or a single caption for all")
    return items


def dataset_hash(images: Sequence[np.ndarray], captions: Sequence[str], repeats: int, name: str,
                 caption_extension: str) -> str:
    """SHA-256 (hex, 20 chars) of every image's shape and bytes, the captions, repeats, name and extension."""
    h = hashlib.sha256()
    h.update(f"{int(repeats)}\0{name}\0{caption_extension}\0{len(images)}\0".encode())
    for img, cap in zip(images, captions):
        h.update(str(img.shape).encode())
        h.update(np.ascontiguousarray(img).tobytes())
        h.update(cap.encode("utf-8") + b"\0")
    return h.hexdigest()[:20]


def write_kohya_folder(root: str | os.PathLike, images: Sequence[np.ndarray], captions: Sequence[str], *,
                       repeats: int = 1, name: str = "images", caption_extension: str = ".txt") -> Path:
    """Write images + captions as a kohya training folder under ``root`` and return the folder to scan.

    Args:
        root: parent folder (e.g. ComfyUI's temp folder); created if missing.
        images: uint8 ``[H, W, 3]`` or ``[H, W, 4]`` arrays (:func:`to_uint8_rgb`); sizes may differ.
        captions: one per image ("" = no caption file: the class token is used).
        repeats: kohya repeats (≥ 1); name: the class token (letters, digits, space, ``-``, ``_``).
        caption_extension: as the dataset option (``.txt``).

    Returns ``<root>/graph_<hash>`` (holding ``<repeats>_<name>/``). An existing folder with the same hash is
    reused as it is. Raises ``ValueError`` for no images, mismatched counts, ``repeats < 1`` or a bad name.
    """
    from PIL import Image

    if not images:
        raise ValueError("no images")
    if len(images) != len(captions):
        raise ValueError(f"{len(captions)} captions for {len(images)} images")
    if int(repeats) < 1:
        raise ValueError(f"repeats must be ≥ 1, got {repeats}")
    name = (name or "").strip()
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"class token {name!r}: use letters, digits, space, '-' and '_'")
    ext = caption_extension if caption_extension.startswith(".") else "." + caption_extension
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"graph_{dataset_hash(images, captions, repeats, name, ext)}"
    if final.is_dir():
        return final
    tmp = Path(tempfile.mkdtemp(prefix=".graph_tmp_", dir=root))
    try:
        sub = tmp / f"{int(repeats)}_{name}"
        sub.mkdir()
        for i, (img, cap) in enumerate(zip(images, captions)):
            mode = "RGBA" if img.shape[-1] == 4 else "RGB"
            Image.fromarray(np.ascontiguousarray(img), mode=mode).save(sub / f"img_{i:05d}.png")
            if cap:
                (sub / f"img_{i:05d}{ext}").write_text(cap, encoding="utf-8")
        try:
            os.replace(tmp, final)
        except OSError:  # another run wrote the same dataset meanwhile
            if not final.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
