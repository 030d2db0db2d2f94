"""Pure functions of tiling: level choice, scaled reads, tissue mask, patch grid, normalisation."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import dask.array as da
import numpy as np
from dask.base import tokenize
from scipy import ndimage
from skimage import filters, morphology

from wsi_damm.slides.base import Slide
from wsi_damm.util.errors import InputError

MPP_TOLERANCE = 0.05
LAZY_BLOCK = 1024  # block side of the lazy whole-slide arrays read region by region


@dataclass(frozen=True)
class LevelChoice:
    """Read `level` and shrink by `factor` (1 = native pixels) to get the tiled grid."""

    level: int
    factor: float
    mpp: float | None
    shape: tuple[int, int]  # (H, W) of the tiled grid
    downsample: float  # of the tiled grid relative to level 0


def choose_level(slide: Slide, level: int | None = None, mpp: float | None = None) -> LevelChoice:
    """Explicit level, or the level matching `mpp` within 5 %, else a finer level shrunk to it."""
    if level is not None and mpp is not None:
        raise InputError("--level/--mpp", "give either --level or --mpp, not both")
    if mpp is None:
        lev = level or 0
        if not 0 <= lev < len(slide.levels):
            raise InputError(slide.path, f"has no level {lev}; levels are 0..{len(slide.levels) - 1}")
        ds = slide.levels[lev].downsample
        lmpp = slide.mpp * ds if slide.mpp else None
        return LevelChoice(lev, 1.0, lmpp, slide.levels[lev].shape[1:], ds)
    if not slide.mpp:
        raise InputError(slide.path, "has no µm/px in its metadata, so --mpp cannot be honoured", "use --level instead")
    if mpp < slide.mpp * (1 - MPP_TOLERANCE):
        raise InputError(slide.path, f"finest resolution is {slide.mpp:.4g} µm/px; --mpp {mpp} would need upsampling")
    best = None
    for i, lev in enumerate(slide.levels):
        lmpp = slide.mpp * lev.downsample
        if abs(lmpp - mpp) <= MPP_TOLERANCE * mpp:
            return LevelChoice(i, 1.0, lmpp, lev.shape[1:], lev.downsample)
        if lmpp < mpp:
            best = i
    assert best is not None
    lev = slide.levels[best]
    factor = mpp / (slide.mpp * lev.downsample)
    shape = (int(lev.shape[1] / factor), int(lev.shape[2] / factor))
    return LevelChoice(best, factor, mpp, shape, lev.downsample * factor)


def read_scaled(slide: Slide, choice: LevelChoice, y: int, x: int, h: int, w: int) -> np.ndarray:
    """(C, h, w) region of the tiled grid; each output pixel depends only on its position."""
    f = choice.factor
    if f == 1.0:
        return slide.read_region(choice.level, y, x, h, w)
    _, sh, sw = slide.levels[choice.level].shape
    k = round(f)
    if abs(f - k) < 1e-9:  # integer factor: exact block mean, like a pyramid level
        src = slide.read_region(choice.level, y * k, x * k, h * k, w * k).astype(np.float32)
        out = src.reshape(src.shape[0], h, k, w, k).mean(axis=(2, 4))
    else:  # anti-aliased resampling at pixel centres
        sigma = max((f - 1) / 2, 0.0)
        m = int(math.ceil(3 * sigma)) + 2
        y0, x0 = max(int(math.floor(y * f)) - m, 0), max(int(math.floor(x * f)) - m, 0)
        y1, x1 = min(int(math.ceil((y + h) * f)) + m, sh), min(int(math.ceil((x + w) * f)) + m, sw)
        src = slide.read_region(choice.level, y0, x0, y1 - y0, x1 - x0).astype(np.float32)
        if sigma > 0:
            src = ndimage.gaussian_filter(src, (0, sigma, sigma), mode="nearest")
        ys = (np.arange(y, y + h) + 0.5) * f - 0.5 - y0
        xs = (np.arange(x, x + w) + 0.5) * f - 0.5 - x0
        grid = np.meshgrid(ys, xs, indexing="ij")
        out = np.stack([ndimage.map_coordinates(ch, grid, order=1, mode="nearest") for ch in src])
    if np.issubdtype(slide.dtype, np.integer):
        return np.rint(out).astype(slide.dtype)
    return out.astype(slide.dtype)


def low_resolution(slide: Slide, max_side: int = 2048) -> tuple[np.ndarray, float]:
    """A small (C, h, w) float32 view of the whole slide and its downsample from level 0.

    Takes the coarsest level no smaller than needed; when the pyramid has no small level the
    chosen level is block-averaged through dask, so memory stays bounded by its chunks.
    """
    idx = 0
    for i, lev in enumerate(slide.levels):
        if max(lev.shape[1:]) >= max_side / 2:
            idx = i
    lev = slide.levels[idx]
    k = max(1, math.ceil(max(lev.shape[1:]) / max_side))
    if k == 1:
        arr = slide.read_region(idx, 0, 0, lev.shape[1], lev.shape[2]).astype(np.float32)
    else:
        lazy = slide.level_array(idx, chunk=k * max(1, 2048 // k))
        h, w = (lev.shape[1] // k) * k, (lev.shape[2] // k) * k
        lazy = lazy[:, :h, :w].astype(np.float32)
        arr = da.coarsen(np.mean, lazy, {1: k, 2: k}, trim_excess=True).compute(scheduler="threads")
    return arr, lev.downsample * k


# Tissue detection, in the smoothed max of the channels scaled to their 1st–99.5th percentiles.
# Fluorescence glass is the dark floor of that range. When the darker of Otsu's two classes sits there
# (median below GLASS_LEVEL), the slide has glass around the section and Otsu's split is the mask.
# Otherwise Otsu would split dim tissue from bright tissue, so only the floor itself (below
# EMPTY_LEVEL: glass corners, tears, lumens) is left out.
GLASS_LEVEL = 0.2
TISSUE_MODES = ("auto", "all")  # "all": every pixel is tissue (`--tissue all`)
EMPTY_LEVEL = 0.1


def tissue_mask(low: np.ndarray, um_per_px: float | None, mode: str = "auto") -> np.ndarray:
    """Bright-on-dark tissue (`mode` "auto", the rule above, then clean-up) or every pixel ("all").

    Morphology is sized in µm (assumes 0.5 µm/px at level 0 when the slide does not say).
    """
    if mode == "all":
        return np.ones(low.shape[1:], bool)
    um = um_per_px or 8.0
    scaled = []
    for ch in low:
        lo, hi = np.percentile(ch, [1, 99.5])
        scaled.append((ch - lo) / (hi - lo) if hi > lo else np.zeros_like(ch))
    signal = ndimage.gaussian_filter(np.max(scaled, axis=0), sigma=max(10.0 / um, 0.5))
    if float(signal.max() - signal.min()) < 1e-6:
        return np.zeros(signal.shape, bool)
    threshold = filters.threshold_otsu(signal)
    if np.median(signal[signal <= threshold]) >= GLASS_LEVEL:  # no glass: the dark class is dim tissue
        threshold = EMPTY_LEVEL
    mask = signal > threshold
    radius = max(1, int(round(15.0 / um)))
    mask = close_gaps(mask, radius)
    min_area = max(1, int((60.0 / um) ** 2))
    mask = morphology.remove_small_objects(mask, max_size=min_area)
    mask = morphology.remove_small_holes(mask, max_size=int((150.0 / um) ** 2))
    return mask


def close_gaps(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary closing by a disk of `radius` px, through the exact distance map: the same mask as a disk
    footprint gives, in time independent of the radius (a 30-px radius on a 1024² view took 11 s as a
    min/max filter; this takes a fraction of a second)."""
    return morphology.isotropic_closing(mask, radius)


def grid_positions(length: int, patch: int, stride: int, align: int = 1) -> np.ndarray:
    """0, stride, 2·stride, … with the last patch flush with the border — or, with `align` > 1 (patch
    windows on a latent canvas `align` times smaller), as close to it as a multiple of `align` goes."""
    if length < patch:
        return np.zeros(0, np.int64)
    pos = np.arange(0, length - patch + 1, stride, dtype=np.int64)
    last = (length - patch) // align * align
    if pos[-1] != last:
        pos = np.append(pos, last)
    return pos


def nearest(image: np.ndarray, step: float, y: int, x: int, h: int, w: int) -> np.ndarray:
    """The (h, w) region at (y, x) of a grid `step` image pixels per pixel, each pixel reading the
    image pixel (…, H, W) under its centre: masks and block maps brought onto another resolution."""
    iy = np.clip(((np.arange(y, y + h) + 0.5) * step).astype(int), 0, image.shape[-2] - 1)
    ix = np.clip(((np.arange(x, x + w) + 0.5) * step).astype(int), 0, image.shape[-1] - 1)
    return image[..., iy[:, None], ix[None, :]]


def tissue_fractions(mask: np.ndarray, scale: float, ys: np.ndarray, xs: np.ndarray, patch: int) -> np.ndarray:
    """Share of mask pixels under each patch (grid ys × xs), mask pixels = `scale` grid pixels."""
    integral = np.pad(mask.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    h, w = mask.shape

    def bounds(p: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        a = np.clip(np.floor(p / scale).astype(int), 0, n - 1)
        b = np.clip(np.ceil((p + patch) / scale).astype(int), a + 1, n)
        return a, b

    y0, y1 = bounds(ys, h)
    x0, x1 = bounds(xs, w)
    Y0, X0 = np.meshgrid(y0, x0, indexing="ij")
    Y1, X1 = np.meshgrid(y1, x1, indexing="ij")
    total = integral[Y1, X1] - integral[Y0, X1] - integral[Y1, X0] + integral[Y0, X0]
    return (total / ((Y1 - Y0) * (X1 - X0))).astype(np.float32)


def percentile_stats(low: np.ndarray, mask: np.ndarray, lower: float, upper: float) -> tuple[list[float], list[float]]:
    """Per-channel robust range over tissue (whole image when there is none)."""
    lo, hi = [], []
    for ch in low:
        values = ch[mask] if mask.any() else ch.ravel()
        a, b = np.percentile(values, [lower, upper])
        lo.append(float(a))
        hi.append(float(b) if b > a else float(a) + 1.0)
    return lo, hi


def normalise(block: np.ndarray, lo: list[float], hi: list[float], dtype: np.dtype) -> np.ndarray:
    """(C, …) raw values → [0, 1] by the slide's range → integer store dtype (rounded).

    8/16-bit input goes through a per-channel look-up table (one gather instead of float maths);
    the table is the same formula evaluated once per possible value.
    """
    top = np.iinfo(dtype).max
    if block.dtype in (np.uint8, np.uint16):
        values = np.arange(np.iinfo(block.dtype).max + 1, dtype=np.float64)  # the table is small: exact maths
        out = np.empty(block.shape, dtype)
        for c in range(block.shape[0]):
            lut = _scale(values, float(lo[c]), float(hi[c]), top).astype(dtype)
            np.take(lut, block[c], out=out[c])
        return out
    shape = (-1,) + (1,) * (block.ndim - 1)
    lo_a, hi_a = np.asarray(lo, np.float32).reshape(shape), np.asarray(hi, np.float32).reshape(shape)
    return _scale(block.astype(np.float32), lo_a, hi_a, top).astype(dtype)


def _scale(values: np.ndarray, lo, hi, top: int) -> np.ndarray:
    return np.rint(unit_range(values, lo, hi, top))


def unit_range(values: np.ndarray, lo, hi, top: float = 1.0) -> np.ndarray:
    """The one normalisation rule of every stage: clip((x − lo) / (hi − lo), 0, 1) · `top`, in the
    float dtype of `values` (the store keeps it as integers of `top` levels, models see [−1, 1],
    evaluation and figures [0, 1])."""
    if not np.issubdtype(values.dtype, np.floating):
        values = values.astype(np.float32)
    out = (values - lo) * (values.dtype.type(top) / (hi - lo))
    np.clip(out, 0, top, out=out)
    return out


def lazy_blocks(fn: Callable[[int, int, int, int], np.ndarray], shape: tuple[int, int], name: str, dtype=np.float32) -> da.Array:
    """2-D dask array of `shape` whose LAZY_BLOCK² blocks at (y, x) of size (h, w) are `fn(y, x, h, w)`:
    a whole slide (or anything computed from it region by region) that is never loaded whole."""
    h, w = shape
    ys, xs = list(range(0, h, LAZY_BLOCK)), list(range(0, w, LAZY_BLOCK))
    key = f"{name}-{tokenize(name, shape)}"
    graph = {(key, i, j): (fn, y, x, min(LAZY_BLOCK, h - y), min(LAZY_BLOCK, w - x)) for i, y in enumerate(ys) for j, x in enumerate(xs)}
    chunks = (tuple(min(LAZY_BLOCK, h - y) for y in ys), tuple(min(LAZY_BLOCK, w - x) for x in xs))
    return da.Array(graph, key, chunks, dtype=dtype)
