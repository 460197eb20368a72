"""``conceptlab diff`` and ``conceptlab diff-compare``: weight-diff reports from the command line.

::

    conceptlab diff A B [--lora-strength S] [--json OUT.json] [--markdown OUT.md] [--plot OUT.png] [--rank]
    conceptlab diff-compare R1.json R2.json [--json OUT.json] [--markdown OUT.md] [--plot OUT.png]

A and B are checkpoint or LoRA files (``.safetensors``; ``.ckpt``/``.pt`` only if ``torch.load(weights_only=True)``
accepts them). The Markdown report goes to stdout unless ``--quiet``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys


def dumps_report(report) -> str:
    """JSON text of a report (NaN/inf written as strings so the file stays strict JSON)."""
    def clean(x):
        if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
            return str(x)
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(report), indent=1, ensure_ascii=False, allow_nan=False)


def register(subparsers) -> None:
    """Add the ``diff`` and ``diff-compare`` subcommands."""
    p = subparsers.add_parser(
        "diff", help="what changed between two checkpoints / a checkpoint and a LoRA / two LoRAs",
        description="Stream two weight files tensor by tensor and report mean/max |Δ|, std, relative change, "
                    "cosine, per layer type, block and component.")
    p.add_argument("a", help="first file (checkpoint or LoRA, .safetensors preferred) or diffusers model folder")
    p.add_argument("b", help="second file (checkpoint or LoRA)")
    p.add_argument("--lora-strength", type=float, default=1.0, metavar="S",
                   help="strength applied to LoRA ΔW (default 1.0)")
    p.add_argument("--json", metavar="OUT", help="write the JSON report here")
    p.add_argument("--markdown", metavar="OUT", help="write the Markdown report here")
    p.add_argument("--plot", metavar="OUT.png", help="write the plots (layer types, block heatmap, histogram)")
    p.add_argument("--rank", action="store_true", help="effective rank of each changed ΔW (randomized SVD)")
    p.add_argument("--rank-budget", type=float, default=60.0, metavar="SEC",
                   help="time budget for --rank (default 60 s; later tensors are skipped)")
    p.add_argument("--rank-energy", type=float, default=0.9, help="energy fraction for --rank (default 0.9)")
    p.add_argument("--tolerance", type=float, default=0.0,
                   help="|Δ| above this counts as a changed element (default 0: any change)")
    p.add_argument("--top", type=int, default=20, help="most-changed tensors to list (default 20)")
    p.add_argument("--skip-mismatched", action="store_true",
                   help="skip same-name tensors whose shapes differ instead of stopping")
    p.add_argument("--no-tensors", action="store_true", help="leave the per-tensor rows out of the JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="do not print the Markdown report")
    p.set_defaults(func=_run_diff)

    c = subparsers.add_parser(
        "diff-compare", help="ratio table of two diff reports (e.g. 100 vs 500 iterations)",
        description="Compare two JSON reports of `conceptlab diff`: ratio R2/R1 per metric and group.")
    c.add_argument("r1", help="first report (JSON)")
    c.add_argument("r2", help="second report (JSON)")
    c.add_argument("--json", metavar="OUT", help="write the comparison as JSON")
    c.add_argument("--markdown", metavar="OUT", help="write the Markdown tables here")
    c.add_argument("--plot", metavar="OUT.png", help="write a ratio bar chart per layer type")
    c.add_argument("--label1", help="name of the first report in tables")
    c.add_argument("--label2", help="name of the second report in tables")
    c.add_argument("-q", "--quiet", action="store_true", help="do not print the Markdown tables")
    c.set_defaults(func=_run_compare)


def _run_diff(args: argparse.Namespace) -> int:
    from .diff_report import report_markdown
    from .diff_models import diff_files
    from .weight_diff import DiffOptions

    if args.rank_energy <= 0 or args.rank_energy > 1:
        raise ValueError("--rank-energy must be in (0, 1]")
    if args.tolerance < 0:
        raise ValueError("--tolerance must be >= 0")
    opts = DiffOptions(tolerance=args.tolerance, top_n=args.top, rank=args.rank, rank_energy=args.rank_energy,
                       rank_time_budget_s=args.rank_budget, include_tensors=not args.no_tensors)
    report = diff_files(args.a, args.b, lora_strength=args.lora_strength, options=opts,
                        allow_shape_mismatch=args.skip_mismatched)
    from .diff_plots import render_plots

    return _write_outputs(args, report, report_markdown(report, top_n=min(args.top, 20)), render_plots)


def _run_compare(args: argparse.Namespace) -> int:
    from .diff_report import compare_markdown
    from .weight_diff import compare_reports

    cmp = compare_reports(args.r1, args.r2, label1=args.label1, label2=args.label2)
    from .diff_plots import plot_compare

    return _write_outputs(args, cmp, compare_markdown(cmp), plot_compare)


def _write_outputs(args: argparse.Namespace, report: dict, md: str, plot) -> int:
    """Write ``--json`` / ``--markdown`` / ``--plot`` (``plot(report)`` → image) atomically; print the Markdown
    unless ``--quiet``. Returns exit code 0."""
    from ..formats.safetensors_io import atomic_write_text
    from .diff_plots import save_png

    if args.json:
        atomic_write_text(args.json, dumps_report(report))
    if args.markdown:
        atomic_write_text(args.markdown, md + "\n")
    if args.plot:
        save_png(plot(report), args.plot)
    if not args.quiet:
        print(md)
    sys.stdout.flush()
    return 0
