"""Real ComfyUI, a Flux.1-shaped file: ComfyUI's own diffusion-model loader (what UNETLoader calls) detects the
cached random 1-double + 1-single-block file (tests/e2e/flux_checkpoint.py) as Flux.1-dev at full width, stored fp8
(UNETLoader ``weight_dtype`` fp8_e4m3fn, the setting people use for Flux on consumer GPUs); ComfyHost trains kohya
``lora_flux`` LoRA modules on it through ComfyUI's ``model_sampling`` and weight wrappers; the LoRA, saved under
kohya's names, loads through ComfyUI's LoRA loader with zero "lora key not loaded".

Text encoders are not loaded (see flux_checkpoint.py: ComfyUI's Flux T5 is always the 4.76 B-parameter XXL);
conditioning tensors of Flux's shapes stand in. Needs COMFYUI_PATH and ~4 GB of free memory.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _mem_available_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return 0.0


pytestmark = [
    pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="real-ComfyUI tier: set COMFYUI_PATH"),
    pytest.mark.skipif(_mem_available_gib() < 4, reason="the Flux-shaped file tier needs ~4 GB of free memory"),
]


@pytest.fixture(scope="module")
def flux_file_model():
    from e2e.comfy_env import comfy_inprocess
    from e2e.flux_checkpoint import random_flux_unet

    path = random_flux_unet()
    comfy_inprocess()
    import comfy.sd

    with torch.inference_mode():  # UNETLoader.load_unet(name, "fp8_e4m3fn")
        model = comfy.sd.load_diffusion_model(str(path), model_options={"dtype": torch.float8_e4m3fn})
    yield model
    import comfy.model_management as mm

    mm.unload_all_models()


def test_flux_file_detected_and_lora_trains_and_loads(flux_file_model, tmp_path):
    import comfy.lora
    import comfy.model_base
    import comfy.sd
    import safetensors.torch

    from conceptlab.nodes.comfy_host import ComfyHost
    from conceptlab.training.conditioning import Conditioning
    from conceptlab.training.flow import noisy_input, velocity_target
    from conceptlab.training.lora.network import LoRADelta, _kohya_name

    model = flux_file_model
    base = model.model
    assert isinstance(base, comfy.model_base.Flux) and type(base.model_config).__name__ == "Flux"
    p = base.diffusion_model.params
    assert (p.hidden_size, p.num_heads, p.context_in_dim, p.depth, p.depth_single_blocks) == (3072, 24, 4096, 1, 1)
    assert base.diffusion_model.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn

    with torch.inference_mode():
        host = ComfyHost(model)
    try:
        assert host.arch == "flux" and host.prediction_type == "flow" and host.dtype == torch.float32
        # kohya lora_flux targets of the blocks (networks/lora_flux.py: double/single block Linear layers)
        paths = [k for k in host.modules("unet") if k.startswith(("double_blocks.", "single_blocks."))]
        assert "double_blocks.0.img_attn.qkv" in paths and "single_blocks.0.linear1" in paths
        g = torch.Generator().manual_seed(0)
        deltas = {}
        with torch.inference_mode(False):
            for path in paths:
                w = host.modules("unet")[path].weight
                d = LoRADelta(tuple(w.shape), 4, 4.0)
                with torch.no_grad():
                    d.lora_up.normal_(0, 0.01, generator=g)
                host.install_delta("unet", path, "weight", d)
                deltas[path] = d
            cond = Conditioning(torch.randn(1, 8, 4096, generator=g), torch.randn(1, 768, generator=g),
                                {"guidance": torch.tensor([3.5])})
            x0 = torch.randn(1, 16, 8, 8, generator=g)
            eps = torch.randn(1, 16, 8, 8, generator=g)
            sig = torch.tensor([0.6])
            params = [q for d in deltas.values() for q in d.parameters()]
            opt = torch.optim.AdamW(params, lr=1e-3)
            losses = []
            for _ in range(2):
                loss = torch.nn.functional.mse_loss(host.predict(noisy_input(x0, eps, sig), sig, cond).float(),
                                                    velocity_target(x0, eps))
                loss.backward()
                assert all(torch.isfinite(q.grad).all() for q in params)
                assert deltas["double_blocks.0.txt_attn.qkv"].lora_down.grad.abs().sum() > 0
                opt.step()
                opt.zero_grad()
                losses.append(float(loss.detach()))
            assert all(torch.isfinite(torch.tensor(losses)))
        # kohya file: <name>.lora_down.weight / .lora_up.weight / .alpha under kohya lora_flux names
        sd = {}
        for path, d in deltas.items():
            name = _kohya_name("unet", path, host)
            down, up, alpha = d.kohya_tensors()
            sd[f"{name}.lora_down.weight"] = down.half()
            sd[f"{name}.lora_up.weight"] = up.half()
            sd[f"{name}.alpha"] = torch.tensor(alpha)
        assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in sd
        assert "lora_unet_single_blocks_0_linear1.alpha" in sd
        f = tmp_path / "flux_lora.safetensors"
        safetensors.torch.save_file(sd, str(f), metadata={"ss_base_model_version": "flux1"})
    finally:
        host.close()

    records: list[str] = []

    class _Grab(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    h = _Grab(level=logging.DEBUG)
    logging.getLogger().addHandler(h)
    try:
        with torch.inference_mode():
            lora = comfy.utils.load_torch_file(str(f), safe_load=True)
            patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    finally:
        logging.getLogger().removeHandler(h)
    assert not [r for r in records if "lora key not loaded" in r], records[:5]
    assert len(patched.patches) == len(deltas)
