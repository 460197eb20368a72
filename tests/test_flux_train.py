"""Flux.1 LoRA training on the tiny Flux host: the flow objective behind the family seam (kohya
flux_train_network.py semantics), kohya lora_flux names, diffusers' Flux LoRA loader on our file, and the trainer's
guarantees (loss falls, resume equivalence, metadata, samples)."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import pytest
import torch
from test_train_lora import cfg_for, make_dataset
from tiny_models import tiny_flux_host

from conceptlab.formats.flux_keys import CANONICAL_PREFIX, kohya_lora_modules
from conceptlab.formats.safetensors_io import load_state_dict, read_metadata
from conceptlab.training import flow
from conceptlab.training.lora.network import LoRANetwork
from conceptlab.training.lora.objective import FlowObjective, objective_for
from conceptlab.training.lora.build import build_network_and_groups
from conceptlab.training.lora.config import TrainConfig
from conceptlab.training.lora.loss import diffusion_loss
from conceptlab.training.lora.trainer import LoraTrainer


@pytest.fixture(scope="module")
def host():
    return tiny_flux_host(0)


# -- objective ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("opts", [dict(timestep_sampling="sigma", model_prediction_type="sigma_scaled",
                                       weighting_scheme="cosmap"),
                                  dict(timestep_sampling="flux_shift", model_prediction_type="raw",
                                       ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True),
                                  dict(timestep_sampling="shift", discrete_flow_shift=3.1582,
                                       model_prediction_type="additive", loss_type="huber",
                                       huber_schedule="exponential", guidance_scale=1.0)])
def test_flow_loss_is_kohyas_composition_on_the_same_draws(host, opts):
    """diffusion_loss dispatches to the flow step by the family table, and equals kohya's process_batch composed from
    the kohya-pinned pieces of training/flow.py with kohya's draw order (noise, σ, ξ, γ)."""
    assert isinstance(objective_for(host), FlowObjective)
    cfg = cfg_for(Path("."), **opts).validate()
    lat = torch.randn(2, 16, 6, 4, generator=torch.Generator().manual_seed(9))
    cond = host.encode_prompts(["a", "b"]).detach()
    with torch.no_grad():
        ours = diffusion_loss(host, lat, cond, cfg, torch.Generator().manual_seed(5))
        g = torch.Generator().manual_seed(5)
        noise = torch.randn(lat.shape, generator=g)
        sig, ts = flow.sample_sigmas(2, (6, 4), g, timestep_sampling=cfg.timestep_sampling,
                                     discrete_flow_shift=cfg.discrete_flow_shift, weighting_scheme=cfg.weighting_scheme)
        eps = noise
        if cfg.ip_noise_gamma:
            xi = torch.randn(lat.shape, generator=g)
            eps = noise + float(torch.rand(1, generator=g)) * cfg.ip_noise_gamma * xi
        x = (1 - sig.view(-1, 1, 1, 1)) * lat + sig.view(-1, 1, 1, 1) * eps
        v = host.predict(x, sig, cond.with_extras(guidance=torch.full((2,), cfg.guidance_scale)))
        pred, w = flow.apply_model_prediction_type(v, x, sig, cfg.model_prediction_type, cfg.weighting_scheme)
        if cfg.loss_type == "huber":
            c = (torch.exp(torch.log(torch.tensor(cfg.huber_c)) * ts / 1000) * cfg.huber_scale).view(-1, 1, 1, 1)
            el = 2 * c * (torch.sqrt((pred - (noise - lat)) ** 2 + c ** 2) - c)
        else:
            el = (pred - (noise - lat)) ** 2
        if w is not None:
            el = el * w
        ref = el.mean()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_ddpm_only_settings_are_refused_or_warned_by_name(host, tmp_path, caplog, dawnlike_dir):
    ds = make_dataset(dawnlike_dir, tmp_path / "ds", n=1, repeats=1)
    for bad, match in ((dict(v_parameterization=True), "v_parameterization"),
                       (dict(zero_terminal_snr=True), "zero_terminal_snr"),
                       (dict(loss_type="huber"), "huber_schedule"),
                       (dict(apply_t5_attn_mask=True), "apply_t5_attn_mask")):
        with pytest.raises(ValueError, match=match):
            LoraTrainer(host, ds, cfg_for(tmp_path / "o", **bad))
    with caplog.at_level(logging.WARNING):
        LoraTrainer(host, ds, cfg_for(tmp_path / "o", noise_offset=0.05, min_snr_gamma=5, max_timestep=900,
                                      clip_skip=2))
    text = caplog.text
    for name in ("noise_offset", "min_snr_gamma", "max_timestep", "clip_skip"):
        assert name in text
    with pytest.raises(ValueError, match="timestep_sampling"):
        cfg_for(Path("."), timestep_sampling="logit").validate()
    with pytest.raises(ValueError, match="discrete_flow_shift"):
        cfg_for(Path("."), discrete_flow_shift=0).validate()
    # kohya Flux TOML keys are accepted by the kohya key check, the DDPM model warns about flow-only ones
    from conceptlab.training.lora import kohya_args as KA

    assert KA.check_settings({"timestep_sampling": "shift", "guidance_scale": 1.0, "model_prediction_type": "raw",
                              "t5xxl_max_token_length": 256, "cache_text_encoder_outputs": True},
                             own_keys=KA.own_setting_names()) == [
        "cache_text_encoder_outputs has no effect here (text-encoder outputs are always cached while the text "
        "encoders are frozen (Flux CLI with static captions: T5-XXL and CLIP-L then leave the GPU, as kohya))"]
    assert KA.check_settings({"blocks_to_swap": 18}) == []  # honoured by the Flux CLI (tests/test_flux_block_swap.py)
    with pytest.raises(KA.KohyaSettingError, match="split_mode = True: deprecated in kohya; use blocks_to_swap"):
        KA.check_settings({"split_mode": True})
    from tiny_models import tiny_host

    with caplog.at_level(logging.WARNING):
        caplog.clear()
        LoraTrainer(tiny_host(), ds, cfg_for(tmp_path / "o", timestep_sampling="shift"))
    assert "timestep_sampling applies to flow-matching models" in caplog.text


# -- LoRA network: kohya lora_flux names ----------------------------------------------------------------------------

def test_lora_names_are_kohya_lora_flux(host):
    keys = [CANONICAL_PREFIX + p + ".weight" for p in host.modules("unet")]
    cfg = cfg_for(Path("."), network_train_unet_only=False)
    net, _ = build_network_and_groups(host, cfg.validate())
    names = list(net.loras)
    assert [n for n in names if n.startswith("lora_unet_")] == list(kohya_lora_modules(keys))
    assert "lora_unet_double_blocks_0_img_attn_qkv" in names and "lora_unet_single_blocks_1_linear1" in names
    assert "lora_unet_single_blocks_0_modulation_lin" in names and "lora_unet_img_in" not in names
    te = [n for n in names if not n.startswith("lora_unet_")]
    assert te and all(n.startswith("lora_te1_text_model_encoder_layers_") for n in te)  # no T5 by default (kohya)
    assert net.loras["lora_unet_single_blocks_0_linear1"].weight_shape == (3 * 16 + 64, 16)

    def names_for(*args, unet_only=True):
        c = cfg_for(Path("."), network_args=list(args)).validate()
        return list(build_network_and_groups(host, c, train_te=not unet_only)[0].loras)

    assert all("single_blocks" in n for n in names_for("train_blocks=single"))
    assert names_for("train_blocks=double") == list(kohya_lora_modules(keys, "double"))
    t5 = [n for n in names_for("train_t5xxl=True", unet_only=False) if n.startswith("lora_te3_")]
    assert "lora_te3_encoder_block_0_layer_0_SelfAttention_q" in t5
    assert "lora_te3_encoder_block_1_layer_1_DenseReluDense_wi_0" in t5
    n = names_for("img_attn_dim=8", "single_mod_dim=0", "train_single_block_indices=1", "in_dims=[2,0,0,0,3]")
    net = build_network_and_groups(host, cfg_for(Path("."), network_args=[
        "img_attn_dim=8", "single_mod_dim=0", "train_single_block_indices=1", "in_dims=[2,0,0,0,3]"]).validate(),
        train_te=False)[0]
    assert net.loras["lora_unet_double_blocks_0_img_attn_qkv"].dim == 8
    assert net.loras["lora_unet_double_blocks_0_txt_attn_qkv"].dim == 4
    assert not any("modulation" in x or "single_blocks_0" in x for x in n)
    assert {"lora_unet_img_in", "lora_unet_txt_in"} <= set(n) and net.loras["lora_unet_txt_in"].dim == 3
    for bad, match in (("split_qkv=True", "split_qkv"), ("ggpo_beta=0.01", "GGPO"), ("block_dims=1,2", "block_dims")):
        with pytest.raises(ValueError, match=match):
            build_network_and_groups(host, cfg_for(Path("."), network_args=[bad]).validate())
    from tiny_models import tiny_host

    with pytest.raises(ValueError, match="train_blocks is a Flux network arg"):
        build_network_and_groups(tiny_host(), cfg_for(Path("."), network_args=["train_blocks=single"]).validate())


# -- training runs ----------------------------------------------------------------------------------------------------

def test_flux_training_loss_falls_files_and_metadata(dawnlike_dir, tmp_path, caplog):
    ds = make_dataset(dawnlike_dir, tmp_path / "ds", n=4, repeats=2)
    host = tiny_flux_host(1)
    ds.cache_latents(host.encode_images)
    lat = torch.stack([e.latents for e in ds.entries])
    cond = host.encode_prompts([e.caption for e in ds.entries])
    cfg = cfg_for(tmp_path / "out", max_train_epochs=4, learning_rate=1e-2, network_dim=8, network_alpha=8,
                  train_batch_size=4, network_train_unet_only=False, text_encoder_lr=1e-3, model_prediction_type="raw",
                  timestep_sampling="sigmoid", sample_prompts="dawnlike, pixel art --g 2.5 --s 2", sample_steps=2,
                  sample_every_n_epochs=4, sample_width=32, sample_height=32, save_state=False,
                  sample_grid_cells="native")

    def fixed_loss():
        sig = torch.tensor([0.2, 0.4, 0.6, 0.8])
        with torch.no_grad():
            return float(diffusion_loss(host, lat, cond, cfg, torch.Generator().manual_seed(0), timesteps=sig))

    before = fixed_loss()
    calls = []
    orig_sample = host.sample

    @functools.wraps(orig_sample)  # keeps the signature the trainer inspects (guidance=)
    def spy(prompts, negative="", **kw):
        calls.append(kw)
        return orig_sample(prompts, negative, **kw)
    host.sample = spy
    res = LoraTrainer(host, ds, cfg).run()
    assert host.installed_deltas() == {}
    res.network.install(host)
    after = fixed_loss()
    res.network.remove()
    assert after < 0.93 * before, (before, after)  # measured 0.89 (8 steps on CPU)
    # per-epoch samples with Flux settings: the prompt's --g as the guidance embedding, kohya's Flux cfg 1, --s steps
    assert [(c["guidance"], c["cfg"], c["steps"], c["width"]) for c in calls] == [(2.5, 1.0, 2, 32)]
    rec = res.history[-1]
    assert len(rec["samples"]) == 1 and (tmp_path / "out" / rec["samples"][0]).is_file()
    assert "effective_colors" in rec  # palette metrics of the samples
    md = read_metadata(res.final_path)
    assert md["ss_base_model_version"] == "flux1" and md["modelspec.architecture"] == "flux-1-dev/lora"
    assert md["modelspec.implementation"] == "https://github.com/black-forest-labs/flux"
    assert md["ss_timestep_sampling"] == "sigmoid" and md["ss_model_prediction_type"] == "raw"
    assert md["ss_guidance_scale"] == "3.5" and "modelspec.prediction_type" not in md
    sd = load_state_dict(res.final_path)
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight" in sd
    assert any(k.startswith("lora_te1_") for k in sd)
    # the file round-trips into our network with nothing unmatched
    net, unmatched = LoRANetwork.from_kohya_state_dict(host, sd)
    assert unmatched == []


def test_diffusers_flux_lora_loader_reads_our_file(tmp_path, caplog):
    """diffusers' kohya-Flux conversion (``FluxPipeline.lora_state_dict``) hard-codes Flux.1's width (3072 / 12288),
    so the file is made for a Flux.1-width transformer (1 double + 1 single block) built on the meta device: every
    converted key names a module of diffusers' FluxTransformer2DModel / CLIPTextModel with the right shape, and the
    split q/k/v/mlp LoRAs diffusers makes are the row blocks of our fused ΔW."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from conceptlab.formats.lora_files import save_kohya_lora
    from conceptlab.training.flux_host import FluxHost

    with torch.device("meta"):
        tr = FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True)
    host = FluxHost(tr, None, None, None, None, None, device="meta")
    net = LoRANetwork.create(host, network_dim=2, network_alpha=1.0, seed=0)
    with torch.no_grad():
        for d in net.loras.values():
            d.lora_up.normal_(0, 0.1)
    path = save_kohya_lora(tmp_path / "f.safetensors", net.kohya_modules(), {"ss_base_model_version": "flux1"},
                           dtype=torch.float32)
    with caplog.at_level(logging.WARNING):
        out = FluxPipeline.lora_state_dict(str(path), return_alphas=True)
    conv = out[0] if isinstance(out, tuple) else out
    assert not [r for r in caplog.records if "unexpected" in r.getMessage().lower() or "not" in r.getMessage()]
    params = dict(tr.named_parameters())
    assert conv and all(k.startswith("transformer.") for k in conv)
    for k, v in conv.items():
        mod = k[len("transformer."):].rsplit(".lora_", 1)[0]
        w = params[mod + ".weight"]
        assert v.shape[0 if ".lora_B." in k else 1] == w.shape[0 if ".lora_B." in k else 1], k
    # rows of the fused ΔW: to_q/to_k/to_v of img_attn.qkv and proj_mlp of linear1
    dq = net.loras["lora_unet_double_blocks_0_img_attn_qkv"].delta()
    dl = net.loras["lora_unet_single_blocks_0_linear1"].delta()
    for name, fused, rows in (("transformer_blocks.0.attn.to_k", dq, (3072, 6144)),
                              ("single_transformer_blocks.0.proj_mlp", dl, (9216, 21504))):
        got = conv[f"transformer.{name}.lora_B.weight"] @ conv[f"transformer.{name}.lora_A.weight"]
        torch.testing.assert_close(got.float(), fused[rows[0]:rows[1]], rtol=1e-4, atol=1e-6)


class _Cancel(Exception):
    pass


def test_flux_resume_reproduces_the_uninterrupted_run(dawnlike_dir, tmp_path):
    ds = make_dataset(dawnlike_dir, tmp_path / "ds", n=2, repeats=2)
    kw = dict(max_train_epochs=2, save_every_n_epochs=1, network_dropout=0.1, timestep_sampling="shift",
              ip_noise_gamma=0.05, train_batch_size=2)
    full = LoraTrainer(tiny_flux_host(), ds, cfg_for(tmp_path / "a", **kw)).run()

    def cancel_in_epoch_2(step, total, info):
        if info["epoch"] == 2:
            raise _Cancel()

    with pytest.raises(_Cancel):
        LoraTrainer(tiny_flux_host(), ds, cfg_for(tmp_path / "b", **kw), progress=cancel_in_epoch_2).run()
    assert (tmp_path / "b" / "sprite-000001.safetensors").is_file()
    resumed = LoraTrainer(tiny_flux_host(), ds, cfg_for(tmp_path / "b", resume="auto", **kw)).run()
    a, b = full.network.kohya_state_dict(), resumed.network.kohya_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.step_losses == full.step_losses


@pytest.mark.skipif(not __import__("os").environ.get("KOHYA_SD_SCRIPTS"),
                    reason="kohya tier: set KOHYA_SD_SCRIPTS to a kohya-ss/sd-scripts checkout to run")
def test_network_names_equal_kohya_create_network(host):
    """kohya's own networks/lora_flux.py create_network, on kohya's Flux class at the tiny model's widths and on our
    T5 encoder (train_t5xxl), names exactly the modules our Flux network trains (transformer and lora_te3_). CLIP-L
    names are not compared: transformers 5 drops CLIPTextModel's ``text_model.`` level that kohya's names keep."""

    from kohya_import import import_kohya

    flux_models, lora_flux = import_kohya("library.flux_models", "networks.lora_flux")
    params = flux_models.FluxParams(in_channels=64, vec_in_dim=32, context_in_dim=32, hidden_size=16, mlp_ratio=4.0,
                                    num_heads=2, depth=1, depth_single_blocks=2, axes_dim=[2, 2, 4], theta=10000,
                                    qkv_bias=True, guidance_embed=True)
    flux = flux_models.Flux(params)
    for args in ([], ["train_blocks=single", "train_single_block_indices=1"],
                 ["img_mod_dim=0", "txt_mod_dim=0", "single_mod_dim=0", "img_attn_dim=8"],
                 ["in_dims=[2,0,0,0,3]"], ["train_t5xxl=True"]):
        kw = dict(a.split("=", 1) for a in args)
        knet = lora_flux.create_network(1.0, 4, 1.0, None, [None, host.t5], flux, **kw)
        theirs = {lo.lora_name: lo.lora_dim for lo in knet.unet_loras + knet.text_encoder_loras}
        c = cfg_for(Path("."), network_args=args).validate()
        ours = build_network_and_groups(host, c, train_te="train_t5xxl=True" in args)[0]
        mine = {n: d.dim for n, d in ours.loras.items() if not n.startswith("lora_te1_")}
        assert mine == theirs, args
