"""Pytest fixtures for the real-ComfyUI server tier. Import them into a test module:

    from e2e.fixtures import comfy_server, sd15_checkpoint  # noqa: F401  (pytest fixtures)

``comfy_server`` (session): a running :class:`e2e.server.ComfyServer` (skipped without COMFYUI_PATH).
``sd15_checkpoint`` (session): name of the cached random SD1.5 checkpoint inside the server's
``models/checkpoints`` (built once, ~2.1 GB, see :mod:`e2e.checkpoint`).
"""

from __future__ import annotations

import os

import pytest

from .checkpoint import random_sd15_checkpoint
from .server import start_comfy_server


@pytest.fixture(scope="session")
def comfy_server():
    if not os.environ.get("COMFYUI_PATH"):
        pytest.skip("real-ComfyUI tier: set COMFYUI_PATH to a ComfyUI checkout to run")
    server = start_comfy_server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def sd15_checkpoint(comfy_server) -> str:
    return comfy_server.add_model("checkpoints", random_sd15_checkpoint())
