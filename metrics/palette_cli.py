"""``conceptlab palette IMAGE... [--palette "#hex,#hex" | --caption FILE] [--cells N] [--matte HEX]
[--cluster-threshold DE] [--save-native DIR] [--json]`` and ``conceptlab palette-summary DIR... [--json]``.

``palette``: one JSON object per image (one per line with ``--json``; keys documented in
:func:`.palette.palette_report`), or a short human summary with a ``WARNING`` line for a grid with status
``none`` / ``low_confidence``. An image that cannot be read is a finding for that file (``{"image", "error"}``
/ an ``error:`` line on stderr) and the batch goes on; the exit status is then 1. Bad options (malformed hex,
caption that is not UTF-8) stop before any image with exit status 2 (see :mod:`conceptlab.cli`).

``palette-summary``: per folder, the dataset palette, the spread of effective-colour counts, background
families and grid statuses (:mod:`.palette_summary`) — one row per folder, so a training set and a LoRA's
epoch samples compare in one table.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from .color import MalformedHexError, parse_hex
from .palette import CLUSTER_THRESHOLD, load_image, palette_from_caption, palette_report, parse_palette


def register(subparsers) -> None:
    """Add the ``palette`` and ``palette-summary`` subcommands."""
    p = subparsers.add_parser(
        "palette",
        help="palette metrics of pixel-art renders on their native grid",
        description="Detect the native pixel grid of each image (per-line cuts: drifting, cropped and soft "
        "grids), snap it, and report colour counts, background, cleanliness and (with --palette/--caption) "
        "fidelity to target hex codes within a ΔE00 tolerance. A render without a detectable grid gets "
        "grid.status none and null cell metrics, with a warning.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, WebP, ...)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--palette", help='target colours, e.g. "#03dc73,#2c1600"')
    src.add_argument("--caption", help="caption text file whose hex codes are the targets")
    p.add_argument("--cells", type=int, help="override the grid: number of cells across (square cells)")
    p.add_argument("--background", help="expected background hex (adds background.delta_e00_to_expected)")
    p.add_argument("--tolerance", type=float, default=5.0, help="ΔE00 tolerance (default 5)")
    p.add_argument("--cluster-threshold", type=float, default=CLUSTER_THRESHOLD,
                   help=f"ΔE00 under which cell colours are one effective colour (default {CLUSTER_THRESHOLD:g})")
    p.add_argument("--matte", help="composite transparency over this hex colour (default: transparent pixels "
                   "are excluded from colour metrics and a transparent background is reported as 'transparent')")
    p.add_argument("--save-native", metavar="DIR", help="write <stem>_native.png (one pixel per cell) and "
                   "<stem>_clean.png (clean nearest-neighbour upscale on the detected grid) into DIR")
    p.add_argument("--json", action="store_true", help="one JSON object per image, one per line")
    p.set_defaults(func=run)

    s = subparsers.add_parser(
        "palette-summary",
        help="dataset palette, effective-colour spread and background families of image folders",
        description="Summarise each folder (recursive; kohya subfolders too): its palette (cell colours of all "
        "images clustered in ΔE00), the spread of effective-colour counts, background families and grid "
        "statuses. Several folders (a training set, epoch samples) print as rows of one table.",
    )
    s.add_argument("folders", nargs="+", metavar="DIR", help="image folders")
    s.add_argument("--colors", type=int, default=16, help="palette size reported per folder (default 16)")
    s.add_argument("--cluster-threshold", type=float, default=CLUSTER_THRESHOLD,
                   help=f"ΔE00 clustering threshold (default {CLUSTER_THRESHOLD:g})")
    s.add_argument("--matte", help="composite transparency over this hex colour instead of excluding it")
    s.add_argument("--json", action="store_true", help="one JSON object per folder, one per line")
    s.set_defaults(func=run_summary)


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


def _matte(value):
    if value is None:
        return None
    try:
        return parse_hex(value)
    except MalformedHexError as exc:
        raise ValueError(f"--matte: {exc}") from None


def _save_png(arr, path: Path) -> None:
    """Atomic PNG write (temp file in the same folder, then rename)."""
    from PIL import Image

    fd, tmp = tempfile.mkstemp(suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        Image.fromarray(arr).save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _text(path, rep: dict, targets) -> str:
    g = rep["grid"]
    if g["status"] == "none":
        line = f"{path}: no pixel grid; colours raw {rep['unique_colors']}"
    else:
        part = f", partial {','.join(g['partial'])}" if g.get("partial") else ""
        bg = rep["background"]
        line = (f"{path}: grid {g['cells_x']}x{g['cells_y']} ({g['cell_w']:.2f}x{g['cell_h']:.2f} px{part}, "
                f"{g['status']}, confidence {g['confidence']:.2f}); colours raw {rep['unique_colors']}, effective "
                f"{rep['effective_colors']} (95%: {rep['effective_colors_95']}); background "
                + (f"{bg['hex']} {bg['name']} ({bg['family']})" if bg["hex"] else "transparent"))
        if targets:
            line += (f"; in-palette {rep['in_palette_frac']:.1%}, coverage {rep['palette_coverage']:.1%}, "
                     f"ΔE00 mean {rep['delta_e00_mean']:.2f}, missing {', '.join(rep['missing']) or 'none'}")
    for w in rep.get("warnings", []):
        line += f"\n  WARNING: {w}"
    return line


def run(args) -> int:
    """Run ``palette``; returns 0, or 1 when some image could not be read (the others are still reported)."""
    from .grid import upscale_native

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
    if not (args.cluster_threshold > 0):
        raise ValueError(f"--cluster-threshold must be > 0 (ΔE00), got {args.cluster_threshold}")
    matte = _matte(args.matte)
    if args.background:
        try:
            parse_hex(args.background)
        except MalformedHexError as exc:
            raise ValueError(f"--background: {exc}") from None
    out_dir = Path(args.save_native) if args.save_native else None
    if out_dir is not None:
        if out_dir.exists() and not out_dir.is_dir():
            raise NotADirectoryError(f"--save-native: {out_dir} is a file")
        out_dir.mkdir(parents=True, exist_ok=True)
    failed = 0
    for path in args.images:
        try:
            rgb, alpha = load_image(path, matte)
            rep = palette_report(rgb, alpha=alpha, targets=targets, cells=args.cells,
                                 expected_background=args.background, tolerance=args.tolerance,
                                 cluster_threshold=args.cluster_threshold, return_arrays=out_dir is not None)
        except (ValueError, OSError) as exc:  # one bad file is a finding, never the end of the batch
            failed += 1
            if args.json:
                sys.stdout.write(json.dumps({"image": str(path), "error": str(exc)}) + "\n")
            print(f"conceptlab palette: error: {path}: {exc}", file=sys.stderr)
            continue
        arrays = rep.pop("_arrays", None)
        rep = {"image": str(path), **rep}
        if malformed:
            rep["malformed_hex"] = malformed
        if out_dir is not None:
            if arrays["native"] is None:
                rep["warnings"].append("--save-native: nothing written (no pixel grid)")
            else:
                stem = Path(path).stem
                nat = arrays["native"]
                if arrays["opaque"] is not None:  # keep transparency in the written files
                    import numpy as np

                    nat = np.dstack([nat, np.where(arrays["opaque"], 255, 0).astype(np.uint8)])
                _save_png(nat, out_dir / f"{stem}_native.png")
                _save_png(upscale_native(nat, arrays["grid"]), out_dir / f"{stem}_clean.png")
                rep["saved"] = [str(out_dir / f"{stem}_native.png"), str(out_dir / f"{stem}_clean.png")]
        if args.json:
            sys.stdout.write(json.dumps(rep) + "\n")
        else:
            print(_text(path, rep, targets))
    if failed:
        print(f"conceptlab palette: {failed} of {len(args.images)} image(s) could not be read", file=sys.stderr)
    return 1 if failed else 0


def run_summary(args) -> int:
    """Run ``palette-summary``; returns 0, or 1 when some image of some folder could not be read."""
    from .palette_summary import summarize_folder, summary_table

    if args.colors < 1:
        raise ValueError(f"--colors must be ≥ 1, got {args.colors}")
    if not (args.cluster_threshold > 0):
        raise ValueError(f"--cluster-threshold must be > 0 (ΔE00), got {args.cluster_threshold}")
    matte = _matte(args.matte)
    sums = [summarize_folder(f, args.colors, args.cluster_threshold, matte) for f in args.folders]
    if args.json:
        for s in sums:
            sys.stdout.write(json.dumps(s) + "\n")
    else:
        print(summary_table(sums))
        for s in sums:
            for e in s["errors"]:
                print(f"conceptlab palette-summary: error: {e['image']}: {e['error']}", file=sys.stderr)
    return 1 if any(s["failed"] for s in sums) else 0
