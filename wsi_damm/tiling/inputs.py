"""What a command's slide arguments become: registered `SlideSpec`s.

Slide files (with a channel map) or a manifest, a plane per extra axis, the declared-size limit,
the size tolerance between per-channel files, then channel registration. Every command that
reads slides, the demo and the study go through `resolve_slides`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from wsi_damm.slides import SlideSpec, parse_channel_map, specs_from_manifest, specs_from_paths
from wsi_damm.tiling.registration import register_specs
from wsi_damm.util.errors import InputError

DEFAULT_MAX_SLIDE_GB = 256.0


def parse_planes(values: Sequence[str]) -> dict[str, int]:
    """`("Z=0", "T=3")` → `{"Z": 0, "T": 3}`."""
    planes = {}
    for v in values:
        axis, _, idx = v.partition("=")
        if not axis or not idx.lstrip("-").isdigit():
            raise InputError("--plane", f"{v!r} is not AXIS=INDEX", "e.g. --plane Z=0")
        planes[axis.strip().upper()] = int(idx)
    return planes


def resolve_slides(
    slides: Sequence[str | Path] = (),
    manifest: str | Path | None = None,
    channels: str | None = None,
    planes: dict[str, int] | None = None,
    max_slide_gb: float = DEFAULT_MAX_SLIDE_GB,
    required: tuple[str, ...] = ("vessels",),
    register: str = "none",
    size_tolerance: float = 0.0,
    qc: Path | None = None,
    log: Callable[[str], None] | None = None,
    mpp: float | None = None,
) -> list[SlideSpec]:
    """Slide files (channels found by name, or mapped by `channels`: "vessels=CD31,nuclei=DAPI") or a
    manifest CSV (exactly one of them), checked for the `required` roles and aligned by `register`
    ("none", "translation", "rigid"; overlays in `qc`). `mpp` is the pixel size of files that carry
    none (JPEG / PNG exports must be given one)."""
    if bool(slides) == bool(manifest):
        raise InputError(None, "give slide files or --manifest (exactly one of them)")
    max_bytes = int(max_slide_gb * 2**30)
    planes = planes or {}
    if manifest:
        if channels:
            raise InputError("--channels", "cannot be combined with --manifest (the manifest names the channels)")
        specs = specs_from_manifest(manifest, required=required, planes=planes, max_bytes=max_bytes, mpp=mpp)
    else:
        specs = specs_from_paths(
            [str(s) for s in slides], parse_channel_map(channels), required=required, planes=planes, max_bytes=max_bytes, mpp=mpp
        )
    specs = [replace(s, size_tolerance=size_tolerance) for s in specs]
    return register_specs(specs, register, qc, log=log)
