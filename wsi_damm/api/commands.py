"""The API's functions, one per command (see the package `wsi_damm.api`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from wsi_damm.api.inputs import slide_specs
from wsi_damm.api.results import PathLike, PredictResult, SynthResult, TileResult, TrainResult
from wsi_damm.stitching import DEFAULT_BLEND
from wsi_damm.util.errors import InputError


def synth(
    out_dir: PathLike,
    *,
    slides: int = 2,
    size: int = 4096,
    mpp: float = 0.5,
    seed: int = 0,
    divergence: float = 0.3,
    target: str = "np",
    workers: int | None = None,
    quiet: bool = False,
) -> SynthResult:
    """Synthetic tumour slides with ground truth (`wsi-damm synth`); `target`: "np" (nanoparticles, dense) or
    "perfusion" (a tracer in perfused lumens only, sparse); `workers`: rendering threads (default: all cores;
    the slides do not depend on it)."""
    from wsi_damm.workflows.simulator import SynthConfig
    from wsi_damm.workflows.synth import write_slides

    written = write_slides(
        Path(out_dir),
        slides,
        SynthConfig(size=size, mpp=mpp, seed=seed, divergence=divergence, target=target),
        workers=workers or os.cpu_count() or 1,
        progress=not quiet,
    )
    return SynthResult([Path(r["slide"]) for r in written], [Path(r["clean"]) for r in written], [Path(r["divergence"]) for r in written])


def tile(
    slides: Sequence[PathLike] | PathLike = (),
    *,
    out: PathLike,
    manifest: PathLike | None = None,
    channels: str | None = None,
    patch_size: int = 256,
    overlap: int = 64,
    level: int | None = None,
    mpp: float | None = None,
    min_tissue: float = 0.05,
    tissue: str = "auto",
    roi: PathLike | None = None,
    store_dtype: str = "uint8",
    shard_patches: int = 64,
    plane: Sequence[str] = (),
    scheduler: str = "threads",
    workers: int | None = None,
    max_slide_gb: float = 256.0,
    register: str = "none",
    size_tolerance: float = 0.0,
    qc: PathLike | None = None,
    np_norm: str = "slide",
    np_range: str | Sequence[float] | None = None,
    np_reference: PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    log=None,
) -> TileResult:
    """Cut slides into tissue patches (`wsi-damm tile`). `qc`: registration overlays; the tiling pictures go to STORE.qc/.
    `np_norm`: slide | fixed (`np_range=(lo, hi)` in raw intensity) | reference (the range of `np_reference`): see np_units."""
    from wsi_damm.stages.tile import run_tile
    from wsi_damm.tiling.np_units import np_scale
    from wsi_damm.tiling.plan import TileConfig, reference_range
    from wsi_damm.tiling.qc import qc_folder

    specs = slide_specs(
        slides,
        manifest,
        channels,
        plane,
        max_slide_gb,
        register=register,
        size_tolerance=size_tolerance,
        qc=Path(qc) if qc else None,
        mpp=mpp,
        log=log,
    )
    cfg = TileConfig(
        patch_size=patch_size,
        overlap=overlap,
        level=level,
        mpp=mpp,
        min_tissue=min_tissue,
        tissue=tissue,
        roi=str(roi) if roi else None,
        store_dtype=store_dtype,
        shard_patches=shard_patches,
    )
    ref = None
    if np_norm == "reference":
        if np_reference is None:
            raise InputError("--np-reference", "--np-norm reference needs the reference slide (--np-reference SLIDE)")
        [ref_spec] = slide_specs([np_reference], None, channels, plane, max_slide_gb, required=("target",), mpp=mpp, log=log)
        ref = reference_range(ref_spec, cfg)
    cfg = replace(cfg, np_scale=np_scale(np_norm, np_range, ref, str(np_reference) if np_reference else None))
    store = run_tile(specs, Path(out), cfg, scheduler=scheduler, workers=workers, resume=resume, overwrite=overwrite, progress=not quiet)
    s = store.summary()
    return TileResult(Path(out), s["patches"], s["patch_size"], list(s["roles"]), s["patches_per_slide"], qc_folder(Path(out)))


def train(
    store: PathLike,
    *,
    out: PathLike,
    preset: str = "tiny",
    model: str | None = None,
    config: PathLike | None = None,
    stage: str = "all",
    steps: int | None = None,
    epochs: int | None = None,
    ae_steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    device: str | None = None,
    amp: str | None = None,
    dist_timeout: float | None = None,
    compile: bool | None = None,
    val_fraction: float | None = None,
    val_slides: str | Sequence[str] | None = None,
    val_split: str | None = None,
    checkpoint_every: int | None = None,
    seed: int | None = None,
    no_mmfm: bool | None = None,
    fusion: str | None = None,
    no_dammp: bool | None = None,
    uni_branch: str | None = None,
    gamma: float | None = None,
    no_dfl: bool | None = None,
    warmup_fraction: float | None = None,
    multi_loss: str | None = None,
    context_span: int | None = None,
    latents: str | None = None,
    ae_local: bool | None = None,
    resume: bool = False,
    force: bool = False,
    quiet: bool = False,
    log=None,
) -> TrainResult:
    """Train the autoencoders and the DAMM U-Net (`wsi-damm train`), or with `model="regression"` the L1 U-Net a lab
    would train instead (CD31 + DAPI → target, pixel space); options left None keep the preset's value.
    `device`: auto | cpu | cuda | cuda:N | mps; `amp`: off | bf16 | fp16; `dist_timeout`: minutes (torchrun).
    A collapsed autoencoder (its ceiling on the validation patches, `autoencoder_ceiling.json`) stops the run
    before the diffusion stage with an `InputError`, unless `force`; `log` receives that warning then."""
    from wsi_damm.stages.train import run_training
    from wsi_damm.training.config import given_options, resolve
    from wsi_damm.training.run_dir import load_run_config, weights_of

    if isinstance(val_slides, str):
        val_slides = [v.strip() for v in val_slides.split(",") if v.strip()]
    flags = given_options(
        train={
            "steps": steps,
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "device": device,
            "amp": amp,
            "dist_timeout_min": dist_timeout,
            "compile": compile,
            "val_fraction": val_fraction,
            "checkpoint_every": checkpoint_every,
            "seed": seed,
            "val_slides": tuple(val_slides) if val_slides else None,
            "val_split": val_split,
        },
        autoencoder={"steps": ae_steps, "local": ae_local},
        model={
            "kind": model,
            "mmfm": False if no_mmfm else None,
            "fusion": fusion,
            "uni_branch": uni_branch,
            "context_span": context_span,
            "latents": latents,
        },
        damm={
            "dammp": False if no_dammp else None,
            "dfl": False if no_dfl else None,
            "gamma": gamma,
            "warmup_fraction": warmup_fraction,
            "multi_loss": multi_loss,
        },
    )
    cfg = resolve(preset, Path(config) if config else None, flags)
    run = run_training(Path(store), Path(out), cfg, stage=stage, resume=resume, progress=not quiet, force=force, log=log)
    weights = weights_of(run, load_run_config(run)) if run.config.exists() else run.unet
    return TrainResult(run.path, weights if weights.exists() else None, run.metrics, run.path / "loss.png", run.config)


def predict(
    run_dir: PathLike,
    slides: Sequence[PathLike] | PathLike = (),
    *,
    out: PathLike,
    manifest: PathLike | None = None,
    channels: str | None = None,
    plane: Sequence[str] = (),
    no_nuclei: bool = False,
    sampling: str = "auto",
    sampler: str = "dpm++",
    steps: int | None = None,
    eta: float = 0.0,
    batch_size: int = 16,
    seed: int = 0,
    samples: int = 1,
    interval: float = 0.8,
    calibrated: bool = False,
    overlap: int | None = None,
    min_tissue: float = 0.05,
    tissue: str | None = None,
    roi: PathLike | None = None,
    mpp: float | None = None,
    shard_patches: int = 64,
    device: str = "auto",
    amp: str = "off",
    dist_timeout: float = 30.0,
    max_slide_gb: float = 256.0,
    register: str = "none",
    size_tolerance: float = 0.0,
    stitch: bool = True,
    map: PathLike | None = None,
    blend: str = DEFAULT_BLEND,
    tiff: PathLike | None = None,
    tiff_units: str = "normalised",
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    log=None,
) -> PredictResult:
    """Predict whole-slide NP maps with a trained run (`wsi-damm predict`), stitched unless stitch=False.
    `device`, `amp` and `dist_timeout` mean what they mean in `train`."""
    from wsi_damm.stages.predict import PredictConfig, predict_maps
    from wsi_damm.tiling.qc import qc_folder

    specs = slide_specs(slides, manifest, channels, plane, max_slide_gb, register=register, size_tolerance=size_tolerance, mpp=mpp, log=log)
    cfg = PredictConfig(
        sampling=sampling,
        sampler=sampler,
        steps=steps,
        eta=eta,
        batch_size=batch_size,
        seed=seed,
        overlap=overlap,
        min_tissue=min_tissue,
        tissue=tissue,
        roi=str(roi) if roi else None,
        amp=amp,
        device=device,
        dist_timeout_min=dist_timeout,
        shard_patches=shard_patches,
        samples=samples,
        interval=interval,
        calibrated=calibrated,
        nuclei=not no_nuclei,
    )
    done = predict_maps(
        Path(run_dir),
        specs,
        Path(out),
        cfg,
        stitch=stitch,
        map_path=Path(map) if map else None,
        blend=blend,
        tiff=Path(tiff) if tiff else None,
        resume=resume,
        overwrite=overwrite,
        progress=not quiet,
        tiff_units=tiff_units,
    )
    return PredictResult(Path(out), len(done.store), list(done.maps), qc_folder(Path(out)), done.store.attrs["predict"]["sampling"])


def calibrate(
    run_dir: PathLike,
    *,
    store: PathLike,
    samples: int = 9,
    interval: float = 0.8,
    sampler: str = "dpm++",
    steps: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    device: str = "auto",
    out: PathLike | None = None,
    overwrite: bool = False,
    quiet: bool = False,
) -> dict:
    """Fit the draws' spread scale on the run's validation pixels (`wsi-damm calibrate`); returns what
    `RUN/calibration.json` holds. `predict(..., calibrated=True)` applies it."""
    from wsi_damm.stages.calibrate import fit_scale
    from wsi_damm.stages.predict import PredictConfig

    cfg = PredictConfig(sampler=sampler, steps=steps, batch_size=batch_size, seed=seed, samples=samples, interval=interval, device=device)
    cfg.validate()
    where = Path(out) if out else Path(run_dir) / "calibration"
    return fit_scale(Path(run_dir), Path(store), where, cfg, progress=not quiet, overwrite=overwrite)
