"""The LoRA training loop with kohya semantics: schedule, objective, files, metadata, resume, per-epoch
evaluation and best-epoch selection. Host-neutral: it sees only a :class:`~.host.DiffusionHost`.

What follows kohya-ss/sd-scripts (``train_network.py``, ``library/train_util.py``,
``library/custom_train_functions.py``; read at commit 48d368f, re-implemented):

* schedule: ``len(dataloader)`` = bucket batches per epoch; ``updates/epoch = ceil(batches / grad_accum)``;
  ``max_train_epochs`` (if given) sets ``max_train_steps = epochs × updates/epoch``; epochs are 1-based in
  captions and file names; a partial accumulation at the end of an epoch still steps (accelerate's
  end-of-dataloader sync);
* objective: noise ε ~ N(0, I) (+ ``noise_offset``·N(0, 1) per image and channel, Guttenberg 2023 as in
  ``apply_noise_offset``), timesteps uniform integers in ``[min_timestep, max_timestep)``, the target in the
  model's own parameterization (ε, or v = √ᾱ·ε − √(1−ᾱ)·x0), per-sample mean loss (``l2``, ``l1``, ``huber``,
  ``smooth_l1`` with kohya's ``huber_schedule`` ``snr``/``exponential``/``constant``), min-SNR-γ weighting
  (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy", Eq. 8: weight
  ``min(SNR, γ)/SNR`` for ε, ``min(SNR, γ)/(SNR+1)`` for v), gradient clipping at ``max_grad_norm``;
* files: ``<name>-<epoch:06d>.safetensors`` every ``save_every_n_epochs`` (not for the last epoch), the last as
  ``<name>.safetensors``; kohya keys and ``ss_*`` metadata; ``save_precision`` fp16 by default;
* validation: kohya's epoch validation — 4 fixed timesteps ``linspace(min_t, max_t, 6)[1:-1]`` (200, 400, 600,
  800 for the full range), noise from a generator seeded with ``validation_seed`` (default ``seed``), mean loss
  over validation images × timesteps; captions are used raw (no dropout / shuffle) so the number is
  deterministic.

What Concept Lab adds: training state saved beside each checkpoint as safetensors + JSON (never pickle) with
every RNG the run uses, so a resumed run reproduces an uninterrupted one bit for bit; a NaN/Inf guard; sample
images and palette metrics each epoch; a per-epoch table (JSON, table image, loss curve); best-epoch selection
by a metric and direction with optional early stopping; the winner written as ``<name>-best.safetensors``.

All randomness comes from dedicated generators (``torch.Generator`` for noise/timesteps and LoRA dropout,
``random.Random`` for captions and flips), never from global state, so evaluation and sampling (which use
their own seeds) cannot shift the training stream.
"""

from __future__ import annotations

import ast
import contextlib
import datetime
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from ..formats.safetensors_io import atomic_write_text, load_state_dict, save_safetensors
from .captions import CaptionConfig, process_caption
from .dataset import DatasetOptions, KohyaDataset
from .conditioning import Conditioning, size_ids
from .families import family, modelspec_arch
from .host import DiffusionHost, add_noise, prediction_target
from .lora import LoRANetwork
from .objective import FlowSettings, objective_for
from .noise import NoiseOptions, max_norm_regularization, post_process_loss, sample_training_noise

logger = logging.getLogger(__name__)

OPTIMIZERS = ("AdamW", "AdamW8bit", "Adafactor", "Prodigy", "SGDNesterov")
SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear", "polynomial")
LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
BEST_METRICS = ("auto", "val_loss", "train_loss", "effective_colors_vs_dataset", "in_palette_frac", "none")
STATE_SCHEMA = "conceptlab.lora_train_state/1"
EPOCHS_SCHEMA = "conceptlab.lora_epochs/1"


class TrainingDivergedError(RuntimeError):
    """The loss (or the gradient norm) became NaN/Inf; the last good checkpoint is kept."""


class OptimizerUnavailableError(ValueError):
    """The requested optimizer cannot run here (package missing or no backend for this device)."""


# ------------------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------------------

@dataclass
class TrainConfig(FlowSettings):
    """Training settings, named as kohya's ``train_network.py`` arguments (defaults are kohya's unless noted).

    Schedule: ``max_train_epochs`` (wins when set) or ``max_train_steps``; ``train_batch_size``;
    ``gradient_accumulation_steps``; ``seed``.
    Network: ``network_dim``, ``network_alpha`` (scale = alpha/dim), ``conv_dim``/``conv_alpha`` (LoCon; also
    read from ``network_args = ["conv_dim=4", ...]``), ``network_dropout`` (rank dropout, see
    :mod:`.lora`), ``module_dropout``, ``network_train_unet_only`` / ``network_train_text_encoder_only``
    (kohya trains both by default).
    Optimisation: ``optimizer_type`` (:data:`OPTIMIZERS`), ``optimizer_args`` (``["weight_decay=0.1", ...]``),
    ``learning_rate``, ``unet_lr``, ``text_encoder_lr``, ``lr_scheduler`` (:data:`SCHEDULERS`),
    ``lr_warmup_steps`` (int, or a fraction < 1 of the total steps), ``lr_scheduler_num_cycles``,
    ``lr_scheduler_power``, ``max_grad_norm`` (0 = off), ``mixed_precision`` (``no``/``fp16``/``bf16``; CPU
    always runs fp32), ``gradient_checkpointing``.
    Objective: ``noise_offset``, ``min_snr_gamma``, ``loss_type`` (:data:`LOSS_TYPES`), ``huber_schedule``,
    ``huber_c``, ``huber_scale``, ``min_timestep``, ``max_timestep`` (None = T), ``clip_skip`` / ``max_token_length`` (kohya's text
    encoding, applied by the host: :meth:`.host.DiffusionHost.configure_text`), ``v_parameterization`` (the
    model predicts v: kohya's flag for SD2-v / NoobAI-vpred-style models; a ComfyUI MODEL already says so through
    its ``model_sampling``), ``zero_terminal_snr`` (rescale the schedule to zero terminal SNR as kohya does; the
    samples rendered each epoch use the same schedule; see :meth:`.host.DiffusionHost.configure_schedule`).
    Files: ``output_dir`` (LoRA files), ``output_name``, ``save_every_n_epochs``, ``save_precision``,
    ``save_state`` (Concept Lab default True), ``state_dir`` (training states, epoch table, plots and samples;
    default ``output_dir`` — the node keeps them out of ``loras/`` so LoraLoader lists only LoRAs), ``resume``
    (a ``-state.json`` path, or ``"auto"`` for the newest in state_dir), ``training_comment``.
    Evaluation (Concept Lab): ``sample_prompts`` (list or newline-separated), ``sample_negative``,
    ``sample_every_n_epochs`` (0 = off), ``sample_steps``, ``sample_cfg``, ``sample_width``/``sample_height``
    (0 = training resolution), ``sample_seed``, ``palette`` (hex colours for in-palette metrics, optional), ``sample_grid_cells`` (grid override for the
    samples' palette metrics: ``"native"`` = one cell per pixel for renders at the art's native size, an int or
    ``[cells_x, cells_y]``; default: detect),
    ``validate_every_n_epochs``, ``best_metric`` (:data:`BEST_METRICS` or any numeric column),
    ``best_direction`` (``auto``/``min``/``max``), ``early_stopping_patience`` (0 = off).
    Flow families (Flux): kohya's ``flux_train_network.py`` options, :class:`.objective.FlowSettings`.
    """

    output_dir: str = "output"
    output_name: str = "last"
    max_train_epochs: int | None = None
    max_train_steps: int = 1600
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    seed: int = 42
    network_module: str = "networks.lora"
    network_dim: int = 4
    network_alpha: float = 1.0
    network_args: list = field(default_factory=list)
    conv_dim: int | None = None
    conv_alpha: float | None = None
    network_dropout: float = 0.0
    module_dropout: float = 0.0
    network_train_unet_only: bool = False
    network_train_text_encoder_only: bool = False
    optimizer_type: str = "AdamW"
    optimizer_args: list = field(default_factory=list)
    learning_rate: float = 1e-4
    unet_lr: float | None = None
    text_encoder_lr: float | None = None
    lr_scheduler: str = "constant"
    lr_warmup_steps: float = 0
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    noise_offset: float | None = None
    min_snr_gamma: float | None = None
    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    min_timestep: int = 0
    max_timestep: int | None = None
    clip_skip: int | None = None
    max_token_length: int | None = None
    # kohya noise / loss options (training/noise.py; issue 14)
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float | None = None
    ip_noise_gamma_random_strength: bool = False
    debiased_estimation_loss: bool = False
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: float | None = None
    scale_weight_norms: float | None = None
    prior_loss_weight: float = 1.0
    # continue a LoRA (kohya network_weights / dim_from_weights)
    network_weights: str | None = None
    dim_from_weights: bool = False
    # kohya sampling options (training/sample_prompts.py)
    sample_sampler: str = "ddim"
    sample_at_first: bool = False
    no_metadata: bool = False
    v_parameterization: bool = False
    zero_terminal_snr: bool = False
    save_every_n_epochs: int | None = None
    save_precision: str = "fp16"
    save_state: bool = True
    state_dir: str | None = None
    resume: str | None = None
    training_comment: str = ""
    sample_prompts: Any = None
    sample_negative: str = ""
    sample_every_n_epochs: int = 1
    sample_steps: int = 20
    sample_cfg: float = 7.0
    sample_width: int = 0
    sample_height: int = 0
    sample_seed: int | None = None
    palette: Any = None
    sample_grid_cells: Any = None
    validate_every_n_epochs: int = 1
    best_metric: str = "auto"
    best_direction: str = "auto"
    early_stopping_patience: int = 0

    # -- parsing ---------------------------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> tuple["TrainConfig", list[str]]:
        """Build from a flat (kohya) mapping. Returns ``(config, unknown_keys)``; ``None`` values are skipped.

        ``network_args`` entries ``conv_dim``/``conv_alpha``/``dropout``/``module_dropout`` are applied.
        Raises ``ValueError`` for values of the wrong type or out of range, and
        :class:`OptimizerUnavailableError` for an unknown ``optimizer_type`` (see :meth:`validate`); an unknown
        keyword is returned in ``unknown_keys``, not raised.
        """
        from .kohya_args import normalize_settings
        from .network_args import parse_network_args

        values = normalize_settings(values)
        names = {f.name for f in fields(cls)}
        kw, unknown = {}, []
        for k, v in values.items():
            if k in names:
                if v is not None:
                    kw[k] = v
            else:
                unknown.append(k)
        cfg = cls(**kw)
        # kohya network_args (training/network_args.py); unknown entries raise ValueError naming them
        if str(cfg.network_module).startswith("lycoris"):
            from .lycoris_net import parse_lycoris_args

            na = parse_lycoris_args(cfg.network_args)
        else:
            na = parse_network_args(cfg.network_args)
        if "conv_dim" in na or "conv_lora_dim" in na:
            cfg.conv_dim = int(na.get("conv_dim", na.get("conv_lora_dim")))
        if "conv_alpha" in na:
            cfg.conv_alpha = float(na["conv_alpha"])
        if "module_dropout" in na:
            cfg.module_dropout = float(na["module_dropout"])
        for key in ("dropout", "rank_dropout"):
            if key in na:
                cfg.network_dropout = float(na[key])
        cfg._raw = {k: v for k, v in values.items() if v is not None or k in values}  # for kohya's metadata
        return cfg.validate(), unknown

    def validate(self) -> "TrainConfig":
        """Coerce types and check ranges in place; returns ``self``.

        Raises ``ValueError`` naming the option, or :class:`OptimizerUnavailableError` (a ``ValueError``
        subclass) for an ``optimizer_type`` not in ``OPTIMIZERS``.
        ``min_snr_gamma`` <= 0 and ``noise_offset`` == 0 are normalised to ``None`` (off).
        """
        ints = ("train_batch_size", "gradient_accumulation_steps", "seed", "network_dim", "max_train_steps",
                "lr_scheduler_num_cycles", "min_timestep", "sample_every_n_epochs", "sample_steps",
                "sample_width", "sample_height", "validate_every_n_epochs", "early_stopping_patience")
        for name in ints:
            try:
                setattr(self, name, int(getattr(self, name)))
            except (TypeError, ValueError):
                raise ValueError(f"{name} must be an integer, got {getattr(self, name)!r}") from None
        floats = ("network_alpha", "learning_rate", "lr_scheduler_power", "max_grad_norm", "huber_c",
                  "huber_scale", "sample_cfg", "network_dropout", "module_dropout")
        for name in floats:
            try:
                setattr(self, name, float(getattr(self, name)))
            except (TypeError, ValueError):
                raise ValueError(f"{name} must be a number, got {getattr(self, name)!r}") from None
        for name in ("max_train_epochs", "conv_dim", "max_timestep", "save_every_n_epochs", "sample_seed",
                     "clip_skip", "max_token_length"):
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, int(v))
        for name in ("conv_alpha", "unet_lr", "text_encoder_lr", "noise_offset", "min_snr_gamma"):
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, float(v))
        if self.train_batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError("train_batch_size and gradient_accumulation_steps must be >= 1")
        if self.network_dim < 1:
            raise ValueError("network_dim must be >= 1")
        if self.max_train_epochs is not None and self.max_train_epochs < 1:
            raise ValueError("max_train_epochs must be >= 1")
        if self.max_train_epochs is None and self.max_train_steps < 1:
            raise ValueError("max_train_steps must be >= 1")
        if self.network_module not in ("networks.lora", "lora", "lycoris.kohya"):
            raise ValueError(f"network_module {self.network_module!r} is not supported (networks.lora, or "
                             "lycoris.kohya with algo=loha / algo=lokr)")
        if self.optimizer_type.lower() not in {o.lower() for o in OPTIMIZERS}:
            raise OptimizerUnavailableError(f"optimizer_type {self.optimizer_type!r} is not supported; use one "
                                            f"of {', '.join(OPTIMIZERS)}")
        if self.lr_scheduler not in SCHEDULERS:
            raise ValueError(f"lr_scheduler {self.lr_scheduler!r} is not supported; use one of "
                             f"{', '.join(SCHEDULERS)}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}")
        if self.huber_schedule not in ("snr", "exponential", "constant"):
            raise ValueError("huber_schedule must be snr, exponential or constant")
        if self.mixed_precision not in ("no", "fp16", "bf16", "fp32"):
            raise ValueError(f"mixed_precision must be no (= fp32), fp16 or bf16, not {self.mixed_precision!r}")
        if self.save_precision not in ("fp16", "bf16", "fp32", "float", "float16", "bfloat16"):
            raise ValueError(f"save_precision must be fp16, bf16 or fp32 (kohya's float/float16/bfloat16 also work), "
                             f"not {self.save_precision!r}")
        if self.network_train_unet_only and self.network_train_text_encoder_only:
            raise ValueError("network_train_unet_only and network_train_text_encoder_only exclude each other")
        if self.best_direction not in ("auto", "min", "max"):
            raise ValueError("best_direction must be auto, min or max")
        g = self.sample_grid_cells
        if not (g is None or g == "native" or (isinstance(g, int) and not isinstance(g, bool) and 1 <= g <= 4096)
                or (isinstance(g, (list, tuple)) and len(g) == 2 and all(isinstance(v, int) and 1 <= v <= 4096
                                                                         for v in g))):
            raise ValueError(f"sample_grid_cells must be \"native\", a cell count 1..4096 or [cells_x, cells_y], "
                             f"got {g!r}")
        for name in ("v_parameterization", "zero_terminal_snr"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            self.min_snr_gamma = None
        from .kohya_args import validate_extra_options

        validate_extra_options(self)
        if self.noise_offset is not None and self.noise_offset == 0:
            self.noise_offset = None
        if not self.output_name or any(c in self.output_name for c in "/\\") or self.output_name in (".", ".."):
            raise ValueError(f"output_name {self.output_name!r} must be a plain file name")
        return self

    @property
    def prompts(self) -> list[str]:
        """Sample prompt texts (kohya prompt lines/files parsed by :mod:`.sample_prompts`; options removed)."""
        return [sp.prompt for sp in self.prompt_specs]

    @property
    def prompt_specs(self):
        """Sample prompts with kohya's per-prompt options (``--n --w --h --s --d --l --ss``), see
        :func:`.sample_prompts.parse_sample_prompts`."""
        from .sample_prompts import parse_sample_prompts

        return parse_sample_prompts(self.sample_prompts)

    @property
    def palette_list(self) -> list[str]:
        """``palette`` as a list of stripped entries (a string is split on commas and newlines); ``[]`` if unset."""
        p = self.palette
        if not p:
            return []
        if isinstance(p, str):
            return [t.strip() for t in p.replace("\n", ",").split(",") if t.strip()]
        return [str(t) for t in p]

    def to_dict(self) -> dict:
        """All fields as a plain dict (``dataclasses.asdict``)."""
        return asdict(self)


def noise_options(cfg: "TrainConfig") -> NoiseOptions:
    """The :class:`.noise.NoiseOptions` of a config (kohya's noise option names)."""
    return NoiseOptions(noise_offset=cfg.noise_offset, noise_offset_random_strength=cfg.noise_offset_random_strength,
                        adaptive_noise_scale=cfg.adaptive_noise_scale,
                        multires_noise_iterations=cfg.multires_noise_iterations,
                        multires_noise_discount=cfg.multires_noise_discount, ip_noise_gamma=cfg.ip_noise_gamma,
                        ip_noise_gamma_random_strength=cfg.ip_noise_gamma_random_strength,
                        min_timestep=cfg.min_timestep, max_timestep=cfg.max_timestep)


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_kohya_toml(text: str) -> dict[str, Any]:
    """Flatten a kohya TOML config (sections are ignored, as sd-scripts' ``read_config_from_file`` does).

    ``[model_arguments] network_dim = 32`` and a top-level ``network_dim = 32`` mean the same. Nested tables
    are flattened; an inline ``[[datasets]]`` array (a kohya dataset config) is kept as the list ``"datasets"``
    (see :mod:`.dataset_config`); other arrays of tables raise.
    Raises ``ValueError`` with the parser's message for invalid TOML.
    """
    import tomllib

    try:
        data = tomllib.loads(text or "")
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"invalid kohya TOML: {exc}") from None
    flat: dict[str, Any] = {}

    def walk(d: Mapping[str, Any]) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v)
            elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
                if k != "datasets":
                    raise ValueError(f"kohya TOML: [[{k}]] arrays of tables are not kohya settings (only "
                                     f"[[datasets]] / [[datasets.subsets]] are)")
                flat[k] = v  # an inline kohya dataset config (training/dataset_config.py)
            else:
                flat[k] = v

    walk(data)
    return flat


def parse_set_values(pairs: Sequence[str]) -> dict[str, Any]:
    """``["key=value", ...]`` → dict with TOML-typed values (``3`` int, ``1e-4`` float, ``true``, ``"x"``);
    bare words stay strings. Raises ``ValueError`` for an item without ``=``."""
    import tomllib

    out: dict[str, Any] = {}
    for item in pairs or []:
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects key=value, got {item!r}")
        try:
            out[key.strip()] = tomllib.loads(f"v = {val.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = val.strip()
    return out


# ------------------------------------------------------------------------------------------------------------
# objective
# ------------------------------------------------------------------------------------------------------------

def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR(t) = ᾱ_t / (1 − ᾱ_t), float32 ``[B]`` (Hang et al. 2023, §3)."""
    a = alphas_cumprod.float()[timesteps.cpu().long()]
    return a / (1 - a)


def min_snr_weight(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float,
                   prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ loss weights ``[B]`` (Hang et al. 2023, Eq. 8; kohya ``apply_snr_weight``).

    ε-prediction: ``min(SNR, γ) / SNR``; v-prediction: ``min(SNR, γ) / (SNR + 1)``.
    """
    s = snr(alphas_cumprod, timesteps)
    m = torch.clamp(s, max=float(gamma))
    return m / (s + 1) if prediction_type == "v_prediction" else m / s


def huber_c_for(cfg: TrainConfig, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Per-sample Huber threshold ``[B]`` float32 (kohya-ss/sd-scripts ``library/train_util.py``
    ``get_huber_threshold_if_needed``).

    ``exponential``: ``huber_scale·exp(−αt)`` with α = −ln(huber_c)/T; ``snr``: ``(1 − c)/(1 + σ_t)² + c`` with
    σ_t = √((1−ᾱ_t)/ᾱ_t) (``huber_scale`` not applied); ``constant``: ``huber_c·huber_scale``.
    """
    t = timesteps.cpu().long()
    if cfg.huber_schedule == "exponential":
        alpha = -math.log(cfg.huber_c) / len(alphas_cumprod)
        return torch.exp(-alpha * t.float()) * cfg.huber_scale
    if cfg.huber_schedule == "snr":
        a = alphas_cumprod.float()[t]
        sigmas = ((1 - a) / a) ** 0.5
        return (1 - cfg.huber_c) / (1 + sigmas) ** 2 + cfg.huber_c
    return torch.full((len(t),), cfg.huber_c * cfg.huber_scale)


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str,
                    huber_c: torch.Tensor | None = None) -> torch.Tensor:
    """Element loss averaged over all but the batch dim → ``[B]`` (kohya ``conditional_loss`` + mean([1,2,3])).

    ``l2``: (p−t)²; ``l1``: |p−t|; ``huber``: 2c(√((p−t)²+c²) − c); ``smooth_l1``: 2(√((p−t)²+c²) − c).
    Source: kohya-ss/sd-scripts ``library/train_util.py`` ``conditional_loss`` (pseudo-Huber loss).
    ``pred`` / ``target`` any shape ``[B, ...]`` (computed in fp32); ``huber_c`` ``[B]`` (see
    :func:`huber_c_for`) is required for ``huber`` / ``smooth_l1``. Raises ``ValueError`` for another
    ``loss_type`` or a missing ``huber_c``.
    """
    pred, target = pred.float(), target.float()
    if loss_type == "l2":
        el = (pred - target) ** 2
    elif loss_type == "l1":
        el = (pred - target).abs()
    elif loss_type not in ("huber", "smooth_l1"):
        raise ValueError(f"loss_type must be l2, l1, huber or smooth_l1, not {loss_type!r}")
    elif huber_c is None:
        raise ValueError(f"loss_type {loss_type!r} needs huber_c (see huber_c_for)")
    else:
        c = huber_c.to(pred.device).view(-1, *([1] * (pred.dim() - 1)))
        root = torch.sqrt((pred - target) ** 2 + c ** 2) - c
        el = 2 * c * root if loss_type == "huber" else 2 * root
    return el.mean(dim=tuple(range(1, el.dim())))


def sdxl_size_ids(entries: Sequence, flipped: Sequence[bool] | None = None) -> torch.Tensor:
    """SDXL size conditioning ``[B, 6]`` float32 for dataset entries, as kohya-ss/sd-scripts
    ``library/train_util.py`` builds ``original_sizes_hw`` / ``crop_top_lefts`` / ``target_sizes_hw`` (the
    ``BaseDataset.__getitem__`` block around line 1683 at commit 48d368f):

    * original size = the image file's ``(h, w)``; target size = the bucket's ``(h, w)``;
    * crop (top, left) = kohya ``BucketManager.get_crop_ltrb(bucket_reso, original_size)`` (line 349): the
      offsets of the image fitted *inside* the bucket, Stability AI's convention; for a flipped image the left
      offset is ``bucket_w − crop_right``.

    ``entries``: objects with ``size`` (w, h) and ``bucket_reso`` (w, h) in pixels (:class:`.dataset.ImageEntry`);
    ``flipped``: per entry, whether the flipped latents were used (default none).
    """
    rows_o, rows_c, rows_t = [], [], []
    for i, e in enumerate(entries):
        (iw, ih), (bw, bh) = e.size, e.bucket_reso
        bucket_ar, image_ar = bw / bh, iw / ih
        if bucket_ar > image_ar:
            rw, rh = bh * image_ar, bh
        else:
            rw, rh = bw, bw / image_ar
        left, top = (bw - rw) // 2, (bh - rh) // 2
        if flipped is not None and flipped[i]:
            left = bw - (left + rw)
        rows_o.append((ih, iw))
        rows_c.append((int(top), int(left)))
        rows_t.append((bh, bw))
    return size_ids(rows_o, rows_c, rows_t)


def diffusion_loss(host: DiffusionHost, latents: torch.Tensor, cond: Conditioning | torch.Tensor, cfg: TrainConfig,
                   generator: torch.Generator, timesteps: torch.Tensor | None = None,
                   autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
                   loss_weights: torch.Tensor | None = None) -> torch.Tensor:
    """One batch's scalar training loss by the objective of the host's family (:func:`.objective.objective_for`:
    :func:`ddpm_loss` for SD1/SD2/SDXL, :class:`.objective.FlowObjective` for Flux); arguments as
    :func:`ddpm_loss` (``timesteps``: integer t, or float σ for a flow family)."""
    return objective_for(host).loss(host, latents, cond, cfg, generator, timesteps=timesteps, autocast=autocast,
                                    loss_weights=loss_weights)


def ddpm_loss(host: DiffusionHost, latents: torch.Tensor, cond: Conditioning | torch.Tensor, cfg: TrainConfig,
              generator: torch.Generator, timesteps: torch.Tensor | None = None,
              autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
              loss_weights: torch.Tensor | None = None) -> torch.Tensor:
    """One batch's scalar DDPM training loss in the host's own parameterization (see module docstring).

    Args:
        latents: scaled VAE latents ``[B, C, h, w]`` fp32 (any device).
        cond: the batch's :class:`~.conditioning.Conditioning` (or a bare SD1/SD2 context ``[B, 77, D]``).
        generator: CPU generator for noise, noise offset and timesteps (consumed in that order).
        timesteps: fixed integer timesteps ``[B]`` (validation); otherwise uniform in [min_t, max_t).
        autocast: factory of the mixed-precision context the prediction runs in (``None``: none).
        loss_weights: per-sample weights ``[B]`` (kohya's ``prior_loss_weight`` for regularization images).

    Returns a 0-d fp32 tensor on the host's device: mean over the batch of :func:`per_sample_loss`, times
    kohya's loss post-processing (min-SNR-γ, v-pred scaling, debiased estimation: :func:`.noise.post_process_loss`).
    Noise, its options (offset, adaptive, random strength, multires, input perturbation) and the timesteps come
    from :func:`.noise.sample_training_noise`; ``min_timestep >= max_timestep`` trains at ``max_timestep``.

    Raises:
        ValueError: a timestep bound outside ``[0, T]`` (see :func:`.noise.sample_timesteps`).
    """
    ac = host.alphas_cumprod
    T = len(ac)
    # kohya's noise options and timesteps (training/noise.py, train_util.get_noise_noisy_latents_and_timesteps)
    noise, input_noise, timesteps = sample_training_noise(latents.float().cpu(), noise_options(cfg), generator, T,
                                                          timesteps)
    x0 = latents.float().cpu()
    x_t = add_noise(x0, input_noise, timesteps, ac)
    target = prediction_target(x0, noise, timesteps, ac, host.prediction_type)
    dev = host.device
    ctx = autocast() if autocast is not None else contextlib.nullcontext()
    with ctx:
        pred = host.predict(x_t.to(dev, host.dtype), timesteps.to(dev), cond)
    hc = huber_c_for(cfg, timesteps, ac) if cfg.loss_type in ("huber", "smooth_l1") else None
    loss = per_sample_loss(pred, target.to(pred.device), cfg.loss_type, hc)
    if loss_weights is not None:  # kohya batch["loss_weights"]: prior_loss_weight for regularization images
        loss = loss * loss_weights.to(loss.device, loss.dtype)
    loss = post_process_loss(loss, timesteps, ac, v_prediction=host.prediction_type == "v_prediction",
                             min_snr_gamma=cfg.min_snr_gamma,
                             scale_v_pred_loss_like_noise_pred=cfg.scale_v_pred_loss_like_noise_pred,
                             v_pred_like_loss=cfg.v_pred_like_loss,
                             debiased_estimation_loss=cfg.debiased_estimation_loss)
    return loss.mean()


# ------------------------------------------------------------------------------------------------------------
# optimizers and schedulers
# ------------------------------------------------------------------------------------------------------------

def _optimizer_kwargs(args: Iterable[str]) -> dict[str, Any]:
    out = {}
    for item in args or []:
        key, sep, val = str(item).partition("=")
        if not sep:
            raise ValueError(f"optimizer_args expects key=value, got {item!r}")
        out[key.strip()] = _literal(val.strip())
    return out


def build_optimizer(name: str, groups: list[dict], lr: float, args: Iterable[str] = (),
                    device: torch.device | str = "cpu") -> torch.optim.Optimizer:
    """The optimizer kohya's ``optimizer_type`` names, with ``optimizer_args`` (``"key=value"`` strings).

    * ``AdamW`` (torch), ``SGDNesterov`` (torch SGD, nesterov, momentum 0.9);
    * ``AdamW8bit`` (bitsandbytes; a one-step probe on ``device`` turns a missing backend into a clear error);
    * ``Adafactor`` (transformers; ``scale_parameter``/``relative_step``/``warmup_init`` default False so the
      given learning rate and scheduler apply — kohya's recommended arguments);
    * ``Prodigy`` (prodigyopt, when installed; use learning_rate 1.0).

    Raises :class:`OptimizerUnavailableError` when the package is missing or cannot run on ``device`` or ``name``
    is unknown, and ``ValueError`` for an ``optimizer_args`` entry without ``=``.
    """
    kw = _optimizer_kwargs(args)
    key = name.lower()
    if key == "adamw":
        return torch.optim.AdamW(groups, lr=lr, **kw)
    if key == "sgdnesterov":
        kw.setdefault("momentum", 0.9)
        return torch.optim.SGD(groups, lr=lr, nesterov=True, **kw)
    if key == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except Exception as exc:  # noqa: BLE001 - ImportError or a broken native library
            raise OptimizerUnavailableError(
                f"AdamW8bit needs the bitsandbytes package, which cannot be imported here ({exc}); "
                "install bitsandbytes or choose AdamW") from None
        try:
            probe = torch.nn.Parameter(torch.zeros(4096, device=device))
            opt = bnb.optim.AdamW8bit([probe], lr=1e-3)
            probe.grad = torch.ones_like(probe)
            opt.step()
        except Exception as exc:  # noqa: BLE001
            raise OptimizerUnavailableError(
                f"AdamW8bit (bitsandbytes) cannot run on {device}: {exc}. Choose AdamW, or train on a "
                "device bitsandbytes supports") from None
        return bnb.optim.AdamW8bit(groups, lr=lr, **kw)
    if key == "adafactor":
        from transformers.optimization import Adafactor

        for k in ("scale_parameter", "relative_step", "warmup_init"):
            kw.setdefault(k, False)
        return Adafactor(groups, lr=None if kw.get("relative_step") else lr, **kw)
    if key == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise OptimizerUnavailableError("Prodigy needs the prodigyopt package (pip install prodigyopt); "
                                            "it is not installed") from None
        return Prodigy(groups, lr=lr, **kw)
    raise OptimizerUnavailableError(f"optimizer_type {name!r} is not supported; use one of {', '.join(OPTIMIZERS)}")


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    """diffusers ``get_scheduler`` with kohya's warm-up rule (``lr_warmup_steps`` < 1 is a fraction).

    ``total_steps`` counts optimizer steps. Returns a ``torch.optim.lr_scheduler.LambdaLR``; diffusers raises
    ``ValueError`` for a scheduler name it does not know (:meth:`TrainConfig.validate` checks first).
    """
    from diffusers.optimization import get_scheduler

    warm = cfg.lr_warmup_steps
    warm = int(warm * total_steps) if 0 < warm < 1 else int(warm)
    kw: dict[str, Any] = {"num_warmup_steps": warm, "num_training_steps": total_steps}
    if cfg.lr_scheduler == "cosine_with_restarts":
        kw["num_cycles"] = cfg.lr_scheduler_num_cycles
    if cfg.lr_scheduler == "polynomial":
        kw["power"] = cfg.lr_scheduler_power
    if cfg.lr_scheduler == "constant":
        kw = {}
    elif cfg.lr_scheduler == "constant_with_warmup":
        kw = {"num_warmup_steps": warm}
    return get_scheduler(cfg.lr_scheduler, optimizer, **kw)


# ------------------------------------------------------------------------------------------------------------
# state (de)serialisation: safetensors + JSON, never pickle
# ------------------------------------------------------------------------------------------------------------

def _jsonable(v):
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, torch.dtype):
        return str(v)
    return v


def optimizer_state_to_flat(sd: Mapping) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors (``"optimizer.<pid>.<key>"``) and a JSON part."""
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optimizer.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = _jsonable(v)
    return tensors, {"param_groups": _jsonable(sd["param_groups"]), "scalars": scalars}


def optimizer_state_from_flat(tensors: Mapping[str, torch.Tensor], js: Mapping) -> dict:
    """Inverse of :func:`optimizer_state_to_flat`: ``{"state": {pid: {...}}, "param_groups": [...]}`` for
    ``optimizer.load_state_dict`` (JSON lists of ``betas`` become tuples). Raises ``KeyError`` when ``js`` has
    no ``param_groups``."""
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optimizer."):
            _, pid, key = k.split(".", 2)
            state.setdefault(int(pid), {})[key] = v
    for k, v in js.get("scalars", {}).items():
        pid, key = k.split(".", 1)
        state.setdefault(int(pid), {})[key] = v
    groups = []
    for g in js["param_groups"]:
        g = dict(g)
        if "betas" in g and isinstance(g["betas"], list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def _py_rng_to_json(state) -> list:
    return [state[0], list(state[1]), state[2]]


def _py_rng_from_json(js) -> tuple:
    return (js[0], tuple(js[1]), js[2])


# ------------------------------------------------------------------------------------------------------------
# metrics, selection, reports
# ------------------------------------------------------------------------------------------------------------

def _to_uint8(img: torch.Tensor) -> np.ndarray:
    """``[3, H, W]`` float 0..1 → uint8 ``[H, W, 3]``."""
    return (img.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)


def palette_metrics(image: np.ndarray, palette: Sequence[str] = (), cells=None) -> dict[str, float]:
    """Palette metrics of one uint8 ``[H, W, 3]`` image from :mod:`conceptlab.metrics.palette`.

    ``cells``: grid override passed to ``palette_report`` (``sample_grid_cells``; e.g. ``"native"`` → one cell per
    pixel for samples rendered at the art's native resolution, where no upscaled grid exists to detect).

    Returns numeric entries of ``palette_report`` (e.g. ``effective_colors``, ``in_palette_fraction``);
    ``{}`` when the metrics module is not available (the trainer then selects by loss only).
    """
    try:
        from ..metrics.palette import palette_report
    except ImportError:
        return {}
    try:
        if cells == "native":
            cells = (image.shape[1], image.shape[0])
        rep = palette_report(image, targets=list(palette) or None, cells=cells)
    except Exception as exc:  # noqa: BLE001 - a sample the metrics cannot read (e.g. no pixel grid) is skipped
        logger.warning("palette metrics failed on a sample: %s", exc)
        return {}
    return _numeric_leaves(rep)


def _numeric_leaves(rep: Any, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    if hasattr(rep, "to_dict"):
        rep = rep.to_dict()
    elif hasattr(rep, "__dataclass_fields__"):
        rep = asdict(rep)
    if isinstance(rep, Mapping):
        for k, v in rep.items():
            name = f"{prefix}{k}"
            if isinstance(v, bool):
                continue
            if isinstance(v, (int, float, np.integer, np.floating)) and math.isfinite(float(v)):
                out[name] = float(v)
            elif isinstance(v, Mapping) and not prefix:
                out.update(_numeric_leaves(v, prefix=f"{k}."))
    return out


def score_of(value: float, direction: str, target: float | None = None) -> float:
    """Lower-is-better score: ``min`` → v, ``max`` → −v, ``target`` → |v − target|."""
    if direction == "max":
        return -value
    if direction == "target":
        return abs(value - float(target))
    return value


def resolve_metric(metric: str, direction: str, have_val: bool, have_samples: bool) -> tuple[str, str]:
    """Resolve ``"auto"`` names: metric auto → val_loss if a validation split exists, else
    effective_colors_vs_dataset with samples, else train_loss. Direction auto → max for fractions/ratios
    and ``in_palette``, target for ``*_vs_dataset``, min otherwise."""
    if metric == "auto":
        metric = "val_loss" if have_val else ("effective_colors_vs_dataset" if have_samples else "train_loss")
    if direction == "auto":
        if metric.endswith("_vs_dataset"):
            direction = "target"
        elif "in_palette" in metric or metric.endswith(("frac", "fraction", "ratio", "accuracy", "score",
                                                         "coverage")):
            direction = "max"
        else:
            direction = "min"
    return metric, direction


def select_best(history: Sequence[Mapping[str, Any]], metric: str, direction: str,
                target: float | None = None) -> tuple[int | None, float | None]:
    """The epoch (1-based) whose ``metric`` value scores best (ties: earliest) and that value; ``(None, None)``
    when no epoch has the metric. ``direction``: ``min``, ``max`` or ``target`` (closest to ``target``)."""
    best_e, best_v, best_s = None, None, None
    for rec in history:
        v = rec.get(metric)
        if v is None or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            continue
        s = score_of(float(v), direction, target)
        if best_s is None or s < best_s:
            best_e, best_v, best_s = int(rec["epoch"]), float(v), s
    return best_e, best_v


class EarlyStopping:
    """Stop when ``patience`` consecutive evaluated epochs bring no improvement of the score (lower is better).

    ``update(epoch, score) -> bool`` (True: stop now). ``patience`` 0 never stops. ``min_delta`` is the least
    improvement that counts.
    """

    def __init__(self, patience: int, min_delta: float = 0.0):
        self.patience = int(patience)
        self.min_delta = float(min_delta)
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self.bad_epochs = 0

    def update(self, epoch: int, score: float | None) -> bool:
        """Record ``score`` of ``epoch``; True when training should stop now. ``None`` / NaN / Inf are ignored."""
        if score is None or not math.isfinite(score):
            return False
        if self.best_score is None or score < self.best_score - self.min_delta:
            self.best_score, self.best_epoch, self.bad_epochs = score, epoch, 0
            return False
        self.bad_epochs += 1
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state(self) -> dict:
        """JSON-able ``{"best_score", "best_epoch", "bad_epochs"}`` (saved in the training state for resume)."""
        return {"best_score": self.best_score, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load(self, st: Mapping) -> None:
        """Restore from :meth:`state`'s dict; ``KeyError`` if a key is missing."""
        self.best_score, self.best_epoch, self.bad_epochs = st["best_score"], st["best_epoch"], st["bad_epochs"]


def _fig_to_array(fig) -> np.ndarray:
    fig.canvas.draw()
    arr = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    import matplotlib.pyplot as plt

    plt.close(fig)
    return arr


def render_loss_curve(step_losses: Sequence[float], history: Sequence[Mapping[str, Any]],
                      steps_per_epoch: int, best_epoch: int | None = None) -> np.ndarray:
    """Loss-curve picture (matplotlib Agg) as uint8 ``[H, W, 3]``: per-step loss, its moving average, per-epoch
    train/validation loss, the best epoch marked."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    if step_losses:
        x = np.arange(1, len(step_losses) + 1)
        ax.plot(x, step_losses, color="#9bb", lw=0.8, label="step loss")
        k = max(1, min(len(step_losses) // 10, 50))
        if k > 1:
            ma = np.convolve(step_losses, np.ones(k) / k, mode="valid")
            ax.plot(x[k - 1:], ma, color="#057", lw=1.5, label=f"moving avg ({k})")
    ep_x = [r["step"] for r in history]
    if history and any(r.get("train_loss") is not None for r in history):
        ax.plot(ep_x, [r.get("train_loss") for r in history], "o-", color="#c60", ms=4, label="epoch train loss")
    if any(r.get("val_loss") is not None for r in history):
        ax.plot(ep_x, [r.get("val_loss") for r in history], "s--", color="#a0a", ms=4, label="validation loss")
    if best_epoch is not None:
        for r in history:
            if r["epoch"] == best_epoch:
                ax.axvline(r["step"], color="#2a2", ls=":", lw=1.5, label=f"best: epoch {best_epoch}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return _fig_to_array(fig)


def render_epoch_table(history: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
                       best_epoch: int | None = None, title: str = "") -> np.ndarray:
    """The per-epoch table as a picture (matplotlib ``table``), uint8 ``[H, W, 3]``; the best row highlighted."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if columns is None:
        cols: list[str] = []
        for r in history:
            for k, v in r.items():
                if k not in cols and k not in ("file", "samples") and (isinstance(v, (int, float)) or v is None):
                    cols.append(k)
        columns = cols
    rows = []
    for r in history:
        row = []
        for c in columns:
            v = r.get(c)
            if v is None:
                row.append("–")
            elif isinstance(v, float):
                row.append(f"{v:.4g}")
            else:
                row.append(str(v))
        rows.append(row)
    if not rows:
        rows = [["–"] * max(1, len(columns))]
        columns = list(columns) or ["epoch"]
    fig_h = 0.9 + 0.28 * (len(rows) + 1)
    fig_w = max(4.0, 1.15 * len(columns))
    fig, ax = plt.subplots(figsize=(fig_w, fig_h), dpi=100)
    ax.axis("off")
    tab = ax.table(cellText=rows, colLabels=list(columns), loc="center", cellLoc="center")
    tab.auto_set_font_size(False)
    tab.set_fontsize(8)
    tab.scale(1, 1.2)
    if best_epoch is not None:
        for i, r in enumerate(history):
            if r.get("epoch") == best_epoch:
                for j in range(len(columns)):
                    tab[i + 1, j].set_facecolor("#d8f5d0")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _fig_to_array(fig)


def labelled_grid(cells: Sequence[Sequence[np.ndarray]], row_labels: Sequence[str] = (),
                  col_labels: Sequence[str] = (), scale: int = 0, pad: int = 4) -> np.ndarray:
    """A grid of uint8 ``[h, w, 3]`` images (rows × columns) with text labels, as uint8 ``[H, W, 3]``.

    ``scale`` 0 picks an integer nearest-neighbour upscale so small (pixel-art) samples are at least 128 px.
    """
    from PIL import Image, ImageDraw

    rows = [list(r) for r in cells if len(r)]
    if not rows:
        return np.zeros((8, 8, 3), np.uint8)
    h = max(im.shape[0] for r in rows for im in r)
    w = max(im.shape[1] for r in rows for im in r)
    if scale <= 0:
        scale = max(1, 128 // max(1, min(h, w)))
    ch, cw = h * scale, w * scale
    left = 8 + 7 * max([len(s) for s in row_labels] + [0]) if row_labels else pad
    top = 18 if col_labels else pad
    ncol = max(len(r) for r in rows)
    W = left + ncol * (cw + pad)
    H = top + len(rows) * (ch + pad)
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, lab in enumerate(col_labels[:ncol]):
        draw.text((left + j * (cw + pad) + 2, 3), str(lab)[: max(4, cw // 7)], fill=(0, 0, 0))
    for i, r in enumerate(rows):
        y = top + i * (ch + pad)
        if i < len(row_labels):
            draw.text((4, y + ch // 2 - 5), str(row_labels[i]), fill=(0, 0, 0))
        for j, im in enumerate(r):
            pil = Image.fromarray(im).resize((im.shape[1] * scale, im.shape[0] * scale), Image.Resampling.NEAREST)
            canvas.paste(pil, (left + j * (cw + pad), y))
    return np.asarray(canvas)


def save_png(arr: np.ndarray, path: str | os.PathLike) -> Path:
    """Write uint8 ``[H, W, 3]`` as PNG atomically."""
    from PIL import Image

    from ..formats.safetensors_io import atomic_output

    with atomic_output(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")
    return Path(path)


# ------------------------------------------------------------------------------------------------------------
# metadata and files
# ------------------------------------------------------------------------------------------------------------



def epoch_file_name(output_name: str, epoch: int | None) -> str:
    """Kohya's checkpoint names: ``name-000003.safetensors`` for an epoch, ``name.safetensors`` for the last."""
    return f"{output_name}.safetensors" if epoch is None else f"{output_name}-{int(epoch):06d}.safetensors"


def save_lora_file(path: str | os.PathLike, network: LoRANetwork, metadata: Mapping[str, Any],
                   precision: str = "fp16") -> Path:
    """Write the network as a kohya LoRA file (``formats.lora_files.save_kohya_lora``: keys, alpha, sshs hashes).

    Metadata values are stringified (kohya writes every ``ss_*`` value with ``str()``).
    """
    from ..formats.lora_files import save_kohya_lora
    from ..formats.safetensors_io import parse_dtype

    # kohya writes every value with str() (None -> "None"); dicts / lists as JSON (ss_tag_frequency, ...)
    md = {k: (v if isinstance(v, str) else (json.dumps(v) if isinstance(v, (dict, list)) else str(v)))
          for k, v in metadata.items()}
    if hasattr(network, "algo"):  # a LyCORIS network (training/lycoris_net.py): its own key names
        from ..formats.safetensors_io import parse_dtype
        from .lycoris_net import save_lycoris_file

        return Path(save_lycoris_file(path, network, md, parse_dtype({"float": "fp32"}.get(precision, precision))))
    return Path(save_kohya_lora(path, network.kohya_modules(), md, dtype=parse_dtype(
        {"float": "fp32"}.get(precision, precision))))


def build_metadata(cfg: TrainConfig, dataset: KohyaDataset, host: DiffusionHost, *, num_epochs: int,
                   max_steps: int, batches_per_epoch: int, session_id: int, started_at: float,
                   model_name: str = "", model_hash: str = "", new_model_hash: str = "",
                   mixed_precision: str = "no", train_unet: bool = True, train_te: bool = False) -> dict[str, Any]:
    """Kohya's ``ss_*`` training metadata (train_network.py) plus ``modelspec.*`` (sai_model_spec.py) for the
    dataset-folder (non-TOML-dataset) path. Per-file keys (``ss_epoch``, ``ss_steps``,
    ``ss_training_finished_at``) are added at save time."""
    o = dataset.options
    w, h = o.size
    c = dataset.captions
    arch = getattr(host, "arch", "sd1")
    md: dict[str, Any] = {
        "ss_session_id": session_id,
        "ss_training_started_at": started_at,
        "ss_output_name": cfg.output_name,
        "ss_learning_rate": cfg.learning_rate,
        "ss_text_encoder_lr": cfg.text_encoder_lr,
        "ss_unet_lr": cfg.unet_lr,
        "ss_num_train_images": dataset.num_train_images,
        "ss_num_validation_images": len(dataset.val_entries),
        "ss_num_reg_images": getattr(dataset, "num_reg_images", 0),
        "ss_num_batches_per_epoch": batches_per_epoch,
        "ss_num_epochs": num_epochs,
        "ss_gradient_checkpointing": bool(cfg.gradient_checkpointing),
        "ss_gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "ss_max_train_steps": max_steps,
        "ss_lr_warmup_steps": cfg.lr_warmup_steps,
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_network_module": "networks.lora",
        "ss_network_dim": cfg.network_dim,
        "ss_network_alpha": cfg.network_alpha,
        "ss_network_dropout": cfg.network_dropout or None,
        "ss_mixed_precision": mixed_precision,
        "ss_full_fp16": False,
        "ss_v2": arch == "sd2",
        "ss_base_model_version": family(arch).base_model_version,
        "ss_clip_skip": cfg.clip_skip,
        "ss_max_token_length": cfg.max_token_length,
        "ss_cache_latents": True,
        "ss_seed": cfg.seed,
        "ss_lowram": False,
        "ss_noise_offset": cfg.noise_offset,
        "ss_adaptive_noise_scale": cfg.adaptive_noise_scale,
        "ss_multires_noise_iterations": cfg.multires_noise_iterations,
        "ss_multires_noise_discount": cfg.multires_noise_discount,
        "ss_noise_offset_random_strength": bool(cfg.noise_offset_random_strength),
        "ss_ip_noise_gamma_random_strength": bool(cfg.ip_noise_gamma_random_strength),
        "ss_huber_scale": cfg.huber_scale,
        "ss_fp8_base": False,
        "ss_fp8_base_unet": False,
        "ss_zero_terminal_snr": bool(cfg.zero_terminal_snr),
        "ss_training_comment": cfg.training_comment or None,
        "ss_sd_scripts_commit_hash": "conceptlab",
        "ss_optimizer": cfg.optimizer_type + (f"({','.join(map(str, cfg.optimizer_args))})"
                                              if cfg.optimizer_args else ""),
        "ss_max_grad_norm": cfg.max_grad_norm,
        "ss_caption_dropout_rate": c.caption_dropout_rate,
        "ss_caption_dropout_every_n_epochs": c.caption_dropout_every_n_epochs,
        "ss_caption_tag_dropout_rate": c.caption_tag_dropout_rate,
        "ss_face_crop_aug_range": None,
        "ss_prior_loss_weight": cfg.prior_loss_weight,
        "ss_min_snr_gamma": cfg.min_snr_gamma,
        "ss_scale_weight_norms": cfg.scale_weight_norms,
        "ss_ip_noise_gamma": cfg.ip_noise_gamma,
        "ss_debiased_estimation": bool(cfg.debiased_estimation_loss),
        "ss_loss_type": cfg.loss_type,
        "ss_huber_schedule": cfg.huber_schedule,
        "ss_huber_c": cfg.huber_c,
        "ss_validation_seed": o.validation_seed,
        "ss_validation_split": o.validation_split,
        "ss_validate_every_n_epochs": cfg.validate_every_n_epochs,
        "ss_resize_interpolation": o.resize_interpolation,
        "ss_batch_size_per_device": cfg.train_batch_size,
        "ss_total_batch_size": cfg.train_batch_size * cfg.gradient_accumulation_steps,
        "ss_resolution": f"({w}, {h})",
        "ss_color_aug": False,
        "ss_flip_aug": bool(o.flip_aug),
        "ss_random_crop": False,
        "ss_shuffle_caption": bool(c.shuffle_caption),
        "ss_enable_bucket": bool(o.enable_bucket),
        "ss_bucket_no_upscale": bool(o.bucket_no_upscale),
        "ss_min_bucket_reso": o.min_bucket_reso if o.enable_bucket else None,
        "ss_max_bucket_reso": o.max_bucket_reso if o.enable_bucket else None,
        "ss_keep_tokens": c.keep_tokens,
        "ss_dataset_dirs": {s.name: {"n_repeats": s.repeats, "img_count": s.img_count} for s in dataset.subsets
                            if not getattr(s, "is_reg", False)},
        "ss_reg_dataset_dirs": {s.name: {"n_repeats": s.repeats, "img_count": s.img_count}
                                for s in dataset.subsets if getattr(s, "is_reg", False)},
        "ss_tag_frequency": dataset.tag_frequency,
        "ss_bucket_info": dataset.bucket_info(),
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{modelspec_arch(arch, host.prediction_type)}/lora",
        "modelspec.implementation": ("https://github.com/Stability-AI/generative-models" if arch == "sdxl"
                                     else "diffusers"),
        "modelspec.title": cfg.output_name,
        "modelspec.resolution": f"{w}x{h}",
        "modelspec.date": datetime.datetime.fromtimestamp(started_at).strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.prediction_type": "v" if host.prediction_type == "v_prediction" else "epsilon",
    }
    args = []
    if cfg.conv_dim:
        # kohya create_network: conv_alpha defaults to 1.0 (networks/lora.py l. 444)
        args += [f"conv_dim={cfg.conv_dim}", f"conv_alpha={cfg.conv_alpha if cfg.conv_alpha is not None else 1.0}"]
    if cfg.module_dropout:
        args.append(f"module_dropout={cfg.module_dropout}")
    if args:
        md["ss_network_args"] = {a.split("=")[0]: a.split("=")[1] for a in args}
    if model_name:
        md["ss_sd_model_name"] = model_name
    if model_hash:
        md["ss_sd_model_hash"] = model_hash
    if new_model_hash:
        md["ss_new_sd_model_hash"] = new_model_hash
    md["ss_training_tool"] = "conceptlab"
    objective_for(host).update_metadata(md, cfg, host)
    return md


# ------------------------------------------------------------------------------------------------------------
# the trainer
# ------------------------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    """What a run produced. Paths are absolute; ``history`` is the per-epoch table (list of dicts)."""

    output_dir: Path
    final_path: Path | None
    best_path: Path | None
    best_epoch: int | None
    best_metric: str
    best_value: float | None
    epoch_files: dict[int, Path]
    history: list[dict]
    step_losses: list[float]
    global_step: int
    epochs_done: int
    stopped_early: bool
    table_path: Path | None
    loss_curve: np.ndarray | None = field(default=None, repr=False)
    table_image: np.ndarray | None = field(default=None, repr=False)
    sample_grid: np.ndarray | None = field(default=None, repr=False)
    network: LoRANetwork | None = field(default=None, repr=False)


ProgressFn = Callable[[int, int, Mapping[str, Any]], None]
EpochFn = Callable[[Mapping[str, Any], np.ndarray | None], None]


def _autocast_factory(precision: str, device: torch.device) -> tuple[Callable | None, str, bool]:
    """``(autocast factory or None, effective precision, needs GradScaler)``; CPU always fp32."""
    if precision in ("no", "fp32"):
        return None, "no", False
    if device.type == "cpu":
        logger.warning("mixed_precision %s is not used on the CPU: training runs in fp32 (ss_mixed_precision "
                       "records what was asked)", precision)
        return None, "no", False
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            logger.warning("bf16 is not supported on this GPU; training in fp16 instead")
            precision = "fp16"
        else:
            return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)), "bf16", False
    return (lambda: torch.autocast(device.type, dtype=torch.float16)), "fp16", True


def _set_gradient_checkpointing(host: DiffusionHost, on: bool) -> bool:
    fn = getattr(host, "set_gradient_checkpointing", None)
    if callable(fn):
        fn(on)
        return True
    unet = getattr(host, "unet", None)
    if unet is not None and hasattr(unet, "enable_gradient_checkpointing"):
        (unet.enable_gradient_checkpointing if on else unet.disable_gradient_checkpointing)()
        return True
    return False


def find_latest_state(output_dir: str | os.PathLike, output_name: str) -> Path | None:
    """The newest ``<name>-NNNNNN-state.json`` / ``<name>-state.json`` in ``output_dir`` by recorded step."""
    best, best_step = None, -1
    for p in Path(output_dir).glob(f"{output_name}*-state.json"):
        try:
            js = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if js.get("schema") == STATE_SCHEMA and js.get("output_name") == output_name and js["global_step"] > best_step:
            best, best_step = p, js["global_step"]
    return best


def build_network_and_groups(host: DiffusionHost, cfg: TrainConfig, train_unet: bool = True,
                             train_te: bool = True) -> tuple[LoRANetwork, list[dict]]:
    """The LoRA network and its optimizer param groups, as kohya's ``create_network`` /
    ``create_network_from_weights`` + ``prepare_optimizer_params`` (see :mod:`.network_args`).

    * ``network_args``: LoCon, block-wise lr / dims / alphas, LoRA+ (:mod:`.network_args`);
    * ``dim_from_weights``: ranks and alphas of every module from the ``network_weights`` file (its modules, no
      others); ``network_weights``: start from that file's tensors (kohya ``load_weights``; modules the file
      lacks keep the fresh init, file modules the network lacks are reported);
    * an lr of 0 (``unet_lr``, ``text_encoder_lr``, a block weight) leaves those parameters out of the optimizer.

    Returns ``(network, groups)`` with groups ``[{"params", "lr", "name"}]``. Raises ``ValueError`` for bad
    ``network_args``, a ``network_weights`` file that does not fit the model, or when no parameter would train.
    """
    from .network_args import LoraPlus, block_spec, optimizer_groups, parse_network_args

    if str(cfg.network_module).startswith("lycoris"):
        return _build_lycoris(host, cfg, train_unet, train_te)
    from .lora_flux import split_network_args

    na, flux_na = split_network_args(parse_network_args(cfg.network_args), family(host.arch).lora_targets == "flux")
    is_sdxl = getattr(host, "arch", "sd1") == "sdxl"
    blocks = block_spec(na, network_dim=cfg.network_dim, network_alpha=cfg.network_alpha, conv_dim=cfg.conv_dim,
                        conv_alpha=cfg.conv_alpha, is_sdxl=is_sdxl)
    file_sd = None
    if cfg.network_weights:
        path = Path(cfg.network_weights)
        if not path.is_file():
            raise FileNotFoundError(f"network_weights not found: {path}")
        file_sd = load_state_dict(path)
    if cfg.dim_from_weights:
        network, unmatched = LoRANetwork.from_kohya_state_dict(host, file_sd)
        if not train_te or not train_unet:
            keep = [n for n, t in network.targets.items() if (t.component == "unet") == train_unet or
                    (t.component != "unet" and train_te)]
            network = LoRANetwork([network.targets[n] for n in keep], {n: network.loras[n] for n in keep},
                                  dropout=cfg.network_dropout, module_dropout=cfg.module_dropout, seed=cfg.seed)
        else:
            network.dropout, network.module_dropout = cfg.network_dropout, cfg.module_dropout
            network.generator.manual_seed(int(cfg.seed) + 7)
        if unmatched:
            logger.warning("network_weights: %d keys of %s match no module of this model", len(unmatched),
                           Path(cfg.network_weights).name)
    else:
        network = LoRANetwork.create(host, network_dim=cfg.network_dim, network_alpha=cfg.network_alpha,
                                     conv_dim=cfg.conv_dim, conv_alpha=cfg.conv_alpha, train_unet=train_unet,
                                     train_text_encoder=train_te, dropout=cfg.network_dropout,
                                     module_dropout=cfg.module_dropout, seed=cfg.seed, blocks=blocks,
                                     flux_args=flux_na)
        if file_sd is not None:
            names = set(network.loras)
            missing = [n for n in names if f"{n}.lora_down.weight" not in file_sd]
            extra = sorted({k.split(".", 1)[0] for k in file_sd if k.endswith(".lora_down.weight")} - names)
            with torch.no_grad():
                for n, d in network.loras.items():
                    if n in missing:
                        continue
                    down, up = file_sd[f"{n}.lora_down.weight"], file_sd[f"{n}.lora_up.weight"]
                    if down.numel() != d.lora_down.numel() or up.numel() != d.lora_up.numel():
                        raise ValueError(f"network_weights: module {n} has rank {down.shape[0]} in the file but "
                                         f"{d.dim} here; set network_dim to the file's rank or use dim_from_weights")
                    d.lora_down.copy_(down.float().view_as(d.lora_down))
                    d.lora_up.copy_(up.float().view_as(d.lora_up))
            if missing or extra:
                logger.warning("network_weights: %d modules not in the file keep their fresh init; %d file modules "
                               "are not part of this network", len(missing), len(extra))
    spec = optimizer_groups(list(network.loras), learning_rate=cfg.learning_rate, unet_lr=cfg.unet_lr,
                            text_encoder_lr=cfg.text_encoder_lr, lr_weights=blocks.lr_weights,
                            loraplus=LoraPlus.from_args(na), is_sdxl=is_sdxl)
    groups = [{"params": [getattr(network.loras[n], part) for n, part in g.params], "lr": g.lr, "name": g.name}
              for g in spec]
    trainable = {id(p) for g in groups for p in g["params"]}
    for p_ in network.parameters():
        p_.requires_grad_(id(p_) in trainable)
    if not groups:
        raise ValueError("no LoRA parameter would train: every learning rate (learning_rate, unet_lr, "
                         "text_encoder_lr, block lr weights) is 0 for the parts being trained")
    return network, groups


def _build_lycoris(host: DiffusionHost, cfg: TrainConfig, train_unet: bool, train_te: bool):
    """LoHa / LoKr through ``lycoris-lora`` (:mod:`.lycoris_net`): groups per part at unet_lr / text_encoder_lr
    (0 = frozen). network_weights, scale_weight_norms and rank dropout are refused for LyCORIS here."""
    from .lycoris_net import LycorisNetwork, parse_lycoris_args

    for name in ("network_weights", "scale_weight_norms"):
        if getattr(cfg, name):
            raise ValueError(f"{name} is not supported with network_module lycoris.kohya here")
    if cfg.network_dropout:
        raise ValueError("network_dropout / rank_dropout are not supported with lycoris.kohya here")
    net = LycorisNetwork.create_lycoris(host, parse_lycoris_args(cfg.network_args), network_dim=cfg.network_dim,
                                        network_alpha=cfg.network_alpha, train_unet=train_unet,
                                        train_text_encoder=train_te, seed=cfg.seed,
                                        module_dropout=cfg.module_dropout)
    parts = net.parameter_groups()
    groups = []
    for part, lr, label in (("te", cfg.text_encoder_lr, "textencoder"), ("unet", cfg.unet_lr, "unet")):
        lr = cfg.learning_rate if lr is None else lr
        if parts[part] and lr:
            groups.append({"params": parts[part], "lr": lr, "name": label})
    trainable = {id(p) for g in groups for p in g["params"]}
    for p_ in net.parameters():
        p_.requires_grad_(id(p_) in trainable)
    if not groups:
        raise ValueError("no LyCORIS parameter would train: every learning rate is 0 for the parts being trained")
    return net, groups


class LoraTrainer:
    """Train a kohya LoRA on ``host`` from ``dataset`` with ``cfg``; :meth:`run` does everything.

    Args:
        host: the model (deltas are installed during the run and removed afterwards).
        dataset: a scanned :class:`KohyaDataset` (its caption options are used per step).
        cfg: :class:`TrainConfig`.
        progress: ``progress(step, total_steps, info)`` after every optimizer step (``info``: loss, lr,
            epoch). May raise to cancel (ComfyUI's interrupt): finished checkpoints stay on disk.
        on_epoch: ``on_epoch(record, preview)`` after each epoch (preview: uint8 sample grid or None).
        model_name / model_hash / new_model_hash: base model identity for ``ss_sd_model_*`` metadata.
        encode_latents_progress: ``(done, total)`` while caching latents.

    Construction validates ``cfg`` (``ValueError`` / :class:`OptimizerUnavailableError`) and raises ``ValueError``
    when ``network_train_text_encoder_only`` is set for a host without a text encoder. ``v_parameterization`` /
    ``zero_terminal_snr`` reconfigure the host's schedule here (:meth:`.host.DiffusionHost.configure_schedule`),
    so training, validation and the per-epoch samples share it.
    """

    def __init__(self, host: DiffusionHost, dataset: KohyaDataset, cfg: TrainConfig, *,
                 progress: ProgressFn | None = None, on_epoch: EpochFn | None = None, model_name: str = "",
                 model_hash: str = "", new_model_hash: str = "",
                 encode_latents_progress: Callable[[int, int], None] | None = None):
        self.host, self.dataset, self.cfg = host, dataset, cfg.validate()
        self.progress, self.on_epoch = progress, on_epoch
        self.model_name, self.model_hash, self.new_model_hash = model_name, model_hash, new_model_hash
        self.encode_latents_progress = encode_latents_progress
        self.out_dir = Path(cfg.output_dir)
        self.state_dir = Path(cfg.state_dir) if cfg.state_dir else self.out_dir
        self.train_te = not cfg.network_train_unet_only and any(c.startswith("te") for c in host.components())
        self.train_unet = not cfg.network_train_text_encoder_only
        if cfg.network_train_text_encoder_only and not self.train_te:
            raise ValueError("network_train_text_encoder_only is set but the model has no text encoder")
        self._te_cache: dict[str, Conditioning] = {}
        self.dataset_effective_colors: float | None = None
        self.family = family(getattr(host, "arch", "sd1"))
        for msg in objective_for(host).check_config(self.cfg, host):  # raises for settings that contradict it
            logger.warning(msg)
        if cfg.t5xxl_max_token_length is not None and hasattr(host, "set_t5xxl_max_token_length"):
            host.set_t5xxl_max_token_length(cfg.t5xxl_max_token_length)
        if cfg.clip_skip is not None or cfg.max_token_length is not None:
            for msg in host.configure_text(clip_skip=cfg.clip_skip, max_token_length=cfg.max_token_length):
                logger.warning(msg)
        if cfg.v_parameterization or cfg.zero_terminal_snr:
            host.configure_schedule(prediction_type="v_prediction" if cfg.v_parameterization else None,
                                    zero_terminal_snr=cfg.zero_terminal_snr)
        if cfg.zero_terminal_snr and host.prediction_type != "v_prediction":
            # kohya train_util.verify_training_args gives the same warning
            logger.warning("zero_terminal_snr is on but the model predicts epsilon: at the last timestep x_t is "
                           "pure noise and epsilon-prediction cannot recover x0; use a v-prediction model "
                           "(v_parameterization = true)")
        # optional hook(network) run once after the network is built, before the optimizer: starts the run from
        # given LoRA weights (nodes/interop.py continues a ComfyUI LORA_MODEL this way); a resume state wins over it
        self.init_network: Callable[[LoRANetwork], None] | None = None
        # this process's part of a multi-process run (training/distributed.py; set by the CLI under
        # `accelerate launch`); None = one process, the trainer as it always was
        self.dist = None

    # -- schedule ---------------------------------------------------------------------------------------------
    def schedule(self) -> tuple[int, int, int]:
        """``(batches_per_epoch, max_train_steps, num_epochs)`` by kohya's rules (module docstring)."""
        nb = self.dataset.num_batches(self.cfg.train_batch_size)
        if self.dist is not None:  # bucket batches per process (kohya: len(train_dataloader) after prepare)
            nb = self.dist.batches_per_process(nb)
        upe = math.ceil(nb / self.cfg.gradient_accumulation_steps)
        if self.cfg.max_train_epochs:
            max_steps = self.cfg.max_train_epochs * upe
        else:
            max_steps = self.cfg.max_train_steps
        num_epochs = math.ceil(max_steps / upe)
        return nb, max_steps, num_epochs

    # -- conditioning -----------------------------------------------------------------------------------------
    def _encode(self, captions: list[str], entries: Sequence | None = None,
                flipped: Sequence[bool] | None = None) -> Conditioning:
        """The batch's :class:`~.conditioning.Conditioning`: text-encoder outputs (cached per caption while the
        text encoders are frozen, as kohya's ``cache_text_encoder_outputs``), plus, for families with size
        conditioning (SDXL), each image's size ids from ``entries`` (see :func:`sdxl_size_ids`)."""
        if self.train_te and not getattr(self, "_te_frozen", False):
            cond = Conditioning.wrap(self.host.encode_prompts(captions))
        else:
            missing = [c for c in dict.fromkeys(captions) if c not in self._te_cache]
            if missing:
                with torch.no_grad():
                    enc = Conditioning.wrap(self.host.encode_prompts(missing)).detach()
                if len(self._te_cache) > 4096:
                    self._te_cache.clear()
                for c, row in zip(missing, enc.rows()):
                    self._te_cache[c] = row
            cond = Conditioning.cat([self._te_cache[c] for c in captions])
        if entries is not None and self.family.size_conditioning:
            cond = cond.with_extras(size_ids=sdxl_size_ids(entries, flipped))
        return cond

    # -- evaluation -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def validation_loss(self, autocast=None) -> float | None:
        """Kohya's epoch validation loss (see module docstring); ``None`` without a validation split."""
        ds, cfg = self.dataset, self.cfg
        if not ds.val_entries:
            return None
        ts = objective_for(self.host).validation_timesteps(self.host, cfg)  # kohya's 4 points (t or σ)
        seed = ds.options.validation_seed if ds.options.validation_seed is not None else cfg.seed
        gen = torch.Generator("cpu").manual_seed(int(seed))
        bs = cfg.train_batch_size
        groups: dict[tuple[int, int], list] = {}
        for e in ds.val_entries:
            groups.setdefault(e.bucket_reso, []).append(e)
        total, n = 0.0, 0
        for key in sorted(groups):
            items = groups[key]
            for i in range(0, len(items), bs):
                batch = items[i:i + bs]
                lat = torch.stack([e.latents for e in batch])
                cond = self._encode([e.caption for e in batch], batch)
                for t in ts:
                    tt = torch.full((len(batch),), t.item(), dtype=ts.dtype)
                    loss = diffusion_loss(self.host, lat, cond, cfg, gen, timesteps=tt, autocast=autocast)
                    total += float(loss) * len(batch)
                    n += len(batch)
        return total / max(n, 1)

    @torch.no_grad()
    def render_samples(self, prompts: Sequence[str]) -> list[np.ndarray]:
        """One image per prompt (uint8 ``[H, W, 3]``); kohya per-prompt options (:mod:`.sample_prompts`) override
        the trainer's sample settings; seeds ``sample_seed + i`` unless a prompt gives ``--d``."""
        import inspect

        from .sample_prompts import SamplePrompt, comfy_sampler, round_size

        cfg = self.cfg
        specs = {sp.prompt: sp for sp in cfg.prompt_specs}
        w0 = cfg.sample_width or self.dataset.options.size[0]
        h0 = cfg.sample_height or self.dataset.options.size[1]
        seed = cfg.sample_seed if cfg.sample_seed is not None else cfg.seed
        params = inspect.signature(self.host.sample).parameters
        takes_sampler = "sampler_name" in params
        native = getattr(self.host, "native_sampler", "ddim")
        # kohya's Flux samples: true CFG ("scale") defaults to 1.0 (flux_train_utils.py line 159), --g = guidance
        cfg_default = cfg.sample_cfg if "guidance" not in params or cfg.sample_cfg != TrainConfig.sample_cfg else 1.0
        out = []
        for i, p in enumerate(prompts):
            sp = specs.get(p) or SamplePrompt(p)
            kw = {}
            name = sp.sample_sampler or cfg.sample_sampler
            if takes_sampler:
                kw["sampler_name"], kw["scheduler"] = comfy_sampler(name)
            elif (name or native).lower() not in (native, TrainConfig.sample_sampler) \
                    and not getattr(self, "_sampler_warned", False):
                logger.warning("sample_sampler %s has no effect: this model host samples with %s only", name, native)
                self._sampler_warned = True
            if "guidance" in params:
                kw["guidance"] = sp.guidance_scale
            elif sp.guidance_scale is not None:
                logger.warning("sample prompt option --g (distilled guidance, Flux) has no effect on this model")
            img = self.host.sample([p], sp.negative_prompt if sp.negative_prompt is not None else cfg.sample_negative,
                                   width=round_size(sp.width or w0) if sp.width else w0,
                                   height=round_size(sp.height or h0) if sp.height else h0,
                                   steps=sp.sample_steps or cfg.sample_steps,
                                   cfg=sp.scale if sp.scale is not None else cfg_default,
                                   seed=sp.seed if sp.seed is not None else seed + i, **kw)
            out.append(_to_uint8(img[0]))
        return out

    def _dataset_effective_colors(self) -> float | None:
        if self.dataset_effective_colors is None:
            vals = []
            for e in self.dataset.entries[:256]:
                img = ((self.dataset.load_image(e) + 1) * 127.5).round().clamp(0, 255).byte()
                m = palette_metrics(img.permute(1, 2, 0).numpy(), self.cfg.palette_list,
                                    self.cfg.sample_grid_cells)
                if "effective_colors" in m:
                    vals.append(m["effective_colors"])
            self.dataset_effective_colors = float(np.median(vals)) if vals else None
        return self.dataset_effective_colors

    # -- state files ------------------------------------------------------------------------------------------
    def _save_state(self, stem: str, *, network, optimizer, scheduler, scaler, gen, py_rng, epoch, global_step,
                    history, step_losses, stopper, best, epoch_files) -> Path:
        tensors = {f"network.{k}": v for k, v in network.kohya_state_dict().items()}
        opt_t, opt_js = optimizer_state_to_flat(optimizer.state_dict())
        tensors.update(opt_t)
        tensors["rng.noise"] = gen.get_state()
        tensors["rng.dropout"] = network.generator.get_state()
        st_path = self.state_dir / f"{stem}-state.safetensors"
        save_safetensors(tensors, st_path, metadata={"schema": STATE_SCHEMA})
        js = {
            "schema": STATE_SCHEMA,
            "output_name": self.cfg.output_name,
            "epoch": epoch,
            "global_step": global_step,
            "tensors": st_path.name,
            "optimizer": opt_js,
            "scheduler": _jsonable(scheduler.state_dict()),
            "scaler": _jsonable(scaler.state_dict()) if scaler is not None else None,
            "python_rng": _py_rng_to_json(py_rng.getstate()),
            "session_id": self._session_id,
            "num_processes": self.dist.world if self.dist is not None else 1,
            "history": history,
            "step_losses": step_losses,
            "early_stopping": stopper.state(),
            "best": best,
            "epoch_files": {str(k): str(v.name) for k, v in epoch_files.items()},
            "config": _jsonable(self.cfg.to_dict()),
            "dataset": {"images": len(self.dataset.entries), "num_train_images": self.dataset.num_train_images},
        }
        js_path = self.state_dir / f"{stem}-state.json"
        atomic_write_text(js_path, json.dumps(js))
        return js_path

    def _load_state(self, path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
        if path.suffix == ".safetensors":
            path = path.with_suffix(".json")
        if not path.is_file():
            raise FileNotFoundError(f"training state not found: {path}")
        js = json.loads(path.read_text(encoding="utf-8"))
        if js.get("schema") != STATE_SCHEMA:
            raise ValueError(f"{path.name} is not a Concept Lab training state ({STATE_SCHEMA})")
        tensors = load_state_dict(path.parent / js["tensors"])
        old = js.get("config", {})
        must = ("network_dim", "network_alpha", "conv_dim", "conv_alpha", "train_batch_size", "optimizer_type",
                "network_train_unet_only", "network_train_text_encoder_only")
        diffs = [f"{k}: {old.get(k)!r} -> {getattr(self.cfg, k)!r}" for k in must if k in old
                 and old.get(k) != _jsonable(getattr(self.cfg, k))]
        if diffs:
            raise ValueError("cannot resume: the saved state was trained with different settings ("
                             + "; ".join(diffs) + ")")
        from .distributed import check_resume_batch  # processes × gradient_accumulation_steps may trade places

        check_resume_batch(old, int(js.get("num_processes", 1)), self.cfg, self.dist.world if self.dist else 1)
        if js["dataset"]["num_train_images"] != self.dataset.num_train_images:
            raise ValueError(f"cannot resume: the dataset changed ({js['dataset']['num_train_images']} images "
                             f"with repeats then, {self.dataset.num_train_images} now)")
        return js, tensors

    # -- the run ----------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Train; write checkpoints, states, the epoch table and the best file; return a :class:`TrainResult`.

        Raises:
            TrainingDivergedError: NaN/Inf loss or gradient (files of finished epochs are kept).
            OptimizerUnavailableError, ValueError: bad settings (before anything is written), or a resume state
                that does not match the settings / dataset.
            FileNotFoundError: ``cfg.resume`` names a training state that does not exist.
            Whatever ``progress`` raises (cancel), after cleanup.
        """
        cfg, host, ds = self.cfg, self.host, self.dataset
        device = host.device
        autocast, precision, use_scaler = _autocast_factory(cfg.mixed_precision, device)
        nb, max_steps, num_epochs = self.schedule()
        prompts = cfg.prompts
        has_samples = bool(prompts) and cfg.sample_every_n_epochs > 0
        metric, direction = resolve_metric(cfg.best_metric, cfg.best_direction, bool(ds.val_entries), has_samples)
        if metric == "none":
            direction = "min"

        network, groups = build_network_and_groups(host, cfg, self.train_unet, self.train_te)
        # a text encoder whose every LoRA parameter is frozen (text_encoder_lr = 0) is encoded once and cached
        trainable = {id(p) for g in groups for p in g["params"]}
        self._te_frozen = not any(id(p) in trainable for p in network.parameter_groups()["te"])
        if self._te_frozen or not self.train_te:  # kohya cache_text_encoder_outputs: cached, then off the device
            from .te_offload import offload_after_caching
            offload_after_caching(self, prompts)
        if self.init_network is not None:  # e.g. continue from a ComfyUI LORA_MODEL (values copied in place)
            self.init_network(network)
        network.to(device)
        optimizer = build_optimizer(cfg.optimizer_type, groups, cfg.learning_rate, cfg.optimizer_args, device)
        scheduler = build_scheduler(cfg, optimizer, max_steps)
        scaler = torch.amp.GradScaler(device.type) if use_scaler else None

        dp = self.dist  # multi-process run (training/distributed.py) or None
        is_main = dp is None or dp.is_main
        if is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.state_dir.mkdir(parents=True, exist_ok=True)
        gen = torch.Generator("cpu").manual_seed(int(cfg.seed))
        py_rng = random.Random(int(cfg.seed))
        history: list[dict] = []
        step_losses: list[float] = []
        stopper = EarlyStopping(cfg.early_stopping_patience)
        best: dict[str, Any] = {"epoch": None, "value": None}
        epoch_files: dict[int, Path] = {}
        start_epoch, global_step = 0, 0
        session_id = random.Random(time.time_ns()).randint(0, 2 ** 32)
        self._session_id = session_id
        started_at = time.time()

        resume_path = None
        if cfg.resume:
            resume_path = find_latest_state(self.state_dir, cfg.output_name) if str(cfg.resume) == "auto" \
                else Path(cfg.resume)
            if resume_path is None:
                logger.warning("resume=auto: no saved state in %s; starting from scratch", self.state_dir)
        if resume_path is not None:
            js, tensors = self._load_state(resume_path)
            network.load_kohya_state_dict({k[len("network."):]: v for k, v in tensors.items()
                                           if k.startswith("network.")})
            optimizer.load_state_dict(optimizer_state_from_flat(
                {k: v.to(device) if k.startswith("optimizer.") else v for k, v in tensors.items()},
                js["optimizer"]))
            scheduler.load_state_dict(js["scheduler"])
            if scaler is not None and js.get("scaler"):
                scaler.load_state_dict(js["scaler"])
            gen.set_state(tensors["rng.noise"])
            network.generator.set_state(tensors["rng.dropout"])
            py_rng.setstate(_py_rng_from_json(js["python_rng"]))
            start_epoch, global_step = int(js["epoch"]), int(js["global_step"])
            history, step_losses = list(js["history"]), list(js["step_losses"])
            stopper.load(js["early_stopping"])
            best = dict(js["best"])
            epoch_files = {int(k): self.out_dir / v for k, v in js.get("epoch_files", {}).items()}
            session_id = self._session_id = int(js.get("session_id", session_id))
            logger.info("resumed from %s at epoch %d, step %d", resume_path.name, start_epoch, global_step)
        if dp is not None:  # every process starts from the main process's weights (as DDP does)
            dp.output_dir = self.out_dir
            dp.broadcast_parameters(network.parameters())

        metadata = build_metadata(cfg, ds, host, num_epochs=num_epochs, max_steps=max_steps, batches_per_epoch=nb,
                                  session_id=session_id, started_at=started_at, model_name=self.model_name,
                                  model_hash=self.model_hash, new_model_hash=self.new_model_hash,
                                  mixed_precision=cfg.mixed_precision, train_unet=self.train_unet,
                                  train_te=self.train_te)
        metadata = self._kohya_metadata(metadata, optimizer)
        if dp is not None:  # ss_total_batch_size = train_batch_size × processes × accumulation, ss_num_processes
            metadata = dp.metadata(metadata, cfg)
        gc_on = False
        last_good: Path | None = max(epoch_files.items())[1] if epoch_files else None
        stopped_early = False
        final_path = None
        best_path = self.out_dir / f"{cfg.output_name}-best.safetensors"
        sample_rows: list[list[np.ndarray]] = []
        sample_labels: list[str] = []
        try:
            network.install(host)
            if cfg.gradient_checkpointing:
                gc_on = _set_gradient_checkpointing(host, True)
                if not gc_on:
                    logger.warning("this host does not support gradient checkpointing; continuing without")
            with (dp.main_first() if dp is not None and ds.options.cache_latents_to_disk
                  else contextlib.nullcontext()):  # disk caches: written once by the main process, then read
                ds.cache_latents(host.encode_images, vae_key=self._vae_key(), progress=self.encode_latents_progress)
            if start_epoch >= num_epochs:
                logger.info("the saved state already finished all %d epochs", num_epochs)
            target_value = None
            if metric == "effective_colors_vs_dataset":
                target_value = self._dataset_effective_colors()
            if cfg.sample_at_first and has_samples and start_epoch == 0 and is_main:  # kohya sample_at_first
                network.eval()
                first = self.render_samples(prompts)
                for i, im in enumerate(first):
                    save_png(im, self.state_dir / "sample" / f"{cfg.output_name}_e{0:06d}_{i:02d}.png")
                sample_rows.append(first)
                sample_labels.append("before training")
            for epoch in range(start_epoch, num_epochs):
                ep1 = epoch + 1
                batches = ds.epoch_batches(ep1, cfg.train_batch_size, cfg.seed)
                network.train()
                micro_losses: list[float] = []
                epoch_losses: list[float] = []
                optimizer.zero_grad(set_to_none=True)
                for bi, idx in enumerate(batches):
                    entries = [ds.entries[i] for i in idx]
                    caps = [process_caption(e.caption, getattr(e, "captions", None) or ds.captions, py_rng,
                                            epoch=ep1, step=global_step, max_train_steps=max_steps) for e in entries]
                    lat, flips = [], []
                    for e in entries:
                        flip_on = ds.options.flip_aug if getattr(e, "flip_aug", None) is None else e.flip_aug
                        flip = flip_on and py_rng.random() < 0.5
                        flips.append(bool(flip and e.latents_flipped is not None))
                        lat.append(e.latents_flipped if flips[-1] else e.latents)
                    latents = torch.stack(lat)
                    network.resample_dropout(True)
                    lw = None
                    if any(getattr(e, "is_reg", False) for e in entries):  # kohya batch["loss_weights"]
                        lw = torch.tensor([cfg.prior_loss_weight if getattr(e, "is_reg", False) else 1.0
                                           for e in entries])
                    own = dp is None or dp.owns(bi)
                    if not own:  # another process trains this micro-batch: draw its randomness only
                        dp.draw_only(diffusion_loss, host, latents, cfg, gen, loss_weights=lw)
                    else:
                        with torch.set_grad_enabled(True):
                            cond = self._encode(caps, entries, flips)
                            loss = diffusion_loss(host, latents, cond, cfg, gen, autocast=autocast, loss_weights=lw)
                        lv = float(loss.detach())
                    if own and dp is None and not math.isfinite(lv):
                        raise TrainingDivergedError(
                            f"the loss became {lv} at epoch {ep1}, step {global_step + 1}; training stopped. "
                            + (f"The last good checkpoint is {last_good.name}." if last_good else
                               "No epoch had finished, so no checkpoint was written.")
                            + " Lower the learning rate, or use mixed_precision bf16 instead of fp16.")
                    if own:
                        micro_losses.append(lv)
                        scaled = loss / cfg.gradient_accumulation_steps
                        (scaler.scale(scaled) if scaler is not None else scaled).backward()
                    last_micro = bi == len(batches) - 1
                    # with N processes one optimizer step spans N × gradient_accumulation_steps micro-batches
                    if (bi + 1) % (cfg.gradient_accumulation_steps * (dp.world if dp else 1)) != 0 and not last_micro:
                        continue
                    params = [p for g in optimizer.param_groups for p in g["params"]]
                    if dp is not None:  # average gradients over the processes; agree on the loss and on NaN
                        step_loss, bad = dp.sync_step(params, micro_losses)
                        micro_losses = [step_loss] if step_loss is not None else []
                        if bad:
                            raise TrainingDivergedError(
                                f"the loss became NaN/Inf at epoch {ep1}, step {global_step + 1} (in at least one "
                                "process); training stopped. " + (f"The last good checkpoint is {last_good.name}."
                                                                  if last_good else "No checkpoint was written.")
                                + " Lower the learning rate, or use mixed_precision bf16 instead of fp16.")
                    if scaler is not None:
                        scaler.unscale_(optimizer)
                    if cfg.max_grad_norm > 0:
                        norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                        if scaler is None and not torch.isfinite(norm):
                            raise TrainingDivergedError(
                                f"the gradient norm became {float(norm)} at epoch {ep1}, step {global_step + 1}; "
                                "training stopped. " + (f"The last good checkpoint is {last_good.name}."
                                                        if last_good else "No checkpoint was written."))
                    if scaler is not None:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    if cfg.scale_weight_norms:  # kohya apply_max_norm_regularization after the step
                        max_norm_regularization(network.loras.values(), cfg.scale_weight_norms)
                    global_step += 1
                    step_loss = float(np.mean(micro_losses))
                    micro_losses = []
                    step_losses.append(step_loss)
                    epoch_losses.append(step_loss)
                    if dp is not None:  # the main process reports; a cancel there stops every process
                        dp.call_progress(self.progress, global_step, max_steps,
                                         {"loss": step_loss, "epoch": ep1, "lr": scheduler.get_last_lr()[0]})
                    elif self.progress is not None:
                        self.progress(global_step, max_steps, {"loss": step_loss, "epoch": ep1,
                                                               "lr": scheduler.get_last_lr()[0]})
                    if global_step >= max_steps:
                        break

                # ---- end of epoch: files, evaluation, selection ----
                network.eval()
                network.resample_dropout(False)
                is_last = ep1 >= num_epochs or global_step >= max_steps
                if not is_main:  # the main process evaluates, writes and decides on early stopping
                    if dp.broadcast_flag(None) or global_step >= max_steps:
                        break
                    continue
                record: dict[str, Any] = {"epoch": ep1, "step": global_step,
                                          "train_loss": float(np.mean(epoch_losses)) if epoch_losses else None,
                                          "lr": float(scheduler.get_last_lr()[0])}
                if ds.val_entries and (ep1 % max(1, cfg.validate_every_n_epochs) == 0 or is_last):
                    record["val_loss"] = self.validation_loss(autocast)
                samples: list[np.ndarray] = []
                if has_samples and (ep1 % cfg.sample_every_n_epochs == 0 or is_last):
                    samples = self.render_samples(prompts)
                    sample_dir = self.state_dir / "sample"
                    names = []
                    for i, im in enumerate(samples):
                        p = save_png(im, sample_dir / f"{cfg.output_name}_e{ep1:06d}_{i:02d}.png")
                        names.append(str(p.relative_to(self.state_dir)))
                    record["samples"] = names
                    mets = [palette_metrics(im, cfg.palette_list, cfg.sample_grid_cells) for im in samples]
                    keys = sorted(set().union(*[m.keys() for m in mets])) if mets else []
                    for k in keys:
                        vals = [m[k] for m in mets if k in m]
                        if vals:
                            record[k] = float(np.mean(vals))
                    if "effective_colors" in record and target_value is not None:
                        record["effective_colors_vs_dataset"] = record["effective_colors"]
                        record["dataset_effective_colors"] = target_value
                    sample_rows.append(samples)
                    sample_labels.append(f"epoch {ep1}")

                file_epoch = None if is_last else ep1
                save_now = is_last or (cfg.save_every_n_epochs and ep1 % cfg.save_every_n_epochs == 0)
                if save_now:
                    md = dict(metadata, ss_epoch=ep1, ss_steps=global_step, ss_training_finished_at=time.time())
                    path = save_lora_file(self.out_dir / epoch_file_name(cfg.output_name, file_epoch), network, md,
                                          cfg.save_precision)
                    epoch_files[ep1] = path
                    record["file"] = path.name
                    last_good = path

                # best epoch and early stopping
                stop = False
                if metric != "none":
                    value = record.get(metric)
                    score = score_of(float(value), direction, target_value) if isinstance(value, (int, float)) \
                        else None
                    improved_before = stopper.best_score
                    stop = stopper.update(ep1, score)
                    if score is not None and (improved_before is None or stopper.best_epoch == ep1):
                        best = {"epoch": ep1, "value": float(value)}
                        reason = (f"best epoch {ep1} of {num_epochs} by {metric} "
                                  f"({direction}{'' if target_value is None or direction != 'target' else f' → {target_value:.3g}'})"
                                  f" = {float(value):.6g}")
                        md = dict(metadata, ss_epoch=ep1, ss_steps=global_step,
                                  ss_training_finished_at=time.time(), ss_best_epoch=ep1, ss_best_metric=metric,
                                  ss_best_value=float(value), ss_best_reason=reason)
                        save_lora_file(best_path, network, md, cfg.save_precision)
                        best["reason"] = reason
                        record["best_so_far"] = 1
                history.append(record)
                if stop and not is_last:
                    # early stop: this epoch is the run's last, written under the final name (kohya's last file)
                    stopped_early = True
                    record["stopped_early"] = 1
                    md = dict(metadata, ss_epoch=ep1, ss_steps=global_step, ss_training_finished_at=time.time(),
                              ss_stopped_early=True)
                    path = save_lora_file(self.out_dir / epoch_file_name(cfg.output_name, None), network, md,
                                          cfg.save_precision)
                    if not save_now:
                        epoch_files[ep1] = path
                        record["file"] = path.name
                    last_good = path
                    save_now = True
                if save_now and cfg.save_state:
                    stem = cfg.output_name if (is_last or stopped_early) else f"{cfg.output_name}-{ep1:06d}"
                    self._save_state(stem, network=network, optimizer=optimizer, scheduler=scheduler,
                                     scaler=scaler, gen=gen, py_rng=py_rng, epoch=ep1, global_step=global_step,
                                     history=history, step_losses=step_losses, stopper=stopper, best=best,
                                     epoch_files=epoch_files)
                self._write_table(history, best.get("epoch"), metric, direction, target_value)
                if self.on_epoch is not None:
                    preview = labelled_grid([samples], [f"epoch {ep1}"]) if samples else None
                    self.on_epoch(record, preview)
                if dp is not None:
                    dp.broadcast_flag(stopped_early)
                if stopped_early or global_step >= max_steps:
                    break
            final_path = self.out_dir / epoch_file_name(cfg.output_name, None)
            if not final_path.is_file():
                final_path = None
        finally:
            if gc_on:
                _set_gradient_checkpointing(host, False)
            network.remove()
            network.to("cpu")
            self._te_cache.clear()

        if not is_main:  # files, tables and pictures are the main process's
            return TrainResult(output_dir=self.out_dir.resolve(), final_path=None, best_path=None, best_epoch=None,
                               best_metric=metric, best_value=None, epoch_files={}, history=[],
                               step_losses=step_losses, global_step=global_step, epochs_done=0,
                               stopped_early=False, table_path=None, network=network)
        table_path = self.state_dir / f"{cfg.output_name}-epochs.json"
        loss_img = render_loss_curve(step_losses, history, math.ceil(nb / cfg.gradient_accumulation_steps),
                                     best.get("epoch"))
        table_img = render_epoch_table(history, self._table_columns(history), best.get("epoch"),
                                       title=f"{cfg.output_name}: best by {metric}")
        save_png(loss_img, self.state_dir / f"{cfg.output_name}-loss.png")
        save_png(table_img, self.state_dir / f"{cfg.output_name}-epochs.png")
        grid = labelled_grid(sample_rows, sample_labels, [p[:18] for p in prompts]) if sample_rows else None
        if grid is not None:
            save_png(grid, self.state_dir / f"{cfg.output_name}-samples.png")
        return TrainResult(output_dir=self.out_dir.resolve(), final_path=final_path.resolve() if final_path else None,
                           best_path=best_path.resolve() if best_path.is_file() and best.get("epoch") else None,
                           best_epoch=best.get("epoch"), best_metric=metric, best_value=best.get("value"),
                           epoch_files={k: v.resolve() for k, v in epoch_files.items()}, history=history,
                           step_losses=step_losses, global_step=global_step, epochs_done=len(history),
                           stopped_early=stopped_early, table_path=table_path.resolve(), loss_curve=loss_img,
                           table_image=table_img, sample_grid=grid, network=network)

    # -- helpers ----------------------------------------------------------------------------------------------
    def _kohya_metadata(self, metadata: dict, optimizer) -> dict:
        """kohya's key set and value formats (training/kohya_metadata.py); ``no_metadata`` keeps kohya's minimum."""
        from .kohya_metadata import apply_kohya_formats, minimum_metadata

        cfg = self.cfg
        kw = _optimizer_kwargs(cfg.optimizer_args)
        if cfg.optimizer_type.lower() == "sgdnesterov":
            kw.setdefault("momentum", 0.9)
        md = apply_kohya_formats(metadata, getattr(cfg, "_raw", {}) or {}, optimizer=optimizer, optimizer_kwargs=kw)
        return minimum_metadata(md) if cfg.no_metadata else md

    def _vae_key(self) -> str:
        """A fingerprint of the host's VAE: the latents of a fixed 64×64 gradient (for disk latent caches)."""
        if not self.dataset.options.cache_latents_to_disk:
            return ""
        import hashlib

        ramp = torch.linspace(-1, 1, 64)
        pix = torch.stack([ramp.view(1, -1).expand(64, 64), ramp.view(-1, 1).expand(64, 64),
                           torch.zeros(64, 64)]).unsqueeze(0)
        with torch.no_grad():
            lat = self.host.encode_images(pix).float()
        return hashlib.sha256((lat * 1000).round().numpy().tobytes()).hexdigest()[:16]

    @staticmethod
    def _table_columns(history: Sequence[Mapping[str, Any]]) -> list[str]:
        preferred = ["epoch", "step", "train_loss", "val_loss", "effective_colors", "dataset_effective_colors",
                     "in_palette_frac"]
        present = {k for r in history for k, v in r.items() if isinstance(v, (int, float))}
        cols = [c for c in preferred if c in present]
        extra = sorted(k for k in present if k not in cols and k not in ("lr", "best_so_far", "stopped_early",
                                                                         "effective_colors_vs_dataset"))
        return (cols + extra)[:9]

    def _write_table(self, history, best_epoch, metric, direction, target) -> Path:
        doc = {"schema": EPOCHS_SCHEMA, "output_name": self.cfg.output_name, "best_metric": metric,
               "best_direction": direction, "best_target": target, "best_epoch": best_epoch,
               "epochs": history}
        return atomic_write_text(self.state_dir / f"{self.cfg.output_name}-epochs.json",
                                 json.dumps(_jsonable(doc), indent=1))


def train_lora(host: DiffusionHost, dataset: KohyaDataset, cfg: TrainConfig, **kw) -> TrainResult:
    """Convenience wrapper: ``LoraTrainer(host, dataset, cfg, **kw).run()``."""
    return LoraTrainer(host, dataset, cfg, **kw).run()


def configs_from_mapping(values: Mapping[str, Any]) -> tuple[TrainConfig, DatasetOptions, CaptionConfig, list[str]]:
    """Split one flat kohya mapping into trainer, dataset and caption options; returns unknown keys too
    (keys known to none of the three, e.g. ``pretrained_model_name_or_path``, are the caller's)."""
    cfg, unknown = TrainConfig.from_mapping(values)
    ds_names = {f.name for f in fields(DatasetOptions)}
    cap_names = {f.name for f in fields(CaptionConfig)}
    dopts = DatasetOptions.from_mapping(values)
    caps = CaptionConfig.from_mapping(values)
    rest = [k for k in unknown if k not in ds_names and k not in cap_names]
    return cfg, dopts, caps, rest
