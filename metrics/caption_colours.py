"""The colour side of the caption audit (:mod:`.captions`): a narrow adapter to :mod:`.color` (hex → Lab, ΔE00
matrices, hue families of hex codes and colour words) and the image side (:func:`load_rgb`, :func:`image_colours`:
grid detection and snapping from :mod:`.grid`, perceptual clusters of the snapped cells, as :class:`ImageColours`).

Everything colour-scientific lives in :mod:`.color` / :mod:`.grid` / :mod:`.palette`; this module only shapes it for
the caption checks (:func:`.captions.check_image`) and the fixer (:mod:`.caption_fix`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..formats.limits import LimitError

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
