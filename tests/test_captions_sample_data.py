"""The bundled sample_data/: matches its DawnLike sprites, keeps the credit, and audits as documented."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conceptlab.metrics import caption_fix
from conceptlab.metrics import captions as cap

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data"


def _generator():
    spec = importlib.util.spec_from_file_location("make_sample_data", REPO / "tests" / "tools" / "make_sample_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sample_data_matches_sprites(dawnlike_dir):
    gen = _generator()
    expected = gen.build(dawnlike_dir)
    # the tiny model and the quick start's Game Boy set have their own builders (tools/, tests/test_tiny_model.py)
    shipped = {p.relative_to(SAMPLE).as_posix() for p in SAMPLE.rglob("*")
               if p.is_file() and p.suffix in (".png", ".txt")
               and p.relative_to(SAMPLE).parts[0] not in ("tiny_dawnlike", "tiny_dawnlike_vpred", "gameboy")}
    assert shipped == set(expected)
    for rel, (img, text) in expected.items():
        if img is not None:
            with Image.open(SAMPLE / rel) as im:
                got = np.asarray(im.convert("RGB"))
            assert np.array_equal(got, img), rel
        else:
            assert (SAMPLE / rel).read_text(encoding="utf-8") == text, rel
    assert len([r for r in expected if r.endswith(".png") and "pixel_art" in r]) == 12


def test_sample_data_credit_and_size():
    credits = " ".join((SAMPLE / "CREDITS.md").read_text(encoding="utf-8").split())
    for must in ("DragonDePlatino", "DawnBringer", "Tommy Ettinger", "Creative Commons Attribution 4.0",
                 "Credit DawnBringer"):
        assert must in credits
    models = (SAMPLE / "tiny_dawnlike", SAMPLE / "tiny_dawnlike_vpred")
    total = sum(p.stat().st_size for p in SAMPLE.rglob("*")
                if p.is_file() and not any(m in p.parents for m in models))
    assert total < 1_000_000
    weights = sum(p.stat().st_size for m in models for p in m.rglob("*") if p.is_file())
    assert weights < 25 * 2 ** 20  # issue 12's budget, both tiny models together


def test_sample_audit_finds_the_planted_defects():
    gen = _generator()
    rep = cap.audit_folder(SAMPLE / "pixel_art")
    assert rep["summary"]["pairs"] == 12
    planted = {"black_pudding": "duplicate_hex", "catfish": "malformed_hex"}
    assert set(gen.DEFECTS.values()) == set(planted.values())
    for f in rep["files"]:
        name = Path(f["key"]).name
        serious = [d for d in f["findings"] if d["severity"] in ("error", "warning")]
        assert f["subset"] == {"folder": "10_dawnlike", "repeats": 10, "name": "dawnlike"}
        # grid detection is tested by the palette module; any multiple of 24 snaps to the same colours
        assert f["grid"]["cells_x"] % gen.CANVAS == 0 and f["grid"]["cells_y"] % gen.CANVAS == 0, name
        if name in planted:
            assert planted[name] in [d["code"] for d in serious], name
        else:
            assert serious == [], (name, serious)
    dup = next(d for f in rep["files"] if f["key"].endswith("black_pudding") for d in f["findings"]
               if d["code"] == "duplicate_hex")
    assert dup["severity"] == "error" and dup["data"]["background"]


def test_sample_fix_repairs_recoverable_defects(tmp_path):
    res = caption_fix.fix_folder(SAMPLE / "pixel_art", tmp_path / "fixed")
    assert res["written"] == 12 and res["skipped"] == []
    rep = cap.audit_folder(tmp_path / "fixed", images=False)
    assert rep["summary"]["by_code"]["malformed_hex"] == 0
    # the truncated hex has no safe repair: removed, and the duplicate is left for a person
    assert rep["summary"]["by_code"]["duplicate_hex"] == 1


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "I;16", "1x1", "nonsquare"])
def test_audit_survives_odd_images(tmp_path, mode):
    d = tmp_path / "ds"
    d.mkdir()
    rng = np.random.default_rng(0)
    native = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
    big = np.repeat(np.repeat(native, 16, 0), 16, 1)
    if mode == "RGBA":
        im = Image.fromarray(np.dstack([big, np.full(big.shape[:2], 200, np.uint8)]), "RGBA")
    elif mode == "LA":
        im = Image.fromarray(big[..., 0]).convert("LA")
    elif mode == "P":
        im = Image.fromarray(big).quantize(8)
    elif mode == "L":
        im = Image.fromarray(big[..., 0])
    elif mode == "I;16":
        im = Image.frombytes("I;16", big.shape[1::-1], (big[..., 0].astype("<u2") * 256).tobytes())
    elif mode == "1x1":
        im = Image.new("RGB", (1, 1), (3, 220, 115))
    else:
        im = Image.fromarray(big[:, :100])
    im.save(d / "x.png")
    (d / "x.txt").write_text("hair (#03dc73), palette: #03dc73", encoding="utf-8")
    rep = cap.audit_folder(d)
    f = rep["files"][0]
    assert f["grid"] is not None
    assert "image_unreadable" not in [x["code"] for x in f["findings"]]
