"""LoRA extraction (base vs fine-tune checkpoint) and LoRA resizing by truncated SVD, with kohya's semantics.

* :func:`factorize` — one weight delta ``ΔW [out, in(, kh, kw)]`` → kohya LoRA factors
  ``lora_down [r, in(, kh, kw)]``, ``lora_up [out, r(, 1, 1)]``, ``alpha`` such that
  ``up @ down · alpha / r = U_r S_r V_rᵀ`` (times ``scale``). By Eckart–Young the truncated SVD is the best rank-r
  approximation in Frobenius norm; the *energy kept* is ``Σ_{i≤r} s_i² / Σ_i s_i²`` (0..1).
  The singular values are split ``√S`` to each side (as :mod:`..esd.outputs` does), which keeps both factors in
  the same range in fp16; kohya puts all of ``S`` into ``lora_up`` — ΔW is the same.
* :func:`choose_rank` — the rank rule: a fixed rank, ``energy`` (the smallest r keeping that fraction of
  ‖ΔW‖²_F), or kohya's dynamic methods ``sv_ratio`` / ``sv_fro`` / ``sv_cumulative`` reproduced exactly from
  kohya-ss/sd-scripts ``networks/resize_lora.py`` (``index_sv_ratio`` / ``index_sv_fro`` / ``index_sv_cumulative``
  and ``rank_resize``, lines 59-196). Note kohya's rule keeps one singular value more than the target needs
  (``index + 1`` after an index that is already a count), so ``sv_fro 0.9`` keeps ≥ 0.9 of the Frobenius norm with
  one extra component; ``energy`` is the exact minimal rank.
* :func:`extract_lora` — two single-file checkpoints (SD1 / SD2 / SDXL, LDM layout as CheckpointSave writes) →
  kohya LoRA modules, over the modules kohya's ``networks/lora.py`` targets: every Linear / 1×1 conv inside the
  UNet transformer blocks (``attn1/attn2 to_q/to_k/to_v/to_out.0``, ``ff``, ``proj_in/proj_out``), with
  ``conv_rank > 0`` also the ResNet / down- / up-sampler layers (3×3 convs at ``conv_rank``; ``time_emb_proj`` and
  1×1 ``conv_shortcut`` at ``rank``, as kohya's ``conv_dim``), and the text encoders' ``q/k/v/out_proj`` and
  ``fc1/fc2``. As kohya's ``extract_lora_from_models.py`` (lines 120-140), the text encoder is left out when no
  module of it differs by more than ``min_diff`` (the fine-tune did not train it). Unlike kohya, factors are not
  clamped to a 0.99 quantile (kohya's default ``clamp_quantile``), so the LoRA at full rank *is* the difference.
* :func:`resize_lora` — an existing LoRA (kohya ``lora_down``/``lora_up``/``alpha`` or peft ``lora_A``/``lora_B``)
  → a lower rank. ``up @ down`` has rank ≤ r, so its SVD is taken through thin QR factors of both (an r×r SVD,
  exact, instead of an ``out × in`` one). As kohya, 4-D (conv) modules use ``conv_rank``, the new
  ``alpha = scale · new_rank`` with ``scale = alpha / old_rank`` (so ΔW is kept), and keys that are not LoRA
  pairs are copied unchanged.

No library does checkpoint-pair extraction or kohya's dynamic resize as a function (kohya's scripts are CLI
programs that load full pipelines; peft has no SVD resize), hence this module; the SVD is ``torch.linalg.svd``.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

RANK_MODES = ("fixed", "energy", "sv_ratio", "sv_fro", "sv_cumulative")
MIN_SV = 1e-6  # kohya resize_lora.py MIN_SV: a delta whose largest singular value is below this is "zero"

_TE_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
_ATTN_RE = re.compile(r"(?:^|\.)attentions\.\d+\.")
_CONV_RE = re.compile(r"(?:^|\.)(?:resnets\.\d+\.(?:conv1|conv2|conv_shortcut|time_emb_proj)|"
                      r"downsamplers\.0\.conv|upsamplers\.0\.conv)$")
_TES = {"sd1": ("te",), "sd2": ("te",), "sdxl": ("te1", "te2")}
_ARCH_SPEC = {"sd1": ("sd_v1", "stable-diffusion-v1/lora"), "sd2": ("sd_v2", "stable-diffusion-v2/lora"),
              "sdxl": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora")}


# ---------------------------------------------------------------------------------------------------------------
# rank rules and factorisation
# ---------------------------------------------------------------------------------------------------------------
def choose_rank(S: torch.Tensor, rank: int, mode: str = "fixed", param: float | None = None) -> int:
    """Rank to keep for singular values ``S`` (1-D, descending, ≥ 0).

    Args:
        S: singular values of the (scaled) delta.
        rank: the fixed rank (``mode="fixed"``) or the upper limit for the other modes (≥ 1).
        mode: ``"fixed"`` | ``"energy"`` (smallest r with ``Σ_{i≤r} s_i²/Σ s_i² ≥ param``, param in (0, 1]) |
            ``"sv_ratio"`` (keep s_i > s_0/param, param ≥ 1) | ``"sv_fro"`` (Frobenius-norm fraction param in
            (0, 1]) | ``"sv_cumulative"`` (fraction of Σ s_i, param in (0, 1]); the ``sv_*`` rules are kohya's
            (``networks/resize_lora.py`` ``rank_resize``), including its one extra component.

    Returns:
        ``1 ≤ r ≤ min(rank, len(S))``; 1 for a zero delta (``s_0 ≤ 1e-6``, as kohya).

    Raises ``ValueError`` for an unknown mode, ``rank < 1``, or a parameter out of range.
    """
    rank = int(rank)
    if rank < 1:
        raise ValueError(f"rank must be ≥ 1, got {rank}")
    if mode not in RANK_MODES:
        raise ValueError(f"unknown rank mode {mode!r}; use one of {', '.join(RANK_MODES)}")
    n = int(S.numel())
    if n == 0:
        raise ValueError("no singular values")
    if mode != "fixed":
        if param is None or not math.isfinite(float(param)):
            raise ValueError(f"rank mode {mode!r} needs a finite parameter")
        param = float(param)
        if mode == "sv_ratio" and param < 1.0:
            raise ValueError(f"sv_ratio is the ratio s_max/s_min to keep (≥ 1), got {param}")
        if mode in ("energy", "sv_fro", "sv_cumulative") and not 0.0 < param <= 1.0:
            raise ValueError(f"{mode} is a fraction in (0, 1], got {param}")
    S = S.double()
    if float(S[0]) <= MIN_SV:
        return 1
    if mode == "fixed":
        r = rank
    elif mode == "energy":
        cum = torch.cumsum(S ** 2, 0) / float((S ** 2).sum())
        r = int(torch.searchsorted(cum, torch.tensor(param - 1e-12, dtype=cum.dtype))) + 1
    else:
        if mode == "sv_ratio":
            idx = int((S > S[0] / param).sum())
        elif mode == "sv_fro":
            cum = torch.cumsum(S ** 2, 0) / float((S ** 2).sum())
            idx = int(torch.searchsorted(cum, torch.tensor(param ** 2, dtype=cum.dtype))) + 1
        else:
            cum = torch.cumsum(S, 0) / float(S.sum())
            idx = int(torch.searchsorted(cum, torch.tensor(param, dtype=cum.dtype))) + 1
        r = max(1, min(idx, n - 1)) + 1
    return max(1, min(r, rank, n))


@dataclass
class Factor:
    """One module's LoRA factors and what the truncation kept.

    ``down`` [r, in] or [r, in, kh, kw], ``up`` [out, r] or [out, r, 1, 1] (float32, CPU), ``alpha`` (float);
    ``energy_kept`` = Σ_{i≤r} s_i²/Σ s_i² (0..1), ``fro_retained`` = √energy_kept (kohya's "fro retained"),
    ``sum_retained`` = Σ_{i≤r} s_i/Σ s_i, ``full_rank`` = number of singular values, ``s_max`` = s_0.
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    rank: int
    energy_kept: float
    fro_retained: float
    sum_retained: float
    full_rank: int
    s_max: float

    def stats(self) -> dict:
        """JSON-able per-layer figures."""
        return {"rank": self.rank, "alpha": self.alpha, "energy_kept": self.energy_kept,
                "fro_retained": self.fro_retained, "sum_retained": self.sum_retained, "full_rank": self.full_rank}


def _from_svd(U, S, Vh, shape, r: int, scale: float) -> Factor:
    S2 = S.double() ** 2
    tot = float(S2.sum())
    e = float(S2[:r].sum()) / tot if tot > 0 else 1.0
    ssum = float(S.double().sum())
    sq = S[:r].clamp_min(0).sqrt()
    up = (U[:, :r] * sq[None, :]).float()
    down = (sq[:, None] * Vh[:r]).float()
    if len(shape) == 4:
        down = down.reshape(r, *shape[1:])
        up = up.reshape(shape[0], r, 1, 1)
    return Factor(down.contiguous().cpu(), up.contiguous().cpu(), float(scale * r), r, e, math.sqrt(e),
                  float(S.double()[:r].sum()) / ssum if ssum > 0 else 1.0, int(S.numel()), float(S[0]))


def factorize(delta: torch.Tensor, rank: int, mode: str = "fixed", param: float | None = None,
              scale: float = 1.0) -> Factor:
    """Truncated-SVD LoRA factors of one delta (module docstring).

    Args:
        delta: ``[out, in]`` or ``[out, in, kh, kw]``, any float dtype/device (computed in float32).
        rank, mode, param: see :func:`choose_rank`.
        scale: the LoRA scale the factors should carry: ``up @ down = trunc(delta) / scale`` and
            ``alpha = scale · r`` (kohya's resize convention); 1 for extraction.

    Returns a :class:`Factor` with ``up @ down · alpha / r == U_r S_r V_rᵀ`` (up to float32 rounding).
    Raises ``ValueError`` for a 1-D / 3-D delta or NaN/Inf, and as :func:`choose_rank`.
    """
    if delta.ndim not in (2, 4):
        raise ValueError(f"only 2-D (linear) and 4-D (conv) weights have LoRA factors, got shape {tuple(delta.shape)}")
    mat = delta.detach().float().reshape(delta.shape[0], -1)
    if not torch.isfinite(mat).all():
        raise ValueError("the weight delta holds NaN or Inf")
    if scale == 0:
        raise ValueError("scale must be non-zero")
    U, S, Vh = torch.linalg.svd(mat / scale, full_matrices=False)
    r = choose_rank(S, rank, mode, param)
    return _from_svd(U, S, Vh, tuple(delta.shape), r, scale)


def factorize_lowrank(down: torch.Tensor, up: torch.Tensor, scale: float, rank: int, mode: str = "fixed",
                      param: float | None = None) -> Factor:
    """Re-factorise ``up @ down`` (a LoRA of rank r₀) at a lower rank without forming an ``out × in`` SVD.

    ``up [out, r₀(, 1, 1)]``, ``down [r₀, in(, kh, kw)]``; with thin QR ``up = Q_u R_u``, ``downᵀ = Q_d R_d``:
    ``up @ down = Q_u (R_u R_dᵀ) Q_dᵀ``, and the SVD of the r₀×r₀ core gives the exact SVD of the product.
    ``scale`` is the LoRA's alpha/r₀; the result has ``alpha = scale · r`` (kohya ``rank_resize``), so ΔW is kept.
    Raises ``ValueError`` for mismatched shapes.
    """
    if up.ndim == 4 and tuple(up.shape[2:]) != (1, 1):
        raise ValueError(f"lora_up must be [out, r, 1, 1] for a conv LoRA, got {tuple(up.shape)}")
    u = up.detach().float().reshape(up.shape[0], -1)
    d = down.detach().float().reshape(down.shape[0], -1)
    if u.shape[1] != d.shape[0]:
        raise ValueError(f"rank mismatch: lora_up {tuple(up.shape)} vs lora_down {tuple(down.shape)}")
    if not (torch.isfinite(u).all() and torch.isfinite(d).all()):
        raise ValueError("the LoRA holds NaN or Inf")
    Qu, Ru = torch.linalg.qr(u)
    Qd, Rd = torch.linalg.qr(d.T)
    Uc, S, Vhc = torch.linalg.svd(Ru @ Rd.T)
    r = choose_rank(S, rank, mode, param)
    shape = (up.shape[0], *down.shape[1:])
    return _from_svd(Qu @ Uc, S, Vhc @ Qd.T, shape, r, scale)


def summarize(per_layer: Mapping[str, dict], energies: Mapping[str, float]) -> dict:
    """Overall figures from per-layer stats: ``energy_kept`` weighted by each layer's ‖ΔW‖²_F, mean/min energy,
    rank range, layer count. ``energies`` maps the same names to ‖ΔW‖²_F."""
    tot = sum(energies.values())
    kept = sum(per_layer[k]["energy_kept"] * energies[k] for k in per_layer)
    vals = [v["energy_kept"] for v in per_layer.values()]
    ranks = [v["rank"] for v in per_layer.values()]
    return {"layers": len(per_layer), "energy_kept": kept / tot if tot > 0 else 1.0,
            "mean_layer_energy_kept": sum(vals) / len(vals) if vals else 1.0,
            "min_layer_energy_kept": min(vals) if vals else 1.0,
            "rank_min": min(ranks) if ranks else 0, "rank_max": max(ranks) if ranks else 0}


# ---------------------------------------------------------------------------------------------------------------
# extraction from two checkpoints
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Candidate:
    """One module to extract: kohya ``name``, checkpoint ``key``, optional fused-row slice, its group."""

    name: str
    key: str
    rows: tuple[int, int] | None
    group: str  # "attn" | "conv" | "te"


def candidates(keys: Iterable[str], shapes: Mapping[str, tuple], arch: str, conv: bool) -> list[Candidate]:
    """The modules kohya's LoRA network would target in a single-file checkpoint with these keys.

    UNet names are kohya's for the family (diffusers spelling for SD1/SD2, LDM spelling for SDXL as kohya's SDXL
    trainer writes). Raises ``ValueError`` for an architecture other than sd1/sd2/sdxl.
    """
    from ...formats import kohya_keys, ldm_keys

    if arch not in _TES:
        raise ValueError(f"LoRA extraction supports SD1, SD2 and SDXL checkpoints, not {arch!r}")
    keyset = set(keys)
    out: list[Candidate] = []
    l2d = ldm_keys.ldm_to_diffusers_unet(arch)
    for ldm_w, diff_w in l2d.items():
        full = "model.diffusion_model." + ldm_w
        if not ldm_w.endswith(".weight") or full not in keyset or len(shapes[full]) not in (2, 4):
            continue
        dpath = diff_w[: -len(".weight")]
        shp = shapes[full]
        if _ATTN_RE.search("." + dpath) and (len(shp) == 2 or tuple(shp[2:]) == (1, 1)):
            group = "attn"
        elif conv and _CONV_RE.search(dpath):
            group = "conv"
        else:
            continue
        name = kohya_keys.kohya_lora_name("unet", ldm_w[: -len(".weight")] if arch == "sdxl" else dpath)
        out.append(Candidate(name, full, None, group))
    for comp in _TES[arch]:
        for i in range(64):  # every layer index CLIP text towers have (files may hold only some)
            for m in _TE_MODULES:
                name = kohya_keys.kohya_lora_name(comp, f"text_model.encoder.layers.{i}.{m}")
                try:
                    t = kohya_keys.kohya_target(name, arch)
                except ValueError:
                    continue
                if t.weight_key in keyset:
                    out.append(Candidate(name, t.weight_key, t.rows, "te"))
    return out


@dataclass
class ExtractResult:
    """``modules``: kohya name → (lora_down, lora_up, alpha) for :func:`~conceptlab.formats.lora_files.save_kohya_lora`;
    ``report``: JSON-able (settings, ``overall``, ``per_layer`` name → stats, skipped modules and why)."""

    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    report: dict
    metadata: dict[str, str] = field(default_factory=dict)


def _check_mode(rank: int, conv_rank: int, mode: str, param: float | None) -> None:
    if int(rank) < 1:
        raise ValueError(f"rank (network_dim) must be ≥ 1, got {rank}")
    if int(conv_rank) < 0:
        raise ValueError(f"conv_rank must be ≥ 0 (0 = no conv layers), got {conv_rank}")
    choose_rank(torch.ones(2), 1, mode, param)  # validates mode and parameter before any work


def extract_lora(base: str | os.PathLike, tuned: str | os.PathLike, *, rank: int = 32, conv_rank: int = 0,
                 mode: str = "fixed", param: float | None = None, min_diff: float = 0.01,
                 arch: str | None = None, device: str | torch.device = "cpu",
                 progress: Callable[[int, int], None] | None = None) -> ExtractResult:
    """Extract a kohya LoRA ``tuned − base`` from two checkpoints (module docstring).

    Args:
        base, tuned: single-file checkpoints (``.safetensors``; ``.ckpt`` read weights-only) of one family.
        rank: network_dim for Linear / 1×1 conv modules (the cap for the non-fixed modes), ≥ 1.
        conv_rank: rank for 3×3 conv layers; 0 leaves ResNet/sampler layers out (kohya without ``conv_dim``).
        mode, param: rank rule per layer (:func:`choose_rank`), e.g. ``mode="energy", param=0.9``.
        min_diff: a text encoder whose largest |Δ| over all its modules is ≤ this is left out (kohya
            ``--min_diff``, default 0.01); UNet modules with an exactly zero Δ are left out (reported).
        arch: "sd1" | "sd2" | "sdxl"; detected from the base's keys when None.
        device: where the SVDs run.
        progress: called ``(done, total)`` per module (also the cancel point: raise from it to stop).

    Returns an :class:`ExtractResult`; ``alpha = r`` per module (scale 1), so ΔW(LoRA) = U_r S_r V_rᵀ.

    Raises:
        FileNotFoundError / WeightFileError: a file is missing or corrupt.
        ValueError: different families or shapes, an unsupported family, bad rank settings, nothing differs.
    """
    from ...formats.keys import detect_architecture
    from ...formats.safetensors_io import WeightFile

    _check_mode(rank, conv_rank, mode, param)
    with WeightFile(base) as fa, WeightFile(tuned) as fb:
        ka, kb = fa.keys(), fb.keys()
        sa = {k: tuple(fa.shape(k)) for k in ka}
        sb = {k: tuple(fb.shape(k)) for k in kb}
        arch_a = detect_architecture(ka, sa)
        arch_b = detect_architecture(kb, sb)
        if arch is None:
            if arch_a != arch_b:
                raise ValueError(f"the checkpoints are different families: base {arch_a}, fine-tune {arch_b}")
            arch = arch_a
        cands = candidates(ka, sa, arch, conv=conv_rank > 0)
        if not cands:
            raise ValueError(f"{Path(base).name}: no UNet / text-encoder weights of an {arch} checkpoint found")
        missing = [c.key for c in cands if c.key not in sb]
        if missing:
            raise ValueError(f"{Path(tuned).name} lacks {len(missing)} weights the base has, e.g. {missing[0]}")
        bad = [c.key for c in cands if sa[c.key] != sb[c.key]]
        if bad:
            raise ValueError(f"shape mismatch for {len(bad)} weights, e.g. {bad[0]}: {sa[bad[0]]} vs {sb[bad[0]]}")

        def delta(c: Candidate) -> torch.Tensor:
            a, b = fa.get(c.key), fb.get(c.key)
            if c.rows is not None:
                a, b = a[c.rows[0]:c.rows[1]], b[c.rows[0]:c.rows[1]]
            return b.to(device, torch.float32) - a.to(device, torch.float32)

        # kohya's text-encoder test: leave every TE out when none of its modules changed by more than min_diff
        te_max: dict[str, float] = {}
        for c in cands:
            if c.group == "te":
                comp = c.name.split("_", 2)[1]
                te_max[comp] = max(te_max.get(comp, 0.0), float(delta(c).abs().max()))
        dropped_te = sorted(k for k, v in te_max.items() if v <= min_diff)
        modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        per: dict[str, dict] = {}
        energies: dict[str, float] = {}
        unchanged: list[str] = []
        todo = [c for c in cands if not (c.group == "te" and c.name.split("_", 2)[1] in dropped_te)]
        for i, c in enumerate(todo):
            d = delta(c)
            if not torch.isfinite(d).all():
                raise ValueError(f"{c.key}: the difference holds NaN or Inf")
            e = float((d.double() ** 2).sum())
            if e == 0.0:
                unchanged.append(c.name)
            else:
                r_cap = conv_rank if (c.group == "conv" and d.ndim == 4 and d.shape[-1] > 1) else rank
                f = factorize(d, r_cap, mode, param)
                modules[c.name] = (f.down, f.up, f.alpha)
                per[c.name] = f.stats()
                energies[c.name] = e
            if progress is not None:
                progress(i + 1, len(todo))
    if not modules:
        raise ValueError("the two checkpoints do not differ in any UNet or text-encoder module LoRA can express")
    report = {
        "schema": "conceptlab.lora_extract/1", "arch": arch, "base": Path(base).name, "tuned": Path(tuned).name,
        "rank": int(rank), "conv_rank": int(conv_rank), "mode": mode, "param": param, "min_diff": float(min_diff),
        "overall": summarize(per, energies), "text_encoders_left_out": {k: te_max[k] for k in dropped_te},
        "unchanged_modules": len(unchanged), "per_layer": per,
    }
    md = _lora_metadata(arch, report, f"extracted from {Path(tuned).name} - {Path(base).name}")
    return ExtractResult(modules, report, md)


def _lora_metadata(arch: str, report: dict, comment: str) -> dict[str, str]:
    base_version, spec_arch = _ARCH_SPEC[arch]
    fixed = report["mode"] == "fixed"
    net_args = {"conv_dim": str(report["conv_rank"]), "conv_alpha": str(float(report["conv_rank"]))} \
        if report.get("conv_rank") else {}
    return {
        "ss_network_module": "networks.lora", "ss_base_model_version": base_version, "ss_v2": str(arch == "sd2"),
        "ss_network_dim": str(report["rank"]) if fixed else "Dynamic",
        "ss_network_alpha": str(float(report["rank"])) if fixed else "Dynamic",
        "ss_network_args": json.dumps(net_args), "ss_training_comment": comment,
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": spec_arch,
        "modelspec.implementation": "https://github.com/kohya-ss/sd-scripts",
        "modelspec.title": comment,
        "conceptlab_svd": json.dumps({k: v for k, v in report.items() if k != "per_layer"}),
    }


# ---------------------------------------------------------------------------------------------------------------
# resizing an existing LoRA
# ---------------------------------------------------------------------------------------------------------------
_PAIRS = ((".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight"))


def resize_lora(source: str | os.PathLike | Mapping[str, torch.Tensor], *, rank: int, conv_rank: int | None = None,
                mode: str = "fixed", param: float | None = None, device: str | torch.device = "cpu",
                progress: Callable[[int, int], None] | None = None) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """Resize a LoRA to a lower rank (module docstring; kohya ``resize_lora.py`` semantics).

    Args:
        source: LoRA file or tensor dict with kohya (``lora_down``/``lora_up``/``alpha``) or peft
            (``lora_A``/``lora_B``) pairs.
        rank: new rank for 2-D modules (cap for the non-fixed modes); conv_rank: for 4-D modules (default rank).
        mode, param: :func:`choose_rank`.

    Returns ``(tensors, report, metadata)``: the new tensor dict (pairs and ``.alpha`` replaced — an alpha is
    written for every pair — everything else copied), a report (``overall``, ``per_layer`` with ``old_rank``),
    and the source metadata updated as kohya does (``ss_network_dim``/``alpha``, or "Dynamic", and a comment).

    Raises ``ValueError`` when the source holds no LoRA pair or has NaN/Inf, and as :func:`choose_rank`;
    ``FileNotFoundError`` / ``WeightFileError`` for a bad file.
    """
    from ...formats.lora_files import read_lora

    conv_rank = rank if conv_rank is None else conv_rank
    _check_mode(rank, max(conv_rank, 1), mode, param)
    tensors, metadata = read_lora(source)
    out = dict(tensors)
    pairs = []
    for k in tensors:
        for dn, un in _PAIRS:
            if k.endswith(dn) and k[: -len(dn)] + un in tensors:
                pairs.append((k[: -len(dn)], dn, un))
    if not pairs:
        raise ValueError("no LoRA pairs (lora_down/lora_up or lora_A/lora_B) to resize")
    per: dict[str, dict] = {}
    energies: dict[str, float] = {}
    old_max = 0
    for i, (base, dn, un) in enumerate(pairs):
        down, up = tensors[base + dn].to(device), tensors[base + un].to(device)
        r0 = int(down.shape[0])
        old_max = max(old_max, r0)
        a = tensors.get(base + ".alpha")
        scale = float(a) / r0 if a is not None else 1.0
        cap = conv_rank if down.ndim == 4 else rank
        f = factorize_lowrank(down, up, scale, min(cap, r0) if mode == "fixed" else cap, mode, param)
        dt = tensors[base + dn].dtype
        out[base + dn] = f.down.to(dt)
        out[base + un] = f.up.to(dt)
        out[base + ".alpha"] = torch.tensor(f.alpha, dtype=a.dtype if a is not None else torch.float32)
        st = f.stats()
        st["old_rank"] = r0
        per[base] = st
        # ‖ΔW‖²_F of the source module = Σ s² (scaled); from the factors' Gram matrices, no out×in product
        u = up.float().reshape(up.shape[0], -1)
        d = down.float().reshape(down.shape[0], -1)
        energies[base] = float(((u.T @ u) * (d @ d.T)).sum()) * scale ** 2
        if progress is not None:
            progress(i + 1, len(pairs))
    report = {"schema": "conceptlab.lora_resize/1", "rank": int(rank), "conv_rank": int(conv_rank), "mode": mode,
              "param": param, "old_rank_max": old_max, "overall": summarize(per, energies), "per_layer": per}
    md = dict(metadata)
    comment = md.get("ss_training_comment", "")
    if mode == "fixed":
        conv_desc = "" if rank == conv_rank else f" (conv: {conv_rank})"
        md["ss_training_comment"] = f"dimension is resized from {old_max} to {rank}{conv_desc}; {comment}"
        md["ss_network_dim"] = str(rank)
        md["ss_network_alpha"] = str(next(iter(per.values()))["alpha"]) if len({v["alpha"] for v in per.values()}) == 1 \
            else "Dynamic"
    else:
        md["ss_training_comment"] = f"Dynamic resize with {mode}: {param} from {old_max}; {comment}"
        md["ss_network_dim"] = "Dynamic"
        md["ss_network_alpha"] = "Dynamic"
    md["conceptlab_svd"] = json.dumps({k: v for k, v in report.items() if k != "per_layer"})
    return out, report, md


def save_lora_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                      dtype: torch.dtype = torch.float16, overwrite: bool = True) -> Path:
    """Write a resized LoRA tensor dict (float tensors cast to ``dtype``) atomically with sshs hashes, as kohya's
    ``resize_lora.py`` saves. Raises ``FileExistsError`` when ``overwrite`` is False and the file exists."""
    from ...formats.lora_files import model_hashes
    from ...formats.safetensors_io import _stringify_metadata, save_safetensors

    t = {k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()).contiguous()
         for k, v in tensors.items()}
    md = _stringify_metadata(metadata)
    md.pop("sshs_model_hash", None)
    md.pop("sshs_legacy_hash", None)
    md["sshs_model_hash"], md["sshs_legacy_hash"] = model_hashes(t, md)
    return save_safetensors(t, path, metadata=md, overwrite=overwrite)


def layer_table(report: Mapping, limit: int | None = None) -> str:
    """Human-readable per-layer table (name, rank, energy kept %), lowest energy first, plus the overall line."""
    per = report.get("per_layer", {})
    rows = sorted(per.items(), key=lambda kv: kv[1]["energy_kept"])
    if limit is not None:
        rows = rows[:limit]
    o = report["overall"]
    lines = [f"{o['layers']} layers, energy kept {o['energy_kept']:.2%} overall (min layer "
             f"{o['min_layer_energy_kept']:.2%}), rank {o['rank_min']}..{o['rank_max']}"]
    w = max((len(k) for k, _ in rows), default=10)
    for k, v in rows:
        lines.append(f"{k:<{w}}  r={v['rank']:<4d} energy kept {v['energy_kept']:.2%}")
    return "\n".join(lines)
