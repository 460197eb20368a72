"""``conceptlab merge``: merge checkpoint files (streaming, constant memory) or bake a LoRA into one.

    conceptlab merge A.safetensors B.safetensors [C.safetensors] --method weighted_sum --alpha 0.5 \\
        [--block-weights LIST|PRESET] [--density 0.2] [--seed N] [--dtype fp16] -o OUT.safetensors [--overwrite]
    conceptlab merge A.safetensors --lora style.safetensors --strength 0.8 -o OUT.safetensors

α (``--alpha``) is the weight of B: ``(1 − α)·A + α·B``. (ComfyUI's ModelMergeSimple ``ratio`` is 1 − α.)
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from .merge import METHODS, PRESET_HELP, PRESETS


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
               "  slerp             spherical interpolation per tensor (linear when nearly parallel)\n"
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
    p.add_argument("--seed", type=int, default=0, help="DARE seed (masks are derived from seed + key name)")
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
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--report", default=None, metavar="JSON", help="also write the merge report as JSON here")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run)


def run(args) -> int:
    """Execute ``conceptlab merge``; returns 0 on success (errors are raised for cli.main to print)."""
    from ..formats.safetensors_io import atomic_write_text
    from .merge_files import merge_checkpoints

    models = list(args.models)
    if len(models) > 3:
        raise ValueError(f"give at most three models (A B C), got {len(models)}")
    a = models[0]
    b = models[1] if len(models) > 1 else None
    c = models[2] if len(models) > 2 else None
    if b is None and args.lora is None:
        raise ValueError("give model B to merge with, or --lora FILE to bake a LoRA into A")

    last = [-1]

    def progress(done: int, total: int) -> None:
        if args.quiet:
            return
        pct = done * 100 // total
        if pct != last[0] and (pct % 5 == 0 or done == total):
            last[0] = pct
            print(f"\rmerging: {pct:3d}% ({done}/{total} tensors)", end="" if done < total else "\n",
                  file=sys.stderr, flush=True)

    from ..cli import CLIError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # collected in the report and printed below
        try:
            report = _merge(merge_checkpoints, a, b, c, args, progress)
        except FileExistsError as exc:  # a user error: exit 2 with the message, no traceback
            raise CLIError(str(exc)) from None
    print(report.summary())
    if args.report:
        atomic_write_text(args.report, json.dumps(report.to_json(), indent=2))
    return 0


def _merge(merge_checkpoints, a, b, c, args, progress):
    return merge_checkpoints(
        a, b, args.output, c=c, method=args.method, alpha=args.alpha, block_weights=args.block_weights,
        density=args.density, seed=args.seed, dtype=args.dtype, te=args.text_encoder, vae=args.vae,
        te_alpha=args.te_alpha, vae_alpha=args.vae_alpha, lora=args.lora, lora_strength=args.strength,
        overwrite=args.overwrite, on_shape_mismatch=args.shape_mismatch, hash_inputs=not args.no_hash,
        progress=progress)
