"""The :class:`Grid` a detector returns (per-line cuts, status, confidence) and what is done with one: sampling
the cells, snapping each to one colour, upscaling a native image back onto the grid. Detection lives in
:mod:`.grid` (per-line cuts, soft lattices) and :mod:`.grid_uniform` (the single-period detector)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = ["Grid", "GridError", "STATUSES", "LOW_CONFIDENCE", "no_grid", "check_rgb", "sample_cells",
           "median_of_samples", "snap", "upscale_native", "SAMPLES_PER_SIDE"]

#: Most samples per cell side used by :func:`snap` / :func:`sample_cells` (m×m samples per cell).
SAMPLES_PER_SIDE = 5


class GridError(ValueError):
    """Bad grid request (e.g. a cell count larger than the image)."""


#: Grid status values (``Grid.status``).
STATUSES = ("detected", "low_confidence", "none", "override")
#: Below this confidence a detected grid is reported ``low_confidence`` (calibrated on the issue-13 fixtures:
#: see tests/test_grid_conditions.py::test_confidence_is_calibrated).
LOW_CONFIDENCE = 0.5


@dataclass
class Grid:
    """A cell grid over an ``H×W`` image.

    The grid is given by its **cuts**: ``cuts_x`` / ``cuts_y`` are the interior cell boundaries in px (floats,
    increasing, in (0, W) / (0, H)); cell ``i`` along x covers the pixels whose centre ``x + 0.5`` lies in
    ``[cuts_x[i−1], cuts_x[i])`` (with 0 and W as the outer ends), so ``cells_x = len(cuts_x) + 1`` — cells of
    varying width (drift) and partial cells at cropped borders are described exactly. ``cell_w × cell_h``: the
    mean cell size (median interior gap, px); ``phase_x/phase_y``: the first cut modulo the mean cell, in
    (−cell/2, cell/2] (a uniform grid has lines at ``phase + k·cell``). ``partial``: ``{"left", "right", "top",
    "bottom"}`` → border cell width as a fraction of the mean cell, listed when < 0.85 (a cropped frame).
    ``confidence`` in 0..1 (calibrated, see :data:`LOW_CONFIDENCE`); ``status`` one of :data:`STATUSES`
    (``"none"``: no grid found — then ``cells_x = cells_y = 0``, ``reason`` says why, and cell metrics must not
    be computed); ``method``: ``"detected"``, ``"uniform"`` (a single period fits best), ``"override"`` or
    ``"none"``; ``mode``: ``"sharp"`` (nearest-neighbour cells, cuts followed line by line) or ``"soft"`` (a
    uniform lattice drawn by an interpolating upscale — bilinear / bicubic / Lanczos, :mod:`.grid_soft`);
    ``"sharp/soft"`` when the axes differ.
    """

    width: int
    height: int
    cells_x: int
    cells_y: int
    cell_w: float
    cell_h: float
    phase_x: float = 0.0
    phase_y: float = 0.0
    confidence: float = 1.0
    confidence_x: float = 1.0
    confidence_y: float = 1.0
    method: str = "detected"
    scores: dict = field(default_factory=dict, repr=False)
    cuts_x: tuple = ()
    cuts_y: tuple = ()
    status: str = "detected"
    reason: str = ""
    mode: str = "sharp"
    partial: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.status != "none" and not self.cuts_x and self.cells_x > 1:
            self.cuts_x = _uniform_cuts(self.width, self.cell_w, self.phase_x)
        if self.status != "none" and not self.cuts_y and self.cells_y > 1:
            self.cuts_y = _uniform_cuts(self.height, self.cell_h, self.phase_y)
        if self.status != "none":
            self.cells_x, self.cells_y = len(self.cuts_x) + 1, len(self.cuts_y) + 1
            self.partial = _partial(self)

    @property
    def ok(self) -> bool:
        """True when the grid has cells (status is not ``"none"``)."""
        return self.status != "none"

    def bounds(self, axis: int) -> np.ndarray:
        """Cell boundaries including the frame ends along ``axis`` (0 = x, 1 = y): float64 ``[cells + 1]``."""
        L, cuts = (self.width, self.cuts_x) if axis == 0 else (self.height, self.cuts_y)
        return np.concatenate([[0.0], np.asarray(cuts, np.float64), [float(L)]])

    def cell_of(self, axis: int) -> np.ndarray:
        """Cell index of every pixel along ``axis`` (pixel-centre rule), int64 ``[W]`` or ``[H]``."""
        L, cuts = (self.width, self.cuts_x) if axis == 0 else (self.height, self.cuts_y)
        return np.searchsorted(np.asarray(cuts, np.float64), np.arange(L) + 0.5, side="right")

    def to_dict(self) -> dict:
        """JSON-ready dict: status, reason, cells_x, cells_y, cell_w, cell_h (mean, px), phase [x, y], cuts_x,
        cuts_y (px, 2 decimals), partial, confidence (+ per axis), method, mode."""
        d = asdict(self)
        d.pop("scores")
        d["phase"] = [round(self.phase_x, 3), round(self.phase_y, 3)]
        for k in ("cell_w", "cell_h", "phase_x", "phase_y", "confidence", "confidence_x", "confidence_y"):
            d[k] = round(float(d[k]), 4)
        d["cuts_x"] = [round(float(c), 2) for c in self.cuts_x]
        d["cuts_y"] = [round(float(c), 2) for c in self.cuts_y]
        if not d["reason"]:
            d.pop("reason")
        return d


def _uniform_cuts(length: int, cell: float, phase: float) -> tuple:
    if cell <= 0:
        return ()
    k = np.arange(-2, int(length / cell) + 3)
    c = phase + k * cell
    c = c[(c > 0.5) & (c < length - 0.5)]
    return tuple(float(v) for v in c)


def _partial(g: "Grid") -> dict:
    out = {}
    for axis, (lo, hi), cell in ((0, ("left", "right"), g.cell_w), (1, ("top", "bottom"), g.cell_h)):
        b = g.bounds(axis)
        if b.size < 3 or cell <= 1:
            continue
        for name, width in ((lo, b[1] - b[0]), (hi, b[-1] - b[-2])):
            if width < 0.85 * cell:
                out[name] = round(float(width / cell), 3)
    return out


def no_grid(width: int, height: int, reason: str, scores: dict | None = None) -> Grid:
    """The ``status="none"`` grid: no cells (``cells_x = cells_y = 0``), confidence 0, ``reason`` saying why."""
    return Grid(width, height, 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, "none", scores or {}, (), (), "none",
                reason)



def check_rgb(rgb: np.ndarray) -> None:
    """Raise ValueError unless ``rgb`` is a non-empty RGB uint8 array ``[H, W, 3]``."""
    if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(
            "expected an RGB uint8 array [H, W, 3]; got "
            + (f"{rgb.dtype} {rgb.shape}" if isinstance(rgb, np.ndarray) else type(rgb).__name__)
        )
    if rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ValueError(f"empty image {rgb.shape}")



_check_rgb = check_rgb


# ----------------------------------------------------------------------------------------------------------------
# snapping
# ----------------------------------------------------------------------------------------------------------------


def _sample_coords(bounds: np.ndarray, length: int, m: int, inner: float) -> np.ndarray:
    """``[n, m]`` int pixel coordinates of ``m`` samples in the inner ``inner`` fraction of each of the ``n``
    cells between consecutive ``bounds`` (px)."""
    t = 0.5 - inner / 2.0 + inner * (np.arange(m) + 0.5) / m
    lo, hi = bounds[:-1, None], bounds[1:, None]
    x = lo + t[None, :] * (hi - lo)
    return np.clip(np.floor(x), 0, length - 1).astype(np.int64)


def _default_m(grid: Grid) -> int:
    if grid.cell_w <= 1.0 and grid.cell_h <= 1.0:
        return 1
    return int(np.clip(round(min(grid.cell_w, grid.cell_h) / 4.0), 1, SAMPLES_PER_SIDE))


def _require_cells(grid: Grid) -> None:
    if not grid.ok:
        raise GridError(f"no pixel grid to snap to: {grid.reason or 'status none'} (give the cell count to override)")


def _gather(rgb: np.ndarray, grid: Grid, m: int | None, inner: float) -> tuple[np.ndarray, int]:
    """``[cells_y, m, cells_x, m, 3]`` uint8 samples (one fancy-indexing gather, no per-cell loop) and ``m``."""
    _check_rgb(rgb)
    _require_cells(grid)
    if m is None:
        m = _default_m(grid)
    m = max(1, int(m))
    ys = _sample_coords(grid.bounds(1), rgb.shape[0], m, inner)
    xs = _sample_coords(grid.bounds(0), rgb.shape[1], m, inner)
    return rgb[ys[:, :, None, None], xs[None, None, :, :]], m


def sample_cells(rgb: np.ndarray, grid: Grid, m: int | None = None, inner: float = 0.5) -> np.ndarray:
    """Pixels sampled inside each cell: ``[cells_y, cells_x, m*m, 3]`` uint8.

    ``m×m`` samples on a regular lattice in the central ``inner`` fraction of each cell (between its cuts, so
    cells of different widths and partial border cells are sampled inside; default the middle 50 %, away from
    blurred / JPEG-rung edges); ``m`` defaults to ``clip(round(min(cell_w, cell_h)/4), 1,``
    :data:`SAMPLES_PER_SIDE` ``)`` (≈ one sample per 2 px of the inner part; 25 samples for 21 px cells).
    Memory: cells × m² × 3 bytes. Raises :class:`GridError` for a ``status="none"`` grid.
    """
    s, m = _gather(rgb, grid, m, inner)
    return s.transpose(0, 2, 1, 3, 4).reshape(grid.cells_y, grid.cells_x, m * m, 3)


def median_of_samples(samples: np.ndarray) -> np.ndarray:
    """Per-channel median over axis 2 of ``[h, w, k, 3]`` uint8 samples → ``[h, w, 3]`` uint8 (mean of the two
    middle values, rounded half up, for even ``k``). ``np.partition`` on a channel-last-contiguous copy: O(k)
    per cell, no full sort."""
    k = samples.shape[2]
    if k == 1:
        return np.ascontiguousarray(samples[:, :, 0, :])
    t = np.ascontiguousarray(samples.transpose(0, 1, 3, 2))  # [h, w, 3, k]
    if k % 2:
        return np.partition(t, k // 2, axis=-1)[..., k // 2]
    pt = np.partition(t, (k // 2 - 1, k // 2), axis=-1)
    lo = pt[..., k // 2 - 1].astype(np.uint16)
    hi = pt[..., k // 2].astype(np.uint16)
    return ((lo + hi + 1) // 2).astype(np.uint8)


def snap(rgb: np.ndarray, grid: Grid, m: int | None = None, inner: float = 0.5) -> np.ndarray:
    """One robust colour per cell → the native image ``[cells_y, cells_x, 3]`` uint8.

    The cell colour is the per-channel median (:func:`median_of_samples`) of :func:`sample_cells` (the cell's
    inner part). A per-channel median in sRGB equals the per-channel median in linear light (the sRGB transfer
    is monotonic per channel), and ignores up to half the samples being outliers (noise, JPEG ringing, a
    mis-registered edge).
    """
    return median_of_samples(sample_cells(rgb, grid, m, inner))


def upscale_native(native: np.ndarray, grid: Grid | None = None, size: tuple[int, int] | None = None) -> np.ndarray:
    """Clean upscaled render: nearest-neighbour upscale of ``native`` ``[cy, cx, 3]`` back onto the grid.

    With ``grid``, every output pixel takes the colour of the cell holding its centre (same size and cuts
    as the analysed render; :class:`GridError` for a ``status="none"`` grid); otherwise ``size=(H, W)`` with cells spanning the image. Returns ``native``'s dtype
    (uint8 for :func:`snap` output) ``[H, W, 3]``. Raises ``ValueError`` when neither ``grid`` nor ``size`` is
    given.
    """
    cy, cx = native.shape[:2]
    if grid is not None:
        _require_cells(grid)
        xs = np.minimum(grid.cell_of(0), cx - 1)
        ys = np.minimum(grid.cell_of(1), cy - 1)
    else:
        if size is None:
            raise ValueError("upscale_native needs a grid or a size")
        h, w = size
        xs = np.minimum((np.arange(w) * cx) // w, cx - 1)
        ys = np.minimum((np.arange(h) * cy) // h, cy - 1)
    return native[ys[:, None], xs[None, :]]

