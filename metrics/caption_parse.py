"""Caption syntax of the caption audit (:mod:`.captions`): one caption split into labelled ``feature (#hex)`` pairs, the
``palette:`` list, stray (unlabelled) hex codes and malformed hex tokens (:func:`parse_caption`), with the token
rules it rests on (:func:`is_hex_like`: hex codes versus hashtags and numbers; :func:`normalize_hex`).

Why hand-written: caption syntax is project-specific (no tag-parser library knows ``feature (#hex)`` pairs or
``palette:`` lists). Pure Python; no colour science here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

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
