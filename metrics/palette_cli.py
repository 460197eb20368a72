"""``conceptlab palette IMAGE... [--palette "#hex,#hex" | --caption FILE] [--cells N] [--json]``.

One JSON object per image (one per line with ``--json``; keys documented in :func:`.palette.palette_report`),
or a short human summary. Bad input (missing file, unreadable image, malformed hex, caption that is not
UTF-8) → one clear line on stderr and exit code 2 (see :mod:`conceptlab.cli`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .color import MalformedHexError
from .palette import load_rgb, palette_from_caption, palette_report, parse_palette


def register(subparsers) -> None:
    """Add the ``palette`` subcommand."""
    p = subparsers.add_parser(
        "palette",
        help="palette metrics of pixel-art renders on their native grid",
        description="Detect the native pixel grid of each image, snap it, and report colour counts, background, "
        "cleanliness and (with --palette/--caption) fidelity to target hex codes within a ΔE00 tolerance.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, WebP, ...)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--palette", help='target colours, e.g. "#03dc73,#2c1600"')
    src.add_argument("--caption", help="caption text file whose hex codes are the targets")
    p.add_argument("--cells", type=int, help="override the grid: number of cells across (square cells)")
    p.add_argument("--background", help="expected background hex (adds background.delta_e00_to_expected)")
    p.add_argument("--tolerance", type=float, default=5.0, help="ΔE00 tolerance (default 5)")
    p.add_argument("--json", action="store_true", help="one JSON object per image, one per line")
    p.set_defaults(func=run)


def _caption_targets(path: str) -> tuple[list, list]:
    cp = Path(path)
    if not cp.is_file():
        raise FileNotFoundError(f"caption file not found: {cp}")
    raw = cp.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"caption {cp} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise ValueError(f"caption {cp} is empty")
    cols, bad = palette_from_caption(text)
    if not cols:
        raise ValueError(f"caption {cp} holds no valid hex colour code" + (f" (malformed: {', '.join(bad)})" if bad else ""))
    return cols, bad


def run(args) -> int:
    """Run the subcommand; returns the exit code."""
    targets, malformed = None, []
    if args.palette is not None:
        try:
            targets = parse_palette(args.palette)
        except MalformedHexError as exc:
            raise ValueError(f"--palette: {exc}") from None
        if not targets:
            raise ValueError("--palette is empty: give hex codes like \"#03dc73,#2c1600\"")
    elif args.caption:
        targets, malformed = _caption_targets(args.caption)
    if args.cells is not None and args.cells < 1:
        raise ValueError(f"--cells must be ≥ 1, got {args.cells}")
    if not (args.tolerance > 0):
        raise ValueError(f"--tolerance must be > 0, got {args.tolerance}")
    for path in args.images:
        rgb = load_rgb(path)
        rep = palette_report(rgb, targets=targets, cells=args.cells, expected_background=args.background,
                             tolerance=args.tolerance)
        rep = {"image": str(path), **rep}
        if malformed:
            rep["malformed_hex"] = malformed
        if args.json:
            sys.stdout.write(json.dumps(rep) + "\n")
        else:
            g = rep["grid"]
            line = (f"{path}: grid {g['cells_x']}x{g['cells_y']} ({g['cell_w']:.2f}x{g['cell_h']:.2f} px, "
                    f"confidence {g['confidence']:.2f}); colours raw {rep['unique_colors']}, effective "
                    f"{rep['effective_colors']} (95%: {rep['effective_colors_95']}); background "
                    f"{rep['background']['hex']} {rep['background']['name']} ({rep['background']['family']})")
            if targets:
                line += (f"; in-palette {rep['in_palette_frac']:.1%}, coverage {rep['palette_coverage']:.1%}, "
                         f"ΔE00 mean {rep['delta_e00_mean']:.2f}, missing {', '.join(rep['missing']) or 'none'}")
            print(line)
    return 0
