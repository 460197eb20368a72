"""Settings and result of one ESD erasure: :class:`ESDConfig` (the paper's defaults, validated by name),
:func:`config_from_mapping` (a TOML table, unknown keys refused), :func:`config_dict` (JSON-friendly), and
:class:`ESDResult` (ΔW per trained tensor, targets, losses, stats and metadata). The loop that uses them is
:func:`.erase.erase`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import torch

from .params import METHODS, Target
from .prompts import normalize_kind, parse_concepts

XT_SOURCES = ("self_sample", "noised")
MASK_MODES = ("sum", "sample", "grid-sum", "grid-sample")
# one-click presets: the mode builds the default grid (grid_n × grid_n + centre) itself
MASK_PRESETS = {"grid-sum": "sum", "grid-sample": "sample"}


@dataclass
class ESDConfig:
    """Settings of one erasure. Defaults are the paper's (lr 1e-5, Adam, 1000 iterations, 512 px, start guidance
    3, 50 DDIM steps, η = 1, ESD-x).

    Fields:
        concepts: concept text(s), ``"Van Gogh"`` or ``["Van Gogh", "Monet"]`` or ``"A; B"``.
        prompts: explicit prompts (multiline text or list; ``{concept}`` expanded); else ``templates`` / built-in
            variations (``variations`` per concept, 0 = the bare concepts, as in the paper).
        prompt_order: ``"cycle"`` or ``"sample"``.
        method: one of :data:`METHODS`. xt_source: one of :data:`XT_SOURCES`.
        negative_guidance: η in the paper's convention (module docstring).
        masks: ``None`` (whole latent, the paper's loss), ``"grid"`` (``grid_n``×``grid_n`` + centre of
            ``centre_size``) or a ``[M, H, W]`` tensor (resized to the latent when the aspect ratio matches).
        mask_weights: per-mask weights (normalised) or ``None`` for :func:`.masks.default_mask_weights`.
        mask_mode: ``"sum"`` (default: every mask each iteration, the loss is the weighted sum of the masked
            means) or ``"sample"`` (one weighted-sampled mask per iteration); the presets ``"grid-sum"`` /
            ``"grid-sample"`` build the grid masks themselves (``masks`` must then be ``None`` or ``"grid"``).
            Why ``"sum"`` is the default: the sampled loss is an unbiased one-sample estimate of the summed loss
            (E[L_sample] = Σ w_i·L_i), both cost one UNet evaluation per iteration (masks only reweight the
            squared error), so the sum has the same expected gradient without the mask-sampling variance; it
            is also the schedule of the grid-mask run this extension comes from (10 masks each iteration).
        concept_kind: ``"auto"`` (inferred per concept, :func:`.prompts.infer_kind`) or one of
            :data:`.prompts.KINDS`; picks the built-in prompt templates (user prompts/templates win).
        erase_from: attribute erasure (``esd_sd.py --erase_from``): prompt(s) of the scene to erase the concept
            from (``"cowboy"`` for concept ``"cowboy hat"``). Then ``x_t`` is sampled with the from-prompt, the
            target is ``ε*(x_t, from) − (η+1)·(ε*(x_t, c) − ε*(x_t, ∅))`` and the trained model is conditioned
            on the from-prompt (:func:`reference_target`). Several lines pair with the concept prompts by index
            (``from[i mod n_from]`` for prompt ``i``).
        width, height: training resolution in pixels (multiples of the host's ``vae_scale``).
        noised_cache: how many frozen-model samples to cache for ``xt_source="noised"`` without images.
        max_nan_skips: consecutive non-finite iterations tolerated (skipped) before stopping with an error.
        gradient_checkpointing: recompute each denoiser block's activations in backward instead of keeping them
            (``host.set_gradient_checkpointing``; same gradients to float rounding, one extra forward of the trained
            prediction per iteration). Where a host computes frozen layers from up-cast copies of stored weights
            (ComfyUI's manual-cast ops: ``--bf16-unet`` or fp8 weights on a fp32/bf16 compute device), autograd
            would otherwise keep one up-cast copy of every layer after the first trained one until backward.
        step_in_backward: apply Adam to each trained tensor as soon as its gradient is complete during backward
            and free that gradient (``Tensor.register_post_accumulate_grad_hook``, PyTorch's "optimizer step in
            backward" pattern), so no full set of gradients is ever held: the same Adam update per tensor (one
            ``torch.optim.Adam`` per tensor, same lr / betas / eps), less memory by one fp32 copy of the trained
            parameters. Difference: the NaN guard then checks each tensor's gradient and skips that tensor's update
            only (the others of the iteration are already applied); the loss itself is still checked first.
        guidance_scale: guidance-distilled flow models (Flux.1-dev) only: the guidance-embedding value of the
            frozen and trained predictions (``None`` = the family's default, 3.5; kohya's Flux
            ``guidance_scale``). ``start_guidance`` is then the guidance embedding of the ``self_sample``
            trajectory, and ``ddim_steps`` its Euler steps (:mod:`.objective`). Refused on SD families.

    Construction does not check anything; :meth:`validate` (called by :func:`erase` and
    :func:`config_from_mapping`) raises ``ValueError``.
    """

    concepts: str | Sequence[str] = ""
    prompts: str | Sequence[str] | None = None
    templates: str | Sequence[str] | None = None
    variations: int = 0
    prompt_order: str = "cycle"
    method: str = "esd-x"
    xt_source: str = "self_sample"
    negative_guidance: float = 1.0
    iterations: int = 1000
    lr: float = 1e-5
    width: int = 512
    height: int = 512
    start_guidance: float = 3.0
    ddim_steps: int = 50
    masks: Any = None
    mask_weights: Sequence[float] | None = None
    mask_mode: str = "sum"
    grid_n: int = 3
    centre_size: float = 0.5
    seed: int = 0
    noised_cache: int = 4
    max_nan_skips: int = 5
    concept_kind: str = "auto"
    erase_from: str | Sequence[str] | None = None
    guidance_scale: float | None = None
    gradient_checkpointing: bool = False
    step_in_backward: bool = False

    def validate(self) -> None:
        """Raise ``ValueError`` with a clear message for any out-of-range setting.

        Checks: non-empty concepts (:func:`.prompts.parse_concepts`), ``method`` / ``xt_source`` / ``mask_mode``
        known, ``iterations`` ≥ 1, ``lr`` > 0 and finite, ``negative_guidance`` finite, ``ddim_steps`` ≥ 1,
        ``width``/``height`` ≥ 8 px. (Divisibility by ``vae_scale`` and masks are checked by :func:`erase`.)
        """
        parse_concepts(self.concepts)
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.xt_source not in XT_SOURCES:
            raise ValueError(f"unknown x_t source {self.xt_source!r}; choose one of {', '.join(XT_SOURCES)}")
        if self.mask_mode not in MASK_MODES:
            raise ValueError(f"unknown mask mode {self.mask_mode!r}; choose one of {', '.join(MASK_MODES)}")
        if self.mask_mode in MASK_PRESETS and not (self.masks is None or (isinstance(self.masks, str) and
                                                                          self.masks.lower() == "grid")):
            raise ValueError(f"mask_mode {self.mask_mode!r} builds its own grid masks: remove the masks you passed "
                             f"or choose mask_mode 'sum' / 'sample' to use them")
        normalize_kind(self.concept_kind)
        if int(self.iterations) < 1:
            raise ValueError(f"iterations must be ≥ 1, got {self.iterations}")
        if not (float(self.lr) > 0 and math.isfinite(float(self.lr))):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not math.isfinite(float(self.negative_guidance)):
            raise ValueError("negative_guidance must be finite")
        if int(self.ddim_steps) < 1:
            raise ValueError(f"ddim_steps must be ≥ 1, got {self.ddim_steps}")
        if self.guidance_scale is not None and not (math.isfinite(float(self.guidance_scale))
                                                    and float(self.guidance_scale) >= 0):
            raise ValueError(f"guidance_scale must be a finite number ≥ 0, got {self.guidance_scale}")
        if int(self.width) < 8 or int(self.height) < 8:
            raise ValueError(f"resolution {self.width}×{self.height} is too small")


@dataclass
class ESDResult:
    """What an erasure produced.

    ``deltas``: ``{(component, path, attr): ΔW}`` float32 CPU tensors (erased weight = base + ΔW);
    ``targets``: the :class:`Target` list; ``losses``: loss per finished iteration; ``stats`` /
    ``metadata``: the contents of ``training_stats.json`` / ``metadata.json``; ``cancelled``: stopped early;
    ``kohya_names``: ``{(component, path): kohya module name}`` in the family's own naming (SDXL: LDM UNet names,
    as kohya's SDXL LoRAs), used by the file writers; empty means "derive from the diffusers path".
    """

    deltas: dict[tuple[str, str, str], torch.Tensor]
    targets: list[Target]
    losses: list[float]
    stats: dict
    metadata: dict
    masks: torch.Tensor | None = None
    mask_weights: torch.Tensor | None = None
    mask_names: list[str] = field(default_factory=list)
    cancelled: bool = False
    kohya_names: dict = field(default_factory=dict)


def config_from_mapping(data: Mapping[str, Any]) -> ESDConfig:
    """Build an :class:`ESDConfig` from a mapping (TOML table), rejecting unknown keys with a clear error.

    Raises ``ValueError`` for unknown keys (listing the known ones) or any :meth:`ESDConfig.validate` failure.
    """
    known = set(ESDConfig.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown ESD setting(s) {unknown}; known: {sorted(known)}")
    cfg = ESDConfig(**dict(data))
    cfg.validate()
    return cfg


def config_dict(cfg: ESDConfig) -> dict:
    """A JSON-friendly dict of the settings (tensor masks summarised by shape)."""
    d = asdict(cfg)
    if torch.is_tensor(cfg.masks):
        d["masks"] = f"tensor{list(cfg.masks.shape)}"
    return d
