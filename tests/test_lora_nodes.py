"""LoRA nodes: contracts (no ComfyUI), and the real-ComfyUI tier: training under inference_mode on a tiny
SD1.5-family ComfyUI model, zero "lora key not loaded", Cancel keeps the last checkpoint, inputs unchanged."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from conftest import requires_comfyui

from conceptlab.nodes import lora as lora_nodes



def test_node_contracts():
    for node_id, cls in lora_nodes.NODE_CLASS_MAPPINGS.items():
        assert node_id.startswith("ConceptLab") and cls.CATEGORY == "Concept Lab/LoRA"
        assert cls.DESCRIPTION and len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES)
        spec = cls.INPUT_TYPES()
        for group in spec.values():
            for name, (typ, opts) in group.items():
                assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert node_id in lora_nodes.NODE_DISPLAY_NAME_MAPPINGS
    tips = lora_nodes.ConceptLabLoraDataset.INPUT_TYPES()["required"]
    assert "NOTHING" in tips["keep_tokens"][1]["tooltip"]
    assert "nearest" in tips["resize_interpolation"][0]


def _setup_comfy(tmp_path, dawnlike_dir, n=4):
    from e2e.comfy_env import comfy_inprocess

    comfy_inprocess()
    import folder_paths

    inp, out = tmp_path / "input", tmp_path / "output"
    sub = inp / "sprites" / "2_dawnlike"
    sub.mkdir(parents=True)
    out.mkdir()
    for p in sorted(dawnlike_dir.glob("*.png"))[:n]:
        shutil.copy(p, sub / p.name)
        (sub / p.name).with_suffix(".txt").write_text(f"dawnlike, pixel art, {p.stem.rsplit('_', 1)[0]}")
    folder_paths.set_input_directory(str(inp))
    folder_paths.set_output_directory(str(out))
    folder_paths.add_model_folder_path("loras", str(out / "loras"))
    return inp, out


def _dataset():
    ds, summary, audit = lora_nodes.ConceptLabLoraDataset().load(
        "sprites", resolution=64, enable_bucket=True, min_bucket_reso=64, max_bucket_reso=128,
        bucket_no_upscale=False, resize_interpolation="nearest", flip_aug=False, caption_extension=".txt",
        background="#ffffff", validation_split=0.0, caption_prefix="", caption_suffix="", shuffle_caption=True,
        keep_tokens=1, keep_tokens_separator="", caption_dropout_rate=0.0, caption_dropout_every_n_epochs=0,
        caption_tag_dropout_rate=0.0)
    assert "8 with repeats" in summary and isinstance(audit, str)
    return ds


def _train_kwargs(**kw):
    base = dict(output_name="tiny", max_train_epochs=2, train_batch_size=2, gradient_accumulation_steps=1,
                learning_rate=1e-3, network_dim=4, network_alpha=2.0, optimizer_type="AdamW",
                lr_scheduler="constant", lr_warmup_steps=0, mixed_precision="bf16", save_every_n_epochs=1,
                save_precision="fp16", seed=1, train_text_encoder=True, sample_prompts="dawnlike, pixel art",
                best_metric="train_loss", early_stopping_patience=0, resume=False, apply="last", sample_steps=2)
    base.update(kw)
    return base


@requires_comfyui
def test_train_node_in_comfyui(tmp_path, dawnlike_dir, caplog):
    inp, out = _setup_comfy(tmp_path, dawnlike_dir)
    from e2e.comfy_env import tiny_sd1_clip, tiny_sd15_patcher, tiny_vae

    import comfy.sd
    import comfy.utils

    with pytest.raises(ValueError, match="outside|'\\.\\.'"):
        lora_nodes.ConceptLabLoraDataset().load("../elsewhere")
    model, clip, vae = tiny_sd15_patcher(), tiny_sd1_clip(), tiny_vae()
    before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    ds = _dataset()
    with torch.inference_mode():
        m2, c2, name, loss_img, table_img, grid, lora_model, loss = lora_nodes.ConceptLabTrainLora().train(
            model, clip, vae, ds, **_train_kwargs())
    assert name == "tiny.safetensors" and (out / "loras" / "tiny-000001.safetensors").is_file()
    assert not list((out / "loras").glob("*state*"))  # training states live outside loras/
    assert (out / "conceptlab_training" / "tiny" / "tiny-state.json").is_file()
    assert loss_img.dim() == 4 and table_img.shape[-1] == 3 and grid.shape[0] == 1
    assert len(loss["loss"]) == 8 and all(k.startswith("diffusion_model.") for k in lora_model)  # core types
    after = model.model.diffusion_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and not model.weight_wrapper_patches
    assert m2 is not model and len(m2.patches) > 0
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        sd = comfy.utils.load_torch_file(str(out / "loras" / "tiny.safetensors"), safe_load=True)
        comfy.sd.load_lora_for_models(model, clip, sd, 1.0, 1.0)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert any(k.startswith("lora_te_") for k in sd) and any(k.startswith("lora_unet_") for k in sd)

    # epoch compare on the saved files
    grid2, table2, js = lora_nodes.ConceptLabEpochCompare().compare(
        model, clip, vae, "tiny-0*.safetensors\ntiny.safetensors", "dawnlike, pixel art", "", 0, 2, 5.0, 64, 64,
        1.0, "")
    assert grid2.shape[0] == 1 and '"epoch": 1' in js and '"epoch": 2' in js


@requires_comfyui
def test_cancel_keeps_the_last_finished_checkpoint(tmp_path, dawnlike_dir, monkeypatch):
    _, out = _setup_comfy(tmp_path, dawnlike_dir)
    from e2e.comfy_env import tiny_sd1_clip, tiny_sd15_patcher, tiny_vae

    import comfy.model_management as mm

    from conceptlab.nodes import comfy_io

    ds = _dataset()
    state = {"step": 0}
    real_update = comfy_io.Progress.update

    def update(self, n=1, preview=None):  # remember the training step the progress bar is at
        state["step"] = self.done + int(n)
        return real_update(self, n, preview)

    def interrupt():  # the Cancel button, seen at every cancel point (scan, caching, steps)
        if state["step"] >= 5:  # 4 steps per epoch: cancel during epoch 2
            raise mm.InterruptProcessingException()

    monkeypatch.setattr(comfy_io.Progress, "update", update)
    monkeypatch.setattr(comfy_io, "check_interrupt", interrupt)
    model = tiny_sd15_patcher()
    with pytest.raises(mm.InterruptProcessingException):
        with torch.inference_mode():
            lora_nodes.ConceptLabTrainLora().train(model, tiny_sd1_clip(), tiny_vae(), ds,
                                                  **_train_kwargs(max_train_epochs=3, sample_prompts="",
                                                                  train_text_encoder=False))
    assert (out / "loras" / "tiny-000001.safetensors").is_file()
    assert not (out / "loras" / "tiny-000002.safetensors").exists()
    assert not model.weight_wrapper_patches


@requires_comfyui
def test_train_node_kohya_toml_dataset_config_with_reg_images(tmp_path, dawnlike_dir, caplog):
    """An inline [[datasets]] with a regularization subset trains in ComfyUI; folders must lie inside input/, and
    every TOML key the node does not honour as written is reported by name."""
    inp, out = _setup_comfy(tmp_path, dawnlike_dir)
    reg = inp / "reg"
    reg.mkdir()
    for p in sorted(dawnlike_dir.glob("*.png"))[4:6]:
        shutil.copy(p, reg / p.name)
    from e2e.comfy_env import tiny_sd1_clip, tiny_sd15_patcher, tiny_vae

    from conceptlab.formats.safetensors_io import read_metadata

    toml = """
prior_loss_weight = 0.5
netwrok_dim = 8
[[datasets]]
resolution = 64
min_bucket_reso = 64
max_bucket_reso = 128
  [[datasets.subsets]]
  image_dir = "sprites/2_dawnlike"
  num_repeats = 2
  caption_extension = ".txt"
  [[datasets.subsets]]
  image_dir = "reg"
  is_reg = true
  class_tokens = "pixel art"
"""
    with caplog.at_level(logging.WARNING):
        with torch.inference_mode():
            lora_nodes.ConceptLabTrainLora().train(tiny_sd15_patcher(), tiny_sd1_clip(), tiny_vae(), _dataset(),
                                                  kohya_toml=toml, **_train_kwargs(max_train_epochs=1,
                                                                                  sample_prompts="",
                                                                                  train_text_encoder=False))
    assert "'netwrok_dim'" in caplog.text
    # a key naming a path outside input/ is refused by name (the one path policy, issue 18)
    with pytest.raises(Exception, match="output_dir"):
        with torch.inference_mode():
            lora_nodes.ConceptLabTrainLora().train(tiny_sd15_patcher(), tiny_sd1_clip(), tiny_vae(), _dataset(),
                                                  kohya_toml='output_dir = "/somewhere"\n' + toml,
                                                  **_train_kwargs(max_train_epochs=1, sample_prompts=""))
    md = read_metadata(out / "loras" / "tiny.safetensors")
    assert md["ss_num_reg_images"] == "2" and md["ss_prior_loss_weight"] == "0.5"
    assert md["ss_num_batches_per_epoch"] == str((8 + 8) // 2)  # reg images balanced to the 8 training uses
    bad = toml.replace('image_dir = "reg"', 'image_dir = "../outside"')
    with pytest.raises(Exception, match="outside|'\\.\\.'"):
        with torch.inference_mode():
            lora_nodes.ConceptLabTrainLora().train(tiny_sd15_patcher(), tiny_sd1_clip(), tiny_vae(), _dataset(),
                                                  kohya_toml=bad, **_train_kwargs(max_train_epochs=1,
                                                                                  sample_prompts=""))
