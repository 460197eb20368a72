"""Issue 18: every node input that names a file or folder — widgets and path keys inside ``kohya_toml`` — stays
inside ComfyUI's input / output / models folders (after symlinks), whatever a ``/prompt`` client sends."""

from __future__ import annotations

import os

import pytest

from conceptlab.nodes import NODE_CLASS_MAPPINGS, policy
from conceptlab.nodes import lora as lora_nodes
from conceptlab.nodes.policy import PathOutsideError
from conceptlab.training.lora.dataset_options import DatasetOptions

from .conftest import make_kohya_folder, snapshot

HOSTILE_NAMES = {
    "absolute": "/etc/passwd",
    "home": "~/x",
    "dotdot": "../x",
    "dotdot_inner": "a/../../x",
    "dotdot_inside": "a/../b",
    "encoded": "%2e%2e%2fx",
    "encoded_slash": "a%2f..%2f..%2fx",
    "fullwidth": "\uff0e\uff0e\uff0fx",
    "backslash": "..\\..\\x",
    "backslash_plain": "a\\b",
    "nul": "a\x00b",
    "newline": "a\nb",
    "drive": "C:\\Windows\\x",
    "drive_rel": "c:x",
    "long_total": "a/" * 600 + "x",
    "long_segment": "x" * 300,
}

#: STRING inputs whose names say they name a file or folder (new inputs with such names must join PATH_INPUTS)
_PATHY = ("folder", "file", "dir", "path", "name", "fix_to")


def _path_inputs():
    for node_id, cls in sorted(NODE_CLASS_MAPPINGS.items()):
        for name, mode in (getattr(cls, "PATH_INPUTS", {}) or {}).items():
            yield node_id, cls, name, mode


def test_every_file_naming_string_input_is_declared():
    missing = []
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        assert hasattr(cls, "VALIDATE_INPUTS"), f"{node_id} is not guarded (policy.guarded)"
        spec = cls.INPUT_TYPES()
        for group in ("required", "optional"):
            for name, entry in spec.get(group, {}).items():
                if entry[0] == "STRING" and not entry[1].get("forceInput") and any(w in name for w in _PATHY):
                    if name not in (getattr(cls, "PATH_INPUTS", {}) or {}) and name not in ("negative",):
                        missing.append(f"{node_id}.{name}")
    assert not missing, f"file-naming inputs without a path policy: {missing}"
    assert len(list(_path_inputs())) >= 6


@pytest.mark.parametrize("kind", sorted(HOSTILE_NAMES))
@pytest.mark.parametrize("node_id,cls,name,mode", list(_path_inputs()), ids=lambda x: x if isinstance(x, str) else "")
def test_hostile_names_get_http_400(node_id, cls, name, mode, kind):
    """VALIDATE_INPUTS refuses (ComfyUI answers 400) and the node refuses again when run."""
    if mode == "lines" and kind == "newline":
        pytest.skip("a list input separates names by newlines")
    res = cls.VALIDATE_INPUTS(**{name: HOSTILE_NAMES[kind]})
    assert isinstance(res, str) and name in res, res
    with pytest.raises(ValueError):
        getattr(cls(), cls.FUNCTION)(**{name: HOSTILE_NAMES[kind]})


@pytest.mark.parametrize("good", ["my_lora", "sub/my lora.v2", "./a//b"])
def test_plain_names_pass(good):
    assert policy.check_name(good) in ("my_lora", "sub/my lora.v2", "a/b")
    assert lora_nodes.ConceptLabLoraDataset.VALIDATE_INPUTS(folder=good) is True


def test_plain_mode_refuses_subfolders():
    assert isinstance(lora_nodes.ConceptLabTrainLora.VALIDATE_INPUTS(output_name="a/b"), str)


def _symlink(target, link):
    try:
        os.symlink(target, link)
    except (OSError, NotImplementedError):
        pytest.skip("symlinks not available")


def _dataset_kw(**kw):
    base = dict(resolution=64, enable_bucket=False, min_bucket_reso=64, max_bucket_reso=128, bucket_no_upscale=False,
                resize_interpolation="nearest", flip_aug=False, caption_extension=".txt", background="#ffffff",
                validation_split=0.0, caption_prefix="", caption_suffix="", shuffle_caption=False, keep_tokens=0,
                keep_tokens_separator="", caption_dropout_rate=0.0, caption_dropout_every_n_epochs=0,
                caption_tag_dropout_rate=0.0)
    base.update(kw)
    return base


def test_dataset_reads_nothing_outside(comfy_dirs):
    inp, out = comfy_dirs["input"], comfy_dirs["outside"]
    make_kohya_folder(inp / "ds")
    ds, summary, _ = lora_nodes.ConceptLabLoraDataset().load("ds", **_dataset_kw())
    assert "style, red" in summary
    # caption_extension that climbs out (the reported arbitrary read) — widget and core
    for ext in ("/../../../../etc/passwd", "../secret.txt", ".txt/../../x", "\x00.txt"):
        with pytest.raises(ValueError):
            lora_nodes.ConceptLabLoraDataset().load("ds", **_dataset_kw(caption_extension=ext))
        with pytest.raises(ValueError, match="extension"):
            DatasetOptions(caption_extension=ext).validate()
    for ext in (".txt", ".caption", "txt", ".tags.txt"):
        DatasetOptions(caption_extension=ext).validate()
    # the dataset folder itself, a subset folder, an image and a caption may not be symlinks leading out
    _symlink(out, inp / "linked_ds")
    with pytest.raises(PathOutsideError):
        lora_nodes.ConceptLabLoraDataset().load("linked_ds", **_dataset_kw())
    make_kohya_folder(inp / "ds2")
    (inp / "ds2" / "2_style" / "img0.txt").unlink()
    _symlink(out / "secret.txt", inp / "ds2" / "2_style" / "img0.txt")
    with pytest.raises(PathOutsideError, match="symlink"):
        lora_nodes.ConceptLabLoraDataset().load("ds2", **_dataset_kw())
    make_kohya_folder(inp / "ds3")
    _symlink(out, inp / "ds3" / "3_evil")
    with pytest.raises(PathOutsideError):
        lora_nodes.ConceptLabLoraDataset().load("ds3", **_dataset_kw())


def test_caption_audit_refuses_symlink_out(comfy_dirs):
    from conceptlab.nodes.captions import ConceptLabCaptionAudit

    inp = comfy_dirs["input"]
    make_kohya_folder(inp / "ds")
    _symlink(comfy_dirs["outside"] / "secret.txt", inp / "ds" / "2_style" / "leak.txt")
    with pytest.raises(PathOutsideError):
        ConceptLabCaptionAudit().audit("ds", check_images=False, tolerance=5.0, fix_to="")


def test_output_symlinks_are_not_followed(comfy_dirs):
    """output_name / save_name / filename naming a symlink inside output/ that leads out are refused."""
    from conceptlab.nodes import comfy_io

    outd, outside = comfy_dirs["output"], comfy_dirs["outside"]
    (outd / "loras").mkdir()
    _symlink(outside / "x.safetensors", outd / "loras" / "link_out.safetensors")  # dangling, would be created
    _symlink(outside, outd / "loras" / "link_dir")
    with pytest.raises(PathOutsideError):
        comfy_io.output_file("loras", "link_out.safetensors")
    with pytest.raises(PathOutsideError):
        comfy_io.output_file("loras", "link_dir/erased.safetensors")
    _symlink(outside, outd / "checkpoints")
    with pytest.raises(PathOutsideError):
        comfy_io.output_file("checkpoints", "merged.safetensors")
    assert snapshot(outside) == {"secret.txt": (10, (outside / "secret.txt").stat().st_mtime_ns)}


def test_models_names_come_from_comfy_lists_only(comfy_dirs):
    from conceptlab.nodes import comfy_io

    (comfy_dirs["models"] / "loras" / "a.safetensors").write_bytes(b"x")
    assert comfy_io.model_file("loras", "a.safetensors").name == "a.safetensors"
    for bad in ("../../outside/secret.txt", "/etc/passwd", "a\\..\\..\\b"):
        with pytest.raises(ValueError):
            comfy_io.model_file("loras", bad)


# --- paths inside kohya_toml -------------------------------------------------------------------------------------

# kohya's dataset keys (image_dir, reg_data_dir, dataset_config) may name safe relative folders inside input/
# (policy.INPUT_FOLDER_KEYS); with an unsafe value they are refused like every other path key
TOML_CASES = [f'{k} = "x"' for k in sorted(policy.TOML_PATH_KEYS - policy.INPUT_FOLDER_KEYS)] + [
    f'{k} = "../outside"' for k in sorted(policy.INPUT_FOLDER_KEYS)] + [
    '[model_arguments]\npretrained_model_name_or_path = "/models/x.safetensors"',
    '[training_arguments]\noutput_dir = "/tmp/out"\nlogging_dir = "/tmp/log"',
    'resume = "/etc/passwd"',
    'resume = "/any/state.json"',
    '[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = "/etc"\nnum_repeats = 1',
    '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "ok"\n[[datasets.subsets]]\nmetadata_file = "/x.json"',
    'some_future_dir = "/tmp"',
    'my_weights = ["/a", "/b"]',
    '[a.b.c]\nextra_config = "/x.toml"',
]


@pytest.fixture
def small_dataset(comfy_dirs):
    make_kohya_folder(comfy_dirs["input"] / "ds")
    return lora_nodes.ConceptLabLoraDataset().load("ds", **_dataset_kw())[0]


def train_kw(**kw):
    base = dict(model=None, clip=None, vae=None, output_name="t", max_train_epochs=1, train_batch_size=1,
                gradient_accumulation_steps=1, learning_rate=1e-4, network_dim=4, network_alpha=4.0,
                optimizer_type="AdamW", lr_scheduler="constant", lr_warmup_steps=0, mixed_precision="no",
                save_every_n_epochs=1, save_precision="fp16", seed=1, train_text_encoder=False, sample_prompts="",
                best_metric="none", early_stopping_patience=0, resume=False, apply="last")
    base.update(kw)
    return base


@pytest.mark.parametrize("toml", TOML_CASES)
def test_toml_path_keys_refused_by_name(small_dataset, comfy_dirs, toml):
    before = snapshot(comfy_dirs["output"])
    with pytest.raises(PathOutsideError, match="CLI|'\\.\\.'|absolute") as ei:
        lora_nodes.ConceptLabTrainLora().train(**train_kw(dataset=small_dataset, kohya_toml=toml))
    key = toml.strip().splitlines()[-1].split("=")[0].strip()
    if not key.startswith("num_"):
        assert key in str(ei.value)
    assert snapshot(comfy_dirs["output"]) == before  # refused before anything is written


def test_dataset_folder_keys_accept_safe_names_inside_input():
    """kohya dataset configs work in the node: safe relative folder names pass validation (resolved inside input/
    by the node, symlinks checked there); hostile ones do not."""
    ok = '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "pixel_art/10_dawnlike"\nnum_repeats = 1\nreg_data_dir = "reg"'
    assert lora_nodes.ConceptLabTrainLora.VALIDATE_INPUTS(kohya_toml=ok) is True
    for bad in ('image_dir = "/etc"', 'reg_data_dir = "../x"', 'dataset_config = "a\\\\b.toml"'):
        assert isinstance(lora_nodes.ConceptLabTrainLora.VALIDATE_INPUTS(kohya_toml=bad), str), bad


def test_path_key_rule_is_about_names_and_text():
    assert policy.find_path_keys({"log_config": True, "network_dim": 4, "caption_extension": ".txt"}) == []
    assert policy.find_path_keys({"x": {"vae": "a"}, "d": [{"s": [{"image_dir": "b"}]}]}) == ["d[0].s[0].image_dir",
                                                                                             "x.vae"]
    assert policy.find_path_keys({"resume": False, "output_dir": ""}) == []


@pytest.mark.parametrize("toml", TOML_CASES)
def test_toml_path_keys_get_http_400(toml):
    res = lora_nodes.ConceptLabTrainLora.VALIDATE_INPUTS(kohya_toml=toml)
    assert isinstance(res, str) and any(w in res for w in ("CLI", "'..'", "absolute"))
    assert lora_nodes.ConceptLabTrainLora.VALIDATE_INPUTS(kohya_toml="network_dim = 8\nlog_config = true") is True


def test_caption_extension_and_prompt_count_get_http_400():
    from conceptlab.nodes.esd import ConceptLabESDErase

    assert isinstance(lora_nodes.ConceptLabLoraDataset.VALIDATE_INPUTS(caption_extension="/../../etc/passwd"), str)
    assert lora_nodes.ConceptLabLoraDataset.VALIDATE_INPUTS(caption_extension=".caption") is True
    many = "\n".join(f"concept {i}" for i in range(1000))
    assert isinstance(ConceptLabESDErase.VALIDATE_INPUTS(concepts=many, variations=2000, prompt_variations=""), str)
    assert ConceptLabESDErase.VALIDATE_INPUTS(concepts="Van Gogh", variations=100, prompt_variations="") is True


def test_shipped_workflows_pass_the_policy():
    """Every literal input of every shipped API workflow passes VALIDATE_INPUTS and the node's own checks."""
    import json
    from pathlib import Path

    api = Path(__file__).resolve().parents[2] / "example_workflows" / "api"
    checked = 0
    for wf in sorted(api.glob("*.json")):
        for node_id, node in json.loads(wf.read_text()).items():
            cls = NODE_CLASS_MAPPINGS.get(node["class_type"])
            if cls is None:
                continue
            literals = {k: v for k, v in node["inputs"].items() if not isinstance(v, list)}
            sent = {k: v for k, v in literals.items() if k in cls.VALIDATE_INPUTS.names()}  # what ComfyUI passes
            assert cls.VALIDATE_INPUTS(**sent) is True, (wf.name, node_id, cls.VALIDATE_INPUTS(**sent))
            # combos name model files that exist only in a real install
            assert policy.input_problems(cls, literals, combos=False) == [], (wf.name, node_id)
            checked += 1
    assert checked >= 10
