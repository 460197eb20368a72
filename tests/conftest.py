"""Shared test fixtures. Tests run on CPU with tiny models built in the test; nothing is downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CONCEPTLAB_SHARED_DATA", REPO.parent / "shared" / "data"))
DAWNLIKE = SHARED_DATA / "dawnlike" / "sprites"


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread_per_worker():
    """pytest-xdist runs one worker per core; torch's own thread pool on top of that oversubscribes the CPU."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def dawnlike_dir() -> Path:
    """The DawnLike sprite folder beside the repo (../shared/data/dawnlike/sprites); skip if absent."""
    if not DAWNLIKE.is_dir():
        pytest.skip(f"real sprite data not found at {DAWNLIKE}")
    return DAWNLIKE


def comfyui_path() -> Path | None:
    p = os.environ.get("COMFYUI_PATH")
    return Path(p) if p and Path(p, "comfy").is_dir() else None


requires_comfyui = pytest.mark.skipif(
    comfyui_path() is None, reason="real-ComfyUI tier: set COMFYUI_PATH to a ComfyUI checkout to run"
)
