"""The sampler on a sparse target: do more solver steps, or a stochastic sampler, bring one draw closer to the measured
stain than the demo's 10 DPM-Solver++ steps?

Runs trained by `compare_sparse_target.py` (the `tiny` preset at the demo's budget on the simulator's perfusion
target) predict the held-out slide with one draw under each sampler setting — DPM-Solver++ at 10 and 25 steps,
DDIM at 50 steps deterministic (η = 0) and ancestral (η = 1) — on the same canvas, seeds and pixels, each map scored
by `evaluate`: Pearson's r, the map's mean and spread against the measured channel's, SSIM and PSNR.

    python benchmarks/compare_sparse_sampler.py --work W RUN_DIR... [--json benchmarks/results/sparse/sparse_sampler.json]

Maps are kept in each run directory (sampler_*), so a rerun resumes.
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parent))
import argparse
import json
from pathlib import Path

from _common import machine, report  # noqa: E402
from _demo_budget import demo_budget, predict_and_score, summary  # noqa: E402

SETTINGS = (("dpm++", 10, 0.0), ("dpm++", 25, 0.0), ("ddim", 50, 0.0), ("ddim", 50, 1.0))
FIGURES = ("pearson_r", "mean_ratio", "spread_ratio", "ssim", "psnr")


def one_draw(demo, run: Path, seed: int, sampler: str, steps: int, eta: float) -> dict:
    """The held-out slide drawn once by `run` with this sampler, scored; the map and its figures kept in the run
    directory."""
    name = f"sampler_{sampler}_{steps}_eta{eta:g}"
    done = run / f"{name}_report" / "scores.json"
    if done.exists():
        return json.loads(done.read_text())
    s = predict_and_score(demo, run, 1, seed, "shifted", steps, name=name, sampler=sampler, eta=eta)
    row = {f: s["check"][f] for f in FIGURES[:3]} | {"ssim": s["ssim"], "psnr": s["psnr"], "predict_seconds": s["predict_seconds"]}
    done.write_text(json.dumps(row))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+", help="run directories trained by compare_sparse_target.py (one per seed)")
    ap.add_argument("--work", type=Path, required=True, help="compare_sparse_target.py's --work (its data and blur)")
    ap.add_argument("--target", default="perfusion")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    demo = demo_budget(args.work / args.target, args.target)
    rows = []
    for run in args.runs:
        seed = int(json.loads((run / "config.json").read_text())["train"]["seed"])
        for sampler, steps, eta in SETTINGS:
            row = {"run": run.name, "seed": seed, "sampler": sampler, "steps": steps, "eta": eta}
            rows.append(row | one_draw(demo, run, seed, sampler, steps, eta))
            print(json.dumps(rows[-1]), flush=True)
    table = {
        f"{sampler} {steps} steps, eta {eta:g}": {
            f: summary([r[f] for r in rows if (r["sampler"], r["steps"], r["eta"]) == (sampler, steps, eta)]) for f in FIGURES
        }
        for sampler, steps, eta in SETTINGS
    }
    report(
        {
            "benchmark": "compare_sparse_sampler",
            "target": args.target,
            "simulator_version": demo.simulator_version,
            "blur": {f: demo.blur["check"][f] for f in FIGURES[:3]},
            "runs": rows,
            "summary": table,
            "machine": machine(),
        },
        args.json,
    )


if __name__ == "__main__":
    main()
