"""ComfyUI nodes for this capability (filled in by its issue)."""

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
