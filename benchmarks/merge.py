"""Benchmark: streaming weighted-sum merge of two full-size SD1.5 fp16 checkpoints, file to file.

Creates two random SD1.5-shaped fp16 checkpoints (UNet 859.5 M + CLIP ViT-L text encoder 123 M + VAE 83.7 M
parameters, about 2.13 GB each; shapes from diffusers' model classes on the meta device) in a temporary folder,
then measures, each path in a fresh subprocess (so peak RSS is its own):

* ``io_floor``: the reference — read both files and write one with the ``safetensors`` library
  (``load_file`` ×2 + ``save_file`` + fsync), no arithmetic;
* ``conceptlab``: :func:`conceptlab.training.merge.files.merge_checkpoints` (weighted sum α = 0.5, fp16, input
  SHA-256 in the recipe) on inputs it has not seen (hash cache off: both inputs hashed);
  ``conceptlab_cached`` the same default merge of inputs merged before (their digests in the hash cache,
  :mod:`conceptlab.training.merge.hashes`); ``conceptlab_nohash`` with ``hash_inputs=False``;
* ``stream_floor``: read both tensor by tensor (``WeightFile``, memory-mapped) and stream A's tensors out with
  ``SafetensorsStreamWriter`` (a plain streaming copy, no arithmetic, no hash);
* ``naive``: load both state dicts fully, merge, ``save_file`` + fsync;
* with ``--compare-rev REV``: ``conceptlab@REV`` (+ ``_nohash``), the merge of git revision REV of this repo
  (extracted with ``git archive`` and imported first through PYTHONPATH) — for before/after tables.

Reproducibility: the paths run in a fixed order, ``--repeat`` rounds (default 3), and the median is reported
(with min–max). Before every run the page cache is put in the same state: ``--cache cold`` (default when
permitted: ``sync`` + ``echo 3 > /proc/sys/vm/drop_caches``, needs root) or ``--cache warm`` (``sync``, then
both inputs are read once so they sit in the page cache; used when caches cannot be dropped). The machine
(CPU model, cores, memory) and the load average before each run are printed with the figures: on a shared
machine the load average says how much the other jobs took. Times include the final fsync of the output.

Prints wall time and peak RSS above the interpreter's baseline (VmHWM − VmRSS after imports) for each, and
the ratios against the I/O floor (ratio of medians, and the median of the per-round ratios, which cancels
slow drifts of the machine's load). Targets: ≤ 1.5× the floor's time, ≤ 1.5 GB peak RSS above baseline.
With ``--methods all`` (or a comma list) every merge method is also timed twice in the same rounds: ours
(``ours:<method>``, :func:`merge_checkpoints` with its defaults, input hashing on) and sd-mecha's
(``sd-mecha:<method>``, the PyPI package with its defaults, the closest recipe: see :func:`run_mecha`), on A, B
and a third checkpoint C where the method uses a base. ``--size-mb N`` uses modest inputs: the first SD1.5 UNet
tensors (real names and shapes) up to N MB per file, so a 2-core machine measures every method in minutes.

Everything is deleted afterwards (except ``--inputs-dir``, which keeps the inputs for later runs). Usage:
``python benchmarks/merge.py [--repeat 3] [--cache cold|warm] [--compare-rev HEAD] [--dir DIR]
[--only io_floor,conceptlab] [--size-mb 300] [--methods all]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
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

    from conceptlab.formats.ldm_keys import diffusers_to_ldm_unet, unet_config_for

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
    from conceptlab.training.merge.files import merge_checkpoints

    merge_checkpoints(a, b, out, alpha=ALPHA, dtype="fp16", overwrite=True, hash_inputs=hash_inputs)


def run_conceptlab_nohash(a, b, out):
    run_conceptlab(a, b, out, hash_inputs=False)


# --------------------------------------------------------------------------- each method: ours vs sd-mecha
METHODS = ("weighted_sum", "add_difference", "train_difference", "ties", "dare", "della", "slerp", "model_stock")
NEEDS_C = ("add_difference", "train_difference", "ties", "della", "model_stock")  # C = the common base
DENSITY, SEED, DELLA_EPS = 0.2, 1, 0.1


def _c_path(a):
    return str(Path(a).with_name(Path(a).name.replace("_a.safetensors", "_c.safetensors")))


def run_ours(method, a, b, out):
    """Our streaming file merge with its defaults (input SHA-256 on), fp16 output."""
    from conceptlab.training.merge.files import merge_checkpoints

    c = _c_path(a) if method in NEEDS_C else None
    merge_checkpoints(a, b, out, c=c, method=method, alpha=ALPHA, density=DENSITY, seed=SEED, dtype="fp16",
                      overwrite=True)


def run_mecha(method, a, b, out):
    """sd-mecha (PyPI) with its defaults (threads, buffers), merging in fp32 and saving fp16: the closest recipe
    to each of our methods (ties / della / model stock on base C with A and B, ties through
    ``add_ties_with_dare`` with probability 0; dare as sd-mecha's
    ``dropout`` of B − A; train difference = add_difference with ``train_difference_mask``)."""
    import torch
    import sd_mecha

    cfg = "sd1-ldm"
    ma, mb = sd_mecha.model(a, config=cfg), sd_mecha.model(b, config=cfg)
    mc = sd_mecha.model(_c_path(a), config=cfg) if method in NEEDS_C else None
    if method == "weighted_sum":
        r = sd_mecha.weighted_sum(ma, mb, alpha=ALPHA)
    elif method == "add_difference":
        r = sd_mecha.add_difference(ma, mb, mc, alpha=ALPHA)
    elif method == "train_difference":
        r = sd_mecha.add_difference(ma, mb, mc, alpha=sd_mecha.train_difference_mask(ma, mb, mc, alpha=ALPHA))
    elif method == "ties":
        # add_difference_ties fails in sd-mecha 1.1.8 (merge space None); this is its TIES with nothing dropped
        r = sd_mecha.add_ties_with_dare(mc, ma, mb, probability=0.0, k=DENSITY, apply_stock=True, seed=SEED)
    elif method == "dare":
        r = sd_mecha.dropout(ma, mb, probability=1 - DENSITY, alpha=ALPHA, seed=SEED)
    elif method == "della":
        r = sd_mecha.add_ties_with_dare(mc, ma, mb, della_eps=DELLA_EPS, probability=1 - DENSITY, k=1.0,
                                        apply_stock=True, seed=SEED)
    elif method == "slerp":
        r = sd_mecha.slerp(ma, mb, alpha=ALPHA)
    elif method == "model_stock":
        r = sd_mecha.n_model_stock(mc, ma, mb)
    else:
        raise ValueError(method)
    sd_mecha.merge(r, output=out, merge_dtype=torch.float32, output_dtype=torch.float16,
                   strict_mandatory_keys=False, tqdm=_NoBar)
    _fsync(out)


class _NoBar:
    """tqdm stand-in (sd-mecha's progress bar would flood the captured output)."""

    def __init__(self, *a, **k):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, *a, **k):
        pass

    def set_postfix(self, *a, **k):
        pass

    def close(self):
        pass


def _fsync(path):
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


PATHS = {"io_floor": run_io_floor, "stream_floor": run_stream_floor, "naive": run_naive,
         "conceptlab": run_conceptlab, "conceptlab_nohash": run_conceptlab_nohash,
         "conceptlab_cached": run_conceptlab}


def child(name, a, b, out):
    import torch  # noqa: F401 - import before the baseline, as every path needs it
    import safetensors.torch  # noqa: F401

    import conceptlab.training.merge.files  # noqa: F401

    base = _rss_kib("VmRSS")
    t0 = time.perf_counter()
    kind = name.split("@")[0]
    if kind.startswith("ours:"):
        run_ours(kind[5:], a, b, out)
    elif kind.startswith("sd-mecha:"):
        run_mecha(kind[9:], a, b, out)
    else:
        PATHS[kind](a, b, out)
    dt = time.perf_counter() - t0
    peak = _rss_kib("VmHWM")
    print(json.dumps({"name": name, "seconds": dt, "peak_above_baseline_gib": (peak - base) / 2 ** 20,
                      "baseline_gib": base / 2 ** 20,
                      "module": conceptlab.training.merge.files.__file__}))


def machine() -> str:
    """CPU model, cores and memory of this machine (Linux /proc; falls back to os.cpu_count())."""
    model, mem = "", ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as fh:
            model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "")
    with contextlib.suppress(OSError):
        with open("/proc/meminfo") as fh:
            kib = next((int(ln.split()[1]) for ln in fh if ln.startswith("MemTotal")), 0)
            mem = f", {kib / 2 ** 20:.0f} GiB RAM"
    return f"{model or 'CPU'}, {os.cpu_count()} cores{mem}"


def loadavg() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/loadavg") as fh:
            return " ".join(fh.read().split()[:3])
    return "n/a"


def can_drop_caches() -> bool:
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("1\n")
        return True
    except OSError:
        return False


def prepare_cache(mode: str, inputs) -> None:
    """Put the page cache in the same state before every run (see the module docstring)."""
    os.sync()
    if mode == "cold":
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
    else:
        buf = bytearray(8 << 20)
        for p in inputs:
            with open(p, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass
    time.sleep(1.0)


def extract_rev(rev: str, dest: Path) -> Path:
    """``git archive`` revision ``rev`` of this repo into ``dest/conceptlab`` (importable via PYTHONPATH)."""
    repo = Path(__file__).resolve().parents[1]
    pkg = dest / "conceptlab"
    pkg.mkdir(parents=True)
    arch = subprocess.run(["git", "-C", str(repo), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(pkg)], input=arch, check=True)
    return dest


def mem_available() -> int:
    """MemAvailable in bytes (Linux), or a huge number where it cannot be read."""
    with contextlib.suppress(OSError, StopIteration):
        with open("/proc/meminfo") as fh:
            return next(int(ln.split()[1]) * 1024 for ln in fh if ln.startswith("MemAvailable"))
    return 1 << 62


# memory a path needs, in input-file sizes: the whole-file paths hold both inputs and an output
NEEDS_FILES = {"io_floor": 3.5, "naive": 4.5}


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", nargs=4, metavar=("NAME", "A", "B", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--dir", default=None, help="where to create the temporary files (default: system temp)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds over all paths; the median is reported")
    ap.add_argument("--cache", choices=("auto", "cold", "warm"), default="auto",
                    help="page-cache state before each run (auto: cold when drop_caches is permitted)")
    ap.add_argument("--compare-rev", default=None, help="also time the merge of this git revision (e.g. HEAD)")
    ap.add_argument("--only", default=None, help="comma-separated subset of paths to run")
    ap.add_argument("--inputs-dir", default=None,
                    help="keep the generated checkpoints in this folder and reuse them on later runs")
    ap.add_argument("--size-mb", type=float, default=0,
                    help="modest inputs: only the first SD1.5 UNet tensors (real names and shapes, key order) up to "
                         "this many MB of fp16 per file; 0 = the full 2.13 GB SD1.5 checkpoint (default)")
    ap.add_argument("--methods", default=None,
                    help="also time each of these methods (comma list, or 'all') for our merge and for sd-mecha "
                         "(PyPI sd-mecha; skipped with a message when not installed), in the same rounds")
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    cache = args.cache
    if cache == "auto":
        cache = "cold" if can_drop_caches() else "warm"
    elif cache == "cold" and not can_drop_caches():
        ap.error("--cache cold needs permission to write /proc/sys/vm/drop_caches (run as root, or use warm)")
    tmp = Path(tempfile.mkdtemp(prefix="conceptlab-merge-bench-", dir=args.dir))
    try:
        t0 = time.perf_counter()
        shapes = sd15_shapes()
        if args.size_mb:
            sub, total = {}, 0
            for k, shp in shapes.items():
                if not k.startswith("model.diffusion_model."):
                    continue
                nb = 2 * math.prod(shp)
                if total + nb > args.size_mb * 1e6 and sub:
                    break
                sub[k], total = shp, total + nb
            shapes = sub
        methods = []
        if args.methods:
            methods = list(METHODS) if args.methods == "all" else [m.strip() for m in args.methods.split(",")]
            bad = [m for m in methods if m not in METHODS]
            if bad:
                ap.error(f"unknown methods {bad}; choose from {', '.join(METHODS)}")
        tag = f"_{int(args.size_mb)}mb" if args.size_mb else ""
        where = Path(args.inputs_dir) if args.inputs_dir else tmp
        where.mkdir(parents=True, exist_ok=True)
        a, b = where / f"bench_sd15{tag}_a.safetensors", where / f"bench_sd15{tag}_b.safetensors"
        inputs = [(a, 1), (b, 2)]
        if any(m in NEEDS_C for m in methods):
            inputs.append((Path(_c_path(a)), 3))
        for p, seed in inputs:
            if not p.exists():
                make_checkpoint(p, shapes, seed)
        size = a.stat().st_size
        n = sum(int(math.prod(s)) for s in shapes.values())
        print(f"inputs: 2 x {size / 1e9:.2f} GB ({n / 1e6:.1f} M params, {len(shapes)} tensors, fp16) "
              f"in {time.perf_counter() - t0:.0f} s")
        print(f"machine: {machine()}; page cache before each run: {cache}; {args.repeat} rounds, fixed order")
        order = ["io_floor", "conceptlab", "conceptlab_cached", "conceptlab_nohash", "stream_floor", "naive"]
        if methods:
            try:
                import sd_mecha  # noqa: F401

                have_mecha = True
            except ImportError:
                have_mecha = False
                print("sd-mecha is not installed (pip install sd-mecha): its columns are skipped")
            for m in methods:
                order.append(f"ours:{m}")
                if have_mecha:
                    order.append(f"sd-mecha:{m}")
        # hash cache: every path hashes its inputs (a first merge of these files: CONCEPTLAB_HASH_CACHE=off) except
        # conceptlab_cached, the same default merge when the inputs were merged (hashed) before
        cache_file = tmp / "sha256-cache.json"
        env_for = {name: {**os.environ, "CONCEPTLAB_HASH_CACHE": "off"} for name in order}
        env_for["conceptlab_cached"] = {**os.environ, "CONCEPTLAB_HASH_CACHE": str(cache_file)}
        if "conceptlab_cached" in order:
            from conceptlab.formats.safetensors_io import sha256_file
            from conceptlab.training.merge import hashes as merge_hashes

            os.environ["CONCEPTLAB_HASH_CACHE"] = str(cache_file)
            merge_hashes.store({p: sha256_file(p) for p in (a, b)})
            del os.environ["CONCEPTLAB_HASH_CACHE"]
        if args.compare_rev:
            rev_dir = extract_rev(args.compare_rev, tmp / "rev")
            for name in ("conceptlab", "conceptlab_nohash"):
                tagged = f"{name}@{args.compare_rev}"
                order.append(tagged)
                env_for[tagged] = {**os.environ, "PYTHONPATH": str(rev_dir), "CONCEPTLAB_HASH_CACHE": "off"}
        if args.only:
            keep = set(args.only.split(","))
            order = [nm for nm in order if nm in keep]
        runs: dict[str, list[dict]] = {name: [] for name in order}
        for rnd in range(args.repeat):
            for name in order:
                out = tmp / "out.safetensors"
                prepare_cache(cache, (a, b))
                need = NEEDS_FILES.get(name, 1.0) * size
                if mem_available() < need:  # a shared machine: never push other jobs into the OOM killer
                    print(f"  round {rnd + 1} {name:<26} skipped: needs ~{need / 1e9:.1f} GB, "
                          f"{mem_available() / 1e9:.1f} GB available")
                    continue
                la = loadavg()
                proc = subprocess.run([sys.executable, __file__, "--child", name, str(a), str(b), str(out)],
                                      capture_output=True, text=True, env=env_for[name], check=False)
                out.unlink(missing_ok=True)
                if proc.returncode != 0:
                    print(f"{name}: failed\n{proc.stderr[-2000:]}")
                    continue
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                r["round"], r["load"] = rnd, la
                runs[name].append(r)
                print(f"  round {rnd + 1} {name:<26}{r['seconds']:7.2f} s  peak +{r['peak_above_baseline_gib']:.2f} GiB"
                      f"  (load average before: {la})", flush=True)
        floor_by_round = {r["round"]: r["seconds"] for r in runs.get("io_floor", [])}
        floor = _median([r["seconds"] for r in runs.get("io_floor", [])])
        print(f"\nmachine: {machine()}; cache: {cache}; load average now: {loadavg()}")
        print(f"{'path':<26}{'median s':>9}{'min-max s':>14}{'x floor':>9}{'x floor/round':>15}"
              f"{'peak RSS GiB':>14}")
        for name in order:
            rs = runs[name]
            if not rs:
                continue
            secs = [r["seconds"] for r in rs]
            per_round = [r["seconds"] / floor_by_round[r["round"]] for r in rs if r["round"] in floor_by_round]
            peak = max(r["peak_above_baseline_gib"] for r in rs)
            print(f"{name:<26}{_median(secs):>9.2f}{f'{min(secs):.1f}-{max(secs):.1f}':>14}"
                  f"{_median(secs) / floor:>9.2f}{_median(per_round):>15.2f}{peak:>14.2f}")
        ours = runs.get("conceptlab")
        if ours and not math.isnan(floor):
            med = _median([r["seconds"] for r in ours])
            peak = max(r["peak_above_baseline_gib"] for r in ours)
            print(f"\nconceptlab vs I/O floor: {med / floor:.2f}x time (target <= 1.5x), {peak:.2f} GiB peak RSS "
                  f"above baseline (target <= 1.5 GB = 1.40 GiB)")
            for other, what in (("conceptlab_cached", "inputs merged before (hash cache)"),
                                ("conceptlab_nohash", "--no-hash")):
                if runs.get(other):
                    print(f"conceptlab, {what}, vs I/O floor: "
                          f"{_median([r['seconds'] for r in runs[other]]) / floor:.2f}x time")
            if runs.get("naive"):
                nv = _median([r["seconds"] for r in runs["naive"]])
                npk = max(r["peak_above_baseline_gib"] for r in runs["naive"])
                print(f"conceptlab vs naive: {med / nv:.2f}x time, {peak:.2f} vs {npk:.2f} GiB peak RSS")
        if methods:
            print(f"\neach method, ours (defaults: input SHA-256 on) vs sd-mecha (defaults), medians, same rounds; "
                  f"I/O floor {floor:.2f} s")
            print(f"{'method':<18}{'ours s':>9}{'sd-mecha s':>12}{'ours/sd-mecha':>15}{'ours/floor':>12}")
            for m in methods:
                o = _median([r["seconds"] for r in runs.get(f"ours:{m}", [])])
                e = _median([r["seconds"] for r in runs.get(f"sd-mecha:{m}", [])])
                print(f"{m:<18}{o:>9.2f}{e:>12.2f}{o / e:>15.2f}{o / floor:>12.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
