"""Kohya dataset options (:class:`DatasetOptions`: resolution, buckets, caption extension, validation split,
latent caching, image preparation), validated by name, and the dataset error type (:class:`DatasetError`).
Used by :mod:`.dataset`, :mod:`.buckets`, :mod:`.dataset_config` and :class:`.config.TrainConfig`.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from typing import Mapping

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
INTERPOLATIONS = ("auto", "nearest", "bilinear", "bicubic", "lanczos", "area", "box")


class DatasetError(ValueError):
    """A dataset folder that cannot be trained on (empty, misnamed, unreadable image or caption)."""


@dataclass
class DatasetOptions:
    """Kohya dataset options (same names as sd-scripts; defaults noted where they differ).

    Attributes:
        resolution: training resolution, an int (square) or ``(width, height)`` in pixels.
        enable_bucket: aspect-ratio bucketing (kohya default False; Concept Lab default True).
        min_bucket_reso / max_bucket_reso: smallest / largest bucket side in pixels (kohya 256 / 1024).
        bucket_reso_steps: bucket side step in pixels (64; must be a multiple of the VAE's 8).
        bucket_no_upscale: never enlarge images; bucket = image size rounded down to the step.
        resize_interpolation: one of :data:`INTERPOLATIONS` (``"nearest"`` keeps pixel art sharp).
        flip_aug: random horizontal flip (50 %) on each use.
        caption_extension: caption file extension (kohya default ``.caption``; Concept Lab default ``.txt``).
        background: colour transparent pixels are composited on (``"#rrggbb"``).
        validation_split: fraction in [0, 1) of each subset held out for validation loss.
        validation_seed: shuffle seed for the split (``None``: the training seed).
        cache_latents_to_disk: also keep VAE latents in ``<stem>_<w>x<h>_cl.safetensors`` beside the images.
    """

    resolution: int | tuple[int, int] = 512
    enable_bucket: bool = True
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    resize_interpolation: str = "auto"
    flip_aug: bool = False
    caption_extension: str = ".txt"
    background: str = "#ffffff"
    validation_split: float = 0.0
    validation_seed: int | None = None
    cache_latents_to_disk: bool = False

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` of the training resolution."""
        r = self.resolution
        if isinstance(r, str):
            parts = [int(p) for p in r.replace("x", ",").split(",") if p.strip()]
            r = parts[0] if len(parts) == 1 else tuple(parts[:2])
        if isinstance(r, (list, tuple)):
            return int(r[0]), int(r[1])
        return int(r), int(r)

    def validate(self) -> "DatasetOptions":
        """Check values; raises ``ValueError`` (kohya's messages where kohya asserts). Returns ``self``.

        With bucketing on, ``min_bucket_reso`` is rounded down and ``max_bucket_reso`` up to a multiple of
        ``bucket_reso_steps`` in place (as kohya's ``BucketManager`` does). ``background`` is checked by
        :func:`parse_color`.
        """
        w, h = self.size
        if w < 8 or h < 8:
            raise ValueError(f"resolution must be at least 8 px, got {w}x{h}")
        if self.resize_interpolation not in INTERPOLATIONS:
            raise ValueError(f"resize_interpolation must be one of {', '.join(INTERPOLATIONS)}")
        if not 0.0 <= float(self.validation_split) < 1.0:
            raise ValueError("validation_split must be in [0, 1)")
        parse_color(self.background)
        check_caption_extension(self.caption_extension)
        if self.enable_bucket:
            step = int(self.bucket_reso_steps)
            if step < 8 or step % 8:
                raise ValueError(f"bucket_reso_steps must be a multiple of 8, got {step}")
            if self.min_bucket_reso % step:
                self.min_bucket_reso -= self.min_bucket_reso % step
            if self.max_bucket_reso % step:
                self.max_bucket_reso += step - self.max_bucket_reso % step
            if not self.bucket_no_upscale:
                if min(w, h) < self.min_bucket_reso:
                    raise ValueError(f"min_bucket_reso ({self.min_bucket_reso}) must be <= the resolution "
                                     f"({min(w, h)}); lower min_bucket_reso or raise the resolution")
                if max(w, h) > self.max_bucket_reso:
                    raise ValueError(f"max_bucket_reso ({self.max_bucket_reso}) must be >= the resolution "
                                     f"({max(w, h)})")
        return self

    @classmethod
    def from_mapping(cls, values: Mapping[str, object]) -> "DatasetOptions":
        """Build from a (flattened kohya) mapping; unrelated keys and ``None`` values are ignored (except
        ``validation_seed``, where ``None`` means "the training seed"). Raises ``ValueError`` via :meth:`validate`."""
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in values.items() if k in names and v is not None}
        if "validation_seed" in values:
            kw["validation_seed"] = values["validation_seed"]
        return cls(**kw).validate()

    def to_dict(self) -> dict:
        """All fields as a plain dict, with ``resolution`` normalised to ``[width, height]``."""
        d = asdict(self)
        d["resolution"] = list(self.size)
        return d


def check_caption_extension(ext: object) -> str:
    """``ext`` if it is a file extension only (``.txt``, ``caption``, ``.tags.txt``: letters, digits, ``_``, ``-``,
    at most three dot-parts of 16); ``ValueError`` otherwise — a caption path is ``<image stem><ext>``, so a ``/``
    or ``..`` here would read any file (issue 18)."""
    if not isinstance(ext, str) or not re.fullmatch(r"\.?[A-Za-z0-9_-]{1,16}(\.[A-Za-z0-9_-]{1,16}){0,2}", ext):
        raise ValueError(f"caption_extension must be a file extension such as .txt or .caption, got "
                         f"{str(ext)[:40]!r}")
    return ext


def parse_color(text: str) -> tuple[int, int, int]:
    """``"#rrggbb"`` / ``"rrggbb"`` / ``"r,g,b"`` → ``(r, g, b)`` ints 0..255; ``ValueError`` otherwise."""
    s = str(text).strip()
    try:
        if "," in s:
            vals = tuple(int(v) for v in s.split(","))
            if len(vals) == 3 and all(0 <= v <= 255 for v in vals):
                return vals  # type: ignore[return-value]
        else:
            s = s.lstrip("#")
            if len(s) == 6:
                return tuple(int(s[i:i + 2], 16) for i in (0, 2, 4))  # type: ignore[return-value]
    except ValueError:
        pass
    raise ValueError(f"background colour {text!r} is not '#rrggbb' or 'r,g,b'")
