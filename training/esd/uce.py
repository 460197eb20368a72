"""UCE — closed-form concept erasure in the cross-attention key/value projections (Gandikota et al., "Unified
Concept Editing in Diffusion Models", WACV 2024, §3 Eq. 7), host-neutral.

For every cross-attention key and value projection ``W`` (``attn2.to_k`` / ``attn2.to_v``, ``[out, D]``) the edit
solves, in closed form, the least-squares problem of the paper's Eq. 5–7::

    min_W  Σ_e s_e ‖W c_e − W_old c_g(e)‖²  +  Σ_p s_p ‖W c_p − W_old c_p‖²  +  λ ‖W − W_old‖²_F

    ⇒  W = ( λ W_old + Σ_e s_e (W_old c_g(e)) c_eᵀ + Σ_p s_p (W_old c_p) c_pᵀ )
           · ( λ I + Σ_e s_e c_e c_eᵀ + Σ_p s_p c_p c_pᵀ )⁻¹

with ``c_e`` the text embedding of an erased concept, ``c_g(e)`` that of its guide concept (what the concept
should now look like: ``"art"`` for artists, the empty prompt for objects, as the reference's defaults), ``c_p``
those of preserved concepts, ``s_e`` = ``erase_scale``, ``s_p`` = ``preserve_scale`` and ``λ`` = ``lamb``.
As in the reference (rohitgandikota/unified-concept-editing, ``trainscripts/uce_sd_erase.py`` lines 24–82), a
concept's embedding ``c`` is the text encoder's output at the prompt's **last content token** (index
``attention_mask.sum() − 2``, lines 34–42: the token before the end token; the start token for the empty
prompt), ``W_old`` is the original weight for every term, and only the weights of ``attn2.to_k`` /
``attn2.to_v`` change (SD has no bias there). The cross-attention input (the context) is the same for every
layer, so one embedding per prompt serves all 32 projections of SD1.x (SDXL: 140 projections, the embedding
being the concatenated CLIP-L ‖ OpenCLIP-G context at that token, as the script gets from an SDXL pipeline).

**Low-rank form** (what :func:`uce_delta` computes; exact algebra, not an approximation): the left factor is
``W_old·A`` with ``A = λI + s_e·Gᵀ E + s_p·Pᵀ P`` and the right one is ``M = λI + s_e·Eᵀ E + s_p·Pᵀ P``
(rows of ``E``, ``G``, ``P`` are the embeddings), so ``W = W_old·A·M⁻¹ = W_old + s_e·(W_old (G − E)ᵀ)·(E M⁻¹)``
since ``A − M = s_e (G − E)ᵀ E``. ``E M⁻¹`` (``[N, D]``) is the same for every projection, so the edit of each
projection is one ``[out, N] × [N, D]`` product instead of a ``D × D`` solve — the preserve terms enter only
through ``M``.

Differences from the script, none of which changes the edited weights beyond float rounding: the low-rank form
above, computed in float64 with one ``torch.linalg.solve`` for all projections (the script multiplies by
``torch.inverse`` of ``mat2`` in float32 for every projection); the prompt expansion (``expand_prompts``) uses this project's kind templates (:mod:`.prompts`), each
guide prompt the same template filled with the guide concept, instead of the script's five fixed phrasings.

Outputs are the ESD eraser's (:class:`~.config.ESDResult`): ``deltas`` ΔW = W_new − W_old (so the same ``.diff``
file, patches and JSON reports), with ``method = "uce"``. Nothing here is in a library (diffusers/peft have no
closed-form attention editing); it is a few lines of linear algebra.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from .config import ESDResult
from .erase import Target
from .prompts import concept_kinds, expand_templates, normalize_kind, parse_concepts, parse_prompt_lines

#: ``encode(prompts) -> (hidden [B, L, D] float, last content-token index per prompt [B] int)``
TokenEncoder = Callable[[Sequence[str]], tuple[torch.Tensor, torch.Tensor]]

#: guide concept per kind when the user gives none (uce_sd_erase.py lines 136–141: "art" for art, "" otherwise)
DEFAULT_GUIDE = {"style": "art", "object": "", "person": "", "attribute": "", "explicit": ""}

_PLACEHOLDER = "QQCONCEPTQQ"


@dataclass
class UCEConfig:
    """Settings of one UCE edit (defaults: uce_sd_erase.py's: erase_scale 1, preserve_scale 1, λ 0.5).

    Fields:
        concepts: concept(s) to erase (``"Van Gogh"``, ``"A; B"`` or a list).
        guide_concepts: what each erased concept is mapped to: one for all or one per concept; ``None`` = the
            kind's default (:data:`DEFAULT_GUIDE`: ``"art"`` for artists/styles, the empty prompt otherwise).
        preserve_concepts: concepts whose key/value outputs must stay as they are (e.g. other artists).
        concept_kind: ``"auto"`` or a kind of :data:`.prompts.KINDS` (default guide and expansion templates).
        variations: 0 = the bare concepts (the script's default); N > 0 = also N − 1 phrasings per concept from
            the kind's templates, each paired with the same phrasing of its guide (the script's
            ``--expand_prompts``).
        erase_scale, preserve_scale: ``s_e``, ``s_p`` ≥ 0. lamb: λ > 0 (regulariser towards ``W_old``).
        seed: seeds the phrasing choice.
    """

    concepts: str | Sequence[str] = ""
    guide_concepts: str | Sequence[str] | None = None
    preserve_concepts: str | Sequence[str] | None = None
    concept_kind: str = "auto"
    variations: int = 0
    erase_scale: float = 1.0
    preserve_scale: float = 1.0
    lamb: float = 0.5
    seed: int = 0

    def validate(self) -> None:
        """Raise ``ValueError`` for no concept, a guide list whose length is neither 1 nor the number of
        concepts, negative / non-finite scales, ``lamb`` ≤ 0, ``variations`` < 0 or an unknown kind."""
        concepts = parse_concepts(self.concepts)
        guides = _split(self.guide_concepts)
        if guides is not None and len(guides) not in (1, len(concepts)):
            raise ValueError(f"{len(guides)} guide concepts for {len(concepts)} concepts: give one guide for all "
                             "or one per concept (separated by ';' or new lines)")
        for name in ("erase_scale", "preserve_scale"):
            v = float(getattr(self, name))
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number ≥ 0, got {v}")
        if not (math.isfinite(float(self.lamb)) and float(self.lamb) > 0):
            raise ValueError(f"lamb (λ) must be > 0 (it keeps the edit close to the original weights and the "
                             f"system solvable), got {self.lamb}")
        if int(self.variations) < 0:
            raise ValueError(f"variations must be ≥ 0, got {self.variations}")
        normalize_kind(self.concept_kind)


def _split(text: str | Sequence[str] | None) -> list[str] | None:
    """``None`` stays ``None``; ``"a; b"`` / lines / lists → stripped items (empty items kept: ``""`` is a valid
    guide, the empty prompt)."""
    if text is None:
        return None
    if isinstance(text, str):
        items = [t.strip() for part in text.splitlines() for t in part.split(";")] if text.strip() else [""]
    else:
        items = [str(t).strip() for t in text]
    return [t for t in items if not t.startswith("#")] or [""]


def uce_prompts(cfg: UCEConfig) -> tuple[list[str], list[str], list[str], dict[str, str]]:
    """``(edit prompts, guide prompts (paired), preserve prompts, {concept: kind})`` for a config.

    Guides: the user's (one for all, or per concept) or :data:`DEFAULT_GUIDE` of the concept's kind. With
    ``variations`` N > 0, each concept also gets up to N − 1 phrasings of its kind's templates
    (:func:`.prompts.expand_templates`), and its guide the same phrasing with the guide in place of the concept.
    Preserve prompts are used as given (as the script does). Raises ``ValueError`` (see :meth:`UCEConfig.validate`).
    """
    cfg.validate()
    concepts = parse_concepts(cfg.concepts)
    kinds = concept_kinds(concepts, cfg.concept_kind)
    guides = _split(cfg.guide_concepts)
    if guides is None:
        guides = [DEFAULT_GUIDE[kinds[c]] for c in concepts]
    elif len(guides) == 1:
        guides = guides * len(concepts)
    edit, guide = list(concepts), list(guides)
    if int(cfg.variations) > 0:
        for c, g in zip(concepts, guides):
            phr = expand_templates([_PLACEHOLDER], None, n=int(cfg.variations), seed=int(cfg.seed),
                                   kind={_PLACEHOLDER: kinds[c]})
            for t in phr:
                if t == _PLACEHOLDER:
                    continue
                edit.append(t.replace(_PLACEHOLDER, c))
                guide.append(" ".join(t.replace(_PLACEHOLDER, g).split()))
    preserve = [p for p in (parse_prompt_lines([t for t in _split(cfg.preserve_concepts) or []])) if p]
    return edit, guide, list(dict.fromkeys(preserve)), kinds


def uce_right_factor(erase: torch.Tensor, preserve: torch.Tensor | None, erase_scale: float = 1.0,
                     preserve_scale: float = 1.0, lamb: float = 0.5) -> torch.Tensor:
    """``E·M⁻¹`` ``[N, D]`` float64 with ``M = λI + s_e·EᵀE + s_p·PᵀP`` (module docstring), shared by every
    projection. ``erase`` ``[N, D]``, ``preserve`` ``[M, D]`` or ``None``. Raises ``ValueError`` for bad shapes."""
    E = erase.detach().to(torch.float64)
    if E.dim() != 2:
        raise ValueError(f"erase embeddings must be [N, D], got {tuple(E.shape)}")
    D = E.shape[1]
    M = float(lamb) * torch.eye(D, dtype=torch.float64, device=E.device) + float(erase_scale) * E.T @ E
    if preserve is not None and preserve.numel():
        P = preserve.detach().to(E.device, torch.float64)
        if P.dim() != 2 or P.shape[1] != D:
            raise ValueError(f"preserve embeddings must be [M, {D}], got {tuple(P.shape)}")
        M = M + float(preserve_scale) * P.T @ P
    return torch.linalg.solve(M, E.T).T  # M symmetric: (E M⁻¹)ᵀ = M⁻¹ Eᵀ


def uce_delta(weight: torch.Tensor, erase: torch.Tensor, guide: torch.Tensor, right: torch.Tensor,
              erase_scale: float = 1.0) -> torch.Tensor:
    """ΔW = ``s_e·(W_old (G − E)ᵀ)·right`` for one projection, ``right`` from :func:`uce_right_factor`.

    Shapes: ``weight`` ``[out, D]``, ``erase``/``guide`` ``[N, D]``, ``right`` ``[N, D]``. Returns float32.
    Raises ``ValueError`` for mismatched shapes.
    """
    W = weight.detach().to(torch.float64)
    E = erase.detach().to(W.device, torch.float64)
    G = guide.detach().to(W.device, torch.float64)
    if E.shape != G.shape or E.shape != right.shape or (E.numel() and E.shape[1] != W.shape[1]):
        raise ValueError(f"embeddings must be [N, {W.shape[1]}] (erase, guide and right factor alike), got "
                         f"{tuple(E.shape)}, {tuple(G.shape)} and {tuple(right.shape)}")
    return (float(erase_scale) * (W @ (G - E).T) @ right.to(W.device, torch.float64)).to(torch.float32)


def uce_closed_form(weight: torch.Tensor, erase: torch.Tensor, guide: torch.Tensor, preserve: torch.Tensor | None,
                    erase_scale: float = 1.0, preserve_scale: float = 1.0, lamb: float = 0.5) -> torch.Tensor:
    """The edited weight of one projection (module docstring; paper Eq. 7; uce_sd_erase.py lines 56–82).

    Args:
        weight: ``W_old`` ``[out, D]`` (any float dtype).
        erase: ``[N, D]`` embeddings ``c_e`` of the erased prompts; guide: ``[N, D]`` embeddings ``c_g`` of their
            guides (row i guides row i).
        preserve: ``[M, D]`` embeddings of preserved prompts, or ``None`` / ``M = 0``.
        erase_scale, preserve_scale, lamb: ``s_e``, ``s_p``, ``λ``.

    Returns:
        float32 ``[out, D]``: ``W_old + ΔW`` with ΔW from the low-rank form (:func:`uce_delta`), in float64.

    Raises ``ValueError`` for mismatched shapes.
    """
    if erase.dim() != 2 or erase.shape != guide.shape or erase.shape[1] != weight.shape[1]:
        raise ValueError(f"embeddings must be [N, {weight.shape[1]}] (erase and guide alike), got "
                         f"{tuple(erase.shape)} and {tuple(guide.shape)}")
    right = uce_right_factor(erase, preserve, erase_scale, preserve_scale, lamb)
    d = uce_delta(weight, erase, guide, right, erase_scale)
    return (weight.detach().to(torch.float64) + d.to(torch.float64)).to(torch.float32)


def last_token_embeddings(encode: TokenEncoder, prompts: Sequence[str]) -> torch.Tensor:
    """``[B, D]`` float32 CPU: each prompt's text-encoder output at its last content token (module docstring)."""
    if not prompts:
        return torch.zeros(0, 0)
    hidden, idx = encode(list(prompts))
    idx = torch.as_tensor(idx, dtype=torch.long).flatten()
    if hidden.dim() != 3 or hidden.shape[0] != len(prompts) or idx.numel() != len(prompts):
        raise ValueError(f"the token encoder returned hidden {tuple(hidden.shape)} and {idx.numel()} indices "
                         f"for {len(prompts)} prompts")
    rows = torch.arange(len(prompts))
    return hidden.detach().float().cpu()[rows, idx.cpu()]


def last_token_index(ids: torch.Tensor, end_token: int) -> torch.Tensor:
    """Index of the last content token per row of token ids ``[B, L]``: the position before the first
    ``end_token`` after the start token (0 for the empty prompt; ``L − 2`` for a truncated prompt whose end
    token is last). Equals the reference's ``attention_mask.sum() − 2`` for CLIP tokenizers. Raises
    ``ValueError`` for a row without ``end_token``."""
    out = []
    for row in ids.tolist():
        pos = next((i for i in range(1, len(row)) if row[i] == end_token), None)
        if pos is None:
            raise ValueError("a tokenized prompt has no end token: cannot find its last content token")
        out.append(pos - 1)
    return torch.tensor(out, dtype=torch.long)


def diffusers_token_encoder(host) -> TokenEncoder:
    """A :data:`TokenEncoder` for :class:`~..diffusers_host.DiffusersHost` (SD1/SD2/SDXL): the ``context`` of the
    host's own :meth:`encode_prompts` (SD1/SD2: last CLIP layer; SDXL: CLIP-L ‖ OpenCLIP-G penultimate layers,
    ``[B, 77, 2048]`` — what ``pipe.encode_prompt(...)[0]`` gives the reference script for an SDXL pipeline) and
    the last content token from the host's (first) tokenizer. The end token is ``tokenizer.eos_token_id``, or —
    for a plain tokenizer callable — the id every row is padded with."""
    from ..conditioning import Conditioning

    tok = host.tokenizer
    if host.text_encoder is None or tok is None:
        raise ValueError("UCE needs the model's text encoder and tokenizer")

    def encode(prompts):
        ids = host._tokenize(list(prompts))  # the host's exact tokenization (padding / truncation to 77)
        if ids.dim() == 3:  # [B, chunks, 77]: the first chunk (the reference truncates prompts to 77 tokens)
            ids = ids[:, 0]
        end = getattr(tok, "eos_token_id", None)
        if end is None:
            end = int(ids[0, -1])
        with torch.no_grad():
            context = Conditioning.wrap(host.encode_prompts(list(prompts))).context
        return context, last_token_index(ids, int(end))

    return encode


def uce_targets(modules: Mapping[str, nn.Module], component: str = "unet") -> list[Target]:
    """The edited weights: every ``attn2.to_k`` / ``attn2.to_v`` weight (uce_sd_erase.py lines 17–20), sorted.
    Raises ``ValueError`` when the model has none (no cross-attention)."""
    out = [Target(component, p, "weight", tuple(m.weight.shape)) for p, m in sorted(modules.items())
           if p.split(".")[-2:-1] == ["attn2"] and p.split(".")[-1] in ("to_k", "to_v")]
    if not out:
        raise ValueError("this model has no cross-attention key/value projections (attn2.to_k / attn2.to_v): "
                         "UCE edits how text conditions the UNet, so it needs a text-conditioned UNet")
    return out


def erase_uce(weights: Mapping[str, torch.Tensor], encode: TokenEncoder, config: UCEConfig, *,
              arch: str = "sd1", component: str = "unet", base_hash: str | None = None) -> ESDResult:
    """Run UCE on ``weights`` ``{canonical path: W_old [out, D]}`` of the attn2 to_k / to_v projections.

    Args:
        weights: the current (effective) weights, e.g. ``{p: host.modules("unet")[p].weight for p in …}`` or
            ComfyUI's patched weights. Not modified.
        encode: a :data:`TokenEncoder` for the model's text encoder (the context the UNet sees).
        config: :class:`UCEConfig`.
        arch: recorded in the metadata (``"sd1"`` / ``"sd2"``). base_hash: optional identifier of the base.

    Returns:
        :class:`~.config.ESDResult` with ``deltas`` ``{(component, path, "weight"): W_new − W_old}`` (fp32 CPU),
        no losses, ``stats`` (wall time, counts, how far the erased prompts' keys/values now are from their
        guides' and how far the preserved prompts' moved) and ``metadata`` (``method = "uce"``, prompts, kinds,
        scales).

    Raises ``ValueError`` for bad settings or embeddings whose width differs from the weights'.
    """
    started = time.perf_counter()
    if not weights:
        raise ValueError("no weights to edit")
    edit, guide, preserve, kinds = uce_prompts(config)
    E = last_token_embeddings(encode, edit)
    G = last_token_embeddings(encode, guide)
    P = last_token_embeddings(encode, preserve) if preserve else None
    if E.shape[1] != next(iter(weights.values())).shape[1]:
        raise ValueError(f"text embeddings are {E.shape[1]}-wide but the projections take "
                         f"{next(iter(weights.values())).shape[1]} inputs: the text encoder does not fit this UNet")
    right = uce_right_factor(E, P, config.erase_scale, config.preserve_scale, config.lamb)
    targets = []
    deltas: dict[tuple[str, str, str], torch.Tensor] = {}
    erase_res, preserve_drift = [], []
    for path in sorted(weights):
        W = weights[path].detach().float().cpu()
        d = uce_delta(W, E, G, right, config.erase_scale)
        new = W + d
        targets.append(Target(component, path, "weight", tuple(W.shape)))
        deltas[(component, path, "weight")] = d
        v_star = G @ W.T
        erase_res.append(float(((E @ new.T - v_star).norm(dim=1) / v_star.norm(dim=1).clamp_min(1e-12)).mean()))
        if P is not None:
            old_p = P @ W.T
            preserve_drift.append(float(((P @ new.T - old_p).norm(dim=1) / old_p.norm(dim=1).clamp_min(1e-12))
                                        .max()))
    if not deltas:
        raise ValueError("no weights to edit")
    n_params = sum(math.prod(t.shape) for t in targets)
    wall = time.perf_counter() - started
    stats = {
        "losses": [],
        "iterations_done": 0,
        "wall_time_s": wall,
        "trained_tensors": len(targets),
        "trained_parameters": n_params,
        "erase_relative_residual_mean": sum(erase_res) / len(erase_res),
        "preserve_relative_drift_max": max(preserve_drift) if preserve_drift else None,
        "edit_prompts": len(edit),
        "preserve_prompts": len(preserve),
    }
    meta = {
        "method": "uce",
        "reference": "rohitgandikota/unified-concept-editing trainscripts/uce_sd_erase.py (WACV 2024, Eq. 7)",
        "concepts": parse_concepts(config.concepts),
        "concept_kinds": kinds,
        "concept_kind_source": "user" if normalize_kind(config.concept_kind) != "auto" else "inferred",
        "prompts": edit,
        "guide_prompts": guide,
        "preserve_prompts": preserve,
        "erase_scale": float(config.erase_scale),
        "preserve_scale": float(config.preserve_scale),
        "lamb": float(config.lamb),
        "variations": int(config.variations),
        "seed": int(config.seed),
        "embedding": "text-encoder output at the last content token",
        "arch": arch,
        "base_model_hash": base_hash,
        "base_model_hash_kind": "sha256 of the edited tensors' base values" if base_hash else None,
        "trained_tensors": len(targets),
        "trained_parameters": n_params,
    }
    return ESDResult(deltas, targets, [], stats, meta)


def erase_uce_host(host, config: UCEConfig, encode: TokenEncoder | None = None) -> ESDResult:
    """UCE on a :class:`~..host.DiffusionHost`: its UNet's attn2 to_k / to_v weights (canonical paths of
    ``host.modules("unet")``) and, unless given, :func:`diffusers_token_encoder`. The host must have no deltas
    installed; its weights are not modified. Raises ``ValueError`` as :func:`erase_uce`."""
    from .erase import base_weights_hash

    if host.installed_deltas():
        raise ValueError("the host has trainable deltas installed; clear them first")
    mods = host.modules("unet")
    targets = uce_targets(mods)
    weights = {t.path: mods[t.path].weight for t in targets}
    return erase_uce(weights, encode or diffusers_token_encoder(host), config, arch=getattr(host, "arch", "sd1"),
                     base_hash=base_weights_hash(host, targets))
