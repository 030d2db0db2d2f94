"""`demo`, `study` and `bench`: the whole pipeline and the ablation study on synthetic slides, and the comparison on yours."""

from __future__ import annotations

from pathlib import Path

import click

from wsi_damm.training.config import PRESETS

from .group import (
    cli,
    say,
)


@cli.command(short_help="The whole pipeline on synthetic slides.")
@click.option("--out", default=Path("demo"), type=click.Path(file_okay=False, path_type=Path), help="Where everything goes.")
@click.option("--preset", default="tiny", type=click.Choice(list(PRESETS)), help="Model sizes (tiny: what 2 CPU cores train in minutes).")
@click.option(
    "--quick",
    is_flag=True,
    help="Smaller slides and 150 training steps:"
    " a smoke test of the pipeline in a few minutes; too few steps for the map to learn the vessels.",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo(out, preset, quick, quiet) -> None:
    """Synthetic slides → tile → train → predict → stitch → evaluate, with a baseline and an oracle."""
    from wsi_damm.workflows.demo import run_demo

    s = run_demo(out, preset=preset, quick=quick, progress=not quiet, log=say)
    d, b, o = s["damm"], s["blurred_vessel_baseline"], s["oracle"]
    click.echo(f"\nheld-out slide, tissue only ({s['seconds']} s in all):")
    click.echo(
        f"  DAMM-Diffusion          r {d['pearson_r']:.3f}  spread {d['spread_ratio']:.2f}×  NRMSE {d['nrmse']:.3f}  "
        f"spectral error {d['spectral_error']:.3f}  SSIM {d['wsi_ssim']:.4f}  "
        f"PSNR {d['wsi_psnr']:6.2f} dB   patches {d['patch_ssim_percent']:.2f} % / {d['patch_psnr']:.2f} dB"
    )
    click.echo(
        f"  blurred-vessel baseline r {b['pearson_r']:.3f}  spread {b['spread_ratio']:.2f}×  NRMSE {b['nrmse']:.3f}  "
        f"spectral error {b['spectral_error']:.3f}  SSIM {b['wsi_ssim']:.4f}  "
        f"PSNR {b['wsi_psnr']:6.2f} dB   patches {b['patch_ssim_percent']:.2f} % / {b['patch_psnr']:.2f} dB"
    )
    if d.get("warning"):
        click.echo(f"  WARNING: {d['warning']}")
    if s["autoencoders_collapsed"]:
        click.echo(
            f"  WARNING: the {', '.join(s['autoencoders_collapsed'])} autoencoder(s) collapsed "
            f"(their ceiling: {s['outputs']['run']}/autoencoder_ceiling.json)"
        )
    click.echo(
        "  (r: Pearson's r with the measured NP; spread: the map's sd over the measured NP's — read these before SSIM; "
        "NRMSE: RMSE over the measured sd, 1 = a constant map; spectral error: mean |log10| power ratio over frequency bands, "
        "0 = the measured texture)"
    )
    click.echo(f"  noiseless oracle        SSIM {o['wsi_ssim']:.4f}  PSNR {o['wsi_psnr']:6.2f} dB   (the best any predictor can do)")
    click.echo(
        f"  seam score (patch grid; 1 = none): DAMM map {d['seam_score']:.2f} ({d['sampling']} sampling), measured NP "
        f"{s['measured_seam_score']:.2f}"
    )
    outs = s["outputs"]
    click.echo(f"\nmap:    {outs['map']}   (napari: pip install napari napari-ome-zarr; napari {outs['map']} {outs['map']}/patch_maps)")
    click.echo(f"tiff:   {outs['tiff']}   (QuPath: File > Open)")
    click.echo(f"report: {outs['report']}   (open in a browser)")
    if quick:
        click.echo(
            "\n--quick is a smoke test of the pipeline: 60 autoencoder and 150 diffusion steps are too few for the models to learn, "
            "so an autoencoder may collapse (the run goes on and says so), the map is close to flat and the blur may beat it."
            " Run `wsi-damm demo` (about 9 minutes on 2 AVX-512 cores, longer on older CPUs) for a map worth reading."
        )


@cli.command(short_help="Ablation study on synthetic slides, by region.")
@click.option(
    "--out", default=Path("study"), type=click.Path(file_okay=False, path_type=Path), help="Where everything goes (rerun to resume)."
)
@click.option("--preset", default="tiny", type=click.Choice(list(PRESETS)), help="Model sizes of every trained row.")
@click.option("--seeds", type=click.IntRange(1), help="Training seeds per model (default 3; --quick 2).")
@click.option("--quick", is_flag=True, help="Tiny budget: checks the pipeline, not the science.")
@click.option("--redraw", is_flag=True, help="Only draw OUT/study.png again from OUT/study.json (nothing is recomputed).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def study(out, preset, seeds, quick, redraw, quiet) -> None:
    """DAMM full vs uni-only, no DAMMP, no MMFM, cross-attention and a regression U-Net, beside the
    blurred-vessel baseline, the oracle and the autoencoder ceiling, one draw and a mean of draws, all on
    the same pixels, scored where nuclei are informative and where they mislead; plus a sampler comparison."""
    from wsi_damm.workflows.study import redraw as redraw_figure
    from wsi_damm.workflows.study import run_study

    if redraw:
        if not (out / "study.json").exists():
            raise click.UsageError(f"{out / 'study.json'}: no study results to draw (run the study first)")
        click.echo(f"figure: {redraw_figure(out)}")
        return
    s = run_study(out, preset=preset, quick=quick, seeds=seeds, progress=not quiet, log=say)
    click.echo((out / "study.md").read_text(encoding="utf-8"))
    click.echo(f"table: {out / 'study.md'}  json: {out / 'study.json'}  figure: {out / 'study.png'}  ({s['seconds']} s)")


@cli.command(short_help="Which map to use on your slides: DAMM, a U-Net, a blur, a constant.")
@click.option("--train", "train_slides", multiple=True, required=True, type=click.Path(path_type=Path), help="A training slide (repeat).")
@click.option("--heldout", "heldout_slides", multiple=True, type=click.Path(path_type=Path), help="A held-out slide (repeat).")
@click.option(
    "--heldout-fraction",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    help="Instead of --heldout: hold out this last part of each training image along its longer side (one image is enough).",
)
@click.option("--channels", help="Role map of every slide, e.g. vessels=CD31,nuclei=DAPI,target=Cy3.")
@click.option(
    "--regions",
    type=click.Path(path_type=Path),
    help="QuPath GeoJSON (or a label image) of the held-out slide: every figure per region too.",
)
@click.option("--seeds", default=3, show_default=True, type=click.IntRange(1), help="Training seeds per model.")
@click.option("--draws", default=4, show_default=True, type=click.IntRange(1), help="Draws per patch of the mean-of-draws rows.")
@click.option("--ae-steps", default=150, show_default=True, type=click.IntRange(1), help="Autoencoder steps (the demo's budget).")
@click.option("--steps", default=500, show_default=True, type=click.IntRange(1), help="Training steps of every model (the demo's budget).")
@click.option("--sample-steps", default=10, show_default=True, type=click.IntRange(1), help="DPM-Solver++ steps per draw.")
@click.option("--patch-size", default=128, show_default=True, type=click.IntRange(16), help="Patch side (pixels) of every model.")
@click.option("--overlap", default=32, show_default=True, type=click.IntRange(0), help="Overlap of the training patches (pixels).")
@click.option("--mpp", type=float, help="Resolution to work at (µm/px; default: the slides' full resolution).")
@click.option("--preset", default="tiny", type=click.Choice(list(PRESETS)), help="Model sizes and recipe of the DAMM rows.")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="TOML overrides of the DAMM rows' config.")
@click.option(
    "--out", default=Path("bench"), type=click.Path(file_okay=False, path_type=Path), help="Where everything goes (rerun to resume)."
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def bench(
    train_slides,
    heldout_slides,
    heldout_fraction,
    channels,
    regions,
    seeds,
    draws,
    ae_steps,
    steps,
    sample_steps,
    patch_size,
    overlap,
    mpp,
    preset,
    config_file,
    out,
    quiet,
) -> None:
    """On your slides, on the same held-out pixels and at the same budget over seeds: DAMM full (one draw and the mean of
    draws), its vessels-only branch, always fused (no DAMMP), the regression U-Net, the blurred-vessel baseline and a
    constant map; ends by saying which map to use and by how much it leads."""
    from wsi_damm.workflows.bench import run_bench

    s = run_bench(
        out,
        list(train_slides),
        list(heldout_slides),
        channels=channels,
        regions=regions,
        heldout_fraction=heldout_fraction,
        seeds=seeds,
        draws=draws,
        ae_steps=ae_steps,
        steps=steps,
        sample_steps=sample_steps,
        preset=preset,
        config=config_file,
        patch=patch_size,
        overlap=overlap,
        mpp=mpp,
        progress=not quiet,
        log=say,
    )
    click.echo((out / "bench.md").read_text(encoding="utf-8"))
    click.echo(f"table: {out / 'bench.md'}  json: {out / 'bench.json'}  figure: {out / 'bench.png'}  page: {out / 'bench.html'}")
    click.echo(f"\n{s['recommendation']} ({s['seconds']:.0f} s)")
