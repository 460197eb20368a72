"""What a LoRA run produces: the files (epoch file names as kohya's ``<name>-<epoch:06d>``, the LoRA file itself
with kohya ``ss_*`` metadata: :func:`save_lora_file`, :func:`build_metadata`) and the :class:`TrainResult` that
lists them."""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..families import family, modelspec_arch
from ..host import DiffusionHost
from .config import TrainConfig
from .dataset import KohyaDataset
from .network import LoRANetwork
from .objective import objective_for

EPOCHS_SCHEMA = "conceptlab.lora_epochs/1"


def epoch_file_name(output_name: str, epoch: int | None) -> str:
    """Kohya's checkpoint names: ``name-000003.safetensors`` for an epoch, ``name.safetensors`` for the last."""
    return f"{output_name}.safetensors" if epoch is None else f"{output_name}-{int(epoch):06d}.safetensors"


def save_lora_file(path: str | os.PathLike, network: LoRANetwork, metadata: Mapping[str, Any],
                   precision: str = "fp16") -> Path:
    """Write the network as a kohya LoRA file (``formats.lora_files.save_kohya_lora``: keys, alpha, sshs hashes).

    Metadata values are stringified (kohya writes every ``ss_*`` value with ``str()``).
    """
    from ...formats.lora_files import save_kohya_lora
    from ...formats.safetensors_io import parse_dtype

    # kohya writes every value with str() (None -> "None"); dicts / lists as JSON (ss_tag_frequency, ...)
    md = {k: (v if isinstance(v, str) else (json.dumps(v) if isinstance(v, (dict, list)) else str(v)))
          for k, v in metadata.items()}
    if hasattr(network, "algo"):  # a LyCORIS network (training/lora/lycoris_net.py): its own key names
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
