"""A Flux.1-shaped diffusion-model file with random weights, made once and cached, for the real-ComfyUI tier.

ComfyUI detects Flux from key structure (``double_blocks.0.img_attn.norm.key_norm.scale`` + ``img_in.weight``,
``comfy/model_detection.py``) and then fixes the width (hidden 3072, 24 heads, T5 context 4096, rope axes
16/56/56) but counts the blocks, so a file with **1 double + 1 single block** at full width (~0.55 B parameters,
~1.1 GB in fp16) goes through ``UNETLoader`` (``comfy.sd.load_diffusion_model``) as a Flux.1-dev model. Keys are
bare BFL names, as ``flux1-dev.safetensors`` ships. Built from ComfyUI's own Flux class on the ``meta`` device (for
the names and shapes) and filled tensor by tensor from a seeded generator, in a child process.

What this file cannot give: text encoders. ``DualCLIPLoader`` (type flux) builds T5 from ComfyUI's fixed
``t5_config_xxl.json`` (24 layers, d_model 4096: 4.76 B parameters, 9.5 GB fp16 / 4.9 GB fp8) whatever the file
holds; ComfyUI has no smaller T5 whose 4096-wide output the full-width ``txt_in`` accepts (T5-XL is 2048 wide).
Tests on this file therefore feed conditioning tensors of Flux's shapes (T5 ``[B, L, 4096]``, CLIP-L pooled
``[B, 768]``) directly.

Cache: ``$CONCEPTLAB_TEST_CACHE`` or ``<tmp>/conceptlab-test-cache`` (shared with tests/e2e/checkpoint.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .checkpoint import cache_dir

FLUX_UNET_NAME = "conceptlab_random_flux1_1double_1single_fp16.safetensors"


def _build(out_path: str, seed: int = 0) -> None:
    """Child-process body: names/shapes from ComfyUI's Flux class on ``meta`` (detection config, depth 1 + 1), seeded
    fan-in-scaled normal weights (norm scales 1, biases small), fp16, bare BFL keys, ``safetensors`` save."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from e2e.comfy_env import comfy_inprocess

    comfy_inprocess()
    import comfy.ldm.flux.model
    import comfy.ops
    import safetensors.torch
    import torch

    cfg = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "vec_in_dim": 768,
           "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 1,
           "depth_single_blocks": 1, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True,
           "guidance_embed": True}
    with torch.device("meta"):
        net = comfy.ldm.flux.model.Flux(**cfg, device="meta", dtype=torch.float16,
                                        operations=comfy.ops.disable_weight_init)
    g = torch.Generator("cpu").manual_seed(seed)
    sd = {}
    for name, p in net.state_dict().items():
        if p.dim() >= 2:
            t = torch.randn(p.shape, generator=g).div_(p[0].numel() ** 0.5)
        elif name.endswith("bias"):
            t = torch.randn(p.shape, generator=g).mul_(0.02)
        else:
            t = torch.ones(p.shape)
        sd[name] = t.half()
        del t
    tmp = out_path + ".tmp"
    safetensors.torch.save_file(sd, tmp, metadata={"conceptlab.test": "random Flux.1-shaped weights, 1+1 blocks"})
    os.replace(tmp, out_path)
    os.chmod(out_path, 0o644)


def random_flux_unet(python: str | None = None, timeout: float = 1800) -> Path:
    """Path of the cached random Flux.1-shaped file (1 double + 1 single block, full width, ~1.1 GB fp16), built
    in a child process (``python`` = this interpreter by default; COMFYUI_PATH must be set) if missing. Raises
    ``RuntimeError`` with the child's output on failure."""
    import fcntl

    out = cache_dir() / FLUX_UNET_NAME
    if out.is_file():
        return out
    with open(cache_dir() / (FLUX_UNET_NAME + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out.is_file():
            return out
        code = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r}); "
                f"from e2e.flux_checkpoint import _build; _build({str(out)!r})")
        proc = subprocess.run([python or sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=timeout, env=os.environ.copy(), check=False)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"building the random Flux file failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return out


# -- text encoders and VAE for DualCLIPLoader(type flux) / VAELoader -------------------------------------------
FLUX_CLIP_L_NAME = "conceptlab_random_clip_l_fp16.safetensors"
FLUX_T5XXL_NAME = "conceptlab_random_t5xxl_fp8_e4m3fn.safetensors"
FLUX_VAE_NAME = "conceptlab_random_flux_ae_fp16.safetensors"


def _random_like(sd_meta: dict, seed: int, dtype) -> dict:
    import torch

    g = torch.Generator("cpu").manual_seed(seed)
    out = {}
    for name, p in sd_meta.items():
        if p.dim() >= 2:
            t = torch.randn(p.shape, generator=g).div_(p[0].numel() ** 0.5)
        elif name.endswith("bias"):
            t = torch.randn(p.shape, generator=g).mul_(0.02)
        else:
            t = torch.ones(p.shape)
        out[name] = t.to(dtype)
        del t
    return out


def _build_encoders(clip_path: str, t5_path: str, vae_path: str, seed: int = 0) -> None:
    """Child-process body: CLIP-L (ComfyUI's ``sd1_clip_config.json``, fp16), T5-XXL (ComfyUI's fixed
    ``t5_config_xxl.json``: 4.76 B parameters, stored float8_e4m3fn as ``t5xxl_fp8_e4m3fn.safetensors`` is) and the
    Flux VAE (16 latent channels, ch 128 × [1, 2, 4, 4]), names from ComfyUI's own classes on ``meta``."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from e2e.comfy_env import comfy_inprocess

    root = comfy_inprocess()
    import json

    import comfy.clip_model
    import comfy.ldm.models.autoencoder
    import comfy.ops
    import comfy.text_encoders.t5
    import safetensors.torch
    import torch

    ops = comfy.ops.disable_weight_init
    cfg = json.loads((root / "comfy" / "sd1_clip_config.json").read_text())
    with torch.device("meta"):
        clip = comfy.clip_model.CLIPTextModel(cfg, torch.float16, "meta", ops)
    safetensors.torch.save_file(_random_like(clip.state_dict(), seed, torch.float16), clip_path + ".tmp")
    os.replace(clip_path + ".tmp", clip_path)
    cfg = json.loads((root / "comfy" / "text_encoders" / "t5_config_xxl.json").read_text())
    with torch.device("meta"):
        t5 = comfy.text_encoders.t5.T5(cfg, torch.float16, "meta", ops)
    safetensors.torch.save_file(_random_like(t5.state_dict(), seed + 1, torch.float8_e4m3fn), t5_path + ".tmp")
    os.replace(t5_path + ".tmp", t5_path)
    ddconfig = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    with torch.device("meta"):
        vae = comfy.ldm.models.autoencoder.AutoencodingEngine(
            regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
            encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": ddconfig},
            decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": ddconfig})
    safetensors.torch.save_file(_random_like(vae.state_dict(), seed + 2, torch.float16), vae_path + ".tmp")
    os.replace(vae_path + ".tmp", vae_path)


def random_flux_encoders(python: str | None = None, timeout: float = 3600) -> tuple[Path, Path, Path]:
    """``(clip_l, t5xxl_fp8, ae)`` cached random files for ``DualCLIPLoader`` (type flux) and ``VAELoader``; the T5
    file is ~4.9 GB (ComfyUI always builds the full T5-XXL). Built in a child process (~6 GB RAM) if missing."""
    import fcntl

    paths = tuple(cache_dir() / n for n in (FLUX_CLIP_L_NAME, FLUX_T5XXL_NAME, FLUX_VAE_NAME))
    if all(p.is_file() for p in paths):
        return paths
    with open(cache_dir() / (FLUX_T5XXL_NAME + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if all(p.is_file() for p in paths):
            return paths
        code = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r}); "
                f"from e2e.flux_checkpoint import _build_encoders; _build_encoders(*{[str(p) for p in paths]!r})")
        proc = subprocess.run([python or sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=timeout, env=os.environ.copy(), check=False)
        if proc.returncode != 0 or not all(p.is_file() for p in paths):
            raise RuntimeError(f"building the Flux text encoders failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return paths
