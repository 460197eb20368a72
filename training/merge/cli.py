"""``conceptlab merge``: merge checkpoint files (streaming, constant memory) or bake a LoRA into one.

    conceptlab merge A.safetensors B.safetensors [C.safetensors] --method weighted_sum --alpha 0.5 \\
        [--block-weights LIST|PRESET] [--density 0.2] [--seed N] [--dtype fp16] -o OUT.safetensors [--overwrite]
    conceptlab merge A.safetensors --lora style.safetensors --strength 0.8 -o OUT.safetensors
    conceptlab merge-n M1 M2 M3 [--weights 0.5,0.3,0.2] [--method ties --base BASE] -o OUT.safetensors

α (``--alpha``) is the weight of B: ``(1 − α)·A + α·B``. (ComfyUI's ModelMergeSimple ``ratio`` is 1 − α.)
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from .blocks import PRESET_HELP, PRESETS
from .methods import METHODS, TIES_SIGNS, MethodOptions


def register(subparsers) -> None:
    """Add the ``merge`` subcommand."""
    p = subparsers.add_parser(
        "merge",
        help="merge checkpoints (weighted sum, add/train difference, TIES, DARE, SLERP, per-block) or bake a LoRA",
        description="Merge checkpoint files tensor by tensor into a new safetensors file, in constant memory. "
                    "ALPHA IS THE WEIGHT OF B: (1-alpha)*A + alpha*B (ComfyUI's ModelMergeSimple ratio = 1 - alpha).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="methods:\n"
               "  weighted_sum      (1-a)*A + a*B\n"
               "  add_difference    A + a*(B - C)              (C required)\n"
               "  train_difference  supermerger's train difference of B-C onto A (C required)\n"
               "  ties              TIES-merging of task vectors A-C, B-C weighted (1-a, a); without C: A + a*TIES(B-A)\n"
               "  dare              DARE (drop 1-density, rescale) of the same task vectors, seeded\n"
               "  della             DELLA: magnitude-ranked random drop, TIES sign election + disjoint mean, rescale\n"
               "  slerp             spherical interpolation per tensor (linear when nearly parallel)\n"
               "  model_stock       Model Stock: C + t*mean(A-C, B-C), t from the angle (C required; alpha unused)\n"
               "conventions (README 'Merge conventions'): --ties-sign sum (paper, mergekit) | count (sd-mecha);\n"
               "  --slerp-rescale-norm (sd-mecha) or not (mergekit); --della-rescale element (paper) | global (sd-mecha)\n"
               f"block-weight presets: {', '.join(PRESETS)}\n  {PRESET_HELP}\n"
               "block-weight lists: BASE,IN00,...,M00,...,OUT11 (26 values SD1, 20 SDXL), the blocks only, or "
               "named entries IN00=0.2,OUT05=1",
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help="A [B [C]]: checkpoints (.safetensors; .ckpt read weights-only) or diffusers model folders; "
                   "Flux files in BFL / ComfyUI / diffusers layouts mix (the output has A's layout)")
    p.add_argument("-o", "--output", required=True, help="output .safetensors file")
    p.add_argument("--method", choices=METHODS, default="weighted_sum", help="merge method (default weighted_sum)")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of B (default 0.5); outside [0,1] warns")
    p.add_argument("--block-weights", default=None, metavar="LIST|PRESET",
                   help="per-block B-weights for the UNet (comma list or preset name)")
    p.add_argument("--density", type=float, default=0.2,
                   help="TIES: fraction of each task vector kept; DARE: keep probability (drop rate = 1 - density)")
    p.add_argument("--seed", type=int, default=0, help="DARE / DELLA seed (masks are derived from seed + key name)")
    _add_convention_args(p)
    p.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"), help="output dtype (default fp16)")
    p.add_argument("--text-encoder", choices=("merge", "a"), default="merge",
                   help="merge the text encoder (default, with --te-alpha or the BASE weight) or take it from A")
    p.add_argument("--te-alpha", type=float, default=None, help="B-weight for the text encoder")
    p.add_argument("--vae", choices=("a", "merge"), default="a",
                   help="take the VAE from A (default) or merge it (with --vae-alpha or the BASE weight)")
    p.add_argument("--vae-alpha", type=float, default=None, help="B-weight for the VAE")
    p.add_argument("--lora", default=None, metavar="FILE", help="bake this LoRA into the result")
    p.add_argument("--strength", type=float, default=1.0, help="LoRA strength (default 1.0)")
    p.add_argument("--shape-mismatch", choices=("error", "a"), default="error",
                   help="keys whose shapes differ: stop with an error (default) or copy them from A")
    p.add_argument("--no-hash", action="store_true", help="do not store the inputs' SHA-256 in the recipe")
    _add_hash_cache_arg(p)
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--report", default=None, metavar="JSON", help="also write the merge report as JSON here")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run)
    _register_n(subparsers)


def _add_convention_args(p) -> None:
    p.add_argument("--ties-sign", choices=TIES_SIGNS, default="sum",
                   help="TIES/DELLA sign election: sum = sign of the summed task vectors (paper, mergekit; default); "
                        "count = one vote per model (sd-mecha's default)")
    p.add_argument("--slerp-rescale-norm", action="store_true",
                   help="SLERP: interpolate directions and give the result the lerp of the norms (sd-mecha); "
                        "default: Shoemake's formula on the raw tensors (mergekit)")
    p.add_argument("--della-epsilon", type=float, default=0.1,
                   help="DELLA: keep probabilities span density +- epsilon/2 by magnitude rank (default 0.1)")
    p.add_argument("--della-rescale", choices=("element", "global"), default="element",
                   help="DELLA: divide kept entries by their own keep probability (element, paper; default) or the "
                        "merged vector by density (global, sd-mecha)")


def _add_hash_cache_arg(p) -> None:
    p.add_argument("--no-hash-cache", action="store_true",
                   help="hash every input again instead of reusing the SHA-256 remembered for an unchanged file "
                        "(same path, size, mtime, inode; cache: $CONCEPTLAB_HASH_CACHE or "
                        "~/.cache/conceptlab/sha256.json)")


def _options(args) -> MethodOptions:
    return MethodOptions(ties_sign=args.ties_sign, slerp_rescale_norm=args.slerp_rescale_norm,
                         della_epsilon=args.della_epsilon, della_rescale=args.della_rescale)


def _register_n(subparsers) -> None:
    from .nmodel import METHODS_N

    p = subparsers.add_parser(
        "merge-n",
        help="merge N checkpoints (weighted sum, or TIES / DARE / DELLA / Model Stock over a --base)",
        description="Merge two or more checkpoint files tensor by tensor into one safetensors file, in constant "
                    "memory. weighted_sum: sum_i w_i*M_i (weights default 1/N each). ties / dare / della: task "
                    "vectors M_i - BASE weighted w_i. model_stock: BASE + t*mean(M_i - BASE), t from the angle "
                    "between the models (no weights). The output has the first model's keys; VAE from the first "
                    "model unless --vae merge.",
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help="two or more checkpoints (.safetensors)")
    p.add_argument("-o", "--output", required=True, help="output .safetensors file")
    p.add_argument("--method", choices=METHODS_N, default="weighted_sum", help="merge method (default weighted_sum)")
    p.add_argument("--weights", default=None, metavar="W1,W2,...",
                   help="one weight per model (default 1/N each); a sum other than 1 scales the result (warning)")
    p.add_argument("--base", default=None, metavar="FILE",
                   help="the model the others were fine-tuned from (required for ties, dare, della, model_stock)")
    p.add_argument("--density", type=float, default=0.2, help="TIES keep fraction / DARE, DELLA keep probability")
    p.add_argument("--seed", type=int, default=0, help="DARE / DELLA seed")
    _add_convention_args(p)
    p.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"), help="output dtype (default fp16)")
    p.add_argument("--text-encoder", choices=("merge", "a"), default="merge",
                   help="merge the text encoders (default) or take the first model's")
    p.add_argument("--vae", choices=("a", "merge"), default="a", help="first model's VAE (default) or merge it")
    p.add_argument("--no-hash", action="store_true", help="do not store the inputs' SHA-256 in the recipe")
    _add_hash_cache_arg(p)
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--report", default=None, metavar="JSON", help="also write the merge report as JSON here")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run_n)


#: why the merge commands refuse a multi-process launch (:func:`..distributed.refuse_multi_process`)
_ONE_WRITER = ("a merge streams every tensor of its inputs once into one output file; each process would merge and "
               "write the same file")


def run_n(args) -> int:
    """Execute ``conceptlab merge-n``; returns 0 on success."""
    from ..distributed import refuse_multi_process

    refuse_multi_process("merge-n", _ONE_WRITER)
    from ...cli import CLIError
    from ...formats.safetensors_io import atomic_write_text
    from .nmodel import merge_checkpoints_n

    progress = ProgressLine(quiet=args.quiet)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # collected in the report and printed below
        try:
            report = merge_checkpoints_n(
                args.models, args.output, weights=args.weights, method=args.method, base=args.base,
                density=args.density, seed=args.seed, dtype=args.dtype, te=args.text_encoder, vae=args.vae,
                overwrite=args.overwrite, hash_inputs=not args.no_hash, options=_options(args), progress=progress,
                hash_cache=not args.no_hash_cache)
        except FileExistsError as exc:
            progress.end_line()
            raise CLIError(str(exc)) from None
        except BaseException:
            progress.end_line()
            raise
    print(report.summary())
    if args.report:
        atomic_write_text(args.report, json.dumps(report.to_json(), indent=2))
    return 0


def run(args) -> int:
    """Execute ``conceptlab merge``; returns 0 on success (errors are raised for cli.main to print)."""
    from ..distributed import refuse_multi_process

    refuse_multi_process("merge", _ONE_WRITER)
    from ...formats.safetensors_io import atomic_write_text
    from .files import merge_checkpoints

    models = list(args.models)
    if len(models) > 3:
        raise ValueError(f"give at most three models (A B C), got {len(models)}; to merge more use "
                         "`conceptlab merge-n`")
    a = models[0]
    b = models[1] if len(models) > 1 else None
    c = models[2] if len(models) > 2 else None
    if b is None and args.lora is None:
        raise ValueError("give model B to merge with, or --lora FILE to bake a LoRA into A")

    progress = ProgressLine(quiet=args.quiet)

    from ...cli import CLIError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # collected in the report and printed below
        try:
            report = _merge(merge_checkpoints, a, b, c, args, progress)
        except FileExistsError as exc:  # a user error: exit 2 with the message, no traceback
            progress.end_line()
            raise CLIError(str(exc)) from None
        except BaseException:
            progress.end_line()  # the error message starts on its own line, not after "(n/total tensors)"
            raise
    print(report.summary())
    if args.report:
        atomic_write_text(args.report, json.dumps(report.to_json(), indent=2))
    return 0


class ProgressLine:
    """``merging: 45% (510/1130 tensors)`` on one stderr line, rewritten in place (every 5 %);
    :meth:`end_line` ends an unfinished line so that what is printed next starts on a line of its own."""

    def __init__(self, quiet: bool = False, label: str = "merging", stream=None):
        self.quiet, self.label, self.stream = quiet, label, stream
        self._last = -1
        self._open = False

    def __call__(self, done: int, total: int) -> None:
        if self.quiet:
            return
        pct = done * 100 // max(total, 1)
        if pct != self._last and (pct % 5 == 0 or done == total):
            self._last = pct
            end = "" if done < total else "\n"
            print(f"\r{self.label}: {pct:3d}% ({done}/{total} tensors)", end=end,
                  file=self.stream or sys.stderr, flush=True)
            self._open = done < total

    def end_line(self) -> None:
        if self._open:
            print(file=self.stream or sys.stderr, flush=True)
            self._open = False


def _merge(merge_checkpoints, a, b, c, args, progress):
    return merge_checkpoints(
        a, b, args.output, c=c, method=args.method, alpha=args.alpha, block_weights=args.block_weights,
        density=args.density, seed=args.seed, dtype=args.dtype, te=args.text_encoder, vae=args.vae,
        te_alpha=args.te_alpha, vae_alpha=args.vae_alpha, lora=args.lora, lora_strength=args.strength,
        overwrite=args.overwrite, on_shape_mismatch=args.shape_mismatch, hash_inputs=not args.no_hash,
        options=_options(args), progress=progress, hash_cache=not args.no_hash_cache)
