"""SDXL-family training and erasure on a tiny SDXL-shaped diffusers model (two text encoders, pooled text, six
size ids): conditioning and prediction against independent diffusers calls, kohya's size ids and zero-terminal-SNR
schedule, kohya SDXL key names, files diffusers loads, a training run with SDXL metadata, ESD-x on SDXL."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_train_lora import cfg_for, make_dataset
from tiny_models import tiny_host, tiny_sdxl_host, word_hash_tokenizer

from conceptlab.formats.safetensors_io import load_state_dict, read_metadata
from conceptlab.training.conditioning import Conditioning, default_size_ids
from conceptlab.training.host import zero_terminal_snr_alphas_cumprod
from conceptlab.training.lora.loss import diffusion_loss, sdxl_size_ids
from conceptlab.training.lora.trainer import LoraTrainer


def test_sdxl_conditioning_and_prediction_equal_direct_diffusers_calls():
    host = tiny_sdxl_host()
    prompts = ["pixel art, skeleton king", "a red apple"]
    with torch.no_grad():
        cond = host.encode_prompts(prompts)
        ids = word_hash_tokenizer(prompts)
        h1 = host.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        o2 = host.text_encoder_2(ids, output_hidden_states=True)
        torch.testing.assert_close(cond.context, torch.cat([h1, o2.hidden_states[-2]], -1), rtol=0, atol=0)
        torch.testing.assert_close(cond.pooled, o2.text_embeds, rtol=0, atol=0)
        x, t = torch.randn(2, 4, 8, 8), torch.tensor([5, 700])
        sizes = torch.tensor([[96.0, 128, 0, 16, 64, 64], [64, 64, 0, 0, 64, 64]])
        ours = host.predict(x, t, cond.with_extras(size_ids=sizes))
        ref = host.unet(x, t, encoder_hidden_states=cond.context,
                        added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": sizes}).sample
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)
        # no size ids: the latent's pixel size and no crop, as diffusers' pipeline does for text-to-image
        dflt = host.unet(x, t, encoder_hidden_states=cond.context,
                         added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": default_size_ids(2, 64, 64)})
        torch.testing.assert_close(host.predict(x, t, cond), dflt.sample, rtol=0, atol=0)
        # size ids matter (the micro-conditioning is wired, not ignored)
        assert (ours - dflt.sample).abs().max() > 1e-5
        with pytest.raises(ValueError, match="pooled"):
            host.predict(x, t, Conditioning(cond.context))


def test_conditioning_rows_cat_and_lengths():
    a = Conditioning(torch.randn(2, 77, 8), torch.randn(2, 4))
    b = Conditioning(torch.randn(1, 154, 8), torch.randn(1, 4))
    c = Conditioning.cat([a, b])
    assert c.context.shape == (3, 154, 8) and c.pooled.shape == (3, 4)
    torch.testing.assert_close(c.context[0, 77:], a.context[0])  # 77-token chunks repeated like ComfyUI
    assert [r.context.shape[0] for r in c.rows()] == [1, 1, 1]
    with pytest.raises(ValueError):
        Conditioning.cat([a, Conditioning(torch.randn(1, 77, 8))])  # pooled on one side only
    with pytest.raises(ValueError):
        a.with_extras(nonsense=torch.zeros(2))


def test_size_ids_follow_kohya_get_crop_ltrb():
    # kohya train_util.BucketManager.get_crop_ltrb: the image fitted inside the bucket, Stability AI's convention
    wide = SimpleNamespace(size=(200, 100), bucket_reso=(128, 96))   # image w/h 2.0 > bucket 1.33: width fits
    tall = SimpleNamespace(size=(100, 200), bucket_reso=(96, 128))   # image 0.5 < bucket 0.75: height fits
    ids = sdxl_size_ids([wide, tall])
    # wide: resized 128 × 64 inside 128 × 96 → top = (96 − 64)//2 = 16, left 0
    assert ids[0].tolist() == [100, 200, 16, 0, 96, 128]
    # tall: resized 64 × 128 inside 96 × 128 → left = (96 − 64)//2 = 16
    assert ids[1].tolist() == [200, 100, 0, 16, 128, 96]
    # flipped: left becomes bucket_w − crop_right = 96 − (16 + 64) = 16 (symmetric here) …
    assert sdxl_size_ids([tall], [True])[0].tolist() == [200, 100, 0, 16, 128, 96]
    # … and differs for an odd margin: image 100 × 300 in 64 × 128 → width 42.67, left 10, right 52.67
    odd = SimpleNamespace(size=(100, 300), bucket_reso=(64, 128))
    assert sdxl_size_ids([odd])[0, 3] == 10 and sdxl_size_ids([odd], [True])[0, 3] == 11


def test_zero_terminal_snr_matches_diffusers_rescale():
    from diffusers import DDPMScheduler

    from conceptlab.training.diffusers_host import sd_alphas_cumprod

    ac = sd_alphas_cumprod()
    ours = zero_terminal_snr_alphas_cumprod(ac)
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                        rescale_betas_zero_snr=True).alphas_cumprod
    torch.testing.assert_close(ours, ref.float(), rtol=1e-5, atol=1e-7)
    assert ours[-1] == 0 and abs(float(ours[0] - ac[0])) < 1e-7
    torch.testing.assert_close(zero_terminal_snr_alphas_cumprod(ours), ours)  # idempotent
    host = tiny_sdxl_host()
    host.configure_schedule(prediction_type="v_prediction", zero_terminal_snr=True)
    assert host.prediction_type == "v_prediction" and host.alphas_cumprod[-1] == 0
    with pytest.raises(ValueError):
        host.configure_schedule(prediction_type="x0")


def test_sdxl_v_prediction_objective_is_kohya_v_target():
    host = tiny_sdxl_host(prediction_type="v_prediction")
    host.configure_schedule(zero_terminal_snr=True)
    cond = host.encode_prompts(["a", "b"]).detach()
    lat = torch.randn(2, 4, 8, 8)
    cfg = cfg_for(Path("."), zero_terminal_snr=True, v_parameterization=True)
    ts = torch.tensor([0, 999])
    with torch.no_grad():
        ours = diffusion_loss(host, lat, cond, cfg, torch.Generator().manual_seed(0), timesteps=ts)
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(lat.shape, generator=g)
        a = host.alphas_cumprod[ts].view(-1, 1, 1, 1)
        x_t = a.sqrt() * lat + (1 - a).sqrt() * noise   # at t = 999, a = 0: pure noise
        v = a.sqrt() * noise - (1 - a).sqrt() * lat     # and the v target is −x0 there
        ref = ((host.predict(x_t, ts, cond) - v) ** 2).mean()
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(x_t[1], noise[1])


def test_sdxl_lora_training_files_keys_and_metadata(dawnlike_dir, tmp_path):
    ds = make_dataset(dawnlike_dir, tmp_path / "ds", n=3, repeats=1)
    host = tiny_sdxl_host()
    cfg = cfg_for(tmp_path / "out", max_train_epochs=2, network_train_unet_only=False, text_encoder_lr=1e-4,
                  conv_dim=2, conv_alpha=1, sample_prompts="pixel art, knight", sample_steps=2, sample_width=64,
                  sample_height=64, zero_terminal_snr=True, v_parameterization=True)
    seen = []
    orig = host.predict

    def spy(x, t, cond):
        seen.append(Conditioning.wrap(cond).extras.get("size_ids"))
        return orig(x, t, cond)
    host.predict = spy
    res = LoraTrainer(host, ds, cfg).run()
    assert host.installed_deltas() == {}
    sd = load_state_dict(res.final_path)
    names = {k.split(".")[0] for k in sd}
    assert any(n.startswith("lora_te1_text_model_encoder_layers_") for n in names)
    assert any(n.startswith("lora_te2_text_model_encoder_layers_") for n in names)
    unet = sorted(n for n in names if n.startswith("lora_unet_"))
    # kohya's SDXL trainer names UNet modules the LDM way (sdxl_original_unet), never diffusers' down_blocks
    assert unet and all(n.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_",
                                      "lora_unet_output_blocks_")) for n in unet)
    assert "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k" in names  # 2nd transformer layer
    assert "lora_unet_input_blocks_2_0_op" in names  # Downsample2D conv (conv_dim on)
    md = read_metadata(res.final_path)
    assert md["ss_base_model_version"] == "sdxl_base_v1-0"
    assert md["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert md["ss_zero_terminal_snr"] == "True" and md["modelspec.prediction_type"] == "v"
    # training batches carried kohya's size ids (original size of the 16 px sprites, bucket 64 px)
    train_ids = [s for s in seen if s is not None]
    assert train_ids and all(s.shape[1] == 6 for s in train_ids)
    assert {tuple(r[4:].tolist()) for s in train_ids for r in s} == {(64.0, 64.0)}
    assert {tuple(r[:2].tolist()) for s in train_ids for r in s} == {(16.0, 16.0)}
    # the file round-trips into a network for the same host with nothing unmatched
    from conceptlab.training.lora.network import LoRANetwork

    net, unmatched = LoRANetwork.from_kohya_state_dict(host, sd)
    assert unmatched == [] and len(net.targets) == len(names)


def test_sdxl_lora_file_loads_in_diffusers_without_unexpected_keys(dawnlike_dir, tmp_path, caplog):
    from diffusers import StableDiffusionXLPipeline

    ds = make_dataset(dawnlike_dir, tmp_path / "ds", n=2, repeats=1)
    host = tiny_sdxl_host()
    res = LoraTrainer(host, ds, cfg_for(tmp_path / "out", max_train_epochs=1, network_train_unet_only=False,
                                        save_state=False)).run()
    state = load_state_dict(res.final_path)
    # diffusers' own kohya→peft conversion for SDXL (StableDiffusionXLLoraLoaderMixin.lora_state_dict)
    converted, alphas = StableDiffusionXLPipeline.lora_state_dict({k: v.float() for k, v in state.items()},
                                                               unet_config=host.unet.config)
    unet = host.unet
    te1, te2 = host.text_encoder, host.text_encoder_2
    with caplog.at_level(logging.WARNING):
        StableDiffusionXLPipeline.load_lora_into_unet(converted, network_alphas=alphas, unet=unet,
                                                      adapter_name="cl")
        StableDiffusionXLPipeline.load_lora_into_text_encoder(converted, network_alphas=alphas, text_encoder=te1,
                                                              prefix="text_encoder", adapter_name="cl")
        StableDiffusionXLPipeline.load_lora_into_text_encoder(converted, network_alphas=alphas, text_encoder=te2,
                                                              prefix="text_encoder_2", adapter_name="cl")
    bad = [r.getMessage() for r in caplog.records if "unexpected" in r.getMessage().lower()]
    assert not bad, bad[:3]
    n_unet = sum(1 for k in converted if k.startswith("unet."))
    assert n_unet > 0 and sum(1 for k in converted if k.startswith("text_encoder_2.")) > 0


def test_sd1_lora_does_not_load_into_sdxl():
    from conceptlab.training.lora.network import LoRANetwork

    sd1 = LoRANetwork.create(tiny_host(), network_dim=2, train_text_encoder=True)
    state = {}
    for name in sd1.targets:
        down, up, alpha = sd1.loras[name].kohya_tensors()
        state.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                      f"{name}.alpha": torch.tensor(alpha)})
    with pytest.raises(ValueError, match="this LoRA is for SD1, the model is SDXL"):
        LoRANetwork.from_kohya_state_dict(tiny_sdxl_host(), state)


def test_esd_x_on_sdxl_trains_cross_attention_only(tmp_path):
    from conceptlab.training.esd.config import ESDConfig
    from conceptlab.training.esd.erase import erase, select_targets

    host = tiny_sdxl_host()
    targets = select_targets(host.modules("unet"), "esd-x")
    # SDXL esd-x: every attn2 to_q/to_k/to_v/to_out.0 weight and the to_out.0 bias, per transformer layer
    n_layers = sum(1 for p in host.modules("unet") if p.endswith("attn2.to_q"))
    assert len(targets) == 5 * n_layers and all(".attn2." in t.path for t in targets)
    cfg = ESDConfig(concepts="skeleton", iterations=3, width=64, height=64, xt_source="noised", noised_cache=1,
                    ddim_steps=2, lr=1e-3, seed=0, masks="grid", grid_n=2, mask_mode="sum")
    res = erase(host, cfg)
    assert res.stats["iterations_done"] == 3 and host.installed_deltas() == {}
    assert set(res.deltas) == {(t.component, t.path, t.attr) for t in targets}
    assert any(float(d.abs().max()) > 0 for d in res.deltas.values())
    assert res.metadata["arch"] == "sdxl"
    from conceptlab.training.esd.outputs import diff_state_dict

    keys = diff_state_dict(res)
    assert keys and all(k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_",
                                      "lora_unet_output_blocks_")) and k.endswith((".diff", ".diff_b"))
                        for k in keys)


# -- single-file SDXL checkpoints (CLI) ------------------------------------------------------------------------
def _tiny_sdxl_single_file(tmp_path: Path, markers=()):
    from test_model_loading import _te_to_ldm_sd2, _vae_to_ldm
    from tiny_models import TINY_SDXL_UNET_CONFIG

    from conceptlab.formats.ldm_keys import diffusers_to_ldm_unet
    from conceptlab.formats.safetensors_io import save_safetensors

    host = tiny_sdxl_host(seed=5)
    unet_map = diffusers_to_ldm_unet("sdxl", unet_config=TINY_SDXL_UNET_CONFIG)
    sd = {"model.diffusion_model." + unet_map[k]: v for k, v in host.unet.state_dict().items()}
    sd.update(_vae_to_ldm(host.vae.state_dict(), len(host.vae.config.block_out_channels)))
    for k, v in host.text_encoder.state_dict().items():
        sd["conditioner.embedders.0.transformer." + (k if k.startswith("text_model.") else f"text_model.{k}")] = v
    c2 = host.text_encoder_2.config
    te2 = {k: v for k, v in host.text_encoder_2.state_dict().items() if not k.startswith("text_projection")}
    g = _te_to_ldm_sd2(te2, c2.hidden_size, c2.num_hidden_layers)
    g["cond_stage_model.model.text_projection"] = host.text_encoder_2.text_projection.weight.T  # OpenCLIP: x @ P
    sd.update({k.replace("cond_stage_model.model.", "conditioner.embedders.1.model."): v for k, v in g.items()})
    for m in markers:
        sd[m] = torch.tensor([])
    path = save_safetensors({k: v.detach().clone().contiguous() for k, v in sd.items()},
                            tmp_path / "tiny_sdxl.safetensors")
    cfg_dir = tmp_path / "configs"
    cfg_dir.mkdir()

    def dump(name, cfg):
        clean = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(cfg).items() if not k.startswith("_")}
        (cfg_dir / f"sdxl_{name}.json").write_text(json.dumps(clean, default=list))
    dump("unet", host.unet.config)
    dump("vae", host.vae.config)
    dump("text_encoder", host.text_encoder.config.to_dict())
    dump("text_encoder_2", host.text_encoder_2.config.to_dict())
    dump("scheduler", {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                       "num_train_timesteps": 1000, "prediction_type": "epsilon"})
    return host, path, cfg_dir


def test_sdxl_single_file_round_trip_and_vpred_markers(tmp_path):
    from conceptlab.training.diffusers_host import DiffusersHost

    ref, path, cfg_dir = _tiny_sdxl_single_file(tmp_path)
    host = DiffusersHost.from_single_file(path, tokenizer=word_hash_tokenizer, configs_dir=cfg_dir)
    assert host.arch == "sdxl" and host.components() == ["unet", "te1", "te2"]
    assert host.prediction_type == "epsilon" and not host.load_report["zero_terminal_snr"]
    prompts = ["pixel art, knight", "a cat"]
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 900])
    with torch.no_grad():
        a, b = ref.encode_prompts(prompts), host.encode_prompts(prompts)
        torch.testing.assert_close(a.context, b.context, rtol=0, atol=0)
        torch.testing.assert_close(a.pooled, b.pooled, rtol=0, atol=0)
        torch.testing.assert_close(ref.predict(x, t, a), host.predict(x, t, b), rtol=0, atol=0)
    # NoobAI-style v-pred + zero-terminal-SNR markers (ComfyUI's SDXL.model_type keys)
    (tmp_path / "v").mkdir()
    _, vpath, vcfg = _tiny_sdxl_single_file(tmp_path / "v", markers=("v_pred", "ztsnr"))
    vhost = DiffusersHost.from_single_file(vpath, tokenizer=word_hash_tokenizer, configs_dir=vcfg)
    assert vhost.prediction_type == "v_prediction" and vhost.load_report["prediction_source"] == "v_pred key"
    assert float(vhost.alphas_cumprod[-1]) == 0.0


def test_sdxl_refiner_is_refused(tmp_path):
    from conceptlab.formats.safetensors_io import save_safetensors
    from conceptlab.training.model_loading import CheckpointLoadError, load_single_file

    refiner = {"conditioner.embedders.0.model.ln_final.weight": torch.zeros(4),
               "model.diffusion_model.label_emb.0.0.weight": torch.zeros(4, 2560),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}
    p = save_safetensors(refiner, tmp_path / "refiner.safetensors")
    with pytest.raises(CheckpointLoadError, match="refiner"):
        load_single_file(p)


def test_shipped_sdxl_configs_match_the_released_layout():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from conceptlab.formats.ldm_keys import diffusers_unet_keys, unet_config_for
    from conceptlab.training.model_loading import load_configs

    cfgs = load_configs("sdxl")
    ref = unet_config_for("sdxl")
    for k in ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block", "cross_attention_dim",
              "use_linear_projection", "transformer_layers_per_block", "addition_embed_type",
              "projection_class_embeddings_input_dim", "addition_time_embed_dim"):
        assert cfgs["unet"][k] == (list(ref[k]) if isinstance(ref[k], tuple) else ref[k]), k
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfgs["unet"])
        vae = AutoencoderKL.from_config(cfgs["vae"])
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(
            {k: v for k, v in cfgs["text_encoder_2"].items() if k not in ("model_type", "architectures")}))
    assert set(unet.state_dict()) == set(diffusers_unet_keys("sdxl"))
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684  # SDXL base UNet
    assert vae.config.scaling_factor == pytest.approx(0.13025)
    assert sum(p.numel() for p in te2.parameters()) == 694_659_840  # OpenCLIP ViT-bigG/14 text tower
    # ESD parameter sets on SDXL base (esd_sdxl.py get_esd_trainable_parameters)
    from conceptlab.training.esd.erase import count_parameters, select_targets

    mods = {n: m for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    counts = {m: count_parameters(select_targets(mods, m, arch="sdxl"))
              for m in ("esd-x", "esd-x-strict", "esd-u", "esd-all")}
    assert counts["esd-x"] == (350, 545_670_400) and counts["esd-x-strict"] == (140, 340_787_200)
    assert counts["esd-u"][0] + counts["esd-x"][0] == counts["esd-all"][0]
    assert not any("emb" in t.path or "block" not in t.path for t in select_targets(mods, "esd-u", arch="sdxl"))


def test_cli_trains_an_sdxl_diffusers_folder(tmp_path, dawnlike_dir, capsys):
    """`conceptlab train` on an SDXL diffusers folder (unet/ text_encoder/ text_encoder_2/ tokenizer/ tokenizer_2/
    vae/ scheduler/), end to end through the real loader."""
    import shutil

    from test_model_loading import _write_clip_tokenizer

    from conceptlab import cli

    host = tiny_sdxl_host(seed=2)
    model = tmp_path / "model"
    host.unet.save_pretrained(model / "unet")
    host.vae.save_pretrained(model / "vae")
    host.text_encoder.save_pretrained(model / "text_encoder")
    host.text_encoder_2.save_pretrained(model / "text_encoder_2")
    for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):  # SDXL's tokenizer_2 pads with "!"
        _write_clip_tokenizer(model / name)
        (model / name / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77, "pad_token": pad}))
    (model / "scheduler").mkdir()
    (model / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000,
         "prediction_type": "v_prediction"}))
    sub = tmp_path / "data" / "1_knight"
    sub.mkdir(parents=True)
    for p in sorted(dawnlike_dir.glob("*.png"))[:2]:
        shutil.copy(p, sub / p.name)
    cfg = tmp_path / "kohya.toml"
    cfg.write_text(f"""
pretrained_model_name_or_path = "{model}"
train_data_dir = "{tmp_path / 'data'}"
resolution = "64,64"
min_bucket_reso = 64
max_bucket_reso = 128
output_dir = "{tmp_path / 'out'}"
output_name = "xl"
max_train_epochs = 1
train_batch_size = 2
network_dim = 4
network_alpha = 1
zero_terminal_snr = true
""")
    rc = cli.main(["train", "--config", str(cfg), "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    md = read_metadata(tmp_path / "out" / "xl.safetensors")
    assert md["ss_base_model_version"] == "sdxl_base_v1-0" and md["modelspec.prediction_type"] == "v"
    assert md["ss_zero_terminal_snr"] == "True"
    keys = load_state_dict(tmp_path / "out" / "xl.safetensors")
    assert any(k.startswith("lora_te2_") for k in keys) and any(k.startswith("lora_unet_output_blocks_")
                                                                for k in keys)


# -- kohya text options: clip_skip and max_token_length (issue 14's host part) --------------------------------
def _real_tokenizer(tmp_path, pad="<|endoftext|>"):
    from test_model_loading import _write_clip_tokenizer
    from transformers import CLIPTokenizer

    folder = _write_clip_tokenizer(tmp_path / f"tok{len(pad)}", words=("a", "cat", "red", "apple", "pixel", "art"))
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=77, pad_token=pad)


def test_kohya_chunked_ids_match_kohya_rules(tmp_path):
    from conceptlab.training.diffusers_host import kohya_chunked_ids

    words = " ".join(["pixel", "art", "red", "cat"] * 40)  # 160 tokens: two full chunks and part of a third
    for pad in ("<|endoftext|>", "!"):
        tok = _real_tokenizer(tmp_path, pad)
        ids = kohya_chunked_ids(tok, words, 225)
        full = tok(words, padding="max_length", truncation=True, max_length=227, return_tensors="pt").input_ids[0]
        assert ids.shape == (3, 77)
        assert bool((ids[:, 0] == tok.bos_token_id).all())
        # the 75-token windows of the 227-id sequence, in order
        torch.testing.assert_close(ids[:, 1:76].flatten(), full[1:226])
        if pad == "!":  # v2/SDXL rule: a chunk that ends in a word gets <EOS>; an empty chunk starts <BOS> <EOS>
            assert ids[0, -1] == tok.eos_token_id and ids[1, -1] == tok.eos_token_id
        short = kohya_chunked_ids(tok, "a cat", 150)
        assert short.shape == (2, 77)
        if pad == "!":
            assert short[1, 1] == tok.eos_token_id


def test_clip_skip_and_max_token_length_in_the_diffusers_host(tmp_path):
    host = tiny_host()
    host.tokenizer = _real_tokenizer(tmp_path)
    prompts = ["pixel art red cat " * 30, "a cat"]
    with torch.no_grad():
        base = host.encode_prompts(prompts).context
        assert host.configure_text(clip_skip=2, max_token_length=150) == []
        cs = host.encode_prompts(prompts).context
        assert cs.shape == (2, 152, base.shape[-1])
        ids = host._tokenize(prompts)  # [2, 2, 77]
        te = host.text_encoder
        h = te(ids.reshape(4, 77), output_hidden_states=True).hidden_states[-2]
        h = (te.text_model if hasattr(te, "text_model") else te).final_layer_norm(h).reshape(2, 154, -1)
        ref = torch.cat([h[:, :1], h[:, 1:76], h[:, 78:153], h[:, -1:]], dim=1)  # kohya encode_tokens re-join
        torch.testing.assert_close(cs, ref)
        host.configure_text()
        torch.testing.assert_close(host.encode_prompts(prompts).context, base)
    with pytest.raises(ValueError):
        host.configure_text(max_token_length=100)
    with pytest.raises(ValueError):
        host.configure_text(clip_skip=0)
    xl = tiny_sdxl_host()
    assert xl.configure_text(clip_skip=2) and xl.clip_skip is None  # warned: no clip_skip on SDXL, as kohya
