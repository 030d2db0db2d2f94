"""Streamed writers for pyramidal images: pyramids built block by block in zarr, OME-TIFF from them.

Nothing here holds a whole level in memory: levels are zarr arrays, read and written in blocks.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from wsi_damm.util.files import atomic_write

BLOCK = 2048  # pixels per side of the blocks the pyramid builder reads
TOP_CHUNK = 1024  # chunk side at full resolution: the bioformats2raw default; zarr costs ~1 ms per chunk written


def fast_codec(dtype: np.dtype) -> BloscCodec:
    shuffle = BloscShuffle.bitshuffle if np.dtype(dtype).itemsize > 1 else BloscShuffle.shuffle
    return BloscCodec(cname="lz4", clevel=5, shuffle=shuffle)


def halve(block: np.ndarray) -> np.ndarray:
    """2×2 mean of a (C, H, W) block; a trailing odd row/column is averaged with itself."""
    c, h, w = block.shape
    if h % 2 or w % 2:
        block = np.pad(block, ((0, 0), (0, h % 2), (0, w % 2)), mode="edge")
    f = block if block.dtype == np.float32 else block.astype(np.float32)
    out = f[:, 0::2, 0::2] + f[:, 1::2, 0::2]
    out += f[:, 0::2, 1::2]
    out += f[:, 1::2, 1::2]
    out *= 0.25
    if np.issubdtype(block.dtype, np.integer):
        info = np.iinfo(block.dtype)
        return np.clip(np.rint(out), info.min, info.max).astype(block.dtype)
    return out.astype(block.dtype, copy=False)


def level_chunk(level: int) -> int:
    """Chunk side of pyramid level `level`: TOP_CHUNK halving with the level down to 256, so a
    TOP_CHUNK-aligned block of level 0 halves into whole chunks of levels 1 and 2 as well."""
    return max(256, TOP_CHUNK >> level)


def create_level(
    group: zarr.Group, name: str, shape: tuple[int, ...], dtype: np.dtype, level: int, dimension_names: tuple[str, ...] | None = None
) -> zarr.Array:
    """An empty (C, H, W) pyramid level chunked by channel and `level_chunk(level)` squares (`writable`)."""
    side = level_chunk(level)
    return writable(
        group.create_array(
            name,
            shape=shape,
            dtype=dtype,
            chunks=(1, min(side, shape[1]), min(side, shape[2])),
            compressors=fast_codec(dtype),
            fill_value=0,
            dimension_names=dimension_names,
        )
    )


def writable(array: zarr.Array) -> zarr.Array:
    """`array` storing every chunk written, even an all-zero one: zarr's emptiness check compares each
    element to the fill value, which for float16 costs about as much as compressing the chunk. Not
    kept in the file: an array opened again needs this again."""
    return array.with_config({"write_empty_chunks": True})


def pyramid_shapes(height: int, width: int, min_size: int = 512) -> list[tuple[int, int]]:
    """Level shapes halving (rounding up) until the longer side is at most `min_size`."""
    shapes = [(height, width)]
    while max(shapes[-1]) > min_size:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def build_pyramid(
    group: zarr.Group, base: str = "", min_size: int = 512, dimension_names: tuple[str, ...] | None = None, existing: int = 1
) -> list[zarr.Array]:
    """Levels `base/0`, `base/1`, … (or `0`, `1`, … at the root) halving to ≤ `min_size`.

    The first `existing` levels are already written (a caller may produce level 1 while it
    writes level 0); the rest are made from the last one, block by block.
    """
    name = lambda i: f"{base}/{i}" if base else str(i)  # noqa: E731
    levels = [group[name(i)] for i in range(existing)]
    c, h, w = levels[0].shape
    shapes = pyramid_shapes(h, w, min_size)
    for i, (lh, lw) in enumerate(shapes[existing:], start=existing):
        src = levels[-1]
        dst = create_level(group, name(i), (c, lh, lw), src.dtype, i, dimension_names)
        for y in range(0, src.shape[1], BLOCK):
            for x in range(0, src.shape[2], BLOCK):
                block = np.asarray(src[:, y : y + BLOCK, x : x + BLOCK])
                small = halve(block)
                dst[:, y // 2 : y // 2 + small.shape[1], x // 2 : x // 2 + small.shape[2]] = small
        levels.append(dst)
    return levels[: len(shapes)]


def _tiles(level: zarr.Array, tile: int, channels: list[int], dtype: np.dtype, values=None) -> Iterator[np.ndarray]:
    """Tiles in TIFF order (channel, row, column), read one band of rows at a time; `values` maps stored
    values to written ones (e.g. normalised NP → measured intensity)."""
    _, h, w = level.shape
    for ch in channels:
        for y in range(0, h, tile):
            band = np.asarray(level[ch, y : y + tile, :])
            band = (values(band.astype(np.float64)) if values is not None else band).astype(dtype, copy=False)
            for x in range(0, w, tile):
                t = band[:, x : x + tile]
                if t.shape != (tile, tile):
                    t = np.pad(t, ((0, tile - t.shape[0]), (0, tile - t.shape[1])))
                yield np.ascontiguousarray(t)


def write_ome_tiff(
    path: str | Path,
    levels: list[zarr.Array],
    channel_names: list[str],
    mpp: float | None,
    tile: int = 256,
    compression: str = "zlib",
    level: int = 4,
    channels: list[int] | None = None,
    dtype: np.dtype | None = None,
    description: str | None = None,
    values=None,
) -> None:
    """Tiled pyramidal OME-TIFF (SubIFDs) from zarr levels; written to a temp name, then renamed.
    `description` becomes the OME Image's Description (provenance a viewer shows); `values` transforms
    the stored values as they are written (a callable over float64 arrays)."""
    channels = list(range(levels[0].shape[0])) if channels is None else list(channels)
    c, h, w = len(channels), levels[0].shape[1], levels[0].shape[2]
    dtype = np.dtype(dtype or levels[0].dtype)
    metadata: dict = {"axes": "CYX", "Channel": {"Name": list(channel_names)}}
    if description:
        metadata["Description"] = description
    resolution = None
    if mpp:
        metadata.update(PhysicalSizeX=mpp, PhysicalSizeXUnit="µm", PhysicalSizeY=mpp, PhysicalSizeYUnit="µm")
        resolution = (1e4 / mpp, 1e4 / mpp)
    opts = dict(
        tile=(tile, tile),
        compression=compression,
        compressionargs={"level": level},
        photometric="minisblack",
        dtype=dtype,
        maxworkers=os.cpu_count(),
    )
    if mpp:
        opts["resolutionunit"] = "CENTIMETER"

    def write(tmp: Path) -> None:
        with tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tif:
            tif.write(
                _tiles(levels[0], tile, channels, dtype, values),
                shape=(c, h, w),
                subifds=len(levels) - 1,
                resolution=resolution,
                metadata=metadata,
                **opts,
            )
            for i, lev in enumerate(levels[1:], start=1):
                res = (1e4 / (mpp * 2**i),) * 2 if mpp else None
                tif.write(
                    _tiles(lev, tile, channels, dtype, values),
                    shape=(c,) + lev.shape[1:],
                    subfiletype=1,
                    resolution=res,
                    metadata=None,
                    **opts,
                )

    atomic_write(Path(path), write)


def ome_zarr_attrs(name: str, n_levels: int, mpp: float | None, channels: list[dict], factor: int = 1) -> dict:
    """`ome` attributes of an OME-Zarr 0.5 image: multiscales (c/y/x, µm when known) + omero.

    Pixel i of level L averages full-resolution pixels [f·2^L·i, f·2^L·(i+1)) (f = `factor`, for
    images stored in f × f blocks), so its centre sits (f·2^L − 1)/2 pixels past their first one:
    the translation that keeps every level and image on the slide's grid in a viewer.
    """
    unit = {"unit": "micrometer"} if mpp else {}
    px = mpp or 1.0

    def transforms(level: int) -> list[dict]:
        step = factor * 2**level
        scale = [{"type": "scale", "scale": [1.0, px * step, px * step]}]
        shift = px * (step - 1) / 2
        return scale + ([{"type": "translation", "translation": [0.0, shift, shift]}] if shift else [])

    return {
        "version": "0.5",
        "multiscales": [
            {
                "name": name,
                "axes": [{"name": "c", "type": "channel"}, {"name": "y", "type": "space", **unit}, {"name": "x", "type": "space", **unit}],
                "datasets": [{"path": str(i), "coordinateTransformations": transforms(i)} for i in range(n_levels)],
                "type": "local_mean",
            }
        ],
        "omero": {
            "channels": [
                {
                    "label": ch["label"],
                    "color": ch["color"],
                    "active": True,
                    "coefficient": 1,
                    "family": "linear",
                    "inverted": False,
                    "window": {"min": ch["min"], "max": ch["max"], "start": ch["min"], "end": ch["max"]},
                }
                for ch in channels
            ],
            "rdefs": {"model": "color"},
        },
    }
