"""ComfyUI adapters, one module per capability.

Each module defines V1 node classes (INPUT_TYPES / RETURN_TYPES / FUNCTION) plus its own
``NODE_CLASS_MAPPINGS`` and ``NODE_DISPLAY_NAME_MAPPINGS``; this file merges them. Node modules import
ComfyUI (``comfy``, ``folder_paths``) only inside functions, through the bridge modules (:mod:`.comfy_io`,
:mod:`.comfy_host`, :mod:`.comfy_patchers`), so that the classes import without ComfyUI and CI can check their
contracts.
"""

import os
from importlib import import_module

_MODULES = ("palette", "captions", "diff", "merge", "merge_n", "lora", "graph_dataset", "esd", "extract", "uce")

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}

for _name in _MODULES:
    _mod = import_module(f".{_name}", __name__)
    for _node_id, _cls in getattr(_mod, "NODE_CLASS_MAPPINGS", {}).items():
        if _node_id in NODE_CLASS_MAPPINGS:
            raise RuntimeError(f"duplicate node id {_node_id} in nodes/{_name}.py")
        NODE_CLASS_MAPPINGS[_node_id] = _cls
    NODE_DISPLAY_NAME_MAPPINGS.update(getattr(_mod, "NODE_DISPLAY_NAME_MAPPINGS", {}))



def _register_output_model_folders() -> None:
    """Make files our nodes write to ``output/loras`` and ``output/checkpoints`` appear in LoraLoader's and
    CheckpointLoaderSimple's lists (ComfyUI only lists ``models/`` by default). No-op outside ComfyUI."""
    try:
        import folder_paths  # ComfyUI
    except ImportError:
        return
    out = folder_paths.get_output_directory()
    for kind in ("loras", "checkpoints"):
        path = os.path.join(out, kind)
        os.makedirs(path, exist_ok=True)
        folder_paths.add_model_folder_path(kind, path)


_register_output_model_folders()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
