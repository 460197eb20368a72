"""Kohya's noise and loss options for the discrete-DDPM objective, as pure functions of tensors and a generator.

Each function re-implements one step of kohya-ss/sd-scripts (read at commit 48d368f) and cites it:

* :func:`sample_training_noise` — ``library/train_util.py`` ``get_noise_noisy_latents_and_timesteps``
  (l. 6071-6107): ε ~ N(0, I); ``noise_offset`` (optionally × U(0,1) with ``noise_offset_random_strength``, and
  ``adaptive_noise_scale`` × |channel mean of the latents| added to it, ``custom_train_functions.apply_noise_offset``
  l. 471); ``multires_noise_iterations`` / ``multires_noise_discount`` (``pyramid_noise_like`` l. 458); the
  timesteps (``get_timesteps`` l. 6062: uniform in ``[min, max)``, or exactly ``max`` when ``min >= max``), and
  ``ip_noise_gamma`` input perturbation (Ning et al. 2023, "Input Perturbation Reduces Exposure Bias in Diffusion
  Models", Eq. 9: the *noisy input* uses ε + γ·ξ while the target keeps ε), optionally × U(0,1)
  (``ip_noise_gamma_random_strength``).
* :func:`post_process_loss` — ``train_network.py`` ``NetworkTrainer.post_process_loss`` (l. 330) with
  ``custom_train_functions`` ``apply_snr_weight`` (l. 68; Hang et al. 2023, Eq. 8), ``scale_v_prediction_loss_like
  _noise_prediction`` (l. 79), ``add_v_prediction_like_loss`` (l. 94) and ``apply_debiased_estimation`` (l. 101;
  Yu et al. 2024, "Debias the Training of Diffusion Models", weight 1/√SNR), applied in that order, with kohya's
  SNR clamp at 1000 where kohya clamps.
* :func:`max_norm_regularization` — ``networks/lora.py`` ``LoRANetwork.apply_max_norm_regularization``
  (l. 1369; kohya's ``scale_weight_norms``): every module whose ΔW Frobenius norm exceeds the limit has both
  factors scaled by √(limit/norm).

Randomness: kohya draws with torch's and Python's global generators; here every draw comes from the trainer's
own ``torch.Generator`` (so runs are reproducible and resumable), in kohya's order: base noise, offset strength,
offset, pyramid levels (each level's scale factor, then its noise), timesteps, input-perturbation strength,
perturbation noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class NoiseOptions:
    """The kohya options :func:`sample_training_noise` reads (names and defaults as ``train_network.py``)."""

    noise_offset: float | None = None
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float | None = None
    ip_noise_gamma_random_strength: bool = False
    min_timestep: int | None = 0
    max_timestep: int | None = None


def pyramid_noise(noise: torch.Tensor, iterations: int, discount: float, generator: torch.Generator
                  ) -> torch.Tensor:
    """Multi-resolution ("pyramid") noise: ``noise + Σ_i up(N(0,1) at size/rⁱ)·discountⁱ``, renormalised to unit std.

    kohya ``custom_train_functions.pyramid_noise_like`` (l. 458; Whitaker 2023, "Multi-Resolution Noise for
    Diffusion Model Training"): r ~ U(2, 4) per level, bilinear upsampling, stop once a side reaches 1, divide by
    the std of the whole batch. ``noise`` ``[B, C, h, w]`` fp32 (not modified); returns a new tensor.
    """
    b, c, h, w = noise.shape
    out = noise.clone()
    for i in range(int(iterations)):
        r = float(torch.rand((), generator=generator)) * 2 + 2
        hn, wn = max(1, int(h / (r ** i))), max(1, int(w / (r ** i)))
        level = torch.randn((b, c, hn, wn), generator=generator, dtype=noise.dtype)
        out = out + F.interpolate(level, size=(h, w), mode="bilinear") * discount ** i
        if hn == 1 or wn == 1:
            break
    return out / out.std()


def sample_timesteps(opts: NoiseOptions, batch: int, num_train_timesteps: int, generator: torch.Generator
                     ) -> torch.Tensor:
    """Integer timesteps ``[B]`` int64: uniform in ``[min_timestep, max_timestep)``; when ``min >= max`` every
    sample gets exactly ``max_timestep`` (kohya ``get_timesteps``, train_util.py l. 6062).

    Raises ``ValueError`` for a timestep outside ``[0, T]`` or (fixed case) ``max_timestep == T``.
    """
    T = int(num_train_timesteps)
    lo = 0 if opts.min_timestep is None else int(opts.min_timestep)
    hi = T if opts.max_timestep is None else int(opts.max_timestep)
    if not (0 <= lo <= T and 0 <= hi <= T):
        raise ValueError(f"min_timestep ({lo}) and max_timestep ({hi}) must lie in [0, {T}]")
    if lo < hi:
        return torch.randint(lo, hi, (batch,), generator=generator)
    if hi >= T:
        raise ValueError(f"min_timestep >= max_timestep trains at the fixed timestep max_timestep, which must be "
                         f"below {T} (got {hi})")
    return torch.full((batch,), hi, dtype=torch.long)


def sample_training_noise(latents: torch.Tensor, opts: NoiseOptions, generator: torch.Generator,
                          num_train_timesteps: int, timesteps: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(target_noise, input_noise, timesteps)`` for one batch, kohya's ``get_noise_noisy_latents_and_timesteps``.

    Args:
        latents: ``[B, C, h, w]`` fp32 CPU latents (only their shape and, for ``adaptive_noise_scale``, channel
            means are used).
        opts: :class:`NoiseOptions`.
        generator: CPU generator; consumed in the order given in the module docstring.
        timesteps: fixed ``[B]`` timesteps (validation); then none are drawn.

    Returns fp32 ``[B, C, h, w]`` noise ε used for the target, the noise mixed into the noisy input (ε plus the
    input perturbation when ``ip_noise_gamma`` is set, else ε itself) and int64 ``[B]`` timesteps.
    """
    b, c = latents.shape[:2]
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    if opts.noise_offset:
        off: torch.Tensor | float = float(opts.noise_offset)
        if opts.noise_offset_random_strength:
            off = torch.rand(1, generator=generator) * float(opts.noise_offset)
        if opts.adaptive_noise_scale is not None:
            mean = latents.float().mean(dim=(2, 3), keepdim=True).abs()
            off = torch.clamp(off + float(opts.adaptive_noise_scale) * mean, min=0.0)
        noise = noise + off * torch.randn((b, c, 1, 1), generator=generator)
    if opts.multires_noise_iterations:
        noise = pyramid_noise(noise, int(opts.multires_noise_iterations), float(opts.multires_noise_discount),
                              generator)
    if timesteps is None:
        timesteps = sample_timesteps(opts, b, num_train_timesteps, generator)
    input_noise = noise
    if opts.ip_noise_gamma:
        strength: torch.Tensor | float = float(opts.ip_noise_gamma)
        if opts.ip_noise_gamma_random_strength:
            strength = torch.rand(1, generator=generator) * float(opts.ip_noise_gamma)
        input_noise = noise + strength * torch.randn(latents.shape, generator=generator)
    return noise, input_noise, timesteps.long()


def all_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """SNR per timestep ``ᾱ/(1−ᾱ)`` fp32 ``[T]`` (kohya ``prepare_scheduler_for_custom_training``, l. 16)."""
    a = alphas_cumprod.double()
    return (a / (1 - a)).float()


def post_process_loss(loss: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, *,
                      v_prediction: bool, min_snr_gamma: float | None = None,
                      scale_v_pred_loss_like_noise_pred: bool = False, v_pred_like_loss: float | None = None,
                      debiased_estimation_loss: bool = False) -> torch.Tensor:
    """Per-sample loss ``[B]`` → weighted ``[B]``, kohya's ``post_process_loss`` order (module docstring).

    ``min_snr_gamma``: × min(SNR, γ)/SNR (ε) or /(SNR+1) (v); ``scale_v_pred_loss_like_noise_pred``:
    × SNR'/(SNR'+1); ``v_pred_like_loss`` λ: + λ·loss·(SNR'+1)/SNR'; ``debiased_estimation_loss``: × 1/√SNR' (ε)
    or × 1/(SNR'+1) (v) — SNR' = min(SNR, 1000). Timesteps index ``alphas_cumprod`` ``[T]``.
    """
    snr = all_snr(alphas_cumprod)[timesteps.cpu().long()].to(loss.device)
    if min_snr_gamma:
        m = torch.clamp(snr, max=float(min_snr_gamma))
        loss = loss * (m / (snr + 1) if v_prediction else m / snr)
    clamped = torch.clamp(snr, max=1000.0)
    scale = clamped / (clamped + 1)
    if scale_v_pred_loss_like_noise_pred:
        loss = loss * scale
    if v_pred_like_loss:
        loss = loss + loss / scale * float(v_pred_like_loss)
    if debiased_estimation_loss:
        loss = loss * (1 / (clamped + 1) if v_prediction else 1 / torch.sqrt(clamped))
    return loss


@torch.no_grad()
def max_norm_regularization(modules, max_norm: float) -> tuple[int, float, float]:
    """Scale down LoRA modules whose ΔW norm exceeds ``max_norm`` (kohya ``scale_weight_norms``).

    ``modules``: iterable of objects with ``lora_down`` ``[r, in(, kh, kw)]``, ``lora_up`` ``[out, r(, 1, 1)]``
    parameters and ``alpha``, ``dim``. ΔW = up·down·alpha/dim; norm clamped below at max_norm/2 (kohya);
    ratio = min(norm, max)/norm; both factors × √ratio. Returns ``(keys_scaled, mean_norm, max_norm)`` of the
    scaled norms, as kohya returns (``networks/lora.py`` l. 1369).
    """
    scaled, norms = 0, []
    for m in modules:
        down, up = m.lora_down, m.lora_up
        scale = float(m.alpha) / m.dim
        updown = (up.flatten(1).float() @ down.flatten(1).float()) * scale
        norm = updown.norm().clamp(min=max_norm / 2)
        desired = torch.clamp(norm, max=max_norm)
        ratio = float(desired / norm)
        if ratio != 1:
            scaled += 1
            up.mul_(ratio ** 0.5)
            down.mul_(ratio ** 0.5)
        norms.append(float(updown.norm()) * ratio)
    if not norms:
        return 0, 0.0, 0.0
    return scaled, sum(norms) / len(norms), max(norms)
