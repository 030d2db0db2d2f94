"""Training with freed memory reused (`heap.reusing_freed_memory`, what `run_training` and the regression
U-Net's training do) against glibc's default, where every block over 32 MB is mapped afresh and
faulted in page by page on every step. Each model trains a short run as a user's `train` runs it, on
the demo's data and settings, once per mode, each in a fresh process: the canvas recipe's autoencoders,
the demo's diffusion model on them, and the study's regression U-Net (pixel space, the largest blocks).

    python benchmarks/bench_heap.py [--steps 40] [--work DIR] [--json FILE]

Prints JSON: per model, the seconds of the training call, kernel (system) CPU time, minor page faults
and peak resident memory of each mode, and the speed-up (default seconds / reusing seconds).
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parent))
import argparse
import json
import resource
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from _common import machine, measure, report  # noqa: E402

MODELS = ("autoencoder", "diffusion", "regression")
MODES = ("default", "reusing")


@contextmanager
def _glibc_default():
    yield False


def worker(mode: str, model: str, work: Path, steps: int) -> dict:
    from _demo_budget import budget_config

    from wsi_damm.stages import train as train_stage
    from wsi_damm.workflows import regression
    from wsi_damm.workflows.demo import FULL

    if mode == "default":  # the training calls without the heap settings: glibc's own behaviour
        train_stage.reusing_freed_memory = regression.reusing_freed_memory = _glibc_default
    cfg = budget_config(FULL, 0, autoencoder={"steps": steps}, train={"steps": steps, "checkpoint_every": steps})
    store, out = work / "data" / "patches.zarr", work / f"{model}_{mode}"
    shutil.rmtree(out, ignore_errors=True)
    if model == "diffusion":  # on the autoencoders the autoencoder run of the same mode trained
        shutil.copytree(work / f"autoencoder_{mode}", out)
    before = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    if model == "regression":
        regression.train_regression(store, out, cfg, progress=False)
    else:
        train_stage.run_training(store, out, cfg, stage=model, progress=False)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "seconds": round(seconds, 2),
        "system_cpu_s": round(after.ru_stime - before.ru_stime, 2),
        "minor_faults": after.ru_minflt - before.ru_minflt,
        "peak_rss_mb": round(after.ru_maxrss / 1024),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40, help="training steps of each model (default 40)")
    ap.add_argument("--work", type=Path, help="where the demo's data and the runs go (default: a temporary directory)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--worker", nargs=4, metavar=("MODE", "MODEL", "WORK", "STEPS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        mode, model, work, steps = args.worker
        print(json.dumps(worker(mode, model, Path(work), int(steps))))
        return
    from _demo_budget import demo_budget

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_heap_"))
    demo_budget(work)  # the demo's synthetic slides and patch store
    results = {}
    for model in MODELS:
        runs = {mode: measure(__file__, mode, model, str(work), str(args.steps)) for mode in MODES}
        results[model] = {**runs, "speedup": round(runs["default"]["seconds"] / runs["reusing"]["seconds"], 2)}
    out = {"benchmark": "bench_heap", "steps": args.steps, "machine": machine(), "models": results}
    report(out, args.json)


if __name__ == "__main__":
    main()
