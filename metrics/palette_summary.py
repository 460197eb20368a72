"""Dataset palette summary: the palette, the spread of effective-colour counts, background families and grid
statuses of a set of images (a training folder, or a LoRA's epoch samples), so both can be compared in one
table. Entry points: :func:`summarize` (from reports), :func:`summarize_folder`, :func:`summary_table`.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from .color import color_family, color_name, rgb_to_hex
from .palette import CLUSTER_THRESHOLD, _unique_with_counts, cluster_colors, load_image, palette_report

__all__ = ["summarize", "summarize_folder", "summary_table", "list_images", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def list_images(folder) -> list[Path]:
    """Image files under ``folder`` (recursive: flat folders and kohya ``<repeats>_<name>`` subfolders), sorted.
    Raises FileNotFoundError / NotADirectoryError for a missing path or a file."""
    root = Path(folder)
    if not root.exists():
        raise FileNotFoundError(f"folder not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is a file, not a folder")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _spread(v: list) -> dict | None:
    if not v:
        return None
    a = np.asarray(v, np.float64)
    q = np.percentile(a, [0, 10, 50, 90, 100])
    return {"min": int(q[0]), "p10": round(float(q[1]), 1), "median": round(float(q[2]), 1),
            "p90": round(float(q[3]), 1), "max": int(q[4]), "mean": round(float(a.mean()), 2)}


def summarize(reports: list[dict], natives: list | None = None, k: int = 16,
              cluster_threshold: float = CLUSTER_THRESHOLD, name: str = "") -> dict:
    """Summary of palette reports (:func:`.palette.palette_report`, one per image).

    ``natives``: the snapped native images (``[h, w, 3]`` uint8, with an optional bool opaque mask as
    ``(native, opaque)``), one per report (``None`` for failed ones) — their cell colours, each image weighted
    equally, are clustered at ``cluster_threshold`` ΔE00 (:func:`.palette.cluster_colors`) into the dataset
    ``palette`` (top ``k`` clusters: hex, name, family, frac). Returns ``{name, images, failed, grid_status
    {status: count}, effective_colors / effective_colors_95 {min, p10, median, p90, max, mean} (images with
    cells only), background_families {family: count}, background_confidence_mean, palette}``.
    """
    ok = [r for r in reports if "error" not in r]
    eff = [r["effective_colors"] for r in ok if r.get("effective_colors") is not None]
    eff95 = [r["effective_colors_95"] for r in ok if r.get("effective_colors_95") is not None]
    fams = Counter(r["background"]["family"] for r in ok if r.get("background"))
    bconf = [r["background"].get("confidence") for r in ok if r.get("background")]
    bconf = [c for c in bconf if c is not None]
    out = {
        "name": name,
        "images": len(reports),
        "failed": len(reports) - len(ok),
        "grid_status": dict(Counter(r["grid"]["status"] for r in ok)),
        "effective_colors": _spread(eff),
        "effective_colors_95": _spread(eff95),
        "background_families": dict(fams.most_common()),
        "background_confidence_mean": round(float(np.mean(bconf)), 3) if bconf else None,
        "palette": [],
    }
    cols, wts = [], []
    for nat in natives or []:
        if nat is None:
            continue
        native, opaque = nat if isinstance(nat, tuple) else (nat, None)
        flat = native.reshape(-1, 3) if opaque is None else native[opaque]
        if flat.size == 0:
            continue
        u, c, _ = _unique_with_counts(flat)
        cols.append(u)
        wts.append(c / c.sum())
    if cols:
        u_all, cnt_all, inv = _unique_with_counts(np.concatenate(cols))
        w_all = np.bincount(inv, weights=np.concatenate(wts), minlength=len(u_all))
        scale = 1e6 / max(w_all.sum(), 1e-12)
        labels, leaders, sizes = cluster_colors(u_all, np.round(w_all * scale).astype(np.int64) + 1, cluster_threshold)
        frac = np.bincount(labels, weights=w_all, minlength=len(leaders)) / w_all.sum()
        order = np.argsort(-frac, kind="stable")[:k]
        out["palette"] = [{"hex": rgb_to_hex(leaders[i]), "name": color_name(leaders[i]),
                           "family": str(color_family(leaders[i])), "frac": round(float(frac[i]), 4)}
                          for i in order]
    return out


def summarize_folder(folder, k: int = 16, cluster_threshold: float = CLUSTER_THRESHOLD, matte=None,
                     cells=None, progress=None) -> dict:
    """:func:`summarize` over every image of ``folder`` (:func:`list_images`). An unreadable image is counted in
    ``failed`` and listed under ``errors`` ([{image, error}]), never the end of the run. ``progress(i, n)`` is
    called after each image. Raises FileNotFoundError / NotADirectoryError for a bad folder, ValueError when it
    holds no image."""
    files = list_images(folder)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    reports, natives, errors = [], [], []
    for i, f in enumerate(files):
        try:
            rgb, alpha = load_image(f, matte)
            rep = palette_report(rgb, alpha=alpha, cells=cells, cluster_threshold=cluster_threshold,
                                 return_arrays=True)
            arr = rep.pop("_arrays")
            natives.append(None if arr["native"] is None else (arr["native"], arr["opaque"])
                           if arr["opaque"] is not None else arr["native"])
        except (ValueError, OSError) as exc:
            rep = {"error": str(exc)}
            errors.append({"image": str(f), "error": str(exc)})
            natives.append(None)
        reports.append(rep)
        if progress:
            progress(i + 1, len(files))
    out = summarize(reports, natives, k, cluster_threshold, str(folder))
    out["errors"] = errors
    return out


def summary_table(summaries: list[dict]) -> str:
    """Plain-text table, one row per summary (e.g. training set vs epoch samples): images, failed, grid
    statuses, effective colours (median [p10–p90]), top background families, top palette hexes."""
    head = f"{'set':28s} {'images':>6s} {'failed':>6s} {'grid ok/low/none':>16s} {'eff. colours':>18s}  backgrounds / palette"
    lines = [head, "-" * len(head)]
    for s in summaries:
        gs = s["grid_status"]
        ok = gs.get("detected", 0) + gs.get("override", 0)
        e = s["effective_colors_95"]
        ec = f"{e['median']:g} [{e['p10']:g}-{e['p90']:g}]" if e else "n/a"
        bg = ", ".join(f"{k} {v}" for k, v in list(s["background_families"].items())[:3]) or "n/a"
        pal = " ".join(p["hex"] for p in s["palette"][:8])
        name = s["name"][-28:]
        st = f"{ok}/{gs.get('low_confidence', 0)}/{gs.get('none', 0)}"
        lines.append(f"{name:28s} {s['images']:6d} {s['failed']:6d} {st:>16s} {ec:>18s}  {bg}; {pal}")
    return "\n".join(lines)
