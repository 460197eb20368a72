"""Train the tiny DawnLike text-to-image model shipped in ``sample_data/tiny_dawnlike`` (CPU, minutes).

A small Stable-Diffusion-1-shaped latent diffusion model, trained from scratch on the DawnLike sprites
(``../shared/data/dawnlike``, 5,349 16×16 sprites; CC-BY 4.0, DawnBringer / DragonDePlatino, names by Tommy
Ettinger), in the diffusers folder layout so every loader of the pack reads it:

* ``tokenizer/`` — a CLIP BPE tokenizer (``vocab.json`` + ``merges.txt``, CLIP's byte alphabet and ``</w>``
  end-of-word suffix) whose merges are learned from the training captions with Hugging Face ``tokenizers``
  (a real CLIP vocabulary has 49,408 entries: its embedding alone would be larger than the whole model). It
  loads with ``transformers.CLIPTokenizer`` offline.
* ``text_encoder/`` — a small ``CLIPTextModel`` (trained jointly with the UNet, as LDM trained its text encoder).
* ``vae/`` — a small ``AutoencoderKL`` with one 2× downsampling: a 16×16 image (the sprite on a flat background)
  ↔ a ``[12, 8, 8]`` latent (12 channels where SD has 4: a 2×2×3 pixel patch fits exactly, so flat pixel-art
  colours can come back within ΔE00 5). Half of its training images are recoloured to random colours
  (:func:`recolour_random`) so that it keeps colours DawnLike never uses (a Game Boy ramp, a user's palette);
  trained first (2,000 steps, cosine learning rate), then frozen; its decoder is fine-tuned on the frozen
  encoder's latents at the end (``--decoder-only`` does that beside a running UNet training).
* ``unet/`` — ``UNet2DConditionModel`` with SD1's block types (CrossAttnDownBlock2D ×2 + DownBlock2D, mirrored
  up blocks, cross-attention mid block) at small widths.
* ``scheduler/`` — SD1's DDPM "scaled_linear" schedule (β 0.00085 → 0.012, 1000 steps, ε-prediction).

Captions are ``"pixel art, <group>, <name>"`` (``"pixel art, undead, skeleton king"``); 10 % are dropped to the
empty prompt so classifier-free guidance works. The UNet is trained with the ε-MSE objective of Ho et al. 2020
(Eq. 14) and sampled from an exponential moving average of its weights (decay 0.999).

Deterministic with ``--seed`` on a fixed number of threads (``--threads``; CPU float sums depend on it).
Checkpoints (``<out>/train_state.pt``, resumable with ``--resume``) are written every ``--save-every`` steps and
on Ctrl-C; the final model goes to ``<out>/model`` (its samples grid: ``benchmarks/effect.py --model <out>/model
--only samples``).

Usage (the shipped model: 2 CPU cores, shared machine; see sample_data/tiny_dawnlike/README.md for the exact
command and figures)::

    python tools/train_tiny_model.py --out /tmp/tiny --seed 0 --steps 1400
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
#: the shared DawnLike data beside the repo (``../shared/data/dawnlike``); ``--data`` or CONCEPTLAB_SHARED_DATA
#: (the folder holding ``dawnlike/``) point elsewhere
DEFAULT_DATA = (Path(os.environ["CONCEPTLAB_SHARED_DATA"]) if os.environ.get("CONCEPTLAB_SHARED_DATA")
                else REPO.parent / "shared" / "data") / "dawnlike"

#: flat background the sprites are composited on (DawnBringer-16 "dark blue", #30346d)
BACKGROUND = (0x30, 0x34, 0x6D)
IMAGE_SIZE = 16          # pixels (the sprite itself)
LATENT_SIZE = 8          # one 2× downsampling in the VAE

TOKENIZER_MAX_LENGTH = 77

UNET_CONFIG = dict(
    sample_size=LATENT_SIZE, in_channels=8, out_channels=8, layers_per_block=1,
    block_out_channels=(64, 96, 96),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32,
)
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=8, layers_per_block=1,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(32, 64), norm_num_groups=16, sample_size=IMAGE_SIZE,
)
TEXT_CONFIG = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=TOKENIZER_MAX_LENGTH, hidden_act="quick_gelu", projection_dim=64)
SCHEDULER_CONFIG = {
    "_class_name": "DDPMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "clip_sample": False, "set_alpha_to_one": False,
    "steps_offset": 1, "timestep_spacing": "leading",
}


# ------------------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------------------
def sprite_groups(data_dir: Path) -> dict[str, str]:
    """``{sprite name: group}`` from ``image_names.tsv`` (a group header row, its name rows, a blank row).

    Group names are lower-cased with trailing digits and underscores removed (``"Aquatic0"`` → ``"aquatic"``,
    ``"Chest_Closed"`` → ``"chest closed"``).
    """
    out: dict[str, str] = {}
    group = None
    with open(data_dir / "image_names.tsv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t"))[1:]
    expect_header = True
    for row in rows:
        cells = [c.strip() for c in row if c.strip()]
        if not cells:
            expect_header = True
            continue
        # a header is the first row after a blank one *and* capitalised ("Aquatic0"); sprite names are lower
        # case, and some groups (walls, floors) split their names into blocks with blank rows in between
        if expect_header and len(cells) == 1 and cells[0][:1].isupper():
            group = re.sub(r"\d+$", "", cells[0]).replace("_", " ").strip().lower()
            expect_header = False
            continue
        expect_header = False
        for c in cells:
            out.setdefault(c, group)
    return out


def list_sprites(data_dir: Path = DEFAULT_DATA) -> list[tuple[Path, str, str]]:
    """``[(png path, name, group)]`` for every 16×16 sprite, sorted by file name (group ``""`` if unlisted)."""
    groups = sprite_groups(data_dir)
    out = []
    from PIL import Image

    for p in sorted((data_dir / "sprites").glob("*.png")):
        with Image.open(p) as im:
            if im.size != (16, 16):   # font.png (256×128) and pixel.png (1×1) are not sprites
                continue
        name = re.sub(r"_\d+$", "", p.stem)
        out.append((p, name, groups.get(name, "")))
    return out


def caption(name: str, group: str) -> str:
    """The training caption of a sprite: ``"pixel art, <group>, <name>"`` (``"pixel art, <name>"`` without group)."""
    return f"pixel art, {group}, {name}" if group else f"pixel art, {name}"


def load_sprite(path: Path, background=BACKGROUND, scale: int = IMAGE_SIZE // 16) -> np.ndarray:
    """A sprite as uint8 RGB ``[16·scale, 16·scale, 3]``: alpha-composited on ``background``, nearest-upscaled."""
    from PIL import Image

    im = Image.open(path).convert("RGBA")
    bg = Image.new("RGBA", im.size, tuple(background) + (255,))
    bg.alpha_composite(im)
    rgb = bg.convert("RGB")
    if scale != 1:
        rgb = rgb.resize((im.width * scale, im.height * scale), Image.NEAREST)
    return np.asarray(rgb, dtype=np.uint8)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` → float32 ``[N, 3, H, W]`` in ``[-1, 1]``."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


# ------------------------------------------------------------------------------------------------------------
# tokenizer
# ------------------------------------------------------------------------------------------------------------
def build_tokenizer(captions: list[str], out_dir: Path, vocab_size: int = 1024):
    """Learn a CLIP-format BPE tokenizer from ``captions`` and write it to ``out_dir``; return it loaded.

    The vocabulary is laid out as CLIP's (``openai/clip-vit-base-patch32`` ``vocab.json``): the 256 byte
    symbols of ``bytes_to_unicode``, the same with ``</w>``, one entry per merge in rank order, then
    ``<|startoftext|>`` and ``<|endoftext|>``. Merges are learned by ``tokenizers``' ``BpeTrainer`` on CLIP's
    pre-tokenization (lower-case, whitespace-split words, punctuation split off). Returns a
    ``transformers.CLIPTokenizer`` loaded from the written files (offline).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, normalizers
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = list(bytes_to_unicode().values())
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=byte_chars, end_of_word_suffix="</w>",
                                  show_progress=False, special_tokens=[])
    tok.train_from_iterator(captions, trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    vocab: dict[str, int] = {}
    for s in byte_chars + [c + "</w>" for c in byte_chars]:
        vocab.setdefault(s, len(vocab))
    kept = []
    for a, b in merges:
        if a in vocab and b in vocab and (a + b) not in vocab:
            vocab[a + b] = len(vocab)
            kept.append((a, b))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in kept) + "\n",
                                        encoding="utf-8")
    (out_dir / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>"}, indent=2))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": TOKENIZER_MAX_LENGTH,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "do_lower_case": True}, indent=2))
    return CLIPTokenizer.from_pretrained(out_dir, local_files_only=True)


# ------------------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------------------
def build_models(tokenizer, seed: int, latent_channels: int = 8):
    """Fresh VAE, UNet and text encoder; ``latent_channels`` sets the VAE latent and the UNet in/out channels
    (8 in the shipped model; 12 holds a 2×2×3 pixel patch exactly)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(**{**VAE_CONFIG, "latent_channels": latent_channels})
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**{**UNET_CONFIG, "in_channels": latent_channels, "out_channels": latent_channels})
    torch.manual_seed(seed + 2)
    cfg = CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **TEXT_CONFIG)
    te = CLIPTextModel(cfg)
    return vae, unet, te


def alphas_cumprod() -> torch.Tensor:
    c = SCHEDULER_CONFIG
    betas = torch.linspace(c["beta_start"] ** 0.5, c["beta_end"] ** 0.5, c["num_train_timesteps"],
                           dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


# ------------------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------------------
def recolour_random(x: torch.Tensor, frac: float, gen: torch.Generator) -> torch.Tensor:
    """Colour augmentation for the VAE: in a ``frac`` share of the images ``[B, 3, H, W]`` (``[-1, 1]``) every
    distinct colour is replaced by a uniformly random one (same layout, new palette), so the VAE learns to keep
    colours the sprites never use (a Game Boy ramp, a user's palette) instead of only DawnBringer-16's."""
    if frac <= 0:
        return x
    x = x.clone()
    for i in torch.nonzero(torch.rand(len(x), generator=gen) < frac).flatten().tolist():
        flat = x[i].reshape(3, -1).T
        cols, inv = torch.unique(flat, dim=0, return_inverse=True)
        new = torch.rand(len(cols), 3, generator=gen) * 2 - 1
        x[i] = new[inv].T.reshape(x[i].shape)
    return x


def train_vae(vae, pixels: torch.Tensor, steps: int, batch: int, lr: float, gen: torch.Generator, log,
              colour_augment: float = 0.0, cosine: bool = False) -> None:
    """Reconstruction (L1 + MSE) + KL·1e-6 (LDM's small KL weight), AdamW; ``pixels`` ``[N, 3, 16, 16]``;
    ``colour_augment``: share of each batch recoloured by :func:`recolour_random` (0.5 in the shipped model);
    ``cosine``: learning rate decays from ``lr`` to ``lr / 100`` on a half cosine (50 warm-up steps)."""
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    t0 = time.time()
    for step in range(steps):
        if cosine:
            f = min(1.0, (step + 1) / 50) * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * step / steps)))
            for g in opt.param_groups:
                g["lr"] = lr * f
        idx = torch.randint(0, len(pixels), (batch,), generator=gen)
        x = recolour_random(pixels[idx], colour_augment, gen)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        kl = post.kl().mean()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} loss {loss.item():.4f} kl {kl.item():.1f} ({time.time() - t0:.0f}s)")
    vae.eval().requires_grad_(False)


def round_trip_error(vae, pixels: torch.Tensor, colour_augment: float = 0.0, seed: int = 0) -> float:
    """Mean absolute error (0..255 units) of ``pixels`` ``[N, 3, H, W]`` (``[-1, 1]``) encoded (posterior mean)
    and decoded by ``vae``; with ``colour_augment`` = 1 every image is first recoloured by
    :func:`recolour_random` (seeded): how well the VAE keeps colours the sprites never use."""
    x = recolour_random(pixels, colour_augment, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        rec = torch.cat([vae.decode(vae.encode(x[i:i + 256]).latent_dist.mean).sample
                         for i in range(0, len(x), 256)])
    return (rec.clamp(-1, 1) - x).abs().mul(127.5).mean().item()


def finetune_decoder(vae, pixels: torch.Tensor, steps: int, batch: int, lr: float, gen: torch.Generator, log,
                     colour_augment: float = 0.0) -> float:
    """Fine-tune the VAE *decoder* on the frozen encoder's posterior means (as Stability's ft-MSE VAE did):
    the latents the UNet learned do not change, reconstructions get sharper. L1 + MSE, AdamW;
    ``colour_augment`` as in :func:`train_vae` (the recoloured images are encoded on the fly). Returns the mean
    absolute reconstruction error of ``pixels`` afterwards, in 0..255 units."""
    dec = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in dec:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(dec, lr=lr, weight_decay=0.0)
    vae.train()
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(pixels), (batch,), generator=gen)
        x = recolour_random(pixels[idx], colour_augment, gen)
        with torch.no_grad():
            mean = vae.encode(x).latent_dist.mean
        rec = vae.decode(mean).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"decoder step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    vae.eval().requires_grad_(False)
    return round_trip_error(vae, pixels)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="DawnLike folder (sprites/, image_names.tsv)")
    ap.add_argument("--out", type=Path, required=True, help="work folder (train_state.pt, model/, logs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vae-steps", type=int, default=2000)
    ap.add_argument("--vae-cosine", action=argparse.BooleanOptionalAction, default=True,
                    help="decay the VAE learning rate on a half cosine to 1/100 (default on)")
    ap.add_argument("--steps", type=int, default=1400, help="UNet + text-encoder steps")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--caption-dropout", type=float, default=0.1)
    ap.add_argument("--save-every", type=int, default=250)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--export-partial", action="store_true", help="export the model even when stopped early")
    ap.add_argument("--export-raw", action="store_true", help="export the raw weights instead of the EMA")
    ap.add_argument("--decoder-steps", type=int, default=600, help="VAE decoder fine-tuning steps (after the UNet)")
    ap.add_argument("--decoder-only", action="store_true",
                    help="only fine-tune the decoder of the VAE in <out>/train_state.pt (can run beside the UNet "
                         "training: the UNet never sees the decoder) and write <out>/vae_decoder.pt")
    ap.add_argument("--latent-channels", type=int, default=12,
                    help="VAE latent channels = UNet in/out channels (12: a 2x2 RGB patch fits exactly; the first "
                         "shipped model had 8)")
    ap.add_argument("--colour-augment", type=float, default=0.5,
                    help="share of VAE training images recoloured to random colours (without it the VAE cannot "
                         "draw colours DawnLike does not use: README 'Evidence')")
    ap.add_argument("--vae-from", type=Path, default=None,
                    help="reuse the VAE of a model folder (its vae/) instead of training one: a second base with "
                         "another --seed in the same latent space (README 'Evidence', add-difference)")
    ap.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default="v_prediction",
                    help="what the UNet predicts (written to scheduler/scheduler_config.json). v_prediction "
                         "(Salimans & Ho 2022, Eq. 9-10; SD 2.x 768-v, NoobAI v-pred): a model this small and this "
                         "short-trained predicts epsilon too poorly at high noise, where x0 = (x_t - sqrt(1-a) eps) / "
                         "sqrt(a) multiplies the error by up to 15, so its samples came out as coloured noise")
    ap.add_argument("--fork-seed", type=int, default=None,
                    help="with --resume: draw batches, timesteps, noise and caption dropout from this seed from the "
                         "resumed step on. A copy of another run's train_state.pt resumed with another seed is a "
                         "second base that shares the first run's early steps, as community finetunes share their "
                         "ancestor (README 'Evidence', add-difference)")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N sprites (smoke tests)")
    args = ap.parse_args(argv)
    if args.fork_seed is not None and not args.resume:
        ap.error("--fork-seed needs --resume (it forks the run whose train_state.pt is in --out)")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / "train.log", "a", encoding="utf-8")

    def log(msg):
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    sprites = list_sprites(args.data)
    if args.limit:
        sprites = sprites[: args.limit]
    captions = [caption(n, g) for _, n, g in sprites]
    log(f"{len(sprites)} sprites, {len(set(g for _, _, g in sprites))} groups")
    tok = build_tokenizer(captions, out / "model" / "tokenizer")
    log(f"tokenizer: {len(tok)} entries")
    pixels = to_tensor(np.stack([load_sprite(p) for p, _, _ in sprites]))
    ids = tok(captions, padding="max_length", max_length=TOKENIZER_MAX_LENGTH, truncation=True,
              return_tensors="pt").input_ids
    empty_ids = tok([""], padding="max_length", max_length=TOKENIZER_MAX_LENGTH, return_tensors="pt").input_ids

    vae, unet, te = build_models(tok, args.seed, args.latent_channels)
    state_path = out / "train_state.pt"
    decoder_path = out / "vae_decoder.pt"
    if args.decoder_only:
        vae.load_state_dict(torch.load(state_path, weights_only=True)["vae"])
        err = finetune_decoder(vae, pixels, args.decoder_steps, args.batch, 5e-4,
                               torch.Generator().manual_seed(args.seed + 7), log, args.colour_augment)
        torch.save({"vae": vae.state_dict(), "rec_err": err}, decoder_path)
        log(f"decoder fine-tuned: mean abs reconstruction error {err:.2f}/255 -> {decoder_path}")
        return 0
    gen = torch.Generator().manual_seed(args.seed)
    ema = None
    start = 0
    opt = torch.optim.AdamW(list(unet.parameters()) + list(te.parameters()), lr=args.lr, weight_decay=0.01)
    if args.resume and state_path.is_file():
        st = torch.load(state_path, weights_only=True)
        vae.load_state_dict(st["vae"]); unet.load_state_dict(st["unet"]); te.load_state_dict(st["te"])
        opt.load_state_dict(st["opt"]); gen.set_state(st["gen"]); torch.set_rng_state(st["torch_rng"])
        ema = st["ema"]; start = st["step"]; scaling = st["scaling"]
        vae.eval().requires_grad_(False)
        log(f"resumed at step {start}")
        if args.fork_seed is not None:
            gen.manual_seed(args.fork_seed)
            torch.manual_seed(args.fork_seed)
            log(f"forked: batches and noise from seed {args.fork_seed} from step {start} on")
    elif args.vae_from:
        from diffusers import AutoencoderKL

        src = AutoencoderKL.from_pretrained(args.vae_from / "vae")
        vae.load_state_dict(src.state_dict())
        vae.register_to_config(scaling_factor=src.config.scaling_factor)
        vae.eval().requires_grad_(False)
        log(f"VAE taken from {args.vae_from / 'vae'}")
    else:
        train_vae(vae, pixels, args.vae_steps, args.batch, 2e-3, gen, log, args.colour_augment, args.vae_cosine)
    with torch.no_grad():
        mean = torch.cat([vae.encode(pixels[i:i + 256]).latent_dist.mean for i in range(0, len(pixels), 256)])
        rec = torch.cat([vae.decode(mean[i:i + 256]).sample for i in range(0, len(mean), 256)])
    rec_err = (rec.clamp(-1, 1) - pixels).abs().mul(127.5).mean().item()
    if ema is None:
        scaling = float(1.0 / mean.std())
        if args.vae_from:
            scaling = float(vae.config.scaling_factor)
    log(f"vae: mean abs reconstruction error {rec_err:.2f}/255 (sprites recoloured to random colours: "
        f"{round_trip_error(vae, pixels, 1.0, args.seed):.2f}/255), latent std {mean.std():.3f} -> "
        f"scaling_factor {scaling:.4f}")
    latents = mean * scaling
    vae.register_to_config(scaling_factor=scaling)

    params = dict(unet=unet, te=te)
    if ema is None:
        ema = {k: {n: p.detach().clone() for n, p in m.state_dict().items()} for k, m in params.items()}
    ac = alphas_cumprod()
    unet.train(); te.train()

    def save_state(step):
        tmp = state_path.with_suffix(".tmp")
        torch.save({"vae": vae.state_dict(), "unet": unet.state_dict(), "te": te.state_dict(),
                    "opt": opt.state_dict(), "gen": gen.get_state(), "torch_rng": torch.get_rng_state(),
                    "ema": ema, "step": step, "scaling": scaling}, tmp)
        os.replace(tmp, state_path)

    if start == 0:
        save_state(0)  # the VAE is final from here: --decoder-only can run beside the UNet training
    stop = {"flag": False}
    signal.signal(signal.SIGTERM, lambda *a: stop.__setitem__("flag", True))
    t0 = time.time()
    losses = []
    step = start
    try:
        for step in range(start, args.steps):
            if stop["flag"]:
                break
            warm = min(1.0, (step + 1) / 200)
            decay = 0.5 * (1 + math.cos(math.pi * step / args.steps))
            for g in opt.param_groups:
                g["lr"] = args.lr * warm * (0.1 + 0.9 * decay)
            idx = torch.randint(0, len(latents), (args.batch,), generator=gen)
            x0 = latents[idx]
            tok_ids = ids[idx].clone()
            drop = torch.rand(args.batch, generator=gen) < args.caption_dropout
            tok_ids[drop] = empty_ids[0]
            noise = torch.randn(x0.shape, generator=gen)
            t = torch.randint(0, len(ac), (args.batch,), generator=gen)
            a = ac[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
            ctx = te(tok_ids)[0]
            pred = unet(xt, t, encoder_hidden_states=ctx).sample
            # ε-MSE (Ho et al. 2020, Eq. 14) or v-MSE with v = sqrt(a)·ε − sqrt(1−a)·x0 (Salimans & Ho 2022,
            # Eq. 9; diffusers DDPMScheduler.get_velocity)
            target = noise if args.prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
            loss = F.mse_loss(pred, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(unet.parameters()) + list(te.parameters()), 1.0)
            opt.step()
            d = min(args.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for k, m in params.items():
                    for n, p in m.state_dict().items():
                        if p.dtype.is_floating_point:
                            ema[k][n].mul_(d).add_(p.detach(), alpha=1 - d)
                        else:
                            ema[k][n].copy_(p)
            losses.append(loss.item())
            if step % 25 == 0 or step == args.steps - 1:
                rate = (time.time() - t0) / max(1, step + 1 - start)
                log(f"step {step}/{args.steps} loss {np.mean(losses[-25:]):.4f} lr {opt.param_groups[0]['lr']:.2e}"
                    f" {rate:.2f}s/step eta {rate * (args.steps - step - 1) / 60:.1f} min")
            if (step + 1) % args.save_every == 0:
                save_state(step + 1)
        else:
            step = args.steps
    except KeyboardInterrupt:
        log("interrupted")
    save_state(step)
    (out / "losses.json").write_text(json.dumps(losses))
    log(f"saved state at step {step}")
    if step >= args.steps or args.export_partial:
        if decoder_path.is_file():
            dd = torch.load(decoder_path, weights_only=True)
            vae.load_state_dict(dd["vae"]); rec_err = dd["rec_err"]
        elif args.decoder_steps:
            rec_err = finetune_decoder(vae, pixels, args.decoder_steps, args.batch, 5e-4,
                                       torch.Generator().manual_seed(args.seed + 7), log, args.colour_augment)
        vae.register_to_config(scaling_factor=scaling)
        export(out / "model", vae, unet, te, ema, tok, args, step, rec_err, losses, log)
    return 0


def export(model_dir: Path, vae, unet, te, ema, tok, args, step, rec_err, losses, log) -> None:
    """Write the diffusers folder (EMA weights, fp32 safetensors) and a samples grid."""
    if not args.export_raw:
        unet.load_state_dict(ema["unet"]); te.load_state_dict(ema["te"])
    unet.eval(); te.eval()
    model_dir.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(model_dir / "unet", safe_serialization=True)
    vae.save_pretrained(model_dir / "vae", safe_serialization=True)
    te.save_pretrained(model_dir / "text_encoder", safe_serialization=True)
    (model_dir / "scheduler").mkdir(exist_ok=True)
    (model_dir / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({**SCHEDULER_CONFIG, "prediction_type": args.prediction_type}, indent=2))
    (model_dir / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
        "scheduler": ["diffusers", "DDPMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]}, indent=2))
    (model_dir / "training.json").write_text(json.dumps({
        "seed": args.seed, "threads": args.threads, "vae_steps": args.vae_steps, "steps": step,
        "latent_channels": args.latent_channels, "colour_augment": args.colour_augment,
        "vae_cosine": args.vae_cosine, "decoder_steps": args.decoder_steps,
        "vae_from": str(args.vae_from) if args.vae_from else None, "fork_seed": args.fork_seed,
        "prediction_type": args.prediction_type, "batch": args.batch, "lr": args.lr, "ema": args.ema, "caption_dropout": args.caption_dropout,
        "weights": "raw" if args.export_raw else "ema",
        "vae_mean_abs_error_255": round(rec_err, 3), "final_loss_mean_last_100": float(np.mean(losses[-100:]))
        if losses else None, "image_size": IMAGE_SIZE, "background": "#%02x%02x%02x" % BACKGROUND}, indent=2))
    log(f"model written to {model_dir}")


if __name__ == "__main__":
    sys.exit(main())
