"""The resumable training state of a LoRA run: network, optimizer, scheduler, scaler and every RNG, saved beside
each checkpoint as safetensors + JSON (never pickle) so a resumed run reproduces an uninterrupted one bit for bit;
:func:`write_state` / :func:`read_state` (which refuses a state from other settings or another dataset) and
:func:`find_latest_state` for ``resume``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from ...formats.safetensors_io import atomic_write_text, load_state_dict, save_safetensors
from .config import TrainConfig
from .dataset import KohyaDataset


STATE_SCHEMA = "conceptlab.lora_train_state/1"


def _jsonable(v):
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, torch.dtype):
        return str(v)
    return v


def optimizer_state_to_flat(sd: Mapping) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors (``"optimizer.<pid>.<key>"``) and a JSON part."""
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optimizer.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = _jsonable(v)
    return tensors, {"param_groups": _jsonable(sd["param_groups"]), "scalars": scalars}


def optimizer_state_from_flat(tensors: Mapping[str, torch.Tensor], js: Mapping) -> dict:
    """Inverse of :func:`optimizer_state_to_flat`: ``{"state": {pid: {...}}, "param_groups": [...]}`` for
    ``optimizer.load_state_dict`` (JSON lists of ``betas`` become tuples). Raises ``KeyError`` when ``js`` has
    no ``param_groups``."""
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optimizer."):
            _, pid, key = k.split(".", 2)
            state.setdefault(int(pid), {})[key] = v
    for k, v in js.get("scalars", {}).items():
        pid, key = k.split(".", 1)
        state.setdefault(int(pid), {})[key] = v
    groups = []
    for g in js["param_groups"]:
        g = dict(g)
        if "betas" in g and isinstance(g["betas"], list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def _py_rng_to_json(state) -> list:
    return [state[0], list(state[1]), state[2]]


def _py_rng_from_json(js) -> tuple:
    return (js[0], tuple(js[1]), js[2])


def find_latest_state(output_dir: str | os.PathLike, output_name: str) -> Path | None:
    """The newest ``<name>-NNNNNN-state.json`` / ``<name>-state.json`` in ``output_dir`` by recorded step."""
    best, best_step = None, -1
    for p in Path(output_dir).glob(f"{output_name}*-state.json"):
        try:
            js = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if js.get("schema") == STATE_SCHEMA and js.get("output_name") == output_name and js["global_step"] > best_step:
            best, best_step = p, js["global_step"]
    return best


def write_state(state_dir: Path, stem: str, cfg: TrainConfig, dataset: KohyaDataset, *, session_id: int,
                num_processes: int, network, optimizer, scheduler, scaler, gen, py_rng, epoch, global_step, history,
                step_losses, stopper, best, epoch_files) -> Path:
    """Write ``<stem>-state.safetensors`` (network, flattened optimizer state, noise and dropout RNGs) and
    ``<stem>-state.json`` (everything else: schedule position, scheduler / scaler / Python RNG state, history,
    early stopping, best epoch, settings, dataset size) into ``state_dir``; returns the JSON path. Both writes
    are atomic."""
    tensors = {f"network.{k}": v for k, v in network.kohya_state_dict().items()}
    opt_t, opt_js = optimizer_state_to_flat(optimizer.state_dict())
    tensors.update(opt_t)
    tensors["rng.noise"] = gen.get_state()
    tensors["rng.dropout"] = network.generator.get_state()
    st_path = state_dir / f"{stem}-state.safetensors"
    save_safetensors(tensors, st_path, metadata={"schema": STATE_SCHEMA})
    js = {
        "schema": STATE_SCHEMA,
        "output_name": cfg.output_name,
        "epoch": epoch,
        "global_step": global_step,
        "tensors": st_path.name,
        "optimizer": opt_js,
        "scheduler": _jsonable(scheduler.state_dict()),
        "scaler": _jsonable(scaler.state_dict()) if scaler is not None else None,
        "python_rng": _py_rng_to_json(py_rng.getstate()),
        "session_id": session_id,
        "num_processes": num_processes,
        "history": history,
        "step_losses": step_losses,
        "early_stopping": stopper.state(),
        "best": best,
        "epoch_files": {str(k): str(v.name) for k, v in epoch_files.items()},
        "config": _jsonable(cfg.to_dict()),
        "dataset": {"images": len(dataset.entries), "num_train_images": dataset.num_train_images},
    }
    js_path = state_dir / f"{stem}-state.json"
    atomic_write_text(js_path, json.dumps(js))
    return js_path


def read_state(path: Path, cfg: TrainConfig, dataset: KohyaDataset, world: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(json, tensors)`` of the training state at ``path`` (its ``.json`` or ``.safetensors``) for a run with
    ``cfg`` on ``dataset`` in ``world`` processes. Raises ``FileNotFoundError`` when it is missing and
    ``ValueError`` when it is not a Concept Lab state or was trained with other settings (rank, alpha, batch,
    optimizer, trained parts), another effective batch or another dataset size."""
    if path.suffix == ".safetensors":
        path = path.with_suffix(".json")
    if not path.is_file():
        raise FileNotFoundError(f"training state not found: {path}")
    js = json.loads(path.read_text(encoding="utf-8"))
    if js.get("schema") != STATE_SCHEMA:
        raise ValueError(f"{path.name} is not a Concept Lab training state ({STATE_SCHEMA})")
    tensors = load_state_dict(path.parent / js["tensors"])
    old = js.get("config", {})
    must = ("network_dim", "network_alpha", "conv_dim", "conv_alpha", "train_batch_size", "optimizer_type",
            "network_train_unet_only", "network_train_text_encoder_only")
    diffs = [f"{k}: {old.get(k)!r} -> {getattr(cfg, k)!r}" for k in must if k in old
             and old.get(k) != _jsonable(getattr(cfg, k))]
    if diffs:
        raise ValueError("cannot resume: the saved state was trained with different settings ("
                         + "; ".join(diffs) + ")")
    from ..distributed import check_resume_batch  # processes × gradient_accumulation_steps may trade places

    check_resume_batch(old, int(js.get("num_processes", 1)), cfg, world)
    if js["dataset"]["num_train_images"] != dataset.num_train_images:
        raise ValueError(f"cannot resume: the dataset changed ({js['dataset']['num_train_images']} images "
                         f"with repeats then, {dataset.num_train_images} now)")
    return js, tensors
