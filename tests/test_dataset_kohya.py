"""Kohya dataset layout, buckets, image preparation (nearest, alpha), batches, latent cache, bad inputs."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conceptlab.training.lora.captions import CaptionConfig
from conceptlab.training.lora.buckets import BucketManager, make_bucket_resolutions, prepare_image
from conceptlab.training.lora.dataset import KohyaDataset
from conceptlab.training.lora.dataset_options import DatasetError, DatasetOptions

OPTS64 = dict(resolution=64, min_bucket_reso=64, max_bucket_reso=128, resize_interpolation="nearest")


def sprite_folder(dawnlike_dir: Path, root: Path, n: int = 6, repeats: int = 3, name: str = "dawnlike",
                  captions: bool = True) -> Path:
    sub = root / f"{repeats}_{name}"
    sub.mkdir(parents=True)
    for p in sorted(dawnlike_dir.glob("*.png"))[:n]:
        shutil.copy(p, sub / p.name)
        if captions:
            (sub / p.name).with_suffix(".txt").write_text(f"pixel art, {p.stem.rsplit('_', 1)[0]}, dawnlike\n")
    return root


def test_layout_captions_repeats_and_warnings(dawnlike_dir, tmp_path):
    root = sprite_folder(dawnlike_dir, tmp_path / "ds", n=4, repeats=3)
    sub2 = root / "2_hero"
    sub2.mkdir()
    Image.new("RGB", (32, 48), (200, 10, 10)).save(sub2 / "red.jpg")
    Image.new("RGB", (48, 32), (10, 200, 10)).save(sub2 / "green.webp")
    (sub2 / "green.txt").write_text("green thing")
    (root / "no_prefix").mkdir()
    Image.new("RGB", (16, 16)).save(root / "no_prefix" / "x.png")
    ds = KohyaDataset.scan(root, DatasetOptions(**OPTS64))
    assert ds.num_train_images == 4 * 3 + 2 * 2
    caps = {e.path.name: (e.caption, e.caption_from_file) for e in ds.entries}
    assert caps["red.jpg"] == ("hero", False)  # class token when the caption file is missing
    assert caps["green.webp"] == ("green thing", True)
    assert any("ignore directory without repeats: no_prefix" in w for w in ds.warnings)
    assert any("No caption file" in w for w in ds.warnings)
    assert ds.tag_frequency["3_dawnlike"]["pixel art"] == 4
    s = ds.summary(batch_size=2)
    assert s["steps_per_epoch"] == ds.num_batches(2) and "64x64" in s["buckets"]
    assert "3_dawnlike" in ds.summary_text(2, 4)


def test_bad_inputs(tmp_path, dawnlike_dir):
    with pytest.raises(FileNotFoundError):
        KohyaDataset.scan(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="<repeats>_<name>"):
        KohyaDataset.scan(empty, DatasetOptions(**OPTS64))
    loose = tmp_path / "loose"
    loose.mkdir()
    Image.new("RGB", (16, 16)).save(loose / "a.png")
    with pytest.raises(DatasetError, match="10_loose"):
        KohyaDataset.scan(loose, DatasetOptions(**OPTS64))
    noimg = tmp_path / "noimg"
    (noimg / "5_x").mkdir(parents=True)
    (noimg / "5_x" / "a.txt").write_text("caption only")
    with pytest.raises(DatasetError, match="no training images"):
        KohyaDataset.scan(noimg, DatasetOptions(**OPTS64))
    bad = sprite_folder(dawnlike_dir, tmp_path / "bad", n=2)
    (bad / "3_dawnlike" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(DatasetError, match="broken.png"):
        KohyaDataset.scan(bad, DatasetOptions(**OPTS64))
    # a folder that is itself named <repeats>_<name> with images inside is one subset
    direct = sprite_folder(dawnlike_dir, tmp_path / "direct", n=2, repeats=4)
    ds = KohyaDataset.scan(direct / "4_dawnlike", DatasetOptions(**OPTS64))
    assert ds.num_train_images == 8
    with pytest.raises(ValueError, match="min_bucket_reso"):
        DatasetOptions(resolution=64).validate()


def test_bucket_resolutions_follow_kohya_rules():
    resos = make_bucket_resolutions((512, 512), 256, 1024, 64)
    assert (512, 512) in resos
    for w, h in resos:
        assert w % 64 == 0 and h % 64 == 0 and 256 <= min(w, h) and max(w, h) <= 1024
        assert w * h <= 512 * 512
        assert (h, w) in resos
    bm = BucketManager(DatasetOptions(resolution=512).validate())
    for size in [(512, 768), (1000, 300), (333, 333), (640, 480)]:
        reso, resized, err = bm.select(*size)
        ar = size[0] / size[1]
        assert reso in resos
        assert abs(err) == pytest.approx(min(abs(w / h - ar) for w, h in resos))
        assert resized[0] >= reso[0] and resized[1] >= reso[1]  # scaled to cover, then cropped
        assert min(resized[0] - reso[0], resized[1] - reso[1]) <= 1
    nu = BucketManager(DatasetOptions(resolution=512, bucket_no_upscale=True).validate())
    assert nu.select(100, 70) == ((64, 64), (100, 70), pytest.approx(1 - 100 / 70))
    reso, resized, _ = nu.select(2000, 1000)
    assert resized[0] * resized[1] <= 512 * 512 * 1.01 and reso[0] % 64 == 0 and reso[0] <= resized[0]


def test_nearest_upscale_keeps_pixels_and_alpha_composites_on_background(dawnlike_dir, tmp_path):
    src = sorted(dawnlike_dir.glob("*.png"))[0]
    im = Image.open(src).convert("RGBA")
    arr = np.asarray(im)
    t = prepare_image(src, (64, 64), (64, 64), "nearest", background=(255, 0, 255))
    up = ((t.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
    blocks = up.reshape(16, 4, 16, 4, 3)
    assert (blocks == blocks[:, :1, :, :1, :]).all()  # every 4x4 block is one source pixel
    small = blocks[:, 0, :, 0, :]
    opaque = arr[..., 3] == 255
    assert (small[opaque] == arr[..., :3][opaque]).all()
    assert (small[arr[..., 3] == 0] == [255, 0, 255]).all()
    smooth = prepare_image(src, (64, 64), (64, 64), "lanczos")
    colours = lambda x: len(np.unique(((x.permute(1, 2, 0).numpy() + 1) * 127.5).round().reshape(-1, 3), axis=0))
    assert colours(t) <= len(np.unique(arr.reshape(-1, 4), axis=0)) < colours(smooth)


def test_epoch_batches_are_kohya_buckets(tmp_path):
    root = tmp_path / "ds"
    sub = root / "3_mix"
    sub.mkdir(parents=True)
    for i in range(5):
        Image.new("RGB", (64, 64), (i * 40, 0, 0)).save(sub / f"sq{i}.png")
    for i in range(2):
        Image.new("RGB", (192, 64), (0, i * 90, 0)).save(sub / f"wide{i}.png")
    ds = KohyaDataset.scan(root, DatasetOptions(resolution=128, min_bucket_reso=64, max_bucket_reso=256))
    assert {e.bucket_reso for e in ds.entries} == {(128, 128), (192, 64)}
    b1 = ds.epoch_batches(1, 4, seed=0)
    assert b1 == ds.epoch_batches(1, 4, seed=0) and b1 != ds.epoch_batches(2, 4, seed=0)
    assert len(b1) == ds.num_batches(4) == math.ceil(15 / 4) + math.ceil(6 / 4)
    flat = [i for b in b1 for i in b]
    assert sorted(flat) == sorted(list(range(7)) * 3)
    for b in b1:
        assert len({ds.entries[i].bucket_reso for i in b}) == 1


def test_validation_split_and_latent_disk_cache(dawnlike_dir, tmp_path):
    root = sprite_folder(dawnlike_dir, tmp_path / "ds", n=8, repeats=2)
    opts = DatasetOptions(**OPTS64, validation_split=0.25, cache_latents_to_disk=True, flip_aug=True)
    ds = KohyaDataset.scan(root, opts, CaptionConfig(), seed=3)
    assert len(ds.entries) == 6 and len(ds.val_entries) == 2
    assert not {e.path for e in ds.entries} & {e.path for e in ds.val_entries}
    calls = []

    def encode(pix):
        calls.append(pix.shape[0])
        return torch.nn.functional.avg_pool2d(pix, 8)[:, :3].repeat(1, 2, 1, 1)[:, :4]

    ds.cache_latents(encode, vae_key="k1")
    assert sum(calls) == 16  # 8 images + their mirrors
    assert all(e.latents.shape == (4, 8, 8) for e in ds.entries + ds.val_entries)
    assert torch.allclose(ds.entries[0].latents_flipped, ds.entries[0].latents.flip(-1))
    again = KohyaDataset.scan(root, opts, CaptionConfig(), seed=3)
    calls.clear()
    again.cache_latents(encode, vae_key="k1")
    assert calls == []  # read back from the disk cache
    assert torch.equal(again.entries[0].latents, ds.entries[0].latents)
    again.release_latents()
    again.cache_latents(encode, vae_key="other-vae")
    assert sum(calls) == 16  # a different VAE invalidates the cache
