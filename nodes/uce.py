"""ComfyUI node for UCE closed-form concept erasure (:mod:`conceptlab.training.esd.uce`).

A thin adapter: the UNet's attn2 to_k / to_v weights as the MODEL currently computes them (ComfyUI's patched
weights, so an upstream LoRA is respected), the CLIP's own tokenizer and encoder for the concept embeddings, the
edit as ``diff`` patches on a clone of the MODEL, and the ESD eraser's files (``.diff`` in ``output/loras/``,
JSON reports in ``output/esd/``). ComfyUI is imported only inside functions.
"""

from __future__ import annotations

import json

import torch

from . import policy

CATEGORY = "Concept Lab/ESD"
_KINDS = ["auto", "style", "object", "person", "attribute", "explicit"]


def comfy_token_encoder(clip):
    """A :data:`conceptlab.training.esd.uce.TokenEncoder` over a ComfyUI CLIP: ``clip.tokenize`` +
    ``clip.encode_from_tokens`` (the context the UNet sees, with ComfyUI's layer choice: SD1.x ``clip_l``, SD2.x
    ``clip_h``, SDXL ``clip_l`` ‖ ``clip_g`` ``[1, 77, 2048]``); the last content token is found before the
    ``end_token`` of the CLIP-L tokenizer (the only one for SD1.x/SD2.x) in the first 77-token chunk (the
    reference truncates to 77 tokens). Raises ``ValueError`` for other text encoders (Flux's T5, …)."""
    from ..training.esd.uce import last_token_index

    tok = clip.tokenizer
    if hasattr(tok, "clip_l") and hasattr(tok, "clip_g"):  # SDXL: both tokenizers see the same words
        name, inner = "l", tok.clip_l
    else:
        name, attr = getattr(tok, "clip_name", None), getattr(tok, "clip", None)
        inner = getattr(tok, attr, None) if attr else None
    if inner is None or getattr(inner, "end_token", None) is None:
        raise ValueError("UCE supports CLIP text encoders (SD1.x, SD2.x, SDXL); this CLIP is "
                         f"{type(tok).__name__}")

    def encode(prompts):
        hidden, idx = [], []
        for p in prompts:
            tokens = clip.tokenize(str(p))
            chunk = tokens[name][0]
            ids = torch.tensor([[t[0] if isinstance(t[0], int) else -1 for t in chunk]])
            idx.append(int(last_token_index(ids, int(inner.end_token))[0]))
            cond = clip.encode_from_tokens(tokens)
            hidden.append(cond[:, :len(chunk)].float().cpu())
        return torch.cat(hidden), torch.tensor(idx)

    return encode


@policy.guarded
class ConceptLabUCEErase:
    """Erase concepts in closed form (UCE): edits the cross-attention keys/values in seconds."""

    PATH_INPUTS = {"save_name": "optional"}

    DESCRIPTION = ("Erases concepts with UCE (Gandikota et al., WACV 2024): a closed-form edit of every "
                   "cross-attention key/value projection so the concept's text now produces what the guide "
                   "concept produces, while the preserved concepts keep theirs. No training: seconds instead of "
                   "ESD's hours. Outputs the erased MODEL and saves a file to output/loras/ that any LoRA loader "
                   "applies (strength 1 = the edit). SD1.x, SD2.x, SDXL.")
    CATEGORY = CATEGORY
    FUNCTION = "erase"
    RETURN_TYPES = ("MODEL", "STRING", "STRING")
    RETURN_NAMES = ("model", "file_name", "stats")
    OUTPUT_TOOLTIPS = ("The erased model (a clone of the input with the edit as patches).",
                       "The saved file, relative to the loras folder (empty if saving is off).",
                       "Statistics as JSON: time, edited tensors, how close the erased prompts now are to their "
                       "guides and how far the preserved prompts moved.")

    @classmethod
    def INPUT_TYPES(cls):
        """ComfyUI V1 input spec: ``{"required": {...}}`` with a tooltip on every input."""
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to erase the concepts from (SD1.x / SD2.x / SDXL)."}),
            "clip": ("CLIP", {"tooltip": "The model's text encoder, used to embed the concepts."}),
            "concepts": ("STRING", {"default": "Van Gogh", "multiline": True,
                                    "tooltip": "Concept(s) to erase: one per line or separated by ';'."}),
            "guide_concepts": ("STRING", {"default": "", "multiline": True,
                                          "tooltip": "What each erased concept should become: one for all or one "
                                                     "per concept (';' or lines). Empty = the kind's default: "
                                                     "'art' for artists/styles, the empty prompt otherwise (as "
                                                     "the reference)."}),
            "preserve_concepts": ("STRING", {"default": "", "multiline": True,
                                             "tooltip": "Concepts that must not change (e.g. other artists), "
                                                        "';' or lines."}),
            "concept_kind": (_KINDS, {"default": "auto",
                                      "tooltip": "What the concepts are (default guide and phrasings): auto "
                                                 "infers it per concept (capitalised names and 'style'/'art' "
                                                 "words = style; nudity words = explicit; else object)."}),
            "variations": ("INT", {"default": 0, "min": 0, "max": 200,
                                   "tooltip": "0 = the bare concepts (the reference's default). N > 0 = also "
                                              "N-1 phrasings per concept from its kind's templates, each paired "
                                              "with the same phrasing of its guide."}),
            "erase_scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1,
                                      "tooltip": "Weight of the erase terms (reference default 1)."}),
            "preserve_scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1,
                                         "tooltip": "Weight of the preserve terms (reference default 1)."}),
            "lamb": ("FLOAT", {"default": 0.5, "min": 0.001, "max": 100.0, "step": 0.05,
                               "tooltip": "λ: how strongly the weights stay near the original (reference "
                                          "default 0.5)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF,
                             "tooltip": "Seed of the phrasing choice when variations > 0."}),
            "save_name": ("STRING", {"default": "esd/uce",
                                     "tooltip": "File name prefix inside output/loras/ (a counter is added). "
                                                "Empty = do not save a file."}),
            "lora_rank": ("INT", {"default": 0, "min": 0, "max": 1024,
                                  "tooltip": "Also save a low-rank LoRA (SVD) of this rank for A1111/Forge; "
                                             "0 = no."}),
            "save_dtype": (["float16", "bfloat16", "float32"], {"default": "float16",
                                                                "tooltip": "Precision of the saved file."}),
        }}

    def erase(self, model, clip, concepts, guide_concepts, preserve_concepts, concept_kind, variations,
              erase_scale, preserve_scale, lamb, seed, save_name, lora_rank, save_dtype):
        """Run :func:`conceptlab.training.esd.uce.erase_uce` on the MODEL's effective attn2 to_k / to_v weights.

        Returns ``(MODEL clone with diff patches, file name relative to loras/, stats JSON)``. Saves
        ``output/loras/<save_name>_NNNNN.safetensors`` (+ SVD LoRA of ``lora_rank``) and ``training_stats.json``
        / ``metadata.json`` under ``output/esd/<stem>/`` unless ``save_name`` is empty. Raises ``ValueError`` for
        bad settings (:meth:`UCEConfig.validate`), an unsupported CLIP or an output path outside the output folder.
        """
        from ..formats.safetensors_io import parse_dtype
        from ..training.esd.outputs import save_outputs
        from ..training.esd.uce import UCEConfig, erase_uce, uce_targets
        from . import comfy_io
        from .comfy_host import ComfyHost
        from .comfy_patchers import add_diff_patches, iter_patched_weights
        from .esd import _next_free

        cfg = UCEConfig(concepts=concepts, guide_concepts=guide_concepts if guide_concepts.strip() else None,
                        preserve_concepts=preserve_concepts if preserve_concepts.strip() else None,
                        concept_kind=concept_kind, variations=int(variations), erase_scale=float(erase_scale),
                        preserve_scale=float(preserve_scale), lamb=float(lamb), seed=int(seed))
        cfg.validate()
        save_name = (save_name or "").strip()
        target = None
        if save_name:
            stem_rel = save_name[:-len(".safetensors")] if save_name.endswith(".safetensors") else save_name
            first = comfy_io.output_file("loras", stem_rel + ".safetensors")
            target = _next_free(first.parent, first.stem)
        encode = comfy_token_encoder(clip)
        host = ComfyHost(model, clip)
        try:
            paths = [t.path for t in uce_targets(host.modules("unet"))]
            keys = {p: host.model_key("unet", p, "weight") for p in paths}
            arch = host.arch
        finally:
            host.close()
        with torch.inference_mode(False), torch.no_grad():
            effective = dict(zip(paths, (w for _, w in iter_patched_weights(model, list(keys.values())))))
            result = erase_uce(effective, encode, cfg, arch=arch)
        stats = dict(result.stats)
        stats.pop("losses", None)
        stats["concept_kinds"] = result.metadata["concept_kinds"]
        stats["guide_prompts"] = result.metadata["guide_prompts"]
        file_name = ""
        if target is not None:
            stats_dir = comfy_io.output_file("esd", target.stem + "/x").parent
            out = save_outputs(result, target, stats_dir=stats_dir, lora_rank=int(lora_rank),
                               dtype=parse_dtype(save_dtype), overwrite=False)
            file_name = target.relative_to(comfy_io.output_dir() / "loras").as_posix()
            stats["files"] = {k: str(v) for k, v in out.items() if k != "svd" and v is not None}
            if out["svd"]:
                stats["svd_lora"] = {k: v for k, v in out["svd"].items() if k != "energy_kept_per_module"}
        erased = add_diff_patches(model, {keys[p]: d for (_, p, _), d in result.deltas.items()})
        return erased, file_name, json.dumps(stats, indent=1)


@policy.guarded
class ConceptLabApplyReferenceErasure:
    """Apply a reference-format erasure file (esd_sd.py's ``esd-*.safetensors``, UCE's output) to a MODEL."""

    PATH_INPUTS = {"save_name": "optional"}

    DESCRIPTION = ("Applies an erasure saved by the reference scripts (rohitgandikota/erasing esd_sd.py: "
                   "esd-<concept>-from-<from>-<method>.safetensors; unified-concept-editing: UCE files). Those "
                   "hold the erased weights themselves under diffusers names, which LoRA loaders cannot read. "
                   "The file's weights replace the model's (as a diff patch on a clone), and it can be saved as a "
                   ".diff file any LoRA loader applies. Use the base model the erasure was trained from.")
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "file_name")
    OUTPUT_TOOLTIPS = ("The model with the file's weights in place of its own.",
                       "The converted .diff file, relative to the loras folder (empty if saving is off).")

    @classmethod
    def INPUT_TYPES(cls):
        """ComfyUI V1 input spec with a tooltip on every input; ``file`` lists the loras folder."""
        from . import comfy_io

        return {"required": {
            "model": ("MODEL", {"tooltip": "The base model the erasure was trained from (SD1.x / SD2.x)."}),
            "file": (comfy_io.model_list("loras"), {"tooltip": "The reference erasure file (put it in models/loras)."}),
            "save_name": ("STRING", {"default": "",
                                     "tooltip": "Also save it as a .diff file under this prefix in output/loras/ "
                                                "(a counter is added). Empty = do not save."}),
            "save_dtype": (["float16", "bfloat16", "float32"], {"default": "float16",
                                                                "tooltip": "Precision of the saved file."}),
        }}

    def apply(self, model, file, save_name, save_dtype):
        """``(MODEL clone with diff patches W_file − W_model, saved file name)``; the deltas are taken against
        the weights the MODEL currently computes (:func:`conceptlab.nodes.comfy_patchers.iter_patched_weights`).
        Raises ``FileNotFoundError`` for a file outside ComfyUI's loras list and ``ValueError`` for a file whose
        names or shapes do not fit the model (e.g. a kohya LoRA or a ``.diff`` file)."""
        from safetensors.torch import load_file

        from ..formats.lora_files import save_diff_file
        from ..formats.safetensors_io import parse_dtype
        from ..training.esd.reference import diff_keys, from_reference
        from . import comfy_io
        from .comfy_host import ComfyHost
        from .comfy_patchers import add_diff_patches, iter_patched_weights
        from .esd import _next_free

        tensors = load_file(str(comfy_io.model_file("loras", file)))
        host = ComfyHost(model)
        try:
            mods = host.modules("unet")
            names = {f"{p}.{a}": (p, a) for p, m in mods.items() for a in ("weight", "bias")
                     if getattr(m, a, None) is not None}
            unknown = sorted(k for k in tensors if k not in names)
            if unknown:
                raise ValueError(f"{file}: {len(unknown)} tensor name(s) are not diffusers UNet names of this model, "
                                 f"e.g. {unknown[:3]} (is it a LoRA or a .diff file? load those with LoraLoader)")
            keys = {k: host.model_key("unet", *names[k]) for k in tensors}
        finally:
            host.close()
        with torch.inference_mode(False), torch.no_grad():
            current = dict(zip(tensors, (w for _, w in iter_patched_weights(model, list(keys.values())))))
            deltas = from_reference(tensors, current)
        file_name = ""
        if (save_name or "").strip():
            stem_rel = save_name.strip().removesuffix(".safetensors")
            first = comfy_io.output_file("loras", stem_rel + ".safetensors")
            target = _next_free(first.parent, first.stem)
            save_diff_file(target, diff_keys(deltas), {"conceptlab_converted_from": file,
                                                        "ss_network_module": "conceptlab.esd"},
                           dtype=parse_dtype(save_dtype), overwrite=False)
            file_name = target.relative_to(comfy_io.output_dir() / "loras").as_posix()
        erased = add_diff_patches(model, {keys[f"{p}.{a}"]: d for (_, p, a), d in deltas.items()})
        return erased, file_name


NODE_CLASS_MAPPINGS = {"ConceptLabUCEErase": ConceptLabUCEErase,
                       "ConceptLabApplyReferenceErasure": ConceptLabApplyReferenceErasure}
NODE_DISPLAY_NAME_MAPPINGS = {"ConceptLabUCEErase": "UCE Erase Concept (closed form)",
                              "ConceptLabApplyReferenceErasure": "Apply Reference Erasure File (esd-*/UCE)"}
