"""Reference interop (training/esd/reference.py): esd_sd.py / uce_sd_erase.py files (diffusers names, absolute
weights) <-> this project's .diff files, on a tiny model."""

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from conceptlab.training.esd.config import ESDConfig
from conceptlab.training.esd.erase import erase, erased_weights
from conceptlab.training.esd.outputs import save_outputs
from conceptlab.training.esd.reference import (base_tensors, convert_file, from_reference, reference_file_name,
                                               to_reference)
from tiny_models import tiny_host


@pytest.fixture(scope="module")
def trained():
    host = tiny_host()
    res = erase(host, ESDConfig(concepts="Van Gogh", width=32, height=32, ddim_steps=2, lr=1e-3, iterations=2,
                                xt_source="noised", noised_cache=1))
    return host, res


def _reference_style_save(unet, deltas, path):
    """What esd_sd.py does (lines 24-49, 198-204): train a copy in place, save {module.param: tensor} of the
    trained attn2 Linear parameters."""
    esd_unet = copy.deepcopy(unet)
    sd = esd_unet.state_dict()
    with torch.no_grad():
        for (_, p, a), d in deltas.items():
            sd[f"{p}.{a}"] += d
    esd_unet.load_state_dict(sd)
    out = {}
    for name, module in esd_unet.named_modules():
        if module.__class__.__name__ in ("Linear", "Conv2d") and "attn2" in name:
            for n, prm in module.named_parameters():
                out[name + "." + n] = prm.detach().contiguous()
    save_file(out, str(path))


def test_round_trip_diff_reference_diff(trained, tmp_path):
    host, res = trained
    base = base_tensors(host.modules("unet"))
    paths = save_outputs(res, tmp_path / "ours.safetensors", dtype=torch.float32)
    assert convert_file(paths["diff"], tmp_path / "esd-ref.safetensors", base) == "to_reference"
    ref = load_file(str(tmp_path / "esd-ref.safetensors"))
    expected = erased_weights(host, res)
    assert set(ref) == {k[len("unet."):] for k in expected}
    for k, v in ref.items():
        assert torch.equal(v, expected["unet." + k])
    assert convert_file(tmp_path / "esd-ref.safetensors", tmp_path / "back.safetensors", base) == "to_diff"
    back, orig = load_file(str(tmp_path / "back.safetensors")), load_file(str(paths["diff"]))
    assert set(back) == set(orig)
    for k in orig:
        assert torch.allclose(back[k], orig[k], atol=1e-7)


def test_reads_a_file_saved_the_way_esd_sd_py_saves(trained, tmp_path):
    host, res = trained
    f = tmp_path / reference_file_name("Van Gogh", None, "esd-x")
    assert f.name == "esd-Van_Gogh-from-Van_Gogh-esdx.safetensors"
    _reference_style_save(host.unet, res.deltas, f)
    got = from_reference(load_file(str(f)), base_tensors(host.modules("unet")))
    assert set(got) == set(res.deltas)
    for k, d in res.deltas.items():
        assert torch.allclose(got[k], d, atol=1e-7)
    # the file applies with ComfyUI-style strength as a .diff: base + delta == the reference's weights
    out = tmp_path / "as_diff.safetensors"
    convert_file(f, out, base_tensors(host.modules("unet")))
    assert all(k.startswith("lora_unet_") and k.endswith((".diff", ".diff_b")) for k in load_file(str(out)))


def test_bad_files_are_refused(trained, tmp_path):
    host, res = trained
    base = base_tensors(host.modules("unet"))
    with pytest.raises(ValueError, match="not in the base UNet"):
        from_reference({"model.diffusion_model.input_blocks.1.1.weight": torch.zeros(1)}, base)
    with pytest.raises(ValueError, match="looks like a .diff file"):
        from_reference({"lora_unet_x.diff": torch.zeros(1)}, base)
    k = next(iter(base))
    with pytest.raises(ValueError, match="vs base"):
        from_reference({k: torch.zeros(3, 3, 3)}, base)
    with pytest.raises(ValueError, match="UNet tensors only"):
        to_reference({("te", "text_model.x", "weight"): torch.zeros(1)}, base)
    save_file({"a": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(FileExistsError):
        convert_file(tmp_path / "x.safetensors", tmp_path / "x.safetensors", base)
    assert reference_file_name("cowboy hat", "cowboy", "esd-x-strict") == \
        "esd-cowboy_hat-from-cowboy-esdxstrict.safetensors"
