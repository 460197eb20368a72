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
