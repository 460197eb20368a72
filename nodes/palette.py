"""ComfyUI nodes for pixel-art palette metrics (thin adapters over :mod:`conceptlab.metrics.palette`).

Category ``Concept Lab/Palette``. Batches give per-image results: STRING outputs hold one JSON object per
image (a JSON list for batches > 1), IMAGE outputs keep the batch (padded to one size when sizes differ).
"""

from __future__ import annotations

import json

import numpy as np

from ..metrics.color import MalformedHexError
from ..metrics.grid import detect_grid, snap, upscale_native
from ..metrics.palette import (
    extract_palette,
    palette_from_caption,
    palette_report,
    parse_palette,
    quantize,
)
from . import policy
from .comfy_host import Progress, image_to_numpy, numpy_to_image

CATEGORY = "Concept Lab/Palette"


def _targets(palette: str, caption: str):
    if palette and palette.strip():
        try:
            return parse_palette(palette)
        except MalformedHexError as exc:
            raise ValueError(f"palette: {exc}") from None
    if caption and caption.strip():
        cols, _ = palette_from_caption(caption)
        return cols or None
    return None


def _cells(cells: int):
    return int(cells) if cells and int(cells) > 0 else None


def _dump(items: list) -> str:
    return json.dumps(items[0] if len(items) == 1 else items, indent=2)


def _annotate(rgb: np.ndarray, rep: dict, arrays: dict) -> np.ndarray:
    """Render with grid lines, plus a strip of cluster swatches (width ∝ coverage; red bar = extraneous)."""
    from PIL import Image, ImageDraw

    g = arrays["grid"]
    h, w = rgb.shape[:2]
    strip = max(24, h // 10)
    im = Image.new("RGB", (w, h + strip), (32, 32, 32))
    im.paste(Image.fromarray(rgb), (0, 0))
    dr = ImageDraw.Draw(im)
    if g.cell_w >= 4:
        for i in range(g.cells_x + 1):
            x = g.phase_x + i * g.cell_w
            if 0 <= x < w:
                dr.line([(x, 0), (x, h - 1)], fill=(255, 0, 255), width=1)
    if g.cell_h >= 4:
        for j in range(g.cells_y + 1):
            y = g.phase_y + j * g.cell_h
            if 0 <= y < h:
                dr.line([(0, y), (w - 1, y)], fill=(255, 0, 255), width=1)
    extr = {e["hex"] for e in rep.get("extraneous", [])}
    x = 0.0
    for c in rep["clusters"]:
        cw = c["frac"] * w
        col = tuple(int(c["hex"][i : i + 2], 16) for i in (1, 3, 5))
        dr.rectangle([int(x), h, max(int(x), int(x + cw) - 1), h + strip - 1], fill=col)
        if c["hex"] in extr:
            dr.rectangle([int(x), h, max(int(x), int(x + cw) - 1), h + 3], fill=(255, 0, 0))
        x += cw
    return np.asarray(im)


@policy.guarded
class ConceptLabPaletteMetrics:
    """Palette report of each image on its native pixel grid."""

    DESCRIPTION = ("Detects the native pixel grid of pixel-art renders and reports colour counts, background, "
                   "cleanliness and (with target hex codes or a caption) palette fidelity within a ΔE00 "
                   "tolerance, as JSON, plus an annotated picture (grid lines + colour clusters).")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("STRING", "IMAGE")
    RETURN_NAMES = ("report", "annotated")
    OUTPUT_TOOLTIPS = ("JSON report (a list for batches), keys as in the CLI's palette --json.",
                       "Each image with the detected grid and a strip of its colour clusters (red = extraneous).")

    @classmethod
    def INPUT_TYPES(cls):
        """ComfyUI V1 input spec: ``{"required": {...}, "optional": {...}}`` with a tooltip on every input."""
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "Pixel-art render(s) to measure; batches give one report each."}),
                "tolerance": ("FLOAT", {"default": 5.0, "min": 0.5, "max": 50.0, "step": 0.1,
                                        "tooltip": "ΔE00 within which a cell matches a target colour."}),
            },
            "optional": {
                "palette": ("STRING", {"default": "", "multiline": False,
                                       "tooltip": "Target hex codes, e.g. #03dc73,#2c1600 (overrides caption)."}),
                "caption": ("STRING", {"default": "", "multiline": True,
                                       "tooltip": "A caption whose hex codes are the targets."}),
                "cells": ("INT", {"default": 0, "min": 0, "max": 4096,
                                  "tooltip": "Grid override: cells across (0 = detect)."}),
                "background": ("STRING", {"default": "", "tooltip": "Expected background hex (optional)."}),
            },
        }

    def run(self, image, tolerance=5.0, palette="", caption="", cells=0, background=""):
        """Report each image of IMAGE ``[B, H, W, 3]`` float 0..1.

        ``tolerance`` in ΔE00 (CIEDE2000, Sharma et al. 2005); ``cells`` 0 = detect the grid. Returns
        ``(json, annotated IMAGE [B, H', W, 3])``. Raises ``ValueError`` for a malformed ``palette`` hex code or
        ``background`` (:class:`~conceptlab.metrics.color.MalformedHexError`).
        """
        targets = _targets(palette, caption)
        imgs = image_to_numpy(image)
        prog = Progress(len(imgs))
        reports, pics = [], []
        for rgb in imgs:
            rep = palette_report(rgb, targets=targets, cells=_cells(cells), tolerance=float(tolerance),
                                 expected_background=background.strip() or None, return_arrays=True)
            arrays = rep.pop("_arrays")
            reports.append(rep)
            pics.append(_annotate(rgb, rep, arrays))
            prog.update()
        return (_dump(reports), numpy_to_image(pics))


@policy.guarded
class ConceptLabGridSnap:
    """Native image and clean upscale from the detected grid."""

    DESCRIPTION = ("Finds the native pixel grid (fractional cells, phase, blur/JPEG tolerant) and snaps each "
                   "cell to one robust colour: outputs the native-resolution image and a clean upscale.")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE", "IMAGE", "STRING")
    RETURN_NAMES = ("native", "clean", "grid")
    OUTPUT_TOOLTIPS = ("One pixel per cell (batches padded to the largest).",
                       "The snapped image upscaled back onto the detected grid (same size as the input).",
                       "Detected grid as JSON (cells_x, cells_y, cell_w, cell_h, phase, confidence).")

    @classmethod
    def INPUT_TYPES(cls):
        """ComfyUI V1 input spec: ``{"required": {...}, "optional": {...}}`` with a tooltip on every input."""
        return {
            "required": {"image": ("IMAGE", {"tooltip": "Pixel-art render(s) to snap."})},
            "optional": {"cells": ("INT", {"default": 0, "min": 0, "max": 4096,
                                           "tooltip": "Grid override: cells across (0 = detect)."})},
        }

    def run(self, image, cells=0):
        """Snap each image of IMAGE ``[B, H, W, 3]`` float 0..1 to its grid (``cells`` 0 = detect).

        Returns ``(native IMAGE [B, cy, cx, 3], clean IMAGE [B, H, W, 3], grid JSON)``; batches of different sizes
        are padded to the largest.
        """
        natives, cleans, grids = [], [], []
        imgs = image_to_numpy(image)
        prog = Progress(len(imgs))
        for rgb in imgs:
            g = detect_grid(rgb, _cells(cells))
            nat = snap(rgb, g)
            natives.append(nat)
            cleans.append(upscale_native(nat, g))
            grids.append(g.to_dict())
            prog.update()
        return (numpy_to_image(natives), numpy_to_image(cleans), _dump(grids))


@policy.guarded
class ConceptLabPaletteExtract:
    """k dominant colours as a swatch image and hex list."""

    DESCRIPTION = ("Extracts k dominant colours from the snapped native image (k-means in OKLab weighted by "
                   "cell counts, or Pillow's median cut / max coverage / fast octree for comparison).")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("swatches", "hex")
    OUTPUT_TOOLTIPS = ("One row of swatches per image, width proportional to coverage.",
                       "Comma-separated hex codes (one line per image), most common first.")

    @classmethod
    def INPUT_TYPES(cls):
        """ComfyUI V1 input spec: ``{"required": {...}, "optional": {...}}`` with a tooltip on every input."""
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "Image(s) to take the palette from."}),
                "k": ("INT", {"default": 8, "min": 1, "max": 256, "tooltip": "Number of colours."}),
                "method": (["kmeans", "mediancut", "maxcoverage", "fastoctree"],
                           {"default": "kmeans", "tooltip": "Palette algorithm."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1,
                                 "tooltip": "k-means seed (results are deterministic for a seed)."}),
            },
            "optional": {"snap_grid": ("BOOLEAN", {"default": True,
                                                   "tooltip": "Work on the snapped native cells (recommended)."})},
        }

    def run(self, image, k=8, method="kmeans", seed=0, snap_grid=True):
        """``k`` (1..256) dominant colours of each image of IMAGE ``[B, H, W, 3]`` float 0..1.

        Returns ``(swatch IMAGE [B, 64, 512, 3], hex lines)``; see
        :func:`conceptlab.metrics.palette.extract_palette` for the methods and their sources.
        """
        rows, hexes = [], []
        imgs = image_to_numpy(image)
        prog = Progress(len(imgs))
        for rgb in imgs:
            src = snap(rgb, detect_grid(rgb)) if snap_grid else rgb
            pal = extract_palette(src, int(k), method, int(seed))
            row = np.zeros((64, 512, 3), np.uint8)
            x = 0
            for i, p in enumerate(pal):
                wpx = int(round(p["frac"] * 512)) if i < len(pal) - 1 else 512 - x
                row[:, x : x + wpx] = p["rgb"]
                x += wpx
            rows.append(row)
            hexes.append(",".join(p["hex"] for p in pal))
            prog.update()
        return (numpy_to_image(rows), "\n".join(hexes))


@policy.guarded
class ConceptLabPaletteQuantize:
    """Map an image onto a palette (given hex codes, or k colours of its own)."""

    DESCRIPTION = ("Maps every pixel to the nearest colour (OKLab) of a given palette, or of the image's own "
                   "k-colour k-means palette when no palette is given.")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The quantized image(s), same size.",)

    @classmethod
    def INPUT_TYPES(cls):
        """ComfyUI V1 input spec: ``{"required": {...}, "optional": {...}}`` with a tooltip on every input."""
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "Image(s) to quantize."}),
                "k": ("INT", {"default": 16, "min": 1, "max": 256,
                              "tooltip": "Colours to use when no palette is given."}),
            },
            "optional": {"palette": ("STRING", {"default": "",
                                                "tooltip": "Target hex codes, e.g. #03dc73,#2c1600 (empty = k)."})},
        }

    def run(self, image, k=16, palette=""):
        """Quantize each image of IMAGE ``[B, H, W, 3]`` float 0..1 to ``palette`` (hex list) or ``k`` own colours.

        Returns ``(IMAGE [B, H, W, 3],)``. Raises ``ValueError`` naming the malformed hex code in ``palette``.
        """
        pal = None
        if palette and palette.strip():
            try:
                pal = parse_palette(palette)
            except MalformedHexError as exc:
                raise ValueError(f"palette: {exc}") from None
        outs = [quantize(rgb, pal, None if pal else int(k)) for rgb in image_to_numpy(image)]
        return (numpy_to_image(outs),)


NODE_CLASS_MAPPINGS = {
    "ConceptLabPaletteMetrics": ConceptLabPaletteMetrics,
    "ConceptLabGridSnap": ConceptLabGridSnap,
    "ConceptLabPaletteExtract": ConceptLabPaletteExtract,
    "ConceptLabPaletteQuantize": ConceptLabPaletteQuantize,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ConceptLabPaletteMetrics": "Palette Metrics",
    "ConceptLabGridSnap": "Grid Snap",
    "ConceptLabPaletteExtract": "Palette Extract",
    "ConceptLabPaletteQuantize": "Palette Quantize",
}
