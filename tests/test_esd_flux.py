"""ESD on Flux (flow-matching family): parameter sets, the velocity-space objective, Flux's schedule and distilled
guidance, masks on 2×2 token patches, .diff outputs, and the effect on a tiny Flux.1-shaped model
(training/esd/erase.py, esd/objective.py, esd/params.py; tiny FluxHost from tests/tiny_models.py)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from conceptlab.formats.flux_keys import FluxDims
from conceptlab.training.esd.config import ESDConfig
from conceptlab.training.esd.erase import _resolve_masks, count_parameters, erase, paper_target, select_targets
from conceptlab.training.esd.objective import objective_for
from conceptlab.training.esd.params import flux_counts
from tiny_models import tiny_flux_host, tiny_host

FAST = dict(concepts="van gogh", width=64, height=64, ddim_steps=4, lr=1e-3, noised_cache=1)


@pytest.fixture(scope="module")
def host():
    torch.set_num_threads(1)
    return tiny_flux_host(0)


def test_esd_x_is_the_double_blocks_text_attention(host):
    mods = host.modules("unet")
    x = select_targets(mods, "esd-x", arch="flux")
    assert {(t.path, t.attr) for t in x} == {(f"double_blocks.0.txt_attn.{m}", a)
                                             for m in ("qkv", "proj") for a in ("weight", "bias")}
    strict = select_targets(mods, "esd-x-strict", arch="flux")
    h = host.dims.hidden
    assert [(t.path, t.attr, t.rows) for t in strict] == [("double_blocks.0.txt_attn.qkv", "weight", (h, 3 * h)),
                                                         ("double_blocks.0.txt_attn.qkv", "bias", (h, 3 * h))]
    assert count_parameters(strict)[1] == 2 * h * h + 2 * h
    u = {t.path for t in select_targets(mods, "esd-u", arch="flux")}
    assert "double_blocks.0.img_attn.qkv" in u and "single_blocks.1.linear1" in u
    assert not any("txt_attn" in p for p in u)
    assert not any(p.startswith(("img_in", "txt_in", "guidance_in", "final_layer", "time_in")) for p in u)
    with pytest.raises(ValueError, match="txt_attn"):
        select_targets({k: v for k, v in mods.items() if "txt_attn" not in k}, "esd-x", arch="flux")


def test_full_size_flux_dev_counts():
    h, n = FluxDims().hidden, 19
    assert h == 3072
    # txt_attn.qkv [3h, h] + bias [3h], txt_attn.proj [h, h] + bias [h], per double block
    assert flux_counts("esd-x") == (4 * n, n * (3 * h * h + 3 * h + h * h + h)) == (76, 717_459_456)
    assert flux_counts("esd-x-strict") == (2 * n, n * (2 * h * h + 2 * h)) == (38, 358_729_728)


def test_flow_schedule_is_flux_get_schedule_as_diffusers_computes_it(host):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from conceptlab.training.flow import flux_mu

    for steps, hw in ((28, (128, 128)), (6, (8, 8))):
        obj = objective_for(host, steps, hw)
        sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=flux_mu(*hw))  # FluxPipeline.__call__
        assert torch.allclose(obj.sigmas, sched.sigmas.float(), atol=1e-6)
    schnell = objective_for(tiny_flux_host(0, guidance_embeds=False), 4, (8, 8))
    assert not schnell.has_guidance_embed and torch.allclose(schnell.sigmas, torch.linspace(1, 0, 5))


def test_velocity_target_is_the_epsilon_target_mapped():
    """ε = x_σ + (1 − σ)·v maps the velocity-space target onto the ε-space ESD target (esd_objective docstring)."""
    g = torch.Generator().manual_seed(0)
    x, v_c, v_u = (torch.randn(2, 16, 4, 4, generator=g) for _ in range(3))
    for sigma in (0.1, 0.5, 0.9):
        to_eps = lambda v: x + (1 - sigma) * v  # noqa: E731
        for eta in (0.5, 1.0, 2.0):
            assert torch.allclose(to_eps(paper_target(v_c, v_u, eta)), paper_target(to_eps(v_c), to_eps(v_u), eta),
                                  atol=1e-5)


class _Spy:
    """Forwards to a host and records (σ, guidance, context rows) of every prediction."""

    def __init__(self, host):
        self._h, self.calls = host, []

    def __getattr__(self, name):
        return getattr(self._h, name)

    def predict(self, x, t, cond):
        self.calls.append((t.clone(), cond.extras.get("guidance"), cond.context.clone(), x.clone()))
        return self._h.predict(x, t, cond)


def test_guidance_values_and_loss_against_a_direct_computation(host):
    spy = _Spy(host)
    seen = []
    erase(spy, ESDConfig(**FAST, iterations=1, start_guidance=2.0, guidance_scale=4.0, negative_guidance=1.5),
          progress=lambda info: seen.append(dict(info)))
    info = seen[0]
    *trajectory, frozen, trained = spy.calls
    # the self_sample trajectory uses start_guidance (one distilled prediction per Euler step, no CFG) ...
    assert all(g is not None and torch.all(g == 2.0) for _, g, _, _ in trajectory)
    # ... the frozen pair (concept, empty) and the trained prediction use guidance_scale
    assert torch.all(frozen[1] == 4.0) and torch.all(trained[1] == 4.0) and frozen[1].shape == (2,)
    sigma = info["timestep"]
    assert isinstance(sigma, float) and 0.0 < sigma <= 1.0
    assert torch.allclose(trained[0], torch.tensor([sigma]))
    # the loss of iteration 1 (deltas still zero) recomputed from the frozen model alone
    x_t = info["x_t"]
    c = host.encode_prompts(["van gogh"]).with_extras(guidance=torch.full((1,), 4.0))
    u = host.encode_prompts([""]).with_extras(guidance=torch.full((1,), 4.0))
    tt = torch.tensor([sigma])
    with torch.no_grad():
        v_c, v_u = host.predict(x_t, tt, c), host.predict(x_t, tt, u)
    want = float(((v_c - (v_u - 1.5 * (v_c - v_u))) ** 2).mean())
    assert info["loss"] == pytest.approx(want, rel=1e-4)
    k = int(torch.argmin((objective_for(host, 4, (8, 8)).sigmas - sigma).abs()))
    assert len(trajectory) == k  # k Euler steps to reach σ_k


def test_guidance_scale_refused_where_there_is_no_embedding():
    with pytest.raises(ValueError, match="guidance_scale"):
        erase(tiny_host(), ESDConfig(concepts="x", width=32, height=32, ddim_steps=2, iterations=1,
                                     guidance_scale=3.5))
    with pytest.raises(ValueError, match="guidance_scale"):
        ESDConfig(concepts="x", guidance_scale=float("nan")).validate()


def test_schnell_has_no_guidance_and_its_own_modelspec():
    from conceptlab.training.esd.outputs import file_metadata

    schnell = tiny_flux_host(0, guidance_embeds=False)
    with pytest.raises(ValueError, match="no guidance embedding"):
        erase(schnell, ESDConfig(**FAST, iterations=1, guidance_scale=3.5))
    res = erase(schnell, ESDConfig(**FAST, iterations=1, xt_source="noised"))
    assert res.metadata["guidance_scale"] is None and res.metadata["sigma_schedule"].startswith("linear")
    assert file_metadata(res)["modelspec.architecture"] == "flux-1-schnell/lora"


def test_masks_cover_whole_patches_and_size_is_checked(host):
    # 96 px → 12×12 latent cells → 6×6 tokens; a 4×4 grid puts boundaries at tokens 0, 2, 3, 4(.5→4), 6
    cfg = ESDConfig(concepts="x", width=96, height=96, mask_mode="grid-sum", grid_n=4, centre_size=0.5)
    m, w, names = _resolve_masks(cfg, (12, 12), patch=2)
    assert m.shape == (17, 12, 12) and names[-1] == "centre"
    blocks = m.view(17, 6, 2, 6, 2)
    assert torch.equal(blocks, blocks[:, :, :1, :, :1].expand_as(blocks))  # constant on every 2×2 patch
    assert torch.equal(m[:16].sum(0), torch.ones(12, 12))  # the cells still tile the latent
    user = torch.zeros(1, 12, 12)
    user[0, :, :3] = 1.0  # a boundary inside a patch
    mu, _, _ = _resolve_masks(ESDConfig(concepts="x", width=96, height=96, masks=user), (12, 12), patch=2)
    assert torch.allclose(mu[0, 0, :6], torch.tensor([1.0, 1.0, 0.5, 0.5, 0.0, 0.0]))
    with pytest.raises(ValueError, match="multiple of 16"):
        erase(host, ESDConfig(**{**FAST, "width": 72}, iterations=1))


def test_strict_diff_file_keys_and_metadata(host, tmp_path):
    from safetensors import safe_open

    from conceptlab.training.esd.outputs import save_outputs

    res = erase(host, ESDConfig(**{**FAST, "lr": 1e-2}, iterations=2, method="esd-x-strict", xt_source="noised"))
    h = host.dims.hidden
    dw = res.deltas[("unet", "double_blocks.0.txt_attn.qkv", "weight")]
    assert dw.shape == (3 * h, h) and float(dw[:h].abs().max()) == 0.0 and float(dw[h:].abs().max()) > 0
    paths = save_outputs(res, tmp_path / "e.safetensors", dtype=torch.float32)
    with safe_open(str(paths["diff"]), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert keys == {"lora_unet_double_blocks_0_txt_attn_qkv.diff", "lora_unet_double_blocks_0_txt_attn_qkv.diff_b"}
    assert meta["ss_base_model_version"] == "flux1" and meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert res.metadata["objective"] == "flow" and res.metadata["guidance_scale"] == 3.5


def _eval_points(n=8, seed=123):
    g = torch.Generator().manual_seed(seed)
    pts = []
    for _ in range(n):
        x0, e = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 16, 8, 8, generator=g)
        s = torch.rand(1, generator=g) * 0.9 + 0.05
        pts.append(((1 - s) * x0 + s * e, s))
    return pts


def test_effect_erased_prediction_moves_to_the_target_other_prompt_much_less(host):
    """On held-out (x_σ, σ) points: the concept's prediction approaches the negatively guided target; an unrelated
    prompt's prediction moves much less than the concept's. Measured (seed 0, 60 iterations, lr 3e-3, 8 Euler
    steps): distance to target 0.55× its start; other-prompt change 0.43× the concept's change, 0.23× the starting
    distance. Margins below leave room for platform noise, not for a broken loop (an unchanged model gives 1.0)."""
    pts = _eval_points()
    cond = lambda p: host.encode_prompts([p]).with_extras(guidance=torch.full((1,), 3.5))  # noqa: E731
    c, o, u = cond("van gogh"), cond("a photo of a cat"), cond("")

    def preds(cd):
        with torch.no_grad():
            return [host.predict(x, s, cd) for x, s in pts]

    def mse(a, b):
        return sum(float(((p - q) ** 2).mean()) for p, q in zip(a, b)) / len(a)

    base_c, base_o, base_u = preds(c), preds(o), preds(u)
    target = [paper_target(pc, pu, 1.0) for pc, pu in zip(base_c, base_u)]
    erase(host, ESDConfig(concepts="van gogh", width=64, height=64, ddim_steps=8, lr=3e-3, iterations=60, seed=0),
          keep_installed=True)
    try:
        after_c, after_o = preds(c), preds(o)
    finally:
        host.clear_deltas()
    d0, d1 = mse(base_c, target), mse(after_c, target)
    moved_c, moved_o = mse(after_c, base_c), mse(after_o, base_o)
    assert d1 < 0.7 * d0, (d0, d1)
    assert moved_o < 0.6 * moved_c, (moved_o, moved_c)
    assert moved_o < 0.35 * d0, (moved_o, d0)


def test_effect_on_an_int8_base():
    """ESD's full-rank ΔW on a torchao int8 weight-only base (quantize_base = "int8", CPU): the base stays int8,
    ΔW is fp32, and the concept's prediction still moves toward the target computed from that base. Measured
    (seed 0, 30 iterations, 4 Euler steps, 4 held-out points): distance to target 0.61x its start; an unchanged
    model gives 1.0."""
    pytest.importorskip("torchao")
    from conceptlab.training.quantize import is_quantized

    torch.set_num_threads(1)
    q = tiny_flux_host(0)
    q.quantize_base("int8")
    pts = _eval_points(4)
    c, u = (q.encode_prompts([p]).with_extras(guidance=torch.full((1,), 3.5)) for p in ("van gogh", ""))
    with torch.no_grad():
        base_c = [q.predict(x, s, c) for x, s in pts]
        target = [paper_target(pc, q.predict(x, s, u), 1.0) for pc, (x, s) in zip(base_c, pts)]
    res = erase(q, ESDConfig(concepts="van gogh", width=64, height=64, ddim_steps=4, lr=3e-3, iterations=30, seed=0),
                keep_installed=True)
    try:
        with torch.no_grad():
            after_c = [q.predict(x, s, c) for x, s in pts]
    finally:
        q.clear_deltas()
    assert is_quantized(q.transformer.transformer_blocks[0].attn.add_k_proj.weight)
    assert all(d.dtype == torch.float32 for d in res.deltas.values())
    d0 = sum(float(((p - t) ** 2).mean()) for p, t in zip(base_c, target))
    d1 = sum(float(((p - t) ** 2).mean()) for p, t in zip(after_c, target))
    assert d1 < 0.7 * d0, (d0, d1)


def test_cli_erase_on_a_flux_folder(tmp_path, monkeypatch):
    import json

    from safetensors import safe_open

    from conceptlab import cli
    from conceptlab.training import flux_host

    folder = tmp_path / "flux"
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "config.json").write_text('{"_class_name": "FluxTransformer2DModel"}')
    loaded = []

    def fake(cls, f, device="cpu", dtype=None, quantize=None, **kw):  # the folder loader is flux_host's (tested there)
        loaded.append(str(f))
        h = tiny_flux_host(0)
        if quantize:
            h.quantize_base(quantize)
            loaded.append(h)
        return h

    monkeypatch.setattr(flux_host.FluxHost, "from_pretrained", classmethod(fake))
    cfg = tmp_path / "erase.toml"
    cfg.write_text('model = "flux"\noutput_dir = "out"\nname = "vg"\nsave_dtype = "float32"\n\n[esd]\n'
                   'concepts = "van gogh"\nwidth = 64\nheight = 64\nddim_steps = 3\niterations = 2\n'
                   'guidance_scale = 2.5\nmask_mode = "grid-sum"\n')
    assert cli.main(["erase", "--config", str(cfg), "--quiet"]) == 0
    assert loaded == [str(folder.resolve())]
    meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert meta["arch"] == "flux" and meta["guidance_scale"] == 2.5 and meta["masks"][-1] == "centre"
    with safe_open(str(tmp_path / "out" / "vg.safetensors"), "pt") as f:
        assert set(f.keys()) == {f"lora_unet_double_blocks_0_txt_attn_{m}.{s}" for m in ("qkv", "proj")
                                 for s in ("diff", "diff_b")}
    ref = tmp_path / "ref.toml"
    ref.write_text(cfg.read_text().replace('save_dtype = "float32"\n', 'save_dtype = "float32"\nsave_reference = true\n'))
    assert cli.main(["erase", "--config", str(ref), "--quiet"]) == 2  # refused by name before training
    quant = tmp_path / "quant.toml"
    quant.write_text(cfg.read_text().replace('save_dtype = "float32"\n', 'save_dtype = "float32"\nquantize_base = "int8"\n'))
    if importlib.util.find_spec("torchao") is None:
        return
    from conceptlab.training.quantize import is_quantized

    assert cli.main(["erase", "--config", str(quant), "--quiet"]) == 0  # ESD on an int8 (torchao) base
    qhost = loaded[-1]
    assert is_quantized(qhost.transformer.transformer_blocks[0].attn.add_q_proj.weight)  # the base stayed int8
    meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert "int8-quantized base" in meta["base_model_hash_kind"]
    with safe_open(str(tmp_path / "out" / "vg.safetensors"), "pt") as f:
        d = f.get_tensor("lora_unet_double_blocks_0_txt_attn_qkv.diff")
        assert d.dtype == torch.float32 and d.abs().sum() > 0  # the full-rank ΔW trained and was saved
