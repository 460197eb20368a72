"""Key maps and key classification for Stable Diffusion / Flux weight files.

What lives here:

* :func:`detect_architecture` - ``"sd1" | "sd2" | "sdxl" | "flux" | "unknown"`` from key names (+ a few shapes).
* :func:`split_component` - checkpoint key -> (component, key without the component prefix).
* :func:`classify_key` -> :class:`KeyInfo` (component, block id ``IN00``..``OUT11`` / ``D00`` / ``S00``, layer type),
  driven by the ordered regex tables :data:`COMPONENT_PREFIXES`, :data:`BLOCK_RULES` and :data:`LAYER_TYPE_RULES`
  (extend a table to teach the classifier a new layout).
* :func:`ldm_to_diffusers_unet` / :func:`diffusers_to_ldm_unet` - UNet parameter names, LDM (``input_blocks.1.1...``)
  <-> diffusers (``down_blocks.0.attentions.0...``). The mapping is *computed by diffusers' own converter*
  (``diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint``, with the UNet config from
  ``create_unet_diffusers_config_from_ldm``): we feed it a state dict of distinct one-element tensors and read the
  name mapping back from the tensor values, then check that the result is exactly the key set of a
  ``UNet2DConditionModel`` built from that config on the ``meta`` device.
* OpenCLIP (SD2 / SDXL te2) LDM names <-> HF CLIP names, recovered the same way from diffusers'
  ``convert_open_clip_checkpoint`` (fused ``in_proj_weight`` rows -> ``q_proj``/``k_proj``/``v_proj``).
* kohya LoRA names (``lora_unet_...``, ``lora_te_...``, ``lora_te1_...``, ``lora_te2_...``) and their checkpoint
  targets, matching the key map ComfyUI builds in ``comfy/lora.py`` (``model_lora_keys_unet`` /
  ``model_lora_keys_clip``) and diffusers' ``_convert_non_diffusers_lora_to_diffusers``.

Flux (BFL / ComfyUI / diffusers checkpoint layouts, every LoRA naming, fused q/k/v, ModelMergeFlux1 groups, kohya
``lora_flux`` modules) lives in :mod:`formats.flux_keys`; this module routes Flux keys there.

Nothing here reads tensors from disk or imports ComfyUI.
"""

from __future__ import annotations

import functools
import re
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

__all__ = [
    "ARCHITECTURES", "BLOCK_IDS", "COMPONENTS", "KeyInfo", "CheckpointTarget", "detect_architecture",
    "split_component", "classify_key", "ldm_to_diffusers_unet", "diffusers_to_ldm_unet", "unet_config_for",
    "ldm_unet_keys", "diffusers_unet_keys", "openclip_ldm_to_hf", "kohya_lora_name", "parse_kohya_lora_name",
    "kohya_name_to_checkpoint_key", "kohya_target", "known_module_paths", "KOHYA_PREFIXES",
    "CHECKPOINT_PREFIXES", "checkpoint_key", "normalize_te_path",
]

ARCHITECTURES = ("sd1", "sd2", "sdxl", "flux", "unknown")
COMPONENTS = ("unet", "te", "te1", "te2", "vae", "other")

# ---------------------------------------------------------------------------------------------------------------
# Block ids
# ---------------------------------------------------------------------------------------------------------------


def _ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i:02d}" for i in range(n)]


BLOCK_IDS: dict[str, list[str]] = {
    # IN00 is input_blocks.0 (conv_in); M00 is the middle block; OUT11 is output_blocks.11.
    "sd1": _ids("IN", 12) + ["M00"] + _ids("OUT", 12),
    "sd2": _ids("IN", 12) + ["M00"] + _ids("OUT", 12),
    "sdxl": _ids("IN", 9) + ["M00"] + _ids("OUT", 9),
    # Flux.1 dev/schnell: one id per ComfyUI ModelMergeFlux1 input (formats.flux_keys.block_ids): img_in, time_in,
    # guidance_in, vector_in, txt_in, 19 double-stream blocks D00.., 38 single-stream blocks S00.., final_layer.
    "flux": ["img_in", "time_in", "guidance_in", "vector_in", "txt_in"] + _ids("D", 19) + _ids("S", 38)
    + ["final_layer"],
}
"""Block ids per architecture, in model order (sd1/sd2: 25 ids, sdxl: 19, flux: 63)."""

# ResNet/attention sub-blocks per diffusers down/up block (layers_per_block); identical for SD1, SD2 and SDXL.
_LAYERS_PER_BLOCK = {"sd1": 2, "sd2": 2, "sdxl": 2}


def _in_id(arch: str, block: int, j: int) -> str:
    return f"IN{1 + block * (_LAYERS_PER_BLOCK.get(arch, 2) + 1) + j:02d}"


def _out_id(arch: str, block: int, j: int) -> str:
    return f"OUT{block * (_LAYERS_PER_BLOCK.get(arch, 2) + 1) + j:02d}"


_FLUX_DIFFUSERS_GROUPS = {"x_embedder": "img_in", "context_embedder": "txt_in", "timestep_embedder": "time_in",
                          "text_embedder": "vector_in", "guidance_embedder": "guidance_in",
                          "norm_out": "final_layer", "proj_out": "final_layer"}

_LPB = 2  # layers_per_block used in the block rules below (all supported UNets); see _in_id/_out_id

# Ordered (regex, function(match, arch) -> block id) rules applied to the component-relative key (LDM or
# diffusers spelling; "." or "_" separators so kohya names classify too). First match wins.
BLOCK_RULES: list[tuple[re.Pattern, Callable[[re.Match, str], str | None]]] = [
    # LDM UNet
    (re.compile(r"^input_blocks[._](\d+)[._]"), lambda m, a: f"IN{int(m[1]):02d}"),
    (re.compile(r"^middle_block[._]"), lambda m, a: "M00"),
    (re.compile(r"^output_blocks[._](\d+)[._]"), lambda m, a: f"OUT{int(m[1]):02d}"),
    # diffusers UNet
    (re.compile(r"^conv_in[._]"), lambda m, a: "IN00"),
    (re.compile(r"^down_blocks[._](\d+)[._](?:resnets|attentions)[._](\d+)[._]"),
     lambda m, a: _in_id(a, int(m[1]), int(m[2]))),
    (re.compile(r"^down_blocks[._](\d+)[._]downsamplers[._]"),
     lambda m, a: _in_id(a, int(m[1]), _LAYERS_PER_BLOCK.get(a, _LPB))),
    (re.compile(r"^mid_block[._]"), lambda m, a: "M00"),
    (re.compile(r"^up_blocks[._](\d+)[._](?:resnets|attentions)[._](\d+)[._]"),
     lambda m, a: _out_id(a, int(m[1]), int(m[2]))),
    (re.compile(r"^up_blocks[._](\d+)[._]upsamplers[._]"),
     lambda m, a: _out_id(a, int(m[1]), _LAYERS_PER_BLOCK.get(a, _LPB))),
    # Flux: BFL names and diffusers names
    (re.compile(r"^double_blocks[._](\d+)[._]"), lambda m, a: f"D{int(m[1]):02d}"),
    (re.compile(r"^single_blocks[._](\d+)[._]"), lambda m, a: f"S{int(m[1]):02d}"),
    (re.compile(r"^single_transformer_blocks[._](\d+)[._]"), lambda m, a: f"S{int(m[1]):02d}"),
    (re.compile(r"^transformer_blocks[._](\d+)[._]"), lambda m, a: f"D{int(m[1]):02d}" if a == "flux" else None),
    # Flux groups outside the blocks, as ComfyUI's ModelMergeFlux1 names them (BFL, then diffusers names)
    (re.compile(r"^(img_in|time_in|guidance_in|vector_in|txt_in|final_layer)[._]"),
     lambda m, a: m[1] if a == "flux" else None),
    (re.compile(r"^(x_embedder|context_embedder|time_text_embed[._]timestep_embedder|time_text_embed[._]text_embedder|"
                r"time_text_embed[._]guidance_embedder|norm_out|proj_out)[._]"),
     lambda m, a: _FLUX_DIFFUSERS_GROUPS[re.sub(r"^time_text_embed[._]", "", m[1])] if a == "flux" else None),
]

# ---------------------------------------------------------------------------------------------------------------
# Layer types: ordered (component set, regex, type template) - first match wins; "\1" style groups substituted.
# Patterns see the component-relative key with a leading "." so "(^|.)" anchors are just "\.".
# ---------------------------------------------------------------------------------------------------------------
_S = r"[._]"  # separator: "." in checkpoint keys, "_" in kohya names
_UNET = frozenset({"unet"})
_TE = frozenset({"te", "te1", "te2"})
_VAE = frozenset({"vae"})
_ANY = frozenset(COMPONENTS)

LAYER_TYPE_RULES: list[tuple[frozenset, re.Pattern, str]] = [
    # --- UNet transformer blocks (LDM and diffusers share these names)
    (_UNET, re.compile(rf"{_S}(attn[12]){_S}to_([qkv])(?:{_S}|$)"), r"\1.to_\2"),
    (_UNET, re.compile(rf"{_S}(attn[12]){_S}to_out(?:{_S}|$)"), r"\1.to_out"),
    (_UNET, re.compile(rf"{_S}transformer_blocks{_S}\d+{_S}ff(?:{_S}|$)"), "ff"),
    (_UNET, re.compile(rf"{_S}transformer_blocks{_S}\d+{_S}norm[123](?:{_S}|$)"), "norm"),
    (_UNET, re.compile(rf"{_S}proj_in(?:{_S}|$)"), "proj_in"),
    (_UNET, re.compile(rf"{_S}proj_out(?:{_S}|$)"), "proj_out"),
    # --- Flux (BFL names, then diffusers names)
    (_UNET, re.compile(rf"{_S}(img|txt)_attn{_S}qkv(?:{_S}|$)"), r"\1_attn.qkv"),
    (_UNET, re.compile(rf"{_S}(img|txt)_attn{_S}proj(?:{_S}|$)"), r"\1_attn.proj"),
    (_UNET, re.compile(rf"{_S}(img|txt)_attn{_S}norm(?:{_S}|$)"), "norm"),
    (_UNET, re.compile(rf"{_S}(img|txt)_mlp(?:{_S}|$)"), r"\1_mlp"),
    (_UNET, re.compile(rf"{_S}(img|txt)_mod(?:{_S}|$)"), r"\1_mod"),
    (_UNET, re.compile(rf"^{_S}single_blocks{_S}\d+{_S}(linear[12])(?:{_S}|$)"), r"\1"),
    (_UNET, re.compile(rf"^{_S}single_blocks{_S}\d+{_S}modulation(?:{_S}|$)"), "mod"),
    (_UNET, re.compile(rf"{_S}attn{_S}(to_[qkv]|add_[qkv]_proj|to_add_out)(?:{_S}|$)"), r"attn.\1"),
    (_UNET, re.compile(rf"{_S}attn{_S}to_out(?:{_S}|$)"), "attn.to_out"),
    (_UNET, re.compile(rf"{_S}ff_context(?:{_S}|$)"), "ff_context"),
    (_UNET, re.compile(rf"{_S}ff(?:{_S}|$)"), "ff"),
    (_UNET, re.compile(rf"{_S}(proj_mlp)(?:{_S}|$)"), r"\1"),
    (_UNET, re.compile(rf"{_S}norm1(?:_context)?{_S}linear(?:{_S}|$)"), "mod"),
    # --- UNet ResNet blocks
    (_UNET, re.compile(rf"{_S}(?:emb_layers|time_emb_proj)(?:{_S}|$)"), "time_emb_proj"),
    (_UNET, re.compile(rf"{_S}(?:skip_connection|conv_shortcut)(?:{_S}|$)"), "skip"),
    (_UNET, re.compile(rf"{_S}(?:in_layers{_S}0|out_layers{_S}0|norm[12])(?:{_S}|$)"), "norm"),
    (_UNET, re.compile(rf"{_S}(?:in_layers{_S}2|out_layers{_S}3|conv[12])(?:{_S}|$)"), "conv"),
    (_UNET, re.compile(rf"{_S}(?:downsamplers|op)(?:{_S}|$)"), "downsample"),
    (_UNET, re.compile(rf"{_S}(?:upsamplers|output_blocks{_S}\d+{_S}[12]{_S}conv)(?:{_S}|$)"), "upsample"),
    (_UNET, re.compile(rf"{_S}(?:attentions{_S}\d+|input_blocks{_S}\d+{_S}1|middle_block{_S}1|"
                       rf"output_blocks{_S}\d+{_S}1){_S}norm(?:{_S}|$)"), "norm"),
    # --- UNet stem / head / embeddings
    (_UNET, re.compile(rf"^{_S}(?:input_blocks{_S}0{_S}0|conv_in)(?:{_S}|$)"), "conv_in"),
    (_UNET, re.compile(rf"^{_S}(?:out{_S}2|conv_out)(?:{_S}|$)"), "conv_out"),
    (_UNET, re.compile(rf"^{_S}(?:out{_S}0|conv_norm_out|norm_out)(?:{_S}|$)"), "norm"),
    (_UNET, re.compile(rf"^{_S}(?:time_embed|time_embedding|time_in|time_text_embed)(?:{_S}|$)"), "time_embed"),
    (_UNET, re.compile(rf"^{_S}(?:label_emb|add_embedding|class_embedding|vector_in|guidance_in)(?:{_S}|$)"),
     "label_emb"),
    (_UNET, re.compile(rf"^{_S}(?:img_in|txt_in|x_embedder|context_embedder)(?:{_S}|$)"), "embed"),
    (_UNET, re.compile(rf"^{_S}(?:final_layer|proj_out)(?:{_S}|$)"), "final_layer"),
    # --- CLIP text encoders: HF names, then OpenCLIP LDM names
    (_TE, re.compile(rf"{_S}self_attn{_S}([qkv]|out)_proj(?:{_S}|$)"), r"te.\1_proj"),
    (_TE, re.compile(rf"{_S}mlp{_S}fc([12])(?:{_S}|$)"), r"te.fc\1"),
    (_TE, re.compile(rf"{_S}attn{_S}in_proj_(?:weight|bias)$"), "te.in_proj"),
    (_TE, re.compile(rf"{_S}attn{_S}out_proj(?:{_S}|$)"), "te.out_proj"),
    (_TE, re.compile(rf"{_S}mlp{_S}c_fc(?:{_S}|$)"), "te.fc1"),
    (_TE, re.compile(rf"{_S}mlp{_S}c_proj(?:{_S}|$)"), "te.fc2"),
    (_TE, re.compile(rf"{_S}(?:layer_norm[12]|final_layer_norm|ln_[12]|ln_final)(?:{_S}|$)"), "te.norm"),
    (_TE, re.compile(rf"{_S}(?:embeddings|token_embedding|positional_embedding|position_ids)(?:{_S}|$)"),
     "te.embed"),
    (_TE, re.compile(rf"{_S}text_projection(?:{_S}|$)"), "te.text_projection"),
    (_TE, re.compile(r"logit_scale$"), "te.other"),
    # --- VAE (LDM and diffusers names)
    (_VAE, re.compile(rf"{_S}(?:attn_1|attentions){_S}|{_S}mid{_S}attn"), "vae.attn"),
    (_VAE, re.compile(rf"(?:norm|norm_out|conv_norm_out|group_norm)(?:\d)?{_S}(?:weight|bias)$"), "vae.norm"),
    (_VAE, re.compile(rf"{_S}(?:nin_shortcut|conv_shortcut){_S}"), "vae.skip"),
    (_VAE, re.compile(r"quant_conv"), "vae.quant_conv"),
    (_VAE, re.compile(r"."), "vae.conv"),
    # --- anything else
    (_UNET, re.compile(rf"{_S}norm(?:{_S}|$)"), "norm"),
    (_ANY, re.compile(r"."), "other"),
]


@dataclass(frozen=True)
class KeyInfo:
    """Classification of one weight key.

    ``component``: "unet" | "te" | "te1" | "te2" | "vae" | "other"; ``block``: an id from :data:`BLOCK_IDS`
    (UNet / Flux blocks only, ``None`` elsewhere); ``layer_type``: a label from :data:`LAYER_TYPE_RULES`
    (e.g. "attn2.to_k", "ff", "proj_in", "norm", "conv", "te.q_proj", "vae.conv", "other").
    """

    component: str
    block: str | None
    layer_type: str


# ---------------------------------------------------------------------------------------------------------------
# Component prefixes (ordered: longest / most specific first)
# ---------------------------------------------------------------------------------------------------------------
COMPONENT_PREFIXES: list[tuple[str, str, str]] = [
    # (prefix, component, replacement prefix for the relative key)
    ("model.diffusion_model.", "unet", ""),            # single-file LDM / ComfyUI CheckpointSave
    ("diffusion_model.", "unet", ""),                  # ComfyUI ModelPatcher state dict
    ("model.", "unet", ""),                            # BFL Flux single files saved with a "model." prefix
    ("first_stage_model.", "vae", ""),                 # single-file LDM VAE
    ("cond_stage_model.transformer.", "te", ""),       # SD1 CLIP-L (HF names, text_model.*)
    ("cond_stage_model.model.", "te", ""),             # SD2 OpenCLIP-H (transformer.resblocks.*)
    ("conditioner.embedders.0.transformer.", "te1", ""),  # SDXL CLIP-L
    ("conditioner.embedders.0.model.", "te1", ""),     # SDXL refiner has only OpenCLIP-G at index 0
    ("conditioner.embedders.1.model.", "te2", ""),     # SDXL OpenCLIP-G (LDM names)
    ("text_encoders.clip_l.transformer.", "te", ""),   # ComfyUI-saved text encoders
    ("text_encoders.clip_g.transformer.", "te2", ""),
    ("clip_l.transformer.", "te", ""),                 # ComfyUI CLIP state dict (HF names)
    ("clip_h.transformer.", "te", ""),
    ("clip_g.transformer.", "te2", ""),
    ("lora_unet_", "unet", ""),                        # kohya LoRA module names
    ("lora_te1_", "te1", ""),
    ("lora_te2_", "te2", ""),
    ("lora_te_", "te", ""),
    ("unet.", "unet", ""),                             # diffusers pipeline / peft LoRA
    ("text_encoder_2.", "te2", ""),
    ("text_encoder.", "te", ""),
    ("vae.", "vae", ""),
    ("transformer.", "unet", ""),                      # diffusers Flux pipeline LoRA
]

# Bare (prefix-less) keys: diffusers UNet / Flux files, LDM UNet files, HF CLIP, diffusers/LDM VAE.
_BARE_RULES: list[tuple[re.Pattern, str]] = [
    (re.compile(r"^(?:input_blocks|middle_block|output_blocks|time_embed|label_emb|out)\."), "unet"),
    (re.compile(r"^(?:down_blocks|mid_block|up_blocks|conv_in|conv_out|conv_norm_out|time_embedding|"
                r"add_embedding|class_embedding)\."), "unet"),
    (re.compile(r"^(?:double_blocks|single_blocks|img_in|txt_in|time_in|vector_in|guidance_in|final_layer|"
                r"transformer_blocks|single_transformer_blocks|x_embedder|context_embedder|time_text_embed|"
                r"norm_out|proj_out)\."), "unet"),
    (re.compile(r"^(?:text_model\.|embeddings\.|encoder\.layers\.|final_layer_norm\.|text_projection)"), "te"),
    (re.compile(r"^(?:encoder|decoder|quant_conv|post_quant_conv)\."), "vae"),
]


def split_component(key: str) -> tuple[str, str]:
    """Split a full weight key into ``(component, key without the component prefix)``.

    Handles single-file LDM checkpoints (``model.diffusion_model.``, ``first_stage_model.``,
    ``cond_stage_model.transformer.`` / ``cond_stage_model.model.``, ``conditioner.embedders.0/1.``), ComfyUI-saved
    files and ComfyUI model/CLIP state dicts (``diffusion_model.``, ``clip_l.``/``clip_g.``), diffusers pipeline and
    peft prefixes (``unet.``, ``text_encoder.``, ``text_encoder_2.``, ``vae.``), kohya module names
    (``lora_unet_`` ...) and bare diffusers/LDM UNet, Flux, HF CLIP and VAE keys.

    Component is one of "unet", "te", "te1", "te2", "vae", "other" ("te" is the single text encoder of SD1/SD2 -
    :func:`classify_key` with ``arch="sdxl"`` renames ComfyUI's ``clip_l`` to "te1"). Unrecognised keys give
    ``("other", key)``. Never raises. Rules live in :data:`COMPONENT_PREFIXES` and ``_BARE_RULES``.
    """
    for prefix, comp, repl in COMPONENT_PREFIXES:
        if key.startswith(prefix):
            rest = repl + key[len(prefix):]
            if prefix == "model." and not re.match(r"(?:double_blocks|single_blocks|img_in|txt_in|time_in|"
                                                   r"vector_in|guidance_in|final_layer)\.", rest):
                continue  # "model." alone is only Flux; "model_ema." etc. are "other"
            return comp, rest
    for pat, comp in _BARE_RULES:
        if pat.match(key):
            return comp, key
    return "other", key


def _block_of(rel: str, arch: str) -> str | None:
    for pat, fn in BLOCK_RULES:
        m = pat.match(rel)
        if m:
            b = fn(m, arch)
            if b is not None:
                return b
    return None


def _layer_type_of(component: str, rel: str) -> str:
    probe = "." + rel
    for comps, pat, template in LAYER_TYPE_RULES:
        if component in comps:
            m = pat.search(probe)
            if m:
                return m.expand(template) if "\\" in template else template
    return "other"


def classify_key(key: str, arch: str = "sd1") -> KeyInfo:
    """Classify a weight key (LDM, diffusers, ComfyUI or kohya spelling) into component, block and layer type.

    Args:
        key: e.g. ``"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"``,
            ``"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"``,
            ``"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"``, or
            ``"cond_stage_model.transformer.text_model.encoder.layers.3.self_attn.q_proj.weight"``.
        arch: "sd1" | "sd2" | "sdxl" | "flux" | "unknown"; selects block numbering (SDXL has IN00..IN08) and turns
            the text-encoder component "te" into "te1" for SDXL.

    Returns:
        :class:`KeyInfo`. ``block`` is ``None`` outside UNet/Flux blocks (time_embed, label_emb, out, text
        encoders, VAE); conv_in is ``"IN00"`` (it *is* input_blocks.0). Never raises: unknown keys give
        ``KeyInfo("other", None, "other")``.

    Source: block numbering of the LDM ``openaimodel.UNetModel`` (``input_blocks``/``middle_block``/
    ``output_blocks``), the same ids used by SuperMerger / sd-webui-lora-block-weight (IN00..OUT11).
    """
    component, rel = split_component(key)
    if component == "te" and arch == "sdxl":
        component = "te1"
    block = _block_of(rel, arch) if component == "unet" else None
    if block is not None and arch in BLOCK_IDS and block not in BLOCK_IDS[arch] and arch != "flux":
        block = None if not block.startswith(("IN", "OUT", "M")) else block
    return KeyInfo(component, block, _layer_type_of(component, rel))


# ---------------------------------------------------------------------------------------------------------------
# Architecture detection
# ---------------------------------------------------------------------------------------------------------------
_CTX_DIM_ARCH = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


def detect_architecture(keys: Iterable[str], shapes: Mapping[str, tuple] | None = None) -> str:
    """Guess the model family of a checkpoint or LoRA from its keys (and, where given, a few shapes).

    Args:
        keys: tensor names (checkpoint, ComfyUI state dict, diffusers UNet file or LoRA file).
        shapes: optional ``key -> shape``; used to read the cross-attention context dim (768 -> sd1, 1024 -> sd2,
            2048 -> sdxl) from an ``attn2.to_k`` weight (or its LoRA ``lora_down``) when the names alone are
            ambiguous.

    Returns:
        "sd1", "sd2", "sdxl", "flux" or "unknown". Never raises.

    Rules (in order): Flux double/single blocks -> "flux"; SDXL text-encoder / label_emb / ``lora_te2_`` /
    highest LDM input block 8 / diffusers down_blocks.2 with >1 transformer block -> "sdxl"; OpenCLIP
    ``cond_stage_model.model.`` -> "sd2"; then the context dim from ``shapes``; SD1-shaped UNet names -> "sd1".
    """
    keys = list(keys)
    ctx = None
    if shapes:
        for k in keys:
            if re.search(r"attn2[._]to_k(?:[._]weight|[._]lora_down[._]weight|[._]lora_A[._]weight|$)", k):
                shp = tuple(shapes.get(k, ()))
                if len(shp) >= 2:
                    ctx = int(shp[1])
                    break
    flux = sdxl = sd2 = unet_like = False
    max_in = -1
    for k in keys:
        if re.search(r"(?:^|[._])(?:double_blocks|single_blocks|single_transformer_blocks)[._]\d", k):
            flux = True
        elif re.search(r"(?:^|[._])(?:img_attn|txt_attn|img_mlp|txt_mlp|img_mod|txt_mod)[._]", k) or re.search(
                r"(?:^|[._])transformer_blocks[._]\d+[._](?:attn[._](?:add_[qkv]_proj|to_add_out)|ff_context|"
                r"norm1_context)[._]", k):  # a LoRA on Flux's double blocks only (diffusers / OneTrainer names)
            flux = True
        if (k.startswith(("conditioner.embedders.1.", "lora_te2_", "text_encoder_2.", "clip_g."))
                or re.search(r"(?:^|[._])(?:label_emb[._]0[._]0|add_embedding)[._]", k)
                or re.search(r"down_blocks[._]2[._]attentions[._]\d[._]transformer_blocks[._][1-9]", k)):
            sdxl = True
        if k.startswith("cond_stage_model.model.transformer."):
            sd2 = True
        m = re.search(r"(?:^|[._])input_blocks[._](\d+)[._]", k)
        if m:
            max_in = max(max_in, int(m[1]))
            unet_like = True
        if re.search(r"(?:^|[._])(?:down_blocks|up_blocks|mid_block|middle_block|output_blocks)[._]", k):
            unet_like = True
        if k.startswith(("cond_stage_model.transformer.", "lora_te_")):
            unet_like = True
    if flux:
        return "flux"
    if sdxl or (ctx == 2048):
        return "sdxl"
    if 0 <= max_in <= 8 and not any(re.search(r"(?:^|[._])down_blocks[._]3[._]", k) for k in keys):
        # SDXL LDM UNets stop at input_blocks.8 (SD1/SD2 go to 11). A partial file (LoRA) may not reach either end,
        # so only trust this when the file also has middle/output blocks beyond SD1's deepest attention block.
        if any(re.search(r"(?:^|[._])input_blocks[._][78][._]1[._]transformer_blocks[._][1-9]", k) for k in keys):
            return "sdxl"
    if sd2 or ctx == 1024:
        return "sd2"
    if ctx == 768:
        return "sd1"
    if unet_like:
        return "sd1"
    return "unknown"


# ---------------------------------------------------------------------------------------------------------------
# LDM <-> diffusers UNet names, computed with diffusers' own converter
# ---------------------------------------------------------------------------------------------------------------
# The original (LDM) UNet configs of the released models (from their v1-inference.yaml / v2-inference.yaml /
# sd_xl_base.yaml); create_unet_diffusers_config_from_ldm turns them into diffusers configs.
_LDM_UNET_PARAMS: dict[str, dict] = {
    "sd1": dict(in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1], num_res_blocks=2,
                channel_mult=[1, 2, 4, 4], num_heads=8, transformer_depth=1, context_dim=768),
    "sd2": dict(in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1], num_res_blocks=2,
                channel_mult=[1, 2, 4, 4], num_head_channels=64, transformer_depth=1, context_dim=1024,
                use_linear_in_transformer=True),
    "sdxl": dict(in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2], num_res_blocks=2,
                 channel_mult=[1, 2, 4], num_head_channels=64, transformer_depth=[1, 2, 10], context_dim=2048,
                 use_linear_in_transformer=True, num_classes="sequential", adm_in_channels=2816),
}


def _canon_arch(arch: str) -> str:
    a = (arch or "sd1").lower()
    if a in ("sd15", "sd1.5", "sd1.x", "sd14", "v1"):
        return "sd1"
    if a in ("sd21", "sd2.1", "sd2.x", "v2"):
        return "sd2"
    if a not in _LDM_UNET_PARAMS:
        raise ValueError(f"no LDM/diffusers UNet key map for architecture {arch!r}; use one of sd1, sd2, sdxl")
    return a


def unet_config_for(arch: str = "sd1") -> dict:
    """The diffusers ``UNet2DConditionModel`` config of an architecture, built by diffusers'
    ``create_unet_diffusers_config_from_ldm`` from the released model's LDM ``unet_config`` params.

    Raises ``ValueError`` for architectures without a UNet (flux, unknown).
    """
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    params = dict(_LDM_UNET_PARAMS[_canon_arch(arch)])
    original = {"model": {"params": {"unet_config": {"params": params},
                                     "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
    cfg = create_unet_diffusers_config_from_ldm(original, {}, image_size=None)
    return cfg


def ldm_unet_keys(arch: str = "sd1", unet_config: dict | None = None) -> list[str]:
    """All parameter names of the LDM (``openaimodel.UNetModel``) UNet of ``arch``, without prefix.

    Enumerated from the LDM config (model_channels, channel_mult, num_res_blocks, attention levels,
    transformer depth): the module layout of ``ldm/modules/diffusionmodules/openaimodel.py`` (ResBlock:
    in_layers.0/2, emb_layers.1, out_layers.0/3, skip_connection; SpatialTransformer: norm, proj_in,
    transformer_blocks.N.{attn1,attn2,ff,norm1-3}, proj_out; Downsample ``op``, Upsample ``conv``). No library
    exposes this list; its correctness is checked in :func:`ldm_to_diffusers_unet`, whose diffusers-converted
    names must equal a real ``UNet2DConditionModel``'s state-dict keys exactly.

    ``unet_config``: optional diffusers UNet config (``block_out_channels``, ``down_block_types``,
    ``layers_per_block``, ``transformer_layers_per_block``, ``addition_embed_type``) for non-standard UNets.
    """
    cfg = dict(unet_config) if unet_config is not None else unet_config_for(arch)
    chans = list(cfg["block_out_channels"])
    lpb = cfg["layers_per_block"]
    lpb = list(lpb) if isinstance(lpb, (list, tuple)) else [lpb] * len(chans)
    down_types = list(cfg["down_block_types"])
    tdepth = cfg.get("transformer_layers_per_block", 1)
    tdepth = list(tdepth) if isinstance(tdepth, (list, tuple)) else [tdepth] * len(chans)
    has_attn = ["CrossAttn" in t for t in down_types]
    keys: list[str] = []

    def wb(prefix: str) -> None:
        keys.extend((f"{prefix}.weight", f"{prefix}.bias"))

    def res(prefix: str, skip: bool) -> None:
        for leaf in ("in_layers.0", "in_layers.2", "emb_layers.1", "out_layers.0", "out_layers.3"):
            wb(f"{prefix}.{leaf}")
        if skip:
            wb(f"{prefix}.skip_connection")

    def st(prefix: str, depth: int) -> None:
        wb(f"{prefix}.norm")
        wb(f"{prefix}.proj_in")
        for t in range(depth):
            tb = f"{prefix}.transformer_blocks.{t}"
            for a in ("attn1", "attn2"):
                for p in ("to_q", "to_k", "to_v"):
                    keys.append(f"{tb}.{a}.{p}.weight")
                wb(f"{tb}.{a}.to_out.0")
            wb(f"{tb}.ff.net.0.proj")
            wb(f"{tb}.ff.net.2")
            for n in ("norm1", "norm2", "norm3"):
                wb(f"{tb}.{n}")
        wb(f"{prefix}.proj_out")

    wb("time_embed.0")
    wb("time_embed.2")
    if cfg.get("addition_embed_type") == "text_time" or cfg.get("class_embed_type") in ("projection", "timestep"):
        wb("label_emb.0.0")
        wb("label_emb.0.2")
    wb("input_blocks.0.0")
    n = 1
    ch_in = chans[0]
    skip_channels = [chans[0]]
    for level, ch in enumerate(chans):
        for _ in range(lpb[level]):
            res(f"input_blocks.{n}.0", ch_in != ch)
            if has_attn[level]:
                st(f"input_blocks.{n}.1", tdepth[level])
            ch_in = ch
            skip_channels.append(ch)
            n += 1
        if level != len(chans) - 1:
            wb(f"input_blocks.{n}.0.op")
            skip_channels.append(ch)
            n += 1
    res("middle_block.0", False)
    st("middle_block.1", tdepth[-1])
    res("middle_block.2", False)
    n = 0
    rev = list(reversed(chans))
    rev_attn = list(reversed(has_attn))
    rev_depth = list(reversed(tdepth))
    rev_lpb = list(reversed(lpb))
    for level, ch in enumerate(rev):
        for i in range(rev_lpb[level] + 1):
            skip_ch = skip_channels.pop()
            res(f"output_blocks.{n}.0", ch_in + skip_ch != ch)
            sub = 1
            if rev_attn[level]:
                st(f"output_blocks.{n}.1", rev_depth[level])
                sub = 2
            ch_in = ch
            if level != len(rev) - 1 and i == rev_lpb[level]:
                wb(f"output_blocks.{n}.{sub}.conv")
            n += 1
    wb("out.0")
    wb("out.2")
    return keys


def diffusers_unet_keys(arch: str = "sd1", unet_config: dict | None = None) -> list[str]:
    """State-dict keys of diffusers' ``UNet2DConditionModel`` for ``arch`` (built on the ``meta`` device).

    Raises ``ValueError`` for an architecture without a UNet (see :func:`unet_config_for`).
    """
    return list(_diffusers_unet_keys_cached(_canon_arch(arch)) if unet_config is None
                else _diffusers_keys_from_config(unet_config))


def _diffusers_keys_from_config(cfg: Mapping) -> tuple[str, ...]:
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = UNet2DConditionModel(**dict(cfg))
    return tuple(model.state_dict().keys())


@functools.lru_cache(maxsize=None)
def _diffusers_unet_keys_cached(arch: str) -> tuple[str, ...]:
    return _diffusers_keys_from_config(unet_config_for(arch))


def _compute_ldm_to_diffusers(cfg: dict, ldm_keys: list[str]) -> dict[str, str]:
    import torch
    from diffusers.loaders.single_file_utils import LDM_UNET_KEY, convert_ldm_unet_checkpoint

    # One distinct scalar per LDM key; the converter only renames entries, so each output value names its source.
    sd = {LDM_UNET_KEY + k: torch.tensor([float(i)]) for i, k in enumerate(ldm_keys)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = convert_ldm_unet_checkpoint(sd, cfg)
    mapping: dict[str, str] = {}
    for dk, t in out.items():
        if t is None:
            continue
        mapping[ldm_keys[int(t.item())]] = dk
    return mapping


@functools.lru_cache(maxsize=None)
def _ldm_to_diffusers_cached(arch: str) -> tuple[tuple[str, str], ...]:
    cfg = unet_config_for(arch)
    ldm = ldm_unet_keys(arch, cfg)
    mapping = _compute_ldm_to_diffusers(cfg, ldm)
    expected = set(_diffusers_unet_keys_cached(arch))
    got = set(mapping.values())
    if got != expected or len(mapping) != len(ldm):
        raise RuntimeError(
            f"LDM->diffusers UNet map for {arch} does not match diffusers' UNet2DConditionModel: "
            f"missing {sorted(expected - got)[:5]}, extra {sorted(got - expected)[:5]}, "
            f"unmapped LDM keys {sorted(set(ldm) - set(mapping))[:5]}")
    return tuple(mapping.items())


def ldm_to_diffusers_unet(arch: str = "sd1", unet_config: dict | None = None) -> dict[str, str]:
    """LDM UNet parameter key -> diffusers UNet parameter key, without prefixes.

    Example (sd1): ``"input_blocks.1.1.transformer_blocks.0.attn2.to_q.weight"`` ->
    ``"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q.weight"``.

    Args:
        arch: "sd1" | "sd2" | "sdxl".
        unet_config: optional diffusers UNet config for a non-standard UNet (not cached).

    Returns:
        A new dict covering every parameter of the UNet (686 keys for sd1, 1680 for sdxl).

    Raises:
        ValueError: unsupported architecture. RuntimeError: diffusers' converter disagrees with its own model class.

    Source: ``diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint`` run on a synthetic state dict of
    distinct scalars (the name map is read back from the values), cached per architecture.
    """
    if unet_config is not None:
        return _compute_ldm_to_diffusers(dict(unet_config), ldm_unet_keys(arch, unet_config))
    return dict(_ldm_to_diffusers_cached(_canon_arch(arch)))


def diffusers_to_ldm_unet(arch: str = "sd1", unet_config: dict | None = None) -> dict[str, str]:
    """Inverse of :func:`ldm_to_diffusers_unet`: diffusers UNet parameter key -> LDM UNet parameter key.

    Same arguments and errors (``ValueError`` for an unsupported architecture).
    """
    return {d: l for l, d in ldm_to_diffusers_unet(arch, unet_config).items()}


@functools.lru_cache(maxsize=None)
def _d2l_cached(arch: str) -> dict[str, str]:
    return {d: l for l, d in _ldm_to_diffusers_cached(arch)}


@functools.lru_cache(maxsize=None)
def _l2d_cached(arch: str) -> dict[str, str]:
    return dict(_ldm_to_diffusers_cached(arch))


# ---------------------------------------------------------------------------------------------------------------
# OpenCLIP (LDM) <-> HF CLIP names, computed with diffusers' convert_open_clip_checkpoint
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckpointTarget:
    """Where a module's weight lives in a single-file checkpoint.

    ``weight_key`` / ``bias_key``: full checkpoint keys (``bias_key`` may not exist in the file, e.g. to_q has no
    bias). ``rows``: ``(start, stop)`` row slice of ``weight_key`` (and ``bias_key``) when the module is one part of
    a fused tensor (OpenCLIP ``attn.in_proj_weight`` holds q, k and v); ``None`` for whole tensors.
    ``transpose``: the checkpoint stores the weight transposed (OpenCLIP ``text_projection``).
    ``total_rows``: rows of the fused tensor when ``rows`` is set (``None``: three equal parts, OpenCLIP q/k/v;
    Flux ``linear1`` is ``[q; k; v; mlp]``). ``swap_halves``: the module's tensor is the checkpoint's with its two
    halves (dim 0) swapped (diffusers ``norm_out.linear`` of Flux, see ``formats.flux_keys``).
    """

    weight_key: str
    bias_key: str | None
    rows: tuple[int, int] | None = None
    transpose: bool = False
    total_rows: int | None = None
    swap_halves: bool = False


_OPENCLIP_WIDTH = {"sd2": (1024, 24), "sdxl": (1280, 32)}


@functools.lru_cache(maxsize=None)
def openclip_ldm_to_hf(width: int, layers: int) -> dict[str, tuple[str, tuple[int, int] | None, bool]]:
    """HF CLIP parameter name (``text_model.encoder.layers.0.self_attn.q_proj.weight``) -> (OpenCLIP LDM name
    relative to the ``model.`` prefix, row slice or None, transposed) for an OpenCLIP text tower of ``width`` and
    ``layers``.

    Source: ``diffusers.loaders.single_file_utils.convert_open_clip_checkpoint``, run on distinct tensors; fused
    ``in_proj_weight`` rows are identified by value. Raises ``RuntimeError`` if diffusers' output is not understood.
    """
    import types

    import torch
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    prefix = "conditioner.embedders.1.model."  # not cond_stage_model.model. (diffusers drops SD2's last layer there)
    names = ["positional_embedding", "token_embedding.weight", "ln_final.weight", "ln_final.bias", "text_projection"]
    for i in range(layers):
        r = f"transformer.resblocks.{i}."
        names += [r + s for s in ("attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
                                  "attn.out_proj.bias", "ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias",
                                  "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")]
    sd = {}
    big = 3 * width
    for idx, n in enumerate(names):
        if n.endswith(("in_proj_weight", "in_proj_bias")):
            t = (idx * big + torch.arange(big, dtype=torch.float64))
            sd[prefix + n] = t[:, None] if n.endswith("weight") else t
        elif n == "text_projection":
            sd[prefix + n] = torch.full((width, 1), float(idx * big), dtype=torch.float64)
        else:
            sd[prefix + n] = torch.full((1,), float(idx * big), dtype=torch.float64)
    fake_model = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=width))
    out = convert_open_clip_checkpoint(fake_model, sd, prefix=prefix)
    result = {}
    for hf, t in out.items():
        first = int(t.reshape(-1)[0].item())
        src = names[first // big]
        off = first - (first // big) * big
        if src.endswith(("in_proj_weight", "in_proj_bias")):
            n_rows = t.shape[0]
            result[hf] = (src, (off, off + n_rows), False)
        else:
            result[hf] = (src, None, src == "text_projection")
    if not any(k.endswith("q_proj.weight") for k in result):
        raise RuntimeError("diffusers convert_open_clip_checkpoint output not understood")
    return result


# ---------------------------------------------------------------------------------------------------------------
# kohya LoRA names
# ---------------------------------------------------------------------------------------------------------------
KOHYA_PREFIXES = {"unet": "lora_unet_", "te": "lora_te_", "te1": "lora_te1_", "te2": "lora_te2_"}

CHECKPOINT_PREFIXES = {
    # single-file LDM prefixes per (arch, component); te2 / sd2-te are OpenCLIP (LDM names, see CheckpointTarget)
    ("sd1", "unet"): "model.diffusion_model.", ("sd2", "unet"): "model.diffusion_model.",
    ("sdxl", "unet"): "model.diffusion_model.", ("flux", "unet"): "model.diffusion_model.",
    ("sd1", "te"): "cond_stage_model.transformer.", ("sd2", "te"): "cond_stage_model.model.",
    ("sdxl", "te1"): "conditioner.embedders.0.transformer.", ("sdxl", "te2"): "conditioner.embedders.1.model.",
    ("sd1", "vae"): "first_stage_model.", ("sd2", "vae"): "first_stage_model.", ("sdxl", "vae"): "first_stage_model.",
    # Flux (ComfyUI CheckpointSave: text_encoder_key_prefix "text_encoders.", kohya lora_flux names CLIP-L lora_te1_)
    ("flux", "te1"): "text_encoders.clip_l.transformer.", ("flux", "vae"): "vae.",
}

_TE_ROOTS = ("encoder.", "embeddings.", "final_layer_norm")


def normalize_te_path(module_path: str) -> str:
    """Give a CLIP text-model module path the ``text_model.`` level kohya and ComfyUI expect.

    transformers 5.x ``CLIPTextModel`` names its modules ``encoder.layers.0.self_attn.q_proj`` (no ``text_model.``
    level) while kohya names, ComfyUI and single-file checkpoints use ``text_model.encoder.layers.0...``; a
    leading ``text_encoder.`` / ``text_encoder_2.`` (diffusers pipeline) is dropped. Other paths are unchanged.
    """
    p = module_path
    for pre in ("text_encoder_2.", "text_encoder."):
        if p.startswith(pre):
            p = p[len(pre):]
    if p.startswith(_TE_ROOTS):
        p = "text_model." + p
    return p


def kohya_lora_name(component: str, module_path: str) -> str:
    """kohya LoRA module name for a module path.

    ``("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q")`` ->
    ``"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q"``;
    ``("te", "text_model.encoder.layers.0.self_attn.q_proj")`` -> ``"lora_te_text_model_encoder_layers_0_self_attn_q_proj"``
    (a transformers-5 path without ``text_model.`` gets it added, see :func:`normalize_te_path`); "te1"/"te2" give
    ``lora_te1_`` / ``lora_te2_``. A trailing ``.weight`` and a ``unet.`` / ``diffusion_model.`` prefix are removed.
    UNet paths are used as given: diffusers names for SD1/SD2 (kohya's SD1 trainer), LDM names are also accepted
    by ComfyUI and diffusers (kohya's SDXL trainer writes ``lora_unet_input_blocks_4_1_...``).

    Raises ``ValueError`` for an unknown component. Source: kohya-ss/sd-scripts ``networks/lora.py``
    (``lora_name = prefix + "." + name`` then ``.replace(".", "_")``).
    """
    if component not in KOHYA_PREFIXES:
        raise ValueError(f"no kohya prefix for component {component!r}; use one of {sorted(KOHYA_PREFIXES)}")
    p = module_path
    if p.endswith(".weight"):
        p = p[: -len(".weight")]
    if component == "unet":
        for pre in ("model.diffusion_model.", "diffusion_model.", "unet."):
            if p.startswith(pre):
                p = p[len(pre):]
    else:
        p = normalize_te_path(p)
    return KOHYA_PREFIXES[component] + p.replace(".", "_")


def _module_paths_from_params(params: Iterable[str]) -> set[str]:
    out = set()
    for k in params:
        for suf in (".weight", ".bias"):
            if k.endswith(suf):
                out.add(k[: -len(suf)])
    return out


def _hf_clip_module_paths(layers: int = 32) -> set[str]:
    paths = {"text_model.embeddings.token_embedding", "text_model.embeddings.position_embedding",
             "text_model.final_layer_norm", "text_projection"}
    for i in range(layers):
        b = f"text_model.encoder.layers.{i}."
        paths.update(b + s for s in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                     "self_attn.out_proj", "mlp.fc1", "mlp.fc2", "layer_norm1", "layer_norm2"))
    return paths


@functools.lru_cache(maxsize=None)
def known_module_paths(component: str) -> frozenset[str]:
    """Module paths (no ``.weight``) kohya names can refer to: for "unet" the diffusers *and* LDM module paths of
    SD1, SD2 and SDXL; for text encoders the HF CLIP text-model paths (up to 32 layers)."""
    if component == "unet":
        paths: set[str] = set()
        for arch in ("sd1", "sdxl"):
            paths |= _module_paths_from_params(k for pair in _ldm_to_diffusers_cached(arch) for k in pair)
        return frozenset(paths)
    if component in ("te", "te1", "te2"):
        return frozenset(_hf_clip_module_paths())
    return frozenset()


# multi-word tokens restored when un-underscoring a kohya name that is not in any known path table
_COMPOUND_TOKENS = sorted({
    "down_blocks", "up_blocks", "mid_block", "input_blocks", "middle_block", "output_blocks", "transformer_blocks",
    "single_transformer_blocks", "double_blocks", "single_blocks", "to_q", "to_k", "to_v", "to_out", "proj_in",
    "proj_out", "conv_in", "conv_out", "conv_norm_out", "conv_shortcut", "time_emb_proj", "time_embedding",
    "time_embed", "label_emb", "add_embedding", "in_layers", "out_layers", "emb_layers", "skip_connection",
    "linear_1", "linear_2", "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "layer_norm1",
    "layer_norm2", "final_layer_norm", "token_embedding", "position_embedding", "text_projection", "img_attn",
    "txt_attn", "img_mlp", "txt_mlp", "img_mod", "txt_mod", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff_context", "proj_mlp",
}, key=len, reverse=True)


def _heuristic_unkohya(rest: str) -> str:
    s = rest
    placeholders = {}
    for i, tok in enumerate(_COMPOUND_TOKENS):
        ph = f"\x00{i}\x00"
        pat = re.compile(rf"(?:(?<=_)|^){re.escape(tok)}(?=_|$)")
        if pat.search(s):
            s = pat.sub(ph, s)
            placeholders[ph] = tok
    s = s.replace("_", ".")
    for ph, tok in placeholders.items():
        s = s.replace(ph, tok)
    return s


def parse_kohya_lora_name(name: str, known_paths: Iterable[str] | None = None) -> tuple[str, str]:
    """Inverse of :func:`kohya_lora_name`: ``"lora_unet_down_blocks_0_..._attn2_to_q"`` ->
    ``("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q")``.

    ``_`` is ambiguous (``to_q`` vs ``.``), so the name is looked up among module paths: ``known_paths`` when
    given (e.g. the module names of the model being patched), else :func:`known_module_paths` (SD1/SD2/SDXL UNet
    in diffusers and LDM spelling, HF CLIP text model). A suffix such as ``.lora_down.weight`` is ignored.

    Raises:
        ValueError: not a kohya name (no ``lora_unet_`` / ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` prefix),
            or ``known_paths`` was given and none matches.
    Without ``known_paths``, a name outside the built-in tables is decoded heuristically (``_`` -> ``.`` except
    inside known multi-word tokens such as ``transformer_blocks``).
    """
    base = name.split(".", 1)[0]
    for comp, pre in (("te1", "lora_te1_"), ("te2", "lora_te2_"), ("te", "lora_te_"), ("unet", "lora_unet_")):
        if base.startswith(pre):
            rest = base[len(pre):]
            break
    else:
        raise ValueError(f"{name!r} is not a kohya LoRA name (expected a lora_unet_ / lora_te_ / lora_te1_ / "
                         "lora_te2_ prefix)")
    if known_paths is not None:
        table = {normalize_te_path(p).replace(".", "_") if comp != "unet" else p.replace(".", "_"):
                 (normalize_te_path(p) if comp != "unet" else p) for p in known_paths}
        if rest in table:
            return comp, table[rest]
        raise ValueError(f"kohya name {base!r} matches none of the {len(table)} known module paths")
    table = _kohya_table(comp)
    if rest in table:
        return comp, table[rest]
    return comp, _heuristic_unkohya(rest)


@functools.lru_cache(maxsize=None)
def _kohya_table(component: str) -> dict[str, str]:
    return {p.replace(".", "_"): p for p in known_module_paths(component)}


def checkpoint_key(component: str, rel_key: str, arch: str) -> str:
    """Full single-file checkpoint key for a component-relative key (LDM names for the UNet).

    ``component`` as :data:`CHECKPOINT_PREFIXES` names it (``"unet"``, ``"vae"``, ``"te"``, ``"te1"``, ``"te2"``);
    ``arch`` ``None``/``"unknown"`` is treated as ``"sd1"``. Raises ``ValueError`` when the architecture has no
    prefix for that component (e.g. ``"te2"`` in sd1).
    """
    pre = CHECKPOINT_PREFIXES.get((_arch_or_sd1(arch), component))
    if pre is None:
        raise ValueError(f"no checkpoint prefix for component {component!r} in architecture {arch!r}")
    return pre + rel_key


def _arch_or_sd1(arch: str | None) -> str:
    a = (arch or "sd1").lower()
    return {"sd15": "sd1", "sd1.5": "sd1", "sd21": "sd2", "unknown": "sd1"}.get(a, a)


def unet_checkpoint_target(path: str, arch: str) -> CheckpointTarget:
    """Single-file checkpoint keys of a UNet module given by its LDM *or* diffusers module path.

    ``path``: module path without ``.weight`` (``"input_blocks.1.1.transformer_blocks.0.attn2.to_q"`` or
    ``"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"``); ``arch``: ``"sd1" | "sd2" | "sdxl" |
    "flux"`` (``None``/``"unknown"`` = sd1). Flux paths are taken as BFL names as they are. Returns the
    :class:`CheckpointTarget` (``model.diffusion_model.<ldm path>.weight`` / ``.bias``).
    Raises ``ValueError`` when the module does not exist in that architecture's UNet.
    """
    arch = _arch_or_sd1(arch)
    if arch == "flux":
        return CheckpointTarget(f"model.diffusion_model.{path}.weight", f"model.diffusion_model.{path}.bias")
    carch = _canon_arch(arch)
    w = path + ".weight"
    if w in _l2d_cached(carch):
        ldm = path
    elif w in _d2l_cached(carch):
        ldm = _d2l_cached(carch)[w][: -len(".weight")]
    else:
        raise ValueError(f"UNet module {path!r} does not exist in an {arch} UNet")
    pre = CHECKPOINT_PREFIXES[(carch, "unet")]
    return CheckpointTarget(f"{pre}{ldm}.weight", f"{pre}{ldm}.bias")


def kohya_target(name: str, arch: str, known_paths: Iterable[str] | None = None) -> CheckpointTarget:
    """Resolve a kohya LoRA module name to the single-file (LDM) checkpoint tensor(s) it patches.

    Args:
        name: e.g. ``"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q"`` (diffusers spelling)
            or ``"lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_q"`` (LDM spelling, kohya SDXL), or
            ``"lora_te2_text_model_encoder_layers_0_self_attn_q_proj"``.
        arch: "sd1" | "sd2" | "sdxl" ("unknown" is treated as sd1).

    Returns:
        :class:`CheckpointTarget`; for OpenCLIP text encoders (SD2 te, SDXL te2) q/k/v resolve to a row slice of
        the fused ``attn.in_proj_weight``.

    Raises:
        ValueError: not a kohya name, unsupported architecture/component, or a module the checkpoint lacks.
    """
    arch = _arch_or_sd1(arch)
    comp, path = parse_kohya_lora_name(name, known_paths)
    if comp == "te" and arch == "sdxl":
        comp = "te1"
    if comp == "unet":
        try:
            return unet_checkpoint_target(path, arch)
        except ValueError as exc:
            raise ValueError(f"kohya name {name!r}: {exc}") from None
    if comp in ("te1", "te2") and arch != "sdxl" and (arch, comp) != ("flux", "te1"):
        raise ValueError(f"kohya name {name!r} is for an SDXL text encoder but the architecture is {arch}")
    if comp == "te" and arch not in ("sd1", "sd2"):
        raise ValueError(f"kohya name {name!r} (lora_te_) does not fit architecture {arch}")
    pre = CHECKPOINT_PREFIXES[(arch, comp)]
    openclip = (arch == "sd2" and comp == "te") or comp == "te2"
    if not openclip:
        return CheckpointTarget(f"{pre}{path}.weight", f"{pre}{path}.bias")
    width, layers = _OPENCLIP_WIDTH[arch]
    table = openclip_ldm_to_hf(width, layers)
    hfw = path + ".weight"
    if hfw not in table:
        raise ValueError(f"kohya name {name!r}: {path!r} has no OpenCLIP counterpart")
    src, rows, transpose = table[hfw]
    bias = table.get(path + ".bias")
    return CheckpointTarget(pre + src, pre + bias[0] if bias else None, rows, transpose)


def kohya_name_to_checkpoint_key(name: str, arch: str) -> str:
    """kohya LoRA module name -> single-file LDM checkpoint weight key without ``.weight``.

    ``("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q", "sd1")`` ->
    ``"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_q"``;
    ``lora_te_text_model_encoder_layers_0_self_attn_q_proj`` (sd1) ->
    ``"cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj"``.

    For OpenCLIP q/k/v (SD2 te, SDXL te2) the weight is a row slice of a fused tensor whose key does not end in
    ``.weight`` (``...attn.in_proj_weight``); this returns that key unchanged - use :func:`kohya_target` to get
    the slice. Raises ``ValueError`` like :func:`kohya_target`.
    """
    t = kohya_target(name, arch)
    return t.weight_key[: -len(".weight")] if t.weight_key.endswith(".weight") else t.weight_key
