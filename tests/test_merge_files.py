"""Streaming checkpoint merges (training/merge/files.py), per-block weights and the ``conceptlab merge`` CLI
on generated SD1.5-layout key sets with tiny tensors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conceptlab.cli import main as cli_main
from conceptlab.formats import safetensors_io as sio
from conceptlab.formats.ldm_keys import ldm_unet_keys
from conceptlab.training.merge import blocks
from conceptlab.training.merge import files as MF

TE_KEYS = [
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
    "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
    "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
    "cond_stage_model.transformer.text_model.final_layer_norm.weight",
]
VAE_KEYS = ["first_stage_model.encoder.conv_in.weight", "first_stage_model.decoder.conv_out.bias"]
UNET_KEYS = ["model.diffusion_model." + k for k in ldm_unet_keys("sd1")]
POS_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def make_sd(seed: int, fill: float | None = None, dtype=torch.float32, skip=(), extra=()) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k in UNET_KEYS + TE_KEYS + VAE_KEYS + ["alphas_cumprod"] + list(extra):
        if k in skip:
            continue
        shape = (3,) if k.endswith("bias") or "norm" in k else (2, 3)
        sd[k] = torch.full(shape, fill, dtype=dtype) if fill is not None else torch.randn(shape, generator=g).to(dtype)
    sd[POS_IDS] = torch.arange(4, dtype=torch.int64).unsqueeze(0)
    return sd


def write(tmp: Path, name: str, sd: dict) -> Path:
    p = tmp / name
    save_file(sd, str(p))
    return p


def expected_block(key: str) -> str | None:
    """Independent SD1 block id from the LDM key (not via formats.keys)."""
    if not key.startswith("model.diffusion_model."):
        return None
    rest = key[len("model.diffusion_model."):]
    m = re.match(r"input_blocks\.(\d+)\.", rest)
    if m:
        return f"IN{int(m[1]):02d}"
    if rest.startswith("middle_block."):
        return "M00"
    m = re.match(r"output_blocks\.(\d+)\.", rest)
    if m:
        return f"OUT{int(m[1]):02d}"
    if rest.startswith("out."):  # final norm + conv_out: the last OUT block (supermerger, sd-mecha)
        return "OUT11"
    return None


# ------------------------------------------------------------------------------------------------ block weights
def test_parse_block_weights_forms():
    ids = blocks.block_ids("sd1")
    assert len(ids) == 25 and ids[0] == "IN00" and ids[12] == "M00" and ids[-1] == "OUT11"
    assert len(blocks.block_ids("sdxl")) == 19
    vals = [i / 100 for i in range(26)]
    bw = blocks.parse_block_weights(",".join(str(v) for v in vals), "sd1")
    assert bw.values["BASE"] == 0.0 and bw.values["IN00"] == 0.01 and bw.values["OUT11"] == 0.25
    assert bw.as_list() == vals
    bw = blocks.parse_block_weights(" ".join(["1"] * 25), "sd1", alpha=0.3)
    assert bw.values["BASE"] == 0.3 and bw.values["M00"] == 1.0
    bw = blocks.parse_block_weights("IN00=0.2, out05:0.9, BASE=0", "sd1", alpha=0.5)
    assert bw.weight("IN00") == 0.2 and bw.weight("OUT05") == 0.9 and bw.weight(None) == 0.0
    assert bw.weight("IN01") == 0.5
    with pytest.raises(ValueError, match="26 values"):
        blocks.parse_block_weights("0.1,0.2", "sd1")
    with pytest.raises(ValueError, match="20 values"):
        blocks.parse_block_weights(",".join(["0.5"] * 24), "sdxl")  # 26 (an SD1 list) is converted: test_merge_conventions
    with pytest.raises(ValueError, match="unknown block"):
        blocks.parse_block_weights("IN12=1", "sdxl")
    with pytest.raises(ValueError, match="not a number"):
        blocks.parse_block_weights("a,b", "sd1")
    with pytest.warns(UserWarning, match="outside"):
        blocks.parse_block_weights("IN00=1.5", "sd1")


def test_presets():
    ids = blocks.block_ids("sd1")
    flat = blocks.parse_block_weights("flat", "sd1", alpha=0.4)
    assert set(flat.values.values()) == {0.4}
    gin = blocks.parse_block_weights("gradient_in", "sd1", alpha=1.0)
    gout = blocks.parse_block_weights("gradient-out", "sd1", alpha=1.0)
    assert gin.values["IN00"] == 1.0 and gin.values["OUT11"] == 0.0 and gin.values["M00"] == pytest.approx(0.5)
    assert gout.values["IN00"] == 0.0 and gout.values["OUT11"] == 1.0
    assert all(gin.values[ids[i]] >= gin.values[ids[i + 1]] for i in range(len(ids) - 1))
    ino = blocks.parse_block_weights("in_only", "sd1", alpha=0.7)
    assert ino.values["IN05"] == 0.7 and ino.values["M00"] == 0.0 and ino.values["OUT00"] == 0.0
    assert ino.values["BASE"] == 0.0
    outo = blocks.parse_block_weights("out_only", "sdxl", alpha=1.0)
    assert outo.values["OUT08"] == 1.0 and outo.values["IN08"] == 0.0


def test_block_weights_hit_exactly_the_right_keys(tmp_path):
    ids = blocks.block_ids("sd1")
    weights = {b: (i + 1) / 32 for i, b in enumerate(ids)}
    spec = ",".join(["0.875"] + [str(weights[b]) for b in ids])  # BASE first (supermerger order)
    a = write(tmp_path, "a.safetensors", make_sd(0, fill=0.0))
    b = write(tmp_path, "b.safetensors", make_sd(1, fill=1.0))
    out = tmp_path / "out.safetensors"
    rep = MF.merge_checkpoints(a, b, out, block_weights=spec, dtype="fp32", hash_inputs=False)
    sd = load_file(str(out))
    seen = set()
    for k, t in sd.items():
        blk = expected_block(k)
        if k.startswith("model.diffusion_model."):
            exp = weights[blk] if blk else 0.875
            seen.add(blk)
        elif k.startswith("cond_stage_model.") and t.is_floating_point():
            exp = 0.875   # text encoder follows BASE
        else:
            exp = 0.0     # VAE and other keys from A
        assert torch.all(t == exp) if t.is_floating_point() else torch.equal(t, torch.arange(4).unsqueeze(0)), k
    assert seen == set(ids) | {None}
    assert rep.merged == len(UNET_KEYS) + len(TE_KEYS)


# ------------------------------------------------------------------------------------------------ streaming
@pytest.mark.parametrize("method,with_c", [("weighted_sum", False), ("add_difference", True),
                                           ("train_difference", True), ("ties", True), ("ties", False),
                                           ("dare", True), ("slerp", False)])
def test_streaming_equals_in_memory_bit_for_bit(tmp_path, method, with_c):
    sda, sdb, sdc = make_sd(0), make_sd(1), make_sd(2)
    a, b = write(tmp_path, "a.safetensors", sda), write(tmp_path, "b.safetensors", sdb)
    c = write(tmp_path, "c.safetensors", sdc) if with_c else None
    out = tmp_path / "out.safetensors"
    kw = dict(method=method, alpha=0.3, density=0.5, seed=5, dtype="fp16", block_weights="gradient_out")
    MF.merge_checkpoints(a, b, out, c=c, hash_inputs=False, **kw)
    ref, _ = MF.merge_state_dicts(sda, sdb, sdc if with_c else None, **kw)
    got = load_file(str(out))
    assert sorted(got) == sorted(sda)  # A's keys
    for k in ref:
        assert got[k].dtype == ref[k].dtype
        assert torch.equal(got[k], ref[k]), k


def test_weighted_sum_values_components_and_dtype(tmp_path):
    sda, sdb = make_sd(0), make_sd(1)
    a, b = write(tmp_path, "a.safetensors", sda), write(tmp_path, "b.safetensors", sdb)
    out = tmp_path / "o.safetensors"
    MF.merge_checkpoints(a, b, out, alpha=0.25, dtype="bf16", te="a", vae="merge", vae_alpha=1.0)
    got = load_file(str(out))
    k = UNET_KEYS[5]
    assert got[k].dtype == torch.bfloat16
    assert torch.equal(got[k], (0.75 * sda[k] + 0.25 * sdb[k]).to(torch.bfloat16))
    assert torch.equal(got[TE_KEYS[1]], sda[TE_KEYS[1]].to(torch.bfloat16))   # text encoder from A
    assert torch.equal(got[VAE_KEYS[0]], sdb[VAE_KEYS[0]].to(torch.bfloat16))  # VAE merged with weight 1
    assert torch.equal(got[POS_IDS], sda[POS_IDS])                             # int tensor kept
    assert torch.equal(got["alphas_cumprod"], sda["alphas_cumprod"].to(torch.bfloat16))


def test_recipe_metadata_round_trips(tmp_path):
    a = write(tmp_path, "a.safetensors", make_sd(0))
    b = write(tmp_path, "b.safetensors", make_sd(1))
    c = write(tmp_path, "c.safetensors", make_sd(2))
    out = tmp_path / "merged.safetensors"
    rep = MF.merge_checkpoints(a, b, out, c=c, method="dare", alpha=0.6, density=0.3, seed=11,
                               block_weights="in_only", te_alpha=0.2)
    recipe = MF.read_recipe(out)
    assert recipe == rep.recipe
    assert recipe["method"] == "dare" and recipe["alpha"] == 0.6 and recipe["density"] == 0.3
    assert recipe["seed"] == 11 and recipe["te_alpha"] == 0.2 and recipe["dtype"] == "fp16"
    assert recipe["block_weights"]["source"] == "in_only" and len(recipe["block_weights"]["values"]) == 26
    for tag, p in (("A", a), ("B", b), ("C", c)):
        assert recipe["inputs"][tag] == {"name": p.name, "sha256": sio.sha256_file(p)}
    md = sio.read_metadata(out)
    assert md["modelspec.architecture"] == "stable-diffusion-v1" and md["modelspec.title"] == "merged"
    assert json.loads(md["conceptlab.recipe"]) == recipe


def test_keys_missing_on_one_side_are_reported(tmp_path):
    only_a = UNET_KEYS[3]
    only_b = "model.diffusion_model.extra_thing.weight"
    sda = make_sd(0)
    sdb = make_sd(1, skip=(only_a,), extra=(only_b,))
    a, b = write(tmp_path, "a.safetensors", sda), write(tmp_path, "b.safetensors", sdb)
    out = tmp_path / "o.safetensors"
    rep = MF.merge_checkpoints(a, b, out, dtype="fp32", hash_inputs=False)
    got = load_file(str(out))
    assert rep.only_a == [only_a] and rep.only_b == [only_b]
    assert torch.equal(got[only_a], sda[only_a]) and only_b not in got
    assert "only in A" in rep.summary() and "only in B" in rep.summary()
    # add difference with a C that lacks a key: copied from A, reported
    c = write(tmp_path, "c.safetensors", make_sd(2, skip=(UNET_KEYS[7],)))
    rep = MF.merge_checkpoints(a, b, out, c=c, method="add_difference", overwrite=True, dtype="fp32",
                               hash_inputs=False)
    assert rep.missing_c == [UNET_KEYS[7]]
    assert torch.equal(load_file(str(out))[UNET_KEYS[7]], sda[UNET_KEYS[7]])


def test_bad_inputs(tmp_path):
    a = write(tmp_path, "a.safetensors", make_sd(0))
    b = write(tmp_path, "b.safetensors", make_sd(1))
    out = tmp_path / "o.safetensors"
    # different architectures
    xl = {"conditioner.embedders.1.model.ln_final.weight": torch.zeros(3),
          "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 3)}
    x = write(tmp_path, "xl.safetensors", xl)
    with pytest.raises(ValueError, match="sd1 but model B is sdxl"):
        MF.merge_checkpoints(a, x, out)
    # shape mismatch
    sdm = make_sd(1)
    sdm[UNET_KEYS[0]] = torch.zeros(5, 5)
    m = write(tmp_path, "m.safetensors", sdm)
    with pytest.raises(ValueError, match="different tensor shapes.*" + re.escape(UNET_KEYS[0])):
        MF.merge_checkpoints(a, m, out)
    rep = MF.merge_checkpoints(a, m, out, on_shape_mismatch="a", hash_inputs=False)
    assert rep.shape_mismatch == [UNET_KEYS[0]]
    out.unlink()
    # alpha outside [0, 1]: allowed with a warning
    with pytest.warns(UserWarning, match="outside"):
        rep = MF.merge_checkpoints(a, b, out, alpha=1.5, hash_inputs=False)
    assert any("outside" in w for w in rep.warnings)
    # existing output is never overwritten unless asked
    before = out.read_bytes()
    with pytest.raises(FileExistsError):
        MF.merge_checkpoints(a, b, out, alpha=0.5)
    assert out.read_bytes() == before
    MF.merge_checkpoints(a, b, out, alpha=0.5, overwrite=True, hash_inputs=False)
    assert out.read_bytes() != before
    # corrupt / truncated input
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(a.read_bytes()[:1000])
    with pytest.raises(sio.WeightFileError):
        MF.merge_checkpoints(a, bad, tmp_path / "x.safetensors")
    # methods needing C, unknown method, missing file
    with pytest.raises(ValueError, match="third model C"):
        MF.merge_checkpoints(a, b, tmp_path / "x.safetensors", method="add_difference")
    with pytest.raises(ValueError, match="unknown merge method"):
        MF.merge_checkpoints(a, b, tmp_path / "x.safetensors", method="average")
    with pytest.raises(FileNotFoundError):
        MF.merge_checkpoints(a, tmp_path / "nope.safetensors", tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="same file"):
        MF.merge_checkpoints(a, b, a, overwrite=True)
    assert not (tmp_path / "x.safetensors").exists()


def test_write_error_midway_leaves_no_file(tmp_path, monkeypatch):
    a = write(tmp_path, "a.safetensors", make_sd(0))
    b = write(tmp_path, "b.safetensors", make_sd(1))
    out = tmp_path / "o.safetensors"
    calls = {"n": 0}
    real_write = sio.SafetensorsStreamWriter.write

    def failing_write(self, key, tensor):
        calls["n"] += 1
        if calls["n"] == 100:
            raise OSError(28, "No space left on device")
        return real_write(self, key, tensor)

    monkeypatch.setattr(sio.SafetensorsStreamWriter, "write", failing_write)
    with pytest.raises(OSError, match="No space"):
        MF.merge_checkpoints(a, b, out)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]
    # a cancel from the progress callback behaves the same
    monkeypatch.setattr(sio.SafetensorsStreamWriter, "write", real_write)

    def cancel(done, total):
        if done == 50:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        MF.merge_checkpoints(a, b, out, progress=cancel)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]


def test_cli_merge(tmp_path, capsys):
    sda, sdb = make_sd(0), make_sd(1)
    a, b = write(tmp_path, "a.safetensors", sda), write(tmp_path, "b.safetensors", sdb)
    out = tmp_path / "cli.safetensors"
    rc = cli_main(["merge", str(a), str(b), "--alpha", "0.4", "--dtype", "fp32", "-o", str(out), "-q",
                   "--block-weights", "out_only", "--report", str(tmp_path / "r.json")])
    assert rc == 0
    got = load_file(str(out))
    k_out = next(k for k in UNET_KEYS if ".output_blocks." in k)
    k_in = next(k for k in UNET_KEYS if ".input_blocks.1." in k)
    assert torch.allclose(got[k_out], 0.6 * sda[k_out] + 0.4 * sdb[k_out])
    assert torch.equal(got[k_in], sda[k_in])
    assert json.loads((tmp_path / "r.json").read_text())["merged"] > 0
    assert "wrote" in capsys.readouterr().out
    # existing output -> exit 2 with a clear message
    rc = cli_main(["merge", str(a), str(b), "-o", str(out), "-q"])
    assert rc == 2 and "already exists" in capsys.readouterr().err
    rc = cli_main(["merge", str(a), str(b), "-o", str(out), "-q", "--overwrite", "--method", "ties",
                   "--density", "0.5", "--alpha", "1.0"])
    assert rc == 0
    rc = cli_main(["merge", str(a), "-o", str(tmp_path / "x.safetensors")])
    assert rc == 2 and "--lora" in capsys.readouterr().err
    rc = cli_main(["merge", str(a), str(b), "-o", str(tmp_path / "y.safetensors"), "--block-weights", "1,2"])
    assert rc == 2 and "26 values" in capsys.readouterr().err


def test_bake_lora_at_strength(tmp_path, capsys):
    from conceptlab.formats.kohya_keys import kohya_lora_name
    from conceptlab.formats.ldm_keys import ldm_to_diffusers_unet

    sda = make_sd(0)
    a = write(tmp_path, "a.safetensors", sda)
    target = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_q.weight"
    module = ldm_to_diffusers_unet("sd1")[target[len("model.diffusion_model."):]][: -len(".weight")]
    name = kohya_lora_name("unet", module)
    g = torch.Generator().manual_seed(3)
    down, up = torch.randn(1, 3, generator=g), torch.randn(2, 1, generator=g)
    lora = write(tmp_path, "l.safetensors", {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                                              f"{name}.alpha": torch.tensor(0.5)})
    out = tmp_path / "baked.safetensors"
    rep = MF.merge_checkpoints(a, None, out, lora=lora, lora_strength=0.8, dtype="fp32")
    got = load_file(str(out))
    torch.testing.assert_close(got[target], sda[target] + 0.8 * 0.5 * (up @ down))
    other = UNET_KEYS[10]
    assert torch.equal(got[other], sda[other])
    assert rep.lora_applied == 1 and rep.method == "bake_lora"
    recipe = MF.read_recipe(out)
    assert recipe["lora"]["name"] == "l.safetensors" and recipe["lora"]["strength"] == 0.8
    assert recipe["lora"]["sha256"] == sio.sha256_file(lora)
    # CLI: merge two models, then bake the LoRA
    b = write(tmp_path, "b.safetensors", make_sd(1))
    rc = cli_main(["merge", str(a), str(b), "--lora", str(lora), "--strength", "1.0", "-o",
                   str(tmp_path / "mb.safetensors"), "-q", "--dtype", "fp32"])
    assert rc == 0
    got = load_file(str(tmp_path / "mb.safetensors"))
    sdb = load_file(str(b))
    torch.testing.assert_close(got[target], 0.5 * sda[target] + 0.5 * sdb[target] + 0.5 * (up @ down))


# ------------------------------------------------------------------------------------------------ fast path
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_in_place_weighted_sum_is_bit_exact_and_inputs_untouched(tmp_path, dtype):
    """The streaming merge computes the weighted sum in place over A's freshly read buffer; the in-memory
    twin must neither differ by one bit nor mutate the caller's tensors."""
    name = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    sda, sdb = make_sd(0, dtype=dtype), make_sd(1, dtype=dtype)
    keep = {k: v.clone() for k, v in sda.items()}
    a, b = write(tmp_path, "a.safetensors", sda), write(tmp_path, "b.safetensors", sdb)
    out = tmp_path / "o.safetensors"
    kw = dict(alpha=0.37, dtype=name, block_weights="gradient_in", vae="merge")
    MF.merge_checkpoints(a, b, out, **kw)
    ref, rep = MF.merge_state_dicts(sda, sdb, **kw)
    got = load_file(str(out))
    assert rep.merged > 0 and sorted(got) == sorted(ref)
    for k in ref:
        assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]), k
        assert torch.equal(sda[k], keep[k]), k  # inputs of the in-memory merge are not modified
    k = UNET_KEYS[4]  # closed form: lerp in the inputs' dtype with the key's block weight
    w = blocks.parse_block_weights("gradient_in", "sd1", 0.37).weight(expected_block(k))
    assert torch.equal(ref[k], torch.lerp(keep[k], sdb[k], w))


def _stream_write(path: Path, sd: dict, order) -> Path:
    specs = {k: (sd[k].dtype, tuple(sd[k].shape)) for k in order}
    with sio.SafetensorsStreamWriter(path, specs, metadata={"note": "layout test"}, overwrite=True) as w:
        for k in order:
            w.write(k, sd[k])
    return path


@pytest.mark.parametrize("layout", ["same", "reversed", "extra_keys", "no_catch_up"])
def test_input_hashes_are_exact_whatever_the_layout(tmp_path, monkeypatch, layout):
    """Hashes are taken from the buffers as they are read (A's storage order); B stored in another order, or
    with keys the merge skips, must still give the file's exact SHA-256."""
    sda, sdb = make_sd(0), make_sd(1, extra=("model.diffusion_model.extra_a.weight",
                                            "model.diffusion_model.extra_b.weight"))
    a = _stream_write(tmp_path / "a.safetensors", sda, list(sda))
    extra = ["model.diffusion_model.extra_a.weight", "model.diffusion_model.extra_b.weight"]
    order = [k for k in sdb if k not in extra]
    if layout == "reversed":
        order = order[::-1]
    elif layout in ("extra_keys", "no_catch_up"):  # B-only keys between keys the merge reads: gaps in B's reads
        order = order[:10] + extra[:1] + order[10:] + extra[1:]
    if layout == "no_catch_up":  # gaps are then left for the final pass over the rest of the file
        monkeypatch.setattr(MF._PreadSafetensors, "CATCH_UP_MAX", 0)
    b = _stream_write(tmp_path / "b.safetensors", {k: sdb[k] for k in order}, order)
    out = tmp_path / "o.safetensors"
    rep = MF.merge_checkpoints(a, b, out, dtype="fp32")
    for tag, p in (("A", a), ("B", b)):
        assert rep.recipe["inputs"][tag]["sha256"] == sio.sha256_file(p), (layout, tag)
    assert MF.read_recipe(out) == rep.recipe
    ref, _ = MF.merge_state_dicts(sda, {k: sdb[k] for k in order}, dtype="fp32")
    got = load_file(str(out))
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_reader_hash_any_read_pattern(tmp_path):
    sd = make_sd(3, dtype=torch.float16)
    p = write(tmp_path, "x.safetensors", sd)
    with sio.WeightFile(p) as wf:
        keys = wf.keys()
        for pattern in (keys, keys[::-1], keys[::3], [], keys[5:] + keys[:5]):
            r = MF._PreadSafetensors(wf, hash_file=True)
            try:
                for k in pattern:
                    assert torch.equal(r.get(k), sd[k]), k
                assert r.hexdigest() == sio.sha256_file(p)
            finally:
                r.close()


def test_pickle_input_is_hashed_too(tmp_path):
    sda, sdb = make_sd(0), make_sd(1)
    a = write(tmp_path, "a.safetensors", sda)
    b = tmp_path / "b.ckpt"
    torch.save({"state_dict": sdb}, str(b))
    out = tmp_path / "o.safetensors"
    rep = MF.merge_checkpoints(a, b, out, dtype="fp32")
    assert rep.recipe["inputs"]["B"]["sha256"] == sio.sha256_file(b)
    assert rep.recipe["inputs"]["A"]["sha256"] == sio.sha256_file(a)
    ref, _ = MF.merge_state_dicts(sda, sdb, dtype="fp32")
    got = load_file(str(out))
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_stream_writer_round_trips_all_dtypes(tmp_path):
    """SafetensorsStreamWriter writes from the tensors' memory (no byte copy): every dtype, empty tensors and
    non-contiguous inputs must read back equal with the safetensors library."""
    g = torch.Generator().manual_seed(0)
    sd = {"f16": torch.randn(3, 5, generator=g).half(), "bf16": torch.randn(7, generator=g).bfloat16(),
          "f32": torch.randn(2, 2, 2, generator=g), "i64": torch.arange(6).reshape(2, 3),
          "bool": torch.tensor([True, False, True]), "empty": torch.zeros(0, 4), "u8": torch.arange(9, dtype=torch.uint8),
          "strided": torch.randn(4, 6, generator=g).t()}
    p = _stream_write(tmp_path / "w.safetensors", sd, list(sd))
    back = load_file(str(p))
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


@pytest.mark.parametrize("method", ["weighted_sum", "add_difference", "ties"])
def test_pooled_buffers_stay_bit_exact(tmp_path, monkeypatch, method):
    """With every tensor going through the buffer pool (threshold lowered so tiny tensors use it), buffers
    are reused across keys; results must still equal the in-memory merge bit for bit, and the input hashes
    must come from the single pass (no re-reading when B is laid out like A)."""
    monkeypatch.setattr(MF._BufferPool, "MIN_BYTES", 1)
    monkeypatch.setattr(MF._BufferPool, "_ROUND", 64)
    extra: dict[str, int] = {}  # bytes hashed outside the merge's own reads, per file
    real = MF._PreadSafetensors._hash_range

    def counting(self, start, stop, chunk=8 << 20):
        extra[self.wf.path.name] = extra.get(self.wf.path.name, 0) + stop - start
        return real(self, start, stop, chunk)

    monkeypatch.setattr(MF._PreadSafetensors, "_hash_range", counting)
    sda, sdb, sdc = (make_sd(i, dtype=torch.float16) for i in range(3))
    a, b, c = (write(tmp_path, f"{n}.safetensors", sd) for n, sd in (("a", sda), ("b", sdb), ("c", sdc)))
    out = tmp_path / "o.safetensors"
    kw = dict(method=method, alpha=0.6, density=0.5, dtype="fp16", block_weights="gradient_out")
    cc = c if method != "weighted_sum" else None
    rep = MF.merge_checkpoints(a, b, out, c=cc, **kw)
    ref, _ = MF.merge_state_dicts(sda, sdb, sdc if cc else None, **kw)
    got = load_file(str(out))
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    # A is hashed entirely from the merge's reads; B/C only catch up over the keys the merge skips there
    assert extra.get("a.safetensors", 0) == 0
    skipped = sum(t.numel() * t.element_size() for k, t in sdb.items() if k not in set(rep_keys_merged(rep, sda)))
    assert 0 < extra.get("b.safetensors", 0) <= skipped
    for tag, p in (("A", a), ("B", b)) + ((("C", c),) if cc else ()):
        assert rep.recipe["inputs"][tag]["sha256"] == sio.sha256_file(p)


def rep_keys_merged(rep, sda) -> list[str]:
    """Keys a merge combined (A's floating keys minus those the report says came from A)."""
    from_a = set(rep.only_a) | set(rep.shape_mismatch)
    return [k for k, t in sda.items() if t.is_floating_point() and k not in from_a and
            (k.startswith("model.diffusion_model.") or k.startswith("cond_stage_model."))]


def test_torch_thread_count_is_restored(tmp_path):
    a = write(tmp_path, "a.safetensors", make_sd(0))
    b = write(tmp_path, "b.safetensors", make_sd(1))
    before = torch.get_num_threads()
    MF.merge_checkpoints(a, b, tmp_path / "o.safetensors", hash_inputs=False)
    assert torch.get_num_threads() == before
