"""Vendor formats (DICOM, MRXS, NDPI sets, VMS, …) through OpenSlide: RGB, channels R, G, B."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from wsi_damm.slides.base import DEFAULT_MAX_BYTES, Level, Slide, check_declared_size
from wsi_damm.util.errors import InputError


class OpenSlideSlide(Slide):
    def __init__(self, path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        import openslide

        self.path = str(path)
        try:
            self._osr = openslide.OpenSlide(self.path)
            dims = list(self._osr.level_dimensions)
            downsamples = list(self._osr.level_downsamples)
            props = dict(self._osr.properties)
        except openslide.OpenSlideUnsupportedFormatError as exc:
            raise InputError(
                self.path,
                "not a supported slide format (neither TIFF nor an OpenSlide vendor format)",
                "convert it to OME-TIFF with bfconvert or QuPath",
            ) from exc
        except Exception as exc:
            raise InputError(self.path, f"OpenSlide cannot open it: {exc}") from exc
        check_declared_size(self.path, (3, dims[0][1], dims[0][0]), np.uint8, max_bytes)
        self.levels = [Level((3, h, w), float(d)) for (w, h), d in zip(dims, downsamples)]
        self.channel_names = ["R", "G", "B"]
        self.dtype = np.dtype(np.uint8)
        mpp = props.get("openslide.mpp-x")
        self.mpp = float(mpp) if mpp and 0.01 <= float(mpp) <= 100 else None
        self._lock = threading.Lock()

    def _read(self, level: int, y: int, x: int, h: int, w: int, channels: tuple[int, ...]) -> np.ndarray:
        ds = self.levels[level].downsample
        with self._lock:  # an OpenSlide error is sticky; serialise so it is raised once, cleanly
            rgba = np.asarray(self._osr.read_region((round(x * ds), round(y * ds)), level, (w, h)))
        rgb = np.where(rgba[..., 3:4] > 0, rgba[..., :3], 0)  # outside the scanned area: dark, not white
        return np.ascontiguousarray(np.moveaxis(rgb, -1, 0)[list(channels)])

    def close(self) -> None:
        self._osr.close()
