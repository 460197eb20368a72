"""ComfyHost on ComfyUI's own SDXL model class (tiny width): predictions equal the diffusers host on the same
weights and conditioning (size ids included), conditioning carries the pooled embedding, a LoRA trains through
ComfyUI's apply_model path, v-prediction + zero-terminal-SNR patch ComfyUI's model_sampling, wrong CLIPs are
refused. Real-ComfyUI tier (``COMFYUI_PATH``)."""

from __future__ import annotations

import pytest
import torch
from conftest import requires_comfyui

pytestmark = requires_comfyui


@pytest.fixture(scope="module")
def sdxl_models():
    from e2e.comfy_env import comfy_inprocess, tiny_sdxl_clip, tiny_sdxl_patcher, tiny_vae

    comfy_inprocess()
    with torch.inference_mode():
        return tiny_sdxl_patcher(), tiny_sdxl_clip(), tiny_vae()


def _diffusers_twin(model):
    """A diffusers SDXL UNet with the ComfyUI model's weights (ComfyUI's own diffusers↔LDM key map)."""
    import comfy.utils
    from diffusers import UNet2DConditionModel
    from e2e.comfy_env import TINY_SDXL_POOLED, TINY_SDXL_UNET_CONFIG

    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), cross_attention_dim=80, norm_num_groups=32,
        attention_head_dim=1,  # ComfyUI SDXL: num_head_channels 64 (supported_models_base unet_extra_config)
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=6 * 256 + TINY_SDXL_POOLED)
    comfy_sd = model.model.diffusion_model.state_dict()
    dmap = comfy.utils.unet_to_diffusers(dict(TINY_SDXL_UNET_CONFIG))
    with torch.inference_mode(False):
        own = set(unet.state_dict())  # the map names label_emb both as class_embedding and add_embedding
        sd = {d: comfy_sd[l].clone() for d, l in dmap.items() if l in comfy_sd and d in own}
        missing, unexpected = unet.load_state_dict(sd, strict=False)
    assert not unexpected and not missing, (missing[:5], unexpected[:5])
    return unet


def test_comfyhost_equals_diffusers_host_on_sdxl(sdxl_models):
    from conceptlab.nodes.comfy_host import ComfyHost
    from conceptlab.training.conditioning import Conditioning
    from conceptlab.training.diffusers_host import DiffusersHost

    model, clip, vae = sdxl_models
    with torch.inference_mode():
        host = ComfyHost(model, clip, vae)
        try:
            assert host.arch == "sdxl" and sorted(host.components()) == ["te1", "te2", "unet"]
            cond = host.encode_prompts(["pixel art, knight", "a cat"])
            assert cond.context.shape == (2, 77, 80) and cond.pooled.shape == (2, 48)
            g = torch.Generator().manual_seed(0)
            x = torch.randn(2, 4, 8, 8, generator=g)
            t = torch.tensor([3, 640])
            sizes = torch.tensor([[128.0, 96, 8, 0, 64, 64], [64, 64, 0, 0, 64, 64]])
            c = Conditioning(cond.context.clone(), cond.pooled.clone()).with_extras(size_ids=sizes)
            ours = host.predict(x, t, c)
            with torch.inference_mode(False):
                twin = DiffusersHost(_diffusers_twin(model), None, None, None,
                                     alphas_cumprod=host.alphas_cumprod)
                ref = twin.predict(x.clone(), t.clone(), c.map_tensors(lambda z: z.clone()))
            torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
            # the size ids reach ComfyUI's encode_adm (a different crop changes the prediction)
            c2 = c.with_extras(size_ids=torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2))
            assert (host.predict(x, t, c2) - ours).abs().max() > 1e-6
        finally:
            host.close()


def test_comfyhost_sdxl_lora_trains_and_schedule_patch(sdxl_models, tmp_path, dawnlike_dir):
    from test_train_lora import cfg_for, make_dataset

    from conceptlab.formats.safetensors_io import load_state_dict, read_metadata
    from conceptlab.nodes.comfy_host import ComfyHost
    from conceptlab.training.lora.trainer import LoraTrainer

    model, clip, vae = sdxl_models
    ds = make_dataset(dawnlike_dir, tmp_path / "ds", n=2, repeats=1)
    with torch.inference_mode():
        host = ComfyHost(model, clip, vae)
        try:
            with torch.inference_mode(False):
                res = LoraTrainer(host, ds, cfg_for(tmp_path / "out", max_train_epochs=1,
                                                    network_train_unet_only=False, v_parameterization=True,
                                                    zero_terminal_snr=True, save_state=False)).run()
            assert host.prediction_type == "v_prediction"
            ms = host.patcher.get_model_object("model_sampling")
            assert getattr(ms, "zsnr", False) and float(host.alphas_cumprod[-1]) < 1e-7
            names = {k.split(".")[0] for k in load_state_dict(res.final_path)}
            assert any(n.startswith("lora_te2_") for n in names)
            assert any(n.startswith("lora_unet_input_blocks_") for n in names)
            assert read_metadata(res.final_path)["ss_base_model_version"] == "sdxl_base_v1-0"
        finally:
            host.close()
    # the input MODEL's sampling is untouched (the host patched its own clone)
    assert not getattr(model.get_model_object("model_sampling"), "zsnr", False)


def test_comfyhost_refuses_a_clip_of_another_family(sdxl_models):
    from e2e.comfy_env import tiny_sd1_clip

    from conceptlab.nodes.comfy_host import ComfyHost

    model, _, vae = sdxl_models
    with torch.inference_mode(), pytest.raises(ValueError, match="same checkpoint"):
        ComfyHost(model, tiny_sd1_clip(), vae)


def test_comfyhost_gradient_checkpointing_same_gradients(sdxl_models):
    from conceptlab.nodes.comfy_host import ComfyHost
    from conceptlab.training.host import FullDelta

    model, clip, vae = sdxl_models
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([400])
    with torch.inference_mode():
        host = ComfyHost(model, clip, vae)
        try:
            with torch.inference_mode(False):
                cond = host.encode_prompts(["a knight"]).detach()
                path = next(p for p in host.modules("unet") if p.endswith("attn2.to_v"))
                d = FullDelta(host.modules("unet")[path].weight.shape)
                host.install_delta("unet", path, "weight", d)
                grads = []
                for on in (False, True):
                    host.set_gradient_checkpointing(on)
                    d.weight.grad = None
                    host.predict(x, t, cond).float().pow(2).mean().backward()
                    grads.append(d.weight.grad.clone())
                torch.testing.assert_close(grads[0], grads[1])
                assert grads[0].abs().sum() > 0
        finally:
            host.close()
    blocks = [m for m in model.model.diffusion_model.modules() if hasattr(m, "org_forward")]
    assert blocks == []  # close() restored the shared model's forwards


def test_esd_x_through_comfyhost_on_sdxl_and_diff_keys_load(sdxl_models):
    import comfy.lora

    from conceptlab.nodes.comfy_host import ComfyHost
    from conceptlab.training.esd.config import ESDConfig
    from conceptlab.training.esd.erase import erase
    from conceptlab.training.esd.outputs import diff_state_dict

    model, clip, vae = sdxl_models
    with torch.inference_mode():
        host = ComfyHost(model, clip, vae)
        try:
            with torch.inference_mode(False):
                cfg = ESDConfig(concepts="skeleton", iterations=2, width=64, height=64, xt_source="noised",
                                noised_cache=1, ddim_steps=2, lr=1e-3, seed=0)
                res = erase(host, cfg)
        finally:
            host.close()
    diffs = diff_state_dict(res)
    assert res.stats["iterations_done"] == 2 and diffs
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    names = {k.rsplit(".", 1)[0] for k in diffs}
    assert all(n.startswith("lora_unet_input_blocks_") or n.startswith(("lora_unet_middle_block_",
                                                                        "lora_unet_output_blocks_")) for n in names)
    missing = [n for n in names if n not in key_map]
    assert missing == []  # every .diff key resolves to a weight in ComfyUI's own LoRA key map
