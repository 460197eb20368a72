"""Multi-process LoRA training (training/distributed.py) on the CPU with the gloo backend, 2 processes.

* 2 processes × train_batch_size 1 train the same LoRA (to float tolerance) as 1 process with
  gradient_accumulation_steps 2 on the same bucket batches and seed — with caption shuffling/dropout, flips,
  network dropout, noise offset and the text encoder in training, so every random stream is exercised; only
  rank 0 wrote files; the ss_* metadata records the total batch;
* the 2-process epoch-1 state resumes in 1 process (gradient_accumulation_steps 2) to the same final LoRA; a
  resume that changes the total batch is refused with the fix;
* a NaN in one process and a cancel on the main process stop both processes at the same step;
* through the real launcher (``accelerate launch --multi_gpu --num_processes 2 -m conceptlab train``, in
  tests/dist_entry.py; ``--multi_gpu`` with ``--device cpu``): a crash in rank 1 during epoch 2 ends the run with rank 1's error and a non-zero exit;
  epoch 1's files are intact, nothing of epoch 2 was written.

The in-process cases fork the test process (torch and the tiny model are already imported: no start-up cost) and
each child sets the launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) before the CLI runs.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_host

from conceptlab import cli
from conceptlab.formats.safetensors_io import load_state_dict, read_metadata
from conceptlab.training.lora import train_cli

REPO = Path(__file__).resolve().parents[1]
fork_only = pytest.mark.skipif(not hasattr(os, "fork"), reason="the in-process cases fork (POSIX only)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world: int, port: int, argv: list[str], patch, q) -> None:
    """One 'launched' process: the launcher's environment, the CLI with the tiny host; reports rc + writes."""
    try:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        torch.set_num_threads(1)
        from accelerate import PartialState

        PartialState._reset_state()  # a fork inherits the parent's accelerate singleton
        writes: list[str] = []
        real_replace = os.replace

        def logged_replace(src, dst, *a, **k):  # every atomic write of the project ends in os.replace
            writes.append(str(dst))
            return real_replace(src, dst, *a, **k)

        os.replace = logged_replace
        train_cli._host_for = lambda *a, **k: tiny_host()
        if patch is not None:
            patch(rank)
        rc = cli.main(argv)
        q.put((rank, rc, writes, None))
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        q.put((rank, None, [], f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


def launch(world: int, argv: list[str], patch=None, timeout: float = 120) -> dict[int, tuple]:
    """Run ``conceptlab <argv>`` in ``world`` forked processes; ``{rank: (rc, writes, error)}``."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_child, args=(r, world, port, argv, patch, q)) for r in range(world)]
    for p in procs:
        p.start()
    out = {}
    try:
        for _ in procs:
            rank, rc, writes, err = q.get(timeout=timeout)
            out[rank] = (rc, writes, err)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return out


def write_config(tmp: Path, data: Path, out: Path, **extra) -> Path:
    keys = dict(train_data_dir=str(data), output_dir=str(out), output_name="dp", resolution=32,
                enable_bucket=False, resize_interpolation="nearest", caption_extension=".txt",
                shuffle_caption=True, keep_tokens=1, caption_dropout_rate=0.2, flip_aug=True,
                max_train_epochs=2, train_batch_size=1, gradient_accumulation_steps=1, seed=5,
                learning_rate=2e-3, network_dim=4, network_alpha=4, network_dropout=0.2, noise_offset=0.05,
                save_every_n_epochs=1, save_precision="fp32", best_metric="none")
    keys.update(extra)
    path = tmp / f"cfg_{len(list(tmp.glob('cfg_*.toml')))}.toml"
    path.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in keys.items()) + "\n")
    return path


@pytest.fixture
def data(dawnlike_dir, tmp_path) -> Path:
    sub = tmp_path / "data" / "1_sprite"
    sub.mkdir(parents=True)
    for p in sorted(dawnlike_dir.glob("*.png"))[:5]:  # 5 bucket batches: the last round is uneven
        shutil.copy(p, sub / p.name)
        (sub / p.name).with_suffix(".txt").write_text(f"sprite, pixel art, {p.stem.rsplit('_', 1)[0]}, tile")
    return tmp_path / "data"


def _assert_close(a: dict, b: dict, tol: float = 1e-5):
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max() / (b[k].abs().max() + 1e-8)) for k in a)
    assert worst < tol, f"largest relative difference {worst:.2e}"


@fork_only
def test_two_processes_equal_one_process_with_the_same_total_batch_and_resume_across(data, tmp_path, monkeypatch):
    monkeypatch.setattr(train_cli, "_host_for", lambda *a, **k: tiny_host())
    out2, out1, out_r = tmp_path / "two", tmp_path / "one", tmp_path / "resumed"
    res = launch(2, ["train", "--config", str(write_config(tmp_path, data, out2)), "--device", "cpu"])
    assert [res[r][0] for r in (0, 1)] == [0, 0], res
    assert res[1][1] == [], f"rank 1 wrote files: {res[1][1]}"
    assert any(w.endswith("dp.safetensors") for w in res[0][1]) and all(w.startswith(str(out2)) for w in res[0][1])
    # one process, gradient_accumulation_steps 2: the same 2 bucket batches per optimizer step, same draws
    assert cli.main(["train", "--config", str(write_config(tmp_path, data, out1, gradient_accumulation_steps=2)),
                     "--device", "cpu"]) == 0
    two, one = load_state_dict(out2 / "dp.safetensors"), load_state_dict(out1 / "dp.safetensors")
    assert any(float(v.abs().max()) > 0 for k, v in two.items() if "lora_up" in k)  # it trained
    assert any(k.startswith("lora_te") for k in two)  # the text encoder's LoRA too
    _assert_close(two, one)
    _assert_close(load_state_dict(out2 / "dp-000001.safetensors"), load_state_dict(out1 / "dp-000001.safetensors"))
    md2, md1 = read_metadata(out2 / "dp.safetensors"), read_metadata(out1 / "dp.safetensors")
    assert (md2["ss_total_batch_size"], md2["ss_num_processes"], md2["ss_batch_size_per_device"]) == ("2", "2", "1")
    assert md1["ss_total_batch_size"] == "2" and md2["ss_num_batches_per_epoch"] == "3"  # ceil(5 / 2)
    assert md2["ss_steps"] == md1["ss_steps"] == "6"
    # the 2-process state of epoch 1, resumed in 1 process that keeps the total batch, ends where 2 processes did
    state = out2 / "dp-000001-state.json"
    assert json.loads(state.read_text())["num_processes"] == 2
    cfg_r = write_config(tmp_path, data, out_r, gradient_accumulation_steps=2, resume=str(state))
    assert cli.main(["train", "--config", str(cfg_r), "--device", "cpu"]) == 0
    _assert_close(load_state_dict(out_r / "dp.safetensors"), two)
    # a resume that changes the total batch is refused, with the setting that would keep it
    with pytest.raises(ValueError, match=r"total batch of 2 .* set gradient_accumulation_steps = 2"):
        train_cli.run(_args(write_config(tmp_path, data, tmp_path / "bad", resume=str(state))), host=tiny_host())


def _args(config: Path):
    return cli.build_parser("train").parse_args(["train", "--config", str(config), "--device", "cpu"])


def _nan_in_rank_1(rank):
    from conceptlab.training.lora import trainer

    real = trainer.diffusion_loss
    calls = {"n": 0}

    def loss(host, *a, **k):
        value = real(host, *a, **k)
        if rank == 1 and type(host).__name__ != "_DrawOnlyHost":
            calls["n"] += 1
            if calls["n"] == 2:
                return value * float("nan")
        return value

    trainer.diffusion_loss = loss


@fork_only
def test_nan_in_one_process_and_a_cancel_stop_every_process_at_the_same_step(data, tmp_path):
    res = launch(2, ["train", "--config", str(write_config(tmp_path, data, tmp_path / "nan")), "--device", "cpu"],
                 patch=_nan_in_rank_1)
    assert [res[r][0] for r in (0, 1)] == [1, 1], res  # both: TrainingDivergedError (exit 1), same step
    assert not (tmp_path / "nan" / "dp-000001.safetensors").exists()

    def cancel_on_main(rank):
        from conceptlab.training.lora.trainer import LoraTrainer

        real_run = LoraTrainer.run

        def run(self):
            if rank == 0:
                def progress(step, total, info):
                    if step == 4:
                        raise KeyboardInterrupt("cancelled by the user")
                self.progress = progress
            return real_run(self)

        LoraTrainer.run = run

    res = launch(2, ["train", "--config", str(write_config(tmp_path, data, tmp_path / "cancel")), "--device", "cpu"],
                 patch=cancel_on_main)
    assert [res[r][0] for r in (0, 1)] == [130, 130], res  # both interrupted at step 4
    assert (tmp_path / "cancel" / "dp-000001.safetensors").is_file()  # epoch 1 (3 steps) was finished
    assert not (tmp_path / "cancel" / "dp.safetensors").exists()


def test_a_crash_in_one_process_ends_the_launched_run_and_keeps_finished_epochs(tmp_path):
    """The real launcher (torchrun under accelerate launch) on the bundled tiny model and sample data."""
    pytest.importorskip("accelerate")
    out = tmp_path / "out"
    cfg = tmp_path / "gb.toml"
    cfg.write_text("\n".join([
        f'pretrained_model_name_or_path = "{REPO / "sample_data" / "tiny_dawnlike"}"',
        f'train_data_dir = "{REPO / "sample_data" / "gameboy"}"',
        'resolution = 16', 'enable_bucket = false', 'resize_interpolation = "nearest"', 'caption_extension = ".txt"',
        f'output_dir = "{out}"', 'output_name = "gb"', 'max_train_epochs = 3', 'train_batch_size = 8',
        'network_dim = 4', 'network_alpha = 4', 'learning_rate = 1e-3', 'save_every_n_epochs = 1',
        'network_train_unet_only = true', 'best_metric = "none"', 'sample_every_n_epochs = 0']) + "\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", CONCEPTLAB_TEST_FAIL_RANK="1", CONCEPTLAB_TEST_FAIL_STEP="4")
    # accelerate's --cpu launcher starts one process whatever --num_processes says; --multi_gpu starts torchrun's
    # N processes, and --device cpu puts them on the CPU (gloo) even on a machine with GPUs
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(_free_port()), str(Path(__file__).with_name("dist_entry.py")), "train", "--config", str(cfg),
           "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    err = proc.stdout + proc.stderr
    assert proc.returncode != 0, err
    assert "injected failure in process 1" in err, err
    # 48 images with repeats = 6 bucket batches of 8: 3 steps of 2 × 8 per epoch; rank 1 dies at its 4th batch
    # (epoch 2, first step) after rank 0 wrote epoch 1
    first = out / "gb-000001.safetensors"
    assert first.is_file() and (out / "gb-000001-state.json").is_file(), sorted(p.name for p in out.iterdir())
    assert len(load_state_dict(first)) > 0 and read_metadata(first)["ss_total_batch_size"] == "16"
    assert not (out / "gb-000002.safetensors").exists() and not (out / "gb.safetensors").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_launcher_switches_are_honoured_or_refused_by_name(monkeypatch):
    from conceptlab.training.distributed import apply_launcher_settings

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    flat = {}
    assert apply_launcher_settings(flat) == [] and flat == {"mixed_precision": "bf16"}  # fills an unset key
    flat = {"mixed_precision": "fp16"}
    notes = apply_launcher_settings(flat)  # the config wins, with a warning naming both
    assert flat == {"mixed_precision": "fp16"} and "--mixed_precision bf16" in notes[0] and "'fp16'" in notes[0]
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    with pytest.raises(ValueError, match="fp8"):
        apply_launcher_settings({})
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "inductor")
    assert "--dynamo_backend inductor has no effect" in apply_launcher_settings({})[0]
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="FSDP"):
        apply_launcher_settings({})


def test_erase_refuses_a_multi_process_launch(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = tmp_path / "erase.toml"
    cfg.write_text('model = "x"\n[esd]\nconcepts = "a"\n')
    from conceptlab.training.esd import cli as esd_cli

    with pytest.raises(ValueError, match="runs in one process, but the launcher started 2: ESD takes one draw"):
        esd_cli.run(cli.build_parser("erase").parse_args(["erase", "--config", str(cfg)]))


@pytest.mark.parametrize("argv", [
    ["merge", "a.safetensors", "b.safetensors", "-o", "out.safetensors"],
    ["merge-n", "a.safetensors", "b.safetensors", "c.safetensors", "-o", "out.safetensors"],
    ["extract-lora", "a.safetensors", "b.safetensors", "-o", "out.safetensors"],
    ["resize-lora", "a.safetensors", "--rank", "4", "-o", "out.safetensors"],
    ["uce", "--config", "uce.toml", "--output-dir", "out.safetensors"],
    ["erase-convert", "a.safetensors", "out.safetensors", "--model", "m.safetensors"],
    ["quickstart", "--out", "out", "--model", "missing_model", "--data", "missing_data"],
], ids=lambda a: a[0])
def test_one_process_commands_refuse_a_multi_process_launch(monkeypatch, tmp_path, argv):
    """Every command that runs in one process refuses an `accelerate launch` of several (as `erase` does) before it
    reads or writes anything; without a launcher the same command gets past the guard to its own input checks."""
    monkeypatch.chdir(tmp_path)
    args = cli.build_parser(argv[0]).parse_args(argv)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=rf"conceptlab {argv[0]} runs in one process, but the launcher started 2: "):
        args.func(args)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(Exception) as exc_info:  # the inputs do not exist: the command's own error, not the guard's
        args.func(args)
    assert "launcher started" not in str(exc_info.value)
