"""Deep-zoom tiles for the report's viewer, streamed from a map's OME-Zarr pyramid: time and peak
memory for a size² map (16384² by default), three layers (predicted NP, divergence, gate share: what
a map alone holds), JPEG tiles. Reference, same run: reading the map's full-resolution NP level once
chunk by chunk (the I/O floor of any viewer that shows full resolution). Each side in its own process.

The map is made by `wsi-damm stitch` from a prediction store of a smooth field (bench_stitch's).
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parent))
import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import machine, measure, peak_rss_mb, report  # noqa: E402
from bench_stitch import make_store  # noqa: E402


def _worker(kind: str, map_path: str, out: str) -> None:
    from wsi_damm.evaluation.deepzoom import colour_map, write_dzi
    from wsi_damm.evaluation.viewer import LAYERS, _map_channel, _patch_map
    from wsi_damm.stitching.slide_map import DIVERGENCE, SHARE, open_map

    m = open_map(map_path)
    shape = tuple(m.level0.shape[1:])
    t0 = time.perf_counter()
    tiles = 0
    if kind == "ours":
        style = {la.key: la for la in LAYERS}
        for key, source in (
            ("predicted", _map_channel(m, 0, shape)),
            ("divergence", _patch_map(m, DIVERGENCE, shape)),
            ("share", _patch_map(m, SHARE, shape)),
        ):
            la = style[key]
            write_dzi(Path(out), key, source, colour_map(la.cmap, la.vmin, la.vmax), workers=os.cpu_count() or 1)
        tiles = sum(1 for _ in Path(out).rglob("*.jpg"))
    else:
        level = m.level0
        step = level.chunks[1]
        total = 0.0
        for y in range(0, shape[0], step):
            total += float(np.asarray(level[0, y : y + step, :], np.float32).sum())
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "tiles": tiles, "peak_rss_mb": peak_rss_mb()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="4096² instead of 16384²")
    ap.add_argument("--size", type=int)
    ap.add_argument("--json", type=Path, help="Also write the result here.")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(*args.worker)
        return
    size = args.size or (4096 if args.quick else 16384)
    work = Path(tempfile.mkdtemp(prefix="bench_viewer.", dir=os.environ.get("BENCH_TMP")))
    try:
        from wsi_damm.stages.stitch import run_stitch

        make_store(work / "pred.zarr", size)
        run_stitch(work / "pred.zarr", work / "map.ome.zarr", "gaussian", progress=False)
        ref = measure(__file__, "reference", str(work / "map.ome.zarr"), str(work / "unused"))
        ours = measure(__file__, "ours", str(work / "map.ome.zarr"), str(work / "tiles"))
        result = {
            "name": "viewer_tiles_vs_reading_the_map",
            "unit": "seconds (lower is better); ratio = reference / ours",
            "map": f"{size}x{size}",
            "ours": round(ours["seconds"], 1),
            "reference": round(ref["seconds"], 1),
            "ratio": round(ref["seconds"] / ours["seconds"], 3),
            "tiles_written": ours["tiles"],
            "ours_does": "DZI JPEG tiles, every level, of 3 layers (predicted NP, divergence, gate share) from the OME-Zarr pyramid",
            "reference_does": "read the full-resolution NP level once, chunk rows, nothing written",
            "peak_rss_mb_ours": round(ours["peak_rss_mb"], 1),
            "peak_rss_mb_reference": round(ref["peak_rss_mb"], 1),
            "map_float32_mb": round(size * size * 4 / 2**20),
            **machine(),
        }
        report(result, args.json)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
