"""Per-block merge weights: the UNet / Flux block ids of an architecture (:func:`block_ids`, from the shared key
classification ``formats.keys.BLOCK_IDS``), presets (:data:`PRESETS`), and :func:`parse_block_weights` for the
block-weight strings users bring from supermerger / sd-mecha (25 or 19 numbers, ``IN00=0.2`` pairs, a preset;
SD1 lists on SDXL converted by :func:`sd1_list_to_sdxl`), giving a :class:`BlockWeights`.
Used by :class:`.methods.MergePlan` and the merge nodes and CLI.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence


BASE = "BASE"


def block_ids(arch: str) -> list[str]:
    """UNet block ids for ``arch`` (SD1/SD2: 25 = IN00..IN11, M00, OUT00..OUT11; SDXL: 19) from the shared
    key classification (``formats.keys.BLOCK_IDS``). Raises ``ValueError`` for other architectures."""
    from ...formats.keys import BLOCK_IDS

    ids = BLOCK_IDS.get(arch)
    if not ids or arch not in ("sd1", "sd2", "sdxl", "flux"):
        raise ValueError(f"per-block weights are defined for sd1, sd2, sdxl and flux, not {arch!r}")
    return list(ids)


def _preset_multipliers(name: str, ids: list[str]) -> dict[str, float]:
    n = len(ids)
    if name == "flat":
        m = {b: 1.0 for b in ids}
        m[BASE] = 1.0
    elif name in ("gradient_in", "gradient_out"):
        # linear ramp over the blocks in order IN00 .. M00 .. OUTxx
        ramp = [i / (n - 1) for i in range(n)]
        if name == "gradient_in":  # B strongest at the input side
            ramp = ramp[::-1]
        m = dict(zip(ids, ramp))
        m[BASE] = 1.0
    elif name in ("in_only", "out_only", "mid_only"):
        prefix = {"in_only": "IN", "out_only": "OUT", "mid_only": "M"}[name]
        m = {b: (1.0 if b.startswith(prefix) else 0.0) for b in ids}
        m[BASE] = 0.0
    else:
        raise KeyError(name)
    return m


PRESETS = ("flat", "gradient_in", "gradient_out", "in_only", "out_only", "mid_only")
PRESET_HELP = (
    "flat: every block and BASE = α; gradient_in: B's weight falls linearly from α at IN00 to 0 at the last "
    "OUT block (BASE = α); gradient_out: rises from 0 at IN00 to α at the last OUT block (BASE = α); "
    "in_only / out_only / mid_only: α on the IN / OUT / M00 blocks, 0 elsewhere (BASE = 0: text encoder etc. "
    "from A)."
)


@dataclass(frozen=True)
class BlockWeights:
    """Per-block B-weights: ``values`` maps each UNet block id (``IN00`` …) and ``BASE`` to a weight.

    ``BASE`` applies to every key outside the UNet blocks (time embedding, conv_out, text encoder and VAE
    unless they have their own weight). ``source`` records what was parsed (for the recipe).
    """

    arch: str
    values: Mapping[str, float]
    source: str = ""

    def weight(self, block: str | None) -> float:
        """Weight for ``block`` (``None`` → BASE)."""
        if block is None:
            return float(self.values[BASE])
        return float(self.values.get(block, self.values[BASE]))

    def as_list(self) -> list[float]:
        """supermerger order: ``[BASE, IN00, …, M00, …, OUTxx]``."""
        return [float(self.values[BASE])] + [float(self.values[b]) for b in block_ids(self.arch)]


def parse_block_weights(spec: str, arch: str, alpha: float = 0.5) -> BlockWeights:
    """Parse per-block weights for ``arch`` ("sd1"/"sd2": 25 blocks, "sdxl": 19).

    Accepted forms:

    * a preset name (:data:`PRESETS`), scaled by ``alpha`` (see :data:`PRESET_HELP`);
    * a supermerger-style comma list of absolute B-weights: ``N + 1`` values ``BASE, IN00, …, OUTxx``
      (26 for SD1, 20 for SDXL), or ``N`` values (blocks only; BASE = ``alpha``); a 26-value SD1 list given for
      SDXL is converted as supermerger does (:func:`sd1_list_to_sdxl`, with a warning);
    * named entries ``IN00=0.3, M00=1, OUT05=0.8`` (``:`` also accepted); blocks not named get ``alpha``,
      ``BASE=`` sets BASE.

    Raises ``ValueError`` with the expected count / names on anything else. Values outside [0, 1] are allowed
    with a warning.
    """
    ids = block_ids(arch)
    text = (spec or "").strip()
    if not text:
        raise ValueError("empty block-weight list")
    key = text.lower().replace("-", "_").replace(" ", "_")
    if key in PRESETS:
        if arch == "flux" and key in ("in_only", "out_only", "mid_only"):
            raise ValueError(f"preset {key} names UNet parts; Flux has none (use flat, gradient_in, gradient_out or "
                             "named blocks such as double_blocks.0=1)")
        mult = _preset_multipliers(key, ids)
        return BlockWeights(arch, {k: float(alpha) * v for k, v in mult.items()}, source=key)
    parts = [p.strip() for p in re.split(r"[,\s]+", text) if p.strip()]
    if any(("=" in p or ":" in p) for p in parts):
        vals = {b: float(alpha) for b in ids}
        vals[BASE] = float(alpha)
        for p in parts:
            name, _, num = p.replace(":", "=").partition("=")
            name = _flux_block_name(name) if arch == "flux" else name.strip().upper()
            if name not in vals:
                raise ValueError(f"unknown block {name!r} for {arch}; use BASE, {ids[0]} … {ids[-1]}")
            vals[name] = _to_float(num, name)
    else:
        nums = [_to_float(p, f"value {i + 1}") for i, p in enumerate(parts)]
        if arch == "sdxl" and len(nums) == len(SD1_BLOCK_IDS) + 1:
            nums = sd1_list_to_sdxl(nums)
            warnings.warn("26-value SD1 block list converted for SDXL as supermerger does: IN09-IN11 and "
                          "OUT09-OUT11 dropped (BASE, IN00-IN08, M00, OUT00-OUT08 kept)", UserWarning, stacklevel=2)
        if len(nums) == len(ids) + 1:
            vals = {BASE: nums[0], **dict(zip(ids, nums[1:]))}
        elif len(nums) == len(ids):
            vals = {BASE: float(alpha), **dict(zip(ids, nums))}
        else:
            raise ValueError(
                f"{arch} block weights need {len(ids) + 1} values (BASE, {ids[0]} … {ids[-1]}) or {len(ids)} "
                f"(blocks only), got {len(nums)}; or a preset: {', '.join(PRESETS)}")
    for name, v in vals.items():
        if not (0.0 <= v <= 1.0):
            warnings.warn(f"block weight {name}={v:g} is outside [0, 1] (extrapolation)", UserWarning, stacklevel=2)
    return BlockWeights(arch, vals, source=text)


SD1_BLOCK_IDS = ["IN%02d" % i for i in range(12)] + ["M00"] + ["OUT%02d" % i for i in range(12)]


def sd1_list_to_sdxl(values: Sequence[float]) -> list[float]:
    """Convert a 26-value SD1 block list ``[BASE, IN00..IN11, M00, OUT00..OUT11]`` to SDXL's 20
    ``[BASE, IN00..IN08, M00, OUT00..OUT08]``: the same ids are kept, IN09-IN11 and OUT09-OUT11 dropped.
    Source: supermerger ``scripts/mergers/mergers.py`` ``weighttoxl`` (``w[:9] + w[12:22]`` of the 25 block
    values; its trailing VAE entry is not a UNet block). Raises ``ValueError`` for another length."""
    vals = [float(v) for v in values]
    if len(vals) != 26:
        raise ValueError(f"an SD1 block list has 26 values (BASE + 25 blocks), got {len(vals)}")
    blocks = vals[1:]
    return [vals[0]] + blocks[:9] + blocks[12:22]


def _flux_block_name(name: str) -> str:
    """Flux block names as ComfyUI's ModelMergeFlux1 writes them (``double_blocks.3.``, ``img_in.``) or as
    ``D03`` / ``S10`` -> the ids of ``formats.keys.BLOCK_IDS["flux"]``; ``BASE`` stays."""
    from ...formats.flux_keys import merge_name_to_block_id

    if name.strip().upper() == BASE:
        return BASE
    try:
        return merge_name_to_block_id(name)
    except ValueError:
        return name.strip()


def _to_float(text: str, what: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"block weight {what}: {text!r} is not a number") from None
    if not math.isfinite(v):
        raise ValueError(f"block weight {what}: {text!r} is not finite")
    return v
