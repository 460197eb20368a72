"""Shared pieces of the effect tests (``tests/test_effect_*.py``) and ``benchmarks/effect.py``.

Everything here runs on the tiny DawnLike model shipped in ``sample_data/tiny_dawnlike`` (see its README) and
on the real DawnLike sprites (``../shared/data/dawnlike``, CC-BY 4.0, credit DawnBringer). It only uses the
pack's high-level entry points (``DiffusersHost.from_pretrained``, ``LoraTrainer``, ``erase``, the merge
functions, the palette metrics), never the conditioning tensors themselves.

* a **style**: DawnLike sprites recoloured to the 4-colour Game Boy ramp with a trigger word
  (:func:`recolour_gameboy`, :func:`write_style_dataset`), measured by the per-pixel in-palette fraction at
  ΔE00 ≤ 5 (:func:`in_palette_fraction`);
* a **concept classifier**: a small CNN trained on the real sprites of a few DawnLike groups
  (:func:`train_classifier`), used to count how often samples of a prompt show its concept (:func:`hit_rate`).
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

import train_tiny_model as tiny  # noqa: E402  (tools/ is a script folder, not a package)

TINY_MODEL = REPO / "sample_data" / "tiny_dawnlike"
#: the v-prediction sibling (12 latent channels, a VAE that keeps colours DawnLike never uses): the in-palette test
TINY_VPRED = REPO / "sample_data" / "tiny_dawnlike_vpred"
DATA = tiny.DEFAULT_DATA
#: the Game Boy DMG ramp, darkest to lightest
GAMEBOY = ("#0f380f", "#306230", "#8bac0f", "#9bbc0f")
TRIGGER = "gbstyle"
#: groups of creatures and items the style dataset draws from (frame 0 of each sprite)
STYLE_GROUPS = ("humanoid", "avian", "reptile", "quadruped", "undead", "demon", "elemental", "pest", "aquatic",
                "plant", "slime", "dog", "cat", "rodent", "potion", "food")


def _rgb(hexes: Sequence[str]) -> np.ndarray:
    return np.array([[int(h[i:i + 2], 16) for i in (1, 3, 5)] for h in hexes], dtype=np.uint8)


def recolour_gameboy(rgb: np.ndarray, background=tiny.BACKGROUND) -> np.ndarray:
    """Map a sprite ``[H, W, 3]`` uint8 to the Game Boy ramp by CIE L*: the flat ``background`` → the lightest
    shade, other pixels by L* < 30 / 50 / 70 / else → darkest … lightest. Returns uint8 ``[H, W, 3]``."""
    from conceptlab.metrics.color import srgb_to_lab

    pal = _rgb(GAMEBOY)
    L = srgb_to_lab(rgb)[..., 0]
    idx = np.digitize(L, [30.0, 50.0, 70.0])
    out = pal[idx]
    bg = np.all(rgb == np.array(background, np.uint8), axis=-1)
    out[bg] = pal[-1]
    return out


def style_sprites(n: int, offset: int = 0) -> list[tuple[Path, str, str]]:
    """``n`` sprites (frame 0) spread over :data:`STYLE_GROUPS`, deterministic; ``offset`` picks another set."""
    pool = [s for s in tiny.list_sprites(DATA) if s[2] in STYLE_GROUPS and s[0].stem.endswith("_0")]
    step = max(1, len(pool) // n)
    return [pool[(offset + i * step) % len(pool)] for i in range(n)]


def _write_sprites(sub: Path, n: int, offset: int, recolour, prefix: str) -> None:
    """(Re)create the kohya folder ``sub`` with ``n`` style-group sprites from ``offset`` (:func:`style_sprites`),
    each recoloured by ``recolour`` (``None``: own colours), captioned ``"<prefix>pixel art, <group>, <name>"``."""
    from PIL import Image

    if sub.exists():
        shutil.rmtree(sub)
    sub.mkdir(parents=True)
    for path, name, group in style_sprites(n, offset):
        stem = name.replace(" ", "_")
        img = tiny.load_sprite(path)
        Image.fromarray(recolour(img) if recolour is not None else img).save(sub / f"{stem}.png")
        (sub / f"{stem}.txt").write_text(f"{prefix}{tiny.caption(name, group)}\n", encoding="utf-8")


def write_style_dataset(root: Path, n: int = 24, repeats: int = 2, trigger: str = TRIGGER, offset: int = 0
                        ) -> Path:
    """Write a kohya folder ``root/<repeats>_<trigger>/`` of ``n`` Game-Boy-recoloured 16×16 sprites, captions
    ``"<trigger>, pixel art, <group>, <name>"``. Returns ``root``."""
    _write_sprites(root / f"{repeats}_{trigger}", n, offset, recolour_gameboy, f"{trigger}, ")
    return root


def write_reg_dataset(root: Path, n: int = 48, repeats: int = 1, offset: int = 1) -> Path:
    """Write kohya regularization images (``reg_data_dir``): ``root/<repeats>_pixel art/`` of ``n`` DawnLike
    sprites in their own colours with captions *without* the trigger (``"pixel art, <group>, <name>"``), drawn
    from the style groups but, with ``offset`` ≥ 1, not the sprites of :func:`write_style_dataset` (``offset`` 0).
    Kohya's prior preservation: the LoRA sees prompts without the trigger keep the base's look. Returns ``root``."""
    _write_sprites(root / f"{repeats}_pixel art", n, offset, None, "")
    return root


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[B, 3, H, W]`` float 0..1 → uint8 ``[B, H, W, 3]``."""
    return (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)


def in_palette_fraction(images: np.ndarray, palette: Sequence[str] = GAMEBOY, tol: float = 5.0) -> float:
    """Fraction of pixels of uint8 ``[..., 3]`` images within ΔE00 ``tol`` of a ``palette`` colour (CIEDE2000,
    :func:`conceptlab.metrics.color.delta_e00`)."""
    from conceptlab.metrics.color import delta_e00, srgb_to_lab

    px = images.reshape(-1, 3)
    cols, inv = np.unique(px, axis=0, return_inverse=True)
    d = delta_e00(srgb_to_lab(cols)[:, None, :], srgb_to_lab(_rgb(palette))[None, :, :]).min(1)
    return float((d[inv.reshape(-1)] <= tol).mean())


def load_host(path: Path = TINY_MODEL):
    """The tiny model as a :class:`conceptlab.training.diffusers_host.DiffusersHost` (CPU, fp32)."""
    from conceptlab.training.diffusers_host import DiffusersHost

    return DiffusersHost.from_pretrained(path)


def sample(host, prompts: Sequence[str], seed: int = 0, steps: int = 20, cfg: float = 4.0) -> np.ndarray:
    """``host.sample`` at 16×16 px → uint8 ``[B, 16, 16, 3]``."""
    with torch.no_grad():
        imgs = host.sample(list(prompts), width=tiny.IMAGE_SIZE, height=tiny.IMAGE_SIZE, steps=steps, cfg=cfg,
                           seed=seed)
    return to_uint8(imgs)


def grid(images: np.ndarray, cols: int, scale: int = 4, pad: int = 1) -> np.ndarray:
    """Tile uint8 ``[N, h, w, 3]`` into one image (nearest upscaling ×``scale``, ``pad`` px white gaps)."""
    n, h, w, _ = images.shape
    rows = (n + cols - 1) // cols
    H, W = h * scale + pad, w * scale + pad
    out = np.full((rows * H + pad, cols * W + pad, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        big = images[i].repeat(scale, 0).repeat(scale, 1)
        out[pad + r * H: pad + r * H + h * scale, pad + c * W: pad + c * W + w * scale] = big
    return out


# ------------------------------------------------------------------------------------------------------------
# concept classifier
# ------------------------------------------------------------------------------------------------------------
#: concepts for the erasure experiments: DawnLike groups the tiny model draws distinctly
CONCEPTS = ("tree", "wall", "floor", "humanoid", "avian", "potion")


class SpriteClassifier(nn.Module):
    """A small CNN: uint8-derived ``[B, 3, 16, 16]`` in ``[-1, 1]`` → logits ``[B, len(classes)]``."""

    def __init__(self, classes: Sequence[str]):
        super().__init__()
        self.classes = list(classes)
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(64, len(self.classes)))

    def forward(self, x):
        return self.net(x)

    @torch.no_grad()
    def predict(self, images: np.ndarray) -> np.ndarray:
        """uint8 ``[N, 16, 16, 3]`` → class indices ``[N]``."""
        self.eval()
        return self(tiny.to_tensor(images)).argmax(1).numpy()


@dataclass
class ClassifierReport:
    classifier: SpriteClassifier
    train_accuracy: float
    heldout_accuracy: float
    n_train: int
    n_heldout: int


def concept_sprites(classes: Sequence[str] = CONCEPTS):
    """``(images uint8 [N,16,16,3], labels [N], names [N])`` of every real sprite in ``classes``."""
    rows = [(p, n, g) for p, n, g in tiny.list_sprites(DATA) if g in classes]
    imgs = np.stack([tiny.load_sprite(p) for p, _, _ in rows])
    labels = np.array([list(classes).index(g) for _, _, g in rows])
    return imgs, labels, [n for _, n, _ in rows]


def train_classifier(classes: Sequence[str] = CONCEPTS, epochs: int = 15, seed: int = 0) -> ClassifierReport:
    """Train :class:`SpriteClassifier` on the real sprites of ``classes``; every 5th sprite *name* (all its
    frames) is held out, so held-out accuracy is measured on sprites the classifier never saw. Balanced
    class weights; random horizontal flips. Adam, lr 2e-3, batch 64."""
    imgs, labels, names = concept_sprites(classes)
    uniq = sorted(set(names))
    held = {n for i, n in enumerate(uniq) if i % 5 == 0}
    te = np.array([n in held for n in names])
    x = tiny.to_tensor(imgs)
    y = torch.from_numpy(labels)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    clf = SpriteClassifier(classes)
    opt = torch.optim.Adam(clf.parameters(), lr=2e-3)
    tr_idx = torch.from_numpy(np.flatnonzero(~te))
    counts = torch.bincount(y[tr_idx], minlength=len(classes)).float()
    w = (counts.sum() / (len(classes) * counts.clamp(min=1)))
    for _ in range(epochs):
        perm = tr_idx[torch.randperm(len(tr_idx), generator=g)]
        clf.train()
        for i in range(0, len(perm), 64):
            b = perm[i:i + 64]
            xb = x[b]
            flip = torch.rand(len(b), generator=g) < 0.5
            xb = torch.where(flip.view(-1, 1, 1, 1), xb.flip(-1), xb)
            loss = F.cross_entropy(clf(xb), y[b], weight=w)
            opt.zero_grad()
            loss.backward()
            opt.step()
    pred = clf.predict(imgs)
    return ClassifierReport(clf, float((pred[~te] == labels[~te]).mean()), float((pred[te] == labels[te]).mean()),
                            int((~te).sum()), int(te.sum()))


def concept_prompts(concept: str, k: int, seed: int = 0, classes: Sequence[str] = CONCEPTS) -> list[str]:
    """``k`` training-style prompts of ``concept``'s group: ``"pixel art, <group>, <name>"`` for names drawn
    deterministically from that group."""
    names = sorted({n for _, n, g in tiny.list_sprites(DATA) if g == concept})
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(names), size=k, replace=len(names) < k)
    return [tiny.caption(names[i], concept) for i in pick]


def model_card_samples(host, cols: int = 6, steps: int = 20, cfg: float = 4.0) -> np.ndarray:
    """The model card's ``samples.png``: one row per :data:`CONCEPTS` group (tree, wall, floor, humanoid, avian,
    potion), ``cols`` training-style prompts of that group (:func:`concept_prompts`, seed 0), sampling seed 0,
    ``steps`` DDIM steps, CFG ``cfg``; tiled ×5 with 1 px gaps. Returns uint8 ``[H, W, 3]``."""
    imgs = [sample(host, concept_prompts(c, cols, seed=0), seed=0, steps=steps, cfg=cfg) for c in CONCEPTS]
    return grid(np.concatenate(imgs), cols, scale=5)


def hit_rate(clf: SpriteClassifier, images: np.ndarray, concept: str) -> float:
    """Fraction of uint8 ``[N, 16, 16, 3]`` images the classifier assigns to ``concept``."""
    return float((clf.predict(images) == clf.classes.index(concept)).mean())


class Timer:
    def __init__(self):
        self.t0 = time.time()

    def __call__(self) -> float:
        return round(time.time() - self.t0, 1)


# ------------------------------------------------------------------------------------------------------------
# LoRA
# ------------------------------------------------------------------------------------------------------------
#: creature prompts the style is measured on (no trigger); none of them is in the style dataset
STYLE_EVAL_PROMPTS = ("pixel art, humanoid, knight", "pixel art, avian, crow", "pixel art, undead, skeleton",
                      "pixel art, quadruped, brown horse", "pixel art, reptile, cobra", "pixel art, demon, imp",
                      "pixel art, aquatic, catfish", "pixel art, plant, mandrake")


def lora_settings(out_dir: Path, **over) -> dict:
    """The flat kohya settings of the style LoRA (the values of ``sample_data/quickstart.toml``)."""
    d = dict(output_dir=str(out_dir), output_name="gbstyle", max_train_epochs=8, train_batch_size=8, seed=42,
             learning_rate=1e-2, lr_scheduler="constant", network_dim=8, network_alpha=8, save_every_n_epochs=1,
             save_state=False, resolution=16, enable_bucket=False, resize_interpolation="nearest",
             caption_extension=".txt", background="#30346d", sample_every_n_epochs=0)
    d.update(over)
    return d


def train_style_lora(host, data_root: Path, out_dir: Path, reg_root: Path | None = None, **over):
    """Train the style LoRA with :func:`conceptlab.training.lora.trainer.train_lora`; returns its ``TrainResult``.
    ``reg_root``: a kohya ``reg_data_dir`` (e.g. :func:`write_reg_dataset`), read by the pack's kohya dataset
    machinery (:func:`conceptlab.training.lora.dataset_config.dataset_from_settings`: regularization images
    balanced to the training images' count, their loss times ``prior_loss_weight``, an ``over`` key)."""
    from conceptlab.training.lora.config import configs_from_mapping
    from conceptlab.training.lora.dataset import KohyaDataset
    from conceptlab.training.lora.dataset_config import dataset_from_settings
    from conceptlab.training.lora.trainer import train_lora

    settings = lora_settings(out_dir, **over)
    cfg, dopts, caps, _ = configs_from_mapping(settings)
    if reg_root is not None:
        ds, _ = dataset_from_settings({**settings, "train_data_dir": str(data_root), "reg_data_dir": str(reg_root)},
                                      seed=cfg.seed)
    else:
        ds = KohyaDataset.scan(data_root, dopts, caps, seed=cfg.seed)
    try:
        return train_lora(host, ds, cfg)
    finally:
        ds.release_latents()


class lora_installed:
    """Context manager: the kohya LoRA file ``path`` installed on ``host`` at ``multiplier``."""

    def __init__(self, host, path, multiplier: float = 1.0):
        self.host, self.path, self.multiplier = host, path, multiplier

    def __enter__(self):
        from safetensors.torch import load_file

        from conceptlab.training.lora.network import LoRANetwork

        self.net, _ = LoRANetwork.from_kohya_state_dict(self.host, load_file(str(self.path)))
        self.net.set_multiplier(self.multiplier)
        self.net.install(self.host)
        return self.net

    def __exit__(self, *exc):
        self.net.remove()


def style_samples(host, prompts: Sequence[str] = STYLE_EVAL_PROMPTS, seeds: Sequence[int] = (0,),
                  trigger: str = TRIGGER, steps: int = 20) -> dict[str, np.ndarray]:
    """uint8 ``[len(seeds)·len(prompts), 16, 16, 3]`` samples of ``prompts`` with (``"with_trigger"``) and without
    (``"without_trigger"``) ``"<trigger>, "`` in front."""
    out = {}
    for key, ps in (("with_trigger", [f"{trigger}, {p}" for p in prompts]), ("without_trigger", list(prompts))):
        out[key] = np.concatenate([sample(host, ps, seed=s, steps=steps) for s in seeds])
    return out


def style_scores(host, prompts: Sequence[str] = STYLE_EVAL_PROMPTS, seeds: Sequence[int] = (0,),
                 trigger: str = TRIGGER, steps: int = 20, reference: dict | None = None) -> dict[str, float]:
    """Palette figures of samples of ``prompts`` with and without the trigger: ``with_trigger`` /
    ``without_trigger`` = in-palette fraction (Game Boy ramp, ΔE00 ≤ 5), ``*_de`` = mean ΔE00 to the nearest
    ramp colour (:func:`mean_delta_e`). With ``reference`` (a :func:`style_samples` dict of another model on the
    same prompts and seeds), ``*_change`` = mean absolute pixel change against it, in 0..255 units."""
    imgs = style_samples(host, prompts, seeds, trigger, steps)
    out = {}
    for key, im in imgs.items():
        out[key] = in_palette_fraction(im)
        out[f"{key}_de"] = mean_delta_e(im)
        if reference is not None:
            out[f"{key}_change"] = float(np.abs(im.astype(np.int16) - reference[key].astype(np.int16)).mean())
    return out


def vae_round_trip(host, images: np.ndarray) -> np.ndarray:
    """uint8 ``[N, H, W, 3]`` → the same images encoded (posterior mean) and decoded by ``host``'s VAE: the best
    any UNet (and so any LoRA) on this model can draw them."""
    with torch.no_grad():
        return to_uint8(host.decode_latents(host.encode_images(tiny.to_tensor(images))))


def load_folder_images(folder: Path) -> np.ndarray:
    """Every ``*.png`` of ``folder`` (sorted) as uint8 RGB ``[N, H, W, 3]`` (all the same size)."""
    from PIL import Image

    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(Path(folder).glob("*.png"))])


# ------------------------------------------------------------------------------------------------------------
# ESD
# ------------------------------------------------------------------------------------------------------------
def erase_concept(host, concept: str, *, iterations: int = 60, lr: float = 2e-3, xt_source: str = "self_sample",
                  masks=None, variations: int = 0, seed: int = 0, ddim_steps: int = 20,
                  negative_guidance: float = 1.0):
    """ESD-x (:func:`conceptlab.training.esd.erase.erase`) of ``concept`` on ``host`` at 16×16 px; returns the
    ``ESDResult``. ``masks``: ``None`` (whole latent) or ``"grid"``; ``variations``: 0 = the bare concept."""
    from conceptlab.training.esd.config import ESDConfig
    from conceptlab.training.esd.erase import erase

    cfg = ESDConfig(concepts=concept, iterations=iterations, lr=lr, width=tiny.IMAGE_SIZE, height=tiny.IMAGE_SIZE,
                    ddim_steps=ddim_steps, xt_source=xt_source, masks=masks, variations=variations, seed=seed,
                    negative_guidance=negative_guidance, grid_n=2)
    return erase(host, cfg)


class weights_patched:
    """Context manager: ``{"<component>.<path>.<attr>": tensor}`` copied into ``host``'s modules, restored on
    exit (for :func:`conceptlab.training.esd.erase.erased_weights` or merged state dicts)."""

    def __init__(self, host, values: dict):
        self.host, self.values, self.saved = host, values, {}

    def _param(self, key):
        comp, rest = key.split(".", 1)
        path, attr = rest.rsplit(".", 1)
        return getattr(self.host.modules(comp)[path], attr)

    def __enter__(self):
        with torch.no_grad():
            for k, v in self.values.items():
                p = self._param(k)
                self.saved[k] = p.detach().clone()
                p.copy_(v.to(p.dtype))
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for k, v in self.saved.items():
                self._param(k).copy_(v)


def concept_hit_rates(host, clf: SpriteClassifier, concepts: Sequence[str] = CONCEPTS, k: int = 8,
                      seed: int = 0, steps: int = 20) -> dict[str, float]:
    """For each concept: the fraction of ``k`` samples of its prompts (:func:`concept_prompts`) that the
    classifier assigns to it."""
    return {c: hit_rate(clf, sample(host, concept_prompts(c, k, seed=seed), seed=seed, steps=steps), c)
            for c in concepts}


def diff_report(host, changed: dict, name: str = "edited") -> dict:
    """:func:`conceptlab.metrics.weight_diff.diff_pairs` report of every UNet and text-encoder weight of
    ``host`` (side A) against the same model with ``changed`` (``{"<component>.<path>.<attr>": tensor}``)
    applied (side B)."""
    from conceptlab.metrics.weight_diff import TensorPair, diff_pairs

    def pairs():
        for comp in host.components():
            for path, mod in host.modules(comp).items():
                for attr in ("weight", "bias"):
                    t = getattr(mod, attr, None)
                    if t is None:
                        continue
                    key = f"{comp}.{path}.{attr}"
                    a = t.detach().float().cpu()
                    b = changed.get(key)
                    ck = (f"{path}.{attr}" if comp == "unet" else f"cond_stage_model.transformer.{path}.{attr}")
                    yield TensorPair(ck, a, a if b is None else b.float())

    return diff_pairs(pairs(), arch="sd1", a_info={"name": "tiny_dawnlike"}, b_info={"name": name},
                      mode="models")


def baked_state(host, lora_path, multiplier: float = 1.0) -> dict:
    """:func:`model_state` of ``host`` with the kohya LoRA file ``lora_path`` baked in at ``multiplier``: the LoRA
    is installed in weight space (``host.delta_space = "weight"`` while it is installed: the module's ``weight``
    becomes W + ΔW), so the returned tensors are the LoRA-merged checkpoint a merge tool would write. With the
    hosts' default activation-space deltas the weights never change and a plain :func:`model_state` under
    :class:`lora_installed` returns the base."""
    saved = host.delta_space
    host.delta_space = "weight"
    try:
        with lora_installed(host, lora_path, multiplier):
            return model_state(host)
    finally:
        host.delta_space = saved


def model_state(host) -> dict:
    """``{"<component>.<path>.<attr>": fp32 copy}`` of every UNet / text-encoder weight and bias the host sees
    (deltas installed in weight space included; activation-space deltas never show here: :func:`baked_state`)."""
    out = {}
    for comp in host.components():
        for path, mod in host.modules(comp).items():
            for attr in ("weight", "bias"):
                p = getattr(mod, attr, None)
                if p is not None:
                    out[f"{comp}.{path}.{attr}"] = p.detach().float().clone()
    return out


def mean_delta_e(images: np.ndarray, palette: Sequence[str] = GAMEBOY) -> float:
    """Mean over pixels of the CIEDE2000 distance to the nearest ``palette`` colour (uint8 ``[..., 3]``)."""
    from conceptlab.metrics.color import delta_e00, srgb_to_lab

    px = images.reshape(-1, 3)
    cols, inv = np.unique(px, axis=0, return_inverse=True)
    d = delta_e00(srgb_to_lab(cols)[:, None, :], srgb_to_lab(_rgb(palette))[None, :, :]).min(1)
    return float(d[inv.reshape(-1)].mean())
