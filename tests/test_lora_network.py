"""Kohya LoRA network: targets, init, delta maths, no mutation of the base model, file keys/alpha/metadata,
and loading in diffusers' load_lora_weights (kohya converter) with identical outputs."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_host

from conceptlab.formats.safetensors_io import load_state_dict, read_metadata
from conceptlab.training.lora.network import LoRADelta, LoRANetwork, kohya_targets
from conceptlab.training.lora.output import epoch_file_name, save_lora_file

ATTN_LEAVES = ("proj_in", "proj_out", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q",
               "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")



def test_kohya_targets_on_sd1_layout():
    host = tiny_host()
    unet_only = kohya_targets(host, network_dim=4, network_alpha=1)
    assert unet_only and all(t.component == "unet" and ".attentions." in f".{t.path}" for t in unet_only)
    assert all(t.path.endswith(ATTN_LEAVES) for t in unet_only)
    expected = [p for p, m in host.modules("unet").items() if ".attentions." in f".{p}"]
    assert sorted(t.path for t in unet_only) == sorted(expected)
    assert unet_only[0].name.startswith("lora_unet_") and "." not in unet_only[0].name
    full = kohya_targets(host, network_dim=4, network_alpha=1, conv_dim=2, conv_alpha=1, train_text_encoder=True)
    te = [t for t in full if t.component == "te"]
    assert {t.path.rsplit(".", 1)[-1] for t in te} == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}
    assert all(t.name.startswith("lora_te_text_model_encoder_layers_") for t in te)
    conv = {t.path: t for t in full if ".resnets." in f".{t.path}" or "samplers." in t.path}
    assert any(p.endswith("conv1") and t.is_conv3x3 and t.dim == 2 for p, t in conv.items())
    assert any(p.endswith("time_emb_proj") and t.dim == 4 and not t.is_conv3x3 for p, t in conv.items())
    assert any("downsamplers" in p for p in conv)
    with pytest.raises(ValueError, match="selects no modules"):
        kohya_targets(host, network_dim=4, network_alpha=1, train_unet=False)


def test_init_delta_maths_and_conv_equivalence():
    d = LoRADelta((32, 48), dim=4, alpha=2, generator=torch.Generator().manual_seed(0))
    bound = 1 / math.sqrt(48)  # kaiming_uniform(a=sqrt(5)) bound = sqrt(6/((1+5)·fan_in))
    assert d.lora_down.abs().max() <= bound and d.lora_down.abs().max() > 0.8 * bound
    assert torch.count_nonzero(d.lora_up) == 0 and torch.count_nonzero(d.delta()) == 0
    torch.nn.init.normal_(d.lora_up)
    assert torch.allclose(d.delta(), d.lora_up @ d.lora_down * 0.5)
    assert LoRADelta((8, 8), 4, None).scale == 1.0  # alpha None / 0 -> alpha = dim
    c = LoRADelta((6, 5, 3, 3), dim=2, alpha=1)
    torch.nn.init.normal_(c.lora_up)
    x, w = torch.randn(1, 5, 9, 9), torch.randn(6, 5, 3, 3)
    two_convs = F.conv2d(F.conv2d(x, c.lora_down, padding=1), c.lora_up) * c.scale
    assert torch.allclose(F.conv2d(x, w + c.delta(), padding=1), F.conv2d(x, w, padding=1) + two_convs, atol=1e-5)


def test_install_leaves_base_weights_untouched():
    host = tiny_host()
    before = {k: v.clone() for k, v in host.unet.state_dict().items()}
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    cond = host.encode_prompts(["a sprite"])
    ref = host.predict(x, t, cond)
    net = LoRANetwork.create(host, network_dim=4, network_alpha=4)
    net.install(host)
    assert torch.allclose(host.predict(x, t, cond), ref)  # up = 0: training starts at the base model
    for d in net.loras.values():
        torch.nn.init.normal_(d.lora_up, std=0.2)
    changed = host.predict(x, t, cond)
    assert not torch.allclose(changed, ref)
    with host.deltas_disabled():
        assert torch.allclose(host.predict(x, t, cond), ref)
    net.remove()
    assert torch.allclose(host.predict(x, t, cond), ref)
    after = host.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_lora_file_keys_alpha_metadata_and_diffusers_load(tmp_path, caplog):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    host = tiny_host()
    net = LoRANetwork.create(host, network_dim=4, network_alpha=2, train_text_encoder=True, seed=1)
    g = torch.Generator().manual_seed(0)
    for d in net.loras.values():
        d.lora_up.data = torch.randn(d.lora_up.shape, generator=g) * 0.2
    path = save_lora_file(tmp_path / epoch_file_name("style", 3), net,
                          {"ss_network_module": "networks.lora", "ss_network_dim": 4, "ss_network_alpha": 2.0,
                           "ss_tag_frequency": {"10_style": {"red": 2}}})
    assert path.name == "style-000003.safetensors" and epoch_file_name("style", None) == "style.safetensors"
    sd = load_state_dict(path)
    assert all(v.dtype == torch.float16 for v in sd.values())
    names = set(net.loras)
    assert set(sd) == {f"{n}.{s}" for n in names for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert all(float(sd[f"{n}.alpha"]) == 2.0 for n in names)
    md = read_metadata(path)
    assert md["ss_network_dim"] == "4" and md["ss_network_alpha"] == "2.0"
    assert md["sshs_model_hash"] and md["sshs_legacy_hash"]
    assert '"red": 2' in md["ss_tag_frequency"]

    # our installed network and diffusers' kohya loader give the same model
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([300])
    net16, unmatched = LoRANetwork.from_kohya_state_dict(host, sd)
    assert unmatched == []
    net16.install(host)
    ours = host.predict(x, t, host.encode_prompts(["red sprite"]))
    ids = host._tokenize(["red sprite"])
    net16.remove()
    fresh = tiny_host()
    pipe = StableDiffusionPipeline(vae=fresh.vae, text_encoder=fresh.text_encoder, tokenizer=None, unet=fresh.unet,
                                   scheduler=DDIMScheduler(clip_sample=False), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(str(path))  # raises on keys the kohya converter cannot place
    assert not [r for r in caplog.records if "unexpected" in r.getMessage().lower()
                or "not found" in r.getMessage().lower()]
    theirs = pipe.unet(x, t, encoder_hidden_states=pipe.text_encoder(ids)[0]).sample
    assert torch.allclose(ours, theirs, atol=2e-4)


def test_from_kohya_state_dict_rejects_foreign_files():
    host = tiny_host()
    with pytest.raises(ValueError, match="no LoRA key"):
        LoRANetwork.from_kohya_state_dict(host, {"lora_unet_nothing_here.lora_down.weight": torch.zeros(1, 2),
                                                 "lora_unet_nothing_here.lora_up.weight": torch.zeros(2, 1)})


def test_from_kohya_state_dict_names_the_module_of_a_damaged_or_foreign_entry():
    host = tiny_host()
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    out_f, in_f = host.modules("unet")["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"].weight.shape
    with pytest.raises(ValueError, match=f"{name}.*no lora_up"):
        LoRANetwork.from_kohya_state_dict(host, {f"{name}.lora_down.weight": torch.zeros(2, in_f)})
    with pytest.raises(ValueError, match=f"{name}.*do not fit"):
        LoRANetwork.from_kohya_state_dict(host, {f"{name}.lora_down.weight": torch.zeros(2, in_f + 8),
                                                 f"{name}.lora_up.weight": torch.zeros(out_f, 2)})


def test_per_sample_loss_rejects_unknown_loss_types():
    from conceptlab.training.lora.loss import per_sample_loss

    p, t = torch.zeros(2, 4, 2, 2), torch.ones(2, 4, 2, 2)
    assert torch.equal(per_sample_loss(p, t, "l2"), torch.ones(2))
    with pytest.raises(ValueError, match="loss_type"):
        per_sample_loss(p, t, "mse")
    with pytest.raises(ValueError, match="huber_c"):
        per_sample_loss(p, t, "huber")
