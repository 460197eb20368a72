"""ComfyUI bridge (nodes/comfy_io.py, comfy_keys.py, comfy_host.py, comfy_patchers.py): safe paths without
ComfyUI; ComfyHost and patch helpers on real ComfyUI (``requires_comfyui``) with ComfyUI's own SD15 model class at
tiny size (tests/e2e/comfy_env.py)."""

from __future__ import annotations

import os

import pytest
import torch
from conceptlab.nodes.comfy_io import PathOutsideError, safe_join
from conftest import requires_comfyui

# -- safe paths (no ComfyUI) ---------------------------------------------------------------------------------

def test_safe_join_accepts_inside(tmp_path):
    (tmp_path / "sub").mkdir()
    assert safe_join(tmp_path, "sub/a.png") == (tmp_path / "sub" / "a.png").resolve()
    assert safe_join(tmp_path, "./sub//a.png") == (tmp_path / "sub" / "a.png").resolve()


# a `..` segment is refused even where it would stay inside (issue 18: one simple rule for every name)
@pytest.mark.parametrize("bad", ["../x.png", "sub/../../x", "..", "sub/../b.txt", "/etc/passwd", "C:\\Windows\\x",
                                 "c:x"])
def test_safe_join_refuses_escape(tmp_path, bad):
    with pytest.raises(PathOutsideError):
        safe_join(tmp_path, bad)


def test_safe_join_refuses_symlink_escape(tmp_path):
    outside = tmp_path / "outside"
    base = tmp_path / "base"
    outside.mkdir()
    base.mkdir()
    (outside / "secret.txt").write_text("x")
    try:
        os.symlink(outside, base / "link")
    except (OSError, NotImplementedError):
        pytest.skip("symlinks not available")
    with pytest.raises(PathOutsideError):
        safe_join(base, "link/secret.txt")


# -- real ComfyUI, in-process ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def comfy_models():
    from e2e.comfy_env import comfy_inprocess, tiny_sd1_clip, tiny_sd15_patcher, tiny_vae

    comfy_inprocess()
    with torch.inference_mode():  # as ComfyUI builds models inside nodes: parameters are inference tensors
        return tiny_sd15_patcher(), tiny_sd1_clip(), tiny_vae()


def _inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.tensor([10, 700][:batch])
    return x, t


def _cross_attn_paths(host):
    return [p for p in host.modules("unet") if ".attn2.to_" in p]


@requires_comfyui
def test_host_protocol_basics(comfy_models):
    from conceptlab.nodes.comfy_host import ComfyHost

    model, clip, vae = comfy_models
    with torch.inference_mode():
        host = ComfyHost(model, clip, vae)
    try:
        assert host.arch == "sd1" and host.prediction_type == "epsilon"
        ms = model.model.model_sampling
        ac = host.alphas_cumprod
        assert ac.shape == ms.sigmas.shape and ac.dtype == torch.float32
        # sigma = sqrt((1 - a) / a) must round-trip to ComfyUI's own sigmas
        torch.testing.assert_close(((1 - ac) / ac).sqrt(), ms.sigmas.float(), rtol=1e-4, atol=1e-6)
        assert bool((ac[1:] < ac[:-1]).all())
        assert not ac.is_inference()  # training code uses it outside inference mode
        unet = host.modules("unet")
        # canonical diffusers names map onto ComfyUI's ldm modules (the very same objects)
        key = host.model_key("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q", "weight")
        assert key == "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_q.weight"
        assert unet["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"] is \
            model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn2.to_q
        assert len(_cross_attn_paths(host)) == 4 * 7  # 7 transformer blocks in the tiny UNet
        te = host.modules("te")
        assert "text_model.encoder.layers.1.mlp.fc2" in te
        assert host.model_key("te", "text_model.encoder.layers.0.self_attn.q_proj", "bias") == \
            "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.bias"
        assert host.components() == ["unet", "te"]
        with pytest.raises(ValueError):
            host.modules("te2")
        with pytest.raises(ValueError):
            host.model_key("unet", "down_blocks.9.nothing", "weight")
    finally:
        host.close()


@requires_comfyui
def test_module_model_key_sd_layouts():
    from e2e.comfy_env import comfy_inprocess

    comfy_inprocess()
    from conceptlab.nodes.comfy_keys import model_key

    assert model_key("unet", "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0") == \
        "diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_out.0.weight"
    assert model_key("unet", "mid_block.attentions.0.transformer_blocks.0.attn1.to_k", "bias") == \
        "diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_k.bias"
    assert model_key("unet", "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_q", arch="sdxl") == \
        "diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_q.weight"
    assert model_key("te2", "text_model.encoder.layers.3.mlp.fc1", arch="sdxl") == \
        "clip_g.transformer.text_model.encoder.layers.3.mlp.fc1.weight"
    with pytest.raises(ValueError):
        model_key("te2", "text_model.encoder.layers.0.mlp.fc1", arch="sd1")


@requires_comfyui
def test_predict_delta_disable_and_input_untouched(comfy_models):
    from conceptlab.nodes.comfy_host import ComfyHost
    from conceptlab.training.host import FullDelta

    model, clip, vae = comfy_models
    wrappers_before = {k: list(v) for k, v in model.weight_wrapper_patches.items()}
    patches_before = {k: list(v) for k, v in model.patches.items()}
    uuid_before = model.patches_uuid
    x, t = _inputs()
    with torch.inference_mode():
        host = ComfyHost(model, clip, vae)
        try:
            cond = host.encode_prompts(["a red apple", "a blue car"])
            assert cond.context.shape == (2, 77, 64) and cond.pooled is None
            frozen = host.predict(x, t, cond)
            # predict is exactly ComfyUI's raw UNet output (not apply_model's denoised x0)
            ref = model.model.diffusion_model(x, t.float(), context=cond.context, transformer_options={})
            torch.testing.assert_close(frozen, ref)
            path = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"
            with torch.inference_mode(False):
                delta = FullDelta(host.modules("unet")[path].weight.shape)
                host.install_delta("unet", path, "weight", delta)
                with torch.no_grad():
                    delta.weight.normal_(0, 0.3)
            changed = host.predict(x, t, cond)
            assert (changed - frozen).abs().max() > 1e-3
            # the delta acts exactly as weight + delta on that one layer
            lin = host.modules("unet")[path]
            expect = []

            def hook(mod, args, out):
                expect.append(torch.nn.functional.linear(args[0], mod.weight + delta.weight))
                return out
            h = lin.register_forward_hook(hook)
            try:
                host.predict(x, t, cond)
            finally:
                h.remove()
            # (the hook sees the module's own forward output, which includes the wrapper)
            with torch.no_grad():
                got = []
                h = lin.register_forward_hook(lambda m, a, o: got.append(o))
                host.predict(x, t, cond)
                h.remove()
            torch.testing.assert_close(got[0], expect[0], rtol=1e-4, atol=1e-5)
            with host.deltas_disabled():
                torch.testing.assert_close(host.predict(x, t, cond), frozen)
            torch.testing.assert_close(host.predict(x, t, cond), changed)
            with pytest.raises(ValueError):
                host.install_delta("unet", path, "weight", delta)  # already there
            with torch.inference_mode(False), pytest.raises(ValueError):
                host.install_delta("unet", path.replace("to_v", "to_q"), "weight", FullDelta((3, 3)))
            host.clear_deltas()
            torch.testing.assert_close(host.predict(x, t, cond), frozen)
        finally:
            host.close()
        # the input MODEL: same patches, no wrappers, same uuid, and after ComfyUI reloads it the same output
        assert {k: list(v) for k, v in model.weight_wrapper_patches.items()} == wrappers_before
        assert {k: list(v) for k, v in model.patches.items()} == patches_before
        assert model.patches_uuid == uuid_before
        import comfy.model_management as mm

        mm.load_models_gpu([model])
        torch.testing.assert_close(model.model.diffusion_model(x, t.float(), context=cond.context, transformer_options={}),
                                   frozen)


@requires_comfyui
def test_gradients_reach_deltas_from_inference_mode(comfy_models):
    from conceptlab.nodes.comfy_host import ComfyHost
    from conceptlab.training.host import FullDelta

    model, clip, vae = comfy_models
    x, t = _inputs()
    with torch.inference_mode():  # a node's execution context
        host = ComfyHost(model, clip, vae)
        x_inf = x.clone()  # an inference tensor, like upstream node outputs
        try:
            with torch.inference_mode(False):
                upaths = _cross_attn_paths(host)[:4]
                deltas = {}
                for p in upaths:
                    d = FullDelta(host.modules("unet")[p].weight.shape)
                    host.install_delta("unet", p, "weight", d)
                    deltas[p] = d
                tpath = "text_model.encoder.layers.0.self_attn.v_proj"
                td = FullDelta(host.modules("te")[tpath].weight.shape)
                host.install_delta("te", tpath, "weight", td)
                cond = host.encode_prompts(["a cat", "a dog"])
                assert cond.context.requires_grad
                out = host.predict(x_inf, t, cond)
                loss = out.float().pow(2).mean()
                loss.backward()
                for p, d in deltas.items():
                    assert d.weight.grad is not None and d.weight.grad.abs().sum() > 0, p
                assert td.weight.grad is not None and td.weight.grad.abs().sum() > 0
                # an optimiser step on the deltas changes the prediction
                opt = torch.optim.SGD([d.weight for d in deltas.values()] + [td.weight], lr=1.0)
                opt.step()
                out2 = host.predict(x_inf, t, host.encode_prompts(["a cat", "a dog"]))
                assert (out2.detach() - out.detach()).abs().max() > 0
            # deltas made in inference mode (e.g. a LoRA file loaded inside a node) still work for sampling
            with torch.inference_mode():
                free = next(p for p in _cross_attn_paths(host) if p not in deltas and p.endswith("to_k"))
                infd = FullDelta(host.modules("unet")[free].weight.shape)
                infd.weight.add_(0.1)
                host.install_delta("unet", free, "weight", infd)
                with_inf = host.predict(x_inf, t, cond)
                infd.enabled = False
                assert (host.predict(x_inf, t, cond) - with_inf).abs().max() > 0
        finally:
            host.close()


@requires_comfyui
def test_vae_round_trip_and_comfy_sampler(comfy_models):
    from conceptlab.nodes.comfy_host import ComfyHost
    from conceptlab.nodes.comfy_patchers import sample_images

    model, clip, vae = comfy_models
    with torch.inference_mode():
        host = ComfyHost(model, clip, vae)
        try:
            pix = torch.rand(1, 3, 64, 64) * 2 - 1
            lat = host.encode_images(pix)
            raw = vae.encode(((pix + 1) / 2).movedim(1, -1))
            torch.testing.assert_close(lat, raw * 0.18215)  # SD15 latent_format.process_in
            img = host.decode_latents(lat)
            assert img.shape == (1, 3, 64, 64) and 0 <= float(img.min()) and float(img.max()) <= 1
            assert not lat.is_inference() and not img.is_inference()  # cacheable for training
            torch.testing.assert_close(img, vae.decode(raw).movedim(-1, 1).clamp(0, 1))
            s1 = host.sample(["a cat"], width=64, height=64, steps=1, cfg=2.0, seed=3)
            assert s1.shape == (1, 3, 64, 64)
            pos = host.conditioning("a cat")
            neg = host.conditioning("")
            # the same seed through the plain MODEL (no deltas installed): identical images, ComfyUI's seeded noise
            direct = sample_images(model, pos, neg, vae, seed=3, steps=1, cfg=2.0, sampler_name="euler",
                                   scheduler="normal", width=64, height=64)
            assert direct.shape == (1, 64, 64, 3)
            torch.testing.assert_close(direct.movedim(-1, 1), s1)
            with pytest.raises(ValueError):
                sample_images(model, pos, neg, vae, 0, 1, 1.0, "no_such_sampler", "normal", 64, 64)
        finally:
            host.close()


@requires_comfyui
def test_add_diff_patches_and_iter_patched_weights(comfy_models):
    import comfy.model_management as mm
    from conceptlab.nodes.comfy_patchers import add_diff_patches, iter_patched_weights

    model, _, _ = comfy_models
    k1 = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    k2 = "diffusion_model.middle_block.1.proj_in.bias"
    with torch.inference_mode():
        sd = model.model_state_dict()
        w1, w2 = sd[k1].clone(), sd[k2].clone()
        g = torch.Generator().manual_seed(5)
        d1, d2 = torch.randn(w1.shape, generator=g), torch.randn(w2.shape, generator=g)
        patched = add_diff_patches(model, {"model." + k1: d1, k2: d2}, strength=0.5)
        assert patched is not model and k1 not in model.patches
        got = dict(iter_patched_weights(patched, [k1, "model." + k2]))
        torch.testing.assert_close(got[k1], w1 + 0.5 * d1)
        torch.testing.assert_close(got[k2], w2 + 0.5 * d2)
        # all keys, compared with ComfyUI baking the patches in (patch_model), then restoring
        streamed = dict(iter_patched_weights(patched))
        assert set(streamed) == set(sd)
        mm.unload_all_models()
        patched.patch_model()
        try:
            baked = {k: v.detach().float().clone() for k, v in patched.model.state_dict().items()}
            # while the clone is baked in, streaming the ORIGINAL still gives unpatched weights
            orig_k1 = dict(iter_patched_weights(model, [k1]))[k1]
        finally:
            patched.unpatch_model()
        for k in sd:
            torch.testing.assert_close(streamed[k], baked[k], msg=k)
        torch.testing.assert_close(orig_k1, w1.float())
        torch.testing.assert_close(model.model_state_dict()[k1], w1)  # restored, untouched
        with pytest.raises(KeyError):
            add_diff_patches(model, {"diffusion_model.nope.weight": d1})
        with pytest.raises(ValueError):
            add_diff_patches(model, {k1: d2})


@requires_comfyui
def test_clip_diff_patches(comfy_models):
    from conceptlab.nodes.comfy_patchers import add_diff_patches, iter_patched_weights

    _, clip, _ = comfy_models
    key = "clip_l.transformer.text_model.encoder.layers.1.self_attn.k_proj.weight"
    with torch.inference_mode():
        w = clip.patcher.model_state_dict()[key].clone()
        d = torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
        patched = add_diff_patches(clip, {"cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.k_proj"
                                          ".weight": d}, strength=-2.0)
        assert type(patched) is type(clip) and key not in clip.patcher.patches
        ((_k, got),) = list(iter_patched_weights(patched, [key]))
        torch.testing.assert_close(got, w - 2.0 * d)


# -- ComfyUI-free helpers ------------------------------------------------------------------------------------

def test_image_numpy_round_trip():
    import numpy as np
    from conceptlab.nodes.comfy_io import image_to_numpy, numpy_to_image

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
    img = numpy_to_image([a, b])
    assert img.shape == (2, 5, 7, 3) and img.dtype == torch.float32
    back = image_to_numpy(img)
    assert np.array_equal(back[0], a) and np.array_equal(back[1][:3, :4], b)
    assert back[1][3:].max() == 0  # padding is black


def test_input_output_paths_stay_inside(tmp_path, monkeypatch):
    import sys
    import types

    from conceptlab.nodes import comfy_io

    fp = types.ModuleType("folder_paths")
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(b"x")
    fp.get_input_directory = lambda: str(tmp_path / "in")
    fp.get_output_directory = lambda: str(tmp_path / "out")
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    assert comfy_io.resolve_input("a.png") == (tmp_path / "in" / "a.png").resolve()
    with pytest.raises(FileNotFoundError):
        comfy_io.resolve_input("missing.png")
    with pytest.raises(PathOutsideError):
        comfy_io.resolve_input("../out/x")
    p = comfy_io.output_file("loras/run1", "x.safetensors")
    assert p.parent.is_dir() and p.parent == (tmp_path / "out" / "loras" / "run1").resolve()
    with pytest.raises(PathOutsideError):
        comfy_io.output_file("../../etc", "x")


@requires_comfyui
def test_unet_key_map_agrees_with_formats_keys():
    """ComfyUI's own map (comfy.utils.unet_to_diffusers) and formats.keys (diffusers' conversion) agree."""
    from e2e.comfy_env import comfy_inprocess

    comfy_inprocess()
    from conceptlab.formats import ldm_keys
    from conceptlab.nodes.comfy_keys import model_key

    d2l = ldm_keys.diffusers_to_ldm_unet("sd1")
    compared = 0
    for dkey, lkey in d2l.items():
        path, attr = dkey.rsplit(".", 1)
        if attr in ("weight", "bias"):
            assert model_key("unet", path, attr, arch="sd1") == "diffusion_model." + lkey
            compared += 1
    assert compared == 686  # every SD1.5 UNet weight and bias
