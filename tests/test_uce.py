"""UCE closed-form erasure (training/esd/uce.py) on a tiny diffusers UNet + text encoder built in the test."""

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from conceptlab.training.esd.uce import (UCEConfig, diffusers_token_encoder, erase_uce_host, last_token_embeddings,
                                     last_token_index, uce_closed_form, uce_prompts, uce_targets)
from tiny_models import EOS, tiny_host

# the reference script (rohitgandikota/unified-concept-editing trainscripts/uce_sd_erase.py), read beside the
# project, never copied into it: point UCE_REFERENCE_SCRIPT at a checkout's file to run the comparison
REFERENCE_SCRIPT = Path(os.environ.get("UCE_REFERENCE_SCRIPT", "/nonexistent/uce_sd_erase.py"))


@pytest.fixture(scope="module")
def host():
    return tiny_host()


def _eq7_by_sums(W, erase, guide, preserve, s_e, s_p, lamb):
    """Eq. 7 written term by term, as uce_sd_erase.py lines 56-82 accumulate it (float64, explicit inverse)."""
    W = W.double()
    mat1 = lamb * W.clone()
    mat2 = lamb * torch.eye(W.shape[1], dtype=torch.float64)
    for c, g in zip(erase.double(), guide.double()):
        v = (W @ g)[:, None]
        mat1 += s_e * v @ c[None, :]
        mat2 += s_e * c[:, None] @ c[None, :]
    for c in preserve.double():
        v = (W @ c)[:, None]
        mat1 += s_p * v @ c[None, :]
        mat2 += s_p * c[:, None] @ c[None, :]
    return (mat1 @ torch.inverse(mat2)).float()


def test_closed_form_equals_eq7_and_is_the_least_squares_optimum():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(24, 16, generator=g)
    E, G, P = (torch.randn(n, 16, generator=g) * 3 for n in (3, 3, 5))
    new = uce_closed_form(W, E, G, P, 1.5, 0.7, 0.5)
    assert torch.allclose(new, _eq7_by_sums(W, E, G, P, 1.5, 0.7, 0.5), atol=1e-5, rtol=1e-5)
    # the gradient of the objective (paper Eq. 5-6) vanishes at the solution (up to its float32 rounding)
    Wd, Ed, Gd, Pd = W.double(), E.double(), G.double(), P.double()

    def grad_at(w):
        w = w.double().clone().requires_grad_(True)
        obj = (1.5 * ((Ed @ w.T - Gd @ Wd.T) ** 2).sum() + 0.7 * ((Pd @ w.T - Pd @ Wd.T) ** 2).sum()
               + 0.5 * ((w - Wd) ** 2).sum())
        obj.backward()
        return w.grad.norm()

    assert float(grad_at(new)) < 1e-5 * float(grad_at(W))
    # nothing to erase or preserve: the weight is unchanged
    assert torch.allclose(uce_closed_form(W, E[:0], G[:0], None), W, atol=1e-6)
    with pytest.raises(ValueError, match="embeddings"):
        uce_closed_form(W, E, G[:2], P)


def test_last_token_index_matches_attention_mask_rule():
    ids = torch.tensor([[1, 5, 6, 7, 2, 2, 2], [1, 2, 2, 2, 2, 2, 2], [1, 5, 6, 7, 8, 9, 2]])
    # the reference's attention_mask.sum() - 2 (mask = start + content + end)
    mask_rule = [(torch.arange(7) <= (r == 2).nonzero()[0]).sum() - 2 for r in ids]
    assert last_token_index(ids, 2).tolist() == [int(x) for x in mask_rule] == [3, 0, 5]
    with pytest.raises(ValueError, match="no end token"):
        last_token_index(torch.tensor([[1, 5, 6]]), 2)


def test_prompts_guides_and_expansion():
    e, g, p, kinds = uce_prompts(UCEConfig(concepts="Claude Monet; cowboy hat", preserve_concepts="Rembrandt"))
    assert e == ["Claude Monet", "cowboy hat"] and g == ["art", ""] and p == ["Rembrandt"]
    assert kinds == {"Claude Monet": "style", "cowboy hat": "object"}
    e, g, _, _ = uce_prompts(UCEConfig(concepts="Claude Monet", guide_concepts="Edgar Degas", variations=5))
    assert len(e) == len(g) == 5 and e[0] == "Claude Monet" and g[0] == "Edgar Degas"
    for a, b in zip(e, g):
        assert a.replace("Claude Monet", "Edgar Degas") == b
    with pytest.raises(ValueError, match="guide concepts"):
        uce_prompts(UCEConfig(concepts="a; b; c", guide_concepts="x; y"))
    with pytest.raises(ValueError, match="lamb"):
        uce_prompts(UCEConfig(concepts="a", lamb=0))


def test_uce_on_a_tiny_model_erases_and_preserves(host, tmp_path):
    before = {k: v.clone() for k, v in host.unet.state_dict().items()}
    cfg = UCEConfig(concepts="Van Gogh", guide_concepts="art", preserve_concepts="Rembrandt; a photo of a cat; Monet")
    res = erase_uce_host(host, cfg)
    assert all(torch.equal(before[k], v) for k, v in host.unet.state_dict().items())  # base untouched
    mods = host.modules("unet")
    paths = {p for (_, p, _) in res.deltas}
    assert paths == {t.path for t in uce_targets(mods)} and all(p.endswith(("attn2.to_k", "attn2.to_v"))
                                                                 for p in paths)
    enc = diffusers_token_encoder(host)
    emb = dict(zip(["Van Gogh", "art", "Rembrandt", "a photo of a cat", "Monet"],
                   last_token_embeddings(enc, ["Van Gogh", "art", "Rembrandt", "a photo of a cat", "Monet"])))
    for (_, p, _), d in res.deltas.items():
        W = mods[p].weight.detach().float()
        new = W + d
        # the erased concept's key/value now equals the guide's (up to the λ regulariser), and moved a lot
        to_guide = (new @ emb["Van Gogh"] - W @ emb["art"]).norm() / (W @ emb["art"]).norm()
        moved = (new @ emb["Van Gogh"] - W @ emb["Van Gogh"]).norm() / (W @ emb["Van Gogh"]).norm()
        assert to_guide < 0.05 and moved > 0.3, (p, float(to_guide), float(moved))
        for k in ("Rembrandt", "a photo of a cat", "Monet"):
            drift = (new @ emb[k] - W @ emb[k]).norm() / (W @ emb[k]).norm()
            assert drift < 0.05, (p, k, float(drift))
    s, m = res.stats, res.metadata
    assert s["trained_tensors"] == len(paths) and s["preserve_relative_drift_max"] < 0.05
    assert m["method"] == "uce" and m["guide_prompts"] == ["art"] and m["lamb"] == 0.5
    # same outputs as ESD: the .diff file and JSON reports
    from conceptlab.training.esd.outputs import save_outputs
    from safetensors import safe_open

    out = save_outputs(res, tmp_path / "uce.safetensors", dtype=torch.float32)
    with safe_open(str(out["diff"]), "pt") as f:
        keys = set(f.keys())
        md = f.metadata()
    assert len(keys) == len(paths) and all(k.endswith(".diff") and "attn2_to_" in k for k in keys)
    assert json.loads(md["conceptlab_esd_metadata"])["method"] == "uce" and md["ss_network_module"] == "conceptlab.uce"
    assert json.loads(out["metadata"].read_text())["concepts"] == ["Van Gogh"]


@pytest.mark.skipif(not REFERENCE_SCRIPT.is_file(),
                    reason=f"reference uce_sd_erase.py not found at {REFERENCE_SCRIPT} (set UCE_REFERENCE_SCRIPT)")
def test_edited_weights_equal_the_reference_script(host, tmp_path):
    """Runs the reference's own ``UCE()`` function (uce_sd_erase.py) on the same tiny UNet and text encoder."""
    from safetensors.torch import load_file

    ns = {"__name__": "uce_reference"}
    grad = torch.is_grad_enabled()
    try:
        exec(compile(REFERENCE_SCRIPT.read_text(), str(REFERENCE_SCRIPT), "exec"), ns)  # noqa: S102
    finally:
        torch.set_grad_enabled(grad)  # the script disables autograd globally at import
    ns.update(device="cpu", torch_dtype=torch.float32)

    class Tok:
        model_max_length = 77

        def __call__(self, text, **kw):
            ids = host._tokenize([text]).reshape(-1, 77)[0]  # first 77-token chunk
            end = int((ids[1:] == EOS).nonzero()[0]) + 1
            return {"attention_mask": (torch.arange(ids.numel()) <= end).long()[None]}

    class Pipe:
        unet = host.unet
        tokenizer = Tok()

        @staticmethod
        def encode_prompt(prompt, device, num_images_per_prompt, do_classifier_free_guidance):
            from conceptlab.training.conditioning import Conditioning

            with torch.no_grad():  # diffusers' encode_prompt returns (prompt_embeds [1, 77, D], negative)
                return Conditioning.wrap(host.encode_prompts([prompt])).context, None

    edit, guide, preserve = ["Van Gogh", "Claude Monet"], ["art", ""], ["Rembrandt", "a photo of a cat"]
    with torch.no_grad():
        ns["UCE"](Pipe(), list(edit), list(guide), list(preserve), 1.3, 0.8, 0.5, str(tmp_path), "ref")
    ref = load_file(str(tmp_path / "ref.safetensors"))
    res = erase_uce_host(host, UCEConfig(concepts=edit, guide_concepts=guide, preserve_concepts=preserve,
                                         erase_scale=1.3, preserve_scale=0.8, lamb=0.5))
    mods = host.modules("unet")
    assert set(ref) == {f"{p}.weight" for (_, p, _) in res.deltas}
    for (_, p, _), d in res.deltas.items():
        ours = mods[p].weight.detach().float() + d
        assert torch.allclose(ours, ref[f"{p}.weight"], atol=2e-5, rtol=1e-4), p
        assert float(d.abs().max()) > 1e-3  # the edit is not trivially zero


def test_uce_on_a_tiny_sdxl_model():
    """SDXL: the context is CLIP-L ‖ OpenCLIP-G; the same closed form maps the concept onto its guide."""
    from tiny_models import tiny_sdxl_host

    host = tiny_sdxl_host()
    res = erase_uce_host(host, UCEConfig(concepts="Van Gogh", preserve_concepts="a photo of a cat"))
    mods = host.modules("unet")
    emb = last_token_embeddings(diffusers_token_encoder(host), ["Van Gogh", "art", "a photo of a cat"])
    assert emb.shape[1] == host.unet.config.cross_attention_dim and res.metadata["arch"] == "sdxl"
    assert len(res.deltas) == len(uce_targets(mods))
    for (_, p, _), d in res.deltas.items():
        W = mods[p].weight.detach().float()
        assert (W @ emb[1] - (W + d) @ emb[0]).norm() < 0.05 * (W @ emb[1]).norm()
        assert ((W + d) @ emb[2] - W @ emb[2]).norm() < 0.05 * (W @ emb[2]).norm()
