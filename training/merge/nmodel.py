"""Merges of N models: Model Stock, DELLA, and N-model weighted sum / TIES / DARE / DELLA, per tensor and file to file.

Per-tensor methods (pure torch, float32 results, any shape):

* :func:`model_stock` -- Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models" (ECCV),
  Eq. 5 ``t = N·cosθ / (1 + (N − 1)·cosθ)``, ``W = t·W_avg + (1 − t)·W_0``; θ per row as in mergekit
  ``mergekit/merge_methods/model_stock.py`` and sd-mecha ``merge_methods/ties.py`` ``model_stock``.
* :func:`della` -- Deep et al. 2024, "DELLA-Merging: Reducing Interference in Model Merging through
  Magnitude-Based Sampling" (MAGPRUNE drop by magnitude rank, then TIES elect + disjoint mean); sampling as in
  sd-mecha ``ties_sum_with_dropout`` / ``find_della_dropout``.
* :func:`merge_tensor_n` -- one key of an N-model merge, shared by the file merge and the N-model node.

:func:`merge_checkpoints_n` streams N checkpoint files (plus an optional base) into one, with the same
pipeline as :func:`training.merge_files.merge_checkpoints` (one reader thread per input, a writer thread, input
SHA-256 from the buffers read, atomic output, the recipe in the metadata).

Why hand-written: see :mod:`training.merge` (the per-tensor formulas are a few lines; the libraries that have
them load whole models or are not usable as a library in a ComfyUI node).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch

from .methods import MethodOptions, check_alpha, dare, key_seed, ties, ties_fuse, weighted_sum_n

Tensor = torch.Tensor

METHODS_N = ("weighted_sum", "ties", "dare", "della", "model_stock")
#: methods of N models that need a base (the pre-trained model the N were fine-tuned from)
METHODS_N_NEED_BASE = ("ties", "dare", "della", "model_stock")


def model_stock(base: Tensor, tensors: Sequence[Tensor], cos_eps: float = 1e-6) -> Tensor:
    """Model Stock: ``base + t·mean_i(T_i − base)`` with ``t = N·c / (1 + (N − 1)·c)``.

    ``c`` is the cosine between the task vectors ``T_i − base``, per row of the last dimension (a 1-D tensor
    is one row; a 0-d tensor is treated as a 1-vector), averaged over all pairs (i < j) -- mergekit's choice;
    sd-mecha averages consecutive pairs only (identical for N = 2). Non-finite results (c near
    −1/(N − 1)) become 0, as in both references. Needs N ≥ 2 tensors shaped like ``base``. Returns float32.
    Raises ``ValueError`` for fewer than two models.
    Source: Jang et al. 2024 (Model Stock), Eq. 5; mergekit ``merge_methods/model_stock.py``; sd-mecha
    ``extensions/builtin/merge_methods/ties.py`` ``model_stock`` / ``get_model_stock_t``.
    """
    if len(tensors) < 2:
        raise ValueError(f"model_stock needs at least two fine-tuned models besides the base, got {len(tensors)}")
    base32 = base.to(torch.float32)
    shape = base32.shape
    if base32.dim() == 0:
        base32 = base32.reshape(1)
    deltas = [t.to(torch.float32).reshape(base32.shape) - base32 for t in tensors]
    n = len(deltas)
    cos = [torch.nn.functional.cosine_similarity(deltas[i], deltas[j], dim=-1, eps=cos_eps)
           for i in range(n) for j in range(i + 1, n)]
    cos_theta = torch.stack(cos).mean(dim=0)
    t = (n * cos_theta / (1 + (n - 1) * cos_theta)).unsqueeze(-1)
    w_avg = sum(deltas) / n
    return (base32 + torch.nan_to_num(t * w_avg)).reshape(shape)


def della_keep_probabilities(tau: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA's per-entry keep probabilities: ``density + ε·(rank/n − (n + 1)/(2n))``, clamped to [0, 1].

    ``rank`` is 1 for the smallest ``|τ|`` and n for the largest (ties in order of appearance), so the
    probabilities range over ``density ± ε/2`` and larger entries are kept more often. Returns float32
    shaped like ``tau``. Source: Deep et al. 2024 (DELLA), MAGPRUNE; computed as sd-mecha
    ``merge_methods/ties.py`` ``find_della_dropout`` does (``scipy.stats.rankdata(method="ordinal")``).
    """
    t = tau.to(torch.float32)
    keep = torch.ones_like(t) - (1.0 - float(density))
    if float(epsilon) == 0.0 or t.numel() == 0:
        return keep.clamp(min=0, max=1)
    n = t.numel()
    # |τ| ≥ 0, so its float32 bit patterns read as int32 sort in the same order; torch sorts int32 with a radix
    # sort, ~5× faster than a float argsort (same stable order, so the ranks equal scipy's "ordinal" ranks)
    order = torch.sort(t.abs().reshape(-1).contiguous().view(torch.int32), stable=True).indices
    rank = torch.empty(n, dtype=torch.int64).index_copy_(0, order, torch.arange(1, n + 1, dtype=torch.int64))
    shift = (rank.reshape(t.shape).to(t.device) / n - (n + 1) / (n * 2)) * float(epsilon)
    return (keep + torch.nan_to_num(shift, nan=0, posinf=0, neginf=0)).clamp(min=0, max=1)


def della(base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float], density: float = 0.2,
          epsilon: float = 0.1, generator: torch.Generator | None = None, sign: str = "sum",
          rescale: str = "element", scale: float = 1.0) -> Tensor:
    """DELLA merge: magnitude-ranked random drop (MAGPRUNE), TIES sign election and disjoint mean, rescale.

    For each model i (in order, one ``generator`` for all): ``τ_i = T_i − base``; keep each entry with
    probability :func:`della_keep_probabilities` ``(τ_i, density, ε)`` (``torch.bernoulli``). ``rescale``:
    ``"element"`` divides each kept entry by its own keep probability before the merge (unbiased: E = τ_i;
    the paper's MAGPRUNE, mergekit); ``"global"`` divides the merged vector by ``density`` (sd-mecha
    ``ties_sum_with_dropout``). Then :func:`training.merge.ties_fuse` with weights ``w_i`` and ``sign``
    ("sum": the paper's sign of the summed vectors; "count": sd-mecha's default vote). Result
    ``base + scale·τ_m``. ``density`` in (0, 1]; ``epsilon`` in [0, 1]. Returns float32.
    Raises ``ValueError`` on bad counts or ranges.
    Source: Deep et al. 2024, "DELLA-Merging" (arXiv 2406.11617), §3; sd-mecha
    ``extensions/builtin/merge_methods/ties.py`` ``ties_sum_with_dropout``.
    """
    if not tensors or len(tensors) != len(weights):
        raise ValueError(f"need one weight per model, got {len(tensors)} models and {len(weights)} weights")
    if not 0.0 < float(density) <= 1.0:
        raise ValueError(f"DELLA density must be in (0, 1], got {density}")
    if not 0.0 <= float(epsilon) <= 1.0:
        raise ValueError(f"DELLA epsilon must be in [0, 1], got {epsilon}")
    if rescale not in ("element", "global"):
        raise ValueError(f"rescale must be 'element' or 'global', got {rescale!r}")
    g = generator if generator is not None else torch.Generator(device="cpu").manual_seed(0)
    base32 = base.to(torch.float32)
    dropped = []
    for t, w in zip(tensors, weights):
        tau = t.to(torch.float32) - base32
        probs = della_keep_probabilities(tau, density, epsilon)
        mask = torch.bernoulli(probs.cpu(), generator=g).to(tau.device)
        kept = tau * mask
        if rescale == "element":
            kept = torch.where(mask > 0, kept / torch.where(probs > 0, probs, torch.ones_like(probs)), kept)
        dropped.append(kept * float(w))
    s = float(scale) if rescale == "element" else float(scale) / float(density)
    return ties_fuse(base32, dropped, weights, scale=s, sign=sign)


def merge_tensor_n(method: str, key: str, tensors: Sequence[Tensor], weights: Sequence[float],
                   base: Tensor | None = None, density: float = 0.2, seed: int = 0,
                   options: MethodOptions | None = None) -> Tensor:
    """One key of an N-model merge (float32 result).

    * weighted_sum: ``Σ w_i·T_i`` (no base);
    * ties / dare / della: task vectors ``T_i − base`` with weights ``w_i`` (TIES / DELLA: weighted disjoint
      mean; DARE: ``Σ w_i·DARE(τ_i)``, task arithmetic);
    * model_stock: ``base`` and the ``T_i`` (weights unused).
    DARE masks use :func:`training.merge.key_seed` ``(seed, key, i)``; DELLA one generator seeded with
    ``key_seed(seed, key, 0)``. Raises ``ValueError`` for an unknown method or a missing base.
    """
    opts = options or MethodOptions()
    if method == "weighted_sum":
        return weighted_sum_n(tensors, weights, warn=False)
    if method not in METHODS_N:
        raise ValueError(f"unknown N-model merge method {method!r}; choose one of {', '.join(METHODS_N)}")
    if base is None:
        raise ValueError(f"{method} needs a base model (the model the others were fine-tuned from)")
    if method == "model_stock":
        return model_stock(base, tensors)
    if method == "ties":
        return ties(base, tensors, weights, density=density, sign=opts.ties_sign)
    if method == "dare":
        return dare(base, tensors, weights, density=density, seed=seed, key=key)
    g = torch.Generator(device="cpu").manual_seed(key_seed(seed, key, 0))
    return della(base, tensors, weights, density=density, epsilon=opts.della_epsilon, generator=g,
                 sign=opts.ties_sign, rescale=opts.della_rescale)


def parse_weights(text: str | Sequence[float] | None, n: int) -> list[float]:
    """Weights for ``n`` models from a comma list (``"0.5, 0.3, 0.2"``) or a sequence; empty/None = ``1/n``
    each. Raises ``ValueError`` when the count differs or a value is not a finite number; warns (UserWarning)
    when they do not sum to 1 or one lies outside [0, 1]."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return [1.0 / n] * n
    parts = [p.strip() for p in text.replace(";", ",").split(",") if p.strip()] if isinstance(text, str) else list(text)
    vals = []
    for i, p in enumerate(parts):
        try:
            v = float(p)
        except (TypeError, ValueError):
            raise ValueError(f"weight {i + 1}: {p!r} is not a number") from None
        check_alpha(v, f"weight {i + 1}")
        vals.append(v)
    if len(vals) != n:
        raise ValueError(f"{n} models need {n} weights, got {len(vals)} ({', '.join(map(str, vals))})")
    total = sum(vals)
    if abs(total - 1.0) > 1e-6:
        warnings.warn(f"weights sum to {total:g}, not 1: the merged weights are scaled by {total:g}",
                      UserWarning, stacklevel=2)
    return vals


# ----------------------------------------------------------------------------------------------------
# file to file
# ----------------------------------------------------------------------------------------------------
def merge_checkpoints_n(models: Sequence[str | os.PathLike], output: str | os.PathLike,
                        weights: Sequence[float] | str | None = None, method: str = "weighted_sum",
                        base: str | os.PathLike | None = None, density: float = 0.2, seed: int = 0,
                        dtype: str = "fp16", te: str = "merge", vae: str = "a", overwrite: bool = False,
                        hash_inputs: bool = True, options: MethodOptions | None = None,
                        progress: Callable[[int, int], None] | None = None, hash_cache: bool = True):
    """Merge N ≥ 2 checkpoint files (+ a base for TIES / DARE / DELLA / Model Stock) into ``output``.

    Args:
        models: checkpoint files (safetensors; ``.ckpt``/``.pt`` read with ``weights_only=True``); the output has
            the first model's keys, in its order.
        weights: one per model (comma string or sequence); default ``1/N`` each (see :func:`parse_weights`).
        method: one of :data:`METHODS_N`; ``base`` required for all but weighted_sum.
        density, seed, options, hash_inputs, hash_cache: as in :func:`training.merge_files.merge_checkpoints`.
        te: ``"merge"`` (text encoders merged like the UNet) or ``"a"`` (from the first model); vae: ``"a"``
            (default, the first model's) or ``"merge"``.
    Key rules: a key missing from any model (or the base) and non-floating / other keys come from the first
    model (reported); shapes must agree (``ValueError`` before anything is written); architectures must agree.
    Returns a :class:`training.merge_files.MergeReport`. Raises FileExistsError, FileNotFoundError, ValueError,
    ``formats.safetensors_io.WeightFileError``, OSError (no partial file is left on any error or cancel).
    """
    from ...formats.safetensors_io import SafetensorsStreamWriter, WeightFile, parse_dtype
    from . import files as MF

    if method not in METHODS_N:
        raise ValueError(f"unknown N-model merge method {method!r}; choose one of {', '.join(METHODS_N)}")
    models = [Path(m) for m in models]
    if len(models) < 2:
        raise ValueError(f"an N-model merge needs at least two models, got {len(models)}")
    if method in METHODS_N_NEED_BASE and base is None:
        raise ValueError(f"{method} needs --base: the model the others were fine-tuned from")
    if method == "model_stock" and weights is not None and not (isinstance(weights, str) and not weights.strip()):
        raise ValueError("model_stock does not take weights (its ratio is computed from the angle between models)")
    report = MF.MergeReport(output=None, method=f"{method} (N={len(models)})")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        w = parse_weights(weights, len(models))
    report.warnings += [str(c.message) for c in caught]
    if te not in ("merge", "a") or vae not in ("merge", "a"):
        raise ValueError(f"te and vae must be 'merge' or 'a', got te={te!r}, vae={vae!r}")
    out_path = Path(output)
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path} already exists (pass overwrite / --overwrite to replace it)")
    out_dtype = parse_dtype(dtype)
    paths = {f"M{i + 1}": p for i, p in enumerate(models)}
    if base is not None:
        paths["base"] = Path(base)
    for tag, p in paths.items():
        if p.resolve() == out_path.resolve():
            raise ValueError(f"output {out_path} is the same file as input {tag}")
    files = {tag: WeightFile(p) for tag, p in paths.items()}
    srcs = {tag: MF._Source(f) for tag, f in files.items()}
    try:
        first = srcs["M1"]
        arch = MF._detect_arch(first)
        for tag, src in srcs.items():
            other = MF._detect_arch(src)
            if other != arch:
                raise ValueError(f"model M1 is {arch} but {tag} ({paths[tag].name}) is {other}: models of different "
                                 "architectures cannot be merged")
        report.arch = arch
        jobs, mismatches = [], []
        from ...formats.keys import split_component

        for k in first.keys():
            dt, shape = first.dtype(k), first.shape(k)
            comp = split_component(k)[0]
            wanted = dt.is_floating_point and (comp == "unet" or (comp in ("te", "te1", "te2") and te == "merge")
                                               or (comp == "vae" and vae == "merge"))
            action = "a"
            if wanted:
                missing = [t for t, s in srcs.items() if not s.has(k)]
                if missing:
                    report.only_a.append(k)
                else:
                    bad = [t for t, s in srcs.items() if s.shape(k) != shape]
                    if bad:
                        mismatches.append(f"{k} ({', '.join(f'{t} {list(srcs[t].shape(k))}' for t in ['M1'] + bad)})")
                    else:
                        action = "merge"
            jobs.append(MF._KeyJob(k, action, None, out_dtype if dt.is_floating_point else dt, shape))
        if mismatches:
            raise ValueError("inputs have different tensor shapes: " + "; ".join(mismatches[:5]) +
                             (f" and {len(mismatches) - 5} more" if len(mismatches) > 5 else ""))
        report.keys_total = len(jobs)
        report.merged = sum(j.action == "merge" for j in jobs)
        report.from_a = report.keys_total - report.merged
        dtype_name = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}.get(out_dtype, str(dtype))
        from ... import __version__

        inputs = {tag: {"name": p.name, "sha256": MF._placeholder(tag) if hash_inputs else None}
                  for tag, p in paths.items()}
        recipe = {"format": MF.RECIPE_FORMAT, "tool": f"conceptlab {__version__}", "method": method,
                  "models": len(models), "weights": None if method == "model_stock" else w, "arch": arch,
                  "text_encoder": te, "vae": vae, "dtype": dtype_name, "inputs": inputs,
                  **(options or MethodOptions()).describe(method)}
        if method in ("ties", "dare", "della"):
            recipe["density"] = float(density)
        if method in ("dare", "della"):
            recipe["seed"] = int(seed)
        metadata = {MF.RECIPE_KEY: json.dumps(recipe, sort_keys=True), **MF._modelspec(arch, out_path.stem, first)}
        cached = MF._cached_hashes(paths) if hash_inputs and hash_cache else {}
        for tag, src in srcs.items():
            src.reader = MF._fast_reader(src, hash_file=hash_inputs and tag not in cached)
        if first.reader is not None:
            jobs.sort(key=lambda j: first.reader.data_offset(j.key))
        hasher = None
        if hash_inputs:
            rest = {t: paths[t] for t, s in srcs.items() if s.reader is None and t not in cached}
            if rest:
                hasher = MF._Hasher(rest)
                hasher.start()
        specs = {j.key: (j.out_dtype, j.shape) for j in jobs}
        tags = list(srcs)
        try:
            with SafetensorsStreamWriter(out_path, specs, metadata=metadata, overwrite=overwrite) as writer:
                pool = MF._BufferPool()

                def reader_for(tag):
                    src = srcs[tag]
                    if tag == "M1":
                        return lambda j: src.get(j.key, pool)
                    return lambda j: src.get(j.key, pool) if j.action == "merge" else None

                readers = [(reader_for(t), srcs[t].reader.finish_hash if srcs[t].reader is not None else None)
                           for t in tags]
                n_models = len(models)

                def compute(j, ts):
                    if j.action != "merge":
                        return ts[0].to(j.out_dtype)
                    b = ts[n_models] if base is not None else None
                    out = merge_tensor_n(method, j.key, list(ts[:n_models]), w, base=b, density=density, seed=seed,
                                         options=options)
                    return out.to(j.out_dtype)

                def write(key, tensor):
                    writer.write(key, tensor)
                    pool.release(key)

                memory_bound = method == "weighted_sum"
                workers = MF.compute_workers(memory_bound)
                with MF._torch_threads(MF.arithmetic_threads(workers, len(readers) + 1, memory_bound)):
                    MF._pipeline(jobs, readers, compute, write, progress, workers=workers)
                hashes = MF._collect_hashes(srcs, cached, hasher, paths, hash_inputs=hash_inputs,
                                            hash_cache=hash_cache)
                MF._patch_hashes(writer, hashes)
                for t, h in hashes.items():
                    recipe["inputs"][t]["sha256"] = h
        except OSError as exc:
            renamed = MF._name_output(exc, out_path)
            if renamed is exc:
                raise
            raise renamed from exc
        finally:
            if hasher is not None:
                hasher.stop()
        report.recipe = recipe
        report.output = str(out_path)
        return report
    finally:
        for s in srcs.values():
            if s.reader is not None:
                s.reader.close()
        for f in files.values():
            f.close()
