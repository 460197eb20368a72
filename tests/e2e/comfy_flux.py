"""Tiny Flux.1 models for the real-ComfyUI tier, built in-process from ComfyUI's own classes.

``supported_models.Flux`` / ``FluxSchnell`` → ``model_base.Flux`` (``comfy/ldm/flux/model.py``) with a small
``unet_config`` (the same keys ComfyUI's ``model_detection.py`` fills for Flux, narrower), and a ComfyUI ``CLIP``
from Flux's own clip target (``comfy/text_encoders/flux.py``: the real CLIP-L and T5 tokenizers that ship with
ComfyUI, CLIP-L and T5 transformers with shrunken configs). Weights are filled deterministically
(:func:`e2e.comfy_env.init_weights`): ComfyUI's ops leave them uninitialised. Needs ``COMFYUI_PATH``.
"""

from __future__ import annotations

import torch

from .comfy_env import comfy_inprocess, init_weights

#: tiny Flux DiT (``comfy.ldm.flux.model.Flux`` arguments); widths: hidden 64 = 4 heads × 16, rope axes 4+6+6
TINY_FLUX_CONFIG = {
    "image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "vec_in_dim": 32,
    "context_in_dim": 48, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 4, "depth": 1, "depth_single_blocks": 1,
    "axes_dim": [4, 6, 6], "theta": 10000, "qkv_bias": True, "guidance_embed": True,
}
#: tiny CLIP-L (pooled width = TINY_FLUX_CONFIG["vec_in_dim"]) and T5 (d_model = context_in_dim) overrides
TINY_FLUX_CLIP_L = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2,
                    "projection_dim": 32}
TINY_FLUX_T5 = {"d_model": 48, "d_ff": 64, "d_kv": 24, "num_heads": 2, "num_layers": 2}


def tiny_flux_patcher(seed: int = 0, schnell: bool = False, weight_dtype: torch.dtype | None = None,
                      config: dict | None = None):
    """A ``ModelPatcher`` around ComfyUI's Flux ``BaseModel`` (dev with guidance embedding, or schnell) on CPU.

    ``weight_dtype``: store the weights in this dtype (e.g. ``torch.float8_e4m3fn``) with fp32 compute through
    ComfyUI's manual-cast ops, as UNETLoader's ``weight_dtype`` option does (``set_inference_dtype``).
    """
    comfy_inprocess()
    import comfy.model_patcher
    import comfy.supported_models

    cfg_dict = dict(config or TINY_FLUX_CONFIG)
    cfg_dict["guidance_embed"] = not schnell
    cls = comfy.supported_models.FluxSchnell if schnell else comfy.supported_models.Flux
    mcfg = cls(cfg_dict)
    if weight_dtype is not None:
        mcfg.set_inference_dtype(weight_dtype, torch.float32)
    else:
        mcfg.set_inference_dtype(torch.float32, None)
    base = mcfg.get_model({})
    if weight_dtype is not None:
        g = torch.Generator("cpu").manual_seed(seed)
        with torch.no_grad():  # fill in fp32, then store in the low-precision dtype
            for _, p in base.diffusion_model.named_parameters():
                t = torch.randn(p.shape, generator=g) / (p[0].numel() ** 0.5) if p.dim() >= 2 else torch.ones(p.shape)
                p.copy_(t.to(p.dtype))
    else:
        init_weights(base.diffusion_model, seed)
    base.eval()
    dev = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(base, load_device=dev, offload_device=dev)


def tiny_flux_clip(seed: int = 1):
    """A ComfyUI Flux ``CLIP`` (clip_l + t5xxl, real tokenizers, tiny transformers, fp32)."""
    comfy_inprocess()
    import comfy.sd
    import comfy.supported_models

    target = comfy.supported_models.Flux(dict(TINY_FLUX_CONFIG)).clip_target()
    clip = comfy.sd.CLIP(target=target, model_options={"clip_l_model_config": dict(TINY_FLUX_CLIP_L),
                                                       "t5xxl_model_config": dict(TINY_FLUX_T5),
                                                       "dtype": torch.float32})
    init_weights(clip.cond_stage_model, seed)
    return clip


def tiny_flux_vae(seed: int = 2):
    """A ComfyUI ``VAE`` with a tiny 16-channel AutoencoderKL (8 px per latent cell), as Flux's VAE is shaped."""
    comfy_inprocess()
    import logging

    import comfy.sd

    config = {"params": {"embed_dim": 16, "ddconfig": {
        "double_z": True, "z_channels": 16, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
        "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}}
    prev = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)
    try:
        vae = comfy.sd.VAE(sd={}, config=config)
    finally:
        logging.getLogger().setLevel(prev)
    init_weights(vae.first_stage_model, seed, scale=0.5)
    vae.first_stage_model.to(vae.vae_dtype)
    return vae


def comfy_flux_from_diffusers(transformer, schnell: bool | None = None):
    """ComfyUI's Flux ``ModelPatcher`` holding the weights of a diffusers ``FluxTransformer2DModel`` (converted
    to BFL names by ``formats.flux_views.canonical_state_dict``), with the transformer's widths as the
    ``unet_config`` (ComfyUI's file detection would fix Flux.1's full width). CPU fp32."""
    comfy_inprocess()
    import comfy.model_patcher
    import comfy.supported_models

    from conceptlab.formats.flux_keys import CANONICAL_PREFIX
    from conceptlab.formats.flux_views import canonical_state_dict

    c = transformer.config
    if schnell is None:
        schnell = not c.guidance_embeds
    hidden = int(c.num_attention_heads) * int(c.attention_head_dim)
    sd = {k: v.detach().float().clone() for k, v in transformer.state_dict().items()}
    bfl = {k[len(CANONICAL_PREFIX):]: v for k, v in canonical_state_dict(sd, keep_other=False).items()}
    mlp = bfl["single_blocks.0.linear1.weight"].shape[0] - 3 * hidden if c.num_single_layers else 4 * hidden
    cfg = {"image_model": "flux", "in_channels": int(c.in_channels) // 4, "out_channels": int(c.in_channels) // 4,
           "patch_size": 2, "vec_in_dim": int(c.pooled_projection_dim), "context_in_dim": int(c.joint_attention_dim),
           "hidden_size": hidden, "mlp_ratio": mlp / hidden, "num_heads": int(c.num_attention_heads),
           "depth": int(c.num_layers), "depth_single_blocks": int(c.num_single_layers),
           "axes_dim": list(c.axes_dims_rope), "theta": 10000, "qkv_bias": True,
           "guidance_embed": bool(c.guidance_embeds)}
    cls = comfy.supported_models.FluxSchnell if schnell else comfy.supported_models.Flux
    mcfg = cls(cfg)
    mcfg.set_inference_dtype(torch.float32, None)
    base = mcfg.get_model({})
    missing, unexpected = base.diffusion_model.load_state_dict(bfl, strict=False)
    if missing or unexpected:
        raise ValueError(f"BFL conversion does not fit ComfyUI's Flux: missing {missing}, unexpected {unexpected}")
    base.eval()
    dev = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(base, load_device=dev, offload_device=dev)
