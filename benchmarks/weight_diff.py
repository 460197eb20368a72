"""Benchmark: weight diff of two full-size SD1.5 fp16 checkpoints against the read floor.

Creates two single-file SD1.5 checkpoints with random fp16 weights (UNet, CLIP-L text encoder and VAE in the real
key layout, ≈1.07 G parameters, ≈2.13 GB each) in a temporary folder, then measures, each phase in a fresh
subprocess so peak RSS is that phase's own:

* **read floor** (the reference, issue 3: "reading both files tensor by tensor with safetensors and doing
  nothing"): both files opened with ``safetensors.safe_open``, every tensor fetched with ``get_tensor`` and its
  bytes copied into one reusable preallocated buffer (``buffer[:nbytes].copy_(t.view(uint8))``), so every byte
  really passes through the CPU. Doing *literally* nothing would not read anything: since safetensors 0.5
  ``get_tensor`` returns a lazy view of a memory map (measured: 0.4 ms and +1 MB RSS for a 128 MB tensor), and
  its pages are only read when touched.
* **page-touch floor** (shown for transparency, a lower bound): the same, but only one byte per 4 KiB page is
  touched — the pages are mapped (and read from disk when cold) without the bytes being processed.
* **ours** — ``conceptlab.metrics.diff_models.diff_files`` producing the full report (every tensor's statistics,
  groups, histogram, JSON-able dict, Markdown) — and separately the three plots (not in the wall time).

Every tensor of B differs from A (worst case: no bit-identical fast path). Each phase runs with the files in the
page cache ("warm": read once just before) and after evicting them ("cold", real disk reads): the two files'
pages are dropped with ``posix_fadvise(POSIX_FADV_DONTNEED)`` after ``fsync`` (only these two files: the machine
may be shared, so the global ``/proc/sys/vm/drop_caches`` is not used); the share of the files still resident
afterwards is checked with ``fincore`` when available and printed. The 1-minute load average is recorded at the
start of each phase and printed next to its figure (other processes on the machine slow every phase).
Targets (issue 3): wall time ≤ 2× the read floor, peak RSS ≤ 1.5 GB above the interpreter's baseline.
The files are deleted at the end unless ``--keep`` names a folder.

Usage: ``python benchmarks/weight_diff.py [--scale 1.0] [--keep DIR] [--repeats N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _reset_peak() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0: ``echo 5 > clear_refs``), so
    the peak measured is this phase's own and not inherited from the parent process or the imports."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def _peak_mb() -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------------ key layout
def sd15_layout(scale: float = 1.0) -> dict[str, tuple[int, ...]]:
    """Single-file SD1.5 key -> shape: UNet from diffusers' UNet2DConditionModel (config from
    ``formats.ldm_keys.unet_config_for("sd1")``) on the meta device renamed to LDM names with diffusers' own converter
    (``formats.ldm_keys.diffusers_to_ldm_unet``); CLIP-L text model (ViT-L/14 text config) and AutoencoderKL (SD VAE
    config) from transformers / diffusers on the meta device. ``scale`` < 1 keeps only that fraction of the keys
    (for quick trials)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from conceptlab.formats.ldm_keys import diffusers_to_ldm_unet, unet_config_for

    out: dict[str, tuple[int, ...]] = {}
    d2l = diffusers_to_ldm_unet("sd1")  # computed on real (tiny) tensors, outside the meta device
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config_for("sd1"))
        for k, v in unet.state_dict().items():
            out["model.diffusion_model." + d2l.get(k, k)] = tuple(v.shape)
        del unet
        te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                          num_hidden_layers=12, max_position_embeddings=77, vocab_size=49408,
                                          projection_dim=768))
        for k, v in te.state_dict().items():
            k = k if k.startswith("text_model.") else "text_model." + k
            if v.is_floating_point():
                out["cond_stage_model.transformer." + k] = tuple(v.shape)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=2, sample_size=512)
        for k, v in vae.state_dict().items():
            out["first_stage_model." + k] = tuple(v.shape)
    if scale < 1.0:
        keys = list(out)
        step = max(1, round(1 / scale))
        out = {k: out[k] for k in keys[::step]}
    return out


def write_pair(layout: dict[str, tuple[int, ...]], path_a: Path, path_b: Path, seed: int = 0) -> int:
    """Write A (random fp16, N(0, 0.05²)) and B = A + N(0, 1e-3²) on every tensor, streaming. Returns params."""
    import torch

    from conceptlab.formats.safetensors_io import SafetensorsStreamWriter

    g = torch.Generator().manual_seed(seed)
    specs = {k: (torch.float16, s) for k, s in layout.items()}
    n = 0
    with SafetensorsStreamWriter(path_a, specs, {"format": "pt"}, overwrite=True) as wa, \
            SafetensorsStreamWriter(path_b, specs, {"format": "pt"}, overwrite=True) as wb:
        for k, s in layout.items():
            a = torch.randn(s, generator=g) * 0.05
            b = a + torch.randn(s, generator=g) * 1e-3
            wa.write(k, a.half())
            wb.write(k, b.half())
            n += a.numel()
    return n


def drop_cache(*paths: Path) -> None:
    """Evict the files from the OS page cache (fsync, then posix_fadvise DONTNEED: clean, unmapped pages of
    these files only; no root needed)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_share(*paths: Path) -> float | None:
    """Fraction of the files' bytes in the page cache (``fincore --bytes``), or None when unavailable."""
    if not shutil.which("fincore"):
        return None
    try:
        res = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES,SIZE", *map(str, paths)],
                             capture_output=True, text=True, check=True, timeout=60)
        rows = [line.split() for line in res.stdout.splitlines() if line.strip()]
        return sum(int(r[0]) for r in rows) / max(sum(int(r[1]) for r in rows), 1)
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


# ------------------------------------------------------------------------------------------------ phases
def phase_floor(a: str, b: str, mode: str = "copy") -> dict:
    """Read both files tensor by tensor with ``safe_open``/``get_tensor``. ``mode="copy"``: copy every tensor's
    bytes into one reusable buffer (each byte read by the CPU); ``"touch"``: touch one byte per 4 KiB page."""
    import torch
    from safetensors import safe_open

    torch.set_num_threads(1)  # a plain single-threaded copy: OpenMP barriers only slow it on a busy machine
    load = os.getloadavg()[0]
    _reset_peak()
    base = _rss_mb()
    with safe_open(a, "pt") as fa:
        biggest = max(_numel(fa.get_slice(k).get_shape()) for k in fa.keys())
    buf = torch.empty(biggest * 2, dtype=torch.uint8) if mode == "copy" else None  # fp16: 2 bytes per element
    if buf is not None:
        buf.fill_(0)  # fault the buffer in before the clock starts
    t0 = time.perf_counter()
    c0 = time.process_time()
    check = 0
    with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb:
        for k in fa.keys():
            for f in (fa, fb):
                t = f.get_tensor(k)
                raw = t.reshape(-1).view(torch.uint8)
                if buf is not None:
                    if raw.numel() > buf.numel():
                        buf = torch.empty(raw.numel(), dtype=torch.uint8)
                    buf[:raw.numel()].copy_(raw)
                    check += int(buf[raw.numel() - 1])
                else:
                    check += int(raw[::4096].sum())
                del t, raw
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "cpu_s": time.process_time() - c0, "baseline_rss_mb": base, "peak_rss_mb": _peak_mb(),
            "load": load, "check": check >= 0}


def _numel(shape) -> int:
    n = 1
    for x in shape:
        n *= int(x)
    return n


def phase_ours(a: str, b: str, plots: bool = True) -> dict:
    import torch  # noqa: F401

    from conceptlab.metrics import diff_io, weight_diff  # noqa: F401  (imports before the baseline)
    from conceptlab.metrics.diff_report import report_markdown
    import matplotlib  # noqa: F401

    try:
        from conceptlab.metrics.diff_models import canonical_keys, diff_files
    except ImportError:  # a package from before diff_models.py (--before DIR): the same functions lived here
        from conceptlab.metrics.weight_diff import canonical_keys, diff_files
    canonical_keys([], "sd1")  # warm imports of formats.keys
    load = os.getloadavg()[0]
    _reset_peak()
    base = _rss_mb()
    t0 = time.perf_counter()
    c0 = time.process_time()
    rep = diff_files(a, b)
    md = report_markdown(rep)
    wall = time.perf_counter() - t0
    out = {"wall_s": wall, "cpu_s": time.process_time() - c0, "baseline_rss_mb": base, "peak_rss_mb": _peak_mb(),
           "params": rep["overall"]["params"], "tensors": rep["overall"]["tensors"],
           "changed_tensors": rep["changed_tensors"], "mean_abs": rep["overall"]["mean_abs"],
           "markdown_chars": len(md), "load": load}
    if plots:
        from conceptlab.metrics.diff_plots import render_plots

        t1 = time.perf_counter()
        render_plots(rep)
        out["plots_s"] = time.perf_counter() - t1
    return out


def _child(phase: str, a: Path, b: Path, code_root: str | None = None) -> dict:
    """Run one phase in a fresh interpreter; ``code_root``: a folder holding another ``conceptlab`` package
    (e.g. an older commit from ``git archive``) put first on ``PYTHONPATH`` for a before/after comparison."""
    cmd = [sys.executable, os.path.abspath(__file__), "--phase", phase, str(a), str(b)]
    env = dict(os.environ)
    if code_root:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(code_root).resolve())] + [x for x in [env.get("PYTHONPATH")] if x])
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env, cwd="/" if code_root else None)
    if res.returncode != 0:
        raise RuntimeError(f"phase {phase} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


PHASES = ("floor", "touch", "ours")
LABELS = {"floor": "read floor (get_tensor + copy)", "touch": "page-touch floor", "ours": "ours (diff_files)",
          "before": "ours, --before code"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of SD1.5's tensors (1.0 = full size)")
    ap.add_argument("--keep", help="reuse/keep the two files in this folder instead of a temp dir")
    ap.add_argument("--repeats", type=int, default=1, help="repeat each measurement, keep the fastest")
    ap.add_argument("--before", metavar="DIR", help="also time diff_files of another conceptlab package found in DIR "
                    "(DIR/conceptlab, e.g. `git archive <commit>` unpacked there): the before/after table")
    ap.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    ap.add_argument("files", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.phase:
        if args.phase == "ours":
            print(json.dumps(phase_ours(*args.files)))
        else:
            print(json.dumps(phase_floor(*args.files, mode="copy" if args.phase == "floor" else "touch")))
        return 0

    import torch

    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="conceptlab_diff_bench_"))
    tmp.mkdir(parents=True, exist_ok=True)
    pa, pb = tmp / "sd15_a.safetensors", tmp / "sd15_b.safetensors"
    try:
        if not (pa.exists() and pb.exists()):
            t0 = time.perf_counter()
            layout = sd15_layout(args.scale)
            n = write_pair(layout, pa, pb)
            print(f"created 2 × {pa.stat().st_size / 1e9:.2f} GB ({n / 1e9:.3f} G params, {len(layout)} tensors) "
                  f"in {time.perf_counter() - t0:.0f} s", flush=True)
        results = {}
        phases = PHASES + (("before",) if args.before else ())
        for cache in ("warm", "cold"):
            for phase in phases:
                best = None
                for _ in range(max(1, args.repeats)):
                    if cache == "cold":
                        drop_cache(pa, pb)
                        res_share = resident_share(pa, pb)
                    else:
                        _child("touch", pa, pb)  # make sure the files are in the page cache
                        res_share = resident_share(pa, pb)
                    r = (_child("ours", pa, pb, code_root=args.before) if phase == "before"
                         else _child(phase, pa, pb))
                    r["resident_before"] = res_share
                    best = r if best is None or r["wall_s"] < best["wall_s"] else best
                results[(cache, phase)] = best
                rs = best["resident_before"]
                print(f"{cache:4s} {LABELS[phase]:32s}: {best['wall_s']:6.2f} s (CPU {best['cpu_s']:6.2f} s), "
                      f"peak RSS {best['peak_rss_mb']:5.0f} MB (baseline {best['baseline_rss_mb']:.0f} MB), "
                      f"load {best['load']:.1f}"
                      + (f", files {rs:.0%} in page cache at start" if rs is not None else ""), flush=True)
        print()
        print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, "
              f"load average now {os.getloadavg()[0]:.1f}, torch {torch.__version__}; "
              f"files {pa.stat().st_size / 1e9:.2f} GB each (fp16)")
        print("| case | read floor (get_tensor + copy) | page-touch floor | ours (diff_files) | ours / read floor "
              "| target | load avg (floor / ours) |")
        print("|---|---|---|---|---|---|---|")
        for cache in ("warm", "cold"):
            f, t, o = (results[(cache, p)] for p in PHASES)
            print(f"| wall, {cache} page cache | {f['wall_s']:.2f} s | {t['wall_s']:.2f} s | {o['wall_s']:.2f} s | "
                  f"{o['wall_s'] / f['wall_s']:.2f}× | ≤ 2× | {f['load']:.1f} / {o['load']:.1f} |")
        for cache in ("warm", "cold"):
            f, t, o = (results[(cache, p)] for p in PHASES)
            print(f"| CPU time, {cache} | {f['cpu_s']:.2f} s | {t['cpu_s']:.2f} s | {o['cpu_s']:.2f} s | "
                  f"{o['cpu_s'] / max(f['cpu_s'], 1e-9):.1f}× | | |")
        for cache in ("warm", "cold"):
            f, t, o = (results[(cache, p)] for p in PHASES)
            df, dt, do = (x["peak_rss_mb"] - x["baseline_rss_mb"] for x in (f, t, o))
            print(f"| peak RSS above baseline, {cache} | {df:.0f} MB | {dt:.0f} MB | {do:.0f} MB | | ≤ 1536 MB | |")
        if args.before:
            print("\n| case | before | after | speed-up | before / read floor | after / read floor |")
            print("|---|---|---|---|---|---|")
            for cache in ("warm", "cold"):
                f, o, bf = results[(cache, "floor")], results[(cache, "ours")], results[(cache, "before")]
                print(f"| wall, {cache} | {bf['wall_s']:.2f} s | {o['wall_s']:.2f} s | {bf['wall_s'] / o['wall_s']:.2f}× | "
                      f"{bf['wall_s'] / f['wall_s']:.2f}× | {o['wall_s'] / f['wall_s']:.2f}× |")
            for cache in ("warm", "cold"):
                o, bf = results[(cache, "ours")], results[(cache, "before")]
                print(f"| CPU, {cache} | {bf['cpu_s']:.2f} s ({bf['cpu_s'] / bf['params'] * 1e9:.2f} ns/param) | "
                      f"{o['cpu_s']:.2f} s ({o['cpu_s'] / o['params'] * 1e9:.2f} ns/param) | "
                      f"{bf['cpu_s'] / o['cpu_s']:.2f}× | | |")
        o = results[("warm", "ours")]
        print(f"\nreport: {o['tensors']} tensors, {o['params'] / 1e9:.3f} G params, {o['changed_tensors']} changed, "
              f"mean |Δ| {o['mean_abs']:.3e}; CPU {o['cpu_s'] / o['params'] * 1e9:.2f} ns/param (warm); "
              f"plots {o.get('plots_s', 0):.2f} s (not in the wall time)")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
