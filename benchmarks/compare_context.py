"""Does context help? DAMM trained at the demo's budget with and without a low-resolution window
around each patch (`model.context_span`), on the demo's synthetic data, scored on its held-out slide.

For each seed one set of autoencoders is trained and copied into every span's run, so the runs differ
only in the context condition (and what the U-Net learns from it). Each run predicts the held-out
slide with one draw and with the mean of 4 draws (DPM-Solver++, the demo's 10 steps, independent
sampling as the demo); every map is scored on the same pixels against the measured NP channel, over
tissue and per simulator region, beside the blurred-vessel baseline. Prints and writes
`context.json` (per run, and mean ± sd with ddof = 1 over seeds).

    python benchmarks/compare_context.py --out benchmarks/results/context [--spans 0 4] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys as _sys
import time
from pathlib import Path

_sys.path.insert(0, str(Path(__file__).resolve().parent))
from _demo_budget import budget_config, demo_budget, predict_and_score, summary  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/context"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/compare_context"), help="data, runs and maps (kept: rerun to resume)")
    ap.add_argument("--spans", type=int, nargs="+", default=[0, 4])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()

    from wsi_damm.stages.train import run_training

    work = args.work
    t0 = time.perf_counter()
    demo = demo_budget(work)
    paper = ({"local": False}, {"latents": "patch"})  # the recipe it measured (the tiny preset's then)
    runs = []
    for seed in args.seeds:
        ae = work / f"seed{seed}" / "autoencoders"
        if not (ae / "config.json").exists():
            run_training(demo.data.store, ae, budget_config(demo.plan, seed, *paper), stage="autoencoder", progress=False)
        for span in args.spans:
            run_dir = work / f"seed{seed}" / f"span{span}"
            if not (run_dir / "unet_ema.safetensors").exists():
                shutil.rmtree(run_dir, ignore_errors=True)
                shutil.copytree(ae, run_dir)
                t = time.perf_counter()
                cfg = budget_config(demo.plan, seed, paper[0], {**paper[1], "context_span": span})
                run_training(demo.data.store, run_dir, cfg, stage="diffusion", progress=False)
                print(f"seed {seed} span {span}: trained in {time.perf_counter() - t:.0f} s", flush=True)
            row = {"seed": seed, "span": span}
            for draws in (1, 4):
                row[f"draws{draws}"] = predict_and_score(demo, run_dir, draws, seed)
            print(
                json.dumps(
                    {k: row[k] for k in ("seed", "span")}
                    | {f"draws{d}": (round(row[f"draws{d}"]["ssim"], 4), round(row[f"draws{d}"]["psnr"], 2)) for d in (1, 4)}
                ),
                flush=True,
            )
            runs.append(row)
    table = {}
    for span in args.spans:
        mine = [r for r in runs if r["span"] == span]
        table[f"span{span}"] = {f"draws{d}": {m: summary([r[f"draws{d}"][m] for r in mine]) for m in ("ssim", "psnr")} for d in (1, 4)}
        for d in (1, 4):
            table[f"span{span}"][f"draws{d}"]["regions"] = {
                g: {m: summary([r[f"draws{d}"]["regions"][g][m] for r in mine]) for m in ("ssim", "psnr")}
                for g in mine[0][f"draws{d}"]["regions"]
            }
    result = {
        "simulator_version": demo.simulator_version,
        "plan": demo.plan.__dict__,
        "seconds": round(time.perf_counter() - t0, 1),
        "blurred_vessels": demo.blur,
        "summary": table,
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "context.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(
        json.dumps(
            {"blur": (demo.blur["ssim"], demo.blur["psnr"])}
            | {k: {d: (v[d]["ssim"]["mean"], v[d]["psnr"]["mean"]) for d in ("draws1", "draws4")} for k, v in table.items()}
        )
    )


if __name__ == "__main__":
    main()
