"""Weight diffs of model files: two checkpoints, a checkpoint and a LoRA (B = A + strength·ΔW), or two LoRAs
(:func:`diff_files`), and of any two readers of weights (:func:`diff_sources`, also what ComfyUI's MODEL / CLIP diff
uses). Keys are put in one spelling per family (:func:`canonical_keys`; Flux files in any of the layouts users
exchange), mismatched families and shapes are refused by name, and the pairs stream into
:func:`.weight_diff.diff_pairs`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import torch

from ..formats.safetensors_io import WeightFileError
from .diff_stats import MANTISSA_BITS, ShapeMismatchError, coarser_dtype, dtype_name
from .weight_diff import ArchitectureMismatchError, DiffOptions, TensorPair, diff_pairs


def looks_like_lora(keys: Iterable[str]) -> bool:
    """True when at least half the tensor names end like LoRA tensors (the suffix table of
    ``formats.lora_files.SUFFIXES``: kohya ``lora_down/lora_up/alpha``, peft ``lora_A/lora_B``, LoHa/LoKr,
    ``.diff``/``.diff_b`` full-rank deltas)."""
    from ..formats.lora_files import SUFFIXES

    keys = list(keys)
    if not keys:
        return False
    ends = tuple(SUFFIXES)
    hits = sum(1 for k in keys if k.endswith(ends))
    return hits >= max(1, (len(keys) + 1) // 2)


_DIFFUSERS_UNET_HEADS = ("down_blocks.", "up_blocks.", "mid_block.", "conv_in.", "conv_out.", "conv_norm_out.",
                         "time_embedding.", "add_embedding.", "class_embedding.")


def canonical_keys(keys: Iterable[str], arch: str) -> dict[str, str]:
    """Map a file's tensor names to canonical single-file LDM keys: ``diffusion_model.*`` (ComfyUI state dicts)
    → ``model.diffusion_model.*``; bare or ``unet.``-prefixed diffusers UNet names → LDM names via
    ``formats.ldm_keys.diffusers_to_ldm_unet`` (diffusers' own converter). Other keys are kept.

    Returns ``canonical key -> original key``. Raises ``ValueError`` if two names map to the same key.
    """
    from ..formats.ldm_keys import diffusers_to_ldm_unet

    keys = list(keys)
    d2l = None
    out: dict[str, str] = {}
    for k in keys:
        c = k
        if k.startswith("diffusion_model."):
            c = "model." + k
        else:
            rel = k[len("unet."):] if k.startswith("unet.") else k
            if rel.startswith(_DIFFUSERS_UNET_HEADS) and arch in ("sd1", "sd2", "sdxl"):
                if d2l is None:
                    d2l = diffusers_to_ldm_unet(arch)
                if rel in d2l:
                    c = "model.diffusion_model." + d2l[rel]
        if c in out:
            raise ValueError(f"two tensors map to the same key {c!r}: {out[c]!r} and {k!r}")
        out[c] = k
    return out


def _file_info(reader, kind: str, arch: str, fmt: str | None = None) -> dict:
    info = {"name": reader.name, "kind": kind, "arch": arch}
    if getattr(reader, "path", None) is not None:
        info["path"] = str(reader.path)
    counts: dict[str, int] = {}
    params = 0
    for k in reader.keys():
        n = 1
        for s in reader.shape(k):
            n *= int(s)
        dn = dtype_name(_stored_dtype(reader, k))
        counts[dn] = counts.get(dn, 0) + n
        params += n
    info["file_dtype_params"] = counts
    info["file_dtype"] = max(counts, key=counts.get) if counts else None
    info["file_tensors"] = len(reader.keys())
    info["file_params"] = params
    if getattr(reader, "format", None):
        info["format"] = reader.format
    if fmt is not None:
        info["lora_format"] = fmt
    return info


def _arch_mismatch(name_a: str, arch_a: str, name_b: str, arch_b: str, only_a: list[str], only_b: list[str],
                   shape_diff: list[str]) -> ArchitectureMismatchError:
    bits = [f"cannot diff {name_a} ({arch_a}) against {name_b} ({arch_b}): different model architectures"]
    if only_a:
        bits.append(f"keys only in {name_a}: " + ", ".join(only_a[:3]) + (" ..." if len(only_a) > 3 else ""))
    if only_b:
        bits.append(f"keys only in {name_b}: " + ", ".join(only_b[:3]) + (" ..." if len(only_b) > 3 else ""))
    if shape_diff:
        bits.append("same keys, different shapes: " + "; ".join(shape_diff[:3]))
    return ArchitectureMismatchError(". ".join(bits))


def _shape_lines(keys: list[str], sa, sb) -> list[str]:
    return [f"{k} {tuple(sa(k))} vs {tuple(sb(k))}" for k in keys]


def _arch_of_reader(r) -> str:
    from ..formats.keys import detect_architecture

    keys = r.keys()
    shapes = {k: r.shape(k) for k in keys if "attn2" in k and "to_k" in k}
    return detect_architecture(keys, shapes)


def _flux_canonical(reader, arch: str):
    """A Flux checkpoint in any layout (BFL, ComfyUI, diffusers) seen under canonical ``model.diffusion_model.``
    BFL keys, split q/k/v fused (``formats.flux_views.FluxKeyView``); other readers unchanged."""
    if arch != "flux":
        return reader
    from ..formats.flux_views import FluxKeyView

    return FluxKeyView(reader)


def _load_lora(path: Path, strength: float, arch: str | None, flux_dims=None):
    from ..formats.lora_files import LoraFormatError, lora_deltas

    try:
        ld = lora_deltas(path, strength=strength, arch=arch, flux_dims=flux_dims)
    except LoraFormatError as exc:
        msg = str(exc)
        raise ValueError(msg if path.name in msg else f"{path.name}: {msg}") from None
    if not ld.deltas:
        why = ""
        if ld.skipped:
            items = list(ld.skipped.items())[:3]
            why = " (skipped: " + "; ".join(f"{k}: {v}" for k, v in items) + ")"
        raise ValueError(f"{path.name}: the LoRA holds no weight changes that can be decoded{why}")
    return ld


def diff_files(path_a: str | os.PathLike, path_b: str | os.PathLike, *, lora_strength: float = 1.0,
               options: DiffOptions | None = None, allow_shape_mismatch: bool = False,
               progress: Callable[[int, int], None] | None = None) -> dict:
    """Diff two weight files (checkpoint vs checkpoint, checkpoint vs LoRA, LoRA vs LoRA) in one streamed pass.

    Args:
        path_a, path_b: ``.safetensors`` (or weights-only ``.ckpt/.pt/.bin``) checkpoints or LoRA files, or diffusers
            model folders (``transformer/``, sharded or not; a pipeline folder means its ``transformer/``). Flux
            checkpoints in BFL, ComfyUI and diffusers layouts line up (``formats.flux_keys``). Kinds are
            detected from tensor names. With one checkpoint and one LoRA the checkpoint is the base (A) and
            B = A + ``lora_strength``·ΔW, whichever order they were given in.
        lora_strength: multiplier of every LoRA ΔW (kohya/ComfyUI semantics: ΔW = strength·alpha/rank·up·down).
        options: :class:`.weight_diff.DiffOptions`.
        allow_shape_mismatch: list same-name tensors with different shapes (``shape_mismatch``) and skip them
            instead of raising.
        progress: ``progress(done, total)`` callback.

    Returns:
        The report dict (see :func:`.weight_diff.diff_pairs`).

    Raises:
        FileNotFoundError; WeightFileError (corrupt/truncated/pickle-only file); ArchitectureMismatchError
        (e.g. SD1.5 vs SDXL: names both architectures and a few mismatched keys); ShapeMismatchError;
        ValueError (empty LoRA, nothing in common).
    """
    from .diff_io import StreamingWeights

    from ..formats.weight_folders import open_weight_source

    pa, pb = Path(path_a), Path(path_b)
    ra = open_weight_source(pa, StreamingWeights)  # a diffusers model folder (shards) reads as one file
    try:
        rb = open_weight_source(pb, StreamingWeights)
    except BaseException:
        ra.close()
        raise
    try:
        for r in (ra, rb):
            if not r.keys():
                raise WeightFileError(f"{r.path.name}: holds no tensors")
        lora_a, lora_b = looks_like_lora(ra.keys()), looks_like_lora(rb.keys())
        if not lora_a and not lora_b:
            return diff_sources(ra, rb, options=options, allow_shape_mismatch=allow_shape_mismatch,
                                progress=progress)
        if lora_a and lora_b:
            return _diff_loras(ra, rb, lora_strength, options, progress)
        ck, lo = (rb, ra) if lora_a else (ra, rb)
        return _diff_checkpoint_lora(ck, lo, lora_strength, options, progress, swapped=lora_a)
    finally:
        ra.close()
        rb.close()


def _stored_dtype(src, key: str) -> torch.dtype:
    try:
        return src.dtype(key)
    except Exception:  # noqa: BLE001 - sources without dtype info
        return torch.float32


def diff_sources(ra, rb, *, options: DiffOptions | None = None, allow_shape_mismatch: bool = False,
                 progress: Callable[[int, int], None] | None = None, mode: str = "checkpoints",
                 kind: str = "checkpoint", a_info: Mapping | None = None, b_info: Mapping | None = None) -> dict:
    """Diff two tensor sources key by key (two checkpoints, or two ComfyUI MODEL/CLIP weight readers).

    Args:
        ra, rb: sources with ``name`` (str), ``keys()``, ``shape(key)``, ``dtype(key)`` (stored dtype),
            ``get(key) -> Tensor`` and ``release(key)`` (called when the pair is done; may free memory), e.g.
            :class:`.diff_io.StreamingWeights`. ``get`` may return float32 values of a lower-precision stored
            weight (patched weights): changes that vanish in the stored dtype are then counted
            (``below_resolution``), as they are when the two files' dtypes differ.
        options, progress: see :func:`.weight_diff.diff_pairs`.
        allow_shape_mismatch: list and skip same-name tensors of different shapes instead of raising.
        mode, kind: labels in the report; a_info / b_info: extra fields for the ``a`` / ``b`` descriptions.

    Key names are canonicalised (:func:`canonical_keys`), so an LDM single file, a ComfyUI-saved file, a ComfyUI
    MODEL state dict and a diffusers UNet file of the same model line up. When one side's keys are a strict
    subset of the other's (a partial file such as an ESD or UNet-only output), the missing tensors are counted
    as unchanged and the report says so.

    Raises:
        ArchitectureMismatchError: the sides are different families (names both and a few mismatched keys).
        ShapeMismatchError: same-name tensors with different shapes (unless ``allow_shape_mismatch``).
        ValueError: no key in common.
    """
    arch_a, arch_b = _arch_of_reader(ra), _arch_of_reader(rb)
    file_a, file_b = ra, rb
    ra, rb = _flux_canonical(ra, arch_a), _flux_canonical(rb, arch_b)
    ca = canonical_keys(ra.keys(), arch_a)
    cb = canonical_keys(rb.keys(), arch_b)
    only_a = [k for k in ca if k not in cb]
    only_b = [k for k in cb if k not in ca]
    common = [k for k in ca if k in cb]
    shape_diff = [k for k in common if tuple(ra.shape(ca[k])) != tuple(rb.shape(cb[k]))]
    na, nb = ra.name, rb.name
    if arch_a != arch_b and "unknown" not in (arch_a, arch_b):
        raise _arch_mismatch(na, arch_a, nb, arch_b, only_a, only_b,
                             _shape_lines(shape_diff, lambda k: ra.shape(ca[k]), lambda k: rb.shape(cb[k])))
    arch = arch_a if arch_a != "unknown" else arch_b
    if not common:
        raise ValueError(f"{na} and {nb} have no tensor names in common (e.g. {only_a[:2]} vs {only_b[:2]}); "
                         "they are not two versions of one model")
    if shape_diff and not allow_shape_mismatch:
        raise ShapeMismatchError(
            f"{len(shape_diff)} tensors have the same name but different shapes in {na} and {nb}: "
            + "; ".join(_shape_lines(shape_diff[:5], lambda k: ra.shape(ca[k]), lambda k: rb.shape(cb[k])))
            + (" ..." if len(shape_diff) > 5 else "") + " (use --skip-mismatched to diff the rest)")
    notes = []
    partial_b = bool(only_a) and not only_b
    partial_a = bool(only_b) and not only_a
    if partial_b:
        notes.append(f"{nb} holds {len(common)} of {na}'s {len(ca)} tensors: a partial file (e.g. an ESD or "
                     f"UNet-only output). The rest is unchanged: the {len(only_a)} missing tensors are counted as "
                     "identical to A.")
    elif partial_a:
        notes.append(f"{na} holds {len(common)} of {nb}'s {len(cb)} tensors: a partial file. The rest is "
                     f"unchanged: the {len(only_b)} missing tensors are counted as identical to B.")
    elif only_a or only_b:
        notes.append(f"{len(only_a)} tensors only in A and {len(only_b)} only in B are listed but not compared.")
    if shape_diff:
        notes.append(f"{len(shape_diff)} tensors with different shapes were skipped (see shape_mismatch).")
    skip = set(shape_diff)

    def as_float(t: torch.Tensor) -> torch.Tensor:
        return t if t.is_floating_point() else t.double()

    def done_cb(*pairs_of_src_key):
        def cb():
            for src, key in pairs_of_src_key:
                src.release(key)
        return cb

    def gen() -> Iterator[TensorPair]:
        for k in list(ca) + (only_b if partial_a else []):
            if k in skip:
                continue
            if k in cb and k in ca:
                ka, kb = ca[k], cb[k]
                for src, key in ((ra, ka), (rb, kb)):
                    if hasattr(src, "prefetch"):
                        src.prefetch(key)
                a, b = ra.get(ka), rb.get(kb)
                cbk = done_cb((ra, ka), (rb, kb))
                if not (a.is_floating_point() and b.is_floating_point()):
                    yield TensorPair(k, as_float(a), as_float(b), on_done=cbk)
                else:
                    sa, sb = _stored_dtype(ra, ka), _stored_dtype(rb, kb)
                    rd = None
                    if sa != sb or a.dtype != sa or b.dtype != sb:
                        rd = coarser_dtype(sa, sb) if sa.is_floating_point and sb.is_floating_point else None
                        if rd is not None and MANTISSA_BITS.get(rd, 64) >= max(
                                MANTISSA_BITS.get(a.dtype, 64), MANTISSA_BITS.get(b.dtype, 64)):
                            rd = None  # values are not finer than the storage: nothing can vanish
                    yield TensorPair(k, a, b, resolution_dtype=rd, on_done=cbk)
            elif k in ca:  # only in A
                if partial_b:
                    a = as_float(ra.get(ca[k]))
                    yield TensorPair(k, a, a, only_in="a", on_done=done_cb((ra, ca[k])))
                else:
                    yield TensorPair(k, only_in="a", shape=tuple(ra.shape(ca[k])))
            else:  # only in B, A partial
                b = as_float(rb.get(cb[k]))
                yield TensorPair(k, b, b, only_in="b", on_done=done_cb((rb, cb[k])))
        if not partial_a:
            for k in only_b:
                yield TensorPair(k, only_in="b", shape=tuple(rb.shape(cb[k])))

    total = len(ca) + len(only_b)
    extra = {"shape_mismatch": _shape_lines(shape_diff, lambda k: ra.shape(ca[k]), lambda k: rb.shape(cb[k])),
             "partial": "b" if partial_b else ("a" if partial_a else None)}
    info_a = _file_info(file_a, kind, arch_a)
    info_a.update(a_info or {})
    info_b = _file_info(file_b, kind, arch_b)
    info_b.update(b_info or {})
    return diff_pairs(gen(), arch=arch, options=options, mode=mode, a_info=info_a, b_info=info_b, notes=notes,
                      progress=progress, total=total, extra=extra)


def _diff_checkpoint_lora(ck, lo, strength, options, progress, swapped: bool) -> dict:
    arch = _arch_of_reader(ck)
    ck_file, ck = ck, _flux_canonical(ck, arch)
    ld = _load_lora(lo.path, strength, arch if arch != "unknown" else None, getattr(ck, "dims", None))
    cmap = canonical_keys(ck.keys(), arch)
    deltas = dict(ld.deltas)
    missing = [k for k in deltas if k not in cmap]
    if len(missing) == len(deltas):
        lora_arch = ld.arch if hasattr(ld, "arch") else _arch_of_reader(lo)
        raise _arch_mismatch(ck.path.name, arch, lo.path.name, lora_arch, [], missing, [])
    bad = [k for k in deltas if k in cmap and tuple(deltas[k].shape) != tuple(ck.shape(cmap[k]))]
    if bad:
        raise ShapeMismatchError(
            f"{lo.path.name}: {len(bad)} LoRA targets do not fit {ck.path.name}'s shapes: "
            + "; ".join(f"{k} ΔW {tuple(deltas[k].shape)} vs weight {tuple(ck.shape(cmap[k]))}" for k in bad[:5]))
    notes = [f"B = A + {strength:g} × ΔW of {lo.path.name} ({ld.format} LoRA, {len(deltas)} target weights); "
             f"weights the LoRA does not touch are identical."]
    if swapped:
        notes.append("The files were given as LoRA, checkpoint: the checkpoint is taken as the base (A).")
    if missing:
        notes.append(f"{len(missing)} LoRA targets are not in the checkpoint (listed in only_in_b, not compared).")
    if ld.skipped:
        notes.append(f"{len(ld.skipped)} LoRA entries could not be decoded and are ignored: "
                     + "; ".join(f"{k}: {v}" for k, v in list(ld.skipped.items())[:3]))

    def gen() -> Iterator[TensorPair]:
        for c, k in cmap.items():
            a = ck.get(k)
            if not a.is_floating_point():
                a = a.float()
            d = deltas.pop(c, None)
            rel = (lambda key=k: ck.release(key))
            if d is None:
                yield TensorPair(c, a, a, on_done=rel)
            else:
                yield TensorPair(c, a, delta=d, resolution_dtype=a.dtype, on_done=rel)
        for k in missing:
            yield TensorPair(k, only_in="b", shape=tuple(ld.deltas[k].shape))

    info_b = {"name": f"{ck.name} + {strength:g}×{lo.name}", "kind": "checkpoint+lora",
              "lora": _file_info(lo, "lora", arch, fmt=ld.format), "lora_strength": strength}
    return diff_pairs(gen(), arch=arch, options=options, mode="checkpoint+lora",
                      a_info=_file_info(ck_file, "checkpoint", arch), b_info=info_b, notes=notes,
                      progress=progress, total=len(cmap) + len(missing),
                      extra={"lora_strength": strength, "skipped_lora_keys": dict(ld.skipped), "partial": None,
                             "shape_mismatch": []})


def _diff_loras(ra, rb, strength, options, progress) -> dict:
    la = _load_lora(ra.path, strength, None)
    lb = _load_lora(rb.path, strength, None)
    from ..formats.keys import detect_architecture

    da, db = la.deltas, lb.deltas
    arch_a = detect_architecture(ra.keys(), {k: ra.shape(k) for k in ra.keys() if "attn2" in k})
    arch_b = detect_architecture(rb.keys(), {k: rb.shape(k) for k in rb.keys() if "attn2" in k})
    only_a = [k for k in da if k not in db]
    only_b = [k for k in db if k not in da]
    common = [k for k in da if k in db]
    shape_diff = [k for k in common if tuple(da[k].shape) != tuple(db[k].shape)]
    if arch_a != arch_b and "unknown" not in (arch_a, arch_b):
        raise _arch_mismatch(ra.path.name, arch_a, rb.path.name, arch_b, only_a, only_b,
                             _shape_lines(shape_diff, lambda k: da[k].shape, lambda k: db[k].shape))
    if shape_diff:
        raise ShapeMismatchError(f"{len(shape_diff)} LoRA targets have different shapes: "
                                 + "; ".join(_shape_lines(shape_diff[:5], lambda k: da[k].shape,
                                                          lambda k: db[k].shape)))
    arch = arch_a if arch_a != "unknown" else arch_b
    notes = [f"Both inputs are LoRAs (strength {strength:g}): A and B are their ΔW; rel_change is ‖ΔW_B − ΔW_A‖ / "
             "‖ΔW_A‖ and cosine compares the two ΔW. A weight only one LoRA touches has ΔW = 0 on the other side."]

    def gen() -> Iterator[TensorPair]:
        for k in list(da) + only_b:
            a, b = da.get(k), db.get(k)
            yield TensorPair(k, a, b, only_in="a" if b is None else ("b" if a is None else None))

    return diff_pairs(gen(), arch=arch, options=options, mode="loras",
                      a_info=_file_info(ra, "lora", arch_a, fmt=la.format),
                      b_info=_file_info(rb, "lora", arch_b, fmt=lb.format), notes=notes,
                      progress=progress, total=len(da) + len(only_b),
                      extra={"lora_strength": strength, "partial": None, "shape_mismatch": [],
                             "skipped_lora_keys": {**{f"A:{k}": v for k, v in la.skipped.items()},
                                                   **{f"B:{k}": v for k, v in lb.skipped.items()}}})
