"""Help pages and registry metadata.

Every node (read live from NODE_CLASS_MAPPINGS, so nodes and inputs added later are checked too) has
``web/docs/<NodeId>.md`` naming every input and output in backticks; ``tests/tools/help_pages.py --fill`` writes
what is missing. Real-ComfyUI tier: a ComfyUI server serves each page at the URL its frontend (1.27,
``NodeHelpService.fetchCustomNodeHelp``) builds from ``/object_info``'s ``python_module``.
"""

from __future__ import annotations

import re
import sys
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "tools"))

import help_pages as H  # noqa: E402

SECTIONS = ("## Inputs", "## Outputs", "## Example", "## Pitfalls")


def _toml():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def test_web_directory_is_the_docs_folder():
    import conceptlab

    web = (REPO / conceptlab.WEB_DIRECTORY).resolve()
    assert web == (REPO / "web").resolve() and (web / "docs").is_dir()
    # ComfyUI loads every .js under WEB_DIRECTORY as a frontend extension: there is none
    assert not list(web.rglob("*.js"))


def test_every_node_has_a_page_naming_every_input_and_output():
    classes, display = H.node_classes()
    problems = []
    for node_id, cls in classes.items():
        page = H.DOCS / f"{node_id}.md"
        if not page.exists():
            problems.append(f"{node_id}: no page web/docs/{node_id}.md")
            continue
        text = page.read_text(encoding="utf-8")
        for name in H.inputs(cls):
            if not H.named(text, name):
                problems.append(f"{node_id}: input `{name}` not named")
        for name, _, _ in H.outputs(cls):
            if not H.named(text, name):
                problems.append(f"{node_id}: output `{name}` not named")
        for s in SECTIONS:
            if not re.search(rf"^{re.escape(s)}\s*$", text, flags=re.M):
                problems.append(f"{node_id}: section {s!r} missing")
        if not text.startswith(f"# {display.get(node_id, node_id)}\n"):
            problems.append(f"{node_id}: the page should start with '# {display.get(node_id, node_id)}'")
    assert not problems, "run `python tests/tools/help_pages.py --fill` and write the rest:\n" + "\n".join(problems)


def test_no_page_without_a_node_and_links_resolve():
    classes, _ = H.node_classes()
    pages = sorted(H.DOCS.glob("*.md"))
    assert {p.stem for p in pages} <= set(classes), "a page for a node that does not exist"
    readme = (REPO / "README.md").read_text(encoding="utf-8")

    def anchor(h):  # GitHub's heading anchors
        return re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")

    anchors = {anchor(h) for h in re.findall(r"^#{1,6} (.+)$", readme, flags=re.M)}
    for p in pages:
        for target in re.findall(r"\]\(([^)]+)\)", p.read_text(encoding="utf-8")):
            # the frontend resolves relative links against /extensions/<pack>/docs/: only absolute links here
            assert target.startswith(("https://", "#")), f"{p.name}: relative link {target}"
            m = re.match(r"https://github\.com/concept-lab/comfyui-conceptlab#(.+)$", target)
            if m:
                assert m[1] in anchors, f"{p.name}: README has no section #{m[1]}"


def test_registry_metadata():
    from PIL import Image

    t = _toml()
    comfy = t["tool"]["comfy"]
    m = re.fullmatch(r"https://raw\.githubusercontent\.com/concept-lab/comfyui-conceptlab/main/(.+)", comfy["Icon"])
    assert m, "Icon must be the raw URL of a file shipped in this repo"
    icon = REPO / m[1]
    with Image.open(icon) as im:
        assert im.format == "PNG" and im.width <= 800 and im.height <= 400
    assert icon.stat().st_size < 50_000
    # comfy-cli's validate_version pattern for requires-comfyui
    assert re.fullmatch(r"(==|>=|<=|!=|~=|>|<)?\s*\d+\.\d+\.\d+", comfy["requires-comfyui"])
    cls = t["project"]["classifiers"]
    assert any(c.startswith("Operating System :: ") for c in cls)
    assert any(c.startswith("Environment :: GPU :: ") for c in cls)
    assert any("web/docs/*.md" in g for g in t["tool"]["setuptools"]["package-data"]["conceptlab"])


# ------------------------------------------------------------------------------------------------ real ComfyUI
from e2e.fixtures import comfy_server  # noqa: E402,F401  (pytest fixture)


def test_comfyui_serves_every_page_where_the_frontend_looks(comfy_server):  # noqa: F811
    info = comfy_server.object_info()
    ours = {k: v for k, v in info.items() if k.startswith("ConceptLab")}
    classes, _ = H.node_classes()
    assert set(classes) <= set(ours)
    for node_id, d in ours.items():
        mod = d["python_module"].split(".")
        assert mod[0] == "custom_nodes"
        # frontend 1.27 extractCustomNodeName + fetchCustomNodeHelp: /extensions/<module[1] before '@'>/docs/<id>.md
        url = f"{comfy_server.url}/extensions/{mod[1].split('@')[0]}/docs/{node_id}.md"
        with urllib.request.urlopen(url, timeout=30) as r:
            assert r.status == 200
            assert r.read().decode("utf-8") == (H.DOCS / f"{node_id}.md").read_text(encoding="utf-8")
    with urllib.request.urlopen(f"{comfy_server.url}/extensions", timeout=30) as r:
        assert not [e for e in __import__("json").loads(r.read()) if "/docs/" in e]
