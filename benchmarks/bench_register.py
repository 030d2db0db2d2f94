"""Channel registration time: `register_specs` (translation and rigid) on a synthetic slide whose DAPI and NP
channels were moved by a known shift (and, for rigid, rotation), today's code against the registration as it was
on 2 Dec (commit 68a8d7c: every window re-read through the transform and band-passed again, 21 angles ranked by the
full sub-pixel search), read from this repository's git history into a module of its own. Both run in this
process on the same slide, alternating, best of `--repeats`; the JSON gives both times, their ratio and by how much
the transforms differ.
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parent))
import argparse
import subprocess
import tempfile
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import tifffile
from _common import machine, peak_rss_mb, report  # noqa: E402
from scipy import ndimage

MOVES = {"nuclei": (11.3, -23.6, 2.1), "target": (-17.8, 9.4, -1.4)}  # dy, dx (px), degrees (rigid only)


REFERENCE_COMMIT = "68a8d7c"
REFERENCE_IMPORTS = {  # its relative imports, as those modules are named today
    "from .errors import": "from wsi_damm.util.errors import",
    "from .slides.roles import": "from wsi_damm.slides.roles import",
    "from .tiling import": "from wsi_damm.tiling.grid import",
}


def reference_registration() -> ModuleType:
    """`wsi_damm/registration.py` of REFERENCE_COMMIT, its imports mapped to today's modules."""
    root = Path(__file__).resolve().parent.parent
    try:
        text = subprocess.run(
            ["git", "-C", str(root), "show", f"{REFERENCE_COMMIT}:wsi_damm/registration.py"], check=True, capture_output=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit(f"bench_register: needs the repository's git history for the reference ({REFERENCE_COMMIT}): {exc}") from exc
    for old, new in REFERENCE_IMPORTS.items():
        text = text.replace(old, new)
    module = ModuleType("registration_reference")
    exec(compile(text, f"{REFERENCE_COMMIT}:wsi_damm/registration.py", "exec"), module.__dict__)
    return module


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

    from wsi_damm.slides.roles import specs_from_paths
    from wsi_damm.tiling import registration

    sides = {"ours": registration, "reference": reference_registration()}
    size = 1024 if args.quick else 2048
    with tempfile.TemporaryDirectory() as tmp:
        results = []
        for method in ("translation", "rigid"):  # each slide moved the way it is registered
            path = moved_slide(Path(tmp), size, method)
            seconds: dict[str, list[float]] = {side: [] for side in sides}
            transforms = {}
            for _ in range(args.repeats):
                for side, module in sides.items():
                    t0 = time.perf_counter()
                    [spec] = module.register_specs(specs_from_paths([str(path)], {}), method)
                    seconds[side].append(time.perf_counter() - t0)
                    transforms[side] = dict(spec.transforms)
            ours, ref = min(seconds["ours"]), min(seconds["reference"])
            differ = {
                unit: max(abs(getattr(transforms["ours"][r], f) - getattr(transforms["reference"][r], f)) for r in MOVES for f in fields)
                for unit, fields in (("px", ("dy", "dx")), ("degrees", ("degrees",)))
            }
            results.append(
                {
                    "name": f"register {method}, {size}² slide, DAPI and NP to CD31",
                    "unit": "s (best of repeats)",
                    "ours": round(ours, 2),
                    "reference": round(ref, 2),
                    "ratio": round(ref / ours, 3),  # higher is better: reference time / our time
                    "target_ratio": 5.0,
                    "transforms_max_abs_difference": differ,
                    "transforms": {
                        r: {"dy": t.dy, "dx": t.dx, "degrees": t.degrees, "score": t.score} for r, t in transforms["ours"].items()
                    },
                }
            )
    summary = {
        "benchmark": "bench_register",
        "reference": f"wsi_damm/registration.py at {REFERENCE_COMMIT}",
        "results": results,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "machine": machine(),
    }
    report(summary, args.json)


if __name__ == "__main__":
    main()
