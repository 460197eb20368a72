"""kohya dataset configs: ``[[datasets]]`` / ``[[datasets.subsets]]`` (inline or ``dataset_config = "file.toml"``)
and ``train_data_dir`` + ``reg_data_dir`` folders, with regularization images.

Rules re-implemented from kohya-ss/sd-scripts (commit 48d368f):

* ``library/config_util.py`` ``BlueprintGenerator.generate`` / ``search_value``: every subset parameter is looked up
  in the subset table, then its ``[[datasets]]`` table, then ``[general]``, then the training arguments (``--set``
  / flat TOML keys), then kohya's default; ``train_batch_size`` is called ``batch_size`` there. A ``None`` value
  falls through (kohya's ``search_value``).
* ``generate_dreambooth_subsets_config_by_subdirs``: ``train_data_dir`` and ``reg_data_dir`` subfolders named
  ``<repeats>_<class tokens>`` become subsets (``is_reg`` for the regularization folder); the class tokens are the
  caption of images without a caption file.
* ``library/train_util.py`` ``DreamBoothDataset.__init__`` (l. 2114-2184): regularization images are not split
  for validation; ``num_reg_images`` counts reg images × repeats; reg images are then registered in order with
  their own repeats until the count of training images × repeats is reached, and when one pass is not enough
  every further pass adds one repeat per image (:func:`balance_reg_repeats`), so reg and training images are
  seen about equally often; reg images beyond that count are not used (kohya warns).
* ``prior_loss_weight`` multiplies the loss of regularization images (``BaseDataset.__getitem__`` l. 1586,
  ``train_network.py`` ``loss * batch["loss_weights"]``).

Limits (refused with a message): one ``[[datasets]]`` entry (several subsets are fine; kohya keeps the buckets of
separate datasets apart, which a single bucket list here would not), DreamBooth subsets only (``metadata_file`` /
``conditioning_data_dir`` subsets are fine-tuning / ControlNet).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from .captions import CaptionConfig, CaptionFileError, read_caption, tag_frequency
from .buckets import open_rgb
from .dataset import ImageEntry, KohyaDataset, SubsetInfo, _list_images, _parse_subset_name, split_train_val
from .dataset_options import IMAGE_EXTENSIONS, DatasetError, DatasetOptions, parse_color

logger = logging.getLogger(__name__)

#: dataset-level keys (kohya ``DATASET_ASCENDABLE_SCHEMA``) and subset-level keys (``SUBSET_*`` + ``DB_*``)
DATASET_KEYS = ("batch_size", "bucket_no_upscale", "bucket_reso_steps", "enable_bucket", "max_bucket_reso",
                "min_bucket_reso", "network_multiplier", "resize_interpolation", "resolution", "validation_seed",
                "validation_split")
SUBSET_KEYS = ("image_dir", "num_repeats", "is_reg", "class_tokens", "caption_extension", "shuffle_caption",
               "keep_tokens", "keep_tokens_separator", "secondary_separator", "caption_separator",
               "enable_wildcard", "flip_aug", "color_aug", "random_crop", "face_crop_aug_range", "caption_prefix",
               "caption_suffix", "caption_dropout_rate", "caption_dropout_every_n_epochs",
               "caption_tag_dropout_rate", "token_warmup_min", "token_warmup_step", "custom_attributes",
               "resize_interpolation", "cache_info", "alpha_mask")
_REFUSED_SUBSET = {"color_aug": "needs per-step image loading (latents are cached here)",
                   "random_crop": "needs per-step image loading (latents are cached here)",
                   "face_crop_aug_range": "needs per-step image loading (latents are cached here)",
                   "alpha_mask": "alpha-mask loss is not supported",
                   "metadata_file": "fine-tuning (metadata) subsets are not supported",
                   "conditioning_data_dir": "ControlNet subsets are not supported"}


@dataclass
class SubsetSpec:
    """One resolved DreamBooth subset (kohya ``DreamBoothSubsetParams``)."""

    image_dir: Path
    num_repeats: int = 1
    is_reg: bool = False
    class_tokens: str | None = None
    caption_extension: str = ".caption"
    flip_aug: bool = False
    resize_interpolation: str | None = None
    captions: CaptionConfig | None = None


def balance_reg_repeats(num_train_images: int, reg_repeats: Sequence[int]) -> list[int]:
    """kohya's regularization balancing (``DreamBoothDataset.__init__``, train_util.py l. 2166-2182).

    ``num_train_images``: training images × repeats; ``reg_repeats``: the subset repeats of each reg image, in
    registration order. Returns each reg image's effective repeats (0 = not used): the first pass takes images
    with their own repeats until the total reaches ``num_train_images``; later passes add one repeat per image
    until it does. All zeros when there are no training images.
    """
    out = [0] * len(reg_repeats)
    if not reg_repeats or num_train_images <= 0:
        return out
    n, first = 0, True
    while n < num_train_images:
        for i, r in enumerate(reg_repeats):
            if first:
                out[i] = int(r)
                n += int(r)
            else:
                out[i] += 1
                n += 1
            if n >= num_train_images:
                break
        first = False
    return out


def load_dataset_config(path: str | os.PathLike) -> dict:
    """Read a kohya dataset config (``.toml`` or ``.json``). Raises ``FileNotFoundError`` / ``ValueError``."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"dataset_config not found: {p}")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".json":
        import json

        return json.loads(text)
    if p.suffix.lower() != ".toml":
        raise ValueError(f"dataset_config must be .toml or .json (kohya load_user_config): {p.name}")
    import tomllib

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"invalid dataset_config TOML {p.name}: {exc}") from None


def _search(key: str, tables: Sequence[Mapping[str, Any]], default=None):
    for t in tables:
        v = t.get(key)
        if v is not None:
            return v
    return default


def subsets_from_dirs(train_data_dir: str | os.PathLike | None, reg_data_dir: str | os.PathLike | None
                      ) -> list[dict]:
    """kohya ``generate_dreambooth_subsets_config_by_subdirs``: subset tables for ``<repeats>_<tokens>`` folders
    (sorted by name) of the training and the regularization folder. Folders without the prefix are skipped with
    kohya's warning."""
    out = []
    for base, is_reg in ((train_data_dir, False), (reg_data_dir, True)):
        if base is None:
            continue
        base = Path(base)
        if not base.is_dir():
            raise FileNotFoundError(f"{'reg_data_dir' if is_reg else 'train_data_dir'} not found: {base}")
        for sub in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
            parsed = _parse_subset_name(sub.name)
            if parsed is None:
                logger.warning("ignore directory without repeats: %s", sub.name)
                continue
            if parsed[0] < 1:
                continue
            out.append({"image_dir": str(sub), "num_repeats": parsed[0], "is_reg": is_reg,
                        "class_tokens": parsed[1]})
    return out


def build_dataset(user_config: Mapping[str, Any] | None, args: Mapping[str, Any], *, seed: int = 0,
                  base_dir: str | os.PathLike | None = None) -> tuple[KohyaDataset, int | None]:
    """A :class:`KohyaDataset` from a kohya dataset config (``{"general": {...}, "datasets": [...]}``) or, when
    ``user_config`` is ``None``, from ``args["train_data_dir"]`` + ``args["reg_data_dir"]``.

    ``args``: the flat training arguments (fallbacks, see module docstring). ``base_dir``: where relative
    ``image_dir`` paths are resolved (the config file's folder). Returns ``(dataset, batch_size)`` where
    ``batch_size`` is the dataset's ``batch_size`` if the config set one (else ``None``).

    Raises ``ValueError`` (unsupported keys or several ``[[datasets]]``), ``FileNotFoundError`` (missing folder)
    and :class:`~.dataset_options.DatasetError` (no images, bad captions).
    """
    general: Mapping[str, Any] = {}
    if user_config is None:
        ds_table: Mapping[str, Any] = {}
        subset_tables = subsets_from_dirs(args.get("train_data_dir"), args.get("reg_data_dir"))
    else:
        general = user_config.get("general", {}) or {}
        datasets = user_config.get("datasets", []) or []
        unknown_top = [k for k in user_config if k not in ("general", "datasets")]
        if unknown_top:
            raise ValueError(f"dataset config: unknown top-level keys {unknown_top} (kohya accepts [general] and "
                             "[[datasets]])")
        if len(datasets) != 1:
            raise ValueError(f"dataset config has {len(datasets)} [[datasets]] entries; exactly one is supported "
                             "(put several [[datasets.subsets]] into one [[datasets]])")
        ds_table = datasets[0]
        subset_tables = list(ds_table.get("subsets", []) or [])
        if not subset_tables:
            raise ValueError("dataset config: the [[datasets]] entry has no [[datasets.subsets]]")
    known = set(DATASET_KEYS) | set(SUBSET_KEYS) | {"subsets"} | set(f.name for f in fields(CaptionConfig))
    for where, table in [("[general]", general), ("[[datasets]]", ds_table)] + [
            (f"[[datasets.subsets]] #{i + 1}", t) for i, t in enumerate(subset_tables)]:
        for k, v in table.items():
            if k in _REFUSED_SUBSET and v not in (None, False, "", []):
                raise ValueError(f"dataset config {where}: {k} is not supported ({_REFUSED_SUBSET[k]})")
            if k not in known and k not in _REFUSED_SUBSET:
                raise ValueError(f"dataset config {where}: unknown key {k!r}")
    nm = _search("network_multiplier", [ds_table, general])
    if nm is not None and float(nm) != 1.0:
        raise ValueError("dataset config: network_multiplier other than 1.0 is not supported")

    ds_fallback = [ds_table, general, args]
    opt_kw = {f.name: _search(f.name, ds_fallback) for f in fields(DatasetOptions)}
    opt_kw = {k: v for k, v in opt_kw.items() if v is not None}
    options = DatasetOptions(**opt_kw).validate()
    batch = _search("batch_size", [ds_table, general])
    base = Path(base_dir) if base_dir else Path(".")

    specs = []
    for t in subset_tables:
        chain = [t, ds_table, general, args]
        if _search("image_dir", [t]) is None:
            raise ValueError("dataset config: every [[datasets.subsets]] needs image_dir")
        img_dir = Path(t["image_dir"])
        if not img_dir.is_absolute():
            img_dir = base / img_dir
        cap_kw = {f.name: _search(f.name, chain) for f in fields(CaptionConfig)}
        caps = CaptionConfig.from_mapping({k: v for k, v in cap_kw.items() if v is not None})
        specs.append(SubsetSpec(image_dir=img_dir, num_repeats=int(_search("num_repeats", chain, 1)),
                                is_reg=bool(t.get("is_reg", False)), class_tokens=_search("class_tokens", chain),
                                # final fallback: the folder scanner's default (.txt), as train_data_dir uses
                                caption_extension=str(_search("caption_extension", chain,
                                                              options.caption_extension)),
                                flip_aug=bool(_search("flip_aug", chain, False)),
                                resize_interpolation=_search("resize_interpolation", [t]), captions=caps))
    first_caps = specs[0].captions if specs else CaptionConfig()
    ds = dataset_from_subsets(specs, options, first_caps, seed=seed,
                              root=Path(args.get("train_data_dir") or (specs[0].image_dir.parent if specs else ".")))
    return ds, (int(batch) if batch is not None else None)


def dataset_from_subsets(specs: Sequence[SubsetSpec], options: DatasetOptions, captions: CaptionConfig, *,
                         seed: int = 0, root: Path | None = None) -> KohyaDataset:
    """Scan resolved subsets into a :class:`KohyaDataset` (kohya ``DreamBoothDataset.__init__``, module docstring).

    Training entries come first (subset order), then the used regularization entries with their balanced repeats
    (:func:`balance_reg_repeats`); each entry carries its subset's caption options, flip and ``is_reg``. Raises
    :class:`DatasetError` when no training image is found, ``FileNotFoundError`` for a missing folder.
    """
    bg = parse_color(options.background)
    val_seed = options.validation_seed if options.validation_seed is not None else seed
    subsets, entries, val_entries, reg_pending, warnings = [], [], [], [], []
    tag_freq: dict[str, dict[str, int]] = {}
    seen: set[Path] = set()
    num_train = num_reg = 0
    for spec in specs:
        if spec.num_repeats < 1:
            warnings.append(f"ignore subset {spec.image_dir.name}: num_repeats is less than 1")
            continue
        if spec.image_dir.resolve() in seen:
            warnings.append(f"ignore duplicated subset {spec.image_dir}: the first one is used")
            continue
        if not spec.image_dir.is_dir():
            raise FileNotFoundError(f"image_dir not found: {spec.image_dir}")
        seen.add(spec.image_dir.resolve())
        images = _list_images(spec.image_dir)
        if not images:
            warnings.append(f"ignore subset {spec.image_dir.name}: no images found ({', '.join(IMAGE_EXTENSIONS)})")
            continue
        caps = (spec.captions or captions).validate()
        train_imgs, val_imgs = ((images, []) if spec.is_reg else
                                split_train_val(images, float(options.validation_split), int(val_seed)))
        info = SubsetInfo(spec.image_dir.name, spec.image_dir, spec.num_repeats, spec.class_tokens or "")
        info.is_reg = spec.is_reg
        for group, target in ((train_imgs, "train"), (val_imgs, "val")):
            for img in group:
                try:
                    cap = read_caption(img, spec.caption_extension, caps.enable_wildcard)
                except CaptionFileError as exc:
                    raise DatasetError(f"{spec.image_dir.name}/{exc}") from None
                from_file = cap is not None
                if cap is None:
                    cap = spec.class_tokens if spec.class_tokens is not None else ""
                    info.missing_captions.append(img.name)
                pil = open_rgb(img, bg)
                e = ImageEntry(img, spec.image_dir.name, spec.num_repeats, cap, from_file, pil.size)
                e.is_reg, e.captions, e.flip_aug = spec.is_reg, caps, spec.flip_aug
                if spec.resize_interpolation:
                    e.resize_interpolation = spec.resize_interpolation
                if target == "val":
                    e.repeats = 1
                    val_entries.append(e)
                elif spec.is_reg:
                    reg_pending.append(e)
                else:
                    entries.append(e)
        info.img_count, info.val_count = len(train_imgs), len(val_imgs)
        if spec.is_reg:
            num_reg += spec.num_repeats * len(train_imgs)
        else:
            num_train += spec.num_repeats * len(train_imgs)
        tag_freq[spec.image_dir.name] = tag_frequency([e.caption for e in entries + reg_pending
                                                       if e.subset == spec.image_dir.name])
        if info.missing_captions:
            warnings.append(f"No caption file found for {len(info.missing_captions)} images in {info.name}; "
                            + (f"the class tokens {spec.class_tokens!r} are used" if spec.class_tokens is not None
                               else "they train with an empty caption"))
        subsets.append(info)
    if not entries:
        raise DatasetError("no training images found (only regularization images, or empty folders)")
    if reg_pending:
        if num_train < num_reg:
            warnings.append("some of reg images are not used (more reg images × repeats than training images)")
        for e, r in zip(reg_pending, balance_reg_repeats(num_train, [e.repeats for e in reg_pending])):
            if r > 0:
                e.repeats = r
                entries.append(e)
    elif any(s.is_reg for s in specs):
        warnings.append("no regularization images found")
    for w in warnings:
        logger.warning(w)
    ds = KohyaDataset(root or specs[0].image_dir.parent, options, captions, subsets, entries, val_entries,
                      tag_freq, warnings + captions.warnings())
    ds.num_reg_images = num_reg
    ds.make_buckets()
    return ds


def uses_dataset_config(values: Mapping[str, Any]) -> bool:
    """True when the settings ask for kohya's dataset machinery rather than one plain training folder:
    ``dataset_config``, an inline ``[[datasets]]`` or ``reg_data_dir``."""
    return bool(values.get("dataset_config") or values.get("datasets") or values.get("reg_data_dir"))


def dataset_from_settings(values: Mapping[str, Any], *, seed: int = 0, base_dir: str | os.PathLike | None = None,
                          resolve=None) -> tuple[KohyaDataset, int | None]:
    """The dataset a flat kohya mapping describes when :func:`uses_dataset_config` is true.

    ``dataset_config`` (a file; relative to ``base_dir``) or the inline ``datasets`` list is used when given
    (kohya: the dataset config wins over ``train_data_dir`` / ``reg_data_dir``, which then only warn); otherwise
    ``train_data_dir`` + ``reg_data_dir``. ``resolve(path_text) -> Path`` maps every folder/file named in the
    settings (the ComfyUI node passes its input-folder resolver so no path leaves ComfyUI's folders); default:
    relative to ``base_dir``. Returns ``(dataset, batch_size or None)``; raises as :func:`build_dataset`.
    """
    base = Path(base_dir) if base_dir else Path(".")
    if resolve is None:
        def resolve(text):
            p = Path(str(text))
            return p if p.is_absolute() else base / p
    args = dict(values)
    user = None
    if values.get("dataset_config"):
        cfg_path = resolve(values["dataset_config"])
        user = load_dataset_config(cfg_path)
        base_for_subsets = cfg_path.parent
    elif values.get("datasets"):
        user = {"datasets": values["datasets"]}
        base_for_subsets = base
    if user is not None:
        for k in ("train_data_dir", "reg_data_dir"):
            if values.get(k):
                logger.warning("%s is ignored because a dataset config is given (kohya does the same)", k)
                args.pop(k, None)
        user = {**user, "datasets": [dict(d, subsets=[dict(s, image_dir=str(resolve(s["image_dir"]))
                                                          if s.get("image_dir") else None)
                                                      for s in (d.get("subsets") or [])])
                                     for d in user.get("datasets", [])]}
        return build_dataset(user, args, seed=seed, base_dir=base_for_subsets)
    for k in ("train_data_dir", "reg_data_dir"):
        if args.get(k):
            args[k] = str(resolve(args[k]))
    if not args.get("train_data_dir"):
        raise ValueError("train_data_dir is required with reg_data_dir (or give a dataset_config)")
    return build_dataset(None, args, seed=seed)
