"""Run inside a Python that can import ComfyUI (used by tests/test_flux_files.py through a subprocess).

Usage: python flux_comfy_probe.py REQUEST.json RESULT.json

REQUEST: {"comfyui": path, "unet_config": {"depth", "depth_single_blocks", "hidden_size"}, "shapes": {BFL key:
          shape}, "loras": {name: file}, "deltas_out": prefix}
RESULT: {"flux_to_diffusers": {diffusers key: [BFL key, row offset, rows, swapped]}, "model_keys": [...],
         "loras": {name: {"not_loaded": [...], "patched": [...]}}}; ComfyUI's ΔW of each LoRA (calculate_weight on
         zero weights, strength 1) is written to ``<deltas_out><name>.safetensors``.
Only ComfyUI's own code is used: comfy.utils.flux_to_diffusers, comfy.lora.model_lora_keys_unet (Flux branch, on a
model object of class comfy.model_base.Flux), load_lora and calculate_weight, and comfy.ldm.flux.model.Flux for the
module tree.
"""

import json
import logging
import sys


def main(req_path: str, out_path: str) -> int:
    req = json.load(open(req_path))
    sys.path.insert(0, req["comfyui"])
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import torch
    from safetensors.torch import load_file, save_file

    import comfy.lora
    import comfy.model_base
    import comfy.utils

    cfg = req["unet_config"]
    f2d = comfy.utils.flux_to_diffusers(cfg, output_prefix="")
    table = {}
    for dk, v in f2d.items():
        if isinstance(v, str):
            table[dk] = [v, None, None, False]
        elif v[1] is None:
            table[dk] = [v[0], None, None, True]  # (key, None, swap_scale_shift)
        else:
            table[dk] = [v[0], v[1][1], v[1][2], False]

    # ComfyUI's own Flux module tree at this width (the model class the loader builds)
    from comfy.ldm.flux.model import Flux

    h = cfg["hidden_size"]
    with torch.device("meta"):
        net = Flux(in_channels=16, out_channels=16, vec_in_dim=24, context_in_dim=32, hidden_size=h, mlp_ratio=4.0,
                   num_heads=4, depth=cfg["depth"], depth_single_blocks=cfg["depth_single_blocks"],
                   axes_dim=[4, 6, 6], theta=10000, patch_size=1, qkv_bias=True, guidance_embed=True,
                   image_model=None, dtype=torch.float32, device="meta", operations=comfy.ops.disable_weight_init)
    sd = {"diffusion_model." + k: v for k, v in net.state_dict().items()}
    linears = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)]

    class _Cfg:
        unet_config = dict(cfg)

    class _FakeFlux(comfy.model_base.Flux):
        def __init__(self):  # no model: the key map only needs the class, the config and the state-dict keys
            pass

        def state_dict(self, *a, **k):
            return sd

    model = _FakeFlux()
    object.__setattr__(model, "model_config", _Cfg())
    key_map = comfy.lora.model_lora_keys_unet(model, {})

    loras = {}
    for name, path in req["loras"].items():
        messages = []

        class _H(logging.Handler):
            def emit(self, record):
                messages.append(record.getMessage())

        handler = _H()
        logging.getLogger().addHandler(handler)
        patches = comfy.lora.load_lora(load_file(path), key_map)
        logging.getLogger().removeHandler(handler)
        out = {}
        for k, p in patches.items():  # as ModelPatcher.add_patches unpacks (key, offset[, function]) keys
            key, offset, function = (k[0], k[1], k[2] if len(k) > 2 else None) if isinstance(k, tuple) \
                else (k, None, None)
            w = out.get(key)
            if w is None:
                w = torch.zeros(tuple(sd[key].shape), dtype=torch.float32)
            out[key] = comfy.lora.calculate_weight([(1.0, p, 1.0, offset, function)], w, key).contiguous()
        loras[name] = {"not_loaded": [m for m in messages if m.startswith("lora key not loaded")],
                       "patched": sorted(out)}
        save_file(out, req["deltas_out"] + name + ".safetensors")
    json.dump({"flux_to_diffusers": table, "model_keys": {k: list(v.shape) for k, v in sd.items()},
               "linears": linears, "loras": loras}, open(out_path, "w"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
