"""The whole-slide map's layout: what `stitch` and the baseline write, and `evaluate` / `report` read.

A map is one OME-Zarr 0.5 image: the predicted NP map at full resolution (and, when prediction drew
several samples, their standard deviation and central interval), with a second image nested at
`patch_maps/`: the gate's divergence, the multi-modal share and the prediction coverage in
BLOCK × BLOCK pixel blocks. Divergence and share are one number per patch, blended by the same
windows as the NP map, so they vary on the scale of a patch: at full resolution they cost as much
to write as the NP map itself and say nothing more. Per block, divergence and share are window-
weighted means; coverage is the covered fraction (1 = every pixel of the block was predicted).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np
import zarr

from wsi_damm.slides.ome import build_pyramid, create_level, halve, ome_zarr_attrs, pyramid_shapes
from wsi_damm.tiling.grid import nearest
from wsi_damm.tiling.np_units import NpScale
from wsi_damm.util.errors import InputError

MAP_DTYPE = np.float16  # values live in [0, 1] where float16 is exact to 2.4e-4: half the bytes to write and read
PYRAMID_MIN = 1024  # levels halve until the longer side is at most this
BLOCK = 8  # pixels per side of a patch-maps pixel
BLOCK_LEVEL = 3  # log2(BLOCK): the full-resolution pyramid level a patch-maps pixel matches (sets its chunks)
PATCH_MAPS = "patch_maps"
DIMS = ("c", "y", "x")
VALUE_CHANNELS = [
    {"label": "NP (predicted)", "color": "00FF00", "min": 0.0, "max": 1.0},
    # only with predict --samples K > 1: the sd over the draws and their central interval (`sampling.draws`)
    {"label": "NP sd over samples", "color": "FFFF00", "min": 0.0, "max": 0.25},
    {"label": "NP interval low", "color": "0000FF", "min": 0.0, "max": 1.0},
    {"label": "NP interval high", "color": "FF0000", "min": 0.0, "max": 1.0},
]
MEAN, SD, LOW, HIGH = range(4)  # the value channels
PATCH_MAP_CHANNELS = [
    {"label": "divergence", "color": "FF00FF", "min": 0.0, "max": 1.0},
    {"label": "multi-modal share", "color": "00FFFF", "min": 0.0, "max": 1.0},
    {"label": "coverage", "color": "FFFFFF", "min": 0.0, "max": 1.0},
]
DIVERGENCE, SHARE, COVERAGE = range(3)
DEFAULT_PERCENTILES = (0.5, 99.8)  # what maps written before the rule was recorded used


def block_shape(height: int, width: int) -> tuple[int, int]:
    return -(-height // BLOCK), -(-width // BLOCK)


def create_map(root: zarr.Group, height: int, width: int, n_values: int, n_levels: int) -> tuple[list[zarr.Array], zarr.Array]:
    """Empty full-resolution levels 0 … n_levels − 1 (n_values channels) and patch-maps level 0."""
    shapes = pyramid_shapes(height, width, PYRAMID_MIN)[:n_levels]
    levels = [create_level(root, str(i), (n_values,) + shape, MAP_DTYPE, i, DIMS) for i, shape in enumerate(shapes)]
    patch0 = create_level(
        root.require_group(PATCH_MAPS), "0", (len(PATCH_MAP_CHANNELS),) + block_shape(height, width), MAP_DTYPE, BLOCK_LEVEL, DIMS
    )
    return levels, patch0


def write_map_region(levels: list[zarr.Array], patch0: zarr.Array, y0: int, x0: int, values: np.ndarray, patch_maps: np.ndarray) -> None:
    """Write a region's float32 values (C, h, w) at (y0, x0) into `levels` (0, 1, … halving, each from
    the one before, so the pyramid never re-reads full resolution) and its patch maps into `patch0`.
    The region must cover whole chunks of every level it writes (`y0`, `x0` on block edges)."""
    for level, array in enumerate(levels):
        if level:
            values = halve(values)
        y, x = y0 >> level, x0 >> level
        array[:, y : y + values.shape[1], x : x + values.shape[2]] = values.astype(MAP_DTYPE)
    by, bx = y0 // BLOCK, x0 // BLOCK
    patch0[:, by : by + patch_maps.shape[1], bx : bx + patch_maps.shape[2]] = patch_maps.astype(MAP_DTYPE)


def finish_map(root: zarr.Group, name: str, mpp: float | None, existing: int, info: dict) -> list[zarr.Array]:
    """The remaining pyramid levels of both images and their OME metadata; returns the NP image's levels."""
    levels = build_pyramid(root, "", min_size=PYRAMID_MIN, dimension_names=DIMS, existing=existing)
    patch_levels = build_pyramid(root[PATCH_MAPS], "", min_size=PYRAMID_MIN, dimension_names=DIMS)
    root.attrs["ome"] = ome_zarr_attrs(name, len(levels), mpp, VALUE_CHANNELS[: levels[0].shape[0]])
    root[PATCH_MAPS].attrs["ome"] = ome_zarr_attrs(
        f"{name}: per-patch maps in {BLOCK}-px blocks", len(patch_levels), mpp, PATCH_MAP_CHANNELS, factor=BLOCK
    )
    root.attrs["wsi_damm"] = {**info, "patch_maps": {"path": PATCH_MAPS, "block": BLOCK}}
    return levels


@dataclass
class MapImage:
    path: Path
    levels: list[zarr.Array]  # (C, H, W): NP [, NP sd, interval low, interval high], halving
    patch_maps: list[zarr.Array]  # (3, ⌈H/B⌉, ⌈W/B⌉): divergence, multi-modal share, coverage, halving
    block: int
    mpp: float | None
    slide_id: str
    patch_size: int
    nuclei: bool
    percentiles: tuple[float, float]  # the normalisation rule of the run that made the map
    gamma: float | None  # the DAMMP threshold of that run (None: no gate, e.g. the baseline)
    stride: int | None  # the patch grid's stride in pixels (None: unknown)
    sampling: str | None  # "shifted", "canvas", "independent", or None (not a diffusion map)
    tissue: str = "auto"  # the tissue detection of the tiling that made the map; evaluate scores the same tissue
    np_scale: NpScale = NpScale()  # the NP normalisation of the run (per slide, or a common range with its inverse)
    source: str | None = None  # the prediction store the map was stitched from (None: not a stitched prediction)
    interval: dict | None = None  # the draws' central interval (`draws.interval_attrs`) when the map holds one

    @property
    def level0(self) -> zarr.Array:
        return self.levels[0]

    def covered(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """(h, w) bool: pixels of the region whose block was fully predicted."""
        b = self.block
        return nearest(self.blocks(y, x, h, w)[COVERAGE] >= 1, 1 / b, y % b, x % b, h, w)

    def blocks(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """(3, …) patch-maps pixels of every block the full-resolution region touches."""
        b = self.block
        return np.asarray(self.patch_maps[0][:, y // b : -(-(y + h) // b), x // b : -(-(x + w) // b)])

    def lazy_patch_map(self, channel: int, shape: tuple[int, int], chunks: int) -> da.Array:
        """One patch-maps channel on the full-resolution grid (each block's value repeated), lazily."""
        small = da.from_zarr(self.patch_maps[0])[channel].astype(np.float32)
        return small.repeat(self.block, axis=0).repeat(self.block, axis=1)[: shape[0], : shape[1]].rechunk(chunks)

    def patch_maps_like(self, shape: tuple[int, int], level_shape: tuple[int, int]) -> np.ndarray:
        """The patch maps over the whole slide on the grid of a map level of `level_shape`, cropped to `shape`:
        read from the finest patch-maps level no finer than needed, resized by nearest neighbour."""
        scale = self.level0.shape[1] / level_shape[0]  # full-resolution pixels per pixel of the target grid
        fine = next((lv for lv in reversed(self.patch_maps) if self.level0.shape[1] / lv.shape[1] <= scale), self.patch_maps[0])
        step = scale / (self.level0.shape[1] / fine.shape[1])  # patch-maps pixels per target pixel
        return nearest(np.asarray(fine[:]), step, 0, 0, *shape).astype(np.float32)


def open_map(path: str | Path) -> MapImage:
    path = Path(path)
    try:
        root = zarr.open_group(str(path), mode="r")
        ms = dict(root.attrs)["ome"]["multiscales"][0]
    except Exception as exc:
        raise InputError(path, f"is not an OME-Zarr map written by wsi-damm stitch ({type(exc).__name__}: {exc})") from exc
    info = dict(root.attrs).get("wsi_damm", {})
    if PATCH_MAPS not in root or "patch_maps" not in info:
        raise InputError(path, f"has no {PATCH_MAPS}/ image (written by an older wsi-damm)", "stitch the prediction store again")
    pm = dict(root[PATCH_MAPS].attrs)["ome"]["multiscales"][0]
    unit = ms["axes"][1].get("unit")
    mpp = float(ms["datasets"][0]["coordinateTransformations"][0]["scale"][1]) if unit == "micrometer" else None
    return MapImage(
        path,
        [root[d["path"]] for d in ms["datasets"]],
        [root[PATCH_MAPS][d["path"]] for d in pm["datasets"]],
        int(info["patch_maps"]["block"]),
        mpp,
        info.get("slide", ms.get("name", path.stem)),
        int(info.get("patch_size", 256)),
        bool(info.get("nuclei", True)),
        tuple(info.get("percentiles", DEFAULT_PERCENTILES)),
        info.get("gamma"),
        int(info["stride"]) if info.get("stride") else None,
        info.get("sampling"),
        info.get("tissue", "auto"),
        NpScale.from_attrs(info.get("np_normalisation")),
        info.get("source"),
        info.get("interval") if len(ms["datasets"]) and root[ms["datasets"][0]["path"]].shape[0] > HIGH else None,
    )
