"""TIFF family reader (OME-TIFF, QPTIFF, SVS, ImageJ, plain stacks) through tifffile's zarr view.

Every TIFF goes through tifffile, never OpenSlide: OpenSlide reads multi-channel 16-bit TIFFs as
channel 0 shifted to 8 bits. Pixels are read tile by tile via `aszarr`, never a level at once.
"""

from __future__ import annotations

import logging
import re
import threading
import warnings
import xml.etree.ElementTree as ET
from collections import OrderedDict
from pathlib import Path

import numpy as np
import tifffile
import zarr

from wsi_damm.slides.base import DEFAULT_MAX_BYTES, DEFAULT_MAX_CHUNK_BYTES, MAX_CHANNELS, Level, Slide, check_declared_size
from wsi_damm.util.errors import InputError

logging.getLogger("tifffile").setLevel(logging.CRITICAL)  # corrupt tags are reported by our own errors

CHANNEL_AXES = "CSIQ"
SPATIAL_AXES = "YX"
_UNIT_TO_UM = {"µm": 1.0, "um": 1.0, "micron": 1.0, "micrometer": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}


def is_tiff(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(4)
    return head in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


class _TiffLog(logging.Handler):
    """Collects what tifffile logs while a file opens (it logs, not raises, on IFDs and tag values
    past the end of a file — the mark of a truncated copy)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> _TiffLog:
        self._logger = logging.getLogger("tifffile")
        self._saved = self._logger.level, self._logger.propagate
        self._logger.setLevel(logging.ERROR)
        self._logger.propagate = False
        self._logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._saved[0])
        self._logger.propagate = self._saved[1]

    def offsets_beyond(self, size: int) -> int | None:
        found = [int(m) for msg in self.messages for m in re.findall(r"invalid (?:value|page) offset (\d+)", msg)]
        return next((o for o in found if o >= size), None)


class TiffSlide(Slide):
    def __init__(
        self,
        path: str | Path,
        planes: dict[str, int] | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
        tile_cache_bytes: int = 128 * 2**20,
    ) -> None:
        self.path = str(path)
        planes = {k.upper(): v for k, v in (planes or {}).items()}
        try:
            with warnings.catch_warnings(), _TiffLog() as log:
                warnings.simplefilter("ignore")
                self._tif = tifffile.TiffFile(self.path)
                series_list = list(self._tif.series)
        except InputError:
            raise
        except Exception as exc:
            raise InputError(self.path, f"not a readable TIFF: {type(exc).__name__}: {exc}") from exc
        beyond = log.offsets_beyond(self._tif.filehandle.size)
        if beyond:
            self._tif.close()
            raise InputError(
                self.path,
                f"is truncated: it points to byte {beyond} but holds {self._tif.filehandle.size} bytes",
                "copy or export the file again",
            )
        try:
            self._setup(series_list, planes, max_bytes, max_chunk_bytes, tile_cache_bytes)
        except Exception:
            self._tif.close()
            raise

    def _setup(self, series_list: list, planes: dict[str, int], max_bytes: int, max_chunk_bytes: int, tile_cache_bytes: int) -> None:
        if not series_list:
            raise InputError(self.path, "TIFF holds no image series (empty or corrupted IFDs)")
        series = series_list[0]
        axes = series.axes.upper()
        shape = tuple(int(s) for s in series.shape)
        check_declared_size(self.path, shape, series.dtype, max_bytes)
        if "Y" not in axes or "X" not in axes:
            raise InputError(self.path, f"image axes {axes!r} have no Y and X")
        channel_axes = [a for a in axes if a in CHANNEL_AXES and shape[axes.index(a)] > 1]
        if len(channel_axes) > 1:
            raise InputError(self.path, f"several channel-like axes {channel_axes} in {axes} {shape}", "export one channel axis")
        self._channel_axis = channel_axes[0] if channel_axes else None
        self._index_fixed: dict[str, int] = {}
        for a, n in zip(axes, shape):
            if a in SPATIAL_AXES or a == self._channel_axis:
                continue
            if n > 1 and a not in planes:
                raise InputError(
                    self.path,
                    f"has a {a} axis of size {n} (axes {axes}, shape {shape})",
                    f"choose one plane with --plane {a}=<0..{n - 1}>",
                )
            k = planes.get(a, 0)
            if not 0 <= k < n:
                raise InputError(self.path, f"plane {a}={k} outside 0..{n - 1}")
            self._index_fixed[a] = k
        self._axes = axes
        n_channels = shape[axes.index(self._channel_axis)] if self._channel_axis else 1
        if n_channels > MAX_CHANNELS:
            raise InputError(self.path, f"declares {n_channels} channels, more than {MAX_CHANNELS} (corrupt header?)")
        _check_chunk_size(self.path, series, max_chunk_bytes)

        level_series = list(series.levels)
        if len(level_series) == 1 and self._tif.is_ome:
            level_series += _pyramid_from_extra_series(series, series_list[1:])
        self._arrays = []
        self._tile_pages: list[list | None] = []
        self._cache: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._cache_bytes = 0
        self._cache_limit = tile_cache_bytes
        self.levels = []
        width0 = shape[axes.index("X")]
        for i, lev in enumerate(level_series):
            store = series.aszarr(level=i) if i < len(series.levels) else lev.aszarr()
            arr = zarr.open_array(store, mode="r", zarr_format=2)
            lshape = tuple(int(s) for s in lev.shape)
            if len(lshape) != len(shape):
                break
            h, w = lshape[axes.index("Y")], lshape[axes.index("X")]
            self._arrays.append(arr)
            self._tile_pages.append(_plane_pages(lev, axes, n_channels))
            self.levels.append(Level((n_channels, h, w), width0 / w))
        self.dtype = np.dtype(series.dtype).newbyteorder("=")
        self.channel_names = _channel_names(self._tif, series, n_channels, self._channel_axis)
        self.mpp = _mpp(self._tif, series)

    def _read(self, level: int, y: int, x: int, h: int, w: int, channels: tuple[int, ...]) -> np.ndarray:
        pages = self._tile_pages[level]
        if pages is not None:
            return self._read_tiles(level, pages, channels, y, x, h, w)
        index = []
        for a in self._axes:
            if a == "Y":
                index.append(slice(y, y + h))
            elif a == "X":
                index.append(slice(x, x + w))
            elif a == self._channel_axis:
                index.append(slice(None))
            else:
                index.append(self._index_fixed.get(a, 0))
        out = np.asarray(self._arrays[level][tuple(index)])
        kept = [a for a in self._axes if a in SPATIAL_AXES or a == self._channel_axis]
        if self._channel_axis is None:
            out = out[None]
            kept = ["C"] + kept
        out = np.transpose(out, [kept.index(self._channel_axis or "C"), kept.index("Y"), kept.index("X")])
        return np.ascontiguousarray(out[list(channels)], dtype=self.dtype)

    def _read_tiles(self, level: int, pages: list, channels: tuple[int, ...], y: int, x: int, h: int, w: int) -> np.ndarray:
        """Decode just the tiles under the region, in the calling thread, through a small cache.

        zarr's synchronous API funnels every store read through one event-loop thread, which
        serialises decoding across dask workers; decoding here runs workers in parallel
        (imagecodecs releases the GIL). The cache keeps the tile rows that neighbouring,
        overlapping patch rows share, so each tile is decoded about once.
        """
        key = pages[0].keyframe
        th, tw = key.tilelength, key.tilewidth
        per_row = -(-key.imagewidth // tw)
        out = np.empty((len(channels), h, w), self.dtype)
        for k, c in enumerate(channels):
            for ty in range(y // th, (y + h - 1) // th + 1):
                for tx in range(x // tw, (x + w - 1) // tw + 1):
                    tile = self._tile(level, c, pages[c], ty * per_row + tx)
                    ya, xa = max(y, ty * th), max(x, tx * tw)
                    yb, xb = min(y + h, (ty + 1) * th), min(x + w, (tx + 1) * tw)
                    out[k, ya - y : yb - y, xa - x : xb - x] = tile[ya - ty * th : yb - ty * th, xa - tx * tw : xb - tx * tw]
        return out

    def _tile(self, level: int, channel: int, page, index: int) -> np.ndarray:
        cache_key = (level, channel, index)
        with self._cache_lock:
            tile = self._cache.get(cache_key)
            if tile is not None:
                self._cache.move_to_end(cache_key)
                return tile
        fh = self._tif.filehandle
        with fh.lock:
            fh.seek(page.dataoffsets[index])
            data = fh.read(page.databytecounts[index])
        tile = page.keyframe.decode(data, index)[0][0, :, :, 0]
        with self._cache_lock:
            self._cache[cache_key] = tile
            self._cache_bytes += tile.nbytes
            while self._cache_bytes > self._cache_limit and self._cache:
                self._cache_bytes -= self._cache.popitem(last=False)[1].nbytes
        return tile

    def close(self) -> None:
        self._tif.close()


def _plane_pages(level_series, axes: str, n_channels: int) -> list | None:
    """Pages of a tiled one-plane-per-channel level (OME-TIFF / QPTIFF), else None (use zarr)."""
    if axes not in ("CYX", "IYX", "QYX", "YX"):
        return None
    pages = list(level_series.pages)
    if len(pages) != n_channels or any(p is None for p in pages):
        return None
    key = pages[0].keyframe
    if not key.is_tiled or key.samplesperpixel != 1 or key.imagedepth > 1:
        return None
    if any(p.keyframe.shape != key.shape or len(p.dataoffsets) != len(key.dataoffsets) for p in pages):
        return None
    return pages


def _check_chunk_size(path: str, series, max_chunk_bytes: int) -> None:
    page = series.keyframe
    rows = page.tilelength or page.rowsperstrip or page.imagelength
    cols = page.tilewidth or page.imagewidth
    samples = page.samplesperpixel if page.planarconfig == 1 else 1
    nbytes = int(min(rows, page.imagelength)) * int(cols) * int(samples) * np.dtype(series.dtype).itemsize
    if nbytes > max_chunk_bytes:
        raise InputError(
            path,
            f"stores pixels in blocks of {nbytes / 2**20:.0f} MiB (untiled), too large to read patch by patch",
            "convert to a tiled pyramidal OME-TIFF (e.g. bfconvert -tilex 512 -tiley 512 -pyramid-resolutions 6)",
        )


def _pyramid_from_extra_series(base, others: list) -> list:
    """Older OME writers store each pyramid level as its own series: take those that halve."""
    levels = []
    prev = base
    for s in others:
        if s.axes != base.axes or s.dtype != base.dtype:
            break
        y, x = base.axes.index("Y"), base.axes.index("X")
        same_other = all(s.shape[i] == base.shape[i] for i in range(len(base.shape)) if i not in (y, x))
        ratio = prev.shape[x] / s.shape[x]
        if not same_other or not (1.5 < ratio < 4.5) or abs(prev.shape[y] / s.shape[y] - ratio) > 0.1 * ratio:
            break
        levels.append(s)
        prev = s
    return levels


def _xml(text: str) -> ET.Element | None:
    try:
        return ET.fromstring(re.sub(r"^\s*<\?xml[^>]*\?>", "", text))
    except ET.ParseError:
        return None


def _strip_ns(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _ome_pixels(tif: tifffile.TiffFile) -> ET.Element | None:
    root = _xml(tif.ome_metadata or "")
    if root is None:
        return None
    images = [el for el in root if _strip_ns(el.tag) == "Image"]
    if not images:  # we read the first series, which is the first OME Image
        return None
    return next((el for el in images[0] if _strip_ns(el.tag) == "Pixels"), None)


def _channel_names(tif: tifffile.TiffFile, series, n: int, channel_axis: str | None) -> list[str]:
    names: list[str | None] = [None] * n
    if tif.is_ome:
        pixels = _ome_pixels(tif)
        if pixels is not None:
            chans = [el.get("Name") for el in pixels if _strip_ns(el.tag) == "Channel"]
            if len(chans) == n:
                names = chans
    elif tif.is_qpi:
        for i, page in enumerate(series.pages[:n]):
            root = _xml(getattr(page, "description", "") or "")
            el = root.find("Name") if root is not None else None
            if el is not None and el.text:
                names[i] = el.text.strip()
    elif tif.is_imagej:
        labels = (tif.imagej_metadata or {}).get("Labels")
        if isinstance(labels, (list, tuple)) and len(labels) == n:
            names = list(labels)
    if channel_axis == "S" and n in (3, 4) and series.keyframe.photometric in (2, 6):  # RGB, YCbCr
        names = list("RGBA"[:n])
    out = [str(nm).strip() if nm else f"C{i}" for i, nm in enumerate(names)]
    if len(set(x.lower() for x in out)) != len(out):  # duplicate names are unusable as keys
        out = [f"{nm}_{i}" for i, nm in enumerate(out)]
    return out


def _plausible(mpp: float | None) -> float | None:
    return mpp if mpp is not None and 0.01 <= mpp <= 100 else None


def _mpp(tif: tifffile.TiffFile, series) -> float | None:
    if tif.is_ome:
        pixels = _ome_pixels(tif)
        if pixels is not None and pixels.get("PhysicalSizeX"):
            unit = pixels.get("PhysicalSizeXUnit", "µm")
            if unit in _UNIT_TO_UM:
                return _plausible(float(pixels.get("PhysicalSizeX")) * _UNIT_TO_UM[unit])
            return None
    page = series.keyframe
    desc = tif.pages[0].description or ""
    if tif.is_qpi:
        m = re.search(r"<PixelSizeMicrons>([0-9.eE+-]+)<", desc)
        if m:
            return _plausible(float(m.group(1)))
    if tif.is_svs:
        m = re.search(r"MPP\s*=\s*([0-9.eE+-]+)", desc)
        if m:
            return _plausible(float(m.group(1)))
    if tif.is_imagej:
        meta = tif.imagej_metadata or {}
        if meta.get("unit") in ("micron", "um", "µm") and "XResolution" in page.tags:
            num, den = page.tags["XResolution"].value
            return _plausible(den / num) if num else None
    tags = page.tags
    if "XResolution" in tags and "ResolutionUnit" in tags:
        num, den = tags["XResolution"].value
        unit = int(tags["ResolutionUnit"].value)
        if num and den:
            per_unit = num / den
            if unit == 3:
                return _plausible(1e4 / per_unit)
            if unit == 2:
                return _plausible(25400 / per_unit)
    return None
