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

BLOCK = 2048  # pixels per side of the blocks the pyramid builder reads


def fast_codec(dtype: np.dtype) -> BloscCodec:
    shuffle = BloscShuffle.bitshuffle if np.dtype(dtype).itemsize > 1 else BloscShuffle.shuffle
    return BloscCodec(cname="lz4", clevel=5, shuffle=shuffle)


def halve(block: np.ndarray) -> np.ndarray:
    """2×2 mean of a (C, H, W) block; a trailing odd row/column is averaged with itself."""
    c, h, w = block.shape
    if h % 2 or w % 2:
        block = np.pad(block, ((0, 0), (0, h % 2), (0, w % 2)), mode="edge")
    f = block.astype(np.float32)
    out = 0.25 * (f[:, 0::2, 0::2] + f[:, 1::2, 0::2] + f[:, 0::2, 1::2] + f[:, 1::2, 1::2])
    if np.issubdtype(block.dtype, np.integer):
        info = np.iinfo(block.dtype)
        return np.clip(np.rint(out), info.min, info.max).astype(block.dtype)
    return out.astype(block.dtype)


def pyramid_shapes(height: int, width: int, min_size: int = 512) -> list[tuple[int, int]]:
    """Level shapes halving (rounding up) until the longer side is at most `min_size`."""
    shapes = [(height, width)]
    while max(shapes[-1]) > min_size:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def build_pyramid(group: zarr.Group, base: str, min_size: int = 512) -> list[zarr.Array]:
    """Add levels `base/1`, `base/2`, … below the array `base/0`, streamed block by block."""
    levels = [group[f"{base}/0"]]
    c, h, w = levels[0].shape
    for i, (lh, lw) in enumerate(pyramid_shapes(h, w, min_size)[1:], start=1):
        src = levels[-1]
        dst = group.create_array(
            f"{base}/{i}", shape=(c, lh, lw), dtype=src.dtype, chunks=(1, min(256, lh), min(256, lw)),
            compressors=fast_codec(src.dtype), fill_value=0,
        )
        for y in range(0, src.shape[1], BLOCK):
            for x in range(0, src.shape[2], BLOCK):
                block = np.asarray(src[:, y : y + BLOCK, x : x + BLOCK])
                small = halve(block)
                dst[:, y // 2 : y // 2 + small.shape[1], x // 2 : x // 2 + small.shape[2]] = small
        levels.append(dst)
    return levels


def _tiles(level: zarr.Array, tile: int) -> Iterator[np.ndarray]:
    """Tiles in TIFF order (channel, row, column), read one band of rows at a time."""
    c, h, w = level.shape
    for ch in range(c):
        for y in range(0, h, tile):
            band = np.asarray(level[ch, y : y + tile, :])
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
) -> None:
    """Tiled pyramidal OME-TIFF (SubIFDs) from zarr levels; written to a temp name, then renamed."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    c, h, w = levels[0].shape
    dtype = np.dtype(levels[0].dtype)
    metadata: dict = {"axes": "CYX", "Channel": {"Name": list(channel_names)}}
    resolution = None
    if mpp:
        metadata.update(PhysicalSizeX=mpp, PhysicalSizeXUnit="µm", PhysicalSizeY=mpp, PhysicalSizeYUnit="µm")
        resolution = (1e4 / mpp, 1e4 / mpp)
    opts = dict(
        tile=(tile, tile), compression=compression, compressionargs={"level": level},
        photometric="minisblack", dtype=dtype, maxworkers=os.cpu_count(),
    )
    if mpp:
        opts["resolutionunit"] = "CENTIMETER"
    try:
        with tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tif:
            tif.write(
                _tiles(levels[0], tile), shape=(c, h, w), subifds=len(levels) - 1, resolution=resolution,
                metadata=metadata, **opts,
            )
            for i, lev in enumerate(levels[1:], start=1):
                res = (1e4 / (mpp * 2**i),) * 2 if mpp else None
                tif.write(_tiles(lev, tile), shape=lev.shape, subfiletype=1, resolution=res, metadata=None, **opts)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
