"""Issue 19's smaller merge items: thread budget, progress line vs error line, the output named in write errors,
modelspec labels, SD1 block lists for SDXL, inpainting A with a normal B."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conceptlab.cli import main as cli_main
from conceptlab.formats import safetensors_io as sio
from conceptlab.training.merge import blocks
from conceptlab.training.merge import methods as M
from conceptlab.training.merge import files as MF
from conceptlab.training.merge import pipeline as MP

from test_merge_files import make_sd, write

CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"


def test_thread_budget_never_exceeds_the_cores_the_pipeline_leaves(monkeypatch):
    monkeypatch.setattr(MP, "available_cores", lambda: 2)
    assert MF.thread_budget(3) == 1 and MF.thread_budget(4) == 1
    assert MF.thread_budget(3, memory_bound=True) == 1
    monkeypatch.setattr(MP, "available_cores", lambda: 16)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(8)
        assert MF.thread_budget(3) == 8       # never more than torch's own setting
        assert MF.thread_budget(12) == 4      # 16 cores - 12 pipeline threads
        assert MF.thread_budget(3, memory_bound=True) == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("method", ["ties", "slerp", "train_difference", "dare"])
def test_streaming_merge_runs_its_arithmetic_on_one_thread_on_two_cores(tmp_path, monkeypatch, method):
    a = write(tmp_path, "a.safetensors", make_sd(0))
    b = write(tmp_path, "b.safetensors", make_sd(1))
    c = write(tmp_path, "c.safetensors", make_sd(2))
    monkeypatch.setattr(MP, "available_cores", lambda: 2)
    seen = set()
    real = MF.merge_tensor

    def spy(*args, **kw):
        seen.add(torch.get_num_threads())
        return real(*args, **kw)

    monkeypatch.setattr(MF, "merge_tensor", spy)
    before = torch.get_num_threads()
    MF.merge_checkpoints(a, b, tmp_path / "o.safetensors", c=c, method=method, hash_inputs=False)
    assert seen == {1}
    assert torch.get_num_threads() == before


def test_cli_error_starts_on_its_own_line_after_progress(tmp_path, monkeypatch, capsys):
    a = write(tmp_path, "a.safetensors", make_sd(0))
    b = write(tmp_path, "b.safetensors", make_sd(1))
    real_write = sio.SafetensorsStreamWriter.write
    calls = {"n": 0}

    def failing_write(self, key, tensor):
        calls["n"] += 1
        if calls["n"] == 300:
            raise OSError(28, "No space left on device")
        return real_write(self, key, tensor)

    monkeypatch.setattr(sio.SafetensorsStreamWriter, "write", failing_write)
    rc = cli_main(["merge", str(a), str(b), "-o", str(tmp_path / "o.safetensors")])
    err = capsys.readouterr().err
    assert rc != 0
    assert "tensors)" in err                       # progress was shown ...
    assert "tensors)conceptlab" not in err         # ... and the error is not glued to it
    assert "\nconceptlab merge: error:" in err and "No space left" in err


def _unwritable_dir(tmp_path: Path) -> Path:
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    if os.access(d, os.W_OK):  # root ignores permission bits: use a read-only system folder instead
        d = Path("/sys")
        if not d.is_dir() or os.access(d / "x", os.W_OK):
            pytest.skip("no unwritable folder available to this user")
        try:
            fd = os.open(d / ".conceptlab-probe", os.O_CREAT | os.O_WRONLY, 0o600)
        except OSError:
            return d
        os.close(fd)
        os.unlink(d / ".conceptlab-probe")
        pytest.skip("no unwritable folder available to this user")
    return d


def test_read_only_folder_error_names_the_output(tmp_path, capsys):
    a = write(tmp_path, "a.safetensors", make_sd(0))
    b = write(tmp_path, "b.safetensors", make_sd(1))
    out = _unwritable_dir(tmp_path) / "merged-out.safetensors"
    with pytest.raises(OSError) as exc:
        MF.merge_checkpoints(a, b, out, hash_inputs=False)
    msg = str(exc.value)
    assert str(out) in msg and ".tmp" not in msg
    assert not out.exists()
    rc = cli_main(["merge", str(a), str(b), "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and str(out) in err and ".tmp" not in err


def test_modelspec_labels_sd2_and_flux():
    probe = MF._SD2_V_PROBE
    g = torch.Generator().manual_seed(0)
    v_model = {probe: torch.randn(320, generator=g) * 0.3, CONV_IN: torch.zeros(320, 4, 3, 3)}
    eps_model = {probe: torch.randn(320, generator=g) * 0.01, CONV_IN: torch.zeros(320, 4, 3, 3)}
    assert MF.modelspec_architecture("sd2", MF._Source(v_model)) == ("stable-diffusion-v2-768-v", "v")
    assert MF.modelspec_architecture("sd2", MF._Source(eps_model)) == ("stable-diffusion-v2-512", "epsilon")
    assert MF.modelspec_architecture("sd2", MF._Source({**eps_model, "v_pred": torch.zeros(())}))[0] == \
        "stable-diffusion-v2-768-v"
    dev = {"double_blocks.0.img_attn.qkv.weight": torch.zeros(1), "guidance_in.in_layer.weight": torch.zeros(1)}
    schnell = {"double_blocks.0.img_attn.qkv.weight": torch.zeros(1)}
    assert MF.modelspec_architecture("flux", MF._Source(dev))[0] == "flux-1-dev"
    assert MF.modelspec_architecture("flux", MF._Source(schnell))[0] == "flux-1-schnell"
    assert MF.modelspec_architecture("sd1", MF._Source(schnell))[0] == "stable-diffusion-v1"


def test_modelspec_of_a_is_kept_when_it_has_one(tmp_path):
    sd = make_sd(0)
    p = tmp_path / "a.safetensors"
    save_file(sd, str(p), metadata={"modelspec.architecture": "stable-diffusion-v1/inpainting-like",
                                    "modelspec.prediction_type": "epsilon"})
    b = write(tmp_path, "b.safetensors", make_sd(1))
    out = tmp_path / "o.safetensors"
    MF.merge_checkpoints(p, b, out, hash_inputs=False)
    md = sio.read_metadata(out)
    assert md["modelspec.architecture"] == "stable-diffusion-v1/inpainting-like"
    save_file(sd, str(p), metadata={"modelspec.architecture": "flux-1-dev"})  # another family: not trusted
    MF.merge_checkpoints(p, b, out, hash_inputs=False, overwrite=True)
    assert sio.read_metadata(out)["modelspec.architecture"] == "stable-diffusion-v1"


def test_sd1_block_list_converted_for_sdxl_as_supermerger_does():
    vals = [0.5] + [i / 100 for i in range(25)]  # BASE, IN00..IN11 (0..11), M00 (12), OUT00..OUT11 (13..24)
    with pytest.warns(UserWarning, match="converted for SDXL"):
        bw = blocks.parse_block_weights(",".join(str(v) for v in vals), "sdxl", 0.5)
    assert bw.values["BASE"] == 0.5
    assert [bw.values[f"IN{i:02d}"] for i in range(9)] == [i / 100 for i in range(9)]
    assert bw.values["M00"] == 0.12
    assert [bw.values[f"OUT{i:02d}"] for i in range(9)] == [(13 + i) / 100 for i in range(9)]
    assert len(bw.as_list()) == 20
    with pytest.raises(ValueError, match="20 values"):
        blocks.parse_block_weights(",".join(["0.1"] * 23), "sdxl")


def test_inpainting_a_with_normal_b_merges_the_first_four_channels(tmp_path):
    g = torch.Generator().manual_seed(3)
    sa, sb = make_sd(0), make_sd(1)
    sa[CONV_IN] = torch.randn(2, 9, 3, 3, generator=g)
    sb[CONV_IN] = torch.randn(2, 4, 3, 3, generator=g)
    a, b = write(tmp_path, "a.safetensors", sa), write(tmp_path, "b.safetensors", sb)
    out = tmp_path / "o.safetensors"
    rep = MF.merge_checkpoints(a, b, out, alpha=0.25, dtype="fp32", hash_inputs=False)
    got = load_file(str(out))[CONV_IN]
    assert got.shape == (2, 9, 3, 3)
    assert torch.allclose(got[:, :4], torch.lerp(sa[CONV_IN][:, :4], sb[CONV_IN], 0.25), atol=1e-6)
    assert torch.equal(got[:, 4:], sa[CONV_IN][:, 4:])
    assert rep.input_channels_merged == [CONV_IN] and "first 4 merged" in rep.summary()
    # in memory: the same
    sd, _ = MF.merge_state_dicts(sa, sb, alpha=0.25, dtype="fp32")
    assert torch.equal(sd[CONV_IN], got)
    # the other way round (normal A, inpainting B) is refused with the reason, as A1111 does
    with pytest.raises(ValueError, match="must be A"):
        MF.merge_checkpoints(b, a, tmp_path / "o2.safetensors", hash_inputs=False)


def test_hash_cache_reuses_digests_of_unchanged_inputs_only(tmp_path, monkeypatch):
    monkeypatch.setenv("CONCEPTLAB_HASH_CACHE", str(tmp_path / "cache" / "sha256.json"))
    a = write(tmp_path, "a.safetensors", make_sd(0))
    b = write(tmp_path, "b.safetensors", make_sd(1))
    hashed = []
    real = MF._PreadSafetensors.__init__

    def spy(self, wf, hash_file=False):
        hashed.append((wf.path.name, hash_file))
        real(self, wf, hash_file=hash_file)

    monkeypatch.setattr(MF._PreadSafetensors, "__init__", spy)
    MF.merge_checkpoints(a, b, tmp_path / "o1.safetensors")
    assert hashed == [("a.safetensors", True), ("b.safetensors", True)]
    hashed.clear()
    MF.merge_checkpoints(a, b, tmp_path / "o2.safetensors")       # same inputs: no hashing at all
    assert hashed == [("a.safetensors", False), ("b.safetensors", False)]
    r1, r2 = MF.read_recipe(tmp_path / "o1.safetensors"), MF.read_recipe(tmp_path / "o2.safetensors")
    assert r1["inputs"] == r2["inputs"]
    assert r2["inputs"]["A"]["sha256"] == sio.sha256_file(a)
    # B replaced by another file: hashed again, and the recipe has the new digest
    (tmp_path / "b.safetensors").unlink()
    b = write(tmp_path, "b.safetensors", make_sd(5))
    hashed.clear()
    MF.merge_checkpoints(a, b, tmp_path / "o3.safetensors")
    assert hashed == [("a.safetensors", False), ("b.safetensors", True)]
    assert MF.read_recipe(tmp_path / "o3.safetensors")["inputs"]["B"]["sha256"] == sio.sha256_file(b)
    # the cache can be switched off per merge
    hashed.clear()
    MF.merge_checkpoints(a, b, tmp_path / "o4.safetensors", hash_cache=False)
    assert hashed == [("a.safetensors", True), ("b.safetensors", True)]


def test_ties_trim_keeps_exactly_k_with_ties_in_memory_order():
    tau = torch.tensor([1.0, -1.0, 1.0, 0.5, 1.0])
    assert torch.equal(M.trim_top_k(tau, 0.4), torch.tensor([1.0, -1.0, 0.0, 0.0, 0.0]))
    assert torch.equal(M.trim_top_k(tau, 0.8), torch.tensor([1.0, -1.0, 1.0, 0.0, 1.0]))
    g = torch.Generator().manual_seed(0)
    big = (torch.randn(1000, generator=g) * 8).round()       # many equal magnitudes
    kept = M.trim_top_k(big, 0.3)
    assert int((kept != 0).sum()) == 300                       # exactly round(density * n), ties included
    assert big.abs()[kept == 0].max() <= kept.abs()[kept != 0].min()


@pytest.mark.parametrize("method", ["ties", "dare"])
def test_compute_heavy_methods_spread_keys_over_workers_with_the_same_bits(tmp_path, monkeypatch, method):
    """Several keys computed at once on worker threads (one torch thread each): the file is bit-identical to the
    in-memory merge, and a worker's error stops the merge and leaves no file."""
    sds = [make_sd(i) for i in range(3)]
    a, b, c = (write(tmp_path, f"{n}.safetensors", sd) for n, sd in zip("abc", sds))
    monkeypatch.setattr(MP, "available_cores", lambda: 3)
    names = set()
    real = MF.merge_tensor

    def spy(*args, **kw):
        import threading

        names.add(threading.current_thread().name.split("_")[0])
        return real(*args, **kw)

    monkeypatch.setattr(MF, "merge_tensor", spy)
    out = tmp_path / "o.safetensors"
    MF.merge_checkpoints(a, b, out, c=c, method=method, hash_inputs=False)
    assert names == {"merge-compute"}
    ref = MF.merge_state_dicts(sds[0], sds[1], c=sds[2], method=method)[0]
    got = load_file(out)
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)

    def boom(*args, **kw):
        raise RuntimeError("worker failed")

    monkeypatch.setattr(MF, "merge_tensor", boom)
    with pytest.raises(RuntimeError, match="worker failed"):
        MF.merge_checkpoints(a, b, tmp_path / "p.safetensors", c=c, method=method, hash_inputs=False)
    assert not (tmp_path / "p.safetensors").exists() and not list(tmp_path.glob(".p.safetensors*"))
