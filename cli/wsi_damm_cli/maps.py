"""`stitch`, `evaluate`, `export` and `compare`: maps made, scored and handed to QuPath."""

from __future__ import annotations

import json
from pathlib import Path

import click

from wsi_damm.util.jobs import SCHEDULER_HELP

from .group import (
    BLEND_HELP,
    BLENDS,
    DEFAULT_BLEND,
    IMAGE_MPP,
    MAX_SLIDE_HELP,
    WORKERS_HELP,
    cli,
    registration_log,
    registration_options,
)


@cli.command(short_help="Blend patch predictions into whole-slide maps.")
@click.argument("pred_store", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="MAP.ome.zarr (a folder of maps for many slides).")
@click.option("--blend", default=DEFAULT_BLEND, type=BLENDS, help=BLEND_HELP)
@click.option("--tiff", type=click.Path(path_type=Path), help="Also write a pyramidal OME-TIFF of the NP map.")
@click.option(
    "--tiff-units",
    default="normalised",
    show_default=True,
    type=click.Choice(["normalised", "measured"]),
    help="The OME-TIFF's values: normalised [0, 1], or measured NP intensity (runs tiled with --np-norm fixed or reference).",
)
@click.option("--workers", type=click.IntRange(1), help=WORKERS_HELP.format(kind="processes; 1 runs in this process"))
@click.option("--scheduler", default="processes", show_default=True, help=SCHEDULER_HELP)
@click.option(
    "--band-mb", default=64, type=click.IntRange(1), help="Float32 planes per canvas tile (peak ≈ workers × (1.5 × this + 130 MB))."
)
@click.option("--resume", is_flag=True, help="Continue an interrupted stitch; only unfinished bands are redone.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def stitch(pred_store, out, blend, tiff, tiff_units, workers, scheduler, band_mb, resume, quiet) -> None:
    """Blend overlapping patch predictions into whole-slide maps (OME-Zarr, optional OME-TIFF)."""
    from wsi_damm import api

    for path in api.stitch(
        pred_store,
        out=out,
        blend=blend,
        tiff=tiff,
        tiff_units=tiff_units,
        workers=workers,
        band_mb=band_mb,
        scheduler=scheduler,
        resume=resume,
        quiet=quiet,
    ):
        click.echo(f"{path}: whole-slide map (open in napari: napari {path} {path}/patch_maps)")


@cli.command(short_help="Score maps against the measured NP channel.")
@click.argument("maps", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--truth", "truths", multiple=True, required=True, help="Measured slide for each map, in the same order.")
@click.option("--channels", help="Role map of the truth slides, e.g. target=NP,vessels=CD31,nuclei=DAPI.")
@click.option(
    "--clean", "cleans", multiple=True, type=click.Path(path_type=Path), help="Noiseless NP field (synthetic slides): oracle bound."
)
@click.option(
    "--regions",
    "regions",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Integer label image per map (annotations, synthetic divergence mask): metrics per region.",
)
@click.option("--mask", default="tissue", type=click.Choice(["tissue", "none"]), help="Also report tissue-only metrics.")
@click.option("--mpp", type=float, help=IMAGE_MPP)
@click.option("--viewer/--no-viewer", default=True, help="Write the deep-zoom comparison page per slide (viewer_SLIDE.html).")
@click.option("--out", default=Path("report"), type=click.Path(path_type=Path), help="Report directory.")
@click.option("--max-slide-gb", default=256.0, type=float, help=MAX_SLIDE_HELP)
@click.option("--scheduler", default="threads", show_default=True, help=SCHEDULER_HELP)
@registration_options
@click.option("--quiet", is_flag=True, help="No progress bars.")
def evaluate(
    maps, truths, channels, cleans, regions, mask, mpp, viewer, out, max_slide_gb, scheduler, register, size_tolerance, quiet
) -> None:
    """Pearson's r, spreads, SSIM and PSNR of predicted maps against the measured NP channel, with figures and a report."""
    from wsi_damm import api

    done = api.evaluate(
        maps,
        truth=truths,
        channels=channels,
        clean=cleans,
        regions=regions,
        mask=mask,
        mpp=mpp,
        viewer=viewer,
        out=out,
        max_slide_gb=max_slide_gb,
        register=register,
        size_tolerance=size_tolerance,
        scheduler=scheduler,
        quiet=quiet,
        log=registration_log,
    )
    for r in done.metrics["slides"]:
        w, pp, c = r["wsi"], r["patches"], r["check"]
        click.echo(
            f"{r['slide']}: Pearson's r {c['pearson_r']:.3f}, spread {c['spread_ratio']:.2f}× and mean {c['mean_ratio']:.2f}× the "
            f"measured; WSI SSIM {w['ssim']:.4f} PSNR {w['psnr']:.2f} dB; patches SSIM {pp['ssim_percent']['mean']:.2f} "
            f"± {pp['ssim_percent']['sd']:.2f} %, PSNR {pp['psnr']['mean']:.2f} ± {pp['psnr']['sd']:.2f} dB"
        )
        if c["warning"]:
            click.echo(f"{r['slide']}: WARNING: {c['warning']}")
    click.echo(f"report: {done.report} (open it in a browser)" + (f"; deep-zoom viewer: {done.viewers[0]}" if done.viewers else ""))


@cli.command(short_help="Export a map and its slide for QuPath (OME-TIFF, GeoJSON).")
@click.argument("map_path", type=click.Path(path_type=Path))
@click.option("--truth", required=True, type=click.Path(path_type=Path), help="The slide the map was predicted from.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder for the exported files.")
@click.option("--channels", help="Role map of the slide, e.g. vessels=CD31,nuclei=DAPI,target=NP.")
@click.option("--threshold", default=0.5, type=click.FloatRange(0, 1), help="High-NP regions: predicted NP at least this (normalised).")
@click.option("--mpp", type=float, help=IMAGE_MPP)
@click.option("--max-slide-gb", default=256.0, type=float, help=MAX_SLIDE_HELP)
def export(map_path, truth, out, channels, threshold, mpp, max_slide_gb) -> None:
    """One aligned pyramidal OME-TIFF (CD31, DAPI, measured NP, predicted NP, |error|, sd; µm scale),
    high-NP regions and per-patch divergence as GeoJSON — QuPath opens and imports them."""
    from wsi_damm import api

    done = api.export(map_path, truth=truth, out=out, channels=channels, threshold=threshold, mpp=mpp, max_slide_gb=max_slide_gb)
    click.echo(f"{done['tiff']}: {', '.join(done['channels'])} (QuPath: File > Open)")
    click.echo(f"{done['high_np']}: {done['high_np_regions']} high-NP regions (QuPath: File > Import objects)")
    if "patches" in done:
        click.echo(f"{done['patches']}: {done['patch_count']} patches with divergence and multi-modal share")


@cli.command(short_help="SSIM / PSNR of two images as stored.")
@click.argument("a", type=click.Path(path_type=Path))
@click.argument("b", type=click.Path(path_type=Path))
@click.option("--data-range", type=float, help="Default: the dtype's range for integers, 1.0 for floats.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def compare(a, b, data_range, as_json) -> None:
    """Pearson's r, spreads, NRMSE, spectral error, SSIM and PSNR of two single-channel images as stored (OME-Zarr, TIFF,
    .npy), streamed; the second is the reference."""
    from wsi_damm import api

    r = api.compare(a, b, data_range=data_range)
    if as_json:
        click.echo(json.dumps({k: (str(v) if isinstance(v, float) and v == float("inf") else v) for k, v in r.items()}, indent=2))
    else:
        click.echo(
            f"Pearson's r {r['pearson_r']:.6f}  sd {r['sd']:.6g} / {r['sd_measured']:.6g}  NRMSE {r['nrmse']:.6g}  "
            f"spectral error {r['spectral_error']:.4g}  SSIM {r['ssim']:.6f}  "
            f"PSNR {r['psnr']:.4f} dB  (data range {r['data_range']}, {r['pixels']} px)"
        )
