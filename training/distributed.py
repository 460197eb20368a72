"""Data-parallel LoRA training over the processes ``accelerate launch`` (or ``torchrun``) starts.

``accelerate launch [--multi_gpu] [--num_processes N] [--num_machines M --machine_rank R --main_process_ip IP]
-m conceptlab train --config kohya.toml`` runs one trainer per process; this module is what they share. Without
a launcher (``WORLD_SIZE`` unset or 1) nothing here runs and the trainer is exactly the single-process one.

How a run is split (kohya-ss/sd-scripts ``train_network.py`` l. 780-1000 at commit 48d368f, re-implemented):

* **every process loads the model** on its own device (``cuda:<LOCAL_RANK>``, or the CPU with ``--device cpu``
  or without CUDA: gloo backend); the process group is accelerate's :class:`accelerate.PartialState`, with kohya's
  ``ddp_timeout`` (minutes, default 30). Note that ``accelerate launch --cpu`` starts one process whatever
  ``--num_processes`` says (without an MPI setup); ``--multi_gpu --num_processes N ... --device cpu`` or
  ``torchrun --nproc_per_node N`` start N CPU processes;
* **the dataset is sharded by bucket batches**: an epoch's bucket batches (``KohyaDataset.epoch_batches``, the
  same list on every process) go round-robin to the processes, batch ``j`` to process ``j mod N`` — what kohya's
  ``DataLoader(batch_size=1)`` over bucket batches gets from ``accelerator.prepare`` (accelerate
  ``data_loader.py`` ``BatchSamplerShard._iter_with_no_split``). accelerate pads the last round with batches from
  the start of the epoch (``even_batches``) so every process steps equally often; here a process without a
  batch in the last round contributes a zero gradient instead, so each image is seen exactly as often as with
  one process. Batches per epoch and process = ``ceil(batches / N)`` (kohya's ``len(train_dataloader)``,
  recorded as ``ss_num_batches_per_epoch``); optimizer steps per epoch = ``ceil(that / gradient_accumulation_steps)``;
* **train_batch_size is per process**; the effective (total) batch per optimizer step is
  ``train_batch_size × N × gradient_accumulation_steps`` (kohya's ``total_batch_size``, l. 985), written to
  ``ss_total_batch_size``; ``ss_batch_size_per_device`` keeps ``train_batch_size``. kohya has no metadata key for
  the process count (it only enters ``ss_total_batch_size``); Concept Lab also writes ``ss_num_processes``;
* **gradients of the LoRA parameters are averaged** over the processes once per optimizer step, before clipping,
  the GradScaler and the optimizer — one ``all_reduce`` of a flat buffer through :func:`accelerate.utils.reduce`.
  Why not ``accelerator.prepare(network)`` (torch DDP): the LoRA modules are never *called* through the wrapper
  (they patch the host's layers), and DDP arms its gradient hooks in ``forward``, so DDP would never reduce;
  kohya hits the same and reduces every gradient by hand (``NetworkTrainer.all_reduce_network``, l. 232);
* **the main process alone** writes files (LoRA files, states, samples, tables), renders samples, prints progress
  and evaluates epochs (validation loss, palette metrics, best epoch); it then tells every process whether the
  run stops early. A NaN/Inf loss or gradient, and a cancel raised by the progress callback, are agreed on at the
  same optimizer step by every process. A process that dies ends the others at their next collective with
  :class:`PeerProcessError` (the launcher also stops them); finished epochs' files stay as written (atomic).

Randomness (the "RNG per rank"): the trainer's generators — noise and timesteps (``torch.Generator``), caption
shuffling/dropout and flips (``random.Random``), LoRA dropout — are **replicated**: every process advances them
over *every* micro-batch of the optimizer step in the same order, computing the forward/backward pass only for
its own micro-batches and only drawing the randomness of the others (:meth:`DataParallel.draw_only`). Hence

* an N-process run with ``gradient_accumulation_steps = g`` draws exactly what one process with
  ``gradient_accumulation_steps = N·g`` draws, on the same bucket batches in the same order: the LoRA equals that
  single-process run up to float summation order (tests/test_distributed.py);
* the state the main process saves once is every process's state, and resumes on any number of processes that
  keeps the total batch (``train_batch_size`` equal, ``N × gradient_accumulation_steps`` equal); a resume that
  changes the total batch is refused with the ``gradient_accumulation_steps`` that would keep it.

Mixed precision and gradient accumulation are the kohya keys ``mixed_precision`` / ``gradient_accumulation_steps``;
``accelerate launch --mixed_precision`` (``ACCELERATE_MIXED_PRECISION``) fills ``mixed_precision`` when the config
does not set it (a different value in the config wins, with a warning). ``gradient_checkpointing`` is the kohya
key (accelerate's only checkpointing switch is FSDP's). DeepSpeed, FSDP and Megatron launches are refused: the
trainable LoRA parameters are small and replicated, there is nothing to shard.

The other commands refuse a multi-process launch too (:func:`refuse_multi_process`): ``merge``, ``merge-n``,
``extract-lora``, ``resize-lora``, ``uce`` and ``erase-convert`` compute one result into one file (each process
would compute and write the same file), and ``quickstart`` is a one-process demo.

ESD (``conceptlab erase``) stays single-process, and refuses a multi-process launch (:func:`refuse_multi_process`):

* the method optimises with **one draw per iteration** (a prompt, a timestep, an ``x_t``: Gandikota et al. 2023
  and rohitgandikota/erasing ``esd_sd.py``, batch 1). Data-parallel over N processes turns each iteration into
  a batch-N step: with the same ``iterations`` it takes as long per iteration as one process (each process still
  does one draw), so nothing finishes sooner; with ``iterations / N`` it is a different optimisation (N× fewer
  Adam updates, less gradient noise) whose erasure/preservation trade-off would have to be re-measured
  (tests/test_effect_esd.py) — not a speed-up of the same method;
* ESD trains **full-rank deltas**: an all-reduce per iteration moves 44 M parameters for ``esd-x`` (176 MB fp32)
  and ~816 M for ``esd-u`` (3.3 GB) on SD1.x, against one UNet step of compute;
* what *is* parallel without changing the method is the frozen model's self-sampling of ``x_t`` (independent of
  the trained deltas): N processes could pre-sample ``x_t`` chains for one trainer. That producer/consumer design
  is left for later.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

logger = logging.getLogger(__name__)

#: accelerate launch switches that select a sharding engine this trainer does not use
_REFUSED_ENGINES = {"ACCELERATE_USE_DEEPSPEED": "DeepSpeed (--use_deepspeed)", "ACCELERATE_USE_FSDP":
                    "FSDP (--use_fsdp)", "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM (--use_megatron_lm)"}


class PeerProcessError(RuntimeError):
    """Another process of a multi-process run failed (its own error is printed by that process); this one stops
    too. Files of finished epochs are left as written."""


def _first_sentence(exc: BaseException, limit: int = 160) -> str:
    text = (str(exc).splitlines() or [""])[0]
    cut = text.find(". ")
    text = text[:cut + 1] if cut > 0 else text
    return text if len(text) <= limit else text[:limit] + "…"


def launched_world_size() -> int:
    """The number of processes the launcher started (``WORLD_SIZE``, set by ``accelerate launch`` / ``torchrun``
    for multi-process runs); 1 without a launcher."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))
    except ValueError:
        return 1


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def apply_launcher_settings(flat: dict[str, Any]) -> list[str]:
    """Honour ``accelerate launch``'s switches in the flat kohya mapping ``flat`` (changed in place).

    * ``--mixed_precision`` (env ``ACCELERATE_MIXED_PRECISION``) fills ``mixed_precision`` when the config has no
      such key; when both are set and differ, the config wins and a warning says so;
    * ``ACCELERATE_GRADIENT_ACCUMULATION_STEPS`` (accelerate sets it from ``--gradient_accumulation_steps``)
      likewise for ``gradient_accumulation_steps``;
    * ``--dynamo_backend`` other than ``no`` is named as having no effect.

    Returns the warnings (printed by the caller). Raises ``ValueError`` for a DeepSpeed / FSDP / Megatron-LM launch
    and for a launcher precision this trainer does not run (fp8). Does nothing without accelerate's variables.
    """
    for env, name in _REFUSED_ENGINES.items():
        if _env_flag(env):
            raise ValueError(f"accelerate launch with {name} is not supported: the trainer runs data-parallel "
                             "(DDP) — every process holds the model and the small LoRA parameters; launch with "
                             "--multi_gpu / --num_processes N instead")
    notes: list[str] = []
    mp = os.environ.get("ACCELERATE_MIXED_PRECISION", "").strip().lower()
    if mp:
        if mp not in ("no", "fp16", "bf16"):
            raise ValueError(f"accelerate launch --mixed_precision {mp} is not supported here (no, fp16 or bf16)")
        if "mixed_precision" not in flat:
            if mp != "no":
                flat["mixed_precision"] = mp
        elif mp != "no" and str(flat["mixed_precision"]) != mp:
            notes.append(f"accelerate launch --mixed_precision {mp} differs from the config's mixed_precision = "
                         f"{flat['mixed_precision']!r}: the config's value is used")
    ga = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "").strip()
    if ga:
        if "gradient_accumulation_steps" not in flat:
            flat["gradient_accumulation_steps"] = int(ga)
        elif str(flat["gradient_accumulation_steps"]) != ga:
            notes.append(f"accelerate's gradient_accumulation_steps {ga} differs from the config's "
                         f"gradient_accumulation_steps = {flat['gradient_accumulation_steps']}: the config's value "
                         "is used")
    dyn = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "").strip().lower()
    if dyn and dyn != "no":
        notes.append(f"accelerate launch --dynamo_backend {dyn} has no effect here (the trainer does not "
                     "torch.compile the model)")
    return notes


def refuse_multi_process(command: str, reason: str) -> None:
    """Raise ``ValueError`` when this process is one of several a launcher started, for commands that run in one
    process only (``reason`` says why); without a launcher, does nothing."""
    n = launched_world_size()
    if n > 1:
        raise ValueError(f"conceptlab {command} runs in one process, but the launcher started {n}: {reason}. "
                         f"Run it with plain `conceptlab {command}` (or accelerate launch --num_processes 1)")


class _DrawOnlyHost:
    """A host whose ``predict`` returns zeros on the CPU: running the trainer's loss function on it consumes
    exactly the randomness a real micro-batch consumes (noise, its options, timesteps), at the cost of a few
    tensor operations, without the model. Every other attribute is the real host's."""

    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self, host):
        self._host = host

    def __getattr__(self, name):
        return getattr(self._host, name)

    def predict(self, x_t: torch.Tensor, timesteps: torch.Tensor, cond: Any = None, *args, **kwargs):
        return torch.zeros_like(x_t, dtype=torch.float32)


class DataParallel:
    """This process's part of a data-parallel run (see the module docstring for the rules).

    Attributes: ``rank`` (global process index), ``world`` (number of processes), ``local_rank``,
    ``is_main`` (rank 0), ``device`` (this process's ``torch.device``).
    """

    def __init__(self, state):
        self.state = state
        self.rank = int(state.process_index)
        self.world = int(state.num_processes)
        self.local_rank = int(state.local_process_index)
        self.is_main = bool(state.is_main_process)
        self.device = torch.device(state.device)
        self.output_dir: Path | None = None

    @classmethod
    def from_environment(cls, device: str | None = None, timeout_minutes: float | None = None
                         ) -> "DataParallel | None":
        """The run's :class:`DataParallel` when a launcher started several processes, else ``None``.

        ``device``: the CLI's ``--device``; ``cpu`` (or ``accelerate launch --cpu``, or a machine without CUDA)
        runs on the CPU with the gloo backend; otherwise each process takes ``cuda:<LOCAL_RANK>`` (a device index
        given with ``--device`` is not used: the launcher assigns the GPUs). ``timeout_minutes``: kohya's
        ``ddp_timeout``, how long a process waits at a collective (e.g. while the main process renders the
        epoch's samples); default 30 (accelerate's ``InitProcessGroupKwargs``). Raises ``ValueError`` for a
        DeepSpeed / FSDP / Megatron-LM launch or a timeout that is not a positive number.
        """
        if launched_world_size() <= 1:
            return None
        for env, name in _REFUSED_ENGINES.items():
            if _env_flag(env):
                raise ValueError(f"accelerate launch with {name} is not supported; use --multi_gpu")
        from accelerate import PartialState

        cpu = (str(device or "").startswith("cpu") or _env_flag("ACCELERATE_USE_CPU")
               or not torch.cuda.is_available())
        if device and not cpu and str(device) not in ("cuda", "auto"):
            logger.warning("--device %s is not used under a multi-process launch: process %s uses cuda:%s "
                           "(the launcher assigns one GPU per process)", device, os.environ.get("RANK", "?"),
                           os.environ.get("LOCAL_RANK", "?"))
        try:
            minutes = 30.0 if timeout_minutes in (None, "", 0) else float(timeout_minutes)
        except (TypeError, ValueError):
            minutes = -1.0
        if not minutes > 0:
            raise ValueError(f"ddp_timeout must be a positive number of minutes, got {timeout_minutes!r}")
        from datetime import timedelta

        return cls(PartialState(cpu=cpu, timeout=timedelta(minutes=minutes)))

    # -- sharding ---------------------------------------------------------------------------------------------
    def batches_per_process(self, num_batches: int) -> int:
        """Bucket batches per epoch this process trains: ``ceil(num_batches / world)`` (kohya's
        ``len(train_dataloader)`` after ``accelerator.prepare``)."""
        return math.ceil(int(num_batches) / self.world)

    def owns(self, micro_index: int) -> bool:
        """Whether the epoch's bucket batch ``micro_index`` (0-based) is trained by this process (round robin)."""
        return int(micro_index) % self.world == self.rank

    def draw_only(self, loss_fn: Callable, host, latents: torch.Tensor, cfg, generator: torch.Generator,
                  **kwargs) -> None:
        """Consume the randomness of another process's micro-batch: ``loss_fn(host, latents, None, cfg,
        generator, **kwargs)`` on a model-free stand-in host (:class:`_DrawOnlyHost`); the result is dropped."""
        with torch.no_grad():
            loss_fn(_DrawOnlyHost(host), latents, None, cfg, generator, **kwargs)

    # -- collectives ------------------------------------------------------------------------------------------
    def _reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        from accelerate.utils import reduce

        try:
            return reduce(t, reduction="sum")
        except RuntimeError as exc:  # gloo: "Connection closed by peer"; NCCL: a watchdog / timeout error
            raise self._peer_error(exc) from exc

    def _peer_error(self, exc: BaseException) -> PeerProcessError:
        where = f" in {self.output_dir}" if self.output_dir is not None else ""
        return PeerProcessError(
            f"process {self.rank} of {self.world}: another training process stopped (its error is printed above "
            f"by that process), so this one stops too. The files of finished epochs{where} are intact; resume "
            f"from the last saved state (resume = \"auto\"). [{type(exc).__name__}: {_first_sentence(exc)}]")

    def sync_step(self, params: Sequence[torch.Tensor], losses: Sequence[float]) -> tuple[float | None, bool]:
        """Average the gradients of ``params`` over the processes and agree on the step's loss, in one all-reduce.

        ``params``: the optimizer's parameters, in the same order on every process; a parameter without a gradient
        on every process keeps ``grad = None`` (so optimizers skip it as with one process). ``losses``: this
        process's micro-batch losses of the step (finite or not). Each process's gradient already holds
        ``Σ loss / gradient_accumulation_steps``; the average over processes is then ``Σ loss / (N ·
        gradient_accumulation_steps)``, the single-process value with ``N·g`` accumulation steps.

        Returns ``(mean loss over all micro-batches of the step or None, whether any loss was NaN/Inf)``.
        Raises :class:`PeerProcessError` when another process has died.
        """
        params = list(params)
        dev = params[0].device if params else self.device
        parts, sizes = [], []
        for p in params:
            g = p.grad
            parts.append(g.detach().reshape(-1).float() if g is not None else torch.zeros(p.numel(), device=dev))
            sizes.append(p.numel())
        finite = [v for v in losses if math.isfinite(v)]
        flags = torch.tensor([1.0 if p.grad is not None else 0.0 for p in params]
                             + [float(sum(finite)), float(len(finite)), float(len(losses) - len(finite))],
                             device=dev)
        flat = self._reduce_sum(torch.cat(parts + [flags]))
        off = 0
        for p, n, has in zip(params, sizes, flat[sum(sizes):sum(sizes) + len(params)].tolist()):
            if has > 0:
                g = flat[off:off + n].view_as(p).div_(self.world).to(p.dtype)
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
            off += n
        loss_sum, count, bad = flat[-3:].tolist()
        return (loss_sum / count if count else None), bad > 0

    def agree(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on any (cancel, NaN). Raises :class:`PeerProcessError`."""
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self._reduce_sum(t).item() > 0)

    def broadcast_flag(self, flag: bool | None) -> bool:
        """The main process's ``flag`` on every process (early stop decided by the main process's evaluation);
        other processes pass ``None``. Raises :class:`PeerProcessError`."""
        return self.agree(bool(flag) if self.is_main else False)

    def broadcast_parameters(self, params: Iterable[torch.Tensor]) -> None:
        """Copy the main process's values of ``params`` to every process (as DDP does at construction), so a
        network initialised from a global RNG (LyCORIS) starts identical everywhere."""
        from accelerate.utils import broadcast

        for p in params:
            try:
                out = broadcast(p.detach().clone(), from_process=0)
            except RuntimeError as exc:
                raise self._peer_error(exc) from exc
            with torch.no_grad():
                p.copy_(out)

    def call_progress(self, progress: Callable | None, *args) -> None:
        """Call the progress callback on the main process (only it reports) and agree on a cancel at this step:
        an exception the callback raises is re-raised on the main process, and ``KeyboardInterrupt`` naming the
        main process is raised on every other one. Raises :class:`PeerProcessError` when a process has died."""
        exc: BaseException | None = None
        if progress is not None and self.is_main:
            try:
                progress(*args)
            except BaseException as e:  # noqa: BLE001 - a cancel (ComfyUI interrupt, KeyboardInterrupt, ...)
                exc = e
        if self.agree(exc is not None):
            if exc is not None:
                raise exc
            raise KeyboardInterrupt(f"process {self.rank}: the main process cancelled the run")

    @contextlib.contextmanager
    def main_first(self):
        """Run the block on the main process first, then on the others (disk latent caches: written once, then
        read). accelerate's ``PartialState.main_process_first``."""
        with self.state.main_process_first():
            yield

    # -- metadata and resume ----------------------------------------------------------------------------------
    def metadata(self, md: dict[str, Any], cfg) -> dict[str, Any]:
        """``md`` with kohya's ``ss_total_batch_size`` (``train_batch_size × N × gradient_accumulation_steps``)
        and Concept Lab's ``ss_num_processes`` (kept out of ``no_metadata``'s minimum set, as kohya would)."""
        out = dict(md)
        if not getattr(cfg, "no_metadata", False):
            out["ss_total_batch_size"] = total_batch_size(cfg, self.world)
            out["ss_num_processes"] = self.world
        return out


def total_batch_size(cfg, world: int = 1) -> int:
    """Images per optimizer step: ``train_batch_size × world × gradient_accumulation_steps`` (kohya
    ``train_network.py`` l. 985)."""
    return int(cfg.train_batch_size) * int(world) * int(cfg.gradient_accumulation_steps)


def check_resume_batch(saved: Mapping[str, Any], saved_world: int, cfg, world: int) -> None:
    """Refuse a resume that changes the total batch (``ValueError`` naming both and the fix).

    ``saved``: the state's config dict; ``saved_world``: its ``num_processes`` (1 for states written before
    multi-process training). ``train_batch_size`` is checked by the caller; here only
    ``N × gradient_accumulation_steps`` may trade places (2 processes × 1 ≡ 1 process × 2).
    """
    old_ga = int(saved.get("gradient_accumulation_steps", cfg.gradient_accumulation_steps))
    old_bs = int(saved.get("train_batch_size", cfg.train_batch_size))
    old, new = old_bs * saved_world * old_ga, total_batch_size(cfg, world)
    if old == new:
        return
    if old_ga != cfg.gradient_accumulation_steps and saved_world == world:
        raise ValueError(f"cannot resume: the saved state was trained with different settings (gradient_accumulation"
                         f"_steps: {old_ga!r} -> {cfg.gradient_accumulation_steps!r})")
    fix = ""
    per = int(cfg.train_batch_size) * int(world)
    if old % per == 0:
        fix = (f"; to keep it on {world} process{'es' if world > 1 else ''} set gradient_accumulation_steps = "
               f"{old // per}")
    raise ValueError(f"cannot resume: the saved state was trained with a total batch of {old} (train_batch_size "
                     f"{old_bs} × {saved_world} process{'es' if saved_world > 1 else ''} × gradient_accumulation_"
                     f"steps {old_ga}), this run's is {new} (train_batch_size {cfg.train_batch_size} × {world} "
                     f"process{'es' if world > 1 else ''} × gradient_accumulation_steps "
                     f"{cfg.gradient_accumulation_steps}){fix}")
