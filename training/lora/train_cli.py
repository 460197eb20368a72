"""``conceptlab train --config kohya.toml [--set key=value ...]``: the LoRA trainer on a local model.

The TOML is a kohya sd-scripts config (sections are flattened; only keys matter). Keys the trainer needs
besides training settings: ``pretrained_model_name_or_path``, ``train_data_dir`` (the kohya folder of
``<repeats>_<name>`` subfolders; ``reg_data_dir`` adds regularization folders) or a kohya dataset config
(``dataset_config = "file.toml"`` or inline ``[[datasets]]`` / ``[[datasets.subsets]]``; relative paths are taken
from the config's folder), ``output_dir``, ``output_name``. Every key is honoured, warned as having no effect or
refused by name (``training/lora/kohya_args.py``).

``pretrained_model_name_or_path`` is a local path, never a Hub id (nothing is downloaded):

* a diffusers folder with ``unet/``, ``text_encoder/``, ``tokenizer/``, ``vae/`` (``scheduler/`` optional), or
* a single-file SD 1.x / SD 2.x / SDXL checkpoint (``.safetensors``; ``.ckpt`` read weights-only), converted
  with diffusers' own LDM converters and the configs shipped in the pack's ``configs/`` folder (SDXL v-pred +
  zero-terminal-SNR fine-tunes are recognised by their ``v_pred`` / ``ztsnr`` marker keys, as ComfyUI does). The
  SDXL refiner and Flux single files are refused. A single file has no tokenizer: pass ``--tokenizer DIR`` (or
  a ``tokenizer = "DIR"`` key), a folder with CLIP's ``vocab.json`` + ``merges.txt`` such as a diffusers model's
  ``tokenizer/`` or ComfyUI's ``comfy/sd1_tokenizer``; without it ``$COMFYUI_PATH/comfy/sd1_tokenizer`` and the
  ComfyUI checkout the pack is installed in are tried.

Flux.1 (dev / schnell): a diffusers Flux folder (``transformer/``, ``text_encoder/``, ``text_encoder_2/``,
``tokenizer/``, ``tokenizer_2/``, ``vae/``), or kohya's four files: ``pretrained_model_name_or_path =
"flux1-dev.safetensors"`` (BFL / ComfyUI layout; dev vs schnell from its ``guidance_in`` keys) with ``clip_l``,
``t5xxl`` and ``ae`` keys (``training/flux_loading.py``); ``t5_tokenizer = "DIR"`` names a T5 tokenizer folder
(default: ComfyUI's ``comfy/text_encoders/t5_tokenizer``). ``quantize_base = "int8"`` (or ``"int4"`` / ``"fp8"``)
stores the frozen transformer weights quantized (``training/quantize.py``).

Prediction type: detected (safetensors metadata; for SD 2.x ComfyUI's 768-v heuristic), else epsilon. Force it
with ``--prediction-type v_prediction`` or kohya's ``v_parameterization = true`` (SD 2.x 768-v models).

Several GPUs or machines: ``accelerate launch [--multi_gpu] --num_processes N [--num_machines M --machine_rank R
--main_process_ip IP] -m conceptlab train --config kohya.toml`` (CPU processes: ``--multi_gpu`` with
``--device cpu``; accelerate's ``--cpu`` launcher starts one process). Each process loads
the model; ``train_batch_size`` is per process; the main process alone writes and prints. See
:mod:`conceptlab.training.distributed`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path

import torch

from .config import configs_from_mapping, parse_kohya_toml, parse_set_values
from .trainer import LoraTrainer

#: keys the CLI itself consumes (not trainer settings)
CLI_KEYS = ("pretrained_model_name_or_path", "train_data_dir", "device", "logging_dir", "sample_prompts_file",
            "tokenizer", "v_parameterization", "reg_data_dir", "dataset_config", "datasets", "clip_l", "t5xxl", "ae",
            "t5_tokenizer", "quantize_base")
# Every other kohya key is honoured, warned as having no effect, or refused by name: see training/lora/kohya_args.py.


def register(subparsers) -> None:
    """Add the ``train`` subcommand."""
    p = subparsers.add_parser("train", help="train a kohya-format LoRA on a local diffusers folder or SD1/SD2/SDXL "
                              "single-file checkpoint",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="kohya sd-scripts TOML config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (TOML value syntax: 3, 1e-4, true, \"text\"); repeatable")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="CLIP tokenizer folder (vocab.json + merges.txt) for a single-file checkpoint, e.g. "
                        "ComfyUI/comfy/sd1_tokenizer (default: $COMFYUI_PATH or the ComfyUI holding this pack)")
    p.add_argument("--prediction-type", default=None, choices=("epsilon", "v_prediction"),
                   help="override the model's parameterization (SD 2.x 768-v: v_prediction; default: detected)")
    p.add_argument("--json", action="store_true", help="print the run summary as JSON")
    p.set_defaults(func=run)


def load_config(config: str | Path, overrides: list[str] | None = None) -> dict:
    """The flat kohya mapping from a TOML file plus ``--set`` overrides; raises ``FileNotFoundError`` /
    ``ValueError``. A ``sample_prompts`` key naming a file is read (kohya passes prompts as a file)."""
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"config not found: {path}")
    flat = parse_kohya_toml(path.read_text(encoding="utf-8"))
    flat.update(parse_set_values(overrides or []))
    sp = flat.get("sample_prompts")
    if isinstance(sp, str) and "\n" not in sp and sp.lower().endswith((".txt", ".toml", ".json")):
        from .sample_prompts import load_prompt_file

        f = Path(sp) if Path(sp).is_absolute() else path.parent / sp
        flat["sample_prompts"] = load_prompt_file(f)  # kohya load_prompts: .txt lines, .toml / .json prompt files
    return flat


def _host_for(model_path: str, device: str, mixed_precision: str, tokenizer: str | None = None,
              prediction_type: str | None = None, flux: dict | None = None):
    """The host for a local diffusers folder (SD or Flux.1), a single-file SD checkpoint or a Flux transformer file
    with its ``flux`` companions, through :func:`..model_loading.load_host` (never downloads).

    Raises ``FileNotFoundError`` (missing path or tokenizer) and ``ValueError`` (unreadable or unsupported file,
    options that need a single file given with a folder)."""
    from ...formats.safetensors_io import WeightFileError
    from ..model_loading import CheckpointLoadError, load_host

    p = Path(model_path)
    if not p.exists():
        raise FileNotFoundError(f"pretrained_model_name_or_path not found: {p} (the CLI never downloads)")
    dev = torch.device(device)
    dtype = torch.float32
    if dev.type == "cuda":
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)
    flux = dict(flux or {})
    quant = flux.pop("quantize_base", None)
    swap = int(flux.pop("blocks_to_swap", 0) or 0)
    from ..flux_loading import is_flux_checkpoint, is_flux_folder

    single = {"tokenizer": tokenizer, "prediction_type": prediction_type}
    if p.is_dir():  # a diffusers folder (SD or Flux) has its own tokenizer(s) and scheduler
        if (tokenizer or prediction_type) and not is_flux_folder(p):
            print("conceptlab train: note: --tokenizer/--prediction-type apply to single files; a diffusers folder "
                  "uses its own tokenizer/ and scheduler/", file=sys.stderr)
        single = {}
    try:
        host = load_host(p, device=str(dev), dtype=dtype, flux=flux, quantize=quant, blocks_to_swap=swap,
                         **single)
    except (WeightFileError, CheckpointLoadError) as exc:
        if p.is_dir() or is_flux_checkpoint(p):
            raise
        raise ValueError(f"{exc} (pretrained_model_name_or_path must be a local diffusers folder with unet/, "
                         "text_encoder/, tokenizer/, vae/ or a single-file SD 1.x/2.x checkpoint)") from exc
    if host.arch == "flux":
        print(f"loaded {p.name}: Flux.1 {host.variant}" + (f", base quantized {quant}" if quant else "")
              + (f", blocks_to_swap {swap}" if swap else ""), file=sys.stderr)
        return host
    if p.is_dir():
        return host
    rep = host.load_report
    print(f"loaded {p.name}: {rep['arch']}, {rep['prediction_type']} ({rep['prediction_source']})"
          + (f"; unused keys: {sum(len(v) for v in rep['unused_keys'].values())}" if rep["unused_keys"] else ""),
          file=sys.stderr)
    return host


def _model_hashes(model_path) -> dict:
    """kohya's ``ss_sd_model_hash`` / ``ss_new_sd_model_hash`` of a single-file model (train_util ``model_hash``,
    ``calculate_sha256``); ``{}`` for a folder or a missing path (kohya hashes files only)."""
    if not model_path or not Path(str(model_path)).is_file():
        return {}
    from .kohya_metadata import legacy_model_hash, sha256_file

    p = Path(str(model_path))
    return {"model_hash": legacy_model_hash(p), "new_model_hash": sha256_file(p)}


def run(args, host=None) -> int:
    """Run the ``train`` subcommand (``host`` may be injected by tests). Returns 0 on success."""
    from tqdm.auto import tqdm

    from .dataset import KohyaDataset

    from .dataset_config import dataset_from_settings, uses_dataset_config
    from .kohya_args import check_settings, own_setting_names

    from ..distributed import DataParallel, apply_launcher_settings

    flat = load_config(args.config, args.overrides)
    # several processes started by `accelerate launch` / torchrun (None: one process, as always)
    dp = DataParallel.from_environment(args.device or flat.get("device"), flat.get("ddp_timeout"))
    main = dp is None or dp.is_main
    if not main:  # the main process alone prints; the others report only their own errors
        _quiet()
    warnings = apply_launcher_settings(flat)  # accelerate launch --mixed_precision etc.
    for w in warnings + check_settings(flat, own_keys=own_setting_names() | set(CLI_KEYS)):
        if main:
            print(f"conceptlab train: warning: {w}", file=sys.stderr)
    cfg, dopts, caps, _ = configs_from_mapping(flat)
    if "output_dir" not in flat:
        raise ValueError("output_dir is required")
    if flat.get("logging_dir") and not cfg.state_dir:
        cfg.state_dir = str(flat["logging_dir"])
    device = str(dp.device) if dp is not None else (args.device or flat.get("device")
                                                     or ("cuda" if torch.cuda.is_available() else "cpu"))
    if uses_dataset_config(flat):
        dataset, batch = dataset_from_settings(flat, seed=cfg.seed, base_dir=Path(args.config).parent)
        if batch is not None:
            cfg.train_batch_size = batch
    else:
        data_dir = flat.get("train_data_dir")
        if not data_dir:
            raise ValueError("train_data_dir is required (the folder holding <repeats>_<name> subfolders), or a "
                             "dataset_config / [[datasets]]")
        dataset = KohyaDataset.scan(data_dir, dopts, caps, seed=cfg.seed)
    if main:
        print(dataset.summary_text(cfg.train_batch_size, cfg.max_train_epochs), file=sys.stderr)
    if dp is not None and main:
        from ..distributed import total_batch_size

        print(f"{dp.world} processes on {dp.device.type}: train_batch_size {cfg.train_batch_size} per process, "
              f"total batch per optimizer step {total_batch_size(cfg, dp.world)} (train_batch_size × processes × "
              f"gradient_accumulation_steps)", file=sys.stderr)
    if host is None:
        model = flat.get("pretrained_model_name_or_path")
        if not model:
            from .quickstart_cli import TINY_MODEL

            model = flat["pretrained_model_name_or_path"] = str(TINY_MODEL)
            print(f"conceptlab train: no pretrained_model_name_or_path: using the bundled tiny DawnLike model "
                  f"{TINY_MODEL} (16 px; give a diffusers folder or an SD1.x/SD2.x/SDXL checkpoint to train on SD)",
                  file=sys.stderr)
        pred = getattr(args, "prediction_type", None)
        if pred is None and flat.get("v_parameterization") is True:
            pred = "v_prediction"
        tok = getattr(args, "tokenizer", None) or flat.get("tokenizer")
        flux = {k: flat[k] for k in ("clip_l", "t5xxl", "ae", "t5_tokenizer", "quantize_base", "blocks_to_swap")
                if flat.get(k)}
        if flat.get("blocks_to_swap") and not flat.get("gradient_checkpointing"):
            print("conceptlab train: warning: blocks_to_swap moves weights, not activations: without "
                  "gradient_checkpointing every block's activations stay on the device (set gradient_checkpointing "
                  "= true, as kohya's Flux examples do)", file=sys.stderr)
        with contextlib.redirect_stderr(io.StringIO()) if not main else contextlib.nullcontext():
            host = _host_for(str(model), device, cfg.mixed_precision, tokenizer=str(tok) if tok else None,
                             prediction_type=pred, **({"flux": flux} if flux else {}))
    if flat.get("v2") and getattr(host, "arch", None) not in (None, "sd2"):
        raise ValueError(f"v2 = true but the model is {host.arch} (v2 means a Stable Diffusion 2.x model)")
    trainer = LoraTrainer(host, dataset, cfg, model_name=Path(str(flat.get("pretrained_model_name_or_path", "")))
                          .name, **_model_hashes(flat.get("pretrained_model_name_or_path")) if main else {})
    trainer.dist = dp
    _, max_steps, _ = trainer.schedule()
    bar = tqdm(total=max_steps, desc="steps", file=sys.stderr, disable=not (main and sys.stderr.isatty()))

    def progress(step, total, info):
        bar.n = step
        bar.set_postfix(epoch=info["epoch"], loss=f"{info['loss']:.4f}", refresh=False)
        bar.refresh()

    def on_epoch(record, preview):
        msg = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                        if k not in ("samples",))
        tqdm.write(f"epoch {record['epoch']}: {msg}", file=sys.stderr)

    trainer.progress, trainer.on_epoch = (progress, on_epoch) if main else (None, None)
    try:
        res = trainer.run()
    finally:
        bar.close()
        dataset.release_latents()
    summary = {"final": str(res.final_path) if res.final_path else None,
               "best": str(res.best_path) if res.best_path else None, "best_epoch": res.best_epoch,
               "best_metric": res.best_metric, "best_value": res.best_value, "steps": res.global_step,
               "epochs": res.epochs_done, "stopped_early": res.stopped_early,
               "epoch_table": str(res.table_path) if res.table_path else None,
               "files": {str(k): str(v) for k, v in res.epoch_files.items()}}
    if not main:
        return 0
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"wrote {summary['final']}" + (f"; best epoch {res.best_epoch} ({res.best_metric}) -> "
                                             f"{summary['best']}" if res.best_path else ""))
    return 0


def _quiet() -> None:
    """Silence the informational output of a non-main process of a multi-process run (warnings and progress are
    the main process's; errors still reach stderr through the CLI's own error handling)."""
    import logging

    logging.getLogger(__name__.split(".")[0]).setLevel(logging.ERROR)
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
