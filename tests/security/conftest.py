"""Fixtures for the security suite: a stand-in ``folder_paths`` (ComfyUI's path module) over temporary input /
output / models folders, so node classes run without a server or a ComfyUI checkout."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture
def comfy_dirs(tmp_path, monkeypatch):
    """``{"input", "output", "models", "outside"}`` folders; a fake ``folder_paths`` module points at them.

    ``outside`` stands for the rest of the machine: nothing a node does may touch it.
    """
    dirs = {k: tmp_path / k for k in ("input", "output", "models", "outside")}
    for d in dirs.values():
        d.mkdir()
    (dirs["models"] / "loras").mkdir()
    (dirs["models"] / "checkpoints").mkdir()
    (dirs["outside"] / "secret.txt").write_text("TOP SECRET")
    fp = types.ModuleType("folder_paths")
    fp.get_input_directory = lambda: str(dirs["input"])
    fp.get_output_directory = lambda: str(dirs["output"])

    def get_full_path(folder, name):
        p = dirs["models"] / folder / name
        return str(p) if p.is_file() else None

    def get_filename_list(folder):
        base = dirs["models"] / folder
        return sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file()) if base.is_dir() else []

    fp.get_full_path = get_full_path
    fp.get_filename_list = get_filename_list
    fp.add_model_folder_path = lambda *a, **k: None
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    return dirs


def write_png(path: Path, size=(16, 16), color=(200, 40, 40)) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), color, np.uint8)).save(path)
    return path


def make_kohya_folder(root: Path, n: int = 2) -> Path:
    """``root/2_style/img{i}.png`` + ``.txt`` captions; returns ``root``."""
    for i in range(n):
        write_png(root / "2_style" / f"img{i}.png", color=(40 * i, 80, 120))
        (root / "2_style" / f"img{i}.txt").write_text(f"style, red, item {i}")
    return root


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """``{relative path: (size, mtime_ns)}`` of every file below ``folder`` (symlinks not followed)."""
    out = {}
    for p in folder.rglob("*"):
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            out[str(p.relative_to(folder))] = (st.st_size, st.st_mtime_ns)
    return out
