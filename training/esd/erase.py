"""ESD concept erasure (Gandikota et al., "Erasing Concepts from Diffusion Models", ICCV 2023), host-neutral.

Objective (paper, Eq. 3–4): fine-tune θ so that the prediction for the concept ``c`` follows the frozen model's
*negatively guided* prediction::

    ε_θ(x_t, c, t)  →  ε_θ*(x_t, ∅, t) − η · (ε_θ*(x_t, c, t) − ε_θ*(x_t, ∅, t))        (paper convention, η = 1)

with θ* the frozen original weights and ``negative_guidance`` η. The reference repository's newer script
(rohitgandikota/erasing, ``esd_sd.py``) writes the same target as
``ε*(x_t, c, t) − η_ref · (ε*(x_t, c, t) − ε*(x_t, ∅, t))`` with default η_ref = 2: expanding gives
``ε*(∅) − (η_ref − 1)(ε*(c) − ε*(∅))``, so **η = η_ref − 1** (η_ref 2 ≡ η 1). This module uses the paper's
convention everywhere; :func:`reference_target` and :func:`paper_eta_from_reference` give the other.

One model copy: the trainable parameters are :class:`~..host.FullDelta` modules installed on the host
(``host.install_delta``); the frozen predictions ε_θ* are the same host inside ``host.deltas_disabled()``. The
reference keeps two UNets (frozen + trained) in memory.

Which reference each variant follows (rohitgandikota/erasing; "esd_sd.py" is the current diffusers script,
"train-esd.py" the 2023 CompVis code in ``oldcode_erasing_compvis/train-scripts/``, removed from the repo in
commit d654ed4):

* Parameter sets, over the canonical diffusers UNet module paths (:mod:`..host`), are ``esd_sd.py``'s
  ``get_esd_trainable_parameters`` (lines 24–49):

  * ``esd-x``: every cross-attention (``attn2``) Linear — to_q, to_k, to_v, to_out.0 weights and every bias
    (SD1.x: 16 blocks × 5 = 80 tensors, 43,962,560 parameters); the same tensors as train-esd.py's ``xattn``;
  * ``esd-x-strict``: attn2 to_k and to_v only;
  * ``esd-u``: every Linear / Conv2d outside attn2 (esd_sd.py's ``esd-u``; ~816 M parameters on SD1.x: the
    fp32 deltas plus Adam's two moments need ≈ 13 GB — prefer a GPU). This is **not** the paper's / train-esd.py's
    ``noxattn``, which trains every *parameter* outside attn2 except ``time_embed`` and ``out.`` (norms
    included, via ``named_parameters``);
  * ``esd-all``: every Linear / Conv2d (esd_sd.py's ``esd-all``; train-esd.py's ``full`` also trains norms).

* The objective is Eq. 3–4 in the paper's η convention; ``erase_from`` is esd_sd.py's attribute erasure
  (lines 112–191). esd_sd.py's defaults differ from the paper's (lr 5e-5, 200 iterations, η_ref 2, 1024 px in
  bf16); ours are the paper's.

Where ``x_t`` comes from:

* ``self_sample``: DDIM-sample from the **frozen** model with the concept prompt (the from-prompt with
  ``erase_from``) and ``start_guidance`` for a random number ``k ∈ [0, ddim_steps)`` of steps, then query all
  predictions at that step's timestep. This follows esd_sd.py (which samples with ``base_unet``, the frozen
  copy, at ``pipe.scheduler.timesteps[k]``), except that esd_sd.py samples with the pipeline's own scheduler
  (PNDM for SD1.4) where we use DDIM. The 2023 train-esd.py sampled from the model **being trained** (DDIM) and
  queried at a DDPM timestep drawn uniformly inside the DDIM step's bucket — a different procedure we do not
  reproduce. Costs on average ``ddim_steps`` extra UNet evaluations per iteration.
* ``noised`` (this project's cheaper variant): forward-noise clean latents — VAE-encoded user images, or the frozen
  model's own samples generated once and cached — at a uniformly random timestep ``t ∈ [0, T)``. This is a
  **different method**: ``x_t`` comes from the forward process, not from the model's own sampling trajectory.
  Compare its erasure with ``self_sample`` on your concept; do not assume they are equal.

Flow-matching families (Flux.1; ``families.Family.objective == "flow"``): the same loop and target in velocity
space, ``x_t`` from the flow forward process or the frozen model's Euler trajectory on Flux's schedule, Flux-dev's
distilled guidance on every prediction, masks on 2×2 token patches — :mod:`.objective` (schedule-dependent
parts, with the proof that the velocity-space target is the ε-space one) and :mod:`.params` (the Flux
parameter sets: ``esd-x`` = the double blocks' text-stream attention ``txt_attn.qkv`` / ``txt_attn.proj``).

v-prediction models: the target is computed in the model's own parameterization. Because the target is an
affine combination with weights summing to one ((1+η)·ε_u − η·ε_c) and ε = sqrt(ᾱ)·v + sqrt(1−ᾱ)·x_t is affine
in the output for a fixed x_t, the v-space target *is* the ε-space target expressed in v; the losses differ only by
the per-timestep factor ᾱ_t.

Grid masks (:mod:`.masks`) and prompt variations by concept kind (:mod:`.prompts`) are this project's
extensions: with masks, the loss of an iteration is the weighted sum of the masked means over all masks
(``mask_mode="sum"``, the default; ``"grid-sum"`` is the one-click preset that also builds the 3×3 + centre
grid) or a masked mean over one weighted-sampled mask (``"sample"`` / ``"grid-sample"``).
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from typing import Any, Callable

import torch

from ..conditioning import Conditioning
from .config import MASK_PRESETS, ESDConfig, ESDResult
from .objective import host_family, objective_for, resolve_masks as _resolve_masks  # noqa: F401
from .params import (METHODS, RowsDelta, Target, base_weights_hash, count_parameters,  # noqa: F401
                         make_delta, select_targets)
from ..host import DeltaModule, DiffusionHost
from .masks import masked_mse
from .prompts import (PromptSchedule, build_prompts, concept_kinds, normalize_kind, parse_concepts,
                      parse_prompt_lines, prompt_source)


class ESDCancelled(Exception):
    """Training stopped because the progress callback raised (e.g. ComfyUI's Cancel).

    ``result`` holds what was trained so far (:class:`ESDResult`, ``cancelled=True``); the original exception is
    ``__cause__``.
    """

    def __init__(self, result: "ESDResult"):
        super().__init__(f"ESD erasure cancelled after {result.stats.get('iterations_done', 0)} iterations")
        self.result = result


# -- the objective -------------------------------------------------------------------------------------------

def paper_target(pred_cond: torch.Tensor, pred_uncond: torch.Tensor, negative_guidance: float = 1.0) -> torch.Tensor:
    """ESD target ``ε*(∅) − η·(ε*(c) − ε*(∅))`` (Gandikota et al. 2023, Eq. 4, η = ``negative_guidance``).

    Shapes: ``[B, C, h, w]`` each, frozen-model outputs; returns the same shape (fp32).
    """
    u = pred_uncond.float()
    return u - float(negative_guidance) * (pred_cond.float() - u)


def reference_target(pred_from: torch.Tensor, pred_cond: torch.Tensor, pred_uncond: torch.Tensor,
                     negative_guidance_ref: float = 2.0) -> torch.Tensor:
    """The target as ``esd_sd.py`` (rohitgandikota/erasing, line 191) writes it:
    ``ε*(c_from) − η_ref·(ε*(c) − ε*(∅))``.

    ``pred_from`` is the frozen prediction for the ``--erase_from`` prompt (lines 164–176; the concept's own
    prediction without it). With ``c_from = c`` this equals :func:`paper_target` with ``η = η_ref − 1``.
    Shapes: ``[B, C, h, w]`` each; returns fp32 of the same shape.
    """
    return pred_from.float() - float(negative_guidance_ref) * (pred_cond.float() - pred_uncond.float())


def paper_eta_from_reference(negative_guidance_ref: float) -> float:
    """Convert ``esd_sd.py``'s ``--negative_guidance`` (default 2) to the paper's η (default 1): ``η_ref − 1``."""
    return float(negative_guidance_ref) - 1.0


# -- the loop ------------------------------------------------------------------------------------------------

ProgressFn = Callable[[dict], Any]


def erase(host: DiffusionHost, config: ESDConfig, *, progress: ProgressFn | None = None,
          images: torch.Tensor | None = None, keep_installed: bool = False,
          cancel_check: Callable[[], Any] | None = None) -> ESDResult:
    """Run ESD on ``host`` and return the trained deltas (module docstring for the method).

    Args:
        host: any :class:`~..host.DiffusionHost`; it must have no deltas installed. Its base weights are never
            modified; the deltas are removed at the end unless ``keep_installed``.
        config: :class:`ESDConfig`.
        progress: called after every iteration with ``{"iteration", "total", "loss", "prompt", "erase_from",
            "mask", "timestep", "losses", "x_t"}`` (``x_t``: the iteration's noisy latent ``[1, C, h, w]``;
            ``timestep``: the integer DDPM timestep, or σ as a float on flow families;
            ``erase_from``: the iteration's from-prompt or ``None``).
            Returning ``False`` stops training (result ``cancelled=True``); raising stops
            it and re-raises as :class:`ESDCancelled` carrying the partial result (``__cause__`` = the exception).
        images: optional clean images ``[N, 3, H, W]`` in ``[-1, 1]`` for ``xt_source="noised"`` (VAE-encoded
            once; resized latents must match the training resolution).
        keep_installed: leave the trained deltas installed on the host (e.g. to sample from it).
        cancel_check: called before every UNet evaluation (also inside the DDIM sampling of ``self_sample``);
            raising stops within the iteration (the unfinished iteration is dropped) with :class:`ESDCancelled`.

    Returns:
        :class:`ESDResult`.

    Raises:
        ValueError: bad settings, empty concept, a model without cross-attention, bad masks, or a host that
            already has deltas installed. FloatingPointError: more than ``max_nan_skips`` consecutive
            non-finite losses / gradients (the partial result is on the exception's ``result`` attribute).
        ESDCancelled: the progress callback raised.
    """
    # ComfyUI runs nodes under torch.inference_mode(): training needs autograd, and every tensor made here must
    # be a normal tensor (inference tensors cannot be saved for backward).
    with torch.inference_mode(False):
        return _erase(host, config, progress, None if images is None else images.detach().clone(),
                      keep_installed, cancel_check)


class _CancelRequested(Exception):
    pass


class _CheckedHost:
    """Forwards to a host, calling ``check()`` before every prediction (cancel points inside DDIM sampling)."""

    def __init__(self, host: DiffusionHost, check: Callable[[], Any]):
        self._host, self._check = host, check

    def __getattr__(self, name):
        return getattr(self._host, name)

    def predict(self, *args, **kwargs):
        try:
            self._check()
        except Exception as exc:  # noqa: BLE001 - any raise means "cancel"
            raise _CancelRequested() from exc
        return self._host.predict(*args, **kwargs)


def _erase(host: DiffusionHost, cfg: ESDConfig, progress: ProgressFn | None, images: torch.Tensor | None,
           keep_installed: bool, cancel_check: Callable[[], Any] | None) -> ESDResult:
    cfg.validate()
    if host.installed_deltas():
        raise ValueError("the host already has trainable deltas installed; clear them first")
    concepts = parse_concepts(cfg.concepts)
    froms = parse_prompt_lines(cfg.erase_from)  # attribute erasure: the scene prompt(s)
    kinds = concept_kinds(concepts, cfg.concept_kind, froms or None)
    prompts = build_prompts(concepts, cfg.prompts, cfg.templates, cfg.variations, cfg.seed, kind=kinds)
    mask_mode = MASK_PRESETS.get(cfg.mask_mode, cfg.mask_mode)
    schedule = PromptSchedule(prompts, cfg.prompt_order, cfg.seed)
    fam = host_family(host)
    scale = int(getattr(host, "vae_scale", 8))
    patch = int(fam.patch_size)
    if cfg.width % (scale * patch) or cfg.height % (scale * patch):
        raise ValueError(f"resolution {cfg.width}×{cfg.height} must be a multiple of {scale * patch} px "
                         f"({scale} px per latent cell × {patch}×{patch} latent cells per token)")
    lh, lw = cfg.height // scale, cfg.width // scale
    masks, mask_w, mask_names = _resolve_masks(cfg, (lh, lw), patch)
    objective = objective_for(host, int(cfg.ddim_steps), (lh, lw), cfg.guidance_scale)

    targets = select_targets(host.modules("unet"), cfg.method, arch=getattr(host, "arch", "sd1"))
    n_tensors, n_params = count_parameters(targets)
    base_hash = base_weights_hash(host, targets)
    from ..lora.network import _kohya_name

    kohya_names = {(t.component, t.path): _kohya_name(t.component, t.path, host) for t in targets}

    # `model` is what the loop evaluates: the host itself, or a forwarder that checks for cancel first
    model = _CheckedHost(host, cancel_check) if cancel_check is not None else host
    rng = random.Random(int(cfg.seed))
    gen = torch.Generator("cpu").manual_seed(int(cfg.seed))
    dev = host.device

    cond_cache: dict[str, Conditioning] = {}

    def encode(p: str) -> Conditioning:
        if p not in cond_cache:
            with torch.no_grad():
                cond_cache[p] = Conditioning.wrap(host.encode_prompts([p])).detach()
        return cond_cache[p]

    def pcond(p: str) -> Conditioning:  # what the frozen and trained predictions see (Flux: + guidance)
        return objective.prediction_cond(encode(p))

    uncond = encode("")

    deltas: dict[tuple[str, str, str], DeltaModule] = {}
    losses: list[float] = []
    mask_counts: Counter = Counter()
    nan_skips = 0
    consecutive_nan = 0
    cancelled = False
    started = time.perf_counter()
    done = 0

    def snapshot(final: bool = False) -> ESDResult:
        # every snapshot ends the run; at the normal end (optimizer state already freed) the trained tensors are
        # handed over without a copy unless they stay installed on the host
        with torch.no_grad():
            d = {k: m.delta().detach().float().cpu() for k, m in deltas.items()}
            if not final or keep_installed:
                d = {k: v.clone() for k, v in d.items()}
        wall = time.perf_counter() - started
        last20 = [x for x in losses[-20:] if math.isfinite(x)]
        stats = {
            # skipped (non-finite) iterations are null, so the JSON stays standard
            "losses": [float(x) if math.isfinite(x) else None for x in losses],
            "loss_avg_last_20": (sum(last20) / len(last20)) if last20 else None,
            "iterations_done": done,
            "iterations_planned": int(cfg.iterations),
            "cancelled": cancelled,
            "nan_skipped": nan_skips,
            "mask_usage": {mask_names[i] if i >= 0 else "full": n for i, n in sorted(mask_counts.items())},
            "prompt_usage": dict(schedule.counts),
            "wall_time_s": wall,
            "iterations_per_s": (done / wall) if wall > 0 else None,
            "trained_tensors": n_tensors,
            "trained_parameters": n_params,
        }
        meta = {
            "method": cfg.method,
            "concepts": concepts,
            "concept_kinds": kinds,
            "concept_kind_source": "user" if normalize_kind(cfg.concept_kind) != "auto" else "inferred",
            "prompt_source": prompt_source(cfg.prompts, cfg.templates, cfg.variations),
            "prompts": prompts,
            "erase_from": froms or None,
            "prompt_order": cfg.prompt_order,
            "negative_guidance": float(cfg.negative_guidance),
            "negative_guidance_convention": "paper: target = e(uncond) - eta*(e(cond) - e(uncond)); "
                                            "esd_sd.py --negative_guidance = eta + 1",
            "negative_guidance_esd_sd_py": float(cfg.negative_guidance) + 1.0,
            "xt_source": cfg.xt_source,
            **objective.metadata(cfg),
            "masks": mask_names or ["full"],
            "mask_weights": [float(x) for x in mask_w] if mask_w is not None else [1.0],
            "mask_mode": mask_mode if masks is not None else "full",
            "mask_preset": cfg.mask_mode if cfg.mask_mode in MASK_PRESETS else None,
            "grid_n": cfg.grid_n if isinstance(cfg.masks, str) else None,
            "centre_size": cfg.centre_size if isinstance(cfg.masks, str) else None,
            "iterations": int(cfg.iterations),
            "iterations_done": done,
            "lr": float(cfg.lr),
            "optimizer": "Adam",
            "optimizer_step_in_backward": bool(cfg.step_in_backward),
            "gradient_checkpointing": bool(cfg.gradient_checkpointing),
            "width": int(cfg.width),
            "height": int(cfg.height),
            "start_guidance": float(cfg.start_guidance),
            "ddim_steps": int(cfg.ddim_steps),
            "seed": int(cfg.seed),
            "prediction_type": host.prediction_type,
            "arch": host.arch,
            "model_variant": getattr(host, "variant", None),
            "base_model_hash": base_hash,
            "base_model_hash_kind": "sha256 of the trained tensors' base values" + (
                f" ({host.quantized}-quantized base, dequantized)" if getattr(host, "quantized", None) else ""),
            "trained_tensors": n_tensors,
            "trained_parameters": n_params,
        }
        return ESDResult(d, targets, list(losses), stats, meta, masks, mask_w, list(mask_names), cancelled,
                         kohya_names)

    # noised-source cache of clean latents
    clean_cache: torch.Tensor | None = None

    try:
        with torch.enable_grad():
            for t in targets:
                fd = make_delta(t, device=dev)
                host.install_delta(t.component, t.path, t.attr, fd)
                deltas[(t.component, t.path, t.attr)] = fd
            params = [m.weight for m in deltas.values()]
            step_hooks, bad_grads = [], []
            if cfg.step_in_backward:
                opt = None
                per_param = {p: torch.optim.Adam([p], lr=float(cfg.lr)) for p in params}

                def step_now(p: torch.Tensor) -> None:  # runs inside backward, once p.grad is complete
                    if bool(torch.isfinite(p.grad).all()):
                        per_param[p].step()
                    else:
                        bad_grads.append(p)
                    p.grad = None

                step_hooks = [p.register_post_accumulate_grad_hook(step_now) for p in params]
            else:
                opt = torch.optim.Adam(params, lr=float(cfg.lr))
            if cfg.gradient_checkpointing:
                _set_checkpointing(host, True)

            if cfg.xt_source == "noised":
                with torch.no_grad(), host.deltas_disabled():
                    if images is not None:
                        clean_cache = host.encode_images(images.detach().float().clone())
                        if tuple(clean_cache.shape[-2:]) != (lh, lw):
                            clean_cache = torch.nn.functional.interpolate(clean_cache, size=(lh, lw),
                                                                          mode="bilinear", align_corners=False)
                    else:
                        lat = []
                        for i in range(max(1, int(cfg.noised_cache))):
                            p = froms[i % len(froms)] if froms else prompts[i % len(prompts)]
                            xT = torch.randn((1, host.latent_channels, lh, lw), generator=gen)
                            lat.append(objective.clean_sample(model, xT, encode(p), uncond,
                                                              float(cfg.start_guidance)).float().cpu())
                        clean_cache = torch.cat(lat)

            for it in range(int(cfg.iterations)):
                p_idx, prompt = schedule.next()
                from_prompt = froms[p_idx % len(froms)] if froms else None
                # predictions: the family's prediction conditioning (Flux-dev: + guidance_scale)
                cond = pcond(prompt)
                from_cond = pcond(from_prompt) if froms else None
                # --- x_t (the objective's schedule: DDIM on DDPM families, Euler on the flow schedule) ------
                with torch.no_grad(), host.deltas_disabled():
                    if cfg.xt_source == "self_sample":
                        k = rng.randrange(int(cfg.ddim_steps))
                        xT = torch.randn((1, host.latent_channels, lh, lw), generator=gen)
                        x_t, tt = objective.self_sample(model, xT, encode(from_prompt or prompt), uncond, k,
                                                        float(cfg.start_guidance))
                    else:
                        t_drawn = objective.draw_noised_timestep(rng)
                        x0 = clean_cache[rng.randrange(clean_cache.shape[0])][None]
                        x_t, tt = objective.noised(x0, rng, gen, t_drawn)
                    x_t = x_t.to(dev, host.dtype)
                    tt = tt.to(dev)
                    t_report = objective.timestep_value(tt)
                    # frozen ε*(x_t, c, t) and ε*(x_t, ∅, t) in one batched call
                    frozen = model.predict(torch.cat([x_t, x_t]), torch.cat([tt, tt]),
                                           Conditioning.cat([cond, pcond("")])).float()
                    if from_cond is None:
                        target = paper_target(frozen[:1], frozen[1:], cfg.negative_guidance)
                    else:  # attribute erasure: esd_sd.py's target with the from-prompt's prediction
                        pred_from = model.predict(x_t, tt, from_cond).float()
                        target = reference_target(pred_from, frozen[:1], frozen[1:],
                                                  float(cfg.negative_guidance) + 1.0)
                # --- mask choice -------------------------------------------------------------------------
                if masks is None:
                    mask_idx = -1
                elif mask_mode == "sample":
                    mask_idx = int(torch.multinomial(mask_w, 1, generator=gen).item())
                else:
                    mask_idx = -2
                # --- trained prediction and loss ---------------------------------------------------------
                pred = model.predict(x_t, tt, cond if from_cond is None else from_cond).float()
                if mask_idx == -1:
                    loss = masked_mse(pred, target, None)
                    mask_counts[-1] += 1
                elif mask_idx >= 0:
                    loss = masked_mse(pred, target, masks[mask_idx])
                    mask_counts[mask_idx] += 1
                else:
                    loss = sum(float(mask_w[i]) * masked_mse(pred, target, masks[i])
                               for i in range(masks.shape[0]))
                    for i in range(masks.shape[0]):
                        mask_counts[i] += 1
                if opt is not None:
                    opt.zero_grad(set_to_none=True)
                finite = bool(torch.isfinite(loss))
                if finite:
                    bad_grads.clear()
                    loss.backward()  # with step_in_backward, Adam steps each tensor in here
                    finite = not bad_grads and all(p.grad is None or bool(torch.isfinite(p.grad).all())
                                                   for p in params)
                if not finite:
                    # NaN guard: skip the update; too many in a row means the run diverged
                    nan_skips += 1
                    consecutive_nan += 1
                    if opt is not None:
                        opt.zero_grad(set_to_none=True)
                    if consecutive_nan > int(cfg.max_nan_skips):
                        err = FloatingPointError(
                            f"ESD loss or gradients were NaN/inf {consecutive_nan} iterations in a row (at "
                            f"iteration {it + 1}); lower lr or use fp32 weights")
                        err.result = snapshot()  # type: ignore[attr-defined]
                        raise err
                    loss_value = float("nan")
                else:
                    consecutive_nan = 0
                    if opt is not None:
                        opt.step()
                    loss_value = float(loss.detach())
                losses.append(loss_value)
                done = it + 1
                if progress is not None:
                    info = {"iteration": done, "total": int(cfg.iterations), "loss": loss_value,
                            "prompt": prompt, "erase_from": from_prompt, "timestep": t_report, "losses": losses,
                            "x_t": x_t.detach(),
                            "mask": "full" if mask_idx == -1 else ("all" if mask_idx == -2 else
                                                                   mask_names[mask_idx])}
                    try:
                        ret = progress(info)
                    except Exception as exc:  # noqa: BLE001 - any raise from the callback means "cancel"
                        cancelled = True
                        raise ESDCancelled(snapshot()) from exc
                    if ret is False:
                        cancelled = True
                        break
            # free the gradients and Adam's moments before the result is assembled (no peak at the end)
            for h in step_hooks:
                h.remove()
            for p in params:
                p.grad = None
            opt = per_param = None  # noqa: F841
        return snapshot(final=True)
    except _CancelRequested as req:
        cancelled = True
        raise ESDCancelled(snapshot()) from req.__cause__
    finally:
        if cfg.gradient_checkpointing and hasattr(host, "set_gradient_checkpointing"):
            host.set_gradient_checkpointing(False)
        if not keep_installed:
            host.clear_deltas()


def _set_checkpointing(host: DiffusionHost, on: bool) -> None:
    """``host.set_gradient_checkpointing(on)``; ``ValueError`` for a host that has no such switch."""
    fn = getattr(host, "set_gradient_checkpointing", None)
    if fn is None:
        raise ValueError(f"gradient_checkpointing: {type(host).__name__} cannot checkpoint its denoiser")
    fn(bool(on))


def erased_weights(host: DiffusionHost, result: ESDResult) -> dict[str, torch.Tensor]:
    """``{"<component>.<path>.<attr>": base + ΔW}`` (fp32 CPU) for every trained tensor — the erased model's
    values. The host must have no deltas installed (its weights are the base weights; a quantized base is
    dequantized)."""
    from ..quantize import dense

    out = {}
    for (c, p, a), d in result.deltas.items():
        base = dense(getattr(host.modules(c)[p], a)).detach().float().cpu()
        out[f"{c}.{p}.{a}"] = base + d
    return out
