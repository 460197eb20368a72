"""kohya ``network_args`` for ``networks.lora``: LoCon, dropouts, block-wise learning rates / dims / alphas and
LoRA+, with kohya's parsing and defaults.

Rules re-implemented from kohya-ss/sd-scripts ``networks/lora.py`` (commit 48d368f; names and line numbers there):

* ``network_args = ["key=value", ...]`` is split at the first ``=`` (``train_network.py`` l. 666); values stay text.
  Unknown keys raise here (kohya would pass them silently to the module, which ignores them).
* ``conv_dim`` without ``conv_alpha`` → conv_alpha **1.0** (``create_network`` l. 444).
* Block-wise learning rates (``parse_block_lr_kwargs`` l. 389, ``get_block_lr_weight`` l. 589): ``down_lr_weight``
  / ``up_lr_weight`` are 12 (SDXL: 9) comma-separated floats (empty entries = 0), or a preset ``sine``, ``cosine``,
  ``linear``, ``reverse_linear``, ``zeros`` optionally ``+base`` (e.g. ``cosine+.25``); ``mid_lr_weight`` 1
  (SDXL: 3) floats. Short lists are filled with 1.0, long ones cut; weights ``<= block_lr_zero_threshold`` become
  0. The result is one weight per block: SD1/SD2 ``down 1-12, mid 13 (index 12), up 13-24`` = 25 entries (index
  0 is unused); SDXL 1 + 9 + 3 + 9 + 1 = 23.
* A block whose weight is 0 gets no modules at all (``remove_block_dims_and_alphas`` l. 706).
* ``block_dims`` / ``block_alphas`` (25 or 23 values) set rank/alpha per block for Linear and 1×1 conv modules;
  ``conv_block_dims`` / ``conv_block_alphas`` for 3×3 convs (``get_block_dims_and_alphas`` l. 515); block dims
  are only active when ``block_dims`` or a block lr weight is given. Text-encoder modules keep network_dim/alpha.
* Block index of a module (``get_block_index`` l. 719): SD1/SD2 ``down_blocks_i_(attentions|resnets)_j`` → 1 + 3i
  + j, ``..._(down|up)samplers`` → 1 + 3i + 2, ``mid_block`` → 12, ``up_blocks_i_..._j`` → 13 + 3i + j; SDXL LDM
  names ``input_blocks_n`` → 1 + n, ``middle_block_n`` → 10 + n, ``output_blocks_n`` → 13 + n.
* Optimizer groups (``LoRANetwork.prepare_optimizer_params`` l. 1148): text encoder at ``text_encoder_lr`` (else
  ``learning_rate``); UNet at ``unet_lr`` (else ``learning_rate``), one group per block × lr weight when block
  lrs are on; with LoRA+ (``loraplus_lr_ratio``, or ``loraplus_unet_lr_ratio`` / ``loraplus_text_encoder_lr_ratio``
  which win for their part) every group is split into ``lora_down`` params and ``lora_up`` params at lr × ratio
  (Hayou et al. 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models", §3). A group whose lr is 0 is left
  out (those parameters stay frozen).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

NUM_BLOCKS, NUM_MID = 12, 1                 # SD1/SD2 (kohya LoRANetwork.NUM_OF_BLOCKS / NUM_OF_MID_BLOCKS)
SDXL_NUM_BLOCKS, SDXL_NUM_MID = 9, 3
KNOWN_KEYS = ("conv_dim", "conv_lora_dim", "conv_alpha", "dropout", "rank_dropout", "module_dropout",
              "down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold", "block_dims",
              "block_alphas", "conv_block_dims", "conv_block_alphas", "loraplus_lr_ratio", "loraplus_unet_lr_ratio",
              "loraplus_text_encoder_lr_ratio")
PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")

_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")


def num_blocks(is_sdxl: bool) -> int:
    """Entries of a block list: 25 (SD1/SD2) or 23 (SDXL)."""
    return 1 + SDXL_NUM_BLOCKS * 2 + SDXL_NUM_MID + 1 if is_sdxl else NUM_BLOCKS * 2 + NUM_MID


def parse_network_args(items: Iterable[str] | None) -> dict[str, str]:
    """``["k=v", ...]`` → ``{k: v}`` (text values, split at the first ``=`` as kohya). Raises ``ValueError`` for an
    entry without ``=`` or an unknown key (naming it and the supported keys)."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, val = str(item).partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"network_args entry {item!r} is not key=value")
        from .flux import FLUX_KEYS, FLUX_REFUSED, FLUX_WARNED  # Flux keys: split by family later

        if key not in KNOWN_KEYS and key not in FLUX_KEYS + tuple(FLUX_REFUSED) + tuple(FLUX_WARNED):
            raise ValueError(f"network_args {key!r} is not supported by networks.lora here; supported: "
                             f"{', '.join(KNOWN_KEYS)}")
        out[key] = val.strip()
    return out


def block_index(lora_name: str, is_sdxl: bool = False) -> int:
    """kohya's block index of a kohya LoRA module name (module docstring); -1 for text-encoder / unknown names."""
    if not is_sdxl:
        m = _UPDOWN.search(lora_name)
        if m:
            side, i, kind, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
            idx = 3 * i + (2 if kind in ("upsamplers", "downsamplers") else j)
            return 1 + idx if side == "down" else NUM_BLOCKS + 1 + idx
        if "mid_block_" in lora_name:
            return NUM_BLOCKS
        return -1
    if not lora_name.startswith("lora_unet_"):
        return -1
    name = lora_name[len("lora_unet_"):]
    if name.startswith(("time_embed_", "label_emb_")):
        return 0
    for prefix, base in (("input_blocks_", 1), ("middle_block_", 10), ("output_blocks_", 13)):
        if name.startswith(prefix):
            return base + int(name.split("_")[2])
    return 22 if name.startswith("out_") else -1


def _floats(text: str) -> list[float]:
    return [float(s) if s else 0.0 for s in text.split(",")]


def _preset(spec: str, n: int) -> list[float]:
    name, _, base = spec.partition("+")
    b = float(base) if base else 0.0
    if name == "cosine":
        return [math.sin(math.pi * (i / (n - 1)) / 2) + b for i in reversed(range(n))]
    if name == "sine":
        return [math.sin(math.pi * (i / (n - 1)) / 2) + b for i in range(n)]
    if name == "linear":
        return [i / (n - 1) + b for i in range(n)]
    if name == "reverse_linear":
        return [i / (n - 1) + b for i in reversed(range(n))]
    if name == "zeros":
        return [b] * n
    raise ValueError(f"unknown block lr preset {name!r}; use one of {', '.join(PRESETS)} (optionally +base)")


def block_lr_weights(args: dict[str, str], is_sdxl: bool = False) -> list[float] | None:
    """One lr weight per block (module docstring) from ``down_lr_weight`` / ``mid_lr_weight`` / ``up_lr_weight``
    / ``block_lr_zero_threshold``; ``None`` when none of the three is given. Raises ``ValueError`` for an unknown
    preset or a non-number."""
    down, mid, up = (args.get(k) for k in ("down_lr_weight", "mid_lr_weight", "up_lr_weight"))
    if down is None and mid is None and up is None:
        return None
    n, n_mid = (SDXL_NUM_BLOCKS, SDXL_NUM_MID) if is_sdxl else (NUM_BLOCKS, NUM_MID)
    thr = float(args.get("block_lr_zero_threshold", 0.0) or 0.0)

    def side(spec: str | None, length: int) -> list[float]:
        if spec is None:
            return [1.0] * length
        vals = _floats(spec) if ("," in spec or _is_number(spec)) else _preset(spec, length)
        vals = (vals + [1.0] * length)[:length]
        return [w if w > thr else 0 for w in vals]

    mid_w = None if mid is None else ",".join(str(x) for x in _floats(mid))  # kohya: mid is always a float list
    w = side(down, n) + side(mid_w, n_mid) + side(up, n)
    return [1.0] + w + [1.0] if is_sdxl else w


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


@dataclass
class BlockSpec:
    """Per-block ranks / alphas for the UNet (``None`` lists = uniform network/conv dims)."""

    dims: list[int] | None = None
    alphas: list[float] | None = None
    conv_dims: list[int] | None = None
    conv_alphas: list[float] | None = None
    lr_weights: list[float] | None = None


def block_spec(args: dict[str, str], *, network_dim: int, network_alpha: float, conv_dim: int | None,
               conv_alpha: float | None, is_sdxl: bool = False) -> BlockSpec:
    """kohya's ``get_block_dims_and_alphas`` + ``remove_block_dims_and_alphas``: active when ``block_dims`` or a
    block lr weight is given; missing lists default to network_dim/alpha (conv: conv_dim/alpha, alpha 1.0).
    Raises ``ValueError`` when a list has the wrong length (the message gives the expected count)."""
    lrw = block_lr_weights(args, is_sdxl)
    spec = BlockSpec(lr_weights=lrw)
    if args.get("block_dims") is None and lrw is None:
        return spec
    n = num_blocks(is_sdxl)

    def parse(key, conv, default):
        v = args.get(key)
        if v is None:
            return [default] * n if default is not None else None
        vals = [conv(s) for s in v.split(",")]
        if len(vals) != n:
            raise ValueError(f"{key} must have {n} comma-separated values for this model, got {len(vals)}")
        return vals

    spec.dims = parse("block_dims", int, int(network_dim))
    spec.alphas = parse("block_alphas", float, float(network_alpha))
    if args.get("conv_block_dims") is not None:
        spec.conv_dims = parse("conv_block_dims", int, None)
        spec.conv_alphas = parse("conv_block_alphas", float, 1.0 if conv_alpha is None else float(conv_alpha))
    elif conv_dim is not None:
        spec.conv_dims = [int(conv_dim)] * n
        spec.conv_alphas = [1.0 if conv_alpha is None else float(conv_alpha)] * n
    if lrw is not None:
        for i, w in enumerate(lrw):
            if w == 0:
                spec.dims[i] = 0
                if spec.conv_dims is not None:
                    spec.conv_dims[i] = 0
    return spec


@dataclass
class LoraPlus:
    """LoRA+ ratios (``None`` = off); the part-specific ratio wins over ``loraplus_lr_ratio``."""

    ratio: float | None = None
    unet_ratio: float | None = None
    te_ratio: float | None = None

    @classmethod
    def from_args(cls, args: dict[str, str]) -> "LoraPlus":
        """Read the three ``loraplus_*`` keys (floats)."""
        f = (lambda k: float(args[k]) if args.get(k) not in (None, "") else None)
        return cls(f("loraplus_lr_ratio"), f("loraplus_unet_lr_ratio"), f("loraplus_text_encoder_lr_ratio"))

    def for_part(self, part: str) -> float | None:
        """The ratio for ``"unet"`` or ``"te"``."""
        return (self.unet_ratio if part == "unet" else self.te_ratio) or self.ratio


@dataclass
class ParamGroup:
    """One optimizer group: its name (kohya's lr description), lr, and ``(module name, "lora_down"|"lora_up")``."""

    name: str
    lr: float
    params: list[tuple[str, str]] = field(default_factory=list)


def optimizer_groups(module_names: Sequence[str], *, learning_rate: float, unet_lr: float | None,
                     text_encoder_lr: float | None, lr_weights: list[float] | None, loraplus: LoraPlus,
                     is_sdxl: bool = False) -> list[ParamGroup]:
    """kohya's ``prepare_optimizer_params`` groups for modules named ``module_names`` (kohya names).

    Returns groups in kohya's order (text encoder, then UNet blocks in first-seen order) with kohya's names
    (``textencoder``, ``textencoder plus``, ``unet``, ``unet_block7 plus``...). Groups whose lr is 0 are dropped.
    """
    te = [n for n in module_names if not n.startswith("lora_unet_")]
    un = [n for n in module_names if n.startswith("lora_unet_")]
    groups: list[ParamGroup] = []

    def assemble(names, lr, ratio, label):
        lora = ParamGroup(label, lr)
        plus = ParamGroup(label + " plus", lr * ratio if ratio is not None else lr)
        for n in names:
            lora.params.append((n, "lora_down"))
            (plus if ratio is not None else lora).params.append((n, "lora_up"))
        for g in (lora, plus):
            if g.params and g.lr:
                groups.append(g)

    if te:
        assemble(te, text_encoder_lr if text_encoder_lr is not None else learning_rate, loraplus.for_part("te"),
                 "textencoder")
    if un:
        base = unet_lr if unet_lr is not None else learning_rate
        if lr_weights is not None:
            blocks: dict[int, list[str]] = {}
            for n in un:
                blocks.setdefault(block_index(n, is_sdxl), []).append(n)
            for idx, names in blocks.items():
                assemble(names, base * lr_weights[idx], loraplus.for_part("unet"), f"unet_block{idx}")
        else:
            assemble(un, base, loraplus.for_part("unet"), "unet")
    return groups
