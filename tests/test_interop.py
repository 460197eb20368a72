"""Exchange with ComfyUI's core training nodes: LORA_MODEL / LOSS_MAP outputs of the train node, continuing from a
LORA_MODEL. Contracts run everywhere; the rest is the real-ComfyUI tier (core LoraModelLoader, LossGraphNode)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from conftest import requires_comfyui
from PIL import Image

from conceptlab.nodes import interop
from conceptlab.nodes import lora as lora_nodes


def test_contracts_match_core_types():
    cls = lora_nodes.ConceptLabTrainLora
    assert cls.RETURN_TYPES[-2:] == ("LORA_MODEL", "LOSS_MAP") and cls.RETURN_NAMES[-2:] == ("lora", "loss")
    assert cls.INPUT_TYPES()["optional"]["lora_model"][0] == "LORA_MODEL"
    assert interop.loss_map([0.5, float("nan"), 0.25]) == {"loss": [0.5, 0.25]}


# ------------------------------------------------------------------------------------------------ real ComfyUI
def _setup(tmp_path, n=4):
    from e2e.comfy_env import comfy_inprocess

    comfy_inprocess()
    import folder_paths

    inp, out = tmp_path / "input", tmp_path / "output"
    sub = inp / "ds" / "1_things"
    sub.mkdir(parents=True)
    out.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):  # small flat-colour blocks: a dataset a tiny model can learn something from
        a = np.kron(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8))
        Image.fromarray(a).save(sub / f"img{i}.png")
        (sub / f"img{i}.txt").write_text(f"blocks, colour {i}")
    folder_paths.set_input_directory(str(inp))
    folder_paths.set_output_directory(str(out))
    (tmp_path / "temp").mkdir()
    folder_paths.set_temp_directory(str(tmp_path / "temp"))
    folder_paths.add_model_folder_path("loras", str(out / "loras"))
    ds, _, _ = lora_nodes.ConceptLabLoraDataset().load(
        "ds", resolution=64, enable_bucket=False, min_bucket_reso=64, max_bucket_reso=64, bucket_no_upscale=False,
        resize_interpolation="nearest", flip_aug=False, caption_extension=".txt", background="#ffffff",
        validation_split=0.0, caption_prefix="", caption_suffix="", shuffle_caption=False, keep_tokens=0,
        keep_tokens_separator="", caption_dropout_rate=0.0, caption_dropout_every_n_epochs=0,
        caption_tag_dropout_rate=0.0)
    return out, ds


def _kw(**kw):
    base = dict(output_name="interop", max_train_epochs=1, train_batch_size=2, gradient_accumulation_steps=1,
                learning_rate=1e-3, network_dim=4, network_alpha=2.0, optimizer_type="AdamW",
                lr_scheduler="constant", lr_warmup_steps=0, mixed_precision="no", save_every_n_epochs=1,
                save_precision="fp32", seed=3, train_text_encoder=True, sample_prompts="", best_metric="train_loss",
                early_stopping_patience=0, resume=False, apply="last", sample_steps=2)
    base.update(kw)
    return base


def _unet_weights(patcher):
    from conceptlab.nodes.comfy_patchers import iter_patched_weights

    keys = [k for k in patcher.model_state_dict() if k.startswith("diffusion_model.") and k.endswith(".weight")]
    return dict(iter_patched_weights(patcher, keys))


@requires_comfyui
def test_lora_model_round_trip_through_core_loader_and_continue(tmp_path, caplog):
    from e2e.comfy_env import tiny_sd1_clip, tiny_sd15_patcher, tiny_vae

    out, ds = _setup(tmp_path)
    import comfy.sd
    import comfy.utils
    from comfy_extras.nodes_train import LoraModelLoader, LossGraphNode, SaveLoRA

    model, clip, vae = tiny_sd15_patcher(), tiny_sd1_clip(), tiny_vae()
    with torch.inference_mode(), caplog.at_level(logging.WARNING):
        res = lora_nodes.ConceptLabTrainLora().train(model, clip, vae, ds, **_kw())
    name, lora_model, loss = res[2], res[6], res[7]
    assert any("text-encoder modules are not part of it" in r.getMessage() for r in caplog.records)
    # LOSS_MAP: one finite loss per optimizer step (4 images / batch 2), drawn by core's LossGraphNode
    assert len(loss["loss"]) == 2 and all(math.isfinite(x) for x in loss["loss"])
    LossGraphNode().plot_loss(loss, "interop_loss")
    assert list((tmp_path / "temp").glob("interop_loss*.png"))
    # LORA_MODEL through core's LoraModelLoader == our file through ComfyUI's LoRA loader (UNet)
    caplog.clear()
    with torch.inference_mode(), caplog.at_level(logging.WARNING):
        via_core = LoraModelLoader().load_lora_model(model, lora_model, 0.7)[0]
        sd = comfy.utils.load_torch_file(str(out / "loras" / name), safe_load=True)
        assert any(k.startswith("lora_te_") for k in sd)  # the text-encoder part is in the file, for LoraLoader
        sd = {k: v for k, v in sd.items() if k.startswith("lora_unet_")}
        via_file = comfy.sd.load_lora_for_models(model, None, sd, 0.7, 0.0)[0]
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    a, b, base = _unet_weights(via_core), _unet_weights(via_file), _unet_weights(model)
    changed = [k for k in a if not torch.equal(a[k], base[k])]
    assert len(changed) == len([k for k in lora_model if k.endswith(".lora_up.weight")]) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    # core's SaveLoRA writes it; the file loads back with zero unloaded keys
    SaveLoRA().save(lora_model, "loras/from_core")
    saved = sorted((out / "loras").glob("from_core*.safetensors"))
    assert saved
    # continue from the LORA_MODEL with another alpha and a negligible lr (lr 0 would freeze every group, which
    # kohya's rule refuses): the run starts, and so practically ends, at the same ΔW
    with torch.inference_mode():
        res2 = lora_nodes.ConceptLabTrainLora().train(model, clip, vae, ds, **_kw(
            output_name="cont", learning_rate=1e-12, network_alpha=1.0, train_text_encoder=False),
            lora_model=lora_model)
    sd2 = comfy.utils.load_torch_file(str(out / "loras" / res2[2]), safe_load=True)
    via_cont = comfy.sd.load_lora_for_models(model, None, sd2, 0.7, 0.0)[0]
    c = _unet_weights(via_cont)
    for k in changed:
        torch.testing.assert_close(c[k], a[k], rtol=1e-5, atol=1e-6)
    # what core's TrainLoraNode also trains (bias / norm diffs) cannot be continued: refused by name, not dropped
    extra = dict(lora_model)
    extra["diffusion_model.out.2.diff_b"] = torch.zeros(4)
    with pytest.raises(ValueError, match=r"cannot continue 1 LORA_MODEL entries .*out\.2\.diff_b"):
        with torch.inference_mode():
            lora_nodes.ConceptLabTrainLora().train(model, clip, vae, ds, **_kw(output_name="bad0"), lora_model=extra)
    # a rank that does not match is refused by name before training
    with pytest.raises(ValueError, match="rank 4 but this run trains rank 8"):
        with torch.inference_mode():
            lora_nodes.ConceptLabTrainLora().train(model, clip, vae, ds, **_kw(output_name="bad", network_dim=8),
                                                  lora_model=lora_model)
