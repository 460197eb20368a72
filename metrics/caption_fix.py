"""Fixing captions: :func:`fix_caption` rewrites one caption (malformed hex tokens normalised, a labelled hex absent
from the image snapped to the nearest image colour within ``snap_de`` ΔE00, the ``palette:`` list rebuilt) and
:func:`fix_folder` writes every fixed caption of a dataset folder into a *new* folder, never over the input.
Part of the caption audit (:mod:`.captions`), whose findings say what these fixes change.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .caption_colours import ImageColours, _de00_matrix, _hex_to_lab, image_colours, load_rgb
from .caption_parse import HexToken, _is_hex_only, parse_caption
from .captions import DEFAULT_SNAP_FIX_DE, DEFAULT_TOLERANCE, _rel, read_caption, scan_folder

def fix_caption(text: str, colours: ImageColours | None = None, *, tolerance: float = DEFAULT_TOLERANCE,
                snap_de: float = DEFAULT_SNAP_FIX_DE) -> tuple[str, list[str]]:
    """Rewrite one caption with its safe fixes applied; returns ``(new_text, changes)``.

    Fixes: hex codes lower-cased; recoverable malformed hexes repaired (missing '#', 3-digit shorthand,
    doubled '#'), unrecoverable ones removed; stray hexes and labelled hexes missing from the palette list
    moved/added into it (a palette list is created when strays exist); repeated palette entries dropped;
    with ``colours``, a labelled hex absent from the image (> ``tolerance``) is replaced by the nearest
    snapped image colour when that is within ``snap_de`` ΔE00. Duplicates between features and
    colour-word mismatches need a person's judgement and are left as they are. Segments are re-joined with
    ``", "``; other text is kept verbatim.
    """
    parsed = parse_caption(text)
    changes: list[str] = []
    replace: dict[str, str] = {}
    if colours is not None and len(colours.cell_lab):
        lab_hex = colours.cell_hex
        labelled = list(dict.fromkeys(h for _, h in parsed.labelled))
        if labelled:
            d = _de00_matrix(_hex_to_lab(labelled), colours.cell_lab)
            for h, row in zip(labelled, d):
                j = int(np.argmin(row))
                if tolerance < row[j] <= snap_de:
                    replace[h] = lab_hex[j]

    def fixed(t: HexToken) -> str | None:
        if t.ok:
            new = replace.get(t.hex, t.hex)
            if new != t.hex:
                changes.append(f"{t.feature or t.hex}: {t.hex} -> {new} (nearest image colour)")
            elif t.raw.lower() != t.hex:
                changes.append(f"normalised {t.raw!r} -> {t.hex}")
            return new
        if t.suggestion:
            changes.append(f"repaired malformed {t.raw!r} -> {t.suggestion}")
            return t.suggestion
        changes.append(f"removed malformed {t.raw!r}")
        return None

    out: list[str] = []
    palette: list[str] = []
    palette_at: int | None = None
    by_seg: dict[int, list[HexToken]] = {}
    for t in parsed.tokens:
        by_seg.setdefault(t.segment, []).append(t)
    labelled_hexes: list[str] = []
    for i, seg in enumerate(parsed.segments):
        toks = by_seg.get(i, [])
        if i in parsed.palette_segments or (toks and toks[0].role in ("palette", "stray")
                                           and all(t.role == toks[0].role for t in toks)
                                           and _is_hex_only(seg)):
            if palette_at is None:
                palette_at = len(out)
                out.append("")  # placeholder for the palette list
            for t in toks:
                h = fixed(t)
                if h is None:
                    continue
                if t.role == "stray":
                    changes.append(f"moved unlabelled {h} into the palette list")
                palette.append(h)
            continue
        new_seg = seg
        for t in toks:
            h = fixed(t)
            if h is not None:
                labelled_hexes.append(h)
            if t.ok or t.suggestion or h is None:
                pat = re.escape(t.raw) if t.raw.startswith("#") else rf"\(\s*{re.escape(t.raw)}\s*\)"
                rep = h if t.raw.startswith("#") else f"({h})"
                if h is None:
                    rep = ""
                new_seg = re.sub(pat + (r"(?![0-9A-Za-z_])" if t.raw.startswith("#") else ""),
                                 lambda _m, r=rep: r, new_seg, count=1)
        new_seg = re.sub(r"\(\s*[,;]?\s*\)", "", new_seg)
        new_seg = re.sub(r"\s+", " ", new_seg).strip()
        if new_seg:
            out.append(new_seg)
    if parsed.has_palette or palette:
        for h in labelled_hexes:
            if h not in palette:
                changes.append(f"added labelled {h} to the palette list")
                palette.append(h)
    deduped = list(dict.fromkeys(palette))
    if len(deduped) < len(palette):
        changes.append("dropped repeated palette entries")
    if palette_at is None and deduped:
        palette_at = len(out)
        out.append("")
    if palette_at is not None:
        out[palette_at] = "palette: " + ", ".join(deduped) if deduped else "palette:"
    new_text = ", ".join(s for s in out if s)
    if text.endswith("\n"):
        new_text += "\n"
    if new_text.strip() == text.strip().replace("\r", ""):
        return text, []
    # lower-casing alone is a change too
    if not changes:
        changes.append("normalized hex codes / separators")
    return new_text, list(dict.fromkeys(changes))


def _check_fix_target(root: Path, out: Path) -> None:
    r = root.resolve()
    o = out.resolve()
    if o == r:
        raise ValueError(f"--fix-to {out} is the dataset folder itself; corrected captions go to a NEW folder")
    if r in o.parents:
        raise ValueError(f"--fix-to {out} is inside the dataset folder; pick a folder outside it")
    if o in r.parents:
        raise ValueError(f"--fix-to {out} contains the dataset folder; pick a separate folder")
    if o.exists() and (not o.is_dir() or any(o.iterdir())):
        raise ValueError(f"--fix-to {out} already exists and is not an empty folder; pick a new folder")


def fix_folder(root: str | os.PathLike, out: str | os.PathLike, *, images: bool = True,
               copy_images: bool = False, tolerance: float = DEFAULT_TOLERANCE,
               snap_de: float = DEFAULT_SNAP_FIX_DE,
               progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Write corrected copies of every caption of ``root`` into the NEW folder ``out`` (same relative paths).

    The dataset is never modified. Every UTF-8 caption is written (changed or not, atomically), so ``out``
    is a complete caption set; non-UTF-8, unreadable and empty captions are skipped and listed. With
    ``copy_images`` the paired images are copied too, making ``out`` a trainable dataset.

    Returns:
        ``{"out_dir", "written", "changed": [{"caption", "changes"}], "skipped": [{"caption", "reason"}]}``.
    Raises:
        ValueError: ``out`` is ``root``, inside it, contains it, or is an existing non-empty folder/file.
    """
    import shutil

    from ..formats.safetensors_io import atomic_output, atomic_write_text

    root_p = Path(root)
    out_p = Path(out)
    items = scan_folder(root_p)
    _check_fix_target(root_p, out_p)
    written = 0
    changed: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for n, item in enumerate(items):
        if item.caption is not None:
            rel = _rel(root_p, item.caption)
            text, fnds = read_caption(item.caption)
            bad = [f for f in fnds if f.code in ("caption_not_utf8", "caption_unreadable", "empty_caption")]
            if text is None or bad:
                skipped.append({"caption": rel, "reason": bad[0].code if bad else "unreadable"})
            else:
                colours = None
                if images and item.image is not None:
                    try:
                        colours = image_colours(load_rgb(item.image))
                    except (ValueError, MemoryError):
                        colours = None
                new_text, ch = fix_caption(text, colours, tolerance=tolerance, snap_de=snap_de)
                atomic_write_text(out_p / rel, new_text, overwrite=False)
                written += 1
                if ch:
                    changed.append({"caption": rel, "changes": ch})
        if copy_images and item.image is not None:
            dest = out_p / _rel(root_p, item.image)
            with atomic_output(dest, overwrite=False) as tmp:
                shutil.copyfile(item.image, tmp)
        if progress is not None:
            progress(n + 1, len(items))
    return {"out_dir": str(out_p), "written": written, "changed": changed, "skipped": skipped}
