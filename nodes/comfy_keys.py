"""Names on the ComfyUI side: canonical module paths (training/host.py) ↔ ComfyUI patch keys, and which model
family a ComfyUI MODEL / CLIP is.

:func:`model_key` and :func:`unet_module_maps` map diffusers UNet paths to ComfyUI's LDM layout through ComfyUI's own
``comfy.utils.unet_to_diffusers`` (Flux: BFL paths, which are ComfyUI's own tree); :func:`te_prefixes` finds the
text encoders inside a CLIP object; :func:`arch_of` reads the family from the model's config class. ComfyUI is
imported inside functions only. Used by :class:`.comfy_host.ComfyHost` and :mod:`.comfy_patchers`.
"""

from __future__ import annotations


#: Structural UNet configs (the part ``comfy.utils.unet_to_diffusers`` reads) of the SD families, as ComfyUI's
#: ``comfy/model_detection.py`` defines them; used by :func:`model_key` when no model is at hand.
_UNET_LAYOUTS = {
    "sd1": {"num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
            "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "transformer_depth_middle": 1},
    "sdxl": {"num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 2, 2, 10, 10],
             "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "transformer_depth_middle": 10},
}
_UNET_LAYOUTS["sd2"] = _UNET_LAYOUTS["sd1"]

#: ComfyUI's CLIP-patcher prefix of each text-encoder component, per architecture
_TE_PREFIX = {
    "sd1": {"te": "clip_l.transformer."},
    "sd2": {"te": "clip_h.transformer."},
    "sdxl": {"te1": "clip_l.transformer.", "te2": "clip_g.transformer."},
    "flux": {"te1": "clip_l.transformer.", "t5": "t5xxl.transformer."},
}

#: first path segment of each text-encoder component's canonical module paths (training/host.py): CLIP models
#: ``text_model.encoder.layers.N…`` (transformers CLIPTextModel), T5 ``encoder.block.N…`` (T5EncoderModel; ComfyUI's
#: ``comfy/text_encoders/t5.py`` uses the same module names)
_TE_ROOT = {"t5": "encoder."}


def strip_attr(key: str) -> tuple[str, str]:
    """``"a.b.weight"`` → ``("a.b", "weight")``: a parameter key split into module path and attribute."""
    path, _, attr = key.rpartition(".")
    return path, attr


def te_root(component: str) -> str:
    """First path segment of ``component``'s canonical text-encoder module paths: ``"encoder."`` for T5,
    ``"text_model."`` for the CLIP encoders (see :data:`_TE_ROOT`)."""
    return _TE_ROOT.get(component, "text_model.")


def unet_module_maps(unet_config: dict) -> tuple[dict[str, str], dict[str, str]]:
    """``(diffusers→ldm, ldm→diffusers)`` UNet *module path* maps for a ComfyUI ``unet_config``.

    Built from ComfyUI's own ``comfy.utils.unet_to_diffusers`` (parameter-level map, here reduced to module
    paths), so it follows the exact block layout of the loaded model (SD1/SD2/SDXL and tiny test UNets).
    Raises ``ValueError`` for models that are not UNets (no ``num_res_blocks``: Flux, SD3, ...).
    """
    import comfy.utils

    pmap = comfy.utils.unet_to_diffusers(dict(unet_config))
    if not pmap:
        raise ValueError("this MODEL is not a UNet (SD1.x / SD2.x / SDXL); Concept Lab cannot map its layers")
    d2l: dict[str, str] = {}
    for dkey, lkey in pmap.items():
        dpath, dattr = strip_attr(dkey)
        lpath, lattr = strip_attr(lkey)
        if dattr in ("weight", "bias") and dattr == lattr:
            d2l[dpath] = lpath
    return d2l, {v: k for k, v in d2l.items()}


_LAYOUT_MAPS: dict[str, tuple[dict[str, str], dict[str, str]]] = {}


def model_key(component: str, path: str, attr: str = "weight", *, arch: str = "sd1",
              unet_config: dict | None = None) -> str:
    """ComfyUI patch key of ``<component>.<path>.<attr>`` (canonical names, see training/host.py).

    ``("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q", "weight")`` →
    ``"diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_q.weight"`` (a key of the MODEL's
    ModelPatcher); ``("te", "text_model.encoder.layers.0.self_attn.q_proj", "weight")`` →
    ``"clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"`` (a key of the CLIP's patcher;
    SD2 ``clip_h``, SDXL ``te1``→``clip_l``, ``te2``→``clip_g``). ``unet_config``: the model's own
    (``model.model.model_config.unet_config``) for non-standard UNets; default: the ``arch`` layout.
    Raises ``ValueError`` for unknown components, architectures or paths.
    """
    if attr not in ("weight", "bias"):
        raise ValueError(f"attr must be 'weight' or 'bias', got {attr!r}")
    if component == "unet" and arch == "flux":
        # ComfyUI's Flux module tree is BFL's, which is the canonical Flux naming (training/host.py)
        from ..formats.flux_keys import BFL_ROOTS

        if path.split(".", 1)[0] not in BFL_ROOTS or path.endswith((".weight", ".bias")):
            raise ValueError(f"{path!r} is not a BFL Flux module path (double_blocks.N..., single_blocks.N..., img_in...)")
        return f"diffusion_model.{path}.{attr}"
    if component == "unet":
        if unet_config is not None:
            d2l = unet_module_maps(unet_config)[0]
        else:
            if arch not in _UNET_LAYOUTS:
                raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(_UNET_LAYOUTS)}")
            if arch not in _LAYOUT_MAPS:
                _LAYOUT_MAPS[arch] = unet_module_maps(_UNET_LAYOUTS[arch])
            d2l = _LAYOUT_MAPS[arch][0]
        if path not in d2l:
            raise ValueError(f"{path!r} is not a UNet module path of this {arch} layout")
        return f"diffusion_model.{d2l[path]}.{attr}"
    prefixes = _TE_PREFIX.get(arch)
    if prefixes is None:
        raise ValueError(f"unknown arch {arch!r}")
    if component not in prefixes:
        raise ValueError(f"component {component!r} does not exist for {arch}; expected one of "
                         f"{['unet', *prefixes]}")
    root = te_root(component)
    if not path.startswith(root):
        raise ValueError(f"{component} paths start with {root!r}, got {path!r}")
    return f"{prefixes[component]}{path}.{attr}"


def _is_flux(base_model) -> bool:
    """True for ComfyUI's Flux.1 models (``comfy.model_base.Flux`` from ``supported_models.Flux`` / ``FluxSchnell``
    / ``FluxInpaint``; Kontext loads as the same class). Chroma and Flux.2 are other classes and stay refused."""
    import comfy.model_base

    names = {c.__name__ for c in type(base_model.model_config).__mro__}
    return type(base_model) is comfy.model_base.Flux and "Flux" in names


def arch_of(base_model) -> str:
    """"sd1" | "sd2" | "sdxl" from ComfyUI's model config class (then context_dim), else "unknown".

    Raises ``ValueError`` for the SDXL refiner (aesthetic-score conditioning; no kohya LoRA or ESD targets it).
    """
    names = {c.__name__ for c in type(base_model.model_config).__mro__}
    if _is_flux(base_model):
        return "flux"
    if "SDXLRefiner" in names:
        raise ValueError("this MODEL is the SDXL refiner: Concept Lab trains and erases SDXL base models (SDXL 1.0, "
                         "Illustrious, NoobAI, Pony), not the refiner (its conditioning is an aesthetic score)")
    if "SDXL" in names:
        return "sdxl"
    if "SD20" in names:
        return "sd2"
    if "SD15" in names:
        return "sd1"
    ctx = base_model.model_config.unet_config.get("context_dim")
    return {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(ctx, "unknown")


def te_prefixes(clip) -> dict[str, str]:
    """``{component: prefix}`` of the text encoders inside a ComfyUI CLIP object (``clip_l.transformer.``...)."""
    csm = clip.cond_stage_model
    found = []
    for name, child in csm.named_children():
        tr = getattr(child, "transformer", None)
        if tr is not None and hasattr(tr, "text_model"):
            found.append(name)
    t5 = getattr(getattr(csm, "t5xxl", None), "transformer", None)
    if found == ["clip_l"] and t5 is not None and hasattr(t5, "encoder"):  # comfy/text_encoders/flux.py FluxClipModel
        return dict(_TE_PREFIX["flux"])
    if len(found) == 1:
        return {"te": f"{found[0]}.transformer."}
    if set(found) == {"clip_l", "clip_g"}:
        return {"te1": "clip_l.transformer.", "te2": "clip_g.transformer."}
    raise ValueError(f"unsupported text encoder layout {found or list(dict(csm.named_children()))} "
                     "(expected SD1/SD2 clip, SDXL clip_l + clip_g or Flux clip_l + t5xxl)")
