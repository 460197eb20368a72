"""``conceptlab train --config kohya.toml --set ...`` wiring (the diffusers host is injected: no model folder
can be made without tokenizer files, and nothing may be downloaded)."""

from __future__ import annotations

import json
import shutil

import pytest
from tiny_models import tiny_host

from conceptlab import cli
from conceptlab.formats.safetensors_io import read_metadata
from conceptlab.training.lora import train_cli



def test_cli_trains_from_kohya_toml(tmp_path, dawnlike_dir, monkeypatch, capsys):
    sub = tmp_path / "data" / "2_dawnlike"
    sub.mkdir(parents=True)
    for p in sorted(dawnlike_dir.glob("*.png"))[:3]:
        shutil.copy(p, sub / p.name)
    cfg = tmp_path / "kohya.toml"
    cfg.write_text(f"""
[model_arguments]
pretrained_model_name_or_path = "{tmp_path / 'model'}"
[dataset_arguments]
train_data_dir = "{tmp_path / 'data'}"
resolution = "64,64"
min_bucket_reso = 64
max_bucket_reso = 128
resize_interpolation = "nearest"
caption_extension = ".txt"
[training_arguments]
output_dir = "{tmp_path / 'out'}"
output_name = "cli"
max_train_epochs = 3
train_batch_size = 2
learning_rate = 1e-3
network_train_unet_only = true
xformers = true
[network_arguments]
network_dim = 4
network_alpha = 1
""")
    monkeypatch.setattr(train_cli, "_host_for", lambda *a, **k: tiny_host())
    rc = cli.main(["train", "--config", str(cfg), "--set", "max_train_epochs=2", "--set", "save_every_n_epochs=1",
                   "--set", "mystery_key=1", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["epochs"] == 2 and summary["final"].endswith("cli.safetensors")
    assert (tmp_path / "out" / "cli-000001.safetensors").is_file()
    assert "unknown key 'mystery_key'" in captured.err          # nothing is dropped without a word
    assert "xformers has no effect here" in captured.err           # kohya switch without effect: named
    md = read_metadata(tmp_path / "out" / "cli.safetensors")
    # class token captions; values formatted as kohya writes them (TOML int 1 -> "1")
    assert md["ss_num_train_images"] == "6" and md["ss_network_alpha"] == "1"


def test_cli_errors_are_clear(tmp_path, capsys):
    assert cli.main(["train", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "config not found" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("train_data_dir = 3\noutput_dir = 'x'\noptimizer_type = 'Lion'\n")
    assert cli.main(["train", "--config", str(bad)]) == 2
    assert "Lion" in capsys.readouterr().err
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"x")
    with pytest.raises(ValueError, match="diffusers folder"):
        train_cli._host_for(str(ckpt), "cpu", "no")
