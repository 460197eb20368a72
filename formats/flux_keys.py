"""Flux.1 key names in every layout users exchange, mapped to one canonical layout.

Canonical layout: the BFL / ComfyUI parameter names (``double_blocks.N.img_attn.qkv.weight``,
``single_blocks.N.linear1.weight`` ...) under the single-file prefix ``model.diffusion_model.`` -- the names kohya's
``networks/lora_flux.py`` and ComfyUI use, and the keys :func:`formats.lora_files.lora_deltas` returns.

Layouts read (checkpoints):

* BFL: bare ``double_blocks.*`` (``flux1-dev.safetensors`` as Black Forest Labs ships it), or with a ``model.``
  prefix;
* ComfyUI: ``model.diffusion_model.*`` (CheckpointSave) and ``diffusion_model.*`` (a ModelPatcher state dict);
* diffusers: ``FluxTransformer2DModel`` names (``transformer_blocks.N.attn.to_q`` with q / k / v split,
  ``single_transformer_blocks.N.{attn.to_q,...,proj_mlp,proj_out}``, ``x_embedder`` ...), bare (a ``transformer/``
  folder or a single file) or ``transformer.``-prefixed.

The diffusers <-> BFL map is a data table (:data:`DOUBLE_BLOCK_MODULES`, :data:`SINGLE_BLOCK_MODULES`,
:data:`GLOBAL_MODULES`, norms): it is the map of diffusers' ``convert_flux_transformer_checkpoint_to_diffusers``
(``diffusers/loaders/single_file_utils.py``) and of ComfyUI's ``flux_to_diffusers`` (``comfy/utils.py``, lines
568-672 in 0.3.64), and the tests run both beside it. Fused tensors: ``img_attn.qkv`` / ``txt_attn.qkv`` are
``[q; k; v]`` along dim 0 (``hidden`` rows each); ``single_blocks.N.linear1`` is ``[q; k; v; mlp]`` (``hidden`` x 3 +
``mlp_hidden`` rows); ``final_layer.adaLN_modulation.1`` is diffusers' ``norm_out.linear`` with its two halves
swapped (BFL ``[shift; scale]``, diffusers ``[scale; shift]``).

LoRA module names (:func:`flux_lora_target`): kohya ``lora_unet_double_blocks_0_img_attn_qkv`` (and
``lora_unet_single_blocks_0_linear1`` ...), ComfyUI ``diffusion_model.double_blocks.0.img_attn.qkv`` / bare BFL paths /
``single_blocks.N.linear1_qkv``, diffusers / ai-toolkit / peft ``transformer.transformer_blocks.0.attn.to_q``,
OneTrainer ``lora_transformer_transformer_blocks_0_attn_to_q``, SimpleTuner ``lycoris_transformer_blocks_0_attn_to_q``
-- the spellings ComfyUI's ``model_lora_keys_unet`` accepts for Flux (``comfy/lora.py`` 174-266). A split q/k/v
module resolves to a row slice of the fused canonical weight, so a split LoRA becomes the block-concatenated ΔW.

Also here: per-block merge groups as ComfyUI's ``ModelMergeFlux1`` names them (:data:`MERGE_BLOCKS`,
:func:`merge_block`), and kohya ``lora_flux`` module names / targets for a canonical state dict
(:func:`kohya_lora_modules`). No library offers these maps without loading a model (diffusers' converters work on
full-size tensors and hard-code Flux.1's width; ComfyUI's need a model config and ComfyUI), hence the tables.
Readers that serve one layout under another's names and whole-state-dict conversions are in
:mod:`formats.flux_views`. Nothing here imports ComfyUI or reads files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import torch

__all__ = [
    "CANONICAL_PREFIX", "FluxDims", "Piece", "DOUBLE_BLOCK_MODULES", "SINGLE_BLOCK_MODULES", "GLOBAL_MODULES",
    "DOUBLE_BLOCK_NORMS", "SINGLE_BLOCK_NORMS", "BFL_ROOTS", "is_flux_key", "flux_layout", "infer_dims",
    "piece_of", "canonical_key", "diffusers_pieces", "flux_lora_target", "T5_PREFIX", "t5_lora_target",
    "MERGE_BLOCKS", "merge_block", "block_id", "block_ids", "merge_name_to_block_id", "kohya_lora_modules",
    "parse_block_selection",
]

CANONICAL_PREFIX = "model.diffusion_model."
"""Prefix of canonical keys (ComfyUI CheckpointSave / single-file layout)."""

# ---------------------------------------------------------------------------------------------------------------
# Tables: diffusers module (relative to its block) -> (BFL module, part of the fused BFL tensor or None)
# ---------------------------------------------------------------------------------------------------------------
DOUBLE_BLOCK_MODULES: dict[str, tuple[str, int | None]] = {
    "attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
    "attn.to_out.0": ("img_attn.proj", None), "attn.to_add_out": ("txt_attn.proj", None),
    "norm1.linear": ("img_mod.lin", None), "norm1_context.linear": ("txt_mod.lin", None),
    "ff.net.0.proj": ("img_mlp.0", None), "ff.net.2": ("img_mlp.2", None),
    "ff_context.net.0.proj": ("txt_mlp.0", None), "ff_context.net.2": ("txt_mlp.2", None),
}
"""``transformer_blocks.N.<diffusers>`` -> ``double_blocks.N.<BFL>`` (Linear modules: ``.weight`` and ``.bias``)."""

SINGLE_BLOCK_MODULES: dict[str, tuple[str, int | None]] = {
    "attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2),
    "proj_mlp": ("linear1", 3), "proj_out": ("linear2", None), "norm.linear": ("modulation.lin", None),
}
"""``single_transformer_blocks.N.<diffusers>`` -> ``single_blocks.N.<BFL>``."""

DOUBLE_BLOCK_NORMS = {"attn.norm_q.weight": "img_attn.norm.query_norm.scale",
                      "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
                      "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
                      "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale"}
SINGLE_BLOCK_NORMS = {"attn.norm_q.weight": "norm.query_norm.scale", "attn.norm_k.weight": "norm.key_norm.scale"}

GLOBAL_MODULES: dict[str, tuple[str, bool]] = {
    "x_embedder": ("img_in", False), "context_embedder": ("txt_in", False),
    "time_text_embed.timestep_embedder.linear_1": ("time_in.in_layer", False),
    "time_text_embed.timestep_embedder.linear_2": ("time_in.out_layer", False),
    "time_text_embed.text_embedder.linear_1": ("vector_in.in_layer", False),
    "time_text_embed.text_embedder.linear_2": ("vector_in.out_layer", False),
    "time_text_embed.guidance_embedder.linear_1": ("guidance_in.in_layer", False),
    "time_text_embed.guidance_embedder.linear_2": ("guidance_in.out_layer", False),
    "proj_out": ("final_layer.linear", False),
    "norm_out.linear": ("final_layer.adaLN_modulation.1", True),  # True: halves swapped (shift/scale order)
}
"""Diffusers module outside the blocks -> (BFL module, halves swapped)."""

BFL_ROOTS = ("double_blocks", "single_blocks", "img_in", "txt_in", "time_in", "vector_in", "guidance_in",
             "final_layer")
_BFL_RE = re.compile(r"^(?:%s)\." % "|".join(BFL_ROOTS))
_DIFF_ROOTS = ("transformer_blocks", "single_transformer_blocks", "x_embedder", "context_embedder",
               "time_text_embed", "norm_out", "proj_out")
_CKPT_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "model.")
_FUSED_PARTS = {"img_attn.qkv": 3, "txt_attn.qkv": 3, "linear1": 4}

_B2D_DOUBLE: dict[str, list[tuple[str, int | None]]] = {}
for _d, (_b, _p) in DOUBLE_BLOCK_MODULES.items():
    _B2D_DOUBLE.setdefault(_b, []).append((_d, _p))
_B2D_SINGLE: dict[str, list[tuple[str, int | None]]] = {}
for _d, (_b, _p) in SINGLE_BLOCK_MODULES.items():
    _B2D_SINGLE.setdefault(_b, []).append((_d, _p))
_B2D_GLOBAL = {b: (d, s) for d, (b, s) in GLOBAL_MODULES.items()}


@dataclass(frozen=True)
class FluxDims:
    """Widths that place the parts of fused tensors: ``hidden`` (3072 in Flux.1) and ``mlp_hidden``
    (``mlp_ratio`` x hidden = 12288)."""

    hidden: int = 3072
    mlp_hidden: int = 12288

    def part_sizes(self, bfl_module: str) -> tuple[int, ...] | None:
        """Row sizes of the parts of a fused BFL module (``img_attn.qkv`` -> ``(h, h, h)``, ``linear1`` ->
        ``(h, h, h, mlp)``; the block prefix may be included); ``None`` for unfused modules."""
        tail = re.sub(r"^(?:double|single)_blocks\.\d+\.", "", bfl_module)
        n = _FUSED_PARTS.get(tail)
        if n is None:
            return None
        h = self.hidden
        return (h, h, h) if n == 3 else (h, h, h, self.mlp_hidden)

    def rows(self, bfl_module: str, parts: tuple[int, ...]) -> tuple[int, int, int]:
        """``(start, stop, total)`` rows of the contiguous ``parts`` of a fused module."""
        sizes = self.part_sizes(bfl_module)
        if sizes is None:
            raise ValueError(f"{bfl_module!r} is not a fused Flux module")
        start = sum(sizes[: parts[0]])
        stop = sum(sizes[: parts[-1] + 1])
        return start, stop, sum(sizes)


@dataclass(frozen=True)
class Piece:
    """Where a tensor of some layout lives in the canonical layout.

    ``canonical``: canonical key (``model.diffusion_model.double_blocks.0.img_attn.qkv.weight``); ``rows``:
    ``(start, stop)`` row slice of it, ``None`` for the whole tensor; ``total``: row count of the canonical tensor
    when ``rows`` is set; ``swap``: the tensor is the canonical one with its two halves (dim 0) swapped.
    """

    canonical: str
    rows: tuple[int, int] | None = None
    total: int | None = None
    swap: bool = False

    def cut(self, full: torch.Tensor) -> torch.Tensor:
        """This piece of the canonical tensor ``full``."""
        t = full
        if self.rows is not None:
            t = t[self.rows[0]: self.rows[1]]
        if self.swap:
            t = _swap(t)
        return t


def _swap(t: torch.Tensor) -> torch.Tensor:
    if t.shape[0] % 2:
        raise ValueError(f"cannot swap the halves of a tensor with {t.shape[0]} rows")
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


# ---------------------------------------------------------------------------------------------------------------
# classification
# ---------------------------------------------------------------------------------------------------------------
def _strip_prefix(key: str) -> str:
    for pre in _CKPT_PREFIXES:
        if key.startswith(pre):
            return key[len(pre):]
    return key


def _diffusers_to_bfl_param(rel: str) -> tuple[str, int | None, bool] | None:
    """diffusers parameter name -> (BFL parameter name, part index, swapped) or None."""
    m = re.match(r"^(single_transformer_blocks|transformer_blocks)\.(\d+)\.(.+)\.(weight|bias)$", rel)
    if m:
        kind, i, mod, leaf = m.groups()
        single = kind == "single_transformer_blocks"
        root = f"{'single' if single else 'double'}_blocks.{i}."
        norms = SINGLE_BLOCK_NORMS if single else DOUBLE_BLOCK_NORMS
        if f"{mod}.{leaf}" in norms:
            return root + norms[f"{mod}.{leaf}"], None, False
        table = SINGLE_BLOCK_MODULES if single else DOUBLE_BLOCK_MODULES
        if mod in table:
            b, part = table[mod]
            return f"{root}{b}.{leaf}", part, False
        return None
    m = re.match(r"^(.+)\.(weight|bias)$", rel)
    if m and m[1] in GLOBAL_MODULES:
        b, swap = GLOBAL_MODULES[m[1]]
        return f"{b}.{m[2]}", None, swap
    return None


def is_flux_key(key: str) -> bool:
    """True when ``key`` (any prefix of :data:`_CKPT_PREFIXES` or none) names a Flux transformer parameter in BFL
    or diffusers spelling."""
    rel = _strip_prefix(key)
    return bool(_BFL_RE.match(rel)) or _diffusers_to_bfl_param(rel) is not None


def piece_of(key: str, dims: FluxDims) -> Piece | None:
    """Canonical :class:`Piece` of a checkpoint key in any Flux layout, or ``None`` for a non-Flux key (text
    encoder, VAE, ``model_ema`` ...). ``dims`` places q / k / v / mlp rows in fused tensors."""
    rel = _strip_prefix(key)
    if _BFL_RE.match(rel) and not re.match(r"^(?:double|single)_blocks\.\d+\.(?:.*_qkv)$", rel):
        return Piece(CANONICAL_PREFIX + rel)
    hit = _diffusers_to_bfl_param(rel)
    if hit is None:
        return None
    bfl, part, swap = hit
    if part is None:
        return Piece(CANONICAL_PREFIX + bfl, swap=swap)
    start, stop, total = dims.rows(bfl.rsplit(".", 1)[0], (part,))
    return Piece(CANONICAL_PREFIX + bfl, (start, stop), total)


def canonical_key(key: str) -> str | None:
    """Canonical key of a whole (unfused-in-both-layouts or BFL) key, e.g. ``diffusion_model.img_in.weight`` ->
    ``model.diffusion_model.img_in.weight``; for a split diffusers q/k/v/mlp key the fused tensor's key."""
    p = piece_of(key, FluxDims())
    return None if p is None else p.canonical


def flux_layout(keys: Iterable[str]) -> str:
    """Name the layout of a Flux checkpoint: ``"bfl"`` (bare BFL names), ``"bfl_model"`` (``model.``),
    ``"comfyui"`` (``model.diffusion_model.``), ``"comfyui_state"`` (``diffusion_model.``), ``"diffusers"`` (bare
    diffusers names), ``"diffusers_prefixed"`` (``transformer.``), another ``"<prefix>+<bfl|diffusers>"`` label for
    unusual prefixes, ``"mixed"`` when the Flux keys disagree, ``"none"`` without Flux keys. Non-Flux keys (text
    encoders, VAE) are ignored. Never raises."""
    names = {("", "bfl"): "bfl", ("model.", "bfl"): "bfl_model", ("model.diffusion_model.", "bfl"): "comfyui",
             ("diffusion_model.", "bfl"): "comfyui_state", ("", "diffusers"): "diffusers",
             ("transformer.", "diffusers"): "diffusers_prefixed"}
    seen = set()
    for k in keys:
        rel = _strip_prefix(k)
        if _BFL_RE.match(rel):
            spelling = "bfl"
        elif _diffusers_to_bfl_param(rel) is not None:
            spelling = "diffusers"
        else:
            continue
        prefix = k[: len(k) - len(rel)]
        seen.add(names.get((prefix, spelling), f"{prefix}+{spelling}"))
    if not seen:
        return "none"
    return seen.pop() if len(seen) == 1 else "mixed"


# ---------------------------------------------------------------------------------------------------------------
# widths
# ---------------------------------------------------------------------------------------------------------------
_H_OUT = re.compile(r"(?:img_attn\.proj|txt_attn\.proj|img_mlp\.2|txt_mlp\.2|linear2|img_in|txt_in|"
                    r"attn\.to_[qkv]|attn\.add_[qkv]_proj|attn\.to_out\.0|attn\.to_add_out|ff\.net\.2|"
                    r"ff_context\.net\.2|single_transformer_blocks\.\d+\.proj_out|x_embedder|context_embedder)$")
_MLP_OUT = re.compile(r"(?:img_mlp\.0|txt_mlp\.0|ff\.net\.0\.proj|ff_context\.net\.0\.proj|proj_mlp)$")


def _module_and_role(key: str) -> tuple[str, str] | None:
    """(module path with ``.``, role) for checkpoint weights and LoRA tensors; role "out" (rows are the output
    width) or "in" (columns are the input width)."""
    for suf, role in ((".lora_up.weight", "out"), (".lora_B.weight", "out"), (".lora_down.weight", "in"),
                      (".lora_A.weight", "in"), (".weight", "out"), (".diff", "out")):
        if key.endswith(suf):
            mod = key[: -len(suf)]
            break
    else:
        return None
    mod = _strip_prefix(mod)
    if mod.startswith(("lora_unet_", "lora_transformer_", "lycoris_")):
        hit = _underscored_module(mod)
        if hit is None:
            return None
        mod = hit[1]
    return mod, role


def infer_dims(shapes: Mapping[str, Sequence[int]], mlp_ratio: float = 4.0) -> FluxDims:
    """Flux widths from tensor shapes of a checkpoint (any layout) or a LoRA (any naming).

    ``hidden`` is read from the output rows of a module whose output is the model width (``img_attn.proj``,
    ``to_q``, ``linear2``, ``img_in`` ...) or from fused ``qkv`` rows / 3; ``mlp_hidden`` from ``img_mlp.0`` /
    ``proj_mlp`` rows or from ``linear1`` rows − 3·hidden, else ``mlp_ratio`` x hidden (Flux.1: 4). Falls back to
    Flux.1's 3072 / 12288 when nothing tells. Never raises.
    """
    hidden = mlp = None
    linear1 = qkv = None
    for k, shp in shapes.items():
        mr = _module_and_role(k)
        if mr is None or not shp:
            continue
        mod, role = mr
        if role != "out":
            continue
        rows = int(shp[0])
        if hidden is None and _H_OUT.search(mod):
            hidden = rows
        elif mlp is None and _MLP_OUT.search(mod):
            mlp = rows
        elif qkv is None and mod.endswith(("img_attn.qkv", "txt_attn.qkv")):
            qkv = rows
        elif linear1 is None and re.search(r"single_blocks\.\d+\.linear1$", mod):
            linear1 = rows
    if hidden is None and qkv is not None and qkv % 3 == 0:
        hidden = qkv // 3
    if hidden is None and linear1 is not None:
        r = 3 + mlp_ratio
        hidden = int(round(linear1 / r)) if mlp is None else (linear1 - mlp) // 3
    if hidden is None:
        return FluxDims()
    if mlp is None:
        mlp = linear1 - 3 * hidden if linear1 is not None else int(hidden * mlp_ratio)
    return FluxDims(hidden, mlp)


def diffusers_pieces(bfl: str, dims: FluxDims) -> list[tuple[str, Piece]]:
    """The diffusers parameter(s) holding one BFL parameter (``bfl`` without prefix), each with its
    :class:`Piece` of the canonical tensor: ``"double_blocks.0.img_attn.qkv.weight"`` ->
    ``[("transformer_blocks.0.attn.to_q.weight", rows 0:h), ... to_k, to_v]``. Raises ``ValueError`` for a name
    diffusers does not have."""
    ck = CANONICAL_PREFIX + bfl
    m = re.match(r"^(double|single)_blocks\.(\d+)\.(.+)$", bfl)
    if m:
        kind, i, rest = m.groups()
        droot = f"{'single_transformer_blocks' if kind == 'single' else 'transformer_blocks'}.{i}."
        norms = SINGLE_BLOCK_NORMS if kind == "single" else DOUBLE_BLOCK_NORMS
        for dk, bk in norms.items():
            if bk == rest:
                return [(droot + dk, Piece(ck))]
        mod, _, leaf = rest.rpartition(".")
        table = _B2D_SINGLE if kind == "single" else _B2D_DOUBLE
        if mod not in table:
            raise ValueError(f"canonical key {bfl!r} has no diffusers counterpart")
        out = []
        for dmod, part in table[mod]:
            if part is None:
                out.append((f"{droot}{dmod}.{leaf}", Piece(ck)))
            else:
                s, e, tot = dims.rows(mod, (part,))
                out.append((f"{droot}{dmod}.{leaf}", Piece(ck, (s, e), tot)))
        return out
    mod, _, leaf = bfl.rpartition(".")
    if mod in _B2D_GLOBAL:
        dmod, swap = _B2D_GLOBAL[mod]
        return [(f"{dmod}.{leaf}", Piece(ck, swap=swap))]
    raise ValueError(f"canonical key {bfl!r} has no diffusers counterpart")


# ---------------------------------------------------------------------------------------------------------------
# LoRA module names
# ---------------------------------------------------------------------------------------------------------------
_DOUBLE_US = {b.replace(".", "_"): b for b in _B2D_DOUBLE}
_SINGLE_US = {b.replace(".", "_"): b for b in _B2D_SINGLE}
_GLOBAL_US = {b.replace(".", "_"): b for b in _B2D_GLOBAL}
_DDOUBLE_US = {d.replace(".", "_"): d for d in DOUBLE_BLOCK_MODULES}
_DSINGLE_US = {d.replace(".", "_"): d for d in SINGLE_BLOCK_MODULES}
_DGLOBAL_US = {d.replace(".", "_"): d for d in GLOBAL_MODULES}


def _underscored_module(name: str) -> tuple[str, str] | None:
    """kohya / OneTrainer / SimpleTuner-lycoris names -> ("bfl" | "diffusers", dotted module path)."""
    if name.startswith("lora_unet_"):
        rest, spelling = name[len("lora_unet_"):], "bfl"
    elif name.startswith("lora_transformer_"):
        rest, spelling = name[len("lora_transformer_"):], "diffusers"
    elif name.startswith("lycoris_"):
        rest, spelling = name[len("lycoris_"):], "diffusers"
    else:
        return None
    m = re.match(r"^(double_blocks|single_blocks)_(\d+)_(.+)$", rest)
    if m:
        table = _DOUBLE_US if m[1] == "double_blocks" else _SINGLE_US
        if m[3] in table:
            return "bfl", f"{m[1]}.{m[2]}.{table[m[3]]}"
        return None
    m = re.match(r"^(single_transformer_blocks|transformer_blocks)_(\d+)_(.+)$", rest)
    if m:
        table = _DSINGLE_US if m[1] == "single_transformer_blocks" else _DDOUBLE_US
        if m[3] in table:
            return "diffusers", f"{m[1]}.{m[2]}.{table[m[3]]}"
        return None
    if rest in _GLOBAL_US:
        return "bfl", _GLOBAL_US[rest]
    if rest in _DGLOBAL_US:
        return "diffusers", _DGLOBAL_US[rest]
    return None


def flux_lora_target(module: str, dims: FluxDims):
    """Canonical checkpoint tensor a Flux LoRA module patches.

    Args:
        module: the LoRA module name without its tensor suffix, in any spelling ComfyUI accepts for Flux:
            kohya ``lora_unet_double_blocks_0_img_attn_qkv``; OneTrainer ``lora_transformer_transformer_blocks_0_attn_to_q``;
            SimpleTuner ``lycoris_single_transformer_blocks_0_proj_mlp``; diffusers / ai-toolkit / peft
            ``transformer.single_transformer_blocks.0.attn.to_q`` (also ``base_model.model.`` / bare);
            ComfyUI / generic ``diffusion_model.double_blocks.0.img_attn.qkv``, bare BFL paths, and ComfyUI's
            ``single_blocks.N.linear1_qkv`` (the q/k/v rows of ``linear1``).
        dims: widths placing split parts in fused tensors (:func:`infer_dims` of the LoRA or the checkpoint).

    Returns:
        ``formats.kohya_keys.CheckpointTarget`` with canonical ``weight_key`` / ``bias_key``; for a split module
        ``rows`` = its row slice and ``total_rows`` = the fused tensor's rows; ``swap_halves`` for diffusers'
        ``norm_out.linear``.

    Raises:
        ValueError: the name is no Flux transformer module.
    """
    from .kohya_keys import CheckpointTarget

    name = module
    if name.startswith("base_model.model."):
        name = name[len("base_model.model."):]
    hit = _underscored_module(name)
    if hit is not None:
        _, path = hit
    else:
        path = _strip_prefix(name)
    m = re.match(r"^((?:double|single)_blocks\.\d+)\.linear1_qkv$", path)
    if m:
        base = CANONICAL_PREFIX + m[1] + ".linear1"
        s, e, tot = dims.rows("linear1", (0, 1, 2))
        return CheckpointTarget(base + ".weight", base + ".bias", (s, e), False, tot)
    pw = piece_of(path + ".weight", dims)
    if pw is None:
        raise ValueError(f"{module!r} is not a Flux transformer module")
    pb = piece_of(path + ".bias", dims)
    return CheckpointTarget(pw.canonical, pb.canonical if pb else None, pw.rows, False, pw.total, pw.swap)


T5_PREFIX = "text_encoders.t5xxl.transformer."
"""Where ComfyUI's CheckpointSave puts Flux's T5-XXL (``text_encoder_key_prefix`` + ``t5xxl.transformer.``)."""

_T5_US = re.compile(r"^encoder_block_(\d+)_layer_(\d+)_(SelfAttention_[qkvo]|DenseReluDense_(?:wi_0|wi_1|wi|wo))$")


def t5_lora_target(module: str):
    """Checkpoint tensor of a Flux T5-XXL LoRA module: kohya ``lora_te3_encoder_block_0_layer_0_SelfAttention_q``
    (kohya ``lora_flux.py`` ``LORA_PREFIX_TEXT_ENCODER_T5``; ComfyUI ``model_lora_keys_clip`` maps ``lora_te3_`` and
    OneTrainer's ``lora_te2_`` to Flux's T5) or
    diffusers/peft ``text_encoder_2.encoder.block.0.layer.0.SelfAttention.q`` -> ``CheckpointTarget`` under
    :data:`T5_PREFIX`. Raises ``ValueError`` for anything else."""
    from .kohya_keys import CheckpointTarget

    if module.startswith(("lora_te3_", "lora_te2_")):  # te2: OneTrainer's Flux T5 prefix (comfy/lora.py 150-153)
        m = _T5_US.match(module[len("lora_te3_"):])
        if not m:
            raise ValueError(f"{module!r} is not a T5-XXL attention / feed-forward module")
        path = f"encoder.block.{m[1]}.layer.{m[2]}.{m[3].replace('_', '.', 1)}"
    elif module.startswith("text_encoder_2."):
        path = module[len("text_encoder_2."):]
        if not re.fullmatch(r"encoder\.block\.\d+\.layer\.\d+\.(?:SelfAttention\.[qkvo]|DenseReluDense\.(?:wi_0|wi_1|wi|wo))",
                            path):
            raise ValueError(f"{module!r} is not a T5-XXL attention / feed-forward module")
    else:
        raise ValueError(f"{module!r} is not a T5-XXL LoRA module (lora_te3_ / lora_te2_ / text_encoder_2.)")
    return CheckpointTarget(f"{T5_PREFIX}{path}.weight", None)


# ---------------------------------------------------------------------------------------------------------------
# blocks: ComfyUI ModelMergeFlux1 groups and the D00/S00 ids of formats.keys
# ---------------------------------------------------------------------------------------------------------------
def _merge_blocks(n_double: int = 19, n_single: int = 38) -> list[str]:
    return (["img_in.", "time_in.", "guidance_in", "vector_in.", "txt_in."]
            + [f"double_blocks.{i}." for i in range(n_double)] + [f"single_blocks.{i}." for i in range(n_single)]
            + ["final_layer."])


MERGE_BLOCKS: list[str] = _merge_blocks()
"""ComfyUI ``ModelMergeFlux1`` input names, in its order (``comfy_extras/nodes_model_merging_model_specific.py``
106-129): each is a prefix of the BFL key (without ``diffusion_model.``) whose ratio it sets."""

_NON_BLOCK_IDS = ("img_in", "time_in", "guidance_in", "vector_in", "txt_in", "final_layer")


def block_ids(n_double: int = 19, n_single: int = 38) -> list[str]:
    """Per-block ids for Flux merge weights in model order: the ModelMergeFlux1 groups outside the blocks
    (``img_in``, ``time_in``, ``guidance_in``, ``vector_in``, ``txt_in``), ``D00`` .. ``D18`` (double_blocks),
    ``S00`` .. ``S37`` (single_blocks), ``final_layer`` -- 63 ids for Flux.1, one per ModelMergeFlux1 input."""
    return (list(_NON_BLOCK_IDS[:5]) + [f"D{i:02d}" for i in range(n_double)]
            + [f"S{i:02d}" for i in range(n_single)] + ["final_layer"])


def merge_block(key: str) -> str | None:
    """ModelMergeFlux1 group of a key in any Flux layout (``transformer_blocks.3.attn.to_q.weight`` ->
    ``"double_blocks.3."``), by ComfyUI's rule: the longest input name that prefixes the BFL key. ``None`` for
    keys outside the transformer."""
    p = piece_of(key, FluxDims())
    if p is None:
        return None
    rel = p.canonical[len(CANONICAL_PREFIX):]
    best = None
    for name in MERGE_BLOCKS:
        if rel.startswith(name) and (best is None or len(name) > len(best)):
            best = name
    return best


def block_id(key: str) -> str | None:
    """Block id (:func:`block_ids`) of a key in any Flux layout, or ``None`` outside the transformer."""
    g = merge_block(key)
    return None if g is None else merge_name_to_block_id(g)


def merge_name_to_block_id(name: str) -> str:
    """``"double_blocks.3."`` / ``"double_blocks.3"`` / ``"D3"`` / ``"d03"`` -> ``"D03"``; ``"img_in."`` -> ``"img_in"``.
    Raises ``ValueError`` for anything else."""
    n = name.strip().rstrip(".")
    m = re.fullmatch(r"(?i)(double|single)_blocks\.(\d+)", n) or re.fullmatch(r"(?i)([DS])(\d+)", n)
    if m:
        return f"{m[1][0].upper()}{int(m[2]):02d}"
    if n.lower() in _NON_BLOCK_IDS:
        return n.lower()
    raise ValueError(f"{name!r} is not a Flux block (use ModelMergeFlux1 names such as double_blocks.3, "
                     f"single_blocks.10, img_in, final_layer, or D03 / S10)")


# ---------------------------------------------------------------------------------------------------------------
# kohya lora_flux modules
# ---------------------------------------------------------------------------------------------------------------
_KOHYA_DOUBLE = ("img_mod.lin", "img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2",
                 "txt_mod.lin", "txt_attn.qkv", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2")
_KOHYA_SINGLE = ("linear1", "linear2", "modulation.lin")


def parse_block_selection(selection: str, total: int) -> list[bool]:
    """kohya's ``train_double_block_indices`` / ``train_single_block_indices`` syntax (``"all"``, ``"none"``,
    ``"0-3,7"``) -> one bool per block. Source: kohya-ss/sd-scripts ``networks/lora_flux.py``
    ``parse_block_selection`` (inside ``create_network``). Raises ``ValueError`` on a bad index or range."""
    s = (selection or "").strip()
    if s == "all":
        return [True] * total
    if s in ("none", ""):
        return [False] * total
    out = [False] * total
    for r in s.split(","):
        r = r.strip()
        try:
            if "-" in r:
                a, b = (int(x) for x in r.split("-"))
            else:
                a = b = int(r)
        except ValueError:
            raise ValueError(f"bad block selection {r!r} in {selection!r}") from None
        if not (0 <= a <= b < total):
            raise ValueError(f"block range {r!r} outside 0..{total - 1}")
        for i in range(a, b + 1):
            out[i] = True
    return out


def kohya_lora_modules(keys: Iterable[str], train_blocks: str = "all",
                       train_double_block_indices: str | None = None,
                       train_single_block_indices: str | None = None,
                       type_dims: Mapping[str, int] | None = None) -> dict[str, str]:
    """kohya ``lora_flux`` LoRA module names for a Flux state dict, with the canonical weight each patches.

    Args:
        keys: the model's parameter names in any Flux layout (ComfyUI ``diffusion_model.`` state dict, BFL,
            diffusers -- only the double/single block layout and count are read).
        train_blocks: ``"all"`` | ``"double"`` | ``"single"`` (kohya's ``train_blocks`` network arg).
        train_double_block_indices / train_single_block_indices: kohya selection strings (``"0-3,7"``).
        type_dims: optional kohya ``img_attn_dim`` ... style overrides where ``0`` drops a module type; keys
            ``img_attn``, ``txt_attn``, ``img_mlp``, ``txt_mlp``, ``img_mod``, ``txt_mod``, ``single``,
            ``single_mod`` (the identifier list of kohya's ``create_modules``).

    Returns:
        ``{"lora_unet_double_blocks_0_img_attn_qkv": "model.diffusion_model.double_blocks.0.img_attn.qkv.weight",
        ...}`` in model order: every Linear of DoubleStreamBlock (img/txt ``mod.lin``, ``attn.qkv``,
        ``attn.proj``, ``mlp.0``, ``mlp.2``) and SingleStreamBlock (``linear1``, ``linear2``,
        ``modulation.lin``) -- kohya-ss/sd-scripts ``networks/lora_flux.py`` ``LoRANetwork.create_modules``
        (``lora_name = "lora_unet" + "." + name + "." + child_name`` with ``.`` -> ``_``), which ComfyUI loads as
        ``lora_unet_<BFL path>`` (``comfy/lora.py`` 180-183). Checked against kohya's own ``create_network`` in
        ``tests/test_flux_files.py`` (kohya tier) and against ComfyUI's Flux module tree (real-ComfyUI tier).

    Raises:
        ValueError: bad ``train_blocks`` / selection, unknown ``type_dims`` key, or no Flux blocks in ``keys``.
    """
    if train_blocks not in ("all", "double", "single"):
        raise ValueError(f"train_blocks must be 'all', 'double' or 'single', not {train_blocks!r}")
    doubles, singles = set(), set()
    for k in keys:
        p = piece_of(k, FluxDims())
        if p is None:
            continue
        m = re.match(r"^(double|single)_blocks\.(\d+)\.", p.canonical[len(CANONICAL_PREFIX):])
        if m:
            (doubles if m[1] == "double" else singles).add(int(m[2]))
    if not doubles and not singles:
        raise ValueError("no Flux double_blocks / single_blocks in the given keys")
    nd = max(doubles) + 1 if doubles else 0
    ns = max(singles) + 1 if singles else 0
    sel_d = parse_block_selection(train_double_block_indices, nd) if train_double_block_indices is not None \
        else [True] * nd
    sel_s = parse_block_selection(train_single_block_indices, ns) if train_single_block_indices is not None \
        else [True] * ns
    kinds = {"img_attn": lambda m: m.startswith("img_attn"), "txt_attn": lambda m: m.startswith("txt_attn"),
             "img_mlp": lambda m: m.startswith("img_mlp"), "txt_mlp": lambda m: m.startswith("txt_mlp"),
             "img_mod": lambda m: m.startswith("img_mod"), "txt_mod": lambda m: m.startswith("txt_mod"),
             "single": lambda m: m.startswith("linear"), "single_mod": lambda m: m.startswith("modulation")}
    dropped: list[Callable[[str], bool]] = []
    for t, d in (type_dims or {}).items():
        if t not in kinds:
            raise ValueError(f"unknown type_dims key {t!r}; use {sorted(kinds)}")
        if int(d) == 0:
            dropped.append(kinds[t])
    out: dict[str, str] = {}
    if train_blocks in ("all", "double"):
        for i in sorted(doubles):
            if not sel_d[i]:
                continue
            for mod in _KOHYA_DOUBLE:
                if any(f(mod) for f in dropped):
                    continue
                path = f"double_blocks.{i}.{mod}"
                out["lora_unet_" + path.replace(".", "_")] = CANONICAL_PREFIX + path + ".weight"
    if train_blocks in ("all", "single"):
        for i in sorted(singles):
            if not sel_s[i]:
                continue
            for mod in _KOHYA_SINGLE:
                if any(f(mod) for f in dropped):
                    continue
                path = f"single_blocks.{i}.{mod}"
                out["lora_unet_" + path.replace(".", "_")] = CANONICAL_PREFIX + path + ".weight"
    return out
