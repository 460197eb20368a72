"""Weight-diff nodes: V1 contracts, the compare and file nodes without ComfyUI, and (real-ComfyUI tier) MODEL/CLIP
diffs read from patched weights without mutating the inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import requires_comfyui

from conceptlab.metrics.weight_diff import TensorPair, diff_pairs
from conceptlab.nodes import comfy_io
from conceptlab.nodes import diff as N

UNET = "model.diffusion_model."


def test_node_contracts():
    assert set(N.NODE_CLASS_MAPPINGS) == {"ConceptLabDiffModels", "ConceptLabDiffFiles",
                                          "ConceptLabCompareDiffReports"}
    for node_id, cls in N.NODE_CLASS_MAPPINGS.items():
        assert node_id.startswith("ConceptLab") and N.NODE_DISPLAY_NAME_MAPPINGS[node_id]
        assert cls.CATEGORY == "Concept Lab/Weight diff" and cls.DESCRIPTION
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES)
        assert cls.RETURN_TYPES[0] == "STRING" and cls.RETURN_TYPES[-1] == "IMAGE"
        assert callable(getattr(cls, cls.FUNCTION))
        for group in cls.INPUT_TYPES().values():
            for name, (typ, *opts) in group.items():
                assert opts and opts[0].get("tooltip"), f"{node_id}.{name} has no tooltip"


def _report(scale: float) -> str:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 8, generator=g)
    d = torch.randn(16, 8, generator=g)
    pairs = [TensorPair(UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", a, a + scale * d),
             TensorPair(UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_q.weight", a, a)]
    from conceptlab.metrics.diff_cli import dumps_report

    return dumps_report(diff_pairs(iter(pairs), arch="sd1"))


def test_compare_node_outputs_ratio_tables_and_plot():
    with torch.inference_mode():
        md, js, img = N.CompareDiffReports().compare(_report(1e-3), _report(2.7e-3), "100 it", "500 it")
    assert "2.7×" in md and "500 it / 100 it" in md
    assert json.loads(js)["overall"]["mean_abs"]["ratio"] == pytest.approx(2.7, rel=1e-5)
    assert img.dim() == 4 and img.shape[0] == 1 and img.shape[-1] == 3 and 0 <= float(img.min()) <= float(img.max()) <= 1
    with pytest.raises(ValueError, match="JSON text"):
        N.CompareDiffReports().compare("/etc/passwd", _report(1e-3))


def test_file_node_resolves_only_listed_names(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(1)
    a = {UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight": torch.randn(6, 5, generator=g),
         UNET + "middle_block.1.proj_in.weight": torch.randn(6, 5, generator=g)}
    b = dict(a)
    k = UNET + "middle_block.1.proj_in.weight"
    b[k] = a[k] + 0.01
    (tmp_path / "checkpoints").mkdir()
    save_file(a, str(tmp_path / "checkpoints" / "a.safetensors"))
    save_file(b, str(tmp_path / "checkpoints" / "b.safetensors"))
    listed = {"checkpoints": ["a.safetensors", "b.safetensors"], "loras": []}

    def model_file(folder, name):
        if name not in listed.get(folder, []):
            raise FileNotFoundError(f"{name!r} is not in ComfyUI's {folder} folder")
        return tmp_path / folder / name

    monkeypatch.setattr(comfy_io, "model_list", lambda folder: listed.get(folder, []))
    monkeypatch.setattr(comfy_io, "model_file", model_file)
    spec = N.DiffFiles.INPUT_TYPES()["required"]
    assert spec["file_a"][0] == ["checkpoints/a.safetensors", "checkpoints/b.safetensors"]
    with torch.inference_mode():
        md, js, img = N.DiffFiles().diff("checkpoints/a.safetensors", "checkpoints/b.safetensors")
    rep = json.loads(js)
    assert rep["by_layer_type"]["proj_in"]["mean_abs"] == pytest.approx(0.01, rel=1e-5)
    assert rep["by_block"]["M00"]["changed_tensors"] == 1 and "proj_in" in md
    assert tuple(img.shape[:1]) == (3,) and img.shape[-1] == 3
    with pytest.raises(FileNotFoundError):
        N.DiffFiles().diff("checkpoints/a.safetensors", "checkpoints/../../etc/passwd")
    with pytest.raises(ValueError, match="checkpoints/, diffusion_models/ or loras/"):
        N.DiffFiles().diff("a.safetensors", "checkpoints/b.safetensors")


class _FakePatcher:
    """The part of ModelPatcher the diff reads: get_key_patches(prefix) -> {key: [(weight, convert)]}."""

    def __init__(self, sd):
        self.sd = sd

    def get_key_patches(self, prefix=None):
        return {k: [(v, lambda a, **kw: a)] for k, v in self.sd.items() if prefix is None or k.startswith(prefix)}


def test_model_node_on_unpatched_weights_without_comfyui():
    g = torch.Generator().manual_seed(2)
    sd_a = {"diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.randn(6, 5, generator=g),
            "diffusion_model.out.2.weight": torch.randn(4, 6, 3, 3, generator=g),
            "model_sampling.sigmas": torch.ones(10)}
    sd_b = dict(sd_a)
    k = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    sd_b[k] = sd_a[k] * 1.5
    with torch.inference_mode():
        md, js, img = N.DiffModels().diff(_FakePatcher(sd_a), _FakePatcher(sd_b))
    rep = json.loads(js)
    assert rep["mode"] == "models" and rep["overall"]["tensors"] == 2 and rep["changed_tensors"] == 1
    assert rep["top_tensors"][0]["key"] == "model." + k and rep["top_tensors"][0]["block"] == "IN01"
    d = (sd_b[k] - sd_a[k]).double().numpy()
    assert rep["by_layer_type"]["attn2.to_k"]["mean_abs"] == pytest.approx(np.abs(d).mean(), rel=1e-6)
    assert rep["by_layer_type"]["attn2.to_k"]["rel_change"] == pytest.approx(0.5, rel=1e-6)


# ------------------------------------------------------------------------------------------------ real ComfyUI
@pytest.fixture(scope="module")
def comfy_env():
    from e2e import comfy_env as env

    env.comfy_inprocess()
    return env


@requires_comfyui
def test_model_node_reads_patched_weights_without_mutating(comfy_env):
    base = comfy_env.tiny_sd15_patcher(seed=0)
    clip = comfy_env.tiny_sd1_clip(seed=1)
    sd = base.model.state_dict()
    k = next(x for x in sd if x.endswith("attn2.to_v.weight"))
    k2 = next(x for x in sd if x.endswith("ff.net.2.weight"))
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(sd[k].shape, generator=g) * 1e-2
    b = base.clone()
    b.add_patches({k: ("diff", (delta,))}, 0.5)                              # a .diff file at strength 0.5
    r = 2
    up, down = torch.randn(sd[k2].shape[0], r, generator=g), torch.randn(r, sd[k2].shape[1], generator=g)
    from comfy.weight_adapter.lora import LoRAAdapter

    lora = LoRAAdapter(set(), (up, down, 4.0, None, None, None))
    b.add_patches({k2: lora}, 0.25)                                        # a LoRA: 0.25 × (4/2) × up@down
    clip_b = clip.clone()
    ck = next(x for x in clip_b.patcher.model.state_dict() if x.endswith("self_attn.q_proj.weight"))
    clip_b.add_patches({ck: ("diff", (torch.full(clip_b.patcher.model.state_dict()[ck].shape, 1e-3),))}, 1.0)
    before = {x: v.clone() for x, v in base.model.state_dict().items()}
    with torch.inference_mode():
        md, js, img = N.DiffModels().diff(base, b, 0.0, 10, True, 30.0, clip, clip_b)
    rep = json.loads(js)
    rows = {t["key"]: t for t in rep["tensors"] if not t["identical"]}
    assert set(rows) == {"model." + k, "model." + k2, ck}
    exp1 = (0.5 * delta).double().numpy()
    assert rows["model." + k]["mean_abs"] == pytest.approx(np.abs(exp1).mean(), rel=1e-5)
    assert rows["model." + k]["max_abs"] == pytest.approx(np.abs(exp1).max(), rel=1e-5)
    exp2 = (0.25 * 2.0 * up @ down).double().numpy()
    assert rows["model." + k2]["mean_abs"] == pytest.approx(np.abs(exp2).mean(), rel=1e-4)
    assert rows["model." + k2]["effective_rank"] <= 2
    assert rows[ck]["component"] == "te" and rows[ck]["mean_abs"] == pytest.approx(1e-3, rel=1e-4)
    assert rep["by_layer_type"]["attn2.to_v"]["changed_tensors"] == 1 and rep["arch"] == "sd1"
    assert img.shape[0] == 3
    after = base.model.state_dict()
    assert all(torch.equal(after[x], before[x]) for x in before)  # nothing mutated
    assert len(base.patches) == 0 and len(b.patches) == 2
