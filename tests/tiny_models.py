"""Tiny diffusers models built in the test (nothing is downloaded) and the real SD1.5 UNet config.

``tiny_host()`` gives a :class:`conceptlab.training.diffusers_host.DiffusersHost` with an SD1-shaped layout
(CrossAttn down/mid/up blocks with attn1/attn2/ff, 1×1 conv proj_in/proj_out, a CLIP text encoder with the
kohya/ComfyUI ``text_model.`` names, a 4-channel VAE with 8× downsampling) small enough to train on CPU.
"""

from __future__ import annotations

import zlib

import torch

SD15_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)

TINY_UNET_CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
)

TINY_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 8, 16, 16), norm_num_groups=4, sample_size=64,
)

TINY_VOCAB = 1000
BOS, EOS = 1, 2


def sd15_unet_config() -> dict:
    """The SD1.5 ``UNet2DConditionModel`` config (runwayml/stable-diffusion-v1-5 unet/config.json essentials)."""
    return dict(SD15_UNET_CONFIG)


def sd15_unet_meta():
    """The full SD1.5 UNet built on the meta device (real names and shapes, no memory)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**SD15_UNET_CONFIG)


def word_hash_tokenizer(prompts, max_length: int = 77) -> torch.Tensor:
    """A deterministic stand-in for CLIPTokenizer: words hashed (crc32) into ids, BOS/EOS, padded with EOS."""
    out = torch.full((len(prompts), max_length), EOS, dtype=torch.long)
    for i, p in enumerate(prompts):
        words = str(p).lower().replace(",", " , ").split()
        ids = [BOS] + [3 + zlib.crc32(w.encode()) % (TINY_VOCAB - 3) for w in words][: max_length - 2] + [EOS]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


def tiny_text_encoder(seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=BOS, eos_token_id=EOS,
                         pad_token_id=EOS)
    return CLIPTextModel(cfg)


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**TINY_UNET_CONFIG)


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**TINY_VAE_CONFIG)


def tiny_host(seed: int = 0, prediction_type: str = "epsilon"):
    """A tiny SD1-shaped :class:`DiffusersHost` on CPU, fp32, deterministic for a seed."""
    from conceptlab.training.diffusers_host import DiffusersHost

    return DiffusersHost(tiny_unet(seed), tiny_text_encoder(seed), word_hash_tokenizer, tiny_vae(seed),
                         prediction_type=prediction_type, arch="sd1")


#: tiny SDXL-shaped UNet: the text_time additional embedding (pooled text + 6 size ids), linear proj_in/out,
#: a CrossAttn down block with 2 transformer layers, like SDXL's (the real one: 320/640/1280, depths 0/2/10)
TINY_SDXL_POOLED = 24
TINY_SDXL_UNET_CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2), cross_attention_dim=32 + 48, attention_head_dim=8, norm_num_groups=8,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + TINY_SDXL_POOLED,
)


def tiny_sdxl_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**TINY_SDXL_UNET_CONFIG)


def tiny_text_encoder_2(seed: int = 0):
    """A tiny OpenCLIP-G stand-in: ``CLIPTextModelWithProjection`` (hidden 48, projection = pooled size)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed + 100)
    cfg = CLIPTextConfig(vocab_size=TINY_VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=BOS, eos_token_id=EOS,
                         pad_token_id=EOS, projection_dim=TINY_SDXL_POOLED, hidden_act="gelu")
    return CLIPTextModelWithProjection(cfg)


def tiny_sdxl_host(seed: int = 0, prediction_type: str = "epsilon"):
    """A tiny SDXL-shaped :class:`DiffusersHost` (two text encoders, pooled + size conditioning), CPU fp32."""
    from conceptlab.training.diffusers_host import DiffusersHost

    return DiffusersHost(tiny_sdxl_unet(seed), tiny_text_encoder(seed), word_hash_tokenizer, tiny_vae(seed),
                         prediction_type=prediction_type, text_encoder_2=tiny_text_encoder_2(seed),
                         tokenizer_2=word_hash_tokenizer)


# -- Flux.1-shaped tiny models ---------------------------------------------------------------------------------
#: tiny FluxTransformer2DModel: 2 heads × 8 = 16 wide (Flux.1: 24 × 128 = 3072), rope axes summing to the head dim
#: (Flux.1: 16 + 56 + 56 = 128), 1 double + 2 single blocks (Flux.1: 19 + 38), guidance embedding (dev)
TINY_FLUX_T5_DIM = 32
TINY_FLUX_CLIP_DIM = 32
TINY_FLUX_CONFIG = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=8,
                        num_attention_heads=2, joint_attention_dim=TINY_FLUX_T5_DIM,
                        pooled_projection_dim=TINY_FLUX_CLIP_DIM, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
#: 16-channel VAE without quant convs and with Flux.1's shift / scale (black-forest-labs/FLUX.1-dev vae/config.json)
TINY_FLUX_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 8, 16, 16), norm_num_groups=4, sample_size=64, use_quant_conv=False,
    use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611,
)
#: tiny T5 sequence (Flux.1-dev: 512 tokens, schnell 256) so CPU tests stay fast
TINY_FLUX_T5_TOKENS = 16


def tiny_flux_transformer(seed: int = 0, guidance_embeds: bool = True):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(**{**TINY_FLUX_CONFIG, "guidance_embeds": guidance_embeds})


def tiny_t5(seed: int = 0):
    """A tiny T5 v1.1 encoder (gated-GELU feed-forward ``wi_0``/``wi_1``, as T5-XXL)."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed + 200)
    cfg = T5Config(vocab_size=TINY_VOCAB, d_model=TINY_FLUX_T5_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=EOS, decoder_start_token_id=0)
    return T5EncoderModel(cfg)


def tiny_flux_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed + 300)
    return AutoencoderKL(**TINY_FLUX_VAE_CONFIG)


def tiny_flux_host(seed: int = 0, guidance_embeds: bool = True, t5_tokens: int = TINY_FLUX_T5_TOKENS):
    """A tiny Flux.1-shaped :class:`~conceptlab.training.flux_host.FluxHost` (dev with guidance embedding unless
    ``guidance_embeds=False`` = schnell), CPU fp32, deterministic for a seed; word-hash tokenizers stand in for
    CLIP's and T5's."""
    from conceptlab.training.flux_host import FluxHost

    return FluxHost(tiny_flux_transformer(seed, guidance_embeds), tiny_text_encoder(seed), word_hash_tokenizer,
                    tiny_t5(seed), word_hash_tokenizer, tiny_flux_vae(seed), t5xxl_max_token_length=t5_tokens)
