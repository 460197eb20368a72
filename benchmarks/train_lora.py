"""Benchmark: LoRA training steps/s and peak memory, Concept Lab's trainer vs the reference trainer.

Reference, chosen automatically:

* **ComfyUI's TrainLoraNode** (``comfy_extras/nodes_train.py``) when ComfyUI can be imported (``COMFYUI_PATH``
  points at a checkout; run with the Python environment ComfyUI runs in). Both trainers work on
  the same ComfyUI SD1.5-family MODEL: ComfyUI's own SD15 ``BaseModel`` built in-process with SD1.5's block
  layout and 768-d cross-attention (channel widths divided by ``--width-div``; 1 = the real SD1.5 UNet, seeded
  random weights), or a checkpoint file given with ``--checkpoint`` (``comfy.sd.load_checkpoint_guess_config``).
  The model is built under ``torch.inference_mode()`` and both trainers are called under it, as ComfyUI runs
  nodes. TrainLoraNode's ``train`` is called the way the node is (latents dict, CONDITIONING list, rank, batch,
  steps, AdamW, MSE, ``training_dtype``/``lora_dtype`` fp32 on CPU, no existing LoRA); its steps are timed from
  its own loss callback. Concept Lab runs its trainer core on the same patcher: ``nodes.comfy_host.ComfyHost``
  + ``training.lora.LoRANetwork`` (kohya targets) + the inner step of ``training.trainer.LoraTrainer.run``
  (``diffusion_loss``, backward, ``clip_grad_norm_`` at kohya's max_grad_norm 1, ``build_optimizer`` AdamW,
  ``build_scheduler`` constant, ``zero_grad``).
* **A plain diffusers + peft loop** otherwise (``unet.add_adapter(peft.LoraConfig(...))`` on the same kohya
  target modules, ε-MSE loss) against Concept Lab's trainer core on the diffusers host
  (``training.diffusers_host.DiffusersHost``), on an SD1.5-shaped ``UNet2DConditionModel``.

Same rank, batch, resolution, latents, conditioning, optimizer (AdamW, lr 1e-4) and thread count for both; one
warm-up step, then ``--steps`` timed steps, ``--repeats`` runs per row interleaved across rows; steps/s is one over
the median step time of all timed steps (robust to a machine loaded by other work). In ComfyUI mode two extra rows
by default: TrainLoraNode with its default gradient checkpointing, and Concept Lab with LoCon (``conv_dim`` = rank
on kohya's ResNet/sampler targets), a parameter set closer to TrainLoraNode's (which puts LoRA on every Linear and
Conv2d and trains a full diff of every bias and norm weight). Each trainer runs in its own spawned process, so the
memory figures
are separate: ``peak MiB`` is the process's peak RSS (ru_maxrss; on CUDA, peak allocated), ``train MiB`` the
peak RSS reached during training above the RSS right after the model was built (Linux ``/proc/self/clear_refs``
resets the high-water mark; ``-`` where that is unavailable), and ``live MiB`` the peak of heap allocations not yet
freed during training (glibc ``mallinfo2``, sampled every 2 ms; RSS also counts freed memory glibc keeps, which
varies from run to run by hundreds of MiB once weight-sized temporaries come and go).

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python benchmarks/train_lora.py [--steps 5] [--res 64]
        [--rank 16] [--batch 1] [--width-div 2] [--checkpoint FILE] [--repeats 3]
        [--node-gradient-checkpointing both|off|on] [--family sd15|sdxl|flux]
    COMFYUI_PATH=... python benchmarks/train_lora.py --family flux [--width-div 4] [--flux-blocks 2,4] [--res 128]
    python benchmarks/train_lora.py --reference diffusers [--res 256] [--width-div 4]
    python benchmarks/train_lora.py --processes 2 [--batch 4] [--res 128] [--threads 2] [--device cuda]

``--processes N`` measures data-parallel scaling instead (``training/distributed.py``): the trainer's step with
the gradient all-reduce, 1 process vs N processes on the same global batch, speed-up and scaling efficiency.

Prints a table with both figures, the ratios, the machine and its load average. Speed is never asserted in tests.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

KOHYA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]

# SD1.5's UNet in ComfyUI's ``UNetModel`` arguments (comfy/model_detection.py SD15 entry), shared with the e2e
# tests' checkpoint maker; ``model_channels`` is divided by ``--width-div``
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from e2e.checkpoint import SD15_UNET as SD15_UNET_CONFIG  # noqa: E402
# SDXL base UNet in ComfyUI's ``UNetModel`` arguments; ``model_channels`` divided by ``--width-div`` too
from e2e.checkpoint import SDXL_UNET as SDXL_UNET_CONFIG  # noqa: E402


# ------------------------------------------------------------------------------------------------------------
# memory helpers (Linux /proc; other systems fall back to ru_maxrss only)
# ------------------------------------------------------------------------------------------------------------

def _proc_status_mib(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (VmHWM), Linux ``clear_refs`` value 5; False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _glibc_live_mib():
    """Bytes the process has allocated and not freed (glibc ``mallinfo2``: ``uordblks + hblkhd``, all arenas), in
    MiB, or None where that call does not exist. Unlike RSS it excludes freed memory glibc keeps for reuse, which
    after a few weight-sized temporaries can be hundreds of MiB and differs between two runs of the same work."""
    import ctypes

    class _MI(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]
    try:
        libc = ctypes.CDLL("libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MI

    def live():
        m = fn()
        return (m.uordblks + m.hblkhd) / 2 ** 20
    return live


class _Mem:
    """Peak RSS of the whole process and of the training phase (above the RSS when :meth:`start` was called), and
    on glibc the peak of live heap allocations above the start (sampled every 2 ms by a thread: ``live MiB``)."""

    def __init__(self, dev: torch.device):
        self.dev = dev
        self.base = None
        self.reset_ok = False
        self._live = _glibc_live_mib() if dev.type == "cpu" else None
        self._live_peak = None
        self._stop = False

    def _sample(self) -> None:
        while not self._stop:
            self._live_peak = max(self._live_peak, self._live())
            time.sleep(0.002)

    def start(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2 ** 20
            self.reset_ok = True
            return
        self.base = _proc_status_mib("VmRSS")
        self.reset_ok = _reset_peak_rss() and self.base is not None
        if self._live is not None:
            import threading

            self._live_base = self._live_peak = self._live()
            threading.Thread(target=self._sample, daemon=True).start()

    def result(self) -> dict:
        if self.dev.type == "cuda":
            peak = torch.cuda.max_memory_allocated() / 2 ** 20
            return {"peak_mib": peak, "train_mib": peak - self.base, "model_mib": self.base, "live_mib": None}
        total = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        hwm = _proc_status_mib("VmHWM") if self.reset_ok else None
        self._stop = True
        live = (self._live_peak - self._live_base) if self._live is not None else None
        return {"peak_mib": total, "train_mib": (hwm - self.base) if hwm is not None else None,
                "model_mib": self.base, "live_mib": live}


# ------------------------------------------------------------------------------------------------------------
# diffusers + peft reference (no ComfyUI)
# ------------------------------------------------------------------------------------------------------------

def _unet(width_div: int):
    from diffusers import UNet2DConditionModel

    ch = tuple(c // width_div for c in (320, 640, 1280, 1280))
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                                block_out_channels=ch,
                                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                                cross_attention_dim=768, attention_head_dim=8,
                                norm_num_groups=max(8, 32 // width_div))


def _diffusers_worker(method: str, a: dict, q) -> None:
    torch.set_num_threads(a["threads"])
    dev = torch.device(a["device"])
    unet = _unet(a["width_div"]).to(dev)
    mem = _Mem(dev)
    mem.start()
    b, h = a["batch"], a["res"] // 8
    gen = torch.Generator().manual_seed(0)
    lat = torch.randn(b, 4, h, h, generator=gen)
    cond = torch.randn(b, 77, 768, generator=gen).to(dev)
    if method == "conceptlab":
        from conceptlab.training.diffusers_host import DiffusersHost
        from conceptlab.training.lora.network import LoRANetwork
        from conceptlab.training.lora.config import TrainConfig

        host = DiffusersHost(unet, None, None, None, device=dev)
        net = LoRANetwork.create(host, network_dim=a["rank"], network_alpha=a["rank"])
        net.install(host)
        cfg = TrainConfig().validate()
        step, nparams = _conceptlab_step(host, net, cfg, lat, cond, gen)
    else:
        from diffusers import DDPMScheduler
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=a["rank"], lora_alpha=a["rank"], init_lora_weights="gaussian",
                                    target_modules=KOHYA_TARGETS))
        params = [p for p in unet.parameters() if p.requires_grad]
        nparams = sum(p.numel() for p in params)
        opt = torch.optim.AdamW(params, lr=1e-4)
        sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        lat_d = lat.to(dev)

        def step():
            noise = torch.randn(lat_d.shape, generator=gen).to(dev)
            t = torch.randint(0, 1000, (b,), generator=gen).to(dev)
            x = sched.add_noise(lat_d, noise, t)
            pred = unet(x, t, encoder_hidden_states=cond).sample
            loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    step()  # warm-up
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(a["steps"]):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    q.put({"method": method, "steps_per_s": a["steps"] / dt, "lora_params": nparams, **mem.result()})


def _conceptlab_step(host, net, cfg, lat, cond, gen):
    """The inner optimizer step of ``LoraTrainer.run`` (no accumulation, no scaler): returns (step, n params)."""
    from conceptlab.training.lora.loss import diffusion_loss
    from conceptlab.training.lora.optim import build_optimizer, build_scheduler

    groups = net.parameter_groups()
    params = [p for g in groups.values() for p in g]
    opt = build_optimizer(cfg.optimizer_type, [{"params": params, "lr": cfg.learning_rate}], cfg.learning_rate,
                          cfg.optimizer_args, host.device)
    sched = build_scheduler(cfg, opt, 10 ** 6)

    def step():
        with torch.set_grad_enabled(True):
            loss = diffusion_loss(host, lat, cond, cfg, gen)
        if not math.isfinite(float(loss.detach())):
            raise RuntimeError("non-finite loss in the benchmark")
        loss.backward()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params)


# ------------------------------------------------------------------------------------------------------------
# ComfyUI: TrainLoraNode vs Concept Lab on one ComfyUI MODEL
# ------------------------------------------------------------------------------------------------------------

def _comfy_setup() -> Path:
    """Put ``COMFYUI_PATH`` on ``sys.path``; ComfyUI on CPU unless ``--device cuda``, its argv parsing off."""
    root = Path(os.environ.get("COMFYUI_PATH", "")).resolve()
    if not (root / "comfy").is_dir():
        raise RuntimeError("COMFYUI_PATH must point at a ComfyUI checkout (folder with comfy/)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    return root


def _comfy_available() -> bool:
    p = os.environ.get("COMFYUI_PATH")
    if not p or not Path(p, "comfy", "model_patcher.py").is_file():
        return False
    import importlib.util

    sys.path.insert(0, str(Path(p).resolve()))
    try:
        return all(importlib.util.find_spec(m) is not None for m in ("comfy", "comfy_extras", "conceptlab"))
    finally:
        sys.path.pop(0)


@torch.no_grad()
def _init_weights(module: torch.nn.Module, seed: int = 0) -> None:
    """Seeded fan-in-scaled normal weights (ComfyUI's ops leave ``torch.empty`` weights); norms 1, biases small."""
    g = torch.Generator("cpu").manual_seed(seed)
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(max(1, p[0].numel())))
        elif name.endswith("bias"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        else:
            p.fill_(1.0)


#: Flux.1 as ComfyUI's comfy/model_detection.py configures it; ``--family flux`` divides hidden size and heads by
#: ``--width-div`` (head dim 128 and rope axes kept) and uses ``--flux-blocks`` double/single blocks (Flux.1: 19, 38)
FLUX_CONFIG = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "vec_in_dim": 768,
               "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19,
               "depth_single_blocks": 38, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True,
               "guidance_embed": True}


def _comfy_flux_model(a: dict):
    """ComfyUI's Flux.1-dev model class (``supported_models.Flux`` → ``model_base.Flux``) at reduced width/depth,
    seeded weights, fp32 (the ``--family flux`` case).

    Built **outside** inference mode, unlike the UNet cases: ComfyUI's TrainLoraNode cannot train a Flux model whose
    parameters are inference tensors on a CPU ("Inference tensors cannot be saved for backward" at the RMSNorm
    ``scale`` of ``comfy/ldm/flux/layers.py``, which gets no weight wrapper; measured with ComfyUI 0.3.64). On a
    GPU the node's ``load_models_gpu`` moves the model with ``.to(device)`` outside inference mode, which makes
    every parameter a normal tensor, so both rows get the model in that state."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    div = a["width_div"]
    if 24 % div:
        raise ValueError("--family flux: --width-div must divide Flux's 24 heads (1, 2, 3, 4, 6, 8, 12, 24)")
    nd, ns = a["flux_blocks"]
    cfg = dict(FLUX_CONFIG, hidden_size=3072 // div, num_heads=24 // div, depth=nd, depth_single_blocks=ns)
    with torch.inference_mode(False):
        mc = comfy.supported_models.Flux(cfg)
        mc.set_inference_dtype(torch.float32, None)
        base = mc.get_model({})
        _init_weights(base.diffusion_model)
        base.eval()
        dev = mm.get_torch_device()
        model = comfy.model_patcher.ModelPatcher(base, load_device=dev, offload_device=torch.device("cpu"))
    return model, f"Flux.1-dev-shaped DiT (hidden {3072 // div}, {nd} double + {ns} single blocks)"


def _comfy_model(a: dict):
    """A ComfyUI ModelPatcher (SD1.5 family) built as ComfyUI would, inside ``torch.inference_mode()``."""
    if a.get("family") == "flux" and not a["checkpoint"]:
        return _comfy_flux_model(a)
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models

    with torch.inference_mode():
        if a["checkpoint"]:
            model = comfy.sd.load_checkpoint_guess_config(a["checkpoint"], output_vae=False, output_clip=False,
                                                          output_clipvision=False)[0]
            return model, f"checkpoint {Path(a['checkpoint']).name}"
        div = a["width_div"]
        if (320 // div) % 32 or 320 % div:
            raise ValueError("--width-div must keep 320/div a multiple of 32 (ComfyUI's GroupNorm(32)): 1, 2, 5, 10")
        if a.get("family") == "sdxl":
            cfg = comfy.supported_models.SDXL(dict(SDXL_UNET_CONFIG, model_channels=320 // div, dtype=torch.float32))
            label = "SDXL"
        else:
            cfg = comfy.supported_models.SD15(dict(SD15_UNET_CONFIG, model_channels=320 // div, dtype=torch.float32))
            label = "SD1.5"
        base = cfg.get_model({})
        _init_weights(base.diffusion_model)
        base.eval()
        dev = mm.get_torch_device()
        model = comfy.model_patcher.ModelPatcher(base, load_device=dev, offload_device=torch.device("cpu"))
        name = f"{label} UNet" if div == 1 else f"{label}-shaped UNet (channels /{div})"
        return model, name


def _comfy_worker(method: str, a: dict, q) -> None:
    torch.set_num_threads(a["threads"])
    _comfy_setup()
    from comfy.cli_args import args as comfy_args

    if a["device"] == "cpu":
        comfy_args.cpu = True
    import comfy.model_management as mm

    model, model_name = _comfy_model(a)
    dev = torch.device(mm.get_torch_device())
    b, h = a["batch"], a["res"] // 8
    gen = torch.Generator().manual_seed(0)
    sdxl = a.get("family") == "sdxl"
    flux = a.get("family") == "flux"
    with torch.inference_mode():  # ComfyUI's executor runs nodes in inference mode; upstream tensors are inference
        if flux:  # 16-channel latents; T5-XXL context [1, L, 4096], CLIP-L pooled [1, 768], dev guidance 3.5
            lat = torch.randn(b, 16, h, h, generator=gen)
            cond = torch.randn(1, a["t5_tokens"], 4096, generator=gen)
            pooled = torch.randn(1, 768, generator=gen)
        else:
            lat = torch.randn(b, 4, h, h, generator=gen)
            cond = torch.randn(1, 77, 2048 if sdxl else 768, generator=gen)
            pooled = torch.randn(1, 1280, generator=gen) if sdxl else None
    extra = {"pooled_output": pooled} if sdxl or flux else {}
    if flux:
        extra["guidance"] = 3.5  # what ComfyUI's FluxGuidance node puts on the CONDITIONING
    n_unet = sum(p.numel() for p in model.model.diffusion_model.parameters())
    mem = _Mem(dev)
    mem.start()
    times: list[float] = []
    if method == "TrainLoraNode":
        import comfy_extras.nodes_train as nt

        orig_init = nt.TrainSampler.__init__

        def timed_init(self, *args, **kw):  # time each step from the node's own per-step loss callback
            orig_init(self, *args, **kw)
            cb = self.loss_callback

            def loss_callback(loss):
                times.append(time.perf_counter())
                if cb is not None:
                    cb(loss)
            self.loss_callback = loss_callback

        nt.TrainSampler.__init__ = timed_init
        node = nt.TrainLoraNode()
        algorithm = next(iter(nt.adapter_maps))  # the node's default ("LoRA")
        with torch.inference_mode():
            out = node.train(model, {"samples": lat}, [[cond, extra]] * b, batch_size=b, steps=a["steps"] + 1,
                             grad_accumulation_steps=1, learning_rate=1e-4, rank=a["rank"], optimizer="AdamW",
                             loss_function="MSE", seed=0, training_dtype="fp32", lora_dtype="fp32",
                             algorithm=algorithm, gradient_checkpointing=a["node_gradient_checkpointing"],
                             existing_lora="[None]")
        nparams = sum(t.numel() for t in out[1].values())
    else:
        from conceptlab.nodes.comfy_host import ComfyHost
        from conceptlab.training.conditioning import Conditioning
        from conceptlab.training.lora.network import LoRANetwork
        from conceptlab.training.lora.config import TrainConfig

        with torch.inference_mode():
            host = ComfyHost(model)
            with torch.inference_mode(False):
                cfg = TrainConfig(network_dim=a["rank"], network_alpha=a["rank"], learning_rate=1e-4).validate()
                conv = a.get("conv_dim") or None  # LoCon: kohya's 3x3 conv targets too (closer to the node's set)
                net = LoRANetwork.create(host, network_dim=cfg.network_dim, network_alpha=cfg.network_alpha,
                                         conv_dim=conv, conv_alpha=conv)
                net.install(host)
                if a.get("gradient_checkpointing"):
                    host.set_gradient_checkpointing(True)
                c = Conditioning(cond.clone().expand(b, -1, -1),
                                 pooled.clone().expand(b, -1) if pooled is not None else None,
                                 {"guidance": torch.full((b,), 3.5)} if flux else {})
                step, nparams = _conceptlab_step(host, net, cfg, lat.clone(), c, gen)
                for _ in range(a["steps"] + 1):
                    step()
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    times.append(time.perf_counter())
            host.close()
    dt = times[-1] - times[0]
    q.put({"method": method, "steps_per_s": (len(times) - 1) / dt,
           "step_s": [y - x for x, y in itertools.pairwise(times)], "lora_params": nparams, "model": model_name,
           "unet_params": n_unet, **mem.result()})


# ------------------------------------------------------------------------------------------------------------

def _run(target, method: str, a: dict) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(method, a, q))
    p.start()
    try:
        while True:
            try:
                return q.get(timeout=5)
            except Exception:  # noqa: BLE001 - queue.Empty: check the worker is still alive
                if not p.is_alive():
                    raise RuntimeError(f"the {method} worker died (exit code {p.exitcode})") from None
    finally:
        p.join()


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, python {platform.python_version()}; "
            f"load average {load}")


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


# ------------------------------------------------------------------------------------------------------------
# --processes N: data-parallel scaling (training/distributed.py), 1 process vs N on the same global batch
# ------------------------------------------------------------------------------------------------------------

def _dp_worker(rank: int, world: int, port: int, a: dict, q) -> None:
    """One process of the scaling run: the trainer's inner step (``diffusion_loss``, backward, the gradient
    all-reduce of :meth:`DataParallel.sync_step`, clipping, AdamW) on ``--batch / world`` images; rank 0 reports
    the per-step wall times (every process steps in lockstep: the all-reduce is a barrier)."""
    threads = max(1, a["threads"] // world)  # the same cores in total for every row
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads))
    torch.set_num_threads(threads)
    from conceptlab.training.diffusers_host import DiffusersHost
    from conceptlab.training.distributed import DataParallel
    from conceptlab.training.lora.network import LoRANetwork
    from conceptlab.training.lora.config import TrainConfig
    from conceptlab.training.lora.loss import diffusion_loss
    from conceptlab.training.lora.optim import build_optimizer

    dp = DataParallel.from_environment(a["device"]) if world > 1 else None
    dev = dp.device if dp is not None else torch.device(a["device"])
    host = DiffusersHost(_unet(a["width_div"]).to(dev), None, None, None, device=dev)
    net = LoRANetwork.create(host, network_dim=a["rank"], network_alpha=a["rank"], seed=0)
    net.install(host)
    net.to(dev)
    cfg = TrainConfig().validate()
    params = [p for g in net.parameter_groups().values() for p in g]
    opt = build_optimizer("AdamW", [{"params": params, "lr": 1e-4}], 1e-4, (), dev)
    per, h = a["batch"] // world, a["res"] // 8
    gen = torch.Generator().manual_seed(rank)
    lat = torch.randn(per, 4, h, h, generator=gen)
    cond = torch.randn(per, 77, 768, generator=gen).to(dev)

    def step():
        with torch.set_grad_enabled(True):
            loss = diffusion_loss(host, lat, cond, cfg, gen)
        loss.backward()
        if dp is not None:
            dp.sync_step(params, [float(loss.detach())])
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up
    times = []
    for _ in range(a["steps"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    if rank == 0:
        q.put({"processes": world, "step_s": times, "threads_per_process": torch.get_num_threads(),
               "device": str(dev), "lora_params": sum(p.numel() for p in params)})


def _run_processes(world: int, a: dict) -> dict:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_dp_worker, args=(r, world, port, a, q)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        while True:
            try:
                return q.get(timeout=5)
            except Exception:  # noqa: BLE001 - queue.Empty: check the workers are alive
                dead = [p for p in procs if not p.is_alive() and p.exitcode]
                if dead:
                    raise RuntimeError(f"a scaling worker died (exit code {dead[0].exitcode})") from None
    finally:
        for p in procs:
            p.join(timeout=60)


def processes_benchmark(a: dict) -> int:
    """``--processes N``: steps/s of the data-parallel trainer step with 1 and with N processes on the same global
    batch (``--batch``, split evenly), the speed-up and the scaling efficiency (speed-up / N; 1.0 = linear).

    CPU: every row uses ``--threads`` cores in total (``threads / N`` per process, gloo all-reduce). GPU
    (``--device cuda``): one GPU per process (``cuda:<rank>``), NCCL; needs N visible GPUs."""
    n = a["processes"]
    if a["batch"] % n:
        raise SystemExit(f"--batch {a['batch']} must be divisible by --processes {n} (the same global batch)")
    if a["device"].startswith("cuda") and torch.cuda.device_count() < n:
        raise SystemExit(f"--device cuda --processes {n} needs {n} GPUs; {torch.cuda.device_count()} visible")
    rows: dict[int, list[float]] = {1: [], n: []}
    info = {}
    for _ in range(a["repeats"]):  # interleaved: a machine whose load drifts affects both rows alike
        for world in (1, n):
            r = _run_processes(world, a)
            rows[world] += r["step_s"]
            info[world] = r
    sps = {w: 1.0 / _median(t) for w, t in rows.items()}
    speedup = sps[n] / sps[1]
    print(f"SD1.5-shaped diffusers UNet (channels /{a['width_div']}), {a['res']} px, rank {a['rank']}, global batch "
          f"{a['batch']}, AdamW, fp32, {a['device']}; {a['threads']} threads in total per row; 1 warm-up + "
          f"{a['steps']} timed steps per run, {a['repeats']} interleaved runs; steps/s = 1 / median step time")
    print(f"machine: {_machine()}")
    print(f"{'processes':<12}{'batch/proc':>11}{'threads/proc':>14}{'steps/s':>10}{'images/s':>10}")
    for w in (1, n):
        print(f"{w:<12}{a['batch'] // w:>11}{info[w]['threads_per_process']:>14}{sps[w]:>10.3f}"
              f"{sps[w] * a['batch']:>10.2f}")
    print(f"speed-up {n} processes / 1 process: {speedup:.2f}x; scaling efficiency {speedup / n:.0%} "
          f"(linear = 100%)")
    print(json.dumps({"args": a, "steps_per_s": sps, "speedup": speedup, "efficiency": speedup / n,
                      "step_s": rows, "lora_params": info[1]["lora_params"]}))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", choices=("auto", "comfyui", "diffusers"), default="auto",
                    help="auto: ComfyUI's TrainLoraNode when COMFYUI_PATH is importable, else diffusers+peft")
    ap.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    ap.add_argument("--repeats", type=int, default=3,
                    help="runs per method, interleaved; the median steps/s and the largest memory are reported "
                         "(a loaded machine makes single runs noisy)")
    ap.add_argument("--res", type=int, default=None, help="pixels (latent = res/8); default 64 ComfyUI, 256 diffusers")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--width-div", type=int, default=None,
                    help="divide SD1.5's channel widths (1 = real SD1.5); default 2 ComfyUI (1, 2, 5, 10 allowed), "
                         "4 diffusers")
    ap.add_argument("--checkpoint", default="", help="ComfyUI mode: an SD1.5-family checkpoint file instead of "
                                                     "the in-process model")
    ap.add_argument("--node-gradient-checkpointing", choices=("off", "on", "both"), default="both",
                    help="TrainLoraNode's gradient_checkpointing (its default is on); 'on'/'both' also add a "
                         "Concept Lab row with checkpointing (ComfyHost uses ComfyUI's own block patching)")
    ap.add_argument("--no-locon", action="store_true",
                    help="ComfyUI mode: leave out the extra Concept Lab row with LoCon (conv_dim = rank on kohya's "
                         "3x3 conv targets), which trains a parameter set closer to TrainLoraNode's every-layer one")
    ap.add_argument("--family", choices=("sd15", "sdxl", "flux"), default="sd15",
                    help="ComfyUI mode: the model family of the in-process model (sdxl: ComfyUI's SDXL class with "
                         "pooled + size conditioning; TrainLoraNode gets the same CONDITIONING with pooled_output; "
                         "flux: ComfyUI's Flux.1-dev class at hidden 3072/width-div with --flux-blocks blocks, "
                         "T5-shaped context, pooled and guidance 3.5, kohya lora_flux targets on our side)")
    ap.add_argument("--flux-blocks", default="1,2", help="--family flux: double,single block counts (Flux.1: 19,38)")
    ap.add_argument("--t5-tokens", type=int, default=32, help="--family flux: T5 context length (Flux.1-dev: 512)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--processes", type=int, default=0,
                    help="data-parallel scaling instead of the reference comparison: steps/s of 1 vs N processes "
                         "on the same global batch (--batch, default 4 here), with the scaling efficiency")
    a = vars(ap.parse_args(argv))
    if a["processes"] and a["family"] == "flux":
        ap.error("--processes measures the diffusers SD1.5-shaped trainer step; --family flux is the ComfyUI comparison")
    if a["processes"]:
        if a["processes"] < 2:
            ap.error("--processes needs at least 2")
        a["res"] = a["res"] or 128
        a["width_div"] = a["width_div"] or 4
        a["batch"] = a["batch"] if a["batch"] > 1 else 2 * a["processes"]
        return processes_benchmark(a)
    comfy = a["reference"] == "comfyui" or (a["reference"] == "auto" and _comfy_available())
    if a["reference"] == "comfyui" and not _comfy_available():
        ap.error("--reference comfyui needs COMFYUI_PATH pointing at a ComfyUI checkout importable by this python")
    flux = a["family"] == "flux"
    if flux and not comfy:
        ap.error("--family flux compares against ComfyUI's TrainLoraNode: set COMFYUI_PATH")
    a["flux_blocks"] = tuple(int(v) for v in str(a["flux_blocks"]).split(","))
    if len(a["flux_blocks"]) != 2 or min(a["flux_blocks"]) < 0:
        ap.error("--flux-blocks takes two counts: double,single")
    if a["res"] is None:
        a["res"] = 64 if comfy else 256
    if a["width_div"] is None:
        a["width_div"] = 8 if flux else 2 if comfy else 4
    if a["res"] % 8 or a["res"] < 8 or a["steps"] < 1 or a["repeats"] < 1:
        ap.error("--res must be a positive multiple of 8; --steps and --repeats at least 1")
    if a["checkpoint"] and not Path(a["checkpoint"]).is_file():
        ap.error(f"--checkpoint {a['checkpoint']!r} is not a file")

    if comfy:
        gc = a["node_gradient_checkpointing"]
        runs = [("conceptlab", _comfy_worker, {})]
        if not a["no_locon"] and not flux:  # Flux has no conv layers
            runs.append(("conceptlab", _comfy_worker, {"conv_dim": a["rank"]}))
        if gc in ("off", "both"):
            runs.append(("TrainLoraNode", _comfy_worker, {"node_gradient_checkpointing": False}))
        if gc in ("on", "both"):
            runs.append(("TrainLoraNode", _comfy_worker, {"node_gradient_checkpointing": True}))
            runs.append(("conceptlab", _comfy_worker, {"gradient_checkpointing": True}))
    else:
        runs = [("conceptlab", _diffusers_worker, {}), ("diffusers+peft", _diffusers_worker, {})]
    rows: dict[str, list[dict]] = {}
    failed: dict[str, str] = {}
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    for _ in range(a["repeats"]):
        for method, worker, extra in runs:
            label = method + (" (LoCon)" if extra.get("conv_dim") else "") + (
                " (grad ckpt)" if extra.get("node_gradient_checkpointing") or extra.get("gradient_checkpointing")
                else "")
            if flux and label in failed:
                continue
            try:
                rows.setdefault(label, []).append(_run(worker, method, {**a, **extra}))
            except RuntimeError as e:  # Flux: TrainLoraNode without checkpointing stops in backward (see main doc)
                if not flux or method != "TrainLoraNode":
                    raise
                rows.pop(label, None)
                failed[label] = str(e)
    res = {}
    for label, rs in rows.items():
        tm = [r["train_mib"] for r in rs if r["train_mib"] is not None]
        per_step = [t for r in rs for t in r.get("step_s", ())]
        lv = [r.get("live_mib") for r in rs if r.get("live_mib") is not None]
        res[label] = dict(rs[0], live_mib=max(lv) if lv else None, method=label,
                          steps_per_s=1.0 / _median(per_step) if per_step else
                          _median([r["steps_per_s"] for r in rs]), steps_per_s_runs=[r["steps_per_s"] for r in rs],
                          step_s=per_step, peak_mib=max(r["peak_mib"] for r in rs), train_mib=max(tm) if tm else None)
    labels = list(res)
    ours = res[labels[0]]
    our_labels = [k for k in labels if k.startswith("conceptlab")]
    ref_labels = [k for k in labels if not k.startswith("conceptlab")]
    if comfy:
        model = ours["model"] + f", {ours['unet_params'] / 1e6:.0f} M {'DiT' if flux else 'UNet'} params"
    else:
        model = f"SD1.5-shaped diffusers UNet (channels /{a['width_div']})"
    print(f"{model}; {a['res']} px, rank {a['rank']}, batch {a['batch']}, AdamW lr 1e-4, fp32, {a['device']}, "
          f"{a['threads']} threads, 1 warm-up + {a['steps']} timed steps per run, {a['repeats']} interleaved runs per row; "
          + ("steps/s = 1 / median step time" if comfy else "steps/s = median of runs"))
    lb = f"{load_before:.2f} at start; " if load_before is not None else ""
    print(f"machine: {_machine()} ({lb}1/5/15 min at the end)")
    print(f"{'method':<28}{'steps/s':>9}{'peak MiB':>10}{'train MiB':>11}{'live MiB':>10}{'LoRA params':>13}")
    for r in res.values():
        print(f"{r['method']:<28}{r['steps_per_s']:>9.3f}{r['peak_mib']:>10.0f}{_fmt(r['train_mib'], '.0f'):>11}"
              f"{_fmt(r.get('live_mib'), '.0f'):>10}{r['lora_params']:>13,}")
    for label, why in failed.items():
        print(f"{label:<28} failed: {why} (ComfyUI's Flux blocks add residuals in place, which breaks its backward "
              "without checkpointing; with checkpointing it runs but recomputes from in-place-updated inputs, see "
              "tests/test_comfy_host_flux.py)")
    for our_label in our_labels:
        mine = res[our_label]
        for label in ref_labels:
            ref = res[label]
            mem_ratio = ("" if mine["train_mib"] is None or not ref["train_mib"] else
                         f", training memory {mine['train_mib'] / ref['train_mib']:.2f}x")
            if mine.get("live_mib") is not None and ref.get("live_mib"):
                mem_ratio += f", live allocations {mine['live_mib'] / ref['live_mib']:.2f}x"
            print(f"ratio {our_label} / {label}: speed {mine['steps_per_s'] / ref['steps_per_s']:.2f}x, "
                  f"peak memory {mine['peak_mib'] / ref['peak_mib']:.2f}x{mem_ratio}")
    print(json.dumps({"args": a, "results": res}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
