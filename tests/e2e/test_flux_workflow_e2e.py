"""Real ComfyUI server: the ``flux_pixel_art_lora`` API twin on the Flux.1-shaped file (1 double + 1 single block at
full width, tests/e2e/flux_checkpoint.py) with random CLIP-L, T5-XXL (fp8) and Flux VAE files through ComfyUI's own
UNETLoader / DualCLIPLoader(type flux) / VAELoader: trains one epoch at 64 px, samples, writes kohya ``lora_flux``
files with ``ss_base_model_version = flux1`` that ComfyUI loads with zero "lora key not loaded".

Why it is heavy: ComfyUI's Flux CLIP always builds the full T5-XXL (4.76 B parameters from its fixed
``t5_config_xxl.json``; no layer-count detection), so even this test needs the whole encoder: a 4.9 GB fp8 file,
~7 GB of RAM in the server, and minutes of CPU per caption. Skipped below 14 GB of free memory, with that reason.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from e2e.fixtures import comfy_server  # noqa: E402,F401  (pytest fixture)
from e2e.test_flux_file_e2e import _mem_available_gib  # noqa: E402
from e2e.test_workflows_e2e import (PX, TINY_DATASET, TINY_IMAGES, _assert_images, _check_lora_file,  # noqa: E402
                                    _timed_run, shrink, twin)

pytestmark = [
    pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="real-ComfyUI tier: set COMFYUI_PATH"),
    pytest.mark.skipif(_mem_available_gib() < 14, reason="the Flux workflow tier needs ~14 GB of free memory: "
                       "ComfyUI's DualCLIPLoader(type flux) always builds the full 4.76 B-parameter T5-XXL"),
]


def test_flux_pixel_art_lora_twin(comfy_server):  # noqa: F811
    from e2e.flux_checkpoint import random_flux_encoders, random_flux_unet
    from e2e.test_workflows_e2e import REPO
    from safetensors import safe_open

    api = twin("flux_pixel_art_lora")
    names = {n["class_type"]: n["inputs"] for n in api.values()}
    clip_l, t5, ae = random_flux_encoders()
    comfy_server.add_model("diffusion_models", random_flux_unet(), name=names["UNETLoader"]["unet_name"])
    comfy_server.add_model("text_encoders", clip_l, name=names["DualCLIPLoader"]["clip_name1"])
    comfy_server.add_model("text_encoders", t5, name=names["DualCLIPLoader"]["clip_name2"])
    comfy_server.add_model("vae", ae, name=names["VAELoader"]["vae_name"])
    dest = comfy_server.input_dir / TINY_DATASET / "1_dawnlike"
    if not dest.exists():
        dest.mkdir(parents=True)
        for png in sorted((REPO / "sample_data" / "pixel_art" / "10_dawnlike").glob("*.png"))[:TINY_IMAGES]:
            shutil.copy2(png, dest / png.name)
            shutil.copy2(png.with_suffix(".txt"), dest / png.with_suffix(".txt").name)
    log_start = len(comfy_server.log.read_text(errors="replace"))
    prompt = shrink(api, ConceptLabTrainLora={"max_train_epochs": 1, "gradient_checkpointing": False},
                    EmptySD3LatentImage={"width": PX, "height": PX, "batch_size": 1})
    entry, secs = _timed_run(comfy_server, prompt, timeout=7200)
    print(f"flux_pixel_art_lora on the 1+1-block Flux file: {secs:.1f}s")
    _assert_images(comfy_server, entry, 2)
    loras = sorted((comfy_server.output_dir / "loras").glob("pixel_art_flux*.safetensors"))
    assert loras, "no LoRA written"
    for p in loras:
        assert _check_lora_file(p)["ss_base_model_version"] == "flux1"
    with safe_open(str(loras[0]), "pt") as f:
        unet = [k for k in f.keys() if k.startswith("lora_unet_")]
    assert unet and all(k.startswith(("lora_unet_double_blocks_0_", "lora_unet_single_blocks_0_")) for k in unet)
    log = comfy_server.log.read_text(errors="replace")[log_start:]
    assert "lora key not loaded" not in log, log[-3000:]
