"""kohya LoRA names (``lora_unet_...``, ``lora_te_...``, ``lora_te1_...``, ``lora_te2_...``) and their checkpoint
targets (:class:`CheckpointTarget`: the single-file key, row slice of a fused tensor, transposition), matching the key
map ComfyUI builds in ``comfy/lora.py`` (``model_lora_keys_unet`` / ``model_lora_keys_clip``) and diffusers'
``_convert_non_diffusers_lora_to_diffusers``.

UNet and OpenCLIP names go through :mod:`formats.ldm_keys` (diffusers' own converters); Flux module paths are BFL
names (:mod:`formats.flux_keys`). Nothing here reads tensors from disk or imports ComfyUI.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Iterable

from .ldm_keys import (_OPENCLIP_WIDTH, _canon_arch, _d2l_cached, _l2d_cached, _ldm_to_diffusers_cached,
                       openclip_ldm_to_hf)

__all__ = ["CheckpointTarget", "KOHYA_PREFIXES", "CHECKPOINT_PREFIXES", "normalize_te_path", "kohya_lora_name",
           "known_module_paths", "parse_kohya_lora_name", "checkpoint_key", "kohya_target",
           "kohya_name_to_checkpoint_key"]


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
