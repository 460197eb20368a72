"""The trainer's sample images: kohya sample prompts rendered through the host's own sampler each epoch, and the
palette metrics measured on them (the pixel-art numbers the best-epoch selection can use).

:func:`render_samples` applies kohya's per-prompt options (:mod:`.sample_prompts`) over the trainer's sample
settings; :func:`sample_metrics` averages :func:`.report.palette_metrics` over an epoch's samples;
:func:`dataset_effective_colors` is the same measure on the training images, the target of
``best_metric = "effective_colors_vs_dataset"``. Used by :class:`.trainer.LoraTrainer`.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Sequence

import numpy as np

from ..host import DiffusionHost
from .config import TrainConfig
from .dataset import KohyaDataset
from .report import _to_uint8, palette_metrics
from .sample_prompts import SamplePrompt, comfy_sampler, round_size

logger = logging.getLogger(__name__)


def render_samples(host: DiffusionHost, cfg: TrainConfig, prompts: Sequence[str], size: tuple[int, int],
                   warned: set[str]) -> list[np.ndarray]:
    """One image per prompt (uint8 ``[H, W, 3]``) from ``host.sample``; kohya per-prompt options
    (:mod:`.sample_prompts`: ``--n --w --h --s --d --l --ss --g``) override the trainer's sample settings
    (``cfg.sample_*``; ``size`` = ``(width, height)`` in pixels when ``cfg`` gives none, the training resolution);
    seeds ``sample_seed + i`` unless a prompt gives ``--d``. Flux hosts (a ``guidance`` argument): true CFG defaults
    to 1.0 as in kohya's ``flux_train_utils.py`` line 159 and ``--g`` is the distilled guidance. Options the host
    cannot honour are warned about by name, a sampler name once per ``warned`` set (the caller's, kept across
    epochs)."""
    specs = {sp.prompt: sp for sp in cfg.prompt_specs}
    w0 = cfg.sample_width or size[0]
    h0 = cfg.sample_height or size[1]
    seed = cfg.sample_seed if cfg.sample_seed is not None else cfg.seed
    params = inspect.signature(host.sample).parameters
    takes_sampler = "sampler_name" in params
    native = getattr(host, "native_sampler", "ddim")
    # kohya's Flux samples: true CFG ("scale") defaults to 1.0 (flux_train_utils.py line 159), --g = guidance
    cfg_default = cfg.sample_cfg if "guidance" not in params or cfg.sample_cfg != TrainConfig.sample_cfg else 1.0
    out = []
    for i, p in enumerate(prompts):
        sp = specs.get(p) or SamplePrompt(p)
        kw = {}
        name = sp.sample_sampler or cfg.sample_sampler
        if takes_sampler:
            kw["sampler_name"], kw["scheduler"] = comfy_sampler(name)
        elif (name or native).lower() not in (native, TrainConfig.sample_sampler) and "sampler" not in warned:
            logger.warning("sample_sampler %s has no effect: this model host samples with %s only", name, native)
            warned.add("sampler")
        if "guidance" in params:
            kw["guidance"] = sp.guidance_scale
        elif sp.guidance_scale is not None:
            logger.warning("sample prompt option --g (distilled guidance, Flux) has no effect on this model")
        img = host.sample([p], sp.negative_prompt if sp.negative_prompt is not None else cfg.sample_negative,
                          width=round_size(sp.width or w0) if sp.width else w0,
                          height=round_size(sp.height or h0) if sp.height else h0,
                          steps=sp.sample_steps or cfg.sample_steps,
                          cfg=sp.scale if sp.scale is not None else cfg_default,
                          seed=sp.seed if sp.seed is not None else seed + i, **kw)
        out.append(_to_uint8(img[0]))
    return out


def sample_metrics(samples: Sequence[np.ndarray], cfg: TrainConfig, target: float | None) -> dict[str, Any]:
    """The epoch record's sample columns: each :func:`.report.palette_metrics` value (against ``cfg.palette_list``,
    on ``cfg.sample_grid_cells``) averaged over the samples that have it; with a ``target`` (the dataset's effective
    colours) also ``effective_colors_vs_dataset`` and ``dataset_effective_colors``."""
    record: dict[str, Any] = {}
    mets = [palette_metrics(im, cfg.palette_list, cfg.sample_grid_cells) for im in samples]
    keys = sorted(set().union(*[m.keys() for m in mets])) if mets else []
    for k in keys:
        vals = [m[k] for m in mets if k in m]
        if vals:
            record[k] = float(np.mean(vals))
    if "effective_colors" in record and target is not None:
        record["effective_colors_vs_dataset"] = record["effective_colors"]
        record["dataset_effective_colors"] = target
    return record


def dataset_effective_colors(dataset: KohyaDataset, cfg: TrainConfig) -> float | None:
    """Median ``effective_colors`` (:func:`.report.palette_metrics`) of the first 256 training images, ``None`` when
    no image has it."""
    vals = []
    for e in dataset.entries[:256]:
        img = ((dataset.load_image(e) + 1) * 127.5).round().clamp(0, 255).byte()
        m = palette_metrics(img.permute(1, 2, 0).numpy(), cfg.palette_list, cfg.sample_grid_cells)
        if "effective_colors" in m:
            vals.append(m["effective_colors"])
    return float(np.median(vals)) if vals else None
