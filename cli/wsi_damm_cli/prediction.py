"""`predict`: whole-slide maps from a trained run."""

from __future__ import annotations

from pathlib import Path

import click

from wsi_damm.util.devices import DEVICE_HELP  # devices and precision import torch only when used: --help stays fast

from .group import (
    AMP,
    AMP_HELP,
    BLEND_HELP,
    BLENDS,
    DEFAULT_BLEND,
    DIST_TIMEOUT_HELP,
    IMAGE_MPP,
    MAX_SLIDE_HELP,
    cli,
    registration_log,
    registration_options,
)


@cli.command(short_help="Predict whole-slide NP maps with a trained run.")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.argument("slides", nargs=-1)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Prediction store to create (.zarr).")
@click.option("--manifest", type=click.Path(path_type=Path), help="CSV: slide_id,vessels,nuclei (cells path or path#channel).")
@click.option("--channels", help="Role map, e.g. vessels=CD31,nuclei=DAPI (nuclei optional).")
@click.option("--plane", multiple=True, help="Pick a plane of a Z/T axis (or an OME-Zarr series, S=1), e.g. Z=0.")
@click.option(
    "--no-nuclei", is_flag=True, help="Uni-modal branch only: the nuclei channel still shapes the tissue mask, not the prediction."
)
@click.option(
    "--sampling",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "independent", "canvas", "shifted"]),
    help="independent: each patch alone; canvas: all patches in lockstep on one latent canvas, overlaps fused every step; "
    "shifted: on the canvas, a grid of patch-sized cells shifted at random every step (seamless; needs a run trained "
    "with --latents canvas); auto: shifted for such runs, independent otherwise.",
)
@click.option("--sampler", default="dpm++", type=click.Choice(["ddim", "dpm++"]), help="dpm++ = DPM-Solver++(2M).")
@click.option("--steps", type=click.IntRange(1, 1000), help="Sampling steps (default: ddim 150, dpm++ 20).")
@click.option("--eta", default=0.0, type=float, help="DDIM η (the authors' code used 1).")
@click.option("--batch-size", default=16, type=click.IntRange(1), help="Patches sampled together (the map does not depend on it).")
@click.option("--seed", default=0, type=int, help="Sampling seed: noise is keyed by seed, slide and position.")
@click.option(
    "--samples",
    default=1,
    type=click.IntRange(1),
    help="Draws per patch: the map is their mean (channel 0); with K > 1 their per-pixel sd (channel 1) and central "
    "interval (channels 2 and 3) are stored beside it.",
)
@click.option(
    "--interval",
    default=0.8,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    help="Level of the central interval of the draws (K > 1): between the j-th smallest and the j-th largest draw, "
    "which holds a value exchangeable with the draws with probability (K + 1 − 2j)/(K + 1); 0.8 needs K ≥ 9.",
)
@click.option(
    "--calibrated",
    is_flag=True,
    help="Scale the draws' sd and interval by the run's calibration (fitted by `wsi-damm calibrate` for the same K).",
)
@click.option("--overlap", type=click.IntRange(0), help="Patch overlap in pixels (default: patch / 4).")
@click.option("--min-tissue", default=0.05, type=float, help="Predict patches with at least this tissue fraction (0: every patch).")
@click.option("--tissue", type=click.Choice(["auto", "all"]), help="Tissue detection (default: the one the run was trained with).")
@click.option("--roi", type=click.Path(dir_okay=False), help="QuPath GeoJSON: predict only the patches inside its regions.")
@click.option("--mpp", type=float, help=IMAGE_MPP)
@click.option("--shard-patches", default=64, type=click.IntRange(1), help="Patches per shard (unit of resume).")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--amp", default="off", show_default=True, type=AMP, help=AMP_HELP)
@click.option("--dist-timeout", default=30.0, show_default=True, type=click.FloatRange(min=0, min_open=True), help=DIST_TIMEOUT_HELP)
@click.option("--max-slide-gb", default=256.0, type=float, help=MAX_SLIDE_HELP)
@registration_options
@click.option("--stitch/--no-stitch", "do_stitch", default=True, help="Also write the whole-slide map.")
@click.option("--map", "map_path", type=click.Path(path_type=Path), help="Map path (default: OUT with .ome.zarr).")
@click.option("--blend", default=DEFAULT_BLEND, type=BLENDS, help=BLEND_HELP)
@click.option("--tiff", type=click.Path(path_type=Path), help="Also write a pyramidal OME-TIFF of the NP map.")
@click.option(
    "--tiff-units",
    default="normalised",
    show_default=True,
    type=click.Choice(["normalised", "measured"]),
    help="The OME-TIFF's values: normalised [0, 1], or measured NP intensity (runs tiled with --np-norm fixed or reference).",
)
@click.option("--resume", is_flag=True, help="Continue an interrupted prediction (any phase).")
@click.option("--overwrite", is_flag=True, help="Replace an existing prediction store and map.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def predict(
    run_dir,
    slides,
    out,
    manifest,
    channels,
    plane,
    no_nuclei,
    sampling,
    sampler,
    steps,
    eta,
    batch_size,
    seed,
    samples,
    interval,
    calibrated,
    overlap,
    min_tissue,
    tissue,
    roi,
    mpp,
    shard_patches,
    device,
    amp,
    dist_timeout,
    max_slide_gb,
    register,
    size_tolerance,
    do_stitch,
    map_path,
    blend,
    tiff,
    tiff_units,
    resume,
    overwrite,
    quiet,
) -> None:
    """Predict NP maps for whole slides with a trained run (every tissue patch, batched)."""
    from wsi_damm import api
    from wsi_damm.stages.predict import DEFAULT_STEPS

    done = api.predict(
        run_dir,
        slides,
        out=out,
        manifest=manifest,
        channels=channels,
        plane=plane,
        no_nuclei=no_nuclei,
        sampling=sampling,
        sampler=sampler,
        steps=steps,
        eta=eta,
        batch_size=batch_size,
        seed=seed,
        samples=samples,
        interval=interval,
        calibrated=calibrated,
        overlap=overlap,
        min_tissue=min_tissue,
        tissue=tissue,
        roi=roi,
        mpp=mpp,
        shard_patches=shard_patches,
        device=device,
        amp=amp,
        dist_timeout=dist_timeout,
        max_slide_gb=max_slide_gb,
        register=register,
        size_tolerance=size_tolerance,
        stitch=do_stitch,
        map=map_path,
        blend=blend,
        tiff=tiff,
        tiff_units=tiff_units,
        resume=resume,
        overwrite=overwrite,
        quiet=quiet,
        log=registration_log,
    )
    click.echo(f"{out}: {done.patches} patches predicted ({done.sampling} sampling, {sampler}, {steps or DEFAULT_STEPS[sampler]} steps)")
    for path in done.maps:
        click.echo(f"{path}: whole-slide map (open in napari: napari {path} {path}/patch_maps)")


@cli.command(short_help="Fit one scale on the draws' spread on the run's validation pixels.")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--store", required=True, type=click.Path(path_type=Path), help="The patch store the run was trained on.")
@click.option("--samples", default=9, show_default=True, type=click.IntRange(2), help="Draws per patch (as predict will use).")
@click.option(
    "--interval", default=0.8, show_default=True, type=click.FloatRange(0, 1, min_open=True, max_open=True), help="As for predict."
)
@click.option("--sampler", default="dpm++", type=click.Choice(["ddim", "dpm++"]), help="As for predict.")
@click.option("--steps", type=click.IntRange(1, 1000), help="Sampling steps (default: ddim 150, dpm++ 20).")
@click.option("--batch-size", default=16, type=click.IntRange(1), help="Patches sampled together.")
@click.option("--seed", default=0, type=int, help="Sampling seed.")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--out", type=click.Path(path_type=Path), help="Where the validation predictions go (default: RUN_DIR/calibration).")
@click.option("--overwrite", is_flag=True, help="Predict the validation part again (else a killed calibration resumes).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def calibrate(run_dir, store, samples, interval, sampler, steps, batch_size, seed, device, out, overwrite, quiet) -> None:
    """Predict the run's validation pixels (its own split of STORE: slides or the region past the cut) with K draws,
    and fit the scale by which the draws' interval must be stretched to hold the measured channel as often as it
    promises. Writes RUN_DIR/calibration.json; `predict --samples K --calibrated` applies it. Off by default: read
    the coverage before and after on held-out slides (`evaluate`) before trusting it."""
    from wsi_damm import api

    done = api.calibrate(
        run_dir,
        store=store,
        samples=samples,
        interval=interval,
        sampler=sampler,
        steps=steps,
        batch_size=batch_size,
        seed=seed,
        device=device,
        out=out,
        overwrite=overwrite,
        quiet=quiet,
    )
    nominal = 100 * done["interval"]["nominal"]
    click.echo(
        f"{run_dir}: spread scale {done['scale']:.3g} (the {samples} draws' {nominal:.0f} % interval held "
        f"{100 * done['coverage_before']:.1f} % of {done['pixels']} validation pixels, stretched {100 * done['coverage_after']:.1f} %); "
        f"apply it with: wsi-damm predict {run_dir} … --samples {samples} --calibrated"
    )
