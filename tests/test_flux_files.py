"""Flux files in every layout (formats/flux_keys.py): checkpoints (BFL, ComfyUI, diffusers files and folders) and
LoRAs (kohya, ComfyUI, diffusers/ai-toolkit/peft, OneTrainer, SimpleTuner) give the same ΔW whatever the layout, in
``conceptlab diff``, merges and LoRA baking. Checked beside diffusers' own converters
(``convert_flux_transformer_checkpoint_to_diffusers``, ``_convert_kohya_flux_lora_to_diffusers``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conceptlab.formats import flux_keys as F
from conceptlab.formats import flux_views as V
from conceptlab.formats.keys import detect_architecture
from conceptlab.formats.lora_files import lora_deltas
from conceptlab.metrics.diff_models import diff_files
from conceptlab.training.merge import files as MF
from conftest import comfyui_path, requires_comfyui

P = F.CANONICAL_PREFIX


# ----------------------------------------------------------------------------------------------------------------
# a tiny Flux: diffusers FluxTransformer2DModel (hidden 64, 2 double + 2 single blocks), converted to every layout
# ----------------------------------------------------------------------------------------------------------------
def tiny_flux_diffusers(seed: int = 0) -> dict[str, torch.Tensor]:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    m = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                               num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=24,
                               guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


@pytest.fixture(scope="module")
def tiny():
    d = tiny_flux_diffusers()
    canon = V.canonical_state_dict(d)
    return d, canon


LAYOUTS = ("bfl", "bfl_model", "comfyui", "comfyui_state", "diffusers", "diffusers_prefixed")


def in_layout(canon: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    bare = {k[len(P):]: v for k, v in canon.items()}
    if layout == "bfl":
        return bare
    if layout == "bfl_model":
        return {"model." + k: v for k, v in bare.items()}
    if layout == "comfyui":
        return dict(canon)
    if layout == "comfyui_state":
        return {"diffusion_model." + k: v for k, v in bare.items()}
    if layout == "diffusers":
        return V.to_diffusers_state_dict(canon)
    if layout == "diffusers_prefixed":
        return V.to_diffusers_state_dict(canon, prefix="transformer.")
    raise AssertionError(layout)


def perturbed(canon: dict, seed: int, scale: float = 0.01) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in canon.items()}


def write(path: Path, sd: dict) -> Path:
    save_file({k: v.contiguous().clone() for k, v in sd.items()}, str(path))
    return path


# ----------------------------------------------------------------------------------------------------------------
# key maps against diffusers' converter and the model class
# ----------------------------------------------------------------------------------------------------------------
def full_width_bfl(n_double=2, n_single=2, cols=2, seed=0) -> dict[str, torch.Tensor]:
    """A BFL state dict with Flux.1's real row counts (diffusers' converter hard-codes 3072 / 12288) and ``cols``
    columns, so the row bookkeeping is checked at full size for little memory."""
    g = torch.Generator().manual_seed(seed)
    h, mlp = 3072, 12288
    sd: dict[str, torch.Tensor] = {}

    def lin(name, rows):
        sd[name + ".weight"] = torch.randn(rows, cols, generator=g)
        sd[name + ".bias"] = torch.randn(rows, generator=g)

    for n in ("img_in", "txt_in"):
        lin(n, h)
    for n in ("time_in", "vector_in", "guidance_in"):
        lin(n + ".in_layer", h)
        lin(n + ".out_layer", h)
    for i in range(n_double):
        b = f"double_blocks.{i}."
        for s in ("img", "txt"):
            lin(b + f"{s}_mod.lin", 6 * h)
            lin(b + f"{s}_attn.qkv", 3 * h)
            lin(b + f"{s}_attn.proj", h)
            lin(b + f"{s}_mlp.0", mlp)
            lin(b + f"{s}_mlp.2", h)
            sd[b + f"{s}_attn.norm.query_norm.scale"] = torch.randn(128, generator=g)
            sd[b + f"{s}_attn.norm.key_norm.scale"] = torch.randn(128, generator=g)
    for i in range(n_single):
        b = f"single_blocks.{i}."
        lin(b + "linear1", 3 * h + mlp)
        lin(b + "linear2", h)
        lin(b + "modulation.lin", 3 * h)
        sd[b + "norm.query_norm.scale"] = torch.randn(128, generator=g)
        sd[b + "norm.key_norm.scale"] = torch.randn(128, generator=g)
    lin("final_layer.linear", 64)
    lin("final_layer.adaLN_modulation.1", 2 * h)
    return sd


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_bfl_to_diffusers_equals_diffusers_converter(prefix):
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    bfl = {prefix + k: v for k, v in full_width_bfl().items()}
    ref = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    ours = V.to_diffusers_state_dict(bfl)
    assert set(ours) == set(ref)
    for k in ref:
        assert torch.equal(ours[k], ref[k]), k
    back = V.canonical_state_dict(ref)  # diffusers -> canonical: the exact inverse
    assert set(back) == {P + k[len(prefix):] for k in bfl}
    for k, v in bfl.items():
        assert torch.equal(back[P + k[len(prefix):]], v), k


def test_tiny_model_roundtrip_and_every_layout(tiny):
    d, canon = tiny
    assert F.infer_dims({k: tuple(v.shape) for k, v in d.items()}) == F.FluxDims(64, 256)
    assert len(canon) == len(d) - 2 * 2 * 2 * 2 - 2 * 2 * 3  # 3 q/k/v (4 with mlp) weights and biases fused
    assert canon[P + "double_blocks.1.img_attn.qkv.weight"].shape == (192, 64)
    assert canon[P + "single_blocks.0.linear1.weight"].shape == (3 * 64 + 256, 64)
    assert torch.equal(canon[P + "single_blocks.0.linear1.weight"][192:], d["single_transformer_blocks.0.proj_mlp.weight"])
    assert torch.equal(canon[P + "double_blocks.0.txt_attn.qkv.bias"][64:128],
                       d["transformer_blocks.0.attn.add_k_proj.bias"])
    back = V.to_diffusers_state_dict(canon)
    assert set(back) == set(d) and all(torch.equal(back[k], d[k]) for k in d)
    for layout in LAYOUTS:
        sd = in_layout(canon, layout)
        assert F.flux_layout(sd) == layout
        assert detect_architecture(sd) == "flux"
        c2 = V.canonical_state_dict(sd)
        assert set(c2) == set(canon) and all(torch.equal(c2[k], canon[k]) for k in canon), layout


def test_view_serves_other_layout_and_refuses_damaged_files(tiny):
    _, canon = tiny
    bfl = in_layout(canon, "bfl")
    diff = in_layout(canon, "diffusers")
    src = V.DictSource(bfl)
    view = V.FluxKeyView(src, keys=list(diff))
    assert view.keys() == list(diff)
    for k in diff:
        assert view.shape(k) == tuple(diff[k].shape) and torch.equal(view.get(k), diff[k]), k
    broken = dict(diff)
    del broken["transformer_blocks.1.attn.to_v.weight"]
    with pytest.raises(ValueError, match=r"transformer_blocks.1.attn.to_v.weight"):
        V.FluxKeyView(V.DictSource(broken))
    dup = dict(bfl)
    dup["diffusion_model.img_in.weight"] = bfl["img_in.weight"]
    with pytest.raises(ValueError, match="same Flux tensor"):
        V.FluxKeyView(V.DictSource(dup))


# ----------------------------------------------------------------------------------------------------------------
# LoRA formats
# ----------------------------------------------------------------------------------------------------------------
def kohya_flux_lora(canon_shapes: dict, rank=4, seed=1, alpha=2.0, blocks=("double_blocks.0", "single_blocks.1"),
                    split_qkv=False) -> dict[str, torch.Tensor]:
    """kohya lora_flux file for the modules of ``blocks`` (names from F.kohya_lora_modules). With ``split_qkv``
    the fused modules are written as kohya's split_qkv state_dict writes them (down concatenated, up block-diagonal)."""
    g = torch.Generator().manual_seed(seed)
    mods = F.kohya_lora_modules(canon_shapes)
    sd = {}
    dims = F.infer_dims(canon_shapes)
    for name, key in mods.items():
        if not any(f"{b}." in key for b in blocks):
            continue
        out, inn = canon_shapes[key]
        sizes = dims.part_sizes(key[len(P):-len(".weight")]) if split_qkv else None
        if sizes:
            downs = [torch.randn(rank, inn, generator=g) for _ in sizes]
            up = torch.zeros(out, rank * len(sizes))
            r0 = 0
            for j, s in enumerate(sizes):
                up[r0:r0 + s, j * rank:(j + 1) * rank] = torch.randn(s, rank, generator=g)
                r0 += s
            sd[name + ".lora_down.weight"] = torch.cat(downs)
            sd[name + ".lora_up.weight"] = up
        else:
            sd[name + ".lora_down.weight"] = torch.randn(rank, inn, generator=g)
            sd[name + ".lora_up.weight"] = torch.randn(out, rank, generator=g)
        sd[name + ".alpha"] = torch.tensor(alpha)
    return sd


def expected_deltas(kohya: dict, strength=1.0) -> dict[str, torch.Tensor]:
    out = {}
    for k in kohya:
        if k.endswith(".lora_down.weight"):
            n = k[: -len(".lora_down.weight")]
            down, up = kohya[k], kohya[n + ".lora_up.weight"]
            path = F.flux_lora_target(n, F.FluxDims(64, 256)).weight_key
            out[path] = strength * float(kohya[n + ".alpha"]) / down.shape[0] * (up @ down)
    return out


def to_split_names(kohya: dict, dims: F.FluxDims, style: str) -> dict[str, torch.Tensor]:
    """Rewrite a kohya Flux LoRA with split q/k/v(/mlp) modules under diffusers names: "peft" (ai-toolkit /
    diffusers: ``transformer.<path>.lora_A/B.weight``, alpha baked in), "onetrainer" (``lora_transformer_<path_>``
    + alpha), "lycoris" (SimpleTuner ``lycoris_<path_>`` + alpha). Like diffusers' converter (non-sparse case):
    the down weight is shared, the up weight is split by rows."""
    out = {}
    for k in kohya:
        if not k.endswith(".lora_down.weight"):
            continue
        n = k[: -len(".lora_down.weight")]
        down, up, alpha = kohya[k], kohya[n + ".lora_up.weight"], float(kohya[n + ".alpha"])
        t = F.flux_lora_target(n, dims)
        bfl = t.weight_key[len(P):-len(".weight")]
        pieces = F.diffusers_pieces(bfl + ".weight", dims)
        for dk, piece in pieces:
            mod = dk[: -len(".weight")]
            u = piece.cut(up)
            if style == "peft":
                out[f"transformer.{mod}.lora_A.weight"] = down * (alpha / down.shape[0])
                out[f"transformer.{mod}.lora_B.weight"] = u
            else:
                pre = "lora_transformer_" if style == "onetrainer" else "lycoris_"
                name = pre + mod.replace(".", "_")
                out[name + ".lora_down.weight"] = down.clone()
                out[name + ".lora_up.weight"] = u.clone()
                out[name + ".alpha"] = torch.tensor(alpha)
    return out


@pytest.fixture(scope="module")
def lora_kohya(tiny):
    _, canon = tiny
    return kohya_flux_lora({k: tuple(v.shape) for k, v in canon.items()})


def _assert_same_deltas(got, want, atol=1e-5):
    got = dict(got)
    assert set(got) == set(want), (sorted(set(got) ^ set(want))[:5])
    for k in want:
        assert torch.allclose(got[k], want[k], atol=atol, rtol=1e-5), k


@pytest.mark.parametrize("fmt", ["kohya", "comfyui", "bfl_bare", "peft", "onetrainer", "lycoris"])
def test_lora_formats_decode_to_same_canonical_delta(lora_kohya, fmt):
    want = expected_deltas(lora_kohya)
    dims = F.FluxDims(64, 256)
    if fmt == "kohya":
        sd = lora_kohya
    elif fmt in ("comfyui", "bfl_bare"):
        pre = "diffusion_model." if fmt == "comfyui" else ""
        sd = {}
        for k, v in lora_kohya.items():
            n, _, suf = k.partition(".")
            path = F.flux_lora_target(n, dims).weight_key[len(P):-len(".weight")]
            sd[f"{pre}{path}.{suf}"] = v
    else:
        sd = to_split_names(lora_kohya, dims, fmt)
    assert detect_architecture(sd) == "flux"
    res = lora_deltas(sd)
    assert res.arch == "flux" and not res.skipped, res.skipped
    _assert_same_deltas(res.deltas, want)


def test_kohya_split_qkv_file_and_comfy_linear1_qkv(tiny):
    _, canon = tiny
    shapes = {k: tuple(v.shape) for k, v in canon.items()}
    sd = kohya_flux_lora(shapes, split_qkv=True)
    want = expected_deltas(sd)
    _assert_same_deltas(lora_deltas(sd).deltas, want)
    # block-diagonal up: ΔW of each part only uses its own rank slice (kohya lora_flux.py state_dict)
    w = want[P + "double_blocks.0.img_attn.qkv.weight"]
    up = sd["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"][:64, :4]
    down = sd["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"][:4]
    assert torch.allclose(w[:64], 2.0 / 12 * up @ down, atol=1e-6)
    # ComfyUI's "linear1_qkv" name: the q/k/v rows of linear1 only
    g = torch.Generator().manual_seed(3)
    d, u = torch.randn(2, 64, generator=g), torch.randn(192, 2, generator=g)
    res = lora_deltas({"single_blocks.1.linear1_qkv.lora_down.weight": d,
                       "single_blocks.1.linear1_qkv.lora_up.weight": u,
                       "double_blocks.0.img_attn.proj.lora_down.weight": torch.zeros(2, 64),
                       "double_blocks.0.img_attn.proj.lora_up.weight": torch.zeros(64, 2)})
    full = res.deltas[P + "single_blocks.1.linear1.weight"]
    assert full.shape == (448, 64) and torch.allclose(full[:192], u @ d) and not full[192:].any()


def test_kohya_lora_matches_diffusers_kohya_converter():
    """diffusers' _convert_kohya_flux_lora_to_diffusers (full Flux.1 widths: it hard-codes 3072/12288) turns a kohya
    file into peft names with alpha baked in; our decoding of both files gives the same ΔW."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    shapes = {P + k: tuple(v.shape) for k, v in full_width_bfl(n_double=1, n_single=1).items()}
    for split in (False, True):
        kohya = kohya_flux_lora(shapes, rank=3, blocks=("double_blocks.0", "single_blocks.0"), split_qkv=split)
        conv = _convert_kohya_flux_lora_to_diffusers({k: v.clone() for k, v in kohya.items()})
        assert any(".attn.to_q.lora_A" in k for k in conv) and any("proj_mlp.lora_B" in k for k in conv)
        a, b = lora_deltas(kohya), lora_deltas(conv)
        assert not a.skipped and not b.skipped
        assert set(a.deltas) == set(b.deltas)
        for k in a.deltas:
            assert torch.allclose(a.deltas[k], b.deltas[k], atol=1e-4, rtol=1e-4), (split, k)


def test_diffusers_norm_out_lora_is_swapped_back():
    g = torch.Generator().manual_seed(0)
    d, u = torch.randn(2, 64, generator=g), torch.randn(128, 2, generator=g)
    res = lora_deltas({"transformer.norm_out.linear.lora_A.weight": d, "transformer.norm_out.linear.lora_B.weight": u,
                       "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": d,
                       "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": u[:64]})
    dw = res.deltas[P + "final_layer.adaLN_modulation.1.weight"]
    full = u @ d
    assert torch.allclose(dw[:64], full[64:]) and torch.allclose(dw[64:], full[:64])


# ----------------------------------------------------------------------------------------------------------------
# diff / merge / bake across layouts
# ----------------------------------------------------------------------------------------------------------------
def _overall(rep):
    o = rep["overall"]
    return {k: o[k] for k in ("mean_abs", "max_abs", "rms") if k in o}, rep["changed_tensors"]


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory):
    _, canon = tiny
    tmp = tmp_path_factory.mktemp("flux")
    b = perturbed(canon, 5)
    out = {}
    for lay in ("bfl", "comfyui", "diffusers", "diffusers_prefixed", "comfyui_state"):
        out[("A", lay)] = write(tmp / f"a_{lay}.safetensors", in_layout(canon, lay))
        out[("B", lay)] = write(tmp / f"b_{lay}.safetensors", in_layout(b, lay))
    out["canon_b"] = b
    out["tmp"] = tmp
    return out


PAIRS = [("bfl", "bfl"), ("bfl", "diffusers"), ("diffusers", "bfl"), ("comfyui", "diffusers_prefixed"),
         ("diffusers_prefixed", "comfyui_state"), ("comfyui_state", "bfl")]


def test_diff_checkpoints_same_whatever_the_layouts(files):
    ref = _overall(diff_files(files[("A", "bfl")], files[("B", "bfl")]))
    assert ref[1] > 0
    for la, lb in PAIRS[1:]:
        rep = diff_files(files[("A", la)], files[("B", lb)])
        got = _overall(rep)
        assert got[1] == ref[1], (la, lb)
        for k, v in ref[0].items():
            assert got[0][k] == pytest.approx(v, rel=1e-6), (la, lb, k)
        assert rep["arch"] == "flux" and not rep["only_in_a"] and not rep["only_in_b"]
        assert set(rep["by_block"]) >= {"D00", "D01", "S00", "S01", "img_in", "final_layer"}


@pytest.mark.parametrize("lora_fmt", ["kohya", "peft", "onetrainer"])
def test_diff_checkpoint_plus_lora_any_layout(files, lora_kohya, lora_fmt):
    """The issue's case: a BFL checkpoint with a kohya (or ai-toolkit / OneTrainer) LoRA, and the same for
    ComfyUI and diffusers checkpoints: same numbers, every LoRA target found."""
    dims = F.FluxDims(64, 256)
    lora = lora_kohya if lora_fmt == "kohya" else to_split_names(lora_kohya, dims, lora_fmt)
    lp = write(files["tmp"] / f"lora_{lora_fmt}.safetensors", lora)
    ref = None
    for lay in ("bfl", "comfyui", "diffusers"):
        rep = diff_files(files[("A", lay)], lp)
        assert rep["mode"] == "checkpoint+lora" and not rep["only_in_b"] and not rep["skipped_lora_keys"]
        got = _overall(rep)
        if ref is None:
            ref = got
            assert got[1] == len(expected_deltas(lora_kohya))
        assert got[1] == ref[1]
        for k, v in ref[0].items():
            assert got[0][k] == pytest.approx(v, rel=1e-5), (lay, k)


@pytest.mark.parametrize("la,lb", [("bfl", "diffusers"), ("diffusers", "comfyui"), ("comfyui_state", "bfl")])
def test_merge_across_layouts_keeps_a_layout(files, tiny, la, lb):
    _, canon = tiny
    out = files["tmp"] / f"m_{la}_{lb}.safetensors"
    rep = MF.merge_checkpoints(files[("A", la)], files[("B", lb)], out, alpha=0.25, dtype="fp32", overwrite=True)
    assert rep.arch == "flux" and rep.merged == len(in_layout(canon, la)) and not rep.only_a
    merged = load_file(str(out))
    assert set(merged) == set(in_layout(canon, la))
    got = V.canonical_state_dict(merged)
    b = files["canon_b"]
    for k in canon:
        assert torch.allclose(got[k], torch.lerp(canon[k], b[k], 0.25), atol=1e-6), k


def test_merge_block_weights_modelmergeflux1_names(files, tiny):
    _, canon = tiny
    out = files["tmp"] / "blocks.safetensors"
    MF.merge_checkpoints(files[("A", "diffusers")], files[("B", "bfl")], out, alpha=0.3, dtype="fp32",
                         block_weights="double_blocks.1.=1, single_blocks.0=0.5, img_in.=0, D00=0.9", overwrite=True)
    got = V.canonical_state_dict(load_file(str(out)))
    b = files["canon_b"]
    named = {"double_blocks.1.": 1.0, "single_blocks.0.": 0.5, "img_in.": 0.0, "double_blocks.0.": 0.9}
    for k in canon:
        rel = k[len(P):]
        w = next((v for n, v in named.items() if rel.startswith(n)), 0.3)  # blocks not named get alpha
        assert torch.allclose(got[k], torch.lerp(canon[k], b[k], w), atol=1e-6), k


@pytest.mark.parametrize("lay", ["bfl", "diffusers", "comfyui"])
@pytest.mark.parametrize("lora_fmt", ["kohya", "peft"])
def test_bake_lora_into_any_layout(files, tiny, lora_kohya, lay, lora_fmt):
    _, canon = tiny
    dims = F.FluxDims(64, 256)
    lora = lora_kohya if lora_fmt == "kohya" else to_split_names(lora_kohya, dims, lora_fmt)
    lp = write(files["tmp"] / f"bake_{lora_fmt}.safetensors", lora)
    out = files["tmp"] / f"baked_{lay}_{lora_fmt}.safetensors"
    rep = MF.merge_checkpoints(files[("A", lay)], None, out, lora=lp, lora_strength=0.5, dtype="fp32",
                               overwrite=True)
    assert not rep.lora_unmatched and not rep.lora_skipped
    baked = load_file(str(out))
    assert set(baked) == set(in_layout(canon, lay))
    got = V.canonical_state_dict(baked)
    want = expected_deltas(lora_kohya, strength=0.5)
    for k in canon:
        exp = canon[k] + want[k] if k in want else canon[k]
        assert torch.allclose(got[k], exp, atol=1e-5), k


def test_diffusers_folder_sharded_reads_like_a_file(files, tiny, tmp_path):
    """A diffusers transformer/ folder saved in shards (index json) diffs against a BFL file: identical."""
    from diffusers import FluxTransformer2DModel

    d, canon = tiny
    m = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                               num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=24,
                               guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    m.load_state_dict(d)
    m.save_pretrained(tmp_path / "pipe" / "transformer", max_shard_size="200KB")
    assert len(list((tmp_path / "pipe" / "transformer").glob("*.safetensors"))) > 1
    rep = diff_files(tmp_path / "pipe", files[("A", "bfl")])
    assert rep["changed_tensors"] == 0 and rep["identical_tensors"] == len(canon)
    rep2 = diff_files(tmp_path / "pipe" / "transformer", files[("B", "comfyui")])
    ref = diff_files(files[("A", "bfl")], files[("B", "comfyui")])
    assert _overall(rep2) == _overall(ref)
    out = tmp_path / "merged.safetensors"
    MF.merge_checkpoints(files[("A", "bfl")], tmp_path / "pipe", out, alpha=0.5, dtype="fp32")
    merged = load_file(str(out))
    assert all(torch.allclose(merged[k[len(P):]], canon[k]) for k in canon)


def test_fp8_bfl_file_against_fp8_diffusers_file(tiny, tmp_path):
    """flux1-dev-fp8 style files (float8_e4m3fn): the split/fused layouts still line up bit for bit."""
    d, canon = tiny
    a = write(tmp_path / "a8.safetensors", {k[len(P):]: v.to(torch.float8_e4m3fn) for k, v in canon.items()})
    b = write(tmp_path / "b8.safetensors", {k: v.to(torch.float8_e4m3fn) for k, v in d.items()})
    rep = diff_files(a, b)
    assert rep["changed_tensors"] == 0 and rep["identical_tensors"] == len(canon)


# ----------------------------------------------------------------------------------------------------------------
# blocks and kohya module names
# ----------------------------------------------------------------------------------------------------------------
def test_merge_blocks_follow_comfyui_prefix_rule():
    assert len(F.MERGE_BLOCKS) == 63 and F.MERGE_BLOCKS[:2] == ["img_in.", "time_in."]
    assert F.merge_block("transformer_blocks.10.attn.to_q.weight") == "double_blocks.10."
    assert F.merge_block("double_blocks.1.img_mod.lin.bias") == "double_blocks.1."
    assert F.merge_block("time_text_embed.guidance_embedder.linear_2.bias") == "guidance_in"
    assert F.merge_block("norm_out.linear.weight") == "final_layer."
    assert F.merge_block("text_encoders.clip_l.transformer.text_model.final_layer_norm.weight") is None
    assert F.block_id("transformer.single_transformer_blocks.7.proj_mlp.weight") == "S07"
    assert F.merge_name_to_block_id("single_blocks.37.") == "S37"
    with pytest.raises(ValueError, match="not a Flux block"):
        F.merge_name_to_block_id("IN04")


def test_kohya_lora_modules_names_and_selection(tiny):
    d, canon = tiny
    mods = F.kohya_lora_modules(d)  # any layout: diffusers names in, kohya BFL names out
    assert mods == F.kohya_lora_modules(canon)
    assert len(mods) == 2 * 10 + 2 * 3
    assert mods["lora_unet_double_blocks_0_img_attn_qkv"] == P + "double_blocks.0.img_attn.qkv.weight"
    assert mods["lora_unet_single_blocks_1_modulation_lin"] == P + "single_blocks.1.modulation.lin.weight"
    assert all(v in canon for v in mods.values())
    assert all(re.fullmatch(r"lora_unet_(double|single)_blocks_\d+_[a-z0-9_]+", n) for n in mods)
    only = F.kohya_lora_modules(canon, train_blocks="single", train_single_block_indices="1")
    assert sorted(only) == ["lora_unet_single_blocks_1_linear1", "lora_unet_single_blocks_1_linear2",
                            "lora_unet_single_blocks_1_modulation_lin"]
    no_mod = F.kohya_lora_modules(canon, train_blocks="double", type_dims={"img_mod": 0, "txt_mod": 0})
    assert len(no_mod) == 2 * 8 and not any("_mod_" in n for n in no_mod)
    with pytest.raises(ValueError, match="train_blocks"):
        F.kohya_lora_modules(canon, train_blocks="both")
    with pytest.raises(ValueError, match="outside"):
        F.kohya_lora_modules(canon, train_double_block_indices="0-5")


def test_unknown_flux_lora_module_is_reported_not_dropped():
    res = lora_deltas({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.ones(2, 64),
                       "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.ones(192, 2),
                       "lora_unet_double_blocks_0_img_attn_banana.lora_down.weight": torch.ones(2, 64),
                       "lora_unet_double_blocks_0_img_attn_banana.lora_up.weight": torch.ones(64, 2)})
    assert "lora_unet_double_blocks_0_img_attn_banana" in res.skipped
    assert list(res.deltas) == [P + "double_blocks.0.img_attn.qkv.weight"]


# ----------------------------------------------------------------------------------------------------------------
# real-ComfyUI tier: ComfyUI's own Flux key maps and LoRA loader
# ----------------------------------------------------------------------------------------------------------------
def _comfy_python():
    import os
    import subprocess
    import sys

    for c in (os.environ.get("COMFYUI_PYTHON"), str(comfyui_path() / ".venv" / "bin" / "python"), sys.executable):
        if c and Path(c).exists():
            code = (f"import sys; sys.path.insert(0, {str(comfyui_path())!r}); sys.argv=['x','--cpu']; "
                    "import comfy.options; comfy.options.enable_args_parsing(); import comfy.lora, comfy.model_base")
            if subprocess.run([c, "-c", code], capture_output=True, timeout=300).returncode == 0:
                return c
    pytest.skip("no Python interpreter here can import ComfyUI (set COMFYUI_PYTHON)")


@requires_comfyui
def test_comfyui_flux_key_maps_and_lora_loading(tiny, lora_kohya, tmp_path):
    """ComfyUI's flux_to_diffusers equals our table; its Flux model has exactly our canonical keys and kohya's
    module set; every LoRA format loads with zero "lora key not loaded" and ComfyUI's ΔW equals ours."""
    import json
    import subprocess

    py = _comfy_python()
    _, canon = tiny
    dims = F.FluxDims(64, 256)
    loras = {"kohya": lora_kohya, "peft": to_split_names(lora_kohya, dims, "peft"),
             "onetrainer": to_split_names(lora_kohya, dims, "onetrainer"),
             "lycoris": to_split_names(lora_kohya, dims, "lycoris")}
    files = {n: str(write(tmp_path / f"{n}.safetensors", sd)) for n, sd in loras.items()}
    req = {"comfyui": str(comfyui_path()), "unet_config": {"depth": 2, "depth_single_blocks": 2, "hidden_size": 64},
           "loras": files, "deltas_out": str(tmp_path / "comfy_")}
    (tmp_path / "req.json").write_text(json.dumps(req))
    probe = Path(__file__).with_name("flux_comfy_probe.py")
    proc = subprocess.run([py, str(probe), str(tmp_path / "req.json"), str(tmp_path / "res.json")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "res.json").read_text())
    # 1. the diffusers -> BFL map
    ours = {}
    for ck in canon:
        for dk, piece in F.diffusers_pieces(ck[len(P):], dims):
            ours[dk] = [ck[len(P):], piece.rows[0] if piece.rows else None,
                        piece.rows[1] - piece.rows[0] if piece.rows else None, piece.swap]
    comfy = {k: v for k, v in res["flux_to_diffusers"].items() if "controlnet" not in k}
    assert comfy == ours
    # 2. the model's keys and shapes are our canonical ones; kohya's module names cover its block Linears
    assert {"model." + k: tuple(v) for k, v in res["model_keys"].items()} == {k: tuple(v.shape) for k, v in canon.items()}
    block_linears = {"lora_unet_" + n.replace(".", "_") for n in res["linears"]
                     if re.match(r"(double|single)_blocks\.\d+\.", n)}
    assert set(F.kohya_lora_modules(canon)) == block_linears
    # 3. every LoRA spelling loads fully in ComfyUI and gives our ΔW
    for name in files:
        r = res["loras"][name]
        assert r["not_loaded"] == [], (name, r["not_loaded"][:3])
        comfy_d = load_file(str(tmp_path / f"comfy_{name}.safetensors"))
        mine = lora_deltas(files[name]).deltas
        assert {"model." + k for k in comfy_d} == set(mine), name
        for k, v in comfy_d.items():
            torch.testing.assert_close(v, mine["model." + k], rtol=1e-4, atol=1e-5)


def test_flux_text_encoder_lora_modules_target_comfyui_checkpoint_keys():
    """kohya lora_flux names CLIP-L lora_te1_ and T5-XXL lora_te3_ (diffusers: text_encoder. / text_encoder_2.);
    in a ComfyUI Flux checkpoint they live under text_encoders.clip_l / text_encoders.t5xxl."""
    one = (torch.ones(2, 8), torch.ones(8, 2))
    sd = {}
    for name in ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                 "lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_0", "lora_unet_single_blocks_0_linear2",
                 "lora_te2_encoder_block_1_layer_0_SelfAttention_k"):  # lora_te2_: OneTrainer's T5 prefix
        sd[name + ".lora_down.weight"], sd[name + ".lora_up.weight"] = one
    sd["text_encoder_2.encoder.block.3.layer.0.SelfAttention.o.lora_A.weight"] = one[0]
    sd["text_encoder_2.encoder.block.3.layer.0.SelfAttention.o.lora_B.weight"] = one[1]
    sd["lora_te3_encoder_block_0_layer_0_SelfAttention_relative_attention_bias.lora_down.weight"] = one[0]
    sd["lora_te3_encoder_block_0_layer_0_SelfAttention_relative_attention_bias.lora_up.weight"] = one[1]
    res = lora_deltas(sd)
    assert set(res.deltas) == {
        "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "text_encoders.t5xxl.transformer.encoder.block.0.layer.1.DenseReluDense.wi_0.weight",
        "text_encoders.t5xxl.transformer.encoder.block.3.layer.0.SelfAttention.o.weight",
        "text_encoders.t5xxl.transformer.encoder.block.1.layer.0.SelfAttention.k.weight",
        P + "single_blocks.0.linear2.weight"}
    assert list(res.skipped) == ["lora_te3_encoder_block_0_layer_0_SelfAttention_relative_attention_bias"]


def test_cli_diff_bfl_checkpoint_with_kohya_lora(files, lora_kohya, tmp_path):
    """The issue's report: `conceptlab diff` on a BFL checkpoint and a kohya Flux LoRA."""
    import json

    from conceptlab.cli import main as cli_main

    lp = write(tmp_path / "k.safetensors", lora_kohya)
    out = tmp_path / "r.json"
    assert cli_main(["diff", str(files[("A", "bfl")]), str(lp), "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["arch"] == "flux" and rep["changed_tensors"] == len(expected_deltas(lora_kohya))
    assert rep["only_in_b"] == [] and rep["skipped_lora_keys"] == {}


@pytest.mark.skipif(not __import__("os").environ.get("KOHYA_SD_SCRIPTS"),
                    reason="kohya tier: set KOHYA_SD_SCRIPTS to a kohya-ss/sd-scripts checkout to run")
def test_kohya_lora_modules_equal_kohya_create_network():
    """kohya's own networks/lora_flux.py create_network on its own Flux class (library/flux_models.py) at a tiny
    width names exactly the modules F.kohya_lora_modules gives, with train_blocks / block indices / type dims."""
    # imported before any stub, so diffusers' / transformers' package probes see the real environment
    from diffusers import AutoencoderKL  # noqa: F401
    from transformers import CLIPTextModel  # noqa: F401

    from kohya_import import import_kohya

    flux_models, lora_flux = import_kohya("library.flux_models", "networks.lora_flux")
    params = flux_models.FluxParams(in_channels=16, vec_in_dim=24, context_in_dim=32, hidden_size=64, mlp_ratio=4.0,
                                    num_heads=4, depth=2, depth_single_blocks=2, axes_dim=[4, 6, 6], theta=10000,
                                    qkv_bias=True, guidance_embed=True)
    flux = flux_models.Flux(params)
    keys = [P + k for k in flux.state_dict()]
    for kw, ours in (({}, {}), ({"train_blocks": "single", "train_single_block_indices": "1"},
                               {"train_blocks": "single", "train_single_block_indices": "1"}),
                     ({"img_mod_dim": "0", "txt_mod_dim": "0", "single_mod_dim": "0"},
                      {"type_dims": {"img_mod": 0, "txt_mod": 0, "single_mod": 0}})):
        net = lora_flux.create_network(1.0, 4, 1.0, None, [None, None], flux, **kw)
        assert sorted(lo.lora_name for lo in net.unet_loras) == sorted(F.kohya_lora_modules(keys, **ours)), kw
