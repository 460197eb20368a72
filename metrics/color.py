"""Colour science for the palette and caption metrics: hex parsing, sRGB → CIELAB / OKLab, CIEDE2000,
colour names and coarse colour families.

Stable API (numpy in, numpy out; imported by :mod:`.captions` too):

* :func:`parse_hex` / :func:`rgb_to_hex` / :func:`find_hex_codes` — ``#rrggbb`` strings, :class:`MalformedHexError`.
* :func:`srgb_to_linear` — sRGB transfer function (IEC 61966-2-1), via ``kornia.color.rgb_to_linear_rgb``.
* :func:`srgb_to_lab` — CIE L*a*b* (D65, 2°) via ``kornia.color.rgb_to_lab``.
* :func:`srgb_to_oklab` / :func:`oklab_to_srgb` — OKLab (Björn Ottosson, 2020).
* :func:`delta_e00` — CIEDE2000 (Sharma, Wu & Dalal 2005), broadcasting.
* :func:`color_name` / :func:`color_family` / :func:`hue_family_of_word` / :func:`families_compatible`.

Conventions: an *RGB array* is ``[..., 3]``; ``uint8`` means 0..255, any float dtype means sRGB 0..1
(values outside are clipped). Lab arrays are ``[..., 3]`` float64 with L* 0..100, a*, b* roughly -128..127.
OKLab arrays are ``[..., 3]`` float64 with L 0..1 and a, b roughly -0.4..0.4.
"""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np

__all__ = [
    "MalformedHexError",
    "parse_hex",
    "rgb_to_hex",
    "find_hex_codes",
    "HEX_PATTERN",
    "as_rgb_float",
    "srgb_to_linear",
    "srgb_to_lab",
    "srgb_to_oklab",
    "oklab_to_srgb",
    "delta_e00",
    "delta_e00_rgb",
    "color_name",
    "color_family",
    "oklch",
    "FAMILIES",
    "hue_family_of_word",
    "families_compatible",
]


# ----------------------------------------------------------------------------------------------------------------
# hex codes
# ----------------------------------------------------------------------------------------------------------------


class MalformedHexError(ValueError):
    """A string that should be a hex colour code is not one (wrong length or non-hex digits)."""


_HEX_DIGITS = re.compile(r"^[0-9a-fA-F]+$")

#: Regex finding hex-code candidates in free text: ``#`` followed by a run of word characters, so malformed
#: codes (``#12345``, ``#GGGGGG``, ``#03dc73ff``) are found too and can be reported by :func:`parse_hex`.
HEX_PATTERN = re.compile(r"#[0-9A-Za-z]+\b")


def parse_hex(s: str) -> tuple[int, int, int]:
    """Parse a colour code into an ``(r, g, b)`` tuple of ints 0..255.

    Accepted: ``#rrggbb`` and the CSS short form ``#rgb`` (each digit doubled, ``#abc`` → ``#aabbcc``), and
    the alpha forms ``#rrggbbaa`` / ``#rgba`` with the alpha trimmed (a palette colour has no alpha; trimming,
    not refusing, is the caption audit's rule too), any case, surrounding whitespace ignored; the leading ``#``
    is optional. Everything else — other lengths (``#12345``, ``#1234567``), non-hex digits (``#GGGGGG``),
    empty strings, non-strings — raises :class:`MalformedHexError` (a ``ValueError``) naming the input.
    Source: CSS Color Module Level 4, §5.2 "The RGB hexadecimal notations".
    """
    if not isinstance(s, str):
        raise MalformedHexError(f"colour code must be a string like '#03dc73', got {type(s).__name__}")
    t = s.strip()
    body = t[1:] if t.startswith("#") else t
    if not body:
        raise MalformedHexError(f"malformed hex colour {s!r}: empty")
    if not _HEX_DIGITS.match(body):
        raise MalformedHexError(f"malformed hex colour {s!r}: only 0-9 and a-f are hex digits")
    if len(body) in (3, 4):
        body = "".join(c * 2 for c in body[:3])
    elif len(body) == 8:
        body = body[:6]
    if len(body) != 6:
        raise MalformedHexError(
            f"malformed hex colour {s!r}: expected 6 hex digits (#rrggbb), 3 (#rgb) or 8 / 4 with alpha, "
            f"got {len(body)}"
        )
    v = int(body, 16)
    return (v >> 16) & 255, (v >> 8) & 255, v & 255


def rgb_to_hex(rgb) -> str:
    """``(r, g, b)`` → ``"#rrggbb"`` (lower case). ints 0..255, or floats 0..1 (rounded); raises ValueError
    for anything that is not 3 values."""
    a = np.asarray(rgb)
    if a.shape != (3,):
        raise ValueError(f"rgb_to_hex needs 3 values, got shape {a.shape}")
    if np.issubdtype(a.dtype, np.floating):
        a = np.clip(np.round(a * 255.0), 0, 255)
    a = np.clip(a.astype(np.int64), 0, 255)
    return "#%02x%02x%02x" % (int(a[0]), int(a[1]), int(a[2]))


def find_hex_codes(text: str) -> list[tuple[str, tuple[int, int, int] | None]]:
    """All ``#...`` codes in ``text`` in order: ``[(raw, rgb or None if malformed)]`` (see :data:`HEX_PATTERN`)."""
    out = []
    for m in HEX_PATTERN.finditer(text or ""):
        raw = m.group(0)
        try:
            out.append((raw, parse_hex(raw)))
        except MalformedHexError:
            out.append((raw, None))
    return out


# ----------------------------------------------------------------------------------------------------------------
# colour spaces
# ----------------------------------------------------------------------------------------------------------------


def as_rgb_float(rgb) -> np.ndarray:
    """RGB array ``[..., 3]`` (uint8 0..255, or float 0..1, or a python sequence of ints 0..255 / a hex str)
    → float64 0..1. Raises ValueError if the last axis is not 3."""
    if isinstance(rgb, str):
        rgb = parse_hex(rgb)
    a = np.asarray(rgb)
    if a.ndim == 0 or a.shape[-1] != 3:
        raise ValueError(f"expected an RGB array with last axis 3, got shape {a.shape}")
    if a.dtype == np.uint8 or np.issubdtype(a.dtype, np.integer):
        return a.astype(np.float64) / 255.0
    return np.clip(a.astype(np.float64), 0.0, 1.0)


def _to_kornia(a: np.ndarray):
    import torch

    flat = np.ascontiguousarray(a.reshape(-1, 3).T)  # [3, N]
    return torch.from_numpy(flat).unsqueeze(-1)  # [3, N, 1] = kornia's (*, 3, H, W)


def _from_kornia(t, shape) -> np.ndarray:
    return t.squeeze(-1).T.contiguous().numpy().reshape(shape)


@lru_cache(maxsize=1)
def _linear_lut() -> np.ndarray:
    """256-entry uint8 → linear-light table built with kornia's sRGB decoding."""
    import kornia.color as kc
    import torch

    v = torch.arange(256, dtype=torch.float64) / 255.0
    lin = kc.rgb_to_linear_rgb(v.expand(3, 256).unsqueeze(-1))[0, :, 0]
    return lin.numpy()


def srgb_to_linear(rgb) -> np.ndarray:
    """sRGB ``[..., 3]`` (uint8 or float 0..1) → linear-light RGB float64 0..1.

    The sRGB EOTF of IEC 61966-2-1 (piecewise: c/12.92 below 0.04045, else ((c+0.055)/1.055)^2.4), computed by
    ``kornia.color.rgb_to_linear_rgb``; uint8 input goes through a 256-entry table built with it (fast path).
    A hex string is accepted for one colour. Raises ``ValueError`` when the last axis is not 3
    (:class:`MalformedHexError` for a bad hex string).
    """
    if isinstance(rgb, str):
        rgb = np.array(parse_hex(rgb), dtype=np.uint8)
    a = np.asarray(rgb)
    if np.issubdtype(a.dtype, np.integer):
        if a.shape[-1:] != (3,):
            raise ValueError(f"expected an RGB array with last axis 3, got shape {a.shape}")
        return _linear_lut()[a if a.dtype == np.uint8 else np.clip(a, 0, 255).astype(np.uint8)]
    import kornia.color as kc

    f = as_rgb_float(a)
    return _from_kornia(kc.rgb_to_linear_rgb(_to_kornia(f)), f.shape)


# CIE L*a*b* constants (CIE 15:2004; sRGB primaries → XYZ per IEC 61966-2-1, D65 white, 2° observer), the same
# values kornia.color.rgb_to_xyz / rgb_to_lab use, so the numpy fast path below agrees with kornia to < 1e-4
# (tests/test_color.py::test_numpy_lab_fast_path_equals_kornia).
_XYZ_M = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]])
_D65 = np.array([0.95047, 1.0, 1.08883])
_LAB_EPS = 0.008856  # (6/29)^3, CIE 1976


def _lab_from_linear(lin: np.ndarray) -> np.ndarray:
    """Linear-light RGB ``[..., 3]`` float64 → CIE L*a*b* (CIE 1976 with the D65 white above)."""
    xyz = lin @ (_XYZ_M / _D65[:, None]).T
    f = np.where(xyz > _LAB_EPS, np.cbrt(np.maximum(xyz, _LAB_EPS)), 7.787 * xyz + 4.0 / 29.0)
    out = np.empty(f.shape, dtype=np.float64)
    out[..., 0] = 116.0 * f[..., 1] - 16.0
    out[..., 1] = 500.0 * (f[..., 0] - f[..., 1])
    out[..., 2] = 200.0 * (f[..., 1] - f[..., 2])
    return out


def srgb_to_lab(rgb) -> np.ndarray:
    """sRGB ``[..., 3]`` (uint8 0..255 or float 0..1) → CIE L*a*b* ``[..., 3]`` float64 (D65 white, 2° observer).

    Float input: ``kornia.color.rgb_to_lab`` (sRGB decoding, IEC 61966-2-1 matrix to XYZ, CIE 1976 L*a*b*).
    Integer (uint8) input — the hot path of the palette report, called on every image's colour sets — uses a
    numpy evaluation of the same formulas with kornia's constants, decoding through the 256-entry table that
    kornia builds (:func:`srgb_to_linear`): a torch call costs ~1 ms of fixed overhead, more than the whole
    conversion of a few hundred colours. The two paths agree to < 1e-4 (tested against kornia).
    L* in 0..100. Raises ValueError for a last axis other than 3.
    """
    if isinstance(rgb, str):
        rgb = parse_hex(rgb)
    a = np.asarray(rgb)
    if a.ndim == 0 or a.shape[-1] != 3:
        raise ValueError(f"expected an RGB array with last axis 3, got shape {a.shape}")
    if a.size == 0:
        return np.zeros(a.shape, dtype=np.float64)
    if np.issubdtype(a.dtype, np.integer):
        return _lab_from_linear(_linear_lut()[np.clip(a, 0, 255).astype(np.uint8)])
    import kornia.color as kc

    f = as_rgb_float(a)
    return _from_kornia(kc.rgb_to_lab(_to_kornia(f)), f.shape)


def _encode_srgb(lin: np.ndarray) -> np.ndarray:
    """Linear light → sRGB (IEC 61966-2-1 OETF: 12.92·c below 0.0031308, else 1.055·c^(1/2.4) − 0.055), numpy;
    equals ``kornia.color.linear_rgb_to_rgb`` to < 1e-6 (tested). Used on small colour sets (palette centres)
    where a torch call's fixed overhead dominates."""
    return np.where(lin > 0.0031308, 1.055 * np.power(np.maximum(lin, 0.0031308), 1.0 / 2.4) - 0.055, 12.92 * lin)


# OKLab, Björn Ottosson, "A perceptual color space for image processing" (2020),
# https://bottosson.github.io/posts/oklab/ — matrices M1 (linear sRGB → LMS) and M2 (LMS' → Lab) as published.
# Written here because kornia (the colour library the project uses) has no OKLab conversion.
_OK_M1 = np.array(
    [
        [0.4122214708, 0.5363325363, 0.0514459929],
        [0.2119034982, 0.6806995451, 0.1073969566],
        [0.0883024619, 0.2817188376, 0.6299787005],
    ]
)
_OK_M2 = np.array(
    [
        [0.2104542553, 0.7936177850, -0.0040720468],
        [1.9779984951, -2.4285922050, 0.4505937099],
        [0.0259040371, 0.7827717662, -0.8086757660],
    ]
)
_OK_M2_INV = np.array(
    [
        [1.0, 0.3963377774, 0.2158037573],
        [1.0, -0.1055613458, -0.0638541728],
        [1.0, -0.0894841775, -1.2914855480],
    ]
)
_OK_M1_INV = np.array(
    [
        [4.0767416621, -3.3077115913, 0.2309699292],
        [-1.2684380046, 2.6097574011, -0.3413193965],
        [-0.0041960863, -0.7034186147, 1.7076147010],
    ]
)


def srgb_to_oklab(rgb, dtype=np.float64) -> np.ndarray:
    """sRGB ``[..., 3]`` (uint8 or float 0..1) → OKLab ``[..., 3]`` (L 0..1, a/b ≈ -0.4..0.4).

    Ottosson (2020): linear sRGB → LMS (M1), cube root, → Lab (M2). sRGB decoding by :func:`srgb_to_linear`
    (kornia). Pure numpy and vectorised, so it is the space used for per-pixel work (snapping, k-means).
    ``dtype=np.float32`` halves memory for large arrays.
    """
    lin = srgb_to_linear(rgb).astype(dtype, copy=False)
    lms = lin @ _OK_M1.T.astype(dtype)
    np.cbrt(lms, out=lms)
    return lms @ _OK_M2.T.astype(dtype)


def oklab_to_srgb(lab, as_uint8: bool = False) -> np.ndarray:
    """OKLab ``[..., 3]`` → sRGB ``[..., 3]`` float64 0..1 (clipped to the gamut), or uint8 if ``as_uint8``.

    Inverse of :func:`srgb_to_oklab` (Ottosson 2020 inverse matrices; sRGB encoding per IEC 61966-2-1 via
    ``kornia.color.linear_rgb_to_rgb``, or for ≤ 4096 colours the same formula in numpy, :func:`_encode_srgb`).
    Raises ValueError for a last axis other than 3.
    """
    a = np.asarray(lab, dtype=np.float64)
    if a.ndim == 0 or a.shape[-1] != 3:
        raise ValueError(f"expected an OKLab array with last axis 3, got shape {a.shape}")
    lms = (a @ _OK_M2_INV.T) ** 3
    lin = np.clip(lms @ _OK_M1_INV.T, 0.0, 1.0)
    if lin.size == 0:
        srgb = lin
    elif lin.size <= 3 * 4096:  # small sets (palettes): numpy OETF, same formula as kornia's (tested)
        srgb = np.clip(_encode_srgb(lin), 0.0, 1.0)
    else:
        import kornia.color as kc

        srgb = np.clip(_from_kornia(kc.linear_rgb_to_rgb(_to_kornia(lin)), lin.shape), 0.0, 1.0)
    if as_uint8:
        return np.round(srgb * 255.0).astype(np.uint8)
    return srgb


def oklch(rgb) -> np.ndarray:
    """sRGB ``[..., 3]`` → OKLCh ``[..., 3]``: L 0..1, chroma C ≥ 0, hue h in degrees 0..360 (Ottosson 2020)."""
    lab = srgb_to_oklab(rgb)
    c = np.hypot(lab[..., 1], lab[..., 2])
    h = np.degrees(np.arctan2(lab[..., 2], lab[..., 1])) % 360.0
    return np.stack([lab[..., 0], c, h], axis=-1)


# ----------------------------------------------------------------------------------------------------------------
# CIEDE2000
# ----------------------------------------------------------------------------------------------------------------


def delta_e00(lab1, lab2, kL: float = 1.0, kC: float = 1.0, kH: float = 1.0) -> np.ndarray:
    """CIEDE2000 colour difference ΔE00 between CIELAB arrays ``[..., 3]`` (broadcasting) → float64 ``[...]``.

    Implements G. Sharma, W. Wu, E. N. Dalal, "The CIEDE2000 color-difference formula: implementation notes,
    supplementary test data, and mathematical observations", Color Res. Appl. 30(1), 2005, eqs. (1)–(22),
    including the hue-angle conventions of their notes (h' = 0 when C' = 0; mean hue and Δh' rules for
    |h1'-h2'| > 180°). Reproduces their 34-pair test table to 4 decimals (tests/test_color.py). Written by hand
    because kornia (the project's colour library) has no ΔE. Parametric factors kL = kC = kH = 1 by default.
    ΔE00 ≈ 1 is a just-noticeable difference; 2.3 is the usual JND quoted for ΔE*ab.
    Raises ``ValueError`` when either input's last axis is not 3.
    """
    a1 = np.asarray(lab1, dtype=np.float64)
    a2 = np.asarray(lab2, dtype=np.float64)
    if a1.shape[-1:] != (3,) or a2.shape[-1:] != (3,):
        raise ValueError(f"delta_e00 needs Lab arrays with last axis 3, got {a1.shape} and {a2.shape}")
    L1, A1, B1 = a1[..., 0], a1[..., 1], a1[..., 2]
    L2, A2, B2 = a2[..., 0], a2[..., 1], a2[..., 2]
    C1 = np.hypot(A1, B1)
    C2 = np.hypot(A2, B2)
    Cbar7 = ((C1 + C2) / 2.0) ** 7
    G = 0.5 * (1.0 - np.sqrt(Cbar7 / (Cbar7 + 25.0**7)))  # eq. (4)
    a1p = (1.0 + G) * A1
    a2p = (1.0 + G) * A2
    C1p = np.hypot(a1p, B1)
    C2p = np.hypot(a2p, B2)
    h1p = np.where((a1p == 0) & (B1 == 0), 0.0, np.degrees(np.arctan2(B1, a1p)) % 360.0)  # eq. (7)
    h2p = np.where((a2p == 0) & (B2 == 0), 0.0, np.degrees(np.arctan2(B2, a2p)) % 360.0)
    dLp = L2 - L1
    dCp = C2p - C1p
    prod = C1p * C2p
    dh = h2p - h1p
    dhp = np.where(prod == 0, 0.0, np.where(dh > 180.0, dh - 360.0, np.where(dh < -180.0, dh + 360.0, dh)))  # (10)
    dHp = 2.0 * np.sqrt(prod) * np.sin(np.radians(dhp) / 2.0)  # eq. (11)
    Lbp = (L1 + L2) / 2.0
    Cbp = (C1p + C2p) / 2.0
    hsum = h1p + h2p
    habs = np.abs(h1p - h2p)
    hbp = np.where(
        prod == 0,
        hsum,
        np.where(habs <= 180.0, hsum / 2.0, np.where(hsum < 360.0, (hsum + 360.0) / 2.0, (hsum - 360.0) / 2.0)),
    )  # eq. (14)
    T = (
        1.0
        - 0.17 * np.cos(np.radians(hbp - 30.0))
        + 0.24 * np.cos(np.radians(2.0 * hbp))
        + 0.32 * np.cos(np.radians(3.0 * hbp + 6.0))
        - 0.20 * np.cos(np.radians(4.0 * hbp - 63.0))
    )  # eq. (15)
    dtheta = 30.0 * np.exp(-(((hbp - 275.0) / 25.0) ** 2))  # eq. (16)
    Cbp7 = Cbp**7
    RC = 2.0 * np.sqrt(Cbp7 / (Cbp7 + 25.0**7))  # eq. (17)
    SL = 1.0 + (0.015 * (Lbp - 50.0) ** 2) / np.sqrt(20.0 + (Lbp - 50.0) ** 2)  # eq. (18)
    SC = 1.0 + 0.045 * Cbp  # eq. (19)
    SH = 1.0 + 0.015 * Cbp * T  # eq. (20)
    RT = -np.sin(np.radians(2.0 * dtheta)) * RC  # eq. (21)
    tL = dLp / (kL * SL)
    tC = dCp / (kC * SC)
    tH = dHp / (kH * SH)
    return np.sqrt(tL**2 + tC**2 + tH**2 + RT * tC * tH)  # eq. (22)


def delta_e00_rgb(rgb1, rgb2) -> np.ndarray:
    """ΔE00 between sRGB arrays ``[..., 3]`` (uint8 or float 0..1, or hex strings), broadcasting; via
    :func:`srgb_to_lab` and :func:`delta_e00`."""
    return delta_e00(srgb_to_lab(as_rgb_float(rgb1)), srgb_to_lab(as_rgb_float(rgb2)))


# ----------------------------------------------------------------------------------------------------------------
# names and families
# ----------------------------------------------------------------------------------------------------------------

#: Achromatic rule of :func:`color_family`: OKLCh chroma below ACHROMATIC_CHROMA + ACHROMATIC_SLOPE·max(0, L − 0.88)
#: is Black / Gray / White.
ACHROMATIC_CHROMA = 0.035
ACHROMATIC_SLOPE = 0.4
#: Coarse colour families used in epoch tables and by the caption audit.
FAMILIES = ("Red", "Orange", "Yellow", "Green", "Cyan", "Blue", "Purple", "Pink", "Brown", "Black", "White", "Gray")


@lru_cache(maxsize=1)
def _named_table() -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """The CSS Color Module Level 4 named colours (the W3C standard list of 148 names, which extends the X11
    names) as shipped by matplotlib (``matplotlib.colors.CSS4_COLORS``, PSF/BSD-compatible licence). Spelling
    duplicates (``grey`` forms, ``aqua``/``fuchsia``) are dropped so each colour has one name."""
    from matplotlib.colors import CSS4_COLORS

    names, rgbs = [], []
    for name, hx in sorted(CSS4_COLORS.items()):
        if "grey" in name or name in ("aqua", "fuchsia"):
            continue
        names.append(name)
        rgbs.append(parse_hex(hx))
    rgb = np.array(rgbs, dtype=np.uint8)
    return tuple(names), rgb, srgb_to_lab(rgb)


def color_name(rgb) -> str:
    """Nearest CSS/X11 colour name (by ΔE00, :func:`delta_e00`) for one colour (``(r,g,b)`` ints 0..255,
    float 0..1 triple, or hex string). Returns e.g. ``"mediumseagreen"``. Raises ValueError for non-colours."""
    names, _, labs = _named_table()
    a = np.asarray(parse_hex(rgb) if isinstance(rgb, str) else rgb)
    if a.shape not in ((3,), (1, 3)):
        raise ValueError(f"color_name needs one colour (3 values), got shape {a.shape}")
    lab = srgb_to_lab(a.reshape(3) if np.issubdtype(a.dtype, np.integer) else as_rgb_float(a).reshape(3))
    return names[int(np.argmin(delta_e00(labs, lab[None, :])))]


def _family_from_lch(L: np.ndarray, C: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Vectorised family rule on OKLCh (see :func:`color_family`); returns an int index into :data:`FAMILIES`."""
    idx = {f: i for i, f in enumerate(FAMILIES)}
    out = np.full(L.shape, idx["Gray"], dtype=np.int64)
    # chromatic hue sectors (OKLCh hue, degrees)
    hue = np.select(
        [
            (h >= 350) | (h < 45),
            (h >= 45) & (h < 85),
            (h >= 85) & (h < 125),
            (h >= 125) & (h < 175),
            (h >= 175) & (h < 228),
            (h >= 228) & (h < 295),
        ],
        [idx["Red"], idx["Orange"], idx["Yellow"], idx["Green"], idx["Cyan"], idx["Blue"]],
        default=idx["Purple"],
    )
    # light, not very saturated reds/magentas read as pink; so do light purples near magenta
    pink = ((h >= 330) | (h < 45)) & (L > 0.70) & (C > 0.04)
    pink |= (h >= 300) & (h < 350) & (L > 0.62) & (C > 0.08)
    pink |= ((h >= 345) | (h < 10)) & (L > 0.55) & (C > 0.12)  # hot / deep pinks
    # dark or muted oranges/yellows (and very dark reds) read as brown
    brown = (h >= 35) & (h < 100) & (L < 0.62) & (C > 0.035)
    brown |= (h >= 15) & (h < 35) & (L < 0.55) & (C < 0.11) & (C > 0.035)  # muted dark reds
    brown |= (h >= 40) & (h < 90) & (L < 0.80) & (C < 0.11) & (C > 0.035)  # tan / khaki-ish
    hue = np.where(pink & ~brown, idx["Pink"], np.where(brown, idx["Brown"], hue))
    # achromatic cutoff rises with lightness above L = 0.88: near-white pastels (DB16's off-white #dfefd7,
    # L 0.93, C 0.036) read as White, while light but clearly tinted colours (lightblue #add8e6, C 0.049 at
    # L 0.86; palegoldenrod #eee8aa, C 0.080 at L 0.92) stay chromatic.
    chromatic = C >= ACHROMATIC_CHROMA + ACHROMATIC_SLOPE * np.maximum(L - 0.88, 0.0)
    out = np.where(chromatic, hue, out)
    achrom_black = L < 0.30
    achrom_white = L > 0.93
    out = np.where(~chromatic & achrom_black, idx["Black"], out)
    out = np.where(~chromatic & achrom_white, idx["White"], out)
    out = np.where(L < 0.20, idx["Black"], out)  # anything this dark reads as black
    out = np.where((L > 0.97) & (C < 0.06), idx["White"], out)
    return out


def color_family(rgb) -> str | np.ndarray:
    """Coarse colour family of an sRGB colour: one of :data:`FAMILIES` (Red, Orange, Yellow, Green, Cyan, Blue,
    Purple, Pink, Brown, Black, White, Gray).

    Input: one colour (``(r,g,b)`` / hex str / float triple) → ``str``; an array ``[..., 3]`` → array of str.
    Rule (our own, tuned on the CSS named colours, see tests/test_color.py): OKLCh chroma
    C < 0.035 + 0.4·max(0, L − 0.88) is achromatic (Black L < 0.30, White L > 0.93, else Gray) — the cutoff
    rises for very light colours because a tiny chroma near white reads as white (``#dfefd7`` → White,
    ``#add8e6`` lightblue stays Cyan); chromatic colours by OKLCh hue sector (Red
    350–45°, Orange 45–85°, Yellow 85–125°, Green 125–175°, Cyan 175–228°, Blue 228–295°, Purple 295–350°),
    then light reds/magentas → Pink and dark/muted oranges-yellows → Brown; L < 0.20 is Black.
    """
    if isinstance(rgb, str):
        rgb = parse_hex(rgb)
    a = np.asarray(rgb)
    single = a.ndim == 1
    lch = oklch(a if np.issubdtype(a.dtype, np.integer) else as_rgb_float(a))
    fam = np.asarray(FAMILIES, dtype=object)[_family_from_lch(lch[..., 0], lch[..., 1], lch[..., 2])]
    return str(fam) if single else fam


# Colour words → family. Hand-made from common English usage in captions (hair/eye/skin/material words).
_WORD_FAMILY = {
    # red
    "red": "Red", "crimson": "Red", "scarlet": "Red", "ruby": "Red", "cherry": "Red", "vermilion": "Red",
    "blood": "Red", "cardinal": "Red", "carmine": "Red", "wine": "Red", "burgundy": "Red", "maroon": "Red",
    "redhead": "Red", "auburn": "Brown", "ginger": "Orange", "copper": "Orange", "rust": "Orange",
    # orange
    "orange": "Orange", "amber": "Orange", "tangerine": "Orange", "peach": "Orange", "apricot": "Orange",
    "coral": "Orange", "salmon": "Orange", "bronze": "Brown",
    # yellow
    "yellow": "Yellow", "gold": "Yellow", "golden": "Yellow", "blonde": "Yellow", "blond": "Yellow",
    "lemon": "Yellow", "mustard": "Yellow", "canary": "Yellow", "straw": "Yellow", "sand": "Yellow",
    "cream": "Yellow", "honey": "Yellow", "platinum": "White",
    # green
    "green": "Green", "lime": "Green", "olive": "Green", "emerald": "Green", "jade": "Green",
    "mint": "Green", "forest": "Green", "sage": "Green", "moss": "Green", "chartreuse": "Green",
    "grass": "Green", "leaf": "Green",
    # cyan
    "cyan": "Cyan", "teal": "Cyan", "turquoise": "Cyan", "aqua": "Cyan", "aquamarine": "Cyan",
    # blue
    "blue": "Blue", "navy": "Blue", "azure": "Blue", "cobalt": "Blue", "sapphire": "Blue", "sky": "Blue",
    "cerulean": "Blue", "denim": "Blue", "royal": "Blue", "ice": "Blue", "icy": "Blue", "indigo": "Blue",
    # purple
    "purple": "Purple", "violet": "Purple", "lavender": "Purple", "lilac": "Purple", "mauve": "Purple",
    "plum": "Purple", "amethyst": "Purple", "magenta": "Purple", "orchid": "Purple", "grape": "Purple",
    # pink
    "pink": "Pink", "rose": "Pink", "rosy": "Pink", "fuchsia": "Pink", "blush": "Pink", "bubblegum": "Pink",
    # brown
    "brown": "Brown", "brunette": "Brown", "chestnut": "Brown", "chocolate": "Brown", "coffee": "Brown",
    "tan": "Brown", "beige": "Brown", "caramel": "Brown", "hazel": "Brown", "mahogany": "Brown",
    "umber": "Brown", "sepia": "Brown", "khaki": "Brown", "wooden": "Brown", "wood": "Brown",
    # neutrals
    "black": "Black", "ebony": "Black", "jet": "Black", "onyx": "Black", "raven": "Black", "charcoal": "Black",
    "white": "White", "ivory": "White", "snow": "White", "pearl": "White", "silver": "Gray",
    "gray": "Gray", "grey": "Gray", "ash": "Gray", "slate": "Gray", "steel": "Gray", "pewter": "Gray",
}

# families a reasonable person could use interchangeably for one hex (used to avoid false mismatches)
_NEIGHBOURS = {
    ("Red", "Pink"), ("Red", "Orange"), ("Red", "Brown"), ("Red", "Purple"), ("Orange", "Yellow"),
    ("Orange", "Brown"), ("Yellow", "Brown"), ("Yellow", "Green"), ("Yellow", "White"), ("Green", "Cyan"),
    ("Cyan", "Blue"), ("Blue", "Purple"), ("Purple", "Pink"), ("Brown", "Black"), ("Black", "Gray"),
    ("Gray", "White"), ("Blue", "Gray"), ("Brown", "Gray"), ("Pink", "Orange"), ("Pink", "White"),
}


def hue_family_of_word(word: str) -> str | None:
    """Family (one of :data:`FAMILIES`) named by a colour word or phrase, or ``None`` if it names no colour.

    ``"blonde"`` → Yellow, ``"teal"`` → Cyan, ``"crimson"`` → Red, ``"dark green"`` → Green,
    ``"light-blue"`` → Blue, ``"seagreen"`` (a CSS name) → family of that CSS colour. In a phrase the last
    colour word wins (``"blue green"`` → Green: English puts the head colour last). Case-insensitive;
    plural/-ish endings are stripped (``"reddish"`` → Red). Table: hand-made ``_WORD_FAMILY`` + CSS names.
    """
    if not isinstance(word, str):
        return None
    tokens = re.findall(r"[a-z]+", word.lower())
    names, rgbs, _ = _named_table()
    css = dict(zip(names, rgbs))
    for tok in reversed(tokens):
        for cand in (tok, tok.removesuffix("ish"), tok.removesuffix("dish"), tok.removesuffix("s")):
            if cand in _WORD_FAMILY:
                return _WORD_FAMILY[cand]
        if tok in css:
            return color_family(css[tok])
    return None


def families_compatible(f1: str, f2: str) -> bool:
    """True if two families are equal or adjacent (Red~Pink, Orange~Brown, Black~Gray, ...; see ``_NEIGHBOURS``):
    a colour word in a caption "agrees" with a hex whose family is compatible with the word's family."""
    return f1 == f2 or (f1, f2) in _NEIGHBOURS or (f2, f1) in _NEIGHBOURS
