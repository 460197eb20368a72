"""ComfyUI node for UCE closed-form concept erasure (:mod:`conceptlab.training.uce`).

A thin adapter: the UNet's attn2 to_k / to_v weights as the MODEL currently computes them (ComfyUI's patched
weights, so an upstream LoRA is respected), the CLIP's own tokenizer and encoder for the concept embeddings, the
edit as ``diff`` patches on a clone of the MODEL, and the ESD eraser's files (``.diff`` in ``output/loras/``,
JSON reports in ``output/esd/``). ComfyUI is imported only inside functions.
"""

from __future__ import annotations

import json

import torch

CATEGORY = "Concept Lab/ESD"
_KINDS = ["auto", "style", "object", "person", "attribute", "explicit"]


def comfy_token_encoder(clip):
    """A :data:`conceptlab.training.uce.TokenEncoder` over a ComfyUI CLIP (SD1.x ``clip_l`` / SD2.x ``clip_h``):
    ``clip.tokenize`` + ``clip.encode_from_tokens`` (the context the UNet sees, with ComfyUI's layer choice),
    the last content token found before the tokenizer's ``end_token`` in the first 77-token chunk (the reference
    truncates to 77 tokens). Raises ``ValueError`` for a CLIP with several text encoders (SDXL, Flux)."""
    from ..training.uce import last_token_index

    tok = clip.tokenizer
    name, attr = getattr(tok, "clip_name", None), getattr(tok, "clip", None)
    inner = getattr(tok, attr, None) if attr else None
    if inner is None or getattr(inner, "end_token", None) is None:
        raise ValueError("UCE supports single-text-encoder CLIPs (SD1.x / SD2.x) for now")

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


class ConceptLabUCEErase:
    """Erase concepts in closed form (UCE): edits the cross-attention keys/values in seconds."""

    DESCRIPTION = ("Erases concepts with UCE (Gandikota et al., WACV 2024): a closed-form edit of every "
                   "cross-attention key/value projection so the concept's text now produces what the guide "
                   "concept produces, while the preserved concepts keep theirs. No training: seconds instead of "
                   "ESD's hours. Outputs the erased MODEL and saves a file to output/loras/ that any LoRA loader "
                   "applies (strength 1 = the edit). SD1.x / SD2.x.")
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
            "model": ("MODEL", {"tooltip": "The model to erase the concepts from (SD1.x / SD2.x)."}),
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
        """Run :func:`conceptlab.training.uce.erase_uce` on the MODEL's effective attn2 to_k / to_v weights.

        Returns ``(MODEL clone with diff patches, file name relative to loras/, stats JSON)``. Saves
        ``output/loras/<save_name>_NNNNN.safetensors`` (+ SVD LoRA of ``lora_rank``) and ``training_stats.json``
        / ``metadata.json`` under ``output/esd/<stem>/`` unless ``save_name`` is empty. Raises ``ValueError`` for
        bad settings (:meth:`UCEConfig.validate`), an unsupported CLIP or an output path outside the output folder.
        """
        from ..formats.safetensors_io import parse_dtype
        from ..training.esd_outputs import save_outputs
        from ..training.uce import UCEConfig, erase_uce, uce_targets
        from . import comfy_host as ch
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
            first = ch.output_file("loras", stem_rel + ".safetensors")
            target = _next_free(first.parent, first.stem)
        encode = comfy_token_encoder(clip)
        host = ch.ComfyHost(model, clip)
        try:
            paths = [t.path for t in uce_targets(host.modules("unet"))]
            keys = {p: host.model_key("unet", p, "weight") for p in paths}
            arch = host.arch
        finally:
            host.close()
        with torch.inference_mode(False), torch.no_grad():
            effective = dict(zip(paths, (w for _, w in ch.iter_patched_weights(model, list(keys.values())))))
            result = erase_uce(effective, encode, cfg, arch=arch)
        stats = dict(result.stats)
        stats.pop("losses", None)
        stats["concept_kinds"] = result.metadata["concept_kinds"]
        stats["guide_prompts"] = result.metadata["guide_prompts"]
        file_name = ""
        if target is not None:
            stats_dir = ch.output_file("esd", target.stem + "/x").parent
            out = save_outputs(result, target, stats_dir=stats_dir, lora_rank=int(lora_rank),
                               dtype=parse_dtype(save_dtype), overwrite=False)
            file_name = target.relative_to(ch.output_dir() / "loras").as_posix()
            stats["files"] = {k: str(v) for k, v in out.items() if k != "svd" and v is not None}
            if out["svd"]:
                stats["svd_lora"] = {k: v for k, v in out["svd"].items() if k != "energy_kept_per_module"}
        erased = ch.add_diff_patches(model, {keys[p]: d for (_, p, _), d in result.deltas.items()})
        return erased, file_name, json.dumps(stats, indent=1)


NODE_CLASS_MAPPINGS = {"ConceptLabUCEErase": ConceptLabUCEErase}
NODE_DISPLAY_NAME_MAPPINGS = {"ConceptLabUCEErase": "UCE Erase Concept (closed form)"}
