"""Block swapping for DiT training: kohya's ``--blocks_to_swap`` (``flux_train_network.py``) for the diffusers Flux host.

kohya-ss/sd-scripts at 48d368f:

* ``library/flux_models.py`` 972-990 ``Flux.enable_block_swap(num_blocks)``: ``double = num_blocks // 2`` double
  blocks and ``single = (num_blocks − double) · 2`` single blocks are swapped, each list by its own
  ``ModelOffloader``; it asserts ``double ≤ n_double − 2`` and ``single ≤ n_single − 2`` (Flux.1, 19 + 38 blocks:
  ``blocks_to_swap`` ≤ 35).
* ``library/custom_offloading_utils.py`` 170-276 ``ModelOffloader`` (S = blocks swapped, N = blocks in the list):
  before each step ``prepare_block_devices_before_forward`` (236-256) puts blocks ``0 … N−S−1`` on the device and
  the last S on the CPU. **Forward** (``flux_models.py`` 1058-1079): ``wait_for_block(i)`` before block i, then
  ``submit_move_blocks(i)`` after it, which — for i < S in training — moves block i to the CPU and block
  ``N − S + i`` to the device, so the device holds N − S blocks at any time and every block is resident when it
  runs; without backward (``forward_only``, sampling) every block rotates, which restores the starting layout.
  **Backward** (``create_backward_hook``, 208-234, a ``register_full_backward_hook`` on each block): after block
  k's backward, if ``0 < N − k − 1 ≤ S`` block ``k + 1`` goes to the CPU and block ``S − (N − k − 1)`` to the
  device; if ``0 < k ≤ S`` it waits for block ``k − 1``. After backward the layout is the starting one again.

This module keeps those indices and that order. Two implementation differences, neither changing which block is
where when it computes: (1) moves are synchronous ``Tensor.to`` copies (kohya overlaps them with compute on a
second CUDA stream from a worker thread) — the same peak of N − S resident blocks, slower per step on a GPU; (2)
the backward trigger is a gradient hook on the block's outputs ("block k's backward is about to start", which is
the moment block k + 1's backward has finished), because diffusers calls its blocks with keyword arguments, which
``register_full_backward_hook`` does not see; kohya's hook for block k + 1 is run there. Every frozen parameter and
buffer of a block moves (kohya moves the ``weight`` tensors and leaves biases/norms resident); trainable tensors
(LoRA / ESD deltas installed on the block) never move, so the optimizer's state stays with them. During the
recomputation of a checkpointed block in backward nothing is moved (the block is resident by construction).

Why hand-written: accelerate's ``cpu_offload`` / diffusers' ``enable_group_offload`` offload for inference (no
backward-order prefetch, no kohya index scheme), and kohya's own offloader is part of a training script, not a
library.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

#: ``(module, device)`` -> None: moves a block's frozen tensors; tests replace it to watch every move
Transfer = Callable[[nn.Module, torch.device], None]


def flux_swap_counts(blocks_to_swap: int, n_double: int, n_single: int) -> tuple[int, int]:
    """kohya's split of ``blocks_to_swap`` into (double, single) blocks (``flux_models.py`` 972-980):
    ``double = n // 2``, ``single = (n − double) · 2``.

    Raises ``ValueError`` for a negative count or when ``double > n_double − 2`` or ``single > n_single − 2``
    (kohya's assertion; Flux.1-dev/schnell, 19 + 38 blocks: at most 35)."""
    n = int(blocks_to_swap)
    if n < 0:
        raise ValueError(f"blocks_to_swap must be >= 0, got {blocks_to_swap}")
    double = n // 2
    single = (n - double) * 2
    if double > n_double - 2 or single > n_single - 2:
        most = max(m for m in range(0, 2 * (n_double + n_single))
                   if m // 2 <= n_double - 2 and (m - m // 2) * 2 <= n_single - 2) if n_double >= 2 and n_single >= 2 \
            else 0
        raise ValueError(f"blocks_to_swap = {n} would swap {double} double and {single} single blocks; this model has "
                         f"{n_double} double and {n_single} single blocks and at most {n_double - 2} double / "
                         f"{n_single - 2} single can be swapped (kohya flux_models.py enable_block_swap): use "
                         f"blocks_to_swap <= {most}")
    return double, single


def _frozen_modules(module: nn.Module, skip: Sequence[nn.Module] = ()):
    """``module`` and its submodules, without the subtrees of installed deltas (:class:`~.host.DeltaModule`,
    reached through ``torch.nn.utils.parametrize``): a delta's tensors train, so they stay with the optimizer."""
    from .host import DeltaModule

    stack, skipped = [module], {id(m) for m in skip}
    while stack:
        m = stack.pop()
        if isinstance(m, DeltaModule) or type(m).__name__ == "PieceDelta" or id(m) in skipped:
            continue
        yield m
        stack.extend(m.children())


def move_frozen(module: nn.Module, device: torch.device, skip: Sequence[nn.Module] = ()) -> None:
    """Move every frozen parameter (``requires_grad`` False) and buffer of ``module`` to ``device`` in place
    (``.data`` swap, so modules keep their parameter objects); installed deltas, trainable parameters and the
    subtrees of ``skip`` stay."""
    device = torch.device(device)
    with torch.no_grad():
        for m in _frozen_modules(module, skip):
            for name, p in m._parameters.items():
                if p is None or p.requires_grad or p.device == device:
                    continue
                try:
                    p.data = p.data.to(device, non_blocking=True)
                except RuntimeError:  # a tensor subclass whose .data cannot be swapped (quantized weights)
                    m._parameters[name] = nn.Parameter(p.data.to(device), requires_grad=False)
            for name, b in m._buffers.items():
                if b is not None and b.device != device:
                    m._buffers[name] = b.to(device, non_blocking=True)


def _in_backward() -> bool:
    """True while the autograd engine runs (a checkpointed block recomputing its forward)."""
    return torch._C._current_graph_task_id() != -1


class BlockSwap:
    """kohya's ``ModelOffloader`` for one list of blocks (module docstring): the last ``blocks_to_swap`` blocks
    start on ``offload_device`` and are rotated through ``device`` in forward and backward.

    Args:
        blocks: the block list (``nn.ModuleList``), in execution order.
        blocks_to_swap: S, 0 ≤ S ≤ len(blocks) − 2 (``ValueError`` otherwise); 0 installs nothing.
        device: the compute device; ``offload_device``: where swapped blocks wait (the CPU).
        transfer: ``(block, device)`` mover (default :func:`move_frozen`).

    Attributes: ``location`` — ``[device of block i]`` as this object placed them (what :meth:`check` compares
    with the tensors), ``log`` — when not None, ``(event, block index, layout)`` tuples are appended (tests).
    """

    def __init__(self, blocks: Sequence[nn.Module], blocks_to_swap: int, device: torch.device | str,
                 offload_device: torch.device | str = "cpu", transfer: Transfer | None = None):
        self.blocks = list(blocks)
        self.n = len(self.blocks)
        self.s = int(blocks_to_swap)
        if self.s < 0 or (self.s and self.s > self.n - 2):
            raise ValueError(f"can swap 0 to {max(0, self.n - 2)} of {self.n} blocks, not {blocks_to_swap}")
        self.device, self.offload = torch.device(device), torch.device(offload_device)
        self.transfer = transfer or move_frozen
        self.location: list[torch.device] = [self.device] * self.n
        self.forward_only = False
        self.log: list | None = None
        self._handles: list = []
        if self.s:
            for i, b in enumerate(self.blocks):
                self._handles.append(b.register_forward_pre_hook(self._pre_hook(i)))
                self._handles.append(b.register_forward_hook(self._post_hook(i)))

    # -- moves ------------------------------------------------------------------------------------------------
    def _move(self, i: int, device: torch.device) -> None:
        if self.location[i] != device:
            self.transfer(self.blocks[i], device)
            self.location[i] = device

    def _swap(self, to_offload: int, to_device: int) -> None:
        """kohya ``swap_weight_devices``: block ``to_offload`` leaves first, so at most N − S blocks are resident."""
        self._move(to_offload, self.offload)
        self._move(to_device, self.device)

    def _note(self, event: str, i: int) -> None:
        if self.log is not None:
            self.log.append((event, i, self.location_types()))

    def prepare(self, forward_only: bool = False) -> None:
        """Start of a forward (kohya ``prepare_block_devices_before_forward``): blocks ``0 … N−S−1`` on the device,
        the rest offloaded; ``forward_only`` (no backward follows: sampling, validation) rotates every block."""
        self.forward_only = bool(forward_only)
        if not self.s:
            return
        for i in range(self.n):
            self._move(i, self.offload if i >= self.n - self.s else self.device)
        self._note("prepare", -1)

    def location_types(self) -> tuple[str, ...]:
        """``("cpu"|"cuda"…, "offload", …)`` per block: the compute device's type or ``"offload"``."""
        return tuple(d.type if d == self.device else "offload" for d in self.location)

    def resident(self) -> int:
        """How many blocks are on the compute device now."""
        return sum(d == self.device for d in self.location)

    # -- hooks ------------------------------------------------------------------------------------------------
    def _pre_hook(self, i: int):
        def hook(module, args):
            if self.location[i] != self.device:  # kohya wait_for_block: never compute on an offloaded block
                raise RuntimeError(f"block swap: block {i} runs while its weights are on {self.location[i]} "
                                   "(was prepare() called before the forward?)")
            self._note("forward" if not _in_backward() else "recompute", i)
        return hook

    def _post_hook(self, i: int):
        def hook(module, args, output):
            if _in_backward():
                return None  # a checkpointed block's recomputation: the block stays resident for its backward
            if self.forward_only or not torch.is_grad_enabled():
                # kohya submit_move_blocks with forward_only: block i out, block (N − S + i) mod N in
                self._swap(i, (self.n - self.s + i) % self.n)
            elif i < self.s:
                self._swap(i, self.n - self.s + i)
            if torch.is_grad_enabled() and not self.forward_only:
                outs = [t for t in (output if isinstance(output, (tuple, list)) else (output,))
                        if isinstance(t, torch.Tensor) and t.requires_grad]
                if outs:
                    torch.autograd.graph.register_multi_grad_hook(outs, self._backward_hook(i), mode="any")
            return None
        return hook

    def _backward_hook(self, b: int):
        """Runs when block b's backward is about to start = block k = b + 1 has finished its backward: kohya's
        ``create_backward_hook(k)`` body (custom_offloading_utils.py 212-232)."""
        k = b + 1

        def hook(_grads):
            propagated = self.n - k - 1
            if 0 < propagated <= self.s:
                self._swap(self.n - propagated, self.s - propagated)
            if 0 < k <= self.s:
                self._move(k - 1, self.device)  # wait_for_block(k − 1): it is resident before its backward
            self._note("backward", b)
        return hook

    def remove(self) -> None:
        """Remove the hooks and bring every block back to the device."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for i in range(self.n):
            self._move(i, self.device)
