"""ESD's schedule-dependent parts — where ``x_t`` comes from, at which timestep the predictions are queried, and
which conditioning extras they carry — for each training objective of the family table
(:attr:`..families.Family.objective`): ``"ddpm"`` (SD1.x / SD2.x / SDXL) and ``"flow"`` (Flux.1). The loop in
:mod:`.erase` asks :func:`objective_for` for one object and never looks at the family name.

**ESD in velocity space.** For rectified flow (``x_σ = (1 − σ)·x0 + σ·ε``, target ``v = ε − x0``) the ESD target
is written in the model's own output::

    v_target = v*(x_σ, ∅, σ) − η·(v*(x_σ, c, σ) − v*(x_σ, ∅, σ))            (frozen model v*, deltas disabled)

and the trained prediction ``v_θ(x_σ, c, σ)`` is regressed on it. For a fixed ``x_σ`` and σ this *is* the ε-space
objective of the paper (Gandikota et al. 2023, Eq. 3–4): eliminating x0 from the two relations gives
``ε = x_σ + (1 − σ)·v``, an affine map of the output with slope ``(1 − σ)`` and the same offset ``x_σ`` for every
prediction at that point. The target is an affine combination whose weights sum to one (``(1 + η)·v*(∅) −
η·v*(c)``), so mapping each prediction to ε and combining gives the map of the combined velocity:
``ε_target = x_σ + (1 − σ)·v_target``, and ``ε_θ − ε_target = (1 − σ)·(v_θ − v_target)``. The two losses have the
same minimiser at every (x_σ, σ); the ε loss is the velocity loss weighted by ``(1 − σ)²``. We keep the velocity
loss (the model's own parameterization, as the UNet path keeps v-prediction models in v; kohya's Flux trainer
also regresses raw velocity, ``model_prediction_type = "raw"``), which weighs high-noise steps more than the
ε-space loss would.

**Flux-dev's distilled guidance.** Flux.1-dev has no classifier-free guidance at sampling time: the guidance scale
``g`` is an *input* (``extras["guidance"]``, a timestep-like embedding) and the distilled network's output
approximates the CFG combination ``v_u + g·(v_c − v_u)`` of an undistilled teacher. All three predictions of an
iteration (frozen ``v*(c)``, frozen ``v*(∅)`` and the trained ``v_θ(c)``) use the same ``guidance_scale``
(default: the family's sampling default, 3.5, ComfyUI's ``FluxGuidance`` / diffusers' ``FluxPipeline``). Then
``v*_g(∅) ≈ v_u`` (the empty prompt has nothing to amplify) and ``v*_g(c) − v*_g(∅) ≈ g·(v_c − v_u)``, so the
target is ``≈ v_u − η·g·(v_c − v_u)`` — the same negative direction an SD model erased with η reaches when it is
sampled at CFG ``g`` (ε_u + g·(ε'_c − ε_u) with ε'_c → ε_u − η(ε_c − ε_u)); and the erased network is trained at
the guidance it will be sampled with, since the guidance embedding modulates every block and an erasure learned
at one value need not carry to another. The public Flux ports of ``esd_sd.py`` query the predictions at guidance 1
(and sample ``x_t`` at 3.5); EraseAnything uses 3 for both. The trajectory of ``self_sample`` uses
``start_guidance`` as its guidance embedding (the distilled model needs one prediction per step, no CFG); flow
families without a guidance embedding (``guidance_default`` ``None``) would use real CFG with ``start_guidance``.
Models without the embedding (Flux.1-schnell) ignore the value (hosts' contract, :mod:`..host`).

**Flow schedule.** ``self_sample`` runs the frozen model's Euler sampler (``x ← x + (σ_{i+1} − σ_i)·v``) for a
random number ``k ∈ [0, steps)`` of steps on Flux's schedule — BFL ``flux/sampling.py`` ``get_schedule``:
``linspace(1, 0, steps + 1)`` shifted by ``time_shift(mu, 1, ·)`` with ``mu`` linear in the packed sequence length
(0.5 at 256 tokens → 1.15 at 4096; :func:`..flow.flux_mu`), unshifted for models without guidance embedding
(schnell, ``shift = name != "flux-schnell"`` there) — and queries the predictions at ``σ_k``. ``noised`` draws σ
from kohya's ``flux_shift`` distribution (:func:`..flow.sample_sigmas`) and forward-noises with
:func:`..flow.noisy_input`.

**Grid masks on patches.** Flux's latent is 16 channels at 1/8 of the image side and the DiT reads 2×2 latent
cells as one token (``Family.patch_size``), so one token is a 16×16-pixel square. A loss mask that split a token
would ask for different targets inside one token's output — not something the model can represent separately —
so masks are made on the token grid and each token cell is then repeated over its 2×2 latent cells: grid cell
boundaries fall on token boundaries (``round(i·(h/2)/n)`` tokens), and user masks are averaged over each 2×2
patch. Training sizes must be multiples of ``vae_scale · patch_size`` (16 px for Flux).
"""

from __future__ import annotations

import random
from typing import Any

import torch
import torch.nn.functional as F

from ..conditioning import Conditioning
from ..families import FAMILIES, Family
from ..host import DiffusionHost, add_noise, ddim_sample, ddim_timesteps


class DDPMObjective:
    """Discrete DDPM schedule (ε / v models): DDIM trajectories of ``steps`` steps, integer timesteps."""

    kind = "ddpm"

    def __init__(self, host: DiffusionHost, fam: Family, steps: int, latent_hw: tuple[int, int]):
        self.host = host
        self.steps = int(steps)
        self.T = int(host.alphas_cumprod.shape[0])
        self.ts = ddim_timesteps(self.T, self.steps)

    def prediction_cond(self, cond: Conditioning) -> Conditioning:
        """The conditioning the frozen and trained predictions use (unchanged for DDPM families)."""
        return cond

    def self_sample(self, model, xT: torch.Tensor, cond: Conditioning, uncond: Conditioning, k: int,
                    start_guidance: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``k`` DDIM steps from ``xT`` with CFG ``start_guidance``; returns ``(x_t, timesteps [1] long)``."""
        x = ddim_sample(model, xT, cond, uncond, steps=self.steps, cfg=float(start_guidance), stop_at=k)
        return x, torch.tensor([self.ts[k]], dtype=torch.long)

    def clean_sample(self, model, xT: torch.Tensor, cond: Conditioning, uncond: Conditioning,
                     start_guidance: float) -> torch.Tensor:
        """A full DDIM sample (clean latent ``[1, C, h, w]``)."""
        return ddim_sample(model, xT, cond, uncond, steps=self.steps, cfg=float(start_guidance))

    def noised(self, x0: torch.Tensor, rng: random.Random, gen: torch.Generator,
               t_drawn: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``x_t = add_noise(x0, ε, t)`` at the uniformly drawn integer ``t_drawn``; returns ``(x_t, t [1])``."""
        noise = torch.randn(x0.shape, generator=gen)
        tt = torch.tensor([t_drawn])
        return add_noise(x0, noise, tt, self.host.alphas_cumprod), tt.long()

    def draw_noised_timestep(self, rng: random.Random) -> int:
        """Uniform ``t ∈ [0, T)`` (drawn before the clean latent, as the loop always has)."""
        return rng.randrange(self.T)

    def timestep_value(self, tt: torch.Tensor) -> int:
        """The iteration's timestep for progress reports (integer index)."""
        return int(tt[0])

    def metadata(self, cfg) -> dict[str, Any]:
        """Schedule facts for metadata.json."""
        return {"objective": "ddpm",
                "xt_sampler": ("DDIM from the frozen model (esd_sd.py samples from the frozen model with the "
                               "pipeline's PNDM)") if cfg.xt_source == "self_sample" else "forward noise (add_noise)"}


class FlowObjective:
    """Rectified flow (Flux.1): Euler trajectories on Flux's shifted schedule, float sigmas, distilled guidance.

    See the module docstring for the formulation. ``steps``: Euler steps of a full trajectory (``ddim_steps``).
    """

    kind = "flow"

    def __init__(self, host: DiffusionHost, fam: Family, steps: int, latent_hw: tuple[int, int],
                 guidance_scale: float | None = None):
        from ..flow import flux_mu, time_shift

        self.host = host
        self.fam = fam
        self.steps = int(steps)
        self.guidance = (float(guidance_scale) if guidance_scale is not None else fam.guidance_default)
        self.has_guidance_embed = fam.guidance_default is not None and has_guidance_embedding(host)
        if guidance_scale is not None and not self.has_guidance_embed:
            raise ValueError(f"guidance_scale {guidance_scale}: this {fam.arch} model has no guidance embedding "
                             f"(Flux.1-schnell); remove the setting")
        self.shift = self.has_guidance_embed
        s = torch.linspace(1.0, 0.0, self.steps + 1, dtype=torch.float64)
        if self.shift:
            s = time_shift(flux_mu(*latent_hw), 1.0, s)
        self.sigmas = s.float()
        self.latent_hw = tuple(latent_hw)

    def _with_guidance(self, cond: Conditioning, g: float | None) -> Conditioning:
        if g is None or self.fam.guidance_default is None:
            return cond
        return cond.with_extras(guidance=torch.full((len(cond),), float(g)))

    def prediction_cond(self, cond: Conditioning) -> Conditioning:
        """``cond`` with ``extras["guidance"] = guidance_scale`` (every frozen and trained prediction)."""
        return self._with_guidance(cond, self.guidance)

    @torch.no_grad()
    def _euler(self, model, x: torch.Tensor, cond: Conditioning, uncond: Conditioning, n: int,
               start_guidance: float) -> torch.Tensor:
        # Flux's sampler is plain Euler on the sigma grid (BFL flux/sampling.py denoise); a one-line update, not
        # worth a scheduler object.
        x = x.to(self.host.device, torch.float32)
        distilled = self.fam.guidance_default is not None
        c = self._with_guidance(cond, start_guidance) if distilled else cond
        u = uncond
        for i in range(n):
            s, s_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
            tt = torch.full((x.shape[0],), s, device=self.host.device, dtype=torch.float32)
            xin = x.to(self.host.dtype)
            if distilled or start_guidance == 1.0:
                v = model.predict(xin, tt, c).float()
            else:  # a flow family without a guidance embedding: real classifier-free guidance
                vc = model.predict(xin, tt, c).float()
                vu = model.predict(xin, tt, u).float()
                v = vu + float(start_guidance) * (vc - vu)
            x = x + (s_next - s) * v
        return x

    def self_sample(self, model, xT: torch.Tensor, cond: Conditioning, uncond: Conditioning, k: int,
                    start_guidance: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``k`` Euler steps of the frozen model from ``xT`` (σ = 1); returns ``(x_σk, σ_k [1] float32)``."""
        x = self._euler(model, xT, cond, uncond, k, start_guidance)
        return x, self.sigmas[k:k + 1].clone()

    def clean_sample(self, model, xT: torch.Tensor, cond: Conditioning, uncond: Conditioning,
                     start_guidance: float) -> torch.Tensor:
        """A full Euler sample to σ = 0 (clean latent ``[1, C, h, w]``)."""
        return self._euler(model, xT, cond, uncond, self.steps, start_guidance)

    def draw_noised_timestep(self, rng: random.Random) -> None:
        """Flow σ is drawn from the torch generator in :meth:`noised` (kohya's order); nothing from ``rng``."""
        return None

    def noised(self, x0: torch.Tensor, rng: random.Random, gen: torch.Generator,
               t_drawn=None) -> tuple[torch.Tensor, torch.Tensor]:
        """σ from kohya's ``flux_shift`` sampling, then ``(1 − σ)·x0 + σ·ε``; returns ``(x_σ, σ [1])``."""
        from ..flow import noisy_input, sample_sigmas

        sig, _ = sample_sigmas(1, self.latent_hw, gen, timestep_sampling="flux_shift")
        noise = torch.randn(x0.shape, generator=gen)
        return noisy_input(x0, noise, sig), sig

    def timestep_value(self, tt: torch.Tensor) -> float:
        """The iteration's σ for progress reports."""
        return float(tt[0])

    def metadata(self, cfg) -> dict[str, Any]:
        """Schedule and guidance facts for metadata.json."""
        return {"objective": "flow", "target_space": "velocity (raw flow prediction)",
                "guidance_scale": self.guidance if self.has_guidance_embed else None,
                "guidance_note": ("distilled guidance embedding: frozen and trained predictions at guidance_scale; "
                                  "x_t trajectory at start_guidance") if self.has_guidance_embed
                else "model without guidance embedding: guidance not used",
                "sigma_schedule": "Flux get_schedule (shifted)" if self.shift else "linear (unshifted)",
                "xt_sampler": ("Euler from the frozen model on the Flux schedule" if cfg.xt_source == "self_sample"
                               else "forward flow noise at sigma ~ kohya flux_shift")}


def host_family(host: DiffusionHost) -> Family:
    """The family table entry of ``host.arch``; a host whose architecture is ``"unknown"`` (ComfyHost on a UNet
    ComfyUI does not classify) is treated as a DDPM UNet, as the hosts themselves treat it."""
    return FAMILIES.get(getattr(host, "arch", "sd1")) or FAMILIES["sd1"]


def has_guidance_embedding(host: DiffusionHost) -> bool:
    """Whether the host's model reads the distilled guidance (Flux.1-dev: a ``guidance_in`` MLP; schnell has
    none). Read from the module tree (BFL paths, the same in every host); hosts that expose no modules count as
    having one."""
    try:
        paths = host.modules("unet")
    except Exception:  # noqa: BLE001 - a host without a module listing: assume the family default
        return True
    return any(p.startswith("guidance_in.") for p in paths)


def objective_for(host: DiffusionHost, steps: int, latent_hw: tuple[int, int],
                  guidance_scale: float | None = None):
    """The objective object of the host's family (``families.family(host.arch).objective``).

    Raises ``ValueError`` for an unknown objective, or a ``guidance_scale`` on a family without a guidance
    embedding (it would be silently ignored).
    """
    fam = host_family(host)
    if fam.objective == "ddpm":
        if guidance_scale is not None:
            raise ValueError(f"guidance_scale is the distilled-guidance input of guidance-embedded flow models "
                             f"(Flux.1-dev); this {fam.arch} model has none — use start_guidance for the "
                             f"sampling CFG")
        return DDPMObjective(host, fam, steps, latent_hw)
    if fam.objective == "flow":
        if guidance_scale is not None and fam.guidance_default is None:
            raise ValueError(f"guidance_scale: the {fam.arch} family has no guidance embedding")
        return FlowObjective(host, fam, steps, latent_hw, guidance_scale)
    raise ValueError(f"ESD has no objective {fam.objective!r} (family {fam.arch})")


def patch_masks(masks: torch.Tensor, patch: int) -> torch.Tensor:
    """Make ``[M, h, w]`` masks constant on each ``patch × patch`` block (the mean over the block), so every DiT
    token sees one weight. ``patch == 1`` returns ``masks``. Raises ``ValueError`` when ``h``/``w`` are not
    multiples of ``patch``."""
    if patch == 1:
        return masks
    h, w = masks.shape[-2:]
    if h % patch or w % patch:
        raise ValueError(f"mask size {h}×{w} is not a multiple of the {patch}×{patch} patch")
    pooled = F.avg_pool2d(masks.unsqueeze(1).float(), patch).squeeze(1)
    return pooled.repeat_interleave(patch, -2).repeat_interleave(patch, -1)


def grid_on_patches(latent_hw: tuple[int, int], patch: int, n: int, centre_size: float):
    """:func:`.masks.grid_masks` built on the token grid (``h/patch × w/patch``) and repeated over each token's
    ``patch × patch`` latent cells: every cell boundary falls on a token boundary. Returns ``(masks [M, h, w],
    names)``."""
    from .masks import grid_masks

    h, w = latent_hw
    m, names = grid_masks(h // patch, w // patch, n, centre_size)
    if patch > 1:
        m = m.repeat_interleave(patch, -2).repeat_interleave(patch, -1)
    return m, names


def resolve_masks(cfg, latent_hw: tuple[int, int], patch: int = 1):
    """``(masks [M, h, w] | None, weights [M] | None, names)`` for an :class:`.config.ESDConfig` at the latent size,
    on ``patch × patch`` tokens (module docstring). Raises ``ValueError`` for bad masks or weights."""
    from .config import MASK_PRESETS
    from .masks import normalize_weights, prepare_masks

    # patch > 1 (Flux's 2x2 tokens): grids are built on the token grid, user masks averaged per token
    # (esd_objective module docstring, "Grid masks on patches")
    if cfg.mask_mode in MASK_PRESETS:
        m, names = grid_on_patches(latent_hw, patch, cfg.grid_n, cfg.centre_size)
        return m, normalize_weights(cfg.mask_weights, m), names
    if cfg.masks is None or (isinstance(cfg.masks, str) and cfg.masks.lower() in ("", "none", "full")):
        return None, None, []
    if isinstance(cfg.masks, str):
        if cfg.masks.lower() != "grid":
            raise ValueError(f"masks must be None, 'grid' or a [M, H, W] tensor, not {cfg.masks!r}")
        m, names = grid_on_patches(latent_hw, patch, cfg.grid_n, cfg.centre_size)
    else:
        m = patch_masks(prepare_masks(torch.as_tensor(cfg.masks), latent_hw), patch)
        names = [f"m{i}" for i in range(m.shape[0])]
    w = normalize_weights(cfg.mask_weights, m)
    return m, w, names
