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


#: exact-grid share each condition must reach over its N renders: the issue-13 targets (95 % on every
#: nearest-neighbour condition, 90 % on soft upscales) where they are met; where they are not (drift) the measured floor
#: is asserted here and the target itself is an xfail(strict) test below.
FLOOR = {"clean": 0.95, "noise": 0.95, "jpeg": 0.95, "crop": 0.95, "degraded": 0.95, "touching": 0.95,
         "drift": 0.78, "bilinear": 0.90, "bicubic": 0.90, "lanczos": 0.90}
CONDITIONS = tuple(FLOOR)


@pytest.mark.parametrize("condition", CONDITIONS)
def test_condition(condition, files):
    """Per condition, over 100 renders: the exact share reaches FLOOR (clean, noise only — no finer-grid
    harmonics —, JPEG only, frames cropped 2–10 px on every side, blur+noise+JPEG, a subject over the frame edge:
    ≥ 95 %; bilinear / bicubic / Lanczos upscales at fractional scales: ≥ 90 %), and no render ever gets cells under MIN_CELL_PX: a grid is found, or its status says ``none`` (no
    silent 1-px fallback). Cropped frames report their partial border cells; drifting grids are followed cut by
    cut (cells of different widths); soft upscales choose a soft edge model."""
    rows = _run(condition, files)
    for _, g, _ in rows:
        assert (g.status == "none" and g.cells_x == 0) or min(g.cell_w, g.cell_h) >= MIN_CELL_PX - 1e-9
    assert _rate(rows) >= FLOOR[condition], f"{condition}: {_rate(rows):.0%} exact"
    right = [g for _, g, e in rows if e]
    if condition == "crop":
        assert np.mean([bool(g.partial) for g in right]) >= 0.9
    if condition == "drift":
        widths = [np.diff(g.cuts_x) for g in right]
        assert np.mean([w.std() / w.mean() for w in widths]) > 0.04  # not one uniform period
    if condition in ("bilinear", "bicubic", "lanczos"):  # found as soft lattices, not as sharp grids
        assert np.mean([g.mode == "soft" for g in right]) > 0.9


@pytest.mark.parametrize("condition,target", [("drift", 0.95)])
@pytest.mark.xfail(strict=True, reason="issue 13 targets not reached yet (measured on seeds 1000–1099: drift 81 %; "
                                       "see README 'Pixel-art palette metrics')")
def test_issue_targets_not_yet_met(condition, target, files):
    rows = _run(condition, files)
    assert _rate(rows) >= target, f"{condition}: {_rate(rows):.0%} exact"


def test_confidence_is_calibrated(files):
    """Pooled over every condition (25 renders each, seeds 2000+): a ``detected`` grid is right ≥ 90 % of the
    time, and a ``low_confidence`` / ``none`` status predicts a wrong grid (wrong ≥ 50 % of the time)."""
    rows = []
    for c in CONDITIONS:
        for s in range(2000, 2025):
            r = condition_render(c, s, files)
            g = detect_grid(r.image)
            h, w = r.image.shape[:2]
            rows.append((g, g.ok and cuts_match(g.cuts_x, r.cuts_x, w, r.cell, r.evidence_x)
                         and cuts_match(g.cuts_y, r.cuts_y, h, r.cell, r.evidence_y)))
    det = [e for g, e in rows if g.status == "detected"]
    low = [e for g, e in rows if g.status in ("low_confidence", "none")]
    assert all(g.confidence >= LOW_CONFIDENCE for g, _ in rows if g.status == "detected")
    assert np.mean(det) >= 0.9, f"detected grids right {np.mean(det):.0%}"
    # (≥ 5: soft upscales, once most of the low-confidence grids, are now found and detected — 5 of 250 on grid-soft)
    assert len(low) >= 5 and 1 - np.mean(low) >= 0.5, f"low-confidence grids wrong {1 - np.mean(low):.0%}"
