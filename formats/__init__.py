"""File formats and key maps shared by ``training`` and ``metrics``: safetensors streaming, LDM/diffusers/kohya
names, SD block ids, architecture detection. Never imports ComfyUI."""
