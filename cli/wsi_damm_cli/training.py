"""`train`: the autoencoders and the DAMM U-Net on a patch store."""

from __future__ import annotations

from pathlib import Path

import click

from wsi_damm.training.config import PRESETS
from wsi_damm.util.devices import DEVICE_HELP  # devices and precision import torch only when used: --help stays fast

from .group import (
    AMP,
    AMP_HELP,
    DIST_TIMEOUT_HELP,
    cli,
    preset_help,
    say,
)


@cli.command(short_help="Train the autoencoders and the DAMM U-Net.")
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run directory.")
@click.option(
    "--preset",
    default="tiny",
    type=click.Choice(list(PRESETS)),
    help="Model and training sizes; the defaults below are each preset's. tiny: CPU minutes; paper: the authors' sizes, GPU days.",
)
@click.option(
    "--model",
    type=click.Choice(["damm", "regression"]),
    help="damm (default): the latent diffusion model. regression: the L1 U-Net a lab would train instead (CARE-style, "
    "CD31 + DAPI → target in pixel space, the same patches, steps and schedule; predict, stitch and evaluate read it alike).",
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
        "Local autoencoders: no GroupNorm (autoencoder.local_norm: none or pixel; autoencoder.standardise: each channel by its "
        "training mean and sd) and bilinear instead of nearest upsampling "
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
    model,
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
    """Train the autoencoders and the DAMM-Diffusion U-Net on a patch store (or, with --model regression, the L1 U-Net)."""
    from wsi_damm import api

    r = api.train(
        store,
        out=out,
        preset=preset,
        model=model,
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
        log=say,
    )
    click.echo(
        f"{r.run}: trained ({stage}); weights {r.weights.name if r.weights else 'autoencoders only'}, metrics {r.metrics.name}, "
        f"plot {r.loss_plot.name}"
    )
