"""`wsi-damm stitch`: overlapping patch predictions → one seamless whole-slide map, out of core.

A merger in the spirit of MONAI's (`aggregate` / `finalize`), but streamed: the canvas is cut
into near-square tiles ("bands") whose area follows a memory budget; each gathers only the
patches that touch it, accumulates Σ w·p and Σ w in float32, and writes whole zarr chunks of the
first four pyramid levels and of the patch maps — so bands run in parallel and peak memory
depends on band size and workers, never on slide size or width. Bands run on dask in worker
processes, not threads: a band is many small numpy calls and zarr's per-chunk async machinery,
which serialise on the GIL (2 threads gave 1.2×, 2 processes 2.0× on 2 cores).

Windows: gaussian (σ = P/8, floor 1e-3: MONAI / nnU-Net), cosine (Hann, floor 1e-3), linear
ramp (floor 1e-3), mean (constant). Written (layout in `slide_map`): the NP map and — when
prediction drew several samples per patch — their standard deviation at full resolution; the
divergence, multi-modal share and coverage in 8-px blocks.
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
from tqdm.auto import tqdm

from .errors import InputError
from .jobs import TaskProgress, check_resources, process_pool
from .ome import halve, pyramid_shapes, writable, write_ome_tiff
from .slide_map import BLOCK, MAP_DTYPE, PATCH_MAP_CHANNELS, PATCH_MAPS, PYRAMID_MIN, VALUE_CHANNELS, block_shape, create_map, finish_map
from .store import PredictionStore, read_rows

BAND_BYTES = 64 * 2**20  # float32 plane bytes per band; one band per worker in flight
WORKER_BYTES = 128 * 2**20  # a worker process's interpreter, numpy and zarr before its first band
BAND_LEVELS = 4  # pyramid levels each band writes itself
BAND_UNIT = 2048  # band sides: whole chunks of levels 0–3 (1024, 512, 256, 256 px) and of patch maps (256 blocks of 8 px)
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
    rows: np.ndarray  # prediction-store indices of the patches touching the band, ascending
    yx: np.ndarray  # (K, 2) their positions
    gate: np.ndarray  # (K, 2) their divergence (0 where uni-modal only) and multi-modal share


def plan_bands(yx: np.ndarray, idx: np.ndarray, gate: np.ndarray, height: int, width: int, patch: int,
               band_bytes: int = BAND_BYTES, pixel_bytes: int = 8) -> list[Band]:
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


def block_window(w: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Sums of the window `w` over the BLOCK × BLOCK blocks of a grid whose block edges lie `dy`, `dx`
    pixels before the patch's first row and column (its position modulo BLOCK)."""
    p = w.shape[0]
    h, wd = _round_up(dy + p, BLOCK), _round_up(dx + p, BLOCK)
    padded = np.zeros((h, wd), np.float32)
    padded[dy : dy + p, dx : dx + p] = w
    return padded.reshape(h // BLOCK, BLOCK, wd // BLOCK, BLOCK).sum((1, 3))


def block_counts(mask: np.ndarray) -> np.ndarray:
    """True pixels per BLOCK × BLOCK block (uint8), by pairwise halving: a reshape-sum over the small
    axes is 15× slower."""
    h, w = mask.shape
    counts = (np.pad(mask, ((0, -h % BLOCK), (0, -w % BLOCK))) if h % BLOCK or w % BLOCK else mask).view(np.uint8)
    for _ in range(BLOCK.bit_length() - 1):
        counts = counts[0::2] + counts[1::2]
    for _ in range(BLOCK.bit_length() - 1):
        counts = counts[:, 0::2] + counts[:, 1::2]
    return counts


def _block_pixels(h: int, w: int) -> np.ndarray:
    """Pixels of an h × w region in each of its blocks (fewer in a last, partial row or column)."""
    side = lambda n: np.minimum(BLOCK, n - BLOCK * np.arange(-(-n // BLOCK)))  # noqa: E731
    return np.outer(side(h), side(w)).astype(np.float32)


def merge_band(pred_path: str, band: Band, levels: list[zarr.Array], patch_level: zarr.Array, w: np.ndarray,
               done: zarr.Array, index: int) -> int:
    """Σ w·p / Σ w for one band at full resolution; divergence and gate share blended the same way
    per block; writes whole chunks of `levels` (0, 1, 2, 3 halving) and of `patch_level`, so the
    pyramid never re-reads full resolution."""
    root = zarr.open_group(pred_path, mode="r")
    p = w.shape[0]
    names = ["pred"] + (["pred_sd"] if "pred_sd" in root else [])
    bh, bw = band.y1 - band.y0, band.x1 - band.x0
    sums = np.zeros((len(names) + 1, bh, bw), np.float32)  # Σ w·value per map channel, then Σ w
    weight_sum = sums[-1]
    nby, nbx = block_shape(bh, bw)
    block_sums = np.zeros((3, nby, nbx), np.float32)  # per block: Σ w, Σ w·divergence, Σ w·share
    if len(band.rows):
        values = [read_rows(root[name], band.rows)[:, 0] for name in names]  # float16; products upcast patch by patch
        per_patch = np.concatenate([np.ones((len(band.rows), 1), np.float32), band.gate], 1)[:, :, None, None]
        windows: dict[tuple[int, int], np.ndarray] = {}
        for k, (y, x) in enumerate(band.yx):
            a, b = max(y, band.y0), min(y + p, band.y1)
            c, e = max(x, band.x0), min(x + p, band.x1)
            if a >= b or c >= e:
                continue
            part = (slice(a - y, b - y), slice(c - x, e - x))  # of the patch
            wy = w[part]
            sl = (slice(a - band.y0, b - band.y0), slice(c - band.x0, e - band.x0))
            for plane, value in zip(sums, values):
                plane[sl] += wy * value[k][part]
            weight_sum[sl] += wy
            phase = (int(y) % BLOCK, int(x) % BLOCK)
            if phase not in windows:
                windows[phase] = block_window(w, *phase)
            bwin = windows[phase]
            by, bx = (y - band.y0) // BLOCK, (x - band.x0) // BLOCK  # band edges are whole blocks
            a, b, c, e = max(by, 0), min(by + bwin.shape[0], nby), max(bx, 0), min(bx + bwin.shape[1], nbx)
            block_sums[:, a:b, c:e] += per_patch[k] * bwin[a - by : b - by, c - bx : e - bx]
    covered = weight_sum > 0
    coverage = block_counts(covered) / _block_pixels(bh, bw)
    np.maximum(weight_sum, 1e-30, out=weight_sum)  # uncovered: Σ w·p = 0 there and stays 0 (a `where=` costs 2×)
    np.reciprocal(weight_sum, out=weight_sum)
    values_map = sums[:-1]
    values_map *= weight_sum
    weight_blocks = block_sums[0]
    np.divide(1.0, weight_blocks, out=weight_blocks, where=weight_blocks > 0)
    patch_maps = np.stack([block_sums[1] * weight_blocks, block_sums[2] * weight_blocks, coverage])
    for level, array in enumerate(levels):
        if level:
            values_map = halve(values_map)
        y, x = band.y0 >> level, band.x0 >> level
        array[:, y : y + values_map.shape[1], x : x + values_map.shape[2]] = values_map.astype(MAP_DTYPE)
    y, x = band.y0 // BLOCK, band.x0 // BLOCK
    patch_level[:, y : y + nby, x : x + nbx] = patch_maps.astype(MAP_DTYPE)
    done[index] = 1  # after the band's chunks: a flag never names unwritten data
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


def stitch_slide(store: PredictionStore, slide_index: int, out: Path, blend: str = "gaussian", tiff: Path | None = None,
                 workers: int | None = None, progress: bool = True, resume: bool = False, band_bytes: int = BAND_BYTES) -> Path:
    """Write one slide's map as OME-Zarr 0.5 (pyramid to ≤ 1024 px, patch maps), optionally OME-TIFF.

    Bands are the unit of resume: a killed run continued with `resume` redoes only unfinished bands."""
    entry = store.slides[slide_index]
    height, width = entry["shape"]
    patch = int(store.attrs["patch_size"])
    w = window(blend, patch)
    coords = store.coords
    idx = np.nonzero(coords[:, 0] == slide_index)[0]
    gate = np.stack([np.nan_to_num(np.asarray(store.root["divergence"][:])[idx], nan=0.0),  # NaN: uni-modal only
                     np.asarray(store.root["multimodal_fraction"][:])[idx]], 1).astype(np.float32)
    n_values = 2 if "pred_sd" in store.root else 1
    bands = plan_bands(coords[idx, 1:], idx, gate, height, width, patch, band_bytes, pixel_bytes=4 * (n_values + 1))
    partial = out.with_name(out.name + ".partial")
    n_workers = workers or os.cpu_count() or 1
    item = np.dtype(MAP_DTYPE).itemsize
    map_bytes = (n_values * height * width + len(PATCH_MAP_CHANNELS) * math.prod(block_shape(height, width))) * item * 4 // 3
    map_bytes += height * width * 4 * 4 // 3 if tiff else 0
    check_resources(out, map_bytes, n_workers, band_bytes * 3 // 2 + WORKER_BYTES, "the map", "use fewer --workers or a smaller --band-mb")
    plan = {"blend": blend, "source": str(Path(store.path).resolve()), "slide": entry["slide_id"], "bands": [[b.y0, b.y1, b.x0, b.x1] for b in bands]}
    root = _open_partial(partial, n_values, height, width, len(bands), plan, resume)
    n_written = min(BAND_LEVELS, len(pyramid_shapes(height, width, PYRAMID_MIN)))
    written, patch0, done = [writable(root[str(level)]) for level in range(n_written)], writable(root[PATCH_MAPS]["0"]), root["bands_done"]
    todo = np.nonzero(np.asarray(done[:]) == 0)[0]
    tasks = [dask.delayed(merge_band, pure=False, traverse=False)(str(store.path), bands[i], written, patch0, w, done, int(i), dask_key_name=f"merge-{i:08d}")
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
    mpp = entry.get("mpp")
    levels = finish_map(root, entry["slide_id"], mpp, n_written,
                        {"blend": blend, "patch_size": patch, "stride": store.attrs["stride"], "slide": entry["slide_id"],
                         "source": str(store.path), "nuclei": bool(store.attrs.get("nuclei", True))})
    if tiff is not None:
        write_ome_tiff(tiff, levels, [VALUE_CHANNELS[0]["label"]], mpp, channels=[0], dtype=np.float32)
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
