"""Issue 18, real-ComfyUI tier: a hostile ``/prompt`` client against a running server with this pack.

Every case must end in HTTP 400 (validation: ``VALIDATE_INPUTS``) or a clean execution error; afterwards the server
is alive, no file outside ComfyUI's folders changed (a canary folder, compared by listing, size and mtime), and no
byte of the canary's secret came back in any output. Also: ``/interrupt`` stops a 10,000-file dataset scan within
seconds. No model is needed: the checkpoint the graphs name is a tiny placeholder that only satisfies the combo
list, because every case is refused before a model would load.

Run: ``COMFYUI_PATH=/path/to/ComfyUI <comfy venv>/bin/python -m pytest tests/security -k e2e -v -s``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from e2e.fixtures import comfy_server  # noqa: F401  (pytest fixture)

from .conftest import make_kohya_folder, snapshot, write_png
from .test_paths import HOSTILE_NAMES, TOML_CASES

pytestmark = pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="real-ComfyUI tier: set COMFYUI_PATH")

SECRET = "CANARY-SECRET-7f3a"
BIG_FOLDER_FILES = 10_000

#: inputs fed by helper nodes, by type
LINKS = {"MODEL": ["ckpt", 0], "CLIP": ["ckpt", 1], "VAE": ["ckpt", 2], "IMAGE": ["img", 0], "MASK": ["img", 1],
         "CONCEPTLAB_DATASET": ["ds", 0], "CONDITIONING": ["cond", 0]}


def _post(server, payload: dict) -> tuple[int, dict]:
    body = json.dumps(payload).encode()  # NaN / Infinity are written as the JSON extensions Python accepts
    req = urllib.request.Request(server.url + "/prompt", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _defaults(info: dict, class_type: str) -> dict:
    spec = info[class_type]["input"]
    out = {}
    for name, entry in spec.get("required", {}).items():
        typ, opts = entry[0], (entry[1] if len(entry) > 1 else {})
        if isinstance(typ, list):
            out[name] = typ[0] if typ else ""
        elif typ == "COMBO":
            out[name] = (opts.get("options") or [""])[0]
        elif typ in LINKS:
            out[name] = LINKS[typ]
        elif typ in ("INT", "FLOAT", "BOOLEAN", "STRING"):
            out[name] = opts.get("default", {"INT": 0, "FLOAT": 0.0, "BOOLEAN": False, "STRING": ""}[typ])
    return out


def _graph(info: dict, class_type: str, overrides: dict) -> dict:
    """``class_type`` with defaults + ``overrides``, its typed inputs fed by helper nodes, its first output shown
    by PreviewAny (an output node, so ComfyUI validates and runs the graph)."""
    g = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "placeholder.safetensors"}},
        "img": {"class_type": "LoadImage", "inputs": {"image": "img.png"}},
        "cond": {"class_type": "CLIPTextEncode", "inputs": {"text": "x", "clip": ["ckpt", 1]}},
        "ds": {"class_type": "ConceptLabLoraDataset",
               "inputs": {**_defaults(info, "ConceptLabLoraDataset"), "folder": "ds"}},
    }
    g["t"] = {"class_type": class_type, "inputs": {**_defaults(info, class_type), **overrides}}
    if info[class_type].get("output"):
        g["out"] = {"class_type": "PreviewAny", "inputs": {"source": ["t", 0]}}
    return g


def _assert_400(server, info, class_type, overrides, needle):
    code, res = _post(server, {"prompt": _graph(info, class_type, overrides), "client_id": server.client_id})
    assert code == 400, (class_type, overrides, code, str(res)[:500])
    errs = res.get("node_errors", {}).get("t", {}).get("errors", [])
    text = json.dumps(errs)
    # ours (VALIDATE_INPUTS: FLOAT/STRING/path inputs) or ComfyUI's own typed checks (INT bounds, combos)
    assert {e.get("type") for e in errs} & {"custom_validation_failed", "value_bigger_than_max",
                                             "value_smaller_than_min", "value_not_in_list"}, (class_type, text[:800])
    assert needle in text, (needle, text[:800])


def _assert_exec_error(server, info, class_type, overrides, needle, timeout=300):
    code, res = _post(server, {"prompt": _graph(info, class_type, overrides), "client_id": server.client_id})
    assert code == 200, (code, str(res)[:800])
    pid = res["prompt_id"]
    with pytest.raises(Exception) as ei:
        server.wait(pid, timeout=timeout)
    assert needle in str(ei.value), str(ei.value)[:1500]
    return pid


@pytest.fixture(scope="module")
def hostile(comfy_server, tmp_path_factory):  # noqa: F811
    srv = comfy_server
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.txt").write_text(SECRET)
    (outside / "sub").mkdir()
    (outside / "sub" / "state.json").write_text(json.dumps({"secret": SECRET}))
    inp, out = srv.input_dir, srv.output_dir
    (srv.checkpoints / "placeholder.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    write_png(inp / "img.png", size=(64, 64))
    make_kohya_folder(inp / "ds")
    links = [(inp / "ds_link", outside), (out / "loras" / "link_out.safetensors", outside / "x"),
             (out / "loras" / "link_dir", outside), (out / "checkpoints" / "link_ckpt.safetensors", outside / "y"),
             (out / "link_fix", outside)]
    for link, target in links:
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            os.symlink(target, link)
    make_kohya_folder(inp / "ds_caplink")
    (inp / "ds_caplink" / "2_style" / "img0.txt").unlink()
    os.symlink(outside / "secret.txt", inp / "ds_caplink" / "2_style" / "img0.txt")
    from PIL import Image

    bomb = inp / "ds_bomb" / "1_bomb" / "bomb.png"
    bomb.parent.mkdir(parents=True, exist_ok=True)
    Image.new("1", (11_000, 11_000)).save(bomb)
    big = inp / "big" / "1_many"
    big.mkdir(parents=True, exist_ok=True)
    buf = inp / "big_src.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(buf)
    data = buf.read_bytes()
    for i in range(BIG_FOLDER_FILES):
        (big / f"{i:05d}.png").write_bytes(data)
        (big / f"{i:05d}.txt").write_text(f"item {i}, red")
    info = srv.object_info()
    before = {"outside": snapshot(outside), "base": sorted(p.name for p in srv.base.iterdir())}
    try:
        yield srv, info, outside, before
    finally:  # the session's other e2e tests share this server: leave its folders as they were
        for link, _ in links:
            if link.is_symlink():
                link.unlink()
        for d in ("ds_link", "ds_caplink", "ds_bomb", "big"):
            shutil.rmtree(inp / d, ignore_errors=True)
    assert srv.proc.poll() is None, "the server died:\n" + srv.tail()
    assert srv.object_info()
    assert snapshot(outside) == before["outside"], "a file outside ComfyUI's folders changed"
    assert sorted(p.name for p in srv.base.iterdir()) == before["base"]
    hist = json.dumps(srv.get("/history"))
    assert SECRET not in hist, "the canary's content came back in an output"


def _path_cases(info):
    from conceptlab.nodes import NODE_CLASS_MAPPINGS

    for node_id, cls in sorted(NODE_CLASS_MAPPINGS.items()):
        for name, mode in (getattr(cls, "PATH_INPUTS", {}) or {}).items():
            for kind, bad in HOSTILE_NAMES.items():
                if mode == "lines" and kind == "newline":
                    continue
                yield node_id, name, bad


def test_e2e_hostile_names_answer_400(hostile):
    srv, info, _, _ = hostile
    n = 0
    for node_id, name, bad in _path_cases(info):
        _assert_400(srv, info, node_id, {name: bad}, name)
        n += 1
    assert n >= 100
    print(f"{n} hostile names refused with HTTP 400")


def test_e2e_toml_path_keys_and_bounds_answer_400(hostile):
    srv, info, _, _ = hostile
    for toml in TOML_CASES:  # dataset folder keys are refused for their unsafe value ('..'), the rest by key
        folder_key = any(f"{k} = " in toml for k in ("image_dir", "reg_data_dir", "dataset_config")) and \
            "metadata_file" not in toml
        needle = ("'..'" if '"../' in toml else "absolute") if folder_key else "CLI"
        _assert_400(srv, info, "ConceptLabTrainLora", {"kohya_toml": toml}, needle)
    for toml, needle in (("max_train_epochs = 1000000000", "max_train_epochs"), ("network_dim = 1000000", "network_dim"),
                         ("train_batch_size = -1", "train_batch_size"), ("seed = -1", "seed"),
                         ("lr_warmup_steps = -5", "lr_warmup_steps"), ("resolution = 65536", "resolution"),
                         ("sample_width = 16384", "sample_width"), ("sample_steps = 1000000000", "sample_steps"),
                         ("network_alpha = nan", "finite"), ("a = " + "[" * 100_000 + "]" * 100_000, "nested"),
                         ('caption_extension = "/../../../../etc/passwd"', "caption_extension")):
        _assert_400(srv, info, "ConceptLabTrainLora", {"kohya_toml": toml}, needle)


def test_e2e_numbers_and_sizes_answer_400(hostile):
    srv, info, _, _ = hostile
    cases = [
        ("ConceptLabTrainLora", {"max_train_epochs": 10 ** 9}, "max_train_epochs"),
        ("ConceptLabTrainLora", {"network_dim": 10 ** 6}, "network_dim"),
        ("ConceptLabTrainLora", {"train_batch_size": -1}, "train_batch_size"),
        ("ConceptLabTrainLora", {"seed": -1}, "seed"),
        ("ConceptLabTrainLora", {"lr_warmup_steps": -5}, "lr_warmup_steps"),
        ("ConceptLabTrainLora", {"learning_rate": math.nan}, "learning_rate"),
        ("ConceptLabLoraDataset", {"resolution": 65536}, "resolution"),
        ("ConceptLabEpochCompare", {"width": 16384}, "width"),
        ("ConceptLabEpochCompare", {"steps": 10 ** 9}, "steps"),
        ("ConceptLabESDErase", {"concepts": "\n".join(f"c{i}" for i in range(100_000)), "variations": 2000},
         "concepts"),
        ("ConceptLabESDErase", {"negative_guidance": math.inf}, "negative_guidance"),
        ("ConceptLabMergeModels", {"alpha": math.nan}, "alpha"),
        ("ConceptLabPaletteMetrics", {"tolerance": math.nan}, "tolerance"),
        ("ConceptLabPaletteMetrics", {"palette": "#112233," * (2 * 1024 * 1024)}, "palette"),
        ("ConceptLabLoraDataset", {"caption_extension": "/../../../../etc/passwd"}, "caption_extension"),
        ("ConceptLabTrainLora", {"optimizer_type": "__import__('os')"}, "optimizer_type"),
    ]
    for class_type, over, needle in cases:
        _assert_400(srv, info, class_type, over, needle)


def test_e2e_symlinks_bombs_and_deep_json_fail_cleanly(hostile):
    srv, info, outside, _ = hostile
    _assert_exec_error(srv, info, "ConceptLabLoraDataset", {"folder": "ds_link"}, "outside")
    _assert_exec_error(srv, info, "ConceptLabLoraDataset", {"folder": "ds_caplink"}, "symlink")
    _assert_exec_error(srv, info, "ConceptLabCaptionAudit", {"folder": "ds_caplink"}, "symlink")
    _assert_exec_error(srv, info, "ConceptLabLoraDataset", {"folder": "ds_bomb", "resolution": 512}, "Mpx")
    _assert_exec_error(srv, info, "ConceptLabMergeCheckpointFiles", {
        "filename": "link_ckpt", "ckpt_a": "placeholder.safetensors", "ckpt_b": "placeholder.safetensors"}, "outside")
    _assert_exec_error(srv, info, "ConceptLabCaptionAudit", {"folder": "ds", "fix_to": "link_fix/x"}, "outside")
    deep = '{"a":' * 100_000 + "1" + "}" * 100_000
    _assert_exec_error(srv, info, "ConceptLabCompareDiffReports", {"report_1": deep, "report_2": deep}, "nested")
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt", "sub"]


def test_e2e_interrupt_stops_a_10000_file_scan(hostile):
    srv, info, _, _ = hostile
    code, res = _post(srv, {"prompt": _graph(info, "ConceptLabLoraDataset", {"folder": "big", "resolution": 64,
                                                                             "min_bucket_reso": 64,
                                                                             "max_bucket_reso": 128}),
                            "client_id": srv.client_id})
    assert code == 200, res
    pid = res["prompt_id"]
    time.sleep(3.0)  # inside the scan
    t = time.time()
    urllib.request.urlopen(urllib.request.Request(srv.url + "/interrupt", data=b"{}", method="POST"), timeout=30)
    with pytest.raises(Exception):
        srv.wait(pid, timeout=120)
    took = time.time() - t
    msgs = {m[0] for m in srv.get(f"/history/{pid}")[pid]["status"]["messages"]}
    print(f"/interrupt honoured after {took:.2f}s during a {BIG_FOLDER_FILES}-image scan")
    assert "execution_interrupted" in msgs, msgs
    assert took < 10
