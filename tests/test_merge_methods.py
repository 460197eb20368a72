"""Closed-form checks of the merge methods (training/merge/methods.py) on small tensors, and TIES / DARE against
independent reference implementations written here from the papers' algorithm boxes."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from conceptlab.training.merge import methods as M


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def test_weighted_sum_closed_form():
    a, b = _rand(4, 5, seed=1), _rand(4, 5, seed=2)
    for alpha in (0.0, 0.25, 0.5, 1.0):
        out = M.weighted_sum(a, b, alpha)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, (1 - alpha) * a + alpha * b)
    assert torch.equal(M.weighted_sum(a, b, 0.0), a)
    assert torch.equal(M.weighted_sum(a, b, 1.0), b)


def test_weighted_sum_fp16_inputs_computed_in_fp32():
    a = torch.tensor([1.0, 2.0], dtype=torch.float16)
    b = torch.tensor([3.0, 6.0], dtype=torch.float16)
    assert torch.equal(M.weighted_sum(a, b, 0.25), torch.tensor([1.5, 3.0]))


def test_weighted_sum_n_and_warning():
    ts = [_rand(3, seed=i) for i in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = M.weighted_sum_n(ts, [0.2, 0.3, 0.5])
    torch.testing.assert_close(out, 0.2 * ts[0] + 0.3 * ts[1] + 0.5 * ts[2])
    with pytest.warns(UserWarning, match="sum to 2"):
        out = M.weighted_sum_n(ts, [1.0, 0.5, 0.5])
    torch.testing.assert_close(out, ts[0] + 0.5 * ts[1] + 0.5 * ts[2])
    with pytest.raises(ValueError):
        M.weighted_sum_n(ts, [1.0])


def test_add_difference_closed_form():
    a, b, c = (_rand(6, seed=s) for s in (1, 2, 3))
    torch.testing.assert_close(M.add_difference(a, b, c, 0.7), a + 0.7 * (b - c))
    torch.testing.assert_close(M.add_difference(a, c, c, 0.7), a)


def test_train_difference_closed_form():
    a = torch.tensor([0.0, 1.0, 2.0, 5.0])
    b = torch.tensor([1.0, 1.0, 0.0, 5.0])
    c = torch.tensor([0.0, 3.0, 1.0, 5.0])
    out = M.train_difference(a, b, c, 0.5)
    # element 0: D=1, |B-A|=1, |B-C|=1 -> s=0.5 -> A + 0.9*1*0.5*1
    # element 1: D=-2, |B-A|=0 -> s=0 -> A
    # element 2: D=-1, |B-A|=2, |B-C|=1 -> s=2/3 -> A - 0.9*2/3*1
    # element 3: all equal -> A
    expected = torch.tensor([0.45, 1.0, 2.0 - 0.6, 5.0])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(M.train_difference(a, c, c, 1.0), a)


def test_slerp_closed_form_and_fallback():
    a = torch.tensor([1.0, 0.0])
    b = torch.tensor([0.0, 1.0])
    out = M.slerp(a, b, 0.5)
    torch.testing.assert_close(out, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))
    out = M.slerp(a, b, 1.0 / 3.0)  # 30 degrees from a
    torch.testing.assert_close(out, torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)]))
    # parallel -> linear
    torch.testing.assert_close(M.slerp(a, 3 * a, 0.5), torch.tensor([2.0, 0.0]))
    # zero tensor -> linear
    z = torch.zeros(2)
    torch.testing.assert_close(M.slerp(z, b, 0.25), 0.25 * b)
    # norms are interpolated along the arc: endpoints exact
    x, y = _rand(10, seed=4), _rand(10, seed=5)
    torch.testing.assert_close(M.slerp(x, y, 0.0), x)
    torch.testing.assert_close(M.slerp(x, y, 1.0), y)


# ---------------------------------------------------------------------------- independent references
def _ref_ties(base, models, weights, density):
    """TIES per Yadav et al. 2023 Alg. 1, written element by element with plain Python lists."""
    n = base.numel()
    b = base.flatten().tolist()
    taus = []
    for m in models:
        tau = [x - y for x, y in zip(m.flatten().tolist(), b)]
        k = int(round(density * n))
        order = sorted(range(n), key=lambda i: -abs(tau[i]))
        keep = set(order[:k])
        taus.append([tau[i] if i in keep else 0.0 for i in range(n)])
    out = []
    for i in range(n):
        s = sum(w * t[i] for w, t in zip(weights, taus))
        sign = (s > 0) - (s < 0)
        num = den = 0.0
        for w, t in zip(weights, taus):
            v = w * t[i]
            if v != 0 and ((v > 0) - (v < 0)) == sign:
                num += v
                den += w
        out.append(b[i] + (num / den if den else 0.0))
    return torch.tensor(out).reshape(base.shape)


def test_trim_top_k():
    tau = torch.tensor([0.1, -5.0, 3.0, -0.2, 0.05])
    assert torch.equal(M.trim_top_k(tau, 0.4), torch.tensor([0.0, -5.0, 3.0, 0.0, 0.0]))
    assert torch.equal(M.trim_top_k(tau, 1.0), tau)
    assert torch.equal(M.trim_top_k(tau, 0.0), torch.zeros(5))
    with pytest.raises(ValueError):
        M.trim_top_k(tau, 1.5)


def test_ties_hand_example():
    # two task vectors over base 0; density 1 (no trim): sign election and disjoint mean by hand
    base = torch.zeros(4)
    t1 = torch.tensor([1.0, -2.0, 3.0, 0.0])
    t2 = torch.tensor([3.0, 1.0, -1.0, 2.0])
    out = M.ties(base, [t1, t2], [1.0, 1.0], density=1.0)
    # e0: both +, mean 2; e1: sum -1 -> elect -, only t1 agrees -> -2; e2: sum 2 -> +, t1 -> 3; e3: only t2 -> 2
    assert torch.equal(out, torch.tensor([2.0, -2.0, 3.0, 2.0]))


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.3, 0.7), (1.0, 1.0, 1.0)])
def test_ties_matches_reference(density, weights):
    base = _rand(5, 7, seed=10)
    models = [base + _rand(5, 7, seed=20 + i) for i in range(len(weights))]
    out = M.ties(base, models, list(weights), density=density)
    torch.testing.assert_close(out, _ref_ties(base, models, list(weights), density), atol=1e-5, rtol=1e-5)


def test_ties_via_merge_tensor_two_and_three_models():
    a, b, c = _rand(30, seed=1), _rand(30, seed=2), _rand(30, seed=3)
    out3 = M.merge_tensor("ties", "k", a, b, c, 0.6, density=0.5)
    torch.testing.assert_close(out3, _ref_ties(c, [a, b], [0.4, 0.6], 0.5), atol=1e-5, rtol=1e-5)
    out2 = M.merge_tensor("ties", "k", a, b, None, 0.6, density=0.5)
    torch.testing.assert_close(out2, a + 0.6 * M.trim_top_k(b - a, 0.5), atol=1e-6, rtol=1e-6)


def _ref_dare(base, models, weights, density, seed, key):
    """DARE per Yu et al. 2023 Eq. 2: m ~ Bernoulli(p = 1 - density) drops, kept entries / (1 - p)."""
    out = base.clone().float()
    for i, (m, w) in enumerate(zip(models, weights)):
        g = torch.Generator().manual_seed(M.key_seed(seed, key, i))
        u = torch.rand(base.shape, generator=g)
        p = 1.0 - density
        dropped = u >= density  # drop with probability p
        tau = (m - base).float()
        tau_hat = tau.clone()
        tau_hat[dropped] = 0.0
        tau_hat = tau_hat / (1.0 - p)
        out = out + w * tau_hat
    return out


def test_dare_matches_reference_and_is_deterministic():
    base = _rand(40, 3, seed=1)
    models = [base + _rand(40, 3, seed=2), base + _rand(40, 3, seed=3)]
    out = M.dare(base, models, [0.5, 0.5], density=0.3, seed=7, key="model.diffusion_model.out.2.weight")
    ref = _ref_dare(base, models, [0.5, 0.5], 0.3, 7, "model.diffusion_model.out.2.weight")
    torch.testing.assert_close(out, ref)
    again = M.dare(base, models, [0.5, 0.5], density=0.3, seed=7, key="model.diffusion_model.out.2.weight")
    assert torch.equal(out, again)
    other = M.dare(base, models, [0.5, 0.5], density=0.3, seed=8, key="model.diffusion_model.out.2.weight")
    assert not torch.equal(out, other)


def test_dare_statistics_and_limits():
    base = torch.zeros(20000)
    m = torch.ones(20000)
    out = M.dare(base, [m], [1.0], density=0.25, seed=0, key="x")
    kept = (out != 0).float().mean().item()
    assert abs(kept - 0.25) < 0.02                       # keep probability
    assert torch.all((out == 0) | (out == 4.0))          # rescale 1 / (1 - p)
    assert abs(out.mean().item() - 1.0) < 0.1            # unbiased in expectation
    a, b = _rand(10, seed=1), _rand(10, seed=2)
    torch.testing.assert_close(M.merge_tensor("dare", "k", a, b, None, 0.3, density=1.0), M.weighted_sum(a, b, 0.3))


def test_dare_seed_is_key_name_based_not_prefix_based():
    # the same UNet weight seen from a file (model.diffusion_model.) and from a ComfyUI patcher
    # (diffusion_model.) draws the same mask
    assert M.key_seed(3, "model.diffusion_model.in.0.weight") == M.key_seed(3, "diffusion_model.in.0.weight")
    assert M.key_seed(3, "model.diffusion_model.in.0.weight") != M.key_seed(3, "model.diffusion_model.in.1.weight")
    assert M.key_seed(3, "cond_stage_model.transformer.text_model.x") == M.key_seed(3, "clip_l.transformer.text_model.x")


def test_merge_tensor_errors_and_alpha_warning():
    a, b = torch.zeros(2), torch.ones(2)
    with pytest.raises(ValueError, match="third model"):
        M.merge_tensor("add_difference", "k", a, b, None, 0.5)
    with pytest.raises(ValueError, match="unknown merge method"):
        M.merge_tensor("average", "k", a, b, None, 0.5)
    with pytest.warns(UserWarning, match="outside"):
        assert M.check_alpha(1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert M.check_alpha(0.5) == []
    with pytest.raises(ValueError):
        M.check_alpha(float("nan"))
