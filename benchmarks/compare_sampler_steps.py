"""Sampler steps against draws on trained demo-budget runs: is a smooth map from few steps worth more
than one full draw, or than the mean of four?

With an ODE sampler (DPM-Solver++) a draw's only randomness is its starting noise. At the largest
timestep the U-Net's x̂0 hardly depends on that noise: it is the model's estimate of the latents given
CD31 and DAPI (under its L1 loss, the conditional median of each latent value), so a 1-step sample is a
point estimate (what a regression network gives) rather than a draw from the distribution, and every further step adds detail that
SSIM and PSNR score as error wherever it is not the measured one. For every run directory given
(trained by `compare_budget.py`), the held-out slide is predicted with each of `--steps` (one draw,
and `--draws` draws) and scored on the same pixels as every other demo-budget map. Rows with the
demo's 10 steps repeat compare_budget's own (a check: same seed, same map). Numbers land in
`sampler_steps.json` (mean ± sd over the seeds of a run family, ddof = 1).

    python benchmarks/compare_sampler_steps.py RUN_DIR... [--steps 1 2 4 10] [--draws 1] [--out benchmarks/results/budget]
"""

from __future__ import annotations

import argparse
import json
import sys as _sys
import time
from pathlib import Path

_sys.path.insert(0, str(Path(__file__).resolve().parent))
from _demo_budget import demo_budget, predict_and_score, summary  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+", help="run directories (WORK/FAMILY/seedN) trained by compare_budget.py")
    ap.add_argument("--work", type=Path, default=Path("/tmp/compare_seamless"), help="the demo-budget data (compare_budget.py's --work)")
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 10])
    ap.add_argument("--draws", type=int, nargs="+", default=[1])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/budget"))
    args = ap.parse_args()

    t0 = time.perf_counter()
    demo = demo_budget(args.work)
    file = args.out / "sampler_steps.json"
    rows = json.loads(file.read_text())["runs"] if file.exists() else []  # rerun to add runs; a row done is kept
    for run in args.runs:
        cfg = json.loads((run / "config.json").read_text())
        seed = cfg["train"]["seed"]
        for steps in args.steps:
            for draws in args.draws:
                key = {"family": run.parent.name, "seed": seed, "steps": steps, "draws": draws}
                if any({k: r[k] for k in key} == key for r in rows):
                    continue
                score = predict_and_score(demo, run, draws, seed, "shifted", steps, name=f"steps{steps}_draws{draws}")
                rows.append(key | score)
                print(
                    json.dumps(
                        key | {"ssim": round(score["ssim"], 4), "psnr": round(score["psnr"], 2), "seconds": score["predict_seconds"]}
                    ),
                    flush=True,
                )
                write(file, demo, rows, time.perf_counter() - t0)


def write(file: Path, demo, rows: list[dict], seconds: float) -> None:
    rows.sort(key=lambda r: (r["family"], r["steps"], r["draws"], r["seed"]))
    table: dict = {}
    for fam, steps, draws in dict.fromkeys((r["family"], r["steps"], r["draws"]) for r in rows):
        mine = [r for r in rows if (r["family"], r["steps"], r["draws"]) == (fam, steps, draws)]
        table.setdefault(fam, {})[f"steps{steps}_draws{draws}"] = {
            **{m: summary([r[m] for r in mine]) for m in ("ssim", "psnr", "seam_score", "predict_seconds")},
            "regions": {
                g: {m: summary([r["regions"][g][m] for r in mine]) for m in ("ssim", "psnr", "multimodal_share")}
                for g in mine[0]["regions"]
            },
        }
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(
        json.dumps(
            {
                "simulator_version": demo.simulator_version,
                "sampler": "dpm++",
                "sampling": "shifted",
                "blurred_vessels": demo.blur,
                "seconds_this_invocation": round(seconds, 1),
                "summary": table,
                "runs": rows,
            },
            indent=1,
        )
        + "\n",
        encoding="utf-8",
    )


if __name__ == "__main__":
    main()
