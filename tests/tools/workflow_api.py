"""ComfyUI workflows: UI format -> API format, and checks of a workflow against node definitions.

Run from the repo root::

    python tests/tools/workflow_api.py --check            # api/ twins equal to what the UI files convert to?
    python tests/tools/workflow_api.py --write            # regenerate example_workflows/api/*.json
    python tests/tools/workflow_api.py --validate         # widget/link/type checks of every example workflow
    python tests/tools/workflow_api.py convert WF.json [-o OUT.json] [--server http://127.0.0.1:8188]
    python tests/tools/workflow_api.py --pin-core http://127.0.0.1:8188   # refresh core_object_info.json

Why our own converter: ComfyUI converts a UI workflow to the API ("prompt") format only in its web frontend
(``graphToPrompt`` in ComfyUI_frontend ``src/utils/executionUtil.ts``, with the widget set that
``src/services/litegraphService.ts`` builds from ``/object_info``); there is no Python library for it. This
module re-implements those rules (frontend 1.27, the one ComfyUI 0.3.64 pins) and the browser test
(``tests/browser/``) checks the result against the real frontend's ``app.graphToPrompt()``:

* widgets are created per input in ``input_order`` (required, then optional, then any other input); an input is
  a widget when its type is INT / FLOAT / BOOLEAN / STRING / MARKDOWN / COMBO (a list) and it has no
  ``forceInput``; every other input is a socket;
* an INT with ``control_after_generate`` (or, when that key is absent, named ``seed`` / ``noise_seed``) gets an
  extra ``control_after_generate`` widget; a COMBO with it gets that plus a ``control_filter_list`` widget; a
  media COMBO (``image_upload`` ...) gets an ``upload`` button widget after all inputs. These extra widgets take a
  ``widgets_values`` slot but never reach the prompt;
* ``widgets_values[i]`` fills the i-th widget; a STRING with ``dynamicPrompts`` loses ``//`` and ``/* */``
  comments (``{a|b}`` choices are random, so they are refused here);
* links override widget values; a link from a bypassed node (mode 4) passes through that node's first input of a
  matching type, one from a Reroute through its input, one from a PrimitiveNode is replaced by its value; muted
  (mode 2) and bypassed nodes and frontend-only nodes (Note, MarkdownNote, Reroute, PrimitiveNode) are left out,
  and so are inputs linked to a node that is left out;
* nodes are visited in litegraph's ``computeExecutionOrder`` order, but the prompt is a JavaScript object, whose
  integer-like keys always list in ascending order: the result is sorted by node id; each is
  ``{"inputs": ..., "class_type": type, "_meta": {"title": title}}`` under ``str(id)``; widget values that are
  lists are wrapped as ``{"__value__": [...]}``.

Node definitions come from a live server (``/object_info``) or, offline, from this pack's node classes (the
same ``node_info`` ComfyUI's ``server.py`` computes) plus ``core_object_info.json`` (pinned from ComfyUI 0.3.64's
``/object_info`` with empty model folders, trimmed to the core nodes our workflows use, and the names of all
core node types).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
EXAMPLES = REPO / "example_workflows"
API_DIR = EXAMPLES / "api"
CORE_PINNED = HERE / "core_object_info.json"

#: node types that exist only in the web frontend (never sent to the server)
FRONTEND_ONLY = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode"})
#: input types the frontend draws as widgets
WIDGET_TYPES = frozenset({"INT", "FLOAT", "BOOLEAN", "STRING", "MARKDOWN", "COMBO"})
MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
#: widgets that frontend extensions add after the node's own widgets: (name, value); they are not stored in
#: widgets_values (widget.serialize = false) but are sent in the prompt (extensions/core/previewAny.ts)
EXTENSION_WIDGETS = {"PreviewAny": (("preview", ""),)}
#: nodes whose filename_prefix the frontend rewrites (%date:..% / %node.widget%, saveImageExtraOutput.ts)
SAVE_NODE_TYPES = frozenset({"SaveImage", "SaveAnimatedWEBP", "SaveWEBM", "SaveAudio", "SaveGLB", "SaveAnimatedPNG",
                             "CLIPSave", "VAESave", "ModelSave", "LoraSave", "SaveLatent"})
#: core nodes always pinned (KSampler's sampler/scheduler lists also validate our nodes' combos offline;
#: the rest are what the examples and the converter's own tests use)
CORE_BASELINE = frozenset({"KSampler", "CheckpointLoaderSimple", "LoraLoader", "CLIPTextEncode", "EmptyLatentImage",
                           "VAEDecode", "VAEEncode", "SaveImage", "PreviewImage", "LoadImage", "CheckpointSave",
                           "PreviewAny", "LoadImageMask"})
#: combos whose values are file names on the user's machine: any name is accepted offline
FILE_COMBO_HINTS = ("ckpt", "lora", "vae_name", "unet_name", "clip_name", "file_", "model_name", "image")


class WorkflowError(ValueError):
    """A workflow that cannot be converted (API format given, subgraph, unknown node type, bad link)."""


# ----------------------------------------------------------------------------------------------------------
# node definitions


def node_info(node_id: str, cls, display_name: str | None = None) -> dict:
    """``/object_info`` entry for a V1 node class, computed like ComfyUI 0.3.64 ``server.py`` ``node_info``.

    Args:
        node_id: the key in ``NODE_CLASS_MAPPINGS``.
        cls: the node class (``INPUT_TYPES`` classmethod, ``RETURN_TYPES`` ...).
        display_name: from ``NODE_DISPLAY_NAME_MAPPINGS`` (defaults to ``node_id``).
    Returns:
        a JSON-compatible dict (tuples become lists, as they do over HTTP).
    """
    inputs = cls.INPUT_TYPES()
    info = {
        "input": inputs,
        "input_order": {k: list(v.keys()) for k, v in inputs.items()},
        "output": cls.RETURN_TYPES,
        "output_is_list": getattr(cls, "OUTPUT_IS_LIST", [False] * len(cls.RETURN_TYPES)),
        "output_name": getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES),
        "name": node_id,
        "display_name": display_name or node_id,
        "description": getattr(cls, "DESCRIPTION", ""),
        "python_module": "custom_nodes.conceptlab",
        "category": getattr(cls, "CATEGORY", "sd"),
        "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
    }
    if hasattr(cls, "OUTPUT_TOOLTIPS"):
        info["output_tooltips"] = cls.OUTPUT_TOOLTIPS
    return json.loads(json.dumps(info))


def pack_object_info() -> dict:
    """``/object_info`` entries of every node in this pack (imports ``conceptlab.nodes``, no ComfyUI needed)."""
    from conceptlab.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    return {k: node_info(k, c, NODE_DISPLAY_NAME_MAPPINGS.get(k)) for k, c in NODE_CLASS_MAPPINGS.items()}


def load_core_pinned(path: Path = CORE_PINNED) -> dict:
    """The pinned core definitions: ``{"comfyui": version, "all_types": [...], "nodes": {type: info}}``."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def offline_object_info() -> dict:
    """Pinned core node definitions + this pack's nodes (the pack wins on a clash, as a later pack would)."""
    out = dict(load_core_pinned()["nodes"])
    out.update(pack_object_info())
    return out


def fetch_object_info(server: str, timeout: float = 60.0) -> dict:
    """``GET <server>/object_info`` (server like ``http://127.0.0.1:8188``)."""
    with urllib.request.urlopen(server.rstrip("/") + "/object_info", timeout=timeout) as r:
        return json.loads(r.read().decode("utf-8"))


# ----------------------------------------------------------------------------------------------------------
# the frontend's view of a node: sockets and widgets


def _is_combo(spec) -> bool:
    return isinstance(spec[0], list) or spec[0] == "COMBO"


def combo_values(spec) -> list:
    """Options of a COMBO input spec (``[[...], {...}]`` or ``["COMBO", {"options": [...]}]``)."""
    if isinstance(spec[0], list):
        return spec[0]
    return list((spec[1] if len(spec) > 1 else {}).get("options", []))


def _opts(spec) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def ordered_inputs(info: dict) -> list[tuple[str, list, bool]]:
    """``(name, spec, optional)`` in the frontend's order (``getOrderedInputSpecs``): ``input_order`` required,
    then optional, then any input not listed (e.g. the ``upload`` widget added for media combos)."""
    inp = info.get("input", {})
    specs: dict[str, tuple[list, bool]] = {}
    for section in ("required", "optional"):
        for name, spec in (inp.get(section) or {}).items():
            specs.setdefault(name, (spec, section == "optional"))
    order = info.get("input_order") or {}
    out, seen = [], set()
    if order:
        for section in ("required", "optional"):
            for name in order.get(section, []):
                if name in specs and specs[name][1] == (section == "optional") and name not in seen:
                    out.append((name, *specs[name]))
                    seen.add(name)
    for name, (spec, optional) in specs.items():
        if name not in seen:
            out.append((name, spec, optional))
            seen.add(name)
    return out


def _has_upload(spec) -> bool:
    o = _opts(spec)
    return _is_combo(spec) and any(o.get(k) is True for k in ("image_upload", "video_upload",
                                                               "animated_image_upload"))


def is_widget_input(spec) -> bool:
    """True when the frontend draws this input as a widget (so it takes a ``widgets_values`` slot)."""
    if _opts(spec).get("forceInput"):
        return False
    return _is_combo(spec) or spec[0] in WIDGET_TYPES


def widget_layout(info: dict) -> list[dict]:
    """The node's widgets in order, each ``{"name", "input", "spec", "kind"}``; kind is ``"value"`` (an input's
    own widget), ``"control"`` (control_after_generate), ``"filter"`` (control_filter_list) or ``"upload"``.
    Only ``"value"`` widgets reach the prompt."""
    widgets = []
    inputs = ordered_inputs(info)
    required = (info.get("input") or {}).get("required") or {}
    upload_for = next((n for n, s in required.items() if _has_upload(s)), None)
    for name, spec, _optional in inputs:
        if not is_widget_input(spec):
            continue
        widgets.append({"name": name, "input": name, "spec": spec, "kind": "value"})
        o = _opts(spec)
        cag = o.get("control_after_generate")
        if _is_combo(spec):
            if cag:
                cname = cag if isinstance(cag, str) else "control_after_generate"
                widgets.append({"name": cname, "input": name, "spec": spec, "kind": "control"})
                widgets.append({"name": "control_filter_list", "input": name, "spec": spec, "kind": "filter"})
        elif spec[0] == "INT":
            if cag is None:
                cag = name in ("seed", "noise_seed")
            if cag:
                cname = cag if isinstance(cag, str) else "control_after_generate"
                widgets.append({"name": cname, "input": name, "spec": spec, "kind": "control"})
    if upload_for is not None:
        widgets.append({"name": "upload", "input": upload_for, "spec": required[upload_for], "kind": "upload"})
    return widgets


def socket_inputs(info: dict) -> list[tuple[str, list]]:
    """Inputs drawn as sockets only (not widgets), in order."""
    return [(n, s) for n, s, _ in ordered_inputs(info) if not is_widget_input(s)]


def live_inputs(info: dict) -> list[tuple[str, str, bool]]:
    """The node's input slots after the frontend creates it: sockets first, then one slot per value widget
    (``litegraphService.#addInputs``). Each ``(name, type, is_widget)``; COMBO type is ``"COMBO"``."""
    out = [(n, s[0] if not _is_combo(s) else "COMBO", False) for n, s in socket_inputs(info)]
    for w in widget_layout(info):
        if w["kind"] == "value":
            s = w["spec"]
            out.append((w["name"], "COMBO" if _is_combo(s) else s[0], True))
    return out


def _default(widget: dict):
    """A new widget's value: the input's ``default``, else the frontend's fallback for the type."""
    spec, kind = widget["spec"], widget["kind"]
    if kind == "control":
        return "randomize"
    if kind == "filter":
        return ""
    if kind == "upload":
        return "image"
    o = _opts(spec)
    if "default" in o:
        return o["default"]
    if _is_combo(spec):
        vals = combo_values(spec)
        return vals[0] if vals else None
    return {"INT": 0, "FLOAT": 0.0, "BOOLEAN": False}.get(spec[0], "")


def _migrate_widget_values(info: dict, values: list) -> list:
    """``migrateWidgetsValues``: old files kept a slot for ``forceInput`` inputs; drop those slots."""
    inputs = ordered_inputs(info)
    originals = [(n, s) for n, s, _ in inputs if is_widget_input(s) or _opts(s).get("forceInput")]
    if not any(_opts(s).get("forceInput") for _, s in originals):
        return values

    def width(n, s):
        o = _opts(s)
        return 2 if (o.get("control_after_generate") or n in ("seed", "noise_seed")) else 1

    if sum(width(n, s) for n, s in originals) != len(values):
        return values
    # zip of inputs with values, exactly as the frontend does (one value per input, even for 2-wide ones)
    return [v for (n, s), v in zip(originals, values) if not _opts(s).get("forceInput")]


def _strip_comments(text: str) -> str:
    return re.sub(r"/\*[\s\S]*?\*/|//.*", "", text)


def dynamic_prompt(text: str) -> str:
    """The frontend's ``processDynamicPrompt`` for deterministic text: comments removed. Text with ``{`` or a
    backslash (random choices / escapes) raises :class:`WorkflowError`: its API form is not reproducible."""
    out = _strip_comments(text)
    if "{" in out or "\\" in out:
        raise WorkflowError(f"dynamic prompt {text[:40]!r} uses {{a|b}} choices or escapes: not reproducible")
    return out


# ----------------------------------------------------------------------------------------------------------
# UI workflow access


def _links_table(wf: dict) -> dict:
    """``{link_id: (origin_id, origin_slot, target_id, target_slot, type)}`` from list or dict links."""
    table = {}
    for link in wf.get("links") or []:
        if isinstance(link, dict):
            table[link["id"]] = (link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                                 link.get("type"))
        else:
            lid, oid, oslot, tid, tslot, typ = (list(link) + [None] * 6)[:6]
            table[lid] = (oid, oslot, tid, tslot, typ)
    return table


def check_ui_format(wf) -> None:
    """Raise :class:`WorkflowError` unless ``wf`` is a UI-format workflow we can convert."""
    if not isinstance(wf, dict) or "nodes" not in wf:
        if isinstance(wf, dict) and wf and all(isinstance(v, dict) and "class_type" in v for v in wf.values()):
            raise WorkflowError("this is already an API-format workflow (node id -> class_type/inputs)")
        raise WorkflowError("not a ComfyUI UI-format workflow: no 'nodes' list")
    subgraphs = ((wf.get("definitions") or {}).get("subgraphs")) or []
    if subgraphs:
        raise WorkflowError("subgraphs are not supported by this converter")


class _Node:
    """A node as the frontend holds it after loading: live input slots with links, widget values, title."""

    def __init__(self, raw: dict, info: dict | None):
        self.raw = raw
        self.id = raw["id"]
        self.type = raw["type"]
        self.mode = raw.get("mode", MODE_ALWAYS) or MODE_ALWAYS
        self.info = info
        self.virtual = self.type in FRONTEND_ONLY
        ser_inputs = raw.get("inputs") or []
        by_name = {i.get("name"): i for i in ser_inputs}
        if info is not None:
            slots = []
            for name, typ, is_widget in live_inputs(info):
                s = by_name.get(name, {})
                slots.append({"name": name, "type": typ, "link": s.get("link"), "widget": is_widget})
            defined = {s["name"] for s in slots}
            for s in ser_inputs:  # extra inputs a frontend extension may have added
                if s.get("name") not in defined:
                    slots.append({"name": s.get("name"), "type": s.get("type"), "link": s.get("link"),
                                  "widget": bool(s.get("widget"))})
            self.inputs = slots
            self.widgets = widget_layout(info)
            values = raw.get("widgets_values")
            if isinstance(values, dict):  # some custom nodes serialise a dict; map by name
                self.values = [values.get(w["name"], _default(w)) for w in self.widgets]
            else:
                values = _migrate_widget_values(info, list(values or []))
                self.values = [values[i] if i < len(values) else _default(w) for i, w in enumerate(self.widgets)]
            self.title = raw.get("title") or info.get("display_name") or info.get("name") or self.type
        else:
            self.inputs = [{"name": s.get("name"), "type": s.get("type"), "link": s.get("link"),
                            "widget": bool(s.get("widget"))} for s in ser_inputs]
            self.widgets = []
            self.values = []
            self.title = raw.get("title") or self.type
        self.outputs = raw.get("outputs") or []

    def value_of(self, widget_index: int):
        return self.values[widget_index]


def execution_order(nodes: list[_Node], links: dict) -> list[_Node]:
    """litegraph ``LGraph.computeExecutionOrder(false)``: Kahn's algorithm from nodes without input links (in
    file order), following each output's links in order; nodes left in cycles go last."""
    by_id = {n.id: n for n in nodes}
    remaining, start = {}, []
    for n in nodes:
        num = sum(1 for s in (n.raw.get("inputs") or []) if s.get("link") is not None)
        if num == 0:
            start.append(n)
        else:
            remaining[n.id] = num
    order, done, visited = [], set(), set()
    while start:
        n = start.pop(0)
        order.append(n)
        done.add(n.id)
        for out in n.outputs:
            for lid in out.get("links") or []:
                if lid in visited or lid not in links:
                    continue
                visited.add(lid)
                target = by_id.get(links[lid][2])
                if target is None:
                    continue
                remaining[target.id] = remaining.get(target.id, 0) - 1
                if remaining[target.id] == 0:
                    start.append(target)
    order.extend(n for n in nodes if n.id not in done)
    return order


def _valid_connection(a, b) -> bool:
    """litegraph ``isValidConnection``: equal types, ``*``/empty matches anything, comma lists intersect."""
    if not a or not b or a == "*" or b == "*" or a == b:
        return True
    a, b = str(a).lower(), str(b).lower()
    if "," not in a and "," not in b:
        return a == b
    return bool(set(a.split(",")) & set(b.split(",")))


def ui_to_api(wf: dict, object_info: dict) -> dict:
    """Convert a UI-format workflow (``workflow.json``, version 0.4) to the API prompt ComfyUI's frontend sends.

    Args:
        wf: the parsed UI workflow.
        object_info: node definitions (``/object_info`` or :func:`offline_object_info`).
    Returns:
        ``{str(node_id): {"inputs": {...}, "class_type": str, "_meta": {"title": str}}}`` sorted by node id.
    Raises:
        WorkflowError: API format given, subgraphs, a node type missing from ``object_info``, a dangling link,
        or a dynamic prompt with random choices.
    """
    check_ui_format(wf)
    links = _links_table(wf)
    nodes = []
    for raw in wf["nodes"]:
        info = None
        if raw["type"] not in FRONTEND_ONLY:
            info = object_info.get(raw["type"])
            if info is None:
                raise WorkflowError(f"node {raw['id']}: unknown node type {raw['type']!r} (not in object_info)")
        nodes.append(_Node(raw, info))
    by_id = {n.id: n for n in nodes}

    # PrimitiveNode.applyToGraph: push its value into the widgets it feeds
    overrides: dict[tuple, object] = {}
    for n in nodes:
        if n.type != "PrimitiveNode":
            continue
        vals = n.raw.get("widgets_values") or []
        for out in n.outputs:
            for lid in out.get("links") or []:
                if lid in links and vals:
                    _, _, tid, tslot, _ = links[lid]
                    target = by_id.get(tid)
                    if target is not None and target.info is not None:
                        ser = (target.raw.get("inputs") or [])
                        name = ser[tslot].get("name") if tslot < len(ser) else None
                        wname = ((ser[tslot].get("widget") or {}).get("name") if tslot < len(ser) else None) or name
                        overrides[(tid, wname)] = vals[0]

    def resolve_output(node: _Node, slot: int, typ, seen: set):
        key = ("O", node.id, slot)
        if key in seen:
            raise WorkflowError(f"circular reference resolving output {slot} of node {node.id}")
        seen.add(key)
        if node.mode == MODE_BYPASS and not node.virtual:
            out_type = node.outputs[slot].get("type") if slot < len(node.outputs) else None
            idx = _bypass_slot(node, slot, typ, out_type)
            return None if idx < 0 else resolve_input(node, idx, seen, None)
        if node.virtual:
            if node.type == "Reroute" and node.inputs:
                return resolve_input(node, 0, seen, typ)
            return None
        return (node.id, slot)

    def resolve_input(node: _Node, slot: int, seen: set, typ):
        key = ("I", node.id, slot)
        if key in seen:
            raise WorkflowError(f"circular reference resolving input {slot} of node {node.id}")
        seen.add(key)
        s = node.inputs[slot]
        if s.get("link") is None:
            return None
        if s["link"] not in links:
            raise WorkflowError(f"node {node.id} input {s['name']!r}: link {s['link']} not in 'links'")
        oid, oslot, _, _, _ = links[s["link"]]
        origin = by_id.get(oid)
        if origin is None:
            raise WorkflowError(f"node {node.id} input {s['name']!r}: origin node {oid} missing")
        return resolve_output(origin, int(oslot), typ if typ is not None else s.get("type"), seen)

    def _bypass_slot(node: _Node, slot: int, typ, out_type) -> int:
        ins = node.inputs
        if typ in ("*", ""):
            return slot if len(ins) > slot else 0
        if slot < len(ins) and _valid_connection(ins[slot]["type"], out_type) and _valid_connection(
                ins[slot]["type"], typ):
            return slot
        for i, s in enumerate(ins):
            if s["type"] == typ:
                return i
        for i, s in enumerate(ins):
            if _valid_connection(s["type"], out_type) and _valid_connection(s["type"], typ):
                return i
        return -1

    output: dict[str, dict] = {}
    for node in execution_order(nodes, links):
        if node.virtual or node.mode in (MODE_NEVER, MODE_BYPASS):
            continue
        inputs: dict = {}
        for i, w in enumerate(node.widgets):
            if w["kind"] != "value":
                continue
            value = overrides.get((node.id, w["name"]), node.value_of(i))
            if w["spec"][0] == "STRING" and _opts(w["spec"]).get("dynamicPrompts") and isinstance(value, str):
                value = dynamic_prompt(value)
            if node.type in SAVE_NODE_TYPES and w["name"] == "filename_prefix" and isinstance(value, str) \
                    and re.search(r"%[^%]+%", value):
                raise WorkflowError(f"node {node.id}: filename_prefix {value!r} uses %..% replacements: "
                                    "not reproducible")
            inputs[w["name"]] = {"__value__": value} if isinstance(value, list) else value
        for name, value in EXTENSION_WIDGETS.get(node.type, ()):
            inputs[name] = value
        for i, s in enumerate(node.inputs):
            resolved = resolve_input(node, i, set(), None)
            if resolved is None:
                continue
            inputs[s["name"]] = [str(resolved[0]), int(resolved[1])]
        output[str(node.id)] = {"inputs": inputs, "class_type": node.type, "_meta": {"title": node.title}}

    # JavaScript objects list integer-like keys in ascending numeric order, whatever the insertion order: the
    # frontend's prompt is therefore sorted by node id
    output = dict(sorted(output.items(), key=lambda kv: (0, int(kv[0])) if kv[0].isdigit() else (1, kv[0])))
    for entry in output.values():
        for name in list(entry["inputs"]):
            v = entry["inputs"][name]
            if isinstance(v, list) and len(v) == 2 and v[0] not in output:
                del entry["inputs"][name]
    return output


# ----------------------------------------------------------------------------------------------------------
# checks


def is_file_combo(name: str, values: list) -> bool:
    """A combo listing files on the user's machine (checkpoints, LoRAs, input images): any name is accepted.
    Recognised by an empty / placeholder list or an input name such as ``ckpt_name``, ``lora_name``."""
    real = [v for v in values if isinstance(v, str) and v not in ("none", "") and not v.endswith("/")]
    return not real or any(h in name for h in FILE_COMBO_HINTS)


def check_widget_value(name: str, spec, value, extra_combo: dict | None = None) -> str | None:
    """Why ``value`` is not valid for input ``name`` with ``spec`` (None when valid). ``extra_combo`` maps an
    input name to further accepted values (e.g. the core sampler list for a node whose offline list is short)."""
    o = _opts(spec)
    if _is_combo(spec):
        values = combo_values(spec)
        if value in values or (extra_combo and value in extra_combo.get(name, ())):
            return None
        if is_file_combo(name, values) and isinstance(value, str) and value:
            return None
        return f"{value!r} not in {values[:12]}{'...' if len(values) > 12 else ''}"
    typ = spec[0]
    if typ == "INT":
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{value!r} is not an INT"
    elif typ == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"{value!r} is not a FLOAT"
    elif typ == "BOOLEAN":
        if not isinstance(value, bool):
            return f"{value!r} is not a BOOLEAN"
    elif typ in ("STRING", "MARKDOWN"):
        if not isinstance(value, str):
            return f"{value!r} is not a STRING"
    if typ in ("INT", "FLOAT"):
        if "min" in o and value < o["min"]:
            return f"{value} below min {o['min']}"
        if "max" in o and value > o["max"]:
            return f"{value} above max {o['max']}"
    return None


def validate_workflow(wf: dict, object_info: dict, known_types: set | None = None,
                     extra_combo: dict | None = None) -> list[str]:
    """Problems in a UI workflow against node definitions (empty list = valid).

    Checks: known node types (``object_info`` or ``known_types``), ``widgets_values`` count equal to the
    frontend's widget count, every value valid for its input (combo membership, INT/FLOAT type and min/max,
    BOOLEAN, STRING), control slots one of fixed/increment/decrement/randomize and ``"fixed"`` for seeds,
    link endpoints/slots/types consistent with outputs and inputs, required non-widget inputs connected.
    """
    problems = []
    try:
        check_ui_format(wf)
    except WorkflowError as e:
        return [str(e)]
    links = _links_table(wf)
    by_id = {n["id"]: n for n in wf["nodes"]}
    if len(by_id) != len(wf["nodes"]):
        problems.append("duplicate node ids")
    for raw in wf["nodes"]:
        where = f"node {raw['id']} ({raw['type']})"
        if raw["type"] in FRONTEND_ONLY:
            continue
        info = object_info.get(raw["type"])
        if info is None:
            if not (known_types and raw["type"] in known_types):
                problems.append(f"{where}: unknown node type")
            else:
                problems.append(f"{where}: core type without a pinned definition (add it to core_object_info)")
            continue
        widgets = widget_layout(info)
        values = raw.get("widgets_values") or []
        if isinstance(values, dict):
            problems.append(f"{where}: widgets_values is a dict")
            continue
        if len(values) != len(widgets):
            problems.append(f"{where}: {len(values)} widgets_values, expected {len(widgets)} "
                            f"({[w['name'] for w in widgets]})")
            continue
        for w, v in zip(widgets, values):
            if w["kind"] == "control":
                if v not in CONTROL_VALUES:
                    problems.append(f"{where}: {w['input']} control value {v!r} not in {CONTROL_VALUES}")
                elif w["input"] in ("seed", "noise_seed") and v != "fixed":
                    problems.append(f"{where}: {w['input']} control value must be 'fixed' (got {v!r})")
            elif w["kind"] == "value":
                why = check_widget_value(w["name"], w["spec"], v, extra_combo)
                if why:
                    problems.append(f"{where}: {w['name']}: {why}")
        # links into this node
        ins = raw.get("inputs") or []
        specs = {n: s for n, s, _ in ordered_inputs(info)}
        for slot, s in enumerate(ins):
            name = s.get("name")
            if name not in specs:
                problems.append(f"{where}: input {name!r} is not an input of this node")
                continue
            lid = s.get("link")
            if lid is None:
                continue
            if lid not in links:
                problems.append(f"{where}: input {name!r} link {lid} missing from 'links'")
                continue
            oid, oslot, tid, tslot, ltype = links[lid]
            if tid != raw["id"] or tslot != slot:
                problems.append(f"{where}: link {lid} target ({tid}, {tslot}) != ({raw['id']}, {slot})")
            origin = by_id.get(oid)
            if origin is None:
                problems.append(f"{where}: link {lid} from missing node {oid}")
                continue
            if origin["type"] in FRONTEND_ONLY:
                continue
            oinfo = object_info.get(origin["type"])
            if oinfo is None:
                continue
            outs = oinfo.get("output") or []
            if not (0 <= oslot < len(outs)):
                problems.append(f"{where}: link {lid} from output {oslot} of {origin['type']} (has {len(outs)})")
                continue
            otype = outs[oslot]
            itype = "COMBO" if _is_combo(specs[name]) else specs[name][0]
            if isinstance(otype, list):
                otype = "COMBO"
            if not _valid_connection(otype, itype):
                problems.append(f"{where}: input {name!r} ({itype}) linked from {origin['type']} output "
                                f"{oslot} ({otype})")
            if ltype not in (None, otype) and not _valid_connection(ltype, otype):
                problems.append(f"{where}: link {lid} type {ltype!r} != output type {otype!r}")
            oser = (origin.get("outputs") or [])
            if oslot < len(oser) and lid not in (oser[oslot].get("links") or []):
                problems.append(f"{where}: link {lid} not listed in node {oid} output {oslot} links")
        linked = {s.get("name") for s in ins if s.get("link") is not None}
        if raw.get("mode", 0) in (MODE_NEVER, MODE_BYPASS):
            continue
        for name, spec, optional in ordered_inputs(info):
            if not optional and not is_widget_input(spec) and name not in linked:
                problems.append(f"{where}: required input {name!r} ({spec[0]}) is not connected")
    return problems


# ----------------------------------------------------------------------------------------------------------
# files


def example_files(root: Path = EXAMPLES) -> list[Path]:
    """UI workflows shipped in ``example_workflows/`` (``*.json``, not the ``api/`` twins)."""
    return sorted(p for p in Path(root).glob("*.json") if p.is_file())


def api_path(ui: Path) -> Path:
    return ui.parent / "api" / ui.name


def dumps(obj) -> str:
    """How our workflow JSON files are written (2-space indent, UTF-8, newline at the end)."""
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def sync(write: bool, object_info: dict, files: list[Path] | None = None) -> list[str]:
    """Compare (or, with ``write``, rewrite) each API twin; returns the names that differ(ed)."""
    changed = []
    for ui in files or example_files():
        api = ui_to_api(json.loads(ui.read_text(encoding="utf-8")), object_info)
        target = api_path(ui)
        current = json.loads(target.read_text(encoding="utf-8")) if target.exists() else None
        if current != api:
            changed.append(ui.name)
            if write:
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_suffix(".json.tmp")
                tmp.write_text(dumps(api), encoding="utf-8")
                tmp.replace(target)
    return changed


def pin_core(server: str, out: Path = CORE_PINNED) -> list[str]:
    """Write ``core_object_info.json`` from a live server: definitions of the core node types the example
    workflows use (model-file lists emptied) + the names of every core node type."""
    live = fetch_object_info(server)
    core = {k: v for k, v in live.items() if not k.startswith("ConceptLab")
            and not str(v.get("python_module", "")).startswith("custom_nodes")}
    used = set()
    for ui in example_files():
        for n in json.loads(ui.read_text(encoding="utf-8"))["nodes"]:
            if n["type"] in core:
                used.add(n["type"])
    used |= CORE_BASELINE
    nodes = {}
    for t in sorted(used):
        info = json.loads(json.dumps(core[t]))
        for section in ("required", "optional"):
            for name, spec in (info["input"].get(section) or {}).items():
                if _is_combo(spec) and is_file_combo(name, combo_values(spec)) and isinstance(spec[0], list):
                    spec[0] = []
        nodes[t] = info
    doc = {"comfyui": "0.3.64", "source": "GET /object_info of ComfyUI 0.3.64 with empty model folders",
           "all_types": sorted(core), "nodes": nodes}
    out.write_text(dumps(doc), encoding="utf-8")
    return sorted(used)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", nargs="?", choices=["convert"], help="convert one file")
    ap.add_argument("file", nargs="?", type=Path)
    ap.add_argument("-o", "--out", type=Path)
    ap.add_argument("--server", help="take node definitions from this server's /object_info")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--write", action="store_true", help="regenerate example_workflows/api/*.json")
    g.add_argument("--check", action="store_true", help="exit 1 when an api/ twin is out of date")
    g.add_argument("--validate", action="store_true", help="check widgets, values and links of each example")
    g.add_argument("--pin-core", metavar="URL", help="rewrite core_object_info.json from this server")
    a = ap.parse_args(argv)
    if a.pin_core:
        print("pinned:", ", ".join(pin_core(a.pin_core)))
        return 0
    info = fetch_object_info(a.server) if a.server else offline_object_info()
    try:
        if a.command == "convert":
            if not a.file:
                ap.error("convert needs a workflow file")
            api = ui_to_api(json.loads(a.file.read_text(encoding="utf-8")), info)
            if a.out:
                a.out.write_text(dumps(api), encoding="utf-8")
            else:
                sys.stdout.write(dumps(api))
            return 0
        if a.validate:
            core = set(load_core_pinned()["all_types"])
            bad = 0
            for ui in example_files():
                probs = validate_workflow(json.loads(ui.read_text(encoding="utf-8")), info, core)
                print(f"{ui.name}: {'ok' if not probs else ''}")
                for p in probs:
                    print("   ", p)
                bad += bool(probs)
            return 1 if bad else 0
        changed = sync(a.write, info)
    except WorkflowError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.write:
        print("rewrote:" if changed else "all api twins up to date", ", ".join(changed))
        return 0
    if changed:
        print("out of date (run with --write):", ", ".join(changed))
        return 1
    print("all api twins up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
