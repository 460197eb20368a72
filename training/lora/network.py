"""Kohya-style LoRA / LoCon networks as deltas installed through a :class:`~..host.DiffusionHost`.

A LoRA module here is a :class:`~..host.DeltaModule` with two equivalent applications (training/host.py): in
activation space, every host's default, ``layer(x) + ((x·downᵀ)·upᵀ)·alpha/dim`` (a k×k ``lora_down`` conv with the
layer's stride / padding / dilation, then a 1×1 ``lora_up`` conv, for LoCon), as kohya's ``LoRAModule.forward``
computes it — ΔW is never formed, and nothing weight-sized is kept for backward; in weight space
``forward(W) = W + (up @ down) · alpha / dim``, which is what baking and the file writers use. Why not peft's
``LoraLayer`` (which replaces ``nn.Linear`` modules by wrapper modules)? ComfyUI's ``ModelPatcher.clone()`` shares
one ``nn.Module`` tree between every clone in the graph, so replacing modules would mutate the upstream MODEL for
every other node; the hosts instead add a forward hook for the duration of the run (ComfyHost: acting only through
its own patcher) or, in weight space, ComfyUI's ``add_weight_wrapper(key, fn)`` (what its own TrainLoraNode uses)
and diffusers' ``torch.nn.utils.parametrize``. The weight form is exactly what a LoRA file stores, so saving needs
no conversion, and LoCon (3×3 conv) composes exactly: a k×k ``lora_down`` conv followed by a 1×1 ``lora_up`` conv
equals one k×k conv with weight ``up ⊗ down``.

Targets follow kohya-ss/sd-scripts ``networks/lora.py`` (``LoRANetwork.create_modules``, read at commit
48d368f): every ``Linear`` and 1×1 ``Conv2d`` inside the UNet's transformer blocks (``Transformer2DModel``:
``proj_in``, ``proj_out``, ``attn1``/``attn2`` ``to_q/to_k/to_v/to_out.0``, ``ff.net.0.proj``, ``ff.net.2``),
with ``conv_dim`` also the modules of ``ResnetBlock2D`` / ``Downsample2D`` / ``Upsample2D`` (3×3 convs get
``conv_dim``/``conv_alpha``; the ``Linear`` ``time_emb_proj`` and 1×1 ``conv_shortcut`` in them get
``network_dim``/``network_alpha``, as in kohya), and for the text encoder every ``Linear`` of ``CLIPAttention``
(``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``) and ``CLIPMLP`` (``fc1``, ``fc2``). Initialisation as kohya's
``LoRAModule``: ``lora_down`` kaiming-uniform with ``a = sqrt(5)`` (PyTorch's default Linear init), ``lora_up``
zeros, so training starts at the frozen model. ``network_alpha`` 0 / None means alpha = dim (scale 1).

Dropout: kohya's ``network_dropout`` drops ``lora_down`` *activations* per token, which no weight delta can
express (and the two spaces must stay the same function). Here ``network_dropout`` drops whole rank components (kohya's ``rank_dropout``,
rescaled by 1/(1-p)) and ``module_dropout`` switches a whole module off for a step (kohya's ``module_dropout``).
Masks are drawn once per step by :meth:`LoRANetwork.resample_dropout` from the network's own generator, so
gradient checkpointing's recomputation sees the same mask and a resumed run draws the same masks.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..host import DeltaModule, DiffusionHost, autograd_usable

_UNET_ATTN = re.compile(r"(^|\.)attentions\.\d+\.")
_UNET_CONV = re.compile(r"(^|\.)(resnets|downsamplers|upsamplers)\.\d+\.")
_TE_TARGET = re.compile(r"(^|\.)(self_attn|mlp)\.")


def _kohya_name(component: str, path: str, host: DiffusionHost | None = None) -> str:
    """kohya's LoRA module name for a host module: the family's naming (:class:`..families.Family`
    ``kohya_unet_names``) decides whether UNet modules are named by their diffusers or their LDM path."""
    from ...formats.kohya_keys import kohya_lora_name
    from ..families import FAMILIES

    if component == "t5":  # Flux T5-XXL: kohya lora_flux.py LORA_PREFIX_TEXT_ENCODER_T5, transformers paths
        return "lora_te3_" + path.replace(".", "_")
    if component == "unet" and host is not None:
        fam = FAMILIES.get(getattr(host, "arch", "sd1"))
        if fam is not None and fam.kohya_unet_names == "ldm":
            path = host.unet_ldm_paths().get(path, path)
    return kohya_lora_name(component, path)


def _is_1x1_or_linear(mod: nn.Module) -> bool:
    if isinstance(mod, nn.Linear):
        return True
    return isinstance(mod, nn.Conv2d) and tuple(mod.kernel_size) == (1, 1)


class LoRADelta(DeltaModule):
    """One LoRA (or LoCon) module: ``ΔW = (up @ down) · alpha / dim`` reshaped to the target weight.

    Args:
        weight_shape: target weight shape, ``[out, in]`` (Linear) or ``[out, in, kh, kw]`` (Conv2d).
        dim: rank r (``network_dim`` / ``conv_dim``), >= 1.
        alpha: ``network_alpha``; ``None``/0 means ``dim`` (kohya).
        generator: torch generator for the kaiming init (reproducible networks).

    Parameters (fp32): ``lora_down`` ``[r, in(, kh, kw)]``, ``lora_up`` ``[out, r(, 1, 1)]`` — kohya's layouts, so
    tensors are saved as they are. Buffer ``alpha`` (scalar fp32).

    Source: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", Eq. 3 (ΔW = B·A scaled by
    α/r); layouts and init as kohya-ss/sd-scripts ``networks/lora.py`` ``LoRAModule``.

    Raises:
        ValueError: ``weight_shape`` not 2-D / 4-D, or ``dim`` < 1.
    """

    def __init__(self, weight_shape: Iterable[int], dim: int, alpha: float | None,
                 generator: torch.Generator | None = None, device=None):
        super().__init__()
        shape = tuple(int(s) for s in weight_shape)
        if len(shape) not in (2, 4):
            raise ValueError(f"LoRA needs a Linear or Conv2d weight, got shape {shape}")
        dim = int(dim)
        if dim < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {dim}")
        if alpha is None or float(alpha) == 0.0:
            alpha = float(dim)
        self.weight_shape = shape
        self.dim = dim
        out_f, in_f = shape[0], shape[1]
        kernel = shape[2:]
        down = torch.empty((dim, in_f, *kernel), dtype=torch.float32, device=device)
        nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
        self.lora_down = nn.Parameter(down)
        self.lora_up = nn.Parameter(torch.zeros((out_f, dim, *([1] * len(kernel))), dtype=torch.float32,
                                                device=device))
        self.register_buffer("alpha", torch.tensor(float(alpha), dtype=torch.float32))
        self.rank_mask: torch.Tensor | None = None  # [r] 0/1·1/(1-p) mask for this step, or None
        self.module_off = False

    @property
    def scale(self) -> float:
        """``alpha / dim`` (kohya's ``LoRAModule.scale``); 1.0 when alpha defaulted to ``dim``."""
        return float(self.alpha) / self.dim

    def delta(self) -> torch.Tensor:
        """ΔW = ``(lora_up·rank_mask) @ lora_down · alpha/dim`` as fp32 shaped :attr:`weight_shape`.

        Returns a 0-d fp32 zero (broadcasts in ``weight + delta``) while :attr:`module_off` (module dropout).
        """
        if self.module_off:
            return torch.zeros((), dtype=self.lora_up.dtype, device=self.lora_up.device)
        up = self.lora_up.flatten(1)
        if self.rank_mask is not None:
            up = up * self.rank_mask.to(up)
        d = up @ self.lora_down.flatten(1)
        return (d * self.scale).view(self.weight_shape)

    def delta_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of :meth:`delta` (``lora_up[start:stop] @ lora_down``), computed without the other
        rows: a host whose model splits a fused weight (diffusers Flux ``to_q``/``to_k``/``to_v`` of BFL ``qkv``)
        applies one row block per piece. Same dtype / zero rule as :meth:`delta`."""
        if self.module_off:
            return torch.zeros((), dtype=self.lora_up.dtype, device=self.lora_up.device)
        up = self.lora_up.flatten(1)[start:stop]
        if self.rank_mask is not None:
            up = up * self.rank_mask.to(up)
        d = up @ self.lora_down.flatten(1)
        return (d * self.scale).view(stop - start, *self.weight_shape[1:])

    def _output_delta(self, x: torch.Tensor, layer: nn.Module, attr: str, piece) -> torch.Tensor | None:
        """Activation-space LoRA (see :meth:`.host.DeltaModule.output_delta`): ``((x·downᵀ)·mask)·upᵀ·scale`` for a
        Linear, the layer's own conv with ``lora_down`` (stride, padding, dilation) then a 1×1 conv with ``lora_up``
        for a Conv2d — kohya ``networks/lora.py`` ``LoRAModule.forward`` (``lora_up(lora_down(x)) · scale``), with
        the rank mask of :meth:`delta` on the rank channels; ΔW is never formed. ``piece`` rows select rows of
        ``lora_up`` (the fused-layer pieces of diffusers Flux). Parameters are cast to ``x``'s dtype. Falls back to
        the ΔW form for a grouped conv or a half-swapped piece."""
        if self.module_off:
            return None
        conv = isinstance(layer, nn.Conv2d)
        if attr != "weight" or (piece is not None and piece.swap) or (conv and layer.groups != 1) or \
                not (conv or isinstance(layer, nn.Linear)):
            return super()._output_delta(x, layer, attr, piece)
        down = autograd_usable(self.lora_down.to(device=x.device, dtype=x.dtype))
        up = self.lora_up
        rows = getattr(piece, "rows", None)
        if rows is not None:
            up = up[rows[0]:rows[1]]
        up = autograd_usable(up.to(device=x.device, dtype=x.dtype))
        if conv:
            h = layer._conv_forward(x, down, None)
            if self.rank_mask is not None:
                h = h * self.rank_mask.to(h).view(1, -1, 1, 1)
            out = F.conv2d(h, up)
        else:
            h = F.linear(x, down)
            if self.rank_mask is not None:
                h = h * self.rank_mask.to(h)
            out = F.linear(h, up.flatten(1))
        return out * self.scale

    def kohya_tensors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(lora_down, lora_up, alpha)`` detached, fp32, on CPU (what a kohya file stores)."""
        return (self.lora_down.detach().float().cpu(), self.lora_up.detach().float().cpu(), float(self.alpha))


@dataclass(frozen=True)
class LoRATarget:
    """One module a network adapts: component, canonical path, kohya name, rank and alpha, and whether conv."""

    component: str
    path: str
    name: str
    dim: int
    alpha: float
    is_conv3x3: bool


def kohya_targets(host: DiffusionHost, *, network_dim: int, network_alpha: float | None,
                  conv_dim: int | None = None, conv_alpha: float | None = None, train_unet: bool = True,
                  train_text_encoder: bool = False, blocks=None, flux_args=None) -> list[LoRATarget]:
    """The modules kohya's ``networks.lora`` would adapt on ``host`` (rules in the module docstring); for a family
    whose table says ``lora_targets = "flux"`` those of kohya's ``networks/lora_flux.py``
    (:func:`.flux.flux_targets`, with its network args ``flux_args``).

    ``conv_alpha`` ``None`` with ``conv_dim`` set means **1.0** (kohya ``create_network``, networks/lora.py l. 444);
    0 means conv_dim (kohya ``LoRAModule``). ``blocks``: a :class:`.network_args.BlockSpec` with per-block UNet
    ranks/alphas (``block_dims`` ...; a block of rank 0 gets no module), as kohya's ``create_modules``.
    Returns targets in a stable order (text encoder(s) first, then UNet, each sorted by module order).
    Raises ``ValueError`` when nothing is selected (e.g. neither UNet nor text encoder trained).
    """
    if network_alpha is None or float(network_alpha) == 0:
        network_alpha = float(network_dim)
    from ..families import FAMILIES

    fam = FAMILIES.get(getattr(host, "arch", "sd1"))
    if fam is not None and fam.lora_targets == "flux":
        from .flux import flux_targets

        return flux_targets(host, network_dim=network_dim, network_alpha=network_alpha, train_unet=train_unet,
                            train_text_encoder=train_text_encoder, flux_args=flux_args)
    conv_on = conv_dim is not None and int(conv_dim) > 0
    if conv_on and conv_alpha is None:
        conv_alpha = 1.0
    elif conv_on and float(conv_alpha) == 0:
        conv_alpha = float(conv_dim)
    per_block = blocks is not None and getattr(blocks, "dims", None) is not None
    if per_block and blocks.conv_dims is not None:
        conv_on = True
    out: list[LoRATarget] = []
    comps = host.components()
    if train_text_encoder:
        for comp in comps:
            if not comp.startswith("te"):
                continue
            for path, mod in host.modules(comp).items():
                if isinstance(mod, nn.Linear) and _TE_TARGET.search(path):
                    out.append(LoRATarget(comp, path, _kohya_name(comp, path, host), int(network_dim),
                                          float(network_alpha), False))
    if train_unet:
        for path, mod in host.modules("unet").items():
            in_attn = bool(_UNET_ATTN.search(path))
            in_conv_block = conv_on and bool(_UNET_CONV.search(path))
            if not (in_attn or in_conv_block):
                continue
            name = _kohya_name("unet", path, host)
            if per_block:  # kohya block_dims / conv_block_dims (training/lora/network_args.py)
                from .network_args import block_index

                bi = block_index(name, getattr(host, "arch", "sd1") == "sdxl")
                if _is_1x1_or_linear(mod):
                    d, a, conv = blocks.dims[bi], blocks.alphas[bi], False
                elif isinstance(mod, nn.Conv2d) and blocks.conv_dims is not None:
                    d, a, conv = blocks.conv_dims[bi], blocks.conv_alphas[bi], True
                else:
                    continue
                if d:
                    out.append(LoRATarget("unet", path, name, int(d), float(a) if a else float(d), conv))
                continue
            if _is_1x1_or_linear(mod):
                out.append(LoRATarget("unet", path, name, int(network_dim),
                                      float(network_alpha), False))
            elif isinstance(mod, nn.Conv2d) and conv_on:
                out.append(LoRATarget("unet", path, name, int(conv_dim), float(conv_alpha),
                                      True))
    if not out:
        raise ValueError("the LoRA network selects no modules: train the UNet, the text encoder, or both "
                         "(and check the model has transformer blocks)")
    return out


class LoRANetwork(nn.Module):
    """A set of :class:`LoRADelta` modules keyed by kohya name, installable on a host.

    Build with :meth:`create` (fresh kohya init) or :meth:`from_kohya_state_dict` (weights from a file).
    ``state_dict()`` of this module holds fp32 ``<name>.lora_down`` / ``<name>.lora_up`` / ``<name>.alpha``
    (the training-state format); :meth:`kohya_modules` gives the tuples ``formats.lora_files.save_kohya_lora``
    writes.

    ``dropout`` is kohya's ``rank_dropout`` semantics (see module docstring), ``module_dropout`` kohya's
    ``module_dropout``; ``seed`` seeds the dropout-mask generator. Raises ``ValueError`` when either dropout is
    outside ``[0, 1)``.
    """

    def __init__(self, targets: list[LoRATarget], deltas: Mapping[str, LoRADelta], *, dropout: float = 0.0,
                 module_dropout: float = 0.0, seed: int = 0):
        super().__init__()
        self.targets = {t.name: t for t in targets}
        self.loras = nn.ModuleDict({name: deltas[name] for name in self.targets})
        self.dropout = float(dropout)
        self.module_dropout = float(module_dropout)
        if not 0 <= self.dropout < 1 or not 0 <= self.module_dropout < 1:
            raise ValueError("network_dropout and module_dropout must be in [0, 1)")
        self.generator = torch.Generator("cpu").manual_seed(int(seed) + 7)
        self._host: DiffusionHost | None = None

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def create(cls, host: DiffusionHost, *, network_dim: int = 4, network_alpha: float | None = 1.0,
               conv_dim: int | None = None, conv_alpha: float | None = None, train_unet: bool = True,
               train_text_encoder: bool = False, dropout: float = 0.0, module_dropout: float = 0.0,
               seed: int = 0, blocks=None, flux_args=None) -> "LoRANetwork":
        """A freshly initialised kohya LoRA/LoCon network for ``host`` (not yet installed).

        ``seed`` fixes the kaiming init of every ``lora_down`` (drawn in target order). Shapes come from the
        host's module weights; parameters are fp32 on CPU (moved to the host device by :meth:`install`).
        Raises ``ValueError`` when no module is selected (:func:`kohya_targets`) or a dropout is outside [0, 1).
        """
        targets = kohya_targets(host, network_dim=network_dim, network_alpha=network_alpha, conv_dim=conv_dim,
                                conv_alpha=conv_alpha, train_unet=train_unet,
                                train_text_encoder=train_text_encoder, blocks=blocks, flux_args=flux_args)
        g = torch.Generator("cpu").manual_seed(int(seed))
        mods = {c: host.modules(c) for c in {t.component for t in targets}}
        deltas = {t.name: LoRADelta(tuple(mods[t.component][t.path].weight.shape), t.dim, t.alpha, generator=g)
                  for t in targets}
        return cls(targets, deltas, dropout=dropout, module_dropout=module_dropout, seed=seed)

    @classmethod
    def from_kohya_state_dict(cls, host: DiffusionHost, state: Mapping[str, torch.Tensor]
                              ) -> tuple["LoRANetwork", list[str]]:
        """A network holding the LoRA of a kohya-format state dict (e.g. a saved epoch file) for ``host``.

        Names are matched against the kohya names of every module the host has (no ``_`` guessing).
        Returns ``(network, unmatched_keys)``. Raises ``ValueError`` if no key matches (wrong model or not a
        kohya LoRA), and also when a matched name's ``lora_up.weight`` is missing or a tensor's size does not fit
        the model's module (both messages name the module). A missing ``alpha`` means alpha = rank (kohya).
        """
        by_name: dict[str, tuple[str, str, nn.Module]] = {}
        for comp in host.components():
            for path, mod in host.modules(comp).items():
                by_name[_kohya_name(comp, path, host)] = (comp, path, mod)
        names = sorted({k.split(".", 1)[0] for k in state if k.endswith(".lora_down.weight")})
        targets, deltas, unmatched = [], {}, []
        for name in names:
            if name not in by_name:
                unmatched.extend(k for k in state if k.startswith(name + "."))
                continue
            comp, path, mod = by_name[name]
            if f"{name}.lora_up.weight" not in state:
                raise ValueError(f"LoRA module {name}: has lora_down.weight but no lora_up.weight (damaged file?)")
            down = state[f"{name}.lora_down.weight"].float()
            up = state[f"{name}.lora_up.weight"].float()
            alpha = float(state[f"{name}.alpha"]) if f"{name}.alpha" in state else float(down.shape[0])
            d = LoRADelta(tuple(mod.weight.shape), down.shape[0], alpha)
            if down.numel() != d.lora_down.numel() or up.numel() != d.lora_up.numel():
                raise ValueError(
                    f"LoRA module {name}: lora_down {tuple(down.shape)} / lora_up {tuple(up.shape)} do not fit the "
                    f"model's {comp}.{path} weight {tuple(mod.weight.shape)} (a LoRA for another model family?)")
            with torch.no_grad():
                d.lora_down.copy_(down.view_as(d.lora_down))
                d.lora_up.copy_(up.view_as(d.lora_up))
            deltas[name] = d
            targets.append(LoRATarget(comp, path, name, down.shape[0], alpha, mod.weight.dim() == 4 and
                                      tuple(mod.weight.shape[2:]) != (1, 1)))
        known = {f"{n}.{s}" for n in names for s in ("lora_down.weight", "lora_up.weight", "alpha")}
        unmatched.extend(k for k in state if k not in known and k not in unmatched)
        if not targets:
            from ...formats.keys import detect_architecture

            shapes = {k: tuple(v.shape) for k, v in state.items() if "attn2_to_k" in k and k.endswith("lora_down.weight")}
            file_arch = detect_architecture(list(state), shapes)
            host_arch = getattr(host, "arch", "unknown")
            hint = (f"this LoRA is for {file_arch.upper()}, the model is {host_arch.upper()}"
                    if file_arch not in ("unknown", host_arch) else "is it a kohya LoRA for this base model family?")
            raise ValueError(f"no LoRA key of this file matches the model ({hint})")
        return cls(targets, deltas), unmatched

    # -- host ---------------------------------------------------------------------------------------------------
    def install(self, host: DiffusionHost) -> None:
        """Install every module on ``host`` (moved to its device, fp32) via ``host.install_delta``.

        Raises ``RuntimeError`` if this network is already installed (call :meth:`remove` first); any error from
        ``host.install_delta`` (``ValueError`` / ``KeyError``) is re-raised after ``host.clear_deltas()``.
        """
        if self._host is not None:
            raise RuntimeError("this LoRA network is already installed; call remove() first")
        self.to(host.device)
        done = []
        try:
            for name, t in self.targets.items():
                host.install_delta(t.component, t.path, "weight", self.loras[name])
                done.append(name)
        except BaseException:
            host.clear_deltas()
            raise
        self._host = host

    def remove(self) -> None:
        """Remove the network from its host (``host.clear_deltas()``)."""
        if self._host is not None:
            self._host.clear_deltas()
            self._host = None

    def set_multiplier(self, value: float) -> None:
        """Scale every module's ΔW by ``value`` (kohya's ``multiplier``; 0 disables, 1 is full strength)."""
        for d in self.loras.values():
            d.multiplier = float(value)

    # -- training helpers ---------------------------------------------------------------------------------------
    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """``{"unet": [...], "te": [...]}`` trainable parameters per component family."""
        groups: dict[str, list[nn.Parameter]] = {"unet": [], "te": []}
        for name, t in self.targets.items():
            key = "unet" if t.component == "unet" else "te"
            groups[key].extend([self.loras[name].lora_down, self.loras[name].lora_up])
        return groups

    def resample_dropout(self, training: bool = True) -> None:
        """Draw this step's rank / module dropout masks (or clear them when ``training`` is False)."""
        for d in self.loras.values():
            d.rank_mask = None
            d.module_off = False
            if not training:
                continue
            if self.module_dropout > 0 and float(torch.rand((), generator=self.generator)) < self.module_dropout:
                d.module_off = True
                continue
            if self.dropout > 0:
                keep = (torch.rand(d.dim, generator=self.generator) >= self.dropout).float()
                d.rank_mask = keep / (1.0 - self.dropout)

    def kohya_modules(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """``{kohya name: (lora_down, lora_up, alpha)}`` (fp32 CPU), the input of ``save_kohya_lora``."""
        return {name: d.kohya_tensors() for name, d in self.loras.items()}

    def kohya_state_dict(self) -> dict[str, torch.Tensor]:
        """Flat kohya keys (``<name>.lora_down.weight`` ...) fp32 CPU tensors."""
        out = {}
        for name, (down, up, alpha) in self.kohya_modules().items():
            out[f"{name}.lora_down.weight"] = down
            out[f"{name}.lora_up.weight"] = up
            out[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        return out

    def load_kohya_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy ``lora_down`` / ``lora_up`` for every module of this network from flat kohya keys.

        ``alpha`` entries are not read: the network keeps its own. Raises ``KeyError`` if a key is missing and
        ``RuntimeError`` if a tensor's size does not match.
        """
        with torch.no_grad():
            for name, d in self.loras.items():
                d.lora_down.copy_(state[f"{name}.lora_down.weight"].to(d.lora_down).view_as(d.lora_down))
                d.lora_up.copy_(state[f"{name}.lora_up.weight"].to(d.lora_up).view_as(d.lora_up))

    def counts(self) -> dict[str, int]:
        """Number of modules and trainable parameters (for summaries)."""
        return {"modules": len(self.loras), "unet_modules": sum(t.component == "unet" for t in self.targets.values()),
                "te_modules": sum(t.component != "unet" for t in self.targets.values()),
                "parameters": sum(p.numel() for p in self.parameters())}
