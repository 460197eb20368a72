"""In-process ComfyUI for tests: put COMFYUI_PATH on ``sys.path``, switch ComfyUI to CPU, build tiny models.

Everything here needs ``COMFYUI_PATH`` (tests using it are marked ``requires_comfyui``). Tiny models follow
comfyui-dev.md §3: ComfyUI's own SD15 model class with a small ``unet_config``, a CLIP built from ComfyUI's SD1
clip target with a shrunken text config (the real SD1 tokenizer that ships in ``comfy/sd1_tokenizer``), and an
AutoencoderKL with few channels. ComfyUI's ops leave weights uninitialised (``torch.empty``), so every tensor is
filled here from a seeded generator.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import torch

#: tiny SD1.5-family UNet (ComfyUI ``UNetModel`` arguments); two levels, one transformer block per level
TINY_UNET_CONFIG = {
    "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1],
    "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1], "transformer_depth_middle": 1,
    "channel_mult": [1, 2], "context_dim": 64, "num_heads": 2, "num_head_channels": -1,
    "use_linear_in_transformer": False, "adm_in_channels": None, "use_temporal_attention": False,
    "use_spatial_transformer": True, "legacy": False, "use_checkpoint": False, "dtype": torch.float32,
}

#: tiny CLIP text config overrides (hidden size must equal TINY_UNET_CONFIG["context_dim"])
TINY_CLIP_CONFIG = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
                    "num_hidden_layers": 2, "projection_dim": 64}

#: tiny AutoencoderKL (ComfyUI ``AutoencoderKL`` params): 3 downsamples -> 8 px per latent cell
TINY_VAE_CONFIG = {"params": {"embed_dim": 4, "ddconfig": {
    "double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
    "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}}


def comfyui_path() -> Path:
    """The ComfyUI checkout from ``COMFYUI_PATH``; ``RuntimeError`` if unset or not a checkout."""
    p = os.environ.get("COMFYUI_PATH")
    if not p or not Path(p, "comfy").is_dir():
        raise RuntimeError("COMFYUI_PATH must point at a ComfyUI checkout (folder with comfy/)")
    return Path(p).resolve()


def comfy_inprocess() -> Path:
    """Make ``import comfy`` work in this process, CPU only, without ComfyUI parsing our argv. Idempotent."""
    root = comfyui_path()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args

    args.cpu = True
    import comfy.model_management

    return root


@torch.no_grad()
def init_weights(module: torch.nn.Module, seed: int = 0, scale: float = 1.0) -> torch.nn.Module:
    """Fill every parameter/buffer-free weight of ``module`` deterministically (fan-in scaled normal; norms 1/0)."""
    g = torch.Generator("cpu").manual_seed(seed)
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            fan_in = max(1, p[0].numel())
            p.copy_(torch.randn(p.shape, generator=g) * (scale / math.sqrt(fan_in)))
        elif name.endswith(("bias", "beta")):
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        else:  # norm weights, logit scale, ...
            p.fill_(1.0)
    return module


def tiny_sd15_patcher(seed: int = 0, v_prediction: bool = False):
    """A ``ModelPatcher`` around ComfyUI's SD15 ``BaseModel`` with :data:`TINY_UNET_CONFIG` (CPU, fp32)."""
    comfy_inprocess()
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    cfg = comfy.supported_models.SD15(dict(TINY_UNET_CONFIG))
    if v_prediction:
        base = comfy.model_base.BaseModel(cfg, model_type=comfy.model_base.ModelType.V_PREDICTION)
    else:
        base = cfg.get_model({})
    init_weights(base.diffusion_model, seed)
    base.eval()
    dev = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(base, load_device=dev, offload_device=dev)


def tiny_sd1_clip(seed: int = 1):
    """A ComfyUI ``CLIP`` object (real SD1 tokenizer, tiny text transformer from :data:`TINY_CLIP_CONFIG`)."""
    comfy_inprocess()
    import comfy.sd
    import comfy.supported_models

    target = comfy.supported_models.SD15(dict(TINY_UNET_CONFIG)).clip_target()
    clip = comfy.sd.CLIP(target=target, model_options={"clip_l_model_config": dict(TINY_CLIP_CONFIG)})
    init_weights(clip.cond_stage_model, seed)
    return clip


def tiny_vae(seed: int = 2):
    """A ComfyUI ``VAE`` object around a tiny AutoencoderKL (8 px per latent cell, 4 latent channels)."""
    comfy_inprocess()
    import logging

    import comfy.sd

    prev = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # "Missing VAE keys": weights are filled below
    try:
        vae = comfy.sd.VAE(sd={}, config=TINY_VAE_CONFIG)
    finally:
        logging.getLogger().setLevel(prev)
    init_weights(vae.first_stage_model, seed, scale=0.5)
    vae.first_stage_model.to(vae.vae_dtype)
    return vae


#: tiny SDXL-family UNet (ComfyUI ``UNetModel`` arguments): linear transformers, 2 layers at the second level and
#: in the middle, ``label_emb`` fed by SDXL's ``encode_adm`` (pooled OpenCLIP-G + 6 × 256 size embeddings)
TINY_SDXL_POOLED = 48  # ComfyUI projects clip_g pooled with a hidden × hidden matrix (bigG: 1280)
TINY_SDXL_UNET_CONFIG = {
    "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1],
    "transformer_depth": [0, 2], "transformer_depth_output": [0, 0, 2, 2], "transformer_depth_middle": 2,
    "channel_mult": [1, 2], "context_dim": 32 + 48, "num_heads": 8, "num_head_channels": -1,
    "use_linear_in_transformer": True, "adm_in_channels": TINY_SDXL_POOLED + 6 * 256, "num_classes": "sequential",
    "use_temporal_attention": False, "use_spatial_transformer": True, "legacy": False, "use_checkpoint": False,
    "dtype": torch.float32,
}
TINY_SDXL_CLIP_L = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 3,
                    "projection_dim": 32}
TINY_SDXL_CLIP_G = {"hidden_size": 48, "intermediate_size": 96, "num_attention_heads": 2, "num_hidden_layers": 3,
                    "projection_dim": TINY_SDXL_POOLED, "hidden_act": "gelu"}


def tiny_sdxl_patcher(seed: int = 0, v_prediction: bool = False):
    """A ``ModelPatcher`` around ComfyUI's SDXL ``BaseModel`` with :data:`TINY_SDXL_UNET_CONFIG` (CPU, fp32)."""
    comfy_inprocess()
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models

    cfg = comfy.supported_models.SDXL(dict(TINY_SDXL_UNET_CONFIG))
    mt = comfy.model_base.ModelType.V_PREDICTION if v_prediction else comfy.model_base.ModelType.EPS
    base = comfy.model_base.SDXL(cfg, model_type=mt)
    init_weights(base.diffusion_model, seed)
    base.eval()
    dev = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(base, load_device=dev, offload_device=dev)


def tiny_sdxl_clip(seed: int = 1):
    """A ComfyUI SDXL ``CLIP`` (clip_l + clip_g, real tokenizers, tiny transformers)."""
    comfy_inprocess()
    import comfy.sd
    import comfy.supported_models

    target = comfy.supported_models.SDXL(dict(TINY_SDXL_UNET_CONFIG)).clip_target()
    clip = comfy.sd.CLIP(target=target, model_options={"clip_l_model_config": dict(TINY_SDXL_CLIP_L),
                                                       "clip_g_model_config": dict(TINY_SDXL_CLIP_G)})
    init_weights(clip.cond_stage_model, seed)
    return clip
