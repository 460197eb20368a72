"""ComfyHost on Flux.1 (real-ComfyUI tier, in-process): ComfyUI's own ``model_base.Flux`` at tiny width
(tests/e2e/comfy_flux.py) driven through ``apply_model`` / ``model_sampling``; predictions against diffusers'
``FluxTransformer2DModel`` on the same weights; training mechanics (in-place residuals, gradient checkpointing,
an fp8-stored base); Flux sampling with FluxGuidance. Skips without ``COMFYUI_PATH``."""

from __future__ import annotations

import pytest
import torch
from conftest import requires_comfyui

from conceptlab.training.conditioning import Conditioning

pytestmark = requires_comfyui


@pytest.fixture(scope="module")
def flux_models():
    from e2e.comfy_flux import tiny_flux_clip, tiny_flux_patcher, tiny_flux_vae

    with torch.inference_mode():  # as ComfyUI's loaders build them: inference tensors
        return tiny_flux_patcher(), tiny_flux_clip(), tiny_flux_vae()


def _host(model, clip=None, vae=None):
    from conceptlab.nodes.comfy_host import ComfyHost

    with torch.inference_mode():
        return ComfyHost(model, clip, vae)


def _inputs(batch=2, seed=0, hw=8):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, 16, hw, hw, generator=g)
    eps = torch.randn(batch, 16, hw, hw, generator=g)
    sig = torch.tensor([0.25, 0.8, 0.5, 0.95][:batch])
    from conceptlab.training.flow import noisy_input

    return noisy_input(x0, eps, sig), sig, x0, eps


def test_flux_host_protocol(flux_models):
    from conceptlab.nodes.comfy_keys import model_key

    model, clip, vae = flux_models
    host = _host(model, clip, vae)
    try:
        assert host.arch == "flux" and host.prediction_type == "flow" and host.latent_channels == 16
        assert host.components() == ["unet", "te1", "t5"]
        unet = host.modules("unet")
        dm = model.model.diffusion_model
        # BFL paths are ComfyUI's own module paths: the very same module objects
        assert unet["double_blocks.0.img_attn.qkv"] is dm.double_blocks[0].img_attn.qkv
        assert unet["single_blocks.0.linear1"] is dm.single_blocks[0].linear1
        assert {"img_in", "txt_in", "final_layer.linear", "double_blocks.0.txt_mlp.2"} <= set(unet)
        assert host.model_key("unet", "double_blocks.0.txt_attn.proj", "bias") == \
            "diffusion_model.double_blocks.0.txt_attn.proj.bias"
        assert model_key("unet", "single_blocks.7.linear2", arch="flux") == "diffusion_model.single_blocks.7.linear2.weight"
        assert host.model_key("t5", "encoder.block.1.layer.1.DenseReluDense.wo") == \
            "t5xxl.transformer.encoder.block.1.layer.1.DenseReluDense.wo.weight"
        assert host.modules("t5")["encoder.block.0.layer.0.SelfAttention.q"] is \
            clip.cond_stage_model.t5xxl.transformer.encoder.block[0].layer[0].SelfAttention.q
        assert "text_model.encoder.layers.1.self_attn.q_proj" in host.modules("te1")
        with pytest.raises(ValueError):
            host.model_key("unet", "down_blocks.0.attentions.0.proj_in")
        with pytest.raises(ValueError):
            host.model_key("t5", "text_model.encoder.layers.0.mlp.fc1")
        # the flow model keeps its own model_sampling: eps / v and zero-terminal SNR are refused by name
        host.configure_schedule(None)
        host.configure_schedule("flow")
        for bad in ("epsilon", "v_prediction"):
            with pytest.raises(ValueError, match="rectified-flow"):
                host.configure_schedule(bad)
        with pytest.raises(ValueError, match="zero_terminal_snr"):
            host.configure_schedule(None, zero_terminal_snr=True)
        with pytest.raises(ValueError, match="sigmas in"):
            host.predict(*_inputs()[:1], torch.tensor([10.0, 500.0]), host.encode_prompts(["a", "b"]))
    finally:
        host.close()


def test_flux_encode_prompts_t5_pooled_and_padding(flux_models):
    model, clip, _ = flux_models
    host = _host(model, clip)
    try:
        long = " ".join(["pixel"] * 300)  # > 256 T5 tokens: ComfyUI does not chunk T5
        cond = host.encode_prompts(["a red fox", long])
        assert cond.context.shape[0] == 2 and cond.context.shape[2] == 48 and cond.context.shape[1] > 256
        assert cond.pooled.shape == (2, 32)
        # the short prompt is padded with T5 pad tokens (ComfyUI's own t5xxl_min_length option), not repeated
        with torch.inference_mode(False):
            toks = clip.tokenize("a red fox", tokenizer_options={"t5xxl_min_length": cond.context.shape[1]})
            ref, pooled = clip.encode_from_tokens(toks, return_pooled=True)
        torch.testing.assert_close(cond.context[0:1].float(), ref.float())
        torch.testing.assert_close(cond.pooled[0:1].float(), pooled.float())
        single = host.encode_prompts(["a red fox"])
        assert single.context.shape[1] == 256  # ComfyUI's Flux T5 minimum length
    finally:
        host.close()


def _diffusers_flux(model):
    """diffusers FluxTransformer2DModel with the ComfyUI model's weights (converted by formats/flux_views)."""
    from conceptlab.formats.flux_views import to_diffusers_state_dict
    from diffusers import FluxTransformer2DModel
    from e2e.comfy_flux import TINY_FLUX_CONFIG as C

    p = model.model.diffusion_model.params
    tr = FluxTransformer2DModel(patch_size=1, in_channels=16 * 4, num_layers=C["depth"],
                                num_single_layers=C["depth_single_blocks"], attention_head_dim=C["hidden_size"] // C["num_heads"],
                                num_attention_heads=C["num_heads"], joint_attention_dim=C["context_in_dim"],
                                pooled_projection_dim=C["vec_in_dim"], guidance_embeds=p.guidance_embed,
                                axes_dims_rope=tuple(C["axes_dim"]))
    with torch.inference_mode(False):
        sd = {k: v.detach().clone().float() for k, v in model.model.diffusion_model.state_dict().items()}
        missing, unexpected = tr.load_state_dict(to_diffusers_state_dict(sd), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return tr.eval()


def _diffusers_predict(tr, x, sig, cond, guidance):
    """Velocity [B,16,h,w] from diffusers: 2x2 packing and ids as diffusers FluxPipeline builds them."""
    from diffusers import FluxPipeline

    b, c, h, w = x.shape
    packed = FluxPipeline._pack_latents(x, b, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
    txt_ids = torch.zeros(cond.context.shape[1], 3)
    out = tr(hidden_states=packed, encoder_hidden_states=cond.context.float(), pooled_projections=cond.pooled.float(),
             timestep=sig, img_ids=img_ids, txt_ids=txt_ids,
             guidance=None if guidance is None else torch.full((b,), float(guidance)), return_dict=False)[0]
    return FluxPipeline._unpack_latents(out, h * 8, w * 8, 8)


def test_flux_predict_equals_diffusers_transformer(flux_models):
    model, clip, _ = flux_models
    host = _host(model, clip)
    tr = _diffusers_flux(model)
    try:
        x, sig, _, _ = _inputs(batch=2)
        cond = host.encode_prompts(["a castle", "a pixel-art sword"])
        for g in (3.5, 1.0):
            cond.extras["guidance"] = torch.tensor([g, g])
            with torch.no_grad():
                ours = host.predict(x, sig, cond).float()
                ref = _diffusers_predict(tr, x, sig, cond, g)
            assert ours.shape == (2, 16, 8, 8)
            torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
        # no guidance given: the model's own default (extra_conds: 3.5)
        del cond.extras["guidance"]
        with torch.no_grad():
            torch.testing.assert_close(host.predict(x, sig, cond).float(), _diffusers_predict(tr, x, sig, cond, 3.5),
                                       rtol=1e-4, atol=1e-4)
    finally:
        host.close()


def test_flux_schnell_predict_equals_diffusers():
    from e2e.comfy_flux import tiny_flux_patcher

    with torch.inference_mode():
        model = tiny_flux_patcher(seed=3, schnell=True)
    host = _host(model)
    tr = _diffusers_flux(model)
    try:
        from conceptlab.training.conditioning import Conditioning

        g = torch.Generator().manual_seed(5)
        cond = Conditioning(torch.randn(1, 12, 48, generator=g), torch.randn(1, 32, generator=g))
        x, sig, _, _ = _inputs(batch=1)
        with torch.no_grad():
            torch.testing.assert_close(host.predict(x, sig, cond).float(), _diffusers_predict(tr, x, sig, cond, None),
                                       rtol=1e-4, atol=1e-4)
    finally:
        host.close()


def _lora_on(host, paths, comp="unet", seed=0):
    from conceptlab.training.lora.network import LoRADelta

    g = torch.Generator().manual_seed(seed)
    deltas = []
    with torch.inference_mode(False):
        for p in paths:
            w = host.modules(comp)[p].weight
            d = LoRADelta(tuple(w.shape), 4, 4.0)
            with torch.no_grad():
                for prm in d.parameters():
                    prm.copy_(torch.randn(prm.shape, generator=g) * 0.05)
            host.install_delta(comp, p, "weight", d)
            deltas.append(d)
    return deltas


_UNET_TARGETS = ["double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.qkv", "double_blocks.0.txt_mlp.0",
                 "single_blocks.0.linear1", "single_blocks.0.linear2", "txt_in"]


def _loss_and_grads(host, deltas, cond, x, sig, x0, eps):
    from conceptlab.training.flow import velocity_target

    with torch.inference_mode(False):
        for d in deltas:
            for p in d.parameters():
                p.grad = None
        loss = torch.nn.functional.mse_loss(host.predict(x, sig, cond).float(), velocity_target(x0, eps))
        loss.backward()
        return loss.detach(), [p.grad.clone() for d in deltas for p in d.parameters()]


def test_flux_training_backward_and_gradient_checkpointing(flux_models):
    """LoRA on the txt stream and single blocks needs a backward through ComfyUI's in-place residuals
    (``txt += ...``, ``x += ...``); checkpointing the double/single blocks gives the same gradients and keeps fewer
    activations for backward."""
    model, clip, _ = flux_models
    host = _host(model, clip)
    try:
        deltas = _lora_on(host, _UNET_TARGETS)
        deltas += _lora_on(host, ["encoder.block.0.layer.0.SelfAttention.q", "encoder.block.1.layer.1.DenseReluDense.wo"],
                           comp="t5", seed=1)
        x, sig, x0, eps = _inputs(batch=2)

        def run():
            cond = host.encode_prompts(["a castle", "a sword"])  # differentiable: T5 deltas are installed
            return _loss_and_grads(host, deltas, cond, x, sig, x0, eps)

        saved = {"n": 0}

        def pack(t):
            saved["n"] += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss_a, grads_a = run()
        plain = saved["n"]
        assert torch.isfinite(loss_a)
        assert all(torch.isfinite(gr).all() and gr.abs().sum() > 0 for gr in grads_a)
        host.set_gradient_checkpointing(True)
        blocks = [*model.model.diffusion_model.double_blocks, *model.model.diffusion_model.single_blocks]
        assert all(hasattr(b, "org_forward") for b in blocks)
        saved["n"] = 0
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss_b, grads_b = run()
        assert saved["n"] < plain  # activations of the blocks are recomputed, not kept
        torch.testing.assert_close(loss_b, loss_a)
        for a, b in zip(grads_a, grads_b):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    finally:
        host.close()
    assert not any(hasattr(b, "org_forward") for b in blocks)  # close() unpatches the shared model
    assert not any(m._forward_pre_hooks for m in model.model.diffusion_model.modules())


def test_frozen_model_gets_no_gradients_when_its_tensors_are_normal():
    """A model whose parameters are normal tensors (built outside inference mode, or moved by load_models_gpu on a
    GPU) keeps PyTorch's requires_grad=True; the host freezes it on load, as TrainLoraNode does, so backward
    computes gradients for the deltas only — no dense .grad per frozen weight (a second copy of the model)."""
    from e2e.comfy_flux import tiny_flux_patcher

    model = tiny_flux_patcher(seed=3)  # outside inference mode: every parameter requires grad
    dm = model.model.diffusion_model
    assert all(p.requires_grad for p in dm.parameters())
    host = _host(model)
    try:
        deltas = _lora_on(host, _UNET_TARGETS)
        x, sig, x0, eps = _inputs(batch=1)
        g = torch.Generator().manual_seed(0)
        cond = Conditioning(torch.randn(1, 8, 48, generator=g), torch.randn(1, 32, generator=g),
                            {"guidance": torch.full((1,), 3.5)})
        loss, grads = _loss_and_grads(host, deltas, cond, x, sig, x0, eps)
        assert torch.isfinite(loss) and all(gr.abs().sum() > 0 for gr in grads)
        assert not any(p.requires_grad for p in dm.parameters())
        assert all(p.grad is None for p in dm.parameters())
    finally:
        host.close()


def test_flux_fp8_base_trains_through_weight_wrappers():
    """Weights stored float8_e4m3fn with fp32 compute (ComfyUI manual-cast ops, as UNETLoader weight_dtype fp8):
    deltas are weight wrappers on the up-cast weight, as in ComfyUI's TrainLoraNode; the fp8 base never changes."""
    from conceptlab.training.conditioning import Conditioning
    from e2e.comfy_flux import tiny_flux_patcher

    with torch.inference_mode():
        model = tiny_flux_patcher(seed=4, weight_dtype=torch.float8_e4m3fn)
    dm = model.model.diffusion_model
    assert dm.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn
    before = {k: v.detach().clone() for k, v in dm.state_dict().items()}
    host = _host(model)
    try:
        assert host.dtype == torch.float32
        deltas = _lora_on(host, _UNET_TARGETS)
        g = torch.Generator().manual_seed(7)
        cond = Conditioning(torch.randn(2, 16, 48, generator=g), torch.randn(2, 32, generator=g))
        x, sig, x0, eps = _inputs(batch=2)
        opt = torch.optim.SGD([p for d in deltas for p in d.parameters()], lr=0.5)
        losses = []
        for _ in range(3):
            loss, grads = _loss_and_grads(host, deltas, cond, x, sig, x0, eps)
            assert torch.isfinite(loss) and all(torch.isfinite(gr).all() and gr.abs().sum() > 0 for gr in grads)
            with torch.inference_mode(False):
                opt.step()
            losses.append(float(loss))
        assert losses[-1] < losses[0]
    finally:
        host.close()
    after = dm.state_dict()
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k].view(torch.uint8) if v.dtype == torch.float8_e4m3fn
                                                         else after[k], v.view(torch.uint8)
                                                         if v.dtype == torch.float8_e4m3fn else v), k


def test_flux_sample_uses_flux_guidance(flux_models):
    """Flux samples: distilled guidance on the conditioning (FluxGuidance; default 3.5), true CFG 1 by default."""
    model, clip, vae = flux_models
    host = _host(model, clip, vae)
    try:
        kw = dict(width=32, height=32, steps=2, seed=3)
        a = host.sample(["a castle"], **kw, cfg=1.0)
        b = host.sample(["a castle"], **kw, cfg=1.0, guidance=3.5)  # the default is ComfyUI's 3.5
        c = host.sample(["a castle"], **kw, cfg=1.0, guidance=1.0)
        d = host.sample(["a castle"], "blurry", **kw, cfg=1.0)  # CFG 1: the negative is not used
        e = host.sample(["a castle"], "blurry", **kw, cfg=2.0)  # true CFG with the negative
        assert a.shape == (1, 3, 32, 32) and torch.isfinite(a).all()
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, d)
        assert (a - c).abs().max() > 1e-4 and (a - e).abs().max() > 1e-4
    finally:
        host.close()


@pytest.mark.parametrize("schnell", [False, True])
def test_comfy_host_equals_diffusers_flux_host(schnell):
    """The same tiny Flux weights in both hosts (training/flux_host.py FluxHost on diffusers, ComfyHost on ComfyUI's
    model): equal velocity predictions, with and without the same LoRA deltas on fused BFL modules (qkv, linear1),
    and equal gradients for those deltas."""
    import copy

    from conceptlab.training.conditioning import Conditioning
    from e2e.comfy_flux import comfy_flux_from_diffusers
    from tiny_models import TINY_FLUX_CLIP_DIM, TINY_FLUX_T5_DIM, tiny_flux_host

    dhost = tiny_flux_host(0, guidance_embeds=not schnell)
    with torch.inference_mode():
        model = comfy_flux_from_diffusers(copy.deepcopy(dhost.transformer))
    chost = _host(model)
    try:
        assert set(dhost.modules("unet")) == set(chost.modules("unet"))
        g = torch.Generator().manual_seed(11)
        cond = Conditioning(torch.randn(2, 16, TINY_FLUX_T5_DIM, generator=g), torch.randn(2, TINY_FLUX_CLIP_DIM, generator=g))
        if not schnell:
            cond.extras["guidance"] = torch.tensor([3.5, 5.0])
        x, sig, x0, eps = _inputs(batch=2)
        with torch.no_grad():
            torch.testing.assert_close(chost.predict(x, sig, cond).float(), dhost.predict(x, sig, cond).float(),
                                       rtol=1e-4, atol=1e-5)
        paths = ["double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.qkv", "single_blocks.1.linear1",
                 "single_blocks.0.linear2", "double_blocks.0.img_mlp.0"]
        dc = _lora_on(chost, paths, seed=2)
        dd = _lora_on(dhost, paths, seed=2)
        lc, gc = _loss_and_grads(chost, dc, cond, x, sig, x0, eps)
        ld, gd = _loss_and_grads(dhost, dd, cond, x, sig, x0, eps)
        torch.testing.assert_close(lc, ld, rtol=1e-4, atol=1e-6)
        for a, b in zip(gc, gd):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)
    finally:
        chost.close()
        dhost.clear_deltas()


def test_kohya_lora_flux_names_load_in_comfyui_with_zero_unloaded(flux_models, caplog):
    """kohya ``networks/lora_flux.py`` names for every block Linear, CLIP-L (``lora_te1_``) and T5 (``lora_te3_``)
    module of the host load through ComfyUI's LoRA loader (``comfy.sd.load_lora_for_models``) with zero "lora key
    not loaded", and ComfyUI's patched weight equals the host's own delta on that weight."""
    import logging

    import comfy.sd
    from conceptlab.nodes.comfy_patchers import iter_patched_weights
    from conceptlab.training.families import family
    from conceptlab.training.lora.network import LoRADelta, _kohya_name

    model, clip, _ = flux_models
    host = _host(model, clip)
    prefixes = family("flux").kohya_te_prefix
    g = torch.Generator().manual_seed(9)
    sd, deltas = {}, {}
    try:
        targets = [("unet", p) for p in host.modules("unet") if p.startswith(("double_blocks.", "single_blocks."))]
        targets += [("te1", p) for p in host.modules("te1") if ".self_attn." in p or ".mlp." in p]
        targets += [("t5", p) for p in host.modules("t5")]
        for comp, path in targets:
            w = host.modules(comp)[path].weight
            name = (_kohya_name(comp, path, host) if comp != "t5" else f"{prefixes['t5']}_{path.replace('.', '_')}")
            with torch.inference_mode(False):
                d = LoRADelta(tuple(w.shape), 2, 1.0)
                with torch.no_grad():
                    d.lora_up.normal_(0, 0.1, generator=g)
            down, up, alpha = d.kohya_tensors()
            sd.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                       f"{name}.alpha": torch.tensor(alpha)})
            deltas[(comp, path)] = d
        assert "lora_unet_double_blocks_0_txt_attn_qkv.lora_up.weight" in sd
        assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha" in sd
        assert "lora_te3_encoder_block_0_layer_0_SelfAttention_q.alpha" in sd
        with caplog.at_level(logging.DEBUG), torch.inference_mode():
            m2, c2 = comfy.sd.load_lora_for_models(model, clip, sd, 1.0, 1.0)
        assert not [r for r in caplog.messages if "lora key not loaded" in r]
        n_unet = sum(1 for c, _ in targets if c == "unet")
        assert len(m2.patches) == n_unet and len(c2.patcher.patches) == len(targets) - n_unet
        # ComfyUI's LoRA maths on the file equals the host's delta on the same key
        with torch.inference_mode(False):
            host.install_delta("unet", "single_blocks.0.linear1", "weight", deltas[("unet", "single_blocks.0.linear1")])
            host.install_delta("t5", "encoder.block.1.layer.1.DenseReluDense.wo", "weight",
                               deltas[("t5", "encoder.block.1.layer.1.DenseReluDense.wo")])
        for patched, ours, key in ((m2, host.patcher, "diffusion_model.single_blocks.0.linear1.weight"),
                                   (c2, host.clip, "t5xxl.transformer.encoder.block.1.layer.1.DenseReluDense.wo.weight")):
            (_, a), = iter_patched_weights(patched, [key])
            (_, b), = iter_patched_weights(ours, [key], extra_wrappers=host.delta_wrappers(ours))
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    finally:
        host.close()
