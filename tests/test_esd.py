"""ESD erasure core (training/esd/erase.py) on a tiny diffusers UNet + text encoder built in the test."""

import copy

import pytest
import torch
from torch import nn

from conceptlab.training.esd.config import ESDConfig
from conceptlab.training.esd.erase import (ESDCancelled, METHODS, count_parameters, erase, erased_weights,
                                           paper_eta_from_reference, paper_target, reference_target, select_targets)
from tiny_models import sd15_unet_meta, tiny_host

FAST = dict(concepts="Van Gogh", width=32, height=32, ddim_steps=3, lr=1e-3, noised_cache=1)


@pytest.fixture(scope="module")
def host():
    """One tiny host shared by the tests: erase() never modifies base weights and removes its deltas."""
    return tiny_host()


def _unet_modules(unet):
    return {n: m for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def test_sd15_parameter_counts_on_meta_device():
    mods = _unet_modules(sd15_unet_meta())
    assert count_parameters(select_targets(mods, "esd-x")) == (80, 43_962_560)
    strict = select_targets(mods, "esd-x-strict")
    assert len(strict) == 32 and all(t.path.split(".")[-1] in ("to_k", "to_v") for t in strict)
    u = select_targets(mods, "esd-u")
    assert not any("attn2" in t.path for t in u)
    n_all = count_parameters(select_targets(mods, "esd-all"))[1]
    assert count_parameters(u)[1] + 43_962_560 == n_all


def test_eta_conventions_agree():
    g = torch.Generator().manual_seed(0)
    e_c, e_u = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for eta in (0.5, 1.0, 3.0):
        ref = reference_target(e_c, e_c, e_u, eta + 1.0)
        assert torch.allclose(paper_target(e_c, e_u, eta), ref, atol=1e-6)
    assert paper_eta_from_reference(2.0) == 1.0
    # the paper's formula written out: eps_u - eta * (eps_c - eps_u)
    assert torch.allclose(paper_target(e_c, e_u, 1.0), 2 * e_u - e_c)


@pytest.mark.parametrize("source", ["self_sample", "noised"])
def test_loss_equals_independent_two_model_implementation(source, host):
    """The loop's loss (one model, deltas switched off) equals the paper formula computed with two UNets."""
    frozen_unet = copy.deepcopy(host.unet)
    seen = []

    def grab(info):
        seen.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in info.items() if k != "losses"})

    erase(host, ESDConfig(**FAST, iterations=2, xt_source=source, negative_guidance=1.5), progress=grab)
    # iteration 1: deltas are still zero, so the trained UNet equals the frozen one
    info = seen[0]
    x, t = info["x_t"], torch.tensor([info["timestep"]])
    with torch.no_grad():
        c = host.text_encoder(host.tokenizer([info["prompt"]]))[0]
        u = host.text_encoder(host.tokenizer([""]))[0]
        e_c = frozen_unet(x, t, encoder_hidden_states=c).sample
        e_u = frozen_unet(x, t, encoder_hidden_states=u).sample
        target = e_u - 1.5 * (e_c - e_u)
        expected = ((e_c - target) ** 2).mean()
    assert info["loss"] == pytest.approx(float(expected), rel=1e-4, abs=1e-9)


def test_loss_with_trained_deltas_matches_two_model_formula_and_masks(host):
    """After some training, the loss equals MSE(trained copy, frozen target) with the masked mean."""
    frozen_unet = copy.deepcopy(host.unet)
    seen = []
    res = erase(host, ESDConfig(**FAST, iterations=3, xt_source="noised", masks="grid", mask_mode="sample"),
                progress=lambda i: seen.append(dict(i)))
    # rebuild the state *before* iteration 3's update: rerun 2 iterations with the same seed
    res2 = erase(host, ESDConfig(**FAST, iterations=2, xt_source="noised", masks="grid",
                                        mask_mode="sample"))
    trained = copy.deepcopy(frozen_unet)
    sd = trained.state_dict()
    for (_, path, attr), d in res2.deltas.items():
        sd[f"{path}.{attr}"] += d
    trained.load_state_dict(sd)
    info = seen[2]
    x, t = info["x_t"], torch.tensor([info["timestep"]])
    mask = res.masks[res.mask_names.index(info["mask"])]
    with torch.no_grad():
        c = host.text_encoder(host.tokenizer([info["prompt"]]))[0]
        u = host.text_encoder(host.tokenizer([""]))[0]
        e_c, e_u = (frozen_unet(x, t, encoder_hidden_states=e).sample for e in (c, u))
        target = e_u - (e_c - e_u)
        err = (trained(x, t, encoder_hidden_states=c).sample - target) ** 2
        expected = (err * mask).sum() / (mask.sum() * err.shape[1])
    assert info["loss"] == pytest.approx(float(expected), rel=1e-4)


@pytest.mark.parametrize("method", ["esd-x", "esd-x-strict"])
def test_only_selected_parameters_change(method, host):
    before = {k: v.clone() for k, v in host.unet.state_dict().items()}
    te_before = {k: v.clone() for k, v in host.text_encoder.state_dict().items()}
    res = erase(host, ESDConfig(**FAST, iterations=3, method=method, xt_source="noised"))
    # the base model is never modified and no delta is left installed
    assert host.installed_deltas() == {}
    after = host.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(te_before[k], v) for k, v in host.text_encoder.state_dict().items())
    # the erased model = base + deltas differs exactly on the selected tensors
    selected = {f"{p}.{a}" for (_, p, a) in res.deltas}
    expected = {f"{t.path}.{t.attr}" for t in select_targets(host.modules("unet"), method)}
    assert selected == expected
    erased = erased_weights(host, res)
    for k, v in before.items():
        key = f"unet.{k}"
        if k in selected:
            assert not torch.equal(erased[key], v.float()), f"{k} should have been trained"
        else:
            assert key not in erased
    if method == "esd-x-strict":
        assert all(k.rsplit(".", 2)[-2] in ("to_k", "to_v") for k in selected)


def test_seed_makes_runs_identical_and_other_seeds_differ(host):
    cfg = dict(FAST, iterations=3, masks="grid", variations=5, prompt_order="sample")
    a = erase(host, ESDConfig(**cfg, seed=7))
    b = erase(host, ESDConfig(**cfg, seed=7))
    c = erase(host, ESDConfig(**cfg, seed=8))
    assert a.losses == b.losses
    assert all(torch.equal(a.deltas[k], b.deltas[k]) for k in a.deltas)
    assert a.stats["prompt_usage"] == b.stats["prompt_usage"]
    assert a.losses != c.losses


def test_stats_and_metadata_contents(host):
    res = erase(host, ESDConfig(**FAST, iterations=4, masks="grid", mask_mode="sum", variations=3))
    s, m = res.stats, res.metadata
    assert len(s["losses"]) == 4 and s["iterations_done"] == 4
    assert s["loss_avg_last_20"] == pytest.approx(sum(s["losses"]) / 4)
    assert sum(s["prompt_usage"].values()) == 4 and len(m["prompts"]) == 3
    assert s["mask_usage"] == {n: 4 for n in res.mask_names}  # "sum" uses every mask every iteration
    assert s["trained_tensors"] == len(res.deltas) and s["trained_parameters"] > 0
    assert s["iterations_per_s"] > 0 and s["wall_time_s"] > 0
    assert m["negative_guidance"] == 1.0 and m["negative_guidance_esd_sd_py"] == 2.0
    assert len(m["mask_weights"]) == 10 and abs(sum(m["mask_weights"]) - 1) < 1e-6
    assert len(m["base_model_hash"]) == 64


def test_cancel_by_return_and_by_raise_keeps_partial_result(host):
    res = erase(host, ESDConfig(**FAST, iterations=10, xt_source="noised"),
                progress=lambda i: i["iteration"] < 2 and None)
    assert res.cancelled and res.stats["iterations_done"] == 2 and len(res.losses) == 2

    def boom(info):
        if info["iteration"] == 3:
            raise InterruptedError("user pressed cancel")

    with pytest.raises(ESDCancelled) as ei:
        erase(host, ESDConfig(**FAST, iterations=10, xt_source="noised"), progress=boom)
    assert isinstance(ei.value.__cause__, InterruptedError)
    part = ei.value.result
    assert part.cancelled and part.stats["iterations_done"] == 3
    assert any(bool(d.abs().sum() > 0) for d in part.deltas.values())
    assert host.installed_deltas() == {}


def test_v_prediction_model_trains():
    res = erase(tiny_host(prediction_type="v_prediction"), ESDConfig(**FAST, iterations=2))
    assert res.metadata["prediction_type"] == "v_prediction"
    assert all(torch.isfinite(torch.tensor(res.losses)))


def test_bad_inputs_raise_clear_errors(host):
    with pytest.raises(ValueError, match="no concept"):
        erase(host, ESDConfig(**dict(FAST, concepts="  "), iterations=1))
    with pytest.raises(ValueError, match="non-empty"):
        erase(host, ESDConfig(**FAST, iterations=1, masks=torch.zeros(0, 8, 8)))
    with pytest.raises(ValueError, match="aspect ratio"):
        erase(host, ESDConfig(**FAST, iterations=1, masks=torch.ones(2, 32, 16)))
    with pytest.raises(ValueError, match="unknown method"):
        erase(host, ESDConfig(**FAST, iterations=1, method="esd-z"))
    with pytest.raises(ValueError, match="multiple of"):
        erase(host, ESDConfig(**dict(FAST, width=36), iterations=1))
    # pixel-sized masks of the right aspect ratio are resized
    res = erase(host, ESDConfig(**FAST, iterations=1, xt_source="noised", masks=torch.ones(2, 32, 32)))
    assert res.masks.shape == (2, 4, 4)
    assert host.installed_deltas() == {}


def test_model_without_cross_attention_is_refused():
    from diffusers import UNet2DConditionModel

    from conceptlab.training.diffusers_host import DiffusersHost
    from tiny_models import tiny_text_encoder, word_hash_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                down_block_types=("DownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "UpBlock2D"), mid_block_type=None,
                                cross_attention_dim=32, norm_num_groups=8)
    host = DiffusersHost(unet, tiny_text_encoder(), word_hash_tokenizer, None)
    with pytest.raises(ValueError, match="no cross-attention"):
        erase(host, ESDConfig(**FAST, iterations=1))


def test_nan_guard_stops_with_clear_error_and_touches_nothing():
    host = tiny_host()
    with torch.no_grad():
        host.unet.conv_in.weight[0, 0, 0, 0] = float("nan")
    before = host.unet.conv_in.weight.clone()
    with pytest.raises(FloatingPointError, match="NaN") as ei:
        erase(host, ESDConfig(**FAST, iterations=10, xt_source="noised", max_nan_skips=2))
    assert ei.value.result.stats["nan_skipped"] == 3
    assert host.installed_deltas() == {}
    assert torch.equal(host.unet.conv_in.weight.nan_to_num(), before.nan_to_num())


def test_methods_constant_lists_all_reference_sets():
    assert set(METHODS) == {"esd-x", "esd-x-strict", "esd-u", "esd-all"}


def test_cancel_check_stops_within_an_iteration(host):
    calls = {"n": 0}

    def check():
        calls["n"] += 1
        if calls["n"] == 3:
            raise InterruptedError("cancel")

    with pytest.raises(ESDCancelled) as ei:
        erase(host, ESDConfig(**FAST, iterations=5, xt_source="self_sample"), cancel_check=check)
    assert isinstance(ei.value.__cause__, InterruptedError)
    assert ei.value.result.stats["iterations_done"] < 2 and calls["n"] == 3
    assert host.installed_deltas() == {}
