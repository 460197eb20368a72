"""Files an ESD erasure produces: a LoRA-loader file of full-rank deltas, an optional SVD low-rank LoRA, JSON
reports and a loss plot.

* **Full-rank file** — every trained tensor under its kohya name (``lora_unet_<diffusers path with _>``; SDXL: the
  LDM path; Flux: the BFL path, ``lora_unet_double_blocks_0_txt_attn_qkv``, the name kohya ``lora_flux.py`` gives
  and ComfyUI's ``model_lora_keys_unet`` maps to ``diffusion_model.double_blocks.0.txt_attn.qkv.weight``) with
  ``.diff`` (weights) / ``.diff_b`` (biases): ComfyUI's LoraLoader / LoraLoaderModelOnly apply these as
  ``W + strength·ΔW``, so strength 1 reproduces the erased weights exactly (up to the file dtype).
* **Low-rank LoRA** (optional, for A1111/Forge, which do not read ``.diff``): each weight delta is factorised by a
  truncated SVD, ``ΔW ≈ (U_r·√S_r)(√S_r·V_rᵀ)`` (Eckart–Young: the best rank-r approximation in Frobenius norm),
  stored as ``lora_up`` / ``lora_down`` with ``alpha = r`` (scale 1). The fraction of ``‖ΔW‖²_F`` kept
  (``Σ_{i≤r} s_i² / Σ s_i²``) is reported per module and overall. Bias deltas cannot be expressed in a kohya LoRA
  and are dropped from this file (their share of the total delta energy is reported).
* ``training_stats.json`` / ``metadata.json`` — :attr:`ESDResult.stats` / :attr:`ESDResult.metadata`, also
  embedded in the safetensors metadata (``conceptlab_esd_stats`` / ``conceptlab_esd_metadata``) with the usual
  ``ss_*`` / ``modelspec.*`` keys.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import torch

from ...formats.kohya_keys import kohya_lora_name
from ...formats.safetensors_io import atomic_write_text
from .config import ESDResult
from ..lora.extract import factorize

_ARCH_SPEC = {"sd1": ("sd_v1", "stable-diffusion-v1/lora"), "sd2": ("sd_v2", "stable-diffusion-v2/lora"),
              "sdxl": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"),
              # kohya flux_train_network.py / library/sai_model_spec.py (ARCH_FLUX_1_DEV / ARCH_FLUX_1_SCHNELL)
              "flux": ("flux1", "flux-1-dev/lora")}


def diff_state_dict(result: ESDResult) -> dict[str, torch.Tensor]:
    """``{"<kohya name>.diff" | "<kohya name>.diff_b": ΔW}`` (fp32) for every trained tensor.

    Raises ``ValueError`` when the result holds no delta.
    """
    if not result.deltas:
        raise ValueError("the erasure produced no deltas (nothing was trained)")
    out = {}
    for (component, path, attr), d in result.deltas.items():
        suffix = ".diff" if attr == "weight" else ".diff_b"
        name = result.kohya_names.get((component, path)) or kohya_lora_name(component, path)
        out[name + suffix] = d.detach().float().cpu()
    return out


def svd_lora(result: ESDResult, rank: int) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor, float]], dict]:
    """Low-rank LoRA factors of the weight deltas by truncated SVD (module docstring).

    Args:
        result: an :class:`ESDResult`.
        rank: network_dim ``r ≥ 1`` (clipped per module to ``min(out, in·kh·kw)``).

    Returns:
        ``(modules, report)``: ``modules`` maps kohya name → ``(lora_down [r, in(, kh, kw)], lora_up
        [out, r(, 1, 1)], alpha=r)`` fp32; ``report`` has ``rank``, ``energy_kept`` (overall fraction of
        Σ‖ΔW‖²_F over weights kept, 0..1), ``energy_kept_per_module``, ``dropped_bias_tensors`` and
        ``bias_energy_fraction`` (share of the total delta energy in the dropped biases).

    Raises ``ValueError`` for ``rank < 1`` or no weight delta.
    """
    rank = int(rank)
    if rank < 1:
        raise ValueError(f"LoRA rank (network_dim) must be ≥ 1, got {rank}")
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    per: dict[str, float] = {}
    kept_total = full_total = bias_energy = 0.0
    dropped = 0
    for (component, path, attr), d in result.deltas.items():
        d = d.detach().float().cpu()
        if attr != "weight":
            dropped += 1
            bias_energy += float((d ** 2).sum())
            continue
        name = result.kohya_names.get((component, path)) or kohya_lora_name(component, path)
        f = factorize(d, rank)  # the truncated SVD shared with LoRA extraction / resizing (training/lora/extract.py)
        e_all = float((d.double() ** 2).sum())
        kept_total += f.energy_kept * e_all
        full_total += e_all
        per[name] = f.energy_kept
        modules[name] = (f.down, f.up, f.alpha)
    if not modules:
        raise ValueError("no weight deltas to factorise")
    report = {
        "rank": rank,
        "energy_kept": kept_total / full_total if full_total > 0 else 1.0,
        "energy_kept_per_module": per,
        "dropped_bias_tensors": dropped,
        "bias_energy_fraction": bias_energy / (full_total + bias_energy) if full_total + bias_energy > 0 else 0.0,
    }
    return modules, report


def file_metadata(result: ESDResult, extra: Mapping[str, object] | None = None) -> dict[str, str]:
    """safetensors metadata: the JSON reports plus ``ss_*`` / ``modelspec.*`` keys LoRA tools display.

    Results of :mod:`.uce` (``metadata["method"] == "uce"``) are labelled as UCE edits (``conceptlab.uce``,
    the unified-concept-editing repository); the JSON keys are the same for both methods.
    """
    meta = result.metadata
    base_version, spec_arch = _ARCH_SPEC.get(str(meta.get("arch", "sd1")), _ARCH_SPEC["sd1"])
    if meta.get("arch") == "flux" and meta.get("model_variant") == "schnell":
        spec_arch = "flux-1-schnell/lora"
    concepts = ", ".join(meta.get("concepts", []))
    uce = meta.get("method") == "uce"
    out = {
        "conceptlab_esd_metadata": json.dumps(meta),
        "conceptlab_esd_stats": json.dumps(result.stats),
        "ss_network_module": "conceptlab.uce" if uce else "conceptlab.esd",
        "ss_base_model_version": base_version,
        "ss_training_comment": (f"UCE closed-form erasure of: {concepts}" if uce
                                else f"ESD ({meta.get('method')}) erasure of: {concepts}"),
        "ss_steps": str(result.stats.get("iterations_done", 0)),
        "ss_learning_rate": str(meta.get("lr")),
        "ss_seed": str(meta.get("seed")),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": spec_arch,
        "modelspec.implementation": ("https://github.com/rohitgandikota/unified-concept-editing" if uce
                                     else "https://github.com/rohitgandikota/erasing"),
        "modelspec.title": f"{'UCE' if uce else 'ESD'} erase {concepts}",
        "modelspec.description": ("Concept erased with UCE (Gandikota et al., WACV 2024) by Concept Lab" if uce
                                  else "Concept erased with ESD (Gandikota et al., ICCV 2023) by Concept Lab"),
    }
    for k, v in (extra or {}).items():
        out[str(k)] = v if isinstance(v, str) else json.dumps(v)
    return out


def save_outputs(result: ESDResult, weights_path: str | os.PathLike, *, stats_dir: str | os.PathLike | None = None,
                 lora_rank: int = 0, dtype: torch.dtype = torch.float16, overwrite: bool = True) -> dict:
    """Write the erasure's files.

    Args:
        result: the erasure.
        weights_path: the full-rank ``.diff`` file (``.safetensors``); the optional LoRA goes beside it as
            ``<stem>_lora_r<rank>.safetensors``.
        stats_dir: folder for ``training_stats.json`` and ``metadata.json`` (default: beside the weights).
        lora_rank: 0 = no low-rank LoRA; else its network_dim.
        dtype: tensor dtype in the files (fp16 default, as LoRA files are usually shipped; fp32 for exactness).
        overwrite: replace existing files (``FileExistsError`` otherwise, before anything is written).

    Returns:
        ``{"diff": Path, "lora": Path | None, "training_stats": Path, "metadata": Path, "svd": report | None}``.

    Every file is written atomically; a failure leaves earlier files of the same call in place but never a
    half-written file. Raises ``ValueError`` for an empty result or a path not ending in ``.safetensors``.
    """
    from ...formats.lora_files import save_diff_file, save_kohya_lora

    wp = Path(weights_path)
    if wp.suffix != ".safetensors":
        raise ValueError(f"{wp.name}: the erasure file must end in .safetensors")
    sd = Path(stats_dir) if stats_dir is not None else wp.parent
    lora_path = wp.with_name(f"{wp.stem}_lora_r{int(lora_rank)}.safetensors") if lora_rank else None
    stats_path, meta_path = sd / "training_stats.json", sd / "metadata.json"
    if not overwrite:
        for p in (wp, lora_path, stats_path, meta_path):
            if p is not None and p.exists():
                raise FileExistsError(f"{p} already exists")
    diffs = diff_state_dict(result)
    svd_report = None
    lora_modules = None
    if lora_rank:
        lora_modules, svd_report = svd_lora(result, lora_rank)
    extra = {"conceptlab_esd_svd": {k: v for k, v in svd_report.items() if k != "energy_kept_per_module"}} \
        if svd_report else None
    meta = file_metadata(result, extra)
    save_diff_file(wp, diffs, meta, dtype=dtype)
    if lora_modules is not None:
        lmeta = dict(meta)
        lmeta.update({"ss_network_dim": str(int(lora_rank)), "ss_network_alpha": str(int(lora_rank)),
                      "ss_network_module": "networks.lora"})
        save_kohya_lora(lora_path, lora_modules, lmeta, dtype=dtype)
    stats = dict(result.stats)
    if svd_report:
        stats["svd_lora"] = svd_report
    sd.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stats_path, json.dumps(stats, indent=2))
    atomic_write_text(meta_path, json.dumps(result.metadata, indent=2))
    return {"diff": wp, "lora": lora_path, "training_stats": stats_path, "metadata": meta_path, "svd": svd_report}


def loss_plot(losses, title: str = "ESD loss", width: int = 640, height: int = 360):
    """Loss per iteration (thin) and its 20-iteration moving average (thick) as a uint8 ``[H, W, 3]`` array
    (matplotlib, Agg backend). NaN / ``None`` iterations are left out."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import numpy as np
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    y = np.asarray([float("nan") if x is None else float(x) for x in losses], dtype=np.float64)
    fig = Figure(figsize=(width / 100, height / 100), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    if y.size:
        x = np.arange(1, y.size + 1)
        ok = np.isfinite(y)
        ax.plot(x[ok], y[ok], lw=0.8, alpha=0.5, label="loss")
        if ok.sum() >= 2:
            yy = np.where(ok, y, np.nan)
            k = min(20, int(ok.sum()))
            ma = np.array([np.nanmean(yy[max(0, i - k + 1): i + 1]) for i in range(y.size)])
            ax.plot(x, ma, lw=2.0, label=f"mean of last {k}")
        ax.legend(loc="upper right")
        if ok.any() and (y[ok] > 0).all() and y[ok].max() / max(y[ok].min(), 1e-30) > 50:
            ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("masked MSE")
    ax.set_title(title)
    fig.tight_layout()
    canvas.draw()
    img = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    return img


def comparison_grid(rows, col_labels, label_width: int = 260, font_px: int = 14):
    """A labelled image grid: one row per ``(label, [image, ...])``, a header row of ``col_labels``.

    Images: uint8 ``[H, W, 3]`` numpy arrays (rows may differ in size; each cell is the row's largest image).
    Returns a uint8 ``[H, W, 3]`` array. Long labels are wrapped. Raises ``ValueError`` for no rows.
    """
    import textwrap

    import numpy as np
    from PIL import Image, ImageDraw

    if not rows:
        raise ValueError("no rows to lay out")
    cw = max(img.shape[1] for _, imgs in rows for img in imgs)
    ch_ = max(img.shape[0] for _, imgs in rows for img in imgs)
    ncol = max(len(imgs) for _, imgs in rows)
    header = font_px + 12
    pad = 4
    W = label_width + ncol * (cw + pad) + pad
    H = header + len(rows) * (ch_ + pad) + pad
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(col_labels[:ncol]):
        draw.text((label_width + j * (cw + pad) + pad + 4, 6), str(name), fill=(0, 0, 0))
    for i, (label, imgs) in enumerate(rows):
        y = header + i * (ch_ + pad) + pad
        wrapped = textwrap.wrap(str(label), width=max(10, label_width // 7))[: max(1, ch_ // (font_px + 2))]
        draw.multiline_text((6, y + 4), "\n".join(wrapped), fill=(0, 0, 0), spacing=2)
        for j, img in enumerate(imgs):
            canvas.paste(Image.fromarray(np.ascontiguousarray(img[..., :3])),
                         (label_width + j * (cw + pad) + pad, y))
    return np.asarray(canvas)
