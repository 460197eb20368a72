"""A quantized frozen base for LoRA training (``quantize_base`` in the CLI), with torchao.

Why torchao (not bitsandbytes or optimum-quanto): it is PyTorch's own, actively maintained quantization library;
its int8 weight-only scheme keeps ``nn.Linear`` modules as they are (only the weight becomes a quantized tensor
subclass) and runs on the CPU as well as CUDA, so a CPU test can show a LoRA training on an int8 base; bitsandbytes
has no CPU path and replaces modules; optimum-quanto is in maintenance mode and also swaps modules.

How it meets the weight-space deltas of :mod:`.lora.network`: a :class:`~.host.DeltaModule` dequantizes a quantized
weight before adding ΔW (``W_q.dequantize() + ΔW``), so only the layers that carry a delta see a dense weight, and
only while they run (with gradient checkpointing, per block); untouched layers use torchao's quantized matmul. The base
stays frozen and quantized in memory throughout.

Schemes: ``"int8"`` (``Int8WeightOnlyConfig``: per-channel symmetric int8, CPU and CUDA), ``"int4"``
(``Int4WeightOnlyConfig``, group size 128; CUDA kernels) and ``"fp8"`` (``Float8WeightOnlyConfig``; CUDA, compute
capability ≥ 8.9). Only int8 is exercised here (no GPU in CI); int4 / fp8 are refused on a non-CUDA device.
"""

from __future__ import annotations

import torch
from torch import nn

SCHEMES = ("int8", "int4", "fp8")


def _config(scheme: str):
    from torchao.quantization import Float8WeightOnlyConfig, Int4WeightOnlyConfig, Int8WeightOnlyConfig

    return {"int8": Int8WeightOnlyConfig, "int4": lambda: Int4WeightOnlyConfig(group_size=128),
            "fp8": Float8WeightOnlyConfig}[scheme]()


def is_quantized(t: torch.Tensor) -> bool:
    """True for a quantized tensor subclass (torchao's ``Int8Tensor``, ``AffineQuantizedTensor`` …)."""
    return type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "dequantize")


def dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or its dequantized dense tensor (same shape, the subclass's float dtype)."""
    return t.dequantize() if is_quantized(t) else t


def quantize_frozen(model: nn.Module, scheme: str, *, min_features: int = 16, skip: tuple[str, ...] = ()) -> int:
    """Quantize the weights of ``model``'s ``nn.Linear`` layers in place (weight-only; biases stay float).

    ``min_features``: layers with fewer input features are left dense (tiny embedders); ``skip``: module-path
    prefixes (``"transformer_blocks.17."``) left as they are (already quantized elsewhere). Returns the number of
    layers quantized. Raises ``ValueError`` for an unknown scheme, int4 / fp8 on a non-CUDA model, or a model with
    deltas already installed; ``ImportError`` (naming the ``quant`` extra) without torchao.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"quantize_base must be one of {', '.join(SCHEMES)}, not {scheme!r}")
    try:
        from torchao.quantization import quantize_
    except ImportError as exc:
        raise ImportError("quantize_base needs torchao: pip install 'conceptlab[quant]' (or torchao)") from exc
    dev = next((p.device for n, p in model.named_parameters() if not any(n.startswith(s) for s in skip)),
               next(model.parameters()).device)
    if scheme != "int8" and dev.type != "cuda":
        raise ValueError(f"quantize_base = {scheme!r} needs a CUDA device (torchao's {scheme} kernels); int8 also "
                         "runs on the CPU")
    from .host import OutputDeltaHook

    if any(".parametrizations." in n for n, _ in model.named_modules()) or any(
            isinstance(h, OutputDeltaHook) for m in model.modules() for h in m._forward_hooks.values()):
        raise ValueError("quantize the base before installing deltas")
    n = [0]

    def pick(mod: nn.Module, fqn: str) -> bool:
        ok = (isinstance(mod, nn.Linear) and mod.in_features >= min_features and mod.weight.is_floating_point()
              and not any(fqn.startswith(p) for p in skip))
        n[0] += int(ok)
        return ok

    quantize_(model, _config(scheme), filter_fn=pick)
    model.requires_grad_(False)
    return n[0]
