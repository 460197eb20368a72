"""``conceptlab extract-lora`` and ``conceptlab resize-lora``: kohya-style LoRA extraction and resizing by SVD.

    conceptlab extract-lora BASE.safetensors TUNED.safetensors -o style.safetensors --rank 32 [--conv-rank 16]
        [--mode energy --param 0.9] [--min-diff 0.01] [--dtype fp16] [--report report.json]
    conceptlab resize-lora big.safetensors -o small.safetensors --rank 16 [--mode sv_fro --param 0.95]

kohya equivalents: ``networks/extract_lora_from_models.py --dim --conv_dim --min_diff`` and
``networks/resize_lora.py --new_rank --new_conv_rank --dynamic_method --dynamic_param``.
"""

from __future__ import annotations

import json
import sys

from .extract import RANK_MODES

_DTYPES = ("fp16", "bf16", "fp32")


def _progress(quiet: bool, what: str):
    last = [-1]

    def cb(done: int, total: int) -> None:
        if quiet:
            return
        pct = done * 100 // total
        if pct != last[0] and (pct % 5 == 0 or done == total):
            last[0] = pct
            print(f"\r{what}: {pct:3d}% ({done}/{total} layers)", end="" if done < total else "\n",
                  file=sys.stderr, flush=True)
    return cb


def _common(p) -> None:
    p.add_argument("-o", "--output", required=True, help="output LoRA .safetensors")
    p.add_argument("--mode", choices=RANK_MODES, default="fixed",
                   help="rank rule per layer: fixed (--rank), energy (smallest rank keeping --param of ||dW||^2), "
                        "or kohya's dynamic sv_ratio / sv_fro / sv_cumulative with --param (--rank is the cap)")
    p.add_argument("--param", type=float, default=None, help="the rank rule's parameter (see --mode)")
    p.add_argument("--dtype", choices=_DTYPES, default="fp16", help="tensor dtype in the file (default fp16)")
    p.add_argument("--device", default="cpu", help="device for the SVDs (cpu, cuda)")
    p.add_argument("--report", default=None, metavar="JSON", help="write the per-layer report here")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("-v", "--verbose", action="store_true", help="print every layer's rank and energy kept")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")


def register(subparsers) -> None:
    """Add the ``extract-lora`` and ``resize-lora`` subcommands."""
    p = subparsers.add_parser("extract-lora", help="extract a kohya LoRA from two checkpoints (fine-tune - base)",
                              description="Extract a kohya LoRA (lora_down/lora_up/alpha) from the difference of "
                                          "two SD1/SD2/SDXL checkpoints by truncated SVD, per layer.")
    p.add_argument("base", help="the original checkpoint (.safetensors; .ckpt read weights-only)")
    p.add_argument("tuned", help="the fine-tuned or merged checkpoint")
    p.add_argument("--rank", type=int, default=32, help="network_dim (cap for non-fixed modes; default 32)")
    p.add_argument("--conv-rank", type=int, default=0,
                   help="rank for 3x3 conv layers (ResNet blocks); 0 = leave them out (default, as kohya)")
    p.add_argument("--min-diff", type=float, default=0.01,
                   help="leave a text encoder out when no module of it changed by more than this (kohya, 0.01)")
    _common(p)
    p.set_defaults(func=run_extract)

    r = subparsers.add_parser("resize-lora", help="resize a LoRA to a lower rank (SVD; kohya's dynamic methods)",
                              description="Re-factorise every LoRA module at a lower rank by SVD (kohya resize_lora "
                                          "semantics: alpha = old_alpha/old_rank * new_rank keeps the weights).")
    r.add_argument("lora", help="LoRA file (kohya lora_down/lora_up or peft lora_A/lora_B)")
    r.add_argument("--rank", type=int, required=True, help="new rank (cap for non-fixed modes)")
    r.add_argument("--conv-rank", type=int, default=None, help="new rank of conv (4-D) modules (default --rank)")
    _common(r)
    r.set_defaults(func=run_resize)


def _finish(args, report: dict) -> None:
    from ...formats.safetensors_io import atomic_write_text
    from .extract import layer_table

    print(layer_table(report, None if args.verbose else 10))
    if args.report:
        atomic_write_text(args.report, json.dumps(report, indent=2))


def run_extract(args) -> int:
    """Execute ``conceptlab extract-lora``."""
    from ..distributed import refuse_multi_process

    refuse_multi_process("extract-lora", "extraction is one SVD per layer into one output file; each process would "
                         "compute and write the same file")
    from ...formats.lora_files import save_kohya_lora
    from ...formats.safetensors_io import parse_dtype
    from .extract import extract_lora

    res = extract_lora(args.base, args.tuned, rank=args.rank, conv_rank=args.conv_rank, mode=args.mode,
                       param=args.param, min_diff=args.min_diff, device=args.device,
                       progress=_progress(args.quiet, "extracting"))
    save_kohya_lora(args.output, res.modules, res.metadata, dtype=parse_dtype(args.dtype), overwrite=args.overwrite)
    _finish(args, res.report)
    return 0


def run_resize(args) -> int:
    """Execute ``conceptlab resize-lora``."""
    from ..distributed import refuse_multi_process

    refuse_multi_process("resize-lora", "resizing is one SVD per layer into one output file; each process would "
                         "compute and write the same file")
    from ...formats.safetensors_io import parse_dtype
    from .extract import resize_lora, save_lora_tensors

    tensors, report, md = resize_lora(args.lora, rank=args.rank, conv_rank=args.conv_rank, mode=args.mode,
                                      param=args.param, device=args.device, progress=_progress(args.quiet, "resizing"))
    save_lora_tensors(args.output, tensors, md, dtype=parse_dtype(args.dtype), overwrite=args.overwrite)
    _finish(args, report)
    return 0
