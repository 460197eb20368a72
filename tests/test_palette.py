"""Palette report, extraction, quantization, CLI and nodes, on synthetic renders of real DawnLike sprites
(CC-BY 4.0, DragonDePlatino & DawnBringer) with known truth, plus a bad-input suite."""

from __future__ import annotations

import json
import random
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from conceptlab.cli import main as cli_main
from conceptlab.metrics.color import MalformedHexError, delta_e00_rgb, parse_hex
from conceptlab.metrics.palette import extract_palette, palette_report, quantize, to_rgb
from conceptlab.metrics.palette_synth import DB16_DAWNLIKE, cuts_match, load_sprite, make_render, render_cuts


@pytest.fixture(scope="module")
def fixtures(dawnlike_dir):
    """30 degraded renders: 24×24 canvas (background = a DB16 colour), 512 px, random phase, blur σ 0.5–1.5,
    noise σ 2–6, JPEG q 75–95."""
    files = sorted(dawnlike_dir.glob("*.png"))
    rng = random.Random(21)
    out = []
    w = 512 / 24
    for i, f in enumerate(rng.sample(files, 30)):
        bg = parse_hex(rng.choice(DB16_DAWNLIKE))
        r = make_render(load_sprite(f), bg, (24, 24), (512, 512), (rng.uniform(0, w), rng.uniform(0, w)),
                        blur=rng.uniform(0.5, 1.5), noise=rng.uniform(2, 6), jpeg=rng.randint(75, 95), seed=i)
        out.append((r, palette_report(r.image, targets=list(DB16_DAWNLIKE), expected_background=bg)))
    return out


def test_background_within_2_on_95pct(fixtures):
    ok = sum(rep["background"]["delta_e00_to_expected"] <= 2.0 for _, rep in fixtures)
    assert ok / len(fixtures) >= 0.95


def test_in_palette_on_db16_and_exact_hex_fails(fixtures):
    fr = np.array([rep["in_palette_frac"] for _, rep in fixtures])
    exact = np.array([rep["exact_hex_frac"] for _, rep in fixtures])
    assert (fr >= 0.95).mean() >= 0.95
    # the naive metric: exact hex matches of render pixels — the seed's false negatives
    assert exact.mean() < 0.5 and (exact < 0.95).all()


def test_effective_colors_match_truth_and_raw_count_is_inflated(fixtures):
    good = 0
    for r, rep in fixtures:
        truth = len(r.colors)
        good += abs(rep["effective_colors_95"] - truth) <= 2 or rep["effective_colors"] == truth
        assert rep["unique_colors"] > 10 * truth
    assert good / len(fixtures) >= 0.9


def test_report_keys_and_missing_targets(fixtures):
    r, _ = fixtures[0]
    rep = palette_report(r.image, targets="#ff00ff," + ",".join(r.colors))
    for k in ("grid", "unique_colors", "effective_colors", "background", "in_palette_frac", "palette_coverage",
              "delta_e00_mean", "delta_e00_p90", "missing", "extraneous", "at_tolerance", "cleanliness"):
        assert k in rep
    for k in ("cells_x", "cells_y", "cell_w", "cell_h", "phase", "confidence"):
        assert k in rep["grid"]
    assert set(rep["background"]) >= {"hex", "name", "family"}
    assert rep["missing"] == ["#ff00ff"]
    assert set(rep["at_tolerance"]) == {"2.3", "5", "10"}
    json.dumps(rep)  # JSON-ready


def test_extraneous_colour_detected(dawnlike_dir):
    sp = load_sprite(sorted(dawnlike_dir.glob("*.png"))[50])
    r = make_render(sp, (255, 0, 255), (24, 24), (512, 512), (0, 0))
    sprite_cols = [c for c in r.colors if c != "#ff00ff"]
    rep = palette_report(r.image, targets=sprite_cols)
    assert any(e["hex"] == "#ff00ff" for e in rep["extraneous"])
    assert rep["in_palette_frac"] < 0.9


def test_cleanliness_flags_misaligned_grid(fixtures):
    r, rep = fixtures[1]
    bad = palette_report(r.image, cells=17)
    assert bad["cleanliness"]["mixed_cells_frac"] > rep["cleanliness"]["mixed_cells_frac"]
    assert bad["cleanliness"]["pixel_perfect_frac"] < rep["cleanliness"]["pixel_perfect_frac"]


def test_isolated_cells():
    nat = np.zeros((8, 8, 3), np.uint8)
    nat[4, 4] = (255, 255, 255)
    img = np.repeat(np.repeat(nat, 10, 0), 10, 1)
    rep = palette_report(img, cells=8)
    assert rep["cleanliness"]["isolated_cells"] == 1
    assert rep["background"]["family"] == "Black"


@pytest.mark.parametrize("method", ["kmeans", "mediancut", "maxcoverage", "fastoctree"])
def test_extract_palette_recovers_colours(fixtures, method):
    r, _ = fixtures[2]
    k = len(r.colors)
    pal = extract_palette(r.native, k, method)
    assert 1 <= len(pal) <= k
    assert abs(sum(p["frac"] for p in pal) - 1) < 1e-3
    if method == "kmeans":
        truth = [parse_hex(c) for c in r.colors]
        d = delta_e00_rgb(np.array([p["rgb"] for p in pal], np.uint8)[:, None], np.array(truth, np.uint8)[None])
        assert (d.min(0) < 3).mean() >= 0.8  # most true colours found
        assert extract_palette(r.native, k, method, seed=0) == pal  # seeded


def test_quantize_to_palette_and_k(fixtures):
    r, _ = fixtures[3]
    q = quantize(r.image, list(r.colors))
    assert {"#%02x%02x%02x" % tuple(c) for c in np.unique(q.reshape(-1, 3), axis=0)} <= set(r.colors)
    q2 = quantize(r.image, k=4)
    assert len(np.unique(q2.reshape(-1, 3), axis=0)) <= 4
    with pytest.raises(ValueError):
        quantize(r.image)
    with pytest.raises(ValueError):
        extract_palette(r.native, 0)


# ---------------------------------------------------------------------------------------------------------------
# bad / unusual input
# ---------------------------------------------------------------------------------------------------------------


def _checker(size=96, cells=12):
    nat = (np.indices((cells, cells)).sum(0) % 2).astype(np.uint8) * 200 + 20
    return np.repeat(np.repeat(nat, size // cells, 0), size // cells, 1)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "I;16", "L", "1", "RGB", "CMYK", "F", "I"])
def test_modes(mode):
    g = _checker()
    if mode == "I;16":
        im = Image.fromarray((g.astype(np.uint16) * 257))
        assert im.mode in ("I;16", "I")
    elif mode == "P":
        im = Image.fromarray((g > 100).astype(np.uint8), mode="L").convert("P")
        im.putpalette([20, 20, 20, 220, 220, 220] + [0] * 762)
        im.info["transparency"] = 0  # index 0 transparent → composited on white
    elif mode == "F":
        im = Image.fromarray(g.astype(np.float32) / 255.0)
    else:
        im = Image.fromarray(g).convert(mode)
    rgb = to_rgb(im)
    assert rgb.dtype == np.uint8 and rgb.shape == (96, 96, 3)
    rep = palette_report(im)
    assert rep["grid"]["cells_x"] == 12


def test_alpha_composited_on_matte():
    a = np.zeros((4, 4, 4), np.uint8)
    a[..., 0] = 255
    out = to_rgb(a, matte="#00ff00")
    assert tuple(out[0, 0]) == (0, 255, 0)


def test_tiny_non_square_and_errors():
    rep = palette_report(np.full((1, 1, 3), 9, np.uint8))  # no grid: cell metrics null with a reason
    assert rep["grid"]["status"] == "none" and rep["effective_colors"] is None and rep["null_reason"]
    assert rep["unique_colors"] == 1 and any("no pixel grid" in w for w in rep["warnings"])
    img = _checker(96, 12)[:, :60]
    rep = palette_report(np.stack([img] * 3, -1))
    assert rep["grid"]["cells_x"] == 8 and rep["grid"]["cells_y"] == 12
    with pytest.raises(ValueError):
        to_rgb(np.zeros((0, 5, 3), np.uint8))
    with pytest.raises(ValueError):
        to_rgb(np.zeros((5, 5, 7), np.uint8))
    with pytest.raises(MalformedHexError):
        palette_report(np.zeros((8, 8, 3), np.uint8), targets="#12345")
    with pytest.raises(MalformedHexError):
        palette_report(np.zeros((8, 8, 3), np.uint8), targets=["#GGGGGG"])


def test_8000px_bounded_memory():
    rng = np.random.default_rng(0)
    nat = rng.integers(0, 4, (100, 100), dtype=np.uint8) * 60
    big = np.repeat(np.repeat(np.stack([nat, nat // 2, 255 - nat], -1), 80, 0), 80, 1)  # 8000×8000×3
    tracemalloc.start()
    rep = palette_report(big)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert rep["grid"]["cells_x"] == 100 and rep["grid"]["cells_y"] == 100
    assert peak < 0.6 * big.nbytes  # never a full-size float copy


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------


def test_cli_json_and_caption(tmp_path, fixtures, capsys):
    r, _ = fixtures[4]
    p1, p2 = tmp_path / "a.png", tmp_path / "b.jpg"
    Image.fromarray(r.image).save(p1)
    Image.fromarray(r.image).save(p2, quality=90)
    cap = tmp_path / "a.txt"
    cap.write_text("hair (" + r.colors[0] + "), palette: " + ", ".join(r.colors) + ", #12345", encoding="utf-8")
    assert cli_main(["palette", str(p1), str(p2), "--caption", str(cap), "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for ln in lines:
        d = json.loads(ln)
        tx, ty = render_cuts(r)
        assert cuts_match(d["grid"]["cuts_x"], tx, 512, r.cell_w) and cuts_match(d["grid"]["cuts_y"], ty, 512, r.cell_h)
        assert d["grid"]["status"] == "detected" and d["in_palette_frac"] >= 0.95 and d["missing"] == []
        assert d["malformed_hex"] == ["#12345"]
    assert cli_main(["palette", str(p1), "--palette", r.colors[0], "--cells", "24"]) == 0
    out = capsys.readouterr().out  # 24 cells across at the detected phase: partial cells at both borders
    assert "21.33x21.33 px" in out and "override" in out


def test_cli_bad_inputs(tmp_path, capsys):
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    notimg = tmp_path / "n.png"
    notimg.write_text("not an image")
    empty = tmp_path / "e.txt"
    empty.write_text("")
    latin = tmp_path / "l.txt"
    latin.write_bytes("caf\xe9 #03dc73".encode("latin-1"))
    nohex = tmp_path / "h.txt"
    nohex.write_text("a sprite, retro style")
    per_file = [  # one bad image is a finding for that file: the batch goes on, the exit status is 1
        (["palette", str(tmp_path / "missing.png")], "not found"),
        (["palette", str(notimg)], "cannot read"),
        (["palette", str(tmp_path)], "folder"),
        (["palette", str(img), "--cells", "99"], "does not fit"),
    ]
    for argv, msg in per_file:
        assert cli_main(argv) == 1, argv
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, (argv, err)
    good = tmp_path / "g.png"
    Image.fromarray(np.kron(np.indices((8, 8)).sum(0) % 2 * 200, np.ones((16, 16))).astype(np.uint8)).convert("RGB").save(good)
    assert cli_main(["palette", str(notimg), str(good), "--json"]) == 1
    out = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert "error" in out[0] and out[1]["image"] == str(good) and out[1]["grid"]["cells_x"] == 8
    cases = [
        (["palette", str(img), "--palette", "#12345"], "malformed hex"),
        (["palette", str(img), "--palette", "#GGGGGG"], "malformed hex"),
        (["palette", str(img), "--caption", str(empty)], "empty"),
        (["palette", str(img), "--caption", str(latin)], "not UTF-8"),
        (["palette", str(img), "--caption", str(tmp_path / "nope.txt")], "not found"),
        (["palette", str(img), "--caption", str(nohex)], "no valid hex"),
        (["palette", str(img), "--cells", "0"], "--cells"),
        (["palette", str(img), "--matte", "#12"], "--matte"),
        (["palette", str(img), "--cluster-threshold", "0"], "--cluster-threshold"),
        (["palette-summary", str(tmp_path / "nodir")], "not found"),
    ]
    for argv, msg in cases:
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, (argv, err)


# ---------------------------------------------------------------------------------------------------------------
# nodes
# ---------------------------------------------------------------------------------------------------------------


def test_node_contracts():
    from conceptlab.nodes import palette as P

    assert set(P.NODE_CLASS_MAPPINGS) == {"ConceptLabPaletteMetrics", "ConceptLabGridSnap",
                                          "ConceptLabPaletteExtract", "ConceptLabPaletteQuantize",
                                          "ConceptLabPaletteSummary"}
    for nid, cls in P.NODE_CLASS_MAPPINGS.items():
        assert cls.CATEGORY == "Concept Lab/Palette" and cls.DESCRIPTION
        assert hasattr(cls, cls.FUNCTION)
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES)
        spec = cls.INPUT_TYPES()
        for group in spec.values():
            for name, (typ, *opts) in group.items():
                assert opts and "tooltip" in opts[0], (nid, name)
        assert nid in P.NODE_DISPLAY_NAME_MAPPINGS


def test_nodes_run_on_batch(fixtures):
    import torch

    from conceptlab.nodes.palette import (ConceptLabGridSnap, ConceptLabPaletteExtract, ConceptLabPaletteMetrics,
                                          ConceptLabPaletteQuantize)

    imgs = torch.from_numpy(np.stack([fixtures[0][0].image, fixtures[1][0].image]).astype(np.float32) / 255.0)
    report, annotated = ConceptLabPaletteMetrics().run(imgs, 5.0, ",".join(DB16_DAWNLIKE))
    reps = json.loads(report)
    grids = [fixtures[0][0], fixtures[1][0]]
    assert len(reps) == 2 and all(r["grid"]["cells_x"] == len(render_cuts(f)[0]) + 1 for r, f in zip(reps, grids))
    assert annotated.shape[0] == 2 and annotated.shape[-1] == 3
    native, clean, grid = ConceptLabGridSnap().run(imgs)
    assert native.shape[1] in (24, 25) and tuple(clean.shape) == (2, 512, 512, 3)
    sw, hexes = ConceptLabPaletteExtract().run(imgs, 6, "kmeans", 0)
    assert sw.shape[0] == 2 and len(hexes.splitlines()) == 2
    (q,) = ConceptLabPaletteQuantize().run(imgs, 4, "")
    assert q.shape == imgs.shape
    # LoadImage gives an image without alpha a 64x64 zero MASK (found running the node in real ComfyUI): it means
    # "nothing transparent" and must give the same report as no mask; a real mask of another size is refused
    same = json.loads(ConceptLabPaletteMetrics().run(imgs, 5.0, ",".join(DB16_DAWNLIKE), mask=torch.zeros(1, 64, 64))[0])
    assert [r["grid"] for r in same] == [r["grid"] for r in reps]
    assert [r["effective_colors"] for r in same] == [r["effective_colors"] for r in reps]
    bad = torch.zeros(1, 64, 64)
    bad[0, :8, :8] = 1.0
    with pytest.raises(ValueError, match="does not match image"):
        ConceptLabPaletteMetrics().run(imgs, 5.0, "", mask=bad)
    with pytest.raises(ValueError, match="malformed hex"):
        ConceptLabPaletteQuantize().run(imgs, 4, "#12345")


def test_example_workflow_consistent():
    from pathlib import Path

    from conceptlab.nodes import palette as P

    root = Path(__file__).resolve().parents[1] / "example_workflows"
    ui = json.loads((root / "palette_audit.json").read_text())
    api = json.loads((root / "api" / "palette_audit.json").read_text())
    assert ui["version"] == 0.4 and ui["links"]
    ids = {n["id"]: n for n in ui["nodes"]}
    for lid, src, _, dst, _, _ in ui["links"]:
        assert src in ids and dst in ids
    for n in ui["nodes"]:
        if n["type"].startswith("ConceptLab"):
            cls = P.NODE_CLASS_MAPPINGS[n["type"]]
            spec = cls.INPUT_TYPES()
            widgets = [k for g in ("required", "optional") for k, v in spec.get(g, {}).items()
                       if v[0] not in ("IMAGE", "MASK")]
            assert len(n["widgets_values"]) == len(widgets)
            assert set(api[str(n["id"])]["inputs"]) >= set(widgets)
    assert {v["class_type"] for v in api.values()} == {n["type"] for n in ui["nodes"]}


def test_palette_from_caption_agrees_with_caption_audit():
    from conceptlab.metrics.caption_parse import parse_caption
    from conceptlab.metrics.palette import palette_from_caption

    text = ("pixel art, hair (#03DC73), eyes (#abc), skin (03dc73), palette: #03dc73, #2c1600, #12345, #GGGGGG, "
            "retro pixel art style, #f7d7c0")
    cols, bad = palette_from_caption(text)
    parsed = parse_caption(text)
    assert cols == [parse_hex(h) for h in parsed.all_hexes()]
    assert cols == [(3, 220, 115), (170, 187, 204), (44, 22, 0), (247, 215, 192)]  # #abc = #aabbcc (CSS)
    assert bad == parsed.malformed and {"#12345", "#GGGGGG", "03dc73"} <= set(bad)
    assert palette_from_caption("") == ([], [])


def test_cluster_colors_independent_of_input_order():
    from conceptlab.metrics.palette import cluster_colors

    rng = np.random.default_rng(3)
    cols = rng.integers(0, 256, (300, 3), dtype=np.uint8)
    cols = np.unique(cols, axis=0)
    cnt = rng.integers(1, 4, len(cols))  # many ties
    lab1, lead1, size1 = cluster_colors(cols, cnt, 8.0)
    perm = rng.permutation(len(cols))
    lab2, lead2, size2 = cluster_colors(cols[perm], cnt[perm], 8.0)
    assert np.array_equal(lead1, lead2) and np.array_equal(size1, size2)
    assert np.array_equal(lab1[perm], lab2)
