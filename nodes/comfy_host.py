"""The one bridge between Concept Lab's nodes and ComfyUI's own APIs.

Everything here imports ComfyUI (``folder_paths``, ``comfy.*``) inside functions, so node classes import
without ComfyUI. Node modules use these helpers instead of touching ComfyUI directly:

* paths: :func:`input_dir`, :func:`output_dir`, :func:`safe_join`, :func:`resolve_input`,
  :func:`output_file`: every file a node reads or writes stays inside ComfyUI's input / output / models
  folders, because ``/prompt`` can be reached over the network;
* progress and cancel: :class:`Progress` (ComfyUI ``ProgressBar`` + interrupt check);
* images: :func:`image_to_numpy` / :func:`numpy_to_image` between IMAGE ``[B,H,W,3]`` float 0..1 and
  uint8 arrays.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.utils.checkpoint
from torch import nn

from ..training.conditioning import Conditioning
from ..training.families import family
from ..training.host import DeltaModule, DiffusionHost, OutputDeltaHook, check_delta_space
from .policy import PathOutsideError, check_name, confine  # noqa: F401 - PathOutsideError is re-exported for callers


def _folder_paths():
    import folder_paths  # ComfyUI

    return folder_paths


def input_dir() -> Path:
    """ComfyUI's input directory."""
    return Path(_folder_paths().get_input_directory())


def output_dir() -> Path:
    """ComfyUI's output directory."""
    return Path(_folder_paths().get_output_directory())


def safe_join(base: str | os.PathLike, relative: str) -> Path:
    """Join ``relative`` under ``base`` and refuse anything that escapes it (:func:`.policy.confine`).

    Absolute paths, ``..`` segments, backslashes, NUL, over-long names and symlinks resolving outside ``base``
    raise :class:`PathOutsideError`; an empty ``relative`` names ``base`` itself.
    """
    return confine(base, relative, "path", allow_root=True)


def resolve_input(relative: str, must_exist: bool = True) -> Path:
    """A path inside ComfyUI's input directory (see :func:`safe_join`); ``FileNotFoundError`` if missing."""
    p = safe_join(input_dir(), relative)
    if must_exist and not p.exists():
        raise FileNotFoundError(f"{relative!r} not found in ComfyUI's input folder ({input_dir()})")
    return p


def output_file(subfolder: str, filename: str) -> Path:
    """A path ``output/<subfolder>/<filename>`` inside ComfyUI's output directory (folders created)."""
    p = confine(output_dir(), f"{subfolder}/{filename}" if subfolder else filename, "output name")
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def model_file(folder_name: str, filename: str) -> Path:
    """Full path of a file listed by ComfyUI for ``folder_name`` (``"checkpoints"``, ``"loras"``, ...).

    Only names from ComfyUI's own lists resolve, so no input can name an arbitrary path.
    Raises ``FileNotFoundError``.
    """
    fp = _folder_paths()
    filename = check_name(filename, f"{folder_name} file")
    path = fp.get_full_path(folder_name, filename)
    if not path:
        raise FileNotFoundError(f"{filename!r} is not in ComfyUI's {folder_name} folder")
    return Path(path)


def model_list(folder_name: str) -> list[str]:
    """ComfyUI's file list for a models folder, or ``[]`` without ComfyUI (contract checks)."""
    try:
        return list(_folder_paths().get_filename_list(folder_name))
    except Exception:  # noqa: BLE001 - outside ComfyUI
        return []


def check_interrupt() -> None:
    """Raise ComfyUI's interrupt exception if the user pressed Cancel (no-op outside ComfyUI)."""
    try:
        import comfy.model_management as mm
    except ImportError:
        return
    mm.throw_exception_if_processing_interrupted()


class Progress:
    """ComfyUI progress bar that is also a cancel point; works (silently) outside ComfyUI.

    ``update(n=1, preview=None)``: advance, optionally with a PIL preview image; then checks interrupt.
    """

    def __init__(self, total: int):
        self.total = max(int(total), 1)
        self.done = 0
        try:
            import comfy.utils

            self._bar = comfy.utils.ProgressBar(self.total)
        except ImportError:
            self._bar = None

    def update(self, n: int = 1, preview=None) -> None:
        """Advance by ``n`` steps (optionally with a PIL preview); raises ComfyUI's interrupt if Cancel was pressed."""
        self.done = min(self.done + int(n), self.total)
        if self._bar is not None:
            if preview is not None:
                self._bar.update_absolute(self.done, self.total, ("JPEG", preview, 512))
            else:
                self._bar.update_absolute(self.done, self.total)
        check_interrupt()

    def set(self, value: int, preview=None) -> None:
        """Set the absolute step count (see :meth:`update`)."""
        self.update(int(value) - self.done, preview)


def image_to_numpy(image: torch.Tensor) -> list[np.ndarray]:
    """IMAGE ``[B,H,W,C]`` float 0..1 → list of uint8 ``[H,W,3]`` arrays (alpha dropped, gray expanded)."""
    if image.dim() == 3:
        image = image.unsqueeze(0)
    arr = (image.detach().float().clamp(0, 1).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
    out = []
    for a in arr:
        if a.shape[-1] == 1:
            a = np.repeat(a, 3, axis=-1)
        out.append(np.ascontiguousarray(a[..., :3]))
    return out


def numpy_to_image(arrays: Sequence[np.ndarray] | np.ndarray) -> torch.Tensor:
    """uint8 (or float 0..1) ``[H,W,3]`` arrays of one size → IMAGE ``[B,H,W,3]`` float32 0..1.

    Arrays of different sizes are padded (bottom/right, black) to the largest, since IMAGE is one tensor.
    """
    if isinstance(arrays, np.ndarray) and arrays.ndim == 3:
        arrays = [arrays]
    arrs = [a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32) for a in arrays]
    h = max(a.shape[0] for a in arrs)
    w = max(a.shape[1] for a in arrs)
    batch = np.zeros((len(arrs), h, w, 3), dtype=np.float32)
    for i, a in enumerate(arrs):
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=-1)
        batch[i, : a.shape[0], : a.shape[1]] = a[..., :3]
    return torch.from_numpy(batch)


# =============================================================================================================
# Models: the ComfyUI side of the host protocol (training/host.py), key maps and patch helpers.
# All ComfyUI imports stay inside functions.
# =============================================================================================================

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


def _strip_attr(key: str) -> tuple[str, str]:
    path, _, attr = key.rpartition(".")
    return path, attr


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
        dpath, dattr = _strip_attr(dkey)
        lpath, lattr = _strip_attr(lkey)
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
    root = _TE_ROOT.get(component, "text_model.")
    if not path.startswith(root):
        raise ValueError(f"{component} paths start with {root!r}, got {path!r}")
    return f"{prefixes[component]}{path}.{attr}"


def _is_flux(base_model) -> bool:
    """True for ComfyUI's Flux.1 models (``comfy.model_base.Flux`` from ``supported_models.Flux`` / ``FluxSchnell``
    / ``FluxInpaint``; Kontext loads as the same class). Chroma and Flux.2 are other classes and stay refused."""
    import comfy.model_base

    names = {c.__name__ for c in type(base_model.model_config).__mro__}
    return type(base_model) is comfy.model_base.Flux and "Flux" in names


def _arch_of(base_model) -> str:
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


def _te_prefixes(clip) -> dict[str, str]:
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


def _load(patcher, materialise: torch.nn.Module | None = None, prefix: str = "") -> None:
    """Load ``patcher`` (weight wrappers active) with ComfyUI's model management, fully, then make the
    parameters of ``materialise`` normal tensors (see :func:`_materialise_params`)."""
    import comfy.model_management as mm

    base = patcher.model
    if _is_loaded(patcher) and getattr(base, "current_weight_patches_uuid", None) == patcher.patches_uuid:
        if materialise is not None:
            _freeze(materialise)  # loaded by someone else (a sampler) outside our _load
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


def _unload(patcher) -> None:
    import comfy.model_management as mm

    for i in range(len(mm.current_loaded_models) - 1, -1, -1):
        lm = mm.current_loaded_models[i]
        if lm.model is patcher:
            mm.current_loaded_models.pop(i)
            lm.model_unload()


def _clone_input_hook(module, args):
    """Forward pre-hook: give the module a private copy of its input while autograd records.

    ComfyUI's ``comfy/clip_model.py`` CLIPLayer adds residuals in place (``x += self.mlp(self.layer_norm2(x))``);
    once text-encoder deltas make ``x`` require grad, LayerNorm has saved ``x`` for backward and the in-place add
    breaks backward ("modified by an inplace operation"). Cloning the LayerNorm input keeps ComfyUI's code
    untouched and costs one activation copy per layer, only while grad is enabled.
    """
    if torch.is_grad_enabled() and args and isinstance(args[0], torch.Tensor):
        return (args[0].clone(),) + tuple(args[1:])
    return None


#: norms whose input ComfyUI's code later changes in place (``x += ...``): per module class, the attribute names.
#: ``comfy/clip_model.py`` CLIPLayer; ``comfy/text_encoders/t5.py`` T5LayerSelfAttention / T5LayerFF
#: (``x += output`` after ``layer_norm(x)``); ``comfy/ldm/flux/layers.py`` DoubleStreamBlock (``txt += ...`` after
#: ``txt_norm1`` / ``txt_norm2``) and SingleStreamBlock (``x += ...`` after ``pre_norm``).
_INPLACE_NORMS = {"CLIPLayer": ("layer_norm1", "layer_norm2"), "T5LayerSelfAttention": ("layer_norm",),
                  "T5LayerFF": ("layer_norm",), "DoubleStreamBlock": ("txt_norm1", "txt_norm2"),
                  "SingleStreamBlock": ("pre_norm",)}


def _inplace_norms(module) -> list:
    """The norm submodules of ``module`` that need :func:`_clone_input_hook` (see :data:`_INPLACE_NORMS`)."""
    names = _INPLACE_NORMS.get(type(module).__name__, ())
    return [m for m in (getattr(module, n, None) for n in names) if m is not None]


class _DeltaGate:
    """Whether a :class:`ComfyHost`'s activation-space deltas act right now (see ``ComfyHost`` "Mechanics").

    The model's modules are shared by every clone of the MODEL, so the host's forward hooks add their deltas only
    inside calls made through this host's own patcher: its :meth:`ComfyHost.predict` / text encoding, and ComfyUI's
    sampler running the host's patcher (a ``DIFFUSION_MODEL`` wrapper on that patcher, :meth:`wrapper`). A
    checkpointed block records the state at its forward and restores it for the recomputation in backward
    (:func:`_checkpoint_block`), so gradient checkpointing recomputes exactly what the forward computed."""

    def __init__(self):
        self.depth = 0

    def __call__(self) -> bool:
        return self.depth > 0

    def set(self, on: bool):
        gate = self

        class _Ctx:
            def __enter__(self_inner):
                self_inner.prev = gate.depth
                gate.depth = 1 if on else 0

            def __exit__(self_inner, *exc):
                gate.depth = self_inner.prev

        return _Ctx()

    def on(self):
        """Context manager: deltas act inside the block (nests)."""
        gate = self

        class _Ctx:
            def __enter__(self_inner):
                gate.depth += 1

            def __exit__(self_inner, *exc):
                gate.depth -= 1

        return _Ctx()

    def wrapper(self, executor, *args, **kwargs):
        """ComfyUI ``WrappersMP.DIFFUSION_MODEL`` wrapper: the diffusion model's forward runs with deltas on."""
        with self.on():
            return executor(*args, **kwargs)


def _checkpoint_block(m: nn.Module, gate: _DeltaGate | None = None, copy_inputs: bool = False) -> None:
    """Run ``m.forward`` under ``torch.utils.checkpoint`` (non-reentrant), like ComfyUI's ``nodes_train.patch``
    (same ``org_forward`` attribute, so ``nodes_train.unpatch`` undoes it). ``gate``: the host's
    :class:`_DeltaGate`; its state at the forward is restored for the recomputation in backward (the recomputation
    runs outside the host's call). ``copy_inputs``: see :func:`_checkpoint_block_copying_inputs`."""
    org_forward = m.forward

    def fwd(state, args, kwargs):
        if copy_inputs:
            args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
            kwargs = {k: (v.clone() if k in ("img", "txt", "x") and isinstance(v, torch.Tensor) else v)
                      for k, v in kwargs.items()}
        if gate is None:
            return org_forward(*args, **kwargs)
        with gate.set(state):
            return org_forward(*args, **kwargs)

    def checkpointing_fwd(*args, **kwargs):
        state = gate() if gate is not None else False
        return torch.utils.checkpoint.checkpoint(fwd, state, args, kwargs, use_reentrant=False)

    m.org_forward = org_forward
    m.forward = checkpointing_fwd


def _checkpoint_block_copying_inputs(m: nn.Module, gate: _DeltaGate | None = None) -> None:
    """Run ``m.forward`` under ``torch.utils.checkpoint`` (non-reentrant), like ComfyUI's ``nodes_train.patch``
    (same ``org_forward`` attribute, so ``nodes_train.unpatch`` undoes it), but hand the block a fresh copy of its
    tensor inputs on every run (forward and the recomputation in backward). Needed for blocks that update their
    inputs in place: checkpointing keeps references to the inputs, not copies, so the recomputation would
    otherwise see the in-place-updated values. Copies of the stream inputs (``img``/``txt``/``x``) only."""
    _checkpoint_block(m, gate, copy_inputs=True)


def _to_normal(t: torch.Tensor) -> torch.Tensor:
    """A tensor usable by autograd: inference tensors are cloned (call inside ``inference_mode(False)``)."""
    return t.clone() if t.is_inference() else t


class ComfyHost(DiffusionHost):
    """:class:`~conceptlab.training.host.DiffusionHost` over ComfyUI's MODEL / CLIP / VAE objects.

    Args:
        model: a ComfyUI ``ModelPatcher`` (MODEL) of a UNet family (SD1.x, SD2.x, SDXL base; not the refiner) or
            Flux.1 (``model_base.Flux``: dev, schnell; any weight dtype, fp8 included).
            The host works on ``model.clone()``: the input patcher and its patches are never changed.
        clip: optional ComfyUI ``CLIP`` (cloned too); needed by :meth:`encode_prompts`, :meth:`sample`, and
            text-encoder deltas.
        vae: optional ComfyUI ``VAE``; needed by :meth:`encode_images`, :meth:`decode_latents`, :meth:`sample`.

    Mechanics: trainable deltas act in activation space by default (``delta_space="activation"``,
    training/host.py): a forward hook (:class:`~conceptlab.training.host.OutputDeltaHook`) on each adapted layer
    adds ``F.linear(x, ΔW)`` (LoRA ``((x·downᵀ)·upᵀ)·scale``) to the layer's output, whatever ComfyUI does to
    compute the layer itself (full load, lowvram casting, fp8 / manual-cast weights, its own key patches). The
    module tree is shared by every clone of the MODEL, so the hooks exist only between :meth:`install_delta` and
    :meth:`clear_deltas` / :meth:`close`, and act only inside calls made through this host's patcher (a gate set by
    :meth:`predict`, the text encoding, and a ``DIFFUSION_MODEL`` wrapper on the patcher for ComfyUI's sampler;
    :class:`_DeltaGate`); gradient checkpointing carries the gate into its recomputation. With
    ``delta_space="weight"`` the deltas are ``ModelPatcher.add_weight_wrapper`` functions instead (ComfyUI's own
    TrainLoraNode mechanism, ``comfy_extras/nodes_train.py``), applied on the fly by ComfyUI's cast ops to a copy
    of each weight. The model is loaded with ``comfy.model_management.load_models_gpu``; training runs under
    ``torch.inference_mode(False)`` (every method that may build a graph enters it) with inputs cloned out of
    inference mode. :meth:`predict` goes through the model's own ``apply_model`` with ``extra_conds`` inputs (as
    ComfyUI's sampler does) and returns the raw ε / v output captured inside that call (``apply_model`` itself
    returns denoised x0). The schedule: ``alphas_cumprod = 1 / (1 + σ²)``
    from ComfyUI's discrete ``model_sampling.sigmas`` (σ_t = sqrt((1−ᾱ_t)/ᾱ_t), Karras et al. 2022 §C.1).
    Call :meth:`close` when done (or use the host as a context manager).

    Flux (``prediction_type = "flow"``, :attr:`flow` True) follows the flow conventions of training/host.py:
    σ timesteps through the model's own CONST ``model_sampling``, BFL module paths (ComfyUI's own tree),
    components ``unet``, ``te1`` (CLIP-L) and ``t5`` (T5-XXL), ``alphas_cumprod`` empty.

    Raises ``ValueError`` for other models (EDM, SD3, Chroma, video DiTs ...), non-discrete sampling on a UNet,
    the SDXL refiner, or a CLIP whose text encoders are not the model family's.
    """

    def __init__(self, model, clip=None, vae=None, delta_space: str = "activation"):
        import comfy.model_sampling as cms

        self.delta_space = check_delta_space(delta_space)
        self._gate = _DeltaGate()
        self._act_hooks: dict[int, OutputDeltaHook] = {}
        self._weight_space: dict[tuple[str, str, str], bool] = {}

        self.patcher = model.clone()
        self.clip = clip.clone() if clip is not None else None
        self.vae = vae
        self._orig_wrappers = {k: list(v) for k, v in self.patcher.weight_wrapper_patches.items()}
        self._clip_orig_wrappers = ({k: list(v) for k, v in self.clip.patcher.weight_wrapper_patches.items()}
                                    if self.clip is not None else {})
        base = self.patcher.model
        self.arch = _arch_of(base)
        self.flow = family(self.arch).objective == "flow" if self.arch != "unknown" else False
        if self.flow:
            # ComfyUI's Flux module tree is BFL's own, which is the canonical naming of the flow families
            # (training/host.py): every Linear of the diffusion model under its own path
            dm = base.diffusion_model
            paths = [n for n, m in dm.named_modules() if isinstance(m, nn.Linear) and n]
            self._d2l = {p: p for p in paths}
            self._l2d = dict(self._d2l)
        else:
            self._d2l, self._l2d = unet_module_maps(base.model_config.unet_config)
        self._te = _te_prefixes(self.clip) if self.clip is not None else {}
        if self.clip is not None and self.arch != "unknown":
            want = family(self.arch).text_encoders
            if tuple(sorted(self._te)) != tuple(sorted(want)):
                raise ValueError(f"the CLIP has text encoder(s) {sorted(self._te)} but this {self.arch.upper()} "
                                 f"MODEL needs {list(want)}: load the CLIP from the same checkpoint as the model"
                                 + (" (Flux: DualCLIPLoader type flux with clip_l and t5xxl)" if self.flow else ""))

        ms = self.patcher.get_model_object("model_sampling")
        if self.flow:
            if not isinstance(ms, cms.CONST):
                raise ValueError(f"{type(ms).__name__}: a Flux model must use flow (CONST) model sampling")  # noqa: TRY004
            self.prediction_type = "flow"
            # unused by flow families (timesteps are sigmas, training/host.py); an empty table, never a wrong one
            self.alphas_cumprod = torch.zeros(0)
        else:
            if not isinstance(ms, cms.ModelSamplingDiscrete) or isinstance(ms, cms.ModelSamplingDiscreteEDM):
                msg = f"{type(ms).__name__}: only discrete DDPM-schedule models (SD1.x/SD2.x/SDXL) and Flux are supported"
                raise ValueError(msg)  # noqa: TRY004 - an unsupported model, not a wrong argument type
            if isinstance(ms, cms.V_PREDICTION):
                self.prediction_type = "v_prediction"
            elif isinstance(ms, cms.EPS) and not isinstance(ms, (cms.X0, cms.CONST)):
                self.prediction_type = "epsilon"
            else:
                raise ValueError(f"unsupported prediction type {type(ms).__mro__[1].__name__}")  # noqa: TRY004
            self._set_alphas_from(ms)

        self.device = torch.device(self.patcher.load_device)
        self.dtype = base.manual_cast_dtype or base.get_dtype()
        self.latent_channels = int(base.latent_format.latent_channels)
        self.vae_scale = int(getattr(vae, "downscale_ratio", 8)) if vae is not None else 8
        self._deltas: dict[tuple[str, str, str], DeltaModule] = {}
        self._hooks: list = []
        self._unet_hooks: list = []

    def _set_alphas_from(self, ms) -> None:
        with torch.inference_mode(False):  # usable by training code outside inference mode
            sigmas = ms.sigmas.detach().to("cpu", torch.float64).clone()
            self.alphas_cumprod = (1.0 / (1.0 + sigmas ** 2)).float()

    def unet_ldm_paths(self) -> dict[str, str]:
        """Diffusers → LDM UNet module paths of the loaded model, from ComfyUI's ``comfy.utils.unet_to_diffusers``
        on the model's own ``unet_config``."""
        return dict(self._d2l)

    def configure_text(self, clip_skip: int | None = None, max_token_length: int | None = None) -> list[str]:
        """kohya ``clip_skip`` through ComfyUI's own **CLIP Set Last Layer** (``clip.clip_layer(-clip_skip)``: the
        layer's output with the final layer norm, kohya's semantics) on this host's CLIP clone; SDXL ignores it, as
        kohya's SDXL trainer does. ``max_token_length``: ComfyUI encodes any caption in 75-token chunks (no 75/150/225
        truncation), which is how the LoRA will be used in ComfyUI; a non-default value is reported back as having
        no effect here (the CLI's diffusers host applies kohya's chunking exactly)."""
        msgs = super().configure_text(clip_skip, max_token_length)
        if self.max_token_length is not None:
            msgs.append(f"max_token_length = {self.max_token_length}: inside ComfyUI captions are encoded the way "
                        "ComfyUI encodes prompts (75-token chunks, never truncated); use the CLI for kohya's "
                        "150/225-token truncation")
        if self.clip_skip not in (None, 1):
            if self.arch == "sdxl":
                msgs.append("clip_skip has no effect on SDXL (kohya's SDXL trainer always uses the penultimate "
                            "layers of both text encoders)")
                self.clip_skip = None
            elif self.flow:
                msgs.append("clip_skip has no effect on Flux (it reads CLIP-L's pooled output and T5's last layer, "
                            "as kohya's flux_train_network.py does)")
                self.clip_skip = None
            elif self.clip is not None:
                self.clip.clip_layer(-self.clip_skip)
        return msgs

    def configure_schedule(self, prediction_type: str | None = None, zero_terminal_snr: bool = False) -> None:
        """Patch the clone's ``model_sampling`` as ComfyUI's own **ModelSamplingDiscrete** node does
        (``comfy_extras/nodes_model_advanced.py``: ``ModelSamplingDiscrete`` × ``EPS``/``V_PREDICTION`` with
        ``zsnr``), so training, erasure and ComfyUI's sampler all use it; :attr:`alphas_cumprod` follows.

        ComfyUI's zero-terminal-SNR table (``rescale_zero_terminal_snr_sigmas``) keeps the last ᾱ at 4.897e-8
        instead of kohya's exact 0 (σ must stay finite); the schedules agree elsewhere. Raises ``ValueError`` for
        an unknown prediction type. Flow models (Flux) keep their own ``model_sampling``: ``None``/``"flow"`` with no
        zero-terminal-SNR is accepted unchanged, and ε / v or zero-terminal SNR are refused by name
        (``ValueError``).
        """
        import comfy.model_sampling as cms

        if self.flow:
            if prediction_type not in (None, "flow"):
                raise ValueError(f"prediction_type {prediction_type!r} does not apply to {self.arch}: it is a "
                                 "rectified-flow model (velocity prediction); remove v_parameterization / "
                                 "prediction_type from the settings")
            if zero_terminal_snr:
                raise ValueError(f"zero_terminal_snr does not apply to {self.arch}: its flow schedule already ends "
                                 "at pure noise (σ = 1)")
            return
        if prediction_type not in (None, "epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction_type {prediction_type!r} (epsilon or v_prediction)")
        pred = prediction_type or self.prediction_type
        current = self.patcher.get_model_object("model_sampling")
        if pred == self.prediction_type and bool(zero_terminal_snr) == bool(getattr(current, "zsnr", False)):
            return
        kind = cms.V_PREDICTION if pred == "v_prediction" else cms.EPS

        class ModelSamplingAdvanced(cms.ModelSamplingDiscrete, kind):
            pass

        ms = ModelSamplingAdvanced(self.patcher.model.model_config, zsnr=bool(zero_terminal_snr))
        self.patcher.add_object_patch("model_sampling", ms)
        self.prediction_type = pred
        self._set_alphas_from(ms)

    # -- context manager / cleanup ------------------------------------------------------------------------
    def __enter__(self) -> ComfyHost:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove every installed delta, unload this host's patched models and free cached memory."""
        import comfy.model_management as mm

        self.set_gradient_checkpointing(False)
        self.clear_deltas()
        _unload(self.patcher)
        if self.clip is not None:
            _unload(self.clip.patcher)
        mm.soft_empty_cache()

    def set_gradient_checkpointing(self, on: bool) -> None:
        """Turn activation (gradient) checkpointing of the diffusion model on or off, with ComfyUI's own helpers
        from ``comfy_extras/nodes_train.py`` (``find_all_highest_child_module_with_forward`` + ``patch`` /
        ``unpatch``: each top-level block's forward runs under ``torch.utils.checkpoint``), as ComfyUI's
        TrainLoraNode does. The blocks belong to the shared model, so :meth:`close` always turns it off again.

        Flux: the checkpointed units are the transformer blocks (``double_blocks.N`` and ``single_blocks.N``, where
        the activations are; kohya ``library/flux_models.py`` checkpoints the same units), not the small input
        embedders that ComfyUI's helper would also wrap, and each block runs on a private copy of its stream inputs
        (:func:`_checkpoint_block_copying_inputs`): ComfyUI's Flux blocks add residuals into their *input* tensors
        in place (``txt += ...``, ``x += ...``), so with ComfyUI's plain ``patch`` the recomputation in backward
        reads already-updated inputs and the gradients are wrong (measured: tests/test_comfy_host_flux.py)."""
        from comfy_extras import nodes_train

        dm = self.patcher.model.diffusion_model
        if self.flow:
            blocks = [*dm.double_blocks, *dm.single_blocks]
        else:
            blocks = nodes_train.find_all_highest_child_module_with_forward(dm)
        for m in blocks:
            if on and not hasattr(m, "org_forward"):
                # ComfyUI's nodes_train.patch, plus the delta gate's state carried into the recomputation
                _checkpoint_block(m, self._gate, copy_inputs=self.flow)
            elif not on:
                nodes_train.unpatch(m)

    # -- names ----------------------------------------------------------------------------------------------
    def components(self) -> list[str]:
        return ["unet", *self._te]

    def _patcher_for(self, component: str):
        if component == "unet":
            return self.patcher
        if component in self._te:
            return self.clip.patcher
        if self.clip is None and component.startswith("te"):
            raise ValueError(f"component {component!r} needs a CLIP: pass clip= to ComfyHost")
        raise ValueError(f"unknown component {component!r}; this host has {self.components()}")

    def model_key(self, component: str, path: str, attr: str = "weight") -> str:
        """This host's ComfyUI patch key for a canonical path (see :func:`model_key`); ``ValueError`` if unknown."""
        if attr not in ("weight", "bias"):
            raise ValueError(f"attr must be 'weight' or 'bias', got {attr!r}")
        if component == "unet":
            if path not in self._d2l:
                raise ValueError(f"{path!r} is not a UNet module path of this model")
            return f"diffusion_model.{self._d2l[path]}.{attr}"
        self._patcher_for(component)
        root = _TE_ROOT.get(component, "text_model.")
        if not path.startswith(root):
            raise ValueError(f"{component} paths start with {root!r}, got {path!r}")
        return f"{self._te[component]}{path}.{attr}"

    def modules(self, component: str) -> dict[str, nn.Module]:
        """Leaf Linear/Conv2d modules keyed by canonical path: UNet diffusers paths (Flux: BFL paths such as
        ``double_blocks.0.img_attn.qkv``), CLIP ``text_model.*``, T5 ``encoder.block.N.*``."""
        if component == "unet":
            dm = self.patcher.model.diffusion_model
            out = {}
            for lpath, m in dm.named_modules():
                if isinstance(m, (nn.Linear, nn.Conv2d)) and lpath in self._l2d:
                    out[self._l2d[lpath]] = m
            return out
        self._patcher_for(component)
        prefix = self._te[component]
        root = prefix + _TE_ROOT.get(component, "text_model.")
        out = {}
        for name, m in self.clip.cond_stage_model.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and name.startswith(root):
                out[name[len(prefix):]] = m
        return out

    # -- deltas ---------------------------------------------------------------------------------------------
    def install_delta(self, component: str, path: str, attr: str, delta: DeltaModule) -> None:
        """Apply ``delta`` to ``<component>.<path>.<attr>``: an entry of the layer's forward hook (activation space,
        the default) or a ComfyUI weight wrapper (``delta_space="weight"``); see the class docstring.

        Raises ``ValueError`` for unknown targets, a delta whose shape differs from the target tensor, or a delta
        already installed there. Deltas meant for training must be created inside ``torch.inference_mode(False)``
        (parameters made in inference mode work for sampling but cannot be trained).
        """
        import comfy.utils

        key = self.model_key(component, path, attr)
        patcher = self._patcher_for(component)
        if (component, path, attr) in self._deltas:
            raise ValueError(f"a delta is already installed on {component}.{path}.{attr}")
        target = comfy.utils.get_attr(patcher.model, key)
        if target is None:
            raise ValueError(f"{component}.{path} has no {attr}")
        shape = getattr(delta, "weight_shape", None)  # LoRA: its declared shape (delta() is 0-d while dropped out)
        if shape is None:
            with torch.no_grad():
                shape = delta.delta().shape
        shape = tuple(shape)
        if shape != tuple(target.shape):
            raise ValueError(f"delta shape {shape} does not match {component}.{path}.{attr} {tuple(target.shape)}")
        if check_delta_space(self.delta_space) == "activation":
            import comfy.patcher_extension as pe

            layer = comfy.utils.get_attr(patcher.model, key.rpartition(".")[0])
            hook = self._act_hooks.get(id(layer))
            if hook is None:
                hook = self._act_hooks[id(layer)] = OutputDeltaHook(self._gate).register(layer)
            hook.entries.append((attr, delta, None))
            self._weight_space[(component, path, attr)] = False
            if component == "unet":
                self.patcher.remove_wrappers_with_key(pe.WrappersMP.DIFFUSION_MODEL, "conceptlab_deltas")
                self.patcher.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "conceptlab_deltas",
                                                  self._gate.wrapper)
        else:
            patcher.add_weight_wrapper(key, delta)
            self._weight_space[(component, path, attr)] = True
        self._deltas[(component, path, attr)] = delta
        if component != "unet" and not self._hooks:
            for m in self.clip.cond_stage_model.modules():
                for ln in _inplace_norms(m):
                    self._hooks.append(ln.register_forward_pre_hook(_clone_input_hook))
        if component == "unet" and self.flow and not self._unet_hooks:
            for m in self.patcher.model.diffusion_model.modules():
                for ln in _inplace_norms(m):
                    self._unet_hooks.append(ln.register_forward_pre_hook(_clone_input_hook))

    def clear_deltas(self) -> None:
        """Remove every delta this host installed (from the patchers and from the loaded modules)."""
        import comfy.utils

        import comfy.patcher_extension as pe

        for hnd in self._hooks + self._unet_hooks:
            hnd.remove()
        self._hooks.clear()
        self._unet_hooks.clear()
        for hook in self._act_hooks.values():
            hook.remove()
        self._act_hooks.clear()
        self.patcher.remove_wrappers_with_key(pe.WrappersMP.DIFFUSION_MODEL, "conceptlab_deltas")
        self._weight_space.clear()
        if not self._deltas:
            return
        ours = {id(d) for d in self._deltas.values()}
        for patcher, orig in ((self.patcher, self._orig_wrappers),
                              (self.clip.patcher if self.clip is not None else None, self._clip_orig_wrappers)):
            if patcher is None:
                continue
            for key in list(patcher.weight_wrapper_patches):
                path, attr = _strip_attr(key)
                try:
                    mod = comfy.utils.get_attr(patcher.model, path)
                except AttributeError:
                    mod = None
                lst_name = "weight_function" if attr == "weight" else "bias_function"
                if mod is not None and lst_name in vars(mod):  # only instance lists, never the class default
                    setattr(mod, lst_name, [f for f in vars(mod)[lst_name] if id(f) not in ours])
            patcher.weight_wrapper_patches = {k: list(v) for k, v in orig.items()}
            import uuid

            patcher.patches_uuid = uuid.uuid4()  # force a clean reload next time
        self._deltas.clear()

    def installed_deltas(self) -> dict[tuple[str, str, str], DeltaModule]:
        return dict(self._deltas)

    def delta_wrappers(self, which) -> dict[str, list[DeltaModule]]:
        """``{ComfyUI key: [delta]}`` of the activation-space deltas installed on ``which`` (this host's MODEL
        patcher, its CLIP or the CLIP's patcher), for baking them in weight space
        (``iter_patched_weights(which, keys, extra_wrappers=...)``; weight-space deltas are already the patcher's
        own weight wrappers)."""
        clip_side = which is not self.patcher
        out: dict[str, list[DeltaModule]] = {}
        for (comp, path, attr), d in self._deltas.items():
            if (comp != "unet") == clip_side and not self._weight_space.get((comp, path, attr), False):
                out.setdefault(self.model_key(comp, path, attr), []).append(d)
        return out

    # -- loading ----------------------------------------------------------------------------------------------
    def load(self) -> None:
        """Load the patched UNet (and CLIP) on the compute device with the deltas active (cheap if loaded)."""
        _load(self.patcher, self.patcher.model.diffusion_model, "diffusion_model.")

    def _load_clip(self) -> None:
        if self.clip is None:
            raise ValueError("this operation needs a CLIP: pass clip= to ComfyHost")
        _load(self.clip.patcher, self.clip.cond_stage_model, "")

    # -- conditioning, prediction, VAE ------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """The :class:`~conceptlab.training.conditioning.Conditioning` of ``prompts`` from the CLIP object's own
        tokenizer and ``encode_from_tokens(..., return_pooled=True)`` (prompt weighting syntax works):
        ``context`` ``[B, 77·k, D]`` (k = 1 unless a prompt needs more 77-token chunks; shorter ones are repeated
        to the common length as ComfyUI's conditioning batching does) in the compute dtype on :attr:`device`, and
        ``pooled`` ``[B, P]`` for families that use it (SDXL: OpenCLIP-G's projected pooled output). Flux: ``context``
        is T5-XXL's last hidden state ``[B, L, 4096]`` (L ≥ 256, ComfyUI's Flux T5 minimum; a batch is padded with
        T5 pad tokens to its longest prompt) and ``pooled`` CLIP-L's pooled output ``[B, 768]`` (ComfyUI
        ``FluxClipModel.encode_token_weights``). Differentiable when text-encoder deltas are installed and grad is
        enabled. ``ValueError`` without CLIP.
        """
        self._load_clip()
        rows = []
        use_pooled = family(self.arch).pooled if self.arch != "unknown" else True
        with torch.inference_mode(False):
            toks = [self.clip.tokenize(str(p)) for p in prompts]
            if "t5" in self._te:
                # T5 sequences are not chunked: a batch is padded with T5 pad tokens to its longest prompt through
                # ComfyUI's own tokenizer option (what ComfyUI encodes for a longer min_length), never repeated
                n = max((sum(len(b) for b in t.get("t5xxl", [])) for t in toks), default=0)
                toks = [t if sum(len(b) for b in t.get("t5xxl", [])) == n else
                        self.clip.tokenize(str(p), tokenizer_options={"t5xxl_min_length": n})
                        for p, t in zip(prompts, toks)]
            for tokens in toks:
                with self._gate.on():
                    cond, pooled = self.clip.encode_from_tokens(tokens, return_pooled=True)
                rows.append(Conditioning(cond, pooled if use_pooled else None))
            return Conditioning.cat(rows).to(self.device, self.dtype)

    #: how the host-neutral Conditioning feeds ComfyUI's ``BaseModel.extra_conds`` keyword arguments (the names
    #: ``comfy/samplers.py`` ``encode_model_conds`` passes from a CONDITIONING entry)
    _SIZE_KWARGS = ("height", "width", "crop_h", "crop_w", "target_height", "target_width")

    def _model_conds(self, cond: Conditioning, x: torch.Tensor) -> dict:
        """ComfyUI model inputs (``c_crossattn``, ``y``, ``guidance``, ...) for ``cond``, built row by row with the
        model's own ``extra_conds`` (SDXL: ``encode_adm`` from ``pooled_output`` and the six size ids) and
        concatenated along the batch, as ComfyUI's sampler does for a batch of conditionings."""
        base = self.patcher.model
        per_key: dict[str, list] = {}
        for i in range(len(cond)):
            params = {"cross_attn": cond.context[i:i + 1], "device": x.device, "noise": x[i:i + 1],
                      "prompt_type": "positive", "width": x.shape[-1] * 8, "height": x.shape[-2] * 8}
            if cond.pooled is not None:
                params["pooled_output"] = cond.pooled[i:i + 1]
            ids = cond.extras.get("size_ids")
            if ids is not None:
                params.update({k: int(round(float(v))) for k, v in zip(self._SIZE_KWARGS, ids[i].tolist())})
            if "guidance" in cond.extras:
                params["guidance"] = float(cond.extras["guidance"][i])
            for k, v in base.extra_conds(**params).items():
                per_key.setdefault(k, []).append(v.process_cond(batch_size=1, device=x.device).cond)
        return {k: torch.cat([_to_normal(t) for t in v]) for k, v in per_key.items()}

    def predict(self, x_t: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning | torch.Tensor) -> torch.Tensor:
        """Raw network output ``[B, C, h, w]`` (ε, v or flow velocity, compute dtype) through ComfyUI's own model call.

        DDPM families: ``x_t`` is DDPM-scaled (``√ᾱ·x0 + √(1−ᾱ)·ε``) and ``timesteps`` are integer indices ``[B]`` in
        ``[0, T)``; σ = ``model_sampling.sigmas[t]`` and the latent goes into ComfyUI's frame
        ``x = x0 + σ·ε = x_t·√(1+σ²)`` (Karras et al. 2022, Table 1). Flow families (Flux): ``x_t`` is
        ``(1 − σ)·x0 + σ·ε`` and ``timesteps`` are float sigmas ``[B]`` in ``[0, 1]``, which is ComfyUI's own frame
        (``CONST.noise_scaling``), so both go in unchanged; the returned velocity is unpacked ``[B, 16, h, w]``
        (ComfyUI's Flux ``_forward`` packs 2×2 patches and builds position ids itself).

        The call is the one ComfyUI's sampler makes: model inputs from the model's own ``extra_conds``
        (:meth:`_model_conds`: ``c_crossattn``, ``y`` = pooled, Flux ``guidance``), then
        ``model.apply_model(x, σ, ...)``, which applies ``calculate_input`` (DDPM: x/√(1+σ²) = x_t; CONST: x), the
        σ → timestep map of the model's ``model_sampling`` (Flux: t = σ, embedded ×1000 by the network), the
        patcher's transformer options and weight wrappers. The network's raw output is taken from inside that call
        by a ComfyUI ``DIFFUSION_MODEL`` wrapper (``comfy/patcher_extension.py``), so it is exactly the ε / v /
        velocity the network produced; the objectives are expressed on it unchanged (``RuntimeError`` for a model
        whose forward runs no such wrappers). Runs outside inference mode (inputs cloned if needed), so gradients
        reach the installed deltas when grad is enabled. ``ValueError`` for an SDXL or Flux model given no pooled
        embedding.
        """
        import comfy.patcher_extension as pe

        cond = Conditioning.wrap(cond)
        base = self.patcher.model
        if (getattr(base, "adm_channels", 0) or self.flow) and cond.pooled is None:
            raise ValueError(f"this model ({self.arch}) needs a pooled text embedding: encode the prompts with this "
                             "host")
        self.load()
        with torch.inference_mode(False):
            x = _to_normal(x_t).to(self.device, torch.float32)
            if self.flow:
                sigma = _to_normal(timesteps).to(self.device, torch.float32)
                if sigma.dim() == 0:
                    sigma = sigma.expand(x.shape[0])
                if bool(((sigma < 0) | (sigma > 1)).any()):
                    raise ValueError("flow models take sigmas in [0, 1] as timesteps (not kohya's σ·1000)")
                x_in = x
            else:
                t = _to_normal(timesteps).to(self.device).long()
                if t.dim() == 0:
                    t = t.expand(x.shape[0])
                ms = self.patcher.get_model_object("model_sampling")
                sigma = ms.sigmas.to(self.device, torch.float32)[t]
                x_in = x * (sigma ** 2 + 1.0).sqrt().view(-1, *([1] * (x.dim() - 1)))
            c = cond.map_tensors(_to_normal).to(self.device, self.dtype)
            kwargs = self._model_conds(c, x)
            captured: dict[str, torch.Tensor] = {}

            def capture(executor, *args, **kw):
                out = executor(*args, **kw)
                captured["out"] = out
                return out

            topts = dict(self.patcher.model_options.get("transformer_options", {}))
            wrappers = {k: dict(v) for k, v in topts.get("wrappers", {}).items()}
            wrappers.setdefault(pe.WrappersMP.DIFFUSION_MODEL, {}).setdefault("conceptlab_capture", []).append(capture)
            topts["wrappers"] = wrappers
            topts["sigmas"] = sigma
            c_crossattn = kwargs.pop("c_crossattn", None)
            with self._gate.on():
                base.apply_model(x_in, sigma, c_crossattn=c_crossattn, transformer_options=topts, **kwargs)
            if "out" not in captured:
                raise RuntimeError(f"{type(base.diffusion_model).__name__} does not run ComfyUI's DIFFUSION_MODEL "
                                   "wrappers, so its raw output cannot be read; this model family is not supported")
            return captured["out"]

    def _latent_format(self):
        return self.patcher.get_model_object("latent_format")

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """VAE-encode ``[B,3,H,W]`` in ``[-1,1]`` → scaled latents ``[B,4,H/8,W/8]`` fp32 CPU (posterior mean ×
        the model's latent scale, ``latent_format.process_in``; H, W cropped to multiples of 8 as ComfyUI does)."""
        if self.vae is None:
            raise ValueError("encode_images needs a VAE: pass vae= to ComfyHost")
        with torch.inference_mode(False), torch.no_grad():
            img = ((_to_normal(pixels.detach()).float().cpu() + 1.0) / 2.0).clamp(0, 1).movedim(1, -1)
            raw = self.vae.encode(img)
            return _to_normal(self._latent_format().process_in(raw.float()).cpu())

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents ``[B,4,h,w]`` → images ``[B,3,8h,8w]`` float 0..1 on CPU (``process_out`` + VAE)."""
        if self.vae is None:
            raise ValueError("decode_latents needs a VAE: pass vae= to ComfyHost")
        with torch.inference_mode(False), torch.no_grad():
            raw = self._latent_format().process_out(_to_normal(latents.detach()).float().cpu())
            return _to_normal(self.vae.decode(raw).float().movedim(-1, 1).clamp(0, 1).cpu())

    def conditioning(self, prompt: str) -> list:
        """ComfyUI CONDITIONING for ``prompt`` from this host's (patched) CLIP, like CLIPTextEncode."""
        self._load_clip()
        with torch.no_grad(), self._gate.on():
            return self.clip.encode_from_tokens_scheduled(self.clip.tokenize(str(prompt)))

    def sample(self, prompts: Sequence[str], negative: str = "", *, width: int = 512, height: int = 512,
               steps: int = 20, cfg: float = 7.0, seed: int = 0, sampler_name: str = "euler",
               scheduler: str = "normal", guidance: float | None = None) -> torch.Tensor:
        """Images ``[B,3,H,W]`` 0..1 (CPU) from ComfyUI's own sampler (``comfy.sample.sample``) on the patched
        clone with the current deltas: prompt ``i`` uses noise seed ``seed + i`` (ComfyUI's CPU noise).
        Needs CLIP and VAE (``ValueError`` otherwise).

        Flux (flow families), with :class:`~conceptlab.training.flux_host.FluxHost`'s meanings (kohya
        ``sample_image_inference``): ``guidance`` is the distilled guidance, kohya ``--g`` (``None`` = 3.5, ComfyUI's
        Flux default), put on the conditioning as ComfyUI's **FluxGuidance** node does (schnell's model has no
        guidance embedding and ignores it); ``cfg`` is the true classifier-free guidance, kohya ``--l`` (1 = off:
        ComfyUI's sampler then skips the negative pass, as ComfyUI's Flux templates sample). The sampler runs on the
        model's own ``model_sampling`` (``ModelSamplingFlux``; schnell ``ModelSamplingDiscreteFlow``).
        """
        if self.vae is None or self.clip is None:
            raise ValueError("sample() needs both clip= and vae=")
        if guidance is not None and not self.flow:
            raise ValueError(f"guidance is the Flux guidance embedding; this {self.arch} model has none")
        if self.flow and guidance is None:
            guidance = 3.5  # comfy/model_base.py Flux.extra_conds default; FluxHost's DEFAULT_GUIDANCE
        neg = self.conditioning(negative)
        imgs = []
        for i, p in enumerate(prompts):
            pos = self.conditioning(p)
            if self.flow:
                import node_helpers  # ComfyUI: what the FluxGuidance node calls

                pos = node_helpers.conditioning_set_values(pos, {"guidance": float(guidance)})
                neg_i = node_helpers.conditioning_set_values(neg, {"guidance": float(guidance)})
            else:
                neg_i = neg
            img = sample_images(self.patcher, pos, neg_i, self.vae, seed=int(seed) + i,
                                steps=steps, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler,
                                width=width, height=height)
            imgs.append(img.movedim(-1, 1))
        return torch.cat(imgs, 0)


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
            check_interrupt()
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
    clip_prefixes = _te_prefixes(model) if _is_clip(model) else None
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
    :class:`ComfyHost`'s weight-space deltas), then ``extra_wrappers[key]`` (``{key: [f(weight) -> weight]}``: a
    :class:`ComfyHost`'s activation-space deltas baked in weight space, :meth:`ComfyHost.delta_wrappers`). Returned
    as float32 CPU tensors; the model is not modified or loaded. ``KeyError`` for unknown keys.
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
