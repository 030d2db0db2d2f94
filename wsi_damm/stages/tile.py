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
import warnings
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import dask
import numpy as np
import zarr

from .._version import __version__
from ..annotations import read_regions
from ..context import CONTEXT_DOWNSAMPLE, context_image, context_roles
from ..errors import InputError
from ..files import prepare_output, publish
from ..jobs import check_resources, run_tasks
from ..np_units import NpScale
from ..progress import progress_bar
from ..qc import qc_folder, tiling_picture
from ..slides import SlideSpec, open_file
from ..store import PatchStore, create_patch_store
from ..tiling import (
    TISSUE_MODES,
    LevelChoice,
    choose_level,
    grid_positions,
    low_resolution,
    normalise,
    percentile_stats,
    read_scaled,
    tissue_fractions,
    tissue_mask,
    unit_range,
)

GRID_ALIGN = 16  # the default grid of patch origins: every autoencoder factor (4, 8, 16) divides it


@dataclass(frozen=True)
class TileConfig:
    patch_size: int = 256
    overlap: int = 64
    level: int | None = None
    mpp: float | None = None
    min_tissue: float = 0.05
    tissue: str = "auto"  # tissue detection: "auto" (glass-aware, see tiling.tissue_mask) or "all"
    roi: str | None = None  # QuPath GeoJSON: only patches inside its regions are kept (the normalisation still uses all tissue)
    store_dtype: str = "uint8"
    shard_patches: int = 64
    percentiles: tuple[float, float] = (0.5, 99.8)
    mask_max_side: int = 2048
    # patch origins on multiples of this (canvas sampling: the autoencoder's factor). None: the grid 0, stride, … with
    # the last row and column flush with the border, plus, where that one is off `grid_align`, a row and column on it
    # just inside: every pixel covered, and a store trains on canvas latents whatever the slide's size
    align: int | None = None
    np_scale: NpScale = field(default_factory=NpScale)  # NP normalisation: per slide, fixed or from a reference slide

    @property
    def stride(self) -> int:
        return self.patch_size - self.overlap

    @property
    def grid_align(self) -> int:
        """`align`, or by default the largest power of two ≤ GRID_ALIGN dividing the patch size and the stride."""
        if self.align is not None:
            return self.align
        return next(a for a in (GRID_ALIGN, 8, 4, 2, 1) if self.patch_size % a == 0 and self.stride % a == 0)

    def positions(self, length: int) -> np.ndarray:
        """Patch origins along an axis of `length` px (see `align`)."""
        aligned = grid_positions(length, self.patch_size, self.stride, self.grid_align)
        if self.align is not None:
            return aligned
        return np.union1d(aligned, grid_positions(length, self.patch_size, self.stride))

    def validate(self) -> None:
        if self.patch_size <= 0:
            raise InputError("--patch-size", f"must be positive, got {self.patch_size}")
        if not 0 <= self.overlap < self.patch_size:
            raise InputError("--overlap", f"must be in [0, patch size {self.patch_size}), got {self.overlap}")
        if self.store_dtype not in ("uint8", "uint16"):
            raise InputError("--store-dtype", f"must be uint8 or uint16, got {self.store_dtype}")
        if self.shard_patches <= 0:
            raise InputError("--shard-patches", f"must be positive, got {self.shard_patches}")
        if self.align is not None and (self.stride % self.align or self.patch_size % self.align):
            raise InputError(
                "--overlap",
                f"patch size {self.patch_size} and stride {self.stride} must be multiples of {self.align} "
                "(the autoencoder's downsampling) to share a latent canvas",
                f"choose an overlap divisible by {self.align}",
            )
        if not 0 <= self.min_tissue <= 1:
            raise InputError("--min-tissue", f"must be a fraction in [0, 1], got {self.min_tissue}")
        if self.tissue not in TISSUE_MODES:
            raise InputError("--tissue", f"must be one of {', '.join(TISSUE_MODES)}, got {self.tissue!r}")
        lo, hi = self.percentiles
        if not 0 <= lo < hi <= 100:
            raise InputError("--percentiles", f"need 0 ≤ low < high ≤ 100, got {lo}, {hi}")


@dataclass
class SlidePlan:
    spec: SlideSpec
    choice: LevelChoice
    lo: list[float]
    hi: list[float]
    ys: np.ndarray  # patch origins on the tiled grid
    xs: np.ndarray
    tissue: np.ndarray  # fraction per kept patch
    tissue_pixels: float = field(default=0.0)
    mask: np.ndarray | None = field(default=None, repr=False)  # low-resolution tissue mask
    mask_downsample: float = 1.0  # of the mask relative to level 0
    context: np.ndarray | None = field(default=None, repr=False)  # (C, h, w) the condition channels around the patches (`context`)

    def normalised(self, slide, role: str, y: int, x: int, h: int, w: int) -> np.ndarray:
        """One channel of the region (y, x, h, w) of the tiled grid in [0, 1] (float32), by the slide's range."""
        k = self.spec.roles.index(role)
        return unit_range(read_scaled(slide, self.choice, y, x, h, w)[k].astype(np.float32), self.lo[k], self.hi[k])

    def table_entry(self) -> dict:
        return {
            "slide_id": self.spec.slide_id,
            "channels": self.spec.describe(),
            "planes": dict(self.spec.planes),
            "level": self.choice.level,
            "factor": self.choice.factor,
            "downsample": self.choice.downsample,
            "mpp": self.choice.mpp,
            "shape": list(self.choice.shape),
            "normalisation": {"low": self.lo, "high": self.hi},
            "patches": int(len(self.ys)),
            "tissue_fraction": self.tissue_pixels,
        }


def reference_range(spec: SlideSpec, cfg: TileConfig) -> tuple[float, float]:
    """`--np-norm reference`: the NP range of a reference slide by the per-slide rule (its percentiles
    over its tissue), to be held fixed for every other slide."""
    if "target" not in spec.roles:
        raise InputError(spec.paths[0], "is the NP reference slide but has no target (NP) channel", "map it with --channels target=…")
    plan = plan_slide(spec, replace(cfg, np_scale=NpScale(), roi=None))
    k = spec.roles.index("target")
    return float(plan.lo[k]), float(plan.hi[k])


def plan_slide(spec: SlideSpec, cfg: TileConfig) -> SlidePlan:
    """Everything decided at low resolution: level, tissue, normalisation range, kept patches."""
    with spec.open() as slide:
        choice = choose_level(slide, cfg.level, cfg.mpp)
        h, w = choice.shape
        if h < cfg.patch_size or w < cfg.patch_size:
            raise InputError(
                slide.path,
                f"is {h}×{w} px at the tiled level, smaller than one {cfg.patch_size}-px patch",
                "use a smaller --patch-size or a finer --level",
            )
        low, low_ds = low_resolution(slide, cfg.mask_max_side)
        if not np.isfinite(low).all():
            raise InputError(slide.path, "holds NaN or infinite values", "fix or mask them before tiling")
        um_per_px = slide.mpp * low_ds if slide.mpp else None
        mask = tissue_mask(low[spec.mask_channels], um_per_px, cfg.tissue)
        lo, hi = percentile_stats(low, mask, *cfg.percentiles)
        if cfg.np_scale.comparable and "target" in spec.roles:  # one NP range for every slide: maps compare across slides
            k = spec.roles.index("target")
            lo[k], hi[k] = cfg.np_scale.range
        select = mask
        if cfg.roi:  # annotated regions: the patches are those whose tissue lies inside them
            h0, w0 = slide.levels[0].shape[1:]
            select = mask & (read_regions(cfg.roi, (w0, h0)).labels(0, 0, *mask.shape, low_ds) > 0)
    ys, xs = cfg.positions(h), cfg.positions(w)
    frac = tissue_fractions(select, low_ds / choice.downsample, ys, xs, cfg.patch_size)
    every = cfg.min_tissue == 0 and not cfg.roi  # `--min-tissue 0`: every patch, whatever the mask says
    keep = np.ones(frac.shape, bool) if every else (frac >= cfg.min_tissue) & (frac > 0)
    keep_y, keep_x = np.nonzero(keep)
    if not mask.any() and not every:
        warnings.warn(f"{spec.slide_id}: no tissue found; the slide contributes no patches", stacklevel=2)
    ctx = context_image(low, low_ds, choice.downsample, choice.shape, lo, hi, [spec.roles.index(r) for r in context_roles(spec.roles)])
    return SlidePlan(spec, choice, lo, hi, ys[keep_y], xs[keep_x], frac[keep_y, keep_x], float(mask.mean()), mask, low_ds, ctx)


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
