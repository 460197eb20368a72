"""Merge nodes: V1 contracts (no ComfyUI needed) and, in the real-ComfyUI tier, in-graph merges against
ComfyUI's own ModelMergeSimple, TIES deltas from patched weights, the sweep grid, and a merged file saved by
the file node loading with CheckpointLoaderSimple."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from conftest import requires_comfyui

from conceptlab.nodes import merge as N


# ------------------------------------------------------------------------------------------------ contracts
def test_node_contracts():
    assert set(N.NODE_CLASS_MAPPINGS) == {"ConceptLabMergeModels", "ConceptLabMergeCheckpointFiles",
                                          "ConceptLabMergeSweep"}
    for node_id, cls in N.NODE_CLASS_MAPPINGS.items():
        assert node_id.startswith("ConceptLab")
        assert cls.CATEGORY == "Concept Lab/Merge"
        assert cls.DESCRIPTION and "weight of B" in cls.DESCRIPTION
        assert "weight of B" in N.NODE_DISPLAY_NAME_MAPPINGS[node_id]
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES)
        assert callable(getattr(cls, cls.FUNCTION))
        spec = cls.INPUT_TYPES()
        for group in spec.values():
            for name, (typ, *opts) in group.items():
                assert opts and opts[0].get("tooltip"), f"{node_id}.{name} has no tooltip"
        for name in ("alpha", "ratios"):
            for group in spec.values():
                if name in group:
                    assert "ratio = 1 − α" in group[name][1]["tooltip"]


def test_parse_ratios():
    assert N._parse_ratios("0, 0.25, 0.5,0.75 ,1") == [0.0, 0.25, 0.5, 0.75, 1.0]
    with pytest.raises(ValueError, match="not a number"):
        N._parse_ratios("0, x")
    with pytest.raises(ValueError, match="no ratios"):
        N._parse_ratios(" , ")


# ------------------------------------------------------------------------------------------------ real ComfyUI
@pytest.fixture(scope="module")
def comfy():
    from e2e.comfy_env import comfy_inprocess

    comfy_inprocess()
    import comfy.model_patcher  # noqa: F401
    import comfy.supported_models  # noqa: F401

    return sys.modules["comfy"]


TINY_UNET = {"image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1],
             "channel_mult": [1, 2], "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
             "transformer_depth_middle": 1, "context_dim": 64, "use_spatial_transformer": True, "legacy": False,
             "use_linear_in_transformer": False, "adm_in_channels": None, "use_temporal_attention": False,
             "use_temporal_resblock": False, "use_checkpoint": False}


def tiny_model(comfy, seed):
    model = comfy.supported_models.SD15(TINY_UNET).get_model({})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def materialise(patcher) -> dict:
    """Weights of the UNet as ComfyUI computes them at load time (patch_model), then unpatched."""
    patcher.patch_model(device_to=torch.device("cpu"), force_patch_weights=True)
    try:
        return {k: v.detach().clone() for k, v in patcher.model.state_dict().items() if k.startswith("diffusion_model.")}
    finally:
        patcher.unpatch_model(device_to=torch.device("cpu"))


def with_lora_like_patch(comfy, patcher, seed):
    """A clone carrying a diff patch on one attention weight (stands in for a LoRA applied upstream)."""
    m = patcher.clone()
    key = next(k for k in m.model.state_dict() if k.endswith("attn2.to_q.weight"))
    g = torch.Generator().manual_seed(seed)
    shape = m.model.state_dict()[key].shape
    m.add_patches({key: ("diff", (torch.randn(shape, generator=g),))}, 0.5, 1.0)
    return m, key


@requires_comfyui
def test_in_graph_weighted_sum_equals_model_merge_simple(comfy):
    merging = importlib.import_module("comfy_extras.nodes_model_merging")
    a0, b = tiny_model(comfy, 1), tiny_model(comfy, 2)
    a, patched_key = with_lora_like_patch(comfy, a0, 3)
    n_patches_before = {k: len(v) for k, v in a.patches.items()}
    before = materialise(a)
    alpha = 0.3
    with torch.inference_mode():
        ours, _, report = N.MergeModels().merge(a, b, "weighted_sum", alpha, "", 0.2, 0)
        ref = merging.ModelMergeSimple().merge(a, b, 1.0 - alpha)[0]
    got, exp = materialise(ours), materialise(ref)
    assert got.keys() == exp.keys()
    for k in got:
        torch.testing.assert_close(got[k], exp[k], rtol=1e-5, atol=1e-6)
    # the upstream patch is part of A: merged = 0.7·(A + 0.5·d) + 0.3·B on that key
    wb = materialise(b)[patched_key]
    torch.testing.assert_close(got[patched_key], 0.7 * before[patched_key] + 0.3 * wb, rtol=1e-5, atol=1e-6)
    # inputs are not mutated
    assert {k: len(v) for k, v in a.patches.items()} == n_patches_before
    after = materialise(a)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert "weight of B" in report


@requires_comfyui
def test_in_graph_block_weights_and_ties_from_patched_weights(comfy):
    from conceptlab.training.merge.methods import merge_tensor

    a0, b, c = tiny_model(comfy, 1), tiny_model(comfy, 2), tiny_model(comfy, 4)
    a, patched_key = with_lora_like_patch(comfy, a0, 3)
    wa, wb, wc = materialise(a), materialise(b), materialise(c)
    with torch.inference_mode():
        ours = N.MergeModels().merge(a, b, "ties", 0.6, "", 0.3, 0, model_c=c)[0]
    got = materialise(ours)
    for k in (patched_key, "diffusion_model.input_blocks.0.0.weight", "diffusion_model.out.2.weight"):
        exp = merge_tensor("ties", k, wa[k], wb[k], wc[k], 0.6, density=0.3)
        torch.testing.assert_close(got[k], exp, rtol=1e-5, atol=1e-5)
    # per-block weighted sum: IN01 from B, everything else from A
    with torch.inference_mode():
        blk = N.MergeModels().merge(a, b, "weighted_sum", 0.0, "IN01=1, BASE=0", 0.2, 0)[0]
    got = materialise(blk)
    for k in got:
        src = wb if k.startswith("diffusion_model.input_blocks.1.") else wa
        torch.testing.assert_close(got[k], src[k], rtol=1e-6, atol=1e-6)
    # DARE in-graph equals the file merge's per-key computation (same key-name seeds)
    with torch.inference_mode():
        dm = N.MergeModels().merge(a, b, "dare", 0.5, "", 0.5, 9)[0]
    got = materialise(dm)
    k = "diffusion_model.middle_block.1.proj_in.weight"
    exp = merge_tensor("dare", "model.diffusion_model.middle_block.1.proj_in.weight", wa[k], wb[k], None, 0.5,
                       density=0.5, seed=9)
    torch.testing.assert_close(got[k], exp, rtol=1e-5, atol=1e-5)


@requires_comfyui
def test_in_graph_errors(comfy):
    a, b = tiny_model(comfy, 1), tiny_model(comfy, 2)
    with pytest.raises(ValueError, match="needs model_c"):
        N.MergeModels().merge(a, b, "add_difference", 0.5, "", 0.2, 0)
    cfg = dict(TINY_UNET, model_channels=64)
    other = comfy.supported_models.SD15(cfg).get_model({})
    other_p = comfy.model_patcher.ModelPatcher(other, load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))
    with pytest.raises(ValueError, match="different shapes"):
        N.MergeModels().merge(a, other_p, "weighted_sum", 0.5, "", 0.2, 0)


@requires_comfyui
def test_merged_file_loads_with_checkpoint_loader(comfy, tmp_path):
    """A full-size SD1.5-layout file (zeros, fp16) merged by the file node loads with CheckpointLoaderSimple."""
    import folder_paths

    from conceptlab.formats.safetensors_io import SafetensorsStreamWriter

    bench_file = Path(N.__file__).resolve().parents[1] / "benchmarks" / "merge.py"
    spec = importlib.util.spec_from_file_location("merge_bench", str(bench_file))
    mb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mb)
    shapes = mb.sd15_shapes()
    models = tmp_path / "models"
    (models / "checkpoints").mkdir(parents=True)
    out_dir = tmp_path / "output"
    out_dir.mkdir()
    src = models / "checkpoints" / "a.safetensors"
    with SafetensorsStreamWriter(src, {k: (torch.float16, s) for k, s in shapes.items()}) as w:
        for k, s in shapes.items():
            w.write(k, torch.full(s, 0.01, dtype=torch.float16))
    old_out = folder_paths.get_output_directory()
    old_ckpt = folder_paths.folder_names_and_paths["checkpoints"]
    folder_paths.set_output_directory(str(out_dir))
    folder_paths.folder_names_and_paths["checkpoints"] = ([str(models / "checkpoints")], old_ckpt[1])
    try:
        res = N.MergeCheckpointFiles().merge("a.safetensors", "a.safetensors", "weighted_sum", 0.5, "", 0.2, 0,
                                             "fp16", "merge", "from A", "merged", False)
        name = res["result"][0]
        assert name == "merged.safetensors" and (out_dir / "checkpoints" / name).is_file()
        assert name in folder_paths.get_filename_list("checkpoints")   # listed by Load Checkpoint
        with pytest.raises(FileExistsError):
            N.MergeCheckpointFiles().merge("a.safetensors", "a.safetensors", "weighted_sum", 0.5, "", 0.2, 0,
                                           "fp16", "merge", "from A", "merged", False)
        comfy_nodes = importlib.import_module("nodes")
        with torch.inference_mode():
            model, clip, vae = comfy_nodes.CheckpointLoaderSimple().load_checkpoint(name)
        assert model is not None and clip is not None and vae is not None
        assert type(model.model.model_config).__name__ == "SD15"
    finally:
        folder_paths.set_output_directory(old_out)
        folder_paths.folder_names_and_paths["checkpoints"] = old_ckpt


@requires_comfyui
def test_sweep_grid_uses_comfy_sampler(comfy):
    a, b = tiny_model(comfy, 1), tiny_model(comfy, 2)

    class StubVAE:  # decode only: latent [B,4,h,w] -> IMAGE [B,8h,8w,3]
        def decode(self, samples):
            x = samples[:, :3].clamp(-1, 1) * 0.5 + 0.5
            return torch.nn.functional.interpolate(x, scale_factor=8).permute(0, 2, 3, 1)

    cond = [[torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(0)), {}]]
    unc = [[torch.zeros(1, 4, 64), {}]]
    with torch.inference_mode():
        grid, images = N.MergeSweep().sweep(a, b, "0, 1", cond, unc, StubVAE(), 5, 2, 1, 3.0, "euler",
                                            "normal", 64, 64)  # the widgets' minimum
    assert images.shape == (4, 64, 64, 3)
    assert grid.shape[0] == 1 and grid.shape[-1] == 3
    assert grid.shape[1] >= 2 * 64 and grid.shape[2] >= 2 * 64
    assert 0.0 <= float(grid.min()) and float(grid.max()) <= 1.0
    # column α=0 is model A alone, α=1 model B alone: different images; rows (seeds) differ too
    assert not torch.allclose(images[0], images[1])
    assert not torch.allclose(images[0], images[2])
