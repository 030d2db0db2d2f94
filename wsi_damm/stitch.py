"""`wsi-damm stitch`: overlapping patch predictions → one seamless whole-slide map, out of core.

A merger in the spirit of MONAI's (`aggregate` / `finalize`), but streamed: the canvas is cut
into tiles ("bands") whose area follows a memory budget; each gathers only the patches that touch
it, accumulates Σ w·p and Σ w in float32, and writes whole zarr chunks — so bands run in parallel
on dask and peak memory depends on band size and workers, never on slide size or width.

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
from .jobs import TaskProgress, check_resources
from .ome import build_pyramid, fast_codec, halve, ome_zarr_attrs, pyramid_shapes, write_ome_tiff
from .store import PredictionStore, read_rows

CHANNELS = [
    {"label": "NP (predicted)", "color": "00FF00", "min": 0.0, "max": 1.0},
    {"label": "divergence", "color": "FF00FF", "min": 0.0, "max": 1.0},
    {"label": "multi-modal share", "color": "00FFFF", "min": 0.0, "max": 1.0},
    {"label": "coverage", "color": "FFFFFF", "min": 0.0, "max": 1.0},
    {"label": "NP sd over samples", "color": "FFFF00", "min": 0.0, "max": 0.25},  # only with predict --samples K > 1
]
CHUNK = 256
# float16 maps: values live in [0, 1] where float16 is exact to 2.4e-4 — half the bytes to write
# and read; the OME-TIFF export is float32 for viewers without half-float support.
MAP_DTYPE = np.float16
PYRAMID_MIN = 1024  # levels halve until the longer side is at most this
BAND_BYTES = 64 * 2**20  # accumulator bytes per band (4 float32 planes); one band per worker in flight
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
    """A rectangle of the canvas (whole chunks of levels 0 and 1) and the patches touching it."""

    y0: int
    y1: int
    x0: int
    x1: int
    rows: np.ndarray  # prediction-store indices of the patches touching the band


def plan_bands(ys: np.ndarray, xs: np.ndarray, idx: np.ndarray, height: int, width: int, patch: int,
               band_bytes: int = BAND_BYTES) -> list[Band]:
    """Canvas tiles sized by `band_bytes` (16 bytes of accumulators per pixel) and the patches each needs.

    Rows in multiples of 2·CHUNK, columns in multiples of 2·4·CHUNK: a tile's halved pixels are
    whole chunks of pyramid level 1, which it writes too. Wide slides get several tiles per row
    band, so memory follows `band_bytes`, not the slide's width.
    """
    unit_y, unit_x = 2 * CHUNK, 8 * CHUNK
    rows = max(unit_y, min(_round_up(height, unit_y), (band_bytes // (16 * max(width, 1))) // unit_y * unit_y))
    cols = max(unit_x, (band_bytes // (16 * rows)) // unit_x * unit_x)
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


def merge_band(pred_path: str, band: Band, out: zarr.Array, half: zarr.Array | None, w: np.ndarray, done: zarr.Array, index: int) -> int:
    """Σ w·p / Σ w for one band, plus divergence and gate share blended the same way; writes whole
    chunks of level 0 and, halved, of level 1 (so the pyramid never re-reads level 0)."""
    root = zarr.open_group(pred_path, mode="r")
    p = w.shape[0]
    with_sd = "pred_sd" in root
    bh, bw = band.y1 - band.y0, band.x1 - band.x0
    num = np.zeros((4 if with_sd else 3, bh, bw), np.float32)
    den = np.zeros((bh, bw), np.float32)
    if len(band.rows):
        coords = read_rows(root["coords"], band.rows)
        pred = read_rows(root["pred"], band.rows)[:, 0]  # float16; converted patch by patch (memory)
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
            num[0][sl] += wy * pred[k][part].astype(np.float32)
            num[1][sl] += wy * div[k]
            num[2][sl] += wy * share[k]
            if with_sd:
                num[3][sl] += wy * sd[k][part].astype(np.float32)
            den[sl] += wy
    covered = den > 0
    np.divide(num, den, out=num, where=covered)  # in place: no second band-sized buffer
    num[:, ~covered] = 0
    ys, xs = slice(band.y0, band.y1), slice(band.x0, band.x1)
    out[:3, ys, xs] = num[:3].astype(MAP_DTYPE)
    out[3, ys, xs] = covered.astype(MAP_DTYPE)
    if with_sd:
        out[4, ys, xs] = num[3].astype(MAP_DTYPE)
    if half is not None:
        small = halve(num)
        hy, hx = slice(band.y0 // 2, band.y0 // 2 + small.shape[1]), slice(band.x0 // 2, band.x0 // 2 + small.shape[2])
        half[:3, hy, hx] = small[:3].astype(MAP_DTYPE)
        if with_sd:
            half[4, hy, hx] = small[3].astype(MAP_DTYPE)
        del small
        half[3, hy, hx] = halve(covered[None].astype(np.float32))[0].astype(MAP_DTYPE)
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
    root.create_array("0", shape=(channels, height, width), dtype=MAP_DTYPE, chunks=(1, CHUNK, 4 * CHUNK),
                      compressors=fast_codec(MAP_DTYPE), fill_value=0, dimension_names=("c", "y", "x"))
    shapes = pyramid_shapes(height, width, PYRAMID_MIN)
    if len(shapes) > 1:
        root.create_array("1", shape=(channels,) + shapes[1], dtype=MAP_DTYPE, chunks=(1, CHUNK, 4 * CHUNK),
                          compressors=fast_codec(MAP_DTYPE), fill_value=0, dimension_names=("c", "y", "x"))
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
    bands = plan_bands(coords[idx, 1], coords[idx, 2], idx, height, width, patch, band_bytes)
    partial = out.with_name(out.name + ".partial")
    map_bytes = 5 * height * width * np.dtype(MAP_DTYPE).itemsize * 4 // 3 + (height * width * 4 * 4 // 3 if tiff else 0)
    check_resources(out, map_bytes, workers or os.cpu_count() or 1, band_bytes * 3 // 2, "the map", "use fewer --workers or a smaller --band-mb")
    plan = {"blend": blend, "source": str(Path(store.path).resolve()), "slide": entry["slide_id"], "bands": [[b.y0, b.y1, b.x0, b.x1] for b in bands]}
    channels = 5 if "pred_sd" in store.root else 4
    root = _open_partial(partial, channels, height, width, len(bands), plan, resume)
    level0, level1, done = root["0"], (root["1"] if "1" in root else None), root["bands_done"]
    todo = np.nonzero(np.asarray(done[:]) == 0)[0]
    tasks = [dask.delayed(merge_band, pure=False)(str(store.path), bands[i], level0, level1, w, done, int(i), dask_key_name=f"merge-{i:08d}")
             for i in todo]
    with tqdm(total=len(bands), initial=len(bands) - len(todo), desc=f"stitching {entry['slide_id']}", unit="band",
              disable=None if progress else True) as bar:
        with TaskProgress(bar, "merge-"):
            dask.compute(*tasks, scheduler="threads", num_workers=workers)
    del root["bands_done"]  # resume bookkeeping is not part of the map
    del root.attrs["stitch_plan"]
    shapes = pyramid_shapes(height, width, PYRAMID_MIN)
    levels = build_pyramid(root, "", min_size=PYRAMID_MIN, dimension_names=("c", "y", "x"), existing=min(2, len(shapes)))
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
