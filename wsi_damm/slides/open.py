"""Route a path to the reader that understands it, with clear errors for what is not a slide."""

from __future__ import annotations

from pathlib import Path

from wsi_damm.slides.base import DEFAULT_MAX_BYTES, Slide
from wsi_damm.util.errors import InputError

#: Vendor formats we do not decode, by extension (a .vsi is a TIFF that holds only the overview; its
#: pixels sit in .ets files beside it), and by signature where they have one.
CONVERT_FIRST = {".czi": "a Zeiss CZI file", ".nd2": "a Nikon ND2 file", ".lif": "a Leica LIF file", ".vsi": "an Olympus/Evident VSI file"}
SIGNATURES = {b"ZISRAWFILE": ".czi", b"\xda\xce\xbe\x0a": ".nd2"}
CONVERTERS = "convert it with bioformats2raw (→ OME-Zarr) or bfconvert (→ OME-TIFF), both from the Bio-Formats project"


def _vendor_format(p: Path) -> str | None:
    with open(p, "rb") as f:
        head = f.read(16)
    suffix = next((ext for sig, ext in SIGNATURES.items() if head.startswith(sig)), p.suffix.lower())
    return CONVERT_FIRST.get(suffix)


def open_file(
    path: str | Path, planes: dict[str, int] | None = None, max_bytes: int = DEFAULT_MAX_BYTES, mpp: float | None = None
) -> Slide:
    """Open one slide with all its channels: TIFF family via tifffile, OME-Zarr (a directory) via zarr,
    JPEG / PNG / BMP via Pillow, else OpenSlide; vendor formats we cannot decode are refused with the
    converter to use. `mpp` declares the pixel size of a slide that carries none (plain images need
    it); a slide's own pixel size always wins."""
    p = Path(path)
    if not p.exists():
        raise InputError(p, "no such file")
    slide: Slide
    if p.is_dir():
        from wsi_damm.slides.omezarr import OmeZarrSlide, is_ome_zarr

        if not is_ome_zarr(p):
            raise InputError(p, "is a directory but not an OME-Zarr image (no zarr.json, .zgroup or .zattrs)", "pass the slide file itself")
        slide = OmeZarrSlide(p, planes=planes, max_bytes=max_bytes)
    else:
        if p.stat().st_size == 0:
            raise InputError(p, "is an empty file (0 bytes)")
        vendor = _vendor_format(p)
        if vendor:
            raise InputError(p, f"is {vendor}, which wsi-damm does not read", CONVERTERS)
        from wsi_damm.slides.plain import PlainImageSlide, plain_format
        from wsi_damm.slides.tiff import TiffSlide, is_tiff

        if is_tiff(p):
            slide = TiffSlide(p, planes=planes, max_bytes=max_bytes)
        elif plain_format(p):
            return PlainImageSlide(p, mpp, max_bytes=max_bytes)
        else:
            from wsi_damm.slides.openslide_reader import OpenSlideSlide

            slide = OpenSlideSlide(p, max_bytes=max_bytes)
    if slide.mpp is None and mpp is not None:
        slide.mpp = float(mpp)
    return slide
