"""ComfyUI nodes for merges of more than two models (category "Concept Lab/Merge").

* :class:`MergeModelsN` -- in-graph merge of 2-6 MODELs: weighted sum (lazy key patches, like ModelMergeSimple
  chained), or TIES / DARE / DELLA / Model Stock over a base model (per-key ``diff`` patches computed from the
  *patched* weights, so LoRAs applied upstream count).
* :class:`MergeStepsSweep` -- the "merge with trained steps" grid: the same model A merged at one α with each of
  several checkpoints (epoch / step saves of one training run), sampled with ComfyUI's own sampler; columns are
  the checkpoints in step order, rows the seeds.

ComfyUI is imported only inside functions, so the classes import without it.
"""

from __future__ import annotations

import re
import warnings

import torch

from ..training.merge.methods import TIES_SIGNS, MergePlan, MethodOptions, canonical_key, check_alpha
from ..training.merge.nmodel import METHODS_N, METHODS_N_NEED_BASE, merge_tensor_n, parse_weights
from . import comfy_io, policy
from .merge import (CONVENTION, _arch_of, _check_same, _key_patches, _label_grid, _patched_weight, merge_patchers,
                    sample_cell, sweep_sampling_inputs)

CATEGORY = "Concept Lab/Merge"
MAX_MODELS = 6

_TIES_SIGN = (list(TIES_SIGNS), {"default": "sum",
                                 "tooltip": "TIES / DELLA sign election. sum: sign of the summed task vectors (the "
                                            "paper, mergekit). count: one vote per model (sd-mecha's default)."})


@policy.guarded
class MergeModelsN:
    """In-graph merge of up to six models (weighted sum, TIES, DARE, DELLA, Model Stock)."""

    DESCRIPTION = ("Merge 2 to 6 models in the graph without saving. weighted_sum: Σ wᵢ·modelᵢ (weights default "
                   "1/N each; the weight of model i is its share, so two models with weights 1 − α, α are the "
                   "two-model merge where α is the weight of B). ties / dare / della: task vectors modelᵢ − base "
                   "weighted wᵢ. model_stock: base + t·mean(modelᵢ − base), t from the angle between the models "
                   "(no weights). The output is a patched clone of model_1; inputs are never changed.")
    CATEGORY = CATEGORY
    FUNCTION = "merge"
    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "report")
    OUTPUT_TOOLTIPS = ("Merged model (a patched clone of model_1).", "What was merged, and any warnings.")

    @classmethod
    def INPUT_TYPES(cls):
        opt = {f"model_{i}": ("MODEL", {"tooltip": f"Model {i} (optional)."}) for i in range(3, MAX_MODELS + 1)}
        opt["base_model"] = ("MODEL", {"tooltip": "The model the others were fine-tuned from: required for ties, "
                                                  "dare, della and model_stock; unused by weighted_sum."})
        opt["ties_sign"] = _TIES_SIGN
        return {
            "required": {
                "model_1": ("MODEL", {"tooltip": "Model 1; the output is a patched clone of it (its patches kept)."}),
                "model_2": ("MODEL", {"tooltip": "Model 2."}),
                "method": (list(METHODS_N), {"default": "weighted_sum",
                                             "tooltip": "weighted_sum Σ wᵢ·Mᵢ; ties / dare / della over task "
                                                        "vectors Mᵢ − base; model_stock (base required)."}),
                "weights": ("STRING", {"default": "", "multiline": False,
                                       "tooltip": "One weight per connected model in order (model_1, model_2, "
                                                  "model_3 …), comma-separated; empty = 1/N each. A sum other than "
                                                  "1 scales the result (warning). Not used by model_stock."}),
                "density": ("FLOAT", {"default": 0.2, "min": 0.0, "max": 1.0, "step": 0.01,
                                      "tooltip": "TIES: fraction kept (top-k by magnitude). DARE / DELLA: keep "
                                                 "probability. Ignored by weighted_sum and model_stock."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                 "tooltip": "DARE / DELLA seed; masks are derived from seed + key name."}),
            },
            "optional": opt,
        }

    def merge(self, model_1, model_2, method, weights, density, seed, base_model=None, ties_sign="sum", **more):
        """Merge the connected MODELs (model_1, model_2, then model_3 … model_6 in order) with ``method``.

        Returns ``(MODEL, report STRING)``. Raises ``ValueError`` when the weight count differs from the number of
        connected models, a method needs ``base_model`` and it is missing, or the models differ in architecture
        or shapes.
        """
        models = [model_1, model_2] + [more[f"model_{i}"] for i in range(3, MAX_MODELS + 1)
                                       if more.get(f"model_{i}") is not None]
        unknown = sorted(k for k in more if not re.fullmatch(r"model_[3-6]", k))
        if unknown:
            raise ValueError(f"unknown inputs: {', '.join(unknown)}")
        if method in METHODS_N_NEED_BASE and base_model is None:
            raise ValueError(f"{method} needs base_model (the model the others were fine-tuned from)")
        lines = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if method == "model_stock" and weights.strip():
                warnings.warn("model_stock does not use weights: its ratio comes from the angle between models")
            w = parse_weights(weights if method != "model_stock" else "", len(models))
        lines += [f"warning: {c.message}" for c in caught]
        opts = MethodOptions(ties_sign=ties_sign)
        prefix = "diffusion_model."
        kps = [_key_patches(m, prefix) for m in models]
        for i, kp in enumerate(kps[1:], 2):
            _check_same("model_1", kps[0], f"model_{i}", kp)
        kpbase = _key_patches(base_model, prefix) if base_model is not None and method != "weighted_sum" else None
        if kpbase is not None:
            _check_same("model_1", kps[0], "base_model", kpbase)
        arch = _arch_of(kps[0])
        out = models[0].clone()
        keys = [k for k in kps[0] if all(k in kp for kp in kps[1:]) and (kpbase is None or k in kpbase)]
        skipped = len(kps[0]) - len(keys)
        if skipped:
            lines.append(f"{skipped} weights missing from some model: kept from model_1")
        bar = comfy_io.Progress(max(len(keys), 1))
        for n, k in enumerate(keys, 1):
            if method == "weighted_sum":
                out.add_patches({k: kps[1][k]}, w[1], w[0])      # w1·M1 + w2·M2
                for kp, wi in zip(kps[2:], w[2:]):
                    out.add_patches({k: kp[k]}, wi, 1.0)         # + wi·Mi
            else:
                ts = [_patched_weight(kp[k], k) for kp in kps]
                base = _patched_weight(kpbase[k], k)
                merged = merge_tensor_n(method, canonical_key(k), ts, w, base=base, density=density, seed=seed,
                                        options=opts)
                delta = (merged - ts[0]).to(device="cpu", dtype=kps[0][k][0][0].dtype)
                out.add_patches({k: ("diff", (delta,))}, 1.0, 1.0)
            bar.set(n)
        desc = "t from the angle" if method == "model_stock" else "weights " + ", ".join(f"{x:g}" for x in w)
        lines.insert(0, f"{method} of {len(models)} models ({arch}), {desc}")
        return (out, "\n".join(lines))


_STEP_RE = re.compile(r"(?:step|steps|epoch|ep|e|s)?[-_ ]?(\d+)(?!.*\d)", re.IGNORECASE)


def step_label(name: str) -> tuple[int | None, str]:
    """``(step number or None, short label)`` for a checkpoint file name: the last number in the stem
    (``style-000010.safetensors`` → ``(10, "style-000010")``)."""
    stem = re.sub(r"\.(safetensors|ckpt|pt|pth|sft)$", "", name.split("/")[-1], flags=re.IGNORECASE)
    m = _STEP_RE.search(stem)
    return (int(m.group(1)) if m else None), stem


def _parse_names(text: str) -> list[str]:
    names = [n.strip() for n in re.split(r"[\n,]", str(text)) if n.strip()]
    if not names:
        raise ValueError("no checkpoints given: list the names (one per line or comma-separated) from the "
                         "checkpoints folder")
    if len(names) > 16:
        raise ValueError(f"{len(names)} checkpoints: at most 16 per sweep")
    return names


def steps_sweep(model_a, loaders, alpha: float, sample, rows: int, seed: int, progress=None):
    """The grid's cells: for each ``(label, load)`` in ``loaders`` (``load()`` → MODEL, called once, released
    after its column), the weighted sum ``(1 − α)·A + α·checkpoint`` sampled for seeds ``seed … seed + rows − 1``
    by ``sample(model, seed)``. Returns ``(cells row-major, column labels)``."""
    arch = _arch_of(_key_patches(model_a, "diffusion_model."))
    plan = MergePlan(arch=arch, alpha=float(alpha))
    cols = []
    for label, load in loaders:
        m_b = load()
        merged, _ = merge_patchers(model_a, m_b, None, "weighted_sum", plan, 0.0, 0, "diffusion_model.", "unet")
        cols.append([sample(merged, int(seed) + r) for r in range(rows)])
        del merged, m_b
        if progress is not None:
            progress(len(cols))
    cells = [cols[c][r] for r in range(rows) for c in range(len(cols))]
    return cells, [lab for lab, _ in loaders]


@policy.guarded
class MergeStepsSweep:
    """Merge-with-trained-steps grid: model A merged at one α with each epoch/step checkpoint."""

    PATH_INPUTS = {"checkpoints": "lines"}

    DESCRIPTION = ("The 'merge with trained steps' grid: model A merged at one α with each of several checkpoints "
                   "of one training run (epoch / step saves), sampled with ComfyUI's own sampler. Columns = the "
                   "checkpoints in step order, rows = seeds. " + CONVENTION)
    CATEGORY = CATEGORY
    FUNCTION = "sweep"
    RETURN_TYPES = ("IMAGE", "IMAGE")
    RETURN_NAMES = ("grid", "images")
    OUTPUT_TOOLTIPS = ("One labelled grid: columns = checkpoints (step order), rows = seeds.",
                       "Every cell as a batch, row by row.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_a": ("MODEL", {"tooltip": "Model A (weight 1 − α), e.g. the base the run started from."}),
                "checkpoints": ("STRING", {"default": "", "multiline": True,
                                           "tooltip": "Checkpoint names from the checkpoints folder, one per "
                                                      "line (e.g. the epoch saves of one run); "
                                                      "sorted by the last number in each name."}),
                "alpha": ("FLOAT", {"default": 0.5, "min": -1.0, "max": 2.0, "step": 0.01,
                                    "tooltip": "Weight of each checkpoint. " + CONVENTION}),
                **sweep_sampling_inputs(),
            }
        }

    def sweep(self, model_a, checkpoints, alpha, positive, negative, vae, seed, rows, steps, cfg, sampler_name,
              scheduler, width, height):
        """Load each named checkpoint (UNet only, one at a time), merge it with A at ``alpha`` and sample ``rows``
        seeds. Returns ``(labelled grid IMAGE [1, H, W, 3], all images [N, h, w, 3])``. Raises ``ValueError`` for
        an empty list, more than 16 names or a name not in the checkpoints folder."""
        import comfy.sd

        names = _parse_names(checkpoints)
        paths = [(n, comfy_io.model_file("checkpoints", n)) for n in names]
        paths.sort(key=lambda np_: (step_label(np_[0])[0] is None, step_label(np_[0])[0] or 0, np_[0]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            check_alpha(alpha)

        def loader(path):
            return lambda: comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=False)[0]

        loaders = [(step_label(n)[1], loader(p)) for n, p in paths]
        bar = comfy_io.Progress(len(loaders))
        cells, labels = steps_sweep(
            model_a, loaders, alpha,
            lambda m, s: sample_cell(m, s, steps, cfg, sampler_name, scheduler, positive, negative, vae, width, height),
            rows, seed, progress=bar.set)
        grid = _label_grid(cells, rows, labels, [f"seed {int(seed) + r}" for r in range(rows)])
        return (grid, torch.cat(cells, dim=0))


NODE_CLASS_MAPPINGS = {
    "ConceptLabMergeModelsN": MergeModelsN,
    "ConceptLabMergeStepsSweep": MergeStepsSweep,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ConceptLabMergeModelsN": "Merge N Models (weights per model)",
    "ConceptLabMergeStepsSweep": "Merge With Trained Steps Grid (α = weight of each checkpoint)",
}
