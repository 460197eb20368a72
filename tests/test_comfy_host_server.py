"""Server tier smoke test of the e2e infrastructure: ComfyUI starts with this pack from a temp base dir, lists
the pack's nodes, and runs a core text-to-image workflow on the cached random SD1.5 checkpoint."""

from __future__ import annotations

import pytest
from conftest import requires_comfyui
from e2e.fixtures import comfy_server, sd15_checkpoint  # noqa: F401  (pytest fixtures)
from e2e.server import ComfyError, txt2img_prompt


@requires_comfyui
@pytest.mark.slow
def test_server_loads_pack_and_runs_workflow(comfy_server, sd15_checkpoint):  # noqa: F811
    assert comfy_server.import_failures() == []
    info = comfy_server.object_info()
    ours = [k for k in info if k.startswith("ConceptLab")]
    assert ours, "no ConceptLab nodes registered"
    assert all(info[k]["category"].startswith("Concept Lab/") for k in ours)
    assert sd15_checkpoint in info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    entry = comfy_server.run(txt2img_prompt(sd15_checkpoint), timeout=900)
    files = comfy_server.output_files(entry)
    assert len(files) == 1 and files[0].is_file() and files[0].stat().st_size > 0
    assert str(files[0].resolve()).startswith(str(comfy_server.output_dir.resolve()))
    bad = txt2img_prompt(sd15_checkpoint)
    bad["1"]["inputs"]["ckpt_name"] = "does_not_exist.safetensors"
    with pytest.raises(ComfyError):
        comfy_server.run(bad, timeout=60)
