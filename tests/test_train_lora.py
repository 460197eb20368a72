"""The kohya LoRA trainer on a tiny diffusers model and real DawnLike sprites at 64 px: loss falls, files and
metadata, exact resume, scripted early stopping / best epoch, NaN guard, optimizer errors, kohya TOML."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_host

from conceptlab.formats.safetensors_io import load_state_dict, read_metadata
from conceptlab.training.lora.captions import CaptionConfig
from conceptlab.training.lora.dataset import KohyaDataset
from conceptlab.training.lora.dataset_options import DatasetOptions
from conceptlab.training.lora.config import (OptimizerUnavailableError, TrainConfig, TrainingDivergedError,
                                             configs_from_mapping, parse_kohya_toml, parse_set_values)
from conceptlab.training.lora.loss import diffusion_loss, min_snr_weight
from conceptlab.training.lora.optim import build_optimizer
from conceptlab.training.lora.report import EarlyStopping, select_best
from conceptlab.training.lora.trainer import LoraTrainer

OPTS = dict(resolution=64, min_bucket_reso=64, max_bucket_reso=128, resize_interpolation="nearest")



def make_dataset(dawnlike_dir: Path, root: Path, n: int = 6, repeats: int = 2, **opts) -> KohyaDataset:
    sub = root / f"{repeats}_dawnlike"
    sub.mkdir(parents=True)
    for p in sorted(dawnlike_dir.glob("*.png"))[:n]:
        shutil.copy(p, sub / p.name)
        (sub / p.name).with_suffix(".txt").write_text(f"dawnlike, pixel art, {p.stem.rsplit('_', 1)[0]}")
    return KohyaDataset.scan(root, DatasetOptions(**{**OPTS, **opts}), CaptionConfig(shuffle_caption=True,
                                                                                       keep_tokens=1))


def cfg_for(out: Path, **kw) -> TrainConfig:
    base = dict(output_dir=str(out), output_name="sprite", max_train_epochs=2, train_batch_size=2,
                learning_rate=1e-3, network_dim=4, network_alpha=2, network_train_unet_only=True, seed=3,
                sample_prompts=None)
    base.update(kw)
    return TrainConfig(**base)


def test_loss_falls_on_a_learnable_target(dawnlike_dir, tmp_path):
    ds = make_dataset(dawnlike_dir, tmp_path / "ds", n=4, repeats=2)
    host = tiny_host()
    ds.cache_latents(host.encode_images)
    lat = torch.stack([e.latents for e in ds.entries])
    cond = host.encode_prompts([e.caption for e in ds.entries])
    cfg = cfg_for(tmp_path / "out", max_train_epochs=6, learning_rate=1e-2, network_dim=8, network_alpha=8,
                  train_batch_size=4, conv_dim=4, conv_alpha=4, save_state=False)

    def fixed_loss():
        ts = torch.tensor([100, 300, 500, 700])
        with torch.no_grad():
            return float(diffusion_loss(host, lat, cond, cfg, torch.Generator().manual_seed(0), timesteps=ts))

    before = fixed_loss()
    res = LoraTrainer(host, ds, cfg).run()
    res.network.install(host)
    after = fixed_loss()
    res.network.remove()
    assert res.global_step == 6 * 2
    assert after < 0.9 * before, (before, after)


def test_files_metadata_eval_table_and_best(dawnlike_dir, tmp_path):
    ds = make_dataset(dawnlike_dir, tmp_path / "ds", n=6, repeats=1, validation_split=0.34)
    out = tmp_path / "out"
    seen = []
    res = LoraTrainer(tiny_host(), ds, cfg_for(out, max_train_epochs=3, save_every_n_epochs=1,
                                                sample_prompts="dawnlike, pixel art, acid blob\n# comment",
                                                sample_steps=2, lr_scheduler="cosine", lr_warmup_steps=0.25),
                      on_epoch=lambda rec, prev: seen.append((rec["epoch"], prev is not None))).run()
    names = sorted(p.name for p in out.iterdir())
    for n in ("sprite-000001.safetensors", "sprite-000002.safetensors", "sprite.safetensors",
              "sprite-best.safetensors", "sprite-000001-state.json", "sprite-state.safetensors",
              "sprite-epochs.json", "sprite-epochs.png", "sprite-loss.png", "sprite-samples.png"):
        assert n in names
    assert "sprite-000003.safetensors" not in names  # the last epoch is name.safetensors (kohya)
    assert seen == [(1, True), (2, True), (3, True)]
    md = read_metadata(out / "sprite-000002.safetensors")
    assert md["ss_epoch"] == "2" and md["ss_steps"] == str(2 * ds.num_batches(2))
    assert md["ss_network_module"] == "networks.lora" and md["ss_base_model_version"] == "sd_v1"
    assert md["ss_output_name"] == "sprite" and md["ss_num_train_images"] == str(ds.num_train_images)
    assert json.loads(md["ss_tag_frequency"])["1_dawnlike"]["pixel art"] == len(ds.entries)
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora" and md["ss_resolution"] == "(64, 64)"
    assert md["ss_lr_scheduler"] == "cosine" and md["ss_learning_rate"] == "0.001"
    assert not any(".state" in k for k in load_state_dict(out / "sprite.safetensors"))
    table = json.loads((out / "sprite-epochs.json").read_text())
    assert [r["epoch"] for r in table["epochs"]] == [1, 2, 3]
    assert res.best_metric == "val_loss" and all(r["val_loss"] > 0 for r in table["epochs"])
    best_e = min(table["epochs"], key=lambda r: r["val_loss"])["epoch"]
    assert res.best_epoch == best_e == table["best_epoch"]
    bmd = read_metadata(out / "sprite-best.safetensors")
    assert bmd["ss_best_epoch"] == str(best_e) and "val_loss" in bmd["ss_best_reason"]
    src = out / ("sprite.safetensors" if best_e == 3 else f"sprite-{best_e:06d}.safetensors")
    a, b = load_state_dict(src), load_state_dict(out / "sprite-best.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert res.loss_curve.ndim == 3 and res.table_image.shape[-1] == 3 and res.sample_grid is not None


class _Cancel(Exception):
    pass


def test_resume_reproduces_the_uninterrupted_run(dawnlike_dir, tmp_path):
    ds = make_dataset(dawnlike_dir, tmp_path / "ds", n=4, repeats=2, flip_aug=True)
    kw = dict(max_train_epochs=3, save_every_n_epochs=1, gradient_accumulation_steps=2, network_dropout=0.1,
              lr_scheduler="linear")
    full = LoraTrainer(tiny_host(), ds, cfg_for(tmp_path / "a", **kw)).run()

    def cancel_after_epoch_1(step, total, info):
        if info["epoch"] == 2:
            raise _Cancel()

    with pytest.raises(_Cancel):
        LoraTrainer(tiny_host(), ds, cfg_for(tmp_path / "b", **kw), progress=cancel_after_epoch_1).run()
    assert (tmp_path / "b" / "sprite-000001.safetensors").is_file()  # cancel keeps the finished epoch
    assert not (tmp_path / "b" / "sprite-000002.safetensors").exists()
    resumed = LoraTrainer(tiny_host(), ds, cfg_for(tmp_path / "b", resume="auto", **kw)).run()
    assert resumed.global_step == full.global_step
    a = full.network.kohya_state_dict()
    b = resumed.network.kohya_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.step_losses == full.step_losses
    with pytest.raises(ValueError, match="network_dim"):
        LoraTrainer(tiny_host(), ds, cfg_for(tmp_path / "b", **{**kw, "network_dim": 8},
                                             resume=str(tmp_path / "b" / "sprite-000001-state.json"))).run()


def test_early_stopping_picks_the_scripted_best_epoch(dawnlike_dir, tmp_path):
    ds = make_dataset(dawnlike_dir, tmp_path / "ds", n=2, repeats=1)
    script = iter([5.0, 3.0, 4.0, 3.5, 1.0, 0.5])  # best at epoch 2, patience 2 stops after epoch 4

    class Scripted(LoraTrainer):
        def validation_loss(self, autocast=None):
            return next(script)

    ds.val_entries = ds.entries[:1]  # make the trainer evaluate every epoch
    out = tmp_path / "out"
    res = Scripted(tiny_host(), ds, cfg_for(out, max_train_epochs=6, save_every_n_epochs=1,
                                            early_stopping_patience=2, best_metric="val_loss")).run()
    assert res.stopped_early and res.epochs_done == 4 and res.best_epoch == 2 and res.best_value == 3.0
    a = load_state_dict(out / "sprite-000002.safetensors")
    b = load_state_dict(out / "sprite-best.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_metadata(out / "sprite-best.safetensors")["ss_best_epoch"] == "2"
    assert read_metadata(out / "sprite.safetensors")["ss_epoch"] == "4"
    assert select_best([{"epoch": 1, "x": 10}, {"epoch": 2, "x": 7}, {"epoch": 3, "x": 9}], "x", "target", 8.5)[0] == 3
    assert select_best([{"epoch": 1, "x": 0.2}, {"epoch": 2, "x": 0.9}], "x", "max") == (2, 0.9)
    es = EarlyStopping(1)
    assert [es.update(e, s) for e, s in enumerate([3, 2, 2.5], 1)] == [False, False, True]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(dawnlike_dir, tmp_path):
    ds = make_dataset(dawnlike_dir, tmp_path / "ds", n=2, repeats=2)
    host = tiny_host()
    calls = {"n": 0}
    real = host.predict

    def flaky(x, t, c):
        calls["n"] += 1
        out = real(x, t, c)
        return out * float("nan") if calls["n"] > 2 else out

    host.predict = flaky
    out = tmp_path / "out"
    with pytest.raises(TrainingDivergedError, match="sprite-000001.safetensors"):
        LoraTrainer(host, ds, cfg_for(out, max_train_epochs=3, save_every_n_epochs=1)).run()
    assert (out / "sprite-000001.safetensors").is_file()
    assert not (out / "sprite-000002.safetensors").exists() and not (out / "sprite.safetensors").exists()
    assert not host.installed_deltas()  # the host is clean after the failure


def test_optimizers_and_unsupported_ones(monkeypatch):
    p = [torch.nn.Parameter(torch.zeros(3))]
    assert type(build_optimizer("AdamW", [{"params": p}], 1e-3, ["weight_decay=0.1"])).__name__ == "AdamW"
    assert type(build_optimizer("Adafactor", [{"params": p}], 1e-3)).__name__ == "Adafactor"
    with pytest.raises(OptimizerUnavailableError, match="not supported"):
        TrainConfig(optimizer_type="Lion").validate()
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)
    with pytest.raises(OptimizerUnavailableError, match="bitsandbytes"):
        build_optimizer("AdamW8bit", [{"params": p}], 1e-3)
    try:
        import prodigyopt  # noqa: F401
    except ImportError:
        with pytest.raises(OptimizerUnavailableError, match="prodigyopt"):
            build_optimizer("Prodigy", [{"params": p}], 1.0)


def test_min_snr_weights_follow_hang_et_al():
    ac = torch.tensor([0.99, 0.5, 0.01])
    t = torch.tensor([0, 1, 2])
    s = ac / (1 - ac)  # 99, 1, 0.0101
    eps = min_snr_weight(ac, t, 5.0, "epsilon")
    v = min_snr_weight(ac, t, 5.0, "v_prediction")
    assert torch.allclose(eps, torch.stack([5 / s[0], torch.tensor(1.0), torch.tensor(1.0)]))
    assert torch.allclose(v, torch.clamp(s, max=5) / (s + 1))


def test_kohya_toml_and_set_values():
    text = """
[model_arguments]
pretrained_model_name_or_path = "/models/sd15"
[training_arguments]
max_train_epochs = 9
train_batch_size = 4
mixed_precision = "bf16"
optimizer_type = "AdamW8bit"
learning_rate = 1e-4
lr_scheduler = "cosine"
[network_arguments]
network_dim = 32
network_alpha = 16
network_args = ["conv_dim=8", "conv_alpha=4"]
[dataset_arguments]
keep_tokens = 1
caption_dropout_rate = 0.02
resolution = "512,512"
caption_extension = ".txt"
"""
    flat = parse_kohya_toml(text)
    flat.update(parse_set_values(["network_dim=16", "output_name=bespoke"]))
    cfg, dopts, caps, rest = configs_from_mapping(flat)
    assert (cfg.max_train_epochs, cfg.train_batch_size, cfg.network_dim, cfg.network_alpha) == (9, 4, 16, 16.0)
    assert (cfg.conv_dim, cfg.conv_alpha, cfg.output_name) == (8, 4.0, "bespoke")
    assert caps.keep_tokens == 1 and caps.caption_dropout_rate == 0.02 and dopts.size == (512, 512)
    assert rest == ["pretrained_model_name_or_path"]
    with pytest.raises(ValueError, match="invalid kohya TOML"):
        parse_kohya_toml("network_dim = = 3")
    with pytest.raises(ValueError, match="key=value"):
        parse_set_values(["oops"])
