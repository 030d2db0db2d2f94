"""`wsi-damm stitch`: overlapping patch predictions → one seamless whole-slide map, out of core.

A merger in the spirit of MONAI's (`aggregate` / `finalize`), but streamed: the canvas is cut
into tiles ("bands") whose area follows a memory budget; each gathers only the patches that touch
it, accumulates Σ w·p and Σ w in float32, and writes whole zarr chunks of the first three pyramid
levels — so bands run in parallel and peak memory depends on band size and workers, never on slide
size or width. Bands run on dask in worker processes, not threads: a band is many small numpy
calls and zarr's per-chunk async machinery, which serialise on the GIL (2 threads gave 1.2×,
2 processes 2.0× on 2 cores).

Windows: gaussian (σ = P/8, floor 1e-3: MONAI / nnU-Net), cosine (Hann, floor 1e-3), linear
ramp (floor 1e-3), mean (constant). Channels written: NP map, divergence, multi-modal share, coverage,
and — when prediction drew several samples per patch — their standard deviation.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import dask
import numpy as np
import zarr
from tqdm.auto import tqdm

from .errors import InputError
from .jobs import TaskProgress, check_resources, process_pool
from .ome import TOP_CHUNK, build_pyramid, create_level, halve, ome_zarr_attrs, pyramid_shapes, write_ome_tiff
from .store import PredictionStore, read_rows

CHANNELS = [
    {"label": "NP (predicted)", "color": "00FF00", "min": 0.0, "max": 1.0},
    {"label": "divergence", "color": "FF00FF", "min": 0.0, "max": 1.0},
    {"label": "multi-modal share", "color": "00FFFF", "min": 0.0, "max": 1.0},
    {"label": "coverage", "color": "FFFFFF", "min": 0.0, "max": 1.0},
    {"label": "NP sd over samples", "color": "FFFF00", "min": 0.0, "max": 0.25},  # only with predict --samples K > 1
]
# float16 maps: values live in [0, 1] where float16 is exact to 2.4e-4 — half the bytes to write
# and read; the OME-TIFF export is float32 for viewers without half-float support.
MAP_DTYPE = np.float16
PYRAMID_MIN = 1024  # levels halve until the longer side is at most this
BAND_BYTES = 64 * 2**20  # float32 plane bytes per band; one band per worker in flight
WORKER_BYTES = 128 * 2**20  # a worker process's interpreter, numpy and zarr before its first band
BAND_LEVELS = 3  # pyramid levels each band writes itself (TOP_CHUNK-aligned sides halve into whole chunks of levels 0–2)
WINDOW_FLOOR = 1e-3


def window(kind: str, size: int) -> np.ndarray:
    """(size, size) float32 blending weights."""
    c = (size - 1) / 2
    r = np.arange(size, dtype=np.float64) - c
    if kind == "gaussian":
        one = np.exp(-(r**2) / (2 * (size / 8) ** 2))
    elif kind == "cosine":
        one = np.sin(np.pi * (np.arange(size) + 0.5) / size) ** 2  # Hann over the pixel centres
    elif kind == "linear":
        one = 1 - np.abs(r) / (c + 1)
    elif kind == "mean":
        one = np.ones(size)
    else:
        raise InputError("--blend", f"unknown window {kind!r}; use gaussian, cosine, linear or mean")
    w = np.outer(one, one)
    return np.maximum(w / w.max(), WINDOW_FLOOR).astype(np.float32)


@dataclass(frozen=True)
class Band:
    """A rectangle of the canvas (whole chunks of the levels it writes) and the patches touching it."""

    y0: int
    y1: int
    x0: int
    x1: int
    rows: np.ndarray  # prediction-store indices of the patches touching the band


def plan_bands(ys: np.ndarray, xs: np.ndarray, idx: np.ndarray, height: int, width: int, patch: int,
               band_bytes: int = BAND_BYTES, pixel_bytes: int = 20) -> list[Band]:
    """Canvas tiles sized by `band_bytes` (`pixel_bytes` of float32 planes per pixel) and the patches each needs.

    Sides in multiples of TOP_CHUNK, so a tile halves into whole chunks of the BAND_LEVELS levels
    it writes. Narrow slides get full-width row bands, wide ones several tiles per row band, so
    memory follows `band_bytes`, not the slide's width.
    """
    unit = TOP_CHUNK
    budget = max(band_bytes // pixel_bytes, 1)
    rows = max(unit, min(_round_up(height, unit), (budget // max(width, 1)) // unit * unit))
    cols = max(unit, (budget // rows) // unit * unit)
    order = np.argsort(ys, kind="stable")
    ys_sorted, xs_sorted, idx_sorted = ys[order], xs[order], idx[order]
    bands = []
    for y0 in range(0, height, rows):
        y1 = min(y0 + rows, height)
        lo = np.searchsorted(ys_sorted, y0 - patch + 1, side="left")
        hi = np.searchsorted(ys_sorted, y1, side="left")
        band_x, band_idx = xs_sorted[lo:hi], idx_sorted[lo:hi]
        for x0 in range(0, width, cols):
            x1 = min(x0 + cols, width)
            touch = (band_x > x0 - patch) & (band_x < x1)
            bands.append(Band(y0, y1, x0, x1, np.sort(band_idx[touch])))
    return bands


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def merge_band(pred_path: str, band: Band, levels: list[zarr.Array], w: np.ndarray, done: zarr.Array, index: int) -> int:
    """Σ w·p / Σ w for one band, plus divergence and gate share blended the same way; writes whole
    chunks of `levels` (0, 1, 2 halving), so the pyramid never re-reads full resolution.

    The planes are the map's channels in order; the coverage plane holds Σ w until the division,
    then 1 where a patch landed and 0 elsewhere."""
    root = zarr.open_group(pred_path, mode="r")
    p = w.shape[0]
    with_sd = "pred_sd" in root
    bh, bw = band.y1 - band.y0, band.x1 - band.x0
    planes = np.zeros((5 if with_sd else 4, bh, bw), np.float32)
    np_sum, div_sum, share_sum, weight_sum = planes[:4]
    sd_sum = planes[4] if with_sd else None
    if len(band.rows):
        coords = read_rows(root["coords"], band.rows)
        pred = read_rows(root["pred"], band.rows)[:, 0]  # float16; products upcast patch by patch (memory)
        div = np.nan_to_num(read_rows(root["divergence"], band.rows), nan=0.0)
        share = read_rows(root["multimodal_fraction"], band.rows)
        sd = read_rows(root["pred_sd"], band.rows)[:, 0] if with_sd else None
        for k, (_, y, x) in enumerate(coords):
            a, b = max(y, band.y0), min(y + p, band.y1)
            c, e = max(x, band.x0), min(x + p, band.x1)
            if a >= b or c >= e:
                continue
            part = (slice(a - y, b - y), slice(c - x, e - x))  # of the patch
            wy = w[part]
            sl = (slice(a - band.y0, b - band.y0), slice(c - band.x0, e - band.x0))
            np_sum[sl] += wy * pred[k][part]
            div_sum[sl] += wy * div[k]
            share_sum[sl] += wy * share[k]
            if with_sd:
                sd_sum[sl] += wy * sd[k][part]
            weight_sum[sl] += wy
    covered = weight_sum > 0
    inverse = np.divide(1.0, weight_sum, out=np.zeros_like(weight_sum), where=covered)
    for value in (np_sum, div_sum, share_sum) + ((sd_sum,) if with_sd else ()):
        value *= inverse  # uncovered pixels stay 0
    del inverse
    np.copyto(weight_sum, covered)  # the coverage channel
    for level, array in enumerate(levels):
        if level:
            planes = halve(planes)
        y, x = band.y0 >> level, band.x0 >> level
        array[:, y : y + planes.shape[1], x : x + planes.shape[2]] = planes.astype(MAP_DTYPE)
    done[index] = 1  # after the band's chunks: a flag never names unwritten data
    return 1


def _open_partial(partial: Path, channels: int, height: int, width: int, n_bands: int, plan: dict, resume: bool) -> zarr.Group:
    """The half-written map of an earlier run with the same plan (--resume), else a fresh one."""
    if resume and (partial / "zarr.json").exists():
        root = zarr.open_group(str(partial), mode="r+")
        if dict(root.attrs).get("stitch_plan") == plan and "bands_done" in root:
            return root
    shutil.rmtree(partial, ignore_errors=True)
    root = zarr.open_group(str(partial), mode="w", zarr_format=3)
    for level, shape in enumerate(pyramid_shapes(height, width, PYRAMID_MIN)[:BAND_LEVELS]):
        create_level(root, str(level), (channels,) + shape, MAP_DTYPE, level, ("c", "y", "x"))
    root.create_array("bands_done", shape=(n_bands,), dtype=np.uint8, chunks=(1,), fill_value=0)
    root.attrs["stitch_plan"] = plan
    return root


def stitch_slide(store: PredictionStore, slide_index: int, out: Path, blend: str = "gaussian", tiff: Path | None = None,
                 workers: int | None = None, progress: bool = True, resume: bool = False, band_bytes: int = BAND_BYTES) -> Path:
    """Write one slide's map as OME-Zarr 0.5 (4 channels, pyramid to ≤ 1024 px), optionally OME-TIFF.

    Bands are the unit of resume: a killed run continued with `resume` redoes only unfinished bands."""
    entry = store.slides[slide_index]
    height, width = entry["shape"]
    patch = int(store.attrs["patch_size"])
    w = window(blend, patch)
    coords = store.coords
    idx = np.nonzero(coords[:, 0] == slide_index)[0]
    channels = 5 if "pred_sd" in store.root else 4
    bands = plan_bands(coords[idx, 1], coords[idx, 2], idx, height, width, patch, band_bytes, pixel_bytes=4 * (channels + 1))
    partial = out.with_name(out.name + ".partial")
    n_workers = workers or os.cpu_count() or 1
    map_bytes = 5 * height * width * np.dtype(MAP_DTYPE).itemsize * 4 // 3 + (height * width * 4 * 4 // 3 if tiff else 0)
    check_resources(out, map_bytes, n_workers, band_bytes * 3 // 2 + WORKER_BYTES, "the map", "use fewer --workers or a smaller --band-mb")
    plan = {"blend": blend, "source": str(Path(store.path).resolve()), "slide": entry["slide_id"], "bands": [[b.y0, b.y1, b.x0, b.x1] for b in bands]}
    root = _open_partial(partial, channels, height, width, len(bands), plan, resume)
    shapes = pyramid_shapes(height, width, PYRAMID_MIN)
    written, done = [root[str(level)] for level in range(min(BAND_LEVELS, len(shapes)))], root["bands_done"]
    todo = np.nonzero(np.asarray(done[:]) == 0)[0]
    tasks = [dask.delayed(merge_band, pure=False)(str(store.path), bands[i], written, w, done, int(i), dask_key_name=f"merge-{i:08d}")
             for i in todo]
    with tqdm(total=len(bands), initial=len(bands) - len(todo), desc=f"stitching {entry['slide_id']}", unit="band",
              disable=None if progress else True) as bar:
        with TaskProgress(bar, "merge-"):
            if n_workers > 1 and len(tasks) > 1:
                with process_pool(n_workers) as pool:
                    dask.compute(*tasks, scheduler="processes", pool=pool)
            else:
                dask.compute(*tasks, scheduler="sync")
    del root["bands_done"]  # resume bookkeeping is not part of the map
    del root.attrs["stitch_plan"]
    levels = build_pyramid(root, "", min_size=PYRAMID_MIN, dimension_names=("c", "y", "x"), existing=len(written))
    mpp = entry.get("mpp")
    root.attrs["ome"] = ome_zarr_attrs(entry["slide_id"], len(levels), mpp, CHANNELS[:channels])
    root.attrs["wsi_damm"] = {"blend": blend, "patch_size": patch, "stride": store.attrs["stride"], "slide": entry["slide_id"],
                              "source": str(store.path), "nuclei": bool(store.attrs.get("nuclei", True))}
    if tiff is not None:
        write_ome_tiff(tiff, levels, [CHANNELS[0]["label"]], mpp, channels=[0], dtype=np.float32)
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return out


def run_stitch(pred_path: Path, out: Path, blend: str = "gaussian", tiff: Path | None = None, workers: int | None = None,
               progress: bool = True, resume: bool = False, band_bytes: int = BAND_BYTES) -> list[Path]:
    """One map per slide: `out` itself for a one-slide store, else `out/<slide_id>.ome.zarr`."""
    window(blend, 8)  # validate the name before any work
    store = PredictionStore.open(pred_path)
    slides = store.slides
    if len(slides) == 1:
        return [stitch_slide(store, 0, Path(out), blend, tiff, workers, progress, resume, band_bytes)]
    Path(out).mkdir(parents=True, exist_ok=True)
    written = []
    for i, entry in enumerate(slides):
        sid = entry["slide_id"]
        t = Path(tiff) / f"{sid}.ome.tif" if tiff is not None else None
        if t is not None:
            t.parent.mkdir(parents=True, exist_ok=True)
        written.append(stitch_slide(store, i, Path(out) / f"{sid}.ome.zarr", blend, t, workers, progress, resume, band_bytes))
    return written
