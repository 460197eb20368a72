"""Offline checks of the shipped example workflows and of every node's ComfyUI contract (no ComfyUI needed).

* every node type in every workflow exists (this pack's NODE_CLASS_MAPPINGS or the pinned ComfyUI core list);
* widget counts, value types, combo members, INT/FLOAT ranges and seed control slots ("fixed") match INPUT_TYPES;
* link types match RETURN_TYPES and input types; required sockets are connected;
* each API twin in example_workflows/api/ equals the UI workflow converted by tests/tools/workflow_api.py
  (the converter mirrors ComfyUI frontend 1.27's graphToPrompt; tests/browser checks it against the real one);
* each node: DESCRIPTION, CATEGORY "Concept Lab/...", tooltips on all inputs, id prefixed ConceptLab,
  RETURN_TYPES / RETURN_NAMES / OUTPUT_TOOLTIPS lengths agree, FUNCTION exists.
"""

from __future__ import annotations

import copy
import inspect
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "tools"))
import workflow_api as wa  # noqa: E402

from conceptlab.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

EXPECTED = ("pixel_art_lora", "esd_grid_erasure", "merge_back_sweep", "weight_diff", "palette_audit",
            "sdxl_pixel_art_lora")
WORKFLOWS = wa.example_files()
CORE = wa.load_core_pinned()
INFO = wa.offline_object_info()
# our sampler combos fall back to a short list without ComfyUI: accept what core KSampler accepts
KSAMPLER = CORE["nodes"]["KSampler"]["input"]["required"]
EXTRA_COMBO = {"sampler_name": KSAMPLER["sampler_name"][0], "scheduler": KSAMPLER["scheduler"][0]}


def _load(p: Path) -> dict:
    return json.loads(p.read_text(encoding="utf-8"))


def test_expected_workflows_present():
    names = {p.stem for p in WORKFLOWS}
    missing = [n for n in EXPECTED if n not in names]
    assert not missing, f"example workflows missing: {missing}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_valid(path):
    wf = _load(path)
    assert wf.get("version") == 0.4, "UI format 0.4 expected (the template browser cannot read API format)"
    problems = wa.validate_workflow(wf, INFO, set(CORE["all_types"]), EXTRA_COMBO)
    assert not problems, "\n".join(problems)
    types = {n["type"] for n in wf["nodes"]}
    assert any(t.startswith("ConceptLab") for t in types), "an example should use this pack's nodes"
    assert (path.parent / f"{path.stem}.jpg").is_file(), f"thumbnail {path.stem}.jpg missing"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_api_twin_in_sync(path):
    twin = wa.api_path(path)
    assert twin.is_file(), f"{twin} missing: run python tests/tools/workflow_api.py --write"
    assert _load(twin) == wa.ui_to_api(_load(path), INFO), \
        f"{twin.name} out of date: run python tests/tools/workflow_api.py --write"


def test_pinned_core_covers_workflows():
    for path in WORKFLOWS:
        for n in _load(path)["nodes"]:
            t = n["type"]
            if t.startswith("ConceptLab") or t in wa.FRONTEND_ONLY:
                continue
            assert t in CORE["nodes"], f"{path.name}: core node {t} not pinned (workflow_api.py --pin-core URL)"


# ---------------------------------------------------------------------------------------------------------
# converter behaviour on small hand-made graphs (what the frontend does, see workflow_api's docstring)

def _wf(nodes, links):
    return {"nodes": nodes, "links": links, "version": 0.4}


def _ksampler_graph(mode_mid=0):
    """ckpt(1) -> lora(2, mode_mid) -> KSampler(3); ckpt CLIP -> encode(4) -> KSampler pos/neg."""
    return _wf([
        {"id": 1, "type": "CheckpointLoaderSimple", "mode": 0, "inputs": [],
         "outputs": [{"name": "MODEL", "type": "MODEL", "links": [1]},
                     {"name": "CLIP", "type": "CLIP", "links": [2, 6]}, {"name": "VAE", "type": "VAE", "links": []}],
         "widgets_values": ["a.safetensors"]},
        {"id": 2, "type": "LoraLoader", "mode": mode_mid, "title": "My LoRA",
         "inputs": [{"name": "model", "type": "MODEL", "link": 1}, {"name": "clip", "type": "CLIP", "link": 2}],
         "outputs": [{"name": "MODEL", "type": "MODEL", "links": [3]}, {"name": "CLIP", "type": "CLIP", "links": []}],
         "widgets_values": ["l.safetensors", 0.5, 1.0]},
        {"id": 3, "type": "KSampler", "mode": 0,
         "inputs": [{"name": "model", "type": "MODEL", "link": 3}, {"name": "positive", "type": "CONDITIONING", "link": 4},
                    {"name": "negative", "type": "CONDITIONING", "link": 5},
                    {"name": "latent_image", "type": "LATENT", "link": None}],
         "outputs": [{"name": "LATENT", "type": "LATENT", "links": []}],
         "widgets_values": [7, "fixed", 3, 5.5, "euler", "normal", 1.0]},
        {"id": 4, "type": "CLIPTextEncode", "mode": 0, "inputs": [{"name": "clip", "type": "CLIP", "link": 6}],
         "outputs": [{"name": "CONDITIONING", "type": "CONDITIONING", "links": [4, 5]}],
         "widgets_values": ["a cat // comment\n/* block */dog"]},
        {"id": 9, "type": "Note", "mode": 0, "inputs": [], "outputs": [], "widgets_values": ["hello"]},
    ], [[1, 1, 0, 2, 0, "MODEL"], [2, 1, 1, 2, 1, "CLIP"], [3, 2, 0, 3, 0, "MODEL"],
        [4, 4, 0, 3, 1, "CONDITIONING"], [5, 4, 0, 3, 2, "CONDITIONING"], [6, 1, 1, 4, 0, "CLIP"]])


def test_converter_widgets_links_and_seed_slot():
    api = wa.ui_to_api(_ksampler_graph(), INFO)
    assert list(api) == ["1", "2", "3", "4"]  # Note is frontend-only; keys sorted like a JS object's
    ks = api["3"]
    assert ks["class_type"] == "KSampler" and ks["_meta"]["title"] == "KSampler"
    # the control slot after seed is skipped: steps gets 3, not "fixed"
    assert ks["inputs"]["seed"] == 7 and ks["inputs"]["steps"] == 3 and ks["inputs"]["cfg"] == 5.5
    assert "control_after_generate" not in ks["inputs"]
    assert ks["inputs"]["model"] == ["2", 0] and ks["inputs"]["positive"] == ["4", 0]
    assert "latent_image" not in ks["inputs"]  # unconnected socket
    assert api["2"]["_meta"]["title"] == "My LoRA"
    assert api["2"]["inputs"]["strength_model"] == 0.5
    # dynamicPrompts text loses comments, as the frontend's processDynamicPrompt does
    assert api["4"]["inputs"]["text"] == "a cat \ndog"


def test_converter_bypass_and_mute():
    bypassed = wa.ui_to_api(_ksampler_graph(mode_mid=4), INFO)
    assert "2" not in bypassed and bypassed["3"]["inputs"]["model"] == ["1", 0]  # passes through to MODEL input
    muted = wa.ui_to_api(_ksampler_graph(mode_mid=2), INFO)
    assert "2" not in muted and "model" not in muted["3"]["inputs"]  # link to a muted node is dropped


def test_converter_linked_widget_and_primitive():
    wf = _ksampler_graph()
    # seed fed by a PrimitiveNode: its value replaces the widget's
    wf["nodes"].append({"id": 5, "type": "PrimitiveNode", "mode": 0, "inputs": [],
                        "outputs": [{"name": "INT", "type": "INT", "links": [7], "widget": {"name": "seed"}}],
                        "widgets_values": [123, "fixed"]})
    wf["nodes"][2]["inputs"].append({"name": "seed", "type": "INT", "widget": {"name": "seed"}, "link": 7})
    wf["links"].append([7, 5, 0, 3, 4, "INT"])
    api = wa.ui_to_api(wf, INFO)
    assert api["3"]["inputs"]["seed"] == 123 and "5" not in api


def test_converter_rejects_bad_input():
    with pytest.raises(wa.WorkflowError, match="API-format"):
        wa.ui_to_api({"1": {"class_type": "KSampler", "inputs": {}}}, INFO)
    wf = _ksampler_graph()
    wf["nodes"][0]["type"] = "NoSuchNode"
    with pytest.raises(wa.WorkflowError, match="unknown node type"):
        wa.ui_to_api(wf, INFO)
    wf = _ksampler_graph()
    wf["nodes"][3]["widgets_values"] = ["{red|blue} cat"]
    with pytest.raises(wa.WorkflowError, match="not reproducible"):
        wa.ui_to_api(wf, INFO)


def test_validator_catches_mistakes():
    wf = _ksampler_graph()
    wf["nodes"][2]["inputs"][3]["link"] = None
    ok = wa.validate_workflow(wf, INFO)
    assert ok == ["node 3 (KSampler): required input 'latent_image' (LATENT) is not connected"]
    bad = copy.deepcopy(wf)
    bad["nodes"][2]["widgets_values"] = [7, "randomize", 0, 5.5, "nope", "normal", 1.0]
    msgs = "\n".join(wa.validate_workflow(bad, INFO))
    assert "must be 'fixed'" in msgs and "steps: 0 below min 1" in msgs and "'nope' not in" in msgs
    short = copy.deepcopy(wf)
    short["nodes"][2]["widgets_values"] = [7, 3, 5.5, "euler", "normal", 1.0]  # control slot forgotten
    assert "6 widgets_values, expected 7" in "\n".join(wa.validate_workflow(short, INFO))
    typed = copy.deepcopy(wf)
    typed["links"][3][1:3] = [1, 2]  # VAE into positive
    assert "(CONDITIONING) linked from CheckpointLoaderSimple output 2 (VAE)" in "\n".join(
        wa.validate_workflow(typed, INFO))


# ---------------------------------------------------------------------------------------------------------
# node contracts (each capability's nodes; a failure names the node and the rule)

NODES = sorted(NODE_CLASS_MAPPINGS.items())


def test_pack_has_nodes():
    assert NODES, "no nodes registered"


@pytest.mark.parametrize("node_id,cls", NODES, ids=[n for n, _ in NODES])
def test_node_contract(node_id, cls):
    errors = []
    if not node_id.startswith("ConceptLab"):
        errors.append("node id must start with ConceptLab")
    if not str(getattr(cls, "CATEGORY", "")).startswith("Concept Lab/"):
        errors.append(f"CATEGORY {getattr(cls, 'CATEGORY', None)!r} must start with 'Concept Lab/'")
    if not str(getattr(cls, "DESCRIPTION", "")).strip():
        errors.append("DESCRIPTION missing")
    display = NODE_DISPLAY_NAME_MAPPINGS.get(node_id)
    if not display or display.startswith("ConceptLab"):
        errors.append(f"display name {display!r} should be plain words")
    fn = getattr(cls, "FUNCTION", None)
    if not fn or not callable(getattr(cls, fn, None)):
        errors.append(f"FUNCTION {fn!r} is not a method")
    rt = tuple(getattr(cls, "RETURN_TYPES", ()) or ())
    rn = getattr(cls, "RETURN_NAMES", None)
    if rn is not None and len(rn) != len(rt):
        errors.append(f"RETURN_NAMES has {len(rn)} names for {len(rt)} RETURN_TYPES")
    tips = getattr(cls, "OUTPUT_TOOLTIPS", None)
    if rt and (tips is None or len(tips) != len(rt)):
        errors.append(f"OUTPUT_TOOLTIPS must give one tooltip per output ({len(rt)})")
    if not rt and not getattr(cls, "OUTPUT_NODE", False):
        errors.append("no outputs and not an OUTPUT_NODE: ComfyUI would never run it")
    it = cls.INPUT_TYPES()
    params = None
    if fn and callable(getattr(cls, fn, None)):
        params = inspect.signature(getattr(cls, fn)).parameters
    for section in ("required", "optional"):
        for name, spec in (it.get(section) or {}).items():
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if not str(opts.get("tooltip", "")).strip():
                errors.append(f"input {name!r} has no tooltip")
            if params is not None and name not in params and not any(
                    p.kind == p.VAR_KEYWORD for p in params.values()):
                errors.append(f"input {name!r} is not a parameter of {fn}()")
            if spec[0] in ("INT", "FLOAT") and "default" in opts:
                lo, hi = opts.get("min", -float("inf")), opts.get("max", float("inf"))
                if not lo <= opts["default"] <= hi:
                    errors.append(f"input {name!r} default {opts['default']} outside [{lo}, {hi}]")
            if isinstance(spec[0], (list, tuple)) and "default" in opts and opts["default"] not in spec[0]:
                errors.append(f"input {name!r} default {opts['default']!r} not among its choices")
    # the JSON ComfyUI serves for it must be JSON (tuples become lists, no objects)
    try:
        json.dumps(wa.node_info(node_id, cls, display))
    except TypeError as e:
        errors.append(f"/object_info entry is not JSON: {e}")
    assert not errors, f"{node_id}: " + "; ".join(errors)
