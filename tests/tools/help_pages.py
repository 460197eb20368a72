"""Help pages of the nodes (``web/docs/<NodeId>.md``, ComfyUI's node-library help panel): check and fill gaps.

    python tests/tools/help_pages.py          # list nodes without a page and inputs/outputs a page does not name
    python tests/tools/help_pages.py --fill   # write a page for each node without one, from its INPUT_TYPES /
                                              # tooltips / DESCRIPTION, and add table rows for unnamed inputs/outputs

How the pages are served (ComfyUI 0.3.64 + frontend 1.27): ``__init__.py`` sets ``WEB_DIRECTORY = "./web"``;
ComfyUI's ``nodes.load_custom_node`` registers it as ``EXTENSION_WEB_DIRS[<pack folder>]`` and ``server.py`` serves
it at ``/extensions/<pack folder>/``. The frontend's ``NodeHelpService.fetchCustomNodeHelp`` fetches
``/extensions/<pack folder>/docs/<NodeId>/<locale>.md`` and falls back to ``docs/<NodeId>.md``; so English lives in
``web/docs/<NodeId>.md`` and a translation goes to ``web/docs/<NodeId>/<locale>.md`` (``zh.md``, ``ja.md``...).
Relative image links are resolved against ``/extensions/<pack folder>/docs/``.

A page names an input or output as `` `name` `` (backticks): that is what the coverage test looks for.
Generated rows carry the tooltip text; write the example and the pitfalls by hand.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "web" / "docs"


def node_classes() -> tuple[dict, dict]:
    """``(NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS)`` of the pack, read live."""
    from conceptlab import nodes

    return nodes.NODE_CLASS_MAPPINGS, nodes.NODE_DISPLAY_NAME_MAPPINGS


def inputs(cls) -> dict[str, tuple]:
    """Every required and optional input (name → spec tuple) as INPUT_TYPES gives it now (hidden ones left out)."""
    spec = cls.INPUT_TYPES()
    out = {}
    for sec in ("required", "optional"):
        out.update(spec.get(sec, {}) or {})
    return out


def outputs(cls) -> list[tuple[str, str, str]]:
    """``(name, type, tooltip)`` per output."""
    types = list(getattr(cls, "RETURN_TYPES", ()))
    names = list(getattr(cls, "RETURN_NAMES", None) or [str(t).lower() for t in types])
    tips = list(getattr(cls, "OUTPUT_TOOLTIPS", None) or [""] * len(types))
    tips += [""] * (len(types) - len(tips))
    return [(n, str(t), tip) for n, t, tip in zip(names, types, tips)]


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").strip()


def input_row(name: str, spec: tuple) -> str:
    """One Markdown table row: name, type, default, range, tooltip."""
    kind = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if isinstance(kind, (list, tuple)) and (not kind or list(kind) == ["none"] or any(
            str(c).endswith((".safetensors", ".ckpt", ".pt", "/")) for c in kind)):
        kind_s, rng = "choice", "a file in ComfyUI's model list"  # filled by ComfyUI at run time
    elif isinstance(kind, (list, tuple)):
        shown = ", ".join(f"`{c}`" for c in list(kind)[:8]) + (", …" if len(kind) > 8 else "")
        kind_s, rng = "choice", shown or "ComfyUI's file list"
    else:
        kind_s = str(kind)
        lo, hi = opts.get("min"), opts.get("max")
        rng = f"{lo} … {hi}" if lo is not None or hi is not None else "—"
    default = opts.get("default", "—")
    default = "(empty)" if default == "" else default
    return f"| `{name}` | {kind_s} | {_cell(default)} | {_cell(rng)} | {_cell(opts.get('tooltip', ''))} |"


def output_row(name: str, kind: str, tip: str) -> str:
    return f"| `{name}` | {kind} | {_cell(tip)} |"


def skeleton(node_id: str, cls, display: str) -> str:
    """A new page from the node's own metadata (the example and pitfalls are left for a person to write)."""
    rows_in = "\n".join(input_row(n, s) for n, s in inputs(cls).items())
    rows_out = "\n".join(output_row(*o) for o in outputs(cls)) or "| (none: output node) | | |"
    return (f"# {display}\n\n{getattr(cls, 'DESCRIPTION', '')}\n\n"
            f"## Inputs\n\n| Input | Type | Default | Range | What it does |\n|---|---|---|---|---|\n{rows_in}\n\n"
            f"## Outputs\n\n| Output | Type | What it is |\n|---|---|---|\n{rows_out}\n")


def named(page: str, name: str) -> bool:
    """Whether the page names ``name`` in backticks."""
    return re.search(rf"`{re.escape(name)}`", page) is not None


def gaps() -> dict[str, dict]:
    """``{node_id: {"page": missing?, "inputs": [...], "outputs": [...]}}`` for every node with a gap."""
    classes, _ = node_classes()
    out = {}
    for node_id, cls in classes.items():
        p = DOCS / f"{node_id}.md"
        if not p.exists():
            out[node_id] = {"page": True, "inputs": list(inputs(cls)), "outputs": [o[0] for o in outputs(cls)]}
            continue
        text = p.read_text(encoding="utf-8")
        mi = [n for n in inputs(cls) if not named(text, n)]
        mo = [o[0] for o in outputs(cls) if not named(text, o[0])]
        if mi or mo:
            out[node_id] = {"page": False, "inputs": mi, "outputs": mo}
    return out


def _insert_rows(text: str, heading: str, rows: list[str]) -> str:
    """Append rows at the end of the first table under ``## <heading>`` (a new section if there is none)."""
    m = re.search(rf"^## {heading}\s*$", text, flags=re.M)
    if not m:
        head = "| Input | Type | Default | Range | What it does |\n|---|---|---|---|---|" if heading == "Inputs" \
            else "| Output | Type | What it is |\n|---|---|---|"
        return text.rstrip() + f"\n\n## {heading}\n\n{head}\n" + "\n".join(rows) + "\n"
    lines = text[m.end():].split("\n")
    last = None
    for i, line in enumerate(lines):
        if line.startswith("|"):
            last = i
        elif last is not None and line.strip() == "":
            break
        elif line.startswith("## "):
            break
    at = (last + 1) if last is not None else 1
    lines[at:at] = rows
    return text[: m.end()] + "\n".join(lines)


def fill() -> list[str]:
    """Write missing pages / rows; returns the changed files."""
    classes, display = node_classes()
    changed = []
    DOCS.mkdir(parents=True, exist_ok=True)
    for node_id, g in gaps().items():
        cls = classes[node_id]
        p = DOCS / f"{node_id}.md"
        if g["page"]:
            p.write_text(skeleton(node_id, cls, display.get(node_id, node_id)), encoding="utf-8")
        else:
            text = p.read_text(encoding="utf-8")
            spec = inputs(cls)
            if g["inputs"]:
                text = _insert_rows(text, "Inputs", [input_row(n, spec[n]) for n in g["inputs"]])
            if g["outputs"]:
                outs = {o[0]: o for o in outputs(cls)}
                text = _insert_rows(text, "Outputs", [output_row(*outs[n]) for n in g["outputs"]])
            p.write_text(text, encoding="utf-8")
        changed.append(str(p.relative_to(REPO)))
    return changed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fill", action="store_true", help="write missing pages and rows")
    a = ap.parse_args(argv)
    if a.fill:
        for f in fill():
            print("wrote", f)
        return 0
    g = gaps()
    for node_id, v in g.items():
        what = "no page" if v["page"] else f"unnamed inputs {v['inputs']} outputs {v['outputs']}"
        print(f"{node_id}: {what}")
    return 1 if g else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO.parent))
    sys.exit(main())
