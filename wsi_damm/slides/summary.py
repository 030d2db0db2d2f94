"""What `wsi-damm info` says about a slide file: reader, levels, channels, scale, and caveats."""

from __future__ import annotations

from pathlib import Path

from wsi_damm.slides.open import open_file


def slide_summary(path: str | Path, mpp: float | None = None) -> dict:
    """Levels, channels, dtype and pixel size of one slide file, with notes a user should see first."""
    with open_file(path, mpp=mpp) as slide:
        notes = []
        sampling = getattr(slide, "chroma_subsampling", None)
        if sampling and sampling != "4:4:4":
            notes.append(
                f"JPEG with {sampling} chroma subsampling: colour is stored at reduced resolution, so the R, G and B "
                "channels blur into each other at fine scale; export TIFF or PNG for quantitative work"
            )
        if getattr(slide, "format", None) and mpp is not None:
            notes.append(f"pixel size {mpp} µm declared with --mpp (a {slide.format} file carries none)")
        return {
            "file": str(path),
            "reader": type(slide).__name__,
            "channels": list(slide.channel_names),
            "dtype": str(slide.dtype),
            "mpp": slide.mpp,
            "levels": [{"shape": list(lev.shape), "downsample": round(lev.downsample, 4)} for lev in slide.levels],
            **({"chroma_subsampling": sampling} if sampling else {}),
            "notes": notes,
        }
