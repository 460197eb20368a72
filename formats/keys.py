"""Key classification for Stable Diffusion / Flux weight files: which model, which component, block and layer type.

What lives here:

* :func:`detect_architecture` - ``"sd1" | "sd2" | "sdxl" | "flux" | "unknown"`` from key names (+ a few shapes).
* :func:`split_component` - checkpoint key -> (component, key without the component prefix).
* :func:`classify_key` -> :class:`KeyInfo` (component, block id ``IN00``..``OUT11`` / ``D00`` / ``S00``, layer type),
  driven by the ordered regex tables :data:`COMPONENT_PREFIXES`, :data:`BLOCK_RULES` and :data:`LAYER_TYPE_RULES`
  (extend a table to teach the classifier a new layout).

The name maps live beside it: LDM <-> diffusers UNet and OpenCLIP <-> HF CLIP names, computed by diffusers' own
converters, in :mod:`formats.ldm_keys`; kohya LoRA names and their checkpoint targets in :mod:`formats.kohya_keys`;
Flux (BFL / ComfyUI / diffusers checkpoint layouts, every LoRA naming, fused q/k/v, ModelMergeFlux1 groups, kohya
``lora_flux`` modules) in :mod:`formats.flux_keys`; this module routes Flux keys there.

Nothing here reads tensors from disk or imports ComfyUI.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

__all__ = [
    "ARCHITECTURES", "BLOCK_IDS", "COMPONENTS", "KeyInfo", "detect_architecture", "split_component", "classify_key",
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


def _last_out(arch: str) -> str | None:
    return BLOCK_IDS[arch][-1] if arch in ("sd1", "sd2", "sdxl") else None


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
    # the final GroupNorm + conv_out (LDM ``out.0`` / ``out.2``) belong to the last OUT block, as in supermerger
    # (``blockfromkey``: ``'.out.' in key`` -> OUT11 / XL "OUT08") and sd-mecha (``convert_sd1_blocks.py``,
    # ``convert_sdxl_blocks.py``). time_embed / label_emb stay outside the blocks (BASE), as in sd-mecha;
    # supermerger maps them to IN00 -- the references disagree (README "Merge conventions").
    (re.compile(r"^(?:out|conv_norm_out|conv_out)[._]"), lambda m, a: _last_out(a)),
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
        :class:`KeyInfo`. ``block`` is ``None`` outside UNet/Flux blocks (time_embed, label_emb, text
        encoders, VAE); conv_in is ``"IN00"`` (it *is* input_blocks.0); the output layer (``out.0``/``out.2``,
        diffusers ``conv_norm_out``/``conv_out``) is the last OUT block (OUT11; SDXL OUT08), as in supermerger and
        sd-mecha (``tests/data/merge_block_tables.json``, regenerated by ``tests/tools/merge_block_tables.py``). Never raises: unknown keys give
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
