"""ESD nodes: V1 contracts (no ComfyUI), Grid Masks without ComfyUI, and the real-ComfyUI tier."""

import json
import logging

import pytest
import torch

from conftest import requires_comfyui
from conceptlab.nodes import esd as esd_nodes


@pytest.mark.parametrize("node_id", sorted(esd_nodes.NODE_CLASS_MAPPINGS))
def test_node_contract(node_id):
    cls = esd_nodes.NODE_CLASS_MAPPINGS[node_id]
    assert node_id.startswith("ConceptLab") and node_id in esd_nodes.NODE_DISPLAY_NAME_MAPPINGS
    assert cls.CATEGORY == "Concept Lab/ESD" and cls.DESCRIPTION
    assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS)
    spec = cls.INPUT_TYPES()
    for section in spec.values():
        for name, (typ, *opts) in section.items():
            assert opts and opts[0].get("tooltip"), f"{node_id}.{name} has no tooltip"
    assert callable(getattr(cls(), cls.FUNCTION))


def test_grid_masks_node_outputs():
    masks, preview, weights = esd_nodes.ConceptLabGridMasks().build(96, 64, 3, 0.5, "")
    assert masks.shape == (10, 64, 96)
    assert torch.equal(masks[:9].sum(0), torch.ones(64, 96))
    assert preview.dim() == 4 and preview.shape[-1] == 3 and 0 <= float(preview.min()) <= float(preview.max()) <= 1
    w = [float(x) for x in weights.split(",")]
    assert len(w) == 10 and abs(sum(w) - 1) < 1e-3
    _, _, w2 = esd_nodes.ConceptLabGridMasks().build(64, 64, 2, 0.0, "1, 1, 1, 5")
    assert [round(float(x), 3) for x in w2.split(",")] == [0.125, 0.125, 0.125, 0.625]
    with pytest.raises(ValueError):
        esd_nodes.ConceptLabGridMasks().build(64, 64, 2, 0.0, "1, 2")


# -- real ComfyUI ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cenv(tmp_path_factory):
    from e2e.comfy_env import comfy_inprocess, tiny_sd1_clip, tiny_sd15_patcher, tiny_vae

    comfy_inprocess()
    import folder_paths

    out = tmp_path_factory.mktemp("comfy_out")
    prev = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(out))
    yield {"model": tiny_sd15_patcher(), "clip": tiny_sd1_clip(), "vae": tiny_vae(), "out": out}
    folder_paths.set_output_directory(prev)


def _erase_kwargs(**kw):
    base = dict(concepts="Van Gogh", prompt_variations="", variations=3, method="esd-x", xt_source="noised",
                negative_guidance=1.0, iterations=2, lr=1e-2, seed=0, resolution=64, start_guidance=3.0,
                ddim_steps=2, prompt_order="cycle", mask_mode="sample", save_name="esd/test", lora_rank=0,
                save_dtype="float32", save_on_cancel=True)
    base.update(kw)
    return base


@pytest.fixture(scope="module")
def erased_run(cenv):
    """One run of the erase node (with grid masks) under inference_mode, shared by the tests below."""
    model, clip = cenv["model"], cenv["clip"]
    before_patches = dict(model.patches)
    masks, _, weights = esd_nodes.ConceptLabGridMasks().build(64, 64, 3, 0.5, "")
    with torch.inference_mode():
        out = esd_nodes.ConceptLabESDErase().erase(model, clip, **_erase_kwargs(), masks=masks,
                                                   mask_weights=weights)
    assert model.patches == before_patches, "the input MODEL must not be changed"
    return out


@requires_comfyui
def test_erase_node_changes_only_attn2_and_file_loads_with_lora_loader(cenv, erased_run):
    import comfy.sd
    import comfy.utils

    from conceptlab.nodes.comfy_patchers import iter_patched_weights

    model = cenv["model"]
    erased, file_name, plot, stats = erased_run
    assert plot.dim() == 4 and '"iterations_done": 2' in stats
    orig = dict(iter_patched_weights(model))
    new = dict(iter_patched_weights(erased))
    changed = {k for k in orig if not torch.equal(orig[k], new[k])}
    assert changed and all(".attn2." in k for k in changed)
    # the saved file, through the LoraLoaderModelOnly path, at strength 1 reproduces the erased MODEL
    path = cenv["out"] / "loras" / file_name
    assert path.is_file() and file_name.startswith("esd/test_")
    assert (cenv["out"] / "esd" / path.stem / "training_stats.json").is_file()
    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    records = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    logging.getLogger().addHandler(handler)
    try:
        with torch.inference_mode():
            loaded, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0)
    finally:
        logging.getLogger().removeHandler(handler)
    assert not [m for m in records if "lora key not loaded" in m]
    via_file = dict(iter_patched_weights(loaded, list(changed)))
    for k in changed:
        assert torch.allclose(via_file[k], new[k], atol=1e-6)


@requires_comfyui
def test_erase_node_cancel_saves_partial_and_reraises(cenv, monkeypatch):
    from conceptlab.nodes import comfy_io

    state = {"updates": 0}
    orig_update = comfy_io.Progress.update

    class Stop(Exception):
        pass

    def update(self, n=1, preview=None):
        state["updates"] += 1
        orig_update(self, n, preview)

    def interrupt():  # the user presses Cancel during iteration 3
        if state["updates"] >= 2:
            raise Stop()

    monkeypatch.setattr(comfy_io.Progress, "update", update)
    monkeypatch.setattr(comfy_io, "check_interrupt", interrupt)
    with torch.inference_mode(), pytest.raises(Stop):
        esd_nodes.ConceptLabESDErase().erase(cenv["model"], cenv["clip"],
                                             **_erase_kwargs(iterations=50, save_name="esd/cancelled"))
    saved = list((cenv["out"] / "loras" / "esd").glob("cancelled_*.safetensors"))
    assert len(saved) == 1
    import json

    stats = json.loads((cenv["out"] / "esd" / saved[0].stem / "training_stats.json").read_text())
    assert stats["cancelled"] and stats["iterations_done"] == 2


@requires_comfyui
def test_compare_node_grid(cenv, erased_run):
    model, clip, vae = cenv["model"], cenv["clip"], cenv["vae"]
    erased = erased_run[0]
    with torch.inference_mode():
        grid, images = esd_nodes.ConceptLabErasureCompare().compare(
            model, erased, clip, vae, "a painting by Van Gogh", "a cat", "", 0, 2, 5.0, "euler", "normal", 64, 64)
    assert images.shape == (4, 64, 64, 3)
    assert not torch.equal(images[0], images[1]), "same seed, erased model: the concept image changes"
    assert grid.dim() == 4 and grid.shape[1] >= 2 * 64 and grid.shape[2] >= 2 * 64


# -- Flux through ComfyHost (real ComfyUI) ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def flux_run(cenv):
    """One ESD-x run of the erase node on ComfyUI's own tiny Flux.1-dev MODEL + its CLIP (clip_l + t5xxl)."""
    from e2e.comfy_flux import tiny_flux_clip, tiny_flux_patcher

    with torch.inference_mode():
        model, clip = tiny_flux_patcher(), tiny_flux_clip()
        before = dict(model.patches)
        out = esd_nodes.ConceptLabESDErase().erase(
            model, clip, **_erase_kwargs(save_name="esd/flux", xt_source="self_sample", ddim_steps=3, lr=1e-3,
                                         mask_mode="grid-sum"), flux_guidance=3.0)
    assert model.patches == before, "the input MODEL must not be changed"
    return model, out


@requires_comfyui
def test_erase_node_on_flux_changes_text_attention_and_file_resolves_in_comfyui(cenv, flux_run):
    import comfy.lora
    import comfy.sd
    import comfy.utils

    from conceptlab.nodes.comfy_patchers import iter_patched_weights

    model, (erased, file_name, _plot, stats) = flux_run
    assert '"iterations_done": 2' in stats
    orig = dict(iter_patched_weights(model))
    new = dict(iter_patched_weights(erased))
    changed = {k for k in orig if not torch.equal(orig[k], new[k])}
    assert changed == {f"diffusion_model.double_blocks.0.txt_attn.{m}.{a}" for m in ("qkv", "proj")
                       for a in ("weight", "bias")}
    path = cenv["out"] / "loras" / file_name
    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    assert set(lora) == {f"lora_unet_double_blocks_0_txt_attn_{m}.{s}" for m in ("qkv", "proj")
                         for s in ("diff", "diff_b")}
    # every key resolves through ComfyUI's own Flux key map (comfy/lora.py model_lora_keys_unet) ...
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    for m in ("qkv", "proj"):
        assert key_map[f"lora_unet_double_blocks_0_txt_attn_{m}"] == f"diffusion_model.double_blocks.0.txt_attn.{m}.weight"
    # ... and LoraLoaderModelOnly at strength 1 reproduces the erased MODEL with no unloaded key
    records = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    logging.getLogger().addHandler(handler)
    try:
        with torch.inference_mode():
            loaded, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0)
    finally:
        logging.getLogger().removeHandler(handler)
    assert not [m for m in records if "lora key not loaded" in m]
    via_file = dict(iter_patched_weights(loaded, list(changed)))
    for k in changed:
        assert torch.allclose(via_file[k], new[k], atol=1e-6)
    meta = json.loads((cenv["out"] / "esd" / path.stem / "metadata.json").read_text())
    assert meta["arch"] == "flux" and meta["guidance_scale"] == 3.0 and meta["objective"] == "flow"


@requires_comfyui
def test_flux_guidance_refused_on_sd_model(cenv):
    with torch.inference_mode(), pytest.raises(ValueError, match="flux_guidance"):
        esd_nodes.ConceptLabESDErase().erase(cenv["model"], cenv["clip"], **_erase_kwargs(save_name=""),
                                             flux_guidance=2.0)


@requires_comfyui
def test_esd_on_an_fp8_stored_flux_base_through_comfyhost():
    """UNETLoader's fp8 weight option: the base stays fp8 and unchanged, the fp32 deltas train."""
    from e2e.comfy_flux import tiny_flux_clip, tiny_flux_patcher

    from conceptlab.nodes.comfy_host import ComfyHost
    from conceptlab.training.esd.config import ESDConfig
    from conceptlab.training.esd.erase import erase

    with torch.inference_mode():
        model, clip = tiny_flux_patcher(weight_dtype=torch.float8_e4m3fn), tiny_flux_clip()
        host = ComfyHost(model, clip)
    qkv = model.model.diffusion_model.double_blocks[0].txt_attn.qkv.weight
    before = qkv.detach().float().clone()
    try:
        res = erase(host, ESDConfig(concepts="van gogh", width=64, height=64, ddim_steps=3, iterations=3, lr=1e-3))
    finally:
        host.close()
    assert qkv.dtype == torch.float8_e4m3fn and torch.equal(qkv.detach().float(), before)
    assert all(torch.isfinite(d).all() and float(d.abs().max()) > 0 for d in res.deltas.values())
    assert len(res.deltas) == 4 and res.stats["nan_skipped"] == 0
