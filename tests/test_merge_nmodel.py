"""Model Stock, DELLA, the TIES / SLERP convention options against sd-mecha's own functions on the same inputs, and
N-model merges (file to file, CLI)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conceptlab.cli import main as cli_main
from conceptlab.training.merge import methods as M
from conceptlab.training.merge import files as MF
from conceptlab.training.merge import nmodel as MN

from test_merge_files import make_sd, write

SHAPES = [(7, 11), (13,), (4, 3, 3, 3)]


def _rand(seed, shape, scale=1.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.fixture(scope="module")
def mecha():
    pytest.importorskip("sd_mecha", reason="sd-mecha (test extra) not installed: reference comparison skipped")
    from sd_mecha.extensions.builtin.merge_methods import linear, ties

    return ties, linear


# --------------------------------------------------------------------------------------------- vs sd-mecha
@pytest.mark.parametrize("shape", SHAPES)
def test_model_stock_equals_sd_mecha_for_two_models(mecha, shape):
    ties, _ = mecha
    base = _rand(0, shape)
    models = [base + _rand(1, shape, 0.1) + 0.05 * _rand(9, shape), base + _rand(2, shape, 0.1) + 0.05 * _rand(9, shape)]
    ours = MN.model_stock(base, models)
    ref = base + ties.model_stock.__wrapped__(*[m - base for m in models], cos_eps=1e-6)
    assert torch.allclose(ours, ref, rtol=1e-6, atol=1e-7)


def test_model_stock_ratio_follows_the_angle():
    base = torch.zeros(3, 64)
    tau = _rand(3, (3, 64))
    same = MN.model_stock(base, [base + tau, base + tau, base + tau])      # cos = 1 -> t = 1
    assert torch.allclose(same, tau, atol=1e-6)
    u = torch.zeros(2, 4)
    u[:, 0] = 1.0
    v = torch.zeros(2, 4)
    v[:, 1] = 1.0
    assert torch.equal(MN.model_stock(torch.zeros(2, 4), [u, v]), torch.zeros(2, 4))  # orthogonal -> t = 0: base
    # all pairs (mergekit): the order of the models does not matter
    ms = [_rand(10 + i, (5, 9)) for i in range(3)]
    z = torch.zeros(5, 9)
    assert torch.allclose(MN.model_stock(z, ms), MN.model_stock(z, ms[::-1]), atol=1e-6)


@pytest.mark.parametrize("sign,vote_sgn", [("count", False), ("sum", True)])
@pytest.mark.parametrize("shape", SHAPES)
def test_della_global_rescale_equals_sd_mecha(mecha, sign, vote_sgn, shape):
    ties, _ = mecha
    base = _rand(0, shape)
    models = [base + _rand(i + 1, shape, 0.1) for i in range(3)]
    density, eps = 0.4, 0.2
    ours = MN.della(base, models, [1.0, 1.0, 1.0], density=density, epsilon=eps,
                    generator=torch.Generator().manual_seed(1234), sign=sign, rescale="global")
    ref = base + ties.ties_sum_with_dropout.__wrapped__(
        *[m - base for m in models], probability=1 - density, della_eps=eps, rescale=True, k=1.0,
        vote_sgn=vote_sgn, apply_stock=True,  # sd-mecha 1.1.x applies the Model Stock ratio when apply_stock=False
        seed=1234)
    assert torch.equal(ours == base, ref == base)          # the same entries dropped / kept (same draws)
    assert torch.allclose(ours, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sign,vote_sgn", [("count", False), ("sum", True)])
def test_ties_sign_election_equals_sd_mecha(mecha, sign, vote_sgn):
    ties, _ = mecha
    base = _rand(0, (9, 10))
    models = [base + _rand(i + 1, (9, 10), 0.1) for i in range(3)]
    ours = M.ties(base, models, [1.0, 1.0, 1.0], density=1.0, sign=sign)
    ref = base + ties.ties_sum.__wrapped__(*[m - base for m in models], k=1.0, vote_sgn=vote_sgn)
    assert torch.allclose(ours, ref, rtol=1e-6, atol=1e-7)
    # the two conventions really differ on these inputs (otherwise the option would be pointless)
    assert not torch.allclose(M.ties(base, models, [1.0] * 3, density=1.0, sign="sum"),
                              M.ties(base, models, [1.0] * 3, density=1.0, sign="count"))


def test_slerp_rescaled_norm_equals_sd_mecha(mecha):
    _, linear = mecha
    a, b = _rand(1, (6, 8)), _rand(2, (6, 8), 3.0)
    for alpha in (0.0, 0.3, 0.5, 0.9):
        ours = M.slerp(a, b, alpha, rescale_norm=True)
        ref = linear.slerp.__wrapped__(a, b, alpha=alpha)
        assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-6), alpha
    mid = M.slerp(a, b, 0.5, rescale_norm=True)
    assert abs(float(mid.norm()) - float((a.norm() + b.norm()) / 2)) < 1e-3   # the norm is interpolated
    assert not torch.allclose(M.slerp(a, b, 0.5), mid, atol=1e-3)             # mergekit's norm differs ...
    b1 = b / b.norm() * a.norm()                                                # ... unless the norms are equal
    assert torch.allclose(M.slerp(a, b1, 0.3), M.slerp(a, b1, 0.3, rescale_norm=True), atol=1e-5)


def test_della_element_rescale_is_unbiased():
    base = torch.zeros(256)
    t = _rand(5, (256,))
    runs = torch.stack([MN.della(base, [t], [1.0], density=0.5, epsilon=0.4,
                                 generator=torch.Generator().manual_seed(s)) for s in range(800)])
    assert (runs == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)   # about 1 - density dropped
    err = (runs.mean(0) - t).abs().mean().item()
    assert err < 0.06 * t.abs().mean().item()
    # larger entries are kept more often (magnitude-ranked keep probability)
    kept = (runs != 0).float().mean(0)
    big, small = t.abs() > t.abs().median(), t.abs() <= t.abs().median()
    assert kept[big].mean() - kept[small].mean() > 0.15


def test_two_model_della_and_model_stock_through_the_file_merge(tmp_path):
    sa, sb, sc = make_sd(0), make_sd(1), make_sd(2)
    a, b, c = (write(tmp_path, f"{n}.safetensors", s) for n, s in (("a", sa), ("b", sb), ("c", sc)))
    for method in ("della", "model_stock"):
        out = tmp_path / f"{method}.safetensors"
        rep = MF.merge_checkpoints(a, b, out, c=c, method=method, dtype="fp32", seed=3)
        mem, _ = MF.merge_state_dicts(sa, sb, sc, method=method, dtype="fp32", seed=3)
        got = load_file(str(out))
        assert all(torch.equal(got[k], mem[k]) for k in got)
        assert MF.read_recipe(out)["method"] == method
    assert any("does not use alpha" in w for w in rep.warnings)
    with pytest.raises(ValueError, match="model C"):
        MF.merge_checkpoints(a, b, tmp_path / "x.safetensors", method="model_stock")


# --------------------------------------------------------------------------------------------- N models
def test_n_model_weighted_sum_file_merge_and_cli(tmp_path, capsys):
    sds = [make_sd(i) for i in range(4)]
    paths = [write(tmp_path, f"m{i}.safetensors", s) for i, s in enumerate(sds)]
    w = [0.4, 0.3, 0.2, 0.1]
    out = tmp_path / "n.safetensors"
    rep = MN.merge_checkpoints_n(paths, out, weights=w, dtype="fp32")
    got = load_file(str(out))
    k = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    assert torch.allclose(got[k], sum(wi * s[k] for wi, s in zip(w, sds)), atol=1e-6)
    vae = "first_stage_model.encoder.conv_in.weight"
    assert torch.equal(got[vae], sds[0][vae])          # VAE from the first model by default
    recipe = MF.read_recipe(out)
    assert recipe["weights"] == w and recipe["models"] == 4
    assert all(len(v["sha256"]) == 64 for v in recipe["inputs"].values())
    assert rep.merged > 0
    rc = cli_main(["merge-n", *map(str, paths), "--weights", "0.4,0.3,0.2,0.1", "--dtype", "fp32",
                   "-o", str(tmp_path / "cli.safetensors"), "-q"])
    assert rc == 0
    cli = load_file(str(tmp_path / "cli.safetensors"))
    assert all(torch.equal(cli[x], got[x]) for x in got)
    rc = cli_main(["merge-n", *map(str, paths), "--weights", "0.5,0.5", "-o", str(tmp_path / "bad.safetensors")])
    assert rc == 2 and "4 models need 4 weights" in capsys.readouterr().err
    assert not (tmp_path / "bad.safetensors").exists()


@pytest.mark.parametrize("method", ["ties", "dare", "della", "model_stock"])
def test_n_model_task_vector_merges_equal_the_per_tensor_functions(tmp_path, method):
    sds = [make_sd(i) for i in range(3)]
    base_sd = make_sd(7)
    paths = [write(tmp_path, f"m{i}.safetensors", s) for i, s in enumerate(sds)]
    base = write(tmp_path, "base.safetensors", base_sd)
    out = tmp_path / "o.safetensors"
    weights = None if method == "model_stock" else [0.5, 0.25, 0.25]
    MN.merge_checkpoints_n(paths, out, weights=weights, method=method, base=base, dtype="fp32", seed=5,
                           hash_inputs=False, options=M.MethodOptions(ties_sign="count"))
    got = load_file(str(out))
    w = weights or [1 / 3] * 3
    for k in ("model.diffusion_model.input_blocks.1.0.in_layers.2.weight", "model.diffusion_model.out.2.bias"):
        exp = MN.merge_tensor_n(method, k, [s[k] for s in sds], w, base=base_sd[k], seed=5,
                                options=M.MethodOptions(ties_sign="count"))
        assert torch.equal(got[k], exp), k
    with pytest.raises(ValueError, match="needs --base"):
        MN.merge_checkpoints_n(paths, tmp_path / "x.safetensors", method=method)
