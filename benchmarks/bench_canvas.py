"""Canvas sampling vs independent sampling: time on the same slide at equal steps, and the peak
memory of a shifted-grid prediction on a large slide.

Ours: `predict --sampling shifted` (the slide denoised on its latent canvas through a grid shifted
every step; a run trained on canvas latents with local autoencoders) and `--sampling canvas` (the
tissue patches as fixed windows, x̂0 fused per step). Reference: `predict --sampling independent`
(each patch alone; a run of the paper's recipe, the same sizes). Same slide, sampler, steps, draws,
batch. All are whole `predict` jobs (tiling the inputs, sampling, decoding; stitching left out), each
in its own fresh subprocess, alternated. The weights come from a few training steps: timing does not
depend on them.

Memory: `wsi-damm predict --steps 2` (shifted, the tiny preset's default; then stitch) on a large
synthetic slide, its peak PSS summed over the job's process tree (not this process, which wrote the
slide), sampled every 50 ms.
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parent))
import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zarr
from _common import TreeMemory, machine, measure, peak_rss_mb  # noqa: E402

PATCH, OVERLAP = 128, 32


def _worker(sampling: str, run: str, slide: str, out: str, steps: str) -> None:
    from wsi_damm.stages.predict import PredictConfig, run_predict
    from wsi_damm.tiling.inputs import resolve_slides

    t0 = time.perf_counter()
    store = run_predict(
        Path(run),
        resolve_slides([slide]),
        Path(out),
        PredictConfig(sampling=sampling, steps=int(steps), batch_size=32),
        overwrite=True,
        progress=False,
    )
    print(json.dumps({"seconds": time.perf_counter() - t0, "patches": len(store), "peak_rss_mb": peak_rss_mb()}))


def _run_dir(work: Path, recipe: str) -> Path:
    """A tiny-preset run trained for a few steps on one small synthetic slide: "canvas" (the preset's
    recipe) or "paper" (GroupNorm autoencoders, patch latents)."""
    from wsi_damm.stages.tile import run_tile
    from wsi_damm.stages.train import run_training
    from wsi_damm.tiling.inputs import resolve_slides
    from wsi_damm.tiling.plan import TileConfig
    from wsi_damm.training.config import merge, resolve
    from wsi_damm.workflows.simulator import SynthConfig
    from wsi_damm.workflows.synth import write_slides

    if not (work / "train.zarr").exists():
        write_slides(work / "train", 1, SynthConfig(size=1024, seed=5), progress=False)
        run_tile(
            resolve_slides([work / "train" / "synth_000.ome.tif"]),
            work / "train.zarr",
            TileConfig(patch_size=PATCH, overlap=OVERLAP),
            progress=False,
        )
    overrides = {"autoencoder": {"steps": 5}, "train": {"steps": 5, "val_fraction": 0.0, "checkpoint_every": 5}}
    if recipe == "paper":
        overrides = {**overrides, "autoencoder": {"steps": 5, "local": False}, "model": {"latents": "patch"}}
    cfg = merge(resolve("tiny"), overrides, "bench")
    return run_training(work / "train.zarr", work / f"run_{recipe}", cfg, progress=False).path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="1024² and 4096² slides instead of 2048² and 16384²")
    ap.add_argument("--steps", type=int, default=10, help="sampler steps of the time comparison (the demo's 10)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-time", action="store_true", help="only the memory part")
    ap.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(*args.worker)
        return
    from wsi_damm.workflows.simulator import SynthConfig
    from wsi_damm.workflows.synth import write_slides

    size, big = (1024, 4096) if args.quick else (2048, 16384)
    work = Path(tempfile.mkdtemp(prefix="bench_canvas."))
    try:
        run = (
            {"canvas": _run_dir(work, "canvas")}
            if args.skip_time
            else {"paper": _run_dir(work, "paper"), "canvas": _run_dir(work, "canvas")}
        )
        result: dict = {**machine()}
        if not args.skip_time:
            write_slides(work / "slide", 1, SynthConfig(size=size, seed=11), progress=False)
            slide = str(work / "slide" / "synth_000.ome.tif")
            recipe_of = {"independent": "paper", "canvas": "paper", "shifted": "canvas"}
            runs: dict[str, list[dict]] = {k: [] for k in recipe_of}
            for _ in range(args.repeats):
                for sampling, recipe in recipe_of.items():
                    runs[sampling].append(
                        measure(__file__, sampling, str(run[recipe]), slide, str(work / f"{sampling}.zarr"), str(args.steps))
                    )
            best = {k: min(v, key=lambda r: r["seconds"]) for k, v in runs.items()}
            result = {
                "name": f"predict, shifted-grid and canvas vs independent sampling, {size}² slide,"
                " tiny preset sizes, DPM++ {args.steps} steps, 1 draw",
                "unit": "patches/s",
                "ours": best["shifted"]["patches"] / best["shifted"]["seconds"],
                "reference": best["independent"]["patches"] / best["independent"]["seconds"],
                "seconds": {k: [round(r["seconds"], 2) for r in v] for k, v in runs.items()},
                "time_ratio_shifted_over_independent": best["shifted"]["seconds"] / best["independent"]["seconds"],
                "time_ratio_canvas_over_independent": best["canvas"]["seconds"] / best["independent"]["seconds"],
                "target_time_ratio": "<= 1.3",
                "patches": best["shifted"]["patches"],
                "peak_rss_mb": {k: round(v["peak_rss_mb"], 1) for k, v in best.items()},
                **machine(),
            }
            result["ratio"] = result["ours"] / result["reference"]
        if not args.skip_memory:
            write_slides(work / "big", 1, SynthConfig(size=big, seed=12), progress=False)
            t0 = time.perf_counter()
            argv = [
                sys.executable,
                "-m",
                "wsi_damm_cli.main",
                "predict",
                str(run["canvas"]),
                str(work / "big" / "synth_000.ome.tif"),
                "--out",
                str(work / "big.zarr"),
                "--steps",
                "2",
                "--sampling",
                "shifted",
                "--quiet",
            ]
            job = subprocess.Popen(argv, stdout=sys.stderr)  # its report lines stay out of the JSON
            with TreeMemory(root=job.pid) as mem:  # the job's processes only: this one still holds the slide it wrote
                if job.wait() != 0:
                    raise subprocess.CalledProcessError(job.returncode, argv)
            result["memory"] = {
                "slide": f"{big}²",
                "what": "wsi-damm predict --sampling shifted --steps 2 (then stitch), the job's processes",
                "peak_pss_mb": round(mem.peak_mb, 1),
                "target_mb": 2048,
                "seconds": round(time.perf_counter() - t0, 1),
                "patches": int(zarr.open_group(str(work / "big.zarr"), mode="r")["pred"].shape[0]),
            }
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
