"""Weight-diff analysis: exact statistics, attribution to layer types / blocks, LoRA vs merged checkpoint, bad
inputs, report comparison and the CLI. Checkpoints are built in the test with real SD1.5 / SDXL key names
(``formats.ldm_keys.ldm_unet_keys``) and tiny tensors."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conceptlab.cli import main as cli_main
from conceptlab.formats.keys import classify_key
from conceptlab.formats.ldm_keys import ldm_unet_keys, ldm_to_diffusers_unet
from conceptlab.formats.safetensors_io import WeightFileError
from conceptlab.metrics.diff_io import StreamingWeights
from conceptlab.metrics.diff_report import compare_markdown, fmt_ratio, report_markdown
from conceptlab.metrics.diff_models import diff_files
from conceptlab.metrics.diff_stats import effective_rank
from conceptlab.metrics.weight_diff import (ArchitectureMismatchError, DiffOptions, ShapeMismatchError, TensorPair,
                                            compare_reports, diff_pairs)

UNET = "model.diffusion_model."
TE_KEYS = [f"cond_stage_model.transformer.text_model.encoder.layers.{i}.self_attn.{p}_proj.weight"
           for i in range(2) for p in "qkvo"] + ["cond_stage_model.transformer.text_model.final_layer_norm.weight"]
VAE_KEYS = ["first_stage_model.encoder.conv_in.weight", "first_stage_model.decoder.conv_out.weight"]
_CONV = re.compile(r"(in_layers\.2|out_layers\.3|input_blocks\.0\.0|\.op|\.conv|out\.2|skip_connection)\.weight$")


def _shape(key: str) -> tuple[int, ...]:
    if key.endswith(".bias") or "norm" in key:
        return (6,)
    if _CONV.search(key) or key.startswith("first_stage_model"):
        return (6, 5, 3, 3)
    return (6, 5)


def make_state(arch: str = "sd1", seed: int = 0, dtype=torch.float32, te: bool = True) -> dict[str, torch.Tensor]:
    """A tiny checkpoint with the real single-file key layout of ``arch``."""
    g = torch.Generator().manual_seed(seed)
    keys = [UNET + k for k in ldm_unet_keys(arch)] + (TE_KEYS + VAE_KEYS if te else [])
    return {k: (torch.randn(_shape(k), generator=g) * 0.1).to(dtype) for k in keys}


def inject(sd: dict, pattern: str, scale: float, seed: int = 1) -> tuple[dict, list[str]]:
    g = torch.Generator().manual_seed(seed)
    out = dict(sd)
    hit = []
    for k, v in sd.items():
        if re.search(pattern, k):
            out[k] = (v.double() + scale * torch.randn(v.shape, generator=g, dtype=torch.float64)).to(v.dtype)
            hit.append(k)
    assert hit, pattern
    return out, hit


def np_stats(pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    a = np.concatenate([x.astype(np.float64).ravel() for x, _ in pairs])
    b = np.concatenate([y.astype(np.float64).ravel() for _, y in pairs])
    d = b - a
    return {"params": a.size, "mean_abs": np.abs(d).mean(), "max_abs": np.abs(d).max(), "std": d.std(),
            "rms": np.sqrt((d * d).mean()), "rel_change": np.linalg.norm(d) / np.linalg.norm(a),
            "cosine": (a @ b) / (np.linalg.norm(a) * np.linalg.norm(b))}


def assert_stats(got: dict, exp: dict, rtol: float = 2e-6):
    for k, v in exp.items():
        assert got[k] == pytest.approx(v, rel=rtol, abs=1e-12), k


def save(sd: dict, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


# ---------------------------------------------------------------------------------------------------------------
def test_injected_changes_are_attributed_exactly(tmp_path):
    a = make_state("sd1", dtype=torch.float16)
    b, hit1 = inject(a, r"output_blocks\.5\.1\.transformer_blocks\.0\.attn2\.to_k\.weight$", 1e-2)
    b, hit2 = inject(b, r"middle_block\.1\.transformer_blocks\.0\.ff\.net\.2\.weight$", 3e-3, seed=2)
    hit = hit1 + hit2
    rep = diff_files(save(a, tmp_path / "a.safetensors"), save(b, tmp_path / "b.safetensors"))

    assert rep["arch"] == "sd1" and rep["mode"] == "checkpoints"
    changed_lt = {k for k, v in rep["by_layer_type"].items() if v["changed_tensors"]}
    changed_blocks = {k for k, v in rep["by_block"].items() if v["changed_tensors"]}
    assert changed_lt == {"attn2.to_k", "ff"}
    assert changed_blocks == {"OUT05", "M00"}
    assert {k for k, v in rep["by_component"].items() if v["changed_tensors"]} == {"unet"}
    assert rep["changed_tensors"] == 2 and rep["identical_tensors"] == len(a) - 2
    assert {t["key"] for t in rep["top_tensors"]} == set(hit)
    assert rep["a"]["file_dtype"] == "fp16" and rep["only_in_a"] == [] and rep["only_in_b"] == []

    # exact statistics against numpy on the same stored values
    assert_stats(rep["overall"], np_stats([(a[k].numpy(), b[k].numpy()) for k in a]))
    for lt in ("attn2.to_k", "ff"):
        keys = [k for k in a if classify_key(k, "sd1").layer_type == lt]
        assert_stats(rep["by_layer_type"][lt], np_stats([(a[k].numpy(), b[k].numpy()) for k in keys]))
    keys = [k for k in a if classify_key(k, "sd1").block == "OUT05"]
    assert_stats(rep["by_block"]["OUT05"], np_stats([(a[k].numpy(), b[k].numpy()) for k in keys]))
    # averages over changed tensors only, and shares
    d = np.concatenate([(b[k].double() - a[k].double()).numpy().ravel() for k in hit])
    assert rep["overall"]["mean_abs_changed"] == pytest.approx(np.abs(d).mean(), rel=1e-6)
    ff = rep["by_layer_type"]["ff"]
    ff_params = sum(a[k].numel() for k in a if classify_key(k, "sd1").layer_type == "ff")
    assert ff["param_share"] == pytest.approx(ff_params / sum(v.numel() for v in a.values()))
    assert sum(g["change_share"] for g in rep["by_layer_type"].values()) == pytest.approx(1.0)
    assert sum(g["param_share"] for g in rep["by_block"].values()) == pytest.approx(1.0)
    row = next(t for t in rep["tensors"] if t["key"] == hit1[0])
    d1 = (b[hit1[0]].double() - a[hit1[0]].double()).numpy()
    assert row["frac_changed"] == pytest.approx(np.count_nonzero(d1) / d1.size)
    assert rep["by_block_layer_type"]["OUT05"]["attn2.to_k"] == pytest.approx(np.abs(d1).mean(), rel=1e-6)
    md = report_markdown(rep)
    assert "mean |Δ| over the whole model" in md and "changed tensors only" in md and "attn2.to_k" in md


def test_partial_file_counts_the_rest_as_unchanged(tmp_path):
    a = make_state("sd1")
    b, hit = inject(a, r"attn2\.to_[kv]\.weight$", 1e-3)
    full = diff_files(save(a, tmp_path / "a.safetensors"), save(b, tmp_path / "b.safetensors"))
    part = diff_files(tmp_path / "a.safetensors", save({k: b[k] for k in hit}, tmp_path / "esd.safetensors"))
    assert part["partial"] == "b" and len(part["only_in_a"]) == len(a) - len(hit)
    assert any("rest is unchanged" in n for n in part["notes"])
    for f in ("mean_abs", "max_abs", "std", "rel_change", "params"):
        assert part["overall"][f] == pytest.approx(full["overall"][f], rel=1e-9)


def test_diffusers_named_unet_file_lines_up_with_ldm_names(tmp_path):
    a = make_state("sd1", te=False)
    b, hit = inject(a, r"input_blocks\.4\.1\.transformer_blocks\.0\.attn1\.to_q\.weight$", 1e-2)
    l2d = ldm_to_diffusers_unet("sd1")
    bd = {l2d[k[len(UNET):]]: v for k, v in b.items()}
    rep = diff_files(save(a, tmp_path / "a.safetensors"), save(bd, tmp_path / "unet_diffusers.safetensors"))
    assert rep["only_in_a"] == [] and rep["only_in_b"] == []
    assert rep["changed_tensors"] == 1 and rep["top_tensors"][0]["key"] == hit[0]
    assert rep["top_tensors"][0]["block"] == "IN04" and rep["top_tensors"][0]["layer_type"] == "attn1.to_q"


# ---------------------------------------------------------------------------------------------------------------
def _kohya_lora(tmp_path: Path, rank: int = 2, alpha: float = 1.0):
    from conceptlab.formats.lora_files import save_kohya_lora

    g = torch.Generator().manual_seed(5)
    lin = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    conv = "lora_unet_down_blocks_0_resnets_1_conv1"
    te = "lora_te_text_model_encoder_layers_1_self_attn_q_proj"
    mods = {lin: (torch.randn(rank, 5, generator=g), torch.randn(6, rank, generator=g), alpha),
            conv: (torch.randn(rank, 5, 3, 3, generator=g), torch.randn(6, rank, 1, 1, generator=g), alpha),
            te: (torch.randn(rank, 5, generator=g), torch.randn(6, rank, generator=g), alpha)}
    mods = {k: (d.half().float(), u.half().float(), al) for k, (d, u, al) in mods.items()}
    path = save_kohya_lora(tmp_path / "lora.safetensors", mods, {"ss_network_dim": str(rank)}, dtype=torch.float16)
    targets = {lin: UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
               conv: UNET + "input_blocks.2.0.in_layers.2.weight",
               te: "cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight"}
    return path, mods, targets


def test_kohya_lora_and_its_merged_checkpoint_give_the_same_delta(tmp_path):
    strength, rank, alpha = 0.7, 2, 1.0
    a = make_state("sd1", dtype=torch.float32)
    lora, mods, targets = _kohya_lora(tmp_path, rank, alpha)
    merged = dict(a)
    for name, (down, up, al) in mods.items():
        dw = (up.reshape(up.shape[0], -1) @ down.reshape(rank, -1)).reshape(a[targets[name]].shape) * (al / rank)
        merged[targets[name]] = a[targets[name]] + strength * dw
    pa = save(a, tmp_path / "base.safetensors")
    r_lora = diff_files(pa, lora, lora_strength=strength)
    r_merged = diff_files(pa, save(merged, tmp_path / "merged.safetensors"))
    assert r_lora["mode"] == "checkpoint+lora" and r_lora["changed_tensors"] == 3
    rows_l = {t["key"]: t for t in r_lora["tensors"] if not t["identical"]}
    rows_m = {t["key"]: t for t in r_merged["tensors"] if not t["identical"]}
    assert set(rows_l) == set(rows_m) == set(targets.values())
    for k in rows_l:
        for f in ("mean_abs", "max_abs", "std", "rms", "rel_change"):
            assert rows_l[k][f] == pytest.approx(rows_m[k][f], rel=1e-5), (k, f)
    for f in ("mean_abs", "max_abs", "std", "rel_change", "params"):
        assert r_lora["overall"][f] == pytest.approx(r_merged["overall"][f], rel=1e-5)
    assert r_lora["by_component"]["te"]["changed_tensors"] == 1
    # order does not matter: the checkpoint is the base
    r_swapped = diff_files(lora, pa, lora_strength=strength)
    assert r_swapped["overall"]["mean_abs"] == pytest.approx(r_lora["overall"]["mean_abs"])
    # two LoRAs: the same file twice differs by nothing; the ΔW of one is compared with the other's
    r_same = diff_files(lora, lora)
    assert r_same["mode"] == "loras" and r_same["overall"]["max_abs"] == 0 and r_same["changed_tensors"] == 0


def test_lora_changes_below_fp16_resolution_are_counted(tmp_path):
    a = make_state("sd1", dtype=torch.float16)
    lora, mods, targets = _kohya_lora(tmp_path)
    rep = diff_files(save(a, tmp_path / "a.safetensors"), lora, lora_strength=1e-4)
    key = targets["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"]
    row = next(t for t in rep["tensors"] if t["key"] == key)
    down, up, al = mods["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"]
    w = a[key].float()
    dw = 1e-4 * (up @ down) * (al / 2)
    expected = int(((dw != 0) & ((w + dw).half() == a[key])).sum())
    assert expected > 0 and row["below_resolution"] == expected
    assert rep["below_resolution"] >= expected and any("resolution" in n for n in rep["notes"])


# ---------------------------------------------------------------------------------------------------------------
def test_sd15_vs_sdxl_is_a_clear_error(tmp_path):
    pa = save(make_state("sd1", te=False), tmp_path / "sd15.safetensors")
    pb = save(make_state("sdxl", te=False), tmp_path / "sdxl.safetensors")
    with pytest.raises(ArchitectureMismatchError) as ei:
        diff_files(pa, pb)
    msg = str(ei.value)
    assert "sd15.safetensors (sd1)" in msg and "sdxl.safetensors (sdxl)" in msg
    assert "keys only in" in msg and "model.diffusion_model." in msg


def test_same_keys_different_shapes(tmp_path):
    a = make_state("sd1", te=False)
    b = dict(a)
    k = UNET + "input_blocks.1.1.proj_in.weight"
    b[k] = torch.zeros(6, 7)
    pa, pb = save(a, tmp_path / "a.safetensors"), save(b, tmp_path / "b.safetensors")
    with pytest.raises(ShapeMismatchError, match=re.escape(f"{k} (6, 5) vs (6, 7)")):
        diff_files(pa, pb)
    rep = diff_files(pa, pb, allow_shape_mismatch=True)
    assert rep["shape_mismatch"] == [f"{k} (6, 5) vs (6, 7)"] and rep["overall"]["max_abs"] == 0
    assert rep["overall"]["tensors"] == len(a) - 1


def test_truncated_and_corrupt_files(tmp_path):
    pa = save(make_state("sd1", te=False), tmp_path / "a.safetensors")
    raw = pa.read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(WeightFileError, match="trunc.safetensors"):
        diff_files(pa, trunc)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"\0" * 64)
    with pytest.raises(WeightFileError, match="corrupt"):
        diff_files(junk, pa)
    with pytest.raises(FileNotFoundError):
        diff_files(pa, tmp_path / "missing.safetensors")


class _NotAWeight:
    def __init__(self):
        self.x = 1


def test_pickle_only_file_is_refused_with_advice(tmp_path):
    pa = save(make_state("sd1", te=False), tmp_path / "a.safetensors")
    ck = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "obj": _NotAWeight()}, str(ck))
    with pytest.raises(WeightFileError) as ei:
        diff_files(pa, ck)
    assert "weights_only" in str(ei.value) and "safetensors" in str(ei.value)
    fake = tmp_path / "renamed.safetensors"
    fake.write_bytes(ck.read_bytes())
    with pytest.raises(WeightFileError, match="pickled torch file"):
        diff_files(pa, fake)
    # a plain weights-only .ckpt is fine
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": make_state("sd1", te=False)}, str(good))
    assert diff_files(pa, good)["overall"]["max_abs"] == 0


@pytest.mark.parametrize("da,db", [(torch.float32, torch.float16), (torch.float16, torch.bfloat16),
                                   (torch.bfloat16, torch.float32)])
def test_mixed_dtypes_are_handled(tmp_path, da, db):
    base = make_state("sd1", te=False)
    a = {k: v.to(da) for k, v in base.items()}
    b = {k: v.to(db) for k, v in base.items()}
    rep = diff_files(save(a, tmp_path / "a.safetensors"), save(b, tmp_path / "b.safetensors"))
    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    assert rep["a"]["file_dtype"] == names[da] and rep["b"]["file_dtype"] == names[db]
    assert_stats(rep["overall"], np_stats([(a[k].float().numpy(), b[k].float().numpy()) for k in a]), rtol=1e-5)
    # every difference here is rounding: it vanishes in the coarser dtype
    coarse = torch.bfloat16 if torch.bfloat16 in (da, db) else torch.float16
    exp = sum(int(((a[k].float() != b[k].float()) & (a[k].to(coarse) == b[k].to(coarse))).sum()) for k in a)
    assert rep["below_resolution"] == exp > 0


def test_empty_lora_is_a_clear_error(tmp_path):
    pa = save(make_state("sd1", te=False), tmp_path / "a.safetensors")
    empty = tmp_path / "empty.safetensors"
    save_file({}, str(empty), metadata={"ss_network_dim": "4"})
    with pytest.raises(ValueError, match="no tensors"):
        diff_files(pa, empty)
    only_alpha = tmp_path / "alpha_only.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(1.0)}, str(only_alpha))
    with pytest.raises(ValueError, match="alpha_only"):
        diff_files(pa, only_alpha)


def test_nan_and_inf_are_reported_and_excluded(tmp_path):
    a = make_state("sd1", te=False)
    b, hit = inject(a, r"input_blocks\.1\.1\.proj_out\.weight$", 1e-2)
    k = hit[0]
    bk = b[k].clone()
    bk[0, 0] = float("nan")
    bk[1, 1] = float("inf")
    b[k] = bk
    rep = diff_files(save(a, tmp_path / "a.safetensors"), save(b, tmp_path / "b.safetensors"))
    assert rep["nonfinite"]["b"] == {k: 2} and rep["nonfinite"]["a"] == {}
    assert math.isfinite(rep["overall"]["mean_abs"]) and any("NaN/Inf" in n for n in rep["notes"])
    mask = torch.isfinite(bk)
    d = (bk[mask].double() - a[k][mask].double()).numpy()
    row = next(t for t in rep["tensors"] if t["key"] == k)
    assert row["max_abs"] == pytest.approx(np.abs(d).max()) and row["nonfinite_b"] == 2


# ---------------------------------------------------------------------------------------------------------------
def test_compare_reports_gives_ratios(tmp_path):
    a = make_state("sd1", te=False)
    b1, hit = inject(a, r"attn2\.to_out\.0\.weight$", 1e-3)
    b2 = {k: (a[k] + 2.7 * (b1[k] - a[k])) if k in hit else a[k] for k in a}
    pa = save(a, tmp_path / "a.safetensors")
    r1 = diff_files(pa, save(b1, tmp_path / "run100.safetensors"))
    r2 = diff_files(pa, save(b2, tmp_path / "run500.safetensors"))
    cmp = compare_reports(json.dumps(r1), r2)
    assert cmp["overall"]["mean_abs"]["ratio"] == pytest.approx(2.7, rel=1e-5)
    assert cmp["by_layer_type"]["attn2.to_out"]["max_abs"]["ratio"] == pytest.approx(2.7, rel=1e-5)
    assert cmp["by_layer_type"]["ff"]["mean_abs"]["ratio"] is None  # 0 vs 0
    md = compare_markdown(cmp)
    assert "2.7×" in md and "run500" in md
    assert fmt_ratio(2.7) == "2.7×" and fmt_ratio(None) == "–" and fmt_ratio(float("inf")) == "∞"
    with pytest.raises(ValueError, match="not a weight-diff report"):
        compare_reports({"x": 1}, r2)


def test_effective_rank_matches_numpy_svd():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(200, 3, generator=g) @ torch.randn(3, 150, generator=g)
    r, lb = effective_rank(low)
    s = np.linalg.svd(low.double().numpy(), compute_uv=False)
    exp = int(np.searchsorted(np.cumsum(s ** 2) / np.sum(s ** 2), 0.9 - 1e-12) + 1)
    assert (r, lb) == (exp, False) and r <= 3
    big = (torch.randn(300, 5, generator=g) * torch.tensor([10.0, 5, 3, 2, 1])) @ torch.randn(5, 280, generator=g)
    r2, lb2 = effective_rank(big, q=16)  # randomized SVD path (min dim > 2q)
    s2 = np.linalg.svd(big.double().numpy(), compute_uv=False)
    exp2 = int(np.searchsorted(np.cumsum(s2 ** 2) / np.sum(s2 ** 2), 0.9 - 1e-12) + 1)
    assert (r2, lb2) == (exp2, False)
    full = torch.randn(300, 280, generator=g)
    r3, lb3 = effective_rank(full, q=8)
    assert lb3 and r3 == 8  # "> 8"
    assert effective_rank(torch.zeros(5, 5)) == (0, False) and effective_rank(torch.ones(4)) == (None, False)


def test_diff_pairs_on_in_memory_pairs_and_rank_option():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(40, 30, generator=g)
    d = torch.randn(40, 2, generator=g) @ torch.randn(2, 30, generator=g) * 1e-3
    pairs = [TensorPair(UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight", a, a + d),
             TensorPair(UNET + "input_blocks.1.1.proj_in.weight", a, delta=d),
             TensorPair(UNET + "out.2.weight", only_in="a", shape=(4, 4))]
    rep = diff_pairs(iter(pairs), arch="sd1", options=DiffOptions(rank=True))
    assert rep["only_in_a"] == [UNET + "out.2.weight"] and rep["overall"]["tensors"] == 2
    ranks = {t["key"]: t["effective_rank"] for t in rep["tensors"]}
    assert set(ranks.values()) <= {1, 2} and rep["rank"]["computed"] == 2


def test_streaming_reader_is_zero_copy_and_releases(tmp_path):
    sd = make_state("sd1", te=False)
    p = save(sd, tmp_path / "a.safetensors")
    with StreamingWeights(p) as r:
        assert r.keys() == list(sd.keys()) or set(r.keys()) == set(sd)
        for k in list(sd)[:20]:
            t = r.get(k)
            assert torch.equal(t, sd[k]) and r.shape(k) == tuple(sd[k].shape)
            r.release(k)
            assert torch.equal(t, sd[k])  # still valid after the pages were dropped


# ---------------------------------------------------------------------------------------------------------------
def test_cli_diff_and_diff_compare(tmp_path, capsys):
    a = make_state("sd1")
    b1, _ = inject(a, r"attn2\.to_[qk]\.weight$", 1e-3)
    b2, _ = inject(a, r"attn2\.to_[qk]\.weight$", 3e-3)
    pa, p1, p2 = (save(x, tmp_path / n) for x, n in ((a, "a.safetensors"), (b1, "b1.safetensors"),
                                                       (b2, "b2.safetensors")))
    j1, j2, png = tmp_path / "r1.json", tmp_path / "r2.json", tmp_path / "plot.png"
    assert cli_main(["diff", str(pa), str(p1), "--json", str(j1), "--plot", str(png), "--rank"]) == 0
    out = capsys.readouterr().out
    assert "By layer type" in out and "attn2.to_q" in out
    rep = json.loads(j1.read_text())
    for f in ("mean_abs", "max_abs", "std", "rel_change", "params"):
        assert f in rep["overall"]
    for sec in ("by_layer_type", "by_block", "by_component"):
        for g in rep[sec].values():
            assert {"mean_abs", "max_abs", "std", "rel_change", "params", "param_share"} <= set(g)
    assert rep["only_in_a"] == [] and rep["only_in_b"] == [] and "rank" in rep
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli_main(["diff", str(pa), str(p2), "--json", str(j2), "-q"]) == 0
    cj = tmp_path / "cmp.json"
    assert cli_main(["diff-compare", str(j1), str(j2), "--json", str(cj), "--plot", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert "×" in out
    ratio = json.loads(cj.read_text())["by_layer_type"]["attn2.to_q"]["mean_abs"]["ratio"]
    assert ratio == pytest.approx(3.0, rel=0.2)
    # user errors: exit code 2 and one clear line, nothing written
    bad = tmp_path / "bad.json"
    sdxl = save(make_state("sdxl", te=False), tmp_path / "xl.safetensors")
    assert cli_main(["diff", str(pa), str(sdxl), "--json", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "sd1" in err and "sdxl" in err and not bad.exists()


def test_full_rank_diff_file_against_its_checkpoint(tmp_path):
    """An ESD-style ``.diff`` file (full-rank ΔW under kohya names) at a strength: ΔW × strength, exactly."""
    from conceptlab.formats.lora_files import save_diff_file

    a = make_state("sd1", dtype=torch.float32)
    g = torch.Generator().manual_seed(9)
    name = "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_v"
    key = UNET + "output_blocks.5.1.transformer_blocks.0.attn2.to_v.weight"
    dw = (torch.randn(6, 5, generator=g) * 1e-3).half()
    path = save_diff_file(tmp_path / "esd.safetensors", {name + ".diff": dw})
    rep = diff_files(save(a, tmp_path / "a.safetensors"), path, lora_strength=2.0)
    assert rep["changed_tensors"] == 1 and rep["by_block"]["OUT05"]["changed_tensors"] == 1
    row = next(t for t in rep["tensors"] if t["key"] == key)
    exp = 2.0 * dw.double().numpy()
    assert row["mean_abs"] == pytest.approx(np.abs(exp).mean(), rel=1e-6)
    assert row["rel_change"] == pytest.approx(np.linalg.norm(exp) / np.linalg.norm(a[key].double().numpy()),
                                              rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------
def _np_tensor_stats(a: np.ndarray, b: np.ndarray, tol: float) -> dict:
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    d = b64 - a64
    return {"params": d.size, "mean_abs": np.abs(d).mean(), "max_abs": np.abs(d).max(), "std": d.std(),
            "rms": np.sqrt((d * d).mean()), "mean": d.mean(), "rel_change": np.linalg.norm(d) / np.linalg.norm(a64),
            "cosine": (a64 @ b64) / (np.linalg.norm(a64) * np.linalg.norm(b64)),
            "frac_changed": np.count_nonzero(np.abs(d) > tol) / d.size}


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 0.0), (torch.bfloat16, 0.0), (torch.float32, 2e-3)])
def test_multi_chunk_tensors_match_numpy_exactly(dtype, tol):
    """Tensors spanning several CHUNKs (plus a ragged tail, some elements unchanged) go through the chunked
    fast path: every statistic must equal numpy's float64 result on the same data, at float32-sum accuracy."""
    from conceptlab.metrics import diff_stats as wd

    g = torch.Generator().manual_seed(11)
    n = 5 * (2 * wd.CHUNK // 5 + 12_345)
    a = (torch.randn(n, generator=g) * 0.05).to(dtype)
    d = torch.randn(n, generator=g) * 1e-3
    d[::7] = 0  # unchanged elements
    b = (a.float() + d).to(dtype).reshape(-1, 5)
    a = a.reshape(-1, 5)
    key = UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    rep = diff_pairs(iter([TensorPair(key, a, b)]), arch="sd1", options=DiffOptions(tolerance=tol))
    exp = _np_tensor_stats(a.float().numpy(), b.float().numpy(), tol)
    row = rep["tensors"][0]
    for k, v in exp.items():
        assert row[k] == pytest.approx(v, rel=1e-6, abs=1e-15), k
    assert_stats(rep["by_layer_type"]["attn2.to_k"], {k: exp[k] for k in ("mean_abs", "max_abs", "std", "rms")},
                 rtol=1e-6)
    # the |Δ| histogram is sampled on big tensors but weighted back to every element
    h = rep["histogram"]
    assert sum(h["counts"]) + h["zeros"] == pytest.approx(n, rel=0.01)
    # delta form (B = A + Δ, e.g. a LoRA) and a partly-NaN copy through the masked float64 path
    rep_d = diff_pairs(iter([TensorPair(key, a, delta=b.float() - a.float())]), arch="sd1")
    assert rep_d["tensors"][0]["mean_abs"] == pytest.approx(exp["mean_abs"], rel=1e-6)
    bn = b.clone()
    bn.view(-1)[wd.CHUNK + 3] = float("nan")
    rep_n = diff_pairs(iter([TensorPair(key, a, bn)]), arch="sd1")
    ok = torch.isfinite(bn.view(-1))
    dn = (bn.view(-1)[ok].double() - a.view(-1)[ok].double()).numpy()
    assert rep_n["tensors"][0]["nonfinite_b"] == 1
    assert rep_n["tensors"][0]["mean_abs"] == pytest.approx(np.abs(dn).sum() / n, rel=1e-9)


def test_multi_chunk_identical_and_below_resolution_counts():
    from conceptlab.metrics import diff_stats as wd

    g = torch.Generator().manual_seed(12)
    n = wd.CHUNK + 999
    a = torch.randn(n, generator=g) * 0.5
    key = UNET + "input_blocks.1.1.proj_in.weight"
    rep = diff_pairs(iter([TensorPair(key, a, a.clone())]), arch="sd1")
    row = rep["tensors"][0]
    assert row["identical"] and row["max_abs"] == 0 and row["cosine"] == pytest.approx(1.0)
    assert rep["histogram"]["zeros"] == n
    # fp32 B with tiny changes vs fp16 storage: exact count of changes lost in fp16, every element
    b = a + torch.randn(n, generator=g) * 1e-5
    s, _ = wd.tensor_sums(a, b, resolution_dtype=torch.float16)
    exp = int(((a != b) & (a.half() == b.half())).sum())
    assert s.below_resolution == exp > 0
