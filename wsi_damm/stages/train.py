"""`wsi-damm train`: stage 1 per-modality autoencoders, stage 2 DAMM U-Net on cached latents.

One process or many (`torchrun`, DDP: gloo on CPU, nccl on CUDA). Batches, timesteps and noise
of step k are pure functions of (seed, k), so `--resume` from a checkpoint continues on exactly
the curve an uninterrupted run would have followed. Rank 0 writes; others only compute.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from wsi_damm.tiling.np_units import NpScale
from wsi_damm.tiling.store import PatchStore
from wsi_damm.training.autoencoders import check_autoencoders, encode_all, train_autoencoders
from wsi_damm.training.config import SPARSE_BELOW, RunConfig, with_sparse_choice
from wsi_damm.training.data import PatchImages, split_of
from wsi_damm.training.diffusion import train_diffusion
from wsi_damm.training.latent_canvas import LatentCanvases, PatchLatents
from wsi_damm.training.regression import DOWNSAMPLING as REGRESSION_DOWNSAMPLING
from wsi_damm.training.regression import train_regression
from wsi_damm.training.run_dir import (
    ROLES_NEEDED,
    RunDir,
    load_autoencoders,
    load_run_config,
)
from wsi_damm.util.distributed import setup_ranks
from wsi_damm.util.errors import InputError
from wsi_damm.util.files import write_json
from wsi_damm.util.heap import reusing_freed_memory

LOG = logging.getLogger("wsi_damm.train")


def bright_fraction(store: PatchStore, rows: np.ndarray, channel: int, most: int = 512) -> float:
    """The share of the target's pixels above 0.1 (in the store's [0, 1] normalisation) over up to `most` evenly
    spaced patches of `rows`: how sparse the stain is (`autoencoder.sparse_target = "auto"` decides by it)."""
    if not len(rows):
        return 1.0
    pick = rows[np.unique(np.linspace(0, len(rows) - 1, min(len(rows), most)).round().astype(np.int64))]
    images = PatchImages(store, pick)
    return float(
        sum(int((images.get(np.arange(i, min(i + 64, len(pick))))[:, channel] > -0.8).sum()) for i in range(0, len(pick), 64))
        / (len(pick) * int(store.attrs["patch_size"]) ** 2)
    )


def with_store_tiling(cfg: RunConfig, store: PatchStore) -> RunConfig:
    """`cfg` with what the store's tiling fixed (patch size, roles, resolution, percentiles, NP units): what
    `predict` later tiles new slides by."""
    a = store.attrs
    return replace(
        cfg,
        patch_size=int(a["patch_size"]),
        roles=tuple(store.roles),
        mpp=a.get("mpp"),
        level=a.get("level"),
        store_dtype=str(store.images.dtype),
        percentiles=tuple(a.get("percentiles", (0.5, 99.8))),
        tissue=a.get("tissue", "auto"),
        np_scale=NpScale.from_attrs(a.get("np_normalisation")),
    )


def run_training(
    store_path: Path,
    out: Path,
    cfg: RunConfig,
    stage: str = "all",
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    force: bool = False,
    log=None,
) -> RunDir:
    """Train the autoencoders, the diffusion model or both ("all") into `out`, with freed memory kept on
    the heap for the next step (every step allocates the same activations again). Before the diffusion
    stage each autoencoder's ceiling on the validation patches is checked (`autoencoder_check`): a collapsed
    one stops the run, unless `force` or `autoencoder.on_collapse = "warn"`, which go on and say so through
    `log` (default: warnings)."""
    with reusing_freed_memory():
        return _run_training(store_path, out, cfg, stage, resume, progress, stop_after, force, log)


def canvas_rows(store: PatchStore, store_path: Path, factor: int) -> np.ndarray:
    """Which patches canvas latents can train on: those with corners on the autoencoder's pixel grid. With a stride
    on that grid only the rows and columns flush with a border off it are not (their pixels lie in their on-grid
    neighbours, which `tile` adds beside them); a stride off it is refused before any training, with the command
    that tiles the slides anew."""
    coords = store.coords
    on_grid = ~(coords[:, 1:] % factor).any(1)
    patch, stride = int(store.attrs["patch_size"]), int(store.attrs["stride"])
    if stride % factor == 0:
        return on_grid
    s, y, x = (int(v) for v in coords[int(np.argmin(on_grid))])
    paths = " ".join(dict.fromkeys(ch["path"] for sl in store.slides for ch in sl["channels"].values()))
    mpp = f" --mpp {store.attrs['mpp']}" if store.attrs.get("mpp") else ""
    raise InputError(
        store_path,
        f"has {int((~on_grid).sum())} of {len(coords)} patch corners off the autoencoder's {factor}-pixel grid (first: slide {s} at y {y}, "
        f"x {x}), which training on canvas latents needs: "
        f"its stride ({patch} − {patch - stride} = {stride} px) is not a multiple of {factor}",
        f"tile again: wsi-damm tile {paths} --out NEW.zarr --patch-size {patch} --overlap {patch - stride // factor * factor}{mpp}; "
        "or train on patch latents: --latents patch --no-ae-local",
    )


def _run_training(
    store_path: Path,
    out: Path,
    cfg: RunConfig,
    stage: str,
    resume: bool,
    progress: bool,
    stop_after: int | None,
    force: bool = False,
    log=None,
) -> RunDir:
    ranks = setup_ranks(cfg.train.device, cfg.train.dist_timeout_min)
    store = PatchStore.open(store_path)
    roles = store.roles
    missing = [r for r in ROLES_NEEDED if r not in roles]
    if missing:
        raise InputError(store_path, f"has no {', '.join(missing)} channel; training needs vessels, nuclei and target")
    if cfg.model.context_span and not store.context_roles:
        raise InputError(
            store_path, "has no context images, which model.context_span needs (tiled by an older wsi-damm)", "tile the slides again"
        )
    patch = int(store.attrs["patch_size"])
    regression = cfg.model.kind == "regression"
    if regression and stage != "all":
        raise InputError("--stage", f"{stage!r} is a stage of the diffusion model; the regression U-Net trains in one (--stage all)")
    if regression and patch % REGRESSION_DOWNSAMPLING:
        raise InputError(
            store_path, f"patch size {patch} is not a multiple of the regression U-Net's downsampling, {REGRESSION_DOWNSAMPLING}"
        )
    if not regression and patch % max(1, cfg.autoencoder.factor * 2 ** (len(cfg.model.channels) - 1)):
        raise InputError(store_path, f"patch size {patch} is not divisible by autoencoder factor × U-Net downsampling")
    canvas = cfg.model.latents == "canvas" and not regression
    usable = canvas_rows(store, store_path, cfg.autoencoder.factor) if canvas else np.ones(len(store), bool)
    run = RunDir(out)
    cfg = with_store_tiling(cfg, store)
    if run.config.exists():
        previous = load_run_config(run)
        if previous.patch_size != patch:
            raise InputError(out, f"was trained on {previous.patch_size}-px patches but the store has {patch}-px patches")
        if resume:
            cfg = previous  # a resumed run continues exactly the run it was
        elif stage == "diffusion":
            cfg = replace(cfg, autoencoder=previous.autoencoder)  # reuses the trained autoencoders
    split = split_of(store, cfg.train)
    train_idx, val_idx = split.train[usable[split.train]], split.val[usable[split.val]]
    if not usable.all():
        (log or LOG.info)(
            f"{store_path}: {int((~usable).sum())} patches flush with a slide border off the autoencoder's "
            f"{cfg.autoencoder.factor}-pixel grid are left out of training on canvas latents (their on-grid neighbours cover them)"
        )
    if not regression and cfg.autoencoder.sparse_target != "no" and cfg.autoencoder.target_bright_fraction is None:
        if cfg.autoencoder.sparse_target == "auto" and (stage == "diffusion" or (resume and run.config.exists())):
            cfg = with_sparse_choice(cfg, False)  # a run from before the choice existed keeps the recipe it was trained with
        else:
            fraction = bright_fraction(store, train_idx, roles.index("target"))
            cfg = with_sparse_choice(cfg, cfg.autoencoder.sparse_target == "yes" or fraction < SPARSE_BELOW, fraction)
    cfg = replace(cfg, train=replace(cfg.train, val_split=split.kind if split.kind != "none" else cfg.train.val_split))
    if cfg.train.epochs:
        steps = cfg.train.epochs * max(1, len(train_idx) // (cfg.train.batch_size * ranks.world))
        cfg = replace(cfg, train=replace(cfg.train, steps=steps, epochs=None))
    if ranks.main:
        run.path.mkdir(parents=True, exist_ok=True)
        write_json(run.config, asdict(cfg))
        write_json(
            run.validation,
            {
                "kind": split.kind,
                "description": split.description,
                "cuts": split.cuts,
                "train_patches": len(train_idx),
                "val_patches": len(val_idx),
            },
        )
    images = PatchImages(store, train_idx)
    if regression:
        train_regression(images, PatchImages(store, val_idx), roles, run, cfg, ranks, resume, progress, stop_after)
        return run
    trained = stage in ("autoencoder", "all") and not (resume and all(run.autoencoder(r).exists() for r in ROLES_NEEDED))
    if trained:
        aes = train_autoencoders(images, roles, run, cfg, ranks, progress, resume)
    else:
        aes = load_autoencoders(run, cfg, ranks.device)
    if trained or stage != "autoencoder" or not run.ae_ceiling.exists():
        go_on = "--force" if force else ('autoencoder.on_collapse = "warn"' if cfg.autoencoder.on_collapse == "warn" else None)
        check_autoencoders(run, aes, store, val_idx, train_idx, roles, ranks, stage != "autoencoder", go_on, log)
    if stage == "autoencoder":
        return run
    for ae in aes.values():
        ae.eval()
    span = cfg.model.context_span
    if cfg.model.latents == "canvas":
        encoders, channel = {r: aes[r].encode for r in ROLES_NEEDED}, {r: roles.index(r) for r in ROLES_NEEDED}

        def canvases(idx: np.ndarray, imgs: PatchImages) -> LatentCanvases:
            context = (lambda rows, origins: store.context_windows(idx[rows], span, origins)) if span else None
            return LatentCanvases(
                imgs.get,
                store.coords[idx],
                encoders,
                channel,
                cfg.autoencoder.factor,
                patch,
                ranks.device,
                store_path,
                context,
                tuple(store.context_roles),
            )

        source, val_source = canvases(train_idx, images), canvases(val_idx, PatchImages(store, val_idx))
    else:
        latents = encode_all(images, roles, aes, ranks.device, context_span=span)
        val_latents = (
            encode_all(PatchImages(store, val_idx), roles, aes, ranks.device, context_span=span)
            if len(val_idx)
            else {r: latents[r][:0] for r in ROLES_NEEDED}
        )
        source, val_source = PatchLatents(latents), PatchLatents(val_latents)
    regions = None
    if "region" in store.root and store.attrs.get("region_names"):
        names = {int(k): v for k, v in store.attrs["region_names"].items()}
        regions = (torch.from_numpy(np.asarray(store.root["region"][:])[train_idx].astype(np.int64)), names)
    train_diffusion(source, val_source, run, cfg, ranks, resume, progress, stop_after, regions)
    return run
