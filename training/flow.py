"""The rectified-flow objective of flow-matching families (Flux.1; ``families.Family.objective == "flow"``), with
kohya-ss/sd-scripts ``flux_train_network.py`` semantics and names.

Forward process (Liu et al. 2023, "Flow Straight and Fast"; Esser et al. 2024, SD3 §2): with σ ∈ [0, 1],
``x_σ = (1 − σ)·x0 + σ·ε`` and the velocity target ``v = ε − x0``. ComfyUI's ``CONST`` model sampling uses the same
frame (``comfy/model_sampling.py``: ``noise_scaling`` = σ·ε + (1 − σ)·x0, ``calculate_denoised`` = x − σ·v̂), so a
host can hand σ to ComfyUI's ``apply_model`` unchanged.

Everything follows kohya-ss/sd-scripts ``library/flux_train_utils.py`` at commit 48d368f:

* :func:`sample_sigmas` — ``get_noisy_model_input_and_timesteps`` (lines 471–529): ``timestep_sampling`` =
  ``sigma`` (density from ``weighting_scheme``, then the shifted discrete schedule of ``FlowMatchEulerDiscreteScheduler
  (num_train_timesteps=1000, shift=discrete_flow_shift)``), ``uniform``, ``sigmoid`` (σ = sigmoid(sigmoid_scale·z)),
  ``shift`` (sigmoid then σ·s / (1 + (s − 1)·σ)), ``flux_shift`` (sigmoid then Flux's resolution-dependent
  ``time_shift(mu, 1, σ)`` with mu = lin(256 → 0.5, 4096 → 1.15) of the packed sequence length, lines 306–313);
* :func:`noisy_input` — the same function's forward process, with kohya's ``ip_noise_gamma`` option;
* :func:`apply_model_prediction_type` — ``apply_model_prediction_type`` (lines 532–546): ``raw``, ``additive``,
  ``sigma_scaled`` (x_σ − σ·v̂, loss weighted by ``weighting_scheme``), all compared with ``ε − x0`` as kohya does.

The density and weighting functions are diffusers' own (``diffusers.training_utils.compute_density_for_timestep_
sampling`` / ``compute_loss_weighting_for_sd3``, from which kohya copied them), and the discrete schedule is diffusers'
``FlowMatchEulerDiscreteScheduler``. Randomness comes from an explicit ``torch.Generator`` in the order kohya draws
it, so a generator seeded like kohya's global RNG reproduces kohya's draws.
"""

from __future__ import annotations

import math

import torch

TIMESTEP_SAMPLING = ("sigma", "uniform", "sigmoid", "shift", "flux_shift")
MODEL_PREDICTION_TYPES = ("raw", "additive", "sigma_scaled")
WEIGHTING_SCHEMES = ("none", "uniform", "sigma_sqrt", "logit_normal", "mode", "cosmap")
NUM_TRAIN_TIMESTEPS = 1000


def time_shift(mu: float, sigma: float, t: torch.Tensor) -> torch.Tensor:
    """Flux's timestep shift ``e^mu / (e^mu + (1/t − 1)^sigma)`` (BFL ``flux/sampling.py``; kohya
    ``flux_train_utils.time_shift``, line 306). ``t`` in (0, 1]; same shape out."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def flux_mu(latent_h: int, latent_w: int) -> float:
    """Flux's shift ``mu`` for a latent of ``latent_h × latent_w`` (before 2×2 packing): linear in the packed
    sequence length ``(h//2)·(w//2)`` from 0.5 at 256 tokens to 1.15 at 4096 (kohya ``get_lin_function``, line 310;
    applied in ``get_noisy_model_input_and_timesteps``, line 497)."""
    x = (latent_h // 2) * (latent_w // 2)
    m = (1.15 - 0.5) / (4096 - 256)
    return m * x + (0.5 - m * 256)


def sample_sigmas(batch: int, latent_hw: tuple[int, int], generator: torch.Generator, *,
                  timestep_sampling: str = "sigma", sigmoid_scale: float = 1.0, discrete_flow_shift: float = 3.0,
                  weighting_scheme: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0,
                  mode_scale: float = 1.29) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw σ ``[batch]`` float32 in (0, 1] and kohya's timesteps ``σ·1000`` for one batch (see module docstring).

    Args:
        latent_hw: the (unpacked) latent height and width, for ``flux_shift``.
        generator: CPU generator; draws in kohya's order (one ``randn``/``rand``/``normal`` of size ``batch``).
        timestep_sampling, sigmoid_scale, discrete_flow_shift, weighting_scheme, logit_mean, logit_std,
            mode_scale: kohya's arguments of the same names (defaults: kohya's flux defaults, except
            ``weighting_scheme`` whose kohya default is ``uniform``).

    Returns ``(sigmas, timesteps)``. Raises ``ValueError`` for an unknown ``timestep_sampling`` or
    ``weighting_scheme``, or a non-positive ``discrete_flow_shift``.
    """
    if timestep_sampling not in TIMESTEP_SAMPLING:
        raise ValueError(f"timestep_sampling must be one of {', '.join(TIMESTEP_SAMPLING)}, not {timestep_sampling!r}")
    if weighting_scheme not in WEIGHTING_SCHEMES:
        raise ValueError(f"weighting_scheme must be one of {', '.join(WEIGHTING_SCHEMES)}, not {weighting_scheme!r}")
    if not discrete_flow_shift > 0:
        raise ValueError(f"discrete_flow_shift must be > 0, got {discrete_flow_shift}")
    b = int(batch)
    if timestep_sampling in ("uniform", "sigmoid"):
        if timestep_sampling == "sigmoid":
            sig = torch.sigmoid(sigmoid_scale * torch.randn((b,), generator=generator))
        else:
            sig = torch.rand((b,), generator=generator)
    elif timestep_sampling in ("shift", "flux_shift"):
        sig = (torch.randn((b,), generator=generator) * sigmoid_scale).sigmoid()
        if timestep_sampling == "shift":
            sig = (sig * discrete_flow_shift) / (1 + (discrete_flow_shift - 1) * sig)
        else:
            sig = time_shift(flux_mu(*latent_hw), 1.0, sig)
    else:
        u = _density(weighting_scheme, b, generator, logit_mean, logit_std, mode_scale)
        idx = (u * NUM_TRAIN_TIMESTEPS).long()
        sig = _discrete_sigmas(discrete_flow_shift)[idx]
    sig = sig.float()
    return sig, sig * NUM_TRAIN_TIMESTEPS


def _density(scheme: str, b: int, g: torch.Generator, mean: float, std: float, mode_scale: float) -> torch.Tensor:
    # diffusers.training_utils.compute_density_for_timestep_sampling draws from the global RNG; the same formulas
    # with an explicit generator (kohya flux_train_utils.py lines 433-451)
    if scheme == "logit_normal":
        return torch.sigmoid(torch.normal(mean=mean, std=std, size=(b,), generator=g))
    u = torch.rand((b,), generator=g)
    if scheme == "mode":
        u = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


_SCHED_CACHE: dict[float, torch.Tensor] = {}


def _discrete_sigmas(shift: float) -> torch.Tensor:
    """σ of ``FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)`` (diffusers), indexed like
    kohya's ``noise_scheduler.timesteps[indices]`` → ``get_sigmas`` (one σ per timestep, descending)."""
    if shift not in _SCHED_CACHE:
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=float(shift))
        _SCHED_CACHE[shift] = sched.sigmas[:NUM_TRAIN_TIMESTEPS].float().clone()
    return _SCHED_CACHE[shift]


def noisy_input(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor, *, ip_noise_gamma: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """``(1 − σ)·x0 + σ·(ε + γ·ξ)`` (kohya lines 514–527; γ = ``ip_noise_gamma``, ξ ~ N(0, I) drawn from
    ``generator`` when γ is set). ``x0``/``noise`` ``[B, C, h, w]``; ``sigmas`` ``[B]``; fp32 out."""
    s = sigmas.float().view(-1, *([1] * (x0.dim() - 1)))
    eps = noise.float()
    if ip_noise_gamma:
        eps = eps + float(ip_noise_gamma) * torch.randn(x0.shape, generator=generator)
    return (1.0 - s) * x0.float() + s * eps


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow-matching target ``ε − x0`` (kohya ``flux_train_network.py`` ``get_noise_pred_and_target``)."""
    return noise.float() - x0.float()


def apply_model_prediction_type(pred: torch.Tensor, x_sigma: torch.Tensor, sigmas: torch.Tensor,
                                model_prediction_type: str = "sigma_scaled",
                                weighting_scheme: str = "uniform") -> tuple[torch.Tensor, torch.Tensor | None]:
    """kohya's ``model_prediction_type`` (``apply_model_prediction_type``, lines 532–546): ``raw`` → v̂ (kohya's
    recommendation, docs/flux_train_network.md); ``additive`` → v̂ + x_σ; ``sigma_scaled`` → x_σ − σ·v̂ with the loss
    weighted by diffusers' ``compute_loss_weighting_for_sd3(weighting_scheme, σ)``.

    kohya compares every variant with the same target ``ε − x0`` (``flux_train_network.py`` line 399, "this is
    different from SD3"); Concept Lab keeps that for parity (see :func:`velocity_target`), so ``sigma_scaled`` is
    kohya's, not SD3's (which targets x0). Returns ``(prediction fp32, weighting [B,1,1,1] or None)``; raises
    ``ValueError`` for an unknown type.
    """
    if model_prediction_type not in MODEL_PREDICTION_TYPES:
        raise ValueError(f"model_prediction_type must be one of {', '.join(MODEL_PREDICTION_TYPES)}, "
                         f"not {model_prediction_type!r}")
    pred = pred.float()
    if model_prediction_type == "raw":
        return pred, None
    if model_prediction_type == "additive":
        return pred + x_sigma.float(), None
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    s = sigmas.float().view(-1, *([1] * (pred.dim() - 1)))
    return pred * (-s) + x_sigma.float(), compute_loss_weighting_for_sd3(weighting_scheme=weighting_scheme, sigmas=s)
