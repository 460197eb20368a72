"""``conceptlab quickstart``: the pack's main job, end to end, on a CPU in minutes.

1. **caption audit** of the sample dataset (``sample_data/gameboy``: 16 DawnLike sprites recoloured to the
   4-colour Game Boy ramp, captions ``"gbstyle, pixel art, <group>, <name>"``);
2. **LoRA training** on the tiny DawnLike model (``sample_data/tiny_dawnlike``) with ``sample_data/quickstart.toml``:
   per-epoch samples, palette metrics against the Game Boy ramp, an epoch file per epoch;
3. the **epoch table** and the **best epoch** (highest in-palette fraction of the samples);
4. **samples with the best LoRA** beside the same prompts on the base model (``<out>/best_vs_base.png``).

It prints the files it wrote and the epoch table. ``--model`` swaps in another model (a diffusers folder or an
SD1.x single file; then also give ``--set resolution=512`` etc., see README); ``--set KEY=VALUE`` overrides any
key of the TOML, as for ``conceptlab train``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

PACK_DIR = Path(__file__).resolve().parents[2]
SAMPLE_DATA = PACK_DIR / "sample_data"
#: the tiny DawnLike model shipped with the pack (the default wherever a model is needed and none is given)
TINY_MODEL = SAMPLE_DATA / "tiny_dawnlike"
QUICKSTART_TOML = SAMPLE_DATA / "quickstart.toml"
TABLE_COLUMNS = ("epoch", "step", "train_loss", "in_palette_frac", "effective_colors", "delta_e00_mean")


def register(subparsers) -> None:
    """Add the ``quickstart`` subcommand."""
    p = subparsers.add_parser("quickstart", help="the main job on the bundled tiny model: caption audit -> LoRA "
                              "training with per-epoch samples and palette metrics -> best epoch -> samples",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/quickstart", help="output folder (default: out/quickstart)")
    p.add_argument("--model", default=None, help="model to train on (default: the bundled tiny DawnLike model)")
    p.add_argument("--data", default=None, help="kohya dataset folder (default: sample_data/gameboy)")
    p.add_argument("--config", default=str(QUICKSTART_TOML), help="kohya TOML (default: sample_data/quickstart.toml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (TOML value syntax); repeatable")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, ...")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 on the bundled tiny model, whose 8x8-latent ops gain nothing "
                        "from more; measured 10x faster than 2 threads on a busy 2-core machine; otherwise torch's "
                        "default)")
    p.set_defaults(func=run)


def format_table(history, best_epoch) -> str:
    """The epoch table as aligned text (the columns of :data:`TABLE_COLUMNS` that the history has)."""
    cols = [c for c in TABLE_COLUMNS if any(c in r for r in history)]
    rows = [[("%.4g" % r[c]) if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols] for r in history]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    for r, row in zip(history, rows):
        mark = "  <- best" if r.get("epoch") == best_epoch else ""
        lines.append("  ".join(v.rjust(w) for v, w in zip(row, widths)) + mark)
    return "\n".join(lines)


def _audit_summary(folder: Path) -> str:
    from ...metrics import captions as cap

    rep = cap.audit_folder(folder)
    s = rep["summary"]
    kinds = {k: v for k, v in s.get("by_code", {}).items() if v}
    sev = s.get("by_severity", {})
    head = (f"caption audit of {folder}: {s.get('pairs', 0)} image+caption pairs, {sev.get('error', 0)} errors, "
            f"{sev.get('warning', 0)} warnings")
    if kinds:
        head += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(kinds.items())) + ")"
    head += f"; details: conceptlab audit-captions {folder}"
    return head


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (all threads)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def timing_line(wall: float, cpu: float, phases: dict[str, float]) -> str:
    """``"done in W s wall-clock, C s CPU (phases: …); load average a, b, c on N cores"``: the wall time is only
    comparable between machines together with the load average and the CPU time beside it."""
    try:
        load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:  # not available on this platform
        load = "n/a"
    ph = ", ".join(f"{k} {v:.0f} s" for k, v in phases.items())
    return (f"done in {wall:.0f} s wall-clock, {cpu:.0f} s CPU ({ph}); load average {load} on "
            f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads")


def run(args) -> int:
    """Run the quick start; returns 0. Raises ``FileNotFoundError`` / ``ValueError`` for bad paths or keys."""
    from ..distributed import refuse_multi_process

    refuse_multi_process("quickstart", "the quick start is a one-process demo; for data-parallel training use "
                         "`accelerate launch -m conceptlab train --config ...`")
    from tqdm.auto import tqdm

    from ...formats.safetensors_io import WeightFile  # noqa: F401  (import check: safetensors present)
    from .dataset import KohyaDataset
    from .network import LoRANetwork
    from .kohya_args import check_settings, own_setting_names
    from .train_cli import CLI_KEYS, _host_for, load_config
    from .config import configs_from_mapping
    from .report import labelled_grid, save_png
    from .trainer import LoraTrainer

    t0 = time.time()
    threads = args.threads if args.threads is not None else (1 if not args.model and args.device == "cpu" else None)
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    phases: dict[str, float] = {}
    out = Path(args.out).resolve()
    data = Path(args.data) if args.data else SAMPLE_DATA / "gameboy"
    model = Path(args.model) if args.model else TINY_MODEL
    flat = load_config(args.config, args.overrides)
    flat["pretrained_model_name_or_path"] = str(model)
    flat["train_data_dir"] = str(data)
    flat["output_dir"] = str(out)
    for w in check_settings(flat, own_keys=own_setting_names() | set(CLI_KEYS)):  # every key: honoured or named
        print(f"conceptlab quickstart: warning: {w}", file=sys.stderr)
    cfg, dopts, caps, _ = configs_from_mapping(flat)

    t = time.time()
    print(f"[1/4] {_audit_summary(data)}")
    phases["audit"] = time.time() - t
    t = time.time()
    print(f"[2/4] training a LoRA on {model} (dim {cfg.network_dim}, {cfg.max_train_epochs} epochs) ...")
    torch.manual_seed(cfg.seed)
    host = _host_for(str(model), args.device, cfg.mixed_precision)
    dataset = KohyaDataset.scan(data, dopts, caps, seed=cfg.seed)
    trainer = LoraTrainer(host, dataset, cfg, model_name=model.name)
    _, max_steps, _ = trainer.schedule()
    bar = tqdm(total=max_steps, desc="LoRA steps", file=sys.stderr)

    def progress(step, total, info):
        bar.n = step
        bar.set_postfix(epoch=info["epoch"], loss=f"{info['loss']:.4f}", refresh=False)
        bar.refresh()

    trainer.progress = progress
    phases["load"] = time.time() - t
    t = time.time()
    try:
        res = trainer.run()
    finally:
        bar.close()
        dataset.release_latents()
    phases["training with per-epoch samples"] = time.time() - t
    t = time.time()

    print(f"[3/4] epoch table (best epoch by {res.best_metric}: {res.best_epoch})")
    print(format_table(res.history, res.best_epoch))

    print("[4/4] samples with the best LoRA vs the base model ...")
    prompts = cfg.prompts

    def render():
        return trainer.render_samples(prompts)

    host.clear_deltas()
    base_imgs = render()
    written = []
    best = res.best_path or res.final_path
    if best is not None:
        from safetensors.torch import load_file

        net, _ = LoRANetwork.from_kohya_state_dict(host, load_file(str(best)))
        net.install(host)
        try:
            lora_imgs = render()
        finally:
            net.remove()
        grid = labelled_grid([base_imgs, lora_imgs], ["base model", f"best LoRA (epoch {res.best_epoch})"],
                             [p.split(",")[-1].strip() for p in prompts])
        written.append(save_png(grid, out / "best_vs_base.png"))

    files = sorted(p for p in out.rglob("*") if p.is_file())
    print(f"files written under {out}:")
    for p in files:
        print(f"  {p.relative_to(out)}")
    print(f"best LoRA: {best}  (epoch {res.best_epoch}, {res.best_metric} = {res.best_value})")
    phases["best-vs-base samples"] = time.time() - t
    print(timing_line(time.time() - t0, _cpu_seconds(), phases))
    return 0
