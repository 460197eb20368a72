"""The diffusers host and the shared schedule helpers (training/host.py, training/diffusers_host.py)."""

import pytest
import torch

from conceptlab.training.host import FullDelta, add_noise, ddim_sample, eps_from_prediction, prediction_target
from tiny_models import sd15_unet_meta, tiny_host


def test_modules_use_canonical_names():
    host = tiny_host()
    unet = host.modules("unet")
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q" in unet
    assert "down_blocks.0.attentions.0.proj_in" in unet
    te = host.modules("te")
    assert "text_model.encoder.layers.0.self_attn.q_proj" in te
    with pytest.raises(ValueError):
        host.modules("te2")


def test_delta_changes_prediction_and_can_be_switched_off():
    host = tiny_host()
    torch.manual_seed(1)
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 500])
    cond = host.encode_prompts(["a red apple", "a cat"])
    with torch.no_grad():
        base = host.predict(x, t, cond)
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    w0 = host.modules("unet")[path].weight.detach().clone()
    delta = FullDelta(w0.shape)
    with torch.no_grad():
        delta.weight.normal_(0, 0.5)
    host.install_delta("unet", path, "weight", delta)
    assert path in host.modules("unet"), "installing a delta must not rename modules"
    with torch.no_grad():
        changed = host.predict(x, t, cond)
        with host.deltas_disabled():
            frozen = host.predict(x, t, cond)
    assert not torch.allclose(changed, base)
    assert torch.equal(frozen, base)
    # gradient reaches the delta only
    out = host.predict(x, t, cond)
    out.square().mean().backward()
    assert delta.weight.grad is not None and delta.weight.grad.abs().sum() > 0
    host.clear_deltas()
    assert torch.equal(host.modules("unet")[path].weight, w0)
    with torch.no_grad():
        assert torch.equal(host.predict(x, t, cond), base)


def test_text_encoder_delta_is_differentiable():
    host = tiny_host()
    path = "text_model.encoder.layers.1.mlp.fc2"
    d = FullDelta(host.modules("te")[path].weight.shape)
    host.install_delta("te", path, "weight", d)
    host.encode_prompts(["pixel art"]).context.sum().backward()
    assert d.weight.grad is not None and d.weight.grad.abs().sum() > 0


def test_schedule_helpers_are_consistent():
    ac = tiny_host().alphas_cumprod
    assert ac.shape == (1000,) and 0 < ac[-1] < ac[0] < 1
    x0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0, 400, 999])
    xt = add_noise(x0, eps, t, ac)
    v = prediction_target(x0, eps, t, ac, "v_prediction")
    # ε recovered from v (Salimans & Ho 2022): ε = sqrt(ᾱ) v + sqrt(1-ᾱ) x_t
    assert torch.allclose(eps_from_prediction(v, xt, t, ac, "v_prediction"), eps, atol=1e-5)
    assert torch.equal(prediction_target(x0, eps, t, ac, "epsilon"), eps)
    with pytest.raises(ValueError):
        prediction_target(x0, eps, t, ac, "flow")


def test_ddim_sample_and_vae_roundtrip_shapes():
    host = tiny_host()
    cond = host.encode_prompts(["a"])
    unc = host.encode_prompts([""])
    lat = ddim_sample(host, torch.randn(1, 4, 8, 8), cond, unc, steps=3, cfg=3.0)
    assert lat.shape == (1, 4, 8, 8) and torch.isfinite(lat).all()
    img = host.decode_latents(lat)
    assert img.shape == (1, 3, 64, 64) and img.min() >= 0 and img.max() <= 1
    assert host.encode_images(img * 2 - 1).shape == (1, 4, 8, 8)
    imgs = host.sample(["a", "b"], steps=2, width=64, height=64, seed=3)
    assert torch.equal(imgs, host.sample(["a", "b"], steps=2, width=64, height=64, seed=3))


def test_sd15_meta_unet_has_real_names():
    unet = sd15_unet_meta()
    names = [n for n, _ in unet.named_parameters()]
    assert "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight" in names
    assert sum(p.numel() for p in unet.parameters()) > 800_000_000
