"""Issue 18 faults: cancel at random moments, a full disk (fault-injecting writer), the same output_name twice and
concurrent runs — every file left is complete and loadable, or absent; nothing is overwritten silently."""

from __future__ import annotations

import errno
import random
import sys
import threading
from pathlib import Path

import pytest
import torch

from conceptlab.formats.safetensors_io import load_state_dict
from conceptlab.nodes import policy
from conceptlab.training.lora.dataset import KohyaDataset
from conceptlab.training.lora.dataset_options import DatasetOptions
from conceptlab.training.lora.config import TrainConfig
from conceptlab.training.lora.trainer import LoraTrainer

from .conftest import make_kohya_folder

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import tiny_host  # noqa: E402


class Cancel(Exception):
    """Stands for ComfyUI's InterruptProcessingException."""


def _dataset(tmp_path):
    make_kohya_folder(tmp_path / "ds", n=2)
    return KohyaDataset.scan(tmp_path / "ds", DatasetOptions(resolution=64, enable_bucket=False,
                                                             resize_interpolation="nearest"))


def _cfg(out: Path, **kw) -> TrainConfig:
    base = dict(output_dir=str(out), output_name="run", max_train_epochs=2, train_batch_size=2, learning_rate=1e-3,
                network_dim=2, network_alpha=2, network_train_unet_only=True, seed=3, sample_prompts=None,
                save_every_n_epochs=1)
    base.update(kw)
    return TrainConfig(**base)


def _assert_all_files_complete(folder: Path):
    assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp")], "temporary files left behind"
    for p in folder.rglob("*.safetensors"):
        assert load_state_dict(p), p  # every file left loads


def test_cancel_at_random_moments_leaves_only_complete_files(tmp_path, monkeypatch):
    """Cancel at a random training step, and cancel in the middle of writing a checkpoint."""
    import safetensors.torch as st

    ds = _dataset(tmp_path)
    host = tiny_host()
    stop_at = random.Random(18).randint(2, 4)  # 2 epochs × 2 steps (2 images × 2 repeats / batch 2)
    out = tmp_path / "out_step"

    def progress(step, total_steps, info):
        if step >= stop_at:
            raise Cancel

    with pytest.raises(Cancel):
        LoraTrainer(host, ds, _cfg(out), progress=progress).run()
    _assert_all_files_complete(out)
    assert len(list(out.glob("run-??????.safetensors"))) == (stop_at - 1) // 2  # epochs saved before the cancel

    real = st.save_file

    def cancelled_mid_write(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 3])
        raise Cancel  # the interrupt lands while the file is half written

    monkeypatch.setattr(st, "save_file", cancelled_mid_write)
    out = tmp_path / "out_write"
    with pytest.raises(Cancel):
        LoraTrainer(host, ds, _cfg(out, max_train_epochs=1)).run()
    _assert_all_files_complete(out)
    assert not list(out.glob("*.safetensors"))


def test_full_disk_gives_clear_error_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    import safetensors.torch as st

    real = st.save_file

    def filling_disk(tensors, filename, metadata=None):
        if Path(filename).name.startswith(".run.safetensors."):  # the last epoch's file hits a full disk half-way
            real(tensors, filename, metadata=metadata)
            data = Path(filename).read_bytes()
            Path(filename).write_bytes(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(st, "save_file", filling_disk)
    out = tmp_path / "out"
    with pytest.raises(OSError) as ei:
        LoraTrainer(tiny_host(), _dataset(tmp_path), _cfg(out)).run()
    assert ei.value.errno == errno.ENOSPC and "No space left" in str(ei.value)
    _assert_all_files_complete(out)
    assert (out / "run-000001.safetensors").is_file()
    assert not (out / "run.safetensors").exists()


def test_same_output_name_twice_is_numbered_not_overwritten(tmp_path, caplog):
    loras, states = tmp_path / "loras", tmp_path / "states"
    loras.mkdir()
    name, d = policy.reserve_run_name(loras, states, "style")
    assert name == "style" and d.is_dir()
    (loras / "style-000001.safetensors").write_bytes(b"first run")
    name2, d2 = policy.reserve_run_name(loras, states, "style")
    assert name2 == "style_2" and d2 != d
    assert "taken" in caplog.text
    (loras / "other.safetensors").write_bytes(b"someone else's LoRA")
    assert policy.reserve_run_name(loras, states, "other")[0] == "other_2"
    assert policy.reserve_run_name(loras, states, "style", resume=True)[0] == "style"  # resume continues it
    assert (loras / "style-000001.safetensors").read_bytes() == b"first run"


def test_concurrent_runs_never_share_a_name(tmp_path):
    from conceptlab.nodes.esd import _next_free

    loras, states = tmp_path / "loras", tmp_path / "states"
    loras.mkdir()
    names, files, barrier = [], [], threading.Barrier(8)

    def claim():
        barrier.wait()
        names.append(policy.reserve_run_name(loras, states, "same")[0])
        files.append(_next_free(loras, "erased", claim_root=tmp_path / "esd"))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(names)) == 8 and len(set(files)) == 8


def test_merge_cancel_and_full_disk_leave_no_partial_file(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from conceptlab.formats.safetensors_io import SafetensorsStreamWriter

    out = tmp_path / "merged.safetensors"
    specs = {f"w{i}": (torch.float32, (64, 64)) for i in range(4)}
    with pytest.raises(Cancel):
        with SafetensorsStreamWriter(out, specs) as w:
            w.write("w0", torch.zeros(64, 64))
            raise Cancel
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))
    save_file({"w": torch.ones(2)}, str(out))
    before = out.read_bytes()
    import conceptlab.formats.safetensors_io as sio

    real_open = open

    class FullFile:
        def __init__(self, fh):
            self.fh, self.n = fh, 0

        def write(self, b):
            self.n += len(b)
            if self.n > 10_000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.fh.write(b)

        def __getattr__(self, k):
            return getattr(self.fh, k)

    monkeypatch.setattr(sio, "open", lambda *a, **k: FullFile(real_open(*a, **k)), raising=False)
    with pytest.raises(OSError, match="No space"):
        with SafetensorsStreamWriter(out, specs, overwrite=True) as w:
            for i in range(4):
                w.write(f"w{i}", torch.zeros(64, 64))
    assert out.read_bytes() == before and not list(tmp_path.glob(".*.tmp"))


def test_network_size_is_counted_before_allocation(tmp_path, monkeypatch):
    from conceptlab.formats import limits
    from conceptlab.nodes.lora import _check_network_size
    from conceptlab.training.lora.network import LoRANetwork

    host, ds = tiny_host(), _dataset(tmp_path)
    cfg = _cfg(tmp_path / "o", network_dim=8, conv_dim=4, conv_alpha=1)
    tr = LoraTrainer(host, ds, cfg)
    n = _check_network_size(host, cfg, tr)
    net = LoRANetwork.create(host, network_dim=8, network_alpha=2, conv_dim=4, conv_alpha=1, train_unet=True,
                             train_text_encoder=False)
    assert n == sum(p.numel() for g in net.parameter_groups().values() for p in g)  # the estimate is exact
    monkeypatch.setattr(limits, "MAX_NETWORK_PARAMS", n - 1)
    with pytest.raises(limits.LimitError, match="network_dim"):
        _check_network_size(host, cfg, tr)
