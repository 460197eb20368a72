"""Effect: a LoRA trained on the tiny DawnLike model learns a palette style tied to its trigger word, and a
weighted-sum merge of the LoRA-baked model moves the style monotonically.

Fixed seeds; margins measured on the shipped model (benchmarks/effect.py prints the full numbers; README
"Evidence"). The style score is the fraction of sample pixels within ΔE00 5 of the Game Boy ramp.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import effect_lib as E  # noqa: E402

pytestmark = pytest.mark.skipif(not (E.TINY_MODEL.is_dir() and (E.DATA / "sprites").is_dir()),
                                reason="needs sample_data/tiny_dawnlike and ../shared/data/dawnlike")

PROMPTS = E.STYLE_EVAL_PROMPTS[:4]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    host = E.load_host()
    before = E.style_scores(host, PROMPTS, steps=12)
    data = E.write_style_dataset(tmp / "data", n=16, repeats=3)
    res = E.train_style_lora(host, data, tmp / "out", max_train_epochs=4)
    return host, res, before


def test_lora_learns_the_style_with_its_trigger(trained):
    host, res, before = trained
    with E.lora_installed(host, res.final_path):
        after = E.style_scores(host, PROMPTS, steps=12)
    # measured on the shipped model: see README "Evidence" for the numbers behind these margins
    assert before["with_trigger"] < 0.2, before
    assert after["with_trigger"] > before["with_trigger"] + 0.3, (before, after)
    # the trigger carries the style: prompts without it move less than prompts with it
    gain_with = after["with_trigger"] - before["with_trigger"]
    gain_without = after["without_trigger"] - before["without_trigger"]
    assert gain_with > gain_without + 0.1, (before, after)


def test_weighted_sum_merge_moves_the_style_monotonically(trained):
    from conceptlab.training.merge import weighted_sum

    host, res, _ = trained
    base = E.model_state(host)
    with E.lora_installed(host, res.final_path):
        baked = E.model_state(host)
    changed = [k for k in base if not torch.equal(base[k], baked[k])]
    assert changed, "the LoRA changed no UNet weight"
    scores = []
    for a in (0.0, 0.5, 1.0):
        with E.weights_patched(host, {k: weighted_sum(base[k], baked[k], a) for k in changed}):
            scores.append(E.style_scores(host, PROMPTS, steps=12)["with_trigger"])
    assert scores[0] < scores[1] < scores[2], scores
    assert scores[2] - scores[0] > 0.2, scores
