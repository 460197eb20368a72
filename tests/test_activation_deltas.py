"""Activation-space deltas (``y = layer(x) + F.linear(x, ΔW)``; LoRA ``((x·downᵀ)·upᵀ)·scale``) give the same
predictions and gradients as weight-space deltas (``F.linear(x, W + ΔW)``) on every host: diffusers SD1 / SDXL, Flux
diffusers with fused BFL deltas on split layers, and ComfyHost on ComfyUI's own SD1 / SDXL / Flux (fp8 base
included) models — for LoRA, LoCon (3×3 and strided convs), full ΔW on weights and biases (ESD), rows of a fused
tensor (Flux esd-x-strict), LyCORIS LoHa / LoKr, rank and module dropout, multipliers and ``enabled=False``."""

from __future__ import annotations

import pytest
import torch
from conftest import requires_comfyui
from tiny_models import tiny_flux_host, tiny_host, tiny_sdxl_host

from conceptlab.training.host import FullDelta, OutputDeltaHook, check_delta_space
from conceptlab.training.lora.network import LoRADelta


def _randomise(delta: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode(False), torch.no_grad():
        for p in delta.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def _run_both(host, specs, run):
    """Install ``specs`` = [(component, path, attr, delta)] in weight space, then in activation space, calling
    ``run()`` -> (prediction, loss) each time; returns {space: (prediction, [grads])}."""
    out = {}
    deltas = [d for *_, d in specs]
    params = [p for d in deltas for p in d.parameters()]
    for space in ("weight", "activation"):
        host.delta_space = space
        with torch.inference_mode(False):
            for p in params:
                p.grad = None
            for comp, path, attr, d in specs:
                host.install_delta(comp, path, attr, d)
            try:
                pred, loss = run()
                loss.backward()
            finally:
                host.clear_deltas()
        out[space] = (pred.detach().clone(),
                      [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params])
    return out


def _assert_same(out, rtol=1e-4, atol=1e-5, moved_from=None):
    (pw, gw), (pa, ga) = out["weight"], out["activation"]
    torch.testing.assert_close(pa, pw, rtol=rtol, atol=atol)
    assert any(g.abs().sum() > 0 for g in gw)
    for a, w in zip(ga, gw):
        torch.testing.assert_close(a, w, rtol=rtol, atol=atol)
    if moved_from is not None:  # the deltas did something
        assert (pw - moved_from).abs().max() > 1e-3


def test_delta_space_names():
    assert check_delta_space("activation") == "activation"
    with pytest.raises(ValueError, match="delta_space"):
        check_delta_space("weights")


def _sd_specs(host, seed=0):
    """LoRA on Linear / 1×1 / 3×3 / strided convs and the text encoder, full ΔW on a weight and a bias, a delta
    with multiplier 0.5, one with rank dropout, one switched off by module dropout, one disabled."""
    mods = host.modules("unet")
    linear = [p for p in mods if p.endswith("attn2.to_k")][0]
    ff = [p for p in mods if p.endswith("ff.net.2")][0]
    conv3 = [p for p in mods if p.endswith("resnets.0.conv1")][0]
    strided = [p for p in mods if "downsamplers.0.conv" in p][0]
    proj = [p for p in mods if p.endswith("attentions.0.proj_in")][0]
    bias_mod = [p for p in mods if p.endswith("attn2.to_out.0")][0]
    te = host.components()[1]
    te_path = [p for p in host.modules(te) if p.endswith("layers.0.self_attn.v_proj")][0]
    specs = []
    for i, (comp, path) in enumerate([("unet", linear), ("unet", ff), ("unet", conv3), ("unet", strided),
                                      ("unet", proj), (te, te_path)]):
        d = LoRADelta(tuple(host.modules(comp)[path].weight.shape), 4, 2.0)
        _randomise(d, seed + i)
        specs.append((comp, path, "weight", d))
    specs[1][3].multiplier = 0.5
    specs[2][3].rank_mask = torch.tensor([2.0, 0.0, 2.0, 0.0])  # rank dropout p = 0.5, rescaled
    specs[4][3].module_off = True  # module dropout
    fw, fb = FullDelta(mods[bias_mod].weight.shape), FullDelta(mods[bias_mod].bias.shape)
    _randomise(fw, seed + 10, 0.02)
    _randomise(fb, seed + 11, 0.1)
    cb = FullDelta(mods[conv3].bias.shape)
    _randomise(cb, seed + 12, 0.1)
    off = FullDelta(mods[ff.replace("ff.net.2", "attn1.to_q")].weight.shape)
    _randomise(off, seed + 13, 0.1)
    off.enabled = False
    specs += [("unet", bias_mod, "weight", fw), ("unet", bias_mod, "bias", fb), ("unet", conv3, "bias", cb),
              ("unet", ff.replace("ff.net.2", "attn1.to_q"), "weight", off)]
    return specs


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_diffusers_host_activation_equals_weight_space(family):
    host = tiny_host(0) if family == "sd1" else tiny_sdxl_host(0)
    specs = _sd_specs(host)
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700])
    base = host.predict(x, t, host.encode_prompts(["a cat", "a dog"])).detach()

    def run():
        pred = host.predict(x, t, host.encode_prompts(["a cat", "a dog"]))  # differentiable: a TE delta is on
        return pred, pred.float().pow(2).mean()

    out = _run_both(host, specs, run)
    _assert_same(out, moved_from=base)
    assert specs[4][3].lora_up.grad is None or specs[4][3].lora_up.grad.abs().sum() == 0  # module dropout
    assert not any(m._forward_hooks for m in host.unet.modules())  # clear_deltas removed the hooks


def test_activation_space_saves_no_weight_copies():
    """A full ΔW on a Linear in activation space keeps no weight-sized tensor other than the parameters
    themselves for backward; weight space keeps W + ΔW."""
    lin = torch.nn.Linear(64, 48)
    x = torch.randn(5, 64, requires_grad=True)
    d = FullDelta(lin.weight.shape)
    hook = OutputDeltaHook()
    hook.entries.append(("weight", d, None))
    hook.register(lin)
    new = []

    own = {p.untyped_storage().data_ptr() for p in (lin.weight, d.weight)}

    def pack(t):  # a weight-sized saved tensor (or a transposed view of one) that is not a parameter
        if t.numel() == lin.weight.numel() and t.untyped_storage().data_ptr() not in own:
            new.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lin(x).sum().backward()
    hook.remove()
    assert new == []
    from torch.nn.utils import parametrize

    parametrize.register_parametrization(lin, "weight", d, unsafe=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lin(x).sum().backward()
    assert len(new) == 1  # W + ΔW


def test_lycoris_deltas_equal_in_both_spaces():
    pytest.importorskip("lycoris")
    from conceptlab.training.lora.lycoris_net import LycorisNetwork

    host = tiny_host(1)
    g = torch.Generator().manual_seed(4)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500])
    cond = host.encode_prompts(["a cat"])
    for algo in ("loha", "lokr"):
        net = LycorisNetwork.create_lycoris(host, {"algo": algo, "conv_dim": "4"}, network_dim=4, network_alpha=2.0,
                                            seed=0)
        for i, d in enumerate(net.loras.values()):
            _randomise(d, 100 + i, 0.1)
        specs = [(t_.component, t_.path, "weight", net.loras[n]) for n, t_ in net.targets.items()]

        def run():
            pred = host.predict(x, t, cond)
            return pred, pred.pow(2).mean()

        _assert_same(_run_both(host, specs, run), rtol=1e-4, atol=1e-5)


def test_flux_fused_pieces_activation_equals_weight_space():
    """Fused BFL deltas on diffusers' split layers: LoRA on img_attn.qkv (to_q/to_k/to_v rows) and single_blocks
    linear1 (q/k/v/mlp rows), rows K/V of txt_attn.qkv (esd-x-strict's RowsDelta, weight and bias), full ΔW on
    final_layer.adaLN_modulation.1 (halves swapped in diffusers) and a T5 LoRA."""
    from conceptlab.training.esd.params import RowsDelta

    host = tiny_flux_host(0)
    mods = host.modules("unet")
    specs = []
    for i, path in enumerate(["double_blocks.0.img_attn.qkv", "single_blocks.1.linear1", "single_blocks.0.linear2"]):
        d = LoRADelta(tuple(mods[path].weight.shape), 4, 2.0)
        _randomise(d, i)
        specs.append(("unet", path, "weight", d))
    specs[1][3].rank_mask = torch.tensor([0.0, 2.0, 2.0, 0.0])
    h = mods["double_blocks.0.txt_attn.qkv"].weight.shape[0] // 3
    rw = RowsDelta(mods["double_blocks.0.txt_attn.qkv"].weight.shape, (h, 3 * h))
    rb = RowsDelta(mods["double_blocks.0.txt_attn.qkv"].bias.shape, (h, 3 * h))
    ada = FullDelta(mods["final_layer.adaLN_modulation.1"].weight.shape)
    for i, d in enumerate((rw, rb, ada)):
        _randomise(d, 10 + i, 0.1)
    ada.multiplier = 0.7
    specs += [("unet", "double_blocks.0.txt_attn.qkv", "weight", rw),
              ("unet", "double_blocks.0.txt_attn.qkv", "bias", rb),
              ("unet", "final_layer.adaLN_modulation.1", "weight", ada)]
    t5p = "encoder.block.0.layer.0.SelfAttention.q"
    d5 = LoRADelta(tuple(host.modules("t5")[t5p].weight.shape), 2, 1.0)
    _randomise(d5, 20)
    specs.append(("t5", t5p, "weight", d5))
    g = torch.Generator().manual_seed(5)
    x, sig = torch.randn(2, 16, 4, 4, generator=g), torch.tensor([0.3, 0.9])
    base = host.predict(x, sig, host.encode_prompts(["a cat", "a castle"])).detach()

    def run():
        pred = host.predict(x, sig, host.encode_prompts(["a cat", "a castle"]))
        return pred, pred.pow(2).mean()

    _assert_same(_run_both(host, specs, run), moved_from=base)
    assert not any(m._forward_hooks for m in host.transformer.modules())


def test_esd_erase_same_deltas_in_both_spaces():
    """Two ESD-x iterations (Adam, noised x_t) train the same ΔW whichever space the host applies them in."""
    from conceptlab.training.esd.config import ESDConfig
    from conceptlab.training.esd.erase import erase

    res = {}
    for space in ("weight", "activation"):
        host = tiny_host(2)
        host.delta_space = space
        cfg = ESDConfig(concepts="a cat", iterations=2, width=64, height=64, xt_source="noised", noised_cache=1,
                        ddim_steps=2, lr=1e-3, seed=0)
        res[space] = erase(host, cfg)
    assert res["weight"].deltas.keys() == res["activation"].deltas.keys()
    for k, w in res["weight"].deltas.items():
        torch.testing.assert_close(res["activation"].deltas[k], w, rtol=1e-3, atol=1e-6)
    assert any(w.abs().max() > 0 for w in res["weight"].deltas.values())


# -- ComfyHost on ComfyUI's own models (real-ComfyUI tier) ------------------------------------------------------

def _comfy_run(host, x, t, prompts):
    def run():
        cond = host.encode_prompts(prompts)
        pred = host.predict(x, t, cond)
        return pred, pred.float().pow(2).mean()
    return run


@requires_comfyui
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_comfyhost_activation_equals_weight_space(family):
    """On ComfyUI's SD15 / SDXL model classes, with and without gradient checkpointing; the deltas act only
    through the host's own patcher (another clone of the MODEL sampled meanwhile is the frozen model), and
    ComfyUI's sampler on the host's patcher sees them."""
    from e2e.comfy_env import tiny_sd1_clip, tiny_sd15_patcher, tiny_sdxl_clip, tiny_sdxl_patcher

    from conceptlab.nodes.comfy_host import ComfyHost

    with torch.inference_mode():
        model, clip = ((tiny_sd15_patcher(), tiny_sd1_clip()) if family == "sd1"
                       else (tiny_sdxl_patcher(), tiny_sdxl_clip()))
        host = ComfyHost(model, clip)
    try:
        with torch.inference_mode(False):
            specs = _sd_specs(host)
        g = torch.Generator().manual_seed(3)
        x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700])
        base = host.predict(x, t, host.encode_prompts(["a cat", "a dog"])).detach()
        run = _comfy_run(host, x, t, ["a cat", "a dog"])
        plain = _run_both(host, specs, run)
        _assert_same(plain, moved_from=base)
        host.set_gradient_checkpointing(True)
        ckpt = _run_both(host, specs, run)
        _assert_same(ckpt)
        for a, b in zip(ckpt["activation"][1], plain["activation"][1]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        host.set_gradient_checkpointing(False)
        # gate: with the deltas installed, another clone of the MODEL computes the frozen model
        host.delta_space = "activation"
        with torch.inference_mode(False):
            for comp, path, attr, d in specs:
                host.install_delta(comp, path, attr, d)
        changed = host.predict(x, t, host.encode_prompts(["a cat", "a dog"])).detach()
        other = ComfyHost(model, clip)
        try:
            torch.testing.assert_close(other.predict(x, t, other.encode_prompts(["a cat", "a dog"])), base)
        finally:
            other.close()
        torch.testing.assert_close(host.predict(x, t, host.encode_prompts(["a cat", "a dog"])), changed)
    finally:
        host.close()
    assert not any(m._forward_hooks for m in model.model.diffusion_model.modules())
    assert not any(m._forward_hooks for m in clip.cond_stage_model.modules())
    assert not model.wrappers.get("diffusion_model", {}).get("conceptlab_deltas")


@requires_comfyui
def test_comfyhost_sampler_sees_activation_deltas():
    """ComfyUI's own sampler (``comfy.sample.sample``) on the host's patcher: the same images with the deltas in
    either space, different from the frozen model's."""
    from e2e.comfy_env import tiny_sd1_clip, tiny_sd15_patcher, tiny_vae

    from conceptlab.nodes.comfy_host import ComfyHost

    with torch.inference_mode():
        host = ComfyHost(tiny_sd15_patcher(), tiny_sd1_clip(), tiny_vae())
    try:
        kw = dict(width=64, height=64, steps=2, cfg=3.0, seed=1)
        frozen = host.sample(["a cat"], **kw)
        with torch.inference_mode(False):
            specs = _sd_specs(host)
            for d in (d for *_, d in specs):
                _randomise(d, 7, 0.3)
        imgs = {}
        for space in ("weight", "activation"):
            host.delta_space = space
            with torch.inference_mode(False):
                for comp, path, attr, d in specs:
                    host.install_delta(comp, path, attr, d)
            imgs[space] = host.sample(["a cat"], **kw)
            host.clear_deltas()
        torch.testing.assert_close(imgs["activation"], imgs["weight"], rtol=1e-3, atol=2e-3)
        assert (imgs["activation"] - frozen).abs().max() > 1e-2
    finally:
        host.close()


@requires_comfyui
@pytest.mark.parametrize("fp8", [False, True])
def test_comfyhost_flux_activation_equals_weight_space(fp8):
    """ComfyUI's Flux (fused qkv / linear1 in its own tree; fp8-stored weights with fp32 compute through the
    manual-cast ops), with the Flux blocks' gradient checkpointing too."""
    from e2e.comfy_flux import tiny_flux_clip, tiny_flux_patcher

    from conceptlab.nodes.comfy_host import ComfyHost
    from conceptlab.training.esd.params import RowsDelta
    from conceptlab.training.flow import noisy_input

    with torch.inference_mode():
        model = tiny_flux_patcher(seed=4, weight_dtype=torch.float8_e4m3fn if fp8 else None)
        clip = tiny_flux_clip()
        host = ComfyHost(model, clip)
    try:
        mods = host.modules("unet")
        specs = []
        with torch.inference_mode(False):
            for i, path in enumerate(["double_blocks.0.img_attn.qkv", "single_blocks.0.linear1", "txt_in"]):
                d = LoRADelta(tuple(mods[path].weight.shape), 4, 2.0)
                _randomise(d, i)
                specs.append(("unet", path, "weight", d))
            h = mods["double_blocks.0.txt_attn.qkv"].weight.shape[0] // 3
            rw = RowsDelta(mods["double_blocks.0.txt_attn.qkv"].weight.shape, (h, 3 * h))
            rb = RowsDelta(mods["double_blocks.0.txt_attn.qkv"].bias.shape, (h, 3 * h))
            _randomise(rw, 10, 0.05)
            _randomise(rb, 11, 0.05)
            specs += [("unet", "double_blocks.0.txt_attn.qkv", "weight", rw),
                      ("unet", "double_blocks.0.txt_attn.qkv", "bias", rb)]
            t5p = "encoder.block.0.layer.0.SelfAttention.q"
            d5 = LoRADelta(tuple(host.modules("t5")[t5p].weight.shape), 2, 1.0)
            _randomise(d5, 20)
            specs.append(("t5", t5p, "weight", d5))
        g = torch.Generator().manual_seed(0)
        x0, eps = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
        sig = torch.tensor([0.25, 0.8])
        x = noisy_input(x0, eps, sig)
        run = _comfy_run(host, x, sig, ["a castle", "a sword"])
        _assert_same(_run_both(host, specs, run))
        host.set_gradient_checkpointing(True)
        _assert_same(_run_both(host, specs, run))
    finally:
        host.close()
    assert not any(m._forward_hooks for m in model.model.diffusion_model.modules())


def test_esd_step_in_backward_and_checkpointing_same_deltas():
    """ESD's memory options leave the result unchanged: Adam stepped per tensor inside backward (each gradient
    freed as soon as used) and gradient checkpointing train the same ΔW as the plain loop; the result's tensors
    are handed over without a copy and no gradient is left on them."""
    from conceptlab.training.esd.config import ESDConfig
    from conceptlab.training.esd.erase import erase

    def run(**kw):
        cfg = ESDConfig(concepts="a cat", iterations=3, width=64, height=64, xt_source="noised", noised_cache=1,
                        ddim_steps=2, lr=1e-3, seed=1, **kw)
        return erase(tiny_host(3), cfg)

    plain, fused, ckpt = run(), run(step_in_backward=True), run(gradient_checkpointing=True)
    assert fused.metadata["optimizer_step_in_backward"] and ckpt.metadata["gradient_checkpointing"]
    for k, w in plain.deltas.items():
        assert not w.requires_grad and w.grad is None
        torch.testing.assert_close(fused.deltas[k], w, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(ckpt.deltas[k], w, rtol=1e-4, atol=1e-6)
    assert any(w.abs().max() > 0 for w in plain.deltas.values())
    assert plain.losses == pytest.approx(fused.losses, rel=1e-5)
