"""Caption audit: parser, every finding code, dataset scanning, the fix, the CLI and bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conceptlab.metrics import caption_colours, caption_fix, caption_parse
from conceptlab.metrics import captions as cap
from conceptlab.metrics import color
from conftest import comfyui_path, requires_comfyui

EXAMPLE = ("pixel art, green hair (#03dc73), background (#03DC73), palette: #03dc73, #2c1600, "
           "retro pixel art style, #f7d7c0")


def codes(findings):
    return [f.code for f in findings]


def by_code(findings, code):
    return [f for f in findings if f.code == code]


# ------------------------------------------------------------------------------------------------ parser


def test_parse_example_caption():
    p = caption_parse.parse_caption(EXAMPLE)
    assert p.labelled == [("green hair", "#03dc73"), ("background", "#03dc73")]
    assert p.palette == ["#03dc73", "#2c1600"]
    assert p.stray == ["#f7d7c0"]
    assert p.malformed == []
    assert p.has_palette


def test_parse_palette_rules_and_parentheses():
    p = caption_parse.parse_caption("a, cape (#112233, #445566), color palette: #aabbcc #DDEEFF; #000000, "
                          "#ffffff, style words, #123456, palette: warm tones")
    assert p.labelled == [("cape", "#112233"), ("cape", "#445566")]
    assert p.palette == ["#aabbcc", "#ddeeff", "#000000", "#ffffff"]
    assert p.stray == ["#123456"]
    # "palette: warm tones" is text, not a second (empty) palette list
    assert p.segments[-1] == "palette: warm tones"
    # a caption without any palette list
    q = caption_parse.parse_caption("hair (#010203), #040506")
    assert not q.has_palette and q.stray == ["#040506"]


@pytest.mark.parametrize("token,expect_hex,expect_suggestion", [
    ("#03dc73", "#03dc73", None),
    ("#03DC73", "#03dc73", None),
    ("#12345", None, None),
    ("#GGGGGG", None, None),
    ("#1234567", None, None),
    ("#abc", "#aabbcc", None),   # the CSS shorthand is a colour (README), expanded
    ("#ABCD", "#aabbcc", None),  # #rgba: alpha trimmed
    ("#03dc73ff", "#03dc73", None),  # #rrggbbaa: alpha trimmed, not dropped
    ("03dc73", None, "#03dc73"),
    ("##03dc73", None, "#03dc73"),
])
def test_normalize_hex(token, expect_hex, expect_suggestion):
    assert caption_parse.normalize_hex(token) == (expect_hex, expect_suggestion)
    if expect_hex:  # agrees with the colour module's parser
        assert color.rgb_to_hex(color.parse_hex(token)) == expect_hex


def test_parse_malformed_tokens_keep_their_role():
    p = caption_parse.parse_caption("eyes (#12345), cape (03dc73), palette: #GGGGGG, #2c1600")
    roles = {t.raw: t.role for t in p.tokens}
    assert roles == {"#12345": "labelled", "03dc73": "labelled", "#GGGGGG": "palette", "#2c1600": "palette"}
    assert sorted(p.malformed) == sorted(["#12345", "03dc73", "#GGGGGG"])
    assert [t.feature for t in p.tokens if t.role == "labelled"] == ["eyes", "cape"]


def test_parse_never_raises_on_odd_text():
    for text in ["", ",,,", "(((", "#", "palette:", "\ufffd\ufffd #zz", "a" * 10000 + " (#000000)"]:
        p = caption_parse.parse_caption(text)
        cap.check_text(p)


# ------------------------------------------------------------------------------------ text findings


def test_duplicate_hex_exact_with_background_is_error():
    f = by_code(cap.check_text(caption_parse.parse_caption(EXAMPLE)), "duplicate_hex")
    assert len(f) == 1
    assert f[0].severity == "error" and f[0].data["background"] is True
    assert {f[0].feature, f[0].data["other_feature"]} == {"green hair", "background"}


def test_duplicate_hex_near_threshold_uses_delta_e00():
    base = "#03dc73"
    near, far = "#04dd74", "#2c1600"
    d_near = caption_colours.delta_e00_hex(base, near)
    d_far = caption_colours.delta_e00_hex(base, far)
    assert d_near < 2 < d_far
    found = cap.check_text(caption_parse.parse_caption(f"hair ({base}), cape ({near}), boots ({far})"))
    dup = by_code(found, "duplicate_hex")
    assert len(dup) == 1 and dup[0].severity == "warning"
    assert dup[0].data["delta_e00"] == pytest.approx(d_near, abs=1e-3)
    # raising the threshold above the far pair's ΔE00 catches it too
    found = cap.check_text(caption_parse.parse_caption(f"hair ({base}), cape ({near}), boots ({far})"),
                           duplicate_de=d_far + 1)
    assert len(by_code(found, "duplicate_hex")) == 3


def test_same_feature_repeated_is_not_a_duplicate():
    found = cap.check_text(caption_parse.parse_caption("hair (#03dc73), hair (#03dc73)"))
    assert "duplicate_hex" not in codes(found)


def test_unlabelled_hex():
    found = cap.check_text(caption_parse.parse_caption(EXAMPLE))
    un = by_code(found, "unlabelled_hex")
    assert [f.hex for f in un] == ["#f7d7c0"]
    assert un[0].data == {"in_palette": False, "labelled": False}


def test_palette_mismatch_both_directions():
    found = cap.check_text(caption_parse.parse_caption("hair (#03dc73), eyes (#2233ee), palette: #03dc73, #2c1600"))
    pm = by_code(found, "palette_mismatch")
    dirs = {(f.hex, f.data["direction"]) for f in pm}
    assert dirs == {("#2233ee", "labelled_not_in_palette"), ("#2c1600", "palette_not_labelled")}
    # no palette list: nothing to mismatch
    assert "palette_mismatch" not in codes(cap.check_text(caption_parse.parse_caption("hair (#03dc73)")))


def test_name_hex_mismatch():
    blue = "#2233ee"
    assert color.color_family(blue) == "Blue"
    found = cap.check_text(caption_parse.parse_caption(f"red eyes ({blue}), blue cape ({blue}), boots ({blue})"))
    nm = by_code(found, "name_hex_mismatch")
    assert [f.feature for f in nm] == ["red eyes"]
    assert nm[0].data["word_family"] == "Red" and nm[0].data["hex_family"] == "Blue"
    # adjacent families (a "blue" that is really a bit purple) are not flagged
    purple = "#6a3dd8"
    assert color.families_compatible("Blue", str(color.color_family(purple)))
    assert not by_code(cap.check_text(caption_parse.parse_caption(f"blue cape ({purple})")), "name_hex_mismatch")


def test_malformed_hex_findings():
    found = cap.check_text(caption_parse.parse_caption("eyes (#12345), palette: #GGGGGG, #2c1600, #abc"))
    mf = by_code(found, "malformed_hex")
    assert [f.data["raw"] for f in mf] == ["#12345", "#GGGGGG"]
    assert all(f.severity == "error" for f in mf)
    assert [f.data["suggestion"] for f in mf] == [None, None]


def test_clean_caption_has_no_findings():
    text = "pixel art, hair (#03dc73), background (#2c1600), palette: #03dc73, #2c1600, retro pixel art style"
    assert cap.check_text(caption_parse.parse_caption(text)) == []


def test_every_code_documented():
    assert set(cap.FINDING_CODES) >= {"duplicate_hex", "unlabelled_hex", "palette_mismatch", "absent_from_image",
                                      "image_color_not_captioned", "name_hex_mismatch", "malformed_hex"}
    for code, (sev, meaning) in cap.FINDING_CODES.items():
        assert sev in cap.SEVERITIES and meaning


# ------------------------------------------------------------------------------------ image findings


def _colours_from_native(native: np.ndarray) -> caption_colours.ImageColours:
    """ImageColours straight from a native-resolution image (each distinct colour its own cluster)."""
    flat = native.reshape(-1, 3)
    uniq, counts = np.unique(flat, axis=0, return_counts=True)
    lab = color.srgb_to_lab(uniq)
    clusters = sorted(((color.rgb_to_hex(u), c / flat.shape[0], l) for u, c, l in zip(uniq, counts, lab)),
                      key=lambda t: -t[1])
    return caption_colours.ImageColours(cell_lab=lab, cell_counts=counts, clusters=clusters,
                            cell_hex=[color.rgb_to_hex(u) for u in uniq])


def _native(bg="#2c1600", fg="#03dc73", small="#f7d7c0", small_cells=10, fg_cells=100, n=24):
    """``n×n`` native image: ``fg_cells`` / ``small_cells`` cells of two colours scattered (seeded) on ``bg``,
    so the upscaled render has cell edges everywhere for the grid detector."""
    img = np.empty((n * n, 3), dtype=np.uint8)
    img[:] = color.parse_hex(bg)
    idx = np.random.default_rng(7).permutation(n * n)
    img[idx[:fg_cells]] = color.parse_hex(fg)
    img[idx[fg_cells:fg_cells + small_cells]] = color.parse_hex(small)
    return img.reshape(n, n, 3)


def test_absent_from_image_uses_tolerance():
    native = _native()
    colours = _colours_from_native(native)
    near = "#06df76"  # a hair off the real hair colour
    d = caption_colours.delta_e00_hex(near, "#03dc73")
    assert 0 < d < 5
    text = f"hair ({near}), cape (#ee1111), background (#2c1600), palette: {near}, #ee1111, #2c1600"
    found = cap.check_image(caption_parse.parse_caption(text), colours)
    ab = by_code(found, "absent_from_image")
    assert [f.hex for f in ab] == ["#ee1111"]
    assert ab[0].feature == "cape" and ab[0].data["nearest_delta_e00"] > 5
    # a tolerance below the hair's ΔE00 flags it as absent as well
    found = cap.check_image(caption_parse.parse_caption(text), colours, tolerance=d / 2)
    assert {f.hex for f in by_code(found, "absent_from_image")} == {"#ee1111", near}


def test_image_color_not_captioned_threshold():
    native = _native(small_cells=30)  # 30/576 = 5.2 % of cells
    colours = _colours_from_native(native)
    text = "hair (#03dc73), background (#2c1600)"
    found = cap.check_image(caption_parse.parse_caption(text), colours)
    nc = by_code(found, "image_color_not_captioned")
    assert [f.hex for f in nc] == ["#f7d7c0"]
    assert nc[0].data["fraction"] == pytest.approx(30 / 576, abs=1e-4)
    # a colour below 3 % of cells does not need a caption hex
    small = _colours_from_native(_native(small_cells=10))
    assert not by_code(cap.check_image(caption_parse.parse_caption(text), small), "image_color_not_captioned")
    # captioning it (within tolerance) clears the finding
    ok = cap.check_image(caption_parse.parse_caption(text + ", skin (#f6d6c1)"), colours)
    assert not by_code(ok, "image_color_not_captioned")


# ------------------------------------------------------------------------------------ dataset


def _save_upscaled(path: Path, native: np.ndarray, size: int = 384):
    Image.fromarray(native).resize((size, size), Image.NEAREST).save(path)


def _dataset(root: Path) -> Path:
    """A kohya-layout dataset holding one example of every file-level problem."""
    sub = root / "10_hero"
    sub.mkdir(parents=True)
    _save_upscaled(sub / "good.png", _native())
    (sub / "good.txt").write_text("pixel art, hair (#03dc73), skin (#f7d7c0), background (#2c1600), "
                                  "palette: #03dc73, #f7d7c0, #2c1600\n", encoding="utf-8")
    _save_upscaled(sub / "dup.png", _native())
    (sub / "dup.txt").write_text(EXAMPLE + "\n", encoding="utf-8")
    _save_upscaled(sub / "nocap.png", _native())
    (sub / "orphan.txt").write_text("hair (#03dc73)", encoding="utf-8")
    _save_upscaled(sub / "empty.png", _native())
    (sub / "empty.txt").write_bytes(b"  \n")
    _save_upscaled(sub / "latin.png", _native())
    (sub / "latin.txt").write_bytes("caf\u00e9 hair (#03dc73), #12345".encode("latin-1"))
    (sub / "broken.png").write_bytes(b"not a png at all")
    (sub / "broken.txt").write_text("hair (#03dc73)", encoding="utf-8")
    (root / ".hidden.txt").write_text("#zzzzzz", encoding="utf-8")
    (root / "notes.md").write_text("ignored", encoding="utf-8")
    return root


def _file(report, name):
    return next(f for f in report["files"] if f["key"].endswith(name))


def test_scan_folder_kohya_layout(tmp_path):
    root = _dataset(tmp_path / "ds")
    items = {i.key: i for i in cap.scan_folder(root)}
    assert set(items) == {f"10_hero/{n}" for n in ("good", "dup", "nocap", "orphan", "empty", "latin", "broken")}
    assert items["10_hero/good"].subset == {"folder": "10_hero", "repeats": 10, "name": "hero"}
    assert items["10_hero/nocap"].caption is None and items["10_hero/orphan"].image is None
    with pytest.raises(FileNotFoundError):
        cap.scan_folder(tmp_path / "nope")
    with pytest.raises(NotADirectoryError):
        cap.scan_folder(root / "10_hero" / "good.txt")


def test_audit_folder_text_only(tmp_path):
    root = _dataset(tmp_path / "ds")
    rep = cap.audit_folder(root, images=False)
    assert rep["schema"] == cap.SCHEMA
    assert [d["code"] for d in _file(rep, "good")["findings"]] == []
    assert "duplicate_hex" in [d["code"] for d in _file(rep, "dup")["findings"]]
    assert [d["code"] for d in _file(rep, "nocap")["findings"]] == ["missing_caption"]
    assert [d["code"] for d in _file(rep, "orphan")["findings"]] == ["missing_image"]
    assert [d["code"] for d in _file(rep, "empty")["findings"]] == ["empty_caption"]
    latin = [d["code"] for d in _file(rep, "latin")["findings"]]
    assert latin[0] == "caption_not_utf8" and "malformed_hex" in latin  # still audited after replacement
    s = rep["summary"]
    assert s["items"] == 7 and s["pairs"] == 5 and s["images"] == 6 and s["captions"] == 6
    total = sum(len(f["findings"]) for f in rep["files"])
    assert s["findings"] == total == sum(s["by_code"].values()) == sum(s["by_severity"].values())
    assert set(s["by_code"]) == set(cap.FINDING_CODES)
    json.dumps(rep)  # JSON-ready


def test_read_caption_unreadable(tmp_path):
    d = tmp_path / "dir.txt"
    d.mkdir()
    text, f = cap.read_caption(d)
    assert text is None and codes(f) == ["caption_unreadable"]
    text, f = cap.read_caption(tmp_path / "missing.txt")
    assert text is None and codes(f) == ["caption_unreadable"]
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfhair (#03dc73)")
    assert cap.read_caption(tmp_path / "bom.txt") == ("hair (#03dc73)", [])
    (tmp_path / "zero.txt").write_bytes(b"")
    text, f = cap.read_caption(tmp_path / "zero.txt")
    assert text is None and codes(f) == ["empty_caption"] and "empty" in f[0].message


def test_audit_folder_rejects_bad_settings(tmp_path):
    with pytest.raises(ValueError):
        cap.audit_folder(tmp_path, tolerance=0)
    with pytest.raises(ValueError):
        cap.audit_folder(tmp_path, min_fraction=2)


# ------------------------------------------------------------------------------------ fix


def test_fix_caption_repairs_and_is_idempotent():
    text = ("pixel art, eyes (#12345), cape (03dc73), hair (#03DC73), palette: #03dc73, #GGGGGG, #abc, "
            "retro pixel art style, #f7d7c0\n")
    new, changes = caption_fix.fix_caption(text)
    assert changes and new.endswith("\n")
    p = caption_parse.parse_caption(new)
    assert p.malformed == [] and p.stray == []
    assert ("cape", "#03dc73") in p.labelled and ("eyes" in p.segments)
    assert set(p.palette) == {"#03dc73", "#aabbcc", "#f7d7c0"} and len(p.palette) == len(set(p.palette))
    left = codes(cap.check_text(p))
    for gone in ("malformed_hex", "unlabelled_hex"):
        assert gone not in left
    assert not [f for f in cap.check_text(p) if f.code == "palette_mismatch"
                and f.data["direction"] == "labelled_not_in_palette"]
    again, changes2 = caption_fix.fix_caption(new)
    assert again == new and changes2 == []
    # a clean caption is returned untouched
    clean = "hair (#03dc73), palette: #03dc73"
    assert caption_fix.fix_caption(clean) == (clean, [])


def test_fix_caption_creates_palette_for_strays():
    new, _ = caption_fix.fix_caption("hair (#03dc73), style, #f7d7c0")
    p = caption_parse.parse_caption(new)
    assert p.has_palette and p.stray == [] and set(p.palette) == {"#03dc73", "#f7d7c0"}
    assert "style" in p.segments


def test_fix_caption_snaps_absent_hex_to_image():
    colours = _colours_from_native(_native())
    off = "#30c080"  # close to the real #03dc73 but outside ΔE00 5
    d = caption_colours.delta_e00_hex(off, "#03dc73")
    assert cap.DEFAULT_TOLERANCE < d <= cap.DEFAULT_SNAP_FIX_DE
    new, changes = caption_fix.fix_caption(f"hair ({off}), cape (#ee1111), palette: {off}, #ee1111", colours)
    p = caption_parse.parse_caption(new)
    assert ("hair", "#03dc73") in p.labelled  # snapped to the image colour
    assert ("cape", "#ee1111") in p.labelled  # too far from anything: left for a person
    assert any("nearest image colour" in c for c in changes)


def test_fix_folder_writes_new_folder_only(tmp_path):
    root = _dataset(tmp_path / "ds")
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    out = tmp_path / "fixed"
    res = caption_fix.fix_folder(root, out, images=False, copy_images=True)
    after = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert before == after  # dataset untouched
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.txt"))
    assert written == ["10_hero/broken.txt", "10_hero/dup.txt", "10_hero/good.txt", "10_hero/orphan.txt"]
    assert res["written"] == 4
    assert {s["caption"]: s["reason"] for s in res["skipped"]} == {
        "10_hero/empty.txt": "empty_caption", "10_hero/latin.txt": "caption_not_utf8"}
    assert [c["caption"] for c in res["changed"]] == ["10_hero/dup.txt"]
    assert (out / "10_hero" / "good.png").read_bytes() == (root / "10_hero" / "good.png").read_bytes()
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temp files left
    fixed = cap.audit_folder(out, images=False)
    assert fixed["summary"]["by_code"]["unlabelled_hex"] == 0
    assert fixed["summary"]["by_code"]["duplicate_hex"] == 1  # needs a person: left as is


def test_fix_folder_refuses_in_place_and_non_empty(tmp_path):
    root = _dataset(tmp_path / "ds")
    for bad in (root, root / "10_hero", tmp_path):
        with pytest.raises(ValueError, match="fix-to"):
            caption_fix.fix_folder(root, bad)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="not an empty folder"):
        caption_fix.fix_folder(root, tmp_path / "full")
    assert not (tmp_path / "ds" / "10_hero" / "10_hero").exists()


# ------------------------------------------------------------------------------------ CLI


def test_cli_json_and_errors(tmp_path, capsys):
    from conceptlab.cli import main

    root = _dataset(tmp_path / "ds")
    assert main(["audit-captions", str(root), "--json", "--no-images"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert set(rep) == {"schema", "root", "settings", "summary", "files", "fix"}
    assert rep["fix"] is None
    for f in rep["files"]:
        assert set(f) == {"key", "caption", "image", "subset", "parsed", "grid", "findings"}
        for d in f["findings"]:
            assert set(d) == {"code", "severity", "message", "feature", "hex", "data"}
    assert main(["audit-captions", str(root), "--no-images", "--fail-on", "error"]) == 3
    out = capsys.readouterr().out
    assert "duplicate_hex" in out and "findings in" in out
    assert main(["audit-captions", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["audit-captions", str(root), "--no-images", "--fix-to", str(root)]) == 2
    assert "NEW folder" in capsys.readouterr().err
    assert main(["audit-captions", str(root), "--no-images", "--json", "--fix-to", str(tmp_path / "o")]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["fix"]["written"] == 4


# ------------------------------------------------------------------------------------ node


def test_node_contract():
    from conceptlab.nodes.captions import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    cls = NODE_CLASS_MAPPINGS["ConceptLabCaptionAudit"]
    assert NODE_DISPLAY_NAME_MAPPINGS["ConceptLabCaptionAudit"] == "Caption Audit"
    assert cls.CATEGORY == "Concept Lab/Captions" and cls.DESCRIPTION
    assert cls.RETURN_TYPES == ("STRING", "IMAGE") and len(cls.OUTPUT_TOOLTIPS) == 2
    spec = cls.INPUT_TYPES()
    for group in spec.values():
        for name, (typ, opts) in group.items():
            assert opts.get("tooltip"), name
    assert callable(getattr(cls(), cls.FUNCTION))


def test_node_runs_inside_input_folder_only(tmp_path, monkeypatch):
    from conceptlab.nodes import comfy_io
    from conceptlab.nodes.captions import ConceptLabCaptionAudit

    inp, outp = tmp_path / "input", tmp_path / "output"
    _dataset(inp / "ds")
    outp.mkdir()
    monkeypatch.setattr(comfy_io, "input_dir", lambda: inp)
    monkeypatch.setattr(comfy_io, "output_dir", lambda: outp)
    node = ConceptLabCaptionAudit()
    report, table = node.audit("ds", check_images=False, fix_to="ds_fixed")
    rep = json.loads(report)
    assert rep["root"] == "ds" and rep["summary"]["items"] == 7
    assert rep["fix"]["out_dir"] == "ds_fixed" and (outp / "ds_fixed" / "10_hero" / "good.txt").is_file()
    assert table.ndim == 4 and table.shape[0] == 1 and table.shape[-1] == 3
    assert float(table.min()) >= 0 and float(table.max()) <= 1
    for bad in ("../", "/etc", "ds/../../x"):
        with pytest.raises(ValueError):
            node.audit(bad, check_images=False)
    with pytest.raises(FileNotFoundError):
        node.audit("missing", check_images=False)
    with pytest.raises(ValueError):
        node.audit("ds", check_images=False, fix_to="../escape")


def test_render_table_sizes():
    rep = {"files": [{"key": f"k{i}", "caption": f"c{i}.txt", "image": None,
                      "findings": [{"code": "missing_image", "severity": "warning"}]} for i in range(60)]}
    rep["summary"] = cap.summarize([{**f, "image": None} for f in rep["files"]])
    a = cap.render_table(rep, max_rows=10)
    b = cap.render_table({"files": [], "summary": cap.summarize([])})
    assert a.dtype == np.uint8 and a.shape[1] == 1200 and a.shape[0] > b.shape[0]


# ------------------------------------------------------------------------------------ end to end with images


def test_audit_caption_on_fractional_render():
    """Image findings through real grid detection + snapping: 24 cells at 512 px (21.33 px per cell)."""
    native = _native(small_cells=40)
    render = np.asarray(Image.fromarray(native).resize((512, 512), Image.NEAREST))
    text = "hair (#03dc73), cape (#ee1111), background (#2c1600), palette: #03dc73, #ee1111, #2c1600"
    parsed, found = cap.audit_caption(text, render)
    assert [f.hex for f in by_code(found, "absent_from_image")] == ["#ee1111"]
    assert [f.hex for f in by_code(found, "image_color_not_captioned")] == ["#f7d7c0"]
    colours = caption_colours.image_colours(render)
    # the grid is the palette module's business; a finer multiple snaps to the same colours
    assert colours.grid["cells_x"] % 24 == 0 and colours.grid["cells_y"] % 24 == 0
    assert sum(f for _, f, _ in colours.clusters) == pytest.approx(1.0)


def test_audit_folder_with_images(tmp_path):
    root = _dataset(tmp_path / "ds")
    rep = cap.audit_folder(root)
    assert [d["code"] for d in _file(rep, "good")["findings"]] == []
    assert _file(rep, "good")["grid"]["cells_x"] % 24 == 0
    assert [d["code"] for d in _file(rep, "broken")["findings"]] == ["image_unreadable"]
    assert "cannot read image broken.png" in _file(rep, "broken")["findings"][0]["message"]
    # dup.txt never names the image's skin colour (100/576 cells are hair, 10 cells skin: below 3 %)
    assert "image_color_not_captioned" not in [d["code"] for d in _file(rep, "dup")["findings"]]
    assert rep["summary"]["by_code"]["image_unreadable"] == 1


@pytest.mark.comfyui
@requires_comfyui
def test_node_in_real_comfyui(tmp_path):
    """Real ComfyUI tier: folder_paths input/output folders + ComfyUI's ProgressBar, in a subprocess
    (ComfyUI's top-level module names must not leak into this test process)."""
    import subprocess
    import sys

    cp = comfyui_path()
    inp, outp = tmp_path / "input", tmp_path / "output"
    _dataset(inp / "ds")
    outp.mkdir()
    code = f"""
import sys, json
sys.argv = ['x', '--cpu']
sys.path.insert(0, {str(cp)!r})
import comfy.options; comfy.options.enable_args_parsing()
import folder_paths
folder_paths.set_input_directory({str(inp)!r}); folder_paths.set_output_directory({str(outp)!r})
from conceptlab.nodes.captions import ConceptLabCaptionAudit
report, table = ConceptLabCaptionAudit().audit('ds', True, 5.0, 'fixed')
print(json.dumps({{"summary": json.loads(report)["summary"], "shape": list(table.shape)}}))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["summary"]["items"] == 7 and out["shape"][0] == 1 and out["shape"][-1] == 3
    assert (outp / "fixed" / "10_hero" / "good.txt").is_file()


# ------------------------------------------------------------------------------------ issue 13


def test_hashtags_are_not_hex_and_survive_the_fix():
    text = "sprite #1, knight #pixelart #gamedev, hair (#03dc73), palette: #03dc73, #retro"
    p = caption_parse.parse_caption(text)
    assert p.malformed == [] and p.all_hexes() == ["#03dc73"]
    assert "malformed_hex" not in codes(cap.check_text(p))
    new, _ = caption_fix.fix_caption(text)
    for tag in ("#1", "#pixelart", "#gamedev", "#retro"):
        assert tag in new


def test_rgba_hex_is_trimmed_not_dropped():
    p = caption_parse.parse_caption("hair (#03DC73FF), palette: #03dc7380")
    assert p.labelled == [("hair", "#03dc73")] and p.palette == ["#03dc73"]
    new, changes = caption_fix.fix_caption("hair (#03DC73FF), palette: #03dc73")
    assert "#03dc73" in new and "ff" not in new.lower().replace("#03dc73", "") and changes


def test_self_named_css_colours_do_not_contradict_themselves():
    for word, hx in (("azure", "#f0ffff"), ("beige", "#f5f5dc"), ("lavender", "#e6e6fa")):
        found = cap.check_text(caption_parse.parse_caption(f"{word} cape ({hx})"))
        assert "name_hex_mismatch" not in codes(found), (word, found)
    assert "name_hex_mismatch" in codes(cap.check_text(caption_parse.parse_caption("azure cape (#ff0000)")))


def test_long_caption_does_not_blow_up():
    """A 1.2 MB caption of 60,000 labelled hexes (the n×n ΔE00 matrix used to need 29 GB here, 292 GiB at
    5 MB): distinct pairs only and a KD-tree, bounded memory."""
    import time
    import tracemalloc

    rng = np.random.default_rng(0)
    parts = [f"part{i} (#{rng.integers(0, 1 << 24):06x})" for i in range(60_000)]
    text = ", ".join(parts)
    assert len(text) > 1_000_000
    tracemalloc.start()
    t = time.process_time()
    found = cap.check_text(caption_parse.parse_caption(text))
    cpu = time.process_time() - t
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    dup = [f for f in found if f.code == "duplicate_hex"]
    assert 0 < len(dup) <= cap.MAX_DUPLICATE_FINDINGS + 1 and dup[-1].data.get("truncated")
    assert peak < 1 << 30 and cpu < 120


def test_transparent_image_one_rule(tmp_path):
    """Transparent pixels are no colour: the audit never reports '#000000 not captioned' for them, and the
    palette report calls a transparent background 'transparent' (one rule for both)."""
    from PIL import Image

    from conceptlab.metrics.palette import palette_report

    rgba = np.zeros((192, 192, 4), np.uint8)
    rgba[48:144, 48:144] = (200, 40, 40, 255)
    rgba[80:112, 80:112] = (40, 40, 200, 255)
    path = tmp_path / "s.png"
    Image.fromarray(np.kron(rgba[::16, ::16], np.ones((16, 16, 1), np.uint8))).save(path)
    colours = caption_colours.image_colours(caption_colours.load_rgb(path))
    hexes = {h for h, _, _ in colours.clusters}
    assert hexes == {"#c82828", "#2828c8"}
    found = cap.check_image(caption_parse.parse_caption("body (#c82828), eyes (#2828c8)"), colours)
    assert found == []
    with Image.open(path) as im:
        rep = palette_report(im)
    assert rep["background"]["name"] == "transparent" and rep["background"]["hex"] is None
    assert {c["hex"] for c in rep["clusters"]} == {"#c82828", "#2828c8"}
    rep = palette_report(Image.open(path), matte="#000000")  # --matte: composited, then a colour
    assert rep["background"]["hex"] == "#000000"
