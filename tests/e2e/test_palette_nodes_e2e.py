"""Real-ComfyUI tier for the palette nodes (issue 13): every palette node runs inside a real ComfyUI server
(``COMFYUI_PATH``) on generated renders with known truth — a nearest-neighbour render, a bilinear (soft) upscale,
an RGBA render whose alpha LoadImage turns into a MASK, and a flat image without a grid — through LoadImage,
as a user's workflow does. No checkpoint is needed.

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python -m pytest tests/e2e/test_palette_nodes_e2e.py
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from e2e.fixtures import comfy_server  # noqa: F401  (pytest fixture)

pytestmark = pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="real-ComfyUI tier: set COMFYUI_PATH")


@pytest.fixture(scope="module")
def renders(comfy_server):  # noqa: F811
    """Writes the renders into the server's input folder; returns ``{name: GridRender | None}``."""
    from conceptlab.metrics.palette_synth import condition_render

    out = {}
    for name, cond, seed in (("nn.png", "clean", 11), ("soft.png", "bilinear", 12), ("alpha.png", "transparent", 13)):
        r = condition_render(cond, seed, (), art="blob", size=(384, 384))
        Image.fromarray(r.image).save(comfy_server.input_dir / name)
        out[name] = r
    Image.fromarray(np.full((96, 128, 3), 90, np.uint8)).save(comfy_server.input_dir / "flat.png")
    out["flat.png"] = None
    return out


def _ui_text(entry: dict, node: str) -> str:
    """The text a node sent to the UI (``{"ui": {"text": [...]}}``) or its STRING output via a preview."""
    ui = entry.get("outputs", {}).get(node, {})
    return "".join(ui.get("text", []))


def _metrics_prompt(image: str) -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "ConceptLabPaletteMetrics",
              "inputs": {"image": ["1", 0], "tolerance": 5.0, "cells": 0, "mask": ["1", 1]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 1], "filename_prefix": "pal_annot"}},
        "4": {"class_type": "ConceptLabGridSnap", "inputs": {"image": ["1", 0], "cells": 0}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "pal_native"}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["4", 1], "filename_prefix": "pal_clean"}},
        "7": {"class_type": "ConceptLabPaletteExtract",
              "inputs": {"image": ["1", 0], "k": 6, "method": "kmeans", "seed": 0, "snap_grid": True}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "pal_swatch"}},
        "9": {"class_type": "ConceptLabPaletteQuantize", "inputs": {"image": ["1", 0], "k": 8}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "pal_quant"}},
    }


@pytest.mark.parametrize("name", ["nn.png", "soft.png", "alpha.png", "flat.png"])
def test_palette_nodes_in_real_comfyui(comfy_server, renders, name):  # noqa: F811
    """Each render runs through Metrics (with LoadImage's MASK), GridSnap, Extract and Quantize in a real server;
    the native image GridSnap saves has the truth's cell count where the grid is found, and the flat image runs
    to the end with its no-grid status (passed through, never a 1-px grid)."""
    entry = comfy_server.run(_metrics_prompt(name), timeout=600)
    files = {f.name.split("_0")[0]: f for f in comfy_server.output_files(entry, "images")}
    for prefix in ("pal_annot", "pal_native", "pal_clean", "pal_swatch", "pal_quant"):
        assert any(k.startswith(prefix) for k in files), (prefix, list(files))
    native = next(f for k, f in files.items() if k.startswith("pal_native"))
    with Image.open(native) as im:
        nw, nh = im.size
    r = renders[name]
    if r is None:  # no grid: GridSnap passes the image through unchanged
        assert (nw, nh) == (128, 96)
    else:
        assert (nh, nw) == r.native.shape[:2], ((nh, nw), r.native.shape)
    clean = next(f for k, f in files.items() if k.startswith("pal_clean"))
    with Image.open(clean) as im:
        assert im.size == (Image.open(comfy_server.input_dir / name).size)


def test_palette_summary_node_reads_input_folder(comfy_server, renders):  # noqa: F811
    """PaletteSummary over a folder inside ComfyUI's input directory (the path policy of the pack)."""
    sub = comfy_server.input_dir / "pal_set"
    sub.mkdir(exist_ok=True)
    for n in ("nn.png", "soft.png"):
        (sub / n).write_bytes((comfy_server.input_dir / n).read_bytes())
    prompt = {"1": {"class_type": "ConceptLabPaletteSummary",
                    "inputs": {"colors": 8, "cluster_threshold": 5.0, "folder": "pal_set"}},
              "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
    entry = comfy_server.run(prompt, timeout=600)
    text = json.dumps(entry.get("outputs", {}))
    assert "nn.png" in text or "images" in text, text[:500]
