"""Effect benchmark: does each algorithm do what it claims, on a model that has learned something?

Runs on the tiny DawnLike model (``sample_data/tiny_dawnlike``) and the real DawnLike sprites; prints the numbers
behind README's "Evidence" section and writes its pictures and a JSON of every figure to ``--out``.
The fast versions of the same measurements are the tests ``tests/test_effect_*.py``.

Sections (``--only lora,esd,merge,diff,rank``; default all, in this order; ``--only samples`` writes the
model card's ``samples.png``):

* **lora** — a LoRA on 16 Game-Boy-recoloured sprites with the trigger ``gbstyle``: in-palette fraction (Game Boy
  ramp, ΔE00 ≤ 5) and mean ΔE00 to the ramp of samples with / without the trigger, before and after, beside the
  ceiling (the training images through the model's VAE) and the pixel change against the base's samples; per-epoch samples and the trainer's
  best-epoch choice against an independent per-epoch measurement on other seeds; a grid of samples per epoch.
  Then the same LoRA trained with regularization images (kohya ``reg_data_dir``: sprites in their own colours,
  captions without the trigger, ``prior_loss_weight`` 1): do samples *without* the trigger stay put?
* **rank** — the same LoRA at ``network_dim`` 4 / 8 / 16 / 32 / 64 (``network_alpha = network_dim``).
* **esd** — a CNN trained on real sprites of six DawnLike groups (held-out accuracy); ESD-x erases ``wall``;
  the classifier's hit rate on samples of each group's prompts before / after, for ``self_sample`` vs
  ``noised`` x_t, whole-latent vs grid masks, 1 vs 100 prompt variations; a before/after grid.
* **merge** — base ⊕ (base with the LoRA baked in) by weighted sum at α = 0 … 1 (style moves monotonically?),
  and add-difference ``B + 1·(baked − base)`` onto a second base B: the ``wall``-erased model of the esd section (a
  derived model of the same base, as add-difference is used in practice) and any ``--second-base`` folder.
* **diff** — weight diff of an ESD result (which layer types changed), and the ratio table of a 100- vs a
  500-iteration erasure (:func:`conceptlab.metrics.weight_diff.compare_reports`).

Usage: ``python benchmarks/effect.py [--out out/effect] [--only lora,esd] [--seeds 3] [--pictures docs/evidence]``. On 2 shared CPU cores
the full run takes tens of minutes; every section prints its figures as soon as it has them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import effect_lib as E  # noqa: E402


#: set by ``--pictures DIR``: every picture is also written there (README's "Evidence" pictures: docs/evidence)
PICTURES: list[Path] = []


def _save(img: np.ndarray, path: Path) -> None:
    from PIL import Image

    for p in [path] + [d / path.name for d in PICTURES]:
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(p, optimize=True)


def section_lora(host, out: Path, seeds, res_all: dict) -> dict:
    from conceptlab.training.lora.report import labelled_grid

    t = E.Timer()
    data = E.write_style_dataset(out / "data", n=16, repeats=3)
    train_imgs = E.load_folder_images(next(data.iterdir()))
    # the ceiling: the training images themselves through the model's VAE (no UNet can draw better than this)
    rt = E.vae_round_trip(host, train_imgs)
    ceiling = {"train_in_palette": E.in_palette_fraction(train_imgs), "round_trip_in_palette": E.in_palette_fraction(rt),
               "round_trip_de": E.mean_delta_e(rt),
               "round_trip_mae_255": float(np.abs(rt.astype(int) - train_imgs.astype(int)).mean())}
    _save(labelled_grid([list(train_imgs[:8]), list(rt[:8])], ["training image", "through the VAE"], []),
          out / "vae_round_trip.png")
    print(f"[lora] style dataset: in-palette {ceiling['train_in_palette']:.3f}; through the tiny model's VAE: "
          f"in-palette {ceiling['round_trip_in_palette']:.3f}, mean ΔE00 {ceiling['round_trip_de']:.2f}, "
          f"mean abs error {ceiling['round_trip_mae_255']:.1f}/255")
    held = [s + 100 for s in seeds]
    ref = E.style_samples(host, seeds=held)
    before = E.style_scores(host, seeds=held)
    prompts = [f"{E.TRIGGER}, {p}" for p in E.STYLE_EVAL_PROMPTS[:4]]
    res = E.train_style_lora(host, data, out / "lora", max_train_epochs=8, sample_every_n_epochs=1,
                             sample_prompts=prompts, palette=list(E.GAMEBOY), best_metric="delta_e00_mean",
                             sample_grid_cells="native", sample_steps=20, sample_cfg=4.0, sample_seed=0)
    per_epoch = []
    rows, labels = [], []
    rows.append([E.sample(host, [p], seed=0)[0] for p in prompts])
    labels.append("base")
    for ep, path in sorted(res.epoch_files.items()):
        with E.lora_installed(host, path):
            sc = E.style_scores(host, seeds=held, reference=ref)
            rows.append([E.sample(host, [p], seed=0)[0] for p in prompts])
        labels.append(f"epoch {ep}")
        rec = next((r for r in res.history if r["epoch"] == ep), {})
        per_epoch.append({"epoch": ep, "train_loss": rec.get("train_loss"),
                          "trainer_delta_e00_mean": rec.get("delta_e00_mean"), **{f"heldout_{k}": v for k, v in
                                                                                 sc.items()}})
    _save(labelled_grid(rows, labels, [p.split(",")[-1].strip() for p in prompts]), out / "lora_epochs.png")
    best_measured = min(per_epoch, key=lambda r: r["heldout_with_trigger_de"])
    chosen = next(r for r in per_epoch if r["epoch"] == res.best_epoch)
    final = per_epoch[-1]
    fig = {"ceiling": ceiling, "before": before, "after_final": {k[8:]: v for k, v in final.items()
                                                                   if k.startswith("heldout_")},
           "per_epoch": per_epoch, "trainer_best_epoch": res.best_epoch,
           "measured_best_epoch": best_measured["epoch"],
           "chosen_vs_best_gap_de": round(chosen["heldout_with_trigger_de"] - best_measured["heldout_with_trigger_de"],
                                          3),
           "seconds": t()}
    print(f"[lora] base: with trigger in-palette {before['with_trigger']:.3f} ΔE00 {before['with_trigger_de']:.2f}; "
          f"without in-palette {before['without_trigger']:.3f} ΔE00 {before['without_trigger_de']:.2f}")
    print("[lora] epoch  loss    trainer_ΔE  heldout: with ipf  with ΔE  with chg  without ΔE  without chg")
    for r in per_epoch:
        print(f"[lora] {r['epoch']:5d}  {r['train_loss'] or 0:.4f}  {r['trainer_delta_e00_mean'] or 0:10.2f}  "
              f"{r['heldout_with_trigger']:16.3f}  {r['heldout_with_trigger_de']:7.2f}  "
              f"{r['heldout_with_trigger_change']:8.1f}  {r['heldout_without_trigger_de']:9.2f}  "
              f"{r['heldout_without_trigger_change']:11.1f}")
    print(f"[lora] trainer's best epoch {res.best_epoch}, measured best {best_measured['epoch']}, ΔE00 gap "
          f"{fig['chosen_vs_best_gap_de']:.2f} ({fig['seconds']} s)")
    # the same LoRA with regularization images (kohya reg_data_dir, prior_loss_weight 1): DawnLike sprites in their
    # own colours, captions without the trigger, as many as training images × repeats
    tr = E.Timer()
    reg = E.write_reg_dataset(out / "reg", n=len(train_imgs) * 3)
    res_reg = E.train_style_lora(host, data, out / "lora_reg", reg_root=reg, max_train_epochs=8,
                                 save_every_n_epochs=None)
    with E.lora_installed(host, res_reg.final_path):
        sc_reg = E.style_scores(host, seeds=held, reference=ref)
    fig["with_reg_images"] = {"after_final": sc_reg, "reg_images": len(train_imgs) * 3,
                              "steps": res_reg.global_step, "seconds": tr()}
    fig["seconds"] = t()
    print("[lora] final LoRA            with ipf  with ΔE00  with chg  without ipf  without ΔE00  without chg")
    for name, sc in (("base", {**before, "with_trigger_change": 0.0, "without_trigger_change": 0.0}),
                     ("no reg images", fig["after_final"]), ("with reg images", sc_reg)):
        print(f"[lora] {name:20s} {sc['with_trigger']:9.3f}  {sc['with_trigger_de']:9.2f}  "
              f"{sc['with_trigger_change']:8.1f}  {sc['without_trigger']:10.3f}  {sc['without_trigger_de']:12.2f}  "
              f"{sc['without_trigger_change']:11.1f}")
    res_all["lora_final_path"] = str(res.final_path)
    res_all["lora_data"] = str(data)
    return fig


def section_rank(host, out: Path, seeds, res_all: dict) -> dict:
    t = E.Timer()
    data = Path(res_all.get("lora_data") or E.write_style_dataset(out / "data", n=16, repeats=3))
    rows = []
    for dim in (4, 8, 16, 32, 64):
        res = E.train_style_lora(host, data, out / f"rank{dim}", network_dim=dim, network_alpha=dim,
                                 max_train_epochs=6, save_every_n_epochs=None)
        with E.lora_installed(host, res.final_path):
            sc = E.style_scores(host, seeds=[s + 100 for s in seeds])
            imgs = np.concatenate([E.sample(host, [f"{E.TRIGGER}, {p}" for p in E.STYLE_EVAL_PROMPTS], seed=s + 100)
                                   for s in seeds])
        from conceptlab.metrics.palette import palette_report

        effs = [palette_report(im).get("effective_colors") for im in imgs]
        effs = [e for e in effs if e is not None]  # None where the report finds no palette to count
        eff = float(np.mean(effs)) if effs else float("nan")
        rows.append({"network_dim": dim, "with_trigger": sc["with_trigger"], "without_trigger": sc["without_trigger"],
                     "effective_colors": eff, "final_loss": float(np.mean([v for v in res.step_losses if v is not None][-6:] or [np.nan]))})
        rows[-1].update(with_trigger_de=sc["with_trigger_de"], without_trigger_de=sc["without_trigger_de"])
        print(f"[rank] dim {dim:3d}: with trigger in-palette {sc['with_trigger']:.3f} ΔE00 {sc['with_trigger_de']:.2f}, "
              f"without ΔE00 {sc['without_trigger_de']:.2f}, effective colours {eff:.2f}, "
              f"loss {rows[-1]['final_loss']:.4f}")
    return {"rows": rows, "seconds": t()}


def section_esd(host, out: Path, seeds, res_all: dict, iterations: int, concept: str = "wall") -> dict:
    from conceptlab.training.esd.erase import erased_weights
    from conceptlab.training.lora.report import labelled_grid

    t = E.Timer()
    rep = E.train_classifier()
    clf = rep.classifier
    print(f"[esd] classifier on real sprites of {', '.join(E.CONCEPTS)}: train {rep.train_accuracy:.3f}, "
          f"held-out {rep.heldout_accuracy:.3f} ({rep.n_train}/{rep.n_heldout} sprites)")
    real = {c: E.hit_rate(clf, E.concept_sprites([c])[0], c) for c in E.CONCEPTS}

    def rates():
        acc = {c: [] for c in E.CONCEPTS}
        for s in seeds:
            for c, v in E.concept_hit_rates(host, clf, k=8, seed=s).items():
                acc[c].append(v)
        return {c: float(np.mean(v)) for c, v in acc.items()}

    base = rates()
    print("[esd] base model hit rates: " + ", ".join(f"{c} {v:.2f}" for c, v in base.items()))
    variants = {"self_sample, whole, 1 prompt": dict(xt_source="self_sample"),
                "noised, whole, 1 prompt": dict(xt_source="noised"),
                "self_sample, grid, 1 prompt": dict(xt_source="self_sample", masks="grid"),
                "self_sample, whole, 100 prompts": dict(xt_source="self_sample", variations=100)}
    results = {}
    grid_rows, grid_labels = [], []
    prompts = E.concept_prompts(concept, 4, seed=0) + [E.concept_prompts(c, 1, seed=0)[0] for c in E.CONCEPTS
                                                       if c != concept][:4]
    grid_rows.append(list(E.sample(host, prompts, seed=0)))
    grid_labels.append("base")
    first = None
    for name, kw in variants.items():
        tv = E.Timer()
        r = E.erase_concept(host, concept, iterations=iterations, **kw)
        w = erased_weights(host, r)
        with E.weights_patched(host, w):
            after = rates()
            if name.startswith("self_sample, whole,"):  # the 1-prompt and the 100-prompt erasure
                grid_rows.append(list(E.sample(host, prompts, seed=0)))
                grid_labels.append("erased, " + name.rsplit(", ", 1)[1])
        others = [c for c in E.CONCEPTS if c != concept]
        drop = base[concept] - after[concept]
        spill = float(np.mean([abs(after[c] - base[c]) for c in others]))
        results[name] = {"after": after, "erased_drop": drop, "others_mean_abs_change": spill,
                         "seconds": tv()}
        first = first or (r, w)
        print(f"[esd] {name:34s}: {concept} {base[concept]:.2f} -> {after[concept]:.2f} (drop {drop:+.2f}); "
              f"others mean |change| {spill:.2f}  ({tv()} s)")
    _save(labelled_grid(grid_rows, grid_labels, [p.split(",")[-1].strip() for p in prompts]),
          out / "esd_before_after.png")
    res_all["esd_first"] = first
    return {"classifier": {"train_accuracy": rep.train_accuracy, "heldout_accuracy": rep.heldout_accuracy,
                           "real_sprite_hit_rates": real},
            "concept": concept, "iterations": iterations, "base": base, "variants": results, "seconds": t()}


def section_merge(host, out: Path, seeds, res_all: dict, second_bases=()) -> dict:
    from conceptlab.training.esd.erase import erased_weights
    from conceptlab.training.merge.methods import add_difference, weighted_sum
    from conceptlab.training.lora.report import labelled_grid

    t = E.Timer()
    lora = res_all.get("lora_final_path")
    if not lora:
        data = E.write_style_dataset(out / "data", n=16, repeats=3)
        lora = E.train_style_lora(host, data, out / "lora_merge", save_every_n_epochs=None).final_path
    base = E.model_state(host)
    baked = E.baked_state(host, lora)
    changed = [k for k in base if not torch.equal(base[k], baked[k])]
    rows, strip = [], []
    for a in (0.0, 0.25, 0.5, 0.75, 1.0):
        merged = {k: weighted_sum(base[k], baked[k], a) for k in changed}
        with E.weights_patched(host, merged):
            sc = E.style_scores(host, seeds=seeds)
            strip.append(E.sample(host, [f"{E.TRIGGER}, {p}" for p in E.STYLE_EVAL_PROMPTS[:4]], seed=0))
        rows.append({"alpha": a, **sc})
        print(f"[merge] weighted sum alpha {a:.2f}: with trigger in-palette {sc['with_trigger']:.3f} ΔE00 "
              f"{sc['with_trigger_de']:.2f}; without ΔE00 {sc['without_trigger_de']:.2f}")
    cols = [np.stack([s[i] for s in strip]) for i in range(len(strip[0]))]
    _save(labelled_grid([list(c) for c in cols], [p.split(",")[-1].strip() for p in E.STYLE_EVAL_PROMPTS[:4]],
                        [f"a={r['alpha']}" for r in rows]), out / "merge_strip.png")
    vals = [r["with_trigger_de"] for r in rows]
    mono = all(b <= a + 1e-9 for a, b in zip(vals, vals[1:]))
    fig = {"weighted_sum": rows, "monotonic_de": mono, "add_difference": []}
    print(f"[merge] ΔE00 with trigger monotone in alpha: {mono}")
    # second bases: a derived model of the same base (the ESD `wall` erasure from the esd section — how
    # add-difference is used in practice: move a fine-tune's difference onto another fine-tune of the same base),
    # and any --second-base folders given
    seconds = []
    if res_all.get("esd_first"):
        r, _ = res_all["esd_first"]
        seconds.append(("tiny_dawnlike with wall erased (ESD-x)", host, erased_weights(host, r)))
    for label, path in second_bases:
        seconds.append((label, E.load_host(Path(path)), {}))
    for label, other, patch in seconds:
        ob = E.model_state(other)
        ob.update(patch)
        keys = sorted(set(changed) | set(patch))
        with E.weights_patched(other, {k: ob[k] for k in patch}):
            before = E.style_scores(other, seeds=seeds)
        transfer = {k: add_difference(ob[k], baked[k], base[k], 1.0) for k in keys}
        with E.weights_patched(other, transfer):
            after = E.style_scores(other, seeds=seeds)
        fig["add_difference"].append({"second_base": label, "before": before, "after": after})
        print(f"[merge] add difference onto {label}: with trigger ΔE00 {before['with_trigger_de']:.2f} -> "
              f"{after['with_trigger_de']:.2f}; without {before['without_trigger_de']:.2f} -> "
              f"{after['without_trigger_de']:.2f}")
    fig["seconds"] = t()
    return fig


def section_diff(host, out: Path, seeds, res_all: dict, concept: str = "wall") -> dict:
    from conceptlab.metrics.weight_diff import compare_reports
    from conceptlab.training.esd.erase import erased_weights

    t = E.Timer()
    reps = {}
    for it in (100, 500):
        r = E.erase_concept(host, concept, iterations=it, lr=2e-4)
        reps[it] = E.diff_report(host, erased_weights(host, r), name=f"esd {it} it")
    lt = reps[100]["by_layer_type"]
    changed_types = sorted(k for k, v in lt.items() if (v.get("frac_changed") or 0) > 0)
    cmp = compare_reports(reps[100], reps[500], label1="100 it", label2="500 it")
    print(f"[diff] layer types changed by ESD-x: {changed_types}")
    print("[diff] 500 vs 100 iterations, ratios per layer type:")
    for g, m in cmp["by_layer_type"].items():
        r = {k: v["ratio"] for k, v in m.items() if v["ratio"] is not None}
        if r:
            print(f"[diff]   {g:14s} " + ", ".join(f"{k} {v:.3g}" for k, v in r.items()))
    return {"changed_layer_types": changed_types, "by_layer_type_100": lt, "ratios": cmp["by_layer_type"],
            "overall_ratios": cmp["overall"], "seconds": t()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("out/effect"))
    ap.add_argument("--only", default="lora,esd,merge,diff,rank")
    ap.add_argument("--seeds", type=int, default=3, help="sampling seeds per measurement")
    ap.add_argument("--esd-iterations", type=int, default=100)
    ap.add_argument("--model", type=Path, default=E.TINY_MODEL)
    ap.add_argument("--second-base", action="append", default=[], metavar="LABEL=PATH",
                    help="a second tiny base for add-difference (repeatable)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pictures", type=Path, default=None,
                    help="also write the pictures here (README's Evidence pictures: docs/evidence)")
    args = ap.parse_args(argv)
    if args.pictures:
        PICTURES.append(args.pictures)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    host = E.load_host(args.model)
    seeds = list(range(args.seeds))
    figures, state = {"machine_threads": args.threads}, {}
    t0 = time.time()
    for sec in args.only.split(","):
        if sec == "lora":
            figures["lora"] = section_lora(host, args.out, seeds, state)
        elif sec == "rank":
            figures["rank"] = section_rank(host, args.out, seeds, state)
        elif sec == "esd":
            figures["esd"] = section_esd(host, args.out, seeds, state, args.esd_iterations)
        elif sec == "merge":
            sb = [tuple(s.split("=", 1)) for s in args.second_base]
            figures["merge"] = section_merge(host, args.out, seeds, state, sb)
        elif sec == "diff":
            figures["diff"] = section_diff(host, args.out, seeds, state)
        elif sec == "samples":  # the model card's samples.png (not in the default run)
            _save(E.model_card_samples(host), args.out / "samples.png")
        else:
            raise SystemExit(f"unknown section {sec!r}")
        (args.out / "effect.json").write_text(json.dumps(figures, indent=1, default=str))
    print(f"figures: {args.out / 'effect.json'} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
