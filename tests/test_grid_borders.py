"""Blank border stretches (issue 13): cuts no pixel shows, predicted from the visible lattice
(:mod:`conceptlab.metrics.grid_borders`), and the drift fixtures and truth they are scored on
(:func:`conceptlab.metrics.palette_synth.condition_render`, :func:`~conceptlab.metrics.palette_synth.reference_cuts`).
Accuracy over 100 renders per condition is in tests/test_grid_conditions.py; these are the parts, on synthetic
lattices with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from conceptlab.metrics.grid import detect_grid, detect_grid_uniform
from conceptlab.metrics.grid_borders import (BORDER_PX, border_cuts, lattice_through, pool_borders, recount_runs,
                                             width_trend)
from conceptlab.metrics.grid_cuts import AxisFit
from conceptlab.metrics.palette_synth import EDGE_JITTER, condition_render, cuts_match, reference_cuts, warp_cuts


def test_border_cuts_extend_at_the_mean_cell_to_half_a_pixel():
    core = np.array([40.0, 60.0, 80.0])
    out = border_cuts(core, 111, 20.0)
    assert np.allclose(out, [20.0, 40.0, 60.0, 80.0, 100.0])
    # a lattice that would put a cut 0.6 px from the start keeps it (pixel 0 is a cell of its own), 0.4 does not
    assert border_cuts(np.array([20.6, 40.6]), 50, 20.0)[0] == pytest.approx(0.6)
    assert border_cuts(np.array([20.4, 40.4]), 50, 20.0)[0] == pytest.approx(20.4)
    out = border_cuts(np.array([20.4, 40.4]), 50, 20.0)
    assert out.min() > BORDER_PX and out.max() < 50 - BORDER_PX


def test_border_cuts_carry_a_width_trend():
    """Widths growing by 0.5 px per cell from 20 px at the core's centre: the tail continues the growth."""
    core = np.cumsum(np.r_[100.0, 20.0 + 0.5 * (np.arange(1, 6) - 3.0)])  # cells of 19, 19.5, 20, 20.5, 21
    out = border_cuts(core, 400, 20.0, trend=0.5, centre=3.0 - 0.5)
    tail = np.diff(out[out >= core[-1]])
    assert np.allclose(tail[:3], [21.5, 22.0, 22.5])
    assert tail.max() <= 20.0 * 1.2 + 1e-9  # clipped to the mean·(1 + TREND_CLIP)


def test_width_trend_separates_drift_from_independent_widths():
    """Independent ±15 % widths (a random walk of positions): a chance trend passes the test on ≤ 5 % of 200
    lattices; a smooth swing of the cell size (±8 % across 20 cells, edges jittered ±3 %): found ≥ 80 % of the
    time, with the right sign."""
    rng = np.random.default_rng(0)
    false = 0
    for _ in range(200):
        pos = np.cumsum(20.0 * (1 + rng.uniform(-0.15, 0.15, 20)))
        false += width_trend(pos, np.arange(20.0))[1] != 0.0
    assert false <= 10
    hit = 0
    for _ in range(100):
        w = 20.0 * (1 + np.linspace(-0.08, 0.08, 20))
        pos = np.cumsum(w) + 20.0 * rng.uniform(-0.03, 0.03, 20)
        hit += width_trend(pos, np.arange(20.0))[1] > 0
    assert hit >= 80


def test_recount_runs_fixes_a_long_run_counted_at_a_wrong_period():
    """Cells of 20 px; anchors close together at the start, then one flat run of 10 cells (200 px) that a DP at
    an 18 px period spanned with 11: re-read as 10. A run that is no whole number of cells (within 0.3) is kept."""
    pa = np.array([0.0, 20.0, 40.0, 60.0, 80.0, 280.0, 300.0])
    ka = np.array([0.0, 1.0, 2.0, 3.0, 4.0, 15.0, 16.0])
    assert np.array_equal(recount_runs(ka, pa), [0, 1, 2, 3, 4, 14, 15])
    pa2 = pa.copy()
    pa2[5:] += 10.0  # 210 px = 10.5 cells: ambiguous, left to the DP
    assert np.array_equal(recount_runs(ka, pa2), ka)


def _fit(cuts, cell, L):
    f = AxisFit(L, np.asarray(cuts, np.float64), cell)
    return f


def _profile(cuts, L, lo, hi):
    """Boundary-energy profile with unit edges on the cuts in [lo, hi] (the visible art)."""
    p = np.zeros(L + 1)
    for c in cuts:
        if lo <= c <= hi:
            p[int(round(c))] = 1.0
    return p


def test_pool_borders_use_both_axes_mean_cell():
    """x shows 20.5-px cells over 5 cells, y 19.5-px cells over 5 (chance, square cells of 20 px): both blank
    borders are extrapolated at the pooled 20 px; a non-square pair (x 20.5, y 30 px) keeps its own cells."""
    L = 400
    cx = np.r_[np.arange(1, 8) * 20.0, 140.0 + 20.5 * np.arange(1, 6), 242.5 + 21.0 * np.arange(1, 8)]
    cy = np.r_[140.0 - 19.0 * np.arange(6, -1, -1), 140.0 + 19.5 * np.arange(1, 6), 237.5 + 19.0 * np.arange(1, 8)]
    fx, fy = _fit(cx, 20.0, L), _fit(cy, 20.0, L)
    pool_borders([fx, fy], [_profile(cx, L, 140, 243), _profile(cy, L, 140, 238)])
    assert np.allclose(np.diff(fx.cuts[fx.cuts >= 242.5]), 20.0) and np.allclose(np.diff(fy.cuts[fy.cuts <= 140]), 20.0)
    assert np.allclose(fx.cuts[(fx.cuts > 140) & (fx.cuts < 242)], cx[(cx > 140) & (cx < 242)])  # visible: kept
    cy2 = 30.0 * np.arange(1, 13)
    fx, fy = _fit(cx, 20.0, L), _fit(cy2, 30.0, L)
    pool_borders([fx, fy], [_profile(cx, L, 140, 243), _profile(cy2, L, 90, 240)])
    assert np.allclose(np.diff(fy.cuts), 30.0) and np.allclose(np.diff(fx.cuts[fx.cuts >= 242.5]), 20.5)


def test_lattice_through_the_visible_edges_of_a_cropped_frame(dawnlike_dir):
    """A cropped frame holds no whole number of cells: the single-period detector's cell is length / cells, a few
    tenths of a % off; the lattice fitted through the visible edges is within 0.1 %, and the grid's cuts reach
    the blank borders within the strict rule."""
    files = sorted(dawnlike_dir.glob("*.png"))
    errs_u, errs_l, strict = [], [], 0
    for s in range(700, 712):
        r = condition_render("crop", s, files)
        h, w = r.image.shape[:2]
        u = detect_grid_uniform(r.image)
        errs_u.append(abs(u.cell_w / r.cell - 1))
        p = np.r_[0.0, np.abs(np.diff(r.image.astype(np.int64), axis=1)).sum((0, 2)), 0.0]
        lat = lattice_through(p, r.cuts_x, r.cell, w)
        if lat is not None:
            errs_l.append(abs(np.median(np.diff(lat)) / r.cell - 1))
        g = detect_grid(r.image)
        strict += cuts_match(g.cuts_x, r.cuts_x, w, r.cell, r.evidence_x, strict=True)
    assert np.median(errs_l) < 0.001 < np.median(errs_u)
    assert strict >= 11


def test_warp_fixture_is_a_smooth_lattice():
    """``warp``: widths within ±15 % of the mean, neighbouring widths anti-correlated by the edge jitter, and no
    cut farther from the smooth lattice than the jitter — its border cuts are predictable, unlike a random walk."""
    rng = np.random.default_rng(3)
    for _ in range(50):
        c = warp_cuts(rng, 28, 20.0)
        wd = np.diff(c) / 20.0
        assert wd.min() >= 0.85 - 1e-9 and wd.max() <= 1.15 + 1e-9
    # the smooth lattice rebuilt from the same first three draws (amplitude, period, phase), without the jitter
    a, b = np.random.default_rng(4), np.random.default_rng(4)
    c = warp_cuts(a, 28, 20.0)
    amp, period, phase = b.uniform(0.04, 0.09), b.uniform(1.0, 2.0), b.uniform(0.0, 2.0 * np.pi)
    u = (np.arange(28) + 0.5) / 28
    cs = np.cos(2.0 * np.pi * u / period + phase)
    cs -= cs.mean()
    smooth = np.cumsum(20.0 * (1.0 + amp * cs / max(1.0, np.abs(cs).max())))[:-1]
    assert np.abs(c - smooth).max() <= 20.0 * EDGE_JITTER + 1e-9


@pytest.mark.parametrize("condition", ("clean", "crop", "drift", "warp"))
def test_truth_cells_hold_a_pixel_and_reference_is_exact_where_visible(condition, dawnlike_dir):
    """Every truth cut lies in (0.5, L − 0.5] (no border cell without a pixel centre in ``native``), the native
    image matches the render cell by cell, and the reference ceiling passes the lenient rule always."""
    files = sorted(dawnlike_dir.glob("*.png"))
    for s in range(900, 906):
        r = condition_render(condition, s, files)
        h, w = r.image.shape[:2]
        for t, L in ((r.cuts_x, w), (r.cuts_y, h)):
            assert t.size == 0 or (t.min() > 0.5 and t.max() <= L - 0.5)
        assert r.native.shape[:2] == (r.cuts_y.size + 1, r.cuts_x.size + 1)
        if condition in ("clean", "drift", "warp"):  # no noise: every pixel is its cell's colour
            xi = np.searchsorted(r.cuts_x, np.arange(w) + 0.5, side="right")
            yi = np.searchsorted(r.cuts_y, np.arange(h) + 0.5, side="right")
            assert np.array_equal(r.native[yi[:, None], xi[None, :]], r.image)
        for t, e, L in ((r.cuts_x, r.evidence_x, w), (r.cuts_y, r.evidence_y, h)):
            assert cuts_match(reference_cuts(t, e, L, r.cell), t, L, r.cell, e)
