"""Caption audit for pixel-art training sets: hex codes that contradict each other, the palette list or the image.

Captions in the style this audits look like::

    pixel art, dawnlike, acid blob, body (#6dc2ca), background (#346524),
    palette: #6dc2ca, #346524, #140c1c, retro pixel art style, #f7d7c0

:func:`~.caption_parse.parse_caption` (:mod:`.caption_parse`) splits one caption into labelled ``feature (#hex)``
pairs, the ``palette:`` list, stray (unlabelled) hex codes and malformed hex tokens. :func:`audit_caption` turns
that (plus, optionally, the paired image's colours, :mod:`.caption_colours`) into :class:`Finding` objects with
stable codes (:data:`FINDING_CODES`). :func:`audit_folder` walks a dataset folder (flat, or kohya
``<repeats>_<name>`` subfolders), pairs images with ``.txt`` captions by file stem, audits every pair and returns a
JSON-ready report (schema :data:`SCHEMA`); :func:`~.caption_fix.fix_folder` (:mod:`.caption_fix`) writes corrected
captions into a *new* folder; :func:`render_table` draws the report.

Why hand-written: caption syntax is project-specific (no tag-parser library knows ``feature (#hex)``
pairs or ``palette:`` lists); colour science (ΔE00, colour names, hue families) and the image side (grid
detection, snapping, clustering) come from :mod:`.color` / :mod:`.grid` / :mod:`.palette`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from .caption_colours import (ImageColours, _de00_matrix, _de00_matrix_pairs, _families_agree, _hex_family, _hex_to_lab,
                              _is_own_css_colour, _word_family, image_colours, load_rgb)
from .caption_parse import ParsedCaption, parse_caption

SCHEMA = "conceptlab.caption_audit/1"

#: severity levels, most severe first
SEVERITIES = ("error", "warning", "info")

#: every finding code -> (default severity, one-line meaning). Codes and meanings are stable API.
FINDING_CODES: dict[str, tuple[str, str]] = {
    "duplicate_hex": ("warning", "two different features carry the same (or ΔE00 < 2) hex; "
                                 "error when one of them is the background"),
    "unlabelled_hex": ("warning", "a hex code outside the palette list with no feature naming it"),
    "palette_mismatch": ("warning", "a labelled hex missing from the palette list, or a palette hex no "
                                    "feature names (data.direction says which)"),
    "absent_from_image": ("warning", "no snapped cell of the paired image lies within the ΔE00 tolerance "
                                     "of this caption hex"),
    "image_color_not_captioned": ("warning", "a colour cluster covering >= 3 % of the image's cells has no "
                                             "caption hex within the ΔE00 tolerance"),
    "name_hex_mismatch": ("warning", "a colour word in the feature disagrees with the hex's hue family"),
    "malformed_hex": ("error", "a '#' token that is not a 6-digit hex colour (#12345, #GGGGGG, ...)"),
    "missing_caption": ("warning", "an image with no .txt caption beside it"),
    "missing_image": ("warning", "a .txt caption with no image of the same name beside it"),
    "empty_caption": ("error", "the caption file is empty or whitespace only"),
    "caption_not_utf8": ("error", "the caption file is not valid UTF-8 (audited with undecodable bytes "
                                  "replaced; not rewritten by the fix)"),
    "caption_unreadable": ("error", "the caption file could not be read"),
    "image_unreadable": ("error", "the image file could not be opened or decoded"),
}

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_EXTENSION = ".txt"

DEFAULT_TOLERANCE = 5.0          # ΔE00: caption hex "present in the image" (same default as palette fidelity)
DEFAULT_DUPLICATE_DE = 2.0       # ΔE00 below which two hexes are "the same colour"
DEFAULT_UNCAPTIONED_FRAC = 0.03  # cluster share of cells that must be captioned
MAX_DUPLICATE_FINDINGS = 200    # duplicate_hex findings listed per caption (the rest are counted)
DEFAULT_SNAP_FIX_DE = 10.0       # fix: replace an absent labelled hex by the nearest image colour within this

_BACKGROUND_WORDS = ("background", "backdrop", "bg")
_KOHYA_SUBSET = re.compile(r"^(\d+)_(.+)$")


class NotAFolderError(NotADirectoryError, ValueError):
    """The dataset path is a file, not a folder (a ``ValueError`` too, so the CLI prints it as a user error)."""


# --------------------------------------------------------------------------------------------------------
# findings
# --------------------------------------------------------------------------------------------------------

@dataclass
class Finding:
    """One audit finding. ``code`` is one of :data:`FINDING_CODES`; ``severity`` one of :data:`SEVERITIES`.

    ``feature`` / ``hex`` name the caption item concerned (``None`` when not applicable); ``data`` holds
    code-specific values (e.g. ``other_feature``, ``delta_e00``, ``direction``, ``fraction``).
    """

    code: str
    severity: str
    message: str
    feature: str | None = None
    hex: str | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of the finding's fields (``code``, ``severity``, ``message``, ``feature``, ``hex``,
        ``data``)."""
        return {"code": self.code, "severity": self.severity, "message": self.message,
                "feature": self.feature, "hex": self.hex, "data": self.data}


def _finding(code: str, message: str, *, severity: str | None = None, **kw) -> Finding:
    return Finding(code, severity or FINDING_CODES[code][0], message, **kw)


def is_background_feature(feature: str | None) -> bool:
    """True when the feature text names the background (``background``, ``backdrop``, ``bg``)."""
    words = re.findall(r"[a-z]+", (feature or "").lower())
    return any(w in _BACKGROUND_WORDS for w in words)


def _colour_word(feature: str) -> tuple[str, str] | None:
    """``(word, family)`` of the colour word of ``feature`` (the last one: English puts the head colour
    last, "blue green" is green), or ``None`` when the feature names no colour."""
    for w in reversed(re.findall(r"[A-Za-z]+", feature or "")):
        fam = _word_family(w.lower())
        if fam:
            return w.lower(), fam
    return None


def check_text(parsed: ParsedCaption, duplicate_de: float = DEFAULT_DUPLICATE_DE) -> list[Finding]:
    """Image-free findings of one parsed caption.

    Codes: ``malformed_hex``, ``duplicate_hex``, ``unlabelled_hex``, ``palette_mismatch``,
    ``name_hex_mismatch``. ΔE00 is CIEDE2000 (Sharma, Wu, Dalal 2005) from :mod:`.color`.

    Args:
        parsed: from :func:`.caption_parse.parse_caption`.
        duplicate_de: ΔE00 below which two labelled hexes of different features count as duplicates (≥ 0).
    Returns:
        findings in caption order per code.
    """
    findings: list[Finding] = []
    for t in parsed.tokens:
        if not t.ok:
            hint = f"; did you mean {t.suggestion}?" if t.suggestion else ""
            findings.append(_finding(
                "malformed_hex", f"{t.raw!r} is not a #rrggbb hex colour{hint}", feature=t.feature,
                hex=None, data={"raw": t.raw, "role": t.role, "suggestion": t.suggestion}))

    labelled = parsed.labelled
    # duplicates between different features: distinct (feature, hex) pairs only; candidate colour pairs from a
    # KD-tree on Lab within 2t + 1 (CIEDE2000 divides the Lab differences by weights ≥ 1; its a' stretch is at
    # most 1.5×, so ΔE00 < t implies ΔE76 < 1.5t; 2t + 1 has margin), exact ΔE00 on those in chunks: a megabyte
    # caption costs O(n log n) and bounded memory, not an n×n matrix
    pairs = list(dict.fromkeys((f.lower().strip(), f, h) for f, h in labelled))
    if len(pairs) > 1:
        uh = list(dict.fromkeys(h for _, _, h in pairs))
        idx_of = {h: i for i, h in enumerate(uh)}
        lab = _hex_to_lab(uh)
        by_hex: dict[int, list[int]] = {}
        for k, (_, _, h) in enumerate(pairs):
            by_hex.setdefault(idx_of[h], []).append(k)
        from scipy.spatial import cKDTree

        near = cKDTree(lab).query_pairs(2.0 * duplicate_de + 1.0, output_type="ndarray") if len(uh) > 1 else \
            np.zeros((0, 2), np.int64)
        keep = []
        for c0 in range(0, len(near), 1 << 18):  # exact ΔE00 in chunks, stopping once enough pairs are found
            blk = near[c0 : c0 + (1 << 18)]
            keep.append(blk[_de00_matrix_pairs(lab[blk[:, 0]], lab[blk[:, 1]]) < duplicate_de])
            if sum(len(k) for k in keep) > MAX_DUPLICATE_FINDINGS:
                break
        near = np.concatenate(keep) if keep else near[:0]
        cand = [(a_, a_) for a_ in by_hex] + [(int(x), int(y)) for x, y in near]
        n_dup = 0
        for ha, hb in cand:
            if n_dup > MAX_DUPLICATE_FINDINGS:
                break
            for i in by_hex[ha]:
                if n_dup > MAX_DUPLICATE_FINDINGS:
                    break
                for j in by_hex[hb]:
                    if (ha == hb and j <= i) or pairs[i][0] == pairs[j][0]:
                        continue
                    n_dup += 1
                    if n_dup > MAX_DUPLICATE_FINDINGS:
                        break
                    fi, hi_, fj, hj = pairs[i][1], pairs[i][2], pairs[j][1], pairs[j][2]
                    d = 0.0 if hi_ == hj else float(_de00_matrix_pairs(lab[[ha]], lab[[hb]])[0])
                    bg = is_background_feature(fi) or is_background_feature(fj)
                    same = "the same hex" if hi_ == hj else f"near-identical hexes (ΔE00 {d:.2f})"
                    findings.append(_finding(
                        "duplicate_hex",
                        f"{fi!r} ({hi_}) and {fj!r} ({hj}) have {same}"
                        + ("; one is the background, so the feature would vanish into it" if bg else ""),
                        severity="error" if bg else "warning", feature=fi, hex=hi_,
                        data={"other_feature": fj, "other_hex": hj, "delta_e00": round(d, 4), "background": bg}))
        if n_dup > MAX_DUPLICATE_FINDINGS:
            findings.append(_finding(
                "duplicate_hex", f"more than {MAX_DUPLICATE_FINDINGS} duplicate pairs: the rest are not listed",
                data={"truncated": True}))

    labelled_set = {h for _, h in labelled}
    palette_set = set(parsed.palette)
    for h in dict.fromkeys(parsed.stray):
        in_pal = h in palette_set or h in labelled_set
        findings.append(_finding(
            "unlabelled_hex",
            f"{h} stands alone with no feature naming it"
            + (" (it is already in the palette list / a labelled feature)" if in_pal else ""),
            hex=h, data={"in_palette": h in palette_set, "labelled": h in labelled_set}))

    if parsed.has_palette:
        for f, h in labelled:
            if h not in palette_set:
                findings.append(_finding(
                    "palette_mismatch", f"{f!r} ({h}) is not in the palette list", feature=f, hex=h,
                    data={"direction": "labelled_not_in_palette"}))
        for h in dict.fromkeys(parsed.palette):
            if h not in labelled_set:
                findings.append(_finding(
                    "palette_mismatch", f"palette colour {h} is not named by any feature",
                    severity="info", hex=h, data={"direction": "palette_not_labelled"}))

    for f, h in labelled:
        cw = _colour_word(f)
        if cw is None:
            continue
        word, wfam = cw
        fam = _hex_family(h)
        if _families_agree(wfam, fam) or _is_own_css_colour(word, h):
            continue
        findings.append(_finding(
            "name_hex_mismatch", f"{f!r}: the word {word!r} means {wfam} but {h} is {fam}", feature=f, hex=h,
            data={"word": word, "word_family": wfam, "hex_family": fam}))
    return findings


def check_image(parsed: ParsedCaption, colours: ImageColours, tolerance: float = DEFAULT_TOLERANCE,
                min_fraction: float = DEFAULT_UNCAPTIONED_FRAC) -> list[Finding]:
    """Findings that need the paired image: ``absent_from_image`` and ``image_color_not_captioned``.

    Args:
        parsed: from :func:`.caption_parse.parse_caption`.
        colours: from :func:`.caption_colours.image_colours` (snapped native cells + clusters).
        tolerance: ΔE00 within which a caption hex counts as present / a cluster as captioned (> 0).
        min_fraction: share of cells (0..1) a cluster must cover to need a caption hex.
    """
    findings: list[Finding] = []
    hexes = parsed.all_hexes()
    if hexes and len(colours.cell_lab):
        d = _de00_matrix(_hex_to_lab(hexes), colours.cell_lab)
        nearest = d.min(axis=1)
        feat_of = {}
        for t in parsed.tokens:
            if t.ok and t.role == "labelled":
                feat_of.setdefault(t.hex, t.feature)
        for h, dmin, row in zip(hexes, nearest, d):
            if dmin > tolerance:
                findings.append(_finding(
                    "absent_from_image",
                    f"{h}{' (' + feat_of[h] + ')' if h in feat_of else ''} is not in the image: nearest "
                    f"snapped cell is ΔE00 {dmin:.1f} away (tolerance {tolerance:g})",
                    feature=feat_of.get(h), hex=h,
                    data={"nearest_delta_e00": round(float(dmin), 4), "nearest_hex": colours.cell_hex[int(np.argmin(row))],
                          "tolerance": tolerance}))
    if colours.clusters:
        lab = np.stack([c[2] for c in colours.clusters])
        cap_lab = _hex_to_lab(hexes)
        dmin = _de00_matrix(lab, cap_lab).min(axis=1) if len(cap_lab) else np.full(len(lab), np.inf)
        for (h, frac, _), dm in zip(colours.clusters, dmin):
            if frac >= min_fraction and dm > tolerance:
                findings.append(_finding(
                    "image_color_not_captioned",
                    f"image colour {h} covers {frac * 100:.1f}% of cells but no caption hex is within "
                    f"ΔE00 {tolerance:g}" + (f" (nearest {dm:.1f})" if np.isfinite(dm) else ""),
                    hex=h, data={"fraction": round(float(frac), 4),
                                 "nearest_delta_e00": None if not np.isfinite(dm) else round(float(dm), 4)}))
    return findings


# --------------------------------------------------------------------------------------------------------
# one caption, end to end
# --------------------------------------------------------------------------------------------------------

def audit_caption(text: str, image: np.ndarray | ImageColours | None = None, *,
                  tolerance: float = DEFAULT_TOLERANCE, duplicate_de: float = DEFAULT_DUPLICATE_DE,
                  min_fraction: float = DEFAULT_UNCAPTIONED_FRAC) -> tuple[ParsedCaption, list[Finding]]:
    """Parse and audit one caption, optionally against its image.

    Args:
        text: the caption.
        image: uint8 ``[H,W,3]`` render (snapped here) or precomputed :class:`ImageColours`, or ``None``.
        tolerance, duplicate_de, min_fraction: see :func:`check_text` / :func:`check_image`.
    Returns:
        ``(parsed, findings)``.
    """
    parsed = parse_caption(text)
    findings = check_text(parsed, duplicate_de=duplicate_de)
    if image is not None:
        colours = image if isinstance(image, ImageColours) else image_colours(np.asarray(image))
        findings += check_image(parsed, colours, tolerance=tolerance, min_fraction=min_fraction)
    return parsed, findings


# --------------------------------------------------------------------------------------------------------
# dataset folders
# --------------------------------------------------------------------------------------------------------

@dataclass
class DatasetItem:
    """One image and/or caption of a dataset folder, paired by folder + file stem."""

    key: str                      # relative posix path without extension
    image: Path | None = None
    caption: Path | None = None
    subset: dict[str, Any] | None = None


def _subset_of(rel_dir: Path) -> dict[str, Any] | None:
    """kohya ``<repeats>_<name>`` folder info of the deepest matching folder, else ``None``."""
    for part in reversed(rel_dir.parts):
        m = _KOHYA_SUBSET.match(part)
        if m:
            return {"folder": part, "repeats": int(m.group(1)), "name": m.group(2)}
    return None


def scan_folder(root: str | os.PathLike) -> list[DatasetItem]:
    """List a dataset folder (recursively: flat folders and kohya ``<repeats>_<name>`` subfolders).

    Images (:data:`IMAGE_EXTENSIONS`) and ``.txt`` captions in the same folder pair by file stem. Hidden
    files/folders (leading '.') are skipped. Items are sorted by key. Raises ``FileNotFoundError`` for a
    missing path and :class:`NotAFolderError` (a ``NotADirectoryError``) for a file, with a clear message.
    """
    root_p = Path(root)
    if not root_p.exists():
        raise FileNotFoundError(f"dataset folder {str(root)!r} does not exist")
    if not root_p.is_dir():
        raise NotAFolderError(f"{str(root)!r} is not a folder (give the dataset folder)")
    items: dict[str, DatasetItem] = {}
    for dirpath, dirnames, filenames in os.walk(root_p):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = Path(dirpath).relative_to(root_p)
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            p = Path(dirpath) / name
            ext = p.suffix.lower()
            if ext not in IMAGE_EXTENSIONS and ext != CAPTION_EXTENSION:
                continue
            key = (rel_dir / p.stem).as_posix()
            if ext in IMAGE_EXTENSIONS:
                item = items.get(key)
                if item is not None and item.image is not None:
                    # two images with one stem (a.png + a.jpg): both pair with the same caption
                    key = (rel_dir / name).as_posix()
                    item = None
                if item is None:
                    item = items[key] = DatasetItem(key=key, subset=_subset_of(rel_dir))
                item.image = p
            else:
                item = items.setdefault(key, DatasetItem(key=key, subset=_subset_of(rel_dir)))
                item.caption = p
    # second images of a stem share the caption
    for key, item in items.items():
        if item.caption is None and item.image is not None and key.endswith(item.image.name):
            cap = item.image.with_suffix(CAPTION_EXTENSION)
            if cap.is_file():
                item.caption = cap
    return [items[k] for k in sorted(items)]


def read_caption(path: str | os.PathLike) -> tuple[str | None, list[Finding]]:
    """Read a caption file. Returns ``(text or None, findings)``; never raises for file content.

    * unreadable (permissions, I/O) -> ``caption_unreadable``, text ``None``;
    * not UTF-8 -> ``caption_not_utf8`` with the byte offset; text decoded with U+FFFD replacements;
    * empty / whitespace only -> ``empty_caption``, text ``None``.
    A UTF-8 BOM is accepted and removed.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return None, [_finding("caption_unreadable", f"cannot read caption: {exc.strerror or exc}")]
    findings: list[Finding] = []
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        text = data.decode("utf-8", errors="replace").lstrip("\ufeff")
        findings.append(_finding(
            "caption_not_utf8",
            f"caption is not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); re-save it as UTF-8",
            data={"offset": exc.start}))
    if not text.strip():
        findings.append(_finding("empty_caption", "caption file is empty" if not data else
                                 "caption file holds only whitespace"))
        return None, findings
    return text, findings


def _rel(root: Path, p: Path | None) -> str | None:
    return None if p is None else p.relative_to(root).as_posix()


def audit_folder(root: str | os.PathLike, *, images: bool = True, tolerance: float = DEFAULT_TOLERANCE,
                 duplicate_de: float = DEFAULT_DUPLICATE_DE, min_fraction: float = DEFAULT_UNCAPTIONED_FRAC,
                 progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Audit every image/caption pair of a dataset folder; returns the JSON-ready report (:data:`SCHEMA`).

    Args:
        root: dataset folder (flat or kohya ``<repeats>_<name>`` subfolders).
        images: also open the paired images (``absent_from_image``, ``image_color_not_captioned``).
        tolerance: ΔE00 for image presence; duplicate_de: ΔE00 for duplicates; min_fraction: 0..1 share
            of cells a colour needs to require a caption hex.
        progress: called ``progress(done, total)`` after each item (may raise to cancel).
    Returns:
        ``{"schema", "root", "settings", "summary", "files"}`` — see the README for every field.
    Raises:
        FileNotFoundError / NotADirectoryError: ``root`` is not a folder. ValueError: bad settings.
    """
    if not (tolerance > 0 and duplicate_de >= 0 and 0 <= min_fraction <= 1):
        raise ValueError("tolerance must be > 0, duplicate_de >= 0 and min_fraction within 0..1")
    root_p = Path(root)
    items = scan_folder(root_p)
    files = []
    for n, item in enumerate(items):
        files.append(_audit_item(root_p, item, images, tolerance, duplicate_de, min_fraction))
        if progress is not None:
            progress(n + 1, len(items))
    return {
        "schema": SCHEMA,
        "root": str(root_p),
        "settings": {"images": bool(images), "tolerance": tolerance, "duplicate_de": duplicate_de,
                     "min_fraction": min_fraction},
        "summary": summarize(files),
        "files": files,
    }


def _audit_item(root: Path, item: DatasetItem, images: bool, tolerance: float, duplicate_de: float,
                min_fraction: float) -> dict[str, Any]:
    findings: list[Finding] = []
    parsed = None
    grid = None
    if item.caption is None:
        findings.append(_finding("missing_caption", f"no {item.image.stem}{CAPTION_EXTENSION} beside the image"))
    if item.image is None:
        findings.append(_finding("missing_image", "no image with this caption's name beside it"))
    text = None
    if item.caption is not None:
        text, read_findings = read_caption(item.caption)
        findings += read_findings
    if text is not None:
        try:  # one bad caption is a finding for that file, never the end of the run
            parsed = parse_caption(text)
            findings += check_text(parsed, duplicate_de=duplicate_de)
        except (ValueError, MemoryError, RecursionError) as exc:
            parsed = None
            findings.append(_finding("caption_unreadable", f"could not audit the caption: {type(exc).__name__}: {exc}"))
    if images and item.image is not None:
        try:
            colours = image_colours(load_rgb(item.image))
            grid = colours.grid
            if parsed is not None:
                findings += check_image(parsed, colours, tolerance=tolerance, min_fraction=min_fraction)
        except (ValueError, MemoryError) as exc:
            findings.append(_finding("image_unreadable", str(exc)))
    return {
        "key": item.key,
        "caption": _rel(root, item.caption),
        "image": _rel(root, item.image),
        "subset": item.subset,
        "parsed": None if parsed is None else parsed.to_dict(),
        "grid": grid,
        "findings": [f.to_dict() for f in findings],
    }


def summarize(files: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Summary counts of audited file entries (every code and severity present, zero when unseen)."""
    files = list(files)
    by_code = {c: 0 for c in FINDING_CODES}
    by_sev = {s: 0 for s in SEVERITIES}
    files_with = 0
    for f in files:
        if f["findings"]:
            files_with += 1
        for fd in f["findings"]:
            by_code[fd["code"]] = by_code.get(fd["code"], 0) + 1
            by_sev[fd["severity"]] = by_sev.get(fd["severity"], 0) + 1
    return {
        "items": len(files),
        "images": sum(1 for f in files if f["image"]),
        "captions": sum(1 for f in files if f["caption"]),
        "pairs": sum(1 for f in files if f["image"] and f["caption"]),
        "files_with_findings": files_with,
        "findings": sum(by_code.values()),
        "by_code": by_code,
        "by_severity": by_sev,
    }


# --------------------------------------------------------------------------------------------------------
# picture of the report
# --------------------------------------------------------------------------------------------------------

_SEV_COLOURS = {"error": "#f4b6b6", "warning": "#fbe3a6", "info": "#dbe8f7", "ok": "#d4efd4"}


def render_table(report: dict[str, Any], max_rows: int = 40, width_px: int = 1200) -> np.ndarray:
    """Render an audit report as a table picture (matplotlib, Agg backend).

    One row per file (worst severity coloured: red error, amber warning, blue info, green clean) with its
    error / warning / info counts and finding codes; a title with the summary counts. At most ``max_rows``
    rows (the rest summarized in the last row).

    Returns:
        uint8 ``[H, width_px, 3]`` RGB array.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    files = report.get("files", [])
    rows, colours = [], []
    shown = files[:max_rows]
    for f in shown:
        fds = f["findings"]
        cnt = {s: sum(1 for d in fds if d["severity"] == s) for s in SEVERITIES}
        codes = sorted({d["code"] for d in fds})
        worst = next((s for s in SEVERITIES if cnt[s]), "ok")
        name = f["caption"] or f["image"] or f["key"]
        if len(name) > 48:
            name = "…" + name[-47:]
        code_txt = ", ".join(codes) if codes else "—"
        if len(code_txt) > 70:
            code_txt = code_txt[:69] + "…"
        rows.append([name, str(cnt["error"]), str(cnt["warning"]), str(cnt["info"]), code_txt])
        colours.append([_SEV_COLOURS[worst]] * 5)
    if len(files) > len(shown):
        rows.append([f"… {len(files) - len(shown)} more files", "", "", "", "see the JSON report"])
        colours.append(["#eeeeee"] * 5)
    if not rows:
        rows.append(["(no images or captions found)", "", "", "", ""])
        colours.append(["#eeeeee"] * 5)
    s = report.get("summary", summarize(files))
    dpi = 100
    height_in = 1.1 + 0.28 * (len(rows) + 1)
    fig = Figure(figsize=(width_px / dpi, height_in), dpi=dpi)
    ax = fig.add_axes([0.01, 0.01, 0.98, 1 - 0.9 / height_in])
    ax.axis("off")
    table = ax.table(cellText=rows, cellColours=colours,
                     colLabels=["file", "errors", "warnings", "info", "finding codes"],
                     colWidths=[0.34, 0.07, 0.08, 0.05, 0.46], loc="upper center", cellLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1, 1.25)
    fig.suptitle(f"Caption audit: {s['items']} items, {s['pairs']} pairs — {s['by_severity']['error']} errors, "
                 f"{s['by_severity']['warning']} warnings, {s['by_severity']['info']} info",
                 fontsize=11, y=1 - 0.25 / height_in)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3]
    ink = np.nonzero((rgb < 250).any(axis=(1, 2)))[0]  # crop empty rows above / below
    if ink.size:
        rgb = rgb[max(ink[0] - 12, 0): ink[-1] + 13]
    return np.ascontiguousarray(rgb).copy()
