"""LoRA targets for Flux.1 as kohya-ss/sd-scripts ``networks/lora_flux.py`` builds them (commit 48d368f), on any
host that follows the Flux contract of :mod:`..host` (BFL module paths, components ``unet`` / ``te1`` / ``t5``).

What kohya's ``LoRANetwork`` adapts (``create_modules``, lines 799-930; ``__init__`` lines 931-965):

* transformer: every ``Linear`` of each ``DoubleStreamBlock`` (``img_mod.lin``, ``img_attn.qkv``, ``img_attn.proj``,
  ``img_mlp.0``, ``img_mlp.2`` and the ``txt_`` twins) and ``SingleStreamBlock`` (``linear1``, ``linear2``,
  ``modulation.lin``), named ``lora_unet_<BFL path with _>`` (``LORA_PREFIX_FLUX = "lora_unet"``, line 712) — the
  table :func:`conceptlab.formats.flux_keys.kohya_lora_modules`; network_args ``train_blocks`` (all / single /
  double), ``train_double_block_indices`` / ``train_single_block_indices`` (``"0-3,7"``), the per-type ranks
  ``img_attn_dim`` … ``single_mod_dim`` (0 drops the type; identifiers of lines 855-864) and ``in_dims``
  (``[img, time, vector, guidance, txt]`` ranks for ``img_in``, ``time_in``, ``vector_in``, ``guidance_in``,
  ``txt_in``; lines 959-963);
* CLIP-L (``lora_te1_``, line 713): the ``Linear`` modules of ``CLIPAttention`` / ``CLIPMLP`` when the text encoder
  is trained; T5-XXL (``lora_te3_``, line 714) only with ``train_t5xxl`` (line 940): ``T5Attention`` (q, k, v, o)
  and ``T5DenseGatedActDense`` (wi_0, wi_1, wo).

Not honoured, refused by name: ``split_qkv`` (kohya's own trainer ignores it, line 690), ``ggpo_beta`` /
``ggpo_sigma`` (GGPO gradient perturbation), ``network_reg_dims`` / ``network_reg_lrs`` (regex ranks / rates);
``verbose`` is warned (logging only). The SD-only block options (``block_dims``, ``down_lr_weight`` …) are refused
on Flux; ``conv_dim`` has no effect (Flux has no convolution in its blocks; warned).
"""

from __future__ import annotations

import logging
import re
from typing import Mapping

from torch import nn

from ...formats.flux_keys import CANONICAL_PREFIX, kohya_lora_modules
from ..host import DiffusionHost

logger = logging.getLogger(__name__)

#: network_args keys of kohya networks/lora_flux.py this module honours (besides dropout / LoRA+ of network_args)
FLUX_KEYS = ("train_blocks", "train_double_block_indices", "train_single_block_indices", "train_t5xxl",
             "img_attn_dim", "txt_attn_dim", "img_mlp_dim", "txt_mlp_dim", "img_mod_dim", "txt_mod_dim",
             "single_dim", "single_mod_dim", "in_dims")
#: kohya lora_flux network_args refused here (name -> why)
FLUX_REFUSED = {"split_qkv": "separate q/k/v LoRA modules are not trained here (kohya's trainer ignores it too)",
                "ggpo_beta": "GGPO is not implemented", "ggpo_sigma": "GGPO is not implemented",
                "network_reg_dims": "regex ranks are not implemented; use the per-type *_dim args",
                "network_reg_lrs": "regex learning rates are not implemented"}
FLUX_WARNED = {"verbose": "logging only"}
#: networks.lora keys that mean nothing for Flux (SD UNet block structure)
SD_ONLY = ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold", "block_dims",
           "block_alphas", "conv_block_dims", "conv_block_alphas")
_TYPE_KEYS = ("img_attn", "txt_attn", "img_mlp", "txt_mlp", "img_mod", "txt_mod", "single", "single_mod")
_IN_MODULES = ("img_in", "time_in", "vector_in", "guidance_in", "txt_in")
_CLIP_TARGET = re.compile(r"(^|\.)(self_attn|mlp)\.")
_T5_TARGET = re.compile(r"\.(SelfAttention\.[qkvo]|DenseReluDense\.(wi_0|wi_1|wi|wo))$")


def split_network_args(na: Mapping[str, str], is_flux: bool) -> tuple[dict[str, str], dict[str, str]]:
    """Split parsed ``network_args`` into ``(generic, flux)``: generic keys (dropouts, LoRA+, conv) for
    :mod:`.network_args`, Flux keys (:data:`FLUX_KEYS`) for :func:`flux_targets`. Raises ``ValueError`` naming keys
    of the other family (Flux keys on SD, SD block keys on Flux) and :data:`FLUX_REFUSED` keys; logs
    :data:`FLUX_WARNED` keys and ``conv_dim`` on Flux."""
    generic, flux = {}, {}
    errors = []
    for k, v in na.items():
        if k in FLUX_KEYS or k in FLUX_REFUSED or k in FLUX_WARNED:
            if not is_flux:
                errors.append(f"{k} is a Flux network arg (kohya networks/lora_flux.py); this model is not Flux")
            elif k in FLUX_REFUSED:
                errors.append(f"{k}: {FLUX_REFUSED[k]}")
            elif k in FLUX_WARNED:
                logger.warning("network_args %s has no effect (%s)", k, FLUX_WARNED[k])
            else:
                flux[k] = v
        elif is_flux and k in SD_ONLY:
            errors.append(f"{k} is an SD UNet block option; for Flux use train_blocks / train_double_block_indices / "
                          "train_single_block_indices / *_dim")
        else:
            if is_flux and k in ("conv_dim", "conv_lora_dim", "conv_alpha"):
                logger.warning("network_args %s has no effect on Flux (no convolutions in its blocks)", k)
                continue
            generic[k] = v
    if errors:
        raise ValueError("network_args: " + "; ".join(errors))
    return generic, flux


def _bool(v) -> bool:
    return str(v).strip().lower() in ("true", "1", "yes")


def _in_dims(text: str) -> list[int]:
    t = str(text).strip()
    if t.startswith("[") and t.endswith("]"):
        t = t[1:-1]
    dims = [int(d) for d in t.split(",")]
    if len(dims) != 5:
        raise ValueError(f"in_dims needs 5 ranks [img, time, vector, guidance, txt], got {text!r}")
    return dims


def flux_targets(host: DiffusionHost, *, network_dim: int, network_alpha: float, train_unet: bool = True,
                 train_text_encoder: bool = False, flux_args: Mapping[str, str] | None = None) -> list:
    """The :class:`.network.LoRATarget` list kohya's ``lora_flux.create_network`` would build on ``host`` (module
    docstring), text encoders first (CLIP-L, then T5 with ``train_t5xxl``), then the transformer in kohya's order.

    ``network_alpha`` None / 0 means alpha = dim. Raises ``ValueError`` for bad network args or when nothing is
    selected.
    """
    from .network import LoRATarget

    fa = dict(flux_args or {})
    alpha = float(network_alpha) if network_alpha else float(network_dim)
    out: list[LoRATarget] = []
    comps = host.components()
    if train_text_encoder:
        if "te1" in comps:
            for path, mod in host.modules("te1").items():
                if isinstance(mod, nn.Linear) and _CLIP_TARGET.search(path):
                    name = "lora_te1_" + path.replace(".", "_")
                    out.append(LoRATarget("te1", path, name, int(network_dim), alpha, False))
        if _bool(fa.get("train_t5xxl", False)):
            if "t5" not in comps:
                raise ValueError("train_t5xxl is set but the model has no T5 text encoder")
            for path, mod in host.modules("t5").items():
                if isinstance(mod, nn.Linear) and _T5_TARGET.search("." + path):
                    out.append(LoRATarget("t5", path, "lora_te3_" + path.replace(".", "_"), int(network_dim),
                                          alpha, False))
    if train_unet:
        mods = host.modules("unet")
        type_dims = {k: int(fa[f"{k}_dim"]) for k in _TYPE_KEYS if f"{k}_dim" in fa}
        table = kohya_lora_modules([CANONICAL_PREFIX + p + ".weight" for p in mods],
                                   train_blocks=fa.get("train_blocks", "all"),
                                   train_double_block_indices=fa.get("train_double_block_indices"),
                                   train_single_block_indices=fa.get("train_single_block_indices"),
                                   type_dims=type_dims)
        for name, key in table.items():
            path = key[len(CANONICAL_PREFIX):-len(".weight")]
            rel = path.split(".", 2)[-1] if path.startswith(("double_blocks.", "single_blocks.")) else path
            dim = int(network_dim)
            for t in _TYPE_KEYS:  # kohya identifiers (lines 855-864): the first matching type sets the rank
                if t not in type_dims:
                    continue
                hit = (rel.startswith(t) if t not in ("single", "single_mod")
                       else path.startswith("single_blocks.") and (rel.startswith("linear") if t == "single"
                                                                   else rel.startswith("modulation")))
                if hit:
                    dim = type_dims[t]
                    break
            if dim:
                out.append(LoRATarget("unet", path, name, dim, alpha, False))
        if "in_dims" in fa:
            for mod_name, d in zip(_IN_MODULES, _in_dims(fa["in_dims"])):
                if not d:
                    continue
                for path in mods:
                    if path.startswith(mod_name + ".") or path == mod_name:
                        out.append(LoRATarget("unet", path, "lora_unet_" + path.replace(".", "_"), int(d), alpha,
                                              False))
    if not out:
        raise ValueError("the Flux LoRA network selects no modules (check train_blocks, the block indices, the "
                         "*_dim args and network_train_unet_only / network_train_text_encoder_only)")
    return out
