"""UCE node and the ESD node's new options (concept_kind, erase_from, grid presets, esd-all): V1 contracts
without ComfyUI, and the real-ComfyUI tier."""

import json

import pytest
import torch

from conftest import requires_comfyui
from conceptlab.nodes import esd as esd_nodes
from conceptlab.nodes import uce as uce_nodes


@pytest.mark.parametrize("node_id", sorted(uce_nodes.NODE_CLASS_MAPPINGS))
def test_uce_node_contracts(node_id):
    cls = uce_nodes.NODE_CLASS_MAPPINGS[node_id]
    assert node_id.startswith("ConceptLab") and node_id in uce_nodes.NODE_DISPLAY_NAME_MAPPINGS
    assert cls.CATEGORY == "Concept Lab/ESD" and cls.DESCRIPTION
    assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS)
    for name, (typ, *opts) in cls.INPUT_TYPES()["required"].items():
        assert opts and opts[0].get("tooltip"), name
    assert callable(getattr(cls(), cls.FUNCTION))


def test_esd_node_new_options():
    req = esd_nodes.ConceptLabESDErase.INPUT_TYPES()["required"]
    assert "esd-all" in req["method"][0]
    assert req["mask_mode"][0] == ["sum", "sample", "grid-sum", "grid-sample"]
    assert req["mask_mode"][1]["default"] == "sum"
    assert req["concept_kind"][1]["default"] == "auto" and req["erase_from"][1]["default"] == ""
    # new widgets come last, so workflows saved before them keep their widget order
    names = list(req)
    assert names[-2:] == ["concept_kind", "erase_from"]


@pytest.fixture(scope="module")
def cenv(tmp_path_factory):
    from e2e.comfy_env import comfy_inprocess, tiny_sd1_clip, tiny_sd15_patcher

    comfy_inprocess()
    import folder_paths

    out = tmp_path_factory.mktemp("comfy_out")
    prev = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(out))
    yield {"model": tiny_sd15_patcher(), "clip": tiny_sd1_clip(), "out": out}
    folder_paths.set_output_directory(prev)


def _erase_kwargs(**kw):
    base = dict(concepts="Van Gogh", prompt_variations="", variations=3, method="esd-x", xt_source="noised",
                negative_guidance=1.0, iterations=2, lr=1e-2, seed=0, resolution=64, start_guidance=3.0,
                ddim_steps=2, prompt_order="cycle", mask_mode="sum", save_name="", lora_rank=0,
                save_dtype="float32", save_on_cancel=True, concept_kind="auto", erase_from="")
    base.update(kw)
    return base


@requires_comfyui
def test_comfy_token_encoder_finds_the_last_word_with_the_real_tokenizer(cenv):
    enc = uce_nodes.comfy_token_encoder(cenv["clip"])
    with torch.inference_mode():
        hidden, idx = enc(["Van Gogh", "", "a photo of a cat"])
    # CLIP BPE: <start> van gogh <end> ... ; <start> <end>; <start> a photo of a cat <end>
    assert idx.tolist() == [2, 0, 5] and hidden.shape[:2] == (3, 77)


@requires_comfyui
def test_uce_node_edits_only_kv_and_the_file_reproduces_the_model(cenv):
    import comfy.sd
    import comfy.utils

    from conceptlab.nodes.comfy_patchers import iter_patched_weights
    from conceptlab.training.esd.uce import last_token_embeddings

    model, clip = cenv["model"], cenv["clip"]
    before = dict(model.patches)
    with torch.inference_mode():
        erased, file_name, stats = uce_nodes.ConceptLabUCEErase().erase(
            model, clip, "Van Gogh", "", "Rembrandt; a photo of a cat", "auto", 0, 1.0, 1.0, 0.5, 0,
            "esd/uce_test", 0, "float32")
    assert model.patches == before
    s = json.loads(stats)
    assert s["concept_kinds"] == {"Van Gogh": "style"} and s["guide_prompts"] == ["art"]
    orig, new = dict(iter_patched_weights(model)), dict(iter_patched_weights(erased))
    changed = {k for k in orig if not torch.equal(orig[k], new[k])}
    assert changed and all(k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for k in changed)
    with torch.inference_mode():
        emb = last_token_embeddings(uce_nodes.comfy_token_encoder(clip), ["Van Gogh", "art", "Rembrandt"])
    for k in changed:
        W, Wn = orig[k], new[k]
        assert (Wn @ emb[0] - W @ emb[1]).norm() < 0.1 * (W @ emb[1]).norm()       # concept -> guide
        assert (Wn @ emb[2] - W @ emb[2]).norm() < 0.1 * (W @ emb[2]).norm()       # preserved
    lora = comfy.utils.load_torch_file(str(cenv["out"] / "loras" / file_name), safe_load=True)
    with torch.inference_mode():
        loaded, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0)
    via_file = dict(iter_patched_weights(loaded, list(changed)))
    assert all(torch.allclose(via_file[k], new[k], atol=1e-5) for k in changed)
    assert (cenv["out"] / "esd" / file_name.split("/")[-1].replace(".safetensors", "") / "metadata.json").is_file()


@requires_comfyui
def test_esd_node_attribute_erasure_with_grid_preset(cenv):
    model, clip = cenv["model"], cenv["clip"]
    with torch.inference_mode():
        erased, _, _, stats = esd_nodes.ConceptLabESDErase().erase(
            model, clip, **_erase_kwargs(concepts="cowboy hat", erase_from="a cowboy", mask_mode="grid-sum"))
    s = json.loads(stats)
    assert s["concept_kinds"] == {"cowboy hat": "attribute"} and s["erase_from"] == ["a cowboy"]
    assert s["mask_preset"] == "grid-sum" and len(s["mask_usage"]) == 10
    assert all(n == 2 for n in s["mask_usage"].values())
    with torch.inference_mode(), pytest.raises(ValueError, match="builds its own grid"):
        esd_nodes.ConceptLabESDErase().erase(model, clip, **_erase_kwargs(mask_mode="grid-sum"),
                                             masks=torch.ones(2, 64, 64))


@requires_comfyui
def test_esd_node_esd_all_trains_outside_cross_attention(cenv):
    from conceptlab.nodes.comfy_patchers import iter_patched_weights

    model, clip = cenv["model"], cenv["clip"]
    with torch.inference_mode():
        erased, _, _, stats = esd_nodes.ConceptLabESDErase().erase(
            model, clip, **_erase_kwargs(method="esd-all", iterations=1, concept_kind="object"))
    assert json.loads(stats)["concept_kinds"] == {"Van Gogh": "object"}
    orig, new = dict(iter_patched_weights(model)), dict(iter_patched_weights(erased))
    changed = {k for k in orig if not torch.equal(orig[k], new[k])}
    assert any(".attn2." in k for k in changed) and any(".attn2." not in k for k in changed)


@requires_comfyui
def test_apply_reference_erasure_file_node(cenv):
    """A file saved as esd_sd.py saves (absolute attn2 weights, diffusers names) applies as its weights."""
    from safetensors.torch import save_file

    from conceptlab.nodes.comfy_host import ComfyHost
    from conceptlab.nodes.comfy_patchers import iter_patched_weights

    model = cenv["model"]
    host = ComfyHost(model)
    try:
        mods = {p: m for p, m in host.modules("unet").items() if p.endswith("attn2.to_k")}
        keys = {p: host.model_key("unet", p, "weight") for p in mods}
    finally:
        host.close()
    orig = dict(iter_patched_weights(model, list(keys.values())))
    g = torch.Generator().manual_seed(0)
    ref = {f"{p}.weight": orig[keys[p]] + 0.01 * torch.randn(orig[keys[p]].shape, generator=g) for p in mods}
    (cenv["out"] / "refs").mkdir(exist_ok=True)
    import folder_paths

    folder_paths.add_model_folder_path("loras", str(cenv["out"] / "refs"))
    save_file(ref, str(cenv["out"] / "refs" / "esd-Van_Gogh-from-Van_Gogh-esdx.safetensors"))
    node = uce_nodes.ConceptLabApplyReferenceErasure()
    with torch.inference_mode():
        erased, name = node.apply(model, "esd-Van_Gogh-from-Van_Gogh-esdx.safetensors", "esd/converted", "float32")
    new = dict(iter_patched_weights(erased, list(keys.values())))
    for p in mods:
        assert torch.allclose(new[keys[p]], ref[f"{p}.weight"], atol=1e-6)
    assert name.startswith("esd/converted_") and (cenv["out"] / "loras" / name).is_file()
    save_file({"lora_unet_x.lora_up.weight": torch.zeros(1)}, str(cenv["out"] / "refs" / "bad.safetensors"))
    with torch.inference_mode(), pytest.raises(ValueError, match="not diffusers UNet names"):
        node.apply(model, "bad.safetensors", "", "float32")


@requires_comfyui
def test_uce_node_on_comfyui_sdxl():
    from e2e.comfy_env import tiny_sdxl_clip, tiny_sdxl_patcher

    from conceptlab.nodes.comfy_patchers import iter_patched_weights
    from conceptlab.training.esd.uce import last_token_embeddings

    model, clip = tiny_sdxl_patcher(), tiny_sdxl_clip()
    with torch.inference_mode():
        erased, _, stats = uce_nodes.ConceptLabUCEErase().erase(
            model, clip, "Van Gogh", "", "a photo of a cat", "auto", 0, 1.0, 1.0, 0.5, 0, "", 0, "float32")
        emb = last_token_embeddings(uce_nodes.comfy_token_encoder(clip), ["Van Gogh", "art"])
    orig, new = dict(iter_patched_weights(model)), dict(iter_patched_weights(erased))
    changed = {k for k in orig if not torch.equal(orig[k], new[k])}
    assert changed and all(k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for k in changed)
    assert len(changed) == json.loads(stats)["trained_tensors"]
    for k in changed:
        assert (new[k] @ emb[0] - orig[k] @ emb[1]).norm() < 0.1 * (orig[k] @ emb[1]).norm()
