"""CLI: ``erase`` with the grid-sum preset, erase_from and save_reference; ``uce``; ``erase-convert``."""

import json

import torch
from safetensors.torch import load_file

from tiny_models import tiny_host


def _patch_loader(monkeypatch, host):
    from conceptlab.training import diffusers_host

    monkeypatch.setattr(diffusers_host.DiffusersHost, "from_pretrained",
                        classmethod(lambda cls, f, device="cpu", dtype=None: host))


def test_cli_erase_preset_erase_from_and_reference_copy(tmp_path, monkeypatch):
    from conceptlab import cli

    host = tiny_host()
    (tmp_path / "model").mkdir()
    _patch_loader(monkeypatch, host)
    cfg = tmp_path / "erase.toml"
    cfg.write_text('model = "model"\noutput_dir = "out"\nname = "hat"\nsave_dtype = "float32"\n'
                   'save_reference = true\n\n[esd]\nconcepts = "cowboy hat"\nerase_from = "a cowboy"\n'
                   'variations = 2\nwidth = 32\nheight = 32\nddim_steps = 2\niterations = 2\nxt_source = "noised"\n'
                   'noised_cache = 1\n')
    assert cli.main(["erase", "--config", str(cfg), "--quiet", "--mask-mode", "grid-sum"]) == 0
    out = tmp_path / "out"
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["mask_preset"] == "grid-sum" and meta["mask_mode"] == "sum" and len(meta["masks"]) == 10
    assert meta["erase_from"] == ["a cowboy"] and meta["concept_kinds"] == {"cowboy hat": "attribute"}
    ref = load_file(str(out / "esd-cowboy_hat-from-a_cowboy-esdx.safetensors"))
    diff = load_file(str(out / "hat.safetensors"))
    assert len(ref) == len(diff) and all("attn2" in k for k in ref)
    # the reference copy converts back to the same .diff
    assert cli.main(["erase-convert", str(out / "esd-cowboy_hat-from-a_cowboy-esdx.safetensors"),
                     str(tmp_path / "back.safetensors"), "--model", str(tmp_path / "model")]) == 0
    back = load_file(str(tmp_path / "back.safetensors"))
    assert set(back) == set(diff) and all(torch.allclose(back[k], diff[k], atol=1e-6) for k in diff)


def test_cli_uce_writes_diff_and_reports(tmp_path, monkeypatch, capsys):
    from conceptlab import cli

    (tmp_path / "model").mkdir()
    _patch_loader(monkeypatch, tiny_host())
    cfg = tmp_path / "uce.toml"
    cfg.write_text('model = "model"\noutput_dir = "out"\nname = "monet"\n\n[uce]\nconcepts = "Claude Monet"\n'
                   'preserve_concepts = "Rembrandt; a photo of a cat"\n')
    assert cli.main(["uce", "--config", str(cfg)]) == 0
    out = tmp_path / "out"
    diff = load_file(str(out / "monet.safetensors"))
    assert diff and all(k.endswith(".diff") and ("attn2_to_k" in k or "attn2_to_v" in k) for k in diff)
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["method"] == "uce" and meta["guide_prompts"] == ["art"]
    assert "UCE edited" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text('model = "model"\n[uce]\nconcepts = "x"\nlambda = 1\n')
    assert cli.main(["uce", "--config", str(bad)]) == 2
