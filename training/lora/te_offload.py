"""Text encoders off the accelerator once their outputs are cached (kohya ``cache_text_encoder_outputs``).

kohya ``flux_train_network.py`` ``cache_text_encoder_outputs_if_needed`` (lines 226-282 at 48d368f) encodes every
caption and every sample prompt up front, then moves T5-XXL (and CLIP-L unless it is trained) "back to cpu" and
empties the CUDA cache, so the 4.9 B-parameter T5-XXL (9.8 GB in bf16) does not sit in VRAM during training.
:func:`offload_after_caching` does the same for the LoRA trainer on a host that has ``offload_text_encoders``
(the diffusers Flux host): when the text encoders are frozen and every caption is static (no shuffle, tag dropout,
caption dropout or token warm-up — kohya refuses caching for those too), it parks the DiT on :data:`PARK_DEVICE`
(kohya lines 231-237), fills the trainer's per-caption cache for the whole dataset, caches the sample prompts in
the host, brings the DiT back and moves the encoders to :data:`OFFLOAD_DEVICE`, so the device never holds the DiT
and T5-XXL at once.
Inside ComfyUI the CLIP is a separate ModelPatcher that ComfyUI's model management unloads when the diffusion
model needs the memory, so no host method is needed there.
"""

from __future__ import annotations

import contextlib
import logging
import random

logger = logging.getLogger(__name__)

#: where the text encoders go after caching (tests point it at a simulated device)
OFFLOAD_DEVICE = "cpu"
#: where the DiT waits while the text encoders run (kohya: the CPU, unless --lowram)
PARK_DEVICE = "cpu"


def offload_after_caching(trainer, prompts=()) -> bool:
    """Cache the text-encoder outputs of every caption of ``trainer.dataset`` (training and validation entries) in
    ``trainer._encode``'s cache and those of ``prompts`` (sample prompts and their negatives) in the host, then
    move the host's text encoders to :data:`OFFLOAD_DEVICE`. Returns True when it did; False (nothing changed)
    when the host cannot offload, is already there, trains a text encoder, or a caption changes from step to
    step (said in the log)."""
    from .captions import process_caption

    host, ds, cfg = trainer.host, trainer.dataset, trainer.cfg
    if not hasattr(host, "offload_text_encoders") or str(host.device) == str(OFFLOAD_DEVICE):
        return False
    if trainer.train_te and not getattr(trainer, "_te_frozen", False):
        return False
    if any(c != "unet" for c, _, _ in host.installed_deltas()):
        logger.info("text encoders stay on %s: text-encoder LoRA modules are installed (text_encoder_lr = 0 "
                    "freezes them, but their weights stay with the encoders)", host.device)
        return False
    entries = [*ds.entries, *getattr(ds, "val_entries", [])]
    confs = [getattr(e, "captions", None) or ds.captions for e in entries]
    if not all(c.is_static for c in confs):
        logger.info("text encoders stay on %s: captions change between steps (shuffle / dropout / warm-up), so "
                    "their outputs cannot all be cached up front", host.device)
        return False
    rng = random.Random(0)  # static captions draw nothing
    caps = list(dict.fromkeys(process_caption(e.caption, c, rng) for e, c in zip(entries, confs)))
    if len(caps) > 4096:  # the trainer's caption cache keeps at most 4096 (LoraTrainer._encode)
        logger.info("text encoders stay on %s: %d distinct captions exceed the 4096-entry cache", host.device,
                    len(caps))
        return False
    specs = {sp.prompt: sp for sp in getattr(cfg, "prompt_specs", ())}
    texts = []
    for p in prompts or ():
        texts.append(p)
        sp = specs.get(p)
        neg = sp.negative_prompt if sp is not None and sp.negative_prompt is not None else cfg.sample_negative
        texts.append(neg or "")
    bs = max(1, int(cfg.train_batch_size))
    park = host.denoiser_parked(PARK_DEVICE) if hasattr(host, "denoiser_parked") else contextlib.nullcontext()
    with park:  # kohya moves the DiT to the CPU while the text encoders run; it comes back after they left
        for i in range(0, len(caps), bs):
            trainer._encode(caps[i:i + bs])
        moved = host.offload_text_encoders(texts, device=OFFLOAD_DEVICE)  # sample prompts encoded first
    logger.info("cached %d captions and %d sample prompts; text encoders moved to %s (%.2f GB off %s)",
                len(caps), len(set(texts)), OFFLOAD_DEVICE, moved / 1e9, host.device)
    return True
