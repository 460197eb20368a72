"""The LoRA network of a run and its optimizer parameter groups (kohya ``create_network`` /
``create_network_from_weights`` + ``prepare_optimizer_params``): LoRA / LoCon with block-wise settings and LoRA+,
or LyCORIS LoHa / LoKr through ``lycoris-lora``."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ...formats.safetensors_io import load_state_dict
from ..families import family
from ..host import DiffusionHost
from .config import TrainConfig
from .network import LoRANetwork

logger = logging.getLogger(__name__)


def build_network_and_groups(host: DiffusionHost, cfg: TrainConfig, train_unet: bool = True,
                             train_te: bool = True) -> tuple[LoRANetwork, list[dict]]:
    """The LoRA network and its optimizer param groups, as kohya's ``create_network`` /
    ``create_network_from_weights`` + ``prepare_optimizer_params`` (see :mod:`.network_args`).

    * ``network_args``: LoCon, block-wise lr / dims / alphas, LoRA+ (:mod:`.network_args`);
    * ``dim_from_weights``: ranks and alphas of every module from the ``network_weights`` file (its modules, no
      others); ``network_weights``: start from that file's tensors (kohya ``load_weights``; modules the file
      lacks keep the fresh init, file modules the network lacks are reported);
    * an lr of 0 (``unet_lr``, ``text_encoder_lr``, a block weight) leaves those parameters out of the optimizer.

    Returns ``(network, groups)`` with groups ``[{"params", "lr", "name"}]``. Raises ``ValueError`` for bad
    ``network_args``, a ``network_weights`` file that does not fit the model, or when no parameter would train.
    """
    from .network_args import LoraPlus, block_spec, optimizer_groups, parse_network_args

    if str(cfg.network_module).startswith("lycoris"):
        return _build_lycoris(host, cfg, train_unet, train_te)
    from .flux import split_network_args

    na, flux_na = split_network_args(parse_network_args(cfg.network_args), family(host.arch).lora_targets == "flux")
    is_sdxl = getattr(host, "arch", "sd1") == "sdxl"
    blocks = block_spec(na, network_dim=cfg.network_dim, network_alpha=cfg.network_alpha, conv_dim=cfg.conv_dim,
                        conv_alpha=cfg.conv_alpha, is_sdxl=is_sdxl)
    file_sd = None
    if cfg.network_weights:
        path = Path(cfg.network_weights)
        if not path.is_file():
            raise FileNotFoundError(f"network_weights not found: {path}")
        file_sd = load_state_dict(path)
    if cfg.dim_from_weights:
        network, unmatched = LoRANetwork.from_kohya_state_dict(host, file_sd)
        if not train_te or not train_unet:
            keep = [n for n, t in network.targets.items() if (t.component == "unet") == train_unet or
                    (t.component != "unet" and train_te)]
            network = LoRANetwork([network.targets[n] for n in keep], {n: network.loras[n] for n in keep},
                                  dropout=cfg.network_dropout, module_dropout=cfg.module_dropout, seed=cfg.seed)
        else:
            network.dropout, network.module_dropout = cfg.network_dropout, cfg.module_dropout
            network.generator.manual_seed(int(cfg.seed) + 7)
        if unmatched:
            logger.warning("network_weights: %d keys of %s match no module of this model", len(unmatched),
                           Path(cfg.network_weights).name)
    else:
        network = LoRANetwork.create(host, network_dim=cfg.network_dim, network_alpha=cfg.network_alpha,
                                     conv_dim=cfg.conv_dim, conv_alpha=cfg.conv_alpha, train_unet=train_unet,
                                     train_text_encoder=train_te, dropout=cfg.network_dropout,
                                     module_dropout=cfg.module_dropout, seed=cfg.seed, blocks=blocks,
                                     flux_args=flux_na)
        if file_sd is not None:
            names = set(network.loras)
            missing = [n for n in names if f"{n}.lora_down.weight" not in file_sd]
            extra = sorted({k.split(".", 1)[0] for k in file_sd if k.endswith(".lora_down.weight")} - names)
            with torch.no_grad():
                for n, d in network.loras.items():
                    if n in missing:
                        continue
                    down, up = file_sd[f"{n}.lora_down.weight"], file_sd[f"{n}.lora_up.weight"]
                    if down.numel() != d.lora_down.numel() or up.numel() != d.lora_up.numel():
                        raise ValueError(f"network_weights: module {n} has rank {down.shape[0]} in the file but "
                                         f"{d.dim} here; set network_dim to the file's rank or use dim_from_weights")
                    d.lora_down.copy_(down.float().view_as(d.lora_down))
                    d.lora_up.copy_(up.float().view_as(d.lora_up))
            if missing or extra:
                logger.warning("network_weights: %d modules not in the file keep their fresh init; %d file modules "
                               "are not part of this network", len(missing), len(extra))
    spec = optimizer_groups(list(network.loras), learning_rate=cfg.learning_rate, unet_lr=cfg.unet_lr,
                            text_encoder_lr=cfg.text_encoder_lr, lr_weights=blocks.lr_weights,
                            loraplus=LoraPlus.from_args(na), is_sdxl=is_sdxl)
    groups = [{"params": [getattr(network.loras[n], part) for n, part in g.params], "lr": g.lr, "name": g.name}
              for g in spec]
    trainable = {id(p) for g in groups for p in g["params"]}
    for p_ in network.parameters():
        p_.requires_grad_(id(p_) in trainable)
    if not groups:
        raise ValueError("no LoRA parameter would train: every learning rate (learning_rate, unet_lr, "
                         "text_encoder_lr, block lr weights) is 0 for the parts being trained")
    return network, groups


def _build_lycoris(host: DiffusionHost, cfg: TrainConfig, train_unet: bool, train_te: bool):
    """LoHa / LoKr through ``lycoris-lora`` (:mod:`.lycoris_net`): groups per part at unet_lr / text_encoder_lr
    (0 = frozen). network_weights, scale_weight_norms and rank dropout are refused for LyCORIS here."""
    from .lycoris_net import LycorisNetwork, parse_lycoris_args

    for name in ("network_weights", "scale_weight_norms"):
        if getattr(cfg, name):
            raise ValueError(f"{name} is not supported with network_module lycoris.kohya here")
    if cfg.network_dropout:
        raise ValueError("network_dropout / rank_dropout are not supported with lycoris.kohya here")
    net = LycorisNetwork.create_lycoris(host, parse_lycoris_args(cfg.network_args), network_dim=cfg.network_dim,
                                        network_alpha=cfg.network_alpha, train_unet=train_unet,
                                        train_text_encoder=train_te, seed=cfg.seed,
                                        module_dropout=cfg.module_dropout)
    parts = net.parameter_groups()
    groups = []
    for part, lr, label in (("te", cfg.text_encoder_lr, "textencoder"), ("unet", cfg.unet_lr, "unet")):
        lr = cfg.learning_rate if lr is None else lr
        if parts[part] and lr:
            groups.append({"params": parts[part], "lr": lr, "name": label})
    trainable = {id(p) for g in groups for p in g["params"]}
    for p_ in net.parameters():
        p_.requires_grad_(id(p_) in trainable)
    if not groups:
        raise ValueError("no LyCORIS parameter would train: every learning rate is 0 for the parts being trained")
    return net, groups
