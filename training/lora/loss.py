"""The discrete-DDPM training loss of the LoRA trainer with kohya semantics (kohya-ss/sd-scripts
``train_network.py``, ``library/custom_train_functions.py`` at 48d368f): SNR and min-SNR-γ weighting (Hang et al.
2023, Eq. 8), per-sample ``l2`` / ``l1`` / ``huber`` / ``smooth_l1`` losses with kohya's ``huber_schedule``, SDXL size
ids, and :func:`diffusion_loss` / :func:`ddpm_loss` for one batch. The flow objective (Flux) is
:mod:`.objective`."""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Sequence

import torch

from ..conditioning import Conditioning, size_ids
from ..host import DiffusionHost, add_noise, prediction_target
from .config import TrainConfig, noise_options
from .noise import post_process_loss, sample_training_noise
from .objective import objective_for


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR(t) = ᾱ_t / (1 − ᾱ_t), float32 ``[B]`` (Hang et al. 2023, §3)."""
    a = alphas_cumprod.float()[timesteps.cpu().long()]
    return a / (1 - a)


def min_snr_weight(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float,
                   prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ loss weights ``[B]`` (Hang et al. 2023, Eq. 8; kohya ``apply_snr_weight``).

    ε-prediction: ``min(SNR, γ) / SNR``; v-prediction: ``min(SNR, γ) / (SNR + 1)``.
    """
    s = snr(alphas_cumprod, timesteps)
    m = torch.clamp(s, max=float(gamma))
    return m / (s + 1) if prediction_type == "v_prediction" else m / s


def huber_c_for(cfg: TrainConfig, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Per-sample Huber threshold ``[B]`` float32 (kohya-ss/sd-scripts ``library/train_util.py``
    ``get_huber_threshold_if_needed``).

    ``exponential``: ``huber_scale·exp(−αt)`` with α = −ln(huber_c)/T; ``snr``: ``(1 − c)/(1 + σ_t)² + c`` with
    σ_t = √((1−ᾱ_t)/ᾱ_t) (``huber_scale`` not applied); ``constant``: ``huber_c·huber_scale``.
    """
    t = timesteps.cpu().long()
    if cfg.huber_schedule == "exponential":
        alpha = -math.log(cfg.huber_c) / len(alphas_cumprod)
        return torch.exp(-alpha * t.float()) * cfg.huber_scale
    if cfg.huber_schedule == "snr":
        a = alphas_cumprod.float()[t]
        sigmas = ((1 - a) / a) ** 0.5
        return (1 - cfg.huber_c) / (1 + sigmas) ** 2 + cfg.huber_c
    return torch.full((len(t),), cfg.huber_c * cfg.huber_scale)


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str,
                    huber_c: torch.Tensor | None = None) -> torch.Tensor:
    """Element loss averaged over all but the batch dim → ``[B]`` (kohya ``conditional_loss`` + mean([1,2,3])).

    ``l2``: (p−t)²; ``l1``: |p−t|; ``huber``: 2c(√((p−t)²+c²) − c); ``smooth_l1``: 2(√((p−t)²+c²) − c).
    Source: kohya-ss/sd-scripts ``library/train_util.py`` ``conditional_loss`` (pseudo-Huber loss).
    ``pred`` / ``target`` any shape ``[B, ...]`` (computed in fp32); ``huber_c`` ``[B]`` (see
    :func:`huber_c_for`) is required for ``huber`` / ``smooth_l1``. Raises ``ValueError`` for another
    ``loss_type`` or a missing ``huber_c``.
    """
    pred, target = pred.float(), target.float()
    if loss_type == "l2":
        el = (pred - target) ** 2
    elif loss_type == "l1":
        el = (pred - target).abs()
    elif loss_type not in ("huber", "smooth_l1"):
        raise ValueError(f"loss_type must be l2, l1, huber or smooth_l1, not {loss_type!r}")
    elif huber_c is None:
        raise ValueError(f"loss_type {loss_type!r} needs huber_c (see huber_c_for)")
    else:
        c = huber_c.to(pred.device).view(-1, *([1] * (pred.dim() - 1)))
        root = torch.sqrt((pred - target) ** 2 + c ** 2) - c
        el = 2 * c * root if loss_type == "huber" else 2 * root
    return el.mean(dim=tuple(range(1, el.dim())))


def sdxl_size_ids(entries: Sequence, flipped: Sequence[bool] | None = None) -> torch.Tensor:
    """SDXL size conditioning ``[B, 6]`` float32 for dataset entries, as kohya-ss/sd-scripts
    ``library/train_util.py`` builds ``original_sizes_hw`` / ``crop_top_lefts`` / ``target_sizes_hw`` (the
    ``BaseDataset.__getitem__`` block around line 1683 at commit 48d368f):

    * original size = the image file's ``(h, w)``; target size = the bucket's ``(h, w)``;
    * crop (top, left) = kohya ``BucketManager.get_crop_ltrb(bucket_reso, original_size)`` (line 349): the
      offsets of the image fitted *inside* the bucket, Stability AI's convention; for a flipped image the left
      offset is ``bucket_w − crop_right``.

    ``entries``: objects with ``size`` (w, h) and ``bucket_reso`` (w, h) in pixels (:class:`.dataset.ImageEntry`);
    ``flipped``: per entry, whether the flipped latents were used (default none).
    """
    rows_o, rows_c, rows_t = [], [], []
    for i, e in enumerate(entries):
        (iw, ih), (bw, bh) = e.size, e.bucket_reso
        bucket_ar, image_ar = bw / bh, iw / ih
        if bucket_ar > image_ar:
            rw, rh = bh * image_ar, bh
        else:
            rw, rh = bw, bw / image_ar
        left, top = (bw - rw) // 2, (bh - rh) // 2
        if flipped is not None and flipped[i]:
            left = bw - (left + rw)
        rows_o.append((ih, iw))
        rows_c.append((int(top), int(left)))
        rows_t.append((bh, bw))
    return size_ids(rows_o, rows_c, rows_t)


def diffusion_loss(host: DiffusionHost, latents: torch.Tensor, cond: Conditioning | torch.Tensor, cfg: TrainConfig,
                   generator: torch.Generator, timesteps: torch.Tensor | None = None,
                   autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
                   loss_weights: torch.Tensor | None = None) -> torch.Tensor:
    """One batch's scalar training loss by the objective of the host's family (:func:`.objective.objective_for`:
    :func:`ddpm_loss` for SD1/SD2/SDXL, :class:`.objective.FlowObjective` for Flux); arguments as
    :func:`ddpm_loss` (``timesteps``: integer t, or float σ for a flow family)."""
    return objective_for(host).loss(host, latents, cond, cfg, generator, timesteps=timesteps, autocast=autocast,
                                    loss_weights=loss_weights)


def ddpm_loss(host: DiffusionHost, latents: torch.Tensor, cond: Conditioning | torch.Tensor, cfg: TrainConfig,
              generator: torch.Generator, timesteps: torch.Tensor | None = None,
              autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
              loss_weights: torch.Tensor | None = None) -> torch.Tensor:
    """One batch's scalar DDPM training loss in the host's own parameterization (see module docstring).

    Args:
        latents: scaled VAE latents ``[B, C, h, w]`` fp32 (any device).
        cond: the batch's :class:`~..conditioning.Conditioning` (or a bare SD1/SD2 context ``[B, 77, D]``).
        generator: CPU generator for noise, noise offset and timesteps (consumed in that order).
        timesteps: fixed integer timesteps ``[B]`` (validation); otherwise uniform in [min_t, max_t).
        autocast: factory of the mixed-precision context the prediction runs in (``None``: none).
        loss_weights: per-sample weights ``[B]`` (kohya's ``prior_loss_weight`` for regularization images).

    Returns a 0-d fp32 tensor on the host's device: mean over the batch of :func:`per_sample_loss`, times
    kohya's loss post-processing (min-SNR-γ, v-pred scaling, debiased estimation: :func:`.noise.post_process_loss`).
    Noise, its options (offset, adaptive, random strength, multires, input perturbation) and the timesteps come
    from :func:`.noise.sample_training_noise`; ``min_timestep >= max_timestep`` trains at ``max_timestep``.

    Raises:
        ValueError: a timestep bound outside ``[0, T]`` (see :func:`.noise.sample_timesteps`).
    """
    ac = host.alphas_cumprod
    T = len(ac)
    # kohya's noise options and timesteps (training/lora/noise.py, train_util.get_noise_noisy_latents_and_timesteps)
    noise, input_noise, timesteps = sample_training_noise(latents.float().cpu(), noise_options(cfg), generator, T,
                                                          timesteps)
    x0 = latents.float().cpu()
    x_t = add_noise(x0, input_noise, timesteps, ac)
    target = prediction_target(x0, noise, timesteps, ac, host.prediction_type)
    dev = host.device
    ctx = autocast() if autocast is not None else contextlib.nullcontext()
    with ctx:
        pred = host.predict(x_t.to(dev, host.dtype), timesteps.to(dev), cond)
    hc = huber_c_for(cfg, timesteps, ac) if cfg.loss_type in ("huber", "smooth_l1") else None
    loss = per_sample_loss(pred, target.to(pred.device), cfg.loss_type, hc)
    if loss_weights is not None:  # kohya batch["loss_weights"]: prior_loss_weight for regularization images
        loss = loss * loss_weights.to(loss.device, loss.dtype)
    loss = post_process_loss(loss, timesteps, ac, v_prediction=host.prediction_type == "v_prediction",
                             min_snr_gamma=cfg.min_snr_gamma,
                             scale_v_pred_loss_like_noise_pred=cfg.scale_v_pred_loss_like_noise_pred,
                             v_pred_like_loss=cfg.v_pred_like_loss,
                             debiased_estimation_loss=cfg.debiased_estimation_loss)
    return loss.mean()
