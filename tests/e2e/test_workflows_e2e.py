"""The shipped example workflows against a real ComfyUI server (``--cpu``, 127.0.0.1, this pack in custom_nodes).

Run (about 10-20 min on a loaded 2-core CPU; the first run also builds the random 2.1 GB SD1.5 checkpoint, ~3 min):

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python -m pytest tests/e2e -v -s

Each API twin is queued as shipped, with only sizes / steps / iterations / batch shrunk (:data:`TINY`,
:func:`shrink`): the model is a full-size random SD1.5 on CPU, so every loop is cut to a handful of UNet calls
(64 px, batch 1, 2 epochs of 2 steps on a 2-image copy of the sample dataset, 1 sampling step, 2 ESD iterations,
a 2-ratio x 1-seed sweep). The model files it names are the random checkpoint linked under the shipped names,
and the sample dataset is copied into the server's input folder as the README says. Workflows run in the order
that feeds later ones (the LoRA and merged checkpoint are what weight_diff compares). Also checked: the muted
"reuse the best epoch" group loads with zero "lora key not loaded" lines; /interrupt during training leaves
complete checkpoints that the next run resumes from; bad prompts get ComfyUI's typed validation errors;
``comfy run --workflow <UI file>`` (comfy-cli) runs a UI-format example.
"""

from __future__ import annotations

import copy
import json
import os
import re
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
import workflow_api as wa

pytestmark = pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="real-ComfyUI tier: set COMFYUI_PATH")

REPO = Path(__file__).resolve().parents[2]
SD15 = "v1-5-pruned-emaonly.safetensors"
PX = 64

#: the tiny training folder the e2e run trains on (2 sample images, 1 repeat: 2 steps per epoch at batch 1)
TINY_DATASET = "pixel_art_tiny"
TINY_IMAGES = 2
ONE_PROMPT = ("pixel art, dawnlike, knight, black outline (#140c1c), red body (#d34549), background (#6dc2ca), "
              "retro pixel art style")

#: per node type: the inputs the e2e run shrinks (everything else stays as shipped). The full-size random SD1.5
#: model on a 2-core CPU takes seconds per UNet call even at 64 px, so every loop is cut to a handful of calls.
TINY = {
    "ConceptLabCaptionAudit": {"folder": TINY_DATASET},
    "ConceptLabLoraDataset": {"folder": TINY_DATASET, "resolution": PX, "min_bucket_reso": PX,
                              "max_bucket_reso": PX},
    "ConceptLabTrainLora": {"max_train_epochs": 2, "train_batch_size": 1, "gradient_accumulation_steps": 1,
                            "network_dim": 4, "network_alpha": 4.0, "sample_steps": 1, "mixed_precision": "no",
                            "sample_prompts": ONE_PROMPT},
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
    tiny = comfy_server.input_dir / TINY_DATASET / "1_dawnlike"  # same kohya layout, 2 images, 1 repeat
    if not tiny.exists():
        tiny.mkdir(parents=True)
        for png in sorted((dest / "10_dawnlike").glob("*.png"))[:TINY_IMAGES]:
            shutil.copy2(png, tiny / png.name)
            shutil.copy2(png.with_suffix(".txt"), tiny / png.with_suffix(".txt").name)
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
    log_start = len(server.log.read_text(errors="replace"))
    entry, secs = _timed_run(server, shrink(twin("pixel_art_lora")))
    print(f"pixel_art_lora: {secs:.1f}s")
    files = _assert_images(server, entry, 4)  # epoch table, loss curve, samples, final samples (+ audit preview)
    assert any("pixel_art_epochs" in f.name for f in files) and any(f.name.startswith("pixel_art_") for f in files)
    loras = sorted((server.output_dir / "loras").glob("pixel_art*.safetensors"))
    names = [p.name for p in loras]
    assert {"pixel_art-000001.safetensors", "pixel_art.safetensors", "pixel_art-best.safetensors"} <= set(names), \
        names
    for p in loras:
        _check_lora_file(p)
    stage1_log = server.log.read_text(errors="replace")[log_start:]
    assert "lora key not loaded" not in stage1_log, stage1_log[-3000:]  # the trainer applies the file too
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
    t = time.time()
    entry2 = server.run(shrink(stage2), timeout=600)
    print(f"pixel_art_lora stage 2 (Load LoRA, best epoch): {time.time() - t:.1f}s")
    _assert_images(server, entry2, 1)
    log = server.log.read_text(errors="replace")[log_before:]
    assert "lora key not loaded" not in log, log[-3000:]


def _train_only(prompt: dict) -> dict:
    """The training branch of the pixel_art_lora prompt: checkpoint, dataset, trainer and its SaveImage nodes."""
    train_id = next(k for k, v in prompt.items() if v["class_type"] == "ConceptLabTrainLora")
    return {k: v for k, v in prompt.items() if k == train_id or v["class_type"] in (
        "CheckpointLoaderSimple", "ConceptLabLoraDataset") or (
        v["class_type"] == "SaveImage" and v["inputs"].get("images", [None])[0] == train_id)}


def _check_lora_file(path: Path) -> dict:
    """Open a saved LoRA completely: kohya UNet keys, every tensor finite; returns its metadata."""
    import torch
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        assert any(k.startswith("lora_unet_") for k in keys), (path.name, keys[:5])
        for k in keys:
            assert torch.isfinite(f.get_tensor(k).float()).all(), (path.name, k)
        return f.metadata() or {}


def test_interrupt_keeps_last_checkpoint_valid(server):
    name = "pixel_art_cancel"
    prompt = _train_only(shrink(twin("pixel_art_lora"), ConceptLabTrainLora={
        "max_train_epochs": 30, "output_name": name, "sample_prompts": ""}))
    loras = server.output_dir / "loras"
    t0 = time.time()
    pid = server.queue(prompt)
    first = loras / f"{name}-000001.safetensors"
    deadline = time.time() + 900
    while not first.exists() and time.time() < deadline:
        time.sleep(0.5)
    assert first.exists(), server.tail()
    time.sleep(1.0)  # be inside epoch 2
    t = time.time()
    server.post("/interrupt", {})
    with pytest.raises(Exception) as err:  # the helper raises on execution_interrupted / error
        server.wait(pid, timeout=600)
    print(f"interrupt: first checkpoint after {t - t0:.1f}s, honoured after {time.time() - t:.1f}s: "
          f"{str(err.value)[:160]}")
    hist = server.get(f"/history/{pid}")[pid]
    msgs = {m[0] for m in hist["status"]["messages"]}
    assert "execution_interrupted" in msgs, (msgs, str(err.value)[:2000])
    assert not (loras / f"{name}.safetensors").exists(), "an interrupted run must not write the final file"
    saved = sorted(loras.glob(f"{name}-0*.safetensors"))
    assert saved
    for p in saved:  # every file left is complete and finite
        _check_lora_file(p)
    assert not [p for p in loras.iterdir() if p.name.startswith(name) and not p.name.endswith(".safetensors")], \
        "temporary file left behind"
    last_epoch = max(int(p.stem.rsplit("-", 1)[1]) for p in saved)
    # the next run resumes from the last saved state and finishes one epoch later
    log_before = len(server.log.read_text(errors="replace"))
    resume = _train_only(shrink(twin("pixel_art_lora"), ConceptLabTrainLora={
        "max_train_epochs": last_epoch + 1, "output_name": name, "sample_prompts": "", "resume": True}))
    _, secs = _timed_run(server, resume, timeout=900)
    print(f"resume from epoch {last_epoch}: {secs:.1f}s")
    log = server.log.read_text(errors="replace")[log_before:]
    assert "resumed from" in log, log[-3000:]
    meta = _check_lora_file(loras / f"{name}.safetensors")
    assert meta.get("ss_epoch") == str(last_epoch + 1), meta.get("ss_epoch")


def test_palette_audit(server):
    entry, secs = _timed_run(server, shrink(twin("palette_audit")))
    print(f"palette_audit: {secs:.1f}s")
    files = _assert_images(server, entry, 1)
    assert any("palette_clean" in f.name for f in server.output_files(entry, "images")), files


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
    """A bad value / a missing input is refused with ComfyUI's typed errors and nothing runs.

    ComfyUI queues a prompt whose OTHER outputs are still valid (HTTP 200 with ``node_errors``: only the good
    outputs run), so the prompt sent is the merge branch alone, where every output depends on the bad node.
    """
    full = shrink(twin("merge_back_sweep"))
    merge_id = next(k for k, v in full.items() if v["class_type"] == "ConceptLabMergeModels")
    api = {}
    for k, v in full.items():  # every output node fed by the merge, with its ancestors
        if any(isinstance(x, list) and x[0] == merge_id for x in v["inputs"].values()):
            api.update(ancestors(full, k))
    queue_before = server.get("/queue")
    cases = {"value_not_in_list": lambda n: n["inputs"].__setitem__("method", "no_such_method"),
             "required_input_missing": lambda n: n["inputs"].pop("model_b")}
    for expected, spoil in cases.items():
        bad = copy.deepcopy(api)
        spoil(bad[merge_id])
        code, body = post_raw(server, {"prompt": bad})
        assert code == 400, body
        assert body["error"]["type"] == "prompt_outputs_failed_validation", body
        errors = body["node_errors"][merge_id]["errors"]
        assert expected in {e["type"] for e in errors}, body
        print(f"{expected}: {errors[0]['message']}: {errors[0]['details']}")
    assert server.get("/queue") == queue_before, "a refused prompt must not be queued"


def test_comfy_cli_runs_ui_workflow(server):
    """``comfy run --workflow <UI file>`` (comfy-cli converts the UI file with the server's /object_info and queues
    it) against the same server, on the shipped palette_audit.json as is (it needs only input/example.png)."""
    comfy = Path(sys.executable).with_name("comfy")
    if not comfy.exists():
        pytest.skip("comfy-cli not installed beside this python")
    wf = REPO / "example_workflows" / "palette_audit.json"
    out = server.output_dir / "conceptlab"
    before = set(out.glob("palette_clean*")) if out.is_dir() else set()
    cmd = [str(comfy), "--skip-prompt", "--no-enable-telemetry", "run", "--workflow", str(wf),
           "--host", "127.0.0.1", "--port", str(server.port), "--wait", "--timeout", "900"]
    t = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1000, check=False)
    print(f"comfy run ({' '.join(cmd[1:])}): {time.time() - t:.1f}s rc={proc.returncode}\n{proc.stdout[-800:]}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    after = set(out.glob("palette_clean*"))
    # ComfyUI caches an identical earlier prompt (test_palette_audit queues the same graph), so a new file is only
    # written when nothing was cached; either way comfy-cli must report the SaveImage output, and it must exist.
    reported = re.findall(r"filename=(palette_clean[^&\"]*)&subfolder=conceptlab&type=output", proc.stdout)
    assert reported or (after - before), "comfy run finished but reported no palette_clean output:\n" + proc.stdout
    assert all((out / name).is_file() for name in reported), (reported, sorted(after))
