"""Benchmark: LoRA training steps/s and peak memory, Concept Lab's trainer vs a plain diffusers + peft loop.

Same model (an SD1.5-shaped UNet: SD1.5's block layout and 768-d cross-attention, channel widths divided by
``--width-div``, 1 = the real SD1.5 UNet), same rank, batch, resolution and optimizer (AdamW). Each method runs
in its own process so peak RSS (CPU) / peak CUDA memory are separate. Concept Lab: weight-space deltas through
``torch.nn.utils.parametrize`` (the mechanism that also fits ComfyUI's weight wrappers) + kohya objective.
Reference: ``unet.add_adapter(peft.LoraConfig(...))`` on the same kohya target modules, ε-MSE loss.

    python benchmarks/train_lora.py [--steps 6] [--res 256] [--rank 16] [--batch 1] [--width-div 4] [--device cpu]

Prints both figures and the ratio. Speed is never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time

import torch

KOHYA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


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


def _worker(method: str, a: dict, q) -> None:
    torch.set_num_threads(a["threads"])
    dev = torch.device(a["device"])
    unet = _unet(a["width_div"]).to(dev)
    b, h = a["batch"], a["res"] // 8
    gen = torch.Generator().manual_seed(0)
    lat = torch.randn(b, 4, h, h, generator=gen)
    cond = torch.randn(b, 77, 768, generator=gen).to(dev)
    if method == "conceptlab":
        from conceptlab.training.diffusers_host import DiffusersHost
        from conceptlab.training.lora import LoRANetwork
        from conceptlab.training.trainer import TrainConfig, diffusion_loss

        host = DiffusersHost(unet, None, None, None, device=dev)
        net = LoRANetwork.create(host, network_dim=a["rank"], network_alpha=a["rank"])
        net.install(host)
        cfg = TrainConfig().validate()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        nparams = sum(p.numel() for p in net.parameters())

        def step():
            loss = diffusion_loss(host, lat, cond, cfg, gen)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
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
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(a["steps"]):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() / 2 ** 20 if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    q.put({"method": method, "steps_per_s": a["steps"] / dt, "peak_mib": peak, "lora_params": nparams})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--res", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--width-div", type=int, default=4)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cpu")
    a = vars(ap.parse_args(argv))
    ctx = mp.get_context("spawn")
    res = {}
    for method in ("conceptlab", "diffusers+peft"):
        q = ctx.Queue()
        p = ctx.Process(target=_worker, args=(method, a, q))
        p.start()
        res[method] = q.get()
        p.join()
    ours, ref = res["conceptlab"], res["diffusers+peft"]
    print(f"SD1.5-shaped UNet (channels /{a['width_div']}), {a['res']} px, rank {a['rank']}, batch {a['batch']}, "
          f"{a['device']}, {a['threads']} threads, {a['steps']} timed steps")
    print(f"{'method':<16}{'steps/s':>10}{'peak MiB':>12}{'LoRA params':>14}")
    for r in (ours, ref):
        print(f"{r['method']:<16}{r['steps_per_s']:>10.3f}{r['peak_mib']:>12.0f}{r['lora_params']:>14,}")
    print(f"ratio conceptlab / diffusers+peft: speed {ours['steps_per_s'] / ref['steps_per_s']:.2f}x, "
          f"peak memory {ours['peak_mib'] / ref['peak_mib']:.2f}x")
    print("(ComfyUI's TrainLoraNode is not measured here; see the README)", file=sys.stderr)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
