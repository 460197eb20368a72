"""Issue 13: grid detection on renders the way diffusion models draw them — drifting cells, cropped frames,
soft upscales, noise-only / JPEG-only — each condition over 100 generated renders with known per-line truth
(:func:`conceptlab.metrics.palette_synth.condition_render`: DawnLike sprites, CC-BY 4.0 DawnBringer, and
programmatic sprites). "Exact" = :func:`~conceptlab.metrics.palette_synth.cuts_match` on both axes.

Seeds 1000+ are used here; the detector's constants were tuned on seeds 0–40 (tests must not grade the tuning set).
"""

from __future__ import annotations

import numpy as np
import pytest

from conceptlab.metrics.grid import LOW_CONFIDENCE, detect_grid
from conceptlab.metrics.grid_cuts import MIN_CELL_PX
from conceptlab.metrics.palette_synth import condition_render, cuts_match

N = 100
SEED0 = 1000
_CACHE: dict = {}


def _run(condition: str, files) -> list[tuple]:
    """``[(render, grid, exact)]`` for N renders of ``condition`` (cached per session and worker)."""
    if condition not in _CACHE:
        out = []
        for s in range(SEED0, SEED0 + N):
            r = condition_render(condition, s, files)
            img = r.image[..., :3] if r.image.shape[2] == 4 else r.image
            g = detect_grid(img)
            h, w = img.shape[:2]
            exact = g.ok and cuts_match(g.cuts_x, r.cuts_x, w, r.cell, r.evidence_x) and \
                cuts_match(g.cuts_y, r.cuts_y, h, r.cell, r.evidence_y)
            out.append((r, g, exact))
        _CACHE[condition] = out
    return _CACHE[condition]


@pytest.fixture(scope="module")
def files(dawnlike_dir):
    return sorted(dawnlike_dir.glob("*.png"))


def _rate(rows) -> float:
    return sum(e for _, _, e in rows) / len(rows)


@pytest.mark.parametrize("condition", ["clean", "noise", "jpeg", "crop", "degraded", "touching"])
def test_nearest_neighbour_conditions_95pct_exact(condition, files):
    """≥ 95 % exact on each nearest-neighbour condition: clean, noise only (no finer-grid harmonics), JPEG only,
    frames cropped 2–10 px on every side (partial border cells), blur+noise+JPEG, subject over the frame edge."""
    rows = _run(condition, files)
    assert _rate(rows) >= 0.95, f"{condition}: {_rate(rows):.0%} exact"


@pytest.mark.xfail(strict=True, reason="issue 13 target (95 %) not reached: 83–88 % measured on ±15 % drift — "
                                       "cut counts over long flat stretches and weak single edges (see README)")
def test_drift_95pct_exact(files):
    rows = _run("drift", files)
    assert _rate(rows) >= 0.95, f"drift: {_rate(rows):.0%} exact"


def test_drift_follows_cuts(files):
    """Drifting cells (±15 % per cell) are followed cut by cut, far better than one period can (the uniform
    detector scores ≈ 0 % here): ≥ 75 %, and the cut sequence is reported (cells of different widths)."""
    rows = _run("drift", files)
    assert _rate(rows) >= 0.75, f"drift: {_rate(rows):.0%} exact"
    widths = [np.diff(g.cuts_x) for _, g, e in rows if e]
    assert np.mean([w.std() / w.mean() for w in widths]) > 0.04  # not a uniform grid


@pytest.mark.parametrize("condition", ["bilinear", "lanczos"])
@pytest.mark.xfail(strict=True, reason="issue 13 target (90 %) not reached on soft upscales: bilinear ≈ 80 %, "
                                       "Lanczos ≈ 15 % measured (see README)")
def test_soft_upscales_90pct_exact(condition, files):
    rows = _run(condition, files)
    assert _rate(rows) >= 0.90, f"{condition}: {_rate(rows):.0%} exact"


def test_bilinear_soft_edges_detected(files):
    """Bilinear upscales (kinks at cell centres, no sharp edge): most grids found exactly (the uniform detector
    found 0 %), and the soft edge model is the one chosen."""
    rows = _run("bilinear", files)
    assert _rate(rows) >= 0.7, f"bilinear: {_rate(rows):.0%} exact"
    assert np.mean([g.mode != "sharp" for _, g, e in rows if e]) > 0.5


@pytest.mark.parametrize("condition", ["clean", "noise", "jpeg", "crop", "drift", "degraded", "bilinear",
                                       "lanczos", "touching"])
def test_never_a_silent_one_pixel_grid(condition, files):
    """No render is ever given 1-px (or < MIN_CELL_PX) cells: a grid is found, or status says none."""
    for _, g, _ in _run(condition, files):
        assert (g.status == "none" and g.cells_x == 0) or min(g.cell_w, g.cell_h) >= MIN_CELL_PX - 1e-9


def test_confidence_is_calibrated(files):
    """Pooled over the conditions: a ``detected`` grid is right ≥ 90 % of the time, and a ``low_confidence`` /
    ``none`` status predicts a wrong grid (wrong ≥ 50 % of the time) — low confidence means something."""
    rows = [x for c in ("clean", "noise", "jpeg", "crop", "drift", "degraded", "bilinear", "lanczos", "touching")
            for x in _run(c, files)]
    det = [e for _, g, e in rows if g.status == "detected"]
    low = [e for _, g, e in rows if g.status in ("low_confidence", "none")]
    assert all(g.confidence >= LOW_CONFIDENCE for _, g, _ in rows if g.status == "detected")
    assert np.mean(det) >= 0.9, f"detected grids right {np.mean(det):.0%}"
    assert len(low) >= 10 and 1 - np.mean(low) >= 0.5, f"low-confidence grids wrong {1 - np.mean(low):.0%}"


def test_crop_reports_partial_cells(files):
    """A frame cropped inside cells reports partial border cells instead of a finer grid."""
    rows = _run("crop", files)
    part = [bool(g.partial) for _, g, e in rows if e]
    assert np.mean(part) >= 0.9
