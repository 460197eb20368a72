"""Model families as data: what differs between SD1.x, SD2.x, SDXL (and the next families) in one table.

The loops read these entries through the host (``host.arch`` → :func:`family`); they never branch on a family
name. A new family is a new :class:`Family` entry plus a host that can produce its :class:`~.conditioning.
Conditioning` and predictions.

Sources: kohya-ss/sd-scripts ``library/sai_model_spec.py`` (modelspec architecture ids, ``ARCH_SD_V1`` …
``ARCH_SD_XL_V1_BASE``, ``ARCH_FLUX_1_DEV``) and ``train_network.py`` / ``sdxl_train_network.py`` /
``flux_train_network.py`` (``ss_base_model_version`` values: ``sd_v1``, ``sd_v2``, ``sdxl_base_v1-0``, ``flux1``;
text-encoder LoRA prefixes ``lora_te``, ``lora_te1``/``lora_te2``); ComfyUI ``comfy/supported_models.py``
(latent channels, default resolutions in ``sampling_settings`` / ``latent_format``).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Family:
    """One model family.

    Attributes:
        arch: short id used across the pack (``formats.keys.ARCHITECTURES``).
        text_encoders: host component names of the text encoders (``"te"`` or ``"te1"``, ``"te2"``).
        kohya_te_prefix: ``{component: kohya LoRA prefix}``.
        base_model_version: kohya ``ss_base_model_version``.
        modelspec_arch: ``modelspec.architecture`` without the ``/lora`` suffix.
        modelspec_implementation: ``modelspec.implementation`` URL.
        resolution: default training / sampling resolution in pixels (square).
        objective: ``"ddpm"`` (discrete ε / v schedule) or ``"flow"`` (rectified flow, σ ∈ [0, 1]).
        pooled: the family's conditioning has a pooled embedding.
        size_conditioning: the family reads ``extras["size_ids"]`` (SDXL micro-conditioning).
        latent_channels: VAE latent channels.
        kohya_unet_names: which module names kohya's LoRA keys use for the UNet: ``"diffusers"`` (kohya's SD1/SD2
            trainer builds a diffusers-layout UNet: ``lora_unet_down_blocks_0_attentions_0_…``) or ``"ldm"``
            (``sdxl_train_network.py`` builds ``sdxl_original_unet.SdxlUNet2DConditionModel``, LDM layout:
            ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``) or ``"bfl"`` (Flux: the host's module
            paths are already the BFL names kohya's ``lora_flux.py`` uses: ``lora_unet_double_blocks_0_img_attn_qkv``).
        lora_targets: which modules kohya's LoRA network adapts: ``"unet"`` (``networks/lora.py``: UNet transformer
            blocks, CLIP text encoders; :func:`.lora.network.kohya_targets`) or ``"flux"``
            (``networks/lora_flux.py``: double / single blocks, CLIP-L, optional T5; :mod:`.lora.flux`).
        denoiser: module layout of the denoiser, which picks ESD's parameter-set rules
            (:mod:`.esd.params`): ``"unet"`` or ``"flux-dit"`` (double/single-stream blocks, BFL paths).
        patch_size: latent cells per token side (Flux packs 2×2 latent cells into one token; 1 for UNets). Loss
            masks must be constant on each patch (:mod:`.esd.objective`).
        guidance_default: the distilled-guidance value (``extras["guidance"]``) the family is sampled with by
            default (Flux.1-dev: 3.5, ComfyUI ``FluxGuidance`` / diffusers ``FluxPipeline``); ``None`` for
            families without a guidance embedding.
    """

    arch: str
    text_encoders: tuple[str, ...]
    kohya_te_prefix: dict[str, str] = field(default_factory=dict)
    base_model_version: str = ""
    modelspec_arch: str = ""
    modelspec_implementation: str = "https://github.com/Stability-AI/stablediffusion"
    resolution: int = 512
    objective: str = "ddpm"
    pooled: bool = False
    size_conditioning: bool = False
    latent_channels: int = 4
    kohya_unet_names: str = "diffusers"
    lora_targets: str = "unet"
    denoiser: str = "unet"
    patch_size: int = 1
    guidance_default: float | None = None


FAMILIES: dict[str, Family] = {
    "sd1": Family("sd1", ("te",), {"te": "lora_te"}, "sd_v1", "stable-diffusion-v1",
                  "https://github.com/Stability-AI/stablediffusion", 512),
    "sd2": Family("sd2", ("te",), {"te": "lora_te"}, "sd_v2", "stable-diffusion-v2-512",
                  "https://github.com/Stability-AI/stablediffusion", 512),
    "sdxl": Family("sdxl", ("te1", "te2"), {"te1": "lora_te1", "te2": "lora_te2"}, "sdxl_base_v1-0",
                   "stable-diffusion-xl-v1-base", "https://github.com/Stability-AI/generative-models", 1024,
                   pooled=True, size_conditioning=True, kohya_unet_names="ldm"),
    # kohya networks/lora_flux.py: CLIP-L "lora_te1", T5-XXL "lora_te3" (formats/flux_keys.py reads both)
    "flux": Family("flux", ("te1", "t5"), {"te1": "lora_te1", "t5": "lora_te3"}, "flux1", "flux-1-dev",
                   "https://github.com/black-forest-labs/flux", 1024, objective="flow", pooled=True,
                   latent_channels=16, kohya_unet_names="bfl", lora_targets="flux", denoiser="flux-dit", patch_size=2,
                   guidance_default=3.5),
}


def family(arch: str) -> Family:
    """The :class:`Family` of ``arch``; ``ValueError`` for an unknown one."""
    try:
        return FAMILIES[arch]
    except KeyError:
        raise ValueError(f"unknown model family {arch!r}; known: {', '.join(FAMILIES)}") from None


def modelspec_arch(arch: str, prediction_type: str = "epsilon") -> str:
    """``modelspec.architecture`` base id (kohya ``sai_model_spec.build_metadata``): SD2 at v-prediction is
    ``stable-diffusion-v2-768-v``, at ε ``stable-diffusion-v2-512``; other families as the table says."""
    if arch == "sd2":
        return "stable-diffusion-v2-768-v" if prediction_type == "v_prediction" else "stable-diffusion-v2-512"
    return family(arch).modelspec_arch
