"""Extract / Resize LoRA nodes: contracts and files without ComfyUI; real-ComfyUI tier: the nodes run with
ComfyUI's folder_paths, and the files load in ComfyUI's own key map with zero "lora key not loaded" and ComfyUI's
weight math gives back the checkpoint difference (full rank)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from conftest import requires_comfyui

from conceptlab.nodes import comfy_io
from conceptlab.nodes import extract as N

U = "model.diffusion_model."
# real SD1 / SDXL names AND shapes, a few modules each (the ComfyUI key map is built from the full model's shapes)
SD1 = {U + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (320, 320),
       U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
       U + "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
       U + "input_blocks.1.0.in_layers.2.weight": (320, 320, 3, 3),
       U + "output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
       "cond_stage_model.transformer.text_model.encoder.layers.3.self_attn.q_proj.weight": (768, 768)}
SDXL = {U + "input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight": (640, 2048),
        U + "input_blocks.4.1.proj_in.weight": (640, 640),
        U + "label_emb.0.0.weight": (1280, 2816),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight": (3072, 768),
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": (3840, 1280)}


def _ckpts(folder, shapes, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(*s, generator=g) * 0.02 for k, s in shapes.items()}
    tuned = {k: v + scale * torch.randn(*v.shape, generator=g) for k, v in base.items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(base, str(folder / "base.safetensors"))
    save_file(tuned, str(folder / "tuned.safetensors"))
    return base, tuned


def test_node_contracts():
    for cls in (N.ExtractLora, N.ResizeLora):
        spec = cls.INPUT_TYPES()
        assert all("tooltip" in opts for _, opts in spec["required"].values())
        assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS)
        assert cls.DESCRIPTION and cls.CATEGORY.startswith("Concept Lab/")
        assert callable(getattr(cls, cls.FUNCTION))


@pytest.fixture
def fake_comfy(tmp_path, monkeypatch):
    listed = {"checkpoints": ["base.safetensors", "tuned.safetensors"], "loras": []}

    def model_file(folder, name):
        if name not in listed.get(folder, []):
            raise FileNotFoundError(f"{name!r} is not in ComfyUI's {folder} folder")
        return tmp_path / ("output" if folder == "loras" else "models") / folder / name

    monkeypatch.setattr(comfy_io, "model_list", lambda folder: listed.get(folder, []))
    monkeypatch.setattr(comfy_io, "model_file", model_file)
    monkeypatch.setattr(comfy_io, "output_dir", lambda: tmp_path / "output")
    return listed


def test_extract_then_resize_nodes_write_loadable_files(tmp_path, fake_comfy):
    from conceptlab.formats.lora_files import lora_deltas

    base, tuned = _ckpts(tmp_path / "models" / "checkpoints", SD1)
    with torch.inference_mode():
        name, report, js, img = N.ExtractLora().extract("base.safetensors", "tuned.safetensors", 8, 4, "fixed",
                                                        0.9, 0.01, "fp32", "ex/style")
    assert name == "ex/style_00001.safetensors"
    path = tmp_path / "output" / "loras" / name
    rep = json.loads(js)
    assert rep["per_layer"]["lora_unet_down_blocks_0_resnets_0_conv1"]["rank"] == 4
    assert "energy kept" in report and img.shape[0] == 1 and img.shape[-1] == 3
    d = lora_deltas(path)
    assert d.skipped == {} and d.arch == "sd1"
    assert set(d.deltas) == set(SD1)  # skip_connection = resnets.2.conv_shortcut: with conv layers, at rank
    assert rep["per_layer"]["lora_unet_up_blocks_3_resnets_2_conv_shortcut"]["rank"] == 8
    # a second run never overwrites the first
    with torch.inference_mode():
        name2 = N.ExtractLora().extract("base.safetensors", "tuned.safetensors", 8, 0, "energy", 0.5, 0.01,
                                        "fp16", "ex/style")[0]
    assert name2 == "ex/style_00002.safetensors"
    fake_comfy["loras"] = [name]
    with torch.inference_mode():
        rname, rrep, rjs, _ = N.ResizeLora().resize(name, 2, 0, "fixed", 0.9, "fp16", "ex/small")
    per = json.loads(rjs)["per_layer"]
    assert all(v["rank"] == 2 and v["old_rank"] in (4, 8) for v in per.values())
    with pytest.raises(ValueError, match="outside|'\\.\\.'"):
        N.ResizeLora().resize(name, 2, 0, "fixed", 0.9, "fp16", "../../x")
    with pytest.raises(FileNotFoundError):
        N.ExtractLora().extract("base.safetensors", "../x.safetensors", 8, 0, "fixed", 0.9, 0.01, "fp16", "x")


# ------------------------------------------------------------------------------------------------ real ComfyUI
def _comfy_key(k):
    if k.startswith(U):
        return k[len("model."):]
    for pre, new in (("cond_stage_model.transformer.", "clip_l.transformer."),
                     ("conditioner.embedders.0.transformer.", "clip_l.transformer.")):
        if k.startswith(pre):
            return new + k[len(pre):]
    return None


@requires_comfyui
@pytest.mark.parametrize("arch,shapes", [("sd1", SD1), ("sdxl", SDXL)])
def test_real_comfyui_node_output_loads_with_zero_unloaded_keys(arch, shapes, tmp_path, monkeypatch):
    import test_formats_comfyui as F
    from e2e import comfy_env

    py = F._comfy_python()
    if py is None:
        pytest.skip("no Python interpreter here can import ComfyUI")
    comfy_env.comfy_inprocess()
    import folder_paths

    ck = tmp_path / "ckpts"
    base, tuned = _ckpts(ck, shapes, seed=1)
    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path / "out"))
    folder_paths.add_model_folder_path("checkpoints", str(ck), is_default=True)
    with torch.inference_mode():
        name, _, js, _ = N.ExtractLora().extract("base.safetensors", "tuned.safetensors", 1024, 1024, "fixed",
                                                 0.9, 0.0, "fp32", f"rt_{arch}")
    path = tmp_path / "out" / "loras" / name
    assert path.exists()
    unet, unet_shapes = F._unet_shapes(arch)
    clip_keys, clip_shapes = F._clip_keys("clip_l", 12, 768)
    if arch == "sdxl":
        ck2, cs2 = F._clip_keys("clip_g", 32, 1280)
        clip_keys += ck2
        clip_shapes.update(cs2)
    compare = [c for c in (_comfy_key(k) for k in shapes) if c]
    res, comfy_d = F._run_probe(py, tmp_path, path, unet_shapes, clip_keys, clip_shapes, compare)
    assert res["not_loaded"] == []
    n_modules = len(json.loads(js)["per_layer"])
    assert res["n_patched"] == n_modules
    for k in shapes:
        ck_ = _comfy_key(k)
        full = min(shapes[k][0], math.prod(shapes[k][1:])) <= 1024  # the widget's largest rank
        if ck_ in comfy_d and full:  # ComfyUI's ΔW from our file == the checkpoint difference (full rank)
            torch.testing.assert_close(comfy_d[ck_].reshape(shapes[k]), tuned[k] - base[k], rtol=1e-3, atol=1e-5)
    assert len(comfy_d) >= 3
    if arch == "sdxl":  # OpenCLIP-G: q/k/v rows of the fused in_proj became three HF-named modules
        assert {f"clip_g.transformer.text_model.encoder.layers.0.self_attn.{p}_proj.weight" for p in "qkv"} \
            <= set(res["patched"])
    # the Resize node on that file (ComfyUI's loras list): the resized file loads with zero unloaded keys too
    folder_paths.add_model_folder_path("loras", str(tmp_path / "out" / "loras"), is_default=True)
    with torch.inference_mode():
        rname, _, rjs, _ = N.ResizeLora().resize(name, 2, 0, "fixed", 0.9, "fp32", f"rs_{arch}")
    assert all(v["rank"] <= 2 for v in json.loads(rjs)["per_layer"].values())
    (tmp_path / "r").mkdir()
    res2, _ = F._run_probe(py, tmp_path / "r", tmp_path / "out" / "loras" / rname, unet_shapes, clip_keys,
                           clip_shapes, [])
    assert res2["not_loaded"] == [] and res2["n_patched"] == n_modules
