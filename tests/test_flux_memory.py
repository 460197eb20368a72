"""Flux in the CLI and its memory settings on the tiny Flux model: the diffusers folder and kohya's four single files
(BFL transformer + clip_l + t5xxl + ae, dev vs schnell from guidance_in), gradient checkpointing (same gradients),
cached T5 + pooled text-encoder outputs, and a LoRA training on an int8 (torchao) base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_train_lora import cfg_for, make_dataset
from tiny_models import tiny_flux_host, word_hash_tokenizer

from conceptlab.formats.flux_views import canonical_state_dict
from conceptlab.formats.safetensors_io import read_metadata, save_safetensors
from conceptlab.training.lora.network import LoRANetwork
from conceptlab.training.lora.loss import diffusion_loss
from conceptlab.training.lora.trainer import LoraTrainer


def _write_single_files(host, root: Path) -> dict[str, Path]:
    """The tiny model as the files Flux users have: bare BFL transformer, ComfyUI-style clip_l (text_model.),
    T5 encoder (shared + encoder.*), BFL ae (LDM VAE names, no prefix)."""
    from test_model_loading import _vae_to_ldm

    root.mkdir(parents=True, exist_ok=True)
    canon = canonical_state_dict(host.transformer.state_dict(), host.dims, keep_other=False)
    files = {"transformer": root / "flux1-tiny.safetensors", "clip_l": root / "clip_l.safetensors",
             "t5xxl": root / "t5xxl_fp16.safetensors", "ae": root / "ae.safetensors"}
    save_safetensors({k[len("model.diffusion_model."):]: v.contiguous() for k, v in canon.items()},
                     files["transformer"])
    save_safetensors({(k if k.startswith("text_model.") else "text_model." + k): v.contiguous()
                      for k, v in host.clip.state_dict().items()}, files["clip_l"])
    save_safetensors({k: v.contiguous() for k, v in host.t5.state_dict().items() if k != "encoder.embed_tokens.weight"},
                     files["t5xxl"])
    vae = _vae_to_ldm(host.vae.state_dict(), len(host.vae.config.block_out_channels))
    save_safetensors({k[len("first_stage_model."):]: v.contiguous() for k, v in vae.items()}, files["ae"])
    return files


TINY_OVERRIDES = {"transformer": {"axes_dims_rope": [2, 2, 4]},
                  "clip_l": dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                                 hidden_act="quick_gelu"),
                  "t5xxl": dict(vocab_size=1000, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                eos_token_id=2),
                  "vae": dict(block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=4)}


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_bfl_single_files_load_to_the_same_model(tmp_path, guidance):
    from conceptlab.training.flux_loading import is_flux_checkpoint, load_flux_single_files

    host = tiny_flux_host(3, guidance_embeds=guidance)
    host.clip.config.hidden_act = "quick_gelu"  # as CLIP-L (the shipped config); the tiny one used gelu
    files = _write_single_files(host, tmp_path)
    assert is_flux_checkpoint(files["transformer"]) and not is_flux_checkpoint(files["clip_l"])
    loaded = load_flux_single_files(files["transformer"], clip_l=files["clip_l"], t5xxl=files["t5xxl"],
                                    ae=files["ae"], clip_tokenizer=word_hash_tokenizer,
                                    t5_tokenizer=word_hash_tokenizer, t5xxl_max_token_length=16,
                                    config_overrides=TINY_OVERRIDES)
    assert loaded.variant == ("dev" if guidance else "schnell")
    assert loaded.load_report["blocks"] == (1, 2) and loaded.load_report["layout"] == "bfl"
    torch.manual_seed(0)
    c1, c2 = host.encode_prompts(["a red cat"]), loaded.encode_prompts(["a red cat"])
    torch.testing.assert_close(c2.context, c1.context)
    torch.testing.assert_close(c2.pooled, c1.pooled)
    x, s = torch.randn(1, 16, 4, 4), torch.tensor([0.4])
    torch.testing.assert_close(loaded.predict(x, s, c2), host.predict(x, s, c1))
    px = torch.rand(1, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(loaded.encode_images(px), host.encode_images(px))


def test_cli_trains_a_flux_diffusers_folder_and_names_missing_single_files(tmp_path, dawnlike_dir, capsys):
    import shutil

    from test_model_loading import _write_clip_tokenizer

    from conceptlab import cli
    from conceptlab.training.lora.train_cli import _host_for

    host = tiny_flux_host(2)
    model = tmp_path / "model"
    host.transformer.save_pretrained(model / "transformer")
    host.vae.save_pretrained(model / "vae")
    host.clip.save_pretrained(model / "text_encoder")
    host.t5.save_pretrained(model / "text_encoder_2")
    for name, n in (("tokenizer", 77), ("tokenizer_2", 512)):  # stand-in BPE vocab for both (no T5 spm offline)
        _write_clip_tokenizer(model / name)
        (model / name / "tokenizer_config.json").write_text(json.dumps({"model_max_length": n,
                                                                       "tokenizer_class": "CLIPTokenizer"}))
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
output_name = "flux"
max_train_epochs = 1
train_batch_size = 2
network_dim = 4
network_alpha = 1
network_args = ["train_blocks=single"]
timestep_sampling = "flux_shift"
model_prediction_type = "raw"
guidance_scale = 1.0
t5xxl_max_token_length = 8
cache_text_encoder_outputs = true
gradient_checkpointing = true
""")
    rc = cli.main(["train", "--config", str(cfg), "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "cache_text_encoder_outputs has no effect" in captured.err
    md = read_metadata(tmp_path / "out" / "flux.safetensors")
    assert md["ss_base_model_version"] == "flux1" and md["ss_timestep_sampling"] == "flux_shift"
    assert md["ss_guidance_scale"] == "1.0" and md["ss_gradient_checkpointing"] == "True"
    files = _write_single_files(host, tmp_path / "files")
    with pytest.raises(ValueError, match="also give t5xxl, ae"):
        _host_for(str(files["transformer"]), "cpu", "no", flux={"clip_l": str(files["clip_l"])})


# -- memory --------------------------------------------------------------------------------------------------------

def _lora(host, seed=0):
    net = LoRANetwork.create(host, network_dim=4, network_alpha=4, seed=seed)
    with torch.no_grad():
        for d in net.loras.values():
            d.lora_up.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed))
    return net


def test_gradient_checkpointing_gives_the_same_gradients():
    host = tiny_flux_host(0)
    net = _lora(host)
    net.install(host)
    cond = host.encode_prompts(["a cat", "a dog"]).detach()
    lat = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    cfg = cfg_for(Path("."), timestep_sampling="uniform").validate()
    grads = []
    for on in (False, True):
        host.set_gradient_checkpointing(on)
        assert host.transformer.gradient_checkpointing is on
        net.zero_grad()
        diffusion_loss(host, lat, cond, cfg, torch.Generator().manual_seed(2)).backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})
    host.set_gradient_checkpointing(False)
    net.remove()
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7)


def test_text_encoder_outputs_are_cached_with_t5_and_pooled(dawnlike_dir, tmp_path):
    ds = make_dataset(dawnlike_dir, tmp_path / "ds", n=2, repeats=1)
    host = tiny_flux_host(0)
    calls = []
    orig = host.encode_prompts

    def counting(prompts):
        calls.append(list(prompts))
        return orig(prompts)
    host.encode_prompts = counting
    tr = LoraTrainer(host, ds, cfg_for(tmp_path / "o"))  # unet only: text encoders frozen -> cached
    caps = ["a cat", "a dog", "a cat"]
    c = tr._encode(caps)
    again = tr._encode(["a dog", "a cat"])
    assert calls == [["a cat", "a dog"]]  # one encode per distinct caption, then none
    ref = orig(caps)
    torch.testing.assert_close(c.context, ref.context)
    torch.testing.assert_close(c.pooled, ref.pooled)
    assert c.context.shape == (3, 16, 32) and again.pooled.shape == (2, 32)


def test_lora_trains_on_an_int8_base():
    pytest.importorskip("torchao")
    from conceptlab.training.quantize import is_quantized

    host = tiny_flux_host(0)
    cond = host.encode_prompts(["a cat", "a dog"]).detach()
    lat = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    x, sig = torch.randn(2, 16, 4, 4), torch.tensor([0.3, 0.7])
    dense_out = host.predict(x, sig, cond).detach()
    n = host.quantize_base("int8")
    assert n >= 20 and is_quantized(host.transformer.single_transformer_blocks[0].proj_mlp.weight)
    q_out = host.predict(x, sig, cond).detach()
    assert (q_out - dense_out).abs().max() < 0.05 * dense_out.abs().max()  # int8 weight-only ≈ the dense model
    net = LoRANetwork.create(host, network_dim=8, network_alpha=8, seed=0)
    net.install(host)
    cfg = cfg_for(Path("."), timestep_sampling="uniform", model_prediction_type="raw").validate()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)

    def loss():
        return diffusion_loss(host, lat, cond, cfg, torch.Generator().manual_seed(3))

    with torch.no_grad():
        before = float(loss())
    for _ in range(25):
        opt.zero_grad()
        loss().backward()
        opt.step()
    with torch.no_grad():
        after = float(loss())
    net.remove()
    assert after < 0.7 * before, (before, after)
    assert is_quantized(host.transformer.transformer_blocks[0].attn.to_q.weight)  # the base stayed int8
    with pytest.raises(ValueError, match="CUDA"):
        tiny_flux_host(0).quantize_base("int4")


# -- text encoders off the accelerator after caching (kohya cache_text_encoder_outputs) ----------------------------

def test_offload_text_encoders_keeps_sample_prompts_and_never_runs_them_again():
    host = tiny_flux_host(0)
    ref = host.encode_prompts(["a cat", ""])
    calls = []
    host.t5.register_forward_pre_hook(lambda m, a: calls.append("t5"))
    host.clip.register_forward_pre_hook(lambda m, a: calls.append("clip"))
    expect = sum(t.numel() * t.element_size() for m in (host.clip, host.t5) for t in [*m.parameters(), *m.buffers()])
    moved = host.offload_text_encoders(["a cat", ""], device="meta")  # a device nothing can compute on afterwards
    assert moved == expect and calls == ["clip", "t5"]  # encoded once, before the move
    assert all(p.device.type == "meta" for m in (host.clip, host.t5) for p in m.parameters())
    again = host.encode_prompts(["", "a cat"])
    assert calls == ["clip", "t5"]  # cached: the (offloaded) encoders are not run
    assert again.context.device == host.device
    torch.testing.assert_close(again.context, torch.cat([ref.context[1:], ref.context[:1]]))
    torch.testing.assert_close(again.pooled, torch.cat([ref.pooled[1:], ref.pooled[:1]]))
    with pytest.raises(NotImplementedError):  # an uncached prompt runs the encoders where they are now
        host.encode_prompts(["a dog"])


def test_offload_to_the_cpu_still_encodes_new_prompts():
    host = tiny_flux_host(0)
    ref = host.encode_prompts(["a dog"])
    host.offload_text_encoders([], device="cpu")
    torch.testing.assert_close(host.encode_prompts(["a dog"]).context, ref.context)
    net = LoRANetwork.create(host, network_dim=4, network_alpha=4, seed=0, train_unet=False, train_text_encoder=True)
    net.install(host)
    with pytest.raises(ValueError, match="text-encoder deltas"):  # a trained encoder stays on the device
        host.offload_text_encoders(["x"])


def test_trainer_caches_every_caption_then_moves_t5_and_clip_off(dawnlike_dir, tmp_path, monkeypatch):
    import conceptlab.training.lora.te_offload as te_offload

    import conceptlab.training.block_swap as block_swap

    monkeypatch.setattr(te_offload, "OFFLOAD_DEVICE", "meta")  # the simulated CPU: nothing runs there afterwards
    monkeypatch.setattr(te_offload, "PARK_DEVICE", "meta")
    events = []
    # the DiT's parking is recorded, not done (moving to meta loses the values)
    monkeypatch.setattr(block_swap, "move_frozen", lambda m, dev, skip=(): events.append(
        ("dit to", torch.device(dev).type, next(host.t5.parameters()).device.type)))
    ds = make_dataset(dawnlike_dir, tmp_path / "ds", n=3, repeats=1)
    ds.captions = ds.captions.__class__()  # static captions (make_dataset shuffles tags)
    host = tiny_flux_host(0)
    ds.cache_latents(host.encode_images)
    host.t5.register_forward_pre_hook(lambda m, a: events.append(("t5 runs",)))
    cfg = cfg_for(tmp_path / "o", max_train_epochs=2, sample_prompts="a knight --g 2.5 --s 2", sample_steps=2,
                  sample_every_n_epochs=2, sample_width=32, sample_height=32, save_state=False)
    res = LoraTrainer(host, ds, cfg).run()
    assert all(p.device.type == "meta" for m in (host.clip, host.t5) for p in m.parameters())
    # kohya's order: DiT off the device, every caption + the sample prompt encoded, encoders off, DiT back
    assert events[0] == ("dit to", "meta", "cpu") and events[-1] == ("dit to", "cpu", "meta")
    assert set(events[1:-1]) == {("t5 runs",)} and len(events) - 2 >= 2  # the captions, then the sample prompts
    assert len(res.history) == 2 and len(res.history[-1]["samples"]) == 1  # trained and sampled after the move
    # captions that change per step (shuffle_caption) cannot all be cached up front: the encoders stay
    ds2 = make_dataset(dawnlike_dir, tmp_path / "ds2", n=2, repeats=1)
    host2 = tiny_flux_host(0)
    ds2.cache_latents(host2.encode_images)
    LoraTrainer(host2, ds2, cfg_for(tmp_path / "o2", max_train_epochs=1, save_state=False)).run()
    assert all(p.device.type == "cpu" for p in host2.t5.parameters())
