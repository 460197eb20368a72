"""Effect: ESD-x on the tiny DawnLike model changes only cross-attention (attn2) weights, and the erased concept's
samples move away from it more than the other concepts' samples do, as judged by a CNN trained on the real
sprites (held-out accuracy asserted first, so the judge itself is checked).

Fixed seeds; the full comparison (self_sample vs noised, whole vs grid masks, 1 vs 100 prompt variations) is in
benchmarks/effect.py and README "Evidence".
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import effect_lib as E  # noqa: E402

pytestmark = pytest.mark.skipif(not (E.TINY_MODEL.is_dir() and (E.DATA / "sprites").is_dir()),
                                reason="needs sample_data/tiny_dawnlike and ../shared/data/dawnlike")


@pytest.fixture(scope="module")
def erased():
    from conceptlab.training.esd.erase import erased_weights

    host = E.load_host()
    res = E.erase_concept(host, "wall", iterations=40)
    return host, erased_weights(host, res)


def test_esd_x_changes_only_attn2(erased):
    host, w = erased
    rep = E.diff_report(host, w, name="esd wall")
    changed = {k for k, v in rep["by_layer_type"].items() if (v.get("frac_changed") or 0) > 0}
    assert changed and all(k.startswith("attn2") for k in changed), changed
    assert {k.split(".")[-2] for k in w} >= {"to_k", "to_v"}, sorted(w)[:4]


def test_sprite_classifier_is_a_competent_judge():
    rep = E.train_classifier(epochs=8)
    assert rep.heldout_accuracy > 0.7, rep  # six groups: chance is ~0.17


def test_esd_erases_wall_more_than_the_other_groups(erased):
    host, w = erased
    clf = E.train_classifier(epochs=8).classifier
    base = E.concept_hit_rates(host, clf, k=8, steps=12)
    with E.weights_patched(host, w):
        after = E.concept_hit_rates(host, clf, k=8, steps=12)
    drop = base["wall"] - after["wall"]
    others = [abs(after[c] - base[c]) for c in E.CONCEPTS if c != "wall"]
    # measured on the shipped model (seed 0, 8 prompts per group, 12 DDIM steps, 40 iterations):
    # wall 0.875 -> 0.625, every other group unchanged. Margins: at least 2 of 8 samples, others at most 1.
    assert base["wall"] >= 0.75, base
    assert drop >= 0.2, (base, after)
    assert max(others) <= 0.125 and drop > max(others), (base, after)
