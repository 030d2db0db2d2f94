"""The regression U-Net (L1, the pix2pix generator without its GAN) beside DAMM at the demo's budget,
paired by training seed, on the same machine and the same pixels.

For every run directory given (trained by `compare_budget.py`, e.g. WORK/budget900/seed0), a regression
U-Net is trained on the same patch store with that run's training settings — steps, batch size, batch
order, learning-rate schedule, clipping, EMA and seed — and its context, so the model and the loss differ,
and nothing else (run families that differ only in their autoencoders share one regression run per seed). It
learns from the run's training split, the patches DAMM learned from (until 3 Dec it learned from every patch,
twice DAMM's data where the run held a slide out for validation; such rows are never reused). Its map
goes through `predict`'s tiling and `stitch` and is scored on the demo's held-out slide like every
other demo-budget map (tissue, and per simulator region). Each seed's DAMM rows are read from the same
run's `row.json` (one draw, 4 draws) and from `sampler_steps.json` (the 1-step point estimate) when
there, so the JSON holds the paired differences. Rerun to add seeds; a seed done is kept.

    python benchmarks/compare_regression.py WORK/budget900/seed0 WORK/budget900/seed1 ... [--work WORK] [--out benchmarks/results/budget]
"""

from __future__ import annotations

import argparse
import json
import sys as _sys
import time
from dataclasses import asdict
from pathlib import Path

_sys.path.insert(0, str(Path(__file__).resolve().parent))
from _demo_budget import demo_budget, scores, summary  # noqa: E402

METRICS = ("ssim", "psnr")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+", help="run directories (WORK/FAMILY/seedN) trained by compare_budget.py")
    ap.add_argument("--work", type=Path, default=Path("/tmp/compare_seamless"), help="the demo-budget data (compare_budget.py's --work)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/budget"))
    args = ap.parse_args()

    from wsi_damm.stages.evaluate import run_evaluate
    from wsi_damm.training.run_dir import RunDir, load_run_config
    from wsi_damm.workflows.regression import regression_map, train_regression

    t0 = time.perf_counter()
    demo = demo_budget(args.work)
    file = args.out / "regression.json"
    rows = json.loads(file.read_text())["runs"] if file.exists() else []
    steps_file = args.out / "sampler_steps.json"
    point = json.loads(steps_file.read_text())["runs"] if steps_file.exists() else []
    for run in args.runs:
        rc = load_run_config(RunDir(run))
        key = {"family": run.parent.name, "seed": rc.train.seed}
        if any({k: r[k] for k in key} == key for r in rows):
            continue
        # the regression depends on the training settings and the context only, not on the autoencoders:
        # families that share them (e.g. two autoencoder variants) share one regression run per seed
        setting = json.loads(json.dumps({"train": asdict(rc.train), "context_span": rc.model.context_span}))  # as stored
        t = time.perf_counter()
        # rows from before 3 Dec trained on every patch whatever the run's split: they carry no train_patches
        done = [r["regression"] for r in rows if r["regression"]["setting"] == setting and "train_patches" in r["regression"]]
        if done:
            reg = done[0]
        else:
            reg_dir = args.work / "regression" / f"seed{rc.train.seed}_span{rc.model.context_span}"
            train_regression(demo.data.store, reg_dir, rc, progress=False)
            trained = json.loads((reg_dir / "config.json").read_text())
            if trained["run"]["train"] != setting["train"] or "train_patches" not in trained:
                raise SystemExit(f"{reg_dir}: trained with other settings or data than {run}; remove it to retrain")
            t_map = time.perf_counter()
            m = regression_map(reg_dir, demo.held.spec, reg_dir / "map.ome.zarr", progress=False)
            scored = scores(run_evaluate([(m, demo.held.spec)], reg_dir / "report", [demo.held.clean], **demo.scoring))
            reg = _brief(scored) | {
                "seam_score": scored["seam_score"],
                "setting": setting,
                "train_seconds": trained["seconds"],
                "map_seconds": round(time.perf_counter() - t_map, 1),
                "final_l1": trained["final_l1"],
                "train_patches": trained["train_patches"],
            }
        damm = json.loads((run / "row.json").read_text())
        one_step = [r for r in point if r["family"] == key["family"] and r["seed"] == key["seed"] and r["steps"] == 1 and r["draws"] == 1]
        rows.append(
            key
            | {
                "regression": reg,
                "damm_one_draw": _brief(damm["draws1"]),
                "damm_four_draws": _brief(damm["draws4"]) if "draws4" in damm else None,
                "damm_one_step": _brief(one_step[0]) if one_step else None,
                "seconds": round(time.perf_counter() - t, 1),
            }
        )
        print(
            json.dumps(key | {"ssim": round(reg["ssim"], 4), "psnr": round(reg["psnr"], 2), "train_seconds": reg["train_seconds"]}),
            flush=True,
        )
        write(file, demo, rows, time.perf_counter() - t0)
    write(file, demo, rows, time.perf_counter() - t0)


def _brief(score: dict) -> dict:
    """SSIM and PSNR over tissue and per region (no gate share: the regression has no gate)."""
    return {m: score[m] for m in METRICS} | {"regions": {g: {m: v[m] for m in METRICS} for g, v in score["regions"].items()}}


def write(file: Path, demo, rows: list[dict], seconds: float) -> None:
    """Per family: the regression's scores, each DAMM row's, and DAMM minus regression paired by seed."""
    rows.sort(key=lambda r: (r["family"], r["seed"]))
    table: dict = {}
    for fam in dict.fromkeys(r["family"] for r in rows):
        mine = [r for r in rows if r["family"] == fam]
        entry = {"regression": _summarise([r["regression"] for r in mine])}
        for name in ("damm_one_draw", "damm_four_draws", "damm_one_step"):
            paired = [r for r in mine if r[name] is not None]
            if paired:
                entry[name] = _summarise([r[name] for r in paired])
                entry[f"{name}_minus_regression"] = {m: summary([r[name][m] - r["regression"][m] for r in paired]) for m in METRICS} | {
                    "regions": {
                        g: {m: summary([r[name]["regions"][g][m] - r["regression"]["regions"][g][m] for r in paired]) for m in METRICS}
                        for g in paired[0]["regression"]["regions"]
                    }
                }
        table[fam] = entry
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(
        json.dumps(
            {
                "simulator_version": demo.simulator_version,
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


def _summarise(scored: list[dict]) -> dict:
    return {m: summary([s[m] for s in scored]) for m in METRICS} | {
        "regions": {g: {m: summary([s["regions"][g][m] for s in scored]) for m in METRICS} for g in scored[0]["regions"]}
    }


if __name__ == "__main__":
    main()
