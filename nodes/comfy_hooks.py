"""What :class:`.comfy_host.ComfyHost` puts on ComfyUI's shared module tree while it trains: the gate that lets
its activation-space deltas act only inside calls through its own patcher (:class:`DeltaGate`), the input-cloning
pre-hooks for norms whose input ComfyUI later changes in place (:func:`clone_input_hook`, :func:`inplace_norms`),
and per-block gradient checkpointing that carries the gate into the recomputation (:func:`checkpoint_block`).

Plain torch: nothing here imports ComfyUI; the module classes named in :data:`_INPLACE_NORMS` are ComfyUI's.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import nn


def clone_input_hook(module, args):
    """Forward pre-hook: give the module a private copy of its input while autograd records.

    ComfyUI's ``comfy/clip_model.py`` CLIPLayer adds residuals in place (``x += self.mlp(self.layer_norm2(x))``);
    once text-encoder deltas make ``x`` require grad, LayerNorm has saved ``x`` for backward and the in-place add
    breaks backward ("modified by an inplace operation"). Cloning the LayerNorm input keeps ComfyUI's code
    untouched and costs one activation copy per layer, only while grad is enabled.
    """
    if torch.is_grad_enabled() and args and isinstance(args[0], torch.Tensor):
        return (args[0].clone(),) + tuple(args[1:])
    return None


#: norms whose input ComfyUI's code later changes in place (``x += ...``): per module class, the attribute names.
#: ``comfy/clip_model.py`` CLIPLayer; ``comfy/text_encoders/t5.py`` T5LayerSelfAttention / T5LayerFF
#: (``x += output`` after ``layer_norm(x)``); ``comfy/ldm/flux/layers.py`` DoubleStreamBlock (``txt += ...`` after
#: ``txt_norm1`` / ``txt_norm2``) and SingleStreamBlock (``x += ...`` after ``pre_norm``).
_INPLACE_NORMS = {"CLIPLayer": ("layer_norm1", "layer_norm2"), "T5LayerSelfAttention": ("layer_norm",),
                  "T5LayerFF": ("layer_norm",), "DoubleStreamBlock": ("txt_norm1", "txt_norm2"),
                  "SingleStreamBlock": ("pre_norm",)}


def inplace_norms(module) -> list:
    """The norm submodules of ``module`` that need :func:`clone_input_hook` (see :data:`_INPLACE_NORMS`)."""
    names = _INPLACE_NORMS.get(type(module).__name__, ())
    return [m for m in (getattr(module, n, None) for n in names) if m is not None]


class DeltaGate:
    """Whether a :class:`.comfy_host.ComfyHost`'s activation-space deltas act right now (see ``ComfyHost``
    "Mechanics").

    The model's modules are shared by every clone of the MODEL, so the host's forward hooks add their deltas only
    inside calls made through this host's own patcher: its :meth:`~.comfy_host.ComfyHost.predict` / text encoding, and
    ComfyUI's sampler running the host's patcher (a ``DIFFUSION_MODEL`` wrapper on that patcher, :meth:`wrapper`). A
    checkpointed block records the state at its forward and restores it for the recomputation in backward
    (:func:`checkpoint_block`), so gradient checkpointing recomputes exactly what the forward computed."""

    def __init__(self):
        self.depth = 0

    def __call__(self) -> bool:
        return self.depth > 0

    def set(self, on: bool):
        gate = self

        class _Ctx:
            def __enter__(self_inner):
                self_inner.prev = gate.depth
                gate.depth = 1 if on else 0

            def __exit__(self_inner, *exc):
                gate.depth = self_inner.prev

        return _Ctx()

    def on(self):
        """Context manager: deltas act inside the block (nests)."""
        gate = self

        class _Ctx:
            def __enter__(self_inner):
                gate.depth += 1

            def __exit__(self_inner, *exc):
                gate.depth -= 1

        return _Ctx()

    def wrapper(self, executor, *args, **kwargs):
        """ComfyUI ``WrappersMP.DIFFUSION_MODEL`` wrapper: the diffusion model's forward runs with deltas on."""
        with self.on():
            return executor(*args, **kwargs)


def checkpoint_block(m: nn.Module, gate: DeltaGate | None = None, copy_inputs: bool = False) -> None:
    """Run ``m.forward`` under ``torch.utils.checkpoint`` (non-reentrant), like ComfyUI's ``nodes_train.patch``
    (same ``org_forward`` attribute, so ``nodes_train.unpatch`` undoes it). ``gate``: the host's
    :class:`DeltaGate`; its state at the forward is restored for the recomputation in backward (the recomputation
    runs outside the host's call). ``copy_inputs``: see :func:`checkpoint_block_copying_inputs`."""
    org_forward = m.forward

    def fwd(state, args, kwargs):
        if copy_inputs:
            args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
            kwargs = {k: (v.clone() if k in ("img", "txt", "x") and isinstance(v, torch.Tensor) else v)
                      for k, v in kwargs.items()}
        if gate is None:
            return org_forward(*args, **kwargs)
        with gate.set(state):
            return org_forward(*args, **kwargs)

    def checkpointing_fwd(*args, **kwargs):
        state = gate() if gate is not None else False
        return torch.utils.checkpoint.checkpoint(fwd, state, args, kwargs, use_reentrant=False)

    m.org_forward = org_forward
    m.forward = checkpointing_fwd


def checkpoint_block_copying_inputs(m: nn.Module, gate: DeltaGate | None = None) -> None:
    """Run ``m.forward`` under ``torch.utils.checkpoint`` (non-reentrant), like ComfyUI's ``nodes_train.patch``
    (same ``org_forward`` attribute, so ``nodes_train.unpatch`` undoes it), but hand the block a fresh copy of its
    tensor inputs on every run (forward and the recomputation in backward). Needed for blocks that update their
    inputs in place: checkpointing keeps references to the inputs, not copies, so the recomputation would
    otherwise see the in-place-updated values. Copies of the stream inputs (``img``/``txt``/``x``) only."""
    checkpoint_block(m, gate, copy_inputs=True)
