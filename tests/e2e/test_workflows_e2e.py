"""The shipped example workflows against a real ComfyUI server (``--cpu``, 127.0.0.1, this pack in custom_nodes).

Run (about 10-15 min on 2 CPU cores, first run + ~3 min to build the random 2.1 GB SD1.5 checkpoint):

    cd /work/main && COMFYUI_PATH=/work/ComfyUI /work/comfyenv/bin/python -m pytest tests/e2e/test_workflows_e2e.py -v

Each API twin is queued as shipped, with only sizes / steps / iterations shrunk (:func:`shrink`); the model files
it names are the random checkpoint linked under the shipped names, and the sample dataset is copied into the
server's input folder as the README says. Workflows run in the order that feeds later ones (the LoRA and merged
checkpoint are what weight_diff compares).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from e2e.fixtures import comfy_server, sd15_checkpoint  # noqa: F401  (pytest fixtures)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import workflow_api as wa  # noqa: E402

pytestmark = pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="real-ComfyUI tier: set COMFYUI_PATH")

REPO = Path(__file__).resolve().parents[2]
SD15 = "v1-5-pruned-emaonly.safetensors"
PX = 64

#: per node type: the inputs the e2e run shrinks (everything else stays as shipped)
TINY = {
    "ConceptLabLoraDataset": {"resolution": PX, "min_bucket_reso": PX, "max_bucket_reso": PX},
    "ConceptLabTrainLora": {"max_train_epochs": 2, "train_batch_size": 60, "network_dim": 4, "network_alpha": 4.0,
                            "sample_steps": 1, "mixed_precision": "no"},
    "EmptyLatentImage": {"width": PX, "height": PX, "batch_size": 1},
    "KSampler": {"steps": 1},
    "ConceptLabGridMasks": {"width": PX, "height": PX},
    "ConceptLabESDErase": {"iterations": 2, "resolution": PX, "ddim_steps": 2, "variations": 2},
    "ConceptLabErasureCompare": {"steps": 1, "width": PX, "height": PX,
                                 "concept_prompts": "a painting by Van Gogh", "unrelated_prompts": "a cat"},
    "ConceptLabMergeSweep": {"ratios": "0, 1", "rows": 1, "steps": 1, "width": PX, "height": PX},
    "ConceptLabDiffModels": {"top_n": 5},
    "ConceptLabDiffFiles": {"top_n": 5},
}


def shrink(api: dict, **extra) -> dict:
    """A copy of an API prompt with :data:`TINY` (and ``extra`` = {class_type: {input: value}}) applied."""
    out = copy.deepcopy(api)
    for node in out.values():
        for table in (TINY, extra):
            for k, v in table.get(node["class_type"], {}).items():
                if k in node["inputs"] and not isinstance(node["inputs"][k], list):
                    node["inputs"][k] = v
    return out


def twin(name: str) -> dict:
    return json.loads((REPO / "example_workflows" / "api" / f"{name}.json").read_text(encoding="utf-8"))


def ancestors(api: dict, node_id: str) -> dict:
    """``node_id`` and every node it depends on (the frontend's partial execution, ``recursiveAddNodes``)."""
    out, todo = {}, [node_id]
    while todo:
        k = todo.pop()
        if k in out:
            continue
        out[k] = api[k]
        todo.extend(v[0] for v in api[k]["inputs"].values() if isinstance(v, list))
    return out


def post_raw(server, payload: dict) -> tuple[int, dict]:
    req = urllib.request.Request(server.url + "/prompt", data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(comfy_server, sd15_checkpoint):  # noqa: F811
    """The session server with the sample data in input/ and the random checkpoint under the shipped names."""
    src = comfy_server.checkpoints / sd15_checkpoint
    for name in (SD15, "pixel_art_finetune.safetensors"):
        comfy_server.add_model("checkpoints", src, name=name)
    dest = comfy_server.input_dir / "pixel_art"
    if not dest.exists():
        shutil.copytree(REPO / "sample_data" / "pixel_art", dest)
    shutil.copy2(REPO / "sample_data" / "example.png", comfy_server.input_dir / "example.png")
    return comfy_server


def _timed_run(server, prompt: dict, timeout: float = 1500) -> tuple[dict, float]:
    t = time.time()
    entry = server.run(prompt, timeout=timeout)
    return entry, time.time() - t


def _assert_images(server, entry: dict, min_count: int = 1):
    files = server.output_files(entry, "images")
    assert len(files) >= min_count, f"expected images, got {entry.get('outputs')}"
    for f in files:
        assert f.is_file() and f.stat().st_size > 0, f
    return files


def test_pack_imports_and_nodes_listed(server):
    assert server.import_failures() == [], server.import_failures()
    info = server.object_info()
    from conceptlab.nodes import NODE_CLASS_MAPPINGS

    missing = [n for n in NODE_CLASS_MAPPINGS if n not in info]
    assert not missing, f"not in /object_info: {missing}"


def test_workflow_templates_listed(server):
    templates = server.get("/workflow_templates")
    names = {Path(p).stem for v in templates.values() for p in v}
    expected = {p.stem for p in wa.example_files()}
    assert expected <= names, f"missing from /workflow_templates: {expected - names} (got {templates})"


def test_api_twins_match_live_definitions(server):
    """The twins equal the UI files converted with the LIVE /object_info (not only the pinned one)."""
    info = server.object_info()
    for ui in wa.example_files():
        wf = json.loads(ui.read_text(encoding="utf-8"))
        assert wa.ui_to_api(wf, info) == json.loads(wa.api_path(ui).read_text(encoding="utf-8")), ui.name


def test_pixel_art_lora_main_job(server):
    entry, secs = _timed_run(server, shrink(twin("pixel_art_lora")))
    print(f"pixel_art_lora: {secs:.1f}s")
    files = _assert_images(server, entry, 4)  # epoch table, loss curve, samples, final samples (+ audit preview)
    assert any("pixel_art_epochs" in f.name for f in files) and any(f.name.startswith("pixel_art_") for f in files)
    loras = sorted((server.output_dir / "loras").glob("pixel_art*.safetensors"))
    names = [p.name for p in loras]
    assert "pixel_art-000001.safetensors" in names and "pixel_art.safetensors" in names, names
    # stage 2: the muted "reuse" group, unmuted, loads the best epoch with LoraLoader
    ui = json.loads((REPO / "example_workflows" / "pixel_art_lora.json").read_text(encoding="utf-8"))
    for n in ui["nodes"]:
        n["mode"] = 0
    lora_name = next(n for n in ui["nodes"] if n["type"] == "LoraLoader")["widgets_values"][0]
    listed = server.object_info()["LoraLoader"]["input"]["required"]["lora_name"][0]
    if lora_name not in listed:  # output/loras is not a LoRA folder of ComfyUI unless registered
        pytest.fail(f"{lora_name} written to output/loras is not in LoraLoader's list {listed[:10]}")
    api = wa.ui_to_api(ui, server.object_info())
    target = next(k for k, v in api.items() if v["_meta"]["title"] == "Samples with Load LoRA")
    stage2 = ancestors(api, target)  # what the frontend queues for "run this output only"
    assert "ConceptLabTrainLora" not in {v["class_type"] for v in stage2.values()}
    log_before = len(server.log.read_text(errors="replace"))
    entry2 = server.run(shrink(stage2), timeout=600)
    _assert_images(server, entry2, 1)
    log = server.log.read_text(errors="replace")[log_before:]
    assert "lora key not loaded" not in log, log[-3000:]


def test_interrupt_keeps_last_checkpoint_valid(server):
    from safetensors import safe_open
    import torch

    prompt = shrink(twin("pixel_art_lora"), ConceptLabTrainLora={
        "max_train_epochs": 20, "train_batch_size": 30, "output_name": "pixel_art_cancel", "sample_prompts": ""})
    # only the training branch
    train_id = next(k for k, v in prompt.items() if v["class_type"] == "ConceptLabTrainLora")
    prompt = {k: v for k, v in prompt.items() if k == train_id or v["class_type"] in (
        "CheckpointLoaderSimple", "ConceptLabLoraDataset") or (
        v["class_type"] == "SaveImage" and v["inputs"].get("images", [None])[0] == train_id)}
    pid = server.queue(prompt)
    first = server.output_dir / "loras" / "pixel_art_cancel-000001.safetensors"
    deadline = time.time() + 900
    while not first.exists() and time.time() < deadline:
        time.sleep(0.5)
    assert first.exists(), server.tail()
    t = time.time()
    server.post("/interrupt", {})
    with pytest.raises(Exception) as err:  # the helper raises on execution_interrupted / error
        server.wait(pid, timeout=600)
    print(f"interrupt honoured after {time.time() - t:.1f}s: {str(err.value)[:200]}")
    hist = server.get(f"/history/{pid}")[pid]
    msgs = {m[0] for m in hist["status"]["messages"]}
    assert "execution_interrupted" in msgs or hist["status"]["status_str"] == "error", msgs
    saved = sorted((server.output_dir / "loras").glob("pixel_art_cancel*.safetensors"))
    assert saved
    for p in saved:  # every file left is complete and finite
        with safe_open(str(p), "pt") as f:
            keys = list(f.keys())
            assert any(k.startswith("lora_unet_") for k in keys)
            for k in keys:
                assert torch.isfinite(f.get_tensor(k).float()).all(), (p.name, k)
    assert not list((server.output_dir / "loras").glob("*.tmp*")), "temporary file left behind"


def test_esd_grid_erasure(server):
    entry, secs = _timed_run(server, shrink(twin("esd_grid_erasure")))
    print(f"esd_grid_erasure: {secs:.1f}s")
    files = _assert_images(server, entry, 4)
    assert any("esd_compare" in f.name for f in files) and any("esd_diff" in f.name for f in files)
    assert list((server.output_dir / "loras" / "esd").glob("van_gogh*.safetensors"))


def test_merge_back_sweep(server):
    entry, secs = _timed_run(server, shrink(twin("merge_back_sweep")))
    print(f"merge_back_sweep: {secs:.1f}s")
    _assert_images(server, entry, 1)
    merged = sorted((server.output_dir / "checkpoints").glob("merged*.safetensors"))
    assert merged, list(server.output_dir.rglob("*"))


def test_weight_diff(server):
    loras = sorted((server.output_dir / "loras").glob("pixel_art-*.safetensors"))
    merged = sorted((server.output_dir / "checkpoints").glob("merged*.safetensors"))
    if not loras or not merged:
        pytest.skip("needs the outputs of test_pixel_art_lora_main_job and test_merge_back_sweep")
    server.add_model("loras", loras[-1], name="pixel_art.safetensors")
    server.add_model("checkpoints", merged[-1], name="merged.safetensors")
    entry, secs = _timed_run(server, shrink(twin("weight_diff")))
    print(f"weight_diff: {secs:.1f}s")
    files = _assert_images(server, entry, 3)
    assert any("diff_compare" in f.name for f in files)


def test_bad_prompts_get_typed_validation_errors(server):
    api = shrink(twin("merge_back_sweep"))
    bad = copy.deepcopy(api)
    merge_id = next(k for k, v in bad.items() if v["class_type"] == "ConceptLabMergeModels")
    bad[merge_id]["inputs"]["method"] = "no_such_method"
    code, body = post_raw(server, {"prompt": bad})
    assert code == 400, body
    types = {e["type"] for n in body["node_errors"].values() for e in n["errors"]}
    assert "value_not_in_list" in types, body
    missing = copy.deepcopy(api)
    del missing[merge_id]["inputs"]["model_b"]
    code, body = post_raw(server, {"prompt": missing})
    assert code == 400, body
    types = {e["type"] for n in body["node_errors"].values() for e in n["errors"]}
    assert "required_input_missing" in types, body


def test_comfy_cli_runs_ui_workflow(server, tmp_path):
    """``comfy run --workflow <UI file>`` (comfy-cli) against the same server: weight_diff is the smallest."""
    comfy = Path(sys.executable).with_name("comfy")
    if not comfy.exists():
        pytest.skip("comfy-cli not installed beside this python")
    if not (server.base / "models" / "loras" / "pixel_art.safetensors").exists():
        pytest.skip("needs test_weight_diff's models")
    ui = json.loads((REPO / "example_workflows" / "weight_diff.json").read_text(encoding="utf-8"))
    for n in ui["nodes"]:  # shrink top_n the same way, in the UI file's widgets
        if n["type"] == "ConceptLabDiffFiles":
            n["widgets_values"][4] = 5
    wf = tmp_path / "weight_diff.json"
    wf.write_text(json.dumps(ui))
    before = set((server.output_dir / "conceptlab").glob("diff_compare*"))
    t = time.time()
    proc = subprocess.run([str(comfy), "--skip-prompt", "--no-enable-telemetry", "run", "--workflow", str(wf),
                           "--host", "127.0.0.1", "--port", str(server.port), "--wait", "--timeout", "900"],
                          capture_output=True, text=True, timeout=1000)
    print(f"comfy run: {time.time() - t:.1f}s rc={proc.returncode}\n{proc.stdout[-1500:]}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    after = set((server.output_dir / "conceptlab").glob("diff_compare*"))
    assert after - before, "comfy run finished but no new comparison plot was written"
