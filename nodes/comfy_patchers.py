"""Helpers over ComfyUI ModelPatchers (MODEL, or a CLIP's patcher): loading one for training with ComfyUI's model
management (:func:`load_patcher`, :func:`unload_patcher`; parameters made normal tensors and frozen), full-rank
diff patches on a clone (:func:`add_diff_patches`), the weights a patcher computes with every patch applied
(:func:`iter_patched_weights`), and text-to-image with ComfyUI's own sampler (:func:`sample_images`).

ComfyUI is imported inside functions only. Used by :class:`.comfy_host.ComfyHost` and the node modules.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from . import comfy_io
from .comfy_keys import te_prefixes


def _is_loaded(patcher) -> bool:
    import comfy.model_management as mm

    return any(lm.model is patcher for lm in mm.current_loaded_models)


def _materialise_params(module: torch.nn.Module, prefix: str, root: torch.nn.Module) -> int:
    """Replace inference-mode parameters of ``module`` by equal normal tensors; returns how many.

    ComfyUI builds models inside ``torch.inference_mode()``; autograd cannot save such tensors for backward
    ("Inference tensors cannot be saved for backward"), which any backward pass through a frozen layer needs.
    PyTorch's advice is a clone; doing it once (values unchanged, same device/dtype) avoids ComfyUI
    TrainLoraNode's per-forward copy of every weight.
    """
    import comfy.utils

    n = 0
    with torch.inference_mode(False):
        # names first, then one parameter at a time: holding the list of old parameters would keep a second
        # full copy of the model alive until the loop ends (a peak of 2x the UNet's size)
        for name in [k for k, _ in module.named_parameters()]:
            p = comfy.utils.get_attr(module, name)
            if p.is_inference():
                comfy.utils.set_attr_param(root, prefix + name, p.detach().clone())
                n += 1
            del p
        for mname, m in list(module.named_modules()):
            for bname, b in list(m.named_buffers(recurse=False)):
                if b is not None and b.is_inference():
                    m._buffers[bname] = b.clone()
                    n += 1
    return n


def load_patcher(patcher, materialise: torch.nn.Module | None = None, prefix: str = "") -> None:
    """Load ``patcher`` (weight wrappers active) with ComfyUI's model management, fully, then make the
    parameters of ``materialise`` normal tensors (see :func:`_materialise_params`)."""
    import comfy.model_management as mm

    base = patcher.model
    if _is_loaded(patcher) and getattr(base, "current_weight_patches_uuid", None) == patcher.patches_uuid:
        if materialise is not None:
            _freeze(materialise)  # loaded by someone else (a sampler) outside our load_patcher
        return
    with torch.inference_mode(False):
        mm.load_models_gpu([patcher], force_full_load=True)
        if materialise is not None:
            _materialise_params(materialise, prefix, base)
            _freeze(materialise)


def _freeze(module: torch.nn.Module) -> int:
    """``requires_grad = False`` on every parameter of the frozen model (what TrainLoraNode does with
    ``mp.model.requires_grad_(False)``); returns how many changed.

    A model whose parameters are normal tensors (built or moved outside inference mode: ``load_models_gpu``'s
    ``.to(device)`` on a GPU, in-process models) otherwise keeps PyTorch's default ``requires_grad=True``, and the
    first ``backward()`` computes and stores a dense ``.grad`` for every frozen weight — a second copy of the
    model (measured: +364 MiB on the 85 M-parameter Flux benchmark model, half the step time). The trainable
    deltas are weight wrappers, not submodules, so they keep requiring grad."""
    n = 0
    for p in module.parameters():
        if p.requires_grad:
            p.requires_grad_(False)
            n += 1
    return n


def unload_patcher(patcher) -> None:
    """Remove ``patcher`` from ComfyUI's loaded models (``model_unload``: its weights are restored, patches off)."""
    import comfy.model_management as mm

    for i in range(len(mm.current_loaded_models) - 1, -1, -1):
        lm = mm.current_loaded_models[i]
        if lm.model is patcher:
            mm.current_loaded_models.pop(i)
            lm.model_unload()


def to_normal(t: torch.Tensor) -> torch.Tensor:
    """A tensor usable by autograd: inference tensors are cloned (call inside ``inference_mode(False)``)."""
    return t.clone() if t.is_inference() else t


def sample_images(model, positive, negative, vae, seed: int, steps: int, cfg: float, sampler_name: str,
                  scheduler: str, width: int, height: int, batch_size: int = 1, denoise: float = 1.0,
                  callback=None) -> torch.Tensor:
    """Text-to-image with ComfyUI's own sampler: KSampler's path (empty latent, ``comfy.sample.prepare_noise``
    with ``seed``, ``comfy.sample.sample``), then ``vae.decode``.

    Args: ``model`` MODEL (ModelPatcher); ``positive``/``negative`` CONDITIONING; ``sampler_name``/``scheduler``
    names from ``comfy.samplers.KSampler.SAMPLERS`` / ``SCHEDULERS``; ``width``/``height`` pixels (multiples
    of 8). Returns IMAGE ``[batch_size, H, W, 3]`` float 0..1 (CPU). Raises ``ValueError`` for unknown
    sampler/scheduler names. Cancel (ComfyUI interrupt) is honoured between steps by ComfyUI's sampler.
    ``callback(step, x0, x, total_steps)``: ComfyUI's per-step sampler callback (e.g. to drive a Progress).
    """
    import comfy.model_management as mm
    import comfy.sample
    import comfy.samplers

    if sampler_name not in comfy.samplers.KSampler.SAMPLERS:
        raise ValueError(f"unknown sampler {sampler_name!r}")
    if scheduler not in comfy.samplers.KSampler.SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}")
    if width % 8 or height % 8 or width <= 0 or height <= 0:
        raise ValueError(f"width/height must be positive multiples of 8, got {width}x{height}")
    with torch.no_grad():
        latent = torch.zeros([int(batch_size), 4, height // 8, width // 8], device=mm.intermediate_device())
        latent = comfy.sample.fix_empty_latent_channels(model, latent)
        noise = comfy.sample.prepare_noise(latent, int(seed))
        def step_callback(*args):  # a cancel point every sampler step (ComfyUI's sampler checks none itself)
            comfy_io.check_interrupt()
            if callback is not None:
                callback(*args)

        samples = comfy.sample.sample(model, noise, int(steps), float(cfg), sampler_name, scheduler, positive,
                                      negative, latent, denoise=float(denoise), seed=int(seed),
                                      disable_pbar=True, callback=step_callback)
        return vae.decode(samples).float().clamp(0, 1).cpu()


def _normalise_model_key(key: str) -> str:
    return key[len("model."):] if key.startswith("model.diffusion_model.") else key


def _is_clip(obj) -> bool:
    return hasattr(obj, "cond_stage_model") and hasattr(obj, "patcher")


def _normalise_clip_key(key: str, prefixes: dict[str, str]) -> str:
    """LDM checkpoint text-encoder keys → ComfyUI CLIP-patcher keys (SD1: ``cond_stage_model.transformer.``;
    SDXL te1: ``conditioner.embedders.0.transformer.``); other keys unchanged."""
    if len(prefixes) == 1:
        (pre,) = prefixes.values()
        for src in ("cond_stage_model.transformer.", "te."):
            if key.startswith(src):
                rest = key[len(src):]
                return pre + (rest if rest.startswith("text_model.") else "text_model." + rest)
    elif "te1" in prefixes and key.startswith("conditioner.embedders.0.transformer."):
        return prefixes["te1"] + key[len("conditioner.embedders.0.transformer."):]
    return key


def add_diff_patches(model, diffs: dict, strength: float = 1.0):
    """A clone of ``model`` with full-rank ``("diff", (ΔW,))`` patches, applied by ComfyUI as
    ``W + strength·ΔW`` when the model loads (``comfy.lora.calculate_weight``); the input is not changed.

    ``model``: a MODEL (ModelPatcher) or a CLIP (then a CLIP clone is returned). Keys: ComfyUI keys
    (``"diffusion_model.input_blocks...weight"``, ``"clip_l.transformer.text_model...weight"``) or LDM checkpoint
    keys (``"model.diffusion_model...."``, ``"cond_stage_model.transformer.text_model...."``). ΔW: any float
    tensor shaped like the weight. All keys and shapes are checked before anything is patched: ``KeyError``
    for keys the model lacks, ``ValueError`` for shape mismatches.
    """
    clip_prefixes = te_prefixes(model) if _is_clip(model) else None
    sd = (model.patcher if clip_prefixes is not None else model).model_state_dict()
    patches = {}
    missing = []
    for k, d in diffs.items():
        mk = _normalise_clip_key(k, clip_prefixes) if clip_prefixes is not None else _normalise_model_key(k)
        if mk not in sd:
            missing.append(k)
            continue
        if tuple(d.shape) != tuple(sd[mk].shape):
            raise ValueError(f"diff for {k} has shape {tuple(d.shape)}, weight is {tuple(sd[mk].shape)}")
        patches[mk] = ("diff", (d.detach(),))
    if missing:
        raise KeyError(f"{len(missing)} keys are not in this model, e.g. {missing[:3]}")
    out = model.clone()
    added = out.add_patches(patches, strength_patch=float(strength))
    if len(added) != len(patches):
        raise RuntimeError(f"ComfyUI accepted {len(added)} of {len(patches)} patches")
    return out


def iter_patched_weights(patcher, keys=None, extra_wrappers: dict | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, weight)`` for each key of ``patcher`` (a ModelPatcher, or a CLIP: its patcher; ``keys``
    default: all of its state dict, LDM ``model.`` prefixes accepted) with every key patch applied, one tensor
    at a time.

    Each weight: the unpatched base weight (taken from the loaded patcher's backup when some clone of the same
    model is loaded with its patches baked in), copied to float32, then ``comfy.lora.calculate_weight`` with
    the patcher's patches (ComfyUI's own LoRA/diff maths), then this patcher's weight wrappers (e.g. a
    :class:`~.comfy_host.ComfyHost`'s weight-space deltas), then ``extra_wrappers[key]``
    (``{key: [f(weight) -> weight]}``: a :class:`~.comfy_host.ComfyHost`'s activation-space deltas baked in weight
    space, :meth:`~.comfy_host.ComfyHost.delta_wrappers`). Returned as float32 CPU tensors; the model is not
    modified or loaded. ``KeyError`` for unknown keys.
    """
    import comfy.lora
    import comfy.model_management as mm
    import comfy.model_patcher

    if _is_clip(patcher):
        patcher = patcher.patcher
    base = patcher.model
    backup = dict(patcher.backup)
    for lm in mm.current_loaded_models:
        other = lm.model
        if other is not None and other is not patcher and other.model is base:
            backup.update(other.backup)
    sd_keys = list(patcher.model_state_dict().keys()) if keys is None else None
    todo = sd_keys if sd_keys is not None else [_normalise_model_key(k) for k in keys]
    for key in todo:
        try:
            weight, _set_func, convert_func = comfy.model_patcher.get_key_weight(base, key)
        except AttributeError as e:
            raise KeyError(f"{key!r} is not a weight of this model") from e
        if key in backup:
            weight = backup[key].weight
        with torch.no_grad():
            w = weight.detach().to(torch.float32, copy=True)
            if convert_func is not None:
                w = convert_func(w, inplace=True)
            if key in patcher.patches:
                w = comfy.lora.calculate_weight(patcher.patches[key], w, key)
            for f in [*patcher.weight_wrapper_patches.get(key, []), *(extra_wrappers or {}).get(key, [])]:
                w = f(w).to(torch.float32)
        yield key, w.cpu()
