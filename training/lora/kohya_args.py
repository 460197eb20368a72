"""Every kohya sd-scripts setting, sorted into what the trainer does with it: honoured, warned (no effect here)
or refused — so no key a user writes is dropped without a word.

kohya's own names come from its parsers, kept as data in ``training/lora/kohya_arguments.json`` (regenerate with
``python tests/tools/gen_kohya_arguments.py --git-dir <sd-scripts git dir>``; read with :mod:`ast` from
``train_network.py`` ``setup_parser`` and the ``add_*_arguments`` functions it calls, ``library/config_util.py``
``ConfigSanitizer`` schemas and ``networks/lora.py`` ``kwargs.get`` names). The test
``tests/test_kohya_args.py`` checks every name there is in exactly one of :data:`HONOURED`, :data:`NO_EFFECT`,
:data:`REFUSED`.

* **honoured**: read and applied with kohya's semantics (where the name lives: trainer, dataset, captions, CLI).
* **no effect**: kohya options that do not change the trained weights here (speed/memory/logging switches, or
  behaviour Concept Lab always has). Setting one to a non-default value prints a warning naming it.
* **refused**: options that would change the training and are not implemented; a non-default value raises
  :class:`KohyaSettingError` naming each key and what to do instead. Kohya's default value is accepted silently
  (it asks for nothing).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

DATA_FILE = Path(__file__).with_name("kohya_arguments.json")


class KohyaSettingError(ValueError):
    """A kohya setting this trainer cannot honour (the message names every such key and what to do)."""


# -- honoured: kohya name -> where it is applied ----------------------------------------------------------------
HONOURED: dict[str, str] = {
    # model / files (CLI)
    "pretrained_model_name_or_path": "CLI: the local diffusers folder or SD1/SD2 single file",
    "v2": "checked against the detected architecture (single files are detected; v2 = SD 2.x)",
    "v_parameterization": "CLI: forces v-prediction",
    "output_dir": "LoRA files", "output_name": "file names", "logging_dir": "training states / tables",
    "save_precision": "file dtype", "save_every_n_epochs": "epoch files", "save_state": "training state",
    "ddp_timeout": "CLI under accelerate launch: the process group's timeout in minutes (training/distributed.py)",
    "resume": "resume from a Concept Lab training state (-state.json)", "training_comment": "ss_training_comment",
    "save_model_as": "safetensors only (ckpt/pt are refused)", "no_metadata": "write no ss_* metadata",
    "metadata_title": "modelspec.title", "metadata_author": "modelspec.author",
    "metadata_description": "modelspec.description", "metadata_license": "modelspec.license",
    "metadata_tags": "modelspec.tags", **{f"metadata_{k}": f"modelspec.{k}" for k in (
        "merged_from", "trigger_phrase", "usage_hint", "preprocessor", "thumbnail", "is_negative_embedding")},
    # dataset
    "train_data_dir": "<repeats>_<name> folders", "reg_data_dir": "regularization folders (kohya interleaving)",
    "dataset_config": "[[datasets]] / [[datasets.subsets]] file (training/lora/dataset_config.py)",
    "prior_loss_weight": "loss weight of regularization images",
    "resolution": "dataset", "enable_bucket": "dataset", "min_bucket_reso": "dataset", "max_bucket_reso": "dataset",
    "bucket_reso_steps": "dataset", "bucket_no_upscale": "dataset", "resize_interpolation": "dataset",
    "flip_aug": "dataset", "caption_extension": "dataset", "caption_extention": "kohya's old spelling of "
    "caption_extension", "validation_split": "dataset", "validation_seed": "dataset",
    "validate_every_n_epochs": "trainer", "cache_latents_to_disk": "dataset",
    # captions
    "shuffle_caption": "captions", "keep_tokens": "captions", "keep_tokens_separator": "captions",
    "caption_separator": "captions", "secondary_separator": "captions", "caption_prefix": "captions",
    "caption_suffix": "captions", "caption_dropout_rate": "captions", "caption_dropout_every_n_epochs": "captions",
    "caption_tag_dropout_rate": "captions", "enable_wildcard": "captions", "token_warmup_min": "captions",
    "token_warmup_step": "captions",
    # text encoder conditioning
    "clip_skip": "implemented by the host (issue 10)",
    "max_token_length": "implemented by the host (issue 10)",
    "zero_terminal_snr": "implemented by the host (issue 10)",
    # network
    "network_module": "networks.lora, or lycoris.kohya (LoHa/LoKr via lycoris-lora)", "network_dim": "rank",
    "network_alpha": "alpha", "network_args": "training/lora/network_args.py (unknown entries are refused)",
    "network_dropout": "rank dropout in weight space (see training/lora/network.py)",
    "network_weights": "start from a LoRA file", "dim_from_weights": "ranks/alphas from network_weights",
    "network_train_unet_only": "trainer", "network_train_text_encoder_only": "trainer",
    "scale_weight_norms": "max-norm regularization after each step",
    # optimisation / schedule
    "optimizer_type": "trainer", "optimizer_args": "trainer", "learning_rate": "trainer", "unet_lr": "0 = frozen",
    "text_encoder_lr": "0 = frozen; kohya's list form uses its first entry", "lr_scheduler": "trainer",
    "lr_warmup_steps": "trainer", "lr_scheduler_num_cycles": "trainer", "lr_scheduler_power": "trainer",
    "max_grad_norm": "trainer", "use_8bit_adam": "= optimizer_type AdamW8bit (kohya's old switch)",
    "max_train_steps": "trainer", "max_train_epochs": "trainer", "train_batch_size": "trainer",
    "gradient_accumulation_steps": "trainer", "seed": "trainer", "mixed_precision": "trainer (CPU: fp32, said so)",
    "gradient_checkpointing": "trainer",
    # objective
    "noise_offset": "noise", "noise_offset_random_strength": "noise", "adaptive_noise_scale": "noise",
    "multires_noise_iterations": "noise", "multires_noise_discount": "noise", "ip_noise_gamma": "noise",
    "ip_noise_gamma_random_strength": "noise", "min_snr_gamma": "loss", "debiased_estimation_loss": "loss",
    "scale_v_pred_loss_like_noise_pred": "loss", "v_pred_like_loss": "loss", "loss_type": "loss",
    "huber_schedule": "loss", "huber_c": "loss", "huber_scale": "loss", "min_timestep": "timesteps",
    "max_timestep": "timesteps (min == max trains at that fixed t)",
    # sampling
    "sample_prompts": "prompt file lines with --n --w --h --s --d --l (training/lora/sample_prompts.py)",
    "sample_every_n_epochs": "trainer", "sample_sampler": "mapped to ComfyUI's samplers; the diffusers host samples with DDIM (warned)",
    "sample_at_first": "samples before training",
    # Flux (flux_train_network.py; training/lora/objective.py, training/flux_host.py)
    **{k: "flow objective (training/lora/objective.py, kohya flux_train_utils.py semantics)" for k in (
        "timestep_sampling", "sigmoid_scale", "discrete_flow_shift", "model_prediction_type", "weighting_scheme",
        "logit_mean", "logit_std", "mode_scale")},
    "guidance_scale": "Flux-dev guidance embedding during training (schnell: warned, no embedding)",
    "t5xxl_max_token_length": "T5 sequence length (None: 512 dev / 256 schnell, as kohya)",
    "blocks_to_swap": "CLI, Flux: kohya's block swap (training/block_swap.py); refused by the Train LoRA node "
                      "(see nodes/lora.py)",
    "clip_l": "CLI: CLIP-L single file beside a BFL flux1-*.safetensors",
    "t5xxl": "CLI: T5-XXL single file beside a BFL flux1-*.safetensors",
    "ae": "CLI: the Flux VAE (ae.safetensors) beside a BFL flux1-*.safetensors",
}

# -- no effect here (warned when set to a non-default value) ----------------------------------------------------
NO_EFFECT: dict[str, str] = {
    **{k: "attention backend switch; the model's own attention is used" for k in ("xformers", "sdpa",
                                                                                  "mem_eff_attn")},
    **{k: "memory placement switch with no effect on the result" for k in ("lowram", "highvram",
                                                                             "cpu_offload_checkpointing")},
    **{k: "data loading runs in-process (latents are cached)" for k in ("max_data_loader_n_workers",
                                                                          "persistent_data_loader_workers")},
    **{k: "logging goes to the console and the epoch table" for k in (
        "log_with", "log_prefix", "log_tracker_name", "log_tracker_config", "log_config", "wandb_api_key",
        "wandb_run_name", "console_log_level", "console_log_file", "console_log_simple")},
    **{k: "no DDP wrapper or compiler: multi-process runs all-reduce the LoRA gradients themselves "
          "(training/distributed.py)" for k in (
        "ddp_gradient_as_bucket_view", "ddp_static_graph", "dynamo_backend", "torch_compile",
        "deepspeed", "zero_stage", "offload_optimizer_device", "offload_optimizer_nvme_path", "offload_param_device",
        "offload_param_nvme_path", "zero3_init_flag", "zero3_save_16bit_model", "fp16_master_weights_and_gradients")},
    "no_half_vae": "the VAE always runs in fp32 here",
    "cache_latents": "latents are always cached here, from the VAE posterior mean (kohya caches one posterior "
                     "sample; the difference is the VAE's tiny posterior std)",
    "vae_batch_size": "VAE batching does not change the latents",
    "full_fp16": "LoRA weights stay fp32 (autocast only); use mixed_precision",
    "full_bf16": "LoRA weights stay fp32 (autocast only); use mixed_precision",
    "fused_backward_pass": "an Adafactor memory optimisation; the update is the same",
    "tokenizer_cache_dir": "nothing is downloaded; tokenizers come from the model folder",
    "skip_cache_check": "latent caches are checked by fingerprint",
    "cache_info": "image sizes are read when scanning",
    "debug_dataset": "use the LoRA Dataset node / `conceptlab dataset` to inspect a dataset",
    "output_config": "the effective settings are saved in the training state",
    "config_file": "the CLI takes --config",
    "save_state_on_train_end": "the state of the last epoch is always saved with save_state",
    "save_last_n_epochs_state": "states are kept per saved epoch",
    "save_last_n_steps_state": "states are kept per saved epoch",
    "max_validation_steps": "validation uses every validation image",
    "async_upload": "nothing is uploaded",
    "custom_attributes": "custom attributes are for other network modules",
    "cache_text_encoder_outputs": "text-encoder outputs are always cached while the text encoders are frozen "
                                  "(Flux CLI with static captions: T5-XXL and CLIP-L then leave the GPU, as kohya)",
    "cache_text_encoder_outputs_to_disk": "text-encoder outputs are cached in memory",
    "text_encoder_batch_size": "text-encoder batching does not change the outputs",
    "disable_mmap_load_safetensors": "safetensors loading switch with no effect on the result",
}

# -- refused (a non-default value raises, naming the key and what to do) ----------------------------------------
REFUSED: dict[str, str] = {
    "in_json": "fine-tuning metadata datasets are not supported; use <repeats>_<name> folders or [[datasets]]",
    "dataset_class": "custom dataset classes are not supported",
    "dataset_repeats": "fine-tuning datasets are not supported; set num_repeats per subset",
    "conditioning_data_dir": "ControlNet datasets are not supported",
    "masked_loss": "masked loss is not supported", "alpha_mask": "alpha-mask loss is not supported "
    "(transparency is composited on `background`)",
    "color_aug": "needs per-step image loading (latents are cached); not supported",
    "random_crop": "needs per-step image loading (latents are cached); not supported",
    "face_crop_aug_range": "needs per-step image loading (latents are cached); not supported",
    "weighted_captions": "(word:1.2) prompt weighting in captions is not supported",
    "base_weights": "merge the LoRA into the model first (ComfyUI LoraLoader, or the merge CLI)",
    "base_weights_multiplier": "see base_weights",
    "vae": "a separate VAE file is not supported by the CLI; train in ComfyUI with the VAE you want",
    "fp8_base": "kohya's fp8 storage is not implemented; for Flux set quantize_base = \"fp8\" (torchao float8 "
                "weight-only, CUDA) or \"int8\" (also CPU)", "fp8_base_unet": "see fp8_base",
    "use_lion_optimizer": "Lion is not supported; use optimizer_type AdamW, AdamW8bit, Adafactor, Prodigy or "
                          "SGDNesterov",
    "lr_scheduler_type": "custom scheduler classes are not supported; use lr_scheduler",
    "lr_scheduler_args": "custom scheduler arguments are not supported",
    "lr_decay_steps": "warmup_stable_decay / piecewise schedules are not supported",
    "lr_scheduler_timescale": "inverse_sqrt scheduler is not supported",
    "lr_scheduler_min_lr_ratio": "cosine_with_min_lr / warmup_stable_decay schedulers are not supported",
    "save_every_n_steps": "files are saved per epoch; use save_every_n_epochs",
    "save_last_n_epochs": "older epoch files are never deleted here; remove them by hand",
    "save_last_n_steps": "files are saved per epoch",
    "save_n_epoch_ratio": "use save_every_n_epochs",
    "sample_every_n_steps": "samples are rendered per epoch; use sample_every_n_epochs",
    "validate_every_n_steps": "validation runs per epoch; use validate_every_n_epochs",
    "initial_epoch": "use resume with a Concept Lab training state",
    "initial_step": "use resume with a Concept Lab training state",
    "skip_until_initial_step": "use resume with a Concept Lab training state",
    "huggingface_repo_id": "nothing is uploaded", "huggingface_repo_type": "nothing is uploaded",
    "huggingface_path_in_repo": "nothing is uploaded", "huggingface_token": "nothing is uploaded",
    "huggingface_repo_visibility": "nothing is uploaded", "save_state_to_huggingface": "nothing is uploaded",
    "resume_from_huggingface": "nothing is downloaded; resume from a local training state",
    "network_multiplier": "a dataset network_multiplier other than 1 is not supported",
    "metadata_file": "fine-tuning metadata datasets are not supported",
    "apply_t5_attn_mask": "diffusers' FluxTransformer2DModel takes no T5 attention mask here",
    "split_mode": "deprecated in kohya; use blocks_to_swap (kohya sets 18 for it)",
    "model_type": "only Flux.1 (model_type = \"flux\"); Chroma is not supported",
    "controlnet_model_name_or_path": "ControlNet training is not supported",
}

# dataset-config-only keys (``[[datasets]]`` / ``[[datasets.subsets]]``) that are honoured
DATASET_CONFIG_HONOURED = {"batch_size": "= train_batch_size (one value for all datasets)",
                           "num_repeats": "subset repeats", "is_reg": "regularization subset",
                           "class_tokens": "caption for images without a caption file",
                           "image_dir": "subset folder"}

# kohya's defaults where the parser's default is not a literal; values equal to these are "not set"
_FALSEY = (None, False, 0, 0.0, "", [], {})


@lru_cache(maxsize=1)
def kohya_data() -> dict:
    """The parsed ``kohya_arguments.json`` (see module docstring)."""
    return json.loads(DATA_FILE.read_text(encoding="utf-8"))


def kohya_argument_names() -> list[str]:
    """Every ``train_network.py`` argument name (dest), sorted."""
    return [r["name"] for r in kohya_data()["train_network_arguments"]]


def kohya_flux_argument_names() -> list[str]:
    """The names ``flux_train_network.py`` adds to ``train_network.py``'s parser (kohya ``add_flux_train_arguments``
    / ``add_dit_training_arguments``), sorted."""
    return [r["name"] for r in kohya_data()["flux_train_network_arguments"]]


def kohya_dataset_config_keys() -> list[str]:
    """Every key kohya's dataset-config schema accepts (datasets, subsets and argparse-specific), sorted."""
    keys = set()
    for v in kohya_data()["dataset_config_schemas"].values():
        keys.update(v)
    return sorted(keys)


def kohya_default(name: str) -> Any:
    """kohya's parser default for ``name`` (``None`` when it has none / is not a literal)."""
    for r in kohya_data()["train_network_arguments"] + kohya_data()["flux_train_network_arguments"]:
        if r["name"] == name:
            if r.get("action") == "store_true":
                return False
            d = r.get("default")
            return None if isinstance(d, dict) else d
    return None


def classify(name: str) -> str | None:
    """``"honoured"``, ``"no_effect"``, ``"refused"`` or ``None`` (not a kohya setting)."""
    if name in HONOURED or name in DATASET_CONFIG_HONOURED:
        return "honoured"
    if name in NO_EFFECT:
        return "no_effect"
    if name in REFUSED:
        return "refused"
    return None


def _is_default(name: str, value: Any) -> bool:
    if value in _FALSEY:
        return True
    d = kohya_default(name)
    return d is not None and value == d


def check_settings(values: Mapping[str, Any], *, own_keys: set[str] | frozenset[str] = frozenset()
                   ) -> list[str]:
    """Check a flat kohya mapping; returns warning lines (no-effect keys, unknown keys) and raises for refused.

    ``own_keys``: Concept Lab's own setting names (not kohya's) that the caller honours. Raises
    :class:`KohyaSettingError` listing every refused key set to a non-default value, with what to do; also for
    ``save_model_as`` other than safetensors and ``network_module`` other than ``networks.lora``.
    """
    warnings, errors = [], []
    for k, v in values.items():
        kind = classify(k)
        if kind == "refused" and not _is_default(k, v):
            errors.append(f"{k} = {v!r}: {REFUSED[k]}")
        elif kind == "no_effect" and not _is_default(k, v):
            warnings.append(f"{k} has no effect here ({NO_EFFECT[k]})")
        elif kind is None and k not in own_keys:
            warnings.append(f"unknown key {k!r} ignored (not a kohya train_network.py setting nor a Concept Lab one)")
    fmt = values.get("save_model_as")
    if fmt not in (None, "safetensors"):
        errors.append(f"save_model_as = {fmt!r}: only safetensors files are written")
    mod = values.get("network_module")
    if mod not in (None, "networks.lora", "lora", "lycoris.kohya"):
        errors.append(f"network_module = {mod!r}: use networks.lora, or lycoris.kohya with algo=loha / algo=lokr")
    if errors:
        raise KohyaSettingError("kohya settings this trainer cannot honour: " + "; ".join(errors))
    return warnings


def normalize_settings(values: Mapping[str, Any]) -> dict[str, Any]:
    """kohya's aliases and value forms, resolved as kohya resolves them; returns a new dict.

    * ``caption_extention`` (old spelling) → ``caption_extension`` (kohya ``prepare_dataset_args``);
    * ``use_8bit_adam = true`` → ``optimizer_type = "AdamW8bit"`` (kohya ``get_optimizer``);
    * list-form ``text_encoder_lr`` / ``unet_lr`` → the first entry, empty list → unset (train_network.py l. 738:
      networks.lora has one text-encoder rate).
    """
    out = dict(values)
    if "caption_extention" in out:
        v = out.pop("caption_extention")
        if v is not None and out.get("caption_extension") is None:
            out["caption_extension"] = v
    if out.pop("use_8bit_adam", False):
        out["optimizer_type"] = "AdamW8bit"
    for k in ("text_encoder_lr", "unet_lr", "learning_rate"):
        v = out.get(k)
        if isinstance(v, (list, tuple)):
            out[k] = float(v[0]) if len(v) else None
    return out


def validate_extra_options(cfg) -> None:
    """Type/range checks of the issue-14 options on a ``TrainConfig`` (in place); raises ``ValueError``."""
    for name in ("adaptive_noise_scale", "ip_noise_gamma", "v_pred_like_loss", "scale_weight_norms"):
        v = getattr(cfg, name)
        if v is not None:
            try:
                setattr(cfg, name, float(v))
            except (TypeError, ValueError):
                raise ValueError(f"{name} must be a number, got {v!r}") from None
    if cfg.multires_noise_iterations is not None:
        cfg.multires_noise_iterations = int(cfg.multires_noise_iterations)
    cfg.multires_noise_discount = float(cfg.multires_noise_discount)
    cfg.prior_loss_weight = float(cfg.prior_loss_weight)
    if cfg.adaptive_noise_scale is not None and not cfg.noise_offset:
        raise ValueError("adaptive_noise_scale needs noise_offset (kohya asserts the same)")
    if cfg.scale_weight_norms is not None and cfg.scale_weight_norms <= 0:
        cfg.scale_weight_norms = None
    if cfg.dim_from_weights and not cfg.network_weights:
        raise ValueError("dim_from_weights needs network_weights (kohya asserts the same)")
    if cfg.scale_v_pred_loss_like_noise_pred and cfg.v_pred_like_loss:
        raise ValueError("scale_v_pred_loss_like_noise_pred and v_pred_like_loss exclude each other (kohya)")
    for name in ("unet_lr", "text_encoder_lr"):
        v = getattr(cfg, name)
        if v is not None and v < 0:
            raise ValueError(f"{name} must be >= 0 (0 freezes that part), got {v}")
    from .objective import validate_flow_settings

    validate_flow_settings(cfg)


def own_setting_names() -> set[str]:
    """Names Concept Lab itself reads besides kohya's (trainer, dataset and caption option fields)."""
    from dataclasses import fields

    from .captions import CaptionConfig
    from .dataset_options import DatasetOptions
    from .config import TrainConfig

    return {f.name for cls in (TrainConfig, DatasetOptions, CaptionConfig) for f in fields(cls)}
