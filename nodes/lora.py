"""ComfyUI nodes for LoRA training with kohya semantics (thin adapters over :mod:`conceptlab.training`).

* ``ConceptLabLoraDataset``: a kohya folder inside ComfyUI's input directory → DATASET + summary + caption audit.
* ``ConceptLabTrainLora``: MODEL, CLIP, VAE, DATASET + settings (+ kohya TOML) → MODEL/CLIP with the LoRA,
  the file name, loss curve, epoch table and sample grid; files in ``output/loras/``.
* ``ConceptLabEpochCompare``: saved epoch files → the same prompts/seeds per file as a labelled grid + metrics.

ComfyUI is imported only inside functions (through :mod:`.comfy_io` and :mod:`.comfy_host`).
"""

from __future__ import annotations

import fnmatch
import gc
import json
import re

import numpy as np
import torch

from ..formats import limits
from ..training.lora.captions import CaptionConfig
from ..training.lora.dataset import KohyaDataset
from ..training.lora.dataset_options import INTERPOLATIONS, DatasetOptions
from ..training.lora.config import BEST_METRICS, OPTIMIZERS, SCHEDULERS, configs_from_mapping, parse_kohya_toml
from ..training.lora.report import labelled_grid, palette_metrics, render_epoch_table
from ..training.lora.trainer import LoraTrainer
from . import policy

CATEGORY = "Concept Lab/LoRA"
DATASET_TYPE = "CONCEPTLAB_DATASET"

# tooltips that document kohya's surprises (sd-scripts train_util.process_caption)
CAPTION_TOOLTIPS = {
    "caption_prefix": "Text put before every caption, joined with a space (kohya caption_prefix). With shuffling "
                      "on it becomes part of the first tag, so keep it in front with keep_tokens = 1.",
    "caption_suffix": "Text put after every caption, joined with a space (kohya caption_suffix).",
    "shuffle_caption": "Shuffle the comma-separated tags on every use (kohya shuffle_caption). Tags kept by "
                       "keep_tokens / keep_tokens_separator stay in front.",
    "keep_tokens": "Number of leading tags that never move or drop (kohya keep_tokens). Surprise: it does NOTHING "
                   "unless shuffle_caption is on or caption_tag_dropout_rate > 0.",
    "keep_tokens_separator": "Alternative to keep_tokens, e.g. '|||': tags before it are kept, a second one starts "
                             "kept suffix tags. Surprise: without shuffle or tag dropout kohya leaves the caption "
                             "as is, separator text included.",
    "caption_dropout_rate": "Probability of training a step with an EMPTY caption (the whole caption, not tags; "
                            "kohya caption_dropout_rate). Drawn afresh on every use.",
    "caption_dropout_every_n_epochs": "Empty EVERY caption in epochs divisible by N (epochs count from 1, so 2 "
                                      "means epochs 2, 4, ...). 0 = off. 1 would empty every caption always.",
    "caption_tag_dropout_rate": "Probability of dropping each flexible tag on a use (kept tags never drop; kohya "
                                "caption_tag_dropout_rate).",
}


def _dataset_inputs() -> dict:
    return {
        "folder": ("STRING", {"default": "lora_dataset", "tooltip": "A kohya training folder inside ComfyUI's "
                              "input directory holding <repeats>_<name> subfolders (e.g. 10_mystyle) of images with "
                              "same-name caption files. A subfolder without the number prefix is skipped (kohya)."}),
        "resolution": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 64,
                               "tooltip": "Training resolution (square side, pixels). Buckets keep about this area."}),
        "enable_bucket": ("BOOLEAN", {"default": True, "tooltip": "Aspect-ratio bucketing: each image goes to "
                                      "the bucket with the closest aspect ratio (kohya enable_bucket)."}),
        "min_bucket_reso": ("INT", {"default": 256, "min": 64, "max": 4096, "step": 64,
                                    "tooltip": "Smallest bucket side in pixels (must be <= resolution)."}),
        "max_bucket_reso": ("INT", {"default": 1024, "min": 64, "max": 8192, "step": 64,
                                    "tooltip": "Largest bucket side in pixels (must be >= resolution)."}),
        "bucket_no_upscale": ("BOOLEAN", {"default": False, "tooltip": "Never enlarge images: the bucket is the "
                                          "image size rounded down to 64 px (min/max bucket sizes are ignored)."}),
        "resize_interpolation": (list(INTERPOLATIONS), {"default": "auto", "tooltip": "Resize filter. 'nearest' "
                                 "keeps pixel art sharp; 'auto' is kohya's (area when shrinking, Lanczos when "
                                 "enlarging)."}),
        "flip_aug": ("BOOLEAN", {"default": False, "tooltip": "Mirror images at random (50 %) on each use. Off for "
                                 "asymmetric subjects or text."}),
        "caption_extension": ("STRING", {"default": ".txt", "tooltip": "Caption file extension (kohya's own "
                                         "default is .caption)."}),
        "background": ("STRING", {"default": "#ffffff", "tooltip": "Colour transparent pixels are composited on "
                                  "(#rrggbb)."}),
        "validation_split": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.5, "step": 0.01, "tooltip":
                                       "Fraction of each folder held out for the validation loss (kohya "
                                       "validation_split); 0 = none."}),
    }


def _caption_inputs() -> dict:
    t = CAPTION_TOOLTIPS
    return {
        "caption_prefix": ("STRING", {"default": "", "tooltip": t["caption_prefix"]}),
        "caption_suffix": ("STRING", {"default": "", "tooltip": t["caption_suffix"]}),
        "shuffle_caption": ("BOOLEAN", {"default": False, "tooltip": t["shuffle_caption"]}),
        "keep_tokens": ("INT", {"default": 0, "min": 0, "max": 64, "tooltip": t["keep_tokens"]}),
        "keep_tokens_separator": ("STRING", {"default": "", "tooltip": t["keep_tokens_separator"]}),
        "caption_dropout_rate": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                           "tooltip": t["caption_dropout_rate"]}),
        "caption_dropout_every_n_epochs": ("INT", {"default": 0, "min": 0, "max": 1000,
                                                   "tooltip": t["caption_dropout_every_n_epochs"]}),
        "caption_tag_dropout_rate": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                               "tooltip": t["caption_tag_dropout_rate"]}),
    }


@policy.guarded
class ConceptLabLoraDataset:
    """Scan a kohya training folder from ComfyUI's input directory."""

    PATH_INPUTS = {"folder": "subfolders"}

    @staticmethod
    def check_inputs(values: dict) -> None:
        """Widget checks beyond min/max (see :func:`.policy.input_problems`): the caption extension."""
        from ..training.lora.dataset_options import check_caption_extension

        if "caption_extension" in values:
            check_caption_extension(values["caption_extension"])

    DESCRIPTION = ("Reads a kohya-style training folder (<repeats>_<name> subfolders of images with .txt captions) "
                   "from ComfyUI's input directory, assigns aspect-ratio buckets and reports images, repeats, "
                   "steps per epoch, tag frequency, caption previews, buckets and a caption audit.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (DATASET_TYPE, "STRING", "STRING")
    RETURN_NAMES = ("dataset", "summary", "caption_audit")
    OUTPUT_TOOLTIPS = ("The scanned dataset (images, captions, buckets, caption settings) for the train node.",
                       "Images, repeats, steps per epoch at batch size 1, buckets, top tags, caption previews and "
                       "kohya warnings.",
                       "Caption audit (metrics/captions) as text: contradictions between captions and images.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {**_dataset_inputs(), **_caption_inputs()}}

    def load(self, folder, **kw):
        """Scan a kohya dataset folder inside ComfyUI's input directory.

        ``kw``: dataset and caption options (see INPUT_TYPES; kohya names). Returns ``(DATASET, summary STRING,
        caption-audit JSON STRING)``. Raises ``PathOutsideError`` for a path leaving the input folder and
        ``DatasetError`` (a ``ValueError``) for an empty folder, corrupt images or folders without the ``N_`` prefix.
        """
        from . import comfy_io

        root = comfy_io.resolve_input(folder)
        opts = DatasetOptions.from_mapping(kw)
        caps = CaptionConfig.from_mapping(kw)
        policy.check_folder(root, comfy_io.input_dir(), "dataset file")  # no symlink out, before any read
        ds = KohyaDataset.scan(root, opts, caps, progress=lambda d, t: comfy_io.check_interrupt())
        return (ds, ds.summary_text(1), _caption_audit(root))


def _caption_audit(root) -> str:
    from . import comfy_io

    try:
        from ..metrics.captions import audit_folder
    except ImportError:
        return "caption audit unavailable (metrics.captions not installed)"
    try:
        rep = audit_folder(root, progress=lambda d, t: comfy_io.check_interrupt())
    except limits.LimitError as exc:
        return f"caption audit refused: {exc}"
    except Exception as exc:  # noqa: BLE001 - the audit is advisory; training does not depend on it
        return f"caption audit failed: {exc}"
    summary = rep.get("summary", rep) if isinstance(rep, dict) else rep
    return json.dumps(summary, indent=1, default=str)[:20000]


def _np_to_image(arr: np.ndarray | None) -> torch.Tensor:
    from . import comfy_io

    if arr is None:
        arr = np.full((64, 64, 3), 255, np.uint8)
    return comfy_io.numpy_to_image([arr])


@policy.guarded
class ConceptLabTrainLora:
    """Train a kohya LoRA on the connected model inside ComfyUI."""

    PATH_INPUTS = {"output_name": "plain"}

    @staticmethod
    def check_inputs(values: dict) -> None:
        """Widget checks beyond min/max: no file names and no out-of-bounds settings inside ``kohya_toml``."""
        from ..training.lora.dataset_options import check_caption_extension

        _check_prompt_lines("sample_prompts", values.get("sample_prompts"))
        text = values.get("kohya_toml")
        if isinstance(text, str) and text.strip():
            policy.refuse_toml_path_keys(limits.load_toml(text, "kohya_toml"), "kohya_toml",
                                         input_keys=policy.INPUT_FOLDER_KEYS)
            flat = parse_kohya_toml(text)
            limits.check_settings(flat, "kohya_toml")
            if "caption_extension" in flat:
                check_caption_extension(flat["caption_extension"])

    DESCRIPTION = ("Trains a LoRA with kohya sd-scripts semantics (captions, buckets, schedule, metadata) on the "
                   "connected MODEL/CLIP/VAE. Saves name-000001.safetensors ... and name.safetensors to "
                   "output/loras/ every save_every_n_epochs, samples and scores every epoch, copies the best "
                   "epoch to name-best.safetensors, and can resume. Cancel stops within a step and keeps the last "
                   "finished checkpoint. The inputs are never modified.")
    CATEGORY = CATEGORY
    FUNCTION = "train"
    RETURN_TYPES = ("MODEL", "CLIP", "STRING", "IMAGE", "IMAGE", "IMAGE", "LORA_MODEL", "LOSS_MAP")
    RETURN_NAMES = ("model", "clip", "lora_name", "loss_curve", "epoch_table", "samples", "lora", "loss")
    OUTPUT_TOOLTIPS = ("The input model with the trained LoRA applied (the file chosen by 'apply').",
                       "The CLIP with the LoRA's text-encoder part applied (unchanged when the text encoder was "
                       "not trained).",
                       "File name of the applied LoRA inside output/loras/ (LoraLoader lists it after a refresh).",
                       "Loss per step, moving average and per-epoch train/validation loss; best epoch marked.",
                       "Per-epoch table: losses and palette metrics; the best epoch highlighted.",
                       "Sample images per epoch (rows) and prompt (columns).",
                       "The applied LoRA as ComfyUI's LORA_MODEL (UNet part) for core's LoraModelLoader / SaveLoRA, "
                       "or this node's lora_model input to continue training.",
                       "Loss per step as ComfyUI's LOSS_MAP, for core's Plot Loss Graph node.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The base model to train on (cloned; never changed)."}),
                "clip": ("CLIP", {"tooltip": "The text encoder (captions are encoded with it; trained only if "
                                             "train_text_encoder is on)."}),
                "vae": ("VAE", {"tooltip": "The VAE used to cache latents and decode samples."}),
                "dataset": (DATASET_TYPE, {"tooltip": "From the LoRA Dataset node."}),
                "output_name": ("STRING", {"default": "my_lora", "tooltip": "Base file name (kohya output_name): "
                                           "name-000003.safetensors per saved epoch, name.safetensors last."}),
                "max_train_epochs": ("INT", {"default": 10, "min": 1, "max": 10000,
                                             "tooltip": "Epochs to train (kohya max_train_epochs)."}),
                "train_batch_size": ("INT", {"default": 1, "min": 1, "max": 256,
                                             "tooltip": "Images per step (kohya train_batch_size)."}),
                "gradient_accumulation_steps": ("INT", {"default": 1, "min": 1, "max": 1024, "tooltip":
                                                        "Batches summed per optimizer step."}),
                "learning_rate": ("FLOAT", {"default": 1e-4, "min": 0.0, "max": 10.0, "step": 1e-6,
                                            "round": 1e-7, "tooltip": "Learning rate (Prodigy: use 1.0)."}),
                "network_dim": ("INT", {"default": 16, "min": 1, "max": 1024, "tooltip": "LoRA rank (network_dim)."}),
                "network_alpha": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 1024.0, "step": 0.5, "tooltip":
                                            "LoRA alpha; the update is scaled by alpha / dim (0 = dim)."}),
                "optimizer_type": (list(OPTIMIZERS), {"default": "AdamW", "tooltip": "AdamW8bit needs "
                                   "bitsandbytes; Prodigy needs prodigyopt. A clear error tells when one cannot "
                                   "run here."}),
                "lr_scheduler": (list(SCHEDULERS), {"default": "cosine", "tooltip": "Learning-rate schedule "
                                 "(diffusers get_scheduler)."}),
                "lr_warmup_steps": ("INT", {"default": 0, "min": 0, "max": 100000, "tooltip": "Warm-up steps."}),
                "mixed_precision": (["bf16", "fp16", "no"], {"default": "bf16", "tooltip": "Autocast dtype on a "
                                    "GPU that supports it; CPU always trains in fp32. LoRA weights stay fp32."}),
                "save_every_n_epochs": ("INT", {"default": 1, "min": 0, "max": 1000, "tooltip": "Write "
                                        "name-00000N.safetensors every N epochs (0 = only the last)."}),
                "save_precision": (["fp16", "bf16", "fp32"], {"default": "fp16", "tooltip": "Dtype of saved "
                                   "LoRA files."}),
                "seed": ("INT", {"default": 42, "min": 0, "max": 2 ** 31 - 1, "tooltip": "Seed: the same seed "
                                 "and settings give the same LoRA."}),
                "train_text_encoder": ("BOOLEAN", {"default": False, "tooltip": "Also train LoRA on the text "
                                       "encoder (kohya trains it unless network_train_unet_only)."}),
                "sample_prompts": ("STRING", {"multiline": True, "default": "", "tooltip": "One prompt per line, "
                                   "rendered after every epoch with fixed seeds (seed + line number)."}),
                "best_metric": (list(BEST_METRICS), {"default": "auto", "tooltip": "How to pick the best epoch: "
                                "val_loss (needs validation_split), effective_colors_vs_dataset (sample colour "
                                "count closest to the training images' median), in_palette_frac (needs a "
                                "palette), train_loss, or none. auto = val_loss if there is a validation split, "
                                "else colours if there are prompts, else train loss."}),
                "early_stopping_patience": ("INT", {"default": 0, "min": 0, "max": 1000, "tooltip": "Stop after "
                                            "this many epochs without improvement of best_metric (0 = off)."}),
                "resume": ("BOOLEAN", {"default": False, "tooltip": "Continue from the newest saved state of "
                           "this output_name (exactly as if never interrupted)."}),
                "apply": (["best", "last"], {"default": "best", "tooltip": "Which file the returned MODEL uses."}),
            },
            "optional": {
                "kohya_toml": ("STRING", {"multiline": True, "default": "", "tooltip": "A kohya sd-scripts TOML "
                               "config; sections are flattened and its keys override the widgets (including "
                               "dataset and caption keys such as keep_tokens, resolution)."}),
                "palette": ("STRING", {"default": "", "tooltip": "Target palette as #hex list for in-palette "
                            "metrics on samples (optional)."}),
                "sample_steps": ("INT", {"default": 20, "min": 1, "max": 200, "tooltip": "Sampler steps."}),
                "sample_cfg": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 30.0, "step": 0.5,
                                         "tooltip": "Sample guidance scale. Flux: the true CFG scale "
                                         "(kohya --l; 1 = off, no negative pass), while the distilled guidance is "
                                         "3.5 as FluxGuidance sets it (a prompt line's --g changes it); at the "
                                         "default 7.0 Flux samples use CFG 1, kohya's Flux default."}),
                "min_snr_gamma": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 20.0, "step": 0.5, "tooltip":
                                            "Min-SNR-γ loss weighting (Hang et al. 2023), 5 is common; 0 = off."}),
                "noise_offset": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                           "tooltip": "kohya noise_offset; 0 = off."}),
                "conv_dim": ("INT", {"default": 0, "min": 0, "max": 512, "tooltip": "LoCon rank for the 3x3 "
                             "conv layers (0 = plain LoRA)."}),
                "conv_alpha": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 512.0, "step": 0.5,
                                         "tooltip": "LoCon alpha."}),
                "gradient_checkpointing": ("BOOLEAN", {"default": False, "tooltip": "Trade speed for memory "
                                           "where the model supports it."}),
                "lora_model": ("LORA_MODEL", {"tooltip": "Continue from a LORA_MODEL (ComfyUI's Train LoRA node "
                               "or this node's lora output): its modules start where it left off (same ΔW); its "
                               "rank must equal network_dim (conv_dim for conv layers)."}),
            },
        }

    def train(self, model, clip, vae, dataset, output_name, max_train_epochs, train_batch_size,
              gradient_accumulation_steps, learning_rate, network_dim, network_alpha, optimizer_type, lr_scheduler,
              lr_warmup_steps, mixed_precision, save_every_n_epochs, save_precision, seed, train_text_encoder,
              sample_prompts, best_metric, early_stopping_patience, resume, apply, kohya_toml="", palette="",
              sample_steps=20, sample_cfg=7.0, min_snr_gamma=0.0, noise_offset=0.0, conv_dim=0, conv_alpha=1.0,
              gradient_checkpointing=False, lora_model=None):
        """Train a kohya LoRA on ``model``/``clip`` (cloned, never mutated) and save it to ``output/loras``.

        Runs under ``torch.inference_mode(False)`` with ComfyUI's progress bar (a cancel point every step); a cancel keeps
        the last finished epoch file. Widgets are kohya settings; ``kohya_toml`` overrides them (flattened keys).
        Returns ``(MODEL, CLIP with the best/last epoch applied, lora file name, loss curve IMAGE, epoch table IMAGE,
        sample grid IMAGE, LORA_MODEL, LOSS_MAP)`` (the last two as ComfyUI's core training nodes define them, see
        :mod:`.interop`), IMAGEs ``[1, H, W, 3]`` float 0..1. ``lora_model`` continues from a LORA_MODEL.
        Raises ``ValueError`` for a non-DATASET input,
        ``ValueError`` for invalid settings (e.g. AdamW8bit without CUDA/bitsandbytes) and a clear error naming the last
        good checkpoint on a NaN/Inf loss.
        """
        from . import comfy_host, comfy_io

        if not isinstance(dataset, KohyaDataset):
            raise ValueError("dataset must come from the LoRA Dataset node")
        values = dict(output_name=output_name, max_train_epochs=max_train_epochs, train_batch_size=train_batch_size,
                      gradient_accumulation_steps=gradient_accumulation_steps, learning_rate=learning_rate,
                      network_dim=network_dim, network_alpha=network_alpha, optimizer_type=optimizer_type,
                      lr_scheduler=lr_scheduler, lr_warmup_steps=lr_warmup_steps, mixed_precision=mixed_precision,
                      save_every_n_epochs=save_every_n_epochs or None, save_precision=save_precision, seed=seed,
                      network_train_unet_only=not train_text_encoder, sample_prompts=sample_prompts,
                      best_metric=best_metric, early_stopping_patience=early_stopping_patience,
                      resume="auto" if resume else None, palette=palette or None, sample_steps=sample_steps,
                      sample_cfg=sample_cfg, min_snr_gamma=min_snr_gamma or None, noise_offset=noise_offset or None,
                      conv_dim=conv_dim or None, conv_alpha=conv_alpha if conv_dim else None,
                      gradient_checkpointing=gradient_checkpointing)
        toml = {}
        if kohya_toml and kohya_toml.strip():  # bounded parse, then no file names, then kohya's flattening
            policy.refuse_toml_path_keys(limits.load_toml(kohya_toml, "kohya_toml"), "kohya_toml",
                                         input_keys=policy.INPUT_FOLDER_KEYS)
            toml = parse_kohya_toml(kohya_toml)
        limits.check_settings({**values, **toml}, "kohya_toml" if toml else "settings")
        ds = dataset
        if toml:
            toml = _check_toml_keys(toml)
            values.update(toml)
            if _uses_dataset_config(toml):
                # [[datasets]] / dataset_config / reg_data_dir: every folder must lie inside ComfyUI's input folder
                import os

                rel_root = os.path.relpath(dataset.root, comfy_io.input_dir())
                ds, batch = _dataset_from_settings({**values, "train_data_dir": rel_root}, seed=int(values["seed"]),
                                                   resolve=comfy_io.resolve_input)
                if batch is not None:
                    values["train_batch_size"] = batch
            else:
                merged = {**dataset.options.to_dict(), **dataset.captions.to_dict(), **toml}
                _, dopts, caps, _ = configs_from_mapping({**values, **merged})
                if dopts.to_dict() != dataset.options.to_dict() or caps.to_dict() != dataset.captions.to_dict():
                    ds = KohyaDataset.scan(dataset.root, dopts, caps, seed=int(values["seed"]))
        name = str(values["output_name"])
        if not re.fullmatch(r"[\w.\- ]+", name):
            raise ValueError(f"output_name {name!r} may only contain letters, digits, space, '.', '-' and '_'")
        lora_dir = comfy_io.output_file("loras", f"{name}.safetensors").parent
        name, state_dir = policy.reserve_run_name(lora_dir, comfy_io.output_dir() / "conceptlab_training", name,
                                                  resume=bool(values.get("resume")))
        values["output_name"], values["output_dir"], values["state_dir"] = name, str(lora_dir), str(state_dir)
        cfg, _, _, _ = configs_from_mapping(values)
        _check_memory(ds, cfg)

        host = None
        trainer = None
        with torch.inference_mode(False):
            try:
                host = comfy_host.ComfyHost(model, clip, vae)
                trainer = LoraTrainer(host, ds, cfg)
                _check_network_size(host, cfg, trainer)
                _, max_steps, _ = trainer.schedule()
                bar = comfy_io.Progress(max_steps)

                def on_step(step, total, info):
                    bar.set(step)

                def on_epoch(record, preview):
                    if preview is not None:
                        from PIL import Image

                        bar.update(0, preview=Image.fromarray(preview))

                trainer.progress, trainer.on_epoch = on_step, on_epoch
                if lora_model is not None:
                    from .interop import continue_from_lora_model

                    trainer.init_network = continue_from_lora_model(model, lora_model)
                trainer.encode_latents_progress = lambda d, t: comfy_io.check_interrupt()
                res = trainer.run()
            finally:
                if host is not None:
                    host.close()
                ds.release_latents()
                del trainer
                gc.collect()
        chosen = res.best_path if apply == "best" and res.best_path else res.final_path
        if chosen is None:
            raise RuntimeError("training finished without writing a LoRA file")
        out_model, out_clip = _apply_lora(model, clip, chosen)
        rel = chosen.name
        from .interop import kohya_file_to_lora_model, loss_map

        return (out_model, out_clip, rel, _np_to_image(res.loss_curve), _np_to_image(res.table_image),
                _np_to_image(res.sample_grid), kohya_file_to_lora_model(model, chosen), loss_map(res.step_losses))


#: kohya keys the node takes from its own inputs instead of the TOML (each one is reported when present)
_NODE_OWNED = {"output_dir": "LoRA files go to ComfyUI's output/loras folder",
               "logging_dir": "training states go to output/conceptlab_training/<name>",
               "state_dir": "training states go to output/conceptlab_training/<name>",
               "pretrained_model_name_or_path": "the model comes from the MODEL/CLIP/VAE inputs",
               "v2": "the architecture comes from the MODEL input",
               "train_data_dir": "the training folder comes from the DATASET input"}


#: why the node refuses kohya's blocks_to_swap (the CLI honours it on the diffusers Flux host)
_BLOCK_SWAP_REFUSED = (
    "blocks_to_swap is not supported by the Train LoRA node: inside ComfyUI the MODEL's placement belongs to "
    "ComfyUI's model management, whose own partial loading (lowvram: load_models_gpu with a memory budget, weights "
    "cast to the GPU layer by layer in comfy.ops.cast_bias_weight) chooses layers by free VRAM rather than kohya's "
    "last-N-blocks schedule, and the node loads the model fully (as ComfyUI's TrainLoraNode does) because a "
    "streamed layer's cast weight is kept for backward anyway unless every block is checkpointed. Use "
    "gradient_checkpointing with an fp8 base (UNETLoader weight_dtype fp8_e4m3fn), or train with "
    "`conceptlab train` (blocks_to_swap works there on Flux).")


def _check_toml_keys(toml: dict) -> dict:
    """Report every TOML key by name that is not honoured as written (kohya_args tables; node-owned keys);
    returns the keys to apply. Raises ``KohyaSettingError`` (a ``ValueError``) for refused settings."""
    import logging

    from ..training.lora.kohya_args import check_settings, own_setting_names

    from ..training.lora.kohya_args import KohyaSettingError

    log = logging.getLogger(__name__)
    if toml.get("blocks_to_swap"):
        raise KohyaSettingError(_BLOCK_SWAP_REFUSED)
    own = own_setting_names() | set(_NODE_OWNED) | {"datasets", "dataset_config", "reg_data_dir"}
    for w in check_settings(toml, own_keys=own):
        log.warning("Train LoRA (kohya_toml): %s", w)
    out = {}
    for k, v in toml.items():
        if k in _NODE_OWNED:
            log.warning("Train LoRA (kohya_toml): %s is not used here: %s", k, _NODE_OWNED[k])
        else:
            out[k] = v
    return out


def _uses_dataset_config(values) -> bool:
    from ..training.lora.dataset_config import uses_dataset_config

    return uses_dataset_config(values)


def _dataset_from_settings(values, **kw):
    from ..training.lora.dataset_config import dataset_from_settings

    return dataset_from_settings(values, **kw)


def _check_prompt_lines(name: str, text) -> None:
    """Refuse more than :data:`~conceptlab.formats.limits.MAX_SAMPLE_PROMPTS` prompt lines (each is sampled)."""
    if isinstance(text, str):
        limits.check_count(name, sum(1 for ln in text.splitlines() if ln.strip()), limits.MAX_SAMPLE_PROMPTS)


def _check_memory(ds: KohyaDataset, cfg) -> None:
    """Refuse a step larger than :data:`~conceptlab.formats.limits.MAX_BATCH_PIXELS` before anything is allocated."""
    areas = [e.bucket_reso for e in ds.entries + ds.val_entries if getattr(e, "bucket_reso", None)]
    if areas:
        w, h = max(areas, key=lambda r: r[0] * r[1])
        limits.check_batch_pixels(int(cfg.train_batch_size), int(w), int(h))


def _check_network_size(host, cfg, trainer) -> int:
    """Count the LoRA parameters kohya's module selection gives (nothing allocated) and refuse above
    :data:`~conceptlab.formats.limits.MAX_NETWORK_PARAMS`; returns the count."""
    from ..training.lora.network import kohya_targets

    targets = kohya_targets(host, network_dim=cfg.network_dim, network_alpha=cfg.network_alpha,
                            conv_dim=cfg.conv_dim, conv_alpha=cfg.conv_alpha, train_unet=trainer.train_unet,
                            train_text_encoder=trainer.train_te)
    mods = {c: host.modules(c) for c in {t.component for t in targets}}
    n = 0
    for t in targets:
        w = mods[t.component][t.path].weight
        n += int(t.dim) * (int(w.shape[0]) + int(w[0].numel()) if w.dim() > 1 else int(w.shape[0]) * 2)
    limits.check_network_params(n)
    return n


def _apply_lora(model, clip, path):
    """ComfyUI's own LoRA loader (the LoraLoader path) on clones of ``model``/``clip``."""
    import comfy.sd
    import comfy.utils

    sd = comfy.utils.load_torch_file(str(path), safe_load=True)
    return comfy.sd.load_lora_for_models(model, clip, sd, 1.0, 1.0)


@policy.guarded
class ConceptLabEpochCompare:
    """Render the same prompts and seeds with each saved epoch file; grid + metrics table."""

    PATH_INPUTS = {"lora_files": "lines"}

    @staticmethod
    def check_inputs(values: dict) -> None:
        """Widget checks beyond min/max: the number of prompts per file."""
        _check_prompt_lines("prompts", values.get("prompts"))

    DESCRIPTION = ("Given LoRA files from the loras folder (one per line, wildcards allowed, e.g. my_lora-*), "
                   "renders the same prompts with the same seeds per file and builds a labelled grid (rows = "
                   "files, columns = prompts) and a table of palette metrics per file. Works for LoRAs trained "
                   "elsewhere too (kohya format).")
    CATEGORY = CATEGORY
    FUNCTION = "compare"
    RETURN_TYPES = ("IMAGE", "IMAGE", "STRING")
    RETURN_NAMES = ("grid", "table", "metrics_json")
    OUTPUT_TOOLTIPS = ("Samples: one row per LoRA file, one column per prompt.",
                       "Palette metrics per file (means over prompts).",
                       "The metrics as JSON: [{file, epoch, metrics...}].")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "Base model the LoRAs were trained on."}),
            "clip": ("CLIP", {"tooltip": "Text encoder for the prompts."}),
            "vae": ("VAE", {"tooltip": "VAE to decode samples."}),
            "lora_files": ("STRING", {"multiline": True, "default": "my_lora-*.safetensors\nmy_lora.safetensors",
                                      "tooltip": "LoRA names from the loras folder, one per line; * and ? "
                                                 "wildcards are allowed. Sorted by epoch (ss_epoch)."}),
            "prompts": ("STRING", {"multiline": True, "default": "", "tooltip": "One prompt per line."}),
            "negative": ("STRING", {"default": "", "tooltip": "Negative prompt for every sample."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31 - 1, "tooltip": "Prompt i uses seed + i "
                             "for every file."}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 200, "tooltip": "Sampler steps."}),
            "cfg": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 30.0, "step": 0.5, "tooltip": "Guidance scale. "
                              "Flux: the true CFG (use 1.0, no negative pass); the distilled guidance is 3.5 as "
                              "FluxGuidance sets it."}),
            "width": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8, "tooltip": "Sample width."}),
            "height": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8, "tooltip": "Sample height."}),
            "strength": ("FLOAT", {"default": 1.0, "min": -4.0, "max": 4.0, "step": 0.05,
                                   "tooltip": "LoRA strength for every file."}),
            "palette": ("STRING", {"default": "", "tooltip": "Target palette (#hex list) for in-palette metrics."}),
        }}

    def compare(self, model, clip, vae, lora_files, prompts, negative, seed, steps, cfg, width, height, strength,
                palette):
        """Render the same prompts and seeds with each LoRA file (names or wildcards from ComfyUI's loras list).

        ``strength``: LoRA strength; ``palette``: optional target hexes for the palette metrics. Returns ``(labelled grid
        IMAGE [1, H, W, 3], metrics table IMAGE, metrics JSON STRING)``. Raises ``ValueError`` for no prompts or no
        matching files and ``FileNotFoundError`` for a name ComfyUI does not list.
        """
        from ..formats.safetensors_io import load_state_dict, read_metadata
        from ..training.lora.network import LoRANetwork
        from . import comfy_host, comfy_io

        prompt_list = [p.strip() for p in prompts.splitlines() if p.strip()]
        if not prompt_list:
            raise ValueError("give at least one prompt")
        available = comfy_io.model_list("loras")
        names: list[str] = []
        for pat in [p.strip() for p in lora_files.splitlines() if p.strip()]:
            hits = [n for n in available if fnmatch.fnmatch(n, pat)] if any(c in pat for c in "*?[") else [pat]
            for h in hits:
                if h not in names:
                    names.append(h)
        if not names:
            raise ValueError("no LoRA file matches; names are relative to the loras folder")
        files = []
        for n in names:
            path = comfy_io.model_file("loras", n)
            md = read_metadata(path)
            ep = md.get("ss_epoch")
            files.append((int(ep) if ep and ep.isdigit() else 10 ** 9, n, path))
        files.sort()
        pal = [t.strip() for t in palette.replace("\n", ",").split(",") if t.strip()]
        rows, labels, records = [], [], []
        bar = comfy_io.Progress(len(files) * len(prompt_list))
        with torch.inference_mode(False):
            host = comfy_host.ComfyHost(model, clip, vae)
            try:
                for ep, n, path in files:
                    net, unmatched = LoRANetwork.from_kohya_state_dict(host, load_state_dict(path))
                    net.set_multiplier(strength)
                    net.install(host)
                    try:
                        imgs = []
                        for i, p in enumerate(prompt_list):
                            img = host.sample([p], negative, width=width, height=height, steps=steps, cfg=cfg,
                                              seed=seed + i)
                            imgs.append((img[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8))
                            bar.update(1)
                    finally:
                        net.remove()
                    mets = [palette_metrics(im, pal) for im in imgs]
                    rec = {"file": n, "epoch": None if ep == 10 ** 9 else ep, "unmatched_keys": len(unmatched)}
                    for k in ("effective_colors", "in_palette_frac", "unique_colors", "native_unique_colors"):
                        vals = [m[k] for m in mets if k in m]
                        if vals:
                            rec[k] = float(np.mean(vals))
                    records.append(rec)
                    rows.append(imgs)
                    labels.append(n.rsplit("/", 1)[-1].removesuffix(".safetensors"))
            finally:
                host.close()
        grid = labelled_grid(rows, labels, [p[:18] for p in prompt_list])
        table = render_epoch_table(records, [c for c in ("epoch", "effective_colors", "in_palette_frac",
                                                          "unique_colors") if any(c in r for r in records)])
        return (_np_to_image(grid), _np_to_image(table), json.dumps(records, indent=1))


NODE_CLASS_MAPPINGS = {
    "ConceptLabLoraDataset": ConceptLabLoraDataset,
    "ConceptLabTrainLora": ConceptLabTrainLora,
    "ConceptLabEpochCompare": ConceptLabEpochCompare,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ConceptLabLoraDataset": "LoRA Dataset (kohya folder)",
    "ConceptLabTrainLora": "Train LoRA (kohya)",
    "ConceptLabEpochCompare": "Compare LoRA Epochs",
}
