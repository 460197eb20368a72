"""Real-ComfyUI tier: our kohya LoRA / .diff files load in ComfyUI's own key map with zero "lora key not loaded",
and ComfyUI's weight math gives the same ΔW as formats.lora_files.lora_deltas.

ComfyUI runs in a subprocess (tests/formats_comfy_probe.py) with COMFYUI_PYTHON (a Python environment that can
import ComfyUI) or this interpreter - whichever can import ComfyUI. No model weights are needed: ComfyUI's key map is built from the
real SD1.5 / SDXL UNet key set and shapes (diffusers UNet on the meta device, LDM names from formats.keys).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conceptlab.formats import kohya_keys, ldm_keys
from conceptlab.formats.lora_files import lora_deltas, save_diff_file, save_kohya_lora
from conftest import comfyui_path, requires_comfyui

PROBE = Path(__file__).with_name("formats_comfy_probe.py")


def _comfy_python() -> str | None:
    cands = [os.environ.get("COMFYUI_PYTHON"), sys.executable]
    for c in cands:
        if not c or not Path(c).exists():
            continue
        code = (f"import sys; sys.path.insert(0, {str(comfyui_path())!r}); sys.argv=['x','--cpu']; "
                "import comfy.options; comfy.options.enable_args_parsing(); import comfy.lora, comfy.model_detection")
        if subprocess.run([c, "-c", code], capture_output=True, timeout=300).returncode == 0:
            return c
    return None


@pytest.fixture(scope="module")
def comfy_python():
    py = _comfy_python()
    if py is None:
        pytest.skip("no Python interpreter here can import ComfyUI (set COMFYUI_PYTHON)")
    return py


def _unet_shapes(arch):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**ldm_keys.unet_config_for(arch))
    d2l = ldm_keys.diffusers_to_ldm_unet(arch)
    return unet, {d2l[k]: list(v.shape) for k, v in unet.state_dict().items()}


def _clip_keys(prefix, layers, width):
    keys, shapes = [], {}
    for i in range(layers):
        for m, shp in (("self_attn.q_proj", [width, width]), ("self_attn.k_proj", [width, width]),
                       ("self_attn.v_proj", [width, width]), ("self_attn.out_proj", [width, width]),
                       ("mlp.fc1", [4 * width, width]), ("mlp.fc2", [width, 4 * width])):
            k = f"{prefix}.transformer.text_model.encoder.layers.{i}.{m}.weight"
            keys.append(k)
            shapes[k] = shp
    return keys, shapes


def _run_probe(py, tmp_path, lora, unet_shapes, clip_keys, clip_shapes, compare):
    req = {"comfyui": str(comfyui_path()), "lora": str(lora), "unet_shapes": unet_shapes, "clip_keys": clip_keys,
           "clip_shapes": clip_shapes, "compare": compare, "deltas_out": str(tmp_path / "comfy_deltas.safetensors")}
    (tmp_path / "req.json").write_text(json.dumps(req))
    proc = subprocess.run([py, str(PROBE), str(tmp_path / "req.json"), str(tmp_path / "res.json")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "res.json").read_text())
    deltas = {}
    if (tmp_path / "comfy_deltas.safetensors").exists():
        from safetensors.torch import load_file
        deltas = load_file(str(tmp_path / "comfy_deltas.safetensors"))
    return res, deltas


def _comfy_key(ldm_key: str) -> str:
    """Our single-file checkpoint key -> the ComfyUI model/CLIP state-dict key."""
    if ldm_key.startswith("model.diffusion_model."):
        return ldm_key[len("model."):]
    for pre, new in (("cond_stage_model.transformer.", "clip_l.transformer."),
                     ("conditioner.embedders.0.transformer.", "clip_l.transformer.")):
        if ldm_key.startswith(pre):
            return new + ldm_key[len(pre):]
    raise KeyError(ldm_key)


@requires_comfyui
@pytest.mark.parametrize("arch", ["sd1", "sdxl", "sdxl-ldm"])
def test_comfyui_loads_every_key_of_our_kohya_lora(arch, tmp_path, comfy_python):
    """sdxl-ldm: UNet modules named the way kohya's SDXL trainer (and ours, training/families.py) names them,
    by their LDM path (``lora_unet_input_blocks_4_1_...``), with the down/upsampler convs of conv_dim LoRAs."""
    ldm_names = arch == "sdxl-ldm"
    arch = "sdxl" if ldm_names else arch
    d2l = ldm_keys.diffusers_to_ldm_unet(arch)
    unet, shapes = _unet_shapes(arch)
    g = torch.Generator().manual_seed(0)
    modules = {}
    for name, mod in unet.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and re.search(
                r"(attn[12]\.to_(q|k|v|out\.0)|ff\.net\.(0\.proj|2)|proj_in|proj_out|conv[12]|conv_shortcut|"
                r"time_emb_proj|downsamplers\.0\.conv|upsamplers\.0\.conv)$", name):
            w = mod.weight
            down = torch.randn(1, *w.shape[1:], generator=g) * 0.01
            up = torch.randn(w.shape[0], 1, *([1, 1] if w.ndim == 4 else []), generator=g) * 0.01
            path = d2l[name + ".weight"][: -len(".weight")] if ldm_names else name
            modules[kohya_keys.kohya_lora_name("unet", path)] = (down, up, 0.5)
    te = "te" if arch == "sd1" else "te1"
    layers = 12
    clip_keys, clip_shapes = _clip_keys("clip_l", layers, 768)
    for i in range(layers):
        for m, (o, n) in (("self_attn.q_proj", (768, 768)), ("mlp.fc1", (3072, 768))):
            # transformers-5 module path: kohya_lora_name adds the text_model. level
            modules[kohya_keys.kohya_lora_name(te, f"encoder.layers.{i}.{m}")] = (torch.randn(1, n, generator=g),
                                                                         torch.randn(o, 1, generator=g), 1.0)
    if arch == "sdxl":
        ck, cs = _clip_keys("clip_g", 32, 1280)
        clip_keys += ck
        clip_shapes.update(cs)
        for i in (0, 31):
            modules[kohya_keys.kohya_lora_name("te2", f"text_model.encoder.layers.{i}.self_attn.k_proj")] = (
                torch.randn(1, 1280, generator=g), torch.randn(1280, 1, generator=g), 1.0)
    path = save_kohya_lora(tmp_path / "l.safetensors", modules, {"ss_network_dim": "1"}, dtype=torch.float32)
    ours = lora_deltas(path, arch=arch)
    assert ours.skipped == {}
    compare_ldm = [k for k in ours.deltas if re.search(r"(attn2\.to_k|proj_in|in_layers\.2|self_attn\.q_proj)", k)][:6]
    compare = [_comfy_key(k) for k in compare_ldm]
    res, comfy_d = _run_probe(comfy_python, tmp_path, path, shapes, clip_keys, clip_shapes, compare)
    assert res["not_loaded"] == []
    assert res["n_patched"] == len(modules)
    assert set(compare) <= set(comfy_d)
    for lk, ck in zip(compare_ldm, compare):
        torch.testing.assert_close(comfy_d[ck], ours.deltas[lk], rtol=1e-5, atol=1e-7)
    # ComfyUI patched exactly the tensors we say the LoRA changes (UNet and CLIP-L; CLIP-G is fused in LDM files)
    ours_comfy = {_comfy_key(k) for k in ours.deltas if not k.startswith("conditioner.embedders.1.")}
    patched = {k for k in res["patched"] if not k.startswith("clip_g.")}
    assert patched == ours_comfy


@requires_comfyui
def test_comfyui_loads_our_diff_file(tmp_path, comfy_python):
    _, shapes = _unet_shapes("sd1")
    g = torch.Generator().manual_seed(1)
    diffs = {}
    for dk in ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
               "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0"):
        ldm = ldm_keys.diffusers_to_ldm_unet("sd1")[dk + ".weight"]
        diffs[kohya_keys.kohya_lora_name("unet", dk) + ".diff"] = torch.randn(*shapes[ldm], generator=g)
    diffs[kohya_keys.kohya_lora_name("unet", "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0") + ".diff_b"] = \
        torch.randn(320, generator=g)
    path = save_diff_file(tmp_path / "d.safetensors", diffs, {}, dtype=torch.float32)
    ours = lora_deltas(path, arch="sd1")
    compare = [_comfy_key(k) for k in ours.deltas if k.endswith(".weight")]
    res, comfy_d = _run_probe(comfy_python, tmp_path, path, shapes, [], {}, compare)
    assert res["not_loaded"] == []
    assert set(res["patched"]) == {_comfy_key(k) for k in ours.deltas}
    for k in compare:
        torch.testing.assert_close(comfy_d[k], ours.deltas["model." + k])
