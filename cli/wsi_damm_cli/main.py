"""`wsi-damm` command group. Parsing only; the work is in `wsi_damm`."""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path

import click

from wsi_damm import __version__
from wsi_damm.config import PRESETS
from wsi_damm.devices import DEVICE_HELP  # devices and precision import torch only when used: --help stays fast
from wsi_damm.errors import InputError
from wsi_damm.jobs import SCHEDULER_HELP
from wsi_damm.precision import AMP_MODES

LOG = logging.getLogger("wsi_damm")
RECORD = logging.getLogger("wsi_damm.cli")  # the command line, warnings and errors: for --log-file only (stderr has them already)


class _Stderr(logging.StreamHandler):
    """A handler on whatever `sys.stderr` is when a record comes, not the stream of the first command: a command
    run in process (click's CliRunner, the Python API after a command) swaps it."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _console() -> logging.Handler:
    """stderr: the library's INFO lines (progress where no terminal is), DEBUG with -v."""
    for h in LOG.handlers:
        if getattr(h, "wsi_damm_console", False):
            return h
    h = _Stderr()
    h.wsi_damm_console = True
    h.setFormatter(logging.Formatter("wsi-damm: %(message)s"))
    h.addFilter(lambda r: not r.name.startswith(RECORD.name))
    h.setLevel(logging.INFO)
    LOG.addHandler(h)
    LOG.setLevel(logging.DEBUG)
    return h


def _verbose(ctx, param, value: int) -> None:
    _console().setLevel(logging.DEBUG if value else logging.INFO)


def _log_file(ctx, param, value: Path | None) -> None:
    if value is None:
        return
    value.parent.mkdir(parents=True, exist_ok=True)
    h = logging.FileHandler(value, encoding="utf-8")
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    LOG.addHandler(h)
    LOG.setLevel(logging.DEBUG)
    RECORD.info("wsi-damm " + " ".join(sys.argv[1:]))


LOGGING_OPTIONS = (  # on every command (added by _Group.add_command)
    click.Option(["-v", "--verbose"], count=True, expose_value=False, callback=_verbose, help="Debug messages on stderr too."),
    click.Option(
        ["--log-file"],
        type=click.Path(dir_okay=False, path_type=Path),
        expose_value=False,
        callback=_log_file,
        help="Append everything (progress lines, warnings, errors) with timestamps to this file.",
    ),
)


class _Group(click.Group):
    """Turns InputError into one line on stderr and exit code 2; warnings into one line each; gives every
    command -v/--verbose and --log-file."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        cmd.params.extend(LOGGING_OPTIONS)
        super().add_command(cmd, name)

    def invoke(self, ctx: click.Context):
        _console()

        def warn(msg, *a, **k):
            click.echo(f"wsi-damm: warning: {msg}", err=True)
            RECORD.warning(str(msg))

        warnings.showwarning = warn
        handlers = list(LOG.handlers)
        try:
            return super().invoke(ctx)
        except InputError as exc:
            click.echo(f"wsi-damm: error: {exc.one_line()}", err=True)
            RECORD.error(exc.one_line())
            # reads still in flight on zarr's event loop when the error was raised (e.g. other chunks of a
            # corrupted shard) are abandoned: asyncio's "Task was destroyed" notes at exit are not the user's business
            logging.getLogger("asyncio").setLevel(logging.CRITICAL)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("wsi-damm: interrupted; rerun the same command with --resume to continue", err=True)
            ctx.exit(130)
        finally:  # a command run in process (CliRunner, a notebook) leaves no --log-file open behind it
            for h in [h for h in LOG.handlers if h not in handlers]:
                LOG.removeHandler(h)
                h.close()


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="wsi-damm")
def cli() -> None:
    """Predict whole-slide nanoparticle maps from CD31 + DAPI with DAMM-Diffusion."""


def registration_options(fn):
    """--register / --size-tolerance: shared by every command that reads slides."""
    fn = click.option(
        "--size-tolerance",
        default=0.0,
        type=click.FloatRange(0, 0.5),
        help="Per-channel files may differ in size by this fraction (align them with --register).",
    )(fn)
    return click.option(
        "--register",
        default="none",
        type=click.Choice(["none", "translation", "rigid"]),
        help="Align nuclei and target channels to the vessels channel (separately scanned stains).",
    )(fn)


AMP = click.Choice(AMP_MODES)
WORKERS_HELP = "Tasks run at once on this machine (default: all cores): {kind}."
MAX_SLIDE_HELP = "Refuse slides declaring more pixel data than this (GiB): corrupt headers declare terabytes."
BLEND_HELP = "Window that weights overlapping patches: gaussian, cosine, linear (taper to the edges) or mean (flat)."


def preset_help(text: str, section: str, key: str) -> str:
    """Help text with the value each preset resolves the option to, so `--help` shows real defaults."""
    values = ", ".join(f"{name} {getattr(getattr(cfg, section), key)}" for name, cfg in PRESETS.items())
    return f"{text} [preset defaults: {values}]."


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
        log=_registration_log,
    )
    click.echo(
        f"{out}: {t.patches} patches of {t.patch_size} px ({', '.join(t.roles)}) from {len(t.patches_per_slide)} slide(s); "
        f"what was tiled: {t.qc}/"
    )


def _say(msg: str) -> None:
    """A workflow's step line (demo, study, registration): on stderr, and with its time in --log-file,
    where a long run's steps are read back."""
    click.echo(msg, err=True)
    RECORD.info(msg)


def _registration_log(msg: str) -> None:
    _say(f"registration: {msg}")


AMP_HELP = "Autocast of the diffusion U-Net, the same in train and predict: bf16, fp16 (training adds a gradient scaler) or off."
DIST_TIMEOUT_HELP = "torchrun: minutes a rank may wait in a collective before the run fails."


@cli.command(short_help="Train the autoencoders and the DAMM U-Net.")
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run directory.")
@click.option(
    "--preset",
    default="tiny",
    type=click.Choice(list(PRESETS)),
    help="Model and training sizes; the defaults below are each preset's. tiny: CPU minutes; paper: the authors' sizes, GPU days.",
)
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="TOML overrides ([model], [train], …).")
@click.option(
    "--stage",
    default="all",
    type=click.Choice(["autoencoder", "diffusion", "all"]),
    help="Train the autoencoders, the diffusion U-Net on their latents (needs a run with autoencoders), or both.",
)
@click.option("--steps", type=click.IntRange(1), help=preset_help("Diffusion training steps", "train", "steps"))
@click.option("--epochs", type=click.IntRange(1), help="Diffusion epochs (instead of --steps).")
@click.option("--ae-steps", type=click.IntRange(0), help=preset_help("Autoencoder training steps", "autoencoder", "steps"))
@click.option("--batch-size", type=click.IntRange(1), help=preset_help("Diffusion batch size (per rank)", "train", "batch_size"))
@click.option("--lr", type=float, help=preset_help("Diffusion peak learning rate (AdamW, warm-up then cosine)", "train", "lr"))
@click.option("--device", help=DEVICE_HELP + " [default: auto]")
@click.option("--amp", type=AMP, help=preset_help(AMP_HELP.rstrip("."), "train", "amp"))
@click.option(
    "--dist-timeout",
    type=click.FloatRange(min=0, min_open=True),
    help=preset_help(DIST_TIMEOUT_HELP.rstrip("."), "train", "dist_timeout_min"),
)
@click.option("--compile/--no-compile", "compile_", default=None, help="torch.compile the U-Net.")
@click.option("--val-fraction", type=float, help="Share of slides (or, from one slide, of its patches) held out for validation.")
@click.option("--val-slides", help="Comma-separated slide ids to hold out.")
@click.option(
    "--val-split",
    type=click.Choice(["auto", "slides", "region"]),
    help="Validate on held-out slides, or on a held-out block of each slide (auto: slides when there are several).",
)
@click.option(
    "--checkpoint-every",
    type=click.IntRange(1),
    help=preset_help("Steps between checkpoints (the unit of --resume)", "train", "checkpoint_every"),
)
@click.option("--seed", type=int, help=preset_help("Training seed: weights, batch order and noise", "train", "seed"))
@click.option("--no-mmfm", is_flag=True, default=None, help="Ablation: concat + 1×1 conv instead of MMFM.")
@click.option("--fusion", type=click.Choice(["uafm", "cross-attention"]), help="Ablation: plain cross-attention.")
@click.option("--no-dammp", is_flag=True, default=None, help="Ablation: always use the multi-modal branch.")
@click.option("--uni-branch", type=click.Choice(["vessels", "nuclei"]), help="Modality of the uni-modal branch.")
@click.option("--gamma", type=float, help=preset_help("DAMMP divergence threshold γ", "damm", "gamma"))
@click.option("--no-dfl", is_flag=True, default=None, help="Ablation: no divergence feedback loss.")
@click.option(
    "--warmup-fraction", type=float, help=preset_help("Share of steps trained before the gate is used", "damm", "warmup_fraction")
)
@click.option(
    "--multi-loss",
    type=click.Choice(["gated", "always"]),
    help=preset_help(
        "After warm-up, train the multi-modal branch only where the gate fuses (the paper) or on every sample", "damm", "multi_loss"
    ),
)
@click.option(
    "--context-span",
    type=click.IntRange(0),
    help=preset_help(
        "Condition each branch also on a low-resolution window this many patches wide around the patch (0: the patch alone)",
        "model",
        "context_span",
    ),
)
@click.option(
    "--latents",
    type=click.Choice(["patch", "canvas"]),
    help=preset_help(
        "Train the U-Net on patches encoded one by one (the paper) or on crops of each slide's latent canvas at random offsets "
        "(what --sampling shifted needs; with --ae-local)",
        "model",
        "latents",
    ),
)
@click.option(
    "--ae-local/--no-ae-local",
    default=None,
    help=preset_help(
        "Local autoencoders: no GroupNorm (autoencoder.local_norm: none or pixel) and bilinear instead of nearest upsampling "
        "(slides then encode and decode in "
        "tiles without seams; --latents canvas needs them)",
        "autoencoder",
        "local",
    ),
)
@click.option("--resume", is_flag=True, help="Continue from the run's last checkpoint.")
@click.option(
    "--force", is_flag=True, help="Train the diffusion stage even on an autoencoder whose ceiling shows it collapsed (said in the log)."
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train(
    store,
    out,
    preset,
    config_file,
    stage,
    steps,
    epochs,
    ae_steps,
    batch_size,
    lr,
    device,
    amp,
    dist_timeout,
    compile_,
    val_fraction,
    val_slides,
    val_split,
    checkpoint_every,
    seed,
    no_mmfm,
    fusion,
    no_dammp,
    uni_branch,
    gamma,
    no_dfl,
    warmup_fraction,
    multi_loss,
    context_span,
    latents,
    ae_local,
    resume,
    force,
    quiet,
) -> None:
    """Train the autoencoders and the DAMM-Diffusion U-Net on a patch store."""
    from wsi_damm import api

    r = api.train(
        store,
        out=out,
        preset=preset,
        config=config_file,
        stage=stage,
        steps=steps,
        epochs=epochs,
        ae_steps=ae_steps,
        batch_size=batch_size,
        lr=lr,
        device=device,
        amp=amp,
        dist_timeout=dist_timeout,
        compile=compile_,
        val_fraction=val_fraction,
        val_slides=val_slides,
        val_split=val_split,
        checkpoint_every=checkpoint_every,
        seed=seed,
        no_mmfm=no_mmfm,
        fusion=fusion,
        no_dammp=no_dammp,
        uni_branch=uni_branch,
        gamma=gamma,
        no_dfl=no_dfl,
        warmup_fraction=warmup_fraction,
        multi_loss=multi_loss,
        context_span=context_span,
        latents=latents,
        ae_local=ae_local,
        resume=resume,
        force=force,
        quiet=quiet,
        log=_say,
    )
    click.echo(
        f"{r.run}: trained ({stage}); weights {r.weights.name if r.weights else 'autoencoders only'}, metrics {r.metrics.name}, "
        f"plot {r.loss_plot.name}"
    )


IMAGE_MPP = "Pixel size (µm) of slides that carry none: plain JPEG / PNG / BMP images need it."


BLENDS = click.Choice(["gaussian", "cosine", "linear", "mean"])  # wsi_damm.merge.BLENDS: not imported, so --help stays fast


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
    help="Draws per patch: the map is their mean (first channel, index 0), their per-pixel sd its second channel (index 1).",
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
@click.option("--blend", default="gaussian", type=BLENDS, help=BLEND_HELP)
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
        log=_registration_log,
    )
    click.echo(f"{out}: {done.patches} patches predicted ({done.sampling} sampling, {sampler}, {steps or DEFAULT_STEPS[sampler]} steps)")
    for path in done.maps:
        click.echo(f"{path}: whole-slide map (open in napari: napari {path} {path}/patch_maps)")


@cli.command(short_help="Blend patch predictions into whole-slide maps.")
@click.argument("pred_store", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="MAP.ome.zarr (a folder of maps for many slides).")
@click.option("--blend", default="gaussian", type=BLENDS, help=BLEND_HELP)
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
        log=_registration_log,
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
def export(map_path, truth, out, channels, threshold, mpp) -> None:
    """One aligned pyramidal OME-TIFF (CD31, DAPI, measured NP, predicted NP, |error|, sd; µm scale),
    high-NP regions and per-patch divergence as GeoJSON — QuPath opens and imports them."""
    from wsi_damm import api

    done = api.export(map_path, truth=truth, out=out, channels=channels, threshold=threshold, mpp=mpp)
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
    """Pearson's r, spreads, SSIM and PSNR of two single-channel images as stored (OME-Zarr, TIFF, .npy), streamed."""
    from wsi_damm import api

    r = api.compare(a, b, data_range=data_range)
    if as_json:
        click.echo(json.dumps({k: (str(v) if isinstance(v, float) and v == float("inf") else v) for k, v in r.items()}, indent=2))
    else:
        click.echo(
            f"Pearson's r {r['pearson_r']:.6f}  sd {r['sd']:.6g} / {r['sd_measured']:.6g}  SSIM {r['ssim']:.6f}  "
            f"PSNR {r['psnr']:.4f} dB  (data range {r['data_range']}, {r['pixels']} px)"
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

    s = run_demo(out, preset=preset, quick=quick, progress=not quiet, log=_say)
    d, b, o = s["damm"], s["blurred_vessel_baseline"], s["oracle"]
    click.echo(f"\nheld-out slide, tissue only ({s['seconds']} s in all):")
    click.echo(
        f"  DAMM-Diffusion          r {d['pearson_r']:.3f}  spread {d['spread_ratio']:.2f}×  SSIM {d['wsi_ssim']:.4f}  "
        f"PSNR {d['wsi_psnr']:6.2f} dB   patches {d['patch_ssim_percent']:.2f} % / {d['patch_psnr']:.2f} dB"
    )
    click.echo(
        f"  blurred-vessel baseline r {b['pearson_r']:.3f}  spread {b['spread_ratio']:.2f}×  SSIM {b['wsi_ssim']:.4f}  "
        f"PSNR {b['wsi_psnr']:6.2f} dB   patches {b['patch_ssim_percent']:.2f} % / {b['patch_psnr']:.2f} dB"
    )
    if d.get("warning"):
        click.echo(f"  WARNING: {d['warning']}")
    if s["autoencoders_collapsed"]:
        click.echo(
            f"  WARNING: the {', '.join(s['autoencoders_collapsed'])} autoencoder(s) collapsed "
            f"(their ceiling: {s['outputs']['run']}/autoencoder_ceiling.json)"
        )
    click.echo("  (r: Pearson's r with the measured NP; spread: the map's sd over the measured NP's — read these before SSIM)")
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
    s = run_study(out, preset=preset, quick=quick, seeds=seeds, progress=not quiet, log=_say)
    click.echo((out / "study.md").read_text(encoding="utf-8"))
    click.echo(f"table: {out / 'study.md'}  json: {out / 'study.json'}  figure: {out / 'study.png'}  ({s['seconds']} s)")


@cli.command(short_help="Describe a slide (file or OME-Zarr), a patch store or a run directory.")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--mpp", type=float, help="Pixel size (µm) of an image that carries none (JPEG, PNG).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info(path: Path, mpp: float | None, as_json: bool) -> None:
    """Describe a slide file, a patch store or a training run directory."""
    from wsi_damm.slides.omezarr import is_ome_image
    from wsi_damm.store import PatchStore

    if (path / "config.json").exists():
        from wsi_damm.run_info import run_summary

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


def main() -> None:  # pragma: no cover - console entry for `python -m`
    cli(prog_name="wsi-damm")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
