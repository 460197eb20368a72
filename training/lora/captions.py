"""Kohya-exact caption handling: reading caption files, per-use caption processing, tag frequency.

Re-implemented from an understanding of kohya-ss/sd-scripts ``library/train_util.py``
(``BaseDataset.process_caption``, ``DreamBoothDataset.__init__.read_caption``, ``BaseDataset.set_tag_frequency``;
read at commit 48d368f, Feb 2026). No library exposes these rules, and users train with kohya configs and expect
the same behaviour, so they are written out here, rule by rule, with kohya's surprises kept on purpose:

* ``caption_prefix`` / ``caption_suffix`` are joined with a single space (``prefix + " " + caption``), *before*
  dropout and tag handling. With shuffling on, the prefix therefore becomes part of the first tag.
* Caption dropout empties the **whole** caption (``""``, so the model learns the unconditional case): with
  probability ``caption_dropout_rate`` on each use, and *always* in epochs where
  ``epoch % caption_dropout_every_n_epochs == 0`` (kohya's epochs are 1-based, so ``every_n = 2`` empties every
  caption in epochs 2, 4, ...).
* Without ``enable_wildcard`` only the caption's first line is used — taken *after* the suffix was appended, so
  a multi-line caption loses its ``caption_suffix`` (caption files are read first-line-only anyway).
* Tags are split only when ``shuffle_caption`` or ``caption_tag_dropout_rate > 0`` (or token warm-up) is on.
  **keep_tokens and keep_tokens_separator do nothing otherwise**: the caption is used verbatim, separator
  (e.g. ``|||``) included.
* When tags are split, kept tags (the first ``keep_tokens`` tags, or everything before ``keep_tokens_separator``,
  plus an optional fixed suffix after a second separator) never move and are never dropped; only the flexible
  tags are shuffled and then dropped each with probability ``caption_tag_dropout_rate``. The result is re-joined
  with ``", "`` whatever ``caption_separator`` was. Empty tags survive the ``keep_tokens`` path (kohya keeps
  them) but not the separator path (kohya filters them).
* Every use draws afresh: a sample's caption differs between epochs and between repeats.

Randomness comes from a caller-owned :class:`random.Random` (kohya uses the global ``random`` module), so a
trainer can save and restore its state for exact resume.
"""

from __future__ import annotations

import io
import math
import random
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterable, Mapping


@dataclass
class CaptionConfig:
    """Kohya's caption options (``DreamBoothSubset`` fields; same names and defaults as sd-scripts).

    Attributes:
        caption_prefix / caption_suffix: text joined with a space before / after every caption ("" = none).
        caption_dropout_rate: probability in [0, 1] that a use of a sample gets the empty caption.
        caption_dropout_every_n_epochs: empty every caption in epochs divisible by N (1-based); 0 = off.
        shuffle_caption: shuffle the flexible tags on every use.
        keep_tokens: number of leading tags that stay in front (only with shuffle / tag dropout).
        keep_tokens_separator: alternative to ``keep_tokens``: tags before it are kept (only with shuffle /
            tag dropout); a second occurrence starts kept suffix tags.
        caption_tag_dropout_rate: probability in [0, 1] that each flexible tag is dropped on a use.
        caption_separator: tag separator (kohya default ``","``).
        secondary_separator: replaced by ``caption_separator`` after shuffling (tags that move together).
        enable_wildcard: multi-line captions pick a random line; ``{a|b|c}`` picks one option.
        token_warmup_min / token_warmup_step: kohya's tag warm-up (step < 1 is a fraction of max steps).

    Source: kohya-ss/sd-scripts ``library/train_util.py`` (``BaseSubset`` fields, ``process_caption``).
    Construction does not check values: call :meth:`validate` (``ValueError``), as :meth:`from_mapping` does.
    """

    caption_prefix: str = ""
    caption_suffix: str = ""
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    caption_tag_dropout_rate: float = 0.0
    caption_separator: str = ","
    secondary_separator: str = ""
    enable_wildcard: bool = False
    token_warmup_min: int = 1
    token_warmup_step: float = 0

    def validate(self) -> "CaptionConfig":
        """Check ranges; raises ``ValueError`` naming the bad option. Returns self."""
        for name in ("caption_dropout_rate", "caption_tag_dropout_rate"):
            v = float(getattr(self, name))
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if int(self.caption_dropout_every_n_epochs) < 0:
            raise ValueError("caption_dropout_every_n_epochs must be >= 0")
        if int(self.keep_tokens) < 0:
            raise ValueError("keep_tokens must be >= 0")
        if not self.caption_separator:
            raise ValueError("caption_separator must not be empty")
        return self

    @property
    def splits_tags(self) -> bool:
        """True when kohya splits captions into tags (shuffle, tag dropout or token warm-up on)."""
        return bool(self.shuffle_caption) or float(self.token_warmup_step) > 0 or float(
            self.caption_tag_dropout_rate) > 0

    @property
    def is_static(self) -> bool:
        """True when every use of a caption gives the same text (text-encoder outputs can be cached by caption)."""
        return not (self.splits_tags or self.caption_dropout_rate > 0 or self.caption_dropout_every_n_epochs > 0
                    or self.enable_wildcard)

    def warnings(self) -> list[str]:
        """Kohya surprises this configuration runs into (shown by the dataset node)."""
        out = []
        if (self.keep_tokens or self.keep_tokens_separator) and not self.splits_tags:
            out.append("keep_tokens / keep_tokens_separator do nothing unless shuffle_caption or "
                       "caption_tag_dropout_rate is on (kohya uses the caption verbatim"
                       + (f", including the literal {self.keep_tokens_separator!r}" if self.keep_tokens_separator
                          else "") + ").")
        if self.caption_dropout_every_n_epochs == 1:
            out.append("caption_dropout_every_n_epochs = 1 empties every caption in every epoch.")
        if self.caption_prefix and self.splits_tags and not self.keep_tokens and not self.keep_tokens_separator:
            out.append("caption_prefix is joined to the first tag with a space and gets shuffled with it; "
                       "set keep_tokens = 1 or end the prefix with a separator.")
        return out

    @classmethod
    def from_mapping(cls, values: Mapping[str, object]) -> "CaptionConfig":
        """Build from a (flattened kohya) mapping, ignoring unrelated keys and ``None`` values.

        Raises ``ValueError`` via :meth:`validate`.
        """
        names = {f.name: f for f in fields(cls)}
        kw = {}
        for k, v in values.items():
            if k in names and v is not None:
                kw[k] = v
        cfg = cls(**kw)
        cfg.caption_prefix = cfg.caption_prefix or ""
        cfg.caption_suffix = cfg.caption_suffix or ""
        cfg.keep_tokens_separator = cfg.keep_tokens_separator or ""
        cfg.secondary_separator = cfg.secondary_separator or ""
        return cfg.validate()

    def to_dict(self) -> dict:
        """All fields as a plain dict (``dataclasses.asdict``)."""
        return asdict(self)


def _split_tags(text: str, sep: str, drop_empty: bool) -> list[str]:
    tags = [t.strip() for t in text.split(sep)]
    return [t for t in tags if t] if drop_empty else tags


def _replace_wildcards(caption: str, rng: random.Random) -> str:
    # kohya: "{{" / "}}" escape literal braces; "{a|b}" picks one option uniformly.
    left, right = "⦅", "⦆"
    while left in caption or right in caption:
        left += "⦅"
        right += "⦆"
    caption = caption.replace("{{", left).replace("}}", right)
    caption = re.sub(r"\{([^}]+)\}", lambda m: rng.choice(m.group(1).split("|")), caption)
    return caption.replace(left, "{").replace(right, "}")


def process_caption(caption: str, cfg: CaptionConfig, rng: random.Random, epoch: int = 1, step: int = 0,
                    max_train_steps: int = 0) -> str:
    """One use of a caption, processed with kohya's rules (see the module docstring).

    Args:
        caption: the raw caption (file text or class token).
        cfg: caption options.
        rng: the random source (consumed in kohya's order: dropout draw, wildcard, shuffle, tag dropout).
        epoch: the current epoch, **1-based** as in kohya (``current_epoch.value = epoch + 1``).
        step: the current optimisation step (token warm-up only).
        max_train_steps: total steps (token warm-up given as a fraction).

    Returns the caption text to encode (possibly ``""``).

    Source: kohya-ss/sd-scripts ``library/train_util.py`` ``BaseDataset.process_caption``.
    """
    if cfg.caption_prefix:
        caption = cfg.caption_prefix + " " + caption
    if cfg.caption_suffix:
        caption = caption + " " + cfg.caption_suffix

    # the random draw happens only when the rate is positive (kohya short-circuits), which keeps the rng
    # stream identical to kohya's for the same configuration
    drop = cfg.caption_dropout_rate > 0 and rng.random() < cfg.caption_dropout_rate
    drop = drop or (cfg.caption_dropout_every_n_epochs > 0 and epoch % cfg.caption_dropout_every_n_epochs == 0)
    if drop:
        return ""

    if cfg.enable_wildcard:
        if "\n" in caption:
            caption = rng.choice(caption.split("\n"))
        caption = _replace_wildcards(caption, rng)
    else:
        caption = caption.split("\n")[0]

    if cfg.splits_tags:
        sep = cfg.caption_separator
        fixed: list[str] = []
        fixed_suffix: list[str] = []
        ksep = cfg.keep_tokens_separator
        if ksep and ksep in caption:
            fixed_part, flex_part = caption.split(ksep, 1)
            if ksep in flex_part:
                flex_part, suffix_part = flex_part.split(ksep, 1)
                fixed_suffix = _split_tags(suffix_part, sep, drop_empty=True)
            fixed = _split_tags(fixed_part, sep, drop_empty=True)
            flex = _split_tags(flex_part, sep, drop_empty=True)
        else:
            tokens = _split_tags(caption.strip(), sep, drop_empty=False)
            flex = tokens[:]
            if cfg.keep_tokens > 0:
                fixed = tokens[: cfg.keep_tokens]
                flex = tokens[cfg.keep_tokens:]

        warmup = float(cfg.token_warmup_step)
        if 0 < warmup < 1:
            warmup = math.floor(warmup * max_train_steps)
        if warmup and step < warmup:
            n = math.floor(step * ((len(flex) - cfg.token_warmup_min) / warmup)) + cfg.token_warmup_min
            flex = flex[:n]

        if cfg.shuffle_caption:
            rng.shuffle(flex)
        if cfg.caption_tag_dropout_rate > 0:
            flex = [t for t in flex if rng.random() >= cfg.caption_tag_dropout_rate]
        caption = ", ".join(fixed + flex + fixed_suffix)

    if cfg.secondary_separator:
        caption = caption.replace(cfg.secondary_separator, cfg.caption_separator)
    return caption


class CaptionFileError(ValueError):
    """A caption file that cannot be used (empty, not UTF-8)."""


def read_caption(image_path: str | Path, caption_extension: str = ".txt", enable_wildcard: bool = False
                 ) -> str | None:
    """The caption for ``image_path`` from its same-stem caption file, or ``None`` when there is none.

    Follows kohya's ``read_caption``: looks for ``<stem><ext>`` and, for names with at least five ``_`` parts,
    the face-crop base name without the last four parts; lines end only at ``\n`` / ``\r`` / ``\r\n`` (kohya's
    text-mode ``readlines``: ``\f``, ``\v``, ``\x85``, ``\u2028`` inside a caption do not cut it); uses the first
    line (stripped) or, with
    ``enable_wildcard``, all non-empty lines joined with ``"\\n"``. ``caption_extension`` may omit the dot.

    Raises:
        CaptionFileError: the caption file is empty (kohya asserts the same) or not UTF-8.
    """
    ext = caption_extension if caption_extension.startswith(".") else "." + caption_extension
    base = str(Path(image_path).with_suffix(""))
    candidates = [base + ext]
    parts = base.split("_")
    if len(parts) >= 5:
        candidates.append("_".join(parts[:-4]) + ext)
    for cand in candidates:
        p = Path(cand)
        if p.is_file():
            try:
                text = p.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise CaptionFileError(f"caption file {p.name} is not UTF-8 text: {exc}") from None
            # kohya reads with open(..., "rt") + readlines(): only \n, \r and \r\n end a line (read_text already
            # turned \r / \r\n into \n). str.splitlines would also cut at \f, \v, \x1c-\x1e, \x85, \u2028, \u2029.
            lines = io.StringIO(text, newline="\n").readlines()
            if not lines:
                raise CaptionFileError(f"caption file {p.name} is empty (kohya refuses empty caption files; "
                                       f"delete it to use the folder's class token instead)")
            if enable_wildcard:
                return "\n".join(ln.strip() for ln in lines if ln.strip() != "")
            return lines[0].strip()
    return None


def tag_frequency(captions: Iterable[str]) -> dict[str, int]:
    """Kohya's ``ss_tag_frequency`` counts for one folder: comma-split, stripped, lower-cased, non-empty tags.

    Counts every occurrence (a tag twice in a caption counts twice), once per image (repeats not applied).
    """
    freq: dict[str, int] = {}
    for cap in captions:
        for tag in cap.split(","):
            tag = tag.strip()
            if tag:
                tag = tag.lower()
                freq[tag] = freq.get(tag, 0) + 1
    return freq
