"""ComfyUI nodes for ESD concept erasure: grid masks, the eraser, and an original-vs-erased comparison grid.

Thin adapters over :mod:`conceptlab.training.esd.erase` (the loop), :mod:`conceptlab.training.esd.masks`,
:mod:`conceptlab.training.esd.outputs` (files, plots, grids), :mod:`.comfy_host` (ComfyHost), :mod:`.comfy_patchers`
(diff patches, sampling) and :mod:`.comfy_io` (safe output paths, progress). ComfyUI is imported only inside functions.
"""

from __future__ import annotations

import json

import torch

from . import policy

CATEGORY = "Concept Lab/ESD"
_METHODS = ["esd-x", "esd-x-strict", "esd-u", "esd-all"]
_MASK_MODES = ["sum", "sample", "grid-sum", "grid-sample"]
_KINDS = ["auto", "style", "object", "person", "attribute", "explicit"]
_SOURCES = ["self_sample", "noised"]
_DEFAULT_UNRELATED = "a photo of a cat on a sofa\na mountain lake at sunrise\na portrait of an old fisherman"


def _samplers() -> tuple[list[str], list[str]]:
    try:
        import comfy.samplers

        return list(comfy.samplers.KSampler.SAMPLERS), list(comfy.samplers.KSampler.SCHEDULERS)
    except ImportError:  # contract checks outside ComfyUI
        return ["euler", "euler_ancestral", "dpmpp_2m", "ddim"], ["normal", "karras", "simple"]


def _next_free(folder, stem: str, suffix: str = ".safetensors", claim_root=None):
    """The first free ``<stem>_NNNNN<suffix>`` in ``folder``; with ``claim_root`` the number is claimed by an
    atomic ``mkdir`` of ``claim_root/<stem>_NNNNN`` (the run's stats folder), so concurrent runs never share it."""
    i = 1
    while True:
        cand = folder / f"{stem}_{i:05d}{suffix}"
        if not cand.exists():
            if claim_root is None:
                return cand
            try:
                (claim_root / cand.stem).mkdir(parents=True)
                return cand
            except FileExistsError:
                pass
        i += 1


@policy.guarded
class ConceptLabGridMasks:
    """N×N grid masks plus a centre mask, with weights, for the ESD eraser's masked loss."""

    DESCRIPTION = ("Makes the masks the ESD eraser averages its loss over: an N×N grid of cells that tile the "
                   "image exactly, plus a centre mask. Weights default to favouring the centre and small masks "
                   "(and are normalised to sum 1). Edit the MASK batch or the weights, or pass your own masks.")
    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = ("MASK", "IMAGE", "STRING")
    RETURN_NAMES = ("masks", "preview", "weights")
    OUTPUT_TOOLTIPS = ("The masks as a MASK batch [M, H, W] (grid cells first, then the centre mask).",
                       "A picture of every mask with its weight.",
                       "The normalised weights, comma-separated, in mask order (feed to the eraser).")

    @classmethod
    def INPUT_TYPES(cls):
        """ComfyUI V1 input spec: ``{"required": {...}, "optional": {...}}`` with a tooltip on every input."""
        return {"required": {
            "width": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8,
                              "tooltip": "Mask width in pixels: use the eraser's training resolution."}),
            "height": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8,
                               "tooltip": "Mask height in pixels: use the eraser's training resolution."}),
            "grid_n": ("INT", {"default": 3, "min": 1, "max": 8,
                               "tooltip": "Cells per side of the grid (3 gives 9 cells)."}),
            "centre_size": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05,
                                      "tooltip": "Side of the centre mask as a fraction of the image side; "
                                                 "0 = no centre mask."}),
            "weights": ("STRING", {"default": "", "multiline": False,
                                   "tooltip": "Optional per-mask weights, comma-separated in mask order "
                                              "(cells row by row, then centre). Empty = defaults favouring the "
                                              "centre and small masks."}),
        }}

    def build(self, width, height, grid_n, centre_size, weights=""):
        """Grid + centre masks of ``height`` × ``width`` px (:func:`conceptlab.training.esd.masks.grid_masks`).

        Returns ``(MASK [M, H, W] float 0/1, preview IMAGE [1, H', W', 3], weights STRING)`` with M = grid_n² (+1
        with a centre mask); weights are normalised to sum 1. Raises ``ValueError`` for bad weights (count,
        negative or non-numeric values; see :func:`conceptlab.training.esd.masks.normalize_weights`).
        """
        from ..training.esd.masks import grid_masks, mask_preview, normalize_weights, parse_weights
        from .comfy_io import numpy_to_image

        masks, names = grid_masks(int(height), int(width), int(grid_n), float(centre_size))
        w = normalize_weights(parse_weights(weights), masks)
        preview = numpy_to_image(mask_preview(masks, w, names))
        return masks, preview, ", ".join(f"{x:.4f}" for x in w.tolist())


@policy.guarded
class ConceptLabESDErase:
    """Erase a concept from a model with ESD (cross-attention by default), returning the erased MODEL and a file."""

    PATH_INPUTS = {"save_name": "optional"}
    VALIDATE_ALSO = ("variations",)  # the prompt count needs it at validation time

    @staticmethod
    def check_inputs(values: dict) -> None:
        """Widget checks beyond min/max: the prompt count (concepts × variations) before anything is expanded."""
        if isinstance(values.get("concepts"), str) and values["concepts"].strip():
            _check_prompt_count(values["concepts"], values.get("prompt_variations") or "",
                                int(values.get("variations", 0) or 0))

    DESCRIPTION = ("Erases a concept (an artist's style, an object) from the model with ESD (Gandikota et al., "
                   "ICCV 2023): the model is fine-tuned so that prompting the concept gives the original model's "
                   "negatively guided prediction. Trains only small deltas on one model copy; the input MODEL is "
                   "never changed. Outputs the erased MODEL and saves a file to output/loras/ that any LoRA "
                   "loader applies with a strength (strength 1 = the erased model).")
    CATEGORY = CATEGORY
    FUNCTION = "erase"
    RETURN_TYPES = ("MODEL", "STRING", "IMAGE", "STRING")
    RETURN_NAMES = ("model", "file_name", "loss_plot", "stats")
    OUTPUT_TOOLTIPS = ("The erased model (a clone of the input with the trained changes as patches).",
                       "The saved file, relative to the loras folder (empty if saving is off).",
                       "Loss per iteration with its moving average.",
                       "Training statistics as JSON (loss, mask and prompt usage, speed, parameter counts).")

    @classmethod
    def INPUT_TYPES(cls):
        """ComfyUI V1 input spec: ``{"required": {...}, "optional": {...}}`` with a tooltip on every input."""
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model to erase the concept from (SD1.x / SD2.x / SDXL base: SDXL 1.0, Illustrious, NoobAI eps or v-pred, Pony; Flux.1 dev / schnell)."}),
                "clip": ("CLIP", {"tooltip": "The model's text encoder, used to encode the prompts."}),
                "concepts": ("STRING", {"default": "Van Gogh", "multiline": True,
                                        "tooltip": "Concept(s) to erase: one per line or separated by ';'."}),
                "prompt_variations": ("STRING", {
                    "default": "", "multiline": True,
                    "tooltip": "Optional prompts, one per line; they always win over the built-in ones. Lines "
                               "with {concept} (and {subject}, {medium}, {title}, {adjective}, {setting}, "
                               "{shot}, {lighting}, {action}, {carrier}) are templates expanded to "
                               "'variations' prompts; plain lines are used as written. Empty = the built-in "
                               "templates of the concept's kind ('variations' > 0) or the bare concept (0, "
                               "as in the paper)."}),
                "variations": ("INT", {"default": 100, "min": 0, "max": 2000,
                                       "tooltip": "Prompt variations generated per concept (0 = the bare "
                                                  "concept only, the paper's setting)."}),
                "method": (_METHODS, {"default": "esd-x",
                                      "tooltip": "Which weights change (the reference esd_sd.py's sets): "
                                                 "esd-x = all cross-attention (style erasure, the paper's "
                                                 "choice for artists); esd-x-strict = cross-attention "
                                                 "keys/values only; esd-u = every Linear/Conv outside "
                                                 "cross-attention (objects/nudity; esd_sd.py's set, not the "
                                                 "paper's noxattn; needs much more memory); esd-all = every "
                                                 "Linear/Conv (most memory). Flux: esd-x = the double "
                                                 "blocks' text attention (txt_attn.qkv + txt_attn.proj, 717 M "
                                                 "parameters on Flux.1-dev); esd-x-strict = its key/value rows "
                                                 "(359 M); esd-u / esd-all = the other / all block Linears."}),
                "xt_source": (_SOURCES, {"default": "self_sample",
                                         "tooltip": "self_sample = as esd_sd.py: partial samples of the concept "
                                                    "from the original model (DDIM here, PNDM there; slower). "
                                                    "noised = forward-noised "
                                                    "cached samples at random timesteps: a different, cheaper "
                                                    "method; compare before relying on it."}),
                "negative_guidance": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 20.0, "step": 0.1,
                                                "tooltip": "η in the paper's convention (1.0 = the paper). The "
                                                           "reference esd_sd.py's --negative_guidance is η + 1."}),
                "iterations": ("INT", {"default": 1000, "min": 1, "max": 100000,
                                       "tooltip": "Training iterations (paper: 1000)."}),
                "lr": ("FLOAT", {"default": 1e-5, "min": 1e-8, "max": 1e-2, "step": 1e-6, "round": False,
                                 "tooltip": "Adam learning rate (paper: 1e-5)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF,
                                 "tooltip": "Seed for noise, timesteps, prompt and mask choice: same seed, same "
                                            "result."}),
                "resolution": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 64,
                                       "tooltip": "Training resolution in pixels (square; paper: 512)."}),
                "start_guidance": ("FLOAT", {"default": 3.0, "min": 1.0, "max": 20.0, "step": 0.5,
                                             "tooltip": "CFG scale used to sample the concept for x_t (paper: 3). Flux-dev: "
                                                        "the distilled guidance of that sampling (no CFG)."}),
                "ddim_steps": ("INT", {"default": 50, "min": 2, "max": 200,
                                       "tooltip": "DDIM steps of the sampling trajectory (paper: 50). Flux: Euler "
                                                  "steps on Flux's shifted schedule."}),
                "prompt_order": (["cycle", "sample"], {"default": "cycle",
                                                       "tooltip": "Use prompts in turn, or pick one at random "
                                                                  "each iteration."}),
                "mask_mode": (_MASK_MODES, {"default": "sum",
                                            "tooltip": "Loss masks. sum = every connected mask each iteration "
                                                       "(weighted sum of masked losses: the same expected "
                                                       "gradient as sample, without its sampling noise); sample "
                                                       "= one weighted-random connected mask per iteration; "
                                                       "with no masks connected both use the whole image (the "
                                                       "paper). grid-sum / grid-sample = one-click presets that "
                                                       "build the 3x3 grid + centre masks themselves (leave "
                                                       "'masks' unconnected)."}),
                "save_name": ("STRING", {"default": "esd/erased",
                                         "tooltip": "File name prefix inside output/loras/ (a counter is "
                                                    "added). Empty = do not save a file."}),
                "lora_rank": ("INT", {"default": 0, "min": 0, "max": 1024,
                                      "tooltip": "Also save a low-rank LoRA (SVD) of this rank for A1111/Forge; "
                                                 "0 = no. The energy kept is in the stats."}),
                "save_dtype": (["float16", "bfloat16", "float32"], {"default": "float16",
                                                                    "tooltip": "Precision of the saved file."}),
                "save_on_cancel": ("BOOLEAN", {"default": True,
                                               "tooltip": "If you press Cancel, still save what was trained so "
                                                          "far."}),
                "concept_kind": (_KINDS, {"default": "auto",
                                          "tooltip": "What the concept is, to phrase the prompt variations: "
                                                     "style (artist/art style), object, person (or character), "
                                                     "attribute, explicit. auto: erase_from set = attribute; "
                                                     "nudity/nsfw words = explicit; 'style'/'art' words or a "
                                                     "capitalised name = style; else object. The kind used is "
                                                     "in the stats and metadata.json."}),
                "erase_from": ("STRING", {"default": "", "multiline": True,
                                          "tooltip": "Attribute erasure (esd_sd.py --erase_from): erase the "
                                                     "concept from this scene, e.g. concept 'cowboy hat', erase "
                                                     "from 'a cowboy'. Samples are drawn from this prompt and "
                                                     "the model keeps the scene while losing the attribute. "
                                                     "Several lines pair with the prompts in turn. Empty = off."}),
            },
            "optional": {
                "masks": ("MASK", {"tooltip": "Optional loss masks (e.g. from Grid Masks) at the training "
                                              "resolution or any size with the same aspect ratio. Without masks "
                                              "the loss covers the whole image (the paper)."}),
                "flux_guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0, "step": 0.1,
                                            "tooltip": "Flux-dev only: the distilled guidance (as in FluxGuidance) "
                                                       "of the original and erased predictions; use the guidance "
                                                       "you sample with. SD models and Flux schnell have no "
                                                       "guidance embedding: leave it at 3.5."}),
                "mask_weights": ("STRING", {"default": "", "forceInput": True,
                                            "tooltip": "Weights for the masks, comma-separated (e.g. the Grid "
                                                       "Masks 'weights' output). Empty = defaults."}),
                "gradient_checkpointing": ("BOOLEAN", {"default": True,
                                                       "tooltip": "Recompute each UNet/DiT block in backward "
                                                                  "instead of keeping its activations (and, with "
                                                                  "bf16/fp8-stored weights, its up-cast weights): "
                                                                  "the same result with much less memory (full-size "
                                                                  "SDXL on a CPU: needed to fit in 24 GB), one extra "
                                                                  "forward per iteration."}),
                "step_in_backward": ("BOOLEAN", {"default": False,
                                                 "tooltip": "Apply Adam to each trained tensor as soon as its "
                                                            "gradient is ready and free that gradient, so the "
                                                            "gradients of all tensors are never held at once: the "
                                                            "same updates, one fp32 copy of the trained tensors "
                                                            "less memory (2.2 GB for ESD-x on SDXL). The NaN guard "
                                                            "then skips only the tensors whose gradient is bad."}),
            },
        }

    def erase(self, model, clip, concepts, prompt_variations, variations, method, xt_source, negative_guidance,
              iterations, lr, seed, resolution, start_guidance, ddim_steps, prompt_order, mask_mode, save_name,
              lora_rank, save_dtype, save_on_cancel, concept_kind="auto", erase_from="", masks=None,
              mask_weights="", flux_guidance=3.5, gradient_checkpointing=True, step_in_backward=False):
        """Run :func:`conceptlab.training.esd.erase.erase` on a clone of ``model`` (Gandikota et al. 2023, ICCV).

        ``resolution`` in px (square); ``masks`` MASK ``[M, H, W]`` with ``mask_weights`` text, or a ``grid-*``
        ``mask_mode`` preset; ``concept_kind`` picks the prompt templates; ``erase_from`` (non-empty) turns on
        attribute erasure (esd_sd.py's ``--erase_from``); ``flux_guidance``: Flux-dev's distilled guidance of the
        predictions (``ESDConfig.guidance_scale``; refused when changed from 3.5 on a model without a guidance
        embedding); ``gradient_checkpointing`` / ``step_in_backward``: the :class:`ESDConfig` fields. Saves
        ``output/loras/<save_name>_NNNNN.safetensors`` (+ optional SVD LoRA of ``lora_rank``) and the JSON / plot
        under ``output/esd/`` unless ``save_name`` is empty. Returns ``(MODEL, file name relative to loras/,
        loss-plot IMAGE [1, H, W, 3], stats JSON)``.

        Raises ``ValueError`` for bad settings before training starts (:meth:`ESDConfig.validate`, output path
        outside the output folder), ``FloatingPointError`` when training diverges, and re-raises ComfyUI's
        interrupt after saving the partial result when ``save_on_cancel`` is set.
        """
        from PIL import Image

        from ..formats.safetensors_io import atomic_output, parse_dtype
        from ..training.esd.config import ESDConfig
        from ..training.esd.erase import ESDCancelled, erase
        from ..training.esd.outputs import loss_plot, save_outputs
        from ..training.esd.masks import parse_weights
        from . import comfy_io
        from .comfy_host import ComfyHost
        from .comfy_patchers import add_diff_patches

        cfg = ESDConfig(
            concepts=concepts, prompts=prompt_variations or None, variations=int(variations),
            prompt_order=prompt_order, method=method, xt_source=xt_source,
            negative_guidance=float(negative_guidance), iterations=int(iterations), lr=float(lr),
            width=int(resolution), height=int(resolution), start_guidance=float(start_guidance),
            ddim_steps=int(ddim_steps), masks=masks, mask_weights=parse_weights(mask_weights) if masks is not None
            else None, mask_mode=mask_mode, seed=int(seed), concept_kind=concept_kind,
            erase_from=erase_from if (erase_from or "").strip() else None,
            gradient_checkpointing=bool(gradient_checkpointing), step_in_backward=bool(step_in_backward))
        cfg.validate()
        _check_prompt_count(concepts, prompt_variations, int(variations))
        save_name = (save_name or "").strip()
        target = None
        if save_name:  # resolve (and check) the output path before hours of training
            stem_rel = save_name[:-len(".safetensors")] if save_name.endswith(".safetensors") else save_name
            first = comfy_io.output_file("loras", stem_rel + ".safetensors")
            target = _next_free(first.parent, first.stem, claim_root=comfy_io.output_file("esd", "x").parent)

        bar = comfy_io.Progress(int(iterations))

        def progress(info):
            preview = None
            if info["iteration"] % 50 == 0 or info["iteration"] == info["total"]:
                preview = Image.fromarray(loss_plot(info["losses"], f"ESD {method}: {info['iteration']}/"
                                                                    f"{info['total']}", 512, 288))
            bar.update(1, preview)

        host = ComfyHost(model, clip)
        cancel_exc = None
        try:
            from ..training.esd.objective import has_guidance_embedding, host_family

            if host_family(host).guidance_default is not None and has_guidance_embedding(host):
                cfg.guidance_scale = float(flux_guidance)
            elif float(flux_guidance) != 3.5:
                raise ValueError(f"flux_guidance {flux_guidance} is set, but this {host.arch} model has no guidance "
                                 f"embedding (only Flux-dev has one): leave it at 3.5")
            try:
                result = erase(host, cfg, progress=progress, cancel_check=comfy_io.check_interrupt)
            except ESDCancelled as exc:
                result, cancel_exc = exc.result, exc
            keys = {k: host.model_key(*k) for k in result.deltas}
        finally:
            host.close()

        file_name = ""
        stats = dict(result.stats)
        for k in ("concept_kinds", "prompt_source", "erase_from", "mask_mode", "mask_preset"):
            stats[k] = result.metadata.get(k)
        if target is not None and (cancel_exc is None or save_on_cancel) and result.stats["iterations_done"] > 0:
            stats_dir = comfy_io.output_file("esd", target.stem + "/x").parent
            paths = save_outputs(result, target, stats_dir=stats_dir, lora_rank=int(lora_rank),
                                 dtype=parse_dtype(save_dtype), overwrite=False)
            with atomic_output(stats_dir / "loss.png") as tmp:
                Image.fromarray(loss_plot(result.losses, f"ESD {method}")).save(tmp, format="PNG")
            file_name = target.relative_to(comfy_io.output_dir() / "loras").as_posix()
            stats["files"] = {k: str(v) for k, v in paths.items() if k != "svd" and v is not None}
            if paths["svd"]:
                stats["svd_lora"] = {k: v for k, v in paths["svd"].items() if k != "energy_kept_per_module"}
        if cancel_exc is not None:
            raise cancel_exc.__cause__ or cancel_exc
        erased = add_diff_patches(model, {keys[k]: d for k, d in result.deltas.items()})
        title = f"ESD {method}: {', '.join(result.metadata['concepts'])}"
        plot = comfy_io.numpy_to_image(loss_plot(result.losses, title))
        losses = stats.pop("losses", None) or [None]
        stats["loss_first"], stats["loss_last"] = losses[0], losses[-1]
        return erased, file_name, plot, json.dumps(stats, indent=1)


def _check_prompt_count(concepts: str, prompt_variations: str, variations: int) -> None:
    """Refuse prompt sets above :data:`~conceptlab.formats.limits.MAX_PROMPTS` before they are expanded."""
    from ..formats import limits
    from ..training.esd.prompts import parse_concepts, parse_prompt_lines

    n_concepts = len(parse_concepts(concepts))
    limits.check_count("concepts", n_concepts, limits.MAX_CONCEPTS)
    lines = parse_prompt_lines(prompt_variations) if prompt_variations else []
    templates = sum(1 for ln in lines if "{" in ln)
    per_concept = max(int(variations), 1) if templates or not lines else 0
    limits.check_count("prompts (concepts × variations + prompt lines)", n_concepts * per_concept + len(lines),
                       limits.MAX_PROMPTS)


@policy.guarded
class ConceptLabErasureCompare:
    """Original vs erased model on the same prompts and seeds, as one labelled grid."""

    @staticmethod
    def check_inputs(values: dict) -> None:
        """Widget checks beyond min/max: the number of prompts (each is sampled on both models)."""
        from ..formats import limits
        from ..training.esd.prompts import parse_prompt_lines

        n = sum(len(parse_prompt_lines(values[k])) for k in ("concept_prompts", "unrelated_prompts")
                if isinstance(values.get(k), str))
        limits.check_count("prompts (concept + unrelated)", n, limits.MAX_SAMPLE_PROMPTS)

    DESCRIPTION = ("Generates the same prompts with the same seeds on the original and the erased model and "
                   "lays them side by side: concept prompts (should change) and unrelated prompts (should "
                   "survive).")
    CATEGORY = CATEGORY
    FUNCTION = "compare"
    RETURN_TYPES = ("IMAGE", "IMAGE")
    RETURN_NAMES = ("grid", "images")
    OUTPUT_TOOLTIPS = ("Labelled grid: one row per prompt, original left, erased right.",
                       "All generated images as a batch (original, erased, per prompt).")

    @classmethod
    def INPUT_TYPES(cls):
        """ComfyUI V1 input spec: ``{"required": {...}, "optional": {...}}`` with a tooltip on every input."""
        samplers, schedulers = _samplers()
        return {"required": {
            "original": ("MODEL", {"tooltip": "The model before erasure."}),
            "erased": ("MODEL", {"tooltip": "The erased model (from ESD Erase, or the original + the saved file)."}),
            "clip": ("CLIP", {"tooltip": "Text encoder for the prompts."}),
            "vae": ("VAE", {"tooltip": "VAE to decode the images."}),
            "concept_prompts": ("STRING", {"default": "a painting by Van Gogh\nthe starry night by Van Gogh",
                                           "multiline": True,
                                           "tooltip": "Prompts with the erased concept, one per line."}),
            "unrelated_prompts": ("STRING", {"default": _DEFAULT_UNRELATED, "multiline": True,
                                             "tooltip": "Prompts without the concept, one per line: these "
                                                        "should look the same on both models."}),
            "negative": ("STRING", {"default": "", "multiline": False, "tooltip": "Negative prompt for all."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF,
                             "tooltip": "Seed of the first prompt (prompt i uses seed + i), same for both models."}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 150, "tooltip": "Sampling steps."}),
            "cfg": ("FLOAT", {"default": 7.0, "min": 1.0, "max": 30.0, "step": 0.5, "tooltip": "CFG scale."}),
            "sampler_name": (samplers, {"tooltip": "Sampler."}),
            "scheduler": (schedulers, {"tooltip": "Scheduler."}),
            "width": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 8, "tooltip": "Image width."}),
            "height": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 8, "tooltip": "Image height."}),
        }}

    def compare(self, original, erased, clip, vae, concept_prompts, unrelated_prompts, negative, seed, steps, cfg,
                sampler_name, scheduler, width, height):
        """Sample every prompt (seed + i) on both models with ComfyUI's sampler.

        Returns ``(grid IMAGE [1, H', W', 3], images IMAGE [2·P, height, width, 3])`` in the order original,
        erased per prompt. Raises ``ValueError`` when both prompt lists are empty.
        """
        from ..training.esd.outputs import comparison_grid
        from ..training.esd.prompts import parse_prompt_lines
        from . import comfy_io
        from .comfy_patchers import sample_images

        rows = [(p, "concept") for p in parse_prompt_lines(concept_prompts)]
        rows += [(p, "unrelated") for p in parse_prompt_lines(unrelated_prompts)]
        if not rows:
            raise ValueError("give at least one prompt (concept or unrelated)")
        bar = comfy_io.Progress(2 * len(rows))
        with torch.no_grad():
            neg = clip.encode_from_tokens_scheduled(clip.tokenize(str(negative)))
            images, grid_rows = [], []
            for i, (p, kind) in enumerate(rows):
                pos = clip.encode_from_tokens_scheduled(clip.tokenize(p))
                pair = []
                for m in (original, erased):
                    img = sample_images(m, pos, neg, vae, seed=int(seed) + i, steps=int(steps), cfg=float(cfg),
                                           sampler_name=sampler_name, scheduler=scheduler, width=int(width),
                                           height=int(height))
                    images.append(img)
                    pair.append(comfy_io.image_to_numpy(img)[0])
                    bar.update(1)
                grid_rows.append((f"[{kind}] {p}", pair))
        grid = comparison_grid(grid_rows, ["original", "erased"])
        return comfy_io.numpy_to_image(grid), torch.cat(images, 0)


NODE_CLASS_MAPPINGS = {
    "ConceptLabGridMasks": ConceptLabGridMasks,
    "ConceptLabESDErase": ConceptLabESDErase,
    "ConceptLabErasureCompare": ConceptLabErasureCompare,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ConceptLabGridMasks": "Grid Masks (ESD)",
    "ConceptLabESDErase": "ESD Erase Concept",
    "ConceptLabErasureCompare": "Erasure Comparison Grid",
}
