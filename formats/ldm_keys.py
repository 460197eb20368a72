"""LDM <-> diffusers names, computed by diffusers' own converters (UNet parameters of SD1 / SD2 / SDXL, and the
OpenCLIP text towers of SD2 / SDXL against HF CLIP).

* :func:`ldm_to_diffusers_unet` / :func:`diffusers_to_ldm_unet` - UNet parameter names, LDM (``input_blocks.1.1...``)
  <-> diffusers (``down_blocks.0.attentions.0...``). The mapping is *computed by diffusers' own converter*
  (``diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint``, with the UNet config from
  ``create_unet_diffusers_config_from_ldm``, :func:`unet_config_for`): we feed it a state dict of distinct
  one-element tensors and read the name mapping back from the tensor values, then check that the result is exactly
  the key set of a ``UNet2DConditionModel`` built from that config on the ``meta`` device.
* :func:`openclip_ldm_to_hf` - OpenCLIP (SD2 / SDXL te2) LDM names <-> HF CLIP names, recovered the same way from
  diffusers' ``convert_open_clip_checkpoint`` (fused ``in_proj_weight`` rows -> ``q_proj``/``k_proj``/``v_proj``).

Used by :mod:`formats.kohya_keys` (checkpoint targets of kohya LoRA names) and the loaders. Nothing here reads
tensors from disk or imports ComfyUI.
"""

from __future__ import annotations

import functools
import warnings
from typing import Mapping

__all__ = ["unet_config_for", "ldm_unet_keys", "diffusers_unet_keys", "ldm_to_diffusers_unet", "diffusers_to_ldm_unet",
           "openclip_ldm_to_hf"]


# ---------------------------------------------------------------------------------------------------------------
# LDM <-> diffusers UNet names, computed with diffusers' own converter
# ---------------------------------------------------------------------------------------------------------------
# The original (LDM) UNet configs of the released models (from their v1-inference.yaml / v2-inference.yaml /
# sd_xl_base.yaml); create_unet_diffusers_config_from_ldm turns them into diffusers configs.
_LDM_UNET_PARAMS: dict[str, dict] = {
    "sd1": dict(in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1], num_res_blocks=2,
                channel_mult=[1, 2, 4, 4], num_heads=8, transformer_depth=1, context_dim=768),
    "sd2": dict(in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1], num_res_blocks=2,
                channel_mult=[1, 2, 4, 4], num_head_channels=64, transformer_depth=1, context_dim=1024,
                use_linear_in_transformer=True),
    "sdxl": dict(in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2], num_res_blocks=2,
                 channel_mult=[1, 2, 4], num_head_channels=64, transformer_depth=[1, 2, 10], context_dim=2048,
                 use_linear_in_transformer=True, num_classes="sequential", adm_in_channels=2816),
}


def _canon_arch(arch: str) -> str:
    a = (arch or "sd1").lower()
    if a in ("sd15", "sd1.5", "sd1.x", "sd14", "v1"):
        return "sd1"
    if a in ("sd21", "sd2.1", "sd2.x", "v2"):
        return "sd2"
    if a not in _LDM_UNET_PARAMS:
        raise ValueError(f"no LDM/diffusers UNet key map for architecture {arch!r}; use one of sd1, sd2, sdxl")
    return a


def unet_config_for(arch: str = "sd1") -> dict:
    """The diffusers ``UNet2DConditionModel`` config of an architecture, built by diffusers'
    ``create_unet_diffusers_config_from_ldm`` from the released model's LDM ``unet_config`` params.

    Raises ``ValueError`` for architectures without a UNet (flux, unknown).
    """
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    params = dict(_LDM_UNET_PARAMS[_canon_arch(arch)])
    original = {"model": {"params": {"unet_config": {"params": params},
                                     "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
    cfg = create_unet_diffusers_config_from_ldm(original, {}, image_size=None)
    return cfg


def ldm_unet_keys(arch: str = "sd1", unet_config: dict | None = None) -> list[str]:
    """All parameter names of the LDM (``openaimodel.UNetModel``) UNet of ``arch``, without prefix.

    Enumerated from the LDM config (model_channels, channel_mult, num_res_blocks, attention levels,
    transformer depth): the module layout of ``ldm/modules/diffusionmodules/openaimodel.py`` (ResBlock:
    in_layers.0/2, emb_layers.1, out_layers.0/3, skip_connection; SpatialTransformer: norm, proj_in,
    transformer_blocks.N.{attn1,attn2,ff,norm1-3}, proj_out; Downsample ``op``, Upsample ``conv``). No library
    exposes this list; its correctness is checked in :func:`ldm_to_diffusers_unet`, whose diffusers-converted
    names must equal a real ``UNet2DConditionModel``'s state-dict keys exactly.

    ``unet_config``: optional diffusers UNet config (``block_out_channels``, ``down_block_types``,
    ``layers_per_block``, ``transformer_layers_per_block``, ``addition_embed_type``) for non-standard UNets.
    """
    cfg = dict(unet_config) if unet_config is not None else unet_config_for(arch)
    chans = list(cfg["block_out_channels"])
    lpb = cfg["layers_per_block"]
    lpb = list(lpb) if isinstance(lpb, (list, tuple)) else [lpb] * len(chans)
    down_types = list(cfg["down_block_types"])
    tdepth = cfg.get("transformer_layers_per_block", 1)
    tdepth = list(tdepth) if isinstance(tdepth, (list, tuple)) else [tdepth] * len(chans)
    has_attn = ["CrossAttn" in t for t in down_types]
    keys: list[str] = []

    def wb(prefix: str) -> None:
        keys.extend((f"{prefix}.weight", f"{prefix}.bias"))

    def res(prefix: str, skip: bool) -> None:
        for leaf in ("in_layers.0", "in_layers.2", "emb_layers.1", "out_layers.0", "out_layers.3"):
            wb(f"{prefix}.{leaf}")
        if skip:
            wb(f"{prefix}.skip_connection")

    def st(prefix: str, depth: int) -> None:
        wb(f"{prefix}.norm")
        wb(f"{prefix}.proj_in")
        for t in range(depth):
            tb = f"{prefix}.transformer_blocks.{t}"
            for a in ("attn1", "attn2"):
                for p in ("to_q", "to_k", "to_v"):
                    keys.append(f"{tb}.{a}.{p}.weight")
                wb(f"{tb}.{a}.to_out.0")
            wb(f"{tb}.ff.net.0.proj")
            wb(f"{tb}.ff.net.2")
            for n in ("norm1", "norm2", "norm3"):
                wb(f"{tb}.{n}")
        wb(f"{prefix}.proj_out")

    wb("time_embed.0")
    wb("time_embed.2")
    if cfg.get("addition_embed_type") == "text_time" or cfg.get("class_embed_type") in ("projection", "timestep"):
        wb("label_emb.0.0")
        wb("label_emb.0.2")
    wb("input_blocks.0.0")
    n = 1
    ch_in = chans[0]
    skip_channels = [chans[0]]
    for level, ch in enumerate(chans):
        for _ in range(lpb[level]):
            res(f"input_blocks.{n}.0", ch_in != ch)
            if has_attn[level]:
                st(f"input_blocks.{n}.1", tdepth[level])
            ch_in = ch
            skip_channels.append(ch)
            n += 1
        if level != len(chans) - 1:
            wb(f"input_blocks.{n}.0.op")
            skip_channels.append(ch)
            n += 1
    res("middle_block.0", False)
    st("middle_block.1", tdepth[-1])
    res("middle_block.2", False)
    n = 0
    rev = list(reversed(chans))
    rev_attn = list(reversed(has_attn))
    rev_depth = list(reversed(tdepth))
    rev_lpb = list(reversed(lpb))
    for level, ch in enumerate(rev):
        for i in range(rev_lpb[level] + 1):
            skip_ch = skip_channels.pop()
            res(f"output_blocks.{n}.0", ch_in + skip_ch != ch)
            sub = 1
            if rev_attn[level]:
                st(f"output_blocks.{n}.1", rev_depth[level])
                sub = 2
            ch_in = ch
            if level != len(rev) - 1 and i == rev_lpb[level]:
                wb(f"output_blocks.{n}.{sub}.conv")
            n += 1
    wb("out.0")
    wb("out.2")
    return keys


def diffusers_unet_keys(arch: str = "sd1", unet_config: dict | None = None) -> list[str]:
    """State-dict keys of diffusers' ``UNet2DConditionModel`` for ``arch`` (built on the ``meta`` device).

    Raises ``ValueError`` for an architecture without a UNet (see :func:`unet_config_for`).
    """
    return list(_diffusers_unet_keys_cached(_canon_arch(arch)) if unet_config is None
                else _diffusers_keys_from_config(unet_config))


def _diffusers_keys_from_config(cfg: Mapping) -> tuple[str, ...]:
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = UNet2DConditionModel(**dict(cfg))
    return tuple(model.state_dict().keys())


@functools.lru_cache(maxsize=None)
def _diffusers_unet_keys_cached(arch: str) -> tuple[str, ...]:
    return _diffusers_keys_from_config(unet_config_for(arch))


def _compute_ldm_to_diffusers(cfg: dict, ldm_keys: list[str]) -> dict[str, str]:
    import torch
    from diffusers.loaders.single_file_utils import LDM_UNET_KEY, convert_ldm_unet_checkpoint

    # One distinct scalar per LDM key; the converter only renames entries, so each output value names its source.
    sd = {LDM_UNET_KEY + k: torch.tensor([float(i)]) for i, k in enumerate(ldm_keys)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = convert_ldm_unet_checkpoint(sd, cfg)
    mapping: dict[str, str] = {}
    for dk, t in out.items():
        if t is None:
            continue
        mapping[ldm_keys[int(t.item())]] = dk
    return mapping


@functools.lru_cache(maxsize=None)
def _ldm_to_diffusers_cached(arch: str) -> tuple[tuple[str, str], ...]:
    cfg = unet_config_for(arch)
    ldm = ldm_unet_keys(arch, cfg)
    mapping = _compute_ldm_to_diffusers(cfg, ldm)
    expected = set(_diffusers_unet_keys_cached(arch))
    got = set(mapping.values())
    if got != expected or len(mapping) != len(ldm):
        raise RuntimeError(
            f"LDM->diffusers UNet map for {arch} does not match diffusers' UNet2DConditionModel: "
            f"missing {sorted(expected - got)[:5]}, extra {sorted(got - expected)[:5]}, "
            f"unmapped LDM keys {sorted(set(ldm) - set(mapping))[:5]}")
    return tuple(mapping.items())


def ldm_to_diffusers_unet(arch: str = "sd1", unet_config: dict | None = None) -> dict[str, str]:
    """LDM UNet parameter key -> diffusers UNet parameter key, without prefixes.

    Example (sd1): ``"input_blocks.1.1.transformer_blocks.0.attn2.to_q.weight"`` ->
    ``"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q.weight"``.

    Args:
        arch: "sd1" | "sd2" | "sdxl".
        unet_config: optional diffusers UNet config for a non-standard UNet (not cached).

    Returns:
        A new dict covering every parameter of the UNet (686 keys for sd1, 1680 for sdxl).

    Raises:
        ValueError: unsupported architecture. RuntimeError: diffusers' converter disagrees with its own model class.

    Source: ``diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint`` run on a synthetic state dict of
    distinct scalars (the name map is read back from the values), cached per architecture.
    """
    if unet_config is not None:
        return _compute_ldm_to_diffusers(dict(unet_config), ldm_unet_keys(arch, unet_config))
    return dict(_ldm_to_diffusers_cached(_canon_arch(arch)))


def diffusers_to_ldm_unet(arch: str = "sd1", unet_config: dict | None = None) -> dict[str, str]:
    """Inverse of :func:`ldm_to_diffusers_unet`: diffusers UNet parameter key -> LDM UNet parameter key.

    Same arguments and errors (``ValueError`` for an unsupported architecture).
    """
    return {d: l for l, d in ldm_to_diffusers_unet(arch, unet_config).items()}


@functools.lru_cache(maxsize=None)
def _d2l_cached(arch: str) -> dict[str, str]:
    return {d: l for l, d in _ldm_to_diffusers_cached(arch)}


@functools.lru_cache(maxsize=None)
def _l2d_cached(arch: str) -> dict[str, str]:
    return dict(_ldm_to_diffusers_cached(arch))


# ---------------------------------------------------------------------------------------------------------------
# OpenCLIP (LDM) <-> HF CLIP names, computed with diffusers' convert_open_clip_checkpoint
# ---------------------------------------------------------------------------------------------------------------


_OPENCLIP_WIDTH = {"sd2": (1024, 24), "sdxl": (1280, 32)}


@functools.lru_cache(maxsize=None)
def openclip_ldm_to_hf(width: int, layers: int) -> dict[str, tuple[str, tuple[int, int] | None, bool]]:
    """HF CLIP parameter name (``text_model.encoder.layers.0.self_attn.q_proj.weight``) -> (OpenCLIP LDM name
    relative to the ``model.`` prefix, row slice or None, transposed) for an OpenCLIP text tower of ``width`` and
    ``layers``.

    Source: ``diffusers.loaders.single_file_utils.convert_open_clip_checkpoint``, run on distinct tensors; fused
    ``in_proj_weight`` rows are identified by value. Raises ``RuntimeError`` if diffusers' output is not understood.
    """
    import types

    import torch
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    prefix = "conditioner.embedders.1.model."  # not cond_stage_model.model. (diffusers drops SD2's last layer there)
    names = ["positional_embedding", "token_embedding.weight", "ln_final.weight", "ln_final.bias", "text_projection"]
    for i in range(layers):
        r = f"transformer.resblocks.{i}."
        names += [r + s for s in ("attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
                                  "attn.out_proj.bias", "ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias",
                                  "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")]
    sd = {}
    big = 3 * width
    for idx, n in enumerate(names):
        if n.endswith(("in_proj_weight", "in_proj_bias")):
            t = (idx * big + torch.arange(big, dtype=torch.float64))
            sd[prefix + n] = t[:, None] if n.endswith("weight") else t
        elif n == "text_projection":
            sd[prefix + n] = torch.full((width, 1), float(idx * big), dtype=torch.float64)
        else:
            sd[prefix + n] = torch.full((1,), float(idx * big), dtype=torch.float64)
    fake_model = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=width))
    out = convert_open_clip_checkpoint(fake_model, sd, prefix=prefix)
    result = {}
    for hf, t in out.items():
        first = int(t.reshape(-1)[0].item())
        src = names[first // big]
        off = first - (first // big) * big
        if src.endswith(("in_proj_weight", "in_proj_bias")):
            n_rows = t.shape[0]
            result[hf] = (src, (off, off + n_rows), False)
        else:
            result[hf] = (src, None, src == "text_projection")
    if not any(k.endswith("q_proj.weight") for k in result):
        raise RuntimeError("diffusers convert_open_clip_checkpoint output not understood")
    return result
