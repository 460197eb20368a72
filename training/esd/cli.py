"""``conceptlab erase --config erase.toml``: ESD concept erasure with the diffusers host.

The TOML file has the run settings at the top level and the erasure settings in an ``[esd]`` table (the fields
of :class:`conceptlab.training.esd.config.ESDConfig`)::

    model = "models/stable-diffusion-v1-5"   # local diffusers folder (unet/ text_encoder/ tokenizer/ vae/),
                                             # or a single-file SD1.x/SD2.x/SDXL .safetensors checkpoint,
                                             # or a diffusers Flux.1 folder (transformer/ text_encoder/
                                             # tokenizer/ text_encoder_2/ tokenizer_2/ vae/, as FLUX.1-dev ships),
                                             # or a Flux transformer file (flux1-dev.safetensors) with:
    # clip_l = "clip_l.safetensors"          # Flux single files, as kohya's flux_train_network.py takes them
    # t5xxl = "t5xxl_fp16.safetensors"       # (training/flux_loading.py; relative to this file)
    # ae = "ae.safetensors"
    # t5_tokenizer = ""                      # T5 tokenizer folder (default: ComfyUI's comfy/text_encoders/t5_tokenizer)
    tokenizer = ""                           # single-file only: folder with vocab.json + merges.txt (optional)
    output_dir = "erasures/vangogh"          # relative paths are relative to the TOML file
    name = "esd_vangogh"                     # file stem of <name>.safetensors
    device = "cuda"                          # or "cpu"
    dtype = "float32"                        # compute dtype of the frozen model (float16 / bfloat16 on GPU)
    save_dtype = "float16"                   # dtype of the saved deltas
    lora_rank = 0                            # > 0: also write <name>_lora_r<rank>.safetensors (SVD)
    images = ""                              # optional folder of images for xt_source = "noised"

    [esd]
    concepts = "Van Gogh"
    variations = 100
    method = "esd-x"
    xt_source = "self_sample"
    negative_guidance = 1.0
    iterations = 500
    concept_kind = "auto"                    # style | object | person | attribute | explicit (prompt templates)
    erase_from = ""                          # attribute erasure: erase the concept from this scene prompt
    masks = "none"                           # "none" (whole latent, the paper) or "grid"
    mask_mode = "sum"                        # with masks: "sum" (all masks each iteration, default) or "sample";
                                             # "grid-sum" / "grid-sample" are presets that build the grid
    # guidance_scale = 3.5                   # Flux-dev only: distilled guidance of the predictions (README
                                             # "ESD on Flux"); start_guidance = the x_t trajectory's guidance

``--mask-mode grid-sum`` on the command line is the one-click preset for the grid-mask schedule (3×3 grid +
centre, every mask each iteration, weighted sum). ``save_reference = true`` also writes the reference
repository's format (``esd-<concept>-from-<from>-<method>.safetensors``: absolute weights under diffusers names).

Writes ``<output_dir>/<name>.safetensors`` (+ LoRA), ``training_stats.json``, ``metadata.json`` and
``loss.png``.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

_RUN_KEYS = {"model", "output_dir", "name", "device", "dtype", "save_dtype", "lora_rank", "images", "tokenizer",
             "save_reference", "clip_l", "t5xxl", "ae", "t5_tokenizer", "quantize_base"}


def register(subparsers) -> None:
    """Add the ``erase`` subcommand."""
    p = subparsers.add_parser("erase", help="erase a concept from an SD/SDXL model (diffusers folder or "
                                            "single-file checkpoint) or a Flux.1 diffusers folder with ESD",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="erase.toml (see the description)")
    p.add_argument("--iterations", type=int, default=None, help="override [esd] iterations")
    p.add_argument("--seed", type=int, default=None, help="override [esd] seed")
    p.add_argument("--output-dir", default=None, help="override output_dir")
    p.add_argument("--mask-mode", default=None, choices=["sum", "sample", "grid-sum", "grid-sample"],
                   help="override [esd] mask_mode; grid-sum = the grid-mask preset (3x3 + centre, all masks each "
                        "iteration)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=run)


def _load_images(folder: Path, width: int, height: int):
    import numpy as np
    import torch
    from PIL import Image

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if not files:
        raise ValueError(f"{folder}: no .png/.jpg/.webp images")
    arrs = []
    for f in files:
        im = Image.open(f).convert("RGB").resize((width, height), Image.BICUBIC)
        arrs.append(np.asarray(im, dtype=np.float32) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


def _load_host(model_dir: Path, *, device: str, dtype, tokenizer, flux: dict):
    """The host for ``model`` through :func:`..model_loading.load_host`, the router the training CLI uses too: a
    diffusers Flux.1 folder, a Flux transformer file with ``clip_l`` / ``t5xxl`` / ``ae``, or an SD model.

    ``quantize_base`` (Flux only, as for training: the frozen transformer and T5 weights stored int8 / int4 /
    fp8 by torchao; ESD's full-rank ΔW stays fp32 and is added to the dequantized weight, so the saved ``.diff``
    is ΔW learned against the quantized base — the frozen model's own predictions, the target, come from that
    base too, like a LoRA trained on a quantized base).

    Raises ``ValueError`` for Flux keys on an SD model, a Flux file without its three companions, or
    ``quantize_base`` on an SD model."""
    from ..model_loading import load_host

    flux = dict(flux)
    quant = flux.pop("quantize_base", None)
    return load_host(model_dir, device=device, dtype=dtype, tokenizer=tokenizer, flux=flux, quantize=quant)


def read_run_toml(path: Path, table: str, run_keys: set[str]) -> tuple[dict, dict]:
    """Read an erase/UCE run config: ``(top-level run keys, the [table] section)``.

    Raises ``FileNotFoundError`` when ``path`` is not a file and ``ValueError`` for invalid TOML or a top-level key
    outside ``run_keys`` (named, with the known keys), so no setting is dropped silently."""
    if not path.is_file():
        raise FileNotFoundError(f"config {path} not found")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: invalid TOML: {exc}") from None
    sub = dict(data.pop(table, {}))
    unknown = sorted(set(data) - run_keys)
    if unknown:
        raise ValueError(f"{path}: unknown top-level key(s) {unknown}; known: {sorted(run_keys)} and [{table}]")
    return data, sub


def run(args) -> int:
    """Execute ``conceptlab erase``; returns 0, or raises ``ValueError`` / ``FileNotFoundError`` for bad input."""
    from ...formats.safetensors_io import parse_dtype
    from .config import config_from_mapping
    from .erase import ESDCancelled, erase
    from .outputs import loss_plot, save_outputs
    from ..distributed import refuse_multi_process

    # why ESD is not data-parallel: the training/distributed.py module docstring ("ESD ...")
    refuse_multi_process("erase", "ESD takes one draw per iteration (batch 1, as the paper); spreading draws over "
                         "processes would change the optimisation, not speed it up")
    cfg_path = Path(args.config)
    data, esd_table = read_run_toml(cfg_path, "esd", _RUN_KEYS)
    if "model" not in data:
        from ..lora.quickstart_cli import TINY_MODEL

        print(f"conceptlab erase: no 'model' given: using the bundled tiny DawnLike model {TINY_MODEL} "
              "(set model = \"...\" to a diffusers folder or SD1.x/SD2.x/SDXL checkpoint)", file=sys.stderr)
        data["model"] = str(TINY_MODEL)
    if args.iterations is not None:
        esd_table["iterations"] = args.iterations
    if args.seed is not None:
        esd_table["seed"] = args.seed
    if getattr(args, "mask_mode", None) is not None:
        esd_table["mask_mode"] = args.mask_mode
    if esd_table.get("erase_from") == "":
        esd_table["erase_from"] = None
    if isinstance(esd_table.get("masks"), str) and esd_table["masks"].lower() == "none":
        esd_table["masks"] = None
    config = config_from_mapping(esd_table)

    base = cfg_path.resolve().parent
    model_dir = (base / data["model"]).resolve()
    out_dir = Path(args.output_dir) if args.output_dir else (base / data.get("output_dir", "erasures")).resolve()
    name = str(data.get("name", "esd_erased"))
    if not name or "/" in name or "\\" in name:
        raise ValueError(f"name {name!r} must be a plain file stem")
    images = None
    if data.get("images"):
        images = _load_images((base / data["images"]).resolve(), config.width, config.height)
    device, dtype = str(data.get("device", "cpu")), parse_dtype(str(data.get("dtype", "float32")))
    tok = (base / data["tokenizer"]).resolve() if data.get("tokenizer") else None
    flux = {k: (str((base / data[k]).resolve()) if k != "quantize_base" else data[k])
            for k in ("clip_l", "t5xxl", "ae", "t5_tokenizer", "quantize_base") if data.get(k)}
    host = _load_host(model_dir, device=device, dtype=dtype, tokenizer=tok, flux=flux)
    if data.get("save_reference"):
        from ..families import family

        if family(host.arch).denoiser != "unet":
            raise ValueError(f"save_reference: the reference repository (rohitgandikota/erasing) has no file format "
                             f"for {host.arch} models (its scripts cover SD1.x/SDXL); remove save_reference")

    stop = {"flag": False}

    def on_sigint(signum, frame):  # first Ctrl-C: finish the iteration, save, exit; second: abort
        if stop["flag"]:
            raise KeyboardInterrupt
        stop["flag"] = True
        print("[erase] stopping after this iteration (Ctrl-C again to abort without saving)", file=sys.stderr)

    def progress(info: dict):
        if stop["flag"]:
            return False
        if not args.quiet and (info["iteration"] % 10 == 0 or info["iteration"] == info["total"]):
            print(f"[erase] {info['iteration']}/{info['total']} loss {info['loss']:.6f} t={info['timestep']} "
                  f"mask={info['mask']}", file=sys.stderr, flush=True)

    import signal

    old = signal.signal(signal.SIGINT, on_sigint)
    try:
        result = erase(host, config, progress=progress, images=images)
    except ESDCancelled as exc:
        result = exc.result
    finally:
        signal.signal(signal.SIGINT, old)
    if result.cancelled:
        print("[erase] interrupted: saving what was trained so far", file=sys.stderr)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = save_outputs(result, out_dir / f"{name}.safetensors", stats_dir=out_dir,
                         lora_rank=int(data.get("lora_rank", 0)),
                         dtype=parse_dtype(str(data.get("save_dtype", "float16"))))
    from PIL import Image

    from ...formats.safetensors_io import atomic_output

    with atomic_output(out_dir / "loss.png") as tmp:
        Image.fromarray(loss_plot(result.losses, f"ESD {config.method}")).save(tmp, format="PNG")
    print(f"wrote {paths['diff']}" + (f" and {paths['lora']}" if paths["lora"] else ""))
    if data.get("save_reference"):
        from ...formats.safetensors_io import save_safetensors
        from .reference import base_tensors, reference_file_name, to_reference

        froms = result.metadata.get("erase_from") or [None]
        ref_path = out_dir / reference_file_name(result.metadata["concepts"][0], froms[0], config.method)
        save_safetensors(to_reference(result.deltas, base_tensors(host.modules("unet")),
                                      parse_dtype(str(data.get("save_dtype", "float16")))), ref_path)
        print(f"wrote {ref_path} (reference format: absolute weights, diffusers names)")
    if paths["svd"]:
        print(f"low-rank LoRA keeps {paths['svd']['energy_kept'] * 100:.1f}% of the delta energy")
    s = result.stats
    print(f"{s['iterations_done']} iterations, {s['trained_tensors']} tensors / {s['trained_parameters']:,} "
          f"parameters, {s['iterations_per_s']:.3f} it/s, mean loss of last 20 {s['loss_avg_last_20']}")
    return 130 if result.cancelled else 0
