"""Metadata of merged files (:mod:`training.merge.files`): the ``conceptlab.recipe`` JSON, SAI ``modelspec.*``
labels, and the reserved input-hash placeholders filled in once the hashes are known.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from typing import TYPE_CHECKING, Mapping

import torch

from ...formats.safetensors_io import SafetensorsStreamWriter, WeightFile
from .methods import MethodOptions

if TYPE_CHECKING:  # annotations only: files.py imports this module
    from .files import _Source

RECIPE_KEY = "conceptlab.recipe"
RECIPE_FORMAT = "conceptlab.merge/1"

MODELSPEC_ARCH = {
    "sd1": "stable-diffusion-v1",
    "sd2": "stable-diffusion-v2-768-v",
    "sdxl": "stable-diffusion-xl-v1-base",
    "flux": "flux-1-dev",
}


SD2_V_NORM_STD = 0.09  # ComfyUI comfy/supported_models.py SD20.model_type: std of this bias > 0.09 -> v-prediction
_SD2_V_PROBE = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"


def modelspec_architecture(arch: str, source: "_Source | None" = None) -> tuple[str | None, str | None]:
    """``(modelspec.architecture, modelspec.prediction_type)`` for a merge whose model A is ``source``.

    A's own ``modelspec.architecture`` (and prediction type) is kept when its file has one of the same family.
    Otherwise: SD1
    ``stable-diffusion-v1``; SDXL ``stable-diffusion-xl-v1-base``; SD2 ``stable-diffusion-v2-768-v`` (v) when A
    has a ``v_pred`` key or ComfyUI's test says v-prediction (``comfy/supported_models.py`` ``SD20.model_type``:
    4 input channels and std of ``output_blocks.11.1.transformer_blocks.0.norm1.bias`` > 0.09), else
    ``stable-diffusion-v2-512`` (ε); Flux ``flux-1-dev`` when A has the guidance embedder (``guidance_in.*``),
    else ``flux-1-schnell``. Names from the SAI model spec 1.0 as kohya writes them
    (sd-scripts ``library/sai_model_spec.py``). Unknown architectures: ``(None, None)``.
    """
    md = {}
    if source is not None and source.is_file:
        md = getattr(source.obj, "metadata", None) or {}
    family = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2", "sdxl": "stable-diffusion-xl",
              "flux": "flux"}.get(arch)
    if family and str(md.get("modelspec.architecture", "")).startswith(family):
        return md["modelspec.architecture"], md.get("modelspec.prediction_type")
    if arch == "sd2" and source is not None:
        keys = set(source.keys())
        v = "v_pred" in keys
        if not v and _SD2_V_PROBE in keys:
            conv_in = "model.diffusion_model.input_blocks.0.0.weight"
            in_ch = source.shape(conv_in)[1] if conv_in in keys else 4
            if in_ch == 4:
                t = source.obj.get(_SD2_V_PROBE) if source.is_file else source.obj[_SD2_V_PROBE]
                v = float(torch.std(t.to(torch.float32), unbiased=False)) > SD2_V_NORM_STD
        return ("stable-diffusion-v2-768-v", "v") if v else ("stable-diffusion-v2-512", "epsilon")
    if arch == "flux" and source is not None:
        dev = any(k.startswith("guidance_in.") or ".guidance_in." in k or "guidance_embedder." in k
                  for k in source.keys())
        return ("flux-1-dev" if dev else "flux-1-schnell"), None
    return MODELSPEC_ARCH.get(arch) if arch != "flux" else None, None


def _modelspec(arch: str, title: str, source: "_Source | None" = None) -> dict[str, str]:
    spec = {"modelspec.sai_model_spec": "1.0.0", "modelspec.title": title,
            "modelspec.date": _dt.date.today().isoformat()}
    name, pred = modelspec_architecture(arch, source)
    if name:
        spec["modelspec.architecture"] = name
    if pred:
        spec["modelspec.prediction_type"] = pred
    return spec


def _recipe(method, plan, density, seed, dtype_name, inputs, lora_info, report, options=None) -> dict:
    from ... import __version__

    r = {"format": RECIPE_FORMAT, "tool": f"conceptlab {__version__}", "method": report.method,
         "convention": "alpha is the weight of B: (1-alpha)*A + alpha*B",
         "arch": plan.arch, **plan.describe(), "dtype": dtype_name, "inputs": inputs}
    if method in ("ties", "dare", "della"):
        r["density"] = float(density)
    if method in ("dare", "della"):
        r["seed"] = int(seed)
    r.update((options or MethodOptions()).describe(method))
    if lora_info:
        r["lora"] = lora_info
    return r


def read_recipe(path: str | os.PathLike) -> dict:
    """The ``conceptlab.recipe`` of a merged file as a dict (``{}`` if it has none)."""
    with WeightFile(path) as wf:
        raw = wf.metadata.get(RECIPE_KEY)
    return json.loads(raw) if raw else {}


_PLACEHOLDER = "sha256-pending-{}"


def _placeholder(tag: str) -> str:
    s = _PLACEHOLDER.format(tag)
    return s + "-" * (64 - len(s))


def _patch_hashes(writer: SafetensorsStreamWriter, hashes: Mapping[str, str]) -> None:
    """Overwrite the reserved 64-character placeholders in the already written header with the hashes
    (same length, so offsets and the header length do not change)."""
    for tag, digest in hashes.items():
        try:
            writer.replace_in_header(_placeholder(tag), digest)
        except ValueError as exc:
            raise RuntimeError(f"cannot place the hash of input {tag} in the header: {exc}") from exc
