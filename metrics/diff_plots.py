"""Plots of weight-diff reports with matplotlib's Agg canvas (no pyplot global state, no display needed).

* :func:`plot_layer_types` - horizontal bars of mean |Δ| per layer type (whole group and changed tensors only);
* :func:`plot_block_heatmap` - block × layer-type heatmap of mean |Δ| (log colour scale);
* :func:`plot_histogram` - histogram of |Δ| on a log axis;
* :func:`plot_compare` - ratio bars of two reports per layer type.

Every ``plot_*`` returns a uint8 RGB array ``[H, W, 3]`` (all of one size, :data:`FIG_SIZE` at :data:`DPI`), ready for
``nodes.comfy_io.numpy_to_image`` (ComfyUI IMAGE) or PNG output (:func:`save_png`).
"""

from __future__ import annotations

import math
import os
from typing import Mapping

import numpy as np

FIG_SIZE = (10.0, 6.0)  # inches
DPI = 100


def _figure():
    from matplotlib.figure import Figure

    return Figure(figsize=FIG_SIZE, dpi=DPI, layout="constrained")


def _to_array(fig) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    arr = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    return arr


def _title(report: Mapping) -> str:
    a, b = report.get("a") or {}, report.get("b") or {}
    return f"{a.get('name', 'A')} → {b.get('name', 'B')}"


def plot_layer_types(report: Mapping, max_rows: int = 30) -> np.ndarray:
    """Bars of mean |Δ| per layer type: over all parameters of the type, and over its changed tensors only
    (log x axis; types with no change are listed at the bottom without a bar).

    ``report``: dict from :func:`conceptlab.metrics.weight_diff.diff_files` (uses ``by_layer_type``). Returns
    uint8 ``[600, 1000, 3]`` (:data:`FIG_SIZE` × :data:`DPI`)."""
    groups = sorted((report.get("by_layer_type") or {}).items(), key=lambda kv: kv[1].get("mean_abs", 0.0),
                    reverse=True)[:max_rows]
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    names = [g for g, _ in groups][::-1]
    allv = [s.get("mean_abs", 0.0) for _, s in groups][::-1]
    chg = [s.get("mean_abs_changed", 0.0) for _, s in groups][::-1]
    y = np.arange(len(names))
    pos = [v for v in allv + chg if v and v > 0]
    if pos:
        ax.barh(y + 0.2, [v if v > 0 else np.nan for v in allv], height=0.4, label="mean |Δ| (all params)")
        ax.barh(y - 0.2, [v if v > 0 else np.nan for v in chg], height=0.4, label="mean |Δ| (changed tensors only)")
        ax.set_xscale("log")
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no change", ha="center", va="center", transform=ax.transAxes)
    ax.set_yticks(y)
    ax.set_yticklabels([f"{n} ({100 * s.get('param_share', 0):.1f} % params)"
                        for n, s in reversed(groups)], fontsize=7)
    ax.set_xlabel("mean |Δ|")
    ax.set_title(f"Change per layer type — {_title(report)}", fontsize=10)
    return _to_array(fig)


def plot_block_heatmap(report: Mapping, max_layer_types: int = 24) -> np.ndarray:
    """Heatmap of mean |Δ| per (block, layer type) cell, log10 colour scale; grey = no such weights.

    ``report`` as for :func:`plot_layer_types`; returns uint8 ``[H, W, 3]`` of the common size."""
    cells: Mapping[str, Mapping[str, float]] = report.get("by_block_layer_type") or {}
    blocks = [b for b in (report.get("by_block") or {}) if b in cells]
    lt_order = [k for k, _ in sorted((report.get("by_layer_type") or {}).items(),
                                     key=lambda kv: kv[1].get("mean_abs", 0.0), reverse=True)]
    lts = [lt for lt in lt_order if any(lt in cells.get(b, {}) for b in blocks)][:max_layer_types]
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    if not blocks or not lts:
        ax.text(0.5, 0.5, "no block data", ha="center", va="center", transform=ax.transAxes)
        return _to_array(fig)
    grid = np.full((len(lts), len(blocks)), np.nan)
    for j, b in enumerate(blocks):
        for i, lt in enumerate(lts):
            v = cells.get(b, {}).get(lt)
            if v is not None:
                grid[i, j] = math.log10(v) if v > 0 else np.nan
    masked = np.ma.masked_invalid(grid)
    import matplotlib

    cmap = matplotlib.colormaps["magma"].with_extremes(bad="#d0d0d0")
    im = ax.imshow(masked, aspect="auto", cmap=cmap, interpolation="nearest")
    ax.set_xticks(range(len(blocks)))
    ax.set_xticklabels(blocks, rotation=90, fontsize=7)
    ax.set_yticks(range(len(lts)))
    ax.set_yticklabels(lts, fontsize=7)
    cb = fig.colorbar(im, ax=ax)
    cb.set_label("log10 mean |Δ|")
    ax.set_title(f"mean |Δ| per block × layer type (grey: none or unchanged) — {_title(report)}", fontsize=10)
    return _to_array(fig)


def plot_histogram(report: Mapping) -> np.ndarray:
    """Histogram of |Δ| (log10 bins from the report; exact zeros noted in the title).

    Returns uint8 ``[H, W, 3]`` of the common size."""
    h = report.get("histogram") or {}
    edges = np.asarray(h.get("log10_edges") or [], dtype=float)
    counts = np.asarray(h.get("counts") or [], dtype=float)
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    if counts.size and counts.sum() > 0:
        nz = np.nonzero(counts)[0]
        lo, hi = max(nz[0] - 2, 0), min(nz[-1] + 3, counts.size)
        x = 10.0 ** edges
        ax.bar(x[lo:hi], counts[lo:hi], width=np.diff(x)[lo:hi], align="edge", color="#4c72b0")
        ax.set_xscale("log")
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "all |Δ| are zero", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("|Δ| (log axis)")
    ax.set_ylabel("elements")
    ax.set_title(f"|Δ| histogram ({h.get('zeros', 0):,} exact zeros not shown) — {_title(report)}", fontsize=10)
    return _to_array(fig)


def render_plots(report: Mapping) -> list[np.ndarray]:
    """The three report plots ``[layer types, block heatmap, histogram]``, uint8 ``[H, W, 3]`` each, one size."""
    return [plot_layer_types(report), plot_block_heatmap(report), plot_histogram(report)]


def plot_compare(cmp: Mapping, metric: str = "mean_abs", section: str = "by_layer_type",
                 max_rows: int = 30) -> np.ndarray:
    """Bars of the ratio r2/r1 of ``metric`` per group of ``section`` (log x axis, 1× marked).

    ``cmp``: dict from :func:`conceptlab.metrics.weight_diff.compare_reports`. Groups with no, zero or infinite
    ratio are left out (at most ``max_rows`` bars). Returns uint8 ``[H, W, 3]`` of the common size."""
    groups = [(g, (row.get(metric) or {}).get("ratio")) for g, row in (cmp.get(section) or {}).items()]
    groups = [(g, r) for g, r in groups if r is not None and not math.isinf(r) and r > 0][:max_rows]
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    if groups:
        y = np.arange(len(groups))
        ax.barh(y, [r for _, r in groups], color=["#c44e52" if r > 1 else "#55a868" for _, r in groups])
        ax.set_yticks(y)
        ax.set_yticklabels([g for g, _ in groups], fontsize=7)
        ax.set_xscale("log")
        ax.axvline(1.0, color="k", lw=0.8)
        for yi, (_, r) in zip(y, groups):
            ax.text(r, yi, f" {r:.2g}×", va="center", fontsize=7)
    else:
        ax.text(0.5, 0.5, "no comparable groups", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(f"{metric}: {cmp.get('label2')} / {cmp.get('label1')}")
    ax.set_title(f"Ratio of {metric} per {section.replace('by_', '').replace('_', ' ')}", fontsize=10)
    return _to_array(fig)


def save_png(images: list[np.ndarray] | np.ndarray, path: str | os.PathLike) -> str:
    """Write one uint8 ``[H, W, 3]`` image, or several stacked vertically (left-aligned on white), as a PNG
    atomically (:func:`conceptlab.formats.safetensors_io.atomic_output`). Returns the path as ``str``."""
    from PIL import Image

    from ..formats.safetensors_io import atomic_output

    if isinstance(images, np.ndarray):
        images = [images]
    w = max(i.shape[1] for i in images)
    canvas = np.full((sum(i.shape[0] for i in images), w, 3), 255, dtype=np.uint8)
    y = 0
    for i in images:
        canvas[y:y + i.shape[0], : i.shape[1]] = i
        y += i.shape[0]
    with atomic_output(path) as tmp:
        Image.fromarray(canvas).save(tmp, format="PNG")
    return str(path)
