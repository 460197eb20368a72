"""formats.keys: LDM <-> diffusers UNet names, classification, architecture detection, kohya names."""

from __future__ import annotations

import re

import pytest
import torch

from conceptlab.formats import kohya_keys, ldm_keys, keys as K

# The real SD1.5 UNet config (runwayml/stable-diffusion-v1-5 unet/config.json values that shape the key set).
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


@pytest.fixture(scope="module")
def sd15_meta_unet():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**SD15_UNET)


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_ldm_diffusers_round_trip_every_key(arch):
    l2d = ldm_keys.ldm_to_diffusers_unet(arch)
    d2l = ldm_keys.diffusers_to_ldm_unet(arch)
    assert len(l2d) == len(d2l) == len(set(l2d.values()))  # bijective
    assert set(l2d) == set(ldm_keys.ldm_unet_keys(arch))
    assert set(d2l) == set(ldm_keys.diffusers_unet_keys(arch))
    for ldm, dif in l2d.items():
        assert d2l[dif] == ldm
    # every LDM key is a real LDM name, every diffusers key a real diffusers name
    assert all(re.match(r"(time_embed|label_emb|input_blocks|middle_block|output_blocks|out)\.", k) for k in l2d)
    assert not any(re.match(r"(input_blocks|middle_block|output_blocks)\.", k) for k in d2l)


def test_sd15_keys_match_real_sd15_unet(sd15_meta_unet):
    real = set(sd15_meta_unet.state_dict())
    assert set(ldm_keys.diffusers_to_ldm_unet("sd1")) == real
    assert len(real) == 686


@pytest.mark.parametrize("arch,ldm,dif", [
    ("sd1", "input_blocks.1.1.transformer_blocks.0.attn2.to_q.weight",
     "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q.weight"),
    ("sd1", "input_blocks.3.0.op.weight", "down_blocks.0.downsamplers.0.conv.weight"),
    ("sd1", "input_blocks.4.0.skip_connection.weight", "down_blocks.1.resnets.0.conv_shortcut.weight"),
    ("sd1", "middle_block.1.proj_in.weight", "mid_block.attentions.0.proj_in.weight"),
    ("sd1", "middle_block.2.emb_layers.1.weight", "mid_block.resnets.1.time_emb_proj.weight"),
    ("sd1", "output_blocks.2.1.conv.weight", "up_blocks.0.upsamplers.0.conv.weight"),
    ("sd1", "output_blocks.5.2.conv.bias", "up_blocks.1.upsamplers.0.conv.bias"),
    ("sd1", "output_blocks.11.1.transformer_blocks.0.ff.net.2.weight",
     "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2.weight"),
    ("sd1", "input_blocks.0.0.weight", "conv_in.weight"),
    ("sd1", "out.2.weight", "conv_out.weight"),
    ("sd1", "time_embed.2.weight", "time_embedding.linear_2.weight"),
    ("sdxl", "input_blocks.4.1.transformer_blocks.1.attn1.to_k.weight",
     "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_k.weight"),
    ("sdxl", "output_blocks.2.2.conv.weight", "up_blocks.0.upsamplers.0.conv.weight"),
    ("sdxl", "label_emb.0.0.weight", "add_embedding.linear_1.weight"),
    ("sdxl", "middle_block.1.transformer_blocks.9.attn2.to_v.weight",
     "mid_block.attentions.0.transformer_blocks.9.attn2.to_v.weight"),
])
def test_known_pairs(arch, ldm, dif):
    # pairs checked by hand against ComfyUI comfy/utils.py unet_to_diffusers
    assert ldm_keys.ldm_to_diffusers_unet(arch)[ldm] == dif


@pytest.mark.parametrize("arch,n_blocks", [("sd1", 25), ("sdxl", 19)])
def test_classification_ldm_equals_diffusers_and_covers_all_blocks(arch, n_blocks):
    assert len(K.BLOCK_IDS[arch]) == n_blocks
    seen_blocks = set()
    types = {}
    for ldm, dif in ldm_keys.ldm_to_diffusers_unet(arch).items():
        a = K.classify_key("model.diffusion_model." + ldm, arch)
        b = K.classify_key(dif, arch)
        c = K.classify_key("diffusion_model." + ldm, arch)
        assert a == b == c, (ldm, dif)
        assert a.component == "unet"
        seen_blocks.add(a.block)
        types[a.layer_type] = types.get(a.layer_type, 0) + 1
        assert a.layer_type != "other", ldm
    assert seen_blocks - {None} == set(K.BLOCK_IDS[arch])
    n_tb = 16 if arch == "sd1" else 70  # transformer blocks
    for t in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q", "attn2.to_k", "attn2.to_v"):
        assert types[t] == n_tb
    assert types["attn2.to_out"] == 2 * n_tb  # weight + bias
    assert types["ff"] == 4 * n_tb


@pytest.mark.parametrize("key,arch,expected", [
    ("model.diffusion_model.input_blocks.0.0.weight", "sd1", ("unet", "IN00", "conv_in")),
    ("model.diffusion_model.input_blocks.11.0.out_layers.3.weight", "sd1", ("unet", "IN11", "conv")),
    ("model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight", "sd1", ("unet", "M00", "attn2.to_k")),
    ("model.diffusion_model.output_blocks.11.1.proj_out.weight", "sd1", ("unet", "OUT11", "proj_out")),
    ("model.diffusion_model.output_blocks.3.0.skip_connection.bias", "sd1", ("unet", "OUT03", "skip")),
    ("model.diffusion_model.time_embed.0.weight", "sd1", ("unet", None, "time_embed")),
    ("model.diffusion_model.out.0.weight", "sd1", ("unet", "OUT11", "norm")),
    ("model.diffusion_model.input_blocks.4.0.emb_layers.1.weight", "sd1", ("unet", "IN04", "time_emb_proj")),
    ("up_blocks.2.attentions.1.transformer_blocks.0.attn1.to_out.0.weight", "sd1", ("unet", "OUT07", "attn1.to_out")),
    ("down_blocks.1.downsamplers.0.conv.weight", "sd1", ("unet", "IN06", "downsample")),
    ("down_blocks.2.attentions.1.transformer_blocks.3.attn2.to_q.weight", "sdxl", ("unet", "IN08", "attn2.to_q")),
    ("model.diffusion_model.label_emb.0.0.weight", "sdxl", ("unet", None, "label_emb")),
    ("lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_v", "sd1", ("unet", "IN02", "attn2.to_v")),
    ("lora_unet_input_blocks_7_1_transformer_blocks_9_ff_net_2", "sdxl", ("unet", "IN07", "ff")),
    ("cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight", "sd1", ("te", None, "te.fc2")),
    ("cond_stage_model.model.transformer.resblocks.3.attn.in_proj_weight", "sd2", ("te", None, "te.in_proj")),
    ("conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.v_proj.weight", "sdxl",
     ("te1", None, "te.v_proj")),
    ("conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_fc.weight", "sdxl", ("te2", None, "te.fc1")),
    ("clip_l.transformer.text_model.encoder.layers.0.self_attn.k_proj.weight", "sdxl", ("te1", None, "te.k_proj")),
    ("lora_te2_text_model_encoder_layers_0_self_attn_out_proj", "sdxl", ("te2", None, "te.out_proj")),
    ("first_stage_model.decoder.mid.attn_1.k.weight", "sd1", ("vae", None, "vae.attn")),
    ("first_stage_model.encoder.down.1.block.0.norm1.weight", "sd1", ("vae", None, "vae.norm")),
    ("model.diffusion_model.double_blocks.7.txt_attn.qkv.weight", "flux", ("unet", "D07", "txt_attn.qkv")),
    ("model.diffusion_model.single_blocks.37.linear2.weight", "flux", ("unet", "S37", "linear2")),
    ("single_transformer_blocks.2.attn.to_k.weight", "flux", ("unet", "S02", "attn.to_k")),
    ("model_ema.num_updates", "sd1", ("other", None, "other")),
    ("alphas_cumprod", "sd1", ("other", None, "other")),
])
def test_classify_examples(key, arch, expected):
    info = K.classify_key(key, arch)
    assert (info.component, info.block, info.layer_type) == expected


def test_classification_rules_are_extensible():
    n = len(K.LAYER_TYPE_RULES)
    K.LAYER_TYPE_RULES.insert(0, (frozenset({"unet"}), re.compile(r"\.attn2\.to_k\."), "xattn_key"))
    try:
        assert K.classify_key("model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight").layer_type \
            == "xattn_key"
    finally:
        del K.LAYER_TYPE_RULES[0]
    assert len(K.LAYER_TYPE_RULES) == n


@pytest.mark.parametrize("key,expected", [
    ("model.diffusion_model.input_blocks.0.0.weight", ("unet", "input_blocks.0.0.weight")),
    ("diffusion_model.out.2.bias", ("unet", "out.2.bias")),
    ("first_stage_model.encoder.conv_in.weight", ("vae", "encoder.conv_in.weight")),
    ("cond_stage_model.transformer.text_model.final_layer_norm.weight", ("te", "text_model.final_layer_norm.weight")),
    ("cond_stage_model.model.ln_final.weight", ("te", "ln_final.weight")),
    ("conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
     ("te1", "text_model.embeddings.token_embedding.weight")),
    ("conditioner.embedders.1.model.text_projection", ("te2", "text_projection")),
    ("down_blocks.0.resnets.0.conv1.weight", ("unet", "down_blocks.0.resnets.0.conv1.weight")),
    ("input_blocks.1.0.in_layers.0.weight", ("unet", "input_blocks.1.0.in_layers.0.weight")),
    ("double_blocks.0.img_attn.qkv.weight", ("unet", "double_blocks.0.img_attn.qkv.weight")),
    ("model.diffusion_model.double_blocks.0.img_mod.lin.weight", ("unet", "double_blocks.0.img_mod.lin.weight")),
    ("text_encoder.text_model.encoder.layers.0.mlp.fc1.weight", ("te", "text_model.encoder.layers.0.mlp.fc1.weight")),
    ("clip_g.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
     ("te2", "text_model.encoder.layers.0.mlp.fc1.weight")),
    ("model_ema.decay", ("other", "model_ema.decay")),
    ("something_else", ("other", "something_else")),
])
def test_split_component(key, expected):
    assert K.split_component(key) == expected


def _ldm_shapes(arch):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**ldm_keys.unet_config_for(arch))
    d2l = ldm_keys.diffusers_to_ldm_unet(arch)
    return {"model.diffusion_model." + d2l[k]: tuple(v.shape) for k, v in unet.state_dict().items()}


def test_detect_architecture():
    sd1 = _ldm_shapes("sd1")
    sd2 = _ldm_shapes("sd2")
    sdxl = _ldm_shapes("sdxl")
    assert K.detect_architecture(sd1, sd1) == "sd1"
    assert K.detect_architecture(sd2, sd2) == "sd2"
    assert K.detect_architecture(sdxl, sdxl) == "sdxl"
    assert K.detect_architecture(list(sdxl)) == "sdxl"  # names alone (label_emb)
    assert K.detect_architecture(list(sd1) + ["cond_stage_model.model.transformer.resblocks.0.ln_1.weight"]) == "sd2"
    assert K.detect_architecture(ldm_keys.diffusers_unet_keys("sd1")) == "sd1"
    assert K.detect_architecture(ldm_keys.diffusers_unet_keys("sdxl")) == "sdxl"
    assert K.detect_architecture(["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"]) == "flux"
    assert K.detect_architecture(["foo.weight", "bar.bias"]) == "unknown"
    # LoRA files
    assert K.detect_architecture(["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"],
                                 {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight":
                                  (4, 768)}) == "sd1"
    assert K.detect_architecture(["lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"]) == "sdxl"
    assert K.detect_architecture(["lora_unet_input_blocks_7_1_transformer_blocks_5_attn1_to_q.lora_down.weight"]) == "sdxl"


def _attn_ff_proj_modules(unet):
    out = []
    for name, mod in unet.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and re.search(
                r"(attn[12]\.to_(q|k|v|out\.0)|ff\.net\.(0\.proj|2)|proj_in|proj_out)$", name):
            out.append(name)
    return out


def test_kohya_names_for_all_attention_targets_map_to_checkpoint_keys(sd15_meta_unet):
    ckpt_keys = {"model.diffusion_model." + k for k in ldm_keys.ldm_unet_keys("sd1")}
    mods = _attn_ff_proj_modules(sd15_meta_unet)
    assert len(mods) == 16 * 8 + 16 * 2 + 16 * 2
    for path in mods:
        name = kohya_keys.kohya_lora_name("unet", path)
        assert name == "lora_unet_" + path.replace(".", "_")
        assert kohya_keys.parse_kohya_lora_name(name) == ("unet", path)
        assert kohya_keys.parse_kohya_lora_name(name, mods) == ("unet", path)
        ck = kohya_keys.kohya_name_to_checkpoint_key(name, "sd1")
        assert ck + ".weight" in ckpt_keys
        assert K.classify_key(ck + ".weight").block == K.classify_key(path + ".weight").block
        # the LDM spelling (kohya SDXL style) resolves to the same key
        ldm_name = "lora_unet_" + ck[len("model.diffusion_model."):].replace(".", "_")
        assert kohya_keys.kohya_name_to_checkpoint_key(ldm_name, "sd1") == ck


def test_kohya_text_encoder_names_and_transformers5_paths():
    assert kohya_keys.kohya_lora_name("te", "text_model.encoder.layers.0.self_attn.q_proj") == \
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    # transformers 5.x CLIPTextModel module names have no "text_model." level
    assert kohya_keys.kohya_lora_name("te", "encoder.layers.0.self_attn.q_proj") == \
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert kohya_keys.kohya_lora_name("te1", "encoder.layers.3.mlp.fc1.weight") == "lora_te1_text_model_encoder_layers_3_mlp_fc1"
    assert kohya_keys.kohya_lora_name("te2", "text_encoder_2.encoder.layers.3.mlp.fc2") == \
        "lora_te2_text_model_encoder_layers_3_mlp_fc2"
    assert kohya_keys.parse_kohya_lora_name("lora_te1_text_model_encoder_layers_3_self_attn_out_proj.alpha") == \
        ("te1", "text_model.encoder.layers.3.self_attn.out_proj")
    assert kohya_keys.kohya_name_to_checkpoint_key("lora_te_text_model_encoder_layers_11_mlp_fc1", "sd1") == \
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc1"
    assert kohya_keys.kohya_name_to_checkpoint_key("lora_te1_text_model_encoder_layers_0_mlp_fc1", "sdxl") == \
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1"
    with pytest.raises(ValueError, match="kohya"):
        kohya_keys.kohya_lora_name("vae", "encoder.conv_in")
    with pytest.raises(ValueError, match="not a kohya"):
        kohya_keys.parse_kohya_lora_name("unet.down_blocks.0")
    with pytest.raises(ValueError, match="known module paths"):
        kohya_keys.parse_kohya_lora_name("lora_unet_down_blocks_9_x", ["down_blocks.0.x"])
    with pytest.raises(ValueError, match="does not exist"):
        kohya_keys.kohya_target("lora_unet_down_blocks_3_attentions_0_transformer_blocks_0_attn2_to_q", "sd1")


@pytest.mark.parametrize("arch,width", [("sdxl", 1280), ("sd2", 1024)])
def test_openclip_fused_qkv_targets(arch, width):
    name = "lora_te2_text_model_encoder_layers_5_self_attn_{}_proj" if arch == "sdxl" else \
        "lora_te_text_model_encoder_layers_5_self_attn_{}_proj"
    pre = "conditioner.embedders.1.model." if arch == "sdxl" else "cond_stage_model.model."
    for i, p in enumerate("qkv"):
        t = kohya_keys.kohya_target(name.format(p), arch)
        assert t.weight_key == pre + "transformer.resblocks.5.attn.in_proj_weight"
        assert t.bias_key == pre + "transformer.resblocks.5.attn.in_proj_bias"
        assert t.rows == (i * width, (i + 1) * width)
    t = kohya_keys.kohya_target(name.format("out"), arch)
    assert t.weight_key == pre + "transformer.resblocks.5.attn.out_proj.weight" and t.rows is None
    fc = kohya_keys.kohya_target(name.replace("self_attn_{}_proj", "mlp_fc1"), arch)
    assert fc.weight_key == pre + "transformer.resblocks.5.mlp.c_fc.weight"
