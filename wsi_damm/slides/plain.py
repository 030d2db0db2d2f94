"""Plain images (JPEG, PNG, BMP): what many microscopes export — RGB composites, red CD31, blue DAPI,
green lectin or NP. One level, channels R, G, B (or one grey channel). They carry no pixel size, so
the caller must declare one. JPEG and PNG cannot be read region by region: the image is decoded once,
on first read, behind the same size guard as every slide."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from wsi_damm.slides.base import DEFAULT_MAX_BYTES, Level, Slide, check_declared_size
from wsi_damm.util.errors import InputError

#: JPEG chroma subsampling as Pillow reports it (JpegImagePlugin.get_sampling)
JPEG_SAMPLING = {0: "4:4:4", 1: "4:2:2", 2: "4:2:0"}
GREY_MODES = ("1", "L", "LA", "I", "F")
COLOUR_MODES = ("RGB", "RGBA", "P", "YCbCr", "CMYK")


def plain_format(path: str | Path) -> str | None:
    """The plain-image format of `path` from its signature (not its name), or None."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"BM"):
        return "BMP"
    return None


def _open_image(path: str):
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # our own guard (check_declared_size) decides what is too large
    try:
        return Image.open(path)
    finally:
        Image.MAX_IMAGE_PIXELS = limit


class PlainImageSlide(Slide):
    def __init__(self, path: str | Path, mpp: float | None, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.path = str(path)
        self.format = plain_format(self.path)
        try:
            image = _open_image(self.path)
        except Exception as exc:
            raise InputError(self.path, f"cannot open the {self.format or 'image'} file: {type(exc).__name__}: {exc}") from exc
        with image:
            mode, (w, h) = image.mode, image.size
            self.chroma_subsampling = None
            if self.format == "JPEG" and mode in ("RGB", "YCbCr"):
                from PIL import JpegImagePlugin

                self.chroma_subsampling = JPEG_SAMPLING.get(JpegImagePlugin.get_sampling(image))
        if mode in GREY_MODES or mode.startswith("I;16"):
            names = ["gray"]
        elif mode in COLOUR_MODES:
            names = ["R", "G", "B"]
        else:
            raise InputError(self.path, f"has the unsupported image mode {mode!r}", "save it as RGB or greyscale")
        if mpp is None:
            raise InputError(self.path, f"is a plain {self.format} image and carries no pixel size", "declare it with --mpp <µm per pixel>")
        if not 0.01 <= mpp <= 100:
            raise InputError("--mpp", f"must be a pixel size in µm between 0.01 and 100, got {mpp}")
        self._mode = mode
        self.dtype = np.dtype(np.uint16 if mode.startswith("I;16") else np.float32 if mode in ("I", "F") else np.uint8)
        check_declared_size(self.path, (len(names), h, w), self.dtype, max_bytes)
        self.channel_names = names
        self.levels = [Level((len(names), h, w), 1.0)]
        self.mpp = float(mpp)
        self._pixels: np.ndarray | None = None
        self._lock = threading.Lock()

    def _decoded(self) -> np.ndarray:
        with self._lock:
            if self._pixels is None:
                with _open_image(self.path) as image:
                    if len(self.channel_names) == 3:
                        image = image.convert("RGB")
                    elif self._mode in ("1", "LA"):
                        image = image.convert("L")
                    arr = np.asarray(image)
                self._pixels = np.ascontiguousarray(np.moveaxis(arr, -1, 0) if arr.ndim == 3 else arr[None]).astype(self.dtype, copy=False)
            return self._pixels

    def _read(self, level: int, y: int, x: int, h: int, w: int, channels: tuple[int, ...]) -> np.ndarray:
        return self._decoded()[list(channels), y : y + h, x : x + w]

    def close(self) -> None:
        self._pixels = None
