"""Kohya DreamBooth-style datasets: ``<repeats>_<name>`` folders, same-stem captions, aspect-ratio buckets,
image preparation, per-epoch batches and latent caching.

Rules follow kohya-ss/sd-scripts ``library/train_util.py`` (``DreamBoothDataset``, ``BucketManager``,
``trim_and_resize_if_required``, ``split_train_val``, ``BaseDataset.shuffle_buckets``) and
``library/model_util.py`` (``make_bucket_resolutions``), read at commit 48d368f and re-implemented here
because sd-scripts is not an installable library (it pulls accelerate, cv2 and its own UNet at import):

* a training folder holds subfolders named ``<repeats>_<class token>``; a subfolder without the numeric prefix
  is skipped with kohya's warning ("ignore directory without repeats"); a folder that is itself named
  ``<repeats>_<name>`` and holds images directly is accepted as one subset (a convenience over kohya);
* each image's caption is the first line of ``<stem><caption_extension>``; without one, the class token;
* buckets: with upscaling allowed, kohya's predefined resolutions (``max_area = resolution²`` split in
  ``bucket_reso_steps`` steps between ``min_bucket_reso`` and ``max_bucket_reso``) and the one with the closest
  aspect ratio; the image is scaled to cover the bucket and centre-cropped. With ``bucket_no_upscale`` images
  are only shrunk (to fit ``max_area``), and the bucket is the image size rounded down to the step;
* a validation split is taken per subset after a seeded shuffle (``split_train_val``); validation images are
  used once (no repeats);
* each epoch, kohya's batches are made per bucket (``ceil(images × repeats / batch_size)`` batches) and shuffled
  with ``Random(seed + epoch)``.

Image preparation differs from kohya in two deliberate ways: transparent images are composited on a chosen
background colour (kohya drops alpha, which turns transparent pixels into whatever RGB they hold), and the
resize filter can be **nearest** (pixel art keeps hard edges); ``"auto"`` is kohya's default (area when
shrinking, Lanczos when enlarging; PIL's BOX filter stands in for OpenCV's INTER_AREA).

The options are :mod:`.dataset_options` (:class:`~.dataset_options.DatasetOptions`), the buckets and the image
preparation :mod:`.buckets`; this module scans folders, makes the epochs' batches and caches latents.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ...formats.limits import MAX_DATASET_IMAGES, check_count
from .buckets import BucketManager, open_rgb, prepare_image
from .captions import CaptionConfig, CaptionFileError, read_caption, tag_frequency
from .dataset_options import IMAGE_EXTENSIONS, DatasetError, DatasetOptions, parse_color

logger = logging.getLogger(__name__)

# -- entries ------------------------------------------------------------------------------------------------

@dataclass
class ImageEntry:
    """One image of the dataset.

    ``caption`` is the raw caption (file first line, or the class token when ``caption_from_file`` is False);
    ``size`` the original ``(w, h)``; ``bucket_reso``/``resized_size`` from :class:`BucketManager`;
    ``latents`` / ``latents_flipped``: cached ``[4, h/8, w/8]`` fp32 CPU tensors once :meth:`KohyaDataset.cache_latents` ran.
    """

    path: Path
    subset: str
    repeats: int
    caption: str
    caption_from_file: bool
    size: tuple[int, int]
    bucket_reso: tuple[int, int] = (0, 0)
    resized_size: tuple[int, int] = (0, 0)
    latents: torch.Tensor | None = field(default=None, repr=False)
    latents_flipped: torch.Tensor | None = field(default=None, repr=False)
    # per-subset settings of a kohya [[datasets.subsets]] config (training/lora/dataset_config.py); None = dataset's
    is_reg: bool = False
    captions: CaptionConfig | None = field(default=None, repr=False)
    flip_aug: bool | None = None
    resize_interpolation: str | None = None


@dataclass
class SubsetInfo:
    """A ``<repeats>_<name>`` folder: its name, repeats, class token, image counts and missing captions."""

    name: str
    path: Path
    repeats: int
    class_token: str
    img_count: int = 0
    val_count: int = 0
    missing_captions: list[str] = field(default_factory=list)
    is_reg: bool = False


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _parse_subset_name(name: str) -> tuple[int, str] | None:
    tokens = name.split("_")
    try:
        n = int(tokens[0])
    except ValueError:
        return None
    return n, "_".join(tokens[1:])


def split_train_val(paths: list, validation_split: float, seed: int) -> tuple[list, list]:
    """Kohya ``split_train_val``: seeded shuffle, first ``ceil(n·(1−split))`` train, last ``round(n·split)`` val."""
    items = list(paths)
    if validation_split <= 0:
        return items, []
    random.Random(seed).shuffle(items)
    n_train = math.ceil(len(items) * (1 - validation_split))
    n_val_start = len(items) - round(len(items) * validation_split)
    return items[:n_train], items[n_val_start:]


class KohyaDataset:
    """A scanned kohya training folder (see module docstring); no pixels are held until latents are cached.

    Build with :meth:`scan`. Attributes: ``root``, ``options``, ``captions`` (:class:`CaptionConfig`),
    ``subsets``, ``entries`` (training images), ``val_entries``, ``tag_frequency`` (kohya's
    ``ss_tag_frequency``: ``{folder: {tag: count}}``), ``warnings`` (human-readable lines).
    """

    def __init__(self, root: Path, options: DatasetOptions, captions: CaptionConfig, subsets: list[SubsetInfo],
                 entries: list[ImageEntry], val_entries: list[ImageEntry], tag_freq: dict, warnings: list[str]):
        self.root = root
        self.options = options
        self.captions = captions
        self.subsets = subsets
        self.entries = entries
        self.val_entries = val_entries
        self.tag_frequency = tag_freq
        self.warnings = warnings
        self._latents_key: str | None = None
        self.num_reg_images = 0  # kohya num_reg_images (reg images x repeats before balancing)

    # -- scanning ---------------------------------------------------------------------------------------------
    @classmethod
    def scan(cls, root: str | os.PathLike, options: DatasetOptions | None = None,
             captions: CaptionConfig | None = None, seed: int = 0,
             progress: Callable[[int, int], None] | None = None) -> "KohyaDataset":
        """Scan a kohya training folder; see the module docstring for the rules.

        Every image is decoded once here so a corrupt file fails now, not mid-training. ``progress(done, total)``
        is called after each image (it may raise to cancel). At most :data:`~conceptlab.formats.limits.
        MAX_DATASET_IMAGES` images (``LimitError``); images above the pixel budget are refused before decoding.

        Raises:
            FileNotFoundError: ``root`` does not exist.
            DatasetError: no usable ``<repeats>_<name>`` subfolder, no images, a corrupt image or an empty /
                non-UTF-8 caption file (the message names the file).
        """
        opts = (options or DatasetOptions()).validate()
        cap_cfg = (captions or CaptionConfig()).validate()
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"dataset folder not found: {root}")
        if not root.is_dir():
            raise DatasetError(f"{root} is not a folder")
        warnings: list[str] = []
        folders: list[tuple[Path, int, str]] = []
        direct = _parse_subset_name(root.name)
        subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        for sub in subdirs:
            parsed = _parse_subset_name(sub.name)
            if parsed is None:
                msg = f"ignore directory without repeats: {sub.name} (kohya folders are named <repeats>_<name>, e.g. 10_{sub.name})"
                logger.warning(msg)
                warnings.append(msg)
                continue
            if parsed[0] < 1:
                msg = f"ignore subset {sub.name}: num_repeats is less than 1"
                logger.warning(msg)
                warnings.append(msg)
                continue
            folders.append((sub, parsed[0], parsed[1]))
        if not folders and direct is not None and direct[0] >= 1 and _list_images(root):
            folders.append((root, direct[0], direct[1]))
        if not folders:
            loose = _list_images(root)
            hint = (f" It holds {len(loose)} images directly: move them into a subfolder named "
                    f"<repeats>_<name>, e.g. {root.name}/10_{root.name}/.") if loose else ""
            raise DatasetError(f"no <repeats>_<name> subfolder (e.g. 10_mystyle) in {root}.{hint}"
                               + (" " + " ".join(warnings) if warnings else ""))
        bg = parse_color(opts.background)
        val_seed = opts.validation_seed if opts.validation_seed is not None else seed
        n_total = sum(len(_list_images(f)) for f, _, _ in folders)
        check_count(f"images in {root.name}", n_total, MAX_DATASET_IMAGES)
        n_done = 0
        subsets, entries, val_entries, tag_freq = [], [], [], {}
        for folder, repeats, token in folders:
            images = _list_images(folder)
            if not images:
                msg = f"ignore subset {folder.name}: no images found ({', '.join(IMAGE_EXTENSIONS)})"
                logger.warning(msg)
                warnings.append(msg)
                continue
            info = SubsetInfo(folder.name, folder, repeats, token)
            train_imgs, val_imgs = split_train_val(images, float(opts.validation_split), int(val_seed))
            caps_all = []
            for group, target in ((train_imgs, entries), (val_imgs, val_entries)):
                for img in group:
                    try:
                        cap = read_caption(img, opts.caption_extension, cap_cfg.enable_wildcard)
                    except CaptionFileError as exc:
                        raise DatasetError(f"{folder.name}/{exc}") from None
                    from_file = cap is not None
                    if cap is None:
                        cap = token
                        info.missing_captions.append(img.name)
                    pil = open_rgb(img, bg)  # decode now: corrupt files fail at scan time
                    target.append(ImageEntry(img, folder.name, repeats, cap, from_file, pil.size))
                    caps_all.append(cap)
                    n_done += 1
                    if progress is not None:
                        progress(n_done, n_total)
            info.img_count, info.val_count = len(train_imgs), len(val_imgs)
            tag_freq[folder.name] = tag_frequency([e.caption for e in entries if e.subset == folder.name])
            if info.missing_captions:
                msg = (f"No caption file found for {len(info.missing_captions)} images in {folder.name}; "
                       f"the class token {token!r} is used for them")
                logger.warning(msg)
                warnings.append(msg)
            subsets.append(info)
        if not entries:
            raise DatasetError(f"no training images found in {root} (looked for "
                               f"{', '.join(IMAGE_EXTENSIONS)} in the <repeats>_<name> subfolders)")
        warnings.extend(cap_cfg.warnings())
        ds = cls(root, opts, cap_cfg, subsets, entries, val_entries, tag_freq, warnings)
        ds.make_buckets()
        return ds

    def make_buckets(self) -> None:
        """Assign every entry its bucket (kohya ``BucketManager.select_bucket``)."""
        bm = BucketManager(self.options)
        for e in self.entries + self.val_entries:
            e.bucket_reso, e.resized_size, _ = bm.select(*e.size)

    # -- counts -------------------------------------------------------------------------------------------------
    @property
    def num_train_images(self) -> int:
        """Training images × repeats, regularization images excluded (kohya's ``num_train_images``)."""
        return sum(e.repeats for e in self.entries if not e.is_reg)

    def bucket_counts(self) -> dict[tuple[int, int], int]:
        """``{(w, h): images × repeats}`` over training entries, sorted by resolution."""
        out: dict[tuple[int, int], int] = {}
        for e in self.entries:
            out[e.bucket_reso] = out.get(e.bucket_reso, 0) + e.repeats
        return dict(sorted(out.items()))

    def bucket_info(self) -> dict:
        """Kohya's ``ss_bucket_info`` structure: ``{"buckets": {i: {"resolution": [w, h], "count": n}}, "mean_img_ar_error": x}``."""
        bm = BucketManager(self.options)
        errs = [abs(bm.select(*e.size)[2]) for e in self.entries]
        return {"buckets": {i: {"resolution": list(r), "count": n} for i, (r, n) in
                            enumerate(self.bucket_counts().items())},
                "mean_img_ar_error": float(np.mean(errs)) if errs else 0.0}

    def num_batches(self, batch_size: int) -> int:
        """Batches per epoch: ``Σ_bucket ceil(images × repeats / batch_size)`` (kohya ``len(train_dataloader)``)."""
        return sum(math.ceil(n / batch_size) for n in self.bucket_counts().values())

    def epoch_batches(self, epoch: int, batch_size: int, seed: int) -> list[list[int]]:
        """The batches of one epoch as lists of indices into :attr:`entries`.

        Kohya's ``make_buckets`` / ``shuffle_buckets``: each bucket holds every image ``repeats`` times, is
        cut into batches of ``batch_size`` (last one short), and the batch order and each bucket's content are
        shuffled with ``Random(seed + epoch)``. Deterministic for ``(epoch, batch_size, seed)``.
        """
        rng = random.Random(int(seed) + int(epoch))
        buckets: dict[tuple[int, int], list[int]] = {}
        for i, e in enumerate(self.entries):
            buckets.setdefault(e.bucket_reso, []).extend([i] * e.repeats)
        keys = sorted(buckets)
        index = [(b, j) for b, key in enumerate(keys) for j in range(math.ceil(len(buckets[key]) / batch_size))]
        rng.shuffle(index)
        for key in keys:
            rng.shuffle(buckets[key])
        return [buckets[keys[b]][j * batch_size:(j + 1) * batch_size] for b, j in index]

    # -- pixels and latents -----------------------------------------------------------------------------------
    def load_image(self, entry: ImageEntry, flip: bool = False) -> torch.Tensor:
        """``[3, H, W]`` float32 in ``[-1, 1]`` at the entry's bucket size (optionally mirrored)."""
        t = prepare_image(entry.path, entry.bucket_reso, entry.resized_size,
                          entry.resize_interpolation or self.options.resize_interpolation,
                          parse_color(self.options.background))
        return t.flip(-1) if flip else t

    def _disk_cache_path(self, entry: ImageEntry) -> Path:
        w, h = entry.bucket_reso
        return entry.path.with_name(f"{entry.path.stem}_{w}x{h}_cl.safetensors")

    def _entry_fingerprint(self, entry: ImageEntry, vae_key: str) -> str:
        st = entry.path.stat()
        o = self.options
        blob = json.dumps([entry.path.name, st.st_size, int(st.st_mtime_ns), list(entry.bucket_reso),
                           list(entry.resized_size), entry.resize_interpolation or o.resize_interpolation,
                           o.background, bool(self._flips(entry)), vae_key])
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def _flips(self, entry: ImageEntry) -> bool:
        """Whether ``entry`` is flip-augmented (its subset's ``flip_aug``, else the dataset's)."""
        return bool(self.options.flip_aug if entry.flip_aug is None else entry.flip_aug)

    def cache_latents(self, encode: Callable[[torch.Tensor], torch.Tensor], vae_key: str = "",
                      batch_size: int = 4, progress: Callable[[int, int], None] | None = None) -> None:
        """Encode every training and validation image once (and its mirror when ``flip_aug``), kept in memory.

        Args:
            encode: ``pixels [B,3,H,W] in [-1,1] -> latents [B,4,H/8,W/8]`` (``host.encode_images``).
            vae_key: a fingerprint of the VAE, stored in disk caches so another VAE's cache is not reused.
            batch_size: images per VAE call (grouped by bucket, as kohya does).
            progress: ``progress(done, total)`` after each batch.

        With ``options.cache_latents_to_disk`` latents are also read from / written to
        ``<stem>_<w>x<h>_cl.safetensors`` beside each image (atomic writes; a stale cache is ignored).
        """
        from ...formats.safetensors_io import WeightFile, save_safetensors

        key = f"{vae_key}|{json.dumps(self.options.to_dict(), sort_keys=True)}"
        todo = [e for e in self.entries + self.val_entries if e.latents is None or self._latents_key != key]
        for e in todo:
            e.latents = e.latents_flipped = None
        if self.options.cache_latents_to_disk:
            for e in todo:
                p = self._disk_cache_path(e)
                if not p.is_file():
                    continue
                try:
                    with WeightFile(p) as wf:
                        if wf.metadata.get("fingerprint") == self._entry_fingerprint(e, vae_key):
                            e.latents = wf.get("latents").float()
                            if self._flips(e) and "latents_flipped" in wf:
                                e.latents_flipped = wf.get("latents_flipped").float()
                except Exception:  # noqa: BLE001 - a broken cache file is simply re-made
                    e.latents = None
            todo = [e for e in todo if e.latents is None or (self._flips(e) and e.latents_flipped is None)]
        todo.sort(key=lambda e: e.bucket_reso)
        groups: list[list[ImageEntry]] = []
        for e in todo:
            if groups and groups[-1][0].bucket_reso == e.bucket_reso and len(groups[-1]) < batch_size:
                groups[-1].append(e)
            else:
                groups.append([e])
        done = 0
        for group in groups:
            pix = torch.stack([self.load_image(e) for e in group])
            lat = encode(pix).float().cpu()
            flipped = encode(pix.flip(-1)).float().cpu() if any(self._flips(e) for e in group) else None
            for i, e in enumerate(group):
                e.latents = lat[i].clone()
                e.latents_flipped = flipped[i].clone() if flipped is not None and self._flips(e) else None
                if self.options.cache_latents_to_disk:
                    tensors = {"latents": e.latents}
                    if e.latents_flipped is not None:
                        tensors["latents_flipped"] = e.latents_flipped
                    try:
                        save_safetensors(tensors, self._disk_cache_path(e),
                                         metadata={"fingerprint": self._entry_fingerprint(e, vae_key)})
                    except OSError as exc:
                        logger.warning("cannot write latent cache for %s: %s", e.path.name, exc)
            done += len(group)
            if progress is not None:
                progress(done, len(todo))
        self._latents_key = key

    def release_latents(self) -> None:
        """Drop cached latents (memory is released after a run)."""
        for e in self.entries + self.val_entries:
            e.latents = e.latents_flipped = None
        self._latents_key = None

    # -- reporting ---------------------------------------------------------------------------------------------
    def summary(self, batch_size: int = 1, epochs: int | None = None, preview: int = 5) -> dict:
        """JSON-ready summary: images, repeats, steps per epoch, buckets, top tags, caption previews, warnings."""
        tags: dict[str, int] = {}
        for freq in self.tag_frequency.values():
            for t, n in freq.items():
                tags[t] = tags.get(t, 0) + n
        top = sorted(tags.items(), key=lambda kv: (-kv[1], kv[0]))[:20]
        out = {
            "root": str(self.root),
            "subsets": [{"folder": s.name, "repeats": s.repeats, "class_token": s.class_token,
                         "images": s.img_count, "validation_images": s.val_count,
                         "missing_captions": len(s.missing_captions)} for s in self.subsets],
            "images": len(self.entries),
            "validation_images": len(self.val_entries),
            "num_train_images": self.num_train_images,
            "batch_size": batch_size,
            "steps_per_epoch": self.num_batches(batch_size),
            "buckets": {f"{w}x{h}": n for (w, h), n in self.bucket_counts().items()},
            "top_tags": dict(top),
            "caption_preview": [{"image": e.path.name, "caption": e.caption} for e in self.entries[:preview]],
            "warnings": list(self.warnings),
            "options": self.options.to_dict(),
            "captions": self.captions.to_dict(),
        }
        if epochs:
            out["total_steps"] = epochs * out["steps_per_epoch"]
        return out

    def summary_text(self, batch_size: int = 1, epochs: int | None = None) -> str:
        """A short human-readable summary (the dataset node's STRING output)."""
        s = self.summary(batch_size, epochs)
        lines = [f"{s['images']} images ({s['num_train_images']} with repeats)"
                 + (f", {s['validation_images']} held out for validation" if s["validation_images"] else ""),
                 f"steps per epoch at batch size {batch_size}: {s['steps_per_epoch']}"
                 + (f"; {s['total_steps']} steps over {epochs} epochs" if epochs else "")]
        for sub in s["subsets"]:
            lines.append(f"  {sub['folder']}: {sub['images']} images x {sub['repeats']} repeats, class token "
                         f"{sub['class_token']!r}" + (f", {sub['missing_captions']} without caption file"
                                                      if sub["missing_captions"] else ""))
        lines.append("buckets: " + ", ".join(f"{k}: {v}" for k, v in s["buckets"].items()))
        if s["top_tags"]:
            lines.append("top tags: " + ", ".join(f"{t} ({n})" for t, n in list(s["top_tags"].items())[:10]))
        for p in s["caption_preview"]:
            lines.append(f"  {p['image']}: {p['caption'][:120]}")
        for w in s["warnings"]:
            lines.append(f"warning: {w}")
        return "\n".join(lines)
