"""Checkpoint merge methods as pure functions over tensors, and the plan of which weight each key gets
(per-block weights themselves: :mod:`.blocks`).

Convention used everywhere in Concept Lab: **α is the weight of model B** — a weighted sum is
``(1 − α)·A + α·B`` (as in A1111's checkpoint merger, supermerger and sd-mecha). ComfyUI's core
``ModelMergeSimple`` uses the opposite convention (its ``ratio`` 1.0 keeps model1), so ``ratio = 1 − α``.

Every method here takes and returns ``torch.Tensor`` s of one shape (any shape, any floating dtype, any
device), computes in float32 and returns float32; callers cast to the storage dtype. Methods are
deterministic: the only random one (DARE) draws its masks from a CPU ``torch.Generator`` seeded from the
user seed and the tensor's *canonical key name* (:func:`key_seed`), so a streaming file merge and an
in-graph merge of the same models produce the same masks.

Why hand-written: the methods are a few lines of tensor algebra each, but the libraries that have them
(mergekit, sd-mecha, supermerger) either load whole models, are not installable as a library with a stable
API (supermerger is an A1111 extension), or target LLM checkpoints; the per-tensor formulas below are
re-derived from the papers and cited.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .blocks import BlockWeights

Tensor = torch.Tensor

METHODS = ("weighted_sum", "add_difference", "train_difference", "ties", "dare", "della", "slerp", "model_stock")
#: methods that need the third model C (the common base)
METHODS_NEED_C = ("add_difference", "train_difference", "model_stock")
#: methods that can use C as the base of their task vectors (otherwise A is the base)
METHODS_OPTIONAL_C = ("ties", "dare", "della")
TIES_SIGNS = ("sum", "count")
#: entries per chunk of :func:`ties_fuse` (256 KiB of float32: a few intermediates fit a core's L2 cache)
TIES_CHUNK = 1 << 16


@dataclass(frozen=True)
class MethodOptions:
    """Conventions where the reference tools differ (README "Merge conventions"); defaults follow the papers.

    Attributes:
        ties_sign: TIES / DELLA sign election: ``"sum"`` = sign of the summed (weighted) task vectors, the
            paper's Alg. 1 step 2 and mergekit; ``"count"`` = sign of the summed signs (one vote per model),
            sd-mecha's default (``vote_sgn=False``).
        slerp_rescale_norm: SLERP of the directions with the norm interpolated linearly,
            ``slerp(Â, B̂)·lerp(‖A‖, ‖B‖, α)`` (sd-mecha ``linear.py`` ``slerp``), instead of slerp of the raw
            vectors (mergekit, Shoemake's formula; default).
        della_epsilon: DELLA's ε: keep probabilities range over ``density ± ε/2`` by magnitude rank.
        della_rescale: ``"element"`` (each kept entry ÷ its own keep probability: unbiased, the paper's MAGPRUNE
            and mergekit) or ``"global"`` (÷ density after the merge, sd-mecha ``ties_sum_with_dropout``).
    Raises ``ValueError`` for values outside these choices.
    """

    ties_sign: str = "sum"
    slerp_rescale_norm: bool = False
    della_epsilon: float = 0.1
    della_rescale: str = "element"

    def __post_init__(self):
        if self.ties_sign not in TIES_SIGNS:
            raise ValueError(f"ties_sign must be one of {TIES_SIGNS}, got {self.ties_sign!r}")
        if self.della_rescale not in ("element", "global"):
            raise ValueError(f"della_rescale must be 'element' or 'global', got {self.della_rescale!r}")
        if not (0.0 <= float(self.della_epsilon) <= 1.0):
            raise ValueError(f"della_epsilon must be in [0, 1], got {self.della_epsilon}")

    def describe(self, method: str) -> dict:
        """The options that matter for ``method`` (for the recipe)."""
        if method in ("ties", "della"):
            d = {"ties_sign": self.ties_sign}
            if method == "della":
                d.update(della_epsilon=float(self.della_epsilon), della_rescale=self.della_rescale)
            return d
        if method == "slerp":
            return {"slerp_rescale_norm": bool(self.slerp_rescale_norm)}
        return {}

SLERP_DOT_THRESHOLD = 0.9995  # |cos θ| above this -> linear interpolation (mergekit's slerp uses 0.9995)
TRAIN_DIFFERENCE_SCALE = 1.8  # supermerger's constant multiplier for "train difference"


# ----------------------------------------------------------------------------------------------------
# elementary methods
# ----------------------------------------------------------------------------------------------------
def check_alpha(alpha: float, name: str = "alpha") -> list[str]:
    """Return (and emit as ``UserWarning``) a warning when ``alpha`` lies outside [0, 1].

    Extrapolation (α < 0 or α > 1) is allowed — it pushes past A or B — but is rarely what a user meant.
    Raises ``ValueError`` for NaN / infinite values.
    """
    a = float(alpha)
    if not math.isfinite(a):
        raise ValueError(f"{name} must be a finite number, got {alpha!r}")
    if a < 0.0 or a > 1.0:
        msg = f"{name}={a:g} is outside [0, 1]: the merge extrapolates beyond the input models"
        warnings.warn(msg, UserWarning, stacklevel=2)
        return [msg]
    return []


def weighted_sum(a: Tensor, b: Tensor, alpha: float, out_dtype: torch.dtype | None = None) -> Tensor:
    """Linear interpolation ``(1 − α)·A + α·B``, evaluated as ``A + α·(B − A)`` (``torch.lerp``).

    Args:
        a, b: tensors of one shape (any floating dtype); α is B's weight (0 → exactly A, 1 → exactly B).
        out_dtype: when A, B and ``out_dtype`` are the same 16-bit float type, the interpolation runs in
            that dtype with torch's float32 internal math (one rounding, ~3× faster; used by the streaming
            merge); otherwise it is computed in float32.
    Returns:
        float32 tensor of the same shape (``out_dtype`` on the 16-bit fast path).
    Source: A1111 ``modules/extras.py`` "Weighted sum"; ComfyUI ``ModelMergeSimple`` with ratio = 1 − α.
    """
    w = float(alpha)
    if (out_dtype is not None and out_dtype in (torch.float16, torch.bfloat16) and a.dtype == out_dtype
            and b.dtype == out_dtype):
        return torch.lerp(a, b, w)
    return torch.lerp(a.to(torch.float32), b.to(torch.float32), w)


def weighted_sum_n(tensors: Sequence[Tensor], weights: Sequence[float], warn: bool = True) -> Tensor:
    """N-way weighted sum ``Σ_i w_i·T_i``.

    The weights are used as given (not normalised); when they do not sum to 1 (±1e-6) a ``UserWarning`` is
    emitted (the result is then scaled relative to the inputs). Raises ``ValueError`` when the counts
    differ or no tensor is given. Returns float32. Source: model soups (Wortsman et al. 2022, "uniform soup").
    """
    if not tensors or len(tensors) != len(weights):
        raise ValueError(f"need one weight per tensor, got {len(tensors)} tensors and {len(weights)} weights")
    total = float(sum(weights))
    if warn and abs(total - 1.0) > 1e-6:
        warnings.warn(f"weights sum to {total:g}, not 1: the merged weights are scaled by {total:g}",
                      UserWarning, stacklevel=2)
    out = tensors[0].to(torch.float32, copy=True).mul_(float(weights[0]))
    for t, w in zip(tensors[1:], weights[1:]):
        out.add_(t.to(torch.float32), alpha=float(w))
    return out


def add_difference(a: Tensor, b: Tensor, c: Tensor, alpha: float) -> Tensor:
    """Add difference ``A + α·(B − C)`` (graft what B learned on top of its base C onto A).

    Returns float32. Source: A1111 ``modules/extras.py`` "Add difference".
    """
    out = b.to(torch.float32, copy=True)
    out.sub_(c.to(torch.float32))
    out.mul_(float(alpha)).add_(a.to(torch.float32))
    return out


def train_difference(a: Tensor, b: Tensor, c: Tensor, alpha: float) -> Tensor:
    """supermerger's "train difference": add B − C to A as if it had been trained on A.

    ``D = B − C``; ``s = |B − A| / (|B − C| + |B − A|)`` (0 where both are 0);
    ``result = A + α·1.8·sign(D)·s·|D|``. When B == C everywhere the result is A.
    Returns float32. Source: hako-mikan/sd-webui-supermerger ``scripts/mergers/mergers.py`` (mode "TRAIN").
    """
    a32, b32, c32 = a.to(torch.float32), b.to(torch.float32), c.to(torch.float32)
    d = b32 - c32
    dist_bc = d.abs()
    dist_ba = (b32 - a32).abs()
    total = dist_bc + dist_ba
    scale = torch.where(total != 0, dist_ba / torch.where(total != 0, total, torch.ones_like(total)),
                        torch.zeros_like(total))
    return a32 + (float(alpha) * TRAIN_DIFFERENCE_SCALE) * torch.sign(d) * scale * dist_bc


def slerp(a: Tensor, b: Tensor, alpha: float, dot_threshold: float = SLERP_DOT_THRESHOLD,
          rescale_norm: bool = False) -> Tensor:
    """Spherical linear interpolation of two tensors treated as flat vectors.

    ``θ = arccos(⟨â, b̂⟩)`` with â = A/‖A‖, b̂ = B/‖B‖; result
    ``sin((1 − α)θ)/sin θ · A + sin(αθ)/sin θ · B``. When ``|cos θ| > dot_threshold`` (near-parallel or
    anti-parallel) or a tensor has zero norm, falls back to :func:`weighted_sum` (the formula is 0/0 there).
    ``rescale_norm=True``: interpolate the unit directions and give the result the linearly interpolated norm,
    ``(sin((1 − α)θ)·Â + sin(αθ)·B̂)/sin θ · ((1 − α)‖A‖ + α‖B‖)`` (sd-mecha ``merge_methods/linear.py``
    ``slerp``); the default (``False``) keeps Shoemake's formula on the raw vectors, as mergekit does, whose
    norm dips between unequal-norm inputs.
    Returns float32. Source: Shoemake 1985 (SIGGRAPH, "Animating rotation with quaternion curves");
    per-tensor use as in mergekit ``mergekit/merge_methods/slerp.py``.
    """
    a32, b32 = a.to(torch.float32), b.to(torch.float32)
    na = torch.linalg.vector_norm(a32)
    nb = torch.linalg.vector_norm(b32)
    if float(na) == 0.0 or float(nb) == 0.0:
        return weighted_sum(a32, b32, alpha)
    dot = float(torch.sum((a32 / na) * (b32 / nb)).clamp(-1.0, 1.0))
    if abs(dot) > dot_threshold:
        return weighted_sum(a32, b32, alpha)
    theta = math.acos(dot)
    sin_t = math.sin(theta)
    s0 = math.sin((1.0 - float(alpha)) * theta) / sin_t
    s1 = math.sin(float(alpha) * theta) / sin_t
    if rescale_norm:
        norm = torch.lerp(na, nb, float(alpha))
        return ((a32 / na) * s0 + (b32 / nb) * s1) * norm
    return a32 * s0 + b32 * s1


# ----------------------------------------------------------------------------------------------------
# task-vector methods
# ----------------------------------------------------------------------------------------------------
def trim_top_k(tau: Tensor, density: float) -> Tensor:
    """TIES "trim": keep the ``k = round(density·n)`` entries of largest magnitude, zero the rest.

    ``density`` in [0, 1] (1 keeps everything, 0 nothing). Exactly k entries are kept: every entry above the
    k-th largest magnitude, then entries equal to it in memory order (sd-mecha keeps all ties, so one or more
    extra). The threshold comes from ``numpy.partition`` (introselect, O(n); ~8× faster than ``torch.topk``
    with k = 0.2·n on one CPU thread). Returns a float32 tensor shaped like ``tau``.
    Source: Yadav et al. 2023, "TIES-Merging", Alg. 1 step 1 (keep top-k% by magnitude).
    Raises ``ValueError`` for ``density`` outside [0, 1].
    """
    if not 0.0 <= float(density) <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    return _trim_top_k_(tau.to(torch.float32, copy=True), density)


def _trim_top_k_(out: Tensor, density: float) -> Tensor:
    """:func:`trim_top_k` in place on a contiguous float32 tensor of the caller's own (one copy fewer)."""
    n = out.numel()
    k = int(round(float(density) * n))
    if k >= n:
        return out
    if k <= 0:
        return out.zero_()
    import numpy as np

    flat = out.view(-1)
    mag = flat.abs()
    thr = float(np.partition(mag.detach().cpu().numpy(), n - k)[n - k])  # the k-th largest magnitude
    drop = mag < thr
    if n - int(drop.sum()) > k:  # entries equal to the threshold beyond k: keep the first ones in memory order
        keep = mag > thr
        short = k - int(keep.sum())
        if short > 0:
            keep[(mag == thr).nonzero().squeeze(1)[:short]] = True
        drop = ~keep
    return out.masked_fill_(drop.view(out.shape), 0.0)


def ties(base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float], density: float = 0.2,
         scale: float = 1.0, sign: str = "sum") -> Tensor:
    """TIES-merging of models that share ``base``: trim, elect sign, disjoint (weighted) mean.

    1. task vectors ``τ_i = T_i − base``, trimmed with :func:`trim_top_k` (``density`` = fraction kept);
    2. elected sign ``γ = sign(Σ_i w_i·τ̂_i)`` per entry (``sign="sum"``, the paper's); ``sign="count"``:
       ``γ = sign(Σ_i sign(w_i·τ̂_i))``, one vote per model (sd-mecha ``ties_sum_deltas`` with ``vote_sgn=False``);
    3. disjoint mean ``τ_m = Σ_i w_i·τ̂_i·[sign τ̂_i = γ] / Σ_i w_i·[sign τ̂_i = γ, τ̂_i ≠ 0]`` (0 where no
       model agrees); result ``base + scale·τ_m``.

    With all ``w_i = 1`` this is exactly the paper's algorithm; weights generalise the mean as mergekit does
    (``normalize=True``). Returns float32. Raises ``ValueError`` on bad density / counts.
    Source: Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models", Alg. 1;
    weighting as in mergekit ``mergekit/merge_methods/generalized_task_arithmetic.py``.
    """
    if not tensors or len(tensors) != len(weights):
        raise ValueError(f"need one weight per model, got {len(tensors)} models and {len(weights)} weights")
    base32 = base.to(torch.float32)
    if not 0.0 <= float(density) <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    trimmed = [_trim_top_k_(torch.sub(t.to(torch.float32), base32).contiguous(), density).mul_(float(w))
               for t, w in zip(tensors, weights)]
    return ties_fuse(base32, trimmed, weights, scale=scale, sign=sign)


def ties_fuse(base: Tensor, weighted: Sequence[Tensor], weights: Sequence[float], scale: float = 1.0,
              sign: str = "sum") -> Tensor:
    """TIES steps 2-3 (elect sign, disjoint weighted mean) on already trimmed / dropped task vectors
    ``weighted[i] = w_i·τ̂_i`` (float32, shaped like ``base``): ``base + scale·τ_m``; see :func:`ties`.
    Raises ``ValueError`` for an unknown ``sign``."""
    if sign not in TIES_SIGNS:
        raise ValueError(f"TIES sign election must be one of {TIES_SIGNS}, got {sign!r}")
    base32 = base.to(torch.float32)
    weighted = [x.reshape(-1) for x in weighted]
    flat_base = base32.reshape(-1)
    out = torch.empty_like(flat_base)
    n = flat_base.numel()
    # one pass per model and step instead of a stacked [M, ...] copy (2.5× faster on one CPU thread, same sums),
    # over cache-sized chunks: the ~12 element-wise steps then run in L2 instead of streaming every intermediate
    # through memory (benchmarks/merge.py: ~25 % less time on a 6.5 M-entry tensor); each entry's arithmetic is
    # unchanged, so the bits do not depend on the chunk size
    for s in range(0, n, TIES_CHUNK):
        e = min(n, s + TIES_CHUNK)
        xs = [x[s:e] for x in weighted]
        votes = xs[0].clone() if sign == "sum" else torch.sign(xs[0])
        for x in xs[1:]:
            votes.add_(x if sign == "sum" else torch.sign(x))
        gamma = votes.sign_()
        num = torch.zeros_like(gamma)
        den = torch.zeros_like(gamma)
        for x, w in zip(xs, weights):
            agree = (x * gamma) > 0                                    # same sign as the elected one, and non-zero
            num.add_(x.masked_fill(~agree, 0.0))
            den.add_(agree.to(torch.float32), alpha=float(w))
        mean = num.div_(den).masked_fill_(den == 0, 0.0)
        torch.add(flat_base[s:e], mean, alpha=float(scale), out=out[s:e])
    return out.view(base32.shape)


def key_seed(seed: int, key: str, index: int = 0) -> int:
    """Deterministic 63-bit seed for ``(user seed, canonical key name, model index)``.

    SHA-256 of ``"{seed}:{canonical_key(key)}:{index}"``, first 8 bytes, top bit cleared. Using the key
    name (not the position in a file) makes DARE masks independent of iteration order, so streaming and
    in-graph merges agree.
    """
    h = hashlib.sha256(f"{int(seed)}:{canonical_key(key)}:{int(index)}".encode("utf-8")).digest()
    return int.from_bytes(h[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def dare_drop(tau: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """DARE "drop and rescale": keep each entry with probability ``density`` (= 1 − p), scale kept ones by
    ``1/density``; ``density`` in [0, 1] (0 returns zeros, 1 a copy); ``ValueError`` outside [0, 1].

    The Bernoulli mask is drawn on the CPU from ``generator`` (``torch.rand < density``), so results do not
    depend on the device. Returns float32. Source: Yu et al. 2023, "Language Models are Super Mario:
    Absorbing Abilities from Homologous Models as a Free Lunch" (DARE), Eq. 2.
    """
    if not 0.0 <= float(density) <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    t = tau.to(torch.float32)
    if float(density) >= 1.0:
        return t.clone()
    if float(density) <= 0.0:
        return torch.zeros_like(t)
    keep = torch.rand(t.shape, generator=generator, dtype=torch.float32) < float(density)
    return torch.where(keep.to(t.device), t / float(density), torch.zeros_like(t))


def dare(base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float], density: float = 0.2,
         seed: int = 0, key: str = "") -> Tensor:
    """DARE merge: ``base + Σ_i w_i · DARE(T_i − base)`` with per-model masks seeded by
    :func:`key_seed` ``(seed, key, i)``.

    ``density`` = keep probability (the paper's drop rate p = 1 − density). Weights are not normalised
    (task arithmetic); with weights (1 − α, α) and density 1 this equals :func:`weighted_sum`.
    Returns float32. Source: Yu et al. 2023 (DARE), Eq. 2 followed by task arithmetic (Ilharco et al. 2023).
    Raises ``ValueError`` when there are no models, the weight count differs from the model count, or
    ``density`` is outside [0, 1].
    """
    if not tensors or len(tensors) != len(weights):
        raise ValueError(f"need one weight per model, got {len(tensors)} models and {len(weights)} weights")
    base32 = base.to(torch.float32)
    out = base32.clone()
    for i, (t, w) in enumerate(zip(tensors, weights)):
        g = torch.Generator(device="cpu").manual_seed(key_seed(seed, key, i))
        out.add_(dare_drop(t.to(torch.float32) - base32, density, g), alpha=float(w))
    return out


# ----------------------------------------------------------------------------------------------------
# one key, any method
# ----------------------------------------------------------------------------------------------------
def merge_tensor(method: str, key: str, a: Tensor, b: Tensor | None, c: Tensor | None, alpha: float,
                 density: float = 0.2, seed: int = 0, out_dtype: torch.dtype | None = None,
                 options: MethodOptions | None = None) -> Tensor:
    """Merge one tensor with ``method`` at B-weight ``alpha``; the single entry point shared by the
    streaming file merge and the in-graph nodes. Returns float32.

    * weighted_sum / slerp: A, B.
    * add_difference / train_difference: A, B, C (C required).
    * ties / dare / della: with C, task vectors ``A − C`` and ``B − C`` weighted ``(1 − α, α)`` on base C;
      without C, the single task vector ``B − A`` on base A, weighted α (so ``A + α·trim(B − A)``).
    * model_stock: base C, fine-tuned A and B (α is not used: the ratio t comes from the angle).
    ``out_dtype`` lets :func:`weighted_sum` take its 16-bit fast path (the caller casts to it anyway);
    ``options`` (:class:`MethodOptions`) picks the TIES sign election, SLERP norm and DELLA conventions.
    Raises ``ValueError`` for unknown methods or a missing C.
    """
    opts = options or MethodOptions()
    if method == "weighted_sum":
        return weighted_sum(a, b, alpha, out_dtype=out_dtype)
    if method == "slerp":
        return slerp(a, b, alpha, rescale_norm=opts.slerp_rescale_norm)
    if method == "model_stock":
        from .nmodel import model_stock

        if c is None:
            raise ValueError("model_stock needs the pre-trained base as model C (A and B fine-tuned from it)")
        return model_stock(c, [a, b])
    if method in METHODS_NEED_C:
        if c is None:
            raise ValueError(f"{method} needs a third model C (the base B was trained from)")
        fn = add_difference if method == "add_difference" else train_difference
        return fn(a, b, c, alpha)
    if method in ("ties", "dare", "della"):
        if c is not None:
            base, models, weights = c, [a, b], [1.0 - float(alpha), float(alpha)]
        else:
            base, models, weights = a, [b], [float(alpha)]
        if method == "ties":
            if c is None:  # one task vector: the disjoint mean is the vector itself; α scales it
                return ties(base, models, [1.0], density=density, scale=float(alpha), sign=opts.ties_sign)
            return ties(base, models, weights, density=density, sign=opts.ties_sign)
        if method == "della":
            from .nmodel import della

            g = torch.Generator(device="cpu").manual_seed(key_seed(seed, key, 0))
            if c is None:
                return della(base, models, [1.0], density=density, epsilon=opts.della_epsilon, generator=g,
                             sign=opts.ties_sign, rescale=opts.della_rescale, scale=float(alpha))
            return della(base, models, weights, density=density, epsilon=opts.della_epsilon, generator=g,
                         sign=opts.ties_sign, rescale=opts.della_rescale)
        return dare(base, models, weights, density=density, seed=seed, key=key)
    raise ValueError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")


# ----------------------------------------------------------------------------------------------------
# key names
# ----------------------------------------------------------------------------------------------------
_CANON_PREFIXES = (
    ("model.diffusion_model.", "unet:"),
    ("diffusion_model.", "unet:"),
    ("cond_stage_model.transformer.", "te:"),
    ("cond_stage_model.", "te:"),
    ("clip_l.transformer.", "te:"),
    ("conditioner.embedders.0.transformer.", "te1:"),
    ("conditioner.embedders.1.model.", "te2:"),
    ("clip_g.transformer.", "te2:"),
    ("first_stage_model.", "vae:"),
)


def canonical_key(key: str) -> str:
    """Key name independent of where it came from: a single-file checkpoint (``model.diffusion_model.``),
    a ComfyUI model patcher (``diffusion_model.``) or a ComfyUI CLIP (``clip_l.transformer.``) map to one
    name (``unet:<ldm path>``, ``te:<path>``, ...). Used for DARE seeds."""
    for prefix, tag in _CANON_PREFIXES:
        if key.startswith(prefix):
            return tag + key[len(prefix):]
    return key


# ----------------------------------------------------------------------------------------------------
# which weight does a key get
# ----------------------------------------------------------------------------------------------------
@dataclass
class MergePlan:
    """How each key is merged: B-weight per component, block weights, and what is taken from A.

    Attributes:
        arch: architecture id (``formats.keys.detect_architecture``).
        alpha: B's weight for the UNet (and BASE when no block weights are given).
        block_weights: optional :class:`.blocks.BlockWeights` for UNet keys.
        te: ``"merge"`` (text encoder merged with ``te_alpha``, default BASE weight) or ``"a"`` (from A).
        vae: ``"merge"`` (with ``vae_alpha``, default BASE weight) or ``"a"`` (from A, the default).
        other: keys outside UNet / text encoder / VAE (``alphas_cumprod``, EMA bookkeeping …) come from A.

    Raises ``ValueError`` (at construction) when ``te`` or ``vae`` is not ``"merge"`` / ``"a"``.
    """

    arch: str
    alpha: float
    block_weights: BlockWeights | None = None
    te: str = "merge"
    vae: str = "a"
    te_alpha: float | None = None
    vae_alpha: float | None = None
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.te not in ("merge", "a"):
            raise ValueError(f"text encoder mode must be 'merge' or 'a', got {self.te!r}")
        if self.vae not in ("merge", "a"):
            raise ValueError(f"VAE mode must be 'merge' or 'a', got {self.vae!r}")

    @property
    def base_weight(self) -> float:
        """The BASE B-weight: the block weights' BASE entry when given, else :attr:`alpha`."""
        return self.block_weights.weight(None) if self.block_weights is not None else float(self.alpha)

    def weight_for(self, key: str, component: str | None = None) -> float | None:
        """B-weight for checkpoint/model ``key``, or ``None`` when the key is taken from A unchanged.

        ``component`` overrides the detected one (the CLIP node passes ``"te"``).
        """
        from ...formats.keys import classify_key, split_component

        comp = component or split_component(key)[0]
        if comp == "unet":
            if self.block_weights is None:
                return float(self.alpha)
            return self.block_weights.weight(classify_key(key, self.arch).block)
        if comp in ("te", "te1", "te2"):
            if self.te == "a":
                return None
            return float(self.te_alpha) if self.te_alpha is not None else self.base_weight
        if comp == "vae":
            if self.vae == "a":
                return None
            return float(self.vae_alpha) if self.vae_alpha is not None else self.base_weight
        return None

    def describe(self) -> dict:
        """JSON-able summary for the recipe."""
        d = {"alpha": float(self.alpha), "text_encoder": self.te, "vae": self.vae}
        if self.te_alpha is not None:
            d["te_alpha"] = float(self.te_alpha)
        if self.vae_alpha is not None:
            d["vae_alpha"] = float(self.vae_alpha)
        if self.block_weights is not None:
            d["block_weights"] = {"source": self.block_weights.source, "values": self.block_weights.as_list()}
        return d
