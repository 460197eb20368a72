"""Real-ComfyUI test infrastructure (tier 3): in-process helpers and a headless server fixture.

Use only from tests marked ``requires_comfyui`` (COMFYUI_PATH set). See ``comfy_env`` (in-process tiny models)
and ``server`` (a ``--cpu`` ComfyUI server on 127.0.0.1 with this pack in a temporary base directory).
"""
