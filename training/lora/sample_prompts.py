"""kohya sample-prompt files: one prompt per line with ``--n --w --h --s --d --l --ss`` options, or kohya's
``.toml`` / ``.json`` prompt files, and ``sample_sampler`` names mapped to the host's samplers.

Parsing follows kohya-ss/sd-scripts ``library/train_util.py`` (commit 48d368f): ``load_prompts`` (l. 6329: blank
lines and lines starting with ``#`` are skipped; ``.toml`` files hold ``[prompt]`` defaults and
``[[prompt.subset]]`` entries; ``.json`` a list of dicts or strings) and ``line_to_prompt_dict`` (l. 6254: the
line is split at ``" --"``; ``w``/``h``/``d``/``s`` take integers, ``l`` a decimal, ``n`` and ``ss`` the rest of the
option; steps are clamped to [1, 1000]; options are case-insensitive; a malformed option is skipped with an error
message, as kohya logs it). Width and height are rounded down to a multiple of 8, at least 64
(``sample_image_inference`` l. 6535).

Where this trainer differs, on purpose: an option a prompt does not give falls back to the trainer's sample
settings (``sample_steps``, ``sample_cfg``, ``sample_width``/``sample_height`` or the training resolution,
``sample_negative``), and a prompt without ``--d`` uses ``sample_seed + index`` — kohya draws a random seed — so the
same prompt renders the same noise every epoch and epochs can be compared.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

logger = logging.getLogger(__name__)

#: kohya ``sample_sampler`` name -> ComfyUI ``(sampler_name, scheduler)`` (kohya get_my_scheduler, l. 6199;
#: diffusers schedulers are built with their default sigmas, i.e. ComfyUI's "normal" schedule)
KOHYA_TO_COMFY = {
    "ddim": ("ddim", "normal"), "ddpm": ("ddpm", "normal"), "pndm": ("euler", "normal"),
    "lms": ("lms", "normal"), "k_lms": ("lms", "normal"), "euler": ("euler", "normal"),
    "k_euler": ("euler", "normal"), "euler_a": ("euler_ancestral", "normal"),
    "k_euler_a": ("euler_ancestral", "normal"), "dpmsolver": ("dpmpp_2m", "normal"),
    "dpmsolver++": ("dpmpp_2m", "normal"), "dpmsingle": ("dpmpp_2m", "normal"), "heun": ("heun", "normal"),
    "dpm_2": ("dpm_2", "normal"), "k_dpm_2": ("dpm_2", "normal"), "dpm_2_a": ("dpm_2_ancestral", "normal"),
    "k_dpm_2_a": ("dpm_2_ancestral", "normal"),
}
_OPTIONS = [("width", r"w (\d+)", int), ("height", r"h (\d+)", int), ("seed", r"d (\d+)", int),
            ("sample_steps", r"s (\d+)", int), ("scale", r"l ([\d\.]+)", float),
            ("guidance_scale", r"g ([\d\.]+)", float), ("negative_prompt", r"n (.+)", str),
            ("sample_sampler", r"ss (.+)", str)]


@dataclass
class SamplePrompt:
    """One sample prompt with kohya's per-prompt options (``None`` = the trainer's setting)."""

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    sample_steps: int | None = None
    scale: float | None = None
    seed: int | None = None
    sample_sampler: str | None = None
    guidance_scale: float | None = None  # kohya --g: Flux's embedded (distilled) guidance

    @classmethod
    def from_dict(cls, d: dict) -> "SamplePrompt":
        """From a kohya prompt dict (``.json`` / ``.toml`` prompt files); unknown keys are warned by name."""
        known = {f for f in cls.__dataclass_fields__}
        extra = [k for k in d if k not in known and k not in ("enum", "subset")]
        if extra:
            logger.warning("sample prompt options not used here: %s", ", ".join(extra))
        return cls(**{k: d[k] for k in known if k in d and d[k] is not None})


def parse_line(line: str) -> SamplePrompt:
    """kohya ``line_to_prompt_dict`` for one prompt line (module docstring)."""
    parts = line.split(" --")
    sp = SamplePrompt(prompt=parts[0].strip())
    for part in parts[1:]:
        for name, pattern, conv in _OPTIONS:
            m = re.match(pattern, part, re.IGNORECASE)
            if m:
                try:
                    v = conv(m.group(1))
                except ValueError:
                    logger.error("cannot parse sample prompt option --%s", part)
                    break
                if name == "sample_steps":
                    v = max(1, min(1000, v))
                setattr(sp, name, v)  # --g is used by hosts whose sample() takes guidance (Flux), else warned
                break
        else:
            logger.warning("sample prompt option --%s is not used here", part.split(" ")[0])
    return sp


def parse_sample_prompts(value: Any) -> list[SamplePrompt]:
    """Prompts from a string (newline-separated lines), a list of strings / dicts (kohya ``.json``), or a
    kohya ``.toml`` prompt mapping (``{"prompt": {..., "subset": [...]}}``). Empty and ``#`` lines are skipped."""
    if not value:
        return []
    if isinstance(value, dict):
        base = dict(value.get("prompt", {}))
        subsets = base.pop("subset", [])
        return [SamplePrompt.from_dict({**base, **s}) for s in subsets]
    items: Iterable = value.splitlines() if isinstance(value, str) else value
    out = []
    for item in items:
        if isinstance(item, dict):
            out.append(SamplePrompt.from_dict(item))
            continue
        line = str(item)
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        out.append(parse_line(line.strip()))
    return out


def load_prompt_file(path: str | Path) -> Any:
    """The contents of a kohya prompt file: text for ``.txt``, the parsed mapping for ``.toml``, the list for
    ``.json``. Raises ``FileNotFoundError`` / ``ValueError`` (bad TOML/JSON or another extension)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"sample_prompts file not found: {p}")
    text = p.read_text(encoding="utf-8")
    suffix = p.suffix.lower()
    if suffix == ".txt":
        return text
    if suffix == ".toml":
        import tomllib

        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"invalid sample prompt TOML {p.name}: {exc}") from None
    if suffix == ".json":
        import json

        return json.loads(text)
    raise ValueError(f"sample_prompts must be a .txt, .toml or .json file (kohya load_prompts): {p.name}")


def round_size(v: int) -> int:
    """kohya's sample size rule: multiple of 8 (rounded down), at least 64."""
    return max(64, int(v) - int(v) % 8)


def comfy_sampler(name: str | None) -> tuple[str, str]:
    """ComfyUI ``(sampler_name, scheduler)`` for a kohya ``sample_sampler``; unknown names warn and use DDIM (kohya
    falls back to DDIM silently)."""
    key = (name or "ddim").lower()
    if key not in KOHYA_TO_COMFY:
        logger.warning("sample_sampler %r is not a kohya sampler; using ddim (as kohya does)", name)
        key = "ddim"
    return KOHYA_TO_COMFY[key]
