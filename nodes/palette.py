"""ComfyUI nodes for pixel-art palette metrics (thin adapters over :mod:`conceptlab.metrics.palette`).

Category ``Concept Lab/Palette``. Batches give per-image results: STRING outputs hold one JSON object per
image (a JSON list for batches > 1), IMAGE outputs keep the batch (padded to one size when sizes differ).
"""

from __future__ import annotations

import json
import logging

import numpy as np

from ..metrics.color import MalformedHexError
from ..metrics.grid import detect_grid, snap, upscale_native
from ..metrics.color import parse_hex
from ..metrics.palette import (
    CLUSTER_THRESHOLD,
    DETECTION_KEY,
    extract_palette,
    palette_from_caption,
    palette_report,
    parse_palette,
    quantize,
)
from . import policy
from .comfy_io import Progress, image_to_numpy, numpy_to_image

CATEGORY = "Concept Lab/Palette"
logger = logging.getLogger("conceptlab.palette")


def _alpha(mask, i: int, shape) -> np.ndarray | None:
    """ComfyUI MASK ``[B, H, W]`` (1 = masked = transparent, as LoadImage gives it) → alpha uint8 ``[H, W]`` of
    image ``i`` (the last mask is reused for shorter mask batches); None without a mask, and None for a mask with
    nothing masked — ComfyUI's LoadImage (nodes.py, ``LoadImage.load_image``) gives an image without alpha a
    64×64 zero mask, which must not be refused for its size. Raises ValueError when a mask that masks something
    differs in size from the image."""
    if mask is None:
        return None
    m = mask.detach().cpu().float().numpy() if hasattr(mask, "detach") else np.asarray(mask, np.float32)
    if m.ndim == 2:
        m = m[None]
    m = m[min(i, m.shape[0] - 1)]
    if not np.any(m > 0.5 / 255.0):
        return None
    if m.shape != tuple(shape):
        raise ValueError(f"mask {m.shape[1]}x{m.shape[0]} does not match image {shape[1]}x{shape[0]}")
    return np.clip((1.0 - m) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _warn(reports: list) -> None:
    for i, rep in enumerate(reports):
        for w in rep.get("warnings", []):
            logger.warning("Concept Lab palette, image %d: %s", i, w)


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


def _banner(im, text: str, colour) -> None:
    from PIL import ImageDraw

    dr = ImageDraw.Draw(im)
    dr.rectangle([0, 0, im.width - 1, 15], fill=colour)
    dr.text((4, 2), text, fill=(255, 255, 255))


def _annotate(rgb: np.ndarray, rep: dict, arrays: dict) -> np.ndarray:
    """Render with its grid cuts drawn, plus a strip of cluster swatches (width ∝ coverage; red bar =
    extraneous). A grid with status ``none`` / ``low_confidence`` gets a red / orange banner saying so."""
    from PIL import Image, ImageDraw

    g = arrays["grid"]
    h, w = rgb.shape[:2]
    strip = max(24, h // 10)
    im = Image.new("RGB", (w, h + strip), (32, 32, 32))
    im.paste(Image.fromarray(rgb), (0, 0))
    dr = ImageDraw.Draw(im)
    if g.ok and g.cell_w >= 4:
        for x in g.cuts_x:
            dr.line([(x, 0), (x, h - 1)], fill=(255, 0, 255), width=1)
    if g.ok and g.cell_h >= 4:
        for y in g.cuts_y:
            dr.line([(0, y), (w - 1, y)], fill=(255, 0, 255), width=1)
    extr = {e["hex"] for e in rep.get("extraneous") or []}
    x = 0.0
    for c in rep.get("clusters") or []:
        cw = c["frac"] * w
        col = tuple(int(c["hex"][i : i + 2], 16) for i in (1, 3, 5))
        dr.rectangle([int(x), h, max(int(x), int(x + cw) - 1), h + strip - 1], fill=col)
        if c["hex"] in extr:
            dr.rectangle([int(x), h, max(int(x), int(x + cw) - 1), h + 3], fill=(255, 0, 0))
        x += cw
    if g.status == "none":
        _banner(im, "NO PIXEL GRID - cell metrics are null", (200, 0, 0))
    elif g.status == "low_confidence":
        _banner(im, f"LOW-CONFIDENCE GRID ({g.confidence:.2f}) - check the cuts", (220, 120, 0))
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
                "mask": ("MASK", {"tooltip": "Transparency (LoadImage's MASK: 1 = transparent). Transparent cells "
                                             "are left out of every colour metric."}),
                "matte": ("STRING", {"default": "", "tooltip": "Composite transparency over this hex instead "
                                                              "of leaving it out (optional)."}),
                "cluster_threshold": ("FLOAT", {"default": CLUSTER_THRESHOLD, "min": 0.5, "max": 50.0, "step": 0.1,
                                                "tooltip": "ΔE00 under which cell colours count as one "
                                                           "effective colour."}),
            },
        }

    def run(self, image, tolerance=5.0, palette="", caption="", cells=0, background="", mask=None, matte="",
            cluster_threshold=CLUSTER_THRESHOLD):
        """Report each image of IMAGE ``[B, H, W, 3]`` float 0..1 (``mask`` MASK ``[B, H, W]``, 1 = transparent).

        ``tolerance`` / ``cluster_threshold`` in ΔE00 (CIEDE2000, Sharma et al. 2005); ``cells`` 0 = detect the
        grid. Returns ``(json, annotated IMAGE [B, H', W, 3])``; a grid with status ``none`` / ``low_confidence``
        is named in the report's ``warnings``, logged, and bannered on the picture. Raises ``ValueError`` for a
        malformed ``palette`` / ``background`` / ``matte`` hex code
        (:class:`~conceptlab.metrics.color.MalformedHexError`) or a mask of another size.
        """
        targets = _targets(palette, caption)
        mt = matte.strip() or None
        if mt:
            try:
                mt = parse_hex(mt)
            except MalformedHexError as exc:
                raise ValueError(f"matte: {exc}") from None
        imgs = image_to_numpy(image)
        prog = Progress(len(imgs))
        reports, pics = [], []
        for i, rgb in enumerate(imgs):
            alpha = _alpha(mask, i, rgb.shape[:2])
            if alpha is not None and mt is not None:  # the matte rule: composite, then it is a colour
                a = alpha[..., None].astype(np.float32) / 255.0
                rgb = np.clip(rgb * a + np.asarray(mt, np.float32) * (1 - a) + 0.5, 0, 255).astype(np.uint8)
                alpha = None
            elif alpha is not None and alpha.min() < 255:
                a = alpha[..., None].astype(np.float32) / 255.0
                key = np.asarray(DETECTION_KEY, np.float32)
                rgb = np.clip(rgb * a + key * (1 - a) + 0.5, 0, 255).astype(np.uint8)
            rep = palette_report(rgb, targets=targets, cells=_cells(cells), tolerance=float(tolerance),
                                 expected_background=background.strip() or None, return_arrays=True, alpha=alpha,
                                 cluster_threshold=float(cluster_threshold))
            arrays = rep.pop("_arrays")
            reports.append(rep)
            pics.append(_annotate(rgb, rep, arrays))
            prog.update()
        _warn(reports)
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
        are padded to the largest. An image without a grid (status ``none``) passes through unchanged with a
        ``warning`` in its grid JSON and a logged warning.
        """
        natives, cleans, grids = [], [], []
        imgs = image_to_numpy(image)
        prog = Progress(len(imgs))
        for i, rgb in enumerate(imgs):
            g = detect_grid(rgb, _cells(cells))
            d = g.to_dict()
            if g.ok:
                nat = snap(rgb, g)
                natives.append(nat)
                cleans.append(upscale_native(nat, g))
                if g.status == "low_confidence":
                    d["warning"] = f"low-confidence grid ({g.confidence:.2f}): check the cuts or set cells"
            else:  # no grid: the image passes through unchanged, and says so (never a silent 1-px grid)
                natives.append(rgb)
                cleans.append(rgb)
                d["warning"] = f"no pixel grid found ({g.reason}); native and clean are the input unchanged"
            if "warning" in d:
                logger.warning("Concept Lab grid snap, image %d: %s", i, d["warning"])
            grids.append(d)
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
            src = rgb
            if snap_grid:
                g = detect_grid(rgb)
                if g.ok:
                    src = snap(rgb, g)
                else:
                    logger.warning("Concept Lab palette extract: no pixel grid (%s); using the raw pixels", g.reason)
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


@policy.guarded
class ConceptLabPaletteSummary:
    """Dataset palette summary of an image batch and/or a folder of the input directory, as one table."""

    PATH_INPUTS = {"folder": "subfolders"}

    DESCRIPTION = ("Summarises a set of images — the dataset palette (cell colours clustered in ΔE00), the spread "
                   "of effective-colour counts, background families and grid statuses — for a folder inside "
                   "ComfyUI's input directory (e.g. the training set) and/or an IMAGE batch (e.g. epoch "
                   "samples), one row each, so they compare in one table.")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("summary", "table")
    OUTPUT_TOOLTIPS = ("JSON list of summaries (folder first, then the batch).",
                       "Plain-text table, one row per summary.")

    @classmethod
    def INPUT_TYPES(cls):
        """ComfyUI V1 input spec: ``{"required": {...}, "optional": {...}}`` with a tooltip on every input."""
        return {
            "required": {
                "colors": ("INT", {"default": 16, "min": 1, "max": 256, "tooltip": "Palette size reported."}),
                "cluster_threshold": ("FLOAT", {"default": CLUSTER_THRESHOLD, "min": 0.5, "max": 50.0, "step": 0.1,
                                                "tooltip": "ΔE00 under which colours are one palette colour."}),
            },
            "optional": {
                "image": ("IMAGE", {"tooltip": "Images to summarise (e.g. one epoch's samples)."}),
                "folder": ("STRING", {"default": "", "tooltip": "Folder inside ComfyUI's input directory "
                                                                 "(e.g. the training set); empty = none."}),
            },
        }

    def run(self, colors=16, cluster_threshold=CLUSTER_THRESHOLD, image=None, folder=""):
        """Summaries of ``folder`` (relative to ComfyUI's input directory; paths outside it are refused) and of
        the ``image`` batch (IMAGE ``[B, H, W, 3]`` float 0..1). Returns ``(JSON list, text table)``. Raises
        ValueError when neither is given, FileNotFoundError / ValueError for a bad folder."""
        from ..metrics.palette_summary import summarize, summarize_folder, summary_table
        from . import comfy_io

        sums = []
        if folder and folder.strip():
            root = comfy_io.resolve_input(folder.strip())
            prog = Progress(1)
            sums.append(summarize_folder(root, int(colors), float(cluster_threshold)))
            sums[-1]["name"] = folder.strip()
            prog.update()
        if image is not None:
            imgs = image_to_numpy(image)
            prog = Progress(len(imgs))
            reps, nats = [], []
            for rgb in imgs:
                rep = palette_report(rgb, cluster_threshold=float(cluster_threshold), return_arrays=True)
                arr = rep.pop("_arrays")
                reps.append(rep)
                nats.append(arr["native"])
                prog.update()
            _warn(reps)
            sums.append(summarize(reps, nats, int(colors), float(cluster_threshold), "image batch"))
        if not sums:
            raise ValueError("give an image batch and/or a folder to summarise")
        return (json.dumps(sums, indent=2), summary_table(sums))


NODE_CLASS_MAPPINGS = {
    "ConceptLabPaletteMetrics": ConceptLabPaletteMetrics,
    "ConceptLabGridSnap": ConceptLabGridSnap,
    "ConceptLabPaletteExtract": ConceptLabPaletteExtract,
    "ConceptLabPaletteQuantize": ConceptLabPaletteQuantize,
    "ConceptLabPaletteSummary": ConceptLabPaletteSummary,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ConceptLabPaletteMetrics": "Palette Metrics",
    "ConceptLabGridSnap": "Grid Snap",
    "ConceptLabPaletteExtract": "Palette Extract",
    "ConceptLabPaletteQuantize": "Palette Quantize",
    "ConceptLabPaletteSummary": "Palette Summary",
}
