"""Whole-slide SSIM: our streamed dask computation vs scikit-image in memory on the same pair; and what
`evaluate`'s other numbers (PSNR, Pearson's r, NRMSE, spectral fidelity) cost beside streamed SSIM alone.

Each side runs in its own subprocess (own peak RSS). The pair is a structured map and a noisy,
shifted copy, stored as float32 .npy; ours reads it memory-mapped in 1024² blocks.
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

import numpy as np
from _common import machine, measure, peak_rss_mb, report  # noqa: E402


def make_pair(d: Path, size: int) -> None:
    rng = np.random.default_rng(0)
    a = np.lib.format.open_memmap(d / "a.npy", mode="w+", dtype=np.float32, shape=(size, size))
    b = np.lib.format.open_memmap(d / "b.npy", mode="w+", dtype=np.float32, shape=(size, size))
    xs = np.arange(size, dtype=np.float32) / 300
    for y in range(0, size, 1024):
        yy = (np.arange(y, min(y + 1024, size), dtype=np.float32) / 300)[:, None]
        band = 0.5 + 0.3 * np.sin(yy) * np.cos(1.3 * xs[None]) + 0.1 * np.sin(7 * yy + 3 * xs[None])
        a[y : y + 1024] = band
        b[y : y + 1024] = np.clip(band + 0.03 * np.sin(11 * xs[None]) + rng.normal(0, 0.02, band.shape), 0, 1)
    a.flush()
    b.flush()


def _worker(kind: str, d: str) -> None:
    import dask.array as da

    d = Path(d)
    t0 = time.perf_counter()
    if kind == "reference":
        from skimage.metrics import structural_similarity

        a, b = np.load(d / "a.npy"), np.load(d / "b.npy")
        value = structural_similarity(a, b, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    else:
        from wsi_damm.evaluation.metrics import ssim_field, whole_slide_metrics

        a = da.from_array(np.load(d / "a.npy", mmap_mode="r"), chunks=1024)
        b = da.from_array(np.load(d / "b.npy", mmap_mode="r"), chunks=1024)
        if kind == "ssim_alone":  # the streamed SSIM and nothing else
            s = ssim_field(a, b)
            total, n = da.compute(da.nansum(s), (~da.isnan(s)).sum())
            value = total / n
        else:
            value = whole_slide_metrics(a, b)["ssim"]
    print(json.dumps({"seconds": time.perf_counter() - t0, "ssim": float(value), "peak_rss_mb": peak_rss_mb()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="4096² instead of 16384²")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, help="also write the JSON here")
    args = ap.parse_args()
    if args.worker:
        _worker(*args.worker)
        return
    size = 4096 if args.quick else 16384
    d = Path(tempfile.mkdtemp(prefix="bench_metrics."))
    try:
        make_pair(d, size)
        ref, ours = measure(__file__, "reference", str(d)), measure(__file__, "ours", str(d))
        alone = measure(__file__, "ssim_alone", str(d))
        mpx = size * size / 1e6

        report(
            {
                "name": "wsi_ssim_vs_scikit_image",
                "unit": "megapixels / s",
                "pair": f"{size}x{size} float32",
                "ours": round(mpx / ours["seconds"], 2),
                "reference": round(mpx / ref["seconds"], 2),
                "ratio": round(ref["seconds"] / ours["seconds"], 3),
                "target_ratio": 1.0,
                "ssim_ours": ours["ssim"],
                "ssim_reference": ref["ssim"],
                "abs_difference": abs(ours["ssim"] - ref["ssim"]),
                "peak_rss_mb_ours": round(ours["peak_rss_mb"], 1),
                "peak_rss_mb_reference": round(ref["peak_rss_mb"], 1),
                "every_metric_over_ssim_alone": {
                    "time_ratio": round(ours["seconds"] / alone["seconds"], 3),
                    "peak_rss_ratio": round(ours["peak_rss_mb"] / alone["peak_rss_mb"], 3),
                    "seconds_ssim_alone": round(alone["seconds"], 2),
                    "peak_rss_mb_ssim_alone": round(alone["peak_rss_mb"], 1),
                },
                "machine": machine(),
            },
            args.json,
        )
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
