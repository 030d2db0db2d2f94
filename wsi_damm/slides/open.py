"""Route a path to the reader that understands it, with clear errors for what is not a slide."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from .base import DEFAULT_MAX_BYTES, Slide


def open_file(path: str | Path, planes: dict[str, int] | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
              mpp: float | None = None) -> Slide:
    """Open one slide file with all its channels: TIFF family via tifffile, JPEG / PNG / BMP via Pillow,
    else OpenSlide. `mpp` declares the pixel size of a file that carries none (plain images need it);
    a file's own pixel size always wins."""
    p = Path(path)
    if not p.exists():
        raise InputError(p, "no such file")
    if p.is_dir():
        raise InputError(p, "is a directory, not a slide file", "pass the slide file itself")
    if p.stat().st_size == 0:
        raise InputError(p, "is an empty file (0 bytes)")
    from .plain import PlainImageSlide, plain_format
    from .tiff import TiffSlide, is_tiff

    if is_tiff(p):
        slide: Slide = TiffSlide(p, planes=planes, max_bytes=max_bytes)
    elif plain_format(p):
        return PlainImageSlide(p, mpp, max_bytes=max_bytes)
    else:
        from .openslide_reader import OpenSlideSlide

        slide = OpenSlideSlide(p, max_bytes=max_bytes)
    if slide.mpp is None and mpp is not None:
        slide.mpp = float(mpp)
    return slide
