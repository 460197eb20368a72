"""Concept Lab: a ComfyUI node pack for LoRA training, ESD concept erasure, checkpoint merging,
weight-diff analysis and pixel-art palette metrics.

ComfyUI imports this file as ``custom_nodes/<folder>/__init__.py`` and reads ``NODE_CLASS_MAPPINGS`` /
``NODE_DISPLAY_NAME_MAPPINGS``. The same tree installs as the ``conceptlab`` package (``pip install -e .``);
the core (``training/``, ``metrics/``, ``formats/``) never imports ComfyUI. The node mappings are loaded lazily
so that ``import conceptlab`` (CLI, tests) stays light.
"""

__version__ = "0.1.0"

# Served by ComfyUI at /extensions/<pack folder>/; holds the node help pages the frontend's node library opens
# (docs/<NodeId>.md, translations in docs/<NodeId>/<locale>.md) and the registry icon. No JavaScript.
WEB_DIRECTORY = "./web"


def __getattr__(name):
    if name in ("NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"):
        from . import nodes as _nodes

        return getattr(_nodes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "__version__"]
