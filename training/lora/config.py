"""LoRA training settings with kohya names: :class:`TrainConfig` (validated, every key honoured or refused by
name), kohya TOML / ``--set`` parsing (:func:`parse_kohya_toml`, :func:`parse_set_values`) and
:func:`configs_from_mapping`, which splits one flat kohya mapping into trainer, dataset and caption options.
The loop itself is :mod:`.trainer`."""

from __future__ import annotations

import ast
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping, Sequence

from .captions import CaptionConfig
from .dataset_options import DatasetOptions
from .noise import NoiseOptions
from .objective import FlowSettings


OPTIMIZERS = ("AdamW", "AdamW8bit", "Adafactor", "Prodigy", "SGDNesterov")
SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear", "polynomial")
LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
BEST_METRICS = ("auto", "val_loss", "train_loss", "effective_colors_vs_dataset", "in_palette_frac", "none")


class TrainingDivergedError(RuntimeError):
    """The loss (or the gradient norm) became NaN/Inf; the last good checkpoint is kept."""


class OptimizerUnavailableError(ValueError):
    """The requested optimizer cannot run here (package missing or no backend for this device)."""


@dataclass
class TrainConfig(FlowSettings):
    """Training settings, named as kohya's ``train_network.py`` arguments (defaults are kohya's unless noted).

    Schedule: ``max_train_epochs`` (wins when set) or ``max_train_steps``; ``train_batch_size``;
    ``gradient_accumulation_steps``; ``seed``.
    Network: ``network_dim``, ``network_alpha`` (scale = alpha/dim), ``conv_dim``/``conv_alpha`` (LoCon; also
    read from ``network_args = ["conv_dim=4", ...]``), ``network_dropout`` (rank dropout, see
    :mod:`.network`), ``module_dropout``, ``network_train_unet_only`` / ``network_train_text_encoder_only``
    (kohya trains both by default).
    Optimisation: ``optimizer_type`` (:data:`OPTIMIZERS`), ``optimizer_args`` (``["weight_decay=0.1", ...]``),
    ``learning_rate``, ``unet_lr``, ``text_encoder_lr``, ``lr_scheduler`` (:data:`SCHEDULERS`),
    ``lr_warmup_steps`` (int, or a fraction < 1 of the total steps), ``lr_scheduler_num_cycles``,
    ``lr_scheduler_power``, ``max_grad_norm`` (0 = off), ``mixed_precision`` (``no``/``fp16``/``bf16``; CPU
    always runs fp32), ``gradient_checkpointing``.
    Objective: ``noise_offset``, ``min_snr_gamma``, ``loss_type`` (:data:`LOSS_TYPES`), ``huber_schedule``,
    ``huber_c``, ``huber_scale``, ``min_timestep``, ``max_timestep`` (None = T), ``clip_skip`` / ``max_token_length`` (kohya's text
    encoding, applied by the host: :meth:`..host.DiffusionHost.configure_text`), ``v_parameterization`` (the
    model predicts v: kohya's flag for SD2-v / NoobAI-vpred-style models; a ComfyUI MODEL already says so through
    its ``model_sampling``), ``zero_terminal_snr`` (rescale the schedule to zero terminal SNR as kohya does; the
    samples rendered each epoch use the same schedule; see :meth:`..host.DiffusionHost.configure_schedule`).
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
    # kohya noise / loss options (training/lora/noise.py; issue 14)
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
    # kohya sampling options (training/lora/sample_prompts.py)
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
        # kohya network_args (training/lora/network_args.py); unknown entries raise ValueError naming them
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
                flat[k] = v  # an inline kohya dataset config (training/lora/dataset_config.py)
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
