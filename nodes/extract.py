"""ComfyUI nodes for LoRA extraction and resizing (thin adapters over :mod:`conceptlab.training.lora.extract`).

* ``ConceptLabExtractLora``: two checkpoints from ComfyUI's list (base, fine-tune or merge) → a kohya LoRA in
  ``output/loras/`` (listed by LoraLoader), the per-layer energy table and a plot of the energy kept per layer.
* ``ConceptLabResizeLora``: a LoRA from ComfyUI's list → the same LoRA at a lower rank (fixed, by energy, or
  kohya's dynamic ``sv_ratio`` / ``sv_fro`` / ``sv_cumulative``).

Only names from ComfyUI's own folder lists are read; files are written under the output folder.
"""

from __future__ import annotations

import json
import re

from . import comfy_io, policy

CATEGORY = "Concept Lab/LoRA"

_MODE_TIP = ("How each layer's rank is chosen. fixed: rank (conv_rank for 3×3 convs). energy: the smallest rank "
             "keeping mode_param of the layer's ‖ΔW‖² (e.g. 0.9), capped at rank. sv_ratio / sv_fro / "
             "sv_cumulative: kohya resize_lora.py's dynamic methods with mode_param as their target (they keep one "
             "component more than the target needs, as kohya does).")
_PARAM_TIP = ("Parameter of the rank mode: energy / sv_fro / sv_cumulative take a fraction in (0, 1] (0.9 = keep "
              "90 %); sv_ratio takes the largest/smallest singular value ratio to keep (≥ 1, e.g. 8). Ignored for fixed.")
_DTYPE = (["fp16", "bf16", "fp32"], {"default": "fp16", "tooltip": "Tensor dtype in the saved file (fp16 as "
                                     "kohya's save_precision default for LoRAs)."})
_OUT_TIPS = ("File name of the new LoRA inside output/loras (pick it in LoraLoader after a refresh).",
             "Energy kept per layer (lowest first) and overall: Σ kept s² / Σ s² of each layer's ΔW.",
             "The full report as JSON (settings, per-layer rank / alpha / energy kept).",
             "Energy kept per layer as a plot.")


def _free_name(prefix: str) -> tuple[str, object]:
    """``loras/<prefix>_00001.safetensors`` (next free counter) inside the output folder; the prefix may not
    leave it (``comfy_io.safe_join``)."""
    prefix = (prefix or "lora").strip().replace("\\", "/")
    if not prefix or prefix.endswith("/") or not re.fullmatch(r"[\w\-. /]+", prefix):
        raise ValueError(f"filename_prefix {prefix!r}: use letters, digits, '-', '_', '.', '/' only")
    for i in range(1, 100000):
        name = f"{prefix}_{i:05d}.safetensors"
        path = comfy_io.output_file("loras", name)
        if not path.exists():
            return name, path
    raise FileExistsError(f"no free file name for prefix {prefix!r}")


def energy_plot(report: dict, width: int = 800, height: int = 320):
    """Energy kept per layer (sorted, lowest first) as a uint8 ``[H, W, 3]`` array (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    vals = sorted(v["energy_kept"] for v in report.get("per_layer", {}).values())
    fig = Figure(figsize=(width / 100, height / 100), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    if vals:
        ax.bar(np.arange(len(vals)), np.asarray(vals) * 100.0, width=1.0, color="#4c72b0")
    o = report.get("overall", {})
    ax.axhline(o.get("energy_kept", 1.0) * 100.0, color="#c44e52", lw=1.5, label="overall (energy-weighted)")
    ax.set_ylim(0, 100)
    ax.set_xlabel(f"layer (sorted), {len(vals)} layers")
    ax.set_ylabel("energy kept, %")
    ax.set_title("‖ΔW_lora‖² / ‖ΔW‖² per layer")
    ax.legend(loc="lower right")
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _outputs(name: str, report: dict) -> tuple:
    from ..training.lora.extract import layer_table

    return (name, layer_table(report), json.dumps(report, indent=1),
            comfy_io.numpy_to_image(energy_plot(report)))


def _progress():
    bar = None

    def cb(done, total):
        nonlocal bar
        if bar is None:
            bar = comfy_io.Progress(total)
        bar.set(min(done, total))
    return cb


@policy.guarded
class ExtractLora:
    """Extract a kohya LoRA from two checkpoints."""

    PATH_INPUTS = {"filename_prefix": "subfolders"}

    DESCRIPTION = ("Extract a LoRA from the difference of two checkpoints (fine-tune or merge − base), like kohya's "
                   "extract_lora_from_models.py: each layer's ΔW is factorised by truncated SVD at a chosen rank or "
                   "by energy kept. Conv layers are included when conv_rank > 0. Saved in kohya format to "
                   "output/loras; the energy kept per layer is reported.")
    CATEGORY = CATEGORY
    FUNCTION = "extract"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "STRING", "STRING", "IMAGE")
    RETURN_NAMES = ("lora_name", "report", "report_json", "energy_plot")
    OUTPUT_TOOLTIPS = _OUT_TIPS

    @classmethod
    def INPUT_TYPES(cls):
        """ComfyUI V1 input spec with a tooltip on every input."""
        ckpts = comfy_io.model_list("checkpoints") or ["none"]
        return {"required": {
            "base_checkpoint": (ckpts, {"tooltip": "The original model the fine-tune started from (same family)."}),
            "tuned_checkpoint": (ckpts, {"tooltip": "The fine-tuned or merged model. The LoRA is tuned − base."}),
            "rank": ("INT", {"default": 32, "min": 1, "max": 1024, "tooltip": "network_dim of Linear / 1×1 conv "
                             "layers (attention, feed-forward, proj_in/out); the cap for non-fixed modes."}),
            "conv_rank": ("INT", {"default": 0, "min": 0, "max": 1024, "tooltip": "Rank of the 3×3 conv layers of "
                                  "the ResNet blocks (kohya conv_dim); 0 leaves ResNet layers out."}),
            "rank_mode": (["fixed", "energy", "sv_ratio", "sv_fro", "sv_cumulative"],
                          {"default": "fixed", "tooltip": _MODE_TIP}),
            "mode_param": ("FLOAT", {"default": 0.9, "min": 0.0, "max": 1000.0, "step": 0.01,
                                     "tooltip": _PARAM_TIP}),
            "min_diff": ("FLOAT", {"default": 0.01, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip":
                                   "A text encoder whose weights changed by at most this (max |Δ|) is left out, "
                                   "as kohya's --min_diff (the fine-tune did not train it)."}),
            "save_dtype": _DTYPE,
            "filename_prefix": ("STRING", {"default": "extracted/lora", "tooltip": "Name under output/loras; "
                                           "_00001.safetensors etc. is appended."}),
        }}

    def extract(self, base_checkpoint, tuned_checkpoint, rank, conv_rank, rank_mode, mode_param, min_diff,
                save_dtype, filename_prefix):
        """Extract and save; returns ``(lora_name, report, report_json, energy_plot)``.

        Raises ``FileNotFoundError`` for a name ComfyUI does not list, ``ValueError`` (different families, shapes,
        nothing changed, bad settings) from :func:`conceptlab.training.lora.extract.extract_lora`.
        """
        from ..formats.lora_files import save_kohya_lora
        from ..formats.safetensors_io import parse_dtype
        from ..training.lora.extract import extract_lora

        base = comfy_io.model_file("checkpoints", base_checkpoint)
        tuned = comfy_io.model_file("checkpoints", tuned_checkpoint)
        if base == tuned:
            raise ValueError("base_checkpoint and tuned_checkpoint are the same file")
        res = extract_lora(base, tuned, rank=int(rank), conv_rank=int(conv_rank), mode=rank_mode,
                           param=None if rank_mode == "fixed" else float(mode_param), min_diff=float(min_diff),
                           progress=_progress())
        name, path = _free_name(filename_prefix)
        save_kohya_lora(path, res.modules, res.metadata, dtype=parse_dtype(save_dtype), overwrite=False)
        return _outputs(name, res.report)


@policy.guarded
class ResizeLora:
    """Resize a LoRA to a lower rank."""

    PATH_INPUTS = {"filename_prefix": "subfolders"}

    DESCRIPTION = ("Resize a LoRA to a lower rank by SVD, like kohya's resize_lora.py: fixed rank, by energy kept, "
                   "or kohya's dynamic sv_ratio / sv_fro / sv_cumulative. alpha is rescaled so the weights stay the "
                   "same up to the dropped components; the energy kept per layer is reported.")
    CATEGORY = CATEGORY
    FUNCTION = "resize"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "STRING", "STRING", "IMAGE")
    RETURN_NAMES = ("lora_name", "report", "report_json", "energy_plot")
    OUTPUT_TOOLTIPS = _OUT_TIPS

    @classmethod
    def INPUT_TYPES(cls):
        """ComfyUI V1 input spec with a tooltip on every input."""
        loras = comfy_io.model_list("loras") or ["none"]
        return {"required": {
            "lora_name": (loras, {"tooltip": "The LoRA to resize (kohya lora_down/lora_up or peft lora_A/lora_B)."}),
            "rank": ("INT", {"default": 16, "min": 1, "max": 1024, "tooltip": "New rank of linear modules (the "
                             "cap for non-fixed modes). A rank at or above the old one keeps the LoRA as is."}),
            "conv_rank": ("INT", {"default": 0, "min": 0, "max": 1024, "tooltip": "New rank of conv (4-D) "
                                  "modules; 0 = same as rank (kohya new_conv_rank)."}),
            "rank_mode": (["fixed", "energy", "sv_ratio", "sv_fro", "sv_cumulative"],
                          {"default": "fixed", "tooltip": _MODE_TIP}),
            "mode_param": ("FLOAT", {"default": 0.9, "min": 0.0, "max": 1000.0, "step": 0.01,
                                     "tooltip": _PARAM_TIP}),
            "save_dtype": _DTYPE,
            "filename_prefix": ("STRING", {"default": "resized/lora", "tooltip": "Name under output/loras; "
                                           "_00001.safetensors etc. is appended."}),
        }}

    def resize(self, lora_name, rank, conv_rank, rank_mode, mode_param, save_dtype, filename_prefix):
        """Resize and save; returns ``(lora_name, report, report_json, energy_plot)``.

        Raises ``FileNotFoundError`` for a name ComfyUI does not list and the ``ValueError`` of
        :func:`conceptlab.training.lora.extract.resize_lora`.
        """
        from ..formats.safetensors_io import parse_dtype
        from ..training.lora.extract import resize_lora, save_lora_tensors

        src = comfy_io.model_file("loras", lora_name)
        tensors, report, md = resize_lora(src, rank=int(rank), conv_rank=int(conv_rank) or None, mode=rank_mode,
                                          param=None if rank_mode == "fixed" else float(mode_param),
                                          progress=_progress())
        name, path = _free_name(filename_prefix)
        save_lora_tensors(path, tensors, md, dtype=parse_dtype(save_dtype), overwrite=False)
        return _outputs(name, report)


NODE_CLASS_MAPPINGS = {"ConceptLabExtractLora": ExtractLora, "ConceptLabResizeLora": ResizeLora}
NODE_DISPLAY_NAME_MAPPINGS = {"ConceptLabExtractLora": "Extract LoRA from Checkpoints",
                              "ConceptLabResizeLora": "Resize LoRA (SVD)"}
