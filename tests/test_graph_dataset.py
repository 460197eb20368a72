"""Datasets from images in the graph equal the folder dataset on the same images and captions: entries, buckets,
repeats, validation split, batches per epoch, processed captions with a seed, prepared pixels (alpha included).
Real-ComfyUI tier: core's Load Image Dataset from Folder output feeds the node."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from conftest import requires_comfyui
from PIL import Image

from conceptlab.nodes import graph_dataset as G
from conceptlab.training.lora.captions import CaptionConfig, process_caption
from conceptlab.training.lora.dataset import KohyaDataset
from conceptlab.training.lora.dataset_options import DatasetOptions
from conceptlab.training.lora.graph_dataset import match_captions, to_uint8_rgb, write_kohya_folder

SIZES = [(64, 48), (40, 80), (96, 96), (50, 30), (72, 64), (64, 64)]
CAPTIONS = ["red, square, pixel art", "blue, tall", "", "green, wide, tree, sky", "sprite, knight, sword",
            "sprite, cat"]
OPTS = dict(resolution=64, enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32,
            bucket_no_upscale=False,
            resize_interpolation="nearest", background="#102030", validation_split=0.34, flip_aug=False)
CAPS = dict(shuffle_caption=True, keep_tokens=1, caption_tag_dropout_rate=0.3, caption_dropout_rate=0.1,
            caption_prefix="style")


def _images():
    rng = np.random.default_rng(0)
    out = []
    for i, (w, h) in enumerate(SIZES):
        a = rng.integers(0, 256, (h, w, 4 if i == 1 else 3), dtype=np.uint8)
        if i == 1:  # transparent image: alpha 0 / 128 / 255 stripes
            a[..., 3] = np.array([0, 128, 255], dtype=np.uint8)[np.arange(w) % 3][None, :]
        out.append(a)
    return out


def _folder(tmp_path, imgs):
    sub = tmp_path / "folder" / "3_things"
    sub.mkdir(parents=True)
    for i, a in enumerate(imgs):
        name = chr(ord("a") + i)  # sorted like the input order
        Image.fromarray(a).save(sub / f"{name}.png")
        if CAPTIONS[i]:
            (sub / f"{name}.txt").write_text(CAPTIONS[i], encoding="utf-8")
    return tmp_path / "folder"


def _as_comfy(a):
    """What ComfyUI's LoadImage gives for a file: IMAGE row (RGB / 255) and MASK (1 - alpha)."""
    img = torch.from_numpy(a[..., :3].astype(np.float32) / 255.0)
    mask = torch.from_numpy(1.0 - a[..., 3].astype(np.float32) / 255.0) if a.shape[-1] == 4 else None
    return img, mask


def _assert_same(ds_a, ds_b):
    assert len(ds_a.entries) == len(ds_b.entries) and len(ds_a.val_entries) == len(ds_b.val_entries)
    for ea, eb in zip(ds_a.entries + ds_a.val_entries, ds_b.entries + ds_b.val_entries):
        assert (ea.size, ea.bucket_reso, ea.resized_size, ea.repeats, ea.caption, ea.caption_from_file, ea.subset) \
            == (eb.size, eb.bucket_reso, eb.resized_size, eb.repeats, eb.caption, eb.caption_from_file, eb.subset)
        assert torch.equal(ds_a.load_image(ea), ds_b.load_image(eb))
    assert ds_a.tag_frequency == ds_b.tag_frequency and ds_a.bucket_counts() == ds_b.bucket_counts()
    for epoch in (1, 2, 3):
        assert ds_a.epoch_batches(epoch, 2, seed=7) == ds_b.epoch_batches(epoch, 2, seed=7)
        ra, rb = random.Random(11 + epoch), random.Random(11 + epoch)
        pa = [process_caption(e.caption, ds_a.captions, ra, epoch) for e in ds_a.entries]
        pb = [process_caption(e.caption, ds_b.captions, rb, epoch) for e in ds_b.entries]
        assert pa == pb
    def lines(ds):  # the summary, less the root path and file names in caption previews
        return [ln for ln in ds.summary_text(2).replace(str(ds.root), "R").splitlines() if ".png" not in ln]

    assert lines(ds_a) == lines(ds_b)


def test_graph_dataset_equals_folder_dataset(tmp_path):
    imgs = _images()
    folder = _folder(tmp_path, imgs)
    opts, caps = DatasetOptions.from_mapping(OPTS), CaptionConfig.from_mapping(CAPS)
    ds_f = KohyaDataset.scan(folder, opts, caps)
    arrays = [to_uint8_rgb(*_as_comfy(a)) for a in imgs]
    root = write_kohya_folder(tmp_path / "tmp", arrays, CAPTIONS, repeats=3, name="things")
    ds_g = KohyaDataset.scan(root, opts, caps)
    assert ds_g.val_entries and len({e.bucket_reso for e in ds_g.entries}) > 1  # the test exercises both
    assert any(not e.caption_from_file for e in ds_g.entries + ds_g.val_entries)
    _assert_same(ds_f, ds_g)
    # same inputs -> same folder (the latent cache next to it is reused); other captions -> another folder
    assert write_kohya_folder(tmp_path / "tmp", arrays, CAPTIONS, repeats=3, name="things") == root
    assert write_kohya_folder(tmp_path / "tmp", arrays, CAPTIONS[::-1], repeats=3, name="things") != root


def test_rgba_image_keeps_its_alpha_and_a_mask_wins():
    a = np.zeros((2, 2, 4), np.float32)
    a[..., 3] = [[1.0, 0.0], [0.5, 1.0]]
    out = to_uint8_rgb(a)
    assert out.shape == (2, 2, 4) and out[0, 1, 3] == 0 and out[1, 0, 3] == 128
    assert (to_uint8_rgb(a, np.zeros((2, 2)))[..., 3] == 255).all()
    with pytest.raises(ValueError, match="does not match"):
        to_uint8_rgb(a, np.zeros((3, 2)))


def test_match_captions():
    assert match_captions("a\nb\n\n", 2) == ["a", "b"]
    assert match_captions("one for all", 3) == ["one for all"] * 3
    assert match_captions(["x", "y"], 2) == ["x", "y"]
    assert match_captions(["x\ny"], 2) == ["x", "y"]
    assert match_captions(None, 2) == ["", ""]
    with pytest.raises(ValueError, match="3 captions for 2 images"):
        match_captions("a\nb\nc", 2)


def _node_kwargs(**over):
    from conceptlab.nodes.lora import _caption_inputs, _dataset_inputs

    kw = {k: [v[1].get("default")] for k, v in {**_dataset_inputs(), **_caption_inputs()}.items()
          if k not in ("folder", "caption_extension")}
    kw.update({k: [v] for k, v in {**OPTS, **CAPS}.items()})
    kw.update({k: [v] for k, v in over.items()})
    return kw


def test_node_takes_a_list_of_images_and_masks(tmp_path, monkeypatch):
    from conceptlab.nodes import lora as L

    monkeypatch.setattr(G, "_temp_dir", lambda: tmp_path / "temp")
    imgs = _images()
    comfy = [_as_comfy(a) for a in imgs]
    ones = [torch.zeros(im.shape[:2]) if m is None else m for im, m in comfy]  # MASK 0 = opaque
    spec = G.ConceptLabLoraDatasetFromImages.INPUT_TYPES()
    assert all(o.get("tooltip") for _, (t, o) in {**spec["required"], **spec["optional"]}.items())
    with torch.inference_mode():
        ds, summary, audit = G.ConceptLabLoraDatasetFromImages().load(
            images=[im[None] for im, _ in comfy], captions=["\n".join(CAPTIONS)], repeats=[3],
            class_token=["things"], mask=[m[None] for m in ones], **_node_kwargs(min_bucket_reso=64))
    folder = _folder(tmp_path, imgs)  # the node's widgets start at 64 px buckets
    ds_f = KohyaDataset.scan(folder, DatasetOptions.from_mapping({**OPTS, "min_bucket_reso": 64}),
                             CaptionConfig.from_mapping(CAPS))
    _assert_same(ds_f, ds)
    assert "things" in summary and isinstance(audit, str)
    assert isinstance(ds, KohyaDataset) and L.DATASET_TYPE == G.ConceptLabLoraDatasetFromImages.RETURN_TYPES[0]
    with pytest.raises(ValueError, match="2 masks for 6 images"):
        G.ConceptLabLoraDatasetFromImages().load(images=[im[None] for im, _ in comfy], captions=[""],
                                                 repeats=[1], class_token=["x"], mask=[ones[0][None], ones[1][None]],
                                                 **_node_kwargs(min_bucket_reso=64))


# ------------------------------------------------------------------------------------------------ real ComfyUI
@requires_comfyui
def test_core_load_image_dataset_output_feeds_the_node(tmp_path):
    from e2e.comfy_env import comfy_inprocess

    comfy_inprocess()
    import folder_paths
    from comfy_extras.nodes_train import LoadImageSetFromFolderNode

    from conceptlab.nodes import lora as L

    inp = tmp_path / "input"
    sub = inp / "set"
    sub.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(sub / f"im{i}.png")
    folder_paths.set_input_directory(str(inp))
    folder_paths.set_temp_directory(str(tmp_path / "temp"))
    assert "set" in LoadImageSetFromFolderNode.INPUT_TYPES()["required"]["folder"][0]
    batch = LoadImageSetFromFolderNode().load_images("set", "None")[0]
    order = [f for f in os.listdir(sub) if f.endswith(".png")]  # core reads the folder in directory order
    caps = [f"tag{f[2]}, sprite" for f in order]
    with torch.inference_mode():
        ds_g = G.ConceptLabLoraDatasetFromImages().load(images=[batch], captions=["\n".join(caps)], repeats=[2],
                                                        class_token=["set"], **_node_kwargs(validation_split=0.0, min_bucket_reso=64))[0]
    kohya = inp / "kohya" / "2_set"
    kohya.mkdir(parents=True)
    for j, f in enumerate(order):  # the same files as a kohya folder, named in core's order
        os.link(sub / f, kohya / f"{j:02d}.png")
        (kohya / f"{j:02d}.txt").write_text(caps[j])
    opts = {k: v[0] for k, v in _node_kwargs(validation_split=0.0, min_bucket_reso=64).items()}
    ds_f = L.ConceptLabLoraDataset().load("kohya", caption_extension=".txt", **opts)[0]
    _assert_same(ds_f, ds_g)
