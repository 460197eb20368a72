"""A full-size SD1.5-format checkpoint with random weights, made once and cached, for server tests.

ComfyUI's ``CheckpointLoaderSimple`` detects SD1.5 from state-dict shapes (model_channels 320, context_dim 768),
so a loadable test model must be full size (~2.1 GB in fp16): nothing can be downloaded here. The file is built
from ComfyUI's own model classes (``comfy.supported_models.SD15``, ``comfy.sd.CLIP`` with the SD1 tokenizer
shipped in ``comfy/sd1_tokenizer``, ``comfy.sd.VAE``) with seeded random weights and written by
``comfy.sd.save_checkpoint`` (the layout CheckpointSave writes), in a child process so the ~4 GB it takes are
returned afterwards.

Cache: ``$CONCEPTLAB_TEST_CACHE`` or ``<tmp>/conceptlab-test-cache``; the file is written to a temporary name and
renamed (``os.replace``) under a lock, so concurrent test sessions build it once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHECKPOINT_NAME = "conceptlab_random_sd15_fp16.safetensors"
SDXL_CHECKPOINT_NAME = "conceptlab_random_sdxl_fp16.safetensors"

#: SDXL base UNet as ComfyUI's comfy/model_detection.py defines it (ComfyUI recognises SDXL only at this size)
SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}

#: SD1.5 UNet config as ComfyUI's comfy/model_detection.py defines it (fp16)
SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}

#: the SD VAE (AutoencoderKL, ``first_stage_model``) as ComfyUI builds it for SD1.x checkpoints
SD_VAE = {"params": {"embed_dim": 4, "ddconfig": {
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}}}


def cache_dir() -> Path:
    """Where cached test models live (created)."""
    p = Path(os.environ.get("CONCEPTLAB_TEST_CACHE") or Path(tempfile.gettempdir()) / "conceptlab-test-cache")
    p.mkdir(parents=True, exist_ok=True)
    return p


def _build(out_path: str, seed: int = 0, family: str = "sd15") -> None:
    """Child-process body: build the random SD1.5 (or SDXL base) model with ComfyUI's classes and save it (fp16).

    SDXL: ~2.6 B UNet + 0.8 B text-encoder parameters, ~6.9 GB on disk; the model is created directly in fp16
    and filled tensor by tensor, so the child's peak stays near 1× the model plus one tensor (~8 GB)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from e2e.comfy_env import comfy_inprocess, init_weights

    comfy_inprocess()
    import logging

    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import torch

    logging.getLogger().setLevel(logging.ERROR)
    if family == "sdxl":
        cfg = comfy.supported_models.SDXL({**SDXL_UNET, "dtype": torch.float16})
    else:
        cfg = comfy.supported_models.SD15({**SD15_UNET, "dtype": torch.float16})
    with torch.no_grad():
        base = cfg.get_model({})
        init_weights(base.diffusion_model, seed)
        base.diffusion_model.half()
        cpu = torch.device("cpu")
        model = comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)
        clip = comfy.sd.CLIP(target=cfg.clip_target(), model_options={"dtype": torch.float16})
        init_weights(clip.cond_stage_model, seed + 1)
        clip.cond_stage_model.half()
        vae = comfy.sd.VAE(sd={}, config=SD_VAE)
        init_weights(vae.first_stage_model, seed + 2, scale=0.5)
        vae.first_stage_model.half()
        tmp = out_path + ".tmp"
        comfy.sd.save_checkpoint(tmp, model, clip, vae,
                                 metadata={"conceptlab.test": f"random {family.upper()} weights"})
        mm.unload_all_models()
    os.replace(tmp, out_path)
    os.chmod(out_path, 0o644)


def random_sd15_checkpoint(python: str | None = None, timeout: float = 1800) -> Path:
    """Path of the cached random SD1.5 checkpoint, building it (child process, ``python`` = this interpreter by
    default, COMFYUI_PATH must be set) if missing. Raises ``RuntimeError`` with the child's output on failure."""
    return _cached(CHECKPOINT_NAME, "sd15", python, timeout)


def random_sdxl_checkpoint(python: str | None = None, timeout: float = 3600) -> Path:
    """Path of the cached random full-size SDXL base checkpoint (~6.9 GB fp16), built once like
    :func:`random_sd15_checkpoint` (needs ~10 GB free RAM while building)."""
    return _cached(SDXL_CHECKPOINT_NAME, "sdxl", python, timeout)


def _cached(name: str, family: str, python: str | None, timeout: float) -> Path:
    import fcntl

    out = cache_dir() / name
    if out.is_file():
        return out
    with open(cache_dir() / (name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out.is_file():
            return out
        code = f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r}); " \
               f"from e2e.checkpoint import _build; _build({str(out)!r}, family={family!r})"
        proc = subprocess.run([python or sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=timeout, env=os.environ.copy(), check=False)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"building the random {family} checkpoint failed:\n{proc.stdout[-4000:]}\n"
                               f"{proc.stderr[-4000:]}")
    return out
