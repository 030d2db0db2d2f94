"""Stitching throughput and peak memory: our streamed merger (canvas tiles in worker processes,
zarr output + pyramid + OME metadata) vs an in-memory Σw·p/Σw over the same patches (MONAI-style:
whole-canvas float32 accumulators), each in its own subprocess. Ours runs twice: once timed, once
with the memory sampler that adds its worker processes (reading their smaps takes their memory-map
lock 20 times a second, which slowed the timed run by ~10 %). The reference is one process: its
kernel high-water mark is exact and costs nothing.

The map is size² (32768² by default) from 256-px patches overlapping by 64 px; the patch values
are a smooth field of the global position, stored as float16 in a real prediction store.
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parent))
import argparse
import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import TreeMemory, machine, measure, peak_rss_mb  # noqa: E402


def make_store(path: Path, size: int, patch: int = 256, overlap: int = 64, shard: int = 64) -> None:

    from wsi_damm.tiling.grid import grid_positions
    from wsi_damm.tiling.store import create_prediction_store

    pos = grid_positions(size, patch, patch - overlap)
    yy, xx = np.meshgrid(pos, pos, indexing="ij")
    coords = np.stack([np.zeros(yy.size, np.int64), yy.ravel(), xx.ravel()], 1)

    class Conditions:  # the parts of a conditions store the prediction store copies
        images = np.empty((len(coords), 1, patch, patch), np.uint8)
        attrs = {"shard_patches": shard, "stride": patch - overlap, "overlap": overlap, "mpp": 0.5}
        slides = [{"slide_id": "bench", "shape": [size, size], "mpp": 0.5}]

    Conditions.coords = coords
    root = create_prediction_store(path, Conditions, {"roles": ["vessels", "nuclei"], "nuclei": True})
    r = np.arange(patch)
    for a in range(0, len(coords), shard):
        c = coords[a : a + shard]
        gy = (c[:, 1, None] + r[None])[:, :, None] / size
        gx = (c[:, 2, None] + r[None])[:, None, :] / size
        vals = 0.5 + 0.25 * np.sin(12 * gy) * np.cos(9 * gx) + 0.2 * np.sin(40 * (gy + gx))
        root["pred"][a : a + len(c)] = vals[:, None].astype(np.float16)
        root["divergence"][a : a + len(c)] = 0.3
        root["multimodal_fraction"][a : a + len(c)] = 0.5
    root["shard_done"][:] = 1
    root.attrs["complete"] = True


def _worker(kind: str, store: str, out: str, sample: str) -> None:
    import zarr

    from wsi_damm.stages.stitch import run_stitch
    from wsi_damm.stitching.merge import window

    root = zarr.open_group(store, mode="r")
    size = root.attrs["slides"][0]["shape"][0]
    memory = TreeMemory() if sample == "sampled" else contextlib.nullcontext()
    with memory:
        t0 = time.perf_counter()
        if kind == "ours":
            run_stitch(Path(store), Path(out), "gaussian", progress=False)
        else:
            patch = root.attrs["patch_size"]
            w = window("gaussian", patch)
            canvas = np.zeros((size, size), np.float32)
            weights = np.zeros((size, size), np.float32)
            coords = np.asarray(root["coords"][:])
            s = root.attrs["shard_patches"]
            for a in range(0, len(coords), s):
                pred = np.asarray(root["pred"][a : a + s])[:, 0].astype(np.float32)
                for k, (_, y, x) in enumerate(coords[a : a + s]):
                    canvas[y : y + patch, x : x + patch] += w * pred[k]
                    weights[y : y + patch, x : x + patch] += w
            np.divide(canvas, weights, out=canvas, where=weights > 0)
        seconds = time.perf_counter() - t0
    peak = memory.peak_mb if isinstance(memory, TreeMemory) else peak_rss_mb()
    print(json.dumps({"seconds": seconds, "mpx": size * size / 1e6, "peak_rss_mb": peak}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="8192² instead of 32768²")
    ap.add_argument("--size", type=int)
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(*args.worker)
        return
    size = args.size or (8192 if args.quick else 32768)
    work = Path(tempfile.mkdtemp(prefix="bench_stitch.", dir=os.environ.get("BENCH_TMP")))
    try:
        make_store(work / "pred.zarr", size)
        ref = measure(__file__, "reference", str(work / "pred.zarr"), str(work / "unused"), "unsampled")
        ours = measure(__file__, "ours", str(work / "pred.zarr"), str(work / "map.ome.zarr"), "unsampled")
        shutil.rmtree(work / "map.ome.zarr")
        ours["peak_rss_mb"] = measure(__file__, "ours", str(work / "pred.zarr"), str(work / "map.ome.zarr"), "sampled")["peak_rss_mb"]
        o, r = ours["mpx"] / ours["seconds"], ref["mpx"] / ref["seconds"]

        print(
            json.dumps(
                {
                    "name": "stitch_throughput_vs_in_memory",
                    "unit": "megapixels / s",
                    "map": f"{size}x{size}, patch 256, overlap 64",
                    "ours": round(o, 2),
                    "reference": round(r, 2),
                    "ratio": round(o / r, 3),
                    "target_ratio": 1.0,
                    "ours_does": "NP map (full resolution) + divergence, gate share, coverage (8-px blocks), zarr, pyramids, OME metadata",
                    "reference_does": "NP only, in memory, nothing written",
                    "seconds_ours": round(ours["seconds"], 1),
                    "seconds_reference": round(ref["seconds"], 1),
                    "peak_rss_mb_ours": round(ours["peak_rss_mb"], 1),
                    "peak_rss_mb_reference": round(ref["peak_rss_mb"], 1),
                    "target_peak_rss_mb_ours": 1024,
                    **machine(),
                },
                indent=2,
            )
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
