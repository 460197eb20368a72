"""Benchmark: streaming weighted-sum merge of two full-size SD1.5 fp16 checkpoints, file to file.

Creates two random SD1.5-shaped fp16 checkpoints (UNet 859.5 M + CLIP ViT-L text encoder 123 M + VAE 83.7 M
parameters, about 2.13 GB each; shapes from diffusers' model classes on the meta device) in a temporary folder,
then measures, each path in a fresh subprocess (so peak RSS is its own):

* ``io_floor``: the reference — read both files and write one with the ``safetensors`` library
  (``load_file`` ×2 + ``save_file`` + fsync), no arithmetic;
* ``stream_floor``: read both tensor by tensor (``WeightFile``) and stream A's tensors out with
  ``SafetensorsStreamWriter`` (our I/O path without arithmetic);
* ``naive``: load both state dicts fully, merge, ``save_file``;
* ``conceptlab``: :func:`conceptlab.training.merge_files.merge_checkpoints` (weighted sum α = 0.5, fp16, input
  SHA-256 computed concurrently), and the same with ``hash_inputs=False``.

Prints wall time and peak RSS above the interpreter's baseline (VmHWM − VmRSS after imports) for each, and
the ratios against the I/O floor. Targets: ≤ 1.5× the floor's time, ≤ 1.5 GB peak RSS above baseline.
Everything is deleted afterwards. Usage: ``python benchmarks/merge.py [--keep-dir DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ALPHA = 0.5


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def sd15_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of a single-file SD1.5 checkpoint (LDM UNet names; HF CLIP; diffusers VAE names)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from conceptlab.formats.keys import diffusers_to_ldm_unet, unet_config_for

    shapes = {}
    d2l = diffusers_to_ldm_unet("sd1")  # outside the meta-device context (it runs a real conversion)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config_for("sd1"))
        for k, v in unet.state_dict().items():
            shapes["model.diffusion_model." + d2l.get(k, k)] = tuple(v.shape)
        te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                          num_hidden_layers=12, projection_dim=768, vocab_size=49408,
                                          max_position_embeddings=77))
        for k, v in te.state_dict().items():
            if k.endswith("position_ids"):
                continue
            k = k if k.startswith("text_model.") else "text_model." + k
            shapes["cond_stage_model.transformer." + k] = tuple(v.shape)
        vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], latent_channels=4, layers_per_block=2,
                            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
        for k, v in vae.state_dict().items():
            shapes["first_stage_model." + k] = tuple(v.shape)
    return shapes


def make_checkpoint(path: Path, shapes: dict, seed: int) -> None:
    import torch

    from conceptlab.formats.safetensors_io import SafetensorsStreamWriter

    import math

    g = torch.Generator().manual_seed(seed)
    pool = (torch.randn(1 << 24, generator=g) * 0.05).to(torch.float16)  # rotated slices of a random pool:
    specs = {k: (torch.float16, s) for k, s in shapes.items()}            # fast, and different per tensor
    with SafetensorsStreamWriter(path, specs, overwrite=True) as w:
        for k, s in shapes.items():
            n = math.prod(s)
            start = int(torch.randint(0, pool.numel(), (1,), generator=g))
            rolled = torch.cat([pool[start:], pool[:start]])
            flat = rolled.repeat(n // rolled.numel() + 1)[:n] if n > rolled.numel() else rolled[:n]
            w.write(k, flat.reshape(s).clone())


# ------------------------------------------------------------------------------------------- measured paths
def run_io_floor(a, b, out):
    from safetensors.torch import load_file, save_file

    sa = load_file(a)
    sb = load_file(b)
    save_file(sa, out)
    del sb
    _fsync(out)


def run_stream_floor(a, b, out):
    from conceptlab.formats.safetensors_io import SafetensorsStreamWriter, WeightFile

    with WeightFile(a) as fa, WeightFile(b) as fb:
        specs = {k: (fa.dtype(k), fa.shape(k)) for k in fa.keys()}
        with SafetensorsStreamWriter(out, specs, overwrite=True) as w:
            for k in fa.keys():
                ta = fa.get(k)
                fb.get(k)
                w.write(k, ta)


def run_naive(a, b, out):
    import torch
    from safetensors.torch import load_file, save_file

    sa = load_file(a)
    sb = load_file(b)
    merged = {k: ((1 - ALPHA) * v.float() + ALPHA * sb[k].float()).to(torch.float16) for k, v in sa.items()}
    save_file(merged, out)
    _fsync(out)


def run_conceptlab(a, b, out, hash_inputs=True):
    from conceptlab.training.merge_files import merge_checkpoints

    merge_checkpoints(a, b, out, alpha=ALPHA, dtype="fp16", overwrite=True, hash_inputs=hash_inputs)


def run_conceptlab_nohash(a, b, out):
    run_conceptlab(a, b, out, hash_inputs=False)


def _fsync(path):
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


PATHS = {"io_floor": run_io_floor, "stream_floor": run_stream_floor, "naive": run_naive,
         "conceptlab": run_conceptlab, "conceptlab_nohash": run_conceptlab_nohash}


def child(name, a, b, out):
    import torch  # noqa: F401 - import before the baseline, as every path needs it
    import safetensors.torch  # noqa: F401

    import conceptlab.training.merge_files  # noqa: F401

    base = _rss_kib("VmRSS")
    t0 = time.perf_counter()
    PATHS[name](a, b, out)
    dt = time.perf_counter() - t0
    peak = _rss_kib("VmHWM")
    print(json.dumps({"name": name, "seconds": dt, "peak_above_baseline_gib": (peak - base) / 2 ** 20,
                      "baseline_gib": base / 2 ** 20}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", nargs=4, metavar=("NAME", "A", "B", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--dir", default=None, help="where to create the temporary files (default: system temp)")
    ap.add_argument("--repeat", type=int, default=1, help="repeat each measured path (best time is reported)")
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    tmp = Path(tempfile.mkdtemp(prefix="conceptlab-merge-bench-", dir=args.dir))
    try:
        t0 = time.perf_counter()
        shapes = sd15_shapes()
        a, b = tmp / "a.safetensors", tmp / "b.safetensors"
        make_checkpoint(a, shapes, 1)
        make_checkpoint(b, shapes, 2)
        size = a.stat().st_size
        n = sum(int(__import__("math").prod(s)) for s in shapes.values())
        print(f"created 2 x {size / 1e9:.2f} GB ({n / 1e6:.1f} M params, {len(shapes)} tensors, fp16) "
              f"in {time.perf_counter() - t0:.0f} s; CPU cores: {os.cpu_count()}")
        results = {}
        order = ["io_floor", "conceptlab", "conceptlab_nohash", "stream_floor", "naive"]
        for _ in range(args.repeat):
            for name in order:
                out = tmp / f"out_{name}.safetensors"
                proc = subprocess.run([sys.executable, __file__, "--child", name, str(a), str(b), str(out)],
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    print(f"{name}: failed\n{proc.stderr[-2000:]}")
                    continue
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                if name not in results or r["seconds"] < results[name]["seconds"]:
                    results[name] = r
                out.unlink(missing_ok=True)
        floor = results["io_floor"]["seconds"]
        print(f"\n{'path':<20}{'wall s':>9}{'x floor':>9}{'peak RSS above baseline (GiB)':>32}")
        for name in order:
            if name in results:
                r = results[name]
                print(f"{name:<20}{r['seconds']:>9.2f}{r['seconds'] / floor:>9.2f}{r['peak_above_baseline_gib']:>32.2f}")
        ours = results.get("conceptlab")
        if ours:
            print(f"\nconceptlab vs I/O floor: {ours['seconds'] / floor:.2f}x time (target <= 1.5x), "
                  f"{ours['peak_above_baseline_gib']:.2f} GiB peak RSS above baseline (target <= 1.5 GB)")
            if "naive" in results:
                nv = results["naive"]
                print(f"conceptlab vs naive: {ours['seconds'] / nv['seconds']:.2f}x time, "
                      f"{ours['peak_above_baseline_gib']:.2f} vs {nv['peak_above_baseline_gib']:.2f} GiB peak RSS")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
