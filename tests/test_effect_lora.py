"""Effect: a LoRA trained on the tiny DawnLike model moves the samples of its trigger prompts toward the Game Boy
palette of its training images, as far as the model's VAE can draw that palette.

Without regularization images the samples of the same prompts *without* the trigger change about as much
(27.4/255 mean pixel change against 28.4/255 with it) — 16 images that all carry the trigger teach the style to
every prompt; kohya's answer, ``reg_data_dir`` prior preservation, is the second test: with it they change 0.40
as much.

The measure is the mean CIEDE2000 distance of sample pixels to the nearest Game Boy colour, compared with the
*ceiling*: the training images themselves encoded and decoded by the model's VAE (no UNet, so no LoRA, can draw
better than that). The in-palette fraction at ΔE00 5 cannot show the effect on ``tiny_dawnlike``: its VAE returns
the Game Boy training images 44.8/255 off on average (ΔE00 29.9; in-palette 0.000, against 1.000 for the images
themselves) — README "Evidence" has the measurements. The margins are relative to the ceiling measured here, so
they hold for a retrained model with a better VAE too.

On ``tiny_dawnlike_vpred`` (third test) the VAE can draw the palette, and the in-palette fraction itself shows the
effect: 0.007 → 0.247 with the quick-start settings.

Fixed seeds; margins measured on the shipped models (benchmarks/effect.py prints the figures).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import effect_lib as E  # noqa: E402

pytestmark = pytest.mark.skipif(not (E.TINY_MODEL.is_dir() and (E.DATA / "sprites").is_dir()),
                                reason="needs sample_data/tiny_dawnlike and ../shared/data/dawnlike")

DATA = E.REPO / "sample_data" / "gameboy"
PROMPTS = E.STYLE_EVAL_PROMPTS[:6]


def test_lora_moves_trigger_samples_to_what_the_vae_can_draw_of_the_palette(tmp_path):
    host = E.load_host()
    train = E.load_folder_images(DATA / f"3_{E.TRIGGER}")
    ceiling = E.mean_delta_e(E.vae_round_trip(host, train))
    assert E.in_palette_fraction(train) == 1.0  # the style dataset is exactly the Game Boy ramp
    before = E.style_samples(host, PROMPTS, steps=12)
    res = E.train_style_lora(host, DATA, tmp_path / "out", max_train_epochs=8, learning_rate=1e-2,
                             save_every_n_epochs=None)
    with E.lora_installed(host, res.final_path):
        after = E.style_scores(host, PROMPTS, steps=12, reference=before)
    b = E.mean_delta_e(before["with_trigger"])
    a = after["with_trigger_de"]
    print(f"ceiling {ceiling:.2f}, with trigger {b:.2f} -> {a:.2f}; without "
          f"{E.mean_delta_e(before['without_trigger']):.2f} -> {after['without_trigger_de']:.2f}; pixel change with "
          f"{after['with_trigger_change']:.1f}, without {after['without_trigger_change']:.1f}")
    # measured (seed 0, 6 prompts, 12 DDIM steps, 48 steps of training): ceiling 29.84; with the trigger
    # 31.35 -> 28.59 ΔE00 (the LoRA reaches the ceiling); pixel change with the trigger 28.4/255
    assert b > ceiling + 1.0, (b, ceiling)  # the base does not draw the style by itself
    assert a < b - 1.5, (b, a)
    assert a < ceiling + 0.5, (a, ceiling)  # the gap to what the VAE can draw is closed
    assert after["with_trigger_change"] > 10.0, after


@pytest.mark.skipif(not E.TINY_VPRED.is_dir(), reason="needs sample_data/tiny_dawnlike_vpred")
def test_lora_moves_trigger_samples_into_the_palette_on_the_vpred_model(tmp_path):
    """On ``tiny_dawnlike_vpred`` (v-prediction, a 12-channel VAE trained on recoloured sprites too, so the Game
    Boy ramp survives its round trip: 0.66 in-palette at ΔE00 5) the same quick-start LoRA moves the trigger
    samples *into* the palette: the in-palette fraction rises from about 0 to a quarter of the pixels, and the
    mean ΔE00 to the ramp closes most of the gap to what the VAE can draw."""
    host = E.load_host(E.TINY_VPRED)
    assert host.prediction_type == "v_prediction"  # read from scheduler_config.json: the trainer's target is v
    train = E.load_folder_images(DATA / f"3_{E.TRIGGER}")
    rt = E.vae_round_trip(host, train)
    ip_ceiling, de_ceiling = E.in_palette_fraction(rt), E.mean_delta_e(rt)
    before = E.style_samples(host, PROMPTS, steps=12)
    res = E.train_style_lora(host, DATA, tmp_path / "out", max_train_epochs=8, learning_rate=1e-2,
                             save_every_n_epochs=None)
    with E.lora_installed(host, res.final_path):
        after = E.style_scores(host, PROMPTS, steps=12, reference=before)
    ip_b, ip_a = E.in_palette_fraction(before["with_trigger"]), after["with_trigger"]
    de_b, de_a = E.mean_delta_e(before["with_trigger"]), after["with_trigger_de"]
    print(f"in-palette (ΔE00 5) with trigger {ip_b:.3f} -> {ip_a:.3f} (ceiling {ip_ceiling:.3f}); ΔE00 {de_b:.2f} -> "
          f"{de_a:.2f} (ceiling {de_ceiling:.2f})")
    # measured (seed 0, 6 prompts, 12 DDIM steps, CFG 4, 48 steps, the quick-start settings): in-palette
    # 0.007 -> 0.247 (ceiling 0.661), ΔE00 32.80 -> 8.13 (ceiling 4.36): 87 % of the gap closed
    assert ip_ceiling > 0.5, ip_ceiling  # this VAE can draw the palette (tiny_dawnlike's: 0.000)
    assert ip_b < 0.05, ip_b  # the base does not draw the style by itself
    assert ip_a > 0.15 and ip_a > ip_b + 0.12, (ip_b, ip_a)
    assert de_b > de_ceiling + 15.0, (de_b, de_ceiling)
    assert (de_b - de_a) / (de_b - de_ceiling) > 0.75, (de_b, de_a, de_ceiling)


def test_reg_images_keep_samples_without_the_trigger_in_place(tmp_path):
    """kohya prior preservation (``reg_data_dir``, ``prior_loss_weight`` 1): with DawnLike sprites in their own
    colours and captions without the trigger interleaved (as many as training images × repeats), samples of the
    prompts *without* the trigger change much less than those with it."""
    host = E.load_host()
    before = E.style_samples(host, PROMPTS, steps=12)
    reg = E.write_reg_dataset(tmp_path / "reg", n=48)  # 48 = 16 training images × 3 repeats: no balancing needed
    res = E.train_style_lora(host, DATA, tmp_path / "out", reg_root=reg, max_train_epochs=8, learning_rate=1e-2,
                             save_every_n_epochs=None)
    assert res.global_step == 8 * 12  # 48 training + 48 regularization samples per epoch, batch 8
    with E.lora_installed(host, res.final_path):
        after = E.style_scores(host, PROMPTS, steps=12, reference=before)
    print(f"pixel change with trigger {after['with_trigger_change']:.1f}, without {after['without_trigger_change']:.1f}"
          f" /255; ΔE00 with {E.mean_delta_e(before['with_trigger']):.2f} -> {after['with_trigger_de']:.2f}")
    # measured on the shipped model (seed 0, 6 prompts, 12 DDIM steps, 96 steps): pixel change with the trigger
    # 38.1/255, without 15.4/255 (0.40 of it; without regularization images: 27.4 against 28.4, 0.96 of it)
    assert after["with_trigger_change"] > 10.0, after
    assert after["without_trigger_change"] < 0.6 * after["with_trigger_change"], after
    assert after["without_trigger_change"] < 24.0, after
