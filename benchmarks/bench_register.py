"""Channel registration time: `register_specs` (translation and rigid) on a synthetic slide whose DAPI
and NP channels were moved by a known shift (and, for rigid, rotation), with our band-pass (both Gaussians at once in
the Fourier domain) against the same registration with two spatial `scipy.ndimage.gaussian_filter`
passes (what it ran before 2 Dec). The two give the same transforms; the JSON says by how much they
differ, beside the times. Both run in this process, alternating, best of `--repeats`.
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parent))
import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
from _common import machine, peak_rss_mb, report  # noqa: E402
from scipy import ndimage

MOVES = {"nuclei": (11.3, -23.6, 2.1), "target": (-17.8, 9.4, -1.4)}  # dy, dx (px), degrees (rigid only)


def _spatial_band(img: np.ndarray, fine_px: float, coarse_px: float) -> np.ndarray:
    x = np.log1p(np.maximum(img.astype(np.float32), 0))
    return ndimage.gaussian_filter(x, fine_px) - ndimage.gaussian_filter(x, coarse_px)


def moved_slide(out: Path, size: int, method: str) -> Path:
    """A synthetic slide with its DAPI and NP channels shifted (`translation`) or also rotated about the
    centre (`rigid`), cubic resampling."""
    from wsi_damm.workflows.simulator import SynthConfig
    from wsi_damm.workflows.synth import write_slides

    if not (out / "synth_000.ome.tif").exists():
        write_slides(out, 1, SynthConfig(size=size, seed=3), progress=False)
    img = tifffile.imread(out / "synth_000.ome.tif")
    for k, role in ((1, "nuclei"), (2, "target")):
        dy, dx, degrees = MOVES[role]
        degrees = degrees if method == "rigid" else 0.0
        background = float(np.percentile(img[k], 1))  # what a scanner records beside the section
        turned = ndimage.rotate(img[k].astype(np.float32), degrees, reshape=False, order=3, mode="constant", cval=background)
        img[k] = np.clip(np.rint(ndimage.shift(turned, (dy, dx), order=3, mode="constant", cval=background)), 0, 65535).astype(img.dtype)
    path = out / f"{method}.ome.tif"
    tifffile.imwrite(
        path,
        img,
        metadata={"axes": "CYX", "Channel": {"Name": ["CD31", "DAPI", "NP"]}, "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5},
        tile=(256, 256),
        compression="zlib",
        photometric="minisblack",
    )
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="a 1024² slide instead of 2048²")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the JSON here")
    args = ap.parse_args()

    from wsi_damm.tiling import registration, specs_from_paths

    size = 1024 if args.quick else 2048
    ours_band = registration._band
    with tempfile.TemporaryDirectory() as tmp:
        results = []
        for method in ("translation", "rigid"):  # each slide moved the way it is registered
            path = moved_slide(Path(tmp), size, method)
            seconds = {"ours": [], "reference": []}
            transforms = {}
            for _ in range(args.repeats):
                for side, band in (("ours", ours_band), ("reference", _spatial_band)):
                    registration._band = band
                    t0 = time.perf_counter()
                    [spec] = registration.register_specs(specs_from_paths([str(path)], {}), method)
                    seconds[side].append(time.perf_counter() - t0)
                    transforms[side] = dict(spec.transforms)
            registration._band = ours_band
            ours, ref = min(seconds["ours"]), min(seconds["reference"])
            differ = max(
                max(abs(getattr(transforms["ours"][r], f) - getattr(transforms["reference"][r], f)) for f in ("dy", "dx", "degrees"))
                for r in MOVES
            )
            results.append(
                {
                    "name": f"register {method}, {size}² slide, DAPI and NP to CD31",
                    "unit": "s (best of repeats)",
                    "ours": round(ours, 2),
                    "reference": round(ref, 2),
                    "ratio": round(ref / ours, 3),  # higher is better: reference time / our time
                    "target_ratio": None,
                    "transforms_max_abs_difference": differ,
                    "transforms": {
                        r: {"dy": t.dy, "dx": t.dx, "degrees": t.degrees, "score": t.score} for r, t in transforms["ours"].items()
                    },
                }
            )
    summary = {"benchmark": "bench_register", "results": results, "peak_rss_mb": round(peak_rss_mb(), 1), "machine": machine()}
    report(summary, args.json)


if __name__ == "__main__":
    main()
