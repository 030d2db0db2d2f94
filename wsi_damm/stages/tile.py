"""`wsi-damm tile`: slides → tissue patches in a zarr patch store, written shard by shard with dask.

The coordinator plans every slide (level, mask, normalisation, grid) and creates the store under a
temporary name; each dask task owns one whole shard (zarr loses data when two writers share a
shard), reads each patch row's band once, and marks the shard done. The store is
moved into place only when every shard is done, so a killed run never looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path

import dask
import numpy as np
import zarr

from wsi_damm._version import __version__
from wsi_damm.slides import SlideSpec, open_file
from wsi_damm.tiling.context import CONTEXT_DOWNSAMPLE, context_roles
from wsi_damm.tiling.grid import (
    LevelChoice,
    normalise,
    read_scaled,
)
from wsi_damm.tiling.plan import GRID_ALIGN, SlidePlan, TileConfig, plan_slide, reference_range  # noqa: F401 (re-exported: the stage's config)
from wsi_damm.tiling.qc import qc_folder, tiling_picture
from wsi_damm.tiling.store import PatchStore, create_patch_store
from wsi_damm.util.errors import InputError
from wsi_damm.util.files import prepare_output, publish
from wsi_damm.util.jobs import check_resources, run_tasks
from wsi_damm.util.progress import progress_bar


@lru_cache(maxsize=8)
def _open_cached(spec: SlideSpec):
    return spec.open()


def write_shard(store_path: str, shard: int, plans: tuple[tuple[SlideSpec, LevelChoice, tuple, tuple], ...]) -> int:
    """Fill one whole shard: per patch row, read the row's band once, normalise, cut patches."""
    root = zarr.open_group(store_path, mode="r+")
    images = root["images"]
    s = int(root.attrs["shard_patches"])
    n, _, p, _ = images.shape
    a, b = shard * s, min((shard + 1) * s, n)
    coords = np.asarray(root["coords"][a:b])
    out = np.empty((b - a,) + images.shape[1:], dtype=images.dtype)
    for slide_index, y in np.unique(coords[:, :2], axis=0):
        spec, choice, lo, hi = plans[slide_index]
        row = np.nonzero((coords[:, 0] == slide_index) & (coords[:, 1] == y))[0]
        x0, x1 = int(coords[row, 2].min()), int(coords[row, 2].max()) + p
        band = read_scaled(_open_cached(spec), choice, int(y), x0, p, x1 - x0)
        band = normalise(band, list(lo), list(hi), images.dtype)
        for k in row:
            x = coords[k, 2] - x0
            out[k] = band[:, :, x : x + p]
    images[a:b] = out
    root["shard_done"][shard] = 1
    return 1


def _config_fingerprint(cfg: TileConfig, specs: list[SlideSpec]) -> str:
    return json.dumps({"config": asdict(cfg), "slides": [s.describe() for s in specs]}, sort_keys=True, default=str)


def run_tile(
    specs: list[SlideSpec],
    out: str | Path,
    cfg: TileConfig,
    scheduler: str = "threads",
    workers: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    qc: Path | None = None,
) -> PatchStore:
    """Tile `specs` into the patch store `out`; a QC picture per slide (slide, tissue outline, patch
    grid) goes to `qc` (default `STORE.qc/`)."""
    cfg.validate()
    out = Path(out)
    partial = prepare_output(out, resume, overwrite)
    fingerprint = _config_fingerprint(cfg, specs)
    created = False
    try:
        plans = [plan_slide(spec, cfg) for spec in specs]
        if partial.exists():
            root = zarr.open_group(str(partial), mode="r+")
            if root.attrs.get("fingerprint") != fingerprint:
                raise InputError(partial, "was started with other slides or options", "rerun with the same arguments, or --overwrite")
        else:
            n = sum(len(p.ys) for p in plans)
            per_patch = len(specs[0].roles) * cfg.patch_size**2
            # a shard task holds its patches as float32 a few times over (read, normalise, cast)
            check_resources(
                out,
                n * per_patch * np.dtype(cfg.store_dtype).itemsize,
                workers or os.cpu_count() or 1,
                3 * 4 * per_patch * cfg.shard_patches,
                "the patch store",
                "use fewer --workers or a smaller --shard-patches",
            )
            root = _create(partial, plans, cfg, fingerprint)
            created = True
        n_patches = root["images"].shape[0]
        if n_patches == 0:
            raise InputError(
                specs[0].paths[0] if len(specs) == 1 else "slides", "no tissue patches found", "check the channels or lower --min-tissue"
            )
        done = np.asarray(root["shard_done"][:])
        todo = [int(i) for i in np.nonzero(done == 0)[0]]
        frozen = tuple((p.spec, p.choice, tuple(p.lo), tuple(p.hi)) for p in plans)
        # zero-padded key names: dask runs independent tasks in key order, so neighbouring
        # shards (which share decoded tile rows in the reader's cache) run close in time
        tasks = [
            dask.delayed(write_shard, pure=False)(str(partial), shard, frozen, dask_key_name=f"write_shard-{shard:09d}") for shard in todo
        ]
        with progress_bar(
            total=len(done), initial=len(done) - len(todo), desc="tiling", unit="shard", disable=None if progress else True
        ) as bar:
            run_tasks(tasks, scheduler, workers, bar, "write_shard")
        if not np.asarray(root["shard_done"][:]).all():
            raise RuntimeError(f"{partial}: some shards were not written")
        root.attrs["complete"] = True
        publish(partial, out)
        for plan in plans:
            tiling_picture((qc or qc_folder(out)) / f"{plan.spec.slide_id}.png", plan, cfg.patch_size)
    except InputError:
        if created or not resume:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        _open_cached.cache_clear()
    return PatchStore.open(out)


def _create(path: Path, plans: list[SlidePlan], cfg: TileConfig, fingerprint: str) -> zarr.Group:
    coords = np.concatenate([np.stack([np.full(len(p.ys), i), p.ys, p.xs], 1) for i, p in enumerate(plans)] or [np.zeros((0, 3))]).astype(
        np.int64
    )
    tissue = np.concatenate([p.tissue for p in plans]).astype(np.float32)
    roles = plans[0].spec.roles
    for p in plans[1:]:
        if p.spec.roles != roles:
            raise InputError(
                p.spec.paths[0], f"has roles {p.spec.roles}, unlike {roles} of the first slide", "all slides of a store need the same roles"
            )
    attrs = {
        "roles": roles,
        "patch_size": cfg.patch_size,
        "stride": cfg.stride,
        "overlap": cfg.overlap,
        "level": plans[0].choice.level,
        "mpp": plans[0].choice.mpp,
        "percentiles": list(cfg.percentiles),
        "min_tissue": cfg.min_tissue,
        "tissue": cfg.tissue,
        "np_normalisation": cfg.np_scale.attrs(),
        "context": {"downsample": CONTEXT_DOWNSAMPLE, "roles": context_roles(roles)},
        "slides": [p.table_entry() for p in plans],
        "fingerprint": fingerprint,
        "wsi_damm_version": __version__,
    }
    root = create_patch_store(path, coords, tissue, len(roles), cfg.patch_size, np.dtype(cfg.store_dtype), cfg.shard_patches, attrs)
    group = root.create_group("context")
    for i, p in enumerate(plans):
        group.create_array(str(i), shape=p.context.shape, dtype=np.float16, chunks=(p.context.shape[0], 1024, 1024))[:] = p.context
    return root


def label_patches(store_path: Path, labels: dict[str, Path], names: dict[int, str]) -> np.ndarray:
    """Give every patch of a store the majority label of its footprint in an integer label image
    registered to its slide (`labels`: slide id → image; e.g. the simulator's divergence mask), so
    training can report the gate per region. Writes the store's `region` array (−1: slide without
    labels) and `region_names`; returns the labels."""
    store = PatchStore.open(store_path, mode="r+")
    coords, p = store.coords, int(store.attrs["patch_size"])
    region = np.full(len(coords), -1, np.int16)
    for si, entry in enumerate(store.slides):
        path = labels.get(entry["slide_id"])
        if path is None:
            continue
        rows = np.nonzero(coords[:, 0] == si)[0]
        step = max(1, round(float(entry["downsample"])))  # label pixel per tiled pixel: nearest, labels are not averaged
        with open_file(path) as image:
            for r in rows:
                y, x = int(coords[r, 1]) * step, int(coords[r, 2]) * step
                block = np.asarray(image.read_region(0, y, x, p * step, p * step))[0, ::step, ::step]
                region[r] = np.bincount(block.astype(np.int64).ravel().clip(0)).argmax()
    store.root.create_array("region", shape=region.shape, dtype=np.int16, chunks=(max(1, len(region)),), fill_value=-1, overwrite=True)
    store.root["region"][:] = region
    store.root.attrs["region_names"] = {str(k): v for k, v in names.items()}
    return region
