"""Palette metrics of pixel-art renders on their native cell grid: colour counts, palette extraction and
quantization, fidelity to target hex codes, background, cleanliness. Entry point: :func:`palette_report`.

Every colour statistic is computed on *snapped cells* (one robust colour per native cell, see
:mod:`.grid`), not on raw render pixels: raw counts of a 512 px render are inflated by resampling / JPEG noise,
and exact-hex matching fails on any render (``exact_hex_frac`` is reported only to show that).
"""

from __future__ import annotations

import numpy as np

from .color import (
    MalformedHexError,
    color_family,
    color_name,
    delta_e00,
    parse_hex,
    rgb_to_hex,
    srgb_to_lab,
    srgb_to_oklab,
    oklab_to_srgb,
)
from .grid import Grid, detect_grid, median_of_samples, sample_cells, snap, upscale_native

__all__ = [
    "load_rgb",
    "to_rgb",
    "parse_palette",
    "raw_unique_colors",
    "cluster_colors",
    "extract_palette",
    "quantize",
    "palette_report",
    "DEFAULT_TOLERANCE",
    "TOLERANCES",
    "CLUSTER_THRESHOLD",
]

#: ΔE00 tolerance for "this cell matches a target colour".
DEFAULT_TOLERANCE = 5.0
#: Tolerances also reported (2.3 ≈ one JND of ΔE*ab; 10 = loose).
TOLERANCES = (2.3, 5.0, 10.0)
#: ΔE00 under which snapped cell colours are one effective colour.
CLUSTER_THRESHOLD = 5.0
#: Sample-to-cell OKLab distance above which a sample "differs" (mixed cells, pixel-perfectness).
MIX_THRESHOLD = 0.08
#: Render pixels (a strided lattice) used for pixel_perfect_frac / mean_oklab_error.
PERFECT_SAMPLES = 16384
#: Most distinct colours clustered exactly; more are pre-quantised to 5 bits/channel first.
MAX_CLUSTER_COLORS = 4096


# ----------------------------------------------------------------------------------------------------------------
# input
# ----------------------------------------------------------------------------------------------------------------


def to_rgb(image, matte=(255, 255, 255)) -> np.ndarray:
    """Any image → RGB uint8 ``[H, W, 3]``.

    Accepts a PIL image (modes RGB, RGBA, LA, L, P with/without transparency, I;16, I, F, 1, CMYK...) or a numpy
    array ``[H, W]`` / ``[H, W, 1|3|4]`` (uint8, uint16 → /257, float 0..1). Alpha is composited over ``matte``
    (default white). Raises ValueError with the reason for anything else (empty, wrong shape, unknown dtype).
    """
    from PIL import Image

    matte = np.asarray(parse_hex(matte) if isinstance(matte, str) else matte, dtype=np.float32)
    if isinstance(image, Image.Image):
        im = image
        if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            arr = np.asarray(im).astype(np.float64)
            hi = 65535.0 if im.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
            if im.mode == "F" and arr.max(initial=0) <= 1.0:
                hi = 1.0
            arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
            return np.repeat(arr[..., None], 3, axis=2)
        if im.mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")
        elif im.mode not in ("RGB", "RGBA", "LA", "L"):
            im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
        arr = np.asarray(im)
    else:
        arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"expected an image [H, W] or [H, W, 1-4], got shape {arr.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"empty image of shape {arr.shape}")
    if arr.dtype == np.uint8:
        f = None
    elif arr.dtype == np.uint16:
        f = arr.astype(np.float32) / 65535.0
    elif np.issubdtype(arr.dtype, np.floating):
        f = np.clip(arr.astype(np.float32), 0.0, 1.0)
    elif arr.dtype == np.bool_:
        f = arr.astype(np.float32)
    else:
        raise ValueError(f"unsupported pixel type {arr.dtype}")
    if f is not None:
        arr = np.clip(f * 255.0 + 0.5, 0, 255).astype(np.uint8)
    c = arr.shape[2]
    if c in (2, 4):
        alpha = arr[..., -1:].astype(np.float32) / 255.0
        col = arr[..., :-1].astype(np.float32)
        if col.shape[2] == 1:
            col = np.repeat(col, 3, axis=2)
        out = col * alpha + matte * (1.0 - alpha)
        return np.clip(out + 0.5, 0, 255).astype(np.uint8)
    if c == 1:
        return np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr)


#: The one transparency rule (palette, caption audit, nodes): without ``matte``, pixels with alpha < 128 are
#: *transparent* — excluded from every colour statistic, and a background that is mostly transparent is
#: reported as ``"transparent"``; for grid detection only, the image is composited over this key colour
#: (the chroma-key magenta of sprite sheets). With a matte colour, alpha is composited over it instead and the
#: matte is a colour like any other.
DETECTION_KEY = (255, 0, 255)
#: Alpha (0..255) below which a pixel / snapped cell is transparent.
ALPHA_CUTOFF = 128


def split_alpha(image, matte=None) -> tuple[np.ndarray, np.ndarray | None]:
    """Any image (see :func:`to_rgb`) → ``(rgb uint8 [H, W, 3], alpha uint8 [H, W] or None)`` under the one
    transparency rule (:data:`DETECTION_KEY`). ``matte`` (hex or RGB): composite over it and return alpha
    ``None``. Without a matte, an image with an alpha channel below 255 somewhere returns its alpha and an RGB
    composited over :data:`DETECTION_KEY` (for grid detection; colours of transparent cells are never
    reported); fully opaque images return ``None``. Raises ValueError like :func:`to_rgb`."""
    from PIL import Image

    if matte is not None:
        return to_rgb(image, matte), None
    arr = image
    if isinstance(image, Image.Image):
        im = image
        if im.mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")
        if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
            arr = np.asarray(im.convert("RGBA"))
        else:
            return to_rgb(im), None
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[2] in (2, 4):
        a = arr[..., -1] if arr.dtype == np.uint8 else to_rgb(arr[..., -1])[..., 0]
        if a.min(initial=255) >= 255:
            return to_rgb(arr[..., :-1] if arr.shape[2] == 4 else arr[..., :1]), None
        return to_rgb(arr, DETECTION_KEY), np.ascontiguousarray(a)
    return to_rgb(arr), None


def load_image(path, matte=None) -> tuple[np.ndarray, np.ndarray | None]:
    """Read an image file under the one transparency rule → ``(rgb [H, W, 3], alpha [H, W] or None)`` (see
    :func:`split_alpha`). Raises FileNotFoundError, or ValueError naming the file when Pillow cannot read it."""
    return _open(path, lambda im: split_alpha(im, matte))


def load_rgb(path, matte=(255, 255, 255)) -> np.ndarray:
    """Read an image file → RGB uint8 ``[H, W, 3]`` composited over ``matte`` (see :func:`to_rgb`). Raises
    FileNotFoundError, or ValueError naming the file when Pillow cannot read it."""
    return _open(path, lambda im: to_rgb(im, matte))


def _open(path, convert):
    from pathlib import Path

    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"image not found: {p}")
    if p.is_dir():
        raise ValueError(f"{p} is a folder, not an image")
    from ..formats.limits import check_image_pixels

    try:
        with Image.open(p) as im:
            check_image_pixels(*im.size, p.name)  # from the header, before decoding
            im.load()
            return convert(im)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError) as exc:
        raise ValueError(f"cannot read {p} as an image: {exc}") from None
    except Image.DecompressionBombError as exc:  # pragma: no cover - huge files
        raise ValueError(f"{p}: {exc}") from None


def parse_palette(spec) -> list[tuple[int, int, int]]:
    """Target colours from ``"#hex,#hex"`` / whitespace-separated text / a list of hex strings or RGB tuples.

    Raises :class:`~.color.MalformedHexError` naming the bad entry; ValueError if nothing is given.
    """
    if spec is None:
        return []
    items = spec
    if isinstance(spec, str):
        items = [t for t in spec.replace(",", " ").replace(";", " ").split() if t]
    out = []
    for it in items:
        out.append(parse_hex(it) if isinstance(it, str) else tuple(int(v) for v in it))
    return out


def palette_from_caption(text: str) -> tuple[list[tuple[int, int, int]], list[str]]:
    """All hex codes of a caption → ``(unique colours (r, g, b) in first-occurrence order, malformed tokens as
    written)``, using the caption audit's parser (:func:`.caption_parse.parse_caption`) so ``conceptlab palette
    --caption`` and ``conceptlab audit-captions`` agree on what is a valid or malformed hex (e.g. ``#12345``,
    ``#GGGGGG``, the ``#abc`` shorthand and ``(03dc73)`` without ``#`` are malformed for both). Labelled,
    palette-list and stray codes all count as targets. Never raises on any string.
    """
    from .caption_parse import parse_caption

    parsed = parse_caption(text or "")
    return [parse_hex(h) for h in parsed.all_hexes()], parsed.malformed


# ----------------------------------------------------------------------------------------------------------------
# colour counting and clustering
# ----------------------------------------------------------------------------------------------------------------


def _pack(rgb: np.ndarray) -> np.ndarray:
    a = rgb.reshape(-1, 3)
    return (a[:, 0].astype(np.uint32) << 16) | (a[:, 1].astype(np.uint32) << 8) | a[:, 2].astype(np.uint32)


def _unpack(p: np.ndarray) -> np.ndarray:
    p = p.astype(np.uint32)
    return np.stack([(p >> 16) & 255, (p >> 8) & 255, p & 255], axis=-1).astype(np.uint8)


def raw_unique_colors(rgb: np.ndarray, chunk_rows: int = 512) -> int:
    """Number of distinct RGB values among all pixels (the naive count). O(2^24) bits of memory plus one
    row chunk, whatever the image size."""
    seen = np.zeros(1 << 24, dtype=bool)
    for i in range(0, rgb.shape[0], chunk_rows):
        seen[_pack(rgb[i : i + chunk_rows])] = True
    return int(np.count_nonzero(seen))


def _unique_with_counts(colors: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Colours ``[N, 3]`` uint8 → (unique ``[U, 3]``, counts ``[U]``, inverse ``[N]``)."""
    p = _pack(colors)
    u, inv, cnt = np.unique(p, return_inverse=True, return_counts=True)
    return _unpack(u), cnt, inv.ravel()


def cluster_colors(colors: np.ndarray, counts: np.ndarray, threshold: float = CLUSTER_THRESHOLD):
    """Greedy leader clustering of distinct colours at a ΔE00 threshold.

    ``colors`` ``[U, 3]`` uint8, ``counts`` ``[U]``. The most frequent unassigned colour becomes a leader and
    takes every unassigned colour within ``threshold`` ΔE00 (CIEDE2000, :func:`~.color.delta_e00`); repeat.
    Greedy, hence order-dependent, but the order is fixed: descending count, ties broken by ascending packed
    RGB (``0xRRGGBB``, a stable sort) — whatever order the caller passes the colours in, the result is the
    same. Leaders are real cell colours (not means), so a cluster's hex is a colour that occurs in the image.
    Cost O(K·U) ΔE00 evaluations for K clusters. Returns ``(labels [U], leaders [K,3] uint8, sizes [K])``
    with clusters sorted by size (ties: order of creation).
    """
    u = len(colors)
    if u == 0:
        return np.zeros(0, np.int64), np.zeros((0, 3), np.uint8), np.zeros(0, np.int64)
    lab = srgb_to_lab(colors)
    by_rgb = np.argsort(_pack(colors), kind="stable")
    order = by_rgb[np.argsort(-np.asarray(counts)[by_rgb], kind="stable")]
    labels = np.full(u, -1, dtype=np.int64)
    leaders = []
    remaining = order
    while remaining.size:
        lead = remaining[0]
        d = delta_e00(lab[remaining], lab[lead][None, :])
        take = remaining[d < threshold]
        labels[take] = len(leaders)
        leaders.append(lead)
        remaining = remaining[d >= threshold]
    sizes = np.bincount(labels, weights=counts, minlength=len(leaders))
    srt = np.argsort(-sizes, kind="stable")
    remap = np.empty_like(srt)
    remap[srt] = np.arange(len(srt))
    return remap[labels], colors[np.array(leaders)[srt]], sizes[srt].astype(np.int64)


# ----------------------------------------------------------------------------------------------------------------
# extraction and quantization
# ----------------------------------------------------------------------------------------------------------------


def _kmeans_weighted(x: np.ndarray, w: np.ndarray, k: int, seed: int, iters: int = 50) -> np.ndarray:
    """Weighted Lloyd k-means with k-means++ seeding (Arthur & Vassilvitskii 2007). ``x [N, D]``, ``w [N]`` →
    centres ``[k', D]`` (k' ≤ k when fewer distinct points). Hand-written: numpy/scipy offer no *weighted*
    k-means (``scipy.cluster.vq.kmeans2`` has no weights) and scikit-learn is not a dependency."""
    rng = np.random.default_rng(seed)
    n = len(x)
    k = min(k, n)
    p = w / w.sum()
    centres = [x[rng.choice(n, p=p)]]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        q = d2 * w
        if q.sum() <= 0:
            break
        c = x[rng.choice(n, p=q / q.sum())]
        centres.append(c)
        d2 = np.minimum(d2, ((x - c) ** 2).sum(1))
    c = np.array(centres)
    kk = len(c)
    for _ in range(iters):
        lab = ((x[:, None, :] - c[None]) ** 2).sum(2).argmin(1)
        wsum = np.bincount(lab, weights=w, minlength=kk)
        num = np.stack([np.bincount(lab, weights=w * x[:, d], minlength=kk) for d in range(x.shape[1])], 1)
        new = np.where(wsum[:, None] > 0, num / np.maximum(wsum, 1e-300)[:, None], c)  # empty cluster: keep
        if np.allclose(new, c, atol=1e-7):
            break
        c = new
    return c


def extract_palette(native: np.ndarray, k: int = 8, method: str = "kmeans", seed: int = 0) -> list[dict]:
    """``k`` dominant colours of a (snapped, native) image ``[h, w, 3]`` uint8.

    ``method``: ``"kmeans"`` — weighted k-means in OKLab on the distinct cell colours weighted by their cell
    counts (seeded, deterministic; Lloyd iterations with k-means++ seeding, Arthur & Vassilvitskii 2007, see
    ``_kmeans_weighted``); or Pillow's quantizers for comparison: ``"mediancut"``, ``"maxcoverage"``,
    ``"fastoctree"`` (``Image.quantize(colors=k, method=...)``; note Pillow's ``kmeans=`` argument is a
    refinement-iteration threshold, not k). Returns ``[{hex, rgb, frac}]`` sorted by coverage.
    Raises ValueError for k < 1 or an unknown method.
    """
    if int(k) < 1:
        raise ValueError(f"k must be ≥ 1, got {k}")
    k = int(k)
    flat = native.reshape(-1, 3)
    cols, cnt, _ = _unique_with_counts(flat)
    if method == "kmeans":
        ok = srgb_to_oklab(cols)
        centres = _kmeans_weighted(ok, cnt.astype(np.float64), k, seed)
        pal = oklab_to_srgb(centres, as_uint8=True)
    elif method in ("mediancut", "maxcoverage", "fastoctree"):
        from PIL import Image

        meth = {"mediancut": Image.Quantize.MEDIANCUT, "maxcoverage": Image.Quantize.MAXCOVERAGE,
                "fastoctree": Image.Quantize.FASTOCTREE}[method]
        q = Image.fromarray(np.ascontiguousarray(native)).quantize(colors=k, method=meth)
        used = sorted({i for _, i in q.getcolors(k * 4 + 256)})
        pal = np.array(q.getpalette()[: 3 * (max(used) + 1)], dtype=np.uint8).reshape(-1, 3)[used]
    else:
        raise ValueError(f"unknown palette method {method!r}: use kmeans, mediancut, maxcoverage or fastoctree")
    idx = _nearest_oklab(cols, pal)
    frac = np.bincount(idx, weights=cnt, minlength=len(pal)) / cnt.sum()
    order = np.argsort(-frac, kind="stable")
    return [{"hex": rgb_to_hex(pal[i]), "rgb": [int(v) for v in pal[i]], "frac": round(float(frac[i]), 4)}
            for i in order if frac[i] > 0]


def _nearest_oklab(colors: np.ndarray, palette: np.ndarray) -> np.ndarray:
    a = srgb_to_oklab(colors)
    b = srgb_to_oklab(np.asarray(palette, dtype=np.uint8))
    return ((a[:, None, :] - b[None]) ** 2).sum(2).argmin(1)


def quantize(rgb: np.ndarray, palette=None, k: int | None = None, seed: int = 0) -> np.ndarray:
    """Map every pixel of ``rgb`` ``[H, W, 3]`` uint8 to the nearest (OKLab Euclidean) colour of ``palette``
    (hex list / string / RGB tuples) or, with ``k``, of :func:`extract_palette` (k-means) of the image.
    Works per distinct colour, so cost is O(pixels + distinct colours × palette). Returns uint8 ``[H, W, 3]``.
    Raises ValueError when neither or an empty palette is given.
    """
    if palette is not None and not isinstance(palette, np.ndarray):
        palette = parse_palette(palette)
    if palette is None or len(palette) == 0:
        if k is None:
            raise ValueError("quantize needs a palette or k")
        palette = [tuple(p["rgb"]) for p in extract_palette(rgb, k, "kmeans", seed)]
    pal = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    cols, _, inv = _unique_with_counts(rgb.reshape(-1, 3))
    idx = _nearest_oklab(cols, pal)
    return pal[idx][inv].reshape(rgb.shape)


# ----------------------------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------------------------


def _wquantile(v: np.ndarray, w: np.ndarray, q: float) -> float:
    o = np.argsort(v)
    cw = np.cumsum(w[o])
    return float(v[o][np.searchsorted(cw, q * cw[-1])])


def _null_cell_metrics(rep: dict, reason: str, targets: bool) -> dict:
    """Fill the cell metrics with ``None`` (status ``none``: no grid) and say why in ``null_reason``."""
    for k in ("native_unique_colors", "effective_colors", "effective_colors_95", "clusters", "palette",
              "background", "cleanliness"):
        rep[k] = None
    if targets:
        for k in ("in_palette_frac", "palette_coverage", "delta_e00_mean", "delta_e00_p90", "missing", "extraneous",
                  "targets", "at_tolerance"):
            rep[k] = None
    rep["null_reason"] = reason
    return rep


def _background(native, cell_labels, opaque, expected_background) -> dict:
    """Background of the snapped image: the cluster that keeps the outer ring of cells connected.

    Rule (robust to a subject that touches the frame): among the clusters on the ring, each scores its share
    of ring cells × the share of its ring cells that are 4-connected (through cells of the same cluster, inside
    the image) to a corner cell; the best wins. A subject touching one side covers part of the ring but rarely
    the corners and never as one connected run around them. ``confidence`` = winner's score / (sum of scores).
    A ring mostly transparent (alpha) gives ``{"hex": None, "name": "transparent", ...}``.
    """
    from scipy.ndimage import label as cc_label

    h, w = cell_labels.shape
    ring = np.zeros((h, w), bool)
    ring[0, :] = ring[-1, :] = ring[:, 0] = ring[:, -1] = True
    if opaque is not None:
        t_share = float((~opaque[ring]).mean())
        if t_share >= 0.5:
            return {"hex": None, "name": "transparent", "family": "transparent", "transparent": True,
                    "frac_of_ring": round(t_share, 4), "confidence": round(t_share, 4)}
        ring_ok = ring & opaque
    else:
        ring_ok = ring
    rl = cell_labels[ring_ok]
    cands = np.unique(rl)
    corners = np.zeros((h, w), bool)
    corners[0, 0] = corners[0, -1] = corners[-1, 0] = corners[-1, -1] = True
    scores = []
    for c in cands:
        m = cell_labels == c
        if opaque is not None:
            m &= opaque
        comp, _ = cc_label(m)
        corner_ids = np.unique(comp[corners & m])
        corner_ids = corner_ids[corner_ids > 0]
        on_ring = m & ring
        conn = np.isin(comp[on_ring], corner_ids).mean() if corner_ids.size else 0.0
        scores.append(float((rl == c).mean()) * (0.25 + 0.75 * conn))
    scores = np.asarray(scores)
    bgl = int(cands[int(np.argmax(scores))])
    members = native[ring_ok & (cell_labels == bgl)]
    bg = np.median(members.reshape(-1, 3), axis=0).round().astype(np.uint8)
    bgd = {"hex": rgb_to_hex(bg), "name": color_name(bg), "family": color_family(bg),
           "frac_of_ring": round(float((rl == bgl).mean()), 4),
           "confidence": round(float(scores.max() / max(scores.sum(), 1e-12)), 4)}
    if expected_background is not None:
        eb = parse_hex(expected_background) if isinstance(expected_background, str) else tuple(expected_background)
        bgd["expected"] = rgb_to_hex(eb)
        bgd["delta_e00_to_expected"] = round(float(delta_e00(srgb_to_lab(bg), srgb_to_lab(np.array(eb, np.uint8)))), 3)
    return bgd


def background_of(rgb: np.ndarray, grid: Grid | None = None, cluster_threshold: float = CLUSTER_THRESHOLD,
                  expected_background=None) -> dict:
    """Background of an RGB uint8 render ``[H, W, 3]`` alone (the ``background`` key of :func:`palette_report`,
    same rule: snap to ``grid`` — detected when ``None`` —, cluster the cell colours at ``cluster_threshold``
    ΔE00, then the ring/corner-connectivity rule of ``_background``). Raises :class:`~.grid.GridError` when
    no grid is found (``status == "none"``)."""
    g = detect_grid(rgb) if grid is None else grid
    native = snap(rgb, g)
    cols, cnt, inv = _unique_with_counts(native.reshape(-1, 3))
    labels_u, _, _ = cluster_colors(cols, cnt, cluster_threshold)
    return _background(native, labels_u[inv].reshape(native.shape[:2]), None, expected_background)


def palette_report(image, targets=None, cells=None, expected_background=None, tolerance: float = DEFAULT_TOLERANCE,
                   cluster_threshold: float = CLUSTER_THRESHOLD, k: int = 8, grid: Grid | None = None,
                   return_arrays: bool = False, alpha: np.ndarray | None = None, matte=None) -> dict:
    """Full palette report of one image (see README "palette --json" for every key).

    ``image``: RGB uint8 ``[H, W, 3]`` or anything :func:`to_rgb` takes (PIL image, RGBA/gray arrays); alpha
    follows the one transparency rule (:func:`split_alpha`; ``matte`` composites over a colour instead;
    ``alpha`` uint8 ``[H, W]`` may be passed beside an RGB array). ``targets``: target colours
    (``"#hex,#hex"``, list of hex / RGB) — adds the fidelity keys. ``cells``: grid override (int or
    ``(cells_x, cells_y)``). ``expected_background``: hex / RGB. ``tolerance``: ΔE00 for in-palette / present
    (also reported at 2.3, 5, 10). ``cluster_threshold``: ΔE00 under which cell colours are one effective colour.

    Keys: ``grid`` {status, confidence, cells_x, cells_y, cell_w, cell_h, cuts_x, cuts_y, partial, ...},
    ``warnings`` (list of strings; a ``none`` / ``low_confidence`` grid is always named there),
    ``unique_colors`` (raw render), ``native_unique_colors``, ``effective_colors`` (ΔE00 clusters),
    ``effective_colors_95`` (clusters covering 95 % of cells), ``clusters`` [{hex, family, frac}], ``palette``
    (k-means k), ``background`` {hex, name, family, frac_of_ring, confidence, delta_e00_to_expected; hex None
    and name "transparent" for a transparent ring}, ``cleanliness`` {mixed_cells_frac, isolated_cells,
    isolated_frac, pixel_perfect_frac}, ``transparent_cells_frac`` (with alpha); with targets:
    ``in_palette_frac``, ``palette_coverage``, ``delta_e00_mean``, ``delta_e00_p90``, ``missing``,
    ``extraneous``, ``targets`` (per target), ``at_tolerance`` {"2.3", "5", "10"}, ``exact_hex_frac`` (the naive
    exact-hex match, for comparison). With grid status ``none`` every cell metric is ``None`` and
    ``null_reason`` says why (never computed on 1-px cells). With ``return_arrays`` the dict also holds numpy
    arrays under ``"_arrays"`` (native, labels, grid, opaque). Raises ValueError / MalformedHexError /
    GridError with a clear message for bad input.
    """
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[-1] == 3 and image.dtype == np.uint8:
        rgb = image
        if matte is not None:
            alpha = None
    else:
        rgb, alpha = split_alpha(image, matte)
    if alpha is not None and alpha.shape != rgb.shape[:2]:
        raise ValueError(f"alpha {alpha.shape} does not match the image {rgb.shape[:2]}")
    tgt = parse_palette(targets) if targets is not None and not isinstance(targets, list) else (
        [parse_hex(t) if isinstance(t, str) else tuple(t) for t in targets] if targets else [])
    if not (cluster_threshold > 0):
        raise ValueError(f"cluster_threshold must be > 0 (ΔE00), got {cluster_threshold}")
    g = grid if grid is not None else detect_grid(rgb, cells)
    rep: dict = {
        "width": int(rgb.shape[1]),
        "height": int(rgb.shape[0]),
        "grid": g.to_dict(),
        "warnings": [],
        "unique_colors": raw_unique_colors(rgb),
        "cluster_threshold": cluster_threshold,
    }
    if not g.ok:
        rep["warnings"].append(f"no pixel grid found ({g.reason}); cell metrics are null — pass cells=N "
                               "(--cells N) if the render has one")
        _null_cell_metrics(rep, f"grid status none: {g.reason}", bool(tgt))
        if tgt:
            rep["exact_hex_frac"] = round(float(np.isin(_pack(rgb[::4, ::4]), _pack(np.array(tgt, np.uint8))).mean()), 4)
        if return_arrays:
            rep["_arrays"] = {"native": None, "labels": None, "grid": g, "opaque": None}
        return rep
    if g.status == "low_confidence":
        rep["warnings"].append(f"pixel grid found with low confidence ({g.confidence:.2f}): cell metrics may be "
                               "wrong; check the annotated grid or pass cells=N")
    samples = sample_cells(rgb, g)  # [h, w, m*m, 3], gathered once: snapping + cleanliness
    native = median_of_samples(samples)  # == snap(rgb, g)
    opaque = None
    if alpha is not None:
        a_s = sample_cells(np.repeat(alpha[..., None], 3, axis=2), g)[..., :1]
        opaque = median_of_samples(np.repeat(a_s, 3, axis=3))[..., 0] >= ALPHA_CUTOFF
        rep["transparent_cells_frac"] = round(float((~opaque).mean()), 4)
        if not opaque.any():
            rep["warnings"].append("every cell is transparent: colour metrics are null")
            _null_cell_metrics(rep, "every cell is transparent", bool(tgt))
            rep["background"] = {"hex": None, "name": "transparent", "family": "transparent", "transparent": True,
                                 "frac_of_ring": 1.0, "confidence": 1.0}
            return rep
    sel = opaque.reshape(-1) if opaque is not None else slice(None)
    ncell = int(opaque.sum()) if opaque is not None else native.shape[0] * native.shape[1]
    cols, cnt, inv_sel = _unique_with_counts(native.reshape(-1, 3)[sel])
    if len(cols) > MAX_CLUSTER_COLORS:  # huge native images: cluster 5-bit colours
        q = (native.reshape(-1, 3)[sel] & 0xF8) | 4
        cols, cnt, inv_sel = _unique_with_counts(q)
    labels_u, leaders, sizes = cluster_colors(cols, cnt, cluster_threshold)
    flat_labels = np.full(native.shape[0] * native.shape[1], -1, np.int64)
    flat_labels[sel] = labels_u[inv_sel]
    cell_labels = flat_labels.reshape(native.shape[:2])
    frac = sizes / ncell
    cum = np.cumsum(np.sort(frac)[::-1])
    eff95 = int(np.searchsorted(cum, 0.95 - 1e-9) + 1) if len(cum) else 0
    fams = color_family(leaders) if len(leaders) else np.array([])
    clusters = [{"hex": rgb_to_hex(leaders[i]), "family": str(fams[i]), "frac": round(float(frac[i]), 4)}
                for i in range(len(leaders))]
    rep.update({
        "native_unique_colors": int(len(np.unique(_pack(native.reshape(-1, 3)[sel])))),
        "effective_colors": int(len(leaders)),
        "effective_colors_95": eff95,
        "clusters": clusters[:64],
    })
    rep["background"] = _background(native, cell_labels, opaque, expected_background)
    h, w = cell_labels.shape
    # cleanliness
    s_ok = srgb_to_oklab(samples, np.float32)  # [h, w, m*m, 3]
    n_ok = srgb_to_oklab(native, np.float32)
    dev = np.sqrt(((s_ok - n_ok[:, :, None, :]) ** 2).sum(-1))  # [h, w, m*m]
    mixed = (dev > MIX_THRESHOLD).mean(-1) > 0.25
    pad = np.pad(cell_labels, 1, constant_values=-2)
    same = np.zeros((h, w), bool)
    has = np.zeros((h, w), bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy == dx == 0:
                continue
            nb = pad[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
            has |= nb >= 0
            same |= nb == cell_labels
    isolated = has & ~same & (cell_labels >= 0)
    if opaque is not None:
        mixed &= opaque
    # pixel-perfectness on a strided pixel lattice (≤ PERFECT_SAMPLES pixels): how well the clean upscale
    # explains the render
    step = max(1, int(np.ceil(np.sqrt(rgb.shape[0] * rgb.shape[1] / PERFECT_SAMPLES))))
    sub = rgb[step // 2 :: step, step // 2 :: step]
    ys = np.minimum(g.cell_of(1)[step // 2 :: step], h - 1)
    xs = np.minimum(g.cell_of(0)[step // 2 :: step], w - 1)
    recon = n_ok[ys[:, None], xs[None, :]]
    pdev = np.sqrt(((srgb_to_oklab(sub, np.float32) - recon) ** 2).sum(-1))
    if opaque is not None:
        pdev = pdev[opaque[ys[:, None], xs[None, :]]]
    rep["cleanliness"] = {
        "mixed_cells": int(mixed.sum()),
        "mixed_cells_frac": round(float(mixed.sum() / max(ncell, 1)), 4),
        "isolated_cells": int(isolated.sum()),
        "isolated_frac": round(float(isolated.sum() / max(ncell, 1)), 4),
        "pixel_perfect_frac": round(float((pdev <= MIX_THRESHOLD).mean()), 4) if pdev.size else None,
        "mean_oklab_error": round(float(pdev.mean()), 4) if pdev.size else None,
    }
    opaque_native = native.reshape(-1, 3)[sel].reshape(-1, 1, 3)
    rep["palette"] = extract_palette(opaque_native, k, "kmeans")
    # fidelity to targets
    if tgt:
        t_arr = np.array(tgt, dtype=np.uint8)
        d = delta_e00(srgb_to_lab(cols)[:, None, :], srgb_to_lab(t_arr)[None, :, :])  # [U, T]
        dmin = d.min(1)
        wts = cnt.astype(np.float64)
        at = {}
        for tol in sorted(set(TOLERANCES) | {float(tolerance)}):
            within = d <= tol
            present = within.any(0)
            at[f"{tol:g}"] = {
                "in_palette_frac": round(float(wts[dmin <= tol].sum() / ncell), 4),
                "palette_coverage": round(float(present.mean()), 4),
                "missing": [rgb_to_hex(t_arr[j]) for j in np.nonzero(~present)[0]],
            }
        main = at[f"{float(tolerance):g}"]
        rep.update(main)
        rep["tolerance"] = float(tolerance)
        rep["delta_e00_mean"] = round(float((dmin * wts).sum() / wts.sum()), 3)
        rep["delta_e00_p90"] = round(_wquantile(dmin, wts, 0.9), 3)
        rep["at_tolerance"] = at
        lab_lead = srgb_to_lab(leaders)
        dl = delta_e00(lab_lead[:, None, :], srgb_to_lab(t_arr)[None, :, :]).min(1)
        rep["extraneous"] = [{"hex": rgb_to_hex(leaders[i]), "frac": round(float(frac[i]), 4),
                              "delta_e00": round(float(dl[i]), 2)}
                             for i in range(len(leaders)) if dl[i] > tolerance and frac[i] >= 0.01]
        near = d.argmin(0)
        cell_cnt = np.array([wts[d[:, j] <= tolerance].sum() for j in range(len(t_arr))])
        rep["targets"] = [{"hex": rgb_to_hex(t_arr[j]), "present": bool(cell_cnt[j] > 0),
                           "nearest_delta_e00": round(float(d[near[j], j]), 3),
                           "cells_frac": round(float(cell_cnt[j] / ncell), 4)} for j in range(len(t_arr))]
        packed = _pack(rgb[:: max(1, step), :: max(1, step)])
        rep["exact_hex_frac"] = round(float(np.isin(packed, _pack(t_arr)).mean()), 4)
    if return_arrays:
        rep["_arrays"] = {"native": native, "labels": cell_labels, "grid": g, "opaque": opaque}
    return rep


__all__ += ["palette_from_caption", "MalformedHexError", "upscale_native", "split_alpha", "load_image",
            "DETECTION_KEY", "ALPHA_CUTOFF", "background_of"]
