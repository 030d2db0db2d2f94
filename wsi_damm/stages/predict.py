"""`wsi-damm predict`: whole slides → tissue patches → batched gated sampling → prediction store.

Slides are tiled exactly as in training (same patch size, level / µm per px, normalisation rule)
into a conditions store inside the output; then shard by shard the conditions are encoded, the
target latent is sampled with the DAMMP gate applied per sample at every step, decoded, and the
shard is marked done. Sampling noise is keyed per patch (seed, slide, y, x), so a patch's
prediction does not depend on batch size, order, resume or which rank computed it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import zarr

from wsi_damm.diffusion.noise import patch_key
from wsi_damm.sampling.canvas import sample_canvases
from wsi_damm.sampling.draws import STATS, draws_for, interval_attrs, joined
from wsi_damm.sampling.predictor import (  # noqa: F401 (re-exported: the stage's public names)
    DEFAULT_STEPS,
    MICRO_BATCH,
    SAMPLING,
    GatedDenoiser,
    PredictConfig,
    Predictor,
    in_micro_batches,
)
from wsi_damm.sampling.regression import RegressionPredictor
from wsi_damm.slides import SlideSpec
from wsi_damm.stages.stitch import run_stitch
from wsi_damm.stages.tile import run_tile
from wsi_damm.stitching import DEFAULT_BLEND
from wsi_damm.stitching.merge import BLENDS
from wsi_damm.tiling.plan import TileConfig
from wsi_damm.tiling.qc import qc_folder
from wsi_damm.tiling.store import PatchStore, PredictionStore, create_prediction_store
from wsi_damm.training.config import RunConfig, sampling_for
from wsi_damm.training.run_dir import RunDir, load_run_config
from wsi_damm.util.distributed import Ranks, setup_ranks
from wsi_damm.util.errors import InputError
from wsi_damm.util.files import partial_path, prepare_output, publish
from wsi_damm.util.heap import release_free_memory
from wsi_damm.util.progress import progress_bar

LOG = logging.getLogger("wsi_damm.predict")
CANVAS_SAMPLING = ("canvas", "shifted")  # the ones that sample on a latent canvas
RANKS_READY = "ranks_ready"


def resolve_sampling(rc: RunConfig, sampling: str) -> str:
    """ "auto": what the run was trained for (`config.sampling_for`)."""
    return sampling_for(rc) if sampling == "auto" else sampling


def condition_config(rc: RunConfig, cfg: PredictConfig) -> TileConfig:
    """How `predict` tiles a slide for a run: the run's patch size, resolution and percentiles."""
    cfg = replace(cfg, sampling=resolve_sampling(rc, cfg.sampling))
    p = int(rc.patch_size)
    overlap = cfg.overlap if cfg.overlap is not None else p // 4
    return TileConfig(
        patch_size=p,
        overlap=overlap,
        level=None if rc.mpp else (rc.level or 0),
        mpp=rc.mpp,
        min_tissue=cfg.min_tissue,
        store_dtype=rc.store_dtype,
        shard_patches=cfg.shard_patches,
        percentiles=tuple(rc.percentiles),
        tissue=cfg.tissue or rc.tissue,
        roi=cfg.roi,
        align=rc.autoencoder.factor if cfg.sampling in CANVAS_SAMPLING else 1,
        np_scale=rc.np_scale,
    )


def run_predict(
    run_dir: Path,
    specs: list[SlideSpec],
    out: Path,
    cfg: PredictConfig,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> PredictionStore:
    cfg.validate()
    out = Path(out)
    ranks = setup_ranks(cfg.device, cfg.dist_timeout_min)
    rc = load_run_config(RunDir(run_dir))
    cfg = replace(cfg, sampling=resolve_sampling(rc, cfg.sampling))
    # prediction reads its inputs only: a measured NP channel, when the slide has one, is never tiled, so it
    # cannot change the tissue mask, the normalisation or which patches are predicted
    specs = [spec.without("target") for spec in specs]
    for spec in specs:
        if "vessels" not in spec.roles:
            raise InputError(spec.paths[0], "has no vessels (CD31) channel; prediction needs it")
        if rc.model.uni_branch == "nuclei" and rc.model.kind == "damm" and not (cfg.nuclei and "nuclei" in spec.roles):
            raise InputError(
                run_dir, "this model's uni-modal branch reads nuclei, but the slide has no nuclei channel (or --no-nuclei was given)"
            )
    if resume and not overwrite and Path(out).exists():  # killed after sampling, while writing the map: the store is done
        return _finished(out, run_dir, cfg)
    regression = rc.model.kind == "regression"
    if regression and cfg.sampling != "independent":
        raise InputError(run_dir, f"is a regression run: its patches are predicted one by one, not with --sampling {cfg.sampling}")
    if rc.model.latents == "canvas" and cfg.sampling not in CANVAS_SAMPLING and not regression:
        raise InputError(run_dir, "was trained on canvas latents, which patch-by-patch sampling does not give it", "use --sampling shifted")
    if cfg.sampling == "shifted" and rc.model.latents != "canvas":
        raise InputError(
            run_dir,
            "was trained on patch latents; shifted-grid sampling cuts windows anywhere on the canvas",
            "train with --latents canvas --ae-local",
        )
    # weights are checked before anything is written
    predictor = (RegressionPredictor if regression else Predictor)(Path(run_dir), ranks.device, cfg)
    if cfg.samples > 1 and (got := interval_attrs(cfg.samples, cfg.interval))["nominal"] < cfg.interval - 1e-9 and ranks.main:
        LOG.info(
            "%d draws: their central interval is their full range, nominal %.0f %% (%.0f %% asked for needs %d draws)",
            cfg.samples, 100 * got["nominal"], 100 * cfg.interval, draws_for(cfg.interval),
        )  # fmt: skip
    cond_path = out.with_name(out.name + ".conditions.zarr")  # tiled inputs, removed once done
    partial = partial_path(out)
    ready = partial / RANKS_READY  # rank 0's set-up is done: the other ranks poll for it instead of waiting in a barrier
    if ranks.main:
        ready.unlink(missing_ok=True)  # left by a killed run
    ranks.barrier()
    if ranks.main:
        prepare_output(out, resume, overwrite, (cond_path, partial_path(cond_path)))
        if not cond_path.exists():
            run_tile(specs, cond_path, condition_config(rc, cfg), resume=True, progress=progress, qc=qc_folder(out))
            release_free_memory()
        if not (partial / "zarr.json").exists():
            conditions = PatchStore.open(cond_path)
            attrs = {
                "run_dir": str(Path(run_dir).resolve()),
                "predict": asdict(cfg),
                "roles": conditions.roles,
                "np_normalisation": rc.np_scale.attrs(),
                "nuclei": predictor.uses_nuclei(conditions.roles),
                "model": {"kind": "regression"} if regression else {"kind": "damm", "dammp": rc.damm.dammp, "gamma": rc.damm.gamma},
            }
            if cfg.samples > 1:  # scale: the calibration applied to the spread (1: none)
                attrs["interval"] = {**interval_attrs(cfg.samples, cfg.interval), "scale": getattr(predictor, "spread_scale", 1.0)}
            create_prediction_store(partial, conditions, attrs, STATS if cfg.samples > 1 else STATS[:1])
        ready.touch()
    else:  # tiling a large slide can outlast the process-group timeout
        ranks.wait_until(ready.exists)
    ranks.barrier()
    conditions = PatchStore.open(cond_path)
    root = zarr.open_group(str(partial), mode="r+")
    if cfg.sampling in CANVAS_SAMPLING:
        sample_canvases(root, partial, conditions, predictor, cfg, ranks, progress)
    else:
        _sample_shards(root, conditions, predictor, cfg, ranks, progress)
    ranks.barrier()
    if ranks.main:
        if not np.asarray(root["shard_done"][:]).all():
            raise RuntimeError(f"{partial}: some shards were not predicted")
        if "canvas" in root:
            del root["canvas"]  # work state, not part of the store
        ready.unlink()
        root.attrs["complete"] = True
        publish(partial, out)
        shutil.rmtree(cond_path)
    ranks.barrier()
    return PredictionStore.open(out)


def _finished(out: Path, run_dir: Path, cfg: PredictConfig) -> PredictionStore:
    """A finished prediction store that `--resume` may reuse: same run, same settings; otherwise say what to do."""
    store = PredictionStore.open(out)
    same = store.attrs.get("run_dir") == str(Path(run_dir).resolve()) and store.attrs.get("predict") == json.loads(json.dumps(asdict(cfg)))
    if not same:
        raise InputError(
            out,
            "already holds a finished prediction made by another run or with other settings",
            f"pass --overwrite to predict again, or map it as it is: wsi-damm stitch {out} --out <map> --resume",
        )
    return store


def _sample_shards(
    root: zarr.Group, conditions: PatchStore, predictor: Predictor | RegressionPredictor, cfg: PredictConfig, ranks: Ranks, progress: bool
) -> None:
    s = int(root.attrs["shard_patches"])
    n = root["pred"].shape[0]
    done = np.asarray(root["shard_done"][:])
    mine = [i for i in range(len(done)) if i % ranks.world == ranks.rank]
    todo = [i for i in mine if not done[i]]
    coords = conditions.coords
    ids = [sl["slide_id"] for sl in conditions.slides]
    keys_all = torch.tensor([patch_key(cfg.seed, ids[c[0]], int(c[1]), int(c[2])) for c in coords], dtype=torch.int64)
    roles = conditions.roles
    group = max(1, cfg.batch_size // s)  # shards sampled together, so batches can exceed a shard
    bar = progress_bar(
        total=sum(min((i + 1) * s, n) - i * s for i in mine),
        initial=sum(min((i + 1) * s, n) - i * s for i in mine if done[i]),
        desc="predicting",
        unit="patch",
        disable=None if (progress and ranks.main) else True,
    )
    for g in range(0, len(todo), group):
        shards = todo[g : g + group]
        spans = [(i * s, min((i + 1) * s, n)) for i in shards]
        rows = np.concatenate([np.arange(a, b) for a, b in spans])
        images = predictor.inputs(conditions, rows)
        context = predictor.context(conditions, rows)
        parts = []
        for k in range(0, len(rows), cfg.batch_size):
            sl = slice(k, k + cfg.batch_size)
            parts.append(predictor.predict(images[sl], roles, keys_all[rows[sl]], None if context is None else context[sl]))
            bar.update(len(rows[sl]))
        stats = joined([p[0] for p in parts])
        dv, sh = (np.concatenate([p[i] for p in parts]) for i in (1, 2))
        pos = 0
        for shard, (a, b) in zip(shards, spans):
            for name, values in stats.items():
                root[name][a:b] = values[pos : pos + b - a].astype(np.float16)
            root["divergence"][a:b] = dv[pos : pos + b - a]
            root["multimodal_fraction"][a:b] = sh[pos : pos + b - a]
            root["shard_done"][shard] = 1
            pos += b - a
    bar.close()


def default_map_path(pred_store: Path) -> Path:
    """`PRED.zarr` → `PRED.ome.zarr`."""
    pred_store = Path(pred_store)
    return pred_store.with_name(pred_store.name.removesuffix(".zarr") + ".ome.zarr")


@dataclass(frozen=True)
class Predicted:
    store: PredictionStore
    maps: list[Path]  # one per slide; empty when not stitched (or on ranks other than 0)


def predict_maps(
    run_dir: Path,
    specs: list[SlideSpec],
    out: Path,
    cfg: PredictConfig,
    stitch: bool = True,
    map_path: Path | None = None,
    blend: str = DEFAULT_BLEND,
    tiff: Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    tiff_units: str = "normalised",
) -> Predicted:
    """Predict every tissue patch into `out`, then (rank 0) stitch the whole-slide maps: `map_path`,
    by default `out` with `.ome.zarr`."""
    if blend not in BLENDS:
        raise InputError("--blend", f"unknown window {blend!r}; use {', '.join(BLENDS)}")
    store = run_predict(run_dir, specs, out, cfg, resume, overwrite, progress)
    if not stitch or int(os.environ.get("RANK", "0")) != 0:
        return Predicted(store, [])
    release_free_memory()  # what sampling freed, before the stitch's workers start
    maps = run_stitch(out, map_path or default_map_path(out), blend, tiff, progress=progress, resume=resume, tiff_units=tiff_units)
    return Predicted(store, maps)
