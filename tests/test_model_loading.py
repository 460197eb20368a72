"""Single-file checkpoint loading for the diffusers host (training/model_loading.py, DiffusersHost.from_single_file).

Tiny SD1/SD2-shaped single files are written in the test by renaming a tiny diffusers UNet/VAE/CLIP to LDM names:
the UNet with formats.ldm_keys.diffusers_to_ldm_unet, the VAE and CLIP by inverting diffusers' forward conversion
(diffusers ships no diffusers->LDM converter in the package). Loading them back through diffusers' own
single-file converters must reproduce the tiny model's outputs exactly. Nothing is downloaded.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from conceptlab.formats.ldm_keys import diffusers_to_ldm_unet, openclip_ldm_to_hf
from conceptlab.formats.safetensors_io import WeightFileError, save_safetensors
from conceptlab.training.diffusers_host import DiffusersHost
from conceptlab.training.model_loading import (CheckpointLoadError, TokenizerNotFound, load_configs, load_host,
                                               load_single_file, resolve_tokenizer)
from conftest import requires_comfyui
from tiny_models import BOS, EOS, TINY_UNET_CONFIG, tiny_host, word_hash_tokenizer

REAL_SD15 = Path("/tmp/conceptlab-test-cache/conceptlab_random_sd15_fp16.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# building LDM single files from tiny diffusers models
# ---------------------------------------------------------------------------------------------------------------
def _vae_to_ldm(sd: dict[str, torch.Tensor], n_blocks: int) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL names -> LDM ``first_stage_model.`` names: the inverse of
    diffusers.loaders.single_file_utils.convert_ldm_vae_checkpoint (mid attention linear -> 1x1 conv)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    static = DIFFUSERS_TO_LDM_MAPPING["vae"]
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for k, v in sd.items():
        if k in static:
            name = static[k]
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", k):
            name = f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)", k):
            name = f"encoder.down.{m[1]}.downsample.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", k):
            name = f"decoder.up.{n_blocks - 1 - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", k):
            name = f"decoder.up.{n_blocks - 1 - int(m[1])}.upsample.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", k):
            name = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\."
                           r"(weight|bias)", k):
            name = f"{m[1]}.mid.attn_1.{attn[m[2]]}.{m[3]}"
            if m[3] == "weight" and m[2] != "group_norm":
                v = v[:, :, None, None]  # LDM stores these as 1x1 convs
        else:
            raise AssertionError(f"test helper cannot name VAE key {k}")
        out["first_stage_model." + name] = v
    return out


def _te_to_ldm_sd1(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel names (with or without ``text_model.``) -> SD1 ``cond_stage_model.transformer.``."""
    out = {}
    for k, v in sd.items():
        k = k if k.startswith("text_model.") else f"text_model.{k}"
        out["cond_stage_model.transformer." + k] = v
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return out


def _te_to_ldm_sd2(sd: dict[str, torch.Tensor], width: int, layers: int) -> dict[str, torch.Tensor]:
    """CLIPTextModel -> SD2 OpenCLIP ``cond_stage_model.model.`` names (fused in_proj), by inverting
    formats.ldm_keys.openclip_ldm_to_hf (itself read from diffusers' convert_open_clip_checkpoint)."""
    table = openclip_ldm_to_hf(width, layers)
    canon = {(k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in sd.items()}
    parts: dict[str, list] = {}
    out = {}
    for hf, (src, rows, _t) in table.items():
        if hf not in canon:
            continue
        if rows is None:
            out[src] = canon[hf]
        else:
            parts.setdefault(src, []).append((rows[0], canon[hf]))
    for src, chunks in parts.items():
        out[src] = torch.cat([t for _, t in sorted(chunks, key=lambda c: c[0])])
    out["text_projection"] = torch.eye(width)
    return {"cond_stage_model.model." + k: v for k, v in out.items()}


def _write_configs(host: DiffusersHost, folder: Path, arch: str = "sd1", prediction_type: str = "epsilon") -> Path:
    folder.mkdir(parents=True, exist_ok=True)

    def dump(name, cfg):
        clean = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(cfg).items() if not k.startswith("_")}
        (folder / f"{arch}_{name}.json").write_text(json.dumps(clean, default=list))

    dump("unet", host.unet.config)
    dump("vae", host.vae.config)
    dump("text_encoder", host.text_encoder.config.to_dict())
    dump("scheduler", {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                       "num_train_timesteps": 1000, "prediction_type": prediction_type})
    return folder


def _tiny_single_file(tmp_path: Path, arch: str = "sd1", seed: int = 0, metadata=None, drop=(), fmt="safetensors"):
    host = tiny_host(seed)
    unet_map = diffusers_to_ldm_unet("sd1", unet_config=TINY_UNET_CONFIG)
    sd = {"model.diffusion_model." + unet_map[k]: v for k, v in host.unet.state_dict().items()}
    sd.update(_vae_to_ldm(host.vae.state_dict(), len(host.vae.config.block_out_channels)))
    te_sd = host.text_encoder.state_dict()
    if arch == "sd1":
        sd.update(_te_to_ldm_sd1(te_sd))
    else:
        cfg = host.text_encoder.config
        sd.update(_te_to_ldm_sd2(te_sd, cfg.hidden_size, cfg.num_hidden_layers))
    sd["model_ema.decay"] = torch.tensor(0.9999)  # extra top-level keys of real checkpoints are ignored
    for k in drop:
        del sd[k]
    sd = {k: v.detach().clone().contiguous() for k, v in sd.items()}
    if fmt == "safetensors":
        path = save_safetensors(sd, tmp_path / f"tiny_{arch}.safetensors", metadata=metadata or {})
    else:
        path = tmp_path / f"tiny_{arch}.ckpt"
        torch.save({"state_dict": sd, "global_step": 1}, path)
    cfg_dir = _write_configs(host, tmp_path / "configs", arch)
    return host, Path(path), cfg_dir


def _assert_same_outputs(a: DiffusersHost, b: DiffusersHost):
    torch.manual_seed(3)
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([7, 800])
    prompts = ["a red apple", "pixel art cat"]
    with torch.no_grad():
        ca, cb = a.encode_prompts(prompts), b.encode_prompts(prompts)
        assert torch.equal(ca.context, cb.context)
        assert torch.equal(a.predict(x, t, ca), b.predict(x, t, cb))
        lat = torch.randn(1, 4, 8, 8)
        assert torch.equal(a.decode_latents(lat), b.decode_latents(lat))
        img = torch.rand(1, 3, 64, 64) * 2 - 1
        assert torch.equal(a.encode_images(img), b.encode_images(img))


def _write_clip_tokenizer(folder: Path, words=("a", "cat", "red", "apple", "pixel", "art")) -> Path:
    """A minimal word-level CLIP BPE tokenizer: every word is one vocabulary entry reached by merges."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"!": 0, "<|startoftext|>": BOS, "<|endoftext|>": EOS}
    merges = []
    chars = sorted({c for w in words for c in w})
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    for w in words:
        pieces = list(w[:-1]) + [w[-1] + "</w>"]
        while len(pieces) > 1:  # merge left to right: ((c a) t</w>)
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return folder


# ---------------------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------------------
def test_sd1_single_file_round_trip_reproduces_tiny_model(tmp_path):
    ref, path, cfg_dir = _tiny_single_file(tmp_path)
    host = DiffusersHost.from_single_file(path, tokenizer=word_hash_tokenizer, configs_dir=cfg_dir)
    assert host.arch == "sd1" and host.prediction_type == "epsilon"
    assert host.load_report["unused_keys"] == {}
    assert set(host.modules("unet")) == set(ref.modules("unet"))
    assert "text_model.encoder.layers.0.self_attn.q_proj" in host.modules("te")
    assert torch.allclose(host.alphas_cumprod, ref.alphas_cumprod)
    _assert_same_outputs(ref, host)
    # load_host dispatches a file to from_single_file
    again = load_host(path, tokenizer=word_hash_tokenizer, configs_dir=cfg_dir)
    _assert_same_outputs(ref, again)


def test_ckpt_is_read_weights_only(tmp_path):
    ref, path, cfg_dir = _tiny_single_file(tmp_path, fmt="ckpt")
    host = DiffusersHost.from_single_file(path, tokenizer=word_hash_tokenizer, configs_dir=cfg_dir)
    _assert_same_outputs(ref, host)

    class Evil:  # anything that needs full unpickling is refused, never executed
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "obj": Evil()}, bad)
    with pytest.raises(WeightFileError, match="weights_only"):
        DiffusersHost.from_single_file(bad, tokenizer=word_hash_tokenizer, configs_dir=cfg_dir)


def test_sd2_open_clip_single_file_round_trip(tmp_path):
    ref, path, cfg_dir = _tiny_single_file(tmp_path, arch="sd2")
    host = DiffusersHost.from_single_file(path, tokenizer=word_hash_tokenizer, configs_dir=cfg_dir,
                                          prediction_type="v_prediction")
    assert host.arch == "sd2" and host.prediction_type == "v_prediction"
    assert host.load_report["prediction_source"] == "argument"
    _assert_same_outputs(ref, host)


def test_prediction_type_from_metadata_and_default(tmp_path):
    _, path, cfg_dir = _tiny_single_file(tmp_path, metadata={"modelspec.prediction_type": "v"})
    sf = load_single_file(path, configs_dir=cfg_dir)
    assert (sf.prediction_type, sf.prediction_source) == ("v_prediction", "metadata")
    assert load_single_file(path, configs_dir=cfg_dir, prediction_type="epsilon").prediction_type == "epsilon"
    with pytest.raises(ValueError, match="prediction_type"):
        load_single_file(path, configs_dir=cfg_dir, prediction_type="flow")


def test_missing_and_unexpected_keys_are_reported(tmp_path):
    drop = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    _, path, cfg_dir = _tiny_single_file(tmp_path, drop=[drop])
    with pytest.raises(CheckpointLoadError, match=r"missing key.*attn2\.to_k\.weight"):
        load_single_file(path, configs_dir=cfg_dir)
    _, path, cfg_dir = _tiny_single_file(tmp_path / "b")
    # a config with one text-encoder layer: the file's layer 1 becomes unexpected
    with pytest.raises(CheckpointLoadError, match=r"text encoder.*unexpected key.*layers\.1\."):
        load_single_file(path, configs_dir=cfg_dir, config_overrides={"text_encoder": {"num_hidden_layers": 1}})
    # a wider UNet: shape mismatches are listed
    with pytest.raises(CheckpointLoadError, match="shape mismatch"):
        load_single_file(path, configs_dir=cfg_dir, config_overrides={"unet": {"cross_attention_dim": 48}})


def test_other_families_and_non_checkpoints_are_refused(tmp_path):
    sdxl = {"conditioner.embedders.1.model.ln_final.weight": torch.zeros(4),
            "model.diffusion_model.label_emb.0.0.weight": torch.zeros(4, 4)}
    flux = {"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": torch.zeros(4, 4)}
    lora = {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 4)}
    # an SDXL file with only the OpenCLIP-G encoder is the refiner (SDXL base files load: tests/test_sdxl.py)
    for name, sd, msg in (("xl", sdxl, "refiner"), ("flux", flux, "flux"), ("lora", lora, "not a full|unknown")):
        p = save_safetensors(sd, tmp_path / f"{name}.safetensors")
        with pytest.raises(CheckpointLoadError, match=msg):
            load_single_file(p)
    with pytest.raises(FileNotFoundError):
        load_host(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(WeightFileError):
        load_single_file(tmp_path / "junk.safetensors")


def test_shipped_configs_match_diffusers_layouts():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from conceptlab.formats.ldm_keys import diffusers_unet_keys, unet_config_for

    for arch, n_layers, width in (("sd1", 12, 768), ("sd2", 23, 1024)):
        cfgs = load_configs(arch)
        ref = unet_config_for(arch)  # diffusers' create_unet_diffusers_config_from_ldm on the LDM yaml values
        for k in ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block",
                  "cross_attention_dim", "attention_head_dim", "use_linear_projection"):
            assert cfgs["unet"][k] == (list(ref[k]) if isinstance(ref[k], tuple) else ref[k]), (arch, k)
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(cfgs["unet"])
            vae = AutoencoderKL.from_config(cfgs["vae"])
            te = CLIPTextModel(CLIPTextConfig.from_dict(
                {k: v for k, v in cfgs["text_encoder"].items() if k != "model_type"}))
        assert set(unet.state_dict()) == set(diffusers_unet_keys(arch))
        assert vae.config.scaling_factor == pytest.approx(0.18215)
        assert sum(p.numel() for p in vae.parameters()) == 83_653_863
        assert te.config.num_hidden_layers == n_layers and te.config.hidden_size == width
        assert cfgs["scheduler"]["beta_schedule"] == "scaled_linear"
    assert sum(p.numel() for p in unet.parameters()) > 800_000_000


def test_word_level_clip_tokenizer_folder_and_resolution_order(tmp_path, monkeypatch):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    folder = _write_clip_tokenizer(tmp_path / "tok")
    tok = resolve_tokenizer(str(folder))
    ids = tok(["a cat", "red apple"], padding="max_length", truncation=True, max_length=tok.model_max_length,
              return_tensors="pt").input_ids
    vocab = json.loads((folder / "vocab.json").read_text())
    assert ids.shape == (2, 77)
    assert ids[0, :4].tolist() == [BOS, vocab["a</w>"], vocab["cat</w>"], EOS] and ids[0, -1] == EOS
    assert ids[1, 1:3].tolist() == [vocab["red</w>"], vocab["apple</w>"]]
    sd2 = resolve_tokenizer(folder, arch="sd2")
    assert sd2(["a"], padding="max_length", max_length=77).input_ids[0][-1] == 0  # SD2 pads with "!"

    # a host loaded with the folder encodes prompts
    ref, path, cfg_dir = _tiny_single_file(tmp_path)
    host = DiffusersHost.from_single_file(path, tokenizer=folder, configs_dir=cfg_dir)
    assert torch.isfinite(host.encode_prompts(["a cat"]).context).all()

    # order: explicit > COMFYUI_PATH > the ComfyUI checkout holding the pack > clear error
    comfy = tmp_path / "ComfyUI"
    pack = comfy / "custom_nodes" / "conceptlab"
    pack.mkdir(parents=True)
    with pytest.raises(TokenizerNotFound, match="--tokenizer"):
        resolve_tokenizer(None, pack_dir=pack)
    _write_clip_tokenizer(comfy / "comfy" / "sd1_tokenizer", words=("a", "dog"))
    assert "dog</w>" in resolve_tokenizer(None, pack_dir=pack).get_vocab()
    real_pack = tmp_path / "src" / "conceptlab"  # a pack symlinked into custom_nodes/
    real_pack.mkdir(parents=True)
    (comfy / "custom_nodes" / "linked").symlink_to(real_pack, target_is_directory=True)
    assert "dog</w>" in resolve_tokenizer(None, pack_dir=comfy / "custom_nodes" / "linked").get_vocab()
    env_comfy = tmp_path / "OtherComfy"
    _write_clip_tokenizer(env_comfy / "comfy" / "sd1_tokenizer", words=("a", "owl"))
    monkeypatch.setenv("COMFYUI_PATH", str(env_comfy))
    assert "owl</w>" in resolve_tokenizer(None, pack_dir=pack).get_vocab()
    assert "cat</w>" in resolve_tokenizer(folder, pack_dir=pack).get_vocab()
    assert resolve_tokenizer(word_hash_tokenizer) is word_hash_tokenizer
    with pytest.raises(TokenizerNotFound):
        resolve_tokenizer(tmp_path / "empty_dir")


def test_load_host_dispatches_a_diffusers_folder(tmp_path):
    ref = tiny_host(1)
    root = tmp_path / "model"
    ref.unet.save_pretrained(root / "unet")
    ref.vae.save_pretrained(root / "vae")
    ref.text_encoder.save_pretrained(root / "text_encoder")
    _write_clip_tokenizer(root / "tokenizer")
    (root / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    host = load_host(root)
    assert isinstance(host, DiffusersHost) and host.arch == "sd1"
    torch.manual_seed(0)
    x = torch.randn(1, 4, 8, 8)
    c = torch.randn(1, 77, 32)
    with torch.no_grad():
        # same weights; from_pretrained's tensors may differ in memory layout, so allow float rounding
        assert torch.allclose(host.predict(x, torch.tensor([5]), c), ref.predict(x, torch.tensor([5]), c),
                              atol=1e-5)
    with pytest.raises(ValueError, match="single-file"):
        load_host(root, tokenizer=str(root / "tokenizer"))


@requires_comfyui
@pytest.mark.skipif(not REAL_SD15.is_file(), reason=f"random SD1.5 checkpoint not cached at {REAL_SD15}")
def test_real_sd15_single_file_with_comfyui_tokenizer(monkeypatch):
    from conftest import comfyui_path

    monkeypatch.setenv("COMFYUI_PATH", str(comfyui_path()))
    host = DiffusersHost.from_single_file(REAL_SD15)  # tokenizer found through COMFYUI_PATH
    assert host.arch == "sd1" and host.prediction_type == "epsilon"
    assert host.load_report["unused_keys"] == {}
    assert sum(p.numel() for p in host.unet.parameters()) == 859_520_964
    ids = host._tokenize(["a cat"])
    assert ids.shape == (1, 1, 77) and ids[0, 0, :4].tolist() == [49406, 320, 2368, 49407]  # [B, chunks, 77]
    with torch.no_grad():
        cond = host.encode_prompts(["pixel art knight"])
        assert cond.context.shape == (1, 77, 768) and torch.isfinite(cond.context).all()
        out = host.predict(torch.randn(1, 4, 8, 8), torch.tensor([500]), cond)
        assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()
        assert torch.isfinite(host.decode_latents(torch.randn(1, 4, 8, 8))).all()


def test_cli_passes_tokenizer_and_prediction_type(tmp_path, monkeypatch, dawnlike_dir, capsys):
    import shutil

    from conceptlab import cli
    from conceptlab.training.lora import train_cli

    sub = tmp_path / "data" / "1_sprite"
    sub.mkdir(parents=True)
    shutil.copy(sorted(dawnlike_dir.glob("*.png"))[0], sub / "a.png")
    _, path, _ = _tiny_single_file(tmp_path)
    cfg = tmp_path / "kohya.toml"
    cfg.write_text(f'pretrained_model_name_or_path = "{path}"\ntrain_data_dir = "{tmp_path / "data"}"\n'
                   f'output_dir = "{tmp_path / "out"}"\nresolution = "64,64"\nmin_bucket_reso = 64\n'
                   'v_parameterization = true\n')
    seen = {}

    class Stop(Exception):  # cli.main turns any exception into exit code 1
        pass

    def fake_host_for(model, device, mp, tokenizer=None, prediction_type=None):
        seen.update(model=model, tokenizer=tokenizer, prediction_type=prediction_type)
        raise Stop

    monkeypatch.setattr(train_cli, "_host_for", fake_host_for)
    assert cli.main(["train", "--config", str(cfg), "--tokenizer", str(tmp_path / "tok")]) == 1, \
        capsys.readouterr().err
    assert seen == {"model": str(path), "tokenizer": str(tmp_path / "tok"), "prediction_type": "v_prediction"}
    assert cli.main(["train", "--config", str(cfg), "--prediction-type", "epsilon"]) == 1
    assert seen["prediction_type"] == "epsilon" and seen["tokenizer"] is None


def test_cli_single_file_against_shipped_configs_fails_clearly(tmp_path):
    from conceptlab.training.lora import train_cli

    _, path, _ = _tiny_single_file(tmp_path)  # tiny weights do not fit the real SD1.5 configs
    with pytest.raises(ValueError, match="does not match the shipped config.*single-file SD 1.x/2.x"):
        train_cli._host_for(str(path), "cpu", "no", tokenizer=str(_write_clip_tokenizer(tmp_path / "tok")))
