"""`synth`, `tile` and `info`: making, cutting and describing slides, stores and runs."""

from __future__ import annotations

import json
from pathlib import Path

import click

from wsi_damm.util.jobs import SCHEDULER_HELP

from .group import (
    WORKERS_HELP,
    cli,
    registration_log,
    registration_options,
)


@cli.command(short_help="Write synthetic tumour slides with ground truth.")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--slides", default=2, type=click.IntRange(1), help="Number of slides.")
@click.option("--size", default=4096, type=click.IntRange(256), help="Slide height and width in pixels.")
@click.option("--mpp", default=0.5, type=click.FloatRange(0.05, 10), help="µm per pixel.")
@click.option("--seed", default=0, type=int, help="Simulator seed: the same seed writes the same slides.")
@click.option("--divergence", default=0.3, type=click.FloatRange(0, 1), help="Share of tissue where DAPI misleads.")
@click.option(
    "--target",
    default="np",
    type=click.Choice(["np", "perfusion"]),
    show_default=True,
    help="Third channel: extravasated nanoparticles (NP, dense) or a perfusion tracer in perfused lumens only (Perfusion, sparse).",
)
@click.option("--workers", type=click.IntRange(1), help=WORKERS_HELP.format(kind="threads"))
@click.option("--quiet", is_flag=True, help="No progress bars.")
def synth(out_dir: Path, slides: int, size: int, mpp: float, seed: int, divergence: float, target: str, workers: int, quiet: bool) -> None:
    """Write synthetic tumour slides (pyramidal OME-TIFF: CD31, DAPI and NP or Perfusion) with ground truth."""
    from wsi_damm import api

    made = api.synth(
        out_dir, slides=slides, size=size, mpp=mpp, seed=seed, divergence=divergence, target=target, workers=workers, quiet=quiet
    )
    for slide, clean, div in zip(made.slides, made.clean, made.divergence):
        click.echo(f"{slide}  (truth: {clean.name}, {div.name}; preview: {slide.name.removesuffix('.ome.tif')}.preview.png)")


@cli.command(short_help="Cut slides into tissue patches (zarr store).")
@click.argument("slides", nargs=-1)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Patch store to create (.zarr).")
@click.option("--manifest", type=click.Path(path_type=Path), help="CSV: slide_id,vessels,nuclei,target (cells path or path#channel).")
@click.option("--channels", help="Role map, e.g. vessels=CD31,nuclei=DAPI,target=NP (name, index or R/G/B).")
@click.option("--patch-size", default=256, type=int, help="Patch height and width in pixels (a run's model is trained on one size).")
@click.option("--overlap", default=64, type=int, help="Pixels shared by neighbouring patches.")
@click.option("--level", type=int, help="Pyramid level to tile (default 0).")
@click.option("--mpp", type=float, help="Tile at this µm/px instead of a level; for a plain JPEG / PNG image, its pixel size.")
@click.option("--min-tissue", default=0.05, type=float, help="Keep patches with at least this tissue fraction (0: every patch).")
@click.option(
    "--tissue",
    default="auto",
    type=click.Choice(["auto", "all"]),
    help="Tissue detection: auto (Otsu when there is glass, else all but the dark floor) or all (every pixel).",
)
@click.option("--roi", type=click.Path(dir_okay=False), help="QuPath GeoJSON: keep only patches inside its regions.")
@click.option(
    "--store-dtype",
    default="uint8",
    type=click.Choice(["uint8", "uint16"]),
    help="Stored precision of the normalised patches (uint16: 4× less quantisation, twice the disk).",
)
@click.option("--shard-patches", default=64, type=int, help="Patches per zarr shard (one file).")
@click.option("--plane", multiple=True, help="Pick a plane of a Z/T axis, e.g. Z=0.")
@click.option("--scheduler", default="threads", show_default=True, help=SCHEDULER_HELP)
@click.option(
    "--workers", type=click.IntRange(1), help=WORKERS_HELP.format(kind="threads or processes, as --scheduler says; not used with a cluster")
)
@click.option("--max-slide-gb", default=256.0, type=float, help="Refuse slides declaring more pixel data than this.")
@registration_options
@click.option("--qc", type=click.Path(file_okay=False, path_type=Path), help="Write registration overlays (before/after) here.")
@click.option(
    "--np-norm",
    default="slide",
    show_default=True,
    type=click.Choice(["slide", "fixed", "reference"]),
    help="NP normalisation: each slide's own percentiles (maps compare within a slide), one fixed raw range "
    "(--np-range), or the range of a reference slide (--np-reference): maps then compare across slides.",
)
@click.option("--np-range", help="--np-norm fixed: the raw NP intensities LO,HI that map to 0 and 1.")
@click.option("--np-reference", help="--np-norm reference: the slide whose NP range (its percentiles over tissue) every slide uses.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def tile(
    slides,
    out,
    manifest,
    channels,
    patch_size,
    overlap,
    level,
    mpp,
    min_tissue,
    tissue,
    roi,
    store_dtype,
    shard_patches,
    plane,
    scheduler,
    workers,
    max_slide_gb,
    register,
    size_tolerance,
    qc,
    np_norm,
    np_range,
    np_reference,
    resume,
    overwrite,
    quiet,
) -> None:
    """Cut slides into tissue-only, overlapping, normalised patches in a zarr patch store."""
    from wsi_damm import api

    t = api.tile(
        slides,
        out=out,
        manifest=manifest,
        channels=channels,
        patch_size=patch_size,
        overlap=overlap,
        level=level,
        mpp=mpp,
        min_tissue=min_tissue,
        tissue=tissue,
        roi=roi,
        store_dtype=store_dtype,
        shard_patches=shard_patches,
        plane=plane,
        scheduler=scheduler,
        workers=workers,
        max_slide_gb=max_slide_gb,
        register=register,
        size_tolerance=size_tolerance,
        qc=qc,
        np_norm=np_norm,
        np_range=np_range,
        np_reference=np_reference,
        resume=resume,
        overwrite=overwrite,
        quiet=quiet,
        log=registration_log,
    )
    click.echo(
        f"{out}: {t.patches} patches of {t.patch_size} px ({', '.join(t.roles)}) from {len(t.patches_per_slide)} slide(s); "
        f"what was tiled: {t.qc}/"
    )


@cli.command(short_help="Describe a slide (file or OME-Zarr), a patch store or a run directory.")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--mpp", type=float, help="Pixel size (µm) of an image that carries none (JPEG, PNG).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info(path: Path, mpp: float | None, as_json: bool) -> None:
    """Describe a slide file, a patch store or a training run directory."""
    from wsi_damm.slides.omezarr import is_ome_image
    from wsi_damm.tiling.store import PatchStore

    if (path / "config.json").exists():
        from wsi_damm.training.run_info import run_summary

        summary = run_summary(path)
    elif path.is_file() or is_ome_image(path):
        from wsi_damm.slides.summary import slide_summary

        summary = slide_summary(path, mpp)
    else:
        summary = PatchStore.open(path, require_complete=False).summary()
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    for key, value in summary.items():
        if isinstance(value, dict):
            click.echo(f"{key}:")
            for k, v in value.items():
                click.echo(f"  {k}: {v}")
        else:
            click.echo(f"{key}: {value}")
