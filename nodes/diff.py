"""ComfyUI nodes for weight-diff analysis (category "Concept Lab/Weight diff").

* :class:`DiffModels` — two MODELs (and optionally two CLIPs) in the graph. Each weight is read *as patched*:
  ``ModelPatcher.get_key_patches()`` gives the original weight (the backup if the model is currently patched in
  place) and its patch list, and ComfyUI's own ``comfy.lora.calculate_weight`` applies the patches to a float32
  copy — the same computation ComfyUI does when it loads the model for sampling — so LoRAs and merges upstream
  count, and nothing is mutated. Weights are read key by key; the statistics core never imports ComfyUI.
* :class:`DiffFiles` — two files from ComfyUI's checkpoints / loras lists (checkpoint vs checkpoint, checkpoint
  vs LoRA at a strength, LoRA vs LoRA), streamed tensor by tensor.
* :class:`CompareDiffReports` — ratio table of two reports (e.g. a 100- and a 500-iteration erasure).

Each returns the Markdown report, the JSON report (feed it to the compare node) and the plots as an IMAGE batch.
"""

from __future__ import annotations

import torch

from . import comfy_io, policy

CATEGORY = "Concept Lab/Weight diff"

_TOL = ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 1e-6,
                  "tooltip": "An element counts as changed when |Δ| is above this (0 = any change). Only affects "
                             "the 'elements changed' column; all other statistics use every element."})
_TOP = ("INT", {"default": 20, "min": 0, "max": 500,
                "tooltip": "How many of the most changed tensors to list."})
_RANK = ("BOOLEAN", {"default": False,
                     "tooltip": "Also estimate the effective rank of each changed ΔW (number of singular values "
                                "holding 90 % of its energy, randomized SVD). Slower; bounded by rank_time_budget."})
_BUDGET = ("FLOAT", {"default": 60.0, "min": 1.0, "max": 3600.0, "step": 1.0,
                     "tooltip": "Seconds allowed for the effective-rank estimates; tensors after that are skipped "
                                "and counted in the report."})
_OUT_TIPS = ("The report as Markdown: overall numbers, tables per layer type / block / component, top tensors.",
             "The full report as JSON (schema conceptlab.weight_diff/1); connect it to Compare Weight-Diff Reports.",
             "Plots: change per layer type, block × layer-type heatmap, |Δ| histogram (3 images).")


def _options(tolerance, top_n, effective_rank, rank_time_budget):
    from ..metrics.weight_diff import DiffOptions

    return DiffOptions(tolerance=float(tolerance), top_n=int(top_n), rank=bool(effective_rank),
                       rank_time_budget_s=float(rank_time_budget))


def _outputs(report: dict) -> tuple:
    from ..metrics.diff_cli import dumps_report
    from ..metrics.diff_plots import render_plots
    from ..metrics.diff_report import report_markdown

    images = comfy_io.numpy_to_image(render_plots(report))
    return report_markdown(report), dumps_report(report), images


class PatchedWeights:
    """A tensor source (see ``metrics.diff_models.diff_sources``) over ComfyUI patchers' *patched* weights.

    Args:
        name: label in the report ("model A").
        parts: ``(patcher, key prefix or None)`` pairs, e.g. ``(model, "diffusion_model.")`` and
            ``(clip.patcher, None)``; keys of all parts are merged (they never collide: ``diffusion_model.*`` vs
            ``clip_l.*``).

    ``get(key)`` returns, on the CPU, the original weight object when the key has no patches (so two clones of
    one model share it and compare as identical at no cost), otherwise a float32 copy with every patch applied
    by ``comfy.lora.calculate_weight``. ``dtype(key)`` is the stored dtype, so changes that rounding to it would
    erase are counted. Nothing is mutated.
    """

    format = "comfyui"
    path = None

    def __init__(self, name: str, parts):
        self.name = name
        self._entries: dict = {}
        for patcher, prefix in parts:
            kp = patcher.get_key_patches(prefix) if prefix is not None else patcher.get_key_patches()
            for k, entry in kp.items():
                if k.endswith((".position_ids", ".logit_scale")) or k.startswith("model_sampling."):
                    continue
                self._entries[k] = entry

    def keys(self) -> list[str]:
        """ComfyUI state-dict keys of every part (position ids, ``logit_scale``, ``model_sampling.*`` skipped)."""
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of the stored (unpatched) weight; ``KeyError`` for an unknown key."""
        return tuple(self._entries[key][0][0].shape)

    def dtype(self, key: str) -> torch.dtype:
        """Stored dtype of the weight (what a saved model would round to); ``KeyError`` for an unknown key."""
        return self._entries[key][0][0].dtype

    def get(self, key: str) -> torch.Tensor:
        """The weight as ComfyUI would patch it, on the CPU (see the class docstring); ``KeyError`` if unknown.

        Unpatched CPU weights are returned as stored (shared, not copied); otherwise a new float32 tensor with
        ComfyUI's weight conversion and ``comfy.lora.calculate_weight`` applied.
        """
        entry = self._entries[key]
        weight, convert = entry[0]
        if len(entry) == 1 and weight.device.type == "cpu" and getattr(convert, "__name__", "") == "<lambda>":
            return weight.detach()
        w = convert(weight.detach().to(device="cpu", dtype=torch.float32, copy=True), inplace=True)
        if len(entry) > 1:
            import comfy.lora

            w = comfy.lora.calculate_weight(entry[1:], w, key)
        return w.to(device="cpu", dtype=torch.float32)

    def release(self, key: str) -> None:
        """Nothing to free: patched copies die with the pair."""


def diff_patchers(model_a, model_b, clip_a=None, clip_b=None, options=None, progress=None) -> dict:
    """Diff two ComfyUI MODELs (and CLIPs when both are given) on their patched weights; returns the report.

    Raises the errors of ``metrics.diff_models.diff_sources`` (different architectures, shapes).
    """
    from ..metrics.diff_models import diff_sources

    parts_a, parts_b = [(model_a, "diffusion_model.")], [(model_b, "diffusion_model.")]
    if clip_a is not None and clip_b is not None:
        parts_a.append((clip_a.patcher, None))
        parts_b.append((clip_b.patcher, None))
    src_a, src_b = PatchedWeights("model A", parts_a), PatchedWeights("model B", parts_b)
    report = diff_sources(src_a, src_b, options=options, progress=progress, mode="models", kind="model")
    if (clip_a is None) != (clip_b is None):
        report["notes"].append("Only one CLIP was connected: text encoders were not compared.")
    return report


@policy.guarded
class DiffModels:
    """What changed between two MODELs (and CLIPs), read as patched, key by key."""

    DESCRIPTION = ("Compare two models in the graph weight by weight — e.g. a base model and the same model after "
                   "an ESD erasure or with a LoRA applied. Reports mean/max |Δ|, std, relative change and cosine "
                   "per layer type, UNet block and component, with parameter share next to share of the change, "
                   "the most changed tensors and plots. Patched weights are computed the way ComfyUI does; the "
                   "inputs are not changed.")
    CATEGORY = CATEGORY
    FUNCTION = "diff"
    RETURN_TYPES = ("STRING", "STRING", "IMAGE")
    RETURN_NAMES = ("report", "report_json", "plots")
    OUTPUT_TOOLTIPS = _OUT_TIPS

    @classmethod
    def INPUT_TYPES(cls):
        """ComfyUI V1 input spec: ``{"required": {...}, "optional": {...}}`` with a tooltip on every input."""
        return {
            "required": {
                "model_a": ("MODEL", {"tooltip": "Model A, the reference (e.g. the base model)."}),
                "model_b": ("MODEL", {"tooltip": "Model B, the changed model (e.g. after erasure or a LoRA). "
                                                 "Δ = B − A."}),
                "tolerance": _TOL,
                "top_n": _TOP,
                "effective_rank": _RANK,
                "rank_time_budget": _BUDGET,
            },
            "optional": {
                "clip_a": ("CLIP", {"tooltip": "Text encoder of A; connect both CLIPs to compare text encoders too."}),
                "clip_b": ("CLIP", {"tooltip": "Text encoder of B."}),
            },
        }

    def diff(self, model_a, model_b, tolerance=0.0, top_n=20, effective_rank=False, rank_time_budget=60.0,
             clip_a=None, clip_b=None):
        """Diff MODEL B against MODEL A (and CLIP B against CLIP A when both are connected).

        ``tolerance``: |Δ| at or below it counts as unchanged (weight units); ``rank_time_budget`` in seconds.
        Returns ``(markdown, report JSON, plots IMAGE [3, H, W, 3])``. Raises the errors of
        :func:`conceptlab.metrics.diff_models.diff_sources` (``ValueError`` for different architectures/shapes).
        """
        n = len(model_a.get_key_patches("diffusion_model."))
        if clip_a is not None and clip_b is not None:
            n += len(clip_a.patcher.get_key_patches())
        bar = comfy_io.Progress(n)
        report = diff_patchers(model_a, model_b, clip_a, clip_b,
                               _options(tolerance, top_n, effective_rank, rank_time_budget),
                               progress=lambda d, t: bar.set(min(d, n)))
        return _outputs(report)


# diffusion_models/: where UNETLoader's files live (a BFL flux1-dev.safetensors, a ComfyUI-saved Flux transformer)
_FILE_FOLDERS = ("checkpoints", "diffusion_models", "loras")


def _file_choices() -> list[str]:
    return [f"{folder}/{n}" for folder in _FILE_FOLDERS for n in comfy_io.model_list(folder)]


def _resolve_choice(choice: str):
    folder, _, name = str(choice).partition("/")
    if folder not in _FILE_FOLDERS or not name:
        raise ValueError(f"{choice!r}: pick a file from the checkpoints/, diffusion_models/ or loras/ list")
    return comfy_io.model_file(folder, name)


@policy.guarded
class DiffFiles:
    """What changed between two files from ComfyUI's checkpoints / loras folders."""

    DESCRIPTION = ("Compare two weight files from ComfyUI's model folders: two checkpoints, a checkpoint and a LoRA "
                   "(the LoRA's change at a strength), or two LoRAs. Files are read tensor by tensor, never whole. "
                   "Same report and plots as Diff Two Models.")
    CATEGORY = CATEGORY
    FUNCTION = "diff"
    RETURN_TYPES = ("STRING", "STRING", "IMAGE")
    RETURN_NAMES = ("report", "report_json", "plots")
    OUTPUT_TOOLTIPS = _OUT_TIPS

    @classmethod
    def INPUT_TYPES(cls):
        """ComfyUI V1 input spec: ``{"required": {...}, "optional": {...}}`` with a tooltip on every input."""
        choices = _file_choices() or ["checkpoints/"]
        return {
            "required": {
                "file_a": (choices, {"tooltip": "File A (checkpoints/…, diffusion_models/… or loras/…). With a "
                                                "checkpoint and a LoRA, the checkpoint is the base. Flux files in BFL, "
                                                "ComfyUI and diffusers layouts line up."}),
                "file_b": (choices, {"tooltip": "File B. Δ = B − A."}),
                "lora_strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                            "tooltip": "Strength applied to a LoRA's ΔW (as in LoraLoader)."}),
                "tolerance": _TOL,
                "top_n": _TOP,
                "effective_rank": _RANK,
                "rank_time_budget": _BUDGET,
            },
        }

    def diff(self, file_a, file_b, lora_strength=1.0, tolerance=0.0, top_n=20, effective_rank=False,
             rank_time_budget=60.0):
        """Diff ``file_b`` against ``file_a`` (``"checkpoints/<name>"`` / ``"loras/<name>"``), LoRA ΔW scaled by
        ``lora_strength``. Returns ``(markdown, report JSON, plots IMAGE)``.

        Raises ``ValueError`` for a choice outside the checkpoints / loras folders, ``FileNotFoundError`` for a
        name ComfyUI does not list, and the errors of
        :func:`conceptlab.metrics.diff_models.diff_files` (unreadable files, incompatible architectures).
        """
        from ..metrics.diff_models import diff_files

        pa, pb = _resolve_choice(file_a), _resolve_choice(file_b)
        bar = None

        def progress(done, total):
            nonlocal bar
            if bar is None:
                bar = comfy_io.Progress(total)
            bar.set(min(done, total))

        report = diff_files(pa, pb, lora_strength=float(lora_strength),
                            options=_options(tolerance, top_n, effective_rank, rank_time_budget), progress=progress)
        return _outputs(report)


@policy.guarded
class CompareDiffReports:
    """Ratio table of two weight-diff reports."""

    DESCRIPTION = ("Compare two weight-diff reports made against the same base (e.g. a 100- and a 500-iteration "
                   "erasure): for every metric and group, the ratio report 2 / report 1, written like '2.7×'.")
    CATEGORY = CATEGORY
    FUNCTION = "compare"
    RETURN_TYPES = ("STRING", "STRING", "IMAGE")
    RETURN_NAMES = ("comparison", "comparison_json", "plot")
    OUTPUT_TOOLTIPS = ("Ratio tables as Markdown (overall, per component, layer type and block).",
                       "The comparison as JSON (r1, r2 and ratio per metric and group).",
                       "Bar chart of the mean |Δ| ratio per layer type.")

    @classmethod
    def INPUT_TYPES(cls):
        """ComfyUI V1 input spec: ``{"required": {...}, "optional": {...}}`` with a tooltip on every input."""
        return {
            "required": {
                "report_1": ("STRING", {"forceInput": True,
                                        "tooltip": "First report JSON (report_json of a diff node): the reference."}),
                "report_2": ("STRING", {"forceInput": True,
                                        "tooltip": "Second report JSON; ratios are report 2 / report 1."}),
                "label_1": ("STRING", {"default": "", "tooltip": "Name of report 1 in the tables (empty: its B side)."}),
                "label_2": ("STRING", {"default": "", "tooltip": "Name of report 2 in the tables (empty: its B side)."}),
            },
        }

    def compare(self, report_1, report_2, label_1="", label_2=""):
        """Ratios report_2 / report_1 of two diff-report JSON strings.

        Returns ``(markdown, comparison JSON, plot IMAGE [1, H, W, 3])``. Raises ``ValueError`` when an input is
        not JSON object text, and the errors of :func:`conceptlab.metrics.weight_diff.compare_reports`.
        """
        from ..metrics.diff_cli import dumps_report
        from ..metrics.diff_plots import plot_compare
        from ..metrics.diff_report import compare_markdown
        from ..metrics.weight_diff import compare_reports

        from ..formats.limits import load_json

        for r, n in ((report_1, "report_1"), (report_2, "report_2")):
            if not str(r).lstrip().startswith("{"):
                raise ValueError(f"{n} must be the JSON text of a diff report (connect report_json)")
        report_1, report_2 = load_json(report_1, "report_1"), load_json(report_2, "report_2")  # bounded parse
        cmp = compare_reports(report_1, report_2, label1=label_1.strip() or None, label2=label_2.strip() or None)
        img = comfy_io.numpy_to_image([plot_compare(cmp)])
        return compare_markdown(cmp), dumps_report(cmp), img


NODE_CLASS_MAPPINGS = {
    "ConceptLabDiffModels": DiffModels,
    "ConceptLabDiffFiles": DiffFiles,
    "ConceptLabCompareDiffReports": CompareDiffReports,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ConceptLabDiffModels": "Diff Two Models",
    "ConceptLabDiffFiles": "Diff Two Weight Files",
    "ConceptLabCompareDiffReports": "Compare Weight-Diff Reports",
}
