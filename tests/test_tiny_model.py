"""The tiny DawnLike model shipped in sample_data/tiny_dawnlike: loads with the pack's loaders and the standard
classes offline, stays small, carries its credits, and is the CLI's default model."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from conceptlab.training.lora import quickstart_cli
from conceptlab.training.lora import train_cli

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import train_tiny_model as tiny  # noqa: E402

MODEL = quickstart_cli.TINY_MODEL


def test_tiny_model_is_a_small_diffusers_folder_with_credits():
    assert MODEL.is_dir(), "sample_data/tiny_dawnlike is missing"
    for part in ("unet", "text_encoder", "tokenizer", "vae", "scheduler"):
        assert (MODEL / part).is_dir(), part
    assert not list(MODEL.rglob("*.bin")) and not list(MODEL.rglob("*.pt")), "weights must be safetensors"
    size = sum(p.stat().st_size for p in MODEL.rglob("*") if p.is_file())
    assert size <= 25 * 2 ** 20, f"{size / 2 ** 20:.1f} MB > 25 MB"
    card = (MODEL / "README.md").read_text(encoding="utf-8")
    assert "CC-BY 4.0" in card and "DawnBringer" in card
    sched = json.loads((MODEL / "scheduler" / "scheduler_config.json").read_text())
    assert sched["beta_schedule"] == "scaled_linear" and sched["prediction_type"] == "epsilon"


def test_tiny_model_loads_offline_and_samples():
    from transformers import CLIPTokenizer

    from conceptlab.training.model_loading import load_host

    tok = CLIPTokenizer.from_pretrained(MODEL / "tokenizer", local_files_only=True)
    ids = tok("pixel art, undead, skeleton king").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.unk_token_id not in ids[1:-1], "caption words must be in the vocabulary"
    host = load_host(MODEL)
    assert host.arch == "sd1" and host.vae_scale == 2 and host.latent_channels == 8
    imgs = host.sample(["pixel art, undead, skeleton", "pixel art, plant, oak tree"], width=16, height=16,
                       steps=4, cfg=4.0, seed=0)
    assert imgs.shape == (2, 3, 16, 16) and torch.isfinite(imgs).all()
    assert imgs.std() > 0.05, "samples are flat: the model did not load its weights"


def test_train_cli_defaults_to_the_tiny_model(tmp_path, monkeypatch, capsys):
    seen = {}

    def fake_host(path, *a, **k):
        seen["path"] = path
        raise SystemExit(0)

    cfg = tmp_path / "k.toml"
    data = quickstart_cli.SAMPLE_DATA / "gameboy"
    cfg.write_text(f'train_data_dir = "{data}"\noutput_dir = "{tmp_path / "out"}"\nresolution = 16\n'
                   'enable_bucket = false\n')
    monkeypatch.setattr(train_cli, "_host_for", fake_host)
    from conceptlab import cli

    with pytest.raises(SystemExit):
        cli.main(["train", "--config", str(cfg)])
    assert Path(seen["path"]) == MODEL
    assert "tiny DawnLike model" in capsys.readouterr().err


def test_quickstart_runs_end_to_end_and_reports_its_time(tmp_path, capsys):
    """README's first command, cut to one epoch and 2 sampling steps: audit → training with samples and metrics
    → epoch table and best epoch → best-vs-base samples; ends with the timing line (wall, CPU, load average)."""
    from conceptlab import cli

    out = tmp_path / "qs"
    assert cli.main(["quickstart", "--out", str(out), "--set", "max_train_epochs=1", "--set", "sample_steps=2"]) == 0
    text = capsys.readouterr().out
    assert "[1/4] caption audit" in text and "0 errors" in text
    assert "<- best" in text and "delta_e00_mean" in text
    assert (out / "gbstyle-best.safetensors").is_file() and (out / "best_vs_base.png").is_file()
    last = text.strip().splitlines()[-1]
    assert last.startswith("done in ") and " s CPU (" in last and "load average" in last, last


def test_timing_line_names_phases_cpu_and_load():
    line = quickstart_cli.timing_line(125.4, 98.2, {"audit": 0.4, "training with per-epoch samples": 100.0})
    assert line.startswith("done in 125 s wall-clock, 98 s CPU (audit 0 s, training with per-epoch samples 100 s)")
    assert "load average" in line and "cores" in line


VPRED = MODEL.parent / "tiny_dawnlike_vpred"


def test_both_tiny_models_fit_the_size_budget_and_the_vpred_one_loads_as_v_prediction():
    size = sum(f.stat().st_size for m in (MODEL, VPRED) for f in m.rglob("*") if f.is_file())
    assert size <= 25 * 2 ** 20, f"{size / 2 ** 20:.1f} MB > 25 MB for both tiny models"
    assert "CC-BY 4.0" in (VPRED / "README.md").read_text(encoding="utf-8")
    from conceptlab.training.model_loading import load_host

    host = load_host(VPRED)
    assert host.prediction_type == "v_prediction" and host.latent_channels == 12 and host.vae_scale == 2
    assert next(host.unet.parameters()).dtype == torch.float32  # fp16 files, fp32 compute on CPU
    imgs = host.sample(["pixel art, plant, oak tree"], width=16, height=16, steps=4, cfg=4.0, seed=0)
    assert imgs.shape == (1, 3, 16, 16) and torch.isfinite(imgs).all() and imgs.std() > 0.05


@pytest.mark.skipif(not (tiny.DEFAULT_DATA / "sprites").is_dir(), reason="needs ../shared/data/dawnlike")
def test_training_script_writes_v_prediction_and_forks_a_second_base(tmp_path, monkeypatch):
    """tools/train_tiny_model.py on 48 sprites for a few steps: the model folder says v_prediction (the default) and
    a copy of the run's state resumed with --fork-seed continues from the same weights on other batches."""
    monkeypatch.setattr(tiny.signal, "signal", lambda *a: None)  # keep the test worker's SIGTERM handler
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # and its thread count
    common = ["--limit", "48", "--vae-steps", "2", "--batch", "4", "--decoder-steps", "0", "--save-every", "2"]
    assert tiny.main(["--out", str(tmp_path / "a"), "--steps", "2", *common]) == 0
    sched = json.loads((tmp_path / "a" / "model" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction"
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "train_state.pt", tmp_path / "b" / "train_state.pt")
    for out, seed in (("a", []), ("b", ["--fork-seed", "1"])):
        assert tiny.main(["--out", str(tmp_path / out), "--resume", "--steps", "4", *seed, *common]) == 0
    info = json.loads((tmp_path / "b" / "model" / "training.json").read_text())
    assert info["fork_seed"] == 1 and info["steps"] == 4
    from safetensors.torch import load_file

    wa, wb = (load_file(str(tmp_path / o / "model" / "unet" / "diffusion_pytorch_model.safetensors")) for o in "ab")
    assert any(not torch.equal(wa[k], wb[k]) for k in wa), "the fork drew the same batches"
    with pytest.raises(SystemExit):
        tiny.main(["--out", str(tmp_path / "c"), "--fork-seed", "1", *common])  # --fork-seed needs --resume
