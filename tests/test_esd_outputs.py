"""ESD output files (training/esd/outputs.py): full-rank diff file, SVD LoRA, JSON reports, plots, CLI."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conceptlab.formats.kohya_keys import kohya_lora_name
from conceptlab.formats.safetensors_io import read_metadata
from conceptlab.training.esd.config import ESDConfig
from conceptlab.training.esd.erase import erase, erased_weights, select_targets
from conceptlab.training.esd.outputs import (comparison_grid, diff_state_dict, loss_plot, save_outputs,
                                             svd_lora)
from tiny_models import tiny_host

FAST = dict(concepts="Van Gogh", width=32, height=32, ddim_steps=3, lr=1e-2, noised_cache=1, xt_source="noised")


@pytest.fixture(scope="module")
def erased():
    host = tiny_host()
    res = erase(host, ESDConfig(**FAST, iterations=2, masks="grid"))
    return host, res


def _by_kohya(res):
    return {kohya_lora_name(c, p) + (".diff" if a == "weight" else ".diff_b"): f"{c}.{p}.{a}"
            for (c, p, a) in res.deltas}


def test_saved_file_reproduces_the_erased_weights(erased, tmp_path):
    host, res = erased
    paths = save_outputs(res, tmp_path / "esd.safetensors", dtype=torch.float32)
    sd = load_file(str(paths["diff"]))
    names = _by_kohya(res)
    assert set(sd) == set(names), "one .diff / .diff_b per trained tensor, kohya names"
    assert all(k.startswith("lora_unet_") for k in sd)
    target = erased_weights(host, res)
    mods = host.modules("unet")
    for key, full in names.items():
        _, path, attr = full.split(".", 1)[0], full.split(".", 1)[1].rsplit(".", 1)[0], full.rsplit(".", 1)[1]
        base = getattr(mods[path], attr).detach()
        # strength 1: W + 1·ΔW == the erased weight
        assert torch.equal(base + 1.0 * sd[key], target[full])
    # fp16 (the default) reproduces within fp16 resolution
    p16 = save_outputs(res, tmp_path / "esd16.safetensors")["diff"]
    sd16 = load_file(str(p16))
    for key in sd16:
        assert sd16[key].dtype == torch.float16
        assert torch.allclose(sd16[key].float(), sd[key], atol=1e-3, rtol=1e-3)


def test_reports_are_written_and_embedded(erased, tmp_path):
    _, res = erased
    paths = save_outputs(res, tmp_path / "out" / "esd.safetensors", stats_dir=tmp_path / "stats")
    stats = json.loads(paths["training_stats"].read_text())
    meta = json.loads(paths["metadata"].read_text())
    assert paths["training_stats"].parent == tmp_path / "stats"
    assert len(stats["losses"]) == 2 and "loss_avg_last_20" in stats and "prompt_usage" in stats
    assert meta["concepts"] == ["Van Gogh"] and meta["method"] == "esd-x" and meta["lr"] == 1e-2
    fm = read_metadata(paths["diff"])
    assert json.loads(fm["conceptlab_esd_metadata"]) == meta
    assert json.loads(fm["conceptlab_esd_stats"])["iterations_done"] == 2
    assert fm["ss_network_module"] == "conceptlab.esd" and "sshs_model_hash" in fm
    with pytest.raises(FileExistsError):
        save_outputs(res, paths["diff"], stats_dir=tmp_path / "stats", overwrite=False)
    with pytest.raises(ValueError, match=".safetensors"):
        save_outputs(res, tmp_path / "x.ckpt")


def test_svd_lora_energy_and_full_rank_reconstruction(erased, tmp_path):
    _, res = erased
    weights = {kohya_lora_name(c, p): d for (c, p, a), d in res.deltas.items() if a == "weight"}
    full, rep_full = svd_lora(res, 4096)
    assert rep_full["energy_kept"] == pytest.approx(1.0, abs=1e-5)
    for name, (down, up, alpha) in full.items():
        r = down.shape[0]
        assert torch.allclose(up.reshape(up.shape[0], r) @ down.reshape(r, -1) * (alpha / r),
                              weights[name].reshape(weights[name].shape[0], -1), atol=1e-5)
    low, rep = svd_lora(res, 1)
    assert 0 < rep["energy_kept"] < 1
    assert all(0 <= e <= 1 for e in rep["energy_kept_per_module"].values())
    assert rep["dropped_bias_tensors"] == sum(1 for k in res.deltas if k[2] == "bias")
    assert all(d.shape[0] == 1 for d, _, _ in low.values())
    paths = save_outputs(res, tmp_path / "e.safetensors", lora_rank=2)
    lsd = load_file(str(paths["lora"]))
    assert paths["lora"].name == "e_lora_r2.safetensors"
    assert {k.rsplit(".", 2)[-2] if k.endswith(".weight") else k.rsplit(".", 1)[-1] for k in lsd} == \
        {"lora_down", "lora_up", "alpha"}
    assert json.loads(paths["training_stats"].read_text())["svd_lora"]["rank"] == 2
    with pytest.raises(ValueError):
        svd_lora(res, 0)


def test_sd15_esd_x_names_resolve_to_checkpoint_keys():
    """Every ESD-x kohya name of a real SD1.5 UNet resolves to an LDM attn2 checkpoint key."""
    from torch import nn

    from conceptlab.formats.kohya_keys import kohya_name_to_checkpoint_key
    from tiny_models import sd15_unet_meta

    mods = {n: m for n, m in sd15_unet_meta().named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    targets = select_targets(mods, "esd-x")
    keys = {kohya_name_to_checkpoint_key(kohya_lora_name("unet", t.path), "sd1") for t in targets}
    assert len(keys) == 64  # 80 tensors = 64 modules (to_out.0 carries weight + bias)
    assert all(k.startswith("model.diffusion_model.") and ".attn2." in k for k in keys)


def test_empty_result_and_plots():
    from conceptlab.training.esd.config import ESDResult

    with pytest.raises(ValueError):
        diff_state_dict(ESDResult({}, [], [], {}, {}))
    img = loss_plot([1.0, 0.5, float("nan"), 0.25] * 10)
    assert img.ndim == 3 and img.shape[2] == 3 and img.dtype.name == "uint8"
    a = (torch.rand(16, 24, 3) * 255).byte().numpy()
    grid = comparison_grid([("concept prompt", [a, a]), ("unrelated", [a, a])], ["original", "erased"])
    assert grid.shape[0] >= 2 * 16 and grid.shape[1] >= 2 * 24 and grid.shape[2] == 3


def test_cli_erase_writes_the_same_files(tmp_path, monkeypatch):
    from conceptlab import cli
    from conceptlab.training import diffusers_host

    folder = tmp_path / "model"
    folder.mkdir()
    monkeypatch.setattr(diffusers_host.DiffusersHost, "from_pretrained",
                        classmethod(lambda cls, f, device="cpu", dtype=None: tiny_host()))
    cfg = tmp_path / "erase.toml"
    cfg.write_text('model = "model"\noutput_dir = "out"\nname = "vg"\nlora_rank = 2\n\n[esd]\n'
                   'concepts = "Van Gogh"\nvariations = 3\nwidth = 32\nheight = 32\nddim_steps = 2\n'
                   'iterations = 2\nxt_source = "self_sample"\nmasks = "grid"\n')
    assert cli.main(["erase", "--config", str(cfg), "--quiet"]) == 0
    out = tmp_path / "out"
    for name in ("vg.safetensors", "vg_lora_r2.safetensors", "training_stats.json", "metadata.json", "loss.png"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "metadata.json").read_text())
    assert len(meta["prompts"]) == 3 and meta["xt_source"] == "self_sample"
    bad = tmp_path / "bad.toml"
    bad.write_text('model = "model"\n[esd]\nconcepts = "x"\nlearning_rate = 1\n')
    assert cli.main(["erase", "--config", str(bad)]) == 2
