"""Bounds on settings, text documents and images that reach Concept Lab from an untrusted client.

ComfyUI's ``/prompt`` is often reachable on a LAN, and anyone who can reach it can queue our nodes with any
input. Node widgets are bounded by ``min``/``max`` in ``INPUT_TYPES`` (ComfyUI answers HTTP 400); this module is
the second line, applied by the core to what those checks cannot see: settings inside TOML / JSON strings
(``kohya_toml``), document size and nesting depth, and images on disk (pixel count read from the header before
decoding).

It lives in ``formats/`` because both ``training/`` and ``metrics/`` use it (``metrics`` never imports
``training``). It is host-neutral: no ComfyUI import.

Every limit is far above what a real run needs (a style LoRA: 512-1024 px, dim 4-128, a few thousand steps);
a user who needs more runs the CLI, which does not apply :data:`SETTING_BOUNDS`. The table is documented in the
README's "Security" section.

No library fits: pydantic/jsonschema validate shapes but not kohya's key vocabulary, and neither bounds
nesting before the parser recurses; this is a table plus a few lines.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

#: largest TOML / JSON document accepted from a node input (characters)
MAX_DOCUMENT_CHARS = 1 << 20
#: deepest nesting of tables / arrays / objects in a TOML / JSON document
MAX_NESTING = 32
#: most items in one array / keys in one table of such a document
MAX_COLLECTION_ITEMS = 10_000
#: longest string value inside such a document (characters)
MAX_STRING_VALUE_CHARS = 256 * 1024
#: largest image decoded from disk (pixels): 8192 × 8192. Checked from the header, before decoding.
#: PIL's own bomb guard only errors above 2 × 89.5 Mpx, which decodes to gigabytes.
MAX_IMAGE_PIXELS = 8192 * 8192
#: most images in one training dataset
MAX_DATASET_IMAGES = 50_000
#: largest ``train_batch_size × bucket area`` (pixels): e.g. 64 images of 1024², 16 of 2048²
MAX_BATCH_PIXELS = 64 * 1024 * 1024
#: most trainable LoRA parameters (×16 bytes of fp32 weights, gradients and two Adam states: 16 GB); SD1.5 at
#: dim 1024 is ~0.6 B, SDXL at dim 128 ~0.45 B
MAX_NETWORK_PARAMS = 1_000_000_000
#: most prompts one ESD run may expand to (concepts × variations + plain lines)
MAX_PROMPTS = 10_000
#: most concepts in one ESD run
MAX_CONCEPTS = 1_000
#: most prompts rendered per sample grid (training samples, epoch / erasure comparisons)
MAX_SAMPLE_PROMPTS = 256

#: ``key: (min, max)`` for kohya / Concept Lab numeric settings (inclusive). ``None`` values mean "off" and
#: are not checked. Keys not listed here still must be finite and within ±2**53 (see :func:`check_settings`).
SETTING_BOUNDS: dict[str, tuple[float, float]] = {
    # schedule
    "max_train_epochs": (1, 10_000),
    "max_train_steps": (1, 10_000_000),
    "train_batch_size": (1, 256),
    "gradient_accumulation_steps": (1, 1024),
    "seed": (0, 2 ** 32 - 1),
    "sample_seed": (0, 2 ** 32 - 1),
    "validation_seed": (0, 2 ** 32 - 1),
    "save_every_n_epochs": (0, 10_000),
    "save_every_n_steps": (0, 10_000_000),
    "save_last_n_epochs": (0, 10_000),
    "sample_every_n_epochs": (0, 10_000),
    "sample_every_n_steps": (0, 10_000_000),
    "validate_every_n_epochs": (0, 10_000),
    "validate_every_n_steps": (0, 10_000_000),
    "early_stopping_patience": (0, 10_000),
    # network
    "network_dim": (1, 1024),
    "network_alpha": (0, 65_536),
    "conv_dim": (0, 1024),
    "conv_alpha": (0, 65_536),
    "network_dropout": (0, 1),
    "module_dropout": (0, 1),
    "rank_dropout": (0, 1),
    "scale_weight_norms": (0, 1e6),
    # optimisation
    "learning_rate": (0, 10),
    "unet_lr": (0, 10),
    "text_encoder_lr": (0, 10),
    "lr_warmup_steps": (0, 10_000_000),
    "lr_scheduler_num_cycles": (1, 10_000),
    "lr_scheduler_power": (0, 100),
    "max_grad_norm": (0, 1e6),
    # objective
    "noise_offset": (0, 1),
    "adaptive_noise_scale": (0, 1),
    "multires_noise_iterations": (0, 64),
    "multires_noise_discount": (0, 1),
    "ip_noise_gamma": (0, 1),
    "min_snr_gamma": (0, 100),
    "huber_c": (0, 100),
    "huber_scale": (0, 100),
    "min_timestep": (0, 1000),
    "max_timestep": (0, 1000),
    "discrete_flow_shift": (0, 100),
    # sizes (pixels)
    "resolution": (64, 4096),
    "min_bucket_reso": (64, 8192),
    "max_bucket_reso": (64, 8192),
    "bucket_reso_steps": (8, 1024),
    "sample_width": (0, 4096),
    "sample_height": (0, 4096),
    # sampling
    "sample_steps": (1, 200),
    "sample_cfg": (0, 100),
    # captions
    "keep_tokens": (0, 1000),
    "caption_dropout_rate": (0, 1),
    "caption_tag_dropout_rate": (0, 1),
    "caption_dropout_every_n_epochs": (0, 10_000),
    "validation_split": (0, 1),
    "max_token_length": (0, 1024),
    "clip_skip": (0, 48),
    # ESD
    "iterations": (1, 100_000),
    "variations": (0, 2000),
    "ddim_steps": (1, 1000),
    "negative_guidance": (-100, 100),
    "start_guidance": (0, 100),
    "lr": (0, 1),
}

_INT_LIMIT = 2 ** 53


class LimitError(ValueError):
    """A setting, document or image exceeds what Concept Lab accepts from a node input."""


def _cli_hint() -> str:
    return " (a run that really needs more can use the Concept Lab CLI)"


def check_number(name: str, value: Any, lo: float | None = None, hi: float | None = None,
                 where: str = "") -> float | int:
    """Check one number: finite and within ``[lo, hi]`` when both are given (strings are parsed as numbers only
    then, since kohya also reads ``"1e-4"``); other types pass through unchanged (type checks belong to the config
    classes). Returns the value. Raises :class:`LimitError` naming ``name`` and the range."""
    src = f"{where}: " if where else ""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and lo is not None:
        try:
            value = float(value) if any(c in value.lower() for c in ".en") else int(value)
        except ValueError:
            return value  # not a number: type checks belong to the config classes
    if not isinstance(value, (int, float)):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        raise LimitError(f"{src}{name} must be a finite number, got {value!r}")
    if abs(value) > _INT_LIMIT:
        raise LimitError(f"{src}{name} = {value!r} is out of range")
    if lo is not None and hi is not None and not lo <= value <= hi:
        raise LimitError(f"{src}{name} = {value!r} is outside the allowed range {lo:g} … {hi:g}{_cli_hint()}")
    return value


def _resolution_sides(value: Any) -> list:
    if isinstance(value, str):
        parts = [p.strip() for p in value.replace("x", ",").split(",") if p.strip()]
        return parts
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def check_structure(obj: Any, where: str = "document") -> None:
    """Bound nesting depth (:data:`MAX_NESTING`), collection sizes (:data:`MAX_COLLECTION_ITEMS`), string sizes
    (:data:`MAX_STRING_VALUE_CHARS`) and refuse non-finite floats anywhere in a parsed document (iterative: a
    hostile document cannot exhaust the stack). Raises :class:`LimitError`."""
    stack: list[tuple[Any, int, str]] = [(obj, 0, "")]
    while stack:
        node, depth, path = stack.pop()
        if isinstance(node, Mapping):
            if depth >= MAX_NESTING:
                raise LimitError(f"{where}: nested deeper than {MAX_NESTING} levels at {path or 'top'}")
            if len(node) > MAX_COLLECTION_ITEMS:
                raise LimitError(f"{where}: {path or 'top'} holds more than {MAX_COLLECTION_ITEMS} keys")
            for k, v in node.items():
                stack.append((v, depth + 1, f"{path}.{k}" if path else str(k)))
        elif isinstance(node, (list, tuple)):
            if depth >= MAX_NESTING:
                raise LimitError(f"{where}: nested deeper than {MAX_NESTING} levels at {path or 'top'}")
            if len(node) > MAX_COLLECTION_ITEMS:
                raise LimitError(f"{where}: {path or 'top'} holds more than {MAX_COLLECTION_ITEMS} items")
            for i, v in enumerate(node):
                stack.append((v, depth + 1, f"{path}[{i}]"))
        elif isinstance(node, str):
            if len(node) > MAX_STRING_VALUE_CHARS:
                raise LimitError(f"{where}: {path or 'value'} is longer than {MAX_STRING_VALUE_CHARS} characters")
        elif isinstance(node, float) and not math.isfinite(node):
            raise LimitError(f"{where}: {path or 'value'} must be a finite number, got {node!r}")


def _check_text(text: Any, where: str) -> str:
    if not isinstance(text, str):
        raise LimitError(f"{where} must be text, got {type(text).__name__}")
    if len(text) > MAX_DOCUMENT_CHARS:
        raise LimitError(f"{where} is {len(text)} characters; at most {MAX_DOCUMENT_CHARS} are accepted")
    if "\x00" in text:
        raise LimitError(f"{where} contains a NUL character")
    return text


def load_toml(text: str, where: str = "kohya_toml") -> dict:
    """Parse a TOML string with bounded size and nesting. Returns the nested dict (tables kept).

    Raises :class:`LimitError` (too long, too deep, too many items, a non-finite float such as ``nan``/``inf``)
    or ``ValueError`` with the parser's message for invalid TOML — never a raw ``RecursionError``.
    """
    import tomllib

    _check_text(text, where)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"invalid TOML in {where}: {exc}") from None
    except RecursionError:
        raise LimitError(f"{where}: nested deeper than {MAX_NESTING} levels") from None
    check_structure(data, where)
    return data


def load_json(text: str, where: str = "JSON") -> Any:
    """Parse a JSON string with bounded size and nesting; ``NaN``/``Infinity`` are refused.

    Raises :class:`LimitError` or ``ValueError`` (invalid JSON) — never a raw ``RecursionError``.
    """
    _check_text(text, where)

    def _const(name: str):
        raise LimitError(f"{where}: {name} is not accepted (numbers must be finite)")

    try:
        data = json.loads(text, parse_constant=_const)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON in {where}: {exc}") from None
    except RecursionError:
        raise LimitError(f"{where}: nested deeper than {MAX_NESTING} levels") from None
    check_structure(data, where)
    return data


def check_settings(values: Mapping[str, Any], where: str = "settings") -> None:
    """Apply :data:`SETTING_BOUNDS` to a flat settings mapping (kohya names); every other number must be finite
    and within ±2**53, ``network_args`` entries (``"conv_dim=4"``) are checked like keys.

    Raises :class:`LimitError` naming the key, its value and the allowed range.
    """
    for key, value in values.items():
        if value is None:
            continue
        if key in ("resolution",):
            for side in _resolution_sides(value):
                check_number(key, side, *SETTING_BOUNDS[key], where=where)
            continue
        if key in ("network_args", "optimizer_args") and isinstance(value, (list, tuple)):
            for item in value:
                k, sep, v = str(item).partition("=")
                if sep:
                    k = k.strip()
                    bounds = SETTING_BOUNDS.get({"conv_lora_dim": "conv_dim", "dropout": "network_dropout"}.get(k, k))
                    check_number(f"{key}: {k}", v.strip(), *(bounds or (None, None)), where=where)
            continue
        bounds = SETTING_BOUNDS.get(key)
        if isinstance(value, (list, tuple)):
            for v in value:
                check_number(key, v, *(bounds or (None, None)), where=where)
        else:
            check_number(key, value, *(bounds or (None, None)), where=where)


def check_image_pixels(width: int, height: int, name: str | os.PathLike = "image") -> None:
    """Refuse an image above :data:`MAX_IMAGE_PIXELS` before it is decoded (``LimitError``)."""
    if int(width) * int(height) > MAX_IMAGE_PIXELS:
        raise LimitError(f"{os.fspath(name)}: {width}×{height} px ({int(width) * int(height) / 1e6:.0f} Mpx) is "
                         f"larger than the {MAX_IMAGE_PIXELS / 1e6:.0f} Mpx Concept Lab decodes; resize it first")


def check_batch_pixels(batch_size: int, width: int, height: int) -> None:
    """Refuse ``batch_size`` images of ``width × height`` above :data:`MAX_BATCH_PIXELS` (``LimitError``)."""
    px = int(batch_size) * int(width) * int(height)
    if px > MAX_BATCH_PIXELS:
        raise LimitError(f"train_batch_size {batch_size} × bucket {width}×{height} is {px / 1e6:.0f} Mpx per step; "
                         f"at most {MAX_BATCH_PIXELS / 1e6:.0f} Mpx are accepted (lower the batch size or the "
                         f"resolution, or use gradient_accumulation_steps)")


def check_network_params(n_params: int) -> None:
    """Refuse a network above :data:`MAX_NETWORK_PARAMS` trainable parameters before it is allocated."""
    if int(n_params) > MAX_NETWORK_PARAMS:
        raise LimitError(f"the LoRA network would have {n_params / 1e6:.0f} M parameters (about "
                         f"{n_params * 16 / 2 ** 30:.0f} GiB to train); at most {MAX_NETWORK_PARAMS / 1e6:.0f} M are "
                         f"accepted: lower network_dim / conv_dim{_cli_hint()}")


def check_count(name: str, n: int, limit: int) -> None:
    """Refuse a count above ``limit`` (``LimitError`` naming ``name``)."""
    if int(n) > int(limit):
        raise LimitError(f"{name}: {n} is more than the {limit} accepted{_cli_hint()}")
