"""Grid masks for ESD (training/esd/masks.py)."""

import pytest
import torch

from conceptlab.training.esd.masks import (default_mask_weights, grid_masks, mask_preview, masked_mse,
                                       normalize_weights, parse_weights, prepare_masks)


@pytest.mark.parametrize("h,w,n", [(64, 64, 3), (7, 5, 3), (9, 13, 4), (8, 8, 1), (64, 96, 5)])
def test_grid_cells_tile_the_latent_exactly(h, w, n):
    masks, names = grid_masks(h, w, n, centre_size=0.5)
    assert masks.shape == (n * n + 1, h, w)
    assert names[-1] == "centre" and len(set(names)) == len(names)
    cells = masks[: n * n]
    assert torch.equal(cells.sum(0), torch.ones(h, w)), "every latent cell belongs to exactly one grid cell"
    assert ((cells == 0) | (cells == 1)).all()
    assert (cells.flatten(1).sum(1) > 0).all()


def test_centre_mask_size_and_position():
    masks, _ = grid_masks(64, 64, 3, centre_size=0.25)
    centre = masks[-1]
    ys, xs = centre.nonzero(as_tuple=True)
    assert centre.sum() == 16 * 16
    assert ys.min() == 24 and ys.max() == 39 and xs.min() == 24 and xs.max() == 39
    no_centre, names = grid_masks(64, 64, 3, centre_size=0)
    assert no_centre.shape[0] == 9 and "centre" not in names


def test_default_weights_normalise_and_favour_centre_and_small_masks():
    masks, names = grid_masks(48, 48, 3, 0.5)
    w = default_mask_weights(masks)
    assert w.shape == (10,)
    assert torch.isclose(w.sum(), torch.tensor(1.0))
    assert (w > 0).all()
    centre_cell, corner = w[names.index("r1c1")], w[names.index("r0c0")]
    assert centre_cell > w[names.index("r0c1")] > corner, "closer to the centre weighs more"
    # same position (centre), larger area -> smaller weight
    assert centre_cell > w[names.index("centre")]


def test_user_weights_normalise_and_bad_weights_raise():
    masks, _ = grid_masks(16, 16, 2, 0)
    w = normalize_weights([1, 1, 2, 4], masks)
    assert torch.allclose(w, torch.tensor([0.125, 0.125, 0.25, 0.5]))
    with pytest.raises(ValueError, match="4 masks"):
        normalize_weights([1, 2], masks)
    with pytest.raises(ValueError):
        normalize_weights([1, -1, 1, 1], masks)
    with pytest.raises(ValueError, match="sum to 0"):
        normalize_weights([0, 0, 0, 0], masks)
    assert parse_weights("1, 2 3\n4") == [1.0, 2.0, 3.0, 4.0]
    assert parse_weights("  ") is None
    with pytest.raises(ValueError, match="abc"):
        parse_weights("1, abc")


def test_prepare_masks_resizes_pixel_masks_and_rejects_bad_ones():
    pix, _ = grid_masks(512, 512, 3, 0.5)
    lat = prepare_masks(pix, (64, 64))
    assert lat.shape == (10, 64, 64)
    # area-averaged: cell masks still sum to one everywhere
    assert torch.allclose(lat[:9].sum(0), torch.ones(64, 64), atol=1e-5)
    with pytest.raises(ValueError, match="aspect ratio"):
        prepare_masks(torch.ones(2, 64, 32), (64, 64))
    with pytest.raises(ValueError, match="non-empty"):
        prepare_masks(torch.zeros(0, 64, 64), (64, 64))
    with pytest.raises(ValueError, match="empty"):
        prepare_masks(torch.zeros(1, 64, 64), (64, 64))
    bad = torch.ones(1, 8, 8)
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        prepare_masks(bad, (8, 8))
    assert prepare_masks(torch.ones(8, 8), (8, 8)).shape == (1, 8, 8)


def test_masked_mse_is_the_mean_over_the_mask():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 6, 6, generator=g), torch.randn(2, 4, 6, 6, generator=g)
    mask = torch.zeros(6, 6)
    mask[1:4, 2:5] = 1
    expected = ((pred - target) ** 2)[:, :, 1:4, 2:5].mean()
    assert torch.allclose(masked_mse(pred, target, mask), expected)
    assert torch.allclose(masked_mse(pred, target, None), ((pred - target) ** 2).mean())
    assert torch.allclose(masked_mse(pred, target, torch.ones(6, 6)), ((pred - target) ** 2).mean())


def test_mask_preview_is_an_rgb_picture():
    masks, names = grid_masks(12, 12, 3, 0.5)
    img = mask_preview(masks, default_mask_weights(masks), names, cell=32)
    assert img.ndim == 3 and img.shape[2] == 3 and img.dtype.name == "uint8"
    assert img.shape[1] > 5 * 32
