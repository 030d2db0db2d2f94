"""The one interface every slide reader implements: lazy, level-aware, channel-first."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import dask.array as da
import numpy as np
from dask.base import tokenize

from wsi_damm.util.errors import InputError

#: Refuse slides whose declared pixel data exceed this many bytes (fuzzed TIFFs declare terabytes).
DEFAULT_MAX_BYTES = 256 * 2**30
#: Refuse slides whose single decode unit (tile / strip) exceeds this: reading one patch decodes it.
DEFAULT_MAX_CHUNK_BYTES = 1 * 2**30
MAX_CHANNELS = 1024


@dataclass(frozen=True)
class Level:
    shape: tuple[int, int, int]  # (C, H, W)
    downsample: float  # relative to level 0


class Slide(ABC):
    """A multi-channel image pyramid; pixels are only read region by region."""

    path: str
    channel_names: list[str]
    levels: list[Level]
    mpp: float | None
    dtype: np.dtype

    @abstractmethod
    def _read(self, level: int, y: int, x: int, h: int, w: int, channels: tuple[int, ...]) -> np.ndarray:
        """Raw (len(channels), h, w) read of an in-bounds region."""

    @abstractmethod
    def close(self) -> None: ...

    def read_region(self, level: int, y: int, x: int, h: int, w: int, channels: tuple[int, ...] | None = None) -> np.ndarray:
        """(C, h, w) pixels of `level` (only `channels` if given); decoder failures → InputError."""
        n_channels, height, width = self.levels[level].shape
        channels = tuple(range(n_channels)) if channels is None else tuple(channels)
        c = len(channels)
        if not (0 <= y and 0 <= x and h > 0 and w > 0 and y + h <= height and x + w <= width):
            raise ValueError(f"region y={y} x={x} h={h} w={w} outside level {level} of shape {(height, width)}")
        try:
            out = self._read(level, y, x, h, w, channels)
        except InputError:
            raise
        except MemoryError as exc:
            raise InputError(self.path, f"decoding level {level} needs more memory than available ({exc})") from exc
        except Exception as exc:  # decoders raise anything from ValueError to RuntimeError
            raise InputError(
                self.path,
                f"cannot decode pixels of level {level} at y={y}, x={x}: {type(exc).__name__}: {exc}",
                "the file is damaged or uses an unsupported compression; re-export it as OME-TIFF",
            ) from exc
        if out.shape != (c, h, w):
            raise InputError(self.path, f"decoder returned shape {out.shape}, expected {(c, h, w)} (corrupted tiles)")
        return out

    def level_array(self, level: int, chunk: int = 1024) -> da.Array:
        """Lazy (C, H, W) dask array of a level, one read task per `chunk`² block."""
        c, height, width = self.levels[level].shape
        name = "slide-level-" + tokenize(self.path, self.channel_names, level, chunk)
        ys = list(range(0, height, chunk))
        xs = list(range(0, width, chunk))
        graph = {
            (name, 0, i, j): (self.read_region, level, y, x, min(chunk, height - y), min(chunk, width - x))
            for i, y in enumerate(ys)
            for j, x in enumerate(xs)
        }
        chunks = ((c,), tuple(min(chunk, height - y) for y in ys), tuple(min(chunk, width - x) for x in xs))
        return da.Array(graph, name, chunks, dtype=self.dtype)

    def best_level_for(self, downsample: float) -> int:
        """Finest level whose downsample does not exceed `downsample` (with 1 % slack)."""
        best = 0
        for i, lev in enumerate(self.levels):
            if lev.downsample <= downsample * 1.01:
                best = i
        return best

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_declared_size(path: str, shape: tuple[int, ...], dtype: np.dtype, max_bytes: int) -> None:
    """Refuse absurd or oversized declared dimensions before any allocation happens."""
    if any(int(s) <= 0 for s in shape):
        raise InputError(path, f"declares an empty image of shape {tuple(shape)}")
    nbytes = int(np.prod([int(s) for s in shape], dtype=object)) * np.dtype(dtype).itemsize
    if nbytes > max_bytes:
        raise InputError(
            path,
            f"declares {tuple(int(s) for s in shape)} {np.dtype(dtype).name} = {nbytes / 2**30:.1f} GiB of pixels, "
            f"over the {max_bytes / 2**30:.0f} GiB limit",
            "the header is corrupt, or raise the limit with --max-slide-gb",
        )
