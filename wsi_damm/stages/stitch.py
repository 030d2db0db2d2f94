"""`wsi-damm stitch`: overlapping patch predictions → one whole-slide map, out of core.

The canvas is cut into near-square tiles ("bands") whose area follows a memory budget; each
gathers only the patches that touch it, blends them (`merge.BlendMerger`) and writes whole zarr
chunks of the first four pyramid levels and of the patch maps (`slide_map.write_map_region`) —
so bands run in parallel and peak memory depends on band size and workers, never on slide size
or width. Bands run on dask in worker processes, not threads: a band is many small numpy calls
and zarr's per-chunk async machinery, which serialise on the GIL (2 threads gave 1.2×, 2
processes 2.0× on 2 cores). A band is also the unit of resume.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import dask
import numpy as np
import zarr

from wsi_damm.sampling.draws import STATS
from wsi_damm.slides.ome import pyramid_shapes, writable, write_ome_tiff
from wsi_damm.stitching import DEFAULT_BLEND
from wsi_damm.stitching.merge import BlendMerger, window
from wsi_damm.stitching.slide_map import (
    DEFAULT_PERCENTILES,
    MAP_DTYPE,
    PATCH_MAP_CHANNELS,
    PATCH_MAPS,
    PYRAMID_MIN,
    VALUE_CHANNELS,
    block_shape,
    create_map,
    finish_map,
    write_map_region,
)
from wsi_damm.tiling.np_units import NpScale
from wsi_damm.tiling.qc import map_picture, thumbnail_path
from wsi_damm.tiling.store import PredictionStore, read_rows
from wsi_damm.util.errors import InputError
from wsi_damm.util.files import partial_path, publish
from wsi_damm.util.heap import release_free_memory
from wsi_damm.util.jobs import check_resources, is_cluster, run_tasks
from wsi_damm.util.progress import progress_bar

BAND_BYTES = 64 * 2**20  # float32 plane bytes per band; one band per worker in flight
WORKER_BYTES = 128 * 2**20  # a worker process's interpreter, numpy and zarr before its first band
BAND_LEVELS = 4  # pyramid levels each band writes itself
BAND_UNIT = 2048  # band sides: whole chunks of levels 0–3 (1024, 512, 256, 256 px) and of patch maps (256 blocks of 8 px)

TIFF_UNITS = ("normalised", "measured")


@dataclass(frozen=True)
class Band:
    """A rectangle of the canvas (whole chunks of the levels it writes) and the patches touching it."""

    y0: int
    y1: int
    x0: int
    x1: int
    rows: np.ndarray  # prediction-store indices of the patches touching the band, ascending
    yx: np.ndarray  # (K, 2) their positions
    gate: np.ndarray  # (K, 2) their divergence (0 where uni-modal only) and multi-modal share


def plan_bands(
    yx: np.ndarray,
    idx: np.ndarray,
    gate: np.ndarray,
    height: int,
    width: int,
    patch: int,
    band_bytes: int = BAND_BYTES,
    pixel_bytes: int = 8,
) -> list[Band]:
    """Canvas tiles sized by `band_bytes` (`pixel_bytes` of float32 planes per pixel) and the patches each
    needs (store rows `idx` at `yx`, with `gate` values): a band's task then reads only predictions.

    Sides in multiples of BAND_UNIT, so a tile writes whole chunks. Near-square: a patch that
    straddles a tile edge is read by both tiles, and a square has the least edge for its area.
    Narrow slides get taller tiles, wide ones several per row, so memory follows `band_bytes`,
    not the slide's size.
    """
    unit = BAND_UNIT
    budget = max(band_bytes // pixel_bytes, 1)
    fit = lambda n, most: min(max(unit, n // unit * unit), most)  # noqa: E731
    max_rows, max_cols = _round_up(height, unit), _round_up(width, unit)
    rows = fit(math.isqrt(budget), max_rows)
    cols = fit(budget // rows, max_cols)
    rows = fit(budget // cols, max_rows)  # a narrow slide spends the rest of the budget on height
    order = np.lexsort((idx, yx[:, 0]))  # by y, then by store row
    yx, idx, gate = yx[order], idx[order], gate[order]
    bands = []
    for y0 in range(0, height, rows):
        y1 = min(y0 + rows, height)
        lo = np.searchsorted(yx[:, 0], y0 - patch + 1, side="left")
        hi = np.searchsorted(yx[:, 0], y1, side="left")
        for x0 in range(0, width, cols):
            x1 = min(x0 + cols, width)
            xs = yx[lo:hi, 1]
            pick = lo + np.nonzero((xs > x0 - patch) & (xs < x1))[0]
            pick = pick[np.argsort(idx[pick], kind="stable")]
            bands.append(Band(y0, y1, x0, x1, idx[pick], yx[pick], gate[pick]))
    return bands


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def merge_band(
    pred_path: str, band: Band, levels: list[zarr.Array], patch_level: zarr.Array, w: np.ndarray, done: zarr.Array, index: int
) -> int:
    """One band: blend the patches touching it, write its chunks of `levels` and `patch_level`, then
    flag it done (after its chunks: a flag never names unwritten data)."""
    root = zarr.open_group(pred_path, mode="r")
    names = [name for name in STATS if name in root]
    merger = BlendMerger(band.y0, band.y1, band.x0, band.x1, w, len(names))
    if len(band.rows):
        merger.aggregate([read_rows(root[name], band.rows)[:, 0] for name in names], band.yx, band.gate)  # float16
    write_map_region(levels, patch_level, band.y0, band.x0, *merger.finalize())
    done[index] = 1
    del merger
    release_free_memory()  # a worker merges band after band: what one freed must not pile up
    return 1


def _open_partial(partial: Path, n_values: int, height: int, width: int, n_bands: int, plan: dict, resume: bool) -> zarr.Group:
    """The half-written map of an earlier run with the same plan (--resume), else a fresh one."""
    if resume and (partial / "zarr.json").exists():
        root = zarr.open_group(str(partial), mode="r+")
        if dict(root.attrs).get("stitch_plan") == plan and "bands_done" in root:
            return root
    shutil.rmtree(partial, ignore_errors=True)
    root = zarr.open_group(str(partial), mode="w", zarr_format=3)
    create_map(root, height, width, n_values, BAND_LEVELS)
    root.create_array("bands_done", shape=(n_bands,), dtype=np.uint8, chunks=(1,), fill_value=0)
    root.attrs["stitch_plan"] = plan
    return root


def stitch_slide(
    store: PredictionStore,
    slide_index: int,
    out: Path,
    blend: str = DEFAULT_BLEND,
    tiff: Path | None = None,
    workers: int | None = None,
    progress: bool = True,
    resume: bool = False,
    band_bytes: int = BAND_BYTES,
    scheduler: str = "processes",
    tiff_units: str = "normalised",
) -> Path:
    """Write one slide's map as OME-Zarr 0.5 (pyramid to ≤ 1024 px, patch maps), optionally OME-TIFF.

    Bands are the unit of resume: a killed run continued with `resume` redoes only unfinished bands.
    `scheduler`: where the bands are merged (`jobs.run_tasks`): processes, threads, sync or a cluster.
    `tiff_units`: the OME-TIFF in normalised [0, 1] values, or in measured NP intensity (runs whose NP
    normalisation is fixed or from a reference slide: `np_units`)."""
    entry = store.slides[slide_index]
    height, width = entry["shape"]
    scale = NpScale.from_attrs(store.attrs.get("np_normalisation"))
    if tiff is not None and tiff_units == "measured":
        scale.to_measured(np.zeros(1))  # refuses before any work when the run's NP has no common unit
    elif tiff_units not in TIFF_UNITS:
        raise InputError("--tiff-units", f"must be {' or '.join(TIFF_UNITS)}, got {tiff_units!r}")
    patch = int(store.attrs["patch_size"])
    w = window(blend, patch)
    coords = store.coords
    idx = np.nonzero(coords[:, 0] == slide_index)[0]
    gate = np.stack(
        [
            np.nan_to_num(np.asarray(store.root["divergence"][:])[idx], nan=0.0),  # NaN: uni-modal only
            np.asarray(store.root["multimodal_fraction"][:])[idx],
        ],
        1,
    ).astype(np.float32)
    n_values = sum(name in store.root for name in STATS)
    bands = plan_bands(coords[idx, 1:], idx, gate, height, width, patch, band_bytes, pixel_bytes=4 * (n_values + 1))
    partial = partial_path(out)
    n_workers = workers or os.cpu_count() or 1
    item = np.dtype(MAP_DTYPE).itemsize
    map_bytes = (n_values * height * width + len(PATCH_MAP_CHANNELS) * math.prod(block_shape(height, width))) * item * 4 // 3
    map_bytes += height * width * 4 * 4 // 3 if tiff else 0
    check_resources(
        out,
        map_bytes,
        1 if is_cluster(scheduler) else n_workers,
        band_bytes * 3 // 2 + WORKER_BYTES,
        "the map",
        "use fewer --workers or a smaller --band-mb",
    )
    plan = {
        "blend": blend,
        "source": str(Path(store.path).resolve()),
        "slide": entry["slide_id"],
        "bands": [[b.y0, b.y1, b.x0, b.x1] for b in bands],
    }
    root = _open_partial(partial, n_values, height, width, len(bands), plan, resume)
    n_written = min(BAND_LEVELS, len(pyramid_shapes(height, width, PYRAMID_MIN)))
    written, patch0, done = [writable(root[str(level)]) for level in range(n_written)], writable(root[PATCH_MAPS]["0"]), root["bands_done"]
    todo = np.nonzero(np.asarray(done[:]) == 0)[0]
    tasks = [
        dask.delayed(merge_band, pure=False, traverse=False)(
            str(store.path), bands[i], written, patch0, w, done, int(i), dask_key_name=f"merge-{i:08d}"
        )
        for i in todo
    ]
    fresh = len(todo) == len(bands)
    try:
        with progress_bar(
            total=len(bands),
            initial=len(bands) - len(todo),
            desc=f"stitching {entry['slide_id']}",
            unit="band",
            disable=None if progress else True,
        ) as bar:
            run_tasks(tasks, scheduler, n_workers, bar, "merge-")
    except InputError:  # bad input (e.g. a corrupted prediction store): nothing half-written is left behind
        if fresh or not resume:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    del root["bands_done"]  # resume bookkeeping is not part of the map
    del root.attrs["stitch_plan"]
    mpp = entry.get("mpp")
    levels = finish_map(
        root,
        entry["slide_id"],
        mpp,
        n_written,
        {
            "blend": blend,
            "patch_size": patch,
            "stride": store.attrs["stride"],
            "slide": entry["slide_id"],
            "source": str(store.path),
            "nuclei": bool(store.attrs.get("nuclei", True)),
            "percentiles": store.attrs.get("percentiles") or list(DEFAULT_PERCENTILES),
            "tissue": store.attrs.get("tissue", "auto"),
            "gamma": store.attrs.get("model", {}).get("gamma"),
            "sampling": store.attrs.get("predict", {}).get("sampling", "independent"),
            "np_normalisation": scale.attrs(),
            "inverse_transform": scale.inverse_transform(),
            "interval": store.attrs.get("interval"),  # the central interval of the draws (channels 2 and 3), if any
        },
    )
    if tiff is not None:
        measured = tiff_units == "measured"
        write_ome_tiff(
            tiff,
            levels,
            [f"{VALUE_CHANNELS[0]['label']}{' (measured units)' if measured else ''}"],
            mpp,
            channels=[0],
            dtype=np.float32,
            values=scale.to_measured if measured else None,
        )
    map_picture(thumbnail_path(out), levels, entry["slide_id"], mpp)
    return publish(partial, out)


def run_stitch(
    pred_path: Path,
    out: Path,
    blend: str = DEFAULT_BLEND,
    tiff: Path | None = None,
    workers: int | None = None,
    progress: bool = True,
    resume: bool = False,
    band_bytes: int = BAND_BYTES,
    scheduler: str = "processes",
    tiff_units: str = "normalised",
) -> list[Path]:
    """One map per slide: `out` itself for a one-slide store, else `out/<slide_id>.ome.zarr`."""
    window(blend, 8)  # validate the name before any work
    store = PredictionStore.open(pred_path)
    slides = store.slides
    if len(slides) == 1:
        return [stitch_slide(store, 0, Path(out), blend, tiff, workers, progress, resume, band_bytes, scheduler, tiff_units)]
    Path(out).mkdir(parents=True, exist_ok=True)
    written = []
    for i, entry in enumerate(slides):
        sid = entry["slide_id"]
        t = Path(tiff) / f"{sid}.ome.tif" if tiff is not None else None
        if t is not None:
            t.parent.mkdir(parents=True, exist_ok=True)
        written.append(
            stitch_slide(store, i, Path(out) / f"{sid}.ome.zarr", blend, t, workers, progress, resume, band_bytes, scheduler, tiff_units)
        )
    return written
