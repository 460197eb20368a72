"""Nothing a kohya user writes is dropped without a word: every kohya argument is honoured, warned or refused,
and the settings kohya users reach for change the training as they do in kohya (issue 14)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_host

from conceptlab.formats.safetensors_io import load_state_dict, read_metadata
from conceptlab.training.lora import kohya_args as KA
from conceptlab.training.lora.captions import read_caption
from conceptlab.training.lora.dataset import KohyaDataset
from conceptlab.training.lora.dataset_options import DatasetOptions
from conceptlab.training.lora.build import build_network_and_groups
from conceptlab.training.lora.config import TrainConfig
from conceptlab.training.lora.loss import diffusion_loss
from conceptlab.training.lora.trainer import LoraTrainer

OPTS = dict(resolution=64, min_bucket_reso=64, max_bucket_reso=128, resize_interpolation="nearest")


# -- the three lists --------------------------------------------------------------------------------------------

def test_every_kohya_argument_is_in_exactly_one_list():
    names = KA.kohya_argument_names() + KA.kohya_dataset_config_keys() + KA.kohya_flux_argument_names()
    assert len(KA.kohya_argument_names()) > 150  # train_network.py's parser, read from kohya's source
    assert {"timestep_sampling", "discrete_flow_shift", "guidance_scale"} <= set(KA.kohya_flux_argument_names())
    lists = {"honoured": set(KA.HONOURED) | set(KA.DATASET_CONFIG_HONOURED), "no_effect": set(KA.NO_EFFECT),
             "refused": set(KA.REFUSED)}
    missing = [n for n in names if not any(n in s for s in lists.values())]
    assert not missing, f"kohya arguments in no list: {missing}"
    twice = [n for n in names if sum(n in s for s in lists.values()) > 1]
    assert not twice, f"kohya arguments in several lists: {twice}"
    stale = (set().union(*lists.values()) - set(names)) - {"state_dir"}
    assert not stale, f"listed names kohya does not have: {sorted(stale)}"


def test_network_args_keys_cover_kohya_networks_lora():
    from conceptlab.training.lora.network_args import KNOWN_KEYS

    assert set(KA.kohya_data()["lora_network_args"]) <= set(KNOWN_KEYS)


def test_refused_and_no_effect_settings_are_named():
    warnings = KA.check_settings({"xformers": True, "sdpa": False, "mystery": 1, "network_dim": 8},
                                 own_keys={"network_dim"})
    assert any("xformers" in w for w in warnings) and not any("sdpa" in w for w in warnings)  # default: silent
    assert any("'mystery'" in w for w in warnings)
    with pytest.raises(KA.KohyaSettingError, match="masked_loss.*color_aug|color_aug.*masked_loss"):
        KA.check_settings({"masked_loss": True, "color_aug": True, "random_crop": False})
    KA.check_settings({"masked_loss": False, "fp8_base": False})  # kohya's defaults ask for nothing
    with pytest.raises(KA.KohyaSettingError, match="networks.oft"):
        KA.check_settings({"network_module": "networks.oft"})
    KA.check_settings({"network_module": "lycoris.kohya"})  # LoHa / LoKr through lycoris-lora
    with pytest.raises(KA.KohyaSettingError, match="safetensors"):
        KA.check_settings({"save_model_as": "ckpt"})


def test_list_form_learning_rates_and_aliases():
    cfg, _ = TrainConfig.from_mapping({"text_encoder_lr": [1e-5, 2e-5], "unet_lr": [3e-4], "use_8bit_adam": True,
                                       "caption_extention": ".cap"})
    assert cfg.text_encoder_lr == 1e-5 and cfg.unet_lr == 3e-4 and cfg.optimizer_type == "AdamW8bit"
    assert KA.normalize_settings({"caption_extention": ".cap"})["caption_extension"] == ".cap"
    cfg, _ = TrainConfig.from_mapping({"text_encoder_lr": []})
    assert cfg.text_encoder_lr is None
    with pytest.raises(ValueError, match="network_args 'bogus'"):
        TrainConfig.from_mapping({"network_args": ["bogus=1"]})


def test_tokenizer_with_a_foreign_model_max_length_is_a_clear_error():
    from conceptlab.training.diffusers_host import check_tokenizer_length

    class Tok:
        model_max_length = 1000000000000000019884624838656

    te = tiny_host().text_encoder
    with pytest.raises(ValueError, match="model_max_length = 1000000000000000019884624838656.*77"):
        check_tokenizer_length(Tok(), te, "tokenizer")
    Tok.model_max_length = 77
    check_tokenizer_length(Tok(), te, "tokenizer")


def test_captions_keep_form_feed_and_unicode_line_separators(tmp_path):
    img = tmp_path / "a.png"
    img.write_bytes(b"")
    (tmp_path / "a.txt").write_text("one\x0cpage, two\x0bthree\x85four\u2028five\nsecond line", encoding="utf-8")
    assert read_caption(img, ".txt") == "one\x0cpage, two\x0bthree\x85four\u2028five"
    (tmp_path / "a.txt").write_bytes(b"first\rsecond")  # a bare \r ends a line in kohya's text mode too
    assert read_caption(img, ".txt") == "first"


def test_node_kohya_toml_reports_unknown_and_node_owned_keys_by_name(caplog):
    from conceptlab.nodes.lora import _check_toml_keys

    with caplog.at_level(logging.WARNING):
        kept = _check_toml_keys({"network_dim": 8, "netwrok_alpha": 4, "output_dir": "/x", "xformers": True})
    text = caplog.text
    assert "'netwrok_alpha'" in text and "output_dir is not used here" in text and "xformers has no effect" in text
    assert kept == {"network_dim": 8, "netwrok_alpha": 4, "xformers": True}
    with pytest.raises(ValueError, match="weighted_captions"):
        _check_toml_keys({"weighted_captions": True})


# -- behaviour: networks, learning rates, continuing a LoRA -------------------------------------------------------

def test_conv_alpha_defaults_to_one_like_kohya():
    host = tiny_host()
    cfg = TrainConfig(conv_dim=8, network_dim=4, network_alpha=4)
    net, _ = build_network_and_groups(host, cfg)
    convs = [t for t in net.targets.values() if t.is_conv3x3]
    assert convs and all(t.alpha == 1.0 and t.dim == 8 for t in convs)
    cfg, _ = TrainConfig.from_mapping({"network_args": ["conv_dim=8"]})
    assert cfg.conv_dim == 8 and cfg.conv_alpha is None


def test_zero_learning_rate_freezes_that_part(dawnlike_dir, tmp_path):
    ds = _dataset(dawnlike_dir, tmp_path / "ds")
    host = tiny_host()
    cfg = TrainConfig(output_dir=str(tmp_path / "out"), output_name="z", max_train_epochs=1, train_batch_size=2,
                      learning_rate=1e-3, text_encoder_lr=0.0, network_dim=4, save_state=False, seed=1,
                      validate_every_n_epochs=0)
    res = LoraTrainer(host, ds, cfg).run()
    sd = load_state_dict(res.final_path)
    te_up = [v for k, v in sd.items() if k.startswith("lora_te_") and k.endswith("lora_up.weight")]
    un_up = [v for k, v in sd.items() if k.startswith("lora_unet_") and k.endswith("lora_up.weight")]
    assert te_up and all(float(v.abs().max()) == 0 for v in te_up)      # kohya: no optimizer group -> untouched
    assert any(float(v.abs().max()) > 0 for v in un_up)
    with pytest.raises(ValueError, match="no LoRA parameter would train"):
        build_network_and_groups(host, TrainConfig(unet_lr=0.0, network_train_unet_only=True), True, False)


def test_block_lr_and_loraplus_groups_reach_the_optimizer():
    host = tiny_host()
    cfg, _ = TrainConfig.from_mapping({"network_args": ["down_lr_weight=0.5,0.5,0.5,0,0,0", "mid_lr_weight=2",
                                                        "up_lr_weight=1", "loraplus_lr_ratio=4"],
                                       "learning_rate": 1e-3, "network_train_unet_only": True})
    net, groups = build_network_and_groups(host, cfg, True, False)
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs["unet_block1"] == pytest.approx(5e-4) and lrs["unet_block1 plus"] == pytest.approx(2e-3)
    assert lrs["unet_block12"] == pytest.approx(2e-3)
    # blocks with weight 0 get no modules at all (kohya remove_block_dims_and_alphas)
    assert not any("down_blocks_1_attentions" in n for n in net.loras)


def test_network_weights_and_dim_from_weights_continue_a_lora(dawnlike_dir, tmp_path):
    ds = _dataset(dawnlike_dir, tmp_path / "ds")
    cfg = TrainConfig(output_dir=str(tmp_path / "a"), output_name="a", max_train_epochs=1, train_batch_size=2,
                      learning_rate=1e-3, network_dim=4, network_alpha=2, network_train_unet_only=True,
                      save_state=False, save_precision="fp32", seed=2)
    first = LoraTrainer(tiny_host(), ds, cfg).run().final_path
    sd = load_state_dict(first)
    net, _ = build_network_and_groups(tiny_host(), TrainConfig(network_weights=str(first), network_dim=4,
                                                               network_train_unet_only=True), True, False)
    for name, d in net.loras.items():
        torch.testing.assert_close(d.lora_up.detach(), sd[f"{name}.lora_up.weight"].view_as(d.lora_up))
    net2, _ = build_network_and_groups(tiny_host(), TrainConfig(network_weights=str(first), dim_from_weights=True,
                                                                network_dim=32), True, False)
    assert {d.dim for d in net2.loras.values()} == {4} and set(net2.loras) == set(net.loras)
    with pytest.raises(ValueError, match="rank 4 in the file but 8 here"):
        build_network_and_groups(tiny_host(), TrainConfig(network_weights=str(first), network_dim=8), True, False)


# -- behaviour: noise and loss options -----------------------------------------------------------------------

def test_noise_options_change_the_loss_as_kohya_describes():
    host = tiny_host()
    lat = torch.randn(2, 4, 8, 8)
    cond = host.encode_prompts(["a", "b"])
    ts = torch.tensor([300, 600])

    def loss(**kw):
        with torch.no_grad():
            return float(diffusion_loss(host, lat, cond, TrainConfig(**kw).validate(),
                                        torch.Generator().manual_seed(0), timesteps=ts))

    base = loss()
    assert loss(ip_noise_gamma=0.1) != base and loss(multires_noise_iterations=4, multires_noise_discount=0.3) != base
    assert loss(debiased_estimation_loss=True) != base
    with torch.no_grad():
        w = diffusion_loss(host, lat, cond, TrainConfig().validate(), torch.Generator().manual_seed(0), timesteps=ts,
                           loss_weights=torch.tensor([1.0, 0.0]))
        one = diffusion_loss(host, lat[:1], cond[:1], TrainConfig().validate(), torch.Generator().manual_seed(0),
                             timesteps=ts[:1])
    assert float(w) == pytest.approx(float(one) / 2, rel=1e-5)  # prior_loss_weight 0 silences the reg sample
    with pytest.raises(ValueError, match="adaptive_noise_scale needs noise_offset"):
        TrainConfig(adaptive_noise_scale=0.1).validate()


def test_scale_weight_norms_caps_every_module(dawnlike_dir, tmp_path):
    ds = _dataset(dawnlike_dir, tmp_path / "ds")
    cfg = TrainConfig(output_dir=str(tmp_path / "o"), output_name="n", max_train_epochs=2, train_batch_size=2,
                      learning_rate=5e-2, network_dim=4, network_alpha=4, network_train_unet_only=True,
                      save_state=False, scale_weight_norms=0.05, save_precision="fp32")
    res = LoraTrainer(tiny_host(), ds, cfg).run()
    norms = [float((d.lora_up.flatten(1) @ d.lora_down.flatten(1)).norm() * d.scale) for d in res.network.loras.values()]
    assert max(norms) <= 0.05 * 1.0001 and max(norms) > 0.01
    assert read_metadata(res.final_path)["ss_scale_weight_norms"] == "0.05"


def test_bf16_on_cpu_says_it_trains_in_fp32(caplog):
    from conceptlab.training.lora.trainer import _autocast_factory

    with caplog.at_level(logging.WARNING):
        ctx, eff, scaler = _autocast_factory("bf16", torch.device("cpu"))
    assert ctx is None and eff == "no" and "bf16" in caplog.text and "fp32" in caplog.text


# -- sample prompts ------------------------------------------------------------------------------------------

def test_sample_prompt_options_reach_the_sampler(dawnlike_dir, tmp_path):
    ds = _dataset(dawnlike_dir, tmp_path / "ds")
    host = tiny_host()
    calls = []
    host.sample = lambda prompts, negative="", **kw: (calls.append((prompts, negative, kw)),
                                                      torch.zeros(1, 3, kw["height"], kw["width"]))[1]
    cfg = TrainConfig(sample_prompts="# comment\nknight --n blurry --w 100 --h 72 --s 5 --d 9 --l 3.5\n\nslime",
                      sample_steps=7, sample_cfg=6.0, seed=4)
    tr = LoraTrainer(host, ds, cfg)
    tr.render_samples(cfg.prompts)
    (p1, n1, k1), (p2, n2, k2) = calls
    assert p1 == ["knight"] and n1 == "blurry" and (k1["width"], k1["height"], k1["steps"], k1["seed"], k1["cfg"]) \
        == (96, 72, 5, 9, 3.5)
    assert p2 == ["slime"] and (k2["width"], k2["steps"], k2["seed"], k2["cfg"]) == (64, 7, 4 + 1, 6.0)


# -- [[datasets]] with regularization images, end to end through the CLI ----------------------------------------

def test_cli_dataset_config_with_reg_images_runs_as_kohya(dawnlike_dir, tmp_path, monkeypatch, capsys):
    from conceptlab import cli
    from conceptlab.training.lora import train_cli

    sprites = sorted(dawnlike_dir.glob("*.png"))
    for folder, files in (("img", sprites[:3]), ("reg", sprites[3:5])):
        (tmp_path / folder).mkdir()
        for p in files:
            shutil.copy(p, tmp_path / folder / p.name)
    (tmp_path / "img" / f"{sprites[0].stem}.caption").write_text("sks sprite, red")
    cfg = tmp_path / "kohya.toml"
    cfg.write_text(f"""
pretrained_model_name_or_path = "{tmp_path / 'model'}"
output_dir = "{tmp_path / 'out'}"
output_name = "reg"
max_train_epochs = 1
learning_rate = 1e-3
network_dim = 4
network_alpha = 2
network_train_unet_only = true
prior_loss_weight = 0.5
network_args = ["down_lr_weight=cosine", "conv_dim=2"]
resize_interpolation = "nearest"

[general]
shuffle_caption = false
caption_extension = ".caption"

[[datasets]]
resolution = 64
min_bucket_reso = 64
max_bucket_reso = 128
batch_size = 2

  [[datasets.subsets]]
  image_dir = "img"
  num_repeats = 2
  class_tokens = "sks sprite"

  [[datasets.subsets]]
  image_dir = "reg"
  is_reg = true
  num_repeats = 1
  class_tokens = "sprite"
""")
    monkeypatch.setattr(train_cli, "_host_for", lambda *a, **k: tiny_host())
    rc = cli.main(["train", "--config", str(cfg), "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    md = read_metadata(tmp_path / "out" / "reg.safetensors")
    assert md["ss_num_train_images"] == "6" and md["ss_num_reg_images"] == "2"
    assert json.loads(md["ss_reg_dataset_dirs"]) == {"reg": {"n_repeats": 1, "img_count": 2}}
    assert md["ss_prior_loss_weight"] == "0.5" and md["ss_network_alpha"] == "2"
    assert md["ss_optimizer"] == "torch.optim.adamw.AdamW" and md["ss_mixed_precision"] == "no"
    assert json.loads(md["ss_network_args"]) == {"down_lr_weight": "cosine", "conv_dim": "2", "dropout": None}
    # reg images balanced to the 6 training uses: 2 reg images x 3 -> 4 batches of 2 + 3 batches of 2
    assert md["ss_num_batches_per_epoch"] == str((6 + 6) // 2)


def test_metadata_key_set_covers_kohya(dawnlike_dir, tmp_path):
    ds = _dataset(dawnlike_dir, tmp_path / "ds")
    cfg, _ = TrainConfig.from_mapping(dict(output_dir=str(tmp_path / "o"), output_name="m", max_train_epochs=1,
                                           train_batch_size=2, network_dim=4, network_alpha=16, save_state=False,
                                           network_train_unet_only=True, noise_offset=0.05, metadata_author="me",
                                           min_timestep=100))
    res = LoraTrainer(tiny_host(), ds, cfg).run()
    md = read_metadata(res.final_path)
    kohya = set(KA.kohya_data()["metadata_keys"]["ss"])
    # written by kohya only with a dataset config, a separate VAE, network_args or a model file
    conditional = {"ss_datasets", "ss_vae_name", "ss_vae_hash", "ss_new_vae_hash", "ss_network_args",
                   "ss_sd_model_hash", "ss_new_sd_model_hash", "ss_sd_model_name"}
    assert not (kohya - conditional) - set(md), sorted((kohya - conditional) - set(md))
    assert md["ss_network_alpha"] == "16" and md["ss_noise_offset"] == "0.05" and md["ss_resolution"] == "(64, 64)"
    assert md["ss_multires_noise_iterations"] == "None" and md["ss_huber_scale"] == "1.0"
    assert md["modelspec.author"] == "me" and md["modelspec.timestep_range"] == "100,1000"
    assert md["modelspec.implementation_version"].startswith("conceptlab/")
    assert res.final_path.stat().st_mode & 0o777 == 0o644


def _dataset(dawnlike_dir: Path, root: Path, n: int = 4, repeats: int = 1) -> KohyaDataset:
    sub = root / f"{repeats}_sprite"
    sub.mkdir(parents=True)
    for p in sorted(dawnlike_dir.glob("*.png"))[:n]:
        shutil.copy(p, sub / p.name)
    return KohyaDataset.scan(root, DatasetOptions(**OPTS))
