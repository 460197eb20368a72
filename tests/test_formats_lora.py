"""formats.lora_files: decoding every LoRA layout to ΔW, writing kohya/.diff files, sshs hashes, bad inputs."""

from __future__ import annotations

import hashlib
import json
import pickle
import struct

import pytest
import torch

from conceptlab.formats import kohya_keys, ldm_keys
from conceptlab.formats.lora_files import (
    LoraFormatError, lora_deltas, model_hashes, save_diff_file, save_kohya_lora,
)
from conceptlab.formats.safetensors_io import WeightFileError, read_metadata, save_safetensors

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
Q_LDM = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
CONV = "lora_unet_down_blocks_0_resnets_1_conv2"
CONV_LDM = "model.diffusion_model.input_blocks.2.0.out_layers.3.weight"
TE = "lora_te_text_model_encoder_layers_2_self_attn_v_proj"
TE_LDM = "cond_stage_model.transformer.text_model.encoder.layers.2.self_attn.v_proj.weight"


def _g(seed):
    return torch.Generator().manual_seed(seed)


def test_kohya_alpha_scale_conv_and_te(tmp_path):
    down, up = torch.randn(4, 768, generator=_g(0)), torch.randn(320, 4, generator=_g(1))
    cdown, cup = torch.randn(8, 320, 3, 3, generator=_g(2)), torch.randn(320, 8, 1, 1, generator=_g(3))
    tdown, tup = torch.randn(2, 768, generator=_g(4)), torch.randn(768, 2, generator=_g(5))
    path = save_kohya_lora(tmp_path / "k.safetensors", {Q: (down, up, 2.0), CONV: (cdown, cup, 4.0), TE: (tdown, tup, 1.0)},
                           {"ss_network_dim": "4", "ss_network_alpha": "2.0", "modelspec.title": "t"}, dtype=torch.float32)
    res = lora_deltas(path, strength=0.75)
    assert res.format == "kohya" and res.arch == "sd1" and res.skipped == {}
    assert set(res.deltas) == {Q_LDM, CONV_LDM, TE_LDM}
    torch.testing.assert_close(res.deltas[Q_LDM], (up @ down) * (2.0 / 4) * 0.75)
    want_conv = (cup.flatten(1) @ cdown.flatten(1)).reshape(320, 320, 3, 3) * (4.0 / 8) * 0.75
    torch.testing.assert_close(res.deltas[CONV_LDM], want_conv)
    torch.testing.assert_close(res.deltas[TE_LDM], (tup @ tdown) * 0.5 * 0.75)
    assert all(v.dtype == torch.float32 for v in res.deltas.values())
    md = read_metadata(path)
    assert md["ss_network_dim"] == "4" and md["modelspec.title"] == "t"
    assert len(md["sshs_model_hash"]) == 64 and len(md["sshs_legacy_hash"]) == 8


def test_kohya_fp16_default_and_missing_alpha_means_scale_one(tmp_path):
    down, up = torch.randn(4, 768, generator=_g(0)), torch.randn(320, 4, generator=_g(1))
    path = save_kohya_lora(tmp_path / "h.safetensors", {Q: (down, up, 4.0)}, {})
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        assert f.get_tensor(Q + ".lora_up.weight").dtype == torch.float16
        assert f.get_tensor(Q + ".alpha").ndim == 0
    sd = {Q + ".lora_down.weight": down, Q + ".lora_up.weight": up}  # no alpha -> scale 1 (kohya, ComfyUI)
    torch.testing.assert_close(lora_deltas(sd, arch="sd1").deltas[Q_LDM], up @ down)


def test_locon_tucker_mid():
    down = torch.randn(4, 320, 1, 1, generator=_g(0))
    mid = torch.randn(4, 4, 3, 3, generator=_g(1))
    up = torch.randn(320, 4, 1, 1, generator=_g(2))
    sd = {CONV + ".lora_down.weight": down, CONV + ".lora_mid.weight": mid, CONV + ".lora_up.weight": up,
          CONV + ".alpha": torch.tensor(2.0)}
    got = lora_deltas(sd, arch="sd1").deltas[CONV_LDM]
    # explicit sum: ΔW[o, c, k, l] = Σ_ij up[o, i] mid[i, j, k, l] down[j, c]
    want = torch.einsum("oi,ijkl,jc->ockl", up[:, :, 0, 0], mid, down[:, :, 0, 0]) * 0.5
    torch.testing.assert_close(got, want)


def test_peft_lora_A_B_with_prefixes_and_adapter_metadata(tmp_path):
    a, b = torch.randn(4, 768, generator=_g(0)), torch.randn(320, 4, generator=_g(1))
    ta, tb = torch.randn(4, 768, generator=_g(2)), torch.randn(768, 4, generator=_g(3))
    sd = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": a,
          "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": b,
          # transformers-5 module path (no "text_model."), as peft on CLIPTextModel names it
          "text_encoder.encoder.layers.2.self_attn.v_proj.lora_A.weight": ta,
          "text_encoder.encoder.layers.2.self_attn.v_proj.lora_B.weight": tb}
    md = {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 8, "unet.r": 4, "text_encoder.lora_alpha": 2,
                                               "text_encoder.r": 4})}
    path = save_safetensors(sd, tmp_path / "p.safetensors", md)
    res = lora_deltas(path, arch="sd1")
    assert res.format == "peft"
    torch.testing.assert_close(res.deltas[Q_LDM], b @ a * 2.0)
    torch.testing.assert_close(res.deltas[TE_LDM], tb @ ta * 0.5)
    # without metadata: scale 1; old diffusers processor names decode to the same targets
    old = {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.down.weight": a,
           "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.up.weight": b}
    torch.testing.assert_close(lora_deltas(old, arch="sd1").deltas[Q_LDM], b @ a)


def test_comfy_native_and_diff_files(tmp_path):
    a, b = torch.randn(2, 768, generator=_g(0)), torch.randn(320, 2, generator=_g(1))
    native = {"diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.lora_down.weight": a,
              "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.lora_up.weight": b,
              "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.alpha": torch.tensor(1.0)}
    res = lora_deltas(native, arch="sd1")
    assert res.format == "comfy"
    torch.testing.assert_close(res.deltas[Q_LDM], b @ a * 0.5)

    dw = torch.randn(320, 768, generator=_g(2))
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0"
    bias = torch.randn(320, generator=_g(3))
    p = save_diff_file(tmp_path / "d.safetensors", {Q + ".diff": dw, name + ".diff_b": bias}, {"ss_x": "1"},
                       dtype=torch.float32)
    res = lora_deltas(p, strength=-2.0)
    assert res.format == "diff"
    torch.testing.assert_close(res.deltas[Q_LDM], -2.0 * dw)
    out_b = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_out.0.bias"
    torch.testing.assert_close(res.deltas[out_b], -2.0 * bias)
    assert "sshs_model_hash" in read_metadata(p)
    with pytest.raises(LoraFormatError, match="diff"):
        save_diff_file(tmp_path / "bad.safetensors", {Q: dw}, {})
    assert not (tmp_path / "bad.safetensors").exists()


def test_loha_lokr_decoded_dora_skipped():
    w1a, w1b = torch.randn(320, 2, generator=_g(0)), torch.randn(2, 768, generator=_g(1))
    w2a, w2b = torch.randn(320, 2, generator=_g(2)), torch.randn(2, 768, generator=_g(3))
    name_o = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v"
    k1, k2 = torch.randn(4, 8, generator=_g(4)), torch.randn(80, 96, generator=_g(5))
    sd = {Q + ".hada_w1_a": w1a, Q + ".hada_w1_b": w1b, Q + ".hada_w2_a": w2a, Q + ".hada_w2_b": w2b,
          Q + ".alpha": torch.tensor(1.0),
          name_o + ".lokr_w1": k1, name_o + ".lokr_w2": k2,
          CONV + ".lora_down.weight": torch.randn(2, 320, 3, 3), CONV + ".lora_up.weight": torch.randn(320, 2, 1, 1),
          CONV + ".dora_scale": torch.ones(320, 1, 1, 1)}
    res = lora_deltas(sd, arch="sd1")
    assert res.format == "mixed"
    torch.testing.assert_close(res.deltas[Q_LDM], (w1a @ w1b) * (w2a @ w2b) * 0.5)
    v_key = Q_LDM.replace("to_k", "to_v")
    torch.testing.assert_close(res.deltas[v_key], torch.kron(k1, k2))
    assert CONV in res.skipped and "DoRA" in res.skipped[CONV]
    assert CONV_LDM not in res.deltas


def test_sdxl_te2_qkv_go_to_fused_in_proj_rows():
    w = 1280
    a = torch.randn(2, w, generator=_g(0))
    bq, bv = torch.randn(w, 2, generator=_g(1)), torch.randn(w, 2, generator=_g(2))
    n = "lora_te2_text_model_encoder_layers_0_self_attn_{}_proj"
    sd = {n.format("q") + ".lora_down.weight": a, n.format("q") + ".lora_up.weight": bq,
          n.format("v") + ".lora_down.weight": a, n.format("v") + ".lora_up.weight": bv}
    res = lora_deltas(sd)  # arch detected from lora_te2_
    assert res.arch == "sdxl"
    d = res.deltas["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"]
    assert d.shape == (3 * w, w)
    torch.testing.assert_close(d[:w], bq @ a)
    assert torch.count_nonzero(d[w:2 * w]) == 0
    torch.testing.assert_close(d[2 * w:], bv @ a)


def test_sshs_hashes_follow_kohya_semantics(tmp_path):
    # > 1 MiB so the legacy hash reads real bytes
    down, up = torch.randn(128, 1280, generator=_g(0)), torch.randn(320, 128, generator=_g(1))
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2"
    p1 = save_kohya_lora(tmp_path / "a.safetensors", {name: (down[:, :1280], up, 8.0), Q: (down[:, :768], up, 8.0)},
                         {"ss_network_dim": "128", "ss_output_name": "a", "note": "x"}, dtype=torch.float32)
    md = read_metadata(p1)
    raw = p1.read_bytes()
    assert len(raw) > 0x110000
    n = struct.unpack("<Q", raw[:8])[0]
    assert md["sshs_model_hash"] == hashlib.sha256(raw[8 + n:]).hexdigest()  # tensor data only
    assert model_hashes(p1) == (md["sshs_model_hash"], md["sshs_legacy_hash"])
    p2 = save_kohya_lora(tmp_path / "b.safetensors", {name: (down[:, :1280], up, 8.0), Q: (down[:, :768], up, 8.0)},
                         {"ss_network_dim": "128", "ss_output_name": "a", "note": "a different non-ss note"}, dtype=torch.float32)
    assert read_metadata(p2)["sshs_legacy_hash"] == md["sshs_legacy_hash"]  # only ss_* metadata counts
    p3 = save_kohya_lora(tmp_path / "c.safetensors", {name: (down[:, :1280], up, 8.0), Q: (down[:, :768], up, 8.0)},
                         {"ss_network_dim": "128", "ss_output_name": "another name"}, dtype=torch.float32)
    md3 = read_metadata(p3)
    assert md3["sshs_model_hash"] == md["sshs_model_hash"]  # same tensors
    assert md3["sshs_legacy_hash"] != md["sshs_legacy_hash"]  # header length shifts the 1 MiB window


# ---------------------------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------------------------
def test_corrupt_and_truncated_files(tmp_path):
    p = save_kohya_lora(tmp_path / "ok.safetensors", {Q: (torch.randn(4, 768), torch.randn(320, 4), 4.0)}, {})
    raw = p.read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(WeightFileError, match="corrupt or truncated"):
        lora_deltas(trunc)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 3)
    with pytest.raises(WeightFileError):
        lora_deltas(junk)
    with pytest.raises(FileNotFoundError):
        lora_deltas(tmp_path / "missing.safetensors")


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_only_file_is_refused(tmp_path, capsys):
    p = tmp_path / "lora.ckpt"
    torch.save({"state_dict": {"x": _Evil(), "w": torch.zeros(2)}}, p)
    with pytest.raises(WeightFileError, match=r"(?s)weights_only=True.*convert the file to \.safetensors"):
        lora_deltas(p)
    legacy = tmp_path / "legacy.pt"
    with open(legacy, "wb") as fh:
        pickle.dump({"x": _Evil()}, fh)
    with pytest.raises(WeightFileError, match="weights_only=True"):
        lora_deltas(legacy)
    assert "must never run" not in capsys.readouterr().out


def test_empty_and_unknown(tmp_path):
    p = save_safetensors({}, tmp_path / "empty.safetensors", {"ss_network_dim": "4"})
    with pytest.raises(LoraFormatError, match="empty LoRA"):
        lora_deltas(p)
    with pytest.raises(LoraFormatError, match="no LoRA module could be decoded"):
        lora_deltas({"foo.bar": torch.zeros(2), "lora_unet_nowhere_block.lora_down.weight": torch.zeros(1, 2),
                     "lora_unet_nowhere_block.lora_up.weight": torch.zeros(2, 1)}, arch="sd1")
    good = {Q + ".lora_down.weight": torch.randn(2, 768), Q + ".lora_up.weight": torch.randn(320, 2),
            "lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight": torch.randn(2, 4),
            "lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight": torch.randn(4, 2),
            "some_random_tensor": torch.zeros(1)}
    res = lora_deltas(good, arch="sd1")
    assert set(res.deltas) == {Q_LDM}
    assert "does not exist" in res.skipped["lora_unet_down_blocks_7_attentions_0_proj_in"]
    assert "some_random_tensor" in res.skipped


def test_save_kohya_lora_refuses_bad_modules_and_writes_nothing(tmp_path):
    dest = tmp_path / "x.safetensors"
    with pytest.raises(LoraFormatError, match="NaN"):
        save_kohya_lora(dest, {Q: (torch.full((2, 768), float("nan")), torch.zeros(320, 2), 2.0)}, {})
    with pytest.raises(LoraFormatError, match="rank mismatch"):
        save_kohya_lora(dest, {Q: (torch.zeros(2, 768), torch.zeros(320, 3), 2.0)}, {})
    with pytest.raises(LoraFormatError, match="not a kohya"):
        save_kohya_lora(dest, {"unet.down_blocks.0": (torch.zeros(2, 768), torch.zeros(320, 2), 2.0)}, {})
    with pytest.raises(LoraFormatError, match="empty"):
        save_kohya_lora(dest, {}, {})
    assert list(tmp_path.iterdir()) == []
    save_kohya_lora(dest, {Q: (torch.zeros(2, 768), torch.zeros(320, 2), 2.0)}, {})
    with pytest.raises(FileExistsError):
        save_kohya_lora(dest, {Q: (torch.zeros(2, 768), torch.zeros(320, 2), 2.0)}, {}, overwrite=False)


# ---------------------------------------------------------------------------------------------------------------
# diffusers accepts our kohya files (load_lora_weights path) and applies the same ΔW
# ---------------------------------------------------------------------------------------------------------------
TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(8, 8, 16, 16),
                 norm_num_groups=4, cross_attention_dim=12, attention_head_dim=2,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def test_diffusers_loads_our_kohya_lora_without_unexpected_keys(tmp_path):
    import re

    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET)
    targets = [n for n, m in unet.named_modules()
               if re.search(r"(attn[12]\.to_(q|k|v|out\.0)|ff\.net\.(0\.proj|2)|proj_in|proj_out)$", n)]
    modules = {}
    g = _g(7)
    for n in targets:
        w = unet.get_submodule(n).weight
        r = 2
        down = torch.randn(r, *w.shape[1:], generator=g) * 0.1
        up = torch.randn(w.shape[0], r, *([1, 1] if w.ndim == 4 else []), generator=g) * 0.1
        modules[kohya_keys.kohya_lora_name("unet", n)] = (down, up, 1.0)
    path = save_kohya_lora(tmp_path / "tiny.safetensors", modules, {"ss_network_dim": "2"}, dtype=torch.float32)

    from safetensors.torch import load_file
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(load_file(str(path)))  # raises on leftovers
    assert len(alphas) == len(targets)

    state_dict, network_alphas = StableDiffusionPipeline.lora_state_dict(str(path))
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    StableDiffusionPipeline.load_lora_into_unet(state_dict, network_alphas, unet, adapter_name="t")
    unet.fuse_lora(lora_scale=1.0)
    after = {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items() if "lora_" not in k}
    res = lora_deltas(path, arch="sd1")
    d2l_unused = ldm_keys.diffusers_to_ldm_unet  # names below are the SD1 layout (tiny UNet has the same module tree)
    assert d2l_unused
    l2d = ldm_keys.ldm_to_diffusers_unet("sd1")
    n_checked = 0
    for ldm_key, delta in res.deltas.items():
        dk = l2d[ldm_key[len("model.diffusion_model."):]]
        torch.testing.assert_close(after[dk] - before[dk], delta, rtol=1e-4, atol=1e-5)
        n_checked += 1
    assert n_checked == len(targets)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(targets)
