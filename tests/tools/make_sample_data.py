"""Build the bundled sample dataset ``sample_data/`` from the DawnLike sprites (CC-BY 4.0, credit DawnBringer).

    python tests/tools/make_sample_data.py [--sprites ../shared/data/dawnlike/sprites] [--out sample_data]

Each sprite (16x16) is placed at (4, 4) on a 24x24 canvas of one solid background colour (transparent
pixels become background), upscaled x16 to 384 px with nearest-neighbour and saved as PNG under
``sample_data/pixel_art/10_dawnlike/`` (kohya layout: 10 repeats, concept ``dawnlike``) with a ``.txt``
caption built from the sprite's name and its REAL colours. Two captions carry deliberate defects so the
caption audit has something to show: ``DEFECTS`` (a feature sharing the background's hex; a truncated hex).
``sample_data/example.png`` is one sprite at 24 cells -> 512 px (fractional 21.33 px cells) for the palette
workflow. Deterministic: ``tests/test_captions_sample_data.py`` rebuilds everything in memory and compares.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image

from conceptlab.metrics import color

SPRITES = (
    "acid blob_0", "imp_0", "angel_0", "black pudding_0", "cyan potion", "baby pelican_0",
    "apple", "battle axe", "catfish_0", "dragonfly_0", "fire elemental_0", "ghost_0",
)
# non-DB16 backgrounds; each sprite gets the first (from a per-sprite offset) far from all its colours
BACKGROUNDS = ("#2a9d8f", "#e9c46a", "#8ecae6", "#6a4c93", "#ff99c8", "#3a5a40",
               "#f4a261", "#264653", "#a8dadc", "#c1121f", "#fefae0", "#ffb4a2")
DEFECTS = {"black pudding_0": "duplicate_hex", "catfish_0": "malformed_hex"}
CANVAS = 24
OFFSET = 4
SCALE = 16
EXAMPLE_SPRITE = "angel_0"
EXAMPLE_SIZE = 512
SUBSET = Path("pixel_art") / "10_dawnlike"
MIN_FEATURE_FRAC = 0.03  # label every sprite colour covering >= 3 % of cells (what the audit requires)
ROLES = ("body", "detail", "accent", "trim")


def _hex(rgb) -> str:
    return color.rgb_to_hex(tuple(int(v) for v in rgb))


def canvas(sprite_path: Path, bg_hex: str) -> np.ndarray:
    """uint8 ``[24,24,3]``: the sprite at (4,4) over a solid ``bg_hex`` canvas (alpha < 128 -> background)."""
    with Image.open(sprite_path) as im:
        rgba = np.asarray(im.convert("RGBA"))
    out = np.empty((CANVAS, CANVAS, 3), dtype=np.uint8)
    out[:] = color.parse_hex(bg_hex)
    h, w = rgba.shape[:2]
    region = out[OFFSET:OFFSET + h, OFFSET:OFFSET + w]
    opaque = rgba[..., 3] >= 128
    region[opaque] = rgba[..., :3][opaque]
    return out


def pick_background(sprite_path: Path, index: int) -> str:
    """First background (starting at ``index``) whose ΔE00 to every sprite colour is > 15."""
    with Image.open(sprite_path) as im:
        rgba = np.asarray(im.convert("RGBA")).reshape(-1, 4)
    cols = np.unique(rgba[rgba[:, 3] >= 128][:, :3], axis=0)
    lab = color.srgb_to_lab(cols)
    for k in range(len(BACKGROUNDS)):
        bg = BACKGROUNDS[(index + k) % len(BACKGROUNDS)]
        d = color.delta_e00(lab, color.srgb_to_lab(np.array(color.parse_hex(bg), dtype=np.uint8))[None, :])
        if float(np.min(d)) > 15:
            return bg
    raise RuntimeError(f"no background far from the colours of {sprite_path.name}")


def caption_for(name: str, native: np.ndarray, bg_hex: str, defect: str | None = None) -> str:
    """Caption from the sprite name and its real colours (see module docstring); ``defect`` injects one."""
    flat = native.reshape(-1, 3)
    cols, counts = np.unique(flat, axis=0, return_counts=True)
    hexes = [_hex(c) for c in cols]
    sprite = [(h, int(n)) for h, n in zip(hexes, counts) if h != bg_hex]
    sprite.sort(key=lambda t: (-t[1], t[0]))
    need = max(int(np.ceil(MIN_FEATURE_FRAC * flat.shape[0])), 1)
    labelled = [h for h, n in sprite if n >= need] or [sprite[0][0]]
    # darkest labelled colour is the outline; the others get roles by size
    lum = {h: float(color.srgb_to_lab(np.array(color.parse_hex(h), dtype=np.uint8))[0]) for h in labelled}
    outline = min(labelled, key=lambda h: lum[h]) if len(labelled) > 1 else None
    features = []
    roles = iter(ROLES)
    for h in labelled:
        role = "outline" if h == outline else next(roles, "detail")
        features.append((f"{str(color.color_family(h)).lower()} {role}", h))
    palette = [h for _, h in features] + [bg_hex]
    if defect == "duplicate_hex":  # the biggest feature written with the background's hex
        features[0] = (features[0][0], bg_hex)
    shown = [(f, h) for f, h in features]
    if defect == "malformed_hex":  # one hex typed with a digit missing
        f, h = shown[0]
        shown[0] = (f, h[:-1])
    parts = ["pixel art", "dawnlike", name]
    parts += [f"{f} ({h})" for f, h in shown]
    parts.append(f"background ({bg_hex})")
    parts.append("palette: " + ", ".join(palette))
    parts.append("retro pixel art style")
    return ", ".join(parts) + "\n"


def png_bytes(arr: np.ndarray) -> bytes:
    """Deterministic PNG (palette mode when it fits: smallest files) of a uint8 RGB array."""
    im = Image.fromarray(arr, "RGB")
    cols = im.getcolors(256)
    if cols is not None:
        im = im.quantize(colors=len(cols), method=Image.Quantize.MAXCOVERAGE, dither=Image.Dither.NONE)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def build(sprites_dir: Path) -> dict[str, tuple[np.ndarray | None, str | None]]:
    """Everything the sample folder holds: ``{relative path: (uint8 image or None, text or None)}``."""
    files: dict[str, tuple[np.ndarray | None, str | None]] = {}
    for i, stem in enumerate(SPRITES):
        path = sprites_dir / f"{stem}.png"
        bg = pick_background(path, i)
        native = canvas(path, bg)
        name = stem.rsplit("_", 1)[0] if stem.rsplit("_", 1)[-1].isdigit() else stem
        big = np.repeat(np.repeat(native, SCALE, axis=0), SCALE, axis=1)
        file_stem = name.replace(" ", "_")
        files[(SUBSET / f"{file_stem}.png").as_posix()] = (big, None)
        files[(SUBSET / f"{file_stem}.txt").as_posix()] = (None, caption_for(name, native, bg, DEFECTS.get(stem)))
    ex_path = sprites_dir / f"{EXAMPLE_SPRITE}.png"
    native = canvas(ex_path, pick_background(ex_path, 0))
    ex = np.asarray(Image.fromarray(native).resize((EXAMPLE_SIZE, EXAMPLE_SIZE), Image.NEAREST))
    files["example.png"] = (ex, None)
    return files


def main(argv: list[str] | None = None) -> int:
    repo = Path(__file__).resolve().parents[2]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sprites", type=Path, default=repo.parent / "shared" / "data" / "dawnlike" / "sprites")
    ap.add_argument("--out", type=Path, default=repo / "sample_data")
    args = ap.parse_args(argv)
    from conceptlab.formats.safetensors_io import atomic_output, atomic_write_text

    for rel, (img, text) in build(args.sprites).items():
        dest = args.out / rel
        if img is not None:
            with atomic_output(dest) as tmp:
                tmp.write_bytes(png_bytes(img))
        else:
            atomic_write_text(dest, text)
    print(f"wrote sample data to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
