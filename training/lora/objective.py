"""The training objective behind one seam: the family table says which (``families.Family.objective``), the loops
call :func:`objective_for` and never branch on a family.

* ``"ddpm"`` (SD1/SD2/SDXL): the discrete ε / v objective of :func:`.loss.ddpm_loss` (kohya ``train_network.py``).
* ``"flow"`` (Flux.1): rectified flow with kohya-ss/sd-scripts ``flux_train_network.py`` semantics and names, built
  from :mod:`..flow` (read at commit 48d368f):

  - noise ``ε ~ N(0, I)`` drawn first (``get_noise_pred_and_target``, flux_train_network.py line 327: plain
    ``randn_like``, no noise offset / multires noise);
  - σ from ``timestep_sampling`` (``sigma``, ``uniform``, ``sigmoid``, ``shift``, ``flux_shift``) with
    ``sigmoid_scale``, ``discrete_flow_shift``, ``weighting_scheme``, ``logit_mean``, ``logit_std``, ``mode_scale``
    (``library/flux_train_utils.py`` ``get_noisy_model_input_and_timesteps``, lines 471-529);
  - ``x_σ = (1 − σ)·x0 + σ·(ε + γ·ξ)`` with ``ip_noise_gamma`` γ (``ip_noise_gamma_random_strength``: γ·U(0,1)),
    lines 514-527;
  - the prediction with the guidance embedding ``guidance_scale`` (line 342; ignored by schnell, which has none);
  - ``model_prediction_type`` ``raw`` / ``additive`` / ``sigma_scaled`` (``apply_model_prediction_type``,
    lines 532-546; ``sigma_scaled`` weights the loss by ``weighting_scheme``), target ``ε − x0`` (line 399);
  - the loss of ``train_network.py`` ``process_batch`` (conditional loss × weighting, mean, × ``loss_weights``) and
    no post-processing (flux_train_network.py ``post_process_loss`` returns the loss as is, line 436).

  Settings kohya's Flux trainer ignores or refuses are named by :meth:`FlowObjective.check_config`: refused
  (``v_parameterization``, ``zero_terminal_snr``: Flux predicts a velocity on a flow schedule; ``huber_schedule =
  "snr"`` with a Huber loss: kohya raises ``NotImplementedError`` in ``get_huber_threshold_if_needed``, train_util.py
  line 6120; ``apply_t5_attn_mask``: diffusers' ``FluxTransformer2DModel`` takes no text attention mask), or warned
  as having no effect (``noise_offset``, ``noise_offset_random_strength``, ``adaptive_noise_scale``,
  ``multires_noise_iterations``, ``min_timestep`` / ``max_timestep``, ``min_snr_gamma``, ``debiased_estimation_loss``,
  ``scale_v_pred_loss_like_noise_pred``, ``v_pred_like_loss``, ``clip_skip``, ``max_token_length``).

Validation (kohya's epoch validation sets ``min_timestep = max_timestep`` to 200/400/600/800, which kohya's Flux
sampler ignores, so its Flux validation draws random σ): here the same four points are used as σ = 0.2, 0.4, 0.6,
0.8, so the number is deterministic as on SD.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .. import flow
from ..conditioning import Conditioning
from ..families import family
from ..host import DiffusionHost

logger = logging.getLogger(__name__)


@dataclass
class FlowSettings:
    """kohya ``flux_train_network.py`` objective options (``library/flux_train_utils.py``
    ``add_flux_train_arguments`` and ``train_util.add_dit_training_arguments``), kohya's defaults; a base of
    :class:`.config.TrainConfig`. Used only by flow families; set on another family they are warned by name.

    ``timestep_sampling`` (:data:`..flow.TIMESTEP_SAMPLING`), ``sigmoid_scale``, ``discrete_flow_shift`` (> 0),
    ``model_prediction_type`` (:data:`..flow.MODEL_PREDICTION_TYPES`), ``guidance_scale`` (Flux-dev guidance
    embedding during training), ``weighting_scheme`` (:data:`..flow.WEIGHTING_SCHEMES`), ``logit_mean``,
    ``logit_std``, ``mode_scale``, ``t5xxl_max_token_length`` (None = 512 dev / 256 schnell), ``apply_t5_attn_mask``
    (refused when true).
    """

    timestep_sampling: str = "sigma"
    sigmoid_scale: float = 1.0
    discrete_flow_shift: float = 3.0
    model_prediction_type: str = "sigma_scaled"
    guidance_scale: float = 3.5
    weighting_scheme: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    t5xxl_max_token_length: int | None = None
    apply_t5_attn_mask: bool = False


FLOW_FIELDS = tuple(FlowSettings.__dataclass_fields__)


def validate_flow_settings(cfg) -> None:
    """Coerce and range-check the :class:`FlowSettings` fields of ``cfg`` in place; ``ValueError`` naming the key."""
    for name in ("sigmoid_scale", "discrete_flow_shift", "guidance_scale", "logit_mean", "logit_std", "mode_scale"):
        try:
            setattr(cfg, name, float(getattr(cfg, name)))
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number, got {getattr(cfg, name)!r}") from None
    if cfg.timestep_sampling not in flow.TIMESTEP_SAMPLING:
        raise ValueError(f"timestep_sampling must be one of {', '.join(flow.TIMESTEP_SAMPLING)}, "
                         f"not {cfg.timestep_sampling!r}")
    if cfg.model_prediction_type not in flow.MODEL_PREDICTION_TYPES:
        raise ValueError(f"model_prediction_type must be one of {', '.join(flow.MODEL_PREDICTION_TYPES)}, "
                         f"not {cfg.model_prediction_type!r}")
    if cfg.weighting_scheme not in flow.WEIGHTING_SCHEMES:
        raise ValueError(f"weighting_scheme must be one of {', '.join(flow.WEIGHTING_SCHEMES)}, "
                         f"not {cfg.weighting_scheme!r}")
    if not cfg.discrete_flow_shift > 0:
        raise ValueError(f"discrete_flow_shift must be > 0, got {cfg.discrete_flow_shift}")
    if cfg.t5xxl_max_token_length is not None:
        cfg.t5xxl_max_token_length = int(cfg.t5xxl_max_token_length)
        if cfg.t5xxl_max_token_length < 1:
            raise ValueError("t5xxl_max_token_length must be >= 1")


def _changed(cfg, names) -> list[str]:
    """Names whose value differs from the :class:`.config.TrainConfig` default (i.e. the user set them)."""
    defaults = type(cfg)()
    return [n for n in names if getattr(cfg, n) != getattr(defaults, n)]


class DDPMObjective:
    """The discrete-schedule objective (SD1/SD2/SDXL): :func:`.loss.ddpm_loss`; validation at kohya's integer
    timesteps ``linspace(min_t, max_t, 6)[1:-1]``."""

    name = "ddpm"

    def check_config(self, cfg, host: DiffusionHost) -> list[str]:
        """Warnings for flow-only settings set on a DDPM model (they have no effect)."""
        return [f"{n} applies to flow-matching models (Flux) only; it has no effect on {host.arch.upper()}"
                for n in _changed(cfg, FLOW_FIELDS)]

    def loss(self, host, latents, cond, cfg, generator, timesteps=None, autocast=None, loss_weights=None):
        """:func:`.loss.ddpm_loss` (0-d fp32; ``timesteps``: fixed integer t ``[B]``)."""
        from .loss import ddpm_loss

        return ddpm_loss(host, latents, cond, cfg, generator, timesteps=timesteps, autocast=autocast,
                         loss_weights=loss_weights)

    def validation_timesteps(self, host: DiffusionHost, cfg) -> torch.Tensor:
        """kohya's four validation timesteps (long ``[4]``)."""
        T = len(host.alphas_cumprod)
        lo = max(0, cfg.min_timestep)
        hi = min(T, cfg.max_timestep if cfg.max_timestep is not None else T)
        return torch.as_tensor(np.linspace(lo, hi, 6, dtype=int)[1:-1], dtype=torch.long)

    def update_metadata(self, md: dict, cfg, host: DiffusionHost) -> None:
        """Nothing to change for DDPM families."""


#: settings kohya's Flux trainer ignores (name -> why), warned when set
FLOW_NO_EFFECT = {
    **{k: "kohya's Flux trainer draws plain N(0, I) noise (flux_train_network.py line 327)"
       for k in ("noise_offset", "noise_offset_random_strength", "adaptive_noise_scale", "multires_noise_iterations",
                 "multires_noise_discount")},
    **{k: "kohya's Flux sampler draws σ from timestep_sampling and ignores the timestep range "
          "(flux_train_utils.py get_noisy_model_input_and_timesteps)" for k in ("min_timestep", "max_timestep")},
    **{k: "DDPM loss weighting; kohya's Flux trainer does not post-process the loss (flux_train_network.py "
          "post_process_loss, line 436)" for k in ("min_snr_gamma", "debiased_estimation_loss",
                                                  "scale_v_pred_loss_like_noise_pred", "v_pred_like_loss")},
}


class FlowObjective:
    """Rectified flow with kohya's Flux options (module docstring)."""

    name = "flow"

    def check_config(self, cfg, host: DiffusionHost) -> list[str]:
        """Raise ``ValueError`` naming DDPM-only settings that contradict a flow model; return warnings for
        settings kohya's Flux trainer ignores (module docstring)."""
        errors = []
        if cfg.v_parameterization:
            errors.append("v_parameterization: Flux predicts a flow velocity (ε − x0), not v")
        if cfg.zero_terminal_snr:
            errors.append("zero_terminal_snr: a DDPM schedule rescale; the flow schedule already ends at pure noise")
        if cfg.loss_type in ("huber", "smooth_l1") and cfg.huber_schedule == "snr":
            errors.append("huber_schedule = \"snr\" needs a DDPM schedule (kohya raises NotImplementedError for Flux, "
                          "train_util.py line 6120); use huber_schedule = \"exponential\" or \"constant\"")
        if cfg.apply_t5_attn_mask:
            errors.append("apply_t5_attn_mask: diffusers' FluxTransformer2DModel takes no T5 attention mask here")
        if errors:
            raise ValueError("settings that do not apply to Flux: " + "; ".join(errors))
        out = [f"{n} has no effect on Flux ({FLOW_NO_EFFECT[n]})" for n in _changed(cfg, FLOW_NO_EFFECT)]
        if getattr(host, "variant", "dev") == "schnell" and _changed(cfg, ("guidance_scale",)):
            out.append("guidance_scale has no effect on Flux schnell (no guidance embedding)")
        return out

    def sample(self, latents: torch.Tensor, cfg, generator: torch.Generator, sigmas: torch.Tensor | None = None):
        """Noise, σ, kohya timesteps and ``x_σ`` for one batch, drawn in kohya's order (noise, σ, ξ, γ strength).
        ``latents`` ``[B, C, h, w]``; ``sigmas`` fixes σ (validation). Returns ``(x0, noise, sigmas, timesteps,
        x_sigma)``, fp32 CPU."""
        x0 = latents.float().cpu()
        noise = torch.randn(x0.shape, generator=generator)
        if sigmas is None:
            sig, ts = flow.sample_sigmas(x0.shape[0], tuple(x0.shape[-2:]), generator,
                                         timestep_sampling=cfg.timestep_sampling, sigmoid_scale=cfg.sigmoid_scale,
                                         discrete_flow_shift=cfg.discrete_flow_shift,
                                         weighting_scheme=cfg.weighting_scheme, logit_mean=cfg.logit_mean,
                                         logit_std=cfg.logit_std, mode_scale=cfg.mode_scale)
        else:
            sig = sigmas.float().cpu()
            ts = sig * flow.NUM_TRAIN_TIMESTEPS
        eps_in = noise
        if cfg.ip_noise_gamma:
            xi = torch.randn(x0.shape, generator=generator)
            gamma = float(cfg.ip_noise_gamma)
            if cfg.ip_noise_gamma_random_strength:
                gamma = float(torch.rand(1, generator=generator)) * gamma
            eps_in = noise + gamma * xi
        return x0, noise, sig, ts, flow.noisy_input(x0, eps_in, sig)

    def loss(self, host: DiffusionHost, latents: torch.Tensor, cond: Conditioning | torch.Tensor, cfg,
             generator: torch.Generator, timesteps: torch.Tensor | None = None,
             autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
             loss_weights: torch.Tensor | None = None) -> torch.Tensor:
        """One batch's scalar flow-matching loss (0-d fp32 on the host's device). ``timesteps``: fixed float σ
        ``[B]`` (validation). ``cond`` without ``extras["guidance"]`` gets ``guidance_scale``."""
        from .loss import per_sample_loss

        x0, noise, sig, ts, x_t = self.sample(latents, cfg, generator, timesteps)
        cond = Conditioning.wrap(cond)
        if "guidance" not in cond.extras:
            cond = cond.with_extras(guidance=torch.full((len(x0),), float(cfg.guidance_scale)))
        dev = host.device
        ctx = autocast() if autocast is not None else contextlib.nullcontext()
        with ctx:
            pred = host.predict(x_t.to(dev, host.dtype), sig.to(dev), cond)
        pred, weighting = flow.apply_model_prediction_type(pred, x_t.to(pred.device), sig.to(pred.device),
                                                           cfg.model_prediction_type, cfg.weighting_scheme)
        target = flow.velocity_target(x0, noise).to(pred.device)
        hc = None
        if cfg.loss_type in ("huber", "smooth_l1"):  # kohya get_huber_threshold_if_needed on t = σ·1000
            if cfg.huber_schedule == "exponential":
                alpha = -math.log(cfg.huber_c) / flow.NUM_TRAIN_TIMESTEPS
                hc = torch.exp(-alpha * ts) * cfg.huber_scale
            else:
                hc = torch.full((len(ts),), cfg.huber_c * cfg.huber_scale)
        loss = per_sample_loss(pred, target, cfg.loss_type, hc)
        if weighting is not None:  # per-sample [B,1,1,1]: the mean of loss × weighting = weighting × mean
            loss = loss * weighting.reshape(-1).to(loss)
        if loss_weights is not None:
            loss = loss * loss_weights.to(loss.device, loss.dtype)
        return loss.mean()

    def validation_timesteps(self, host: DiffusionHost, cfg) -> torch.Tensor:
        """σ = 0.2, 0.4, 0.6, 0.8 (float ``[4]``; see module docstring)."""
        return torch.linspace(0, 1, 6)[1:-1].float()

    def update_metadata(self, md: dict, cfg, host: DiffusionHost) -> None:
        """kohya ``flux_train_network.py`` ``update_metadata`` (lines 446-457) and ``get_sai_model_spec`` (line 439:
        modelspec ``flux-1-dev`` / ``flux-1-schnell``, implementation BFL, no prediction type; kohya
        ``sai_model_spec.py`` line 432), in place on the SD-shaped ``md``."""
        variant = getattr(host, "variant", "dev")
        md.pop("modelspec.prediction_type", None)
        md.update({"ss_model_type": "flux", "ss_apply_t5_attn_mask": bool(cfg.apply_t5_attn_mask),
                "ss_weighting_scheme": cfg.weighting_scheme, "ss_logit_mean": cfg.logit_mean,
                "ss_logit_std": cfg.logit_std, "ss_mode_scale": cfg.mode_scale, "ss_guidance_scale": cfg.guidance_scale,
                "ss_timestep_sampling": cfg.timestep_sampling, "ss_sigmoid_scale": cfg.sigmoid_scale,
                "ss_model_prediction_type": cfg.model_prediction_type,
                "ss_discrete_flow_shift": cfg.discrete_flow_shift, "ss_v2": False,
                "ss_clip_skip": None, "ss_max_token_length": None, "ss_zero_terminal_snr": False,
                "modelspec.architecture": f"flux-1-{variant}/lora",
                "modelspec.implementation": family("flux").modelspec_implementation})


OBJECTIVES = {"ddpm": DDPMObjective(), "flow": FlowObjective()}


def objective_for(host: DiffusionHost):
    """The objective of ``host``'s family (``families.family(host.arch).objective``)."""
    return OBJECTIVES[family(getattr(host, "arch", "sd1")).objective]
