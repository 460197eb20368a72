"""ESD extensions of issue 15: attribute erasure (erase_from), the all-masks schedule and its presets, concept kinds
in the metadata. Independent two-UNet re-computations of the reference formulas on a tiny model."""

import copy

import pytest
import torch

from conceptlab.training.esd.config import ESDConfig
from conceptlab.training.esd.erase import erase
from conceptlab.training.esd.masks import default_mask_weights, grid_masks
from tiny_models import tiny_host

FAST = dict(width=32, height=32, ddim_steps=3, lr=1e-3, noised_cache=1)


@pytest.fixture(scope="module")
def host():
    return tiny_host()


def _grab(store):
    def fn(info):
        store.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in info.items() if k != "losses"})
    return fn


def _emb(host, prompt):
    with torch.no_grad():
        return host.text_encoder(host.tokenizer([prompt]))[0]


@pytest.mark.parametrize("source", ["self_sample", "noised"])
def test_erase_from_target_equals_esd_sd_py_on_the_same_draws(host, source):
    """esd_sd.py lines 143-191: loss = MSE(esd_unet(x_t, from), ε*(from) − η_ref·(ε*(c) − ε*(∅))), with the
    trained model conditioned on the from-prompt; η_ref = η + 1. Checked on iteration 1 (trained = frozen) and
    iteration 2 (trained = frozen + the deltas of a 1-iteration run with the same seed)."""
    frozen = copy.deepcopy(host.unet)
    seen = []
    eta = 1.5
    cfg = dict(FAST, concepts="cowboy hat", erase_from="a cowboy", xt_source=source, negative_guidance=eta,
               seed=3)
    erase(host, ESDConfig(**cfg, iterations=2), progress=_grab(seen))
    one = erase(host, ESDConfig(**cfg, iterations=1))
    trained = copy.deepcopy(frozen)
    sd = trained.state_dict()
    for (_, path, attr), d in one.deltas.items():
        sd[f"{path}.{attr}"] += d
    trained.load_state_dict(sd)
    e_c, e_from, e_null = _emb(host, "cowboy hat"), _emb(host, "a cowboy"), _emb(host, "")
    for info, model in ((seen[0], frozen), (seen[1], trained)):
        assert info["erase_from"] == "a cowboy" and info["prompt"] == "cowboy hat"
        x, t = info["x_t"], torch.tensor([info["timestep"]])
        with torch.no_grad():
            noise_pred_erase = frozen(x, t, encoder_hidden_states=e_c).sample
            noise_pred_null = frozen(x, t, encoder_hidden_states=e_null).sample
            noise_pred_erase_from = frozen(x, t, encoder_hidden_states=e_from).sample
            noise_pred_esd_model = model(x, t, encoder_hidden_states=e_from).sample
            target = noise_pred_erase_from - (eta + 1.0) * (noise_pred_erase - noise_pred_null)
            expected = torch.nn.functional.mse_loss(noise_pred_esd_model, target)
        assert info["loss"] == pytest.approx(float(expected), rel=1e-4, abs=1e-9)
        # the attribute target differs from the plain ESD target (else the test could not tell them apart)
        plain = noise_pred_null - eta * (noise_pred_erase - noise_pred_null)
        assert float((plain - target).abs().max()) > 1e-3


def test_erase_from_samples_x_t_with_the_from_prompt(host):
    """esd_sd.py line 132: x_t is sampled with the from-prompt — same seed, same draws as erasing the from-prompt."""
    a, b = [], []
    erase(host, ESDConfig(**FAST, concepts="cowboy hat", erase_from="a cowboy", iterations=1, seed=5),
          progress=_grab(a))
    erase(host, ESDConfig(**FAST, concepts="a cowboy", iterations=1, seed=5), progress=_grab(b))
    assert a[0]["timestep"] == b[0]["timestep"]
    assert torch.equal(a[0]["x_t"], b[0]["x_t"])
    c = []
    erase(host, ESDConfig(**FAST, concepts="cowboy hat", iterations=1, seed=5), progress=_grab(c))
    assert not torch.equal(a[0]["x_t"], c[0]["x_t"])


def test_erase_from_lines_pair_with_prompts_and_are_recorded(host):
    seen = []
    res = erase(host, ESDConfig(**FAST, concepts="cowboy hat", erase_from="a cowboy\na rodeo rider",
                                prompts="cowboy hat\na cowboy hat on a table", iterations=4, xt_source="noised"),
                progress=_grab(seen))
    assert [s["erase_from"] for s in seen] == ["a cowboy", "a rodeo rider"] * 2
    m = res.metadata
    assert m["erase_from"] == ["a cowboy", "a rodeo rider"]
    assert m["concept_kinds"] == {"cowboy hat": "attribute"} and m["concept_kind_source"] == "inferred"
    assert m["prompt_source"] == "user_prompts"


def test_all_masks_loss_is_the_weighted_sum_of_masked_means(host):
    """mask_mode "sum" (and the "grid-sum" preset): L = Σ_i w_i · Σ m_i (pred−target)² / (C·Σ m_i)."""
    frozen = copy.deepcopy(host.unet)
    seen = []
    res = erase(host, ESDConfig(**FAST, concepts="Van Gogh", iterations=1, xt_source="noised", mask_mode="grid-sum"),
                progress=_grab(seen))
    info = seen[0]
    assert info["mask"] == "all"
    masks, names = grid_masks(4, 4, 3, 0.5)
    w = default_mask_weights(masks)
    assert res.mask_names == names and torch.allclose(res.mask_weights, w)
    x, t = info["x_t"], torch.tensor([info["timestep"]])
    with torch.no_grad():
        e_c = frozen(x, t, encoder_hidden_states=_emb(host, "Van Gogh")).sample
        e_u = frozen(x, t, encoder_hidden_states=_emb(host, "")).sample
        err = (e_c - (e_u - (e_c - e_u))) ** 2
    expected = sum(float(w[i]) * float((err * masks[i]).sum() / (masks[i].sum() * err.shape[1]))
                   for i in range(masks.shape[0]))
    assert info["loss"] == pytest.approx(expected, rel=1e-4)
    assert res.stats["mask_usage"] == {n: 1 for n in names}
    assert res.metadata["mask_mode"] == "sum" and res.metadata["mask_preset"] == "grid-sum"


def test_mask_presets_equal_their_explicit_settings_and_refuse_conflicts(host):
    for preset, mode in (("grid-sum", "sum"), ("grid-sample", "sample")):
        a = erase(host, ESDConfig(**FAST, concepts="Van Gogh", iterations=2, xt_source="noised", mask_mode=preset))
        b = erase(host, ESDConfig(**FAST, concepts="Van Gogh", iterations=2, xt_source="noised", masks="grid",
                                  mask_mode=mode))
        assert a.losses == b.losses and a.stats["mask_usage"] == b.stats["mask_usage"]
    assert ESDConfig().mask_mode == "sum"
    with pytest.raises(ValueError, match="builds its own grid"):
        ESDConfig(concepts="x", masks=torch.ones(2, 4, 4), mask_mode="grid-sum").validate()
    with pytest.raises(ValueError, match="unknown concept kind"):
        ESDConfig(concepts="x", concept_kind="landscape").validate()


def test_metadata_records_kinds_and_prompts(host):
    res = erase(host, ESDConfig(**FAST, concepts="Claude Monet; cowboy hat", variations=4, iterations=1,
                                xt_source="noised"))
    m = res.metadata
    assert m["concept_kinds"] == {"Claude Monet": "style", "cowboy hat": "object"}
    assert m["prompt_source"] == "builtin_templates" and len(m["prompts"]) == 8
    assert "a painting by Claude Monet" in m["prompts"]
    assert not any("Monet" in p and "cowboy" in p for p in m["prompts"])
    res2 = erase(host, ESDConfig(**FAST, concepts="Claude Monet", concept_kind="person", variations=3,
                                 iterations=1, xt_source="noised"))
    assert res2.metadata["concept_kinds"] == {"Claude Monet": "person"}
    assert res2.metadata["concept_kind_source"] == "user"
    assert not any("painting" in p for p in res2.metadata["prompts"])
