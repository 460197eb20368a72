"""What a LoRA run shows and chooses by: palette metrics of samples, the per-epoch score and best-epoch selection
(:func:`select_best`, :class:`EarlyStopping`), and the pictures (loss curve, epoch table, labelled sample grids,
PNG files)."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)


def _to_uint8(img: torch.Tensor) -> np.ndarray:
    """``[3, H, W]`` float 0..1 → uint8 ``[H, W, 3]``."""
    return (img.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)


def palette_metrics(image: np.ndarray, palette: Sequence[str] = (), cells=None) -> dict[str, float]:
    """Palette metrics of one uint8 ``[H, W, 3]`` image from :mod:`conceptlab.metrics.palette`.

    ``cells``: grid override passed to ``palette_report`` (``sample_grid_cells``; e.g. ``"native"`` → one cell per
    pixel for samples rendered at the art's native resolution, where no upscaled grid exists to detect).

    Returns numeric entries of ``palette_report`` (e.g. ``effective_colors``, ``in_palette_fraction``);
    ``{}`` when the metrics module is not available (the trainer then selects by loss only).
    """
    try:
        from ...metrics.palette import palette_report
    except ImportError:
        return {}
    try:
        if cells == "native":
            cells = (image.shape[1], image.shape[0])
        rep = palette_report(image, targets=list(palette) or None, cells=cells)
    except Exception as exc:  # noqa: BLE001 - a sample the metrics cannot read (e.g. no pixel grid) is skipped
        logger.warning("palette metrics failed on a sample: %s", exc)
        return {}
    return _numeric_leaves(rep)


def _numeric_leaves(rep: Any, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    if hasattr(rep, "to_dict"):
        rep = rep.to_dict()
    elif hasattr(rep, "__dataclass_fields__"):
        rep = asdict(rep)
    if isinstance(rep, Mapping):
        for k, v in rep.items():
            name = f"{prefix}{k}"
            if isinstance(v, bool):
                continue
            if isinstance(v, (int, float, np.integer, np.floating)) and math.isfinite(float(v)):
                out[name] = float(v)
            elif isinstance(v, Mapping) and not prefix:
                out.update(_numeric_leaves(v, prefix=f"{k}."))
    return out


def score_of(value: float, direction: str, target: float | None = None) -> float:
    """Lower-is-better score: ``min`` → v, ``max`` → −v, ``target`` → |v − target|."""
    if direction == "max":
        return -value
    if direction == "target":
        return abs(value - float(target))
    return value


def resolve_metric(metric: str, direction: str, have_val: bool, have_samples: bool) -> tuple[str, str]:
    """Resolve ``"auto"`` names: metric auto → val_loss if a validation split exists, else
    effective_colors_vs_dataset with samples, else train_loss. Direction auto → max for fractions/ratios
    and ``in_palette``, target for ``*_vs_dataset``, min otherwise."""
    if metric == "auto":
        metric = "val_loss" if have_val else ("effective_colors_vs_dataset" if have_samples else "train_loss")
    if direction == "auto":
        if metric.endswith("_vs_dataset"):
            direction = "target"
        elif "in_palette" in metric or metric.endswith(("frac", "fraction", "ratio", "accuracy", "score",
                                                         "coverage")):
            direction = "max"
        else:
            direction = "min"
    return metric, direction


def select_best(history: Sequence[Mapping[str, Any]], metric: str, direction: str,
                target: float | None = None) -> tuple[int | None, float | None]:
    """The epoch (1-based) whose ``metric`` value scores best (ties: earliest) and that value; ``(None, None)``
    when no epoch has the metric. ``direction``: ``min``, ``max`` or ``target`` (closest to ``target``)."""
    best_e, best_v, best_s = None, None, None
    for rec in history:
        v = rec.get(metric)
        if v is None or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            continue
        s = score_of(float(v), direction, target)
        if best_s is None or s < best_s:
            best_e, best_v, best_s = int(rec["epoch"]), float(v), s
    return best_e, best_v


class EarlyStopping:
    """Stop when ``patience`` consecutive evaluated epochs bring no improvement of the score (lower is better).

    ``update(epoch, score) -> bool`` (True: stop now). ``patience`` 0 never stops. ``min_delta`` is the least
    improvement that counts.
    """

    def __init__(self, patience: int, min_delta: float = 0.0):
        self.patience = int(patience)
        self.min_delta = float(min_delta)
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self.bad_epochs = 0

    def update(self, epoch: int, score: float | None) -> bool:
        """Record ``score`` of ``epoch``; True when training should stop now. ``None`` / NaN / Inf are ignored."""
        if score is None or not math.isfinite(score):
            return False
        if self.best_score is None or score < self.best_score - self.min_delta:
            self.best_score, self.best_epoch, self.bad_epochs = score, epoch, 0
            return False
        self.bad_epochs += 1
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state(self) -> dict:
        """JSON-able ``{"best_score", "best_epoch", "bad_epochs"}`` (saved in the training state for resume)."""
        return {"best_score": self.best_score, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load(self, st: Mapping) -> None:
        """Restore from :meth:`state`'s dict; ``KeyError`` if a key is missing."""
        self.best_score, self.best_epoch, self.bad_epochs = st["best_score"], st["best_epoch"], st["bad_epochs"]


def _fig_to_array(fig) -> np.ndarray:
    fig.canvas.draw()
    arr = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    import matplotlib.pyplot as plt

    plt.close(fig)
    return arr


def render_loss_curve(step_losses: Sequence[float], history: Sequence[Mapping[str, Any]],
                      steps_per_epoch: int, best_epoch: int | None = None) -> np.ndarray:
    """Loss-curve picture (matplotlib Agg) as uint8 ``[H, W, 3]``: per-step loss, its moving average, per-epoch
    train/validation loss, the best epoch marked."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    if step_losses:
        x = np.arange(1, len(step_losses) + 1)
        ax.plot(x, step_losses, color="#9bb", lw=0.8, label="step loss")
        k = max(1, min(len(step_losses) // 10, 50))
        if k > 1:
            ma = np.convolve(step_losses, np.ones(k) / k, mode="valid")
            ax.plot(x[k - 1:], ma, color="#057", lw=1.5, label=f"moving avg ({k})")
    ep_x = [r["step"] for r in history]
    if history and any(r.get("train_loss") is not None for r in history):
        ax.plot(ep_x, [r.get("train_loss") for r in history], "o-", color="#c60", ms=4, label="epoch train loss")
    if any(r.get("val_loss") is not None for r in history):
        ax.plot(ep_x, [r.get("val_loss") for r in history], "s--", color="#a0a", ms=4, label="validation loss")
    if best_epoch is not None:
        for r in history:
            if r["epoch"] == best_epoch:
                ax.axvline(r["step"], color="#2a2", ls=":", lw=1.5, label=f"best: epoch {best_epoch}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return _fig_to_array(fig)


def render_epoch_table(history: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
                       best_epoch: int | None = None, title: str = "") -> np.ndarray:
    """The per-epoch table as a picture (matplotlib ``table``), uint8 ``[H, W, 3]``; the best row highlighted."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if columns is None:
        cols: list[str] = []
        for r in history:
            for k, v in r.items():
                if k not in cols and k not in ("file", "samples") and (isinstance(v, (int, float)) or v is None):
                    cols.append(k)
        columns = cols
    rows = []
    for r in history:
        row = []
        for c in columns:
            v = r.get(c)
            if v is None:
                row.append("–")
            elif isinstance(v, float):
                row.append(f"{v:.4g}")
            else:
                row.append(str(v))
        rows.append(row)
    if not rows:
        rows = [["–"] * max(1, len(columns))]
        columns = list(columns) or ["epoch"]
    fig_h = 0.9 + 0.28 * (len(rows) + 1)
    fig_w = max(4.0, 1.15 * len(columns))
    fig, ax = plt.subplots(figsize=(fig_w, fig_h), dpi=100)
    ax.axis("off")
    tab = ax.table(cellText=rows, colLabels=list(columns), loc="center", cellLoc="center")
    tab.auto_set_font_size(False)
    tab.set_fontsize(8)
    tab.scale(1, 1.2)
    if best_epoch is not None:
        for i, r in enumerate(history):
            if r.get("epoch") == best_epoch:
                for j in range(len(columns)):
                    tab[i + 1, j].set_facecolor("#d8f5d0")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _fig_to_array(fig)


def labelled_grid(cells: Sequence[Sequence[np.ndarray]], row_labels: Sequence[str] = (),
                  col_labels: Sequence[str] = (), scale: int = 0, pad: int = 4) -> np.ndarray:
    """A grid of uint8 ``[h, w, 3]`` images (rows × columns) with text labels, as uint8 ``[H, W, 3]``.

    ``scale`` 0 picks an integer nearest-neighbour upscale so small (pixel-art) samples are at least 128 px.
    """
    from PIL import Image, ImageDraw

    rows = [list(r) for r in cells if len(r)]
    if not rows:
        return np.zeros((8, 8, 3), np.uint8)
    h = max(im.shape[0] for r in rows for im in r)
    w = max(im.shape[1] for r in rows for im in r)
    if scale <= 0:
        scale = max(1, 128 // max(1, min(h, w)))
    ch, cw = h * scale, w * scale
    left = 8 + 7 * max([len(s) for s in row_labels] + [0]) if row_labels else pad
    top = 18 if col_labels else pad
    ncol = max(len(r) for r in rows)
    W = left + ncol * (cw + pad)
    H = top + len(rows) * (ch + pad)
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, lab in enumerate(col_labels[:ncol]):
        draw.text((left + j * (cw + pad) + 2, 3), str(lab)[: max(4, cw // 7)], fill=(0, 0, 0))
    for i, r in enumerate(rows):
        y = top + i * (ch + pad)
        if i < len(row_labels):
            draw.text((4, y + ch // 2 - 5), str(row_labels[i]), fill=(0, 0, 0))
        for j, im in enumerate(r):
            pil = Image.fromarray(im).resize((im.shape[1] * scale, im.shape[0] * scale), Image.Resampling.NEAREST)
            canvas.paste(pil, (left + j * (cw + pad), y))
    return np.asarray(canvas)


def save_png(arr: np.ndarray, path: str | os.PathLike) -> Path:
    """Write uint8 ``[H, W, 3]`` as PNG atomically."""
    from PIL import Image

    from ...formats.safetensors_io import atomic_output

    with atomic_output(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")
    return Path(path)
