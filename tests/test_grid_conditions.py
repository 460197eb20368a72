"""Issue 13: grid detection on renders the way diffusion models draw them — drifting cells, cropped frames,
soft upscales, noise-only / JPEG-only — each condition over 100 generated renders with known per-line truth
(:func:`conceptlab.metrics.palette_synth.condition_render`: DawnLike sprites, CC-BY 4.0 DawnBringer, and
programmatic sprites). "Exact" = :func:`~conceptlab.metrics.palette_synth.cuts_match` on both axes.

What "exact" asks where the image cannot show the truth: a cut between two native cells that are equal in
every row (column) leaves no trace in any pixel. Inside the art such a cut is still held to half a cell
(its neighbours pin it). In a **blank border stretch** — every column (row) from the frame edge to the first
visible cut identical — the image is constant along the axis, so no detector can know where those cuts are;
with drifting cells (widths drawn independently in ±15 %) they are a random walk from the last visible cut.
There ``cuts_match`` checks only the number of cells (± 1): the snapped colours of a blank stretch are the
same whatever its cuts, which is what a user of the metrics needs. Every cut where the render shows
structure is held to max(1.5 px, 15 % of a cell). The stricter definition (border stretches held to the
full rule too) is asserted against its ceiling in :func:`_assert_strict_near_ceiling`: a detector that knew every
visible cut exactly and the generator's mean cell (:func:`~conceptlab.metrics.palette_synth.reference_cuts`)
scores 89–93 % strict on the i.i.d. drift (92–97 % on the warp), depending on the seeds — a bound no detector
can be expected to pass on drifting cells, while a cropped uniform lattice reaches 100 %.
Drift comes in two fixtures: ``drift`` (every width drawn independently, cut positions a random walk) and
``warp`` (the cell size wanders smoothly across the frame, each cut jittered ±3 % of a cell).

Seeds 1000+ are used here; the detector's constants were tuned on seeds 0–40 (tests must not grade the tuning set).
"""

from __future__ import annotations

import numpy as np
import pytest

from conceptlab.metrics.grid import LOW_CONFIDENCE, detect_grid
from conceptlab.metrics.grid_cuts import MIN_CELL_PX
from conceptlab.metrics.palette_synth import condition_render, cuts_match, reference_cuts

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
#: nearest-neighbour condition, 90 % on soft upscales), all met.
FLOOR = {"clean": 0.95, "noise": 0.95, "jpeg": 0.95, "crop": 0.95, "degraded": 0.95, "touching": 0.95,
         "drift": 0.95, "warp": 0.95, "bilinear": 0.90, "bicubic": 0.90, "lanczos": 0.90, "bicubic_torch": 0.90}
CONDITIONS = tuple(FLOOR)
#: nearest-neighbour conditions (sharp cells) and interpolating upscales (soft edges; ``bicubic_torch`` is torch's
#: a = −0.75 bicubic, as OpenCV's INTER_CUBIC, the others Pillow's): the confidence is calibrated per condition
SHARP = ("clean", "noise", "jpeg", "crop", "degraded", "touching", "drift", "warp")
SOFT = ("bilinear", "bicubic", "lanczos", "bicubic_torch")


@pytest.mark.parametrize("condition", CONDITIONS)
def test_condition(condition, files):
    """Per condition, over 100 renders: the exact share reaches FLOOR (clean, noise only — no finer-grid
    harmonics —, JPEG only, frames cropped 2–10 px on every side, blur+noise+JPEG, a subject over the frame edge:
    ≥ 95 %; cells drifting ±15 % — independent widths or a smooth warp —: ≥ 95 %, blank border stretches scored
    by cell count, see the module docstring; bilinear / bicubic / Lanczos upscales at fractional scales, Pillow's and torch's bicubic: ≥ 90 %),
    and no render ever gets cells under MIN_CELL_PX: a grid is found, or its status says ``none`` (no
    silent 1-px fallback). Cropped frames report their partial border cells; drifting grids are followed cut by
    cut (cells of different widths); soft upscales choose a soft edge model. Cropped and drifting frames: the
    strict rule near its ceiling (:func:`_assert_strict_near_ceiling`)."""
    rows = _run(condition, files)
    for _, g, _ in rows:
        assert (g.status == "none" and g.cells_x == 0) or min(g.cell_w, g.cell_h) >= MIN_CELL_PX - 1e-9
    assert _rate(rows) >= FLOOR[condition], f"{condition}: {_rate(rows):.0%} exact"
    right = [g for _, g, e in rows if e]
    if condition == "crop":
        assert np.mean([bool(g.partial) for g in right]) >= 0.9
    if condition in ("drift", "warp"):
        widths = [np.diff(g.cuts_x) for g in right]
        assert np.mean([w.std() / w.mean() for w in widths]) > 0.04  # not one uniform period
    if condition in SOFT:  # found as soft lattices, not as sharp grids
        assert np.mean([g.mode == "soft" for g in right]) > 0.9
    _assert_calibrated(condition, rows)
    if condition in ("crop", "drift", "warp"):  # blank borders: the strict rule against its ceiling
        _assert_strict_near_ceiling(condition, rows)


def _assert_strict_near_ceiling(condition: str, rows) -> None:
    """The strict rule (every cut, blank border stretches included) on the renders of :func:`test_condition`:
    within 7 points of its reference ceiling (every visible cut exact, blank borders extrapolated at the
    generator's own mean cell, which no detector knows: :func:`~conceptlab.metrics.palette_synth.reference_cuts`),
    and ≥ 95 % wherever the ceiling allows it — a cropped uniform lattice is predictable into its blank
    borders; drifting cells are not (their border cuts scatter around the prediction). Seeds 1000–1099: crop
    99 % (ceiling 100 %), drift 88 % (89 %), warp 91 % (97 %); before the border extrapolation pooled both axes
    and the uniform lattice was fitted through the visible edges: 98 %, 82 %, 89 %."""
    strict = ceiling = 0
    for r, g, _ in rows:
        h, w = r.image.shape[:2]
        axes = ((g.cuts_x, r.cuts_x, w, r.evidence_x), (g.cuts_y, r.cuts_y, h, r.evidence_y))
        strict += g.ok and all(cuts_match(f, t, L, r.cell, e, strict=True) for f, t, L, e in axes)
        ceiling += all(cuts_match(reference_cuts(t, e, L, r.cell), t, L, r.cell, e, strict=True)
                       for _, t, L, e in axes)
    strict, ceiling = strict / len(rows), ceiling / len(rows)
    assert strict >= min(0.95, ceiling - 0.07), f"{condition}: strict {strict:.0%}, ceiling {ceiling:.0%}"


def _flagged(g) -> bool:
    return g.status in ("low_confidence", "none")


def _assert_calibrated(condition: str, rows) -> None:
    """Confidence calibrated per condition, on the same renders: a ``low_confidence`` / ``none`` status
    predicts a wrong grid — at most 2 right grids of 100 are flagged, and where ≥ 2 are flagged at least half
    of them are wrong (seeds 1000–1099, flagged grids that are wrong: clean 1/1, noise 1/1, JPEG 2/2, crop 0/0,
    drift 0/0, blur+noise+JPEG 1/2, touching 1/1; bilinear 0/0, bicubic 1/2, Lanczos 2/2, torch bicubic 0/0 —
    the soft rule, :func:`conceptlab.metrics.grid._soft_confidence`, was tuned on seeds 0–199 and only checked
    here) — and a ``detected`` grid is right ≥ 95 % of the time."""
    flagged = [e for _, g, e in rows if _flagged(g)]
    det = [e for _, g, e in rows if g.status == "detected"]
    assert sum(flagged) <= 2, f"{condition}: {sum(flagged)} right grids flagged low/none"
    if len(flagged) >= 2:
        assert 1 - np.mean(flagged) >= 0.5, f"{condition}: flagged grids wrong {1 - np.mean(flagged):.0%}"
    assert np.mean(det) >= 0.95, f"{condition}: detected grids right {np.mean(det):.0%}"


def test_low_confidence_predicts_wrong_grids_pooled_sharp(files):
    """Pooled over the nearest-neighbour conditions (the 700 renders of :func:`test_condition`): precision of
    "low confidence ⇒ wrong grid" ≥ 0.7 and recall (share of wrong grids flagged) ≥ 0.3. Measured: seeds
    1000–1099 6 of 7 flagged grids wrong, 6 of 7 wrong grids flagged; on the tuning seeds 0–99 2 of 3 and 2 of
    15 (most misses there are drifting grids whose visible cuts are off by a little more than the tolerance);
    seeds 2000–2024 1 of 1 and 1 of 4 — a flag is a reliable warning, its absence is not a guarantee."""
    rows = [(g, e) for c in SHARP for _, g, e in _run(c, files)]
    flagged = [e for g, e in rows if _flagged(g)]
    wrong = [_flagged(g) for g, e in rows if not e]
    assert len(flagged) >= 3 and 1 - np.mean(flagged) >= 0.7, f"flagged wrong {1 - np.mean(flagged):.0%}"
    assert len(wrong) >= 2 and np.mean(wrong) >= 0.3, f"wrong grids flagged {np.mean(wrong):.0%}"


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
    # (≥ 1: few grids are flagged now that neither the sharp nor the soft rule flags right grids — seeds
    # 2000–2024, 275 renders: 1 flagged, wrong. Calibration per condition, on 1,100 renders, is asserted in
    # test_condition; the flag's recall on the sharp conditions in test_..._pooled_sharp.)
    assert len(low) >= 1 and 1 - np.mean(low) >= 0.5, f"low-confidence grids wrong {1 - np.mean(low):.0%}"
