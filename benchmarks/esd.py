"""ESD benchmark: iterations/s and peak memory of Concept Lab's eraser vs a reference-style implementation.

Both run on the same SD1.5-shaped UNet (the real SD1.5 config, random weights: nothing is downloaded), with the
same ``x_t`` source (``noised``: a cached clean latent forward-noised at a random timestep), the same
resolution, ESD-x parameters, Adam, in one invocation of this script. Each implementation runs in its own child
process so that its peak memory (max RSS on CPU, ``torch.cuda.max_memory_allocated`` on GPU) is its own.

* **ours**: :func:`conceptlab.training.esd.erase.erase` — one UNet; the 80 attn2 tensors get trainable
  :class:`~conceptlab.training.host.FullDelta` modules applied in activation space (``F.linear(x, ΔW)`` added to
  each layer's output: no ``W + ΔW`` copy kept for backward); frozen predictions with the deltas switched off, the
  conditional and unconditional ones in one batched call; the result handed over without a copy.
* **ours, step in backward** (``ESDConfig.step_in_backward``): the same Adam update per tensor applied inside
  backward as soon as each gradient is complete, so no full set of gradients is held (printed as a second row;
  ``--delta-space weight`` measures the weight-space application instead).
* **reference-style**: written here after rohitgandikota/erasing ``esd_sd.py``: two UNet copies (``base_unet``
  frozen, ``esd_unet`` trained in place), three separate UNet calls per iteration, ``torch.optim.Adam`` over the
  attn2 parameters, and — as in that script, which never calls ``requires_grad_(False)`` on ``esd_unet`` —
  gradients for every parameter of the trained copy (``--ref-freeze`` turns that off for a fairer comparison).

* **UCE** (:mod:`conceptlab.training.esd.uce`, closed form, no iterations): the same UNet's 32 attn2 to_k / to_v
  projections edited for one concept with three preserved concepts; wall time and peak memory of the edit beside
  ESD's projected time for the paper's 1,000 iterations at the measured rate (``noised`` x_t, the cheaper
  source; ``self_sample`` adds on average ``ddim_steps`` UNet evaluations per iteration). Text embeddings are
  the same fixed random stand-ins as ESD's (no text encoder is timed in either).

Usage: ``python benchmarks/esd.py [--resolution 128] [--iterations 4] [--device cpu] [--ref-freeze]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import time
import zlib

import torch


def sd15_config() -> dict:
    """SD1.5's UNet2DConditionModel config (runwayml/stable-diffusion-v1-5 unet/config.json essentials)."""
    return dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(320, 640, 1280, 1280),
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                  "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=768, attention_head_dim=8)


def sdxl_config(width_div: int = 1) -> dict:
    """SDXL base's UNet2DConditionModel config (configs/sdxl_unet.json essentials), channels divided by
    ``width_div`` (heads keep SDXL's 64-channel head size)."""
    ch = tuple(c // width_div for c in (320, 640, 1280))
    return dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=ch,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
                attention_head_dim=tuple(max(1, c // 64) for c in ch), use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816, norm_num_groups=32 if ch[0] % 32 == 0 else 16)


FAMILY = {"family": "sd15", "width_div": 1}


def build_unet(device: str):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    cfg = sdxl_config(FAMILY["width_div"]) if FAMILY["family"] == "sdxl" else sd15_config()
    return UNet2DConditionModel(**cfg).to(device).eval()


def embed(prompt: str, device: str) -> torch.Tensor:
    """A fixed random stand-in for the text encoders' hidden states per prompt (no text encoder needed): CLIP-L
    ``[1, 77, 768]``, or for SDXL CLIP-L ‖ OpenCLIP-G ``[1, 77, 2048]``."""
    g = torch.Generator().manual_seed(zlib.crc32(prompt.encode()))
    return torch.randn(1, 77, 2048 if FAMILY["family"] == "sdxl" else 768, generator=g).to(device)


def pooled(prompt: str, device: str) -> torch.Tensor:
    """SDXL's pooled OpenCLIP-G stand-in ``[1, 1280]``."""
    g = torch.Generator().manual_seed(zlib.crc32(prompt.encode()) + 1)
    return torch.randn(1, 1280, generator=g).to(device)


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_ours(args) -> dict:
    from conceptlab.training.diffusers_host import DiffusersHost
    from conceptlab.training.esd.config import ESDConfig
    from conceptlab.training.esd.erase import erase

    from conceptlab.training.conditioning import Conditioning

    class BenchHost(DiffusersHost):
        def encode_prompts(self, prompts):
            ctx = torch.cat([embed(p, args.device) for p in prompts])
            if FAMILY["family"] == "sdxl":
                return Conditioning(ctx, torch.cat([pooled(p, args.device) for p in prompts]))
            return ctx

    host = BenchHost(build_unet(args.device), None, None, None, device=args.device, delta_space=args.delta_space)
    stamps = []
    cfg = ESDConfig(concepts="Van Gogh", iterations=args.iterations, width=args.resolution,
                    height=args.resolution, xt_source="noised", noised_cache=1, ddim_steps=1, lr=1e-5, seed=0,
                    step_in_backward=args.child == "ours_sib")

    def progress(info):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    res = erase(host, cfg, progress=progress)
    return {"it_per_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]), "peak_mb": peak_memory_mb(args.device),
            "loss_last": res.losses[-1], "trained_tensors": res.stats["trained_tensors"]}


def run_uce(args) -> dict:
    """UCE on the SD1.5-shaped UNet: one erased concept, three preserved ones."""
    from conceptlab.training.diffusers_host import DiffusersHost
    from conceptlab.training.esd.uce import UCEConfig, erase_uce_host

    host = DiffusersHost(build_unet(args.device), None, None, None, device=args.device)

    def encode(prompts):  # stand-in CLIP-L output; the "last content token" is position 3
        return torch.cat([embed(p, args.device) for p in prompts]), torch.full((len(prompts),), 3)

    cfg = UCEConfig(concepts="Van Gogh", preserve_concepts="Claude Monet; Rembrandt; a photo of a cat")
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = erase_uce_host(host, cfg, encode=encode)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "peak_mb": peak_memory_mb(args.device), "trained_tensors": res.stats["trained_tensors"],
            "trained_parameters": res.stats["trained_parameters"]}


def run_reference(args) -> dict:
    """Reference-style ESD (two UNets), after esd_sd.py's training loop; x_t from the same noised source."""
    base_unet = build_unet(args.device)
    base_unet.requires_grad_(False)
    esd_unet = copy.deepcopy(base_unet)
    esd_unet.requires_grad_(not args.ref_freeze)
    names, params = [], []
    for name, module in esd_unet.named_modules():
        if module.__class__.__name__ in ("Linear", "Conv2d") and "attn2" in name:
            for n, p in module.named_parameters():
                p.requires_grad_(True)
                names.append(f"{name}.{n}")
                params.append(p)
    opt = torch.optim.Adam(params, lr=1e-5)
    from conceptlab.training.diffusers_host import sd_alphas_cumprod

    ac = sd_alphas_cumprod()
    gen = torch.Generator().manual_seed(0)
    h = args.resolution // 8
    x0 = torch.randn(1, 4, h, h, generator=gen)
    erase_embeds, null_embeds = embed("Van Gogh", args.device), embed("", args.device)
    crit = torch.nn.MSELoss()
    stamps = []
    for it in range(args.iterations):
        opt.zero_grad()
        t = int(torch.randint(0, 1000, (1,), generator=gen))
        noise = torch.randn(x0.shape, generator=gen)
        a = ac[t]
        xt = (a.sqrt() * x0 + (1 - a).sqrt() * noise).to(args.device)
        kw_c, kw_u = {}, {}
        if FAMILY["family"] == "sdxl":  # esd_sdxl.py: pooled prompt embeds + add_time_ids on every call
            r = args.resolution
            ids = torch.tensor([[r, r, 0, 0, r, r]], dtype=torch.float32, device=args.device)
            kw_c = {"added_cond_kwargs": {"text_embeds": pooled("Van Gogh", args.device), "time_ids": ids}}
            kw_u = {"added_cond_kwargs": {"text_embeds": pooled("", args.device), "time_ids": ids}}
        with torch.no_grad():
            e_c = base_unet(xt, t, encoder_hidden_states=erase_embeds, **kw_c).sample
            e_u = base_unet(xt, t, encoder_hidden_states=null_embeds, **kw_u).sample
        e_esd = esd_unet(xt, t, encoder_hidden_states=erase_embeds, **kw_c).sample
        loss = crit(e_esd, e_c - 2.0 * (e_c - e_u))  # esd_sd.py convention, negative_guidance 2
        loss.backward()
        opt.step()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
    return {"it_per_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]), "peak_mb": peak_memory_mb(args.device),
            "loss_last": float(loss), "trained_tensors": len(params)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--iterations", type=int, default=4, help="timed iterations + 1 (the first is warm-up)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--ref-freeze", action="store_true",
                   help="reference-style: freeze the untrained parameters of the trained copy")
    p.add_argument("--family", choices=["sd15", "sdxl"], default="sd15",
                   help="sdxl: an SDXL-shaped UNet (pooled + size conditioning on every call, as esd_sdxl.py)")
    p.add_argument("--width-div", type=int, default=1, help="SDXL: divide the channel widths (CPU runs)")
    p.add_argument("--delta-space", choices=["activation", "weight"], default="activation",
                   help="how our host applies the trained deltas (default activation)")
    p.add_argument("--child", choices=["ours", "ours_sib", "ref", "uce"], help=argparse.SUPPRESS)
    args = p.parse_args()
    FAMILY.update(family=args.family, width_div=args.width_div)
    if args.child:
        torch.set_grad_enabled(True)
        out = {"ours": run_ours, "ours_sib": run_ours, "ref": run_reference, "uce": run_uce}[args.child](args)
        print("RESULT " + json.dumps(out), flush=True)
        return 0
    results = {}
    for which in (("ref", "ours", "ours_sib") if args.family == "sdxl" else ("ref", "ours", "ours_sib", "uce")):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", which, "--resolution", str(args.resolution),
               "--iterations", str(args.iterations), "--device", args.device, "--family", args.family,
               "--width-div", str(args.width_div), "--delta-space", args.delta_space] + \
            (["--ref-freeze"] if args.ref_freeze else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            return 1
        results[which] = json.loads(line[-1][7:])
    ours, ref = results["ours"], results["ref"]
    shape = (f"SDXL-shaped UNet (channels /{args.width_div})" if args.family == "sdxl" else "SD1.5-shaped UNet")
    sib = results["ours_sib"]
    print(f"ESD-x on an {shape} (random weights), {args.resolution}px, x_t source 'noised', "
          f"device {args.device}, torch threads {torch.get_num_threads()}, deltas in {args.delta_space} space")
    print(f"{'':28}{'it/s':>10}{'peak MB':>12}{'tensors':>9}")
    print(f"{'reference-style':28}{ref['it_per_s']:>10.3f}{ref['peak_mb']:>12.0f}{ref['trained_tensors']:>9}")
    print(f"{'Concept Lab':28}{ours['it_per_s']:>10.3f}{ours['peak_mb']:>12.0f}{ours['trained_tensors']:>9}")
    print(f"{'Concept Lab, step in bwd':28}{sib['it_per_s']:>10.3f}{sib['peak_mb']:>12.0f}{sib['trained_tensors']:>9}")
    sp, mem = ours["it_per_s"] / ref["it_per_s"], ours["peak_mb"] / ref["peak_mb"]
    print(f"ratio: {sp:.2f}x iterations/s (target >= 1.5), {mem:.2f}x peak memory (target <= 0.6)")
    print(f"ratio, step in backward: {sib['it_per_s'] / ref['it_per_s']:.2f}x iterations/s, "
          f"{sib['peak_mb'] / ref['peak_mb']:.2f}x peak memory")
    if "uce" not in results:
        return 0
    uce = results["uce"]
    esd_1000 = 1000 / ours["it_per_s"]
    print(f"\nUCE (closed form, 1 concept + 3 preserved) vs ESD-x's 1,000 iterations at {args.resolution}px:")
    print(f"{'':18}{'wall s':>12}{'peak MB':>12}{'tensors':>9}")
    print(f"{'ESD-x (projected)':18}{esd_1000:>12.1f}{ours['peak_mb']:>12.0f}{ours['trained_tensors']:>9}")
    print(f"{'UCE':18}{uce['wall_s']:>12.2f}{uce['peak_mb']:>12.0f}{uce['trained_tensors']:>9}")
    print(f"ratio: UCE takes {uce['wall_s'] / esd_1000:.5f}x ESD-x's time ({esd_1000 / uce['wall_s']:.0f}x faster), "
          f"{uce['peak_mb'] / ours['peak_mb']:.2f}x its peak memory")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
