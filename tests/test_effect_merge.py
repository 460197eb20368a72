"""Effect: merging a LoRA-baked checkpoint with its base interpolates the style. On ``tiny_dawnlike_vpred`` (whose VAE can draw the palette, so the
style is large: ΔE00 32 → 8), a
weighted sum base ⊕ baked at α = 0, ¼, ½, 1 moves the trigger samples' mean ΔE00 to the Game Boy ramp monotonically
from the base's to the LoRA's, and α = 1 draws what the LoRA installed on the base draws (the baked weights are the
LoRA's activation-space deltas folded into W, kohya ``networks/merge_lora.py``'s W + scale·up·down).

Fixed seeds; the full α sweep and add-difference onto second bases are in benchmarks/effect.py (README "Evidence").
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import effect_lib as E  # noqa: E402

pytestmark = pytest.mark.skipif(not (E.TINY_VPRED.is_dir() and (E.DATA / "sprites").is_dir()),
                                reason="needs sample_data/tiny_dawnlike_vpred and ../shared/data/dawnlike")

PROMPTS = E.STYLE_EVAL_PROMPTS[:4]


def test_weighted_sum_of_base_and_lora_baked_checkpoint_moves_the_style_monotonically(tmp_path):
    from conceptlab.training.merge.methods import weighted_sum

    host = E.load_host(E.TINY_VPRED)
    res = E.train_style_lora(host, E.REPO / "sample_data" / "gameboy", tmp_path / "out", save_every_n_epochs=None)
    base = E.model_state(host)
    baked = E.baked_state(host, res.final_path)
    assert not host.installed_deltas(), "baked_state must leave the host as it found it"
    changed = [k for k in base if not torch.equal(base[k], baked[k])]
    assert changed and all(k.split(".")[-1] in ("weight", "bias") for k in changed)
    de = []
    for a in (0.0, 0.25, 0.5, 1.0):
        with E.weights_patched(host, {k: weighted_sum(base[k], baked[k], a) for k in changed}):
            de.append(E.style_scores(host, PROMPTS, steps=12)["with_trigger_de"])
    with E.lora_installed(host, res.final_path):
        installed = E.style_scores(host, PROMPTS, steps=12)["with_trigger_de"]
    print(f"ΔE00 with trigger at α 0 / 0.25 / 0.5 / 1: {de}; LoRA installed: {installed:.2f}")
    # measured (seed 0, 4 prompts, 12 DDIM steps, the quick-start LoRA): α 0 / 0.25 / 0.5 / 1 → 33.28 / 9.19 / 8.42 / 8.14,
    # LoRA installed 8.14 (most of the style arrives by α = ¼ on this model)
    assert all(x > y + 0.05 for x, y in zip(de, de[1:])), de  # monotone
    assert de[0] - de[-1] > 15.0, de
    assert abs(de[-1] - installed) < 0.1, (de[-1], installed)  # baked = installed
