"""Run inside a Python that can import ComfyUI (used by tests/test_formats_comfyui.py through a subprocess).

Usage: python formats_comfy_probe.py REQUEST.json RESULT.json

REQUEST: {"comfyui": path, "lora": file, "unet_shapes": {ldm key: shape}, "clip_keys": [ComfyUI CLIP keys],
          "compare": [ComfyUI model keys], "deltas_out": file}
RESULT: {"not_loaded": [...], "patched": [...], "unet_config": {...}}; ComfyUI's own ΔW (calculate_weight applied
to a zero weight, strength 1) for the "compare" keys is written to deltas_out (safetensors).
Only ComfyUI's key map and weight math are used: comfy.model_detection.detect_unet_config,
comfy.lora.model_lora_keys_unet / model_lora_keys_clip / load_lora / calculate_weight.
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
    import comfy.model_detection

    ldm = {k: torch.empty(tuple(s), device="meta") for k, s in req["unet_shapes"].items()}
    unet_config = comfy.model_detection.detect_unet_config(ldm, "")
    full = {"diffusion_model." + k: v for k, v in ldm.items()}

    class _Cfg:
        pass

    class _Model:
        model_config = _Cfg()

        def state_dict(self):
            return full

    _Model.model_config.unet_config = unet_config
    clip_sd = {k: None for k in req["clip_keys"]}

    class _Clip:
        def state_dict(self):
            return clip_sd

    key_map = comfy.lora.model_lora_keys_unet(_Model(), {})
    key_map = comfy.lora.model_lora_keys_clip(_Clip(), key_map)

    lora = load_file(req["lora"])
    messages = []

    class _H(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = _H()
    logging.getLogger().addHandler(handler)
    patches = comfy.lora.load_lora(lora, key_map)
    logging.getLogger().removeHandler(handler)
    not_loaded = [m[len("lora key not loaded: "):] for m in messages if m.startswith("lora key not loaded")]

    out = {}
    for key in req.get("compare", []):
        if key not in patches:
            continue
        shape = req["unet_shapes"].get(key[len("diffusion_model."):]) if key.startswith("diffusion_model.") \
            else req["clip_shapes"][key]
        w = torch.zeros(tuple(shape), dtype=torch.float32)
        out[key] = comfy.lora.calculate_weight([(1.0, patches[key], 1.0, None, None)], w, key).contiguous()
    if out:
        save_file(out, req["deltas_out"])
    json.dump({"not_loaded": not_loaded, "patched": sorted(patches), "n_patched": len(patches),
               "unet_config": {k: v for k, v in unet_config.items() if isinstance(v, (int, float, str, list))}},
              open(out_path, "w"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
