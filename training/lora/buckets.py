"""Kohya aspect-ratio buckets and image preparation: the predefined bucket resolutions
(:func:`make_bucket_resolutions`, kohya ``library/model_util.py``), the bucket of each image (:class:`BucketManager`,
kohya ``library/train_util.py`` ``BucketManager``), and loading an image into its bucket (:func:`open_rgb`:
transparency composited on a background colour; :func:`prepare_image`: scale to cover, centre-crop, as kohya's
``trim_and_resize_if_required``, with a nearest filter available for pixel art). See :mod:`.dataset` for the rules.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from ...formats.limits import LimitError, check_image_pixels
from .dataset_options import DatasetError, DatasetOptions

def make_bucket_resolutions(max_reso: tuple[int, int], min_size: int = 256, max_size: int = 1024,
                            divisible: int = 64) -> list[tuple[int, int]]:
    """Kohya's predefined bucket resolutions ``[(w, h), ...]`` (sorted), model_util.make_bucket_resolutions.

    All ``(w, h)`` with ``w`` stepping by ``divisible`` in ``[min_size, max_size]`` and
    ``h = min(max_size, floor(max_area / w / divisible)·divisible) >= min_size`` plus their transposes, and the
    square of side ``floor(sqrt(max_area)/divisible)·divisible``.
    """
    max_area = max_reso[0] * max_reso[1]
    resos = set()
    side = int(math.sqrt(max_area) // divisible) * divisible
    resos.add((side, side))
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)


class BucketManager:
    """Kohya's ``BucketManager.select_bucket`` (train_util.py) for one dataset's options.

    ``select(w, h) -> (bucket_reso (w, h), resized_size (w, h), aspect-ratio error)``: the image is resized to
    ``resized_size`` then centre-cropped to ``bucket_reso``. All sizes in pixels; the error is
    ``bucket_w/bucket_h − width/height`` (signed). Source: kohya-ss/sd-scripts ``library/train_util.py``
    ``BucketManager.select_bucket`` / ``round_to_steps``.
    """

    def __init__(self, opts: DatasetOptions):
        self.no_upscale = bool(opts.bucket_no_upscale) and bool(opts.enable_bucket)
        self.max_reso = opts.size
        self.max_area = self.max_reso[0] * self.max_reso[1]
        self.steps = int(opts.bucket_reso_steps)
        if not opts.enable_bucket:
            self.predefined = [self.max_reso]
        elif not self.no_upscale:
            self.predefined = make_bucket_resolutions(self.max_reso, opts.min_bucket_reso, opts.max_bucket_reso,
                                                      self.steps)
        else:
            self.predefined = []
        self._ars = np.array([w / h for w, h in self.predefined]) if self.predefined else None

    def _round(self, x: float) -> int:
        x = int(x + 0.5)
        return x - x % self.steps

    def select(self, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int], float]:
        """``(bucket_reso, resized_size, ar_error)`` for an image of ``width`` × ``height`` px (both ≥ 1).

        Predefined buckets: the one of nearest aspect ratio, resized to cover it. ``bucket_no_upscale``: images
        above the max area are scaled down to it, then the bucket is the size rounded down to the step.
        Raises :class:`DatasetError` when, with ``bucket_no_upscale``, the image is smaller than one step.
        """
        ar = width / height
        if not self.no_upscale:
            reso = (width, height)
            if reso not in self.predefined:
                reso = self.predefined[int(np.abs(self._ars - ar).argmin())]
            ar_reso = reso[0] / reso[1]
            scale = reso[1] / height if ar > ar_reso else reso[0] / width
            resized = (int(width * scale + 0.5), int(height * scale + 0.5))
        else:
            if width * height > self.max_area:
                rw = math.sqrt(self.max_area * ar)
                rh = self.max_area / rw
                bw = self._round(rw)
                bh_w = self._round(bw / ar)
                ar_w = bw / bh_w if bh_w else float("inf")
                bh = self._round(rh)
                bw_h = self._round(bh * ar)
                ar_h = bw_h / bh if bh else float("inf")
                if abs(ar_w - ar) < abs(ar_h - ar):
                    resized = (bw, int(bw / ar + 0.5))
                else:
                    resized = (int(bh * ar + 0.5), bh)
            else:
                resized = (width, height)
            reso = (resized[0] - resized[0] % self.steps, resized[1] - resized[1] % self.steps)
            if reso[0] < self.steps or reso[1] < self.steps:
                raise DatasetError(f"an image of {width}x{height} px is smaller than one bucket step "
                                   f"({self.steps} px) with bucket_no_upscale; lower bucket_reso_steps")
        return reso, resized, reso[0] / reso[1] - ar


def _resample(name: str, shrinking: bool):
    from PIL import Image

    if name == "auto":
        return Image.Resampling.BOX if shrinking else Image.Resampling.LANCZOS
    return {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
            "area": Image.Resampling.BOX, "box": Image.Resampling.BOX}[name]


def open_rgb(path: str | os.PathLike, background: tuple[int, int, int] = (255, 255, 255)):
    """Open an image as RGB PIL, compositing any transparency (alpha, palette transparency) on ``background``.

    Raises :class:`DatasetError` for unreadable / corrupt files.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            check_image_pixels(*im.size, Path(path).name)  # from the header, before decoding
            im.load()
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info) or (
                    "transparency" in im.info):
                rgba = im.convert("RGBA")
                bg = Image.new("RGBA", rgba.size, (*background, 255))
                return Image.alpha_composite(bg, rgba).convert("RGB")
            return im.convert("RGB")
    except (DatasetError, LimitError):
        raise
    except Exception as exc:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError...)
        raise DatasetError(f"cannot read image {Path(path).name}: {exc}") from None


def prepare_image(path: str | os.PathLike, bucket_reso: tuple[int, int], resized_size: tuple[int, int],
                  interpolation: str = "auto", background: tuple[int, int, int] = (255, 255, 255)) -> torch.Tensor:
    """Load, composite, resize and centre-crop one image to its bucket (kohya ``trim_and_resize_if_required``).

    Returns float32 ``[3, H, W]`` in ``[-1, 1]`` with ``(W, H) = bucket_reso``. ``bucket_reso`` /
    ``resized_size`` are ``(w, h)`` in pixels, ``resized_size`` ≥ ``bucket_reso`` on both sides; ``background``
    is the uint8 RGB colour transparency is composited on.
    Raises :class:`DatasetError` for an unreadable image or a ``resized_size`` smaller than the bucket.
    """
    img = open_rgb(path, background)
    w, h = img.size
    if (w, h) != tuple(resized_size):
        shrinking = resized_size[0] <= w and resized_size[1] <= h
        img = img.resize(tuple(resized_size), resample=_resample(interpolation, shrinking))
    arr = np.asarray(img, dtype=np.uint8)
    H, W = arr.shape[:2]
    bw, bh = bucket_reso
    if W > bw:
        p = (W - bw) // 2
        arr = arr[:, p:p + bw]
    if H > bh:
        p = (H - bh) // 2
        arr = arr[p:p + bh]
    if arr.shape[0] != bh or arr.shape[1] != bw:
        raise DatasetError(f"internal error: {Path(path).name} prepared as {arr.shape[1]}x{arr.shape[0]}, "
                           f"bucket {bw}x{bh}")
    t = torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True)).permute(2, 0, 1).float() / 127.5 - 1.0
    return t
