"""``conceptlab uce --config uce.toml`` (closed-form UCE erasure) and ``conceptlab erase-convert`` (reference
``esd-*.safetensors`` ↔ ``.diff``), with the diffusers host.

``uce.toml`` has the same top-level run keys as ``erase.toml`` and a ``[uce]`` table with the fields of
:class:`conceptlab.training.esd.uce.UCEConfig`::

    model = "models/stable-diffusion-v1-5"   # local diffusers folder or single-file SD1.x/SD2.x checkpoint
    tokenizer = ""                           # single-file only: folder with vocab.json + merges.txt (optional)
    output_dir = "erasures/monet_uce"
    name = "uce_monet"
    device = "cpu"
    dtype = "float32"
    save_dtype = "float16"
    lora_rank = 0                            # > 0: also write an SVD LoRA for A1111/Forge
    save_reference = false                   # also write the reference format (absolute weights, diffusers names)

    [uce]
    concepts = "Claude Monet"
    guide_concepts = "art"                   # omit for the kind's default ("art" for styles, "" otherwise)
    preserve_concepts = "Rembrandt; Edgar Degas; a photo of a cat"
    erase_scale = 1.0
    preserve_scale = 1.0
    lamb = 0.5
    variations = 0

Writes ``<output_dir>/<name>.safetensors`` (``.diff``), ``training_stats.json`` and ``metadata.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

_RUN_KEYS = {"model", "output_dir", "name", "device", "dtype", "save_dtype", "lora_rank", "tokenizer",
             "save_reference"}


def register(subparsers) -> None:
    """Add the ``uce`` and ``erase-convert`` subcommands."""
    p = subparsers.add_parser("uce", help="erase a concept in closed form with UCE (seconds; SD1.x/SD2.x)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="uce.toml (see the description)")
    p.add_argument("--output-dir", default=None, help="override output_dir")
    p.set_defaults(func=run_uce)

    c = subparsers.add_parser(
        "erase-convert", help="convert an erasure between the reference format (esd_sd.py / uce_sd_erase.py: "
                              "absolute weights, diffusers names) and this project's .diff file",
        description="Converts INPUT to the other format: a .diff file becomes a reference file (base + delta "
                    "under diffusers names), a reference esd-*.safetensors / UCE file becomes a .diff file any "
                    "ComfyUI LoRA loader applies. Needs the base model the erasure was trained from.")
    c.add_argument("input", help="the erasure file to convert")
    c.add_argument("output", help="where to write the converted file (.safetensors)")
    c.add_argument("--model", required=True, help="the base model (diffusers folder or single-file checkpoint)")
    c.add_argument("--tokenizer", default=None, help=argparse.SUPPRESS)
    c.add_argument("--dtype", default="float32", help="tensor dtype of the written file (default float32)")
    c.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    c.set_defaults(func=run_convert)


def _read_toml(path: Path, table: str) -> tuple[dict, dict]:
    from .cli import read_run_toml

    data, sub = read_run_toml(path, table, _RUN_KEYS)
    if "model" not in data:
        raise ValueError(f"{path}: 'model' (a local diffusers folder or a single-file SD1.x/SD2.x checkpoint) is "
                         "required")
    return data, sub


def run_uce(args) -> int:
    """Execute ``conceptlab uce``; returns 0, or raises ``ValueError`` / ``FileNotFoundError`` for bad input."""
    from ..distributed import refuse_multi_process

    refuse_multi_process("uce", "UCE is a closed-form edit (one linear solve per projection), not a training loop "
                         "to spread over processes; each process would compute and write the same files")
    from ...formats.safetensors_io import parse_dtype
    from .outputs import save_outputs
    from .reference import base_tensors, reference_file_name, to_reference
    from ..model_loading import load_host
    from .uce import UCEConfig, erase_uce_host

    cfg_path = Path(args.config)
    data, table = _read_toml(cfg_path, "uce")
    known = set(UCEConfig.__dataclass_fields__)
    unknown = sorted(set(table) - known)
    if unknown:
        raise ValueError(f"{cfg_path}: unknown [uce] setting(s) {unknown}; known: {sorted(known)}")
    config = UCEConfig(**table)
    config.validate()
    base = cfg_path.resolve().parent
    out_dir = Path(args.output_dir) if args.output_dir else (base / data.get("output_dir", "erasures")).resolve()
    name = str(data.get("name", "uce_erased"))
    if not name or "/" in name or "\\" in name:
        raise ValueError(f"name {name!r} must be a plain file stem")
    tok = (base / data["tokenizer"]).resolve() if data.get("tokenizer") else None
    host = load_host((base / data["model"]).resolve(), device=str(data.get("device", "cpu")),
                     dtype=parse_dtype(str(data.get("dtype", "float32"))), tokenizer=tok)
    result = erase_uce_host(host, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_dtype = parse_dtype(str(data.get("save_dtype", "float16")))
    paths = save_outputs(result, out_dir / f"{name}.safetensors", stats_dir=out_dir,
                         lora_rank=int(data.get("lora_rank", 0)), dtype=save_dtype)
    print(f"wrote {paths['diff']}" + (f" and {paths['lora']}" if paths["lora"] else ""))
    if data.get("save_reference"):
        from ...formats.safetensors_io import save_safetensors

        ref_path = out_dir / reference_file_name(result.metadata["concepts"][0], method="uce")
        save_safetensors(to_reference(result.deltas, base_tensors(host.modules("unet")), save_dtype),
                         ref_path)
        print(f"wrote {ref_path} (reference format)")
    s = result.stats
    print(f"UCE edited {s['trained_tensors']} tensors / {s['trained_parameters']:,} parameters in "
          f"{s['wall_time_s']:.2f} s; erased prompts' keys/values are {s['erase_relative_residual_mean']:.4f} "
          f"(relative) from their guides'" + (f", preserved ones moved at most "
                                             f"{s['preserve_relative_drift_max']:.4f}"
                                             if s["preserve_relative_drift_max"] is not None else ""))
    return 0


def run_convert(args) -> int:
    """Execute ``conceptlab erase-convert``; returns 0 or raises ``ValueError`` / ``FileNotFoundError`` /
    ``FileExistsError``."""
    from ..distributed import refuse_multi_process

    refuse_multi_process("erase-convert", "a file conversion; each process would write the same file")
    from ...formats.safetensors_io import parse_dtype
    from .reference import base_tensors, convert_file
    from ..model_loading import load_host

    host = load_host(Path(args.model), device="cpu", dtype=parse_dtype("float32"),
                     tokenizer=Path(args.tokenizer) if args.tokenizer else None)
    direction = convert_file(args.input, args.output, base_tensors(host.modules("unet")),
                             dtype=parse_dtype(args.dtype), overwrite=bool(args.overwrite))
    print(f"wrote {args.output} ({'reference format: absolute weights' if direction == 'to_reference' else '.diff'})")
    return 0
