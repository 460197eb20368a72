"""Each example workflow in ComfyUI's real graph editor (headless Chromium driven by playwright-core).

Needs COMFYUI_PATH, Chromium (``apt-get install chromium``; path in ``CHROMIUM`` or /usr/bin/chromium), Node.js
and ``npm install`` run once in tests/browser/ (playwright-core). Run:

    (cd tests/browser && npm install) && \\
    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python -m pytest tests/browser -v

Asserts for every workflow: no unknown node type, no dialog left open (the missing-nodes warning), no console or
page error while loading and converting, no node flagged with errors, and that the prompt the real frontend
builds (``app.graphToPrompt()``) equals our API twin. Screenshots go to ``out/browser/`` (or
``$CONCEPTLAB_BROWSER_OUT``); with ``CONCEPTLAB_WRITE_THUMBNAILS=1`` they also become
``example_workflows/<name>.jpg``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tests" / "tools"))
import workflow_api as wa

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
NODE = shutil.which("node")
PLAYWRIGHT = HERE / "node_modules" / "playwright-core"

pytestmark = [
    pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="real-ComfyUI tier: set COMFYUI_PATH"),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM} (set CHROMIUM)"),
    pytest.mark.skipif(NODE is None, reason="Node.js not found"),
    pytest.mark.skipif(not PLAYWRIGHT.is_dir(), reason="run `npm install` in tests/browser first"),
]

from e2e.fixtures import comfy_server  # noqa: F401  (pytest fixture)


def to_thumbnail(png: Path, jpg: Path) -> None:
    """Crop the screenshot to the graph itself (no side bar, top menu, canvas stats or zoom toolbar, no empty
    canvas around the graph) and save a JPEG of at most 960×600."""
    import numpy as np
    from PIL import Image

    with Image.open(png) as im:
        w, h = im.size
        canvas = im.convert("RGB").crop((64, 80, w, h - 80))
        arr = np.asarray(canvas).astype(np.int16)
        bg = np.median(arr[:8].reshape(-1, 3), axis=0)
        ys, xs = np.nonzero(np.abs(arr - bg).max(axis=2) > 16)
        if len(xs):
            pad = 16
            canvas = canvas.crop((max(int(xs.min()) - pad, 0), max(int(ys.min()) - pad, 0),
                                  min(int(xs.max()) + pad, canvas.width), min(int(ys.max()) + pad, canvas.height)))
        canvas.thumbnail((960, 600))
        tmp = jpg.with_suffix(".tmp.jpg")
        canvas.save(tmp, "JPEG", quality=88)
        tmp.replace(jpg)


@pytest.fixture(scope="module")
def browser_results(comfy_server):  # noqa: F811
    # the sample inputs in ComfyUI's input folder, as the README says (LoadImage previews input/example.png)
    if not (comfy_server.input_dir / "pixel_art").exists():
        shutil.copytree(REPO / "sample_data" / "pixel_art", comfy_server.input_dir / "pixel_art")
    shutil.copy2(REPO / "sample_data" / "example.png", comfy_server.input_dir / "example.png")
    out = Path(os.environ.get("CONCEPTLAB_BROWSER_OUT") or REPO / "out" / "browser")
    out.mkdir(parents=True, exist_ok=True)
    files = [str(p) for p in wa.example_files()]
    t = time.time()
    proc = subprocess.run([NODE, str(HERE / "load_workflows.mjs"), "--url", comfy_server.url, "--out", str(out),
                           "--chromium", CHROMIUM, *files], capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    results["wall_s"] = time.time() - t
    print(f"browser: {results['wall_s']:.1f}s, startup {results['startup_ms'] / 1000:.1f}s, frontend "
          f"{results.get('frontend_version')}; per workflow: "
          + ", ".join(f"{w['name']} {w['ms'] / 1000:.1f}s" for w in results["workflows"]))
    results["object_info"] = comfy_server.object_info()
    if os.environ.get("CONCEPTLAB_WRITE_THUMBNAILS") == "1":
        for w in results["workflows"]:
            if not (w["missing"] or w["dialogs"] or w["errors"]):
                to_thumbnail(Path(w["screenshot"]), REPO / "example_workflows" / f"{w['name']}.jpg")
    return results


@pytest.mark.parametrize("name", [p.stem for p in wa.example_files()])
def test_workflow_loads_in_graph_editor(browser_results, name):
    w = next(x for x in browser_results["workflows"] if x["name"] == name)
    assert w["missing"] == [], f"unknown node types: {w['missing']}"
    assert w["dialogs"] == [], f"dialog left open: {w['dialogs']}"
    assert w["errors"] == [], f"console/page errors: {w['errors']}"
    assert w["nodes_with_errors"] == [], w["nodes_with_errors"]
    assert Path(w["screenshot"]).stat().st_size > 10_000
    browser_api = json.loads(Path(w["api"]).read_text())
    ours = json.loads(wa.api_path(REPO / "example_workflows" / f"{name}.json").read_text())
    assert browser_api == ours, "the real frontend's graphToPrompt differs from the API twin"
    assert list(browser_api) == list(ours)  # same node order (JS integer-key order)
