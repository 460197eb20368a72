"""The diffusers Flux host (training/flux_host.py) on a tiny Flux.1-shaped model: its forward is the transformer's
own with BFL packing, and a delta on a fused BFL module is the same function as that ΔW on the BFL weights."""

from __future__ import annotations

import pytest
import torch

from conceptlab.formats.flux_keys import CANONICAL_PREFIX
from conceptlab.formats.flux_views import canonical_state_dict, to_diffusers_state_dict
from conceptlab.training.conditioning import Conditioning
from conceptlab.training.flux_fused import FusedLinear
from conceptlab.training.flux_host import FluxHost
from conceptlab.training.host import FullDelta
from conceptlab.training.lora.network import LoRADelta

from tiny_models import tiny_flux_host, tiny_flux_transformer


@pytest.fixture(scope="module")
def host():
    return tiny_flux_host(0)


def _bfl_pack(x):
    # BFL flux/sampling.py prepare(): rearrange "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph = pw = 2
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def _bfl_unpack(x, h, w):
    b, n, c4 = x.shape
    return x.reshape(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def _bfl_img_ids(h, w):
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)


def test_predict_is_the_transformer_with_bfl_packing(host):
    torch.manual_seed(1)
    cond = host.encode_prompts(["a pixel cat", "a dog"])
    assert cond.context.shape == (2, 16, 32) and cond.pooled.shape == (2, 32)
    x = torch.randn(2, 16, 6, 8)  # non-square, 3×4 patches
    sig = torch.tensor([0.25, 0.9])
    g = torch.tensor([3.5, 1.0])
    got = host.predict(x, sig, cond.with_extras(guidance=g))
    ref = host.transformer(hidden_states=_bfl_pack(x), timestep=sig, guidance=g, pooled_projections=cond.pooled,
                           encoder_hidden_states=cond.context, txt_ids=torch.zeros(16, 3), img_ids=_bfl_img_ids(6, 8),
                           return_dict=False)[0]
    assert got.shape == x.shape
    torch.testing.assert_close(got, _bfl_unpack(ref, 6, 8), rtol=0, atol=0)
    # default guidance (3.5 for dev) when none is given; other guidance changes the output
    torch.testing.assert_close(host.predict(x[:1], sig[:1], cond[0]),
                               host.predict(x[:1], sig[:1], cond[0].with_extras(guidance=torch.tensor([3.5]))))
    assert not torch.allclose(got[1], host.predict(x[1:], sig[1:], cond[1]))
    with pytest.raises(ValueError, match="float sigmas"):
        host.predict(x, torch.tensor([250, 900]), cond)
    with pytest.raises(ValueError, match="even"):
        host.predict(torch.randn(1, 16, 5, 8), sig[:1], cond[0])


def test_fused_deltas_equal_the_same_dW_on_bfl_weights(host):
    """A rank-r LoRA on double_blocks.0.img_attn.qkv (row blocks, delta_rows path), a full ΔW on single_blocks.1
    .linear1 (q/k/v/mlp slices) and on final_layer.adaLN_modulation.1 (halves swapped in diffusers) give the model
    whose BFL-layout weights carry that ΔW."""
    torch.manual_seed(2)
    mods = host.modules("unet")
    assert isinstance(mods["double_blocks.0.img_attn.qkv"], FusedLinear)
    assert tuple(mods["single_blocks.1.linear1"].weight.shape) == (3 * 16 + 64, 16)
    lora = LoRADelta(mods["double_blocks.0.img_attn.qkv"].weight.shape, 4, 2.0)
    with torch.no_grad():
        lora.lora_up.normal_(0, 0.3)
    d_lin1 = FullDelta(mods["single_blocks.1.linear1"].weight.shape)
    d_lin1b = FullDelta(mods["single_blocks.1.linear1"].bias.shape)
    d_ada = FullDelta(mods["final_layer.adaLN_modulation.1"].weight.shape)
    with torch.no_grad():
        for d in (d_lin1, d_lin1b, d_ada):
            d.weight.normal_(0, 0.1)
    cond = host.encode_prompts(["a cat"])
    x, sig = torch.randn(1, 16, 4, 4), torch.tensor([0.5])
    base = host.predict(x, sig, cond)
    host.install_delta("unet", "double_blocks.0.img_attn.qkv", "weight", lora)
    host.install_delta("unet", "single_blocks.1.linear1", "weight", d_lin1)
    host.install_delta("unet", "single_blocks.1.linear1", "bias", d_lin1b)
    host.install_delta("unet", "final_layer.adaLN_modulation.1", "weight", d_ada)
    try:
        got = host.predict(x, sig, cond)
        with host.deltas_disabled():
            torch.testing.assert_close(host.predict(x, sig, cond), base)
        # the same ΔW on the BFL state dict, converted back to diffusers names, loaded into a copy
        sd = {k: v for k, v in host.transformer.state_dict().items() if ".parametrizations." not in k}
        with host.deltas_disabled():
            for name, mod in host.transformer.named_modules():
                if hasattr(mod, "parametrizations"):
                    for attr in mod.parametrizations:
                        sd[f"{name}.{attr}"] = getattr(mod, "parametrizations")[attr].original.detach()
        canon = canonical_state_dict(sd, host.dims)
        P = CANONICAL_PREFIX
        with torch.no_grad():
            canon[P + "double_blocks.0.img_attn.qkv.weight"] += lora.delta()
            canon[P + "single_blocks.1.linear1.weight"] += d_lin1.delta()
            canon[P + "single_blocks.1.linear1.bias"] += d_lin1b.delta()
            canon[P + "final_layer.adaLN_modulation.1.weight"] += d_ada.delta()
        plain = tiny_flux_transformer(1)  # same config, other weights: all replaced below
        plain.load_state_dict(to_diffusers_state_dict(canon, host.dims))
        ref_host = FluxHost(plain, None, None, None, None, None)
        torch.testing.assert_close(got, ref_host.predict(x, sig, cond), rtol=1e-5, atol=1e-5)
        assert (got - base).abs().max() > 1e-3
        # gradients reach the LoRA factors through the row blocks
        host.predict(x, sig, cond).pow(2).mean().backward()
        assert lora.lora_up.grad is not None and lora.lora_up.grad.abs().sum() > 0
        assert d_lin1.weight.grad[3 * 16:].abs().sum() > 0  # the mlp rows (proj_mlp) got gradient
    finally:
        host.clear_deltas()
    torch.testing.assert_close(host.predict(x, sig, cond), base)
    with pytest.raises(KeyError):
        host.install_delta("unet", "double_blocks.0.attn.to_q", "weight", FullDelta((16, 16)))


def test_text_encoder_components_and_t5_length(host):
    assert host.components() == ["unet", "te1", "t5"]
    t5 = host.modules("t5")
    assert "encoder.block.0.layer.0.SelfAttention.q" in t5 and "encoder.block.1.layer.1.DenseReluDense.wi_0" in t5
    assert "text_model.encoder.layers.0.self_attn.q_proj" in host.modules("te1")
    d = FullDelta(t5["encoder.block.0.layer.0.SelfAttention.q"].weight.shape)
    with torch.no_grad():
        d.weight.normal_(0, 0.5)
    base = host.encode_prompts(["a cat"])
    host.install_delta("t5", "encoder.block.0.layer.0.SelfAttention.q", "weight", d)
    try:
        moved = host.encode_prompts(["a cat"])
        assert not torch.allclose(moved.context, base.context)
        torch.testing.assert_close(moved.pooled, base.pooled)  # T5 only changes the context
    finally:
        host.clear_deltas()
    schnell = tiny_flux_host(0, guidance_embeds=False, t5_tokens=None)
    assert schnell.variant == "schnell" and schnell.t5xxl_max_token_length == 256
    assert host.variant == "dev"
    assert FluxHost(host.transformer, None, None, None, None, None).t5xxl_max_token_length == 512
    c = Conditioning(torch.randn(1, 8, 32), torch.randn(1, 32))
    out = schnell.predict(torch.randn(1, 16, 4, 4), torch.tensor([0.5]), c)
    assert out.shape == (1, 16, 4, 4)
    assert schnell.configure_text(clip_skip=2)  # warned, not silently dropped
    with pytest.raises(ValueError, match="v_parameterization"):
        host.configure_schedule("v_prediction")


def test_vae_shift_scale_and_sampling(host):
    torch.manual_seed(3)
    px = torch.rand(1, 3, 32, 32) * 2 - 1
    lat = host.encode_images(px)
    mean = host.vae.encode(px).latent_dist.mean
    torch.testing.assert_close(lat, (mean - 0.1159) * 0.3611)
    torch.testing.assert_close(host.decode_latents(lat), ((host.vae.decode(mean).sample + 1) / 2).clamp(0, 1))
    a = host.sample(["a cat"], width=32, height=32, steps=2, seed=5)
    b = host.sample(["a cat"], width=32, height=32, steps=2, seed=5)
    assert a.shape == (1, 3, 32, 32) and torch.equal(a, b)
    d = FullDelta(host.modules("unet")["final_layer.linear"].weight.shape)
    with torch.no_grad():
        d.weight.normal_(0, 1.0)
    host.install_delta("unet", "final_layer.linear", "weight", d)
    try:
        assert not torch.allclose(host.sample(["a cat"], width=32, height=32, steps=2, seed=5), a)
    finally:
        host.clear_deltas()
    # dev samples on Flux's resolution-dependent shift; schnell and a fixed shift do not
    assert host.scheduler().config.use_dynamic_shifting and not host.scheduler(3.0).config.use_dynamic_shifting
