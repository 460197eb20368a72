"""``conceptlab audit-captions DIR [--json] [--fix-to OUTDIR]``: audit a captioned pixel-art dataset.

Registered by :mod:`conceptlab.cli` through :func:`register`. Exit codes: 0 audit done (findings or not;
use ``--fail-on`` to turn findings into exit code 3), 2 user error (missing folder, bad ``--fix-to``).
"""

from __future__ import annotations

import argparse
import json
import sys

from . import caption_fix
from . import captions as cap


def register(subparsers) -> None:
    """Add the ``audit-captions`` subcommand to the top-level ``subparsers``."""
    p = subparsers.add_parser(
        "audit-captions",
        help="audit hex codes in a captioned pixel-art dataset (duplicates, palette, image colours)",
        description="Audit every image/.txt caption pair of DIR (flat or kohya <repeats>_<name> subfolders): "
                    "duplicate / unlabelled / malformed hex codes, palette-list mismatches, colour words that "
                    "contradict their hex, and caption colours absent from the image (on its native pixel "
                    "grid). Finding codes: " + ", ".join(cap.FINDING_CODES) + ".",
    )
    p.add_argument("dir", metavar="DIR", help="dataset folder")
    p.add_argument("--json", action="store_true", help="print the report as JSON (schema in README)")
    p.add_argument("--fix-to", metavar="OUTDIR", default=None,
                   help="write corrected captions into this NEW folder (never in place; must not exist or "
                        "be empty, and must be outside DIR)")
    p.add_argument("--copy-images", action="store_true", help="with --fix-to, copy the images too")
    p.add_argument("--no-images", action="store_true", help="audit caption text only (do not open images)")
    p.add_argument("--tolerance", type=float, default=cap.DEFAULT_TOLERANCE,
                   help="ΔE00 within which a caption hex counts as present in the image (default %(default)s)")
    p.add_argument("--duplicate-de", type=float, default=cap.DEFAULT_DUPLICATE_DE,
                   help="ΔE00 below which two feature hexes are duplicates (default %(default)s)")
    p.add_argument("--min-fraction", type=float, default=cap.DEFAULT_UNCAPTIONED_FRAC,
                   help="share of cells (0..1) an image colour needs to require a caption hex "
                        "(default %(default)s)")
    p.add_argument("--fail-on", choices=("never", "error", "warning"), default="never",
                   help="exit 3 when findings of this severity (or worse) exist (default never)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the audit (and the optional fix); print text or JSON to stdout. Returns the exit code."""
    if args.copy_images and not args.fix_to:
        raise ValueError("--copy-images needs --fix-to OUTDIR")
    report = cap.audit_folder(args.dir, images=not args.no_images, tolerance=args.tolerance,
                              duplicate_de=args.duplicate_de, min_fraction=args.min_fraction)
    report["fix"] = None
    if args.fix_to:
        report["fix"] = caption_fix.fix_folder(args.dir, args.fix_to, images=not args.no_images,
                                       copy_images=args.copy_images, tolerance=args.tolerance)
    if args.json:
        json.dump(report, sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_text(report))
    sev = report["summary"]["by_severity"]
    if args.fail_on == "error" and sev["error"]:
        return 3
    if args.fail_on == "warning" and (sev["error"] or sev["warning"]):
        return 3
    return 0


def format_text(report: dict) -> str:
    """Human-readable report: one line per finding, then the summary counts."""
    lines = []
    for f in report["files"]:
        name = f["caption"] or f["image"] or f["key"]
        for fd in f["findings"]:
            lines.append(f"{name}: {fd['severity']}: {fd['code']}: {fd['message']}")
    s = report["summary"]
    lines.append("")
    lines.append(f"{s['items']} items ({s['images']} images, {s['captions']} captions, {s['pairs']} pairs); "
                 f"{s['findings']} findings in {s['files_with_findings']} files "
                 f"({s['by_severity']['error']} errors, {s['by_severity']['warning']} warnings, "
                 f"{s['by_severity']['info']} info)")
    counts = ", ".join(f"{c} {n}" for c, n in s["by_code"].items() if n)
    if counts:
        lines.append("by code: " + counts)
    fix = report.get("fix")
    if fix:
        lines.append(f"fix: wrote {fix['written']} captions to {fix['out_dir']} "
                     f"({len(fix['changed'])} changed, {len(fix['skipped'])} skipped)")
    return "\n".join(lines) + "\n"
