"""Slide specs from the API's arguments (paths or a manifest, channel roles, planes, registration)."""

from __future__ import annotations

from pathlib import Path


def slide_specs(
    slides, manifest, channels, plane, max_slide_gb, required=("vessels",), register="none", size_tolerance=0.0, qc=None, mpp=None, log=None
):
    from wsi_damm.tiling.inputs import parse_planes, resolve_slides

    if isinstance(slides, (str, Path)):
        slides = [slides]
    return resolve_slides(
        list(slides or ()), manifest, channels, parse_planes(plane), max_slide_gb, required, register, size_tolerance, qc, log=log, mpp=mpp
    )
