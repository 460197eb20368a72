"""LoRA extraction (checkpoint pair) and resizing: the LoRA's ΔW is the difference at full rank, the truncated SVD
at rank r, the reported energy is the energy the file keeps, kohya's dynamic rank rules, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conceptlab.cli import main as cli_main
from conceptlab.formats.lora_files import lora_deltas, save_kohya_lora
from conceptlab.training.lora.extract import choose_rank, extract_lora, factorize, resize_lora, save_lora_tensors

U = "model.diffusion_model."
TE = "cond_stage_model.transformer.text_model.encoder.layers."
# real SD1 module names (small shapes: names decide what is extracted, shapes only need to be consistent)
ATTN_Q = U + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
ATTN_K2 = U + "output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight"
PROJ_IN = U + "input_blocks.1.1.proj_in.weight"          # 1x1 conv in SD1
CONV = U + "input_blocks.1.0.in_layers.2.weight"         # resnets.0.conv1, 3x3
TEMB = U + "input_blocks.1.0.emb_layers.1.weight"        # resnets.0.time_emb_proj
CONV_IN = U + "input_blocks.0.0.weight"                  # conv_in: never a kohya LoRA target
TE_Q = TE + "0.self_attn.q_proj.weight"
TE_FC1 = TE + "0.mlp.fc1.weight"
SHAPES = {ATTN_Q: (24, 24), ATTN_K2: (24, 16), PROJ_IN: (24, 24, 1, 1), CONV: (20, 12, 3, 3), TEMB: (20, 32),
          CONV_IN: (8, 4, 3, 3), TE_Q: (16, 16), TE_FC1: (32, 16),
          U + "input_blocks.1.1.norm.weight": (24,), TE + "0.layer_norm1.weight": (16,)}
NAMES = {ATTN_Q: "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
         ATTN_K2: "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_k",
         PROJ_IN: "lora_unet_down_blocks_0_attentions_0_proj_in",
         CONV: "lora_unet_down_blocks_0_resnets_0_conv1",
         TEMB: "lora_unet_down_blocks_0_resnets_0_time_emb_proj",
         TE_Q: "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
         TE_FC1: "lora_te_text_model_encoder_layers_0_mlp_fc1"}


def _pair(tmp_path, te_scale=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(*s, generator=g) for k, s in SHAPES.items()}
    tuned = {}
    for k, v in base.items():
        scale = te_scale if k.startswith("cond_stage") else 0.1
        tuned[k] = v + scale * torch.randn(*v.shape, generator=g)
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    return base, tuned


def _decoded(path):
    d = lora_deltas(path, arch="sd1")
    assert d.skipped == {}
    return dict(d.deltas)


def test_full_rank_extraction_is_the_checkpoint_difference(tmp_path):
    base, tuned = _pair(tmp_path)
    res = extract_lora(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", rank=1000, conv_rank=1000,
                       arch="sd1")
    assert set(res.modules) == set(NAMES.values())  # conv_in, norms: never targets
    out = save_kohya_lora(tmp_path / "x.safetensors", res.modules, res.metadata, dtype=torch.float32)
    got = _decoded(out)
    assert set(got) == set(NAMES)
    for k in NAMES:
        torch.testing.assert_close(got[k], tuned[k] - base[k], rtol=1e-4, atol=2e-5)
    assert res.report["overall"]["energy_kept"] == pytest.approx(1.0, abs=1e-6)
    from conceptlab.formats.safetensors_io import read_metadata
    meta = read_metadata(out)
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sd_v1"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "1000", "conv_alpha": "1000.0"}


def test_rank_r_is_the_truncated_svd_and_energy_is_reported(tmp_path):
    base, tuned = _pair(tmp_path)
    res = extract_lora(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", rank=3, conv_rank=5,
                       arch="sd1")
    got = _decoded(save_kohya_lora(tmp_path / "x.safetensors", res.modules, res.metadata, dtype=torch.float32))
    for k, name in NAMES.items():
        d = (tuned[k] - base[k]).reshape(SHAPES[k][0], -1).double()
        Uu, S, Vh = torch.linalg.svd(d, full_matrices=False)
        r = 5 if k == CONV else 3  # 3x3 conv at conv_rank; time_emb_proj and the 1x1 proj_in at rank
        want = (Uu[:, :r] * S[:r]) @ Vh[:r]
        torch.testing.assert_close(got[k].reshape(want.shape).double(), want, rtol=1e-4, atol=2e-5)
        st = res.report["per_layer"][name]
        assert st["rank"] == r and st["alpha"] == r
        assert st["energy_kept"] == pytest.approx(float((S[:r] ** 2).sum() / (S ** 2).sum()), rel=1e-6)
        # the reported energy is what the file keeps: ‖ΔW_lora‖² / ‖ΔW‖²
        assert float((got[k].double() ** 2).sum() / (d ** 2).sum()) == pytest.approx(st["energy_kept"], rel=1e-4)


def test_no_conv_rank_leaves_resnet_layers_out_and_small_te_change_is_dropped(tmp_path):
    _pair(tmp_path, te_scale=1e-4)
    res = extract_lora(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", rank=4, arch="sd1")
    assert set(res.modules) == {NAMES[ATTN_Q], NAMES[ATTN_K2], NAMES[PROJ_IN]}
    assert set(res.report["text_encoders_left_out"]) == {"te"}
    res2 = extract_lora(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", rank=4, arch="sd1",
                        min_diff=0.0)
    assert NAMES[TE_Q] in res2.modules


def test_energy_mode_keeps_the_minimal_rank():
    g = torch.Generator().manual_seed(3)
    d = torch.randn(40, 30, generator=g) @ torch.diag(torch.logspace(0, -2, 30)) @ torch.randn(30, 30, generator=g)
    S = torch.linalg.svdvals(d.double())
    cum = torch.cumsum(S ** 2, 0) / (S ** 2).sum()
    for target in (0.5, 0.9, 0.99):
        f = factorize(d, 30, "energy", target)
        assert f.energy_kept >= target - 1e-9
        assert float(cum[f.rank - 2]) < target if f.rank > 1 else True
        assert f.energy_kept == pytest.approx(float(cum[f.rank - 1]), rel=1e-6)
    assert factorize(d, 4, "energy", 0.999).rank == 4  # rank is the cap


def test_kohya_dynamic_rules_match_resize_lora_py():
    # S = [10, 5, 2, 1, 0.5]; kohya rank_resize: new_rank = clamp(index, 1, n-1) + 1
    S = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5])
    assert choose_rank(S, 99, "sv_ratio", 4.0) == 3        # count(S > 2.5) = 2 -> 3
    assert choose_rank(S, 99, "sv_fro", 0.9) == 3          # cum S²/ΣS² = .768,.960 ≥ .81 at index 1 -> 2 -> 3
    assert choose_rank(S, 99, "sv_cumulative", 0.8) == 3   # cum S/ΣS = .541,.811 ≥ .8 at index 1 -> 2 -> 3
    cum = torch.cumsum(S, 0) / S.sum()
    idx = int(torch.searchsorted(cum, torch.tensor(0.8))) + 1
    assert choose_rank(S, 99, "sv_cumulative", 0.8) == max(1, min(idx, 4)) + 1
    assert choose_rank(S, 2, "sv_ratio", 100.0) == 2       # capped by rank
    assert choose_rank(torch.zeros(5), 8, "fixed") == 1     # a zero delta keeps one (zero) component
    with pytest.raises(ValueError, match="sv_ratio"):
        choose_rank(S, 4, "sv_ratio", 0.5)
    with pytest.raises(ValueError, match="unknown rank mode"):
        choose_rank(S, 4, "svd")


def _lora(tmp_path, rank=8, alpha=4.0, conv=True):
    g = torch.Generator().manual_seed(5)
    mods = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
            (torch.randn(rank, 24, generator=g), torch.randn(24, rank, generator=g), alpha)}
    if conv:
        mods["lora_unet_down_blocks_0_resnets_0_conv1"] = (torch.randn(rank, 12, 3, 3, generator=g),
                                                          torch.randn(20, rank, 1, 1, generator=g), alpha)
    return save_kohya_lora(tmp_path / "src.safetensors", mods, {"ss_network_dim": str(rank)}, dtype=torch.float32)


def test_resize_keeps_weights_at_same_rank_and_truncates_lower(tmp_path):
    src = _lora(tmp_path)
    before = _decoded(src)
    same, rep, _ = resize_lora(src, rank=8)
    p = save_lora_tensors(tmp_path / "same.safetensors", same, {}, dtype=torch.float32)
    for k, v in _decoded(p).items():
        torch.testing.assert_close(v, before[k], rtol=1e-4, atol=1e-4)
    assert rep["overall"]["energy_kept"] == pytest.approx(1.0, abs=1e-6)

    small, rep, md = resize_lora(src, rank=3, conv_rank=2)
    p = save_lora_tensors(tmp_path / "small.safetensors", small, md, dtype=torch.float32)
    after = _decoded(p)
    for k, v in after.items():
        full = before[k].reshape(before[k].shape[0], -1).double()
        Uu, S, Vh = torch.linalg.svd(full, full_matrices=False)
        r = 2 if before[k].ndim == 4 else 3
        torch.testing.assert_close(v.reshape(full.shape).double(), (Uu[:, :r] * S[:r]) @ Vh[:r], rtol=1e-4, atol=1e-3)
    # reported overall energy = measured ‖ΔW_new‖² / ‖ΔW_old‖² over all modules
    kept = sum(float((v.double() ** 2).sum()) for v in after.values())
    tot = sum(float((v.double() ** 2).sum()) for v in before.values())
    assert rep["overall"]["energy_kept"] == pytest.approx(kept / tot, rel=1e-4)
    assert md["ss_network_dim"] == "3" and "resized from 8 to 3 (conv: 2)" in md["ss_training_comment"]
    # kohya's alpha rule: new_alpha = old_alpha / old_rank * new_rank
    assert float(small["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha"]) == 4.0 / 8 * 3


def test_resize_dynamic_and_peft_pairs(tmp_path):
    g = torch.Generator().manual_seed(7)
    sd = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.randn(6, 24, generator=g),
          "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.randn(24, 6, generator=g),
          "something_else": torch.ones(3)}
    out, rep, md = resize_lora(sd, rank=6, mode="sv_fro", param=0.9)
    assert torch.equal(out["something_else"], sd["something_else"])
    (name, st), = rep["per_layer"].items()
    assert st["fro_retained"] >= 0.9 and st["rank"] <= 6
    assert md["ss_network_dim"] == "Dynamic"
    with pytest.raises(ValueError, match="no LoRA pairs"):
        resize_lora({"x": torch.ones(2)}, rank=2)


def test_errors_are_clear(tmp_path):
    _pair(tmp_path)
    bad = load_file(str(tmp_path / "tuned.safetensors"))
    bad[ATTN_Q] = torch.zeros(24, 12)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="shape mismatch"):
        extract_lora(tmp_path / "base.safetensors", tmp_path / "bad.safetensors", arch="sd1")
    with pytest.raises(ValueError, match="do not differ"):
        extract_lora(tmp_path / "base.safetensors", tmp_path / "base.safetensors", arch="sd1")
    with pytest.raises(ValueError, match="rank"):
        extract_lora(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", rank=0, arch="sd1")


def test_cli_extract_and_resize(tmp_path, capsys):
    _pair(tmp_path)
    out = tmp_path / "cli.safetensors"
    rc = cli_main(["extract-lora", str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"),
                   "-o", str(out), "--rank", "4", "--mode", "energy", "--param", "0.5", "--report",
                   str(tmp_path / "r.json"), "-q"])
    assert rc == 0 and out.exists()
    rep = json.loads((tmp_path / "r.json").read_text())
    assert all(v["energy_kept"] >= 0.5 or v["rank"] == 4 for v in rep["per_layer"].values())
    assert "energy kept" in capsys.readouterr().out
    rc = cli_main(["resize-lora", str(out), "-o", str(tmp_path / "small.safetensors"), "--rank", "2", "-q"])
    assert rc == 0
    assert all(v.shape[0] <= 2 for k, v in load_file(str(tmp_path / "small.safetensors")).items()
               if k.endswith("lora_down.weight"))
    assert cli_main(["resize-lora", str(out), "-o", str(tmp_path / "small.safetensors"), "--rank", "2", "-q"]) == 2
