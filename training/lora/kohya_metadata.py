"""Metadata parity with kohya-ss/sd-scripts ``train_network.py`` (``NetworkTrainer.train``, l. 1000-1230 at commit
48d368f) and ``library/sai_model_spec.py`` / ``train_util.get_sai_model_spec``: the same ``ss_*`` keys for the
same run, with values formatted as kohya formats them.

kohya builds its metadata from the parsed arguments and then writes ``str(value)`` for every entry; a TOML value
reaches it with its TOML type (``network_alpha = 16`` → ``"16"``, ``= 16.0`` → ``"16.0"``), a missing key as the
parser default (often ``"None"``). :func:`apply_kohya_formats` therefore takes the user's own values (``raw``) for
every key kohya copies from an argument, and kohya's parser default (``training/lora/kohya_arguments.json``) when the
user did not set it. ``ss_resolution`` stays ``"(w, h)"``: kohya's ``prepare_dataset_args`` (train_util.py l. 5409)
turns the resolution into a tuple before the metadata is built. ``ss_optimizer`` is the optimizer class path plus
its keyword arguments (``train_util.get_optimizer`` l. 5218).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Mapping

#: ``ss_*`` key -> the argument kohya copies into it unchanged
DIRECT = {
    "ss_learning_rate": "learning_rate", "ss_unet_lr": "unet_lr", "ss_text_encoder_lr": "text_encoder_lr",
    "ss_gradient_checkpointing": "gradient_checkpointing",
    "ss_gradient_accumulation_steps": "gradient_accumulation_steps", "ss_lr_warmup_steps": "lr_warmup_steps",
    "ss_lr_scheduler": "lr_scheduler", "ss_network_dim": "network_dim", "ss_network_alpha": "network_alpha",
    "ss_network_dropout": "network_dropout", "ss_mixed_precision": "mixed_precision", "ss_clip_skip": "clip_skip",
    "ss_max_token_length": "max_token_length", "ss_seed": "seed", "ss_lowram": "lowram",
    "ss_noise_offset": "noise_offset", "ss_multires_noise_iterations": "multires_noise_iterations",
    "ss_multires_noise_discount": "multires_noise_discount", "ss_adaptive_noise_scale": "adaptive_noise_scale",
    "ss_zero_terminal_snr": "zero_terminal_snr", "ss_training_comment": "training_comment",
    "ss_max_grad_norm": "max_grad_norm", "ss_caption_dropout_rate": "caption_dropout_rate",
    "ss_caption_dropout_every_n_epochs": "caption_dropout_every_n_epochs",
    "ss_caption_tag_dropout_rate": "caption_tag_dropout_rate", "ss_face_crop_aug_range": "face_crop_aug_range",
    "ss_prior_loss_weight": "prior_loss_weight", "ss_min_snr_gamma": "min_snr_gamma",
    "ss_scale_weight_norms": "scale_weight_norms", "ss_ip_noise_gamma": "ip_noise_gamma",
    "ss_noise_offset_random_strength": "noise_offset_random_strength",
    "ss_ip_noise_gamma_random_strength": "ip_noise_gamma_random_strength", "ss_loss_type": "loss_type",
    "ss_huber_schedule": "huber_schedule", "ss_huber_scale": "huber_scale", "ss_huber_c": "huber_c",
    "ss_validation_seed": "validation_seed", "ss_validation_split": "validation_split",
    "ss_max_validation_steps": "max_validation_steps", "ss_validate_every_n_epochs": "validate_every_n_epochs",
    "ss_validate_every_n_steps": "validate_every_n_steps", "ss_resize_interpolation": "resize_interpolation",
    "ss_output_name": "output_name", "ss_keep_tokens": "keep_tokens",
    "ss_batch_size_per_device": "train_batch_size",
}
#: ``ss_*`` key -> argument kohya writes as ``bool(value)``
BOOLS = {"ss_full_fp16": "full_fp16", "ss_v2": "v2", "ss_debiased_estimation": "debiased_estimation_loss",
         "ss_fp8_base": "fp8_base", "ss_fp8_base_unet": "fp8_base_unet", "ss_color_aug": "color_aug",
         "ss_flip_aug": "flip_aug", "ss_random_crop": "random_crop", "ss_shuffle_caption": "shuffle_caption"}
#: modelspec fields kohya fills from ``metadata_*`` arguments (sai_model_spec ``ModelSpecMetadata.from_args``)
MODELSPEC_ARGS = ("author", "description", "license", "tags", "usage_hint", "trigger_phrase", "merged_from",
                  "preprocessor", "thumbnail", "is_negative_embedding")


def legacy_model_hash(path: str | os.PathLike) -> str:
    """The old A1111 model hash kohya writes as ``ss_sd_model_hash``: first 8 hex of sha256 of the 64 KiB at
    offset 1 MiB (train_util.py ``model_hash`` l. 3223)."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of the whole file, hex (kohya ``calculate_sha256``, ``ss_new_sd_model_hash``)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def optimizer_name(optimizer, kwargs: Mapping[str, Any]) -> str:
    """``module.Class(k=v,...)`` as kohya's ``ss_optimizer`` (train_util.py l. 5218-5219)."""
    cls = type(optimizer)
    args = ",".join(f"{k}={v}" for k, v in kwargs.items())
    return f"{cls.__module__}.{cls.__name__}" + (f"({args})" if args else "")


def _default(name: str):
    from .kohya_args import kohya_default

    return kohya_default(name)


def apply_kohya_formats(md: dict[str, Any], raw: Mapping[str, Any], *, optimizer=None,
                        optimizer_kwargs: Mapping[str, Any] | None = None, min_timestep: int | None = None,
                        max_timestep: int | None = None) -> dict[str, Any]:
    """Reformat / complete ``md`` (ours) in place as kohya would write it for the settings ``raw``; returns ``md``.

    ``raw``: the user's flat kohya mapping (values as written). Keys kohya copies from an argument take the user's
    value or kohya's parser default; ``bool()`` keys likewise; ``ss_optimizer`` from the optimizer object;
    ``modelspec.*`` from ``metadata_*`` arguments, ``modelspec.timestep_range`` / ``encoder_layer`` /
    ``implementation_version`` as kohya's ``build_metadata_dataclass``.
    """
    for key, arg in DIRECT.items():
        if arg in raw:
            md[key] = raw[arg]
        else:  # kohya's parser default when it is what ran (1 vs 1.0), else what this trainer used
            d = _default(arg)
            if key not in md or (d is not None and _same(md[key], d)):
                md[key] = d
    for key, arg in BOOLS.items():
        if arg in raw:
            md[key] = bool(raw[arg])
        elif key not in md:
            md[key] = bool(_default(arg))
    md["ss_network_module"] = raw.get("network_module") or "networks.lora"
    md["ss_cache_latents"] = True  # latents are always cached here
    if optimizer is not None:
        md["ss_optimizer"] = optimizer_name(optimizer, optimizer_kwargs or {})
    if raw.get("network_args"):
        from .network_args import parse_network_args

        if str(raw.get("network_module", "")).startswith("lycoris"):
            from .lycoris_net import parse_lycoris_args

            na = dict(parse_lycoris_args(raw["network_args"]))
        else:
            na = dict(parse_network_args(raw["network_args"]))
        if "dropout" not in na and not raw.get("dim_from_weights"):
            na["dropout"] = raw.get("network_dropout")  # train_network.py l. 676 adds it before the metadata
        md["ss_network_args"] = na
    if raw.get("metadata_title"):
        md["modelspec.title"] = raw["metadata_title"]
    for f in MODELSPEC_ARGS:
        v = raw.get(f"metadata_{f}")
        if v is not None:
            if f == "thumbnail" and not str(v).startswith("data:"):
                v = _data_url(v)
                if v is None:
                    continue
            md[f"modelspec.{f}"] = v
    if raw.get("min_timestep") is not None or raw.get("max_timestep") is not None:
        lo = raw.get("min_timestep") if raw.get("min_timestep") is not None else 0
        hi = raw.get("max_timestep") if raw.get("max_timestep") is not None else 1000
        md["modelspec.timestep_range"] = f"{lo},{hi}"
    if raw.get("clip_skip") is not None:
        md["modelspec.encoder_layer"] = f"{raw['clip_skip']}"
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("comfyui-conceptlab")
    except PackageNotFoundError:
        ver = "unknown"
    md["modelspec.implementation_version"] = f"conceptlab/{ver}"
    md.setdefault("ss_max_validation_steps", None)
    md.setdefault("ss_validate_every_n_steps", None)
    return md


def _same(a, b) -> bool:
    try:
        return type(a) is not bool and type(b) is not bool and float(a) == float(b)
    except (TypeError, ValueError):
        return a == b


#: the keys kohya keeps with ``no_metadata`` (train_util ``SS_METADATA_MINIMUM_KEYS``), plus modelspec.*
MINIMUM_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                "ss_network_args")


def minimum_metadata(md: Mapping[str, Any]) -> dict[str, Any]:
    """What kohya writes with ``no_metadata``: the minimum ``ss_*`` keys and the modelspec (train_network.py
    l. 1300-1307)."""
    return {k: v for k, v in md.items() if k in MINIMUM_KEYS or k.startswith("modelspec.")}


def _data_url(path) -> str | None:
    import base64
    import mimetypes

    p = Path(str(path))
    if not p.is_file():
        return None
    mime = mimetypes.guess_type(p.name)[0] or "application/octet-stream"
    return f"data:{mime};base64," + base64.b64encode(p.read_bytes()).decode("ascii")
