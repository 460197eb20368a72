"""Issue 18: bounds on every numeric and size input — widgets (VALIDATE_INPUTS, so /prompt answers 400, and again
when the node runs), settings inside ``kohya_toml`` (core table), document size / nesting, image pixel budget."""

from __future__ import annotations

import math

import pytest

from conceptlab.formats import limits
from conceptlab.formats.limits import LimitError
from conceptlab.nodes import NODE_CLASS_MAPPINGS
from conceptlab.nodes import lora as lora_nodes

from .conftest import make_kohya_folder, write_png
from .test_paths import _dataset_kw, train_kw


def _numeric_inputs():
    for node_id, cls in sorted(NODE_CLASS_MAPPINGS.items()):
        spec = cls.INPUT_TYPES()
        for group in ("required", "optional"):
            for name, entry in spec.get(group, {}).items():
                if entry[0] in ("INT", "FLOAT"):
                    yield node_id, cls, name, entry[0], entry[1]


NUMERIC = list(_numeric_inputs())


def test_every_numeric_widget_is_bounded():
    assert len(NUMERIC) > 40
    unbounded = [f"{n}.{i}" for n, _, i, _, o in NUMERIC if "min" not in o or "max" not in o]
    assert not unbounded, unbounded


@pytest.mark.parametrize("node_id,cls,name,typ,opts", NUMERIC, ids=[f"{n}.{i}" for n, _, i, _, _ in NUMERIC])
def test_numeric_widget_bounds(node_id, cls, name, typ, opts):
    lo, hi = opts["min"], opts["max"]
    step = 1 if typ == "INT" else max(float(opts.get("step", 0.01)), 1e-9)
    assert cls.VALIDATE_INPUTS(**{name: lo}) is True
    assert cls.VALIDATE_INPUTS(**{name: hi}) is True
    for bad in (lo - step, hi + step) + ((math.nan, math.inf, -math.inf) if typ == "FLOAT" else ()):
        res = cls.VALIDATE_INPUTS(**{name: bad})
        assert isinstance(res, str) and name in res, (bad, res)
    with pytest.raises(ValueError, match=name):
        getattr(cls(), cls.FUNCTION)(**{name: hi + step})


def test_string_sizes_are_bounded():
    from conceptlab.nodes.palette import ConceptLabPaletteMetrics

    assert isinstance(ConceptLabPaletteMetrics.VALIDATE_INPUTS(palette="#112233," * (2 * 1024 * 1024)), str)
    assert ConceptLabPaletteMetrics.VALIDATE_INPUTS(palette="#112233, #445566") is True


def test_combo_values_are_checked_at_validation():
    assert isinstance(lora_nodes.ConceptLabTrainLora.VALIDATE_INPUTS(optimizer_type="os.system"), str)


# --- settings inside kohya_toml (the core table) ------------------------------------------------------------

@pytest.mark.parametrize("key", sorted(limits.SETTING_BOUNDS))
def test_setting_table_bounds(key):
    lo, hi = limits.SETTING_BOUNDS[key]
    limits.check_settings({key: lo})
    limits.check_settings({key: hi})
    d = 1 if float(hi).is_integer() and float(lo).is_integer() else 1e-6 * max(abs(hi), 1)
    for bad in (lo - d, hi + d, math.nan, math.inf):
        with pytest.raises(LimitError, match=key):
            limits.check_settings({key: bad})


@pytest.fixture
def small_dataset(comfy_dirs):
    make_kohya_folder(comfy_dirs["input"] / "ds")
    return lora_nodes.ConceptLabLoraDataset().load("ds", **_dataset_kw())[0]


@pytest.mark.parametrize("toml", [
    "max_train_epochs = 1000000000", "network_dim = 1000000", "train_batch_size = -1", "seed = -1",
    "lr_warmup_steps = -5", "resolution = 65536", 'resolution = "512,65536"', "sample_width = 16384",
    "sample_steps = 1000000000", "network_alpha = nan", "learning_rate = inf", "max_train_steps = 10000000000",
    'network_args = ["conv_dim=100000"]', "[network_arguments]\nnetwork_dim = 4096",
    "min_snr_gamma = -inf", "a = " + "[" * 100_000 + "]" * 100_000, "x = " + "{a = " * 50 + "1" + "}" * 50,
    "s = '" + "x" * (2 * 1024 * 1024) + "'",
])
def test_toml_bounds_refused_in_node(small_dataset, comfy_dirs, toml):
    with pytest.raises(ValueError) as ei:
        lora_nodes.ConceptLabTrainLora().train(**train_kw(dataset=small_dataset, kohya_toml=toml))
    assert not isinstance(ei.value, RecursionError)
    assert isinstance(ei.value, LimitError) or "TOML" in str(ei.value) or "at most" in str(ei.value)
    assert not (comfy_dirs["output"] / "loras").exists()


def test_documents_bounded_without_recursion_error():
    for text in ("[" * 100_000 + "]" * 100_000, '{"a":' * 40 + "1" + "}" * 40, "[NaN]", "[Infinity]"):
        with pytest.raises(LimitError):
            limits.load_json(text)
    with pytest.raises(LimitError):
        limits.load_json("[" + "1," * (limits.MAX_COLLECTION_ITEMS + 1) + "1]")
    assert limits.load_json('{"a": [1, 2.5, "x"]}') == {"a": [1, 2.5, "x"]}
    assert limits.load_toml("[model]\nnetwork_dim = 8") == {"model": {"network_dim": 8}}


def test_diff_compare_refuses_deep_json():
    from conceptlab.nodes.diff import CompareDiffReports

    deep = '{"a":' * 100_000 + "1" + "}" * 100_000
    with pytest.raises(LimitError):
        CompareDiffReports().compare(deep, deep)


def test_esd_prompt_explosion_refused_before_expansion():
    from conceptlab.nodes.esd import _check_prompt_count

    with pytest.raises(LimitError, match="prompts"):
        _check_prompt_count("\n".join(f"c{i}" for i in range(600)), "", 2000)
    with pytest.raises(LimitError, match="concepts"):
        _check_prompt_count("\n".join(f"c{i}" for i in range(100_000)), "", 0)
    _check_prompt_count("Van Gogh", "", 100)


def test_merge_ratios_refuse_nan():
    from conceptlab.nodes.merge import _parse_ratios

    for bad in ("0, nan", "inf", "0.5, -inf"):
        with pytest.raises(ValueError):
            _parse_ratios(bad)


# --- memory guards -------------------------------------------------------------------------------------------

def test_pixel_budget_refuses_bomb_below_pils_limit(tmp_path):
    """121 Mpx: above our 64 Mpx budget, below PIL's error limit (2 × 89.5 Mpx), refused from the header."""
    from PIL import Image

    from conceptlab.metrics.caption_colours import load_rgb
    from conceptlab.metrics.palette import load_rgb as load_image
    from conceptlab.training.lora.buckets import open_rgb
    from conceptlab.training.lora.dataset import KohyaDataset

    assert 11_000 * 11_000 < 2 * Image.MAX_IMAGE_PIXELS
    p = tmp_path / "ds" / "1_bomb" / "bomb.png"
    p.parent.mkdir(parents=True)
    Image.new("1", (11_000, 11_000)).save(p)  # 1-bit, compresses to a few kB
    assert p.stat().st_size < 1_000_000
    for load in (open_rgb, load_rgb, load_image):
        with pytest.raises(LimitError, match="Mpx"):
            load(p)
    with pytest.raises(LimitError):
        KohyaDataset.scan(tmp_path / "ds")
    ok = write_png(tmp_path / "ok.png", size=(64, 48))
    assert open_rgb(ok).size == (64, 48)


def test_batch_pixel_budget():
    limits.check_batch_pixels(8, 1024, 1024)
    with pytest.raises(LimitError, match="train_batch_size"):
        limits.check_batch_pixels(256, 4096, 4096)


def test_dataset_image_count_bounded(tmp_path, monkeypatch):
    from conceptlab.training.lora import dataset as dsmod

    make_kohya_folder(tmp_path / "ds", n=3)
    monkeypatch.setattr(dsmod, "MAX_DATASET_IMAGES", 2)
    with pytest.raises(LimitError, match="images"):
        dsmod.KohyaDataset.scan(tmp_path / "ds")


def test_dataset_scan_is_cancellable(tmp_path):
    from conceptlab.training.lora.dataset import KohyaDataset

    make_kohya_folder(tmp_path / "ds", n=3)
    seen = []

    class Cancel(Exception):
        pass

    def progress(done, total):
        seen.append((done, total))
        if done == 2:
            raise Cancel

    with pytest.raises(Cancel):
        KohyaDataset.scan(tmp_path / "ds", progress=progress)
    assert seen == [(1, 3), (2, 3)]


def test_prompt_counts_are_bounded():
    from conceptlab.nodes.esd import ConceptLabErasureCompare

    many = "\n".join(f"p{i}" for i in range(limits.MAX_SAMPLE_PROMPTS + 1))
    assert isinstance(lora_nodes.ConceptLabTrainLora.VALIDATE_INPUTS(sample_prompts=many), str)
    assert isinstance(lora_nodes.ConceptLabEpochCompare.VALIDATE_INPUTS(prompts=many), str)
    assert isinstance(ConceptLabErasureCompare.VALIDATE_INPUTS(concept_prompts=many, unrelated_prompts=""), str)
    assert lora_nodes.ConceptLabEpochCompare.VALIDATE_INPUTS(prompts="a\nb") is True
    assert isinstance(lora_nodes.ConceptLabTrainLora.VALIDATE_INPUTS(kohya_toml='caption_extension = "/../x"'), str)
