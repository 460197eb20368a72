"""The LoRA training loop with kohya semantics: schedule, objective, files, metadata, resume, per-epoch
evaluation and best-epoch selection. Host-neutral: it sees only a :class:`~..host.DiffusionHost`.

What follows kohya-ss/sd-scripts (``train_network.py``, ``library/train_util.py``,
``library/custom_train_functions.py``; read at commit 48d368f, re-implemented):

* schedule: ``len(dataloader)`` = bucket batches per epoch; ``updates/epoch = ceil(batches / grad_accum)``;
  ``max_train_epochs`` (if given) sets ``max_train_steps = epochs × updates/epoch``; epochs are 1-based in
  captions and file names; a partial accumulation at the end of an epoch still steps (accelerate's
  end-of-dataloader sync);
* objective: noise ε ~ N(0, I) (+ ``noise_offset``·N(0, 1) per image and channel, Guttenberg 2023 as in
  ``apply_noise_offset``), timesteps uniform integers in ``[min_timestep, max_timestep)``, the target in the
  model's own parameterization (ε, or v = √ᾱ·ε − √(1−ᾱ)·x0), per-sample mean loss (``l2``, ``l1``, ``huber``,
  ``smooth_l1`` with kohya's ``huber_schedule`` ``snr``/``exponential``/``constant``), min-SNR-γ weighting
  (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy", Eq. 8: weight
  ``min(SNR, γ)/SNR`` for ε, ``min(SNR, γ)/(SNR+1)`` for v), gradient clipping at ``max_grad_norm``;
* files: ``<name>-<epoch:06d>.safetensors`` every ``save_every_n_epochs`` (not for the last epoch), the last as
  ``<name>.safetensors``; kohya keys and ``ss_*`` metadata; ``save_precision`` fp16 by default;
* validation: kohya's epoch validation — 4 fixed timesteps ``linspace(min_t, max_t, 6)[1:-1]`` (200, 400, 600,
  800 for the full range), noise from a generator seeded with ``validation_seed`` (default ``seed``), mean loss
  over validation images × timesteps; captions are used raw (no dropout / shuffle) so the number is
  deterministic.

What Concept Lab adds: training state saved beside each checkpoint as safetensors + JSON (never pickle) with
every RNG the run uses, so a resumed run reproduces an uninterrupted one bit for bit; a NaN/Inf guard; sample
images and palette metrics each epoch (:mod:`.samples`); a per-epoch table (JSON, table image, loss curve); best-epoch selection
by a metric and direction with optional early stopping; the winner written as ``<name>-best.safetensors``.

All randomness comes from dedicated generators (``torch.Generator`` for noise/timesteps and LoRA dropout,
``random.Random`` for captions and flips), never from global state, so evaluation and sampling (which use
their own seeds) cannot shift the training stream.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ...formats.safetensors_io import atomic_write_text
from ..conditioning import Conditioning
from ..families import family
from ..host import DiffusionHost
from .build import build_network_and_groups
from .captions import process_caption
from .config import TrainConfig, TrainingDivergedError
from .dataset import KohyaDataset
from .loss import diffusion_loss, sdxl_size_ids
from .network import LoRANetwork
from .noise import max_norm_regularization
from .objective import objective_for
from .optim import _optimizer_kwargs, build_optimizer, build_scheduler
from .output import EPOCHS_SCHEMA, TrainResult, build_metadata, epoch_file_name, save_lora_file
from .report import (EarlyStopping, labelled_grid, render_epoch_table, render_loss_curve, resolve_metric, save_png,
                     score_of)
from .samples import dataset_effective_colors, render_samples, sample_metrics
from .state import _jsonable, _py_rng_from_json, find_latest_state, optimizer_state_from_flat, read_state, write_state

logger = logging.getLogger(__name__)


ProgressFn = Callable[[int, int, Mapping[str, Any]], None]


EpochFn = Callable[[Mapping[str, Any], np.ndarray | None], None]


def _autocast_factory(precision: str, device: torch.device) -> tuple[Callable | None, str, bool]:
    """``(autocast factory or None, effective precision, needs GradScaler)``; CPU always fp32."""
    if precision in ("no", "fp32"):
        return None, "no", False
    if device.type == "cpu":
        logger.warning("mixed_precision %s is not used on the CPU: training runs in fp32 (ss_mixed_precision "
                       "records what was asked)", precision)
        return None, "no", False
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            logger.warning("bf16 is not supported on this GPU; training in fp16 instead")
            precision = "fp16"
        else:
            return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)), "bf16", False
    return (lambda: torch.autocast(device.type, dtype=torch.float16)), "fp16", True


def _set_gradient_checkpointing(host: DiffusionHost, on: bool) -> bool:
    fn = getattr(host, "set_gradient_checkpointing", None)
    if callable(fn):
        fn(on)
        return True
    unet = getattr(host, "unet", None)
    if unet is not None and hasattr(unet, "enable_gradient_checkpointing"):
        (unet.enable_gradient_checkpointing if on else unet.disable_gradient_checkpointing)()
        return True
    return False


class LoraTrainer:
    """Train a kohya LoRA on ``host`` from ``dataset`` with ``cfg``; :meth:`run` does everything.

    Args:
        host: the model (deltas are installed during the run and removed afterwards).
        dataset: a scanned :class:`KohyaDataset` (its caption options are used per step).
        cfg: :class:`TrainConfig`.
        progress: ``progress(step, total_steps, info)`` after every optimizer step (``info``: loss, lr,
            epoch). May raise to cancel (ComfyUI's interrupt): finished checkpoints stay on disk.
        on_epoch: ``on_epoch(record, preview)`` after each epoch (preview: uint8 sample grid or None).
        model_name / model_hash / new_model_hash: base model identity for ``ss_sd_model_*`` metadata.
        encode_latents_progress: ``(done, total)`` while caching latents.

    Construction validates ``cfg`` (``ValueError`` / :class:`OptimizerUnavailableError`) and raises ``ValueError``
    when ``network_train_text_encoder_only`` is set for a host without a text encoder. ``v_parameterization`` /
    ``zero_terminal_snr`` reconfigure the host's schedule here (:meth:`..host.DiffusionHost.configure_schedule`),
    so training, validation and the per-epoch samples share it.
    """

    def __init__(self, host: DiffusionHost, dataset: KohyaDataset, cfg: TrainConfig, *,
                 progress: ProgressFn | None = None, on_epoch: EpochFn | None = None, model_name: str = "",
                 model_hash: str = "", new_model_hash: str = "",
                 encode_latents_progress: Callable[[int, int], None] | None = None):
        self.host, self.dataset, self.cfg = host, dataset, cfg.validate()
        self.progress, self.on_epoch = progress, on_epoch
        self.model_name, self.model_hash, self.new_model_hash = model_name, model_hash, new_model_hash
        self.encode_latents_progress = encode_latents_progress
        self.out_dir = Path(cfg.output_dir)
        self.state_dir = Path(cfg.state_dir) if cfg.state_dir else self.out_dir
        self.train_te = not cfg.network_train_unet_only and any(c.startswith("te") for c in host.components())
        self.train_unet = not cfg.network_train_text_encoder_only
        if cfg.network_train_text_encoder_only and not self.train_te:
            raise ValueError("network_train_text_encoder_only is set but the model has no text encoder")
        self._te_cache: dict[str, Conditioning] = {}
        self.dataset_effective_colors: float | None = None
        self._sample_warnings: set[str] = set()  # warnings render_samples gives once per run
        self.family = family(getattr(host, "arch", "sd1"))
        for msg in objective_for(host).check_config(self.cfg, host):  # raises for settings that contradict it
            logger.warning(msg)
        if cfg.t5xxl_max_token_length is not None and hasattr(host, "set_t5xxl_max_token_length"):
            host.set_t5xxl_max_token_length(cfg.t5xxl_max_token_length)
        if cfg.clip_skip is not None or cfg.max_token_length is not None:
            for msg in host.configure_text(clip_skip=cfg.clip_skip, max_token_length=cfg.max_token_length):
                logger.warning(msg)
        if cfg.v_parameterization or cfg.zero_terminal_snr:
            host.configure_schedule(prediction_type="v_prediction" if cfg.v_parameterization else None,
                                    zero_terminal_snr=cfg.zero_terminal_snr)
        if cfg.zero_terminal_snr and host.prediction_type != "v_prediction":
            # kohya train_util.verify_training_args gives the same warning
            logger.warning("zero_terminal_snr is on but the model predicts epsilon: at the last timestep x_t is "
                           "pure noise and epsilon-prediction cannot recover x0; use a v-prediction model "
                           "(v_parameterization = true)")
        # optional hook(network) run once after the network is built, before the optimizer: starts the run from
        # given LoRA weights (nodes/interop.py continues a ComfyUI LORA_MODEL this way); a resume state wins over it
        self.init_network: Callable[[LoRANetwork], None] | None = None
        # this process's part of a multi-process run (training/distributed.py; set by the CLI under
        # `accelerate launch`); None = one process, the trainer as it always was
        self.dist = None

    # -- schedule ---------------------------------------------------------------------------------------------
    def schedule(self) -> tuple[int, int, int]:
        """``(batches_per_epoch, max_train_steps, num_epochs)`` by kohya's rules (module docstring)."""
        nb = self.dataset.num_batches(self.cfg.train_batch_size)
        if self.dist is not None:  # bucket batches per process (kohya: len(train_dataloader) after prepare)
            nb = self.dist.batches_per_process(nb)
        upe = math.ceil(nb / self.cfg.gradient_accumulation_steps)
        if self.cfg.max_train_epochs:
            max_steps = self.cfg.max_train_epochs * upe
        else:
            max_steps = self.cfg.max_train_steps
        num_epochs = math.ceil(max_steps / upe)
        return nb, max_steps, num_epochs

    # -- conditioning -----------------------------------------------------------------------------------------
    def _encode(self, captions: list[str], entries: Sequence | None = None,
                flipped: Sequence[bool] | None = None) -> Conditioning:
        """The batch's :class:`~..conditioning.Conditioning`: text-encoder outputs (cached per caption while the
        text encoders are frozen, as kohya's ``cache_text_encoder_outputs``), plus, for families with size
        conditioning (SDXL), each image's size ids from ``entries`` (see :func:`sdxl_size_ids`)."""
        if self.train_te and not getattr(self, "_te_frozen", False):
            cond = Conditioning.wrap(self.host.encode_prompts(captions))
        else:
            missing = [c for c in dict.fromkeys(captions) if c not in self._te_cache]
            if missing:
                with torch.no_grad():
                    enc = Conditioning.wrap(self.host.encode_prompts(missing)).detach()
                if len(self._te_cache) > 4096:
                    self._te_cache.clear()
                for c, row in zip(missing, enc.rows()):
                    self._te_cache[c] = row
            cond = Conditioning.cat([self._te_cache[c] for c in captions])
        if entries is not None and self.family.size_conditioning:
            cond = cond.with_extras(size_ids=sdxl_size_ids(entries, flipped))
        return cond

    # -- evaluation -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def validation_loss(self, autocast=None) -> float | None:
        """Kohya's epoch validation loss (see module docstring); ``None`` without a validation split."""
        ds, cfg = self.dataset, self.cfg
        if not ds.val_entries:
            return None
        ts = objective_for(self.host).validation_timesteps(self.host, cfg)  # kohya's 4 points (t or σ)
        seed = ds.options.validation_seed if ds.options.validation_seed is not None else cfg.seed
        gen = torch.Generator("cpu").manual_seed(int(seed))
        bs = cfg.train_batch_size
        groups: dict[tuple[int, int], list] = {}
        for e in ds.val_entries:
            groups.setdefault(e.bucket_reso, []).append(e)
        total, n = 0.0, 0
        for key in sorted(groups):
            items = groups[key]
            for i in range(0, len(items), bs):
                batch = items[i:i + bs]
                lat = torch.stack([e.latents for e in batch])
                cond = self._encode([e.caption for e in batch], batch)
                for t in ts:
                    tt = torch.full((len(batch),), t.item(), dtype=ts.dtype)
                    loss = diffusion_loss(self.host, lat, cond, cfg, gen, timesteps=tt, autocast=autocast)
                    total += float(loss) * len(batch)
                    n += len(batch)
        return total / max(n, 1)

    @torch.no_grad()
    def render_samples(self, prompts: Sequence[str]) -> list[np.ndarray]:
        """One image per prompt (uint8 ``[H, W, 3]``); kohya per-prompt options (:mod:`.sample_prompts`) override
        the trainer's sample settings; seeds ``sample_seed + i`` unless a prompt gives ``--d``
        (:func:`.samples.render_samples`)."""
        return render_samples(self.host, self.cfg, prompts, self.dataset.options.size, self._sample_warnings)

    def _dataset_effective_colors(self) -> float | None:
        if self.dataset_effective_colors is None:
            self.dataset_effective_colors = dataset_effective_colors(self.dataset, self.cfg)
        return self.dataset_effective_colors

    # -- the run ----------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Train; write checkpoints, states, the epoch table and the best file; return a :class:`TrainResult`.

        Raises:
            TrainingDivergedError: NaN/Inf loss or gradient (files of finished epochs are kept).
            OptimizerUnavailableError, ValueError: bad settings (before anything is written), or a resume state
                that does not match the settings / dataset.
            FileNotFoundError: ``cfg.resume`` names a training state that does not exist.
            Whatever ``progress`` raises (cancel), after cleanup.
        """
        cfg, host, ds = self.cfg, self.host, self.dataset
        device = host.device
        autocast, precision, use_scaler = _autocast_factory(cfg.mixed_precision, device)
        nb, max_steps, num_epochs = self.schedule()
        prompts = cfg.prompts
        has_samples = bool(prompts) and cfg.sample_every_n_epochs > 0
        metric, direction = resolve_metric(cfg.best_metric, cfg.best_direction, bool(ds.val_entries), has_samples)
        if metric == "none":
            direction = "min"

        network, groups = build_network_and_groups(host, cfg, self.train_unet, self.train_te)
        # a text encoder whose every LoRA parameter is frozen (text_encoder_lr = 0) is encoded once and cached
        trainable = {id(p) for g in groups for p in g["params"]}
        self._te_frozen = not any(id(p) in trainable for p in network.parameter_groups()["te"])
        if self._te_frozen or not self.train_te:  # kohya cache_text_encoder_outputs: cached, then off the device
            from .te_offload import offload_after_caching
            offload_after_caching(self, prompts)
        if self.init_network is not None:  # e.g. continue from a ComfyUI LORA_MODEL (values copied in place)
            self.init_network(network)
        network.to(device)
        optimizer = build_optimizer(cfg.optimizer_type, groups, cfg.learning_rate, cfg.optimizer_args, device)
        scheduler = build_scheduler(cfg, optimizer, max_steps)
        scaler = torch.amp.GradScaler(device.type) if use_scaler else None

        dp = self.dist  # multi-process run (training/distributed.py) or None
        is_main = dp is None or dp.is_main
        if is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.state_dir.mkdir(parents=True, exist_ok=True)
        gen = torch.Generator("cpu").manual_seed(int(cfg.seed))
        py_rng = random.Random(int(cfg.seed))
        history: list[dict] = []
        step_losses: list[float] = []
        stopper = EarlyStopping(cfg.early_stopping_patience)
        best: dict[str, Any] = {"epoch": None, "value": None}
        epoch_files: dict[int, Path] = {}
        start_epoch, global_step = 0, 0
        session_id = random.Random(time.time_ns()).randint(0, 2 ** 32)
        self._session_id = session_id
        started_at = time.time()

        resume_path = None
        if cfg.resume:
            resume_path = find_latest_state(self.state_dir, cfg.output_name) if str(cfg.resume) == "auto" \
                else Path(cfg.resume)
            if resume_path is None:
                logger.warning("resume=auto: no saved state in %s; starting from scratch", self.state_dir)
        if resume_path is not None:
            js, tensors = read_state(resume_path, self.cfg, self.dataset,
                                     self.dist.world if self.dist else 1)
            network.load_kohya_state_dict({k[len("network."):]: v for k, v in tensors.items()
                                           if k.startswith("network.")})
            optimizer.load_state_dict(optimizer_state_from_flat(
                {k: v.to(device) if k.startswith("optimizer.") else v for k, v in tensors.items()},
                js["optimizer"]))
            scheduler.load_state_dict(js["scheduler"])
            if scaler is not None and js.get("scaler"):
                scaler.load_state_dict(js["scaler"])
            gen.set_state(tensors["rng.noise"])
            network.generator.set_state(tensors["rng.dropout"])
            py_rng.setstate(_py_rng_from_json(js["python_rng"]))
            start_epoch, global_step = int(js["epoch"]), int(js["global_step"])
            history, step_losses = list(js["history"]), list(js["step_losses"])
            stopper.load(js["early_stopping"])
            best = dict(js["best"])
            epoch_files = {int(k): self.out_dir / v for k, v in js.get("epoch_files", {}).items()}
            session_id = self._session_id = int(js.get("session_id", session_id))
            logger.info("resumed from %s at epoch %d, step %d", resume_path.name, start_epoch, global_step)
        if dp is not None:  # every process starts from the main process's weights (as DDP does)
            dp.output_dir = self.out_dir
            dp.broadcast_parameters(network.parameters())

        metadata = build_metadata(cfg, ds, host, num_epochs=num_epochs, max_steps=max_steps, batches_per_epoch=nb,
                                  session_id=session_id, started_at=started_at, model_name=self.model_name,
                                  model_hash=self.model_hash, new_model_hash=self.new_model_hash,
                                  mixed_precision=cfg.mixed_precision, train_unet=self.train_unet,
                                  train_te=self.train_te)
        metadata = self._kohya_metadata(metadata, optimizer)
        if dp is not None:  # ss_total_batch_size = train_batch_size × processes × accumulation, ss_num_processes
            metadata = dp.metadata(metadata, cfg)
        gc_on = False
        last_good: Path | None = max(epoch_files.items())[1] if epoch_files else None
        stopped_early = False
        final_path = None
        best_path = self.out_dir / f"{cfg.output_name}-best.safetensors"
        sample_rows: list[list[np.ndarray]] = []
        sample_labels: list[str] = []
        try:
            network.install(host)
            if cfg.gradient_checkpointing:
                gc_on = _set_gradient_checkpointing(host, True)
                if not gc_on:
                    logger.warning("this host does not support gradient checkpointing; continuing without")
            with (dp.main_first() if dp is not None and ds.options.cache_latents_to_disk
                  else contextlib.nullcontext()):  # disk caches: written once by the main process, then read
                ds.cache_latents(host.encode_images, vae_key=self._vae_key(), progress=self.encode_latents_progress)
            if start_epoch >= num_epochs:
                logger.info("the saved state already finished all %d epochs", num_epochs)
            target_value = None
            if metric == "effective_colors_vs_dataset":
                target_value = self._dataset_effective_colors()
            if cfg.sample_at_first and has_samples and start_epoch == 0 and is_main:  # kohya sample_at_first
                network.eval()
                first = self.render_samples(prompts)
                for i, im in enumerate(first):
                    save_png(im, self.state_dir / "sample" / f"{cfg.output_name}_e{0:06d}_{i:02d}.png")
                sample_rows.append(first)
                sample_labels.append("before training")
            for epoch in range(start_epoch, num_epochs):
                ep1 = epoch + 1
                batches = ds.epoch_batches(ep1, cfg.train_batch_size, cfg.seed)
                network.train()
                micro_losses: list[float] = []
                epoch_losses: list[float] = []
                optimizer.zero_grad(set_to_none=True)
                for bi, idx in enumerate(batches):
                    entries = [ds.entries[i] for i in idx]
                    caps = [process_caption(e.caption, getattr(e, "captions", None) or ds.captions, py_rng,
                                            epoch=ep1, step=global_step, max_train_steps=max_steps) for e in entries]
                    lat, flips = [], []
                    for e in entries:
                        flip_on = ds.options.flip_aug if getattr(e, "flip_aug", None) is None else e.flip_aug
                        flip = flip_on and py_rng.random() < 0.5
                        flips.append(bool(flip and e.latents_flipped is not None))
                        lat.append(e.latents_flipped if flips[-1] else e.latents)
                    latents = torch.stack(lat)
                    network.resample_dropout(True)
                    lw = None
                    if any(getattr(e, "is_reg", False) for e in entries):  # kohya batch["loss_weights"]
                        lw = torch.tensor([cfg.prior_loss_weight if getattr(e, "is_reg", False) else 1.0
                                           for e in entries])
                    own = dp is None or dp.owns(bi)
                    if not own:  # another process trains this micro-batch: draw its randomness only
                        dp.draw_only(diffusion_loss, host, latents, cfg, gen, loss_weights=lw)
                    else:
                        with torch.set_grad_enabled(True):
                            cond = self._encode(caps, entries, flips)
                            loss = diffusion_loss(host, latents, cond, cfg, gen, autocast=autocast, loss_weights=lw)
                        lv = float(loss.detach())
                    if own and dp is None and not math.isfinite(lv):
                        raise TrainingDivergedError(
                            f"the loss became {lv} at epoch {ep1}, step {global_step + 1}; training stopped. "
                            + (f"The last good checkpoint is {last_good.name}." if last_good else
                               "No epoch had finished, so no checkpoint was written.")
                            + " Lower the learning rate, or use mixed_precision bf16 instead of fp16.")
                    if own:
                        micro_losses.append(lv)
                        scaled = loss / cfg.gradient_accumulation_steps
                        (scaler.scale(scaled) if scaler is not None else scaled).backward()
                    last_micro = bi == len(batches) - 1
                    # with N processes one optimizer step spans N × gradient_accumulation_steps micro-batches
                    if (bi + 1) % (cfg.gradient_accumulation_steps * (dp.world if dp else 1)) != 0 and not last_micro:
                        continue
                    params = [p for g in optimizer.param_groups for p in g["params"]]
                    if dp is not None:  # average gradients over the processes; agree on the loss and on NaN
                        step_loss, bad = dp.sync_step(params, micro_losses)
                        micro_losses = [step_loss] if step_loss is not None else []
                        if bad:
                            raise TrainingDivergedError(
                                f"the loss became NaN/Inf at epoch {ep1}, step {global_step + 1} (in at least one "
                                "process); training stopped. " + (f"The last good checkpoint is {last_good.name}."
                                                                  if last_good else "No checkpoint was written.")
                                + " Lower the learning rate, or use mixed_precision bf16 instead of fp16.")
                    if scaler is not None:
                        scaler.unscale_(optimizer)
                    if cfg.max_grad_norm > 0:
                        norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                        if scaler is None and not torch.isfinite(norm):
                            raise TrainingDivergedError(
                                f"the gradient norm became {float(norm)} at epoch {ep1}, step {global_step + 1}; "
                                "training stopped. " + (f"The last good checkpoint is {last_good.name}."
                                                        if last_good else "No checkpoint was written."))
                    if scaler is not None:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    if cfg.scale_weight_norms:  # kohya apply_max_norm_regularization after the step
                        max_norm_regularization(network.loras.values(), cfg.scale_weight_norms)
                    global_step += 1
                    step_loss = float(np.mean(micro_losses))
                    micro_losses = []
                    step_losses.append(step_loss)
                    epoch_losses.append(step_loss)
                    if dp is not None:  # the main process reports; a cancel there stops every process
                        dp.call_progress(self.progress, global_step, max_steps,
                                         {"loss": step_loss, "epoch": ep1, "lr": scheduler.get_last_lr()[0]})
                    elif self.progress is not None:
                        self.progress(global_step, max_steps, {"loss": step_loss, "epoch": ep1,
                                                               "lr": scheduler.get_last_lr()[0]})
                    if global_step >= max_steps:
                        break

                # ---- end of epoch: files, evaluation, selection ----
                network.eval()
                network.resample_dropout(False)
                is_last = ep1 >= num_epochs or global_step >= max_steps
                if not is_main:  # the main process evaluates, writes and decides on early stopping
                    if dp.broadcast_flag(None) or global_step >= max_steps:
                        break
                    continue
                record: dict[str, Any] = {"epoch": ep1, "step": global_step,
                                          "train_loss": float(np.mean(epoch_losses)) if epoch_losses else None,
                                          "lr": float(scheduler.get_last_lr()[0])}
                if ds.val_entries and (ep1 % max(1, cfg.validate_every_n_epochs) == 0 or is_last):
                    record["val_loss"] = self.validation_loss(autocast)
                samples: list[np.ndarray] = []
                if has_samples and (ep1 % cfg.sample_every_n_epochs == 0 or is_last):
                    samples = self.render_samples(prompts)
                    sample_dir = self.state_dir / "sample"
                    names = []
                    for i, im in enumerate(samples):
                        p = save_png(im, sample_dir / f"{cfg.output_name}_e{ep1:06d}_{i:02d}.png")
                        names.append(str(p.relative_to(self.state_dir)))
                    record["samples"] = names
                    record.update(sample_metrics(samples, cfg, target_value))
                    sample_rows.append(samples)
                    sample_labels.append(f"epoch {ep1}")

                file_epoch = None if is_last else ep1
                save_now = is_last or (cfg.save_every_n_epochs and ep1 % cfg.save_every_n_epochs == 0)
                if save_now:
                    md = dict(metadata, ss_epoch=ep1, ss_steps=global_step, ss_training_finished_at=time.time())
                    path = save_lora_file(self.out_dir / epoch_file_name(cfg.output_name, file_epoch), network, md,
                                          cfg.save_precision)
                    epoch_files[ep1] = path
                    record["file"] = path.name
                    last_good = path

                # best epoch and early stopping
                stop = False
                if metric != "none":
                    value = record.get(metric)
                    score = score_of(float(value), direction, target_value) if isinstance(value, (int, float)) \
                        else None
                    improved_before = stopper.best_score
                    stop = stopper.update(ep1, score)
                    if score is not None and (improved_before is None or stopper.best_epoch == ep1):
                        best = {"epoch": ep1, "value": float(value)}
                        reason = (f"best epoch {ep1} of {num_epochs} by {metric} "
                                  f"({direction}{'' if target_value is None or direction != 'target' else f' → {target_value:.3g}'})"
                                  f" = {float(value):.6g}")
                        md = dict(metadata, ss_epoch=ep1, ss_steps=global_step,
                                  ss_training_finished_at=time.time(), ss_best_epoch=ep1, ss_best_metric=metric,
                                  ss_best_value=float(value), ss_best_reason=reason)
                        save_lora_file(best_path, network, md, cfg.save_precision)
                        best["reason"] = reason
                        record["best_so_far"] = 1
                history.append(record)
                if stop and not is_last:
                    # early stop: this epoch is the run's last, written under the final name (kohya's last file)
                    stopped_early = True
                    record["stopped_early"] = 1
                    md = dict(metadata, ss_epoch=ep1, ss_steps=global_step, ss_training_finished_at=time.time(),
                              ss_stopped_early=True)
                    path = save_lora_file(self.out_dir / epoch_file_name(cfg.output_name, None), network, md,
                                          cfg.save_precision)
                    if not save_now:
                        epoch_files[ep1] = path
                        record["file"] = path.name
                    last_good = path
                    save_now = True
                if save_now and cfg.save_state:
                    stem = cfg.output_name if (is_last or stopped_early) else f"{cfg.output_name}-{ep1:06d}"
                    write_state(self.state_dir, stem, self.cfg, self.dataset, session_id=self._session_id,
                                num_processes=self.dist.world if self.dist is not None else 1, network=network,
                                optimizer=optimizer, scheduler=scheduler, scaler=scaler, gen=gen, py_rng=py_rng,
                                epoch=ep1, global_step=global_step, history=history, step_losses=step_losses,
                                stopper=stopper, best=best, epoch_files=epoch_files)
                self._write_table(history, best.get("epoch"), metric, direction, target_value)
                if self.on_epoch is not None:
                    preview = labelled_grid([samples], [f"epoch {ep1}"]) if samples else None
                    self.on_epoch(record, preview)
                if dp is not None:
                    dp.broadcast_flag(stopped_early)
                if stopped_early or global_step >= max_steps:
                    break
            final_path = self.out_dir / epoch_file_name(cfg.output_name, None)
            if not final_path.is_file():
                final_path = None
        finally:
            if gc_on:
                _set_gradient_checkpointing(host, False)
            network.remove()
            network.to("cpu")
            self._te_cache.clear()

        if not is_main:  # files, tables and pictures are the main process's
            return TrainResult(output_dir=self.out_dir.resolve(), final_path=None, best_path=None, best_epoch=None,
                               best_metric=metric, best_value=None, epoch_files={}, history=[],
                               step_losses=step_losses, global_step=global_step, epochs_done=0,
                               stopped_early=False, table_path=None, network=network)
        table_path = self.state_dir / f"{cfg.output_name}-epochs.json"
        loss_img = render_loss_curve(step_losses, history, math.ceil(nb / cfg.gradient_accumulation_steps),
                                     best.get("epoch"))
        table_img = render_epoch_table(history, self._table_columns(history), best.get("epoch"),
                                       title=f"{cfg.output_name}: best by {metric}")
        save_png(loss_img, self.state_dir / f"{cfg.output_name}-loss.png")
        save_png(table_img, self.state_dir / f"{cfg.output_name}-epochs.png")
        grid = labelled_grid(sample_rows, sample_labels, [p[:18] for p in prompts]) if sample_rows else None
        if grid is not None:
            save_png(grid, self.state_dir / f"{cfg.output_name}-samples.png")
        return TrainResult(output_dir=self.out_dir.resolve(), final_path=final_path.resolve() if final_path else None,
                           best_path=best_path.resolve() if best_path.is_file() and best.get("epoch") else None,
                           best_epoch=best.get("epoch"), best_metric=metric, best_value=best.get("value"),
                           epoch_files={k: v.resolve() for k, v in epoch_files.items()}, history=history,
                           step_losses=step_losses, global_step=global_step, epochs_done=len(history),
                           stopped_early=stopped_early, table_path=table_path.resolve(), loss_curve=loss_img,
                           table_image=table_img, sample_grid=grid, network=network)

    # -- helpers ----------------------------------------------------------------------------------------------
    def _kohya_metadata(self, metadata: dict, optimizer) -> dict:
        """kohya's key set and value formats (:mod:`.kohya_metadata`); ``no_metadata`` keeps kohya's minimum."""
        from .kohya_metadata import apply_kohya_formats, minimum_metadata

        cfg = self.cfg
        kw = _optimizer_kwargs(cfg.optimizer_args)
        if cfg.optimizer_type.lower() == "sgdnesterov":
            kw.setdefault("momentum", 0.9)
        md = apply_kohya_formats(metadata, getattr(cfg, "_raw", {}) or {}, optimizer=optimizer, optimizer_kwargs=kw)
        return minimum_metadata(md) if cfg.no_metadata else md

    def _vae_key(self) -> str:
        """A fingerprint of the host's VAE: the latents of a fixed 64×64 gradient (for disk latent caches)."""
        if not self.dataset.options.cache_latents_to_disk:
            return ""
        import hashlib

        ramp = torch.linspace(-1, 1, 64)
        pix = torch.stack([ramp.view(1, -1).expand(64, 64), ramp.view(-1, 1).expand(64, 64),
                           torch.zeros(64, 64)]).unsqueeze(0)
        with torch.no_grad():
            lat = self.host.encode_images(pix).float()
        return hashlib.sha256((lat * 1000).round().numpy().tobytes()).hexdigest()[:16]

    @staticmethod
    def _table_columns(history: Sequence[Mapping[str, Any]]) -> list[str]:
        preferred = ["epoch", "step", "train_loss", "val_loss", "effective_colors", "dataset_effective_colors",
                     "in_palette_frac"]
        present = {k for r in history for k, v in r.items() if isinstance(v, (int, float))}
        cols = [c for c in preferred if c in present]
        extra = sorted(k for k in present if k not in cols and k not in ("lr", "best_so_far", "stopped_early",
                                                                         "effective_colors_vs_dataset"))
        return (cols + extra)[:9]

    def _write_table(self, history, best_epoch, metric, direction, target) -> Path:
        doc = {"schema": EPOCHS_SCHEMA, "output_name": self.cfg.output_name, "best_metric": metric,
               "best_direction": direction, "best_target": target, "best_epoch": best_epoch,
               "epochs": history}
        return atomic_write_text(self.state_dir / f"{self.cfg.output_name}-epochs.json",
                                 json.dumps(_jsonable(doc), indent=1))


def train_lora(host: DiffusionHost, dataset: KohyaDataset, cfg: TrainConfig, **kw) -> TrainResult:
    """Convenience wrapper: ``LoraTrainer(host, dataset, cfg, **kw).run()``."""
    return LoraTrainer(host, dataset, cfg, **kw).run()
