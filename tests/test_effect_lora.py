"""Effect: a LoRA trained on the tiny DawnLike model with a trigger word moves the samples of its trigger prompts
into the Game Boy palette of its training images, while samples of the same prompts *without* the trigger stay
where they were, because regularization images (kohya ``reg_data_dir``: DawnLike sprites in their own colours,
captions without the trigger, loss × ``prior_loss_weight``) are interleaved with the training images.

The measure is the issue's: the per-pixel in-palette fraction at ΔE00 ≤ 5 to the 4-colour Game Boy ramp (and
the mean absolute pixel change against the base model's sample of the same prompt and seed). It can only rise as
far as the model's VAE can draw the palette — the *ceiling*, the training images themselves encoded and decoded
(no UNet, so no LoRA, draws better); it is measured here first, so a model whose VAE cannot draw the ramp fails
with that reason rather than with a LoRA figure.

Fixed seeds; margins measured on the shipped model (benchmarks/effect.py prints the same figures, with more
seeds and without regularization images beside them).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import effect_lib as E  # noqa: E402

pytestmark = pytest.mark.skipif(not (E.TINY_MODEL.is_dir() and (E.DATA / "sprites").is_dir()),
                                reason="needs sample_data/tiny_dawnlike and ../shared/data/dawnlike")

DATA = E.REPO / "sample_data" / "gameboy"
PROMPTS = E.STYLE_EVAL_PROMPTS[:6]


def test_lora_with_reg_images_moves_trigger_samples_into_the_palette_and_leaves_the_rest(tmp_path):
    host = E.load_host()
    train = E.load_folder_images(DATA / f"3_{E.TRIGGER}")
    assert E.in_palette_fraction(train) == 1.0  # the style dataset is exactly the Game Boy ramp
    ceiling = E.in_palette_fraction(E.vae_round_trip(host, train))
    assert ceiling >= CEILING_MIN, f"the model's VAE cannot draw the Game Boy ramp (in-palette {ceiling:.3f})"
    before = E.style_samples(host, PROMPTS, steps=12)
    reg = E.write_reg_dataset(tmp_path / "reg", n=48)  # 48 = 16 training images × 3 repeats: no balancing needed
    res = E.train_style_lora(host, DATA, tmp_path / "out", reg_root=reg, max_train_epochs=EPOCHS,
                             learning_rate=1e-2, save_every_n_epochs=None)
    with E.lora_installed(host, res.final_path):
        after = E.style_scores(host, PROMPTS, steps=12, reference=before)
    b_with, b_without = E.in_palette_fraction(before["with_trigger"]), E.in_palette_fraction(before["without_trigger"])
    print(f"ceiling {ceiling:.3f}; in-palette with trigger {b_with:.3f} -> {after['with_trigger']:.3f}, without "
          f"{b_without:.3f} -> {after['without_trigger']:.3f}; pixel change with {after['with_trigger_change']:.1f}"
          f", without {after['without_trigger_change']:.1f} /255")
    # MEASURED
    assert b_with < LOW, b_with  # the base does not draw the style by itself
    assert after["with_trigger"] > HIGH, after
    assert after["with_trigger"] - b_with > MARGIN, (b_with, after)
    # without the trigger the samples stay put: little pixel change, no palette
    assert after["without_trigger"] < LOW, after
    assert after["without_trigger_change"] < DRIFT_MAX, after
    assert after["with_trigger_change"] > 3 * after["without_trigger_change"], after
