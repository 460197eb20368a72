"""ComfyUI nodes for checkpoint merging (category "Concept Lab/Merge").

Convention on every node: **α is the weight of B** — ``(1 − α)·A + α·B`` (A1111 / supermerger / sd-mecha).
ComfyUI's core ``ModelMergeSimple`` is the opposite (its ``ratio`` 1.0 keeps model1): ratio = 1 − α.

* :class:`MergeModels` — in-graph: MODEL (+ CLIP) in, lazy merged clones out. Weighted sum and add difference
  are ComfyUI key patches of the other models (nothing is computed until sampling, like ModelMergeSimple);
  train difference, TIES, DARE and SLERP compute per-key deltas from the *patched* weights (so an upstream
  LoRA counts) and add them as ``("diff", (delta,))`` patches. Inputs are never mutated.
* :class:`MergeCheckpointFiles` — streaming file-to-file merge into ``output/checkpoints/``.
* :class:`MergeSweep` — weighted sums at several ratios, sampled with ComfyUI's own sampler, as a grid.

ComfyUI is imported only inside functions (via :mod:`.comfy_io` or locally), so the classes import without it.
"""

from __future__ import annotations

import math
import warnings

import torch

from ..training.merge.blocks import PRESETS, parse_block_weights
from ..training.merge.methods import (METHODS, METHODS_NEED_C, TIES_SIGNS, MergePlan, MethodOptions, canonical_key,
                                      check_alpha, merge_tensor)
from . import comfy_io, policy

CATEGORY = "Concept Lab/Merge"
CONVENTION = "α is the weight of B: (1 − α)·A + α·B (0 = A, 1 = B). ComfyUI's ModelMergeSimple ratio is the opposite: ratio = 1 − α."

_ALPHA = ("FLOAT", {"default": 0.5, "min": -1.0, "max": 2.0, "step": 0.01,
                    "tooltip": "Weight of model B. " + CONVENTION + " Values outside 0..1 extrapolate (warning)."})
_BLOCKS = ("STRING", {"default": "", "multiline": False,
                      "tooltip": "Optional per-block weights of B for the UNet (absolute values, α convention): "
                                 "a supermerger list BASE,IN00..IN11,M00,OUT00..OUT11 (26 values for SD1, 20 for "
                                 "SDXL), named entries like IN00=0.2,OUT05=1, or a preset scaled by α: "
                                 + ", ".join(PRESETS) + ". Empty = α everywhere."})
_METHOD = (list(METHODS), {"default": "weighted_sum",
                           "tooltip": "weighted_sum (1−α)A+αB; add_difference A+α(B−C); train_difference "
                                      "(supermerger); ties / dare / della over task vectors (base C, or A without "
                                      "C); slerp per tensor; model_stock (C = pre-trained base; α unused). "
                                      "Conventions vs sd-mecha / supermerger / mergekit: README 'Merge conventions'."})
_TIES_SIGN = (list(TIES_SIGNS), {"default": "sum",
                                 "tooltip": "TIES / DELLA sign election. sum: sign of the summed task vectors (the "
                                            "paper, mergekit; default). count: one vote per model (sd-mecha's "
                                            "default)."})
_SLERP_NORM = (["mergekit (raw tensors)", "sd-mecha (rescale norm)"],
               {"default": "mergekit (raw tensors)",
                "tooltip": "SLERP norm: Shoemake's formula on the raw tensors (mergekit; default), or slerp of the "
                           "directions given the linearly interpolated norm (sd-mecha)."})


def _options(ties_sign: str, slerp_norm: str) -> MethodOptions:
    return MethodOptions(ties_sign=ties_sign, slerp_rescale_norm=slerp_norm.startswith("sd-mecha"))
_DENSITY = ("FLOAT", {"default": 0.2, "min": 0.0, "max": 1.0, "step": 0.01,
                      "tooltip": "TIES: fraction of each task vector kept (top-k by magnitude). DARE: keep "
                                 "probability (drop rate = 1 − density). Ignored by other methods."})
_SEED = ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                 "tooltip": "DARE seed; masks are derived from seed + key name, so file and in-graph merges agree."})


def _key_patches(obj, prefix=None) -> dict:
    return obj.get_key_patches(prefix) if prefix is not None else obj.get_key_patches()


def _patched_weight(entry, key: str) -> torch.Tensor:
    """The weight of ``key`` with every patch already on it (float32), from a ``get_key_patches`` entry
    ``[(weight, convert_func), *patches]`` — the same computation ComfyUI does when it loads the model."""
    import comfy.lora

    weight, convert = entry[0]
    w = convert(weight.to(torch.float32, copy=True), inplace=True)
    if len(entry) > 1:
        w = comfy.lora.calculate_weight(entry[1:], w, key)
    return w


def _arch_of(patches: dict) -> str:
    from ..formats.keys import detect_architecture

    shapes = {k: tuple(v[0][0].shape) for k, v in patches.items()}
    return detect_architecture(list(patches), shapes)


def _check_same(name_a: str, kpa: dict, name_b: str, kpb: dict) -> None:
    arch_a, arch_b = _arch_of(kpa), _arch_of(kpb)
    if arch_a != arch_b:
        raise ValueError(f"{name_a} is {arch_a} but {name_b} is {arch_b}: models of different architectures "
                         "cannot be merged")
    bad = [k for k in kpa if k in kpb and tuple(kpa[k][0][0].shape) != tuple(kpb[k][0][0].shape)]
    if bad:
        raise ValueError(f"{name_a} and {name_b} have different shapes for {len(bad)} weights, e.g. {bad[0]} "
                         f"({list(kpa[bad[0]][0][0].shape)} vs {list(kpb[bad[0]][0][0].shape)})")


def merge_patchers(a, b, c, method: str, plan: MergePlan, density: float, seed: int, prefix: str | None,
                   component: str | None, skip=lambda k: False, progress=None, options: MethodOptions | None = None):
    """Merge ComfyUI patchers (ModelPatcher or CLIP) lazily; returns ``(clone of a, report lines)``.

    ``prefix`` filters keys (``"diffusion_model."`` for MODEL, ``None`` for CLIP); ``component`` forces the
    component for :meth:`MergePlan.weight_for` (``"te"`` for CLIP). Keys only in A stay A; keys only in B/C
    are ignored (ComfyUI's add_patches drops unknown keys); a key missing in C is left as A for add/train
    difference and merged on base A for TIES/DARE — the file merge's rules.
    """
    kpa, kpb = _key_patches(a, prefix), _key_patches(b, prefix)
    kpc = _key_patches(c, prefix) if c is not None else None
    _check_same("model A", kpa, "model B", kpb)
    if kpc is not None:
        _check_same("model A", kpa, "model C", kpc)
    m = a.clone()
    keys = [k for k in kpa if not skip(k)]
    lines = []
    only_a = [k for k in keys if k not in kpb]
    if only_a:
        lines.append(f"{len(only_a)} weights only in A (kept from A), e.g. {only_a[0]}")
    total = max(len(keys), 1)
    for i, k in enumerate(keys):
        if k not in kpb:
            continue
        w = plan.weight_for(k, component)
        if w is None:
            continue
        if method == "weighted_sum":
            m.add_patches({k: kpb[k]}, w, 1.0 - w)          # A·(1 − w) + w·B, B with its own patches
        elif method == "add_difference":
            if k not in kpc:
                continue
            m.add_patches({k: kpb[k]}, w, 1.0)               # A + w·B
            m.add_patches({k: kpc[k]}, -w, 1.0)              # − w·C
        else:
            if method in METHODS_NEED_C and k not in kpc:
                continue
            wa = _patched_weight(kpa[k], k)
            wb = _patched_weight(kpb[k], k)
            wc = _patched_weight(kpc[k], k) if (kpc is not None and k in kpc) else None
            merged = merge_tensor(method, canonical_key(k), wa, wb, wc, w, density=density, seed=seed,
                                  options=options)
            delta = (merged - wa).to(device="cpu", dtype=kpa[k][0][0].dtype)
            m.add_patches({k: ("diff", (delta,))}, 1.0, 1.0)
        if progress is not None:
            progress(i + 1, total)
    return m, lines


def _clip_skip(k: str) -> bool:
    return k.endswith(".position_ids") or k.endswith(".logit_scale")


@policy.guarded
class MergeModels:
    """In-graph merge of MODEL (and optionally CLIP) inputs; α is B's weight."""

    DESCRIPTION = ("Merge two (or three) models in the graph without saving: weighted sum, add difference, train "
                   "difference, TIES, DARE, DELLA, SLERP or Model Stock, optionally per UNet block (blocks as in "
                   "supermerger / sd-mecha). " + CONVENTION + " The outputs "
                   "are patched clones; the inputs are never changed and LoRAs applied upstream are included.")
    CATEGORY = CATEGORY
    FUNCTION = "merge"
    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("model", "clip", "report")
    OUTPUT_TOOLTIPS = ("Merged model (a patched clone of model A).",
                       "Merged text encoder (clone of clip A; None when clip A is not connected).",
                       "What was merged, and any warnings.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_a": ("MODEL", {"tooltip": "Model A (weight 1 − α). Its patches (e.g. LoRAs) are kept."}),
                "model_b": ("MODEL", {"tooltip": "Model B (weight α)."}),
                "method": _METHOD,
                "alpha": _ALPHA,
                "block_weights": _BLOCKS,
                "density": _DENSITY,
                "seed": _SEED,
            },
            "optional": {
                "model_c": ("MODEL", {"tooltip": "Model C: the base for add_difference / train_difference "
                                                 "(required there) and TIES / DARE task vectors (optional)."}),
                "clip_a": ("CLIP", {"tooltip": "Text encoder of A; connect clip_a and clip_b to merge text encoders."}),
                "clip_b": ("CLIP", {"tooltip": "Text encoder of B."}),
                "clip_c": ("CLIP", {"tooltip": "Text encoder of C (for methods that use C)."}),
                "text_encoder": (["merge (BASE weight)", "merge (te_alpha)", "from A"],
                                 {"default": "merge (BASE weight)",
                                  "tooltip": "How the text encoder is merged: with the BASE block weight (α when "
                                             "no block weights), with te_alpha, or taken from A unchanged."}),
                "te_alpha": ("FLOAT", {"default": 0.5, "min": -1.0, "max": 2.0, "step": 0.01,
                                       "tooltip": "Weight of B for the text encoder when text_encoder = "
                                                  "'merge (te_alpha)'. " + CONVENTION}),
                "ties_sign": _TIES_SIGN,
                "slerp_norm": _SLERP_NORM,
            },
        }

    def merge(self, model_a, model_b, method, alpha, block_weights, density, seed, model_c=None, clip_a=None,
              clip_b=None, clip_c=None, text_encoder="merge (BASE weight)", te_alpha=0.5, ties_sign="sum",
              slerp_norm="mergekit (raw tensors)"):
        """Merge MODEL (and CLIP) inputs lazily: α is the weight of B, ``(1 − α)·A + α·B`` (ModelMergeSimple's
        ratio = 1 − α). Weighted sum / add difference become key patches; TIES, DARE, SLERP and train difference become
        ``diff`` patches computed from the patched weights. Inputs are never mutated. Returns ``(MODEL, CLIP, report
        STRING)``. Raises ``ValueError`` for a missing ``model_c`` where the method needs one, different
        architectures or shapes; warns (in the report) for α outside [0, 1].
        """
        lines = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            check_alpha(alpha)
            if method in METHODS_NEED_C and model_c is None:
                raise ValueError(f"{method} needs model_c (the base model B was trained from)")
            opts = _options(ties_sign, slerp_norm)
            arch = _arch_of(_key_patches(model_a, "diffusion_model."))
            bw = parse_block_weights(block_weights, arch, alpha) if block_weights.strip() else None
            te_mode = "a" if text_encoder == "from A" else "merge"
            plan = MergePlan(arch=arch, alpha=float(alpha), block_weights=bw, te=te_mode,
                             te_alpha=float(te_alpha) if text_encoder == "merge (te_alpha)" else None)
        lines += [f"warning: {w.message}" for w in caught]
        n_clip = 0
        if clip_a is not None and clip_b is not None and te_mode == "merge":
            n_clip = len(_key_patches(clip_a))
        n_model = len(_key_patches(model_a, "diffusion_model."))
        bar = comfy_io.Progress(n_model + n_clip)
        m, extra = merge_patchers(model_a, model_b, model_c, method, plan, density, seed, "diffusion_model.",
                                  "unet", progress=lambda d, t: bar.set(d), options=opts)
        lines += extra
        clip_out = clip_a
        if clip_a is not None and clip_b is not None and te_mode == "merge":
            if method in METHODS_NEED_C and clip_c is None:
                lines.append("text encoder taken from A: connect clip_c for " + method)
            else:
                clip_out, extra = merge_patchers(clip_a, clip_b, clip_c, method, plan, density, seed, None, "te",
                                                 skip=_clip_skip, progress=lambda d, t: bar.set(n_model + d),
                                                 options=opts)
                lines += extra
        elif clip_a is not None and clip_b is None and te_mode == "merge":
            lines.append("text encoder taken from A (clip_b not connected)")
        weights = "per block " + bw.source if bw is not None else f"α = {float(alpha):g}"
        lines.insert(0, f"{method} ({arch}), {weights}; convention: α = weight of B")
        return (m, clip_out, "\n".join(lines))


@policy.guarded
class MergeCheckpointFiles:
    """Streaming file-to-file merge into output/checkpoints/."""

    PATH_INPUTS = {"filename": "subfolders"}

    DESCRIPTION = ("Merge checkpoint files tensor by tensor (constant memory) into ComfyUI's output/checkpoints/ "
                   "folder, with the recipe (method, parameters, input hashes) in the file's metadata; can also "
                   "bake a LoRA. " + CONVENTION)
    CATEGORY = CATEGORY
    FUNCTION = "merge"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("checkpoint_name", "report")
    OUTPUT_TOOLTIPS = ("File name under output/checkpoints/ (listed by Load Checkpoint after a refresh).",
                       "What was merged, and any warnings.")

    @classmethod
    def INPUT_TYPES(cls):
        _register_output_checkpoints()
        ckpts = comfy_io.model_list("checkpoints")
        loras = comfy_io.model_list("loras")
        return {
            "required": {
                "ckpt_a": (ckpts, {"tooltip": "Checkpoint A (weight 1 − α); the output has A's keys."}),
                "ckpt_b": (["none"] + ckpts, {"tooltip": "Checkpoint B (weight α); 'none' with a LoRA bakes the "
                                                         "LoRA into A."}),
                "method": _METHOD,
                "alpha": _ALPHA,
                "block_weights": _BLOCKS,
                "density": _DENSITY,
                "seed": _SEED,
                "dtype": (["fp16", "bf16", "fp32"], {"default": "fp16", "tooltip": "Dtype of the saved weights."}),
                "text_encoder": (["merge", "from A"], {"default": "merge",
                                                        "tooltip": "Merge the text encoder with the BASE weight, or "
                                                                   "take it from A."}),
                "vae": (["from A", "merge"], {"default": "from A",
                                               "tooltip": "Take the VAE from A (default), or merge it with the "
                                                          "BASE weight (what A1111, supermerger and sd-mecha do)."}),
                "filename": ("STRING", {"default": "merged",
                                        "tooltip": "Output name in output/checkpoints/ (.safetensors is added)."}),
                "overwrite": ("BOOLEAN", {"default": False,
                                          "tooltip": "Replace an existing file of that name (otherwise an error)."}),
            },
            "optional": {
                "ckpt_c": (["none"] + ckpts, {"tooltip": "Checkpoint C: base for add/train difference (required) "
                                                         "and TIES/DARE (optional)."}),
                "lora_name": (["none"] + loras, {"tooltip": "A LoRA to bake into the result."}),
                "lora_strength": ("FLOAT", {"default": 1.0, "min": -4.0, "max": 4.0, "step": 0.01,
                                            "tooltip": "Strength of the baked LoRA."}),
                "ties_sign": _TIES_SIGN,
                "slerp_norm": _SLERP_NORM,
            },
        }

    def merge(self, ckpt_a, ckpt_b, method, alpha, block_weights, density, seed, dtype, text_encoder, vae, filename,
              overwrite, ckpt_c="none", lora_name="none", lora_strength=1.0, ties_sign="sum",
              slerp_norm="mergekit (raw tensors)"):
        """Stream-merge checkpoint files from ComfyUI's checkpoints list into ``output/checkpoints/<filename>``.

        Same α convention as Merge Models; ``dtype`` fp16/bf16/fp32 of the output; the recipe (method, parameters, input
        names and SHA-256) goes into the file's metadata. Returns ``(checkpoint name as listed by Load Checkpoint, report
        STRING)``. Raises ``ValueError`` for an empty name or bad settings, ``FileExistsError`` when the file exists and
        ``overwrite`` is off; on any error or cancel no partial file is left.
        """
        from ..training.merge.files import merge_checkpoints

        name = (filename or "").strip()
        if not name:
            raise ValueError("filename is empty")
        if not name.lower().endswith(".safetensors"):
            name += ".safetensors"
        out = comfy_io.output_file("checkpoints", name)
        a = comfy_io.model_file("checkpoints", ckpt_a)
        b = comfy_io.model_file("checkpoints", ckpt_b) if ckpt_b != "none" else None
        c = comfy_io.model_file("checkpoints", ckpt_c) if ckpt_c and ckpt_c != "none" else None
        lora = comfy_io.model_file("loras", lora_name) if lora_name and lora_name != "none" else None
        if b is None and lora is None:
            raise ValueError("choose checkpoint B, or a LoRA to bake into A")
        bar = {"p": None}

        def progress(done, total):
            if bar["p"] is None:
                bar["p"] = comfy_io.Progress(total)
            bar["p"].set(done)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = merge_checkpoints(
                a, b, out, c=c, method=method, alpha=alpha, block_weights=block_weights.strip() or None,
                density=density, seed=seed, dtype=dtype, te="a" if text_encoder == "from A" else "merge",
                vae="merge" if vae == "merge" else "a", lora=lora, lora_strength=lora_strength,
                overwrite=overwrite, options=_options(ties_sign, slerp_norm), progress=progress)
        _register_output_checkpoints()
        rel = out.relative_to(comfy_io.output_dir() / "checkpoints").as_posix()
        return {"ui": {"text": [report.summary()]}, "result": (rel, report.summary())}


def _register_output_checkpoints() -> None:
    """Add output/checkpoints/ to ComfyUI's checkpoint search paths so merged files appear in Load Checkpoint."""
    try:
        import folder_paths

        d = comfy_io.output_dir() / "checkpoints"
        d.mkdir(parents=True, exist_ok=True)
        folder_paths.add_model_folder_path("checkpoints", str(d))
    except Exception:  # noqa: BLE001 - outside ComfyUI (contract checks)
        pass


def _parse_ratios(text: str) -> list[float]:
    vals = []
    for part in str(text).replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            vals.append(float(part))
            if not math.isfinite(vals[-1]):
                raise ValueError
        except ValueError:
            raise ValueError(f"ratio {part!r} is not a number (use a list like 0, 0.25, 0.5, 0.75, 1)") from None
    if not vals:
        raise ValueError("no ratios given (use a list like 0, 0.25, 0.5, 0.75, 1)")
    if len(vals) > 32:
        raise ValueError(f"{len(vals)} ratios: at most 32 per sweep")
    return vals


def sweep_sampling_inputs() -> dict:
    """The sampling widgets every sweep-grid node shares (prompts, VAE, seeds/rows, steps, cfg, sampler, size)."""
    samplers, schedulers = sampler_choices()
    return {
        "positive": ("CONDITIONING", {"tooltip": "Positive prompt conditioning (same for every cell)."}),
        "negative": ("CONDITIONING", {"tooltip": "Negative prompt conditioning."}),
        "vae": ("VAE", {"tooltip": "VAE to decode the samples."}),
        "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                         "tooltip": "First seed; row r uses seed + r."}),
        "rows": ("INT", {"default": 1, "min": 1, "max": 16, "tooltip": "Number of seeds (grid rows)."}),
        "steps": ("INT", {"default": 20, "min": 1, "max": 200, "tooltip": "Sampling steps per cell."}),
        "cfg": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 30.0, "step": 0.1, "tooltip": "CFG scale."}),
        "sampler_name": (samplers, {"tooltip": "ComfyUI sampler."}),
        "scheduler": (schedulers, {"tooltip": "ComfyUI scheduler."}),
        "width": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8, "tooltip": "Image width (px)."}),
        "height": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8, "tooltip": "Image height (px)."}),
    }


def sample_cell(model, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str, positive, negative,
                vae, width: int, height: int) -> torch.Tensor:
    """One image ``[1, H, W, 3]`` float in [0, 1] from ComfyUI's own sampler (``comfy.sample.sample``) and the VAE;
    a cancel point every sampler step (ComfyUI's sampler checks none itself)."""
    import comfy.sample

    latent = torch.zeros([1, 4, height // 8, width // 8], device="cpu")
    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    noise = comfy.sample.prepare_noise(latent, seed)
    samples = comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                                  denoise=1.0, disable_pbar=True, seed=seed,
                                  callback=lambda *_: comfy_io.check_interrupt())
    img = vae.decode(samples)
    if img.dim() == 5:
        img = img.reshape(-1, *img.shape[-3:])
    return img[:1].float().cpu()


def sampler_choices() -> tuple[list[str], list[str]]:
    """ComfyUI's sampler and scheduler names (``comfy.samplers.KSampler``), or ``["euler"], ["normal"]`` when
    ComfyUI is not importable (contract checks without ComfyUI)."""
    try:
        import comfy.samplers
    except ImportError:
        return ["euler"], ["normal"]
    return comfy.samplers.KSampler.SAMPLERS, comfy.samplers.KSampler.SCHEDULERS


@policy.guarded
class MergeSweep:
    """Weighted-sum ratio sweep rendered with ComfyUI's sampler into one labelled grid."""

    DESCRIPTION = ("Sample the weighted sum of two models at several ratios with ComfyUI's own sampler and lay the "
                   "images out as a labelled grid: columns = α (weight of B), rows = seeds. " + CONVENTION)
    CATEGORY = CATEGORY
    FUNCTION = "sweep"
    RETURN_TYPES = ("IMAGE", "IMAGE")
    RETURN_NAMES = ("grid", "images")
    OUTPUT_TOOLTIPS = ("One labelled grid: columns = ratios α (weight of B), rows = seeds.",
                       "Every cell as a batch, row by row.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_a": ("MODEL", {"tooltip": "Model A (α = 0)."}),
                "model_b": ("MODEL", {"tooltip": "Model B (α = 1)."}),
                "ratios": ("STRING", {"default": "0, 0.25, 0.5, 0.75, 1",
                                      "tooltip": "Comma list of α values, one column each. " + CONVENTION}),
                **sweep_sampling_inputs(),
            }
        }

    def sweep(self, model_a, model_b, ratios, positive, negative, vae, seed, rows, steps, cfg, sampler_name,
              scheduler, width, height):
        """Sample with ComfyUI's own sampler at each α of ``ratios`` (comma list, α = weight of B) and ``rows`` seeds.

        Returns ``(labelled grid IMAGE [1, H, W, 3] with columns = α and rows = seeds, all images [N, h, w, 3])``.
        Progress per cell, cancellable. Raises ``ValueError`` for an unparseable or empty ratio list.
        """
        alphas = _parse_ratios(ratios)
        for a in alphas:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                check_alpha(a)
        bar = comfy_io.Progress(len(alphas) * rows)
        cells = []  # row-major
        arch = _arch_of(_key_patches(model_a, "diffusion_model."))
        models = []
        for a in alphas:
            plan = MergePlan(arch=arch, alpha=float(a))
            m, _ = merge_patchers(model_a, model_b, None, "weighted_sum", plan, 0.0, 0, "diffusion_model.", "unet")
            models.append(m)
        for r in range(rows):
            s = int(seed) + r
            for m in models:
                cells.append(sample_cell(m, s, steps, cfg, sampler_name, scheduler, positive, negative, vae, width,
                                         height))
                bar.update(1)
        grid = _label_grid(cells, rows, [f"α={a:g}" for a in alphas], [f"seed {int(seed) + r}" for r in range(rows)])
        return (grid, torch.cat(cells, dim=0))


def _label_grid(cells: list, rows: int, col_labels: list[str], row_labels: list[str]) -> torch.Tensor:
    """Lay IMAGE cells ``[1,H,W,3]`` (row-major) on a white canvas with column / row labels → IMAGE ``[1,H',W',3]``."""
    from PIL import Image, ImageDraw

    arrs = comfy_io.image_to_numpy(torch.cat(cells, dim=0))
    h, w = arrs[0].shape[:2]
    cols = len(col_labels)
    top, left, pad = 28, 90, 4
    canvas = Image.new("RGB", (left + cols * (w + pad), top + rows * (h + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for ci, lab in enumerate(col_labels):
        draw.text((left + ci * (w + pad) + 4, 8), lab, fill="black")
    for ri, lab in enumerate(row_labels):
        draw.text((6, top + ri * (h + pad) + h // 2 - 6), lab, fill="black")
    for i, arr in enumerate(arrs):
        ri, ci = divmod(i, cols)
        canvas.paste(Image.fromarray(arr), (left + ci * (w + pad), top + ri * (h + pad)))
    import numpy as np

    return comfy_io.numpy_to_image([np.asarray(canvas)])


NODE_CLASS_MAPPINGS = {
    "ConceptLabMergeModels": MergeModels,
    "ConceptLabMergeCheckpointFiles": MergeCheckpointFiles,
    "ConceptLabMergeSweep": MergeSweep,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ConceptLabMergeModels": "Merge Models (α = weight of B)",
    "ConceptLabMergeCheckpointFiles": "Merge Checkpoint Files (α = weight of B)",
    "ConceptLabMergeSweep": "Merge Ratio Sweep Grid (α = weight of B)",
}
