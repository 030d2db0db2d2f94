"""Tiling throughput vs a raw in-memory decode of the same level (tifffile), same run.

Both sides run in their own fresh subprocess so each peak RSS is its own. Throughput is level
megapixels per second of wall time: for tiling, the whole `tile` job (plan, mask, read, normalise,
compress, write) over the slide's area.
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parent))
import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from _common import machine, measure, peak_rss_mb  # noqa: E402


def _worker(kind: str, slide: str, out: str) -> None:
    import tifffile

    from wsi_damm.slides import specs_from_paths
    from wsi_damm.stages.tile import run_tile
    from wsi_damm.tiling.plan import TileConfig

    t0 = time.perf_counter()
    if kind == "reference":
        arr = tifffile.imread(slide, level=0)
        pixels = arr.shape[1] * arr.shape[2]
    else:
        specs = specs_from_paths([slide], {})
        store = run_tile(specs, out, TileConfig(patch_size=256, overlap=64), progress=False)
        h, w = store.slides[0]["shape"]
        pixels = h * w
    seconds = time.perf_counter() - t0
    rss = peak_rss_mb()
    print(json.dumps({"seconds": seconds, "mpx": pixels / 1e6, "peak_rss_mb": rss}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="4096² instead of 16384²")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--keep", type=Path, help="reuse/keep the synthetic slide in this folder")
    args = ap.parse_args()
    if args.worker:
        _worker(*args.worker)
        return
    size = 4096 if args.quick else 16384
    work = Path(tempfile.mkdtemp(prefix="bench_tile."))
    data = args.keep or work
    slide = data / "synth_000.ome.tif"
    try:
        if not slide.exists():
            from wsi_damm.workflows.simulator import SynthConfig
            from wsi_damm.workflows.synth import write_slides

            write_slides(data, 1, SynthConfig(size=size, seed=1), progress=False)
        ref = measure(__file__, "reference", str(slide), str(work / "unused"))
        ours = measure(__file__, "ours", str(slide), str(work / "st.zarr"))
        raw_mb = 3 * size * size * 2 / 2**20
        ours_tp, ref_tp = ours["mpx"] / ours["seconds"], ref["mpx"] / ref["seconds"]

        print(
            json.dumps(
                {
                    "name": "tile_throughput_vs_raw_decode",
                    "unit": "level megapixels / s",
                    "slide": f"{size}x{size}x3 uint16 OME-TIFF (zlib, 256 px tiles)",
                    "ours": round(ours_tp, 2),
                    "reference": round(ref_tp, 2),
                    "ratio": round(ours_tp / ref_tp, 3),
                    "target_ratio": 0.7,
                    "seconds_ours": round(ours["seconds"], 2),
                    "seconds_reference": round(ref["seconds"], 2),
                    "peak_rss_mb_ours": round(ours["peak_rss_mb"], 1),
                    "peak_rss_mb_reference": round(ref["peak_rss_mb"], 1),
                    "raw_array_mb": round(raw_mb, 1),
                    "rss_ratio_to_raw": round(ours["peak_rss_mb"] / raw_mb, 3),
                    "target_rss_ratio": 1 / 3,
                    **machine(),
                },
                indent=2,
            )
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
