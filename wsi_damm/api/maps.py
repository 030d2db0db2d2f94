"""The API's functions over predictions and maps: `stitch`, `evaluate`, `compare`, `export`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from wsi_damm.api.inputs import slide_specs
from wsi_damm.api.results import EvaluateResult, PathLike
from wsi_damm.stitching import DEFAULT_BLEND
from wsi_damm.util.errors import InputError


def stitch(
    prediction: PathLike,
    *,
    out: PathLike,
    blend: str = DEFAULT_BLEND,
    tiff: PathLike | None = None,
    workers: int | None = None,
    band_mb: int = 64,
    scheduler: str = "processes",
    tiff_units: str = "normalised",
    resume: bool = False,
    quiet: bool = False,
) -> list[Path]:
    """Blend patch predictions into whole-slide maps (`wsi-damm stitch`); returns the maps. `scheduler`: processes,
    threads, sync or a dask.distributed address."""
    from wsi_damm.stages.stitch import run_stitch

    return run_stitch(
        Path(prediction),
        Path(out),
        blend=blend,
        tiff=Path(tiff) if tiff else None,
        workers=workers,
        progress=not quiet,
        resume=resume,
        band_bytes=band_mb * 2**20,
        scheduler=scheduler,
        tiff_units=tiff_units,
    )


def evaluate(
    maps: Sequence[PathLike] | PathLike,
    *,
    truth: Sequence[PathLike] | PathLike,
    channels: str | None = None,
    clean: Sequence[PathLike] = (),
    regions: Sequence[PathLike] = (),
    mask: str = "tissue",
    mpp: float | None = None,
    viewer: bool = True,
    out: PathLike = "report",
    max_slide_gb: float = 256.0,
    register: str = "none",
    size_tolerance: float = 0.0,
    scheduler: str = "threads",
    quiet: bool = False,
    log=None,
) -> EvaluateResult:
    """Score maps against the measured NP channel (`wsi-damm evaluate`): metrics, figures, report, viewer.
    `scheduler`: threads, sync or a dask.distributed address for the streamed whole-slide numbers."""
    from wsi_damm.stages.evaluate import run_evaluate

    maps = [Path(maps)] if isinstance(maps, (str, Path)) else [Path(m) for m in maps]
    truth = [truth] if isinstance(truth, (str, Path)) else list(truth)
    clean, regions = [Path(c) for c in clean], [Path(r) for r in regions]
    if len(truth) != len(maps):
        raise InputError("--truth", f"give one --truth per map ({len(maps)} maps, {len(truth)} slides)")
    if clean and len(clean) != len(maps):
        raise InputError("--clean", f"give one --clean per map or none ({len(maps)} maps, {len(clean)} fields)")
    if regions and len(regions) != len(maps):
        raise InputError("--regions", f"give one --regions per map or none ({len(maps)} maps, {len(regions)} label images)")
    specs = slide_specs(
        truth, None, channels, (), max_slide_gb, required=("target",), register=register, size_tolerance=size_tolerance, mpp=mpp, log=log
    )
    out = Path(out)
    metrics = run_evaluate(
        list(zip(maps, specs)),
        out,
        clean or [None] * len(maps),
        use_mask=mask == "tissue",
        progress=not quiet,
        regions=regions or None,
        viewer=viewer,
        scheduler=scheduler,
    )
    viewers = [out / f"viewer_{r['slide']}.html" for r in metrics["slides"]] if viewer else []
    return EvaluateResult(out / "report.html", out / "metrics.json", metrics, viewers)


def compare(a: PathLike, b: PathLike, *, data_range: float | None = None) -> dict:
    """SSIM / PSNR of two single-channel images as stored (`wsi-damm compare`)."""
    from wsi_damm.stages.evaluate import compare as compare_images

    return compare_images(Path(a), Path(b), data_range)


def export(
    map_path: PathLike,
    *,
    truth: PathLike,
    out: PathLike,
    channels: str | None = None,
    threshold: float = 0.5,
    mpp: float | None = None,
    max_slide_gb: float = 256.0,
) -> dict:
    """A map and its slide for QuPath (`wsi-damm export`): the aligned six-channel OME-TIFF, high-NP
    regions and per-patch gate values as GeoJSON. Returns what was written."""
    from wsi_damm.stages.export import export_for_qupath

    [spec] = slide_specs([truth], None, channels, (), max_slide_gb, required=("vessels",), mpp=mpp)
    return export_for_qupath(Path(map_path), spec, Path(out), threshold)
