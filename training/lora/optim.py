"""Optimizer and learning-rate scheduler of the LoRA trainer by kohya names: :func:`build_optimizer`
(``optimizer_type`` + ``optimizer_args``) and :func:`build_scheduler` (``lr_scheduler`` through diffusers)."""

from __future__ import annotations

from typing import Any, Iterable

import torch

from .config import OPTIMIZERS, OptimizerUnavailableError, TrainConfig, _literal


def _optimizer_kwargs(args: Iterable[str]) -> dict[str, Any]:
    out = {}
    for item in args or []:
        key, sep, val = str(item).partition("=")
        if not sep:
            raise ValueError(f"optimizer_args expects key=value, got {item!r}")
        out[key.strip()] = _literal(val.strip())
    return out


def build_optimizer(name: str, groups: list[dict], lr: float, args: Iterable[str] = (),
                    device: torch.device | str = "cpu") -> torch.optim.Optimizer:
    """The optimizer kohya's ``optimizer_type`` names, with ``optimizer_args`` (``"key=value"`` strings).

    * ``AdamW`` (torch), ``SGDNesterov`` (torch SGD, nesterov, momentum 0.9);
    * ``AdamW8bit`` (bitsandbytes; a one-step probe on ``device`` turns a missing backend into a clear error);
    * ``Adafactor`` (transformers; ``scale_parameter``/``relative_step``/``warmup_init`` default False so the
      given learning rate and scheduler apply — kohya's recommended arguments);
    * ``Prodigy`` (prodigyopt, when installed; use learning_rate 1.0).

    Raises :class:`OptimizerUnavailableError` when the package is missing or cannot run on ``device`` or ``name``
    is unknown, and ``ValueError`` for an ``optimizer_args`` entry without ``=``.
    """
    kw = _optimizer_kwargs(args)
    key = name.lower()
    if key == "adamw":
        return torch.optim.AdamW(groups, lr=lr, **kw)
    if key == "sgdnesterov":
        kw.setdefault("momentum", 0.9)
        return torch.optim.SGD(groups, lr=lr, nesterov=True, **kw)
    if key == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except Exception as exc:  # noqa: BLE001 - ImportError or a broken native library
            raise OptimizerUnavailableError(
                f"AdamW8bit needs the bitsandbytes package, which cannot be imported here ({exc}); "
                "install bitsandbytes or choose AdamW") from None
        try:
            probe = torch.nn.Parameter(torch.zeros(4096, device=device))
            opt = bnb.optim.AdamW8bit([probe], lr=1e-3)
            probe.grad = torch.ones_like(probe)
            opt.step()
        except Exception as exc:  # noqa: BLE001
            raise OptimizerUnavailableError(
                f"AdamW8bit (bitsandbytes) cannot run on {device}: {exc}. Choose AdamW, or train on a "
                "device bitsandbytes supports") from None
        return bnb.optim.AdamW8bit(groups, lr=lr, **kw)
    if key == "adafactor":
        from transformers.optimization import Adafactor

        for k in ("scale_parameter", "relative_step", "warmup_init"):
            kw.setdefault(k, False)
        return Adafactor(groups, lr=None if kw.get("relative_step") else lr, **kw)
    if key == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise OptimizerUnavailableError("Prodigy needs the prodigyopt package (pip install prodigyopt); "
                                            "it is not installed") from None
        return Prodigy(groups, lr=lr, **kw)
    raise OptimizerUnavailableError(f"optimizer_type {name!r} is not supported; use one of {', '.join(OPTIMIZERS)}")


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    """diffusers ``get_scheduler`` with kohya's warm-up rule (``lr_warmup_steps`` < 1 is a fraction).

    ``total_steps`` counts optimizer steps. Returns a ``torch.optim.lr_scheduler.LambdaLR``; diffusers raises
    ``ValueError`` for a scheduler name it does not know (:meth:`TrainConfig.validate` checks first).
    """
    from diffusers.optimization import get_scheduler

    warm = cfg.lr_warmup_steps
    warm = int(warm * total_steps) if 0 < warm < 1 else int(warm)
    kw: dict[str, Any] = {"num_warmup_steps": warm, "num_training_steps": total_steps}
    if cfg.lr_scheduler == "cosine_with_restarts":
        kw["num_cycles"] = cfg.lr_scheduler_num_cycles
    if cfg.lr_scheduler == "polynomial":
        kw["power"] = cfg.lr_scheduler_power
    if cfg.lr_scheduler == "constant":
        kw = {}
    elif cfg.lr_scheduler == "constant_with_warmup":
        kw = {"num_warmup_steps": warm}
    return get_scheduler(cfg.lr_scheduler, optimizer, **kw)
