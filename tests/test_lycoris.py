"""LyCORIS LoHa / LoKr (``network_module = "lycoris.kohya"``) through the lycoris-lora package: training on the
tiny model, LyCORIS key names and kohya metadata in the file, exact state round trip, and (real-ComfyUI tier)
ComfyUI loading every key of the file with ComfyUI's own ΔW equal to ours."""

from __future__ import annotations

import re
import shutil

import pytest
import torch
from tiny_models import tiny_host

pytest.importorskip("lycoris", reason="lycoris-lora is not installed")

from conceptlab.formats.safetensors_io import load_state_dict, read_metadata  # noqa: E402
from conceptlab.training.lora.dataset import KohyaDataset
from conceptlab.training.lora.dataset_options import DatasetOptions  # noqa: E402
from conceptlab.training.lora.build import build_network_and_groups  # noqa: E402
from conceptlab.training.lora.config import TrainConfig  # noqa: E402
from conceptlab.training.lora.trainer import LoraTrainer  # noqa: E402
from conftest import requires_comfyui  # noqa: E402

OPTS = dict(resolution=64, min_bucket_reso=64, max_bucket_reso=128, resize_interpolation="nearest")


@pytest.mark.parametrize("algo,keys", [("loha", {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}),
                                       ("lokr", {"lokr_w1", "alpha"})])
def test_lycoris_trains_and_writes_lycoris_keys(algo, keys, dawnlike_dir, tmp_path):
    sub = tmp_path / "ds" / "1_sprite"
    sub.mkdir(parents=True)
    for p in sorted(dawnlike_dir.glob("*.png"))[:4]:
        shutil.copy(p, sub / p.name)
    ds = KohyaDataset.scan(tmp_path / "ds", DatasetOptions(**OPTS))
    cfg, _ = TrainConfig.from_mapping(dict(output_dir=str(tmp_path / "o"), output_name=algo, max_train_epochs=1,
                                           train_batch_size=2, learning_rate=5e-3, network_dim=4, network_alpha=2,
                                           network_module="lycoris.kohya", save_precision="fp32",
                                           network_args=[f"algo={algo}", "conv_dim=2", "conv_alpha=1"],
                                           network_train_unet_only=True))
    res = LoraTrainer(tiny_host(), ds, cfg).run()
    sd = load_state_dict(res.final_path)
    names = {k.split(".", 1)[0] for k in sd}
    assert names and all(n.startswith("lora_unet_") for n in names)
    assert all(keys <= {k.split(".", 1)[1] for k in sd if k.startswith(n + ".")} for n in names)
    assert any(re.search(r"resnets_\d+_conv1$", n) for n in names)  # conv_dim reached the 3x3 convs
    md = read_metadata(res.final_path)
    assert md["ss_network_module"] == "lycoris.kohya" and '"algo": "loha"' in md["ss_network_args"] or algo != "loha"
    # the file holds exactly the network's tensors, and they moved from the init
    net = res.network
    own = net.kohya_state_dict()
    assert set(own) == set(sd)
    for k, v in own.items():
        torch.testing.assert_close(sd[k], v)
    h = tiny_host()
    fresh, _ = build_network_and_groups(h, cfg, True, False)
    fresh.load_kohya_state_dict(sd)
    for name, d in fresh.loras.items():
        torch.testing.assert_close(d.delta(), net.loras[name].delta())
    assert max(float(d.delta().abs().max()) for d in net.loras.values()) > 0


def test_lycoris_settings_are_checked():
    with pytest.raises(ValueError, match="algo 'dylora'"):
        TrainConfig.from_mapping({"network_module": "lycoris.kohya", "network_args": ["algo=dylora"]})
    with pytest.raises(ValueError, match="'dora_wd'"):
        TrainConfig.from_mapping({"network_module": "lycoris.kohya", "network_args": ["algo=loha", "dora_wd=1"]})


@requires_comfyui
@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_comfyui_loads_every_key_of_our_lycoris_file(algo, tmp_path):
    """The SD1.5 UNet layout (meta device): ComfyUI's key map loads every module and its ΔW equals ours."""
    from test_formats_comfyui import _comfy_key, _comfy_python, _run_probe, _unet_shapes

    from conceptlab.formats import ldm_keys
    from conceptlab.training.lora.lycoris_net import LycorisNetwork, save_lycoris_file

    py = _comfy_python()
    if py is None:
        pytest.skip("no Python interpreter here can import ComfyUI (set COMFYUI_PYTHON)")
    unet, shapes = _unet_shapes("sd1")
    mods = {n: m for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}

    class Host:
        arch = "sd1"

        def components(self):
            return ["unet"]

        def modules(self, comp):
            return mods

    net = LycorisNetwork.create_lycoris(Host(), {"algo": algo, "conv_dim": "4", "conv_alpha": "2", "factor": "8"},
                                        network_dim=8, network_alpha=4, seed=1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for d in net.loras.values():
            for p in d.lyco.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    path = save_lycoris_file(tmp_path / f"{algo}.safetensors", net, {"ss_network_module": "lycoris.kohya"},
                             torch.float32)
    d2l = ldm_keys.diffusers_to_ldm_unet("sd1")
    picks = [n for n in net.loras if re.search(r"(attn2_to_k|proj_in|resnets_0_conv1)$", n)][:6]
    compare_ldm = ["model.diffusion_model." + d2l[net.targets[n].path + ".weight"] for n in picks]
    res, comfy_d = _run_probe(py, tmp_path, path, shapes, [], {}, [_comfy_key(k) for k in compare_ldm])
    assert res["not_loaded"] == []
    assert res["n_patched"] == len(net.loras)
    for n, lk in zip(picks, compare_ldm):
        torch.testing.assert_close(comfy_d[_comfy_key(lk)], net.loras[n].delta().detach().float(), rtol=1e-4,
                                   atol=1e-6)
