"""Exchange with ComfyUI's own training nodes (``comfy_extras/nodes_train.py``, ComfyUI 0.3.64).

Types, as core defines them:

* ``LORA_MODEL`` — what ``TrainLoraNode`` returns and ``LoraModelLoader`` / ``SaveLoRA`` take: a flat
  ``dict[str, Tensor]`` keyed by the *model's* module names, ``"diffusion_model.<ldm path>.lora_up.weight"``,
  ``".lora_down.weight"``, ``".alpha"`` (core names them ``f"{n}.{name}"`` over ``LoraDiff.named_parameters()``;
  also ``.diff`` / ``.diff_b`` for 1-D weights and biases). ``LoraModelLoader`` applies it with
  ``comfy.sd.load_lora_for_models(model, None, lora, strength, 0)`` — the UNet only — whose key map
  (``comfy.lora.model_lora_keys_unet``) accepts ``diffusion_model.<path>`` names as they are.
* ``LOSS_MAP`` — ``{"loss": [float per step]}``; ``LossGraphNode`` plots ``loss["loss"]``.

A Concept Lab LoRA file (kohya names) becomes a ``LORA_MODEL`` through ComfyUI's own key map (the same one
LoraLoader uses for the file), so both give the same patched weights. Text-encoder modules cannot travel in a
``LORA_MODEL`` (LoraModelLoader patches the MODEL only): they stay in the file and are named in a warning.
"""

from __future__ import annotations

import logging
from typing import Iterable, Mapping

import torch

logger = logging.getLogger(__name__)

LORA_MODEL = "LORA_MODEL"
LOSS_MAP = "LOSS_MAP"
_PARTS = (".lora_up.weight", ".lora_down.weight", ".alpha")


def unet_key_map(model) -> dict[str, str]:
    """ComfyUI's LoRA key map for a MODEL's UNet: LoRA module name (kohya, diffusers, ``diffusion_model.…``) →
    model weight key (``diffusion_model.<ldm path>.weight``). Source: ``comfy.lora.model_lora_keys_unet``."""
    import comfy.lora

    return comfy.lora.model_lora_keys_unet(model.model, {})


def kohya_to_lora_model(model, state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A kohya LoRA state dict → ComfyUI ``LORA_MODEL`` for ``model`` (a ModelPatcher).

    Args:
        model: the MODEL the LoRA was trained on (its key map decides the names).
        state: ``<kohya name>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` tensors (any dtype).

    Returns ``(lora_model, left_out)``: ``{"diffusion_model.<path>.lora_up.weight": up, ...}`` (tensors as stored,
    conv shapes kept — ComfyUI flattens them), and the kohya modules that have no UNet weight (text encoder).
    Raises ``ValueError`` when no module maps to the UNet.
    """
    key_map = unet_key_map(model)
    names = sorted({k[: -len(p)] for k in state for p in _PARTS if k.endswith(p)})
    out: dict[str, torch.Tensor] = {}
    left_out: list[str] = []
    for name in names:
        target = key_map.get(name)
        if target is None or f"{name}.lora_up.weight" not in state or f"{name}.lora_down.weight" not in state:
            left_out.append(name)
            continue
        prefix = target[: -len(".weight")] if target.endswith(".weight") else target
        down = state[f"{name}.lora_down.weight"]
        out[f"{prefix}.lora_up.weight"] = state[f"{name}.lora_up.weight"]
        out[f"{prefix}.lora_down.weight"] = down
        alpha = state.get(f"{name}.alpha")
        out[f"{prefix}.alpha"] = (alpha.detach().clone() if alpha is not None
                                  else torch.tensor(float(down.shape[0]), dtype=down.dtype))
    if not out:
        raise ValueError("none of the LoRA's modules patches this MODEL's UNet")
    return out, left_out


def kohya_file_to_lora_model(model, path) -> dict[str, torch.Tensor]:
    """:func:`kohya_to_lora_model` on a LoRA file; text-encoder modules left out are logged (by count and name)."""
    from ..formats.safetensors_io import load_state_dict

    lm, left_out = kohya_to_lora_model(model, load_state_dict(path))
    if left_out:
        logger.warning("LORA_MODEL output: %d text-encoder modules are not part of it (ComfyUI's LoraModelLoader "
                       "patches the MODEL only); use the LoRA file with LoraLoader for them, e.g. %s",
                       len(left_out), ", ".join(left_out[:3]))
    return lm


def loss_map(step_losses: Iterable[float]) -> dict[str, list[float]]:
    """``LOSS_MAP`` for core's LossGraphNode: ``{"loss": [loss per optimizer step]}`` (floats, NaN kept out)."""
    vals = [float(x) for x in step_losses if x is not None and x == x]
    return {"loss": vals}


def continue_from_lora_model(model, lora_model: Mapping[str, torch.Tensor]):
    """A hook for :class:`~conceptlab.training.lora.trainer.LoraTrainer` (``init_network``) that starts a new run from a
    ``LORA_MODEL`` (core's TrainLoraNode output, or ours).

    For every module of the new network whose UNet weight the ``LORA_MODEL`` patches, ``lora_down`` is copied and
    ``lora_up`` is multiplied by ``(alpha_in / r_in) / (network_alpha / network_dim)``, so ΔW at the start equals the
    ``LORA_MODEL``'s exactly while later updates follow this run's alpha convention. Modules the ``LORA_MODEL`` does
    not have start fresh (kohya init).

    The hook raises ``ValueError`` (before the first step) when the ``LORA_MODEL`` holds anything this run would
    not carry on: a rank different from ``network_dim`` / ``conv_dim`` (named), modules outside the network's
    targets (e.g. core trains every weight; set ``conv_dim`` for conv layers), or ``.diff`` / ``.diff_b`` /
    DoRA / LoHa entries — counted and named, so nothing is dropped silently.
    """
    lm = {k: v for k, v in lora_model.items() if isinstance(v, torch.Tensor)}
    if not lm:
        raise ValueError("the LORA_MODEL input is empty")

    def hook(network) -> None:
        key_map = unet_key_map(model)
        used: set[str] = set()
        loaded = 0
        with torch.no_grad():
            for name, d in network.loras.items():
                target = key_map.get(name)
                if target is None:
                    continue
                prefix = target[: -len(".weight")]
                up_k, down_k = f"{prefix}.lora_up.weight", f"{prefix}.lora_down.weight"
                if up_k not in lm or down_k not in lm:
                    continue
                up, down = lm[up_k].float(), lm[down_k].float()
                r = int(down.shape[0])
                if r != d.dim:
                    raise ValueError(f"LORA_MODEL {prefix} has rank {r} but this run trains rank {d.dim} there "
                                     "(set network_dim / conv_dim to the LORA_MODEL's rank to continue it)")
                a = lm.get(f"{prefix}.alpha")
                scale_in = (float(a) if a is not None else float(r)) / r
                d.lora_down.copy_(down.reshape(d.lora_down.shape).to(d.lora_down))
                d.lora_up.copy_((up * (scale_in / d.scale)).reshape(d.lora_up.shape).to(d.lora_up))
                used.update((up_k, down_k, f"{prefix}.alpha"))
                loaded += 1
        rest = sorted(set(lm) - used)
        if rest:
            raise ValueError(f"cannot continue {len(rest)} LORA_MODEL entries this run does not train, e.g. "
                             f"{', '.join(rest[:3])} (Concept Lab trains kohya's LoRA targets: attention / "
                             "feed-forward / proj layers, conv layers with conv_dim; not .diff / .diff_b / DoRA)")
        logger.info("continued %d LoRA modules from the LORA_MODEL input", loaded)

    return hook
