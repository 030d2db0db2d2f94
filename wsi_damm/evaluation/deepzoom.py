"""Deep Zoom (DZI) tile pyramids, written streaming from image pyramids, for the report's viewer.

A DZI level L of an image W × H has `scale` = 2^(top − L) full-resolution pixels per pixel, top =
ceil(log2(max(W, H))); its tiles are `tile` px plus `overlap` px on every side with a neighbour, in
`NAME_files/L/COLUMN_ROW.jpg`. Fine levels read each tile's region alone from the finest source
level that is not finer than needed; once a whole level fits in `WHOLE_LEVEL` px per side it is read
once and every coarser level is halved from it. Peak memory is a few tiles, or one small level,
whatever the slide size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsi_damm.util.files import write_json

WHOLE_LEVEL = 2048
BLOCK_TILES = 8  # fine levels are read in blocks of 8 × 8 tiles: one read (a few source chunks) serves 64 tiles
DZI_XMLNS = "http://schemas.microsoft.com/deepzoom/2008"

#: a region reader of one source level: (y, x, h, w) in that level's pixels → (h, w) float32
RegionFn = Callable[[int, int, int, int], np.ndarray]


@dataclass(frozen=True)
class SourceLevel:
    read: RegionFn
    shape: tuple[int, int]  # (H, W) of this level
    downsample: float  # full-resolution pixels per pixel of this level


class Pyramid:
    """One 2-D layer as a list of source levels (finest first); reads any region at any scale."""

    def __init__(self, levels: list[SourceLevel]):
        self.levels = sorted(levels, key=lambda lv: lv.downsample)
        self.shape = self.levels[0].shape  # full resolution (downsample 1)

    def region(self, scale: float, y: int, x: int, h: int, w: int) -> np.ndarray:
        """(h, w) float32 of the grid with `scale` full-resolution pixels per pixel: block means when
        a source level is an integer factor finer, else nearest source pixel."""
        level = max((lv for lv in self.levels if lv.downsample <= scale * 1.001), key=lambda lv: lv.downsample)
        f = scale / level.downsample
        k = round(f)
        lh, lw = level.shape
        if abs(f - k) < 1e-3:
            y0, x0 = y * k, x * k
            y1, x1 = min((y + h) * k, lh), min((x + w) * k, lw)
            src = level.read(y0, x0, y1 - y0, x1 - x0).astype(np.float32)
            if k == 1:
                return src
            ph, pw = h * k - src.shape[0], w * k - src.shape[1]  # the last row / column of blocks: edge values
            src = np.pad(src, ((0, ph), (0, pw)), mode="edge")
            return src.reshape(h, k, w, k).mean(axis=(1, 3))
        ys = np.minimum(((np.arange(y, y + h) + 0.5) * f).astype(np.int64), lh - 1)
        xs = np.minimum(((np.arange(x, x + w) + 0.5) * f).astype(np.int64), lw - 1)
        src = level.read(int(ys[0]), int(xs[0]), int(ys[-1] - ys[0] + 1), int(xs[-1] - xs[0] + 1)).astype(np.float32)
        return src[np.ix_(ys - ys[0], xs - xs[0])]


def dzi_geometry(width: int, height: int) -> list[tuple[int, int]]:
    """(W, H) of every DZI level, level 0 (1 × 1) first."""
    top = max(0, math.ceil(math.log2(max(width, height))))
    return [(math.ceil(width / 2 ** (top - lv)), math.ceil(height / 2 ** (top - lv))) for lv in range(top + 1)]


def descriptor(width: int, height: int, url: str, tile: int, overlap: int, fmt: str = "jpg") -> dict:
    """The .dzi XML as OpenSeadragon's inline object (it loads from file://, where XHR is blocked)."""
    return {
        "Image": {
            "xmlns": DZI_XMLNS,
            "Url": url,
            "Format": fmt,
            "Overlap": str(overlap),
            "TileSize": str(tile),
            "Size": {"Width": str(width), "Height": str(height)},
        }
    }


def _save(path: Path, rgb: np.ndarray, quality: int) -> None:
    from PIL import Image

    Image.fromarray(rgb).save(path, quality=quality)


def _tiles(level_wh: tuple[int, int], tile: int, overlap: int, rows: range, cols: range):
    """(column, row, y0, x0, h, w) of tiles of a level, overlap included."""
    w, h = level_wh
    for row in rows:
        for col in cols:
            y0, x0 = max(row * tile - overlap, 0), max(col * tile - overlap, 0)
            y1, x1 = min((row + 1) * tile + overlap, h), min((col + 1) * tile + overlap, w)
            yield col, row, y0, x0, y1 - y0, x1 - x0


def _blocks(level_wh: tuple[int, int], tile: int):
    """Row and column ranges of BLOCK_TILES × BLOCK_TILES tiles covering a level."""
    n_rows, n_cols = math.ceil(level_wh[1] / tile), math.ceil(level_wh[0] / tile)
    for r in range(0, n_rows, BLOCK_TILES):
        for c in range(0, n_cols, BLOCK_TILES):
            yield range(r, min(r + BLOCK_TILES, n_rows)), range(c, min(c + BLOCK_TILES, n_cols))


def _halve(image: np.ndarray, wh: tuple[int, int]) -> np.ndarray:
    w, h = wh
    ph, pw = 2 * h - image.shape[0], 2 * w - image.shape[1]
    image = np.pad(image, ((0, max(ph, 0)), (0, max(pw, 0))), mode="edge")[: 2 * h, : 2 * w]
    return image.reshape(h, 2, w, 2).mean(axis=(1, 3))


def write_dzi(
    folder: Path,
    name: str,
    pyramid: Pyramid,
    colour: Callable[[np.ndarray], np.ndarray],
    tile: int = 254,
    overlap: int = 1,
    quality: int = 88,
    workers: int = 2,
) -> dict:
    """Write `folder/NAME_files/…` (JPEG tiles coloured by `colour`: float (h, w) → uint8 (h, w, 3))
    and `folder/NAME.dzi.json`; returns the inline descriptor (Url relative to `folder`)."""
    height, width = pyramid.shape
    levels = dzi_geometry(width, height)
    top = len(levels) - 1
    whole: np.ndarray | None = None
    with ThreadPoolExecutor(max(1, workers)) as pool:  # Pillow encodes without the GIL
        for lv in range(top, -1, -1):
            out = folder / f"{name}_files" / str(lv)
            out.mkdir(parents=True, exist_ok=True)
            wh = levels[lv]
            if whole is not None:
                whole = _halve(whole, wh)
            elif max(wh) <= WHOLE_LEVEL:
                whole = pyramid.region(2 ** (top - lv), 0, 0, wh[1], wh[0])
            scale = 2 ** (top - lv)
            for rows, cols in _blocks(wh, tile):
                tiles = list(_tiles(wh, tile, overlap, rows, cols))
                by, bx = tiles[0][2], tiles[0][3]
                if whole is not None:
                    block, by, bx = whole, 0, 0
                else:  # one read for the block's tiles (their union, overlaps included)
                    block = pyramid.region(scale, by, bx, max(t[2] + t[4] for t in tiles) - by, max(t[3] + t[5] for t in tiles) - bx)

                def one(spec, block=block, by=by, bx=bx, out=out):
                    col, row, y0, x0, h, w = spec
                    _save(out / f"{col}_{row}.jpg", colour(block[y0 - by : y0 - by + h, x0 - bx : x0 - bx + w]), quality)

                list(pool.map(one, tiles))
    desc = descriptor(width, height, f"{name}_files/", tile, overlap)
    write_json(folder / f"{name}.dzi.json", desc)
    return desc


def colour_map(name: str, vmin: float, vmax: float, bad: tuple[int, int, int] = (31, 31, 31)) -> Callable[[np.ndarray], np.ndarray]:
    """float (h, w) → uint8 RGB by a matplotlib colour map over [vmin, vmax]; NaN → `bad` (dark grey,
    like the report's figures)."""
    import matplotlib

    table = (matplotlib.colormaps[name](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)

    def apply(values: np.ndarray) -> np.ndarray:
        idx = np.clip((values - vmin) / (vmax - vmin) * 255, 0, 255)
        rgb = table[np.nan_to_num(idx, nan=0).astype(np.uint8)]
        rgb[np.isnan(values)] = bad
        return rgb

    return apply
