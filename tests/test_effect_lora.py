"""Effect: a LoRA trained on the tiny DawnLike model moves the samples of its trigger prompts toward the Game Boy
palette of its training images.

Fixed seeds; margins measured on the shipped model (README "Evidence"). The measure is the mean CIEDE2000
distance of sample pixels to the nearest Game Boy colour: the in-palette fraction at ΔE00 5 stays ~0 on this
model before and after (its VAE returns colours ~17/255 off on average), so it cannot show a change here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import effect_lib as E  # noqa: E402

pytestmark = pytest.mark.skipif(not (E.TINY_MODEL.is_dir() and (E.DATA / "sprites").is_dir()),
                                reason="needs sample_data/tiny_dawnlike and ../shared/data/dawnlike")

PROMPTS = [f"{E.TRIGGER}, {p}" for p in E.STYLE_EVAL_PROMPTS[:6]]


def test_lora_moves_trigger_samples_toward_the_palette(tmp_path):
    host = E.load_host()
    before = E.mean_delta_e(E.sample(host, PROMPTS, steps=12))
    res = E.train_style_lora(host, E.REPO / "sample_data" / "gameboy", tmp_path / "out", max_train_epochs=8,
                             learning_rate=1e-2, save_every_n_epochs=None)
    with E.lora_installed(host, res.final_path):
        after = E.mean_delta_e(E.sample(host, PROMPTS, steps=12))
    # measured (seed 0, 6 prompts, 12 DDIM steps, 48 steps of training): 31.4 -> 28.5 ΔE00
    assert before > 29.0, before
    assert after < before - 1.5, (before, after)
