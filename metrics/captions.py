"""Caption audit for pixel-art training sets: hex codes that contradict each other, the palette list or the image.

Captions in the style this audits look like::

    pixel art, dawnlike, acid blob, body (#6dc2ca), background (#346524),
    palette: #6dc2ca, #346524, #140c1c, retro pixel art style, #f7d7c0

:func:`parse_caption` splits one caption into labelled ``feature (#hex)`` pairs, the ``palette:`` list,
stray (unlabelled) hex codes and malformed hex tokens. :func:`audit_caption` turns that (plus, optionally,
the paired image) into :class:`Finding` objects with stable codes (:data:`FINDING_CODES`).
:func:`audit_folder` walks a dataset folder (flat, or kohya ``<repeats>_<name>`` subfolders), pairs images
with ``.txt`` captions by file stem, audits every pair and returns a JSON-ready report (schema
:data:`SCHEMA`); :func:`fix_folder` writes corrected captions into a *new* folder.

Why hand-written: caption syntax is project-specific (no tag-parser library knows ``feature (#hex)``
pairs or ``palette:`` lists); colour science (ΔE00, colour names, hue families) and the image side (grid
detection, snapping, clustering) come from :mod:`.color` / :mod:`.grid` / :mod:`.palette`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..formats.limits import LimitError

SCHEMA = "conceptlab.caption_audit/1"

#: severity levels, most severe first
SEVERITIES = ("error", "warning", "info")

#: every finding code -> (default severity, one-line meaning). Codes and meanings are stable API.
FINDING_CODES: dict[str, tuple[str, str]] = {
    "duplicate_hex": ("warning", "two different features carry the same (or ΔE00 < 2) hex; "
                                 "error when one of them is the background"),
    "unlabelled_hex": ("warning", "a hex code outside the palette list with no feature naming it"),
    "palette_mismatch": ("warning", "a labelled hex missing from the palette list, or a palette hex no "
                                    "feature names (data.direction says which)"),
    "absent_from_image": ("warning", "no snapped cell of the paired image lies within the ΔE00 tolerance "
                                     "of this caption hex"),
    "image_color_not_captioned": ("warning", "a colour cluster covering >= 3 % of the image's cells has no "
                                             "caption hex within the ΔE00 tolerance"),
    "name_hex_mismatch": ("warning", "a colour word in the feature disagrees with the hex's hue family"),
    "malformed_hex": ("error", "a '#' token that is not a 6-digit hex colour (#12345, #GGGGGG, ...)"),
    "missing_caption": ("warning", "an image with no .txt caption beside it"),
    "missing_image": ("warning", "a .txt caption with no image of the same name beside it"),
    "empty_caption": ("error", "the caption file is empty or whitespace only"),
    "caption_not_utf8": ("error", "the caption file is not valid UTF-8 (audited with undecodable bytes "
                                  "replaced; not rewritten by the fix)"),
    "caption_unreadable": ("error", "the caption file could not be read"),
    "image_unreadable": ("error", "the image file could not be opened or decoded"),
}

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_EXTENSION = ".txt"

DEFAULT_TOLERANCE = 5.0          # ΔE00: caption hex "present in the image" (same default as palette fidelity)
DEFAULT_DUPLICATE_DE = 2.0       # ΔE00 below which two hexes are "the same colour"
DEFAULT_UNCAPTIONED_FRAC = 0.03  # cluster share of cells that must be captioned
MAX_DUPLICATE_FINDINGS = 200    # duplicate_hex findings listed per caption (the rest are counted)
DEFAULT_SNAP_FIX_DE = 10.0       # fix: replace an absent labelled hex by the nearest image colour within this

_BACKGROUND_WORDS = ("background", "backdrop", "bg")
_HEX6 = re.compile(r"#[0-9a-fA-F]{6}")
# any '#' followed by word characters: a hex code, well-formed or not
_HASH_TOKEN = re.compile(r"#+[0-9A-Za-z_]+")
_HEX_DIGITS = re.compile(r"[0-9a-fA-F]+")


def is_hex_like(token: str) -> bool:
    """True when a ``#`` token is meant as a hex colour (well-formed or not), False for hashtags and numbers.

    Hex-like: the body (after the ``#`` signs) is only hex digits and ≥ 3 long (``#03dc73``, ``#abc``,
    ``#12345``, ``#03dc73ff``), or is 3, 4, 6 or 8 letters and digits mixing both (a mistyped hex:
    ``#03dc7g``), or is 6 / 8 upper-case letters and digits (``#GGGGGG``). Not hex-like: hashtags
    (``#pixelart``, ``#gamedev``, ``#retro`` — lower-case words), numbers (``sprite #1``, ``#12``), anything with
    ``_``."""
    body = token.lstrip("#")
    if _HEX_DIGITS.fullmatch(body):
        return len(body) >= 3
    if not body.isalnum():
        return False
    if len(body) in (6, 8) and body.isupper():  # #GGGGGG: an upper-case colour code gone wrong, not a hashtag
        return True
    return len(body) in (3, 4, 6, 8) and any(c.isdigit() for c in body) and any(c.isalpha() for c in body)


def _hex_tokens(segment: str) -> list:
    """Hex-like ``#`` tokens of a segment (regex matches), hashtags left out (:func:`is_hex_like`)."""
    return [m for m in _HASH_TOKEN.finditer(segment) if is_hex_like(m.group(0))]
# a bare 6-digit hex inside parentheses, e.g. "hair (03dc73)": a hex with its '#' missing
_BARE_HEX_IN_PARENS = re.compile(r"\(\s*([0-9a-fA-F]{6})\s*\)")
_PALETTE_HEAD = re.compile(r"^\s*(?:colou?r\s+)?palette\s*:\s*", re.IGNORECASE)
_KOHYA_SUBSET = re.compile(r"^(\d+)_(.+)$")


class NotAFolderError(NotADirectoryError, ValueError):
    """The dataset path is a file, not a folder (a ``ValueError`` too, so the CLI prints it as a user error)."""


# --------------------------------------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------------------------------------

@dataclass
class HexToken:
    """One hex-like token found in a caption.

    ``raw`` is the text as written; ``hex`` the normalized ``#rrggbb`` (lowercase) or ``None`` when the
    token is malformed; ``suggestion`` a safe correction for recoverable malformed tokens (missing '#',
    3-digit shorthand, doubled '#'), else ``None``. ``role`` is ``"labelled"``, ``"palette"`` or ``"stray"``;
    ``feature`` the feature text for labelled tokens. ``segment`` indexes :attr:`ParsedCaption.segments`.
    """

    raw: str
    hex: str | None
    role: str
    segment: int
    feature: str | None = None
    suggestion: str | None = None

    @property
    def ok(self) -> bool:
        """True when the token parsed to a valid ``#rrggbb`` (:attr:`hex` is not ``None``)."""
        return self.hex is not None


@dataclass
class ParsedCaption:
    """A caption split into comma-separated segments (commas inside parentheses do not split).

    ``segments``: the stripped segment texts, in order. ``tokens``: every hex-like token, in order.
    Convenience views: :attr:`labelled` (``(feature, hex)`` of valid labelled tokens), :attr:`palette`
    (valid palette hexes, in order, duplicates kept), :attr:`stray`, :attr:`malformed` (raw texts).
    ``has_palette`` is True when a ``palette:`` list is present (even an empty one).
    """

    text: str
    segments: list[str]
    tokens: list[HexToken]
    has_palette: bool = False
    palette_segments: list[int] = field(default_factory=list)

    @property
    def labelled(self) -> list[tuple[str, str]]:
        """``(feature, "#rrggbb")`` of every valid labelled token, in caption order ("" for no feature text)."""
        return [(t.feature or "", t.hex) for t in self.tokens if t.role == "labelled" and t.ok]

    @property
    def palette(self) -> list[str]:
        """Valid ``#rrggbb`` hexes of the ``palette:`` list, in order, duplicates kept."""
        return [t.hex for t in self.tokens if t.role == "palette" and t.ok]

    @property
    def stray(self) -> list[str]:
        """Valid hexes that are neither labelled nor in the palette list, in order."""
        return [t.hex for t in self.tokens if t.role == "stray" and t.ok]

    @property
    def malformed(self) -> list[str]:
        """Raw texts of the hex-like tokens that did not parse, in order."""
        return [t.raw for t in self.tokens if not t.ok]

    def all_hexes(self) -> list[str]:
        """Every valid hex in the caption, first occurrence order, without repeats."""
        seen: dict[str, None] = {}
        for t in self.tokens:
            if t.ok:
                seen.setdefault(t.hex, None)
        return list(seen)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able ``{"labelled": [{"feature", "hex"}], "palette", "stray", "malformed", "has_palette"}``."""
        return {
            "labelled": [{"feature": f, "hex": h} for f, h in self.labelled],
            "palette": self.palette,
            "stray": self.stray,
            "malformed": self.malformed,
            "has_palette": self.has_palette,
        }


def split_segments(text: str) -> list[str]:
    """Split a caption on commas (and newlines) that are not inside parentheses/brackets; strip each part.

    Empty parts are dropped. ``"a (#1, #2), b"`` -> ``["a (#1, #2)", "b"]``.
    """
    parts: list[str] = []
    depth = 0
    cur: list[str] = []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(depth - 1, 0)
        if ch in ",\n\r" and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def normalize_hex(token: str) -> tuple[str | None, str | None]:
    """Classify one hex-like token.

    Returns ``(hex, suggestion)``: ``hex`` is the lowercase ``#rrggbb`` for a well-formed token (exactly one
    '#' and, any case: 6 hex digits; 8 digits ``#rrggbbaa`` — the alpha is trimmed; the CSS shorthands
    ``#rgb`` / ``#rgba`` — each digit doubled, alpha trimmed), else ``None``; ``suggestion`` is a safe repair for
    malformed tokens whose intent is unambiguous — missing '#' (``03dc73``), doubled '#' (``##03dc73``) —
    else ``None`` (``#12345``, ``#03dc7g``, ``#1234567``).
    """
    t = token.strip()
    if _HEX6.fullmatch(t):
        return t.lower(), None
    if re.fullmatch(r"#[0-9a-fA-F]{8}", t):
        return t[:7].lower(), None
    if re.fullmatch(r"#[0-9a-fA-F]{3,4}", t):
        return "#" + "".join(c * 2 for c in t[1:4].lower()), None
    body = t.lstrip("#")
    if re.fullmatch(r"[0-9a-fA-F]{6}", body) or re.fullmatch(r"[0-9a-fA-F]{8}", body):
        return None, "#" + body[:6].lower()
    return None, None


def _is_hex_only(segment: str) -> bool:
    """True when a segment holds nothing but hex-like tokens (and separators)."""
    toks = _hex_tokens(segment)
    if not toks:
        return False
    rest = segment
    for m in reversed(toks):
        rest = rest[: m.start()] + " " + rest[m.end():]
    return not re.sub(r"[\s;/|]+", "", rest)


def _feature_text(segment: str) -> str:
    """The feature words of a labelled segment: hex tokens and empty brackets removed, spaces collapsed."""
    s = _HASH_TOKEN.sub(lambda m: " " if is_hex_like(m.group(0)) else m.group(0), segment)
    s = _BARE_HEX_IN_PARENS.sub(" ", s)
    s = re.sub(r"[(\[{]\s*[,;\s]*\s*[)\]}]", " ", s)
    s = re.sub(r"\s+", " ", s).strip(" :;-")
    return s.strip()


def parse_caption(text: str) -> ParsedCaption:
    """Parse one caption into labelled pairs, palette list, stray and malformed hex tokens.

    Rules (documented in the README):

    * segments are comma-separated (commas inside parentheses do not split);
    * a segment starting ``palette:`` (or ``color palette:``) opens the palette list; its hex tokens and
      those of the following hex-only segments are palette entries; the first segment with words ends it;
    * any other segment with words and hex tokens is *labelled*: the words (hex tokens removed) are the
      feature, e.g. ``green hair (#03dc73)`` -> ``("green hair", "#03dc73")``;
    * hex-only segments outside the palette list are *stray* (unlabelled);
    * a bare 6-digit hex in parentheses (``hair (03dc73)``) is a malformed token with its '#' missing.

    Args:
        text: caption text (any length; ``str``).
    Returns:
        :class:`ParsedCaption`. Never raises on any string.
    """
    segments = split_segments(text)
    tokens: list[HexToken] = []
    has_palette = False
    palette_segments: list[int] = []
    in_palette = False
    for i, seg in enumerate(segments):
        head = _PALETTE_HEAD.match(seg)
        body = seg[head.end():] if head else ""
        # "palette: warm tones" (words after the head) is ordinary text, not a palette list
        if head and (not body.strip() or _is_hex_only(body)):
            has_palette = True
            in_palette = True
            palette_segments.append(i)
            for m in _hex_tokens(body):
                h, sug = normalize_hex(m.group(0))
                tokens.append(HexToken(m.group(0), h, "palette", i, suggestion=sug))
            continue
        raw_tokens = [m.group(0) for m in _hex_tokens(seg)]
        bare = [m.group(1) for m in _BARE_HEX_IN_PARENS.finditer(seg)]
        if not raw_tokens and not bare:
            in_palette = False
            continue
        if _is_hex_only(seg):
            role = "palette" if in_palette else "stray"
            if in_palette:
                palette_segments.append(i)
            for raw in raw_tokens:
                h, sug = normalize_hex(raw)
                tokens.append(HexToken(raw, h, role, i, suggestion=sug))
            continue
        in_palette = False
        feature = _feature_text(seg)
        for raw in raw_tokens:
            h, sug = normalize_hex(raw)
            tokens.append(HexToken(raw, h, "labelled", i, feature=feature, suggestion=sug))
        for raw in bare:
            tokens.append(HexToken(raw, None, "labelled", i, feature=feature, suggestion="#" + raw.lower()))
    return ParsedCaption(text=text, segments=segments, tokens=tokens, has_palette=has_palette,
                         palette_segments=palette_segments)


# --------------------------------------------------------------------------------------------------------
# colour adapter (narrow: everything colour-scientific lives in .color / .grid / .palette)
# --------------------------------------------------------------------------------------------------------

def _hex_to_lab(hexes: Sequence[str]) -> np.ndarray:
    """``#rrggbb`` strings -> CIE Lab float64 ``[N,3]`` (D65) via :func:`.color.parse_hex` / ``srgb_to_lab``."""
    from . import color

    if not hexes:
        return np.zeros((0, 3), dtype=np.float64)
    rgb = np.array([color.parse_hex(h) for h in hexes], dtype=np.uint8).reshape(-1, 3)
    return np.asarray(color.srgb_to_lab(rgb), dtype=np.float64).reshape(-1, 3)


def _rgb_to_lab(rgb_u8: np.ndarray) -> np.ndarray:
    """uint8 ``[...,3]`` sRGB -> CIE Lab float64 ``[N,3]`` via :func:`.color.srgb_to_lab`."""
    from . import color

    return np.asarray(color.srgb_to_lab(np.asarray(rgb_u8, dtype=np.uint8).reshape(-1, 3)),
                      dtype=np.float64).reshape(-1, 3)


def _de00_matrix(lab_a: np.ndarray, lab_b: np.ndarray) -> np.ndarray:
    """Pairwise CIEDE2000 ``[len(a), len(b)]`` through :func:`.color.delta_e00` (broadcasting)."""
    from . import color

    if len(lab_a) == 0 or len(lab_b) == 0:
        return np.zeros((len(lab_a), len(lab_b)), dtype=np.float64)
    d = color.delta_e00(lab_a[:, None, :], lab_b[None, :, :])
    return np.asarray(d, dtype=np.float64).reshape(len(lab_a), len(lab_b))


def _de00_matrix_pairs(lab_a: np.ndarray, lab_b: np.ndarray) -> np.ndarray:
    """Row-wise CIEDE2000 of two ``[N,3]`` Lab arrays → ``[N]`` (:func:`.color.delta_e00`)."""
    from . import color

    if len(lab_a) == 0:
        return np.zeros(0)
    return np.asarray(color.delta_e00(lab_a, lab_b), dtype=np.float64).reshape(-1)


def delta_e00_hex(a: str, b: str) -> float:
    """CIEDE2000 between two ``#rrggbb`` colours (Sharma, Wu, Dalal 2005, via :mod:`.color`)."""
    return float(_de00_matrix(_hex_to_lab([a]), _hex_to_lab([b]))[0, 0])


def _hexes(rgb_u8: np.ndarray) -> list[str]:
    """uint8 ``[N,3]`` -> ``["#rrggbb", ...]`` via :func:`.color.rgb_to_hex`."""
    from . import color

    return [color.rgb_to_hex(tuple(int(v) for v in c)) for c in np.asarray(rgb_u8).reshape(-1, 3)]


def _hex_family(h: str) -> str:
    """Coarse family (Red, ..., Gray) of ``#rrggbb`` via :func:`.color.color_family`."""
    from . import color

    return str(color.color_family(h))


def _word_family(words: str) -> str | None:
    """Family named by a colour word/phrase (last colour word wins) via :func:`.color.hue_family_of_word`."""
    from . import color

    return color.hue_family_of_word(words)


def _is_own_css_colour(word: str, h: str, max_de: float = 10.0) -> bool:
    """True when ``word`` is a CSS colour name (azure, beige, lavender, ...) and ``h`` is within ``max_de``
    ΔE00 of that name's own CSS hex: a colour named by its own name never contradicts itself."""
    from . import color

    names, rgbs, labs = color._named_table()
    try:
        i = names.index(word.lower())
    except ValueError:
        return False
    return float(_de00_matrix(labs[i : i + 1], _hex_to_lab([h]))[0, 0]) <= max_de


def _families_agree(word_family: str, hex_family: str) -> bool:
    """Equal or adjacent families (:func:`.color.families_compatible`): no ``name_hex_mismatch``."""
    from . import color

    return bool(color.families_compatible(word_family, hex_family))


# --------------------------------------------------------------------------------------------------------
# findings
# --------------------------------------------------------------------------------------------------------

@dataclass
class Finding:
    """One audit finding. ``code`` is one of :data:`FINDING_CODES`; ``severity`` one of :data:`SEVERITIES`.

    ``feature`` / ``hex`` name the caption item concerned (``None`` when not applicable); ``data`` holds
    code-specific values (e.g. ``other_feature``, ``delta_e00``, ``direction``, ``fraction``).
    """

    code: str
    severity: str
    message: str
    feature: str | None = None
    hex: str | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of the finding's fields (``code``, ``severity``, ``message``, ``feature``, ``hex``,
        ``data``)."""
        return {"code": self.code, "severity": self.severity, "message": self.message,
                "feature": self.feature, "hex": self.hex, "data": self.data}


def _finding(code: str, message: str, *, severity: str | None = None, **kw) -> Finding:
    return Finding(code, severity or FINDING_CODES[code][0], message, **kw)


def is_background_feature(feature: str | None) -> bool:
    """True when the feature text names the background (``background``, ``backdrop``, ``bg``)."""
    words = re.findall(r"[a-z]+", (feature or "").lower())
    return any(w in _BACKGROUND_WORDS for w in words)


def _colour_word(feature: str) -> tuple[str, str] | None:
    """``(word, family)`` of the colour word of ``feature`` (the last one: English puts the head colour
    last, "blue green" is green), or ``None`` when the feature names no colour."""
    for w in reversed(re.findall(r"[A-Za-z]+", feature or "")):
        fam = _word_family(w.lower())
        if fam:
            return w.lower(), fam
    return None


def check_text(parsed: ParsedCaption, duplicate_de: float = DEFAULT_DUPLICATE_DE) -> list[Finding]:
    """Image-free findings of one parsed caption.

    Codes: ``malformed_hex``, ``duplicate_hex``, ``unlabelled_hex``, ``palette_mismatch``,
    ``name_hex_mismatch``. ΔE00 is CIEDE2000 (Sharma, Wu, Dalal 2005) from :mod:`.color`.

    Args:
        parsed: from :func:`parse_caption`.
        duplicate_de: ΔE00 below which two labelled hexes of different features count as duplicates (≥ 0).
    Returns:
        findings in caption order per code.
    """
    findings: list[Finding] = []
    for t in parsed.tokens:
        if not t.ok:
            hint = f"; did you mean {t.suggestion}?" if t.suggestion else ""
            findings.append(_finding(
                "malformed_hex", f"{t.raw!r} is not a #rrggbb hex colour{hint}", feature=t.feature,
                hex=None, data={"raw": t.raw, "role": t.role, "suggestion": t.suggestion}))

    labelled = parsed.labelled
    # duplicates between different features: distinct (feature, hex) pairs only; candidate colour pairs from a
    # KD-tree on Lab within 2t + 1 (CIEDE2000 divides the Lab differences by weights ≥ 1; its a' stretch is at
    # most 1.5×, so ΔE00 < t implies ΔE76 < 1.5t; 2t + 1 has margin), exact ΔE00 on those in chunks: a megabyte
    # caption costs O(n log n) and bounded memory, not an n×n matrix
    pairs = list(dict.fromkeys((f.lower().strip(), f, h) for f, h in labelled))
    if len(pairs) > 1:
        uh = list(dict.fromkeys(h for _, _, h in pairs))
        idx_of = {h: i for i, h in enumerate(uh)}
        lab = _hex_to_lab(uh)
        by_hex: dict[int, list[int]] = {}
        for k, (_, _, h) in enumerate(pairs):
            by_hex.setdefault(idx_of[h], []).append(k)
        from scipy.spatial import cKDTree

        near = cKDTree(lab).query_pairs(2.0 * duplicate_de + 1.0, output_type="ndarray") if len(uh) > 1 else \
            np.zeros((0, 2), np.int64)
        keep = []
        for c0 in range(0, len(near), 1 << 18):  # exact ΔE00 in chunks, stopping once enough pairs are found
            blk = near[c0 : c0 + (1 << 18)]
            keep.append(blk[_de00_matrix_pairs(lab[blk[:, 0]], lab[blk[:, 1]]) < duplicate_de])
            if sum(len(k) for k in keep) > MAX_DUPLICATE_FINDINGS:
                break
        near = np.concatenate(keep) if keep else near[:0]
        cand = [(a_, a_) for a_ in by_hex] + [(int(x), int(y)) for x, y in near]
        n_dup = 0
        for ha, hb in cand:
            if n_dup > MAX_DUPLICATE_FINDINGS:
                break
            for i in by_hex[ha]:
                if n_dup > MAX_DUPLICATE_FINDINGS:
                    break
                for j in by_hex[hb]:
                    if (ha == hb and j <= i) or pairs[i][0] == pairs[j][0]:
                        continue
                    n_dup += 1
                    if n_dup > MAX_DUPLICATE_FINDINGS:
                        break
                    fi, hi_, fj, hj = pairs[i][1], pairs[i][2], pairs[j][1], pairs[j][2]
                    d = 0.0 if hi_ == hj else float(_de00_matrix_pairs(lab[[ha]], lab[[hb]])[0])
                    bg = is_background_feature(fi) or is_background_feature(fj)
                    same = "the same hex" if hi_ == hj else f"near-identical hexes (ΔE00 {d:.2f})"
                    findings.append(_finding(
                        "duplicate_hex",
                        f"{fi!r} ({hi_}) and {fj!r} ({hj}) have {same}"
                        + ("; one is the background, so the feature would vanish into it" if bg else ""),
                        severity="error" if bg else "warning", feature=fi, hex=hi_,
                        data={"other_feature": fj, "other_hex": hj, "delta_e00": round(d, 4), "background": bg}))
        if n_dup > MAX_DUPLICATE_FINDINGS:
            findings.append(_finding(
                "duplicate_hex", f"more than {MAX_DUPLICATE_FINDINGS} duplicate pairs: the rest are not listed",
                data={"truncated": True}))

    labelled_set = {h for _, h in labelled}
    palette_set = set(parsed.palette)
    for h in dict.fromkeys(parsed.stray):
        in_pal = h in palette_set or h in labelled_set
        findings.append(_finding(
            "unlabelled_hex",
            f"{h} stands alone with no feature naming it"
            + (" (it is already in the palette list / a labelled feature)" if in_pal else ""),
            hex=h, data={"in_palette": h in palette_set, "labelled": h in labelled_set}))

    if parsed.has_palette:
        for f, h in labelled:
            if h not in palette_set:
                findings.append(_finding(
                    "palette_mismatch", f"{f!r} ({h}) is not in the palette list", feature=f, hex=h,
                    data={"direction": "labelled_not_in_palette"}))
        for h in dict.fromkeys(parsed.palette):
            if h not in labelled_set:
                findings.append(_finding(
                    "palette_mismatch", f"palette colour {h} is not named by any feature",
                    severity="info", hex=h, data={"direction": "palette_not_labelled"}))

    for f, h in labelled:
        cw = _colour_word(f)
        if cw is None:
            continue
        word, wfam = cw
        fam = _hex_family(h)
        if _families_agree(wfam, fam) or _is_own_css_colour(word, h):
            continue
        findings.append(_finding(
            "name_hex_mismatch", f"{f!r}: the word {word!r} means {wfam} but {h} is {fam}", feature=f, hex=h,
            data={"word": word, "word_family": wfam, "hex_family": fam}))
    return findings


@dataclass
class ImageColours:
    """The colours of a snapped pixel-art image, as the caption audit needs them.

    ``cell_lab``: float64 ``[N,3]`` Lab of the distinct snapped cell colours; ``cell_counts``: int ``[N]``
    cells per colour; ``clusters``: ``[(hex, fraction_of_cells, lab)]`` perceptual clusters, biggest first.
    """

    cell_lab: np.ndarray
    cell_counts: np.ndarray
    clusters: list[tuple[str, float, np.ndarray]]
    cell_hex: list[str] = field(default_factory=list)
    grid: dict[str, Any] = field(default_factory=dict)


def check_image(parsed: ParsedCaption, colours: ImageColours, tolerance: float = DEFAULT_TOLERANCE,
                min_fraction: float = DEFAULT_UNCAPTIONED_FRAC) -> list[Finding]:
    """Findings that need the paired image: ``absent_from_image`` and ``image_color_not_captioned``.

    Args:
        parsed: from :func:`parse_caption`.
        colours: from :func:`image_colours` (snapped native cells + clusters).
        tolerance: ΔE00 within which a caption hex counts as present / a cluster as captioned (> 0).
        min_fraction: share of cells (0..1) a cluster must cover to need a caption hex.
    """
    findings: list[Finding] = []
    hexes = parsed.all_hexes()
    if hexes and len(colours.cell_lab):
        d = _de00_matrix(_hex_to_lab(hexes), colours.cell_lab)
        nearest = d.min(axis=1)
        feat_of = {}
        for t in parsed.tokens:
            if t.ok and t.role == "labelled":
                feat_of.setdefault(t.hex, t.feature)
        for h, dmin, row in zip(hexes, nearest, d):
            if dmin > tolerance:
                findings.append(_finding(
                    "absent_from_image",
                    f"{h}{' (' + feat_of[h] + ')' if h in feat_of else ''} is not in the image: nearest "
                    f"snapped cell is ΔE00 {dmin:.1f} away (tolerance {tolerance:g})",
                    feature=feat_of.get(h), hex=h,
                    data={"nearest_delta_e00": round(float(dmin), 4), "nearest_hex": colours.cell_hex[int(np.argmin(row))],
                          "tolerance": tolerance}))
    if colours.clusters:
        lab = np.stack([c[2] for c in colours.clusters])
        cap_lab = _hex_to_lab(hexes)
        dmin = _de00_matrix(lab, cap_lab).min(axis=1) if len(cap_lab) else np.full(len(lab), np.inf)
        for (h, frac, _), dm in zip(colours.clusters, dmin):
            if frac >= min_fraction and dm > tolerance:
                findings.append(_finding(
                    "image_color_not_captioned",
                    f"image colour {h} covers {frac * 100:.1f}% of cells but no caption hex is within "
                    f"ΔE00 {tolerance:g}" + (f" (nearest {dm:.1f})" if np.isfinite(dm) else ""),
                    hex=h, data={"fraction": round(float(frac), 4),
                                 "nearest_delta_e00": None if not np.isfinite(dm) else round(float(dm), 4)}))
    return findings


# --------------------------------------------------------------------------------------------------------
# image side (snapping and clustering come from .grid / .palette)
# --------------------------------------------------------------------------------------------------------

def load_rgb(path: str | os.PathLike, matte=None) -> tuple[np.ndarray, np.ndarray | None]:
    """Open an image file under the palette's one transparency rule (:func:`.palette.split_alpha`):
    ``(rgb uint8 [H,W,3], alpha uint8 [H,W] or None)``; transparent cells are left out of the audit's image
    colours (never reported as "#000000 not captioned"), ``matte`` composites over a colour instead.

    Raises ``ValueError`` with a clear message for unreadable / undecodable / over-large files.
    """
    from .palette import load_image

    try:
        return load_image(path, matte)
    except FileNotFoundError as exc:
        raise ValueError(f"cannot read image {Path(path).name}: {exc}") from exc
    except LimitError:  # the pixel budget keeps its own type (a ValueError) and message
        raise
    except (ValueError, OSError, SyntaxError) as exc:
        raise ValueError(f"cannot read image {Path(path).name}: {exc}") from exc


def image_colours(rgb, cells: int | None = None, alpha: np.ndarray | None = None) -> ImageColours:
    """Snap an upscaled pixel-art render to its native cells and cluster the cell colours.

    Uses the palette module's grid detection + snapping (one robust colour per cell) and its clustering
    at its perceptual threshold, so the audit sees the same colours as ``conceptlab palette``.

    Args:
        rgb: uint8 ``[H,W,3]``, or the ``(rgb, alpha)`` pair :func:`load_rgb` returns.
        cells: optional native cell count override.
        alpha: uint8 ``[H,W]``: cells with alpha < 128 are transparent and left out.
    A render without a pixel grid (status ``none``) has no cell colours (empty; ``grid`` says why).
    """
    if isinstance(rgb, tuple):
        rgb, alpha = rgb
    native, grid, opaque = _snap(rgb, cells, alpha)
    if native is None:
        return ImageColours(cell_lab=np.zeros((0, 3)), cell_counts=np.zeros(0, np.int64), clusters=[], grid=grid)
    flat = native.reshape(-1, 3) if opaque is None else native[opaque]
    uniq, counts = np.unique(flat, axis=0, return_counts=True)
    lab = _rgb_to_lab(uniq)
    clusters = _clusters(native, uniq, counts, lab)
    return ImageColours(cell_lab=lab, cell_counts=counts, clusters=clusters, grid=grid,
                        cell_hex=_hexes(uniq))



def _snap(rgb: np.ndarray, cells: int | None, alpha=None):
    """Native cells of a render via :func:`.grid.detect_grid` + :func:`.grid.snap`: (uint8 ``[h,w,3]`` or None
    without a grid, grid dict, opaque-cell mask or None)."""
    from . import grid as grid_mod
    from .palette import ALPHA_CUTOFF

    g = grid_mod.detect_grid(rgb, cells=cells)
    if not g.ok:
        return None, g.to_dict(), None
    opaque = None
    if alpha is not None:
        opaque = grid_mod.snap(np.repeat(alpha[..., None], 3, axis=2), g)[..., 0] >= ALPHA_CUTOFF
    return grid_mod.snap(rgb, g), g.to_dict(), opaque


CLUSTER_DE = 3.0  # ΔE00 leader-clustering radius for snapped cell colours (interim, see _clusters)


def _clusters(native: np.ndarray, uniq: np.ndarray, counts: np.ndarray,
              lab: np.ndarray) -> list[tuple[str, float, np.ndarray]]:
    """Perceptual clusters of the snapped cell colours: ``[(hex, fraction of cells, Lab)]``, biggest first.

    Leader clustering in ΔE00: colours in descending cell count; each joins the first leader within
    :data:`CLUSTER_DE`, else starts a cluster (its hex is the leader's, the most frequent colour).
    """
    order = np.argsort(-counts, kind="stable")
    total = float(counts.sum()) or 1.0
    leaders: list[int] = []
    sizes: list[int] = []
    d = _de00_matrix(lab, lab) if len(lab) <= 4096 else None
    for i in order:
        for k, li in enumerate(leaders):
            dd = d[i, li] if d is not None else _de00_matrix(lab[i:i + 1], lab[li:li + 1])[0, 0]
            if dd < CLUSTER_DE:
                sizes[k] += int(counts[i])
                break
        else:
            leaders.append(int(i))
            sizes.append(int(counts[i]))
    hexes = _hexes(uniq[leaders]) if leaders else []
    out = [(h, s / total, lab[li]) for h, s, li in zip(hexes, sizes, leaders)]
    out.sort(key=lambda t: -t[1])
    return out


# --------------------------------------------------------------------------------------------------------
# one caption, end to end
# --------------------------------------------------------------------------------------------------------

def audit_caption(text: str, image: np.ndarray | ImageColours | None = None, *,
                  tolerance: float = DEFAULT_TOLERANCE, duplicate_de: float = DEFAULT_DUPLICATE_DE,
                  min_fraction: float = DEFAULT_UNCAPTIONED_FRAC) -> tuple[ParsedCaption, list[Finding]]:
    """Parse and audit one caption, optionally against its image.

    Args:
        text: the caption.
        image: uint8 ``[H,W,3]`` render (snapped here) or precomputed :class:`ImageColours`, or ``None``.
        tolerance, duplicate_de, min_fraction: see :func:`check_text` / :func:`check_image`.
    Returns:
        ``(parsed, findings)``.
    """
    parsed = parse_caption(text)
    findings = check_text(parsed, duplicate_de=duplicate_de)
    if image is not None:
        colours = image if isinstance(image, ImageColours) else image_colours(np.asarray(image))
        findings += check_image(parsed, colours, tolerance=tolerance, min_fraction=min_fraction)
    return parsed, findings


# --------------------------------------------------------------------------------------------------------
# dataset folders
# --------------------------------------------------------------------------------------------------------

@dataclass
class DatasetItem:
    """One image and/or caption of a dataset folder, paired by folder + file stem."""

    key: str                      # relative posix path without extension
    image: Path | None = None
    caption: Path | None = None
    subset: dict[str, Any] | None = None


def _subset_of(rel_dir: Path) -> dict[str, Any] | None:
    """kohya ``<repeats>_<name>`` folder info of the deepest matching folder, else ``None``."""
    for part in reversed(rel_dir.parts):
        m = _KOHYA_SUBSET.match(part)
        if m:
            return {"folder": part, "repeats": int(m.group(1)), "name": m.group(2)}
    return None


def scan_folder(root: str | os.PathLike) -> list[DatasetItem]:
    """List a dataset folder (recursively: flat folders and kohya ``<repeats>_<name>`` subfolders).

    Images (:data:`IMAGE_EXTENSIONS`) and ``.txt`` captions in the same folder pair by file stem. Hidden
    files/folders (leading '.') are skipped. Items are sorted by key. Raises ``FileNotFoundError`` for a
    missing path and :class:`NotAFolderError` (a ``NotADirectoryError``) for a file, with a clear message.
    """
    root_p = Path(root)
    if not root_p.exists():
        raise FileNotFoundError(f"dataset folder {str(root)!r} does not exist")
    if not root_p.is_dir():
        raise NotAFolderError(f"{str(root)!r} is not a folder (give the dataset folder)")
    items: dict[str, DatasetItem] = {}
    for dirpath, dirnames, filenames in os.walk(root_p):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = Path(dirpath).relative_to(root_p)
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            p = Path(dirpath) / name
            ext = p.suffix.lower()
            if ext not in IMAGE_EXTENSIONS and ext != CAPTION_EXTENSION:
                continue
            key = (rel_dir / p.stem).as_posix()
            if ext in IMAGE_EXTENSIONS:
                item = items.get(key)
                if item is not None and item.image is not None:
                    # two images with one stem (a.png + a.jpg): both pair with the same caption
                    key = (rel_dir / name).as_posix()
                    item = None
                if item is None:
                    item = items[key] = DatasetItem(key=key, subset=_subset_of(rel_dir))
                item.image = p
            else:
                item = items.setdefault(key, DatasetItem(key=key, subset=_subset_of(rel_dir)))
                item.caption = p
    # second images of a stem share the caption
    for key, item in items.items():
        if item.caption is None and item.image is not None and key.endswith(item.image.name):
            cap = item.image.with_suffix(CAPTION_EXTENSION)
            if cap.is_file():
                item.caption = cap
    return [items[k] for k in sorted(items)]


def read_caption(path: str | os.PathLike) -> tuple[str | None, list[Finding]]:
    """Read a caption file. Returns ``(text or None, findings)``; never raises for file content.

    * unreadable (permissions, I/O) -> ``caption_unreadable``, text ``None``;
    * not UTF-8 -> ``caption_not_utf8`` with the byte offset; text decoded with U+FFFD replacements;
    * empty / whitespace only -> ``empty_caption``, text ``None``.
    A UTF-8 BOM is accepted and removed.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return None, [_finding("caption_unreadable", f"cannot read caption: {exc.strerror or exc}")]
    findings: list[Finding] = []
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        text = data.decode("utf-8", errors="replace").lstrip("\ufeff")
        findings.append(_finding(
            "caption_not_utf8",
            f"caption is not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); re-save it as UTF-8",
            data={"offset": exc.start}))
    if not text.strip():
        findings.append(_finding("empty_caption", "caption file is empty" if not data else
                                 "caption file holds only whitespace"))
        return None, findings
    return text, findings


def _rel(root: Path, p: Path | None) -> str | None:
    return None if p is None else p.relative_to(root).as_posix()


def audit_folder(root: str | os.PathLike, *, images: bool = True, tolerance: float = DEFAULT_TOLERANCE,
                 duplicate_de: float = DEFAULT_DUPLICATE_DE, min_fraction: float = DEFAULT_UNCAPTIONED_FRAC,
                 progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Audit every image/caption pair of a dataset folder; returns the JSON-ready report (:data:`SCHEMA`).

    Args:
        root: dataset folder (flat or kohya ``<repeats>_<name>`` subfolders).
        images: also open the paired images (``absent_from_image``, ``image_color_not_captioned``).
        tolerance: ΔE00 for image presence; duplicate_de: ΔE00 for duplicates; min_fraction: 0..1 share
            of cells a colour needs to require a caption hex.
        progress: called ``progress(done, total)`` after each item (may raise to cancel).
    Returns:
        ``{"schema", "root", "settings", "summary", "files"}`` — see the README for every field.
    Raises:
        FileNotFoundError / NotADirectoryError: ``root`` is not a folder. ValueError: bad settings.
    """
    if not (tolerance > 0 and duplicate_de >= 0 and 0 <= min_fraction <= 1):
        raise ValueError("tolerance must be > 0, duplicate_de >= 0 and min_fraction within 0..1")
    root_p = Path(root)
    items = scan_folder(root_p)
    files = []
    for n, item in enumerate(items):
        files.append(_audit_item(root_p, item, images, tolerance, duplicate_de, min_fraction))
        if progress is not None:
            progress(n + 1, len(items))
    return {
        "schema": SCHEMA,
        "root": str(root_p),
        "settings": {"images": bool(images), "tolerance": tolerance, "duplicate_de": duplicate_de,
                     "min_fraction": min_fraction},
        "summary": summarize(files),
        "files": files,
    }


def _audit_item(root: Path, item: DatasetItem, images: bool, tolerance: float, duplicate_de: float,
                min_fraction: float) -> dict[str, Any]:
    findings: list[Finding] = []
    parsed = None
    grid = None
    if item.caption is None:
        findings.append(_finding("missing_caption", f"no {item.image.stem}{CAPTION_EXTENSION} beside the image"))
    if item.image is None:
        findings.append(_finding("missing_image", "no image with this caption's name beside it"))
    text = None
    if item.caption is not None:
        text, read_findings = read_caption(item.caption)
        findings += read_findings
    if text is not None:
        try:  # one bad caption is a finding for that file, never the end of the run
            parsed = parse_caption(text)
            findings += check_text(parsed, duplicate_de=duplicate_de)
        except (ValueError, MemoryError, RecursionError) as exc:
            parsed = None
            findings.append(_finding("caption_unreadable", f"could not audit the caption: {type(exc).__name__}: {exc}"))
    if images and item.image is not None:
        try:
            colours = image_colours(load_rgb(item.image))
            grid = colours.grid
            if parsed is not None:
                findings += check_image(parsed, colours, tolerance=tolerance, min_fraction=min_fraction)
        except (ValueError, MemoryError) as exc:
            findings.append(_finding("image_unreadable", str(exc)))
    return {
        "key": item.key,
        "caption": _rel(root, item.caption),
        "image": _rel(root, item.image),
        "subset": item.subset,
        "parsed": None if parsed is None else parsed.to_dict(),
        "grid": grid,
        "findings": [f.to_dict() for f in findings],
    }


def summarize(files: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Summary counts of audited file entries (every code and severity present, zero when unseen)."""
    files = list(files)
    by_code = {c: 0 for c in FINDING_CODES}
    by_sev = {s: 0 for s in SEVERITIES}
    files_with = 0
    for f in files:
        if f["findings"]:
            files_with += 1
        for fd in f["findings"]:
            by_code[fd["code"]] = by_code.get(fd["code"], 0) + 1
            by_sev[fd["severity"]] = by_sev.get(fd["severity"], 0) + 1
    return {
        "items": len(files),
        "images": sum(1 for f in files if f["image"]),
        "captions": sum(1 for f in files if f["caption"]),
        "pairs": sum(1 for f in files if f["image"] and f["caption"]),
        "files_with_findings": files_with,
        "findings": sum(by_code.values()),
        "by_code": by_code,
        "by_severity": by_sev,
    }


# --------------------------------------------------------------------------------------------------------
# fixing
# --------------------------------------------------------------------------------------------------------

def fix_caption(text: str, colours: ImageColours | None = None, *, tolerance: float = DEFAULT_TOLERANCE,
                snap_de: float = DEFAULT_SNAP_FIX_DE) -> tuple[str, list[str]]:
    """Rewrite one caption with its safe fixes applied; returns ``(new_text, changes)``.

    Fixes: hex codes lower-cased; recoverable malformed hexes repaired (missing '#', 3-digit shorthand,
    doubled '#'), unrecoverable ones removed; stray hexes and labelled hexes missing from the palette list
    moved/added into it (a palette list is created when strays exist); repeated palette entries dropped;
    with ``colours``, a labelled hex absent from the image (> ``tolerance``) is replaced by the nearest
    snapped image colour when that is within ``snap_de`` ΔE00. Duplicates between features and
    colour-word mismatches need a person's judgement and are left as they are. Segments are re-joined with
    ``", "``; other text is kept verbatim.
    """
    parsed = parse_caption(text)
    changes: list[str] = []
    replace: dict[str, str] = {}
    if colours is not None and len(colours.cell_lab):
        lab_hex = colours.cell_hex
        labelled = list(dict.fromkeys(h for _, h in parsed.labelled))
        if labelled:
            d = _de00_matrix(_hex_to_lab(labelled), colours.cell_lab)
            for h, row in zip(labelled, d):
                j = int(np.argmin(row))
                if tolerance < row[j] <= snap_de:
                    replace[h] = lab_hex[j]

    def fixed(t: HexToken) -> str | None:
        if t.ok:
            new = replace.get(t.hex, t.hex)
            if new != t.hex:
                changes.append(f"{t.feature or t.hex}: {t.hex} -> {new} (nearest image colour)")
            elif t.raw.lower() != t.hex:
                changes.append(f"normalised {t.raw!r} -> {t.hex}")
            return new
        if t.suggestion:
            changes.append(f"repaired malformed {t.raw!r} -> {t.suggestion}")
            return t.suggestion
        changes.append(f"removed malformed {t.raw!r}")
        return None

    out: list[str] = []
    palette: list[str] = []
    palette_at: int | None = None
    by_seg: dict[int, list[HexToken]] = {}
    for t in parsed.tokens:
        by_seg.setdefault(t.segment, []).append(t)
    labelled_hexes: list[str] = []
    for i, seg in enumerate(parsed.segments):
        toks = by_seg.get(i, [])
        if i in parsed.palette_segments or (toks and toks[0].role in ("palette", "stray")
                                           and all(t.role == toks[0].role for t in toks)
                                           and _is_hex_only(seg)):
            if palette_at is None:
                palette_at = len(out)
                out.append("")  # placeholder for the palette list
            for t in toks:
                h = fixed(t)
                if h is None:
                    continue
                if t.role == "stray":
                    changes.append(f"moved unlabelled {h} into the palette list")
                palette.append(h)
            continue
        new_seg = seg
        for t in toks:
            h = fixed(t)
            if h is not None:
                labelled_hexes.append(h)
            if t.ok or t.suggestion or h is None:
                pat = re.escape(t.raw) if t.raw.startswith("#") else rf"\(\s*{re.escape(t.raw)}\s*\)"
                rep = h if t.raw.startswith("#") else f"({h})"
                if h is None:
                    rep = ""
                new_seg = re.sub(pat + (r"(?![0-9A-Za-z_])" if t.raw.startswith("#") else ""),
                                 lambda _m, r=rep: r, new_seg, count=1)
        new_seg = re.sub(r"\(\s*[,;]?\s*\)", "", new_seg)
        new_seg = re.sub(r"\s+", " ", new_seg).strip()
        if new_seg:
            out.append(new_seg)
    if parsed.has_palette or palette:
        for h in labelled_hexes:
            if h not in palette:
                changes.append(f"added labelled {h} to the palette list")
                palette.append(h)
    deduped = list(dict.fromkeys(palette))
    if len(deduped) < len(palette):
        changes.append("dropped repeated palette entries")
    if palette_at is None and deduped:
        palette_at = len(out)
        out.append("")
    if palette_at is not None:
        out[palette_at] = "palette: " + ", ".join(deduped) if deduped else "palette:"
    new_text = ", ".join(s for s in out if s)
    if text.endswith("\n"):
        new_text += "\n"
    if new_text.strip() == text.strip().replace("\r", ""):
        return text, []
    # lower-casing alone is a change too
    if not changes:
        changes.append("normalized hex codes / separators")
    return new_text, list(dict.fromkeys(changes))


def _check_fix_target(root: Path, out: Path) -> None:
    r = root.resolve()
    o = out.resolve()
    if o == r:
        raise ValueError(f"--fix-to {out} is the dataset folder itself; corrected captions go to a NEW folder")
    if r in o.parents:
        raise ValueError(f"--fix-to {out} is inside the dataset folder; pick a folder outside it")
    if o in r.parents:
        raise ValueError(f"--fix-to {out} contains the dataset folder; pick a separate folder")
    if o.exists() and (not o.is_dir() or any(o.iterdir())):
        raise ValueError(f"--fix-to {out} already exists and is not an empty folder; pick a new folder")


def fix_folder(root: str | os.PathLike, out: str | os.PathLike, *, images: bool = True,
               copy_images: bool = False, tolerance: float = DEFAULT_TOLERANCE,
               snap_de: float = DEFAULT_SNAP_FIX_DE,
               progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Write corrected copies of every caption of ``root`` into the NEW folder ``out`` (same relative paths).

    The dataset is never modified. Every UTF-8 caption is written (changed or not, atomically), so ``out``
    is a complete caption set; non-UTF-8, unreadable and empty captions are skipped and listed. With
    ``copy_images`` the paired images are copied too, making ``out`` a trainable dataset.

    Returns:
        ``{"out_dir", "written", "changed": [{"caption", "changes"}], "skipped": [{"caption", "reason"}]}``.
    Raises:
        ValueError: ``out`` is ``root``, inside it, contains it, or is an existing non-empty folder/file.
    """
    import shutil

    from ..formats.safetensors_io import atomic_output, atomic_write_text

    root_p = Path(root)
    out_p = Path(out)
    items = scan_folder(root_p)
    _check_fix_target(root_p, out_p)
    written = 0
    changed: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for n, item in enumerate(items):
        if item.caption is not None:
            rel = _rel(root_p, item.caption)
            text, fnds = read_caption(item.caption)
            bad = [f for f in fnds if f.code in ("caption_not_utf8", "caption_unreadable", "empty_caption")]
            if text is None or bad:
                skipped.append({"caption": rel, "reason": bad[0].code if bad else "unreadable"})
            else:
                colours = None
                if images and item.image is not None:
                    try:
                        colours = image_colours(load_rgb(item.image))
                    except (ValueError, MemoryError):
                        colours = None
                new_text, ch = fix_caption(text, colours, tolerance=tolerance, snap_de=snap_de)
                atomic_write_text(out_p / rel, new_text, overwrite=False)
                written += 1
                if ch:
                    changed.append({"caption": rel, "changes": ch})
        if copy_images and item.image is not None:
            dest = out_p / _rel(root_p, item.image)
            with atomic_output(dest, overwrite=False) as tmp:
                shutil.copyfile(item.image, tmp)
        if progress is not None:
            progress(n + 1, len(items))
    return {"out_dir": str(out_p), "written": written, "changed": changed, "skipped": skipped}


# --------------------------------------------------------------------------------------------------------
# picture of the report
# --------------------------------------------------------------------------------------------------------

_SEV_COLOURS = {"error": "#f4b6b6", "warning": "#fbe3a6", "info": "#dbe8f7", "ok": "#d4efd4"}


def render_table(report: dict[str, Any], max_rows: int = 40, width_px: int = 1200) -> np.ndarray:
    """Render an audit report as a table picture (matplotlib, Agg backend).

    One row per file (worst severity coloured: red error, amber warning, blue info, green clean) with its
    error / warning / info counts and finding codes; a title with the summary counts. At most ``max_rows``
    rows (the rest summarized in the last row).

    Returns:
        uint8 ``[H, width_px, 3]`` RGB array.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    files = report.get("files", [])
    rows, colours = [], []
    shown = files[:max_rows]
    for f in shown:
        fds = f["findings"]
        cnt = {s: sum(1 for d in fds if d["severity"] == s) for s in SEVERITIES}
        codes = sorted({d["code"] for d in fds})
        worst = next((s for s in SEVERITIES if cnt[s]), "ok")
        name = f["caption"] or f["image"] or f["key"]
        if len(name) > 48:
            name = "…" + name[-47:]
        code_txt = ", ".join(codes) if codes else "—"
        if len(code_txt) > 70:
            code_txt = code_txt[:69] + "…"
        rows.append([name, str(cnt["error"]), str(cnt["warning"]), str(cnt["info"]), code_txt])
        colours.append([_SEV_COLOURS[worst]] * 5)
    if len(files) > len(shown):
        rows.append([f"… {len(files) - len(shown)} more files", "", "", "", "see the JSON report"])
        colours.append(["#eeeeee"] * 5)
    if not rows:
        rows.append(["(no images or captions found)", "", "", "", ""])
        colours.append(["#eeeeee"] * 5)
    s = report.get("summary", summarize(files))
    dpi = 100
    height_in = 1.1 + 0.28 * (len(rows) + 1)
    fig = Figure(figsize=(width_px / dpi, height_in), dpi=dpi)
    ax = fig.add_axes([0.01, 0.01, 0.98, 1 - 0.9 / height_in])
    ax.axis("off")
    table = ax.table(cellText=rows, cellColours=colours,
                     colLabels=["file", "errors", "warnings", "info", "finding codes"],
                     colWidths=[0.34, 0.07, 0.08, 0.05, 0.46], loc="upper center", cellLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1, 1.25)
    fig.suptitle(f"Caption audit: {s['items']} items, {s['pairs']} pairs — {s['by_severity']['error']} errors, "
                 f"{s['by_severity']['warning']} warnings, {s['by_severity']['info']} info",
                 fontsize=11, y=1 - 0.25 / height_in)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3]
    ink = np.nonzero((rgb < 250).any(axis=(1, 2)))[0]  # crop empty rows above / below
    if ink.size:
        rgb = rgb[max(ink[0] - 12, 0): ink[-1] + 13]
    return np.ascontiguousarray(rgb).copy()
