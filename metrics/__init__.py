"""Things that measure: palette and caption metrics, weight diff. Never imports ComfyUI or ``training``."""
