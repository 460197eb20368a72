"""N-model merge node and the merge-with-trained-steps grid: contracts here, behaviour in the real-ComfyUI tier."""

from __future__ import annotations

import pytest
import torch

from conftest import requires_comfyui

from conceptlab.nodes import merge_n as NN

from test_merge_nodes import comfy, materialise, tiny_model, with_lora_like_patch  # noqa: F401 - fixture


def test_contracts_and_step_labels():
    assert set(NN.NODE_CLASS_MAPPINGS) == {"ConceptLabMergeModelsN", "ConceptLabMergeStepsSweep"}
    spec = NN.MergeModelsN.INPUT_TYPES()
    assert [k for k in spec["optional"] if k.startswith("model_")] == [f"model_{i}" for i in range(3, 7)]
    assert NN.step_label("style-000010.safetensors") == (10, "style-000010")
    assert NN.step_label("sub/run_step2500.safetensors") == (2500, "run_step2500")
    assert NN.step_label("final.safetensors") == (None, "final")
    with pytest.raises(ValueError, match="no checkpoints"):
        NN._parse_names(" \n , ")


@requires_comfyui
def test_n_model_weighted_sum_and_ties_in_graph(comfy):  # noqa: F811
    from conceptlab.training.merge.methods import MethodOptions
    from conceptlab.training.merge.nmodel import merge_tensor_n

    m1, key = with_lora_like_patch(comfy, tiny_model(comfy, 1), 3)
    m2, m3, base = tiny_model(comfy, 2), tiny_model(comfy, 4), tiny_model(comfy, 5)
    w1, w2, w3, wb = materialise(m1), materialise(m2), materialise(m3), materialise(base)
    with torch.inference_mode():
        out, report = NN.MergeModelsN().merge(m1, m2, "weighted_sum", "0.5, 0.3, 0.2", 0.2, 0, model_3=m3)
    got = materialise(out)
    for k in got:
        torch.testing.assert_close(got[k], 0.5 * w1[k] + 0.3 * w2[k] + 0.2 * w3[k], rtol=1e-5, atol=1e-6)
    assert "weighted_sum of 3 models" in report
    with torch.inference_mode():
        tm, _ = NN.MergeModelsN().merge(m1, m2, "ties", "", 0.5, 0, model_3=m3, base_model=base, ties_sign="count")
    got = materialise(tm)
    for k in (key, "diffusion_model.out.2.weight"):
        exp = merge_tensor_n("ties", k, [w1[k], w2[k], w3[k]], [1 / 3] * 3, base=wb[k], density=0.5,
                             options=MethodOptions(ties_sign="count"))
        torch.testing.assert_close(got[k], exp, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs base_model"):
        NN.MergeModelsN().merge(m1, m2, "model_stock", "", 0.2, 0)
    with pytest.raises(ValueError, match="3 models need 3 weights"):
        NN.MergeModelsN().merge(m1, m2, "weighted_sum", "0.5, 0.5", 0.2, 0, model_3=m3)


@requires_comfyui
def test_steps_sweep_columns_are_the_checkpoints(comfy):  # noqa: F811
    a = tiny_model(comfy, 1)
    loads = []

    def loader(seed):
        def load():
            loads.append(seed)
            return tiny_model(comfy, seed)
        return load

    seen = []

    def sample(model, s):  # stands in for the sampler: records the merged weights each cell was drawn from
        w = materialise(model)["diffusion_model.out.2.weight"]
        seen.append((float(w.sum()), s))
        return torch.full((1, 8, 8, 3), float(w.abs().mean().clamp(0, 1)))

    with torch.inference_mode():
        cells, labels = NN.steps_sweep(a, [("e1", loader(2)), ("e2", loader(3))], 0.5, sample, rows=2, seed=7)
    assert labels == ["e1", "e2"] and loads == [2, 3] and len(cells) == 4
    wa = materialise(a)["diffusion_model.out.2.weight"]
    for i, seed in enumerate((2, 3)):
        wb = materialise(tiny_model(comfy, seed))["diffusion_model.out.2.weight"]
        assert seen[2 * i][0] == pytest.approx(float((0.5 * wa + 0.5 * wb).sum()), rel=1e-4, abs=1e-4)
        assert [s for _, s in seen[2 * i:2 * i + 2]] == [7, 8]
