"""LyCORIS networks (``network_module = "lycoris.kohya"``, ``network_args = ["algo=loha"]`` / ``"algo=lokr"``)
built from the well-kept ``lycoris-lora`` package (KohakuBlueleaf/LyCORIS), installed as weight deltas.

Why the package and not our own code: LoHa (Hadamard product of two low-rank products; Hyeon-Woo et al. 2022,
"FedPara", Eq. 2) and LoKr (Kronecker product with a low-rank factor; Yeh et al. 2024, "Navigating Text-To-Image
Customization: From LyCORIS Fine-Tuning to Model Evaluation", §3) are what ``lycoris.modules.LohaModule`` /
``LokrModule`` implement, with their initialisation, factorisation rules and saved key names
(``hada_w1_a``/``hada_w1_b``/``hada_w2_a``/``hada_w2_b``; ``lokr_w1``/``lokr_w2`` or their ``_a``/``_b``
factors; ``alpha``), which ComfyUI's ``comfy/weight_adapter/loha.py`` / ``lokr.py`` read. This module only adapts
them to the host protocol: each module's weight update, as its own ``forward`` computes it
(``get_weight(shape) · scalar``), becomes a :class:`~..host.DeltaModule` (the module is never hooked into the
model's forward, so ComfyUI's shared modules are not touched).

Targets: the modules kohya's ``networks.lora`` picks (:func:`.network.kohya_targets`; with ``conv_dim`` also the
ResNet/sampler convs) — LyCORIS's own ``lycoris.kohya`` default preset also targets those blocks. Supported
``network_args``: ``algo`` (``loha``, ``lokr``), ``conv_dim``, ``conv_alpha``, ``factor``, ``decompose_both``,
``full_matrix``, ``unbalanced_factorization``, ``use_tucker`` (false); anything else is refused by name.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch

from ..host import DeltaModule, DiffusionHost
from .network import LoRANetwork, kohya_targets

ALGOS = ("loha", "lokr")
SUPPORTED_ARGS = ("algo", "conv_dim", "conv_alpha", "factor", "decompose_both", "full_matrix",
                  "unbalanced_factorization", "use_tucker", "preset")


def _truthy(v) -> bool:
    return str(v).strip().lower() in ("1", "true", "yes", "on")


def parse_lycoris_args(items: Iterable[str] | None) -> dict[str, str]:
    """``["algo=loha", ...]`` → dict; raises ``ValueError`` for an unsupported key / algo / preset."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, val = str(item).partition("=")
        key, val = key.strip(), val.strip()
        if not sep:
            raise ValueError(f"network_args entry {item!r} is not key=value")
        if key not in SUPPORTED_ARGS:
            raise ValueError(f"network_args {key!r} is not supported with lycoris.kohya here; supported: "
                             f"{', '.join(SUPPORTED_ARGS)}")
        out[key] = val
    algo = out.get("algo", "lora").lower()
    if algo not in ALGOS:
        raise ValueError(f"lycoris algo {algo!r} is not supported here; use algo=loha or algo=lokr (plain LoRA: "
                         "network_module = networks.lora)")
    if out.get("preset", "full") not in ("full", "default"):
        raise ValueError("lycoris presets other than full are not supported; the targets are kohya's (see docs)")
    if _truthy(out.get("use_tucker", "false")):
        raise ValueError("use_tucker is not supported (ComfyUI-compatible plain factors only)")
    return out


class LycorisDelta(DeltaModule):
    """ΔW of one LyCORIS module as its own forward computes it (alpha/dim once), reshaped to the weight."""

    def __init__(self, module: torch.nn.Module, weight_shape):
        super().__init__()
        self.lyco = module
        self.weight_shape = tuple(weight_shape)
        self.dim = int(getattr(module, "lora_dim", 1))
        self.rank_mask = None
        self.module_off = False

    def delta(self) -> torch.Tensor:
        """ΔW shaped like the target weight (fp32); a 0-d zero while :attr:`module_off` (module dropout)."""
        if self.module_off:
            return torch.zeros((), dtype=torch.float32)
        # the module's own training forward: get_weight(shape) (alpha/dim applied inside) × scalar. Not
        # get_diff_weight(): in lycoris-lora 4.1.3 it multiplies by alpha/dim a second time (its merge helper),
        # while ComfyUI's loha/lokr adapters apply alpha/dim once, like this forward.
        d = self.lyco.get_weight(self.weight_shape) * self.lyco.scalar
        return d.reshape(self.weight_shape)


class LycorisNetwork(LoRANetwork):
    """A LoHa / LoKr network (``lycoris-lora`` modules) with :class:`LoRANetwork`'s install / save / state API."""

    algo = "loha"

    @classmethod
    def create_lycoris(cls, host: DiffusionHost, args: Mapping[str, str], *, network_dim: int, network_alpha: float,
                       train_unet: bool = True, train_text_encoder: bool = False, seed: int = 0,
                       module_dropout: float = 0.0) -> "LycorisNetwork":
        """Build the network for ``host``: kohya targets, one ``LohaModule`` / ``LokrModule`` each.

        ``args`` from :func:`parse_lycoris_args`. The package initialises with torch's global generator; it is
        seeded with ``seed`` inside :func:`torch.random.fork_rng`, so the caller's random state is untouched.
        Raises ``ImportError`` (with the pip command) when ``lycoris-lora`` is not installed.
        """
        try:
            from lycoris.modules.loha import LohaModule
            from lycoris.modules.lokr import LokrModule
        except ImportError as exc:  # noqa: F841
            raise ImportError("network_module lycoris.kohya needs the lycoris-lora package: "
                              "pip install lycoris-lora") from None
        algo = args.get("algo", "loha").lower()
        conv_dim = int(args["conv_dim"]) if "conv_dim" in args else None
        conv_alpha = float(args["conv_alpha"]) if "conv_alpha" in args else None
        targets = kohya_targets(host, network_dim=network_dim, network_alpha=network_alpha, conv_dim=conv_dim,
                                conv_alpha=conv_alpha, train_unet=train_unet, train_text_encoder=train_text_encoder)
        extra = {}
        if algo == "lokr":
            extra = {"factor": int(args.get("factor", -1)), "decompose_both": _truthy(args.get("decompose_both", 0)),
                     "full_matrix": _truthy(args.get("full_matrix", 0)),
                     "unbalanced_factorization": _truthy(args.get("unbalanced_factorization", 0))}
        klass = LokrModule if algo == "lokr" else LohaModule
        mods = {c: host.modules(c) for c in {t.component for t in targets}}
        deltas = {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            for t in targets:
                org = mods[t.component][t.path]
                m = klass(t.name, org, 1.0, t.dim, t.alpha, **extra)
                deltas[t.name] = LycorisDelta(m.float(), tuple(org.weight.shape))
        net = cls(targets, deltas, module_dropout=module_dropout, seed=seed)
        net.algo = algo
        return net

    def parameter_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        """``{"unet": [...], "te": [...]}`` trainable parameters of the LyCORIS modules."""
        groups: dict[str, list] = {"unet": [], "te": []}
        for name, t in self.targets.items():
            groups["unet" if t.component == "unet" else "te"].extend(self.loras[name].lyco.parameters())
        return groups

    def kohya_state_dict(self) -> dict[str, torch.Tensor]:
        """``<name>.<lycoris key>`` fp32 CPU tensors (``hada_w1_a`` ..., ``lokr_w1`` ..., ``alpha``)."""
        out = {}
        for name, d in self.loras.items():
            for k, v in d.lyco.state_dict().items():
                out[f"{name}.{k}"] = v.detach().float().cpu()
        return out

    def load_kohya_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load :meth:`kohya_state_dict`'s keys back (``KeyError`` for a missing key)."""
        for name, d in self.loras.items():
            own = d.lyco.state_dict()
            d.lyco.load_state_dict({k: state[f"{name}.{k}"].to(v) for k, v in own.items()})

    def kohya_modules(self):
        raise TypeError("a LyCORIS network has no lora_down/lora_up pairs; use save_lycoris_file")


def save_lycoris_file(path, network: LycorisNetwork, metadata: Mapping[str, str], dtype: torch.dtype):
    """Write the network's tensors (LyCORIS key names) with kohya metadata and ``sshs_*`` hashes, atomically."""
    from ...formats.lora_files import _stringify_metadata, model_hashes
    from ...formats.safetensors_io import save_safetensors

    tensors = {}
    for k, v in network.kohya_state_dict().items():
        if not torch.isfinite(v).all():
            raise ValueError(f"{k} has NaN/Inf values")
        tensors[k] = v.to(dtype).contiguous()
    md = _stringify_metadata(metadata)
    md["sshs_model_hash"], md["sshs_legacy_hash"] = model_hashes(tensors, md)
    return save_safetensors(tensors, path, metadata=md)


def is_lycoris(cfg) -> bool:
    """True when ``cfg.network_module`` names LyCORIS' kohya entry point."""
    return str(getattr(cfg, "network_module", "")).startswith("lycoris")


