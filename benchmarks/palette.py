"""Benchmark: full palette report on 512 px renders, images/second, against a naive baseline measured in the
same run (raw unique colours + integer-scale detection by run lengths), plus accuracy of both.

Renders: DawnLike sprites (CC-BY 4.0, DragonDePlatino & DawnBringer) on 24×24 canvases, 512 px (21.33 px
cells), random phase, blur σ 0.5–1.5, noise σ 2–6, JPEG q 75–95. Throughput uses ``--workers`` processes
(default 2 = "2 CPU cores"), one torch thread each; wall-clock images/s depends on what else runs on the
machine, so CPU-ms per image (process time inside the workers) and the implied 2-core rate
(2000 / CPU-ms) are printed too. ``--suite N`` adds grid accuracy on N renders of the wider hand-run set
(:func:`conceptlab.metrics.palette_synth.degraded_suite`: 16/20/24/32 cells, 384–512 px).

``--conditions N`` (issue 13) adds, per render condition of
:func:`conceptlab.metrics.palette_synth.condition_render` (clean, noise only, JPEG only, blur+noise+JPEG,
cropped frame, ±15 % drift (cell widths drawn independently) and a smoothly warped lattice, bilinear / bicubic /
Lanczos upscales, subject over the frame edge, torch's a = −0.75 bicubic), the share of
N 512×512 renders whose grid is exactly right (every cut, :func:`~conceptlab.metrics.palette_synth.cuts_match`)
and CPU ms per image, for the per-line-cut detector (:func:`conceptlab.metrics.grid.detect_grid`) beside the
single-period detector it replaced (:func:`conceptlab.metrics.grid.detect_grid_uniform`, the naive baseline),
in one process.

    python benchmarks/palette.py [--n 200] [--workers 2] [--suite 240] [--conditions 100]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402


def naive(rgb: np.ndarray) -> dict:
    """The seed's approach: raw unique colours, cell size = gcd-like integer scale from the shortest run."""
    packed = (rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8) | rgb[..., 2]
    uniq = len(np.unique(packed))
    row = packed[packed.shape[0] // 2]
    change = np.nonzero(row[1:] != row[:-1])[0]
    runs = np.diff(change) if change.size > 1 else np.array([rgb.shape[1]])
    scale = int(max(1, runs.min()))
    return {"unique_colors": uniq, "cells_x": rgb.shape[1] // scale}


def _ours(rgb):
    from conceptlab.metrics.palette import palette_report

    t = time.process_time()
    rep = palette_report(rgb)
    rep["_cpu"] = time.process_time() - t
    return rep


def _naive_timed(rgb):
    t = time.process_time()
    rep = naive(rgb)
    rep["_cpu"] = time.process_time() - t
    return rep


def _phase_err(a, b, w):
    d = (a - b) % w
    return min(d, w - d)


def suite_accuracy(data: Path, n: int) -> None:
    """Grid exactness (count and phase within 15 % of a cell) on the wider hand-run set."""
    from conceptlab.metrics.grid import detect_grid
    from conceptlab.metrics.palette_synth import cuts_match, degraded_suite, render_cuts

    suite = degraded_suite(sorted(data.glob("*.png")), n, seed=1)
    ok_o = ok_b = 0
    for r in suite:
        c = r.params["cells"]
        g = detect_grid(r.image)
        tx, ty = render_cuts(r)
        h, w = r.image.shape[:2]
        ok_o += g.ok and cuts_match(g.cuts_x, tx, w, r.cell_w) and cuts_match(g.cuts_y, ty, h, r.cell_h)
        ok_b += naive(r.image)["cells_x"] == c
    print(f"{'grid exact, wide set (' + str(n) + ')':28s}{ok_o / n:22.1%}{ok_b / n:18.1%}")


def conditions_accuracy(data: Path, n: int, only: str = "") -> None:
    """Exact-grid share and CPU ms / 512 px image per condition: per-line cuts (ours) vs one period (baseline);
    "strict" holds blank border stretches to the full cut rule too (see ``cuts_match``); "low⇒wrong" is the
    share of our low_confidence/none grids that are wrong (precision) and the share of our wrong grids that
    are flagged (recall)."""
    from conceptlab.metrics.grid import detect_grid, detect_grid_uniform
    from conceptlab.metrics.palette_synth import CONDITIONS, condition_render, cuts_match, reference_cuts

    files = sorted(data.glob("*.png"))
    print(f"\ngrid exactly right on {n} renders of 512x512 per condition (every visible cut within max(1.5 px, 15 % "
          "of a cell); blank border stretches: cell count ± 1; strict: every cut; ceiling: strict for every visible "
          "cut exact and blank borders at the generator's mean cell, see reference_cuts)")
    print(f"{'condition':14s}{'ours':>8s}{'strict':>8s}{'ceiling':>8s}{'baseline':>10s}{'strict':>8s}{'ours ms':>10s}{'base ms':>10s}"
          f"{'ours low/none':>15s}{'low=>wrong':>12s}{'wrong flagged':>15s}")
    tot_o = tot_b = 0.0

    def exact(g, r, strict):
        return g.cells_x > 0 and cuts_match(g.cuts_x, r.cuts_x, 512, r.cell, r.evidence_x, strict=strict) and \
            cuts_match(g.cuts_y, r.cuts_y, 512, r.cell, r.evidence_y, strict=strict)

    for cond in CONDITIONS:
        if cond == "transparent" or (only and cond not in only.split(",")):
            continue
        ok = np.zeros(4)
        ceil = 0
        flagged = flagged_wrong = wrong = 0
        t_o = t_b = 0.0
        for s in range(n):
            r = condition_render(cond, 5000 + s, files, size=(512, 512))
            img = np.ascontiguousarray(r.image[..., :3])
            res = []
            for fn in (detect_grid, detect_grid_uniform):
                t = time.process_time()
                g = fn(img)
                res.append((g, time.process_time() - t))
            (go, to), (gb, tb) = res
            t_o += to
            t_b += tb
            ok += [exact(go, r, False), exact(go, r, True), exact(gb, r, False), exact(gb, r, True)]
            ceil += all(cuts_match(reference_cuts(t, e, 512, r.cell), t, 512, r.cell, e, strict=True)
                        for t, e in ((r.cuts_x, r.evidence_x), (r.cuts_y, r.evidence_y)))
            low = go.status in ("low_confidence", "none")
            good = exact(go, r, False)
            flagged += low
            flagged_wrong += low and not good
            wrong += not good
        tot_o += t_o
        tot_b += t_b
        prec = f"{flagged_wrong}/{flagged}"
        rec = f"{flagged_wrong}/{wrong}"
        print(f"{cond:14s}{ok[0] / n:8.0%}{ok[1] / n:8.0%}{ceil / n:8.0%}{ok[2] / n:10.0%}{ok[3] / n:8.0%}{1000 * t_o / n:10.1f}"
              f"{1000 * t_b / n:10.1f}{flagged / n:15.0%}{prec:>12s}{rec:>15s}")
    k = len([c for c in CONDITIONS if c != "transparent" and (not only or c in only.split(","))]) * n
    print(f"{'mean ms/image':14s}{'':42s}{1000 * tot_o / k:10.1f}{1000 * tot_b / k:10.1f}")


def _init():
    import torch

    torch.set_num_threads(1)


def _run(fn, imgs, workers):
    t = time.perf_counter()
    if workers > 1:
        with ProcessPoolExecutor(workers, initializer=_init) as ex:
            list(ex.map(fn, imgs[:workers]))  # warm-up (imports)
            t = time.perf_counter()
            out = list(ex.map(fn, imgs, chunksize=4))
    else:
        _init()
        fn(imgs[0])
        t = time.perf_counter()
        out = [fn(x) for x in imgs]
    return out, time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--suite", type=int, default=0, help="also grid accuracy on N renders of the wide set")
    ap.add_argument("--conditions", type=int, default=0,
                    help="also exact-grid share and ms/image per issue-13 render condition, N renders each")
    ap.add_argument("--only", default="", help="comma-separated conditions for --conditions (default all)")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/dawnlike/sprites"))
    a = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from conceptlab.metrics.palette_synth import load_sprite, make_render

    files = sorted(Path(a.data).glob("*.png"))
    if not files:
        print(f"no sprites in {a.data}", file=sys.stderr)
        return 2
    rng = random.Random(0)
    w = 512 / 24
    imgs, truth = [], []
    for i in range(a.n):
        r = make_render(load_sprite(rng.choice(files)), tuple(rng.randrange(256) for _ in range(3)), (24, 24),
                        (512, 512), (rng.uniform(0, w), rng.uniform(0, w)), blur=rng.uniform(0.5, 1.5),
                        noise=rng.uniform(2, 6), jpeg=rng.randint(75, 95), seed=i)
        imgs.append(r.image)
        truth.append(len(r.colors))
    ours, t_ours = _run(_ours, imgs, a.workers)
    base, t_base = _run(_naive_timed, imgs, a.workers)
    cpu_o = 1000 * np.mean([o["_cpu"] for o in ours])
    cpu_b = 1000 * np.mean([b["_cpu"] for b in base])
    acc_o = np.mean([o["grid"]["status"] != "none" and abs(o["grid"]["cell_w"] - w) < 0.1
                     and abs(o["grid"]["cell_h"] - w) < 0.1 for o in ours])
    acc_b = np.mean([b["cells_x"] == 24 for b in base])
    err_o = np.mean([abs((o["effective_colors_95"] or 0) - t) for o, t in zip(ours, truth)])
    err_b = np.mean([abs(b["unique_colors"] - t) for b, t in zip(base, truth)])
    print(f"machine: {os.cpu_count()} CPUs visible, {a.workers} worker process(es), {a.n} renders of 512x512")
    print(f"{'':28s}{'ours (full report)':>22s}{'naive baseline':>18s}{'ratio':>10s}")
    print(f"{'images/s':28s}{a.n / t_ours:22.1f}{a.n / t_base:18.1f}{(a.n / t_ours) / (a.n / t_base):10.3f}")
    print(f"{'CPU ms / image':28s}{cpu_o:22.2f}{cpu_b:18.2f}{cpu_o / cpu_b:10.3f}")
    print(f"{'images/s, 2 cores (by CPU)':28s}{2000 / cpu_o:22.1f}{2000 / cpu_b:18.1f}{cpu_b / cpu_o:10.3f}")
    print(f"{'cell size right (21.33 px)':28s}{acc_o:22.1%}{acc_b:18.1%}")
    print(f"{'|colours - truth| (mean)':28s}{err_o:22.2f}{err_b:18.1f}")
    if a.suite:
        suite_accuracy(Path(a.data), a.suite)
    if a.conditions:
        conditions_accuracy(Path(a.data), a.conditions, a.only)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
