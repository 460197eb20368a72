"""Train LoRA node on a Flux MODEL/CLIP/VAE (real-ComfyUI tier, in-process): ComfyUI's own Flux model, Flux CLIP
(clip_l + t5xxl) and a 16-channel VAE at tiny width (tests/e2e/comfy_flux.py). The saved files carry kohya
``lora_flux`` names and ``ss_base_model_version = flux1``, ComfyUI's LoRA loader takes every key, the inputs are
unchanged, and per-epoch samples come from ComfyUI's sampler on the model's own ``model_sampling`` with the
Flux guidance on the conditioning. Skips without ``COMFYUI_PATH``."""

from __future__ import annotations

import logging

import torch
from conftest import requires_comfyui

from conceptlab.nodes import lora as lora_nodes
from test_lora_nodes import _dataset, _setup_comfy, _train_kwargs


@requires_comfyui
def test_train_lora_node_on_flux(tmp_path, dawnlike_dir, caplog, monkeypatch):
    inp, out = _setup_comfy(tmp_path, dawnlike_dir)
    import comfy.samplers
    import comfy.sd
    import comfy.utils
    from e2e.comfy_flux import tiny_flux_clip, tiny_flux_patcher, tiny_flux_vae
    from safetensors import safe_open

    with torch.inference_mode():
        model, clip, vae = tiny_flux_patcher(), tiny_flux_clip(), tiny_flux_vae()
    before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    seen = {"guidance": [], "sampling": []}
    orig = comfy.samplers.CFGGuider.sample

    def spy(self, *a, **k):  # what ComfyUI's sampler gets for the per-epoch samples
        seen["sampling"].append(type(self.model_patcher.get_model_object("model_sampling")).__mro__[1].__name__)
        seen["guidance"] += [c.get("guidance") for c in self.original_conds["positive"]]
        return orig(self, *a, **k)

    monkeypatch.setattr(comfy.samplers.CFGGuider, "sample", spy)
    ds = _dataset()
    with torch.inference_mode():
        m2, c2, name, _, _, grid, _, loss = lora_nodes.ConceptLabTrainLora().train(
            model, clip, vae, ds, **_train_kwargs(output_name="tinyflux", max_train_epochs=1, mixed_precision="no",
                                                  sample_cfg=1.0))
    f = out / "loras" / "tinyflux.safetensors"
    assert name == f.name and f.is_file() and grid.shape[0] == 1
    assert all(torch.isfinite(torch.tensor(v)) for v in loss["loss"])
    with safe_open(str(f), "pt") as fh:
        keys, md = list(fh.keys()), fh.metadata()
    assert md["ss_base_model_version"] == "flux1"
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
    assert any(k.startswith("lora_unet_single_blocks_0_linear1.") for k in keys)
    assert any(k.startswith("lora_te1_text_model_encoder_layers_") for k in keys)  # train_text_encoder: CLIP-L
    # samples: the model's own flow model_sampling, FluxGuidance 3.5 on the conditioning
    assert seen["sampling"] and set(seen["sampling"]) == {"ModelSamplingFlux"}
    assert seen["guidance"] and set(seen["guidance"]) == {3.5}
    after = model.model.diffusion_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and not model.weight_wrapper_patches
    caplog.clear()
    with caplog.at_level(logging.WARNING), torch.inference_mode():
        sd = comfy.utils.load_torch_file(str(f), safe_load=True)
        comfy.sd.load_lora_for_models(model, clip, sd, 1.0, 1.0)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
