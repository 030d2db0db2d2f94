"""Seamless maps: the paper's recipe sampled patch by patch against the canvas recipe sampled on a
shifted grid, at the demo's data and budget, scored on its held-out slide.

- "paper": GroupNorm autoencoders, the U-Net trained on patches encoded one by one, independent
  sampling (what the demo ran before).
- "canvas": local autoencoders (`--ae-local`), the U-Net trained on crops of latent canvases
  (`--latents canvas`), shifted-grid canvas sampling (`--sampling shifted`).

Each recipe trains its own autoencoders and U-Net per seed (same steps, batch, data and seed); each
run predicts with one draw and with the mean of 4 (DPM-Solver++, the demo's 10 steps); every map is
scored on the same pixels (seam score, WSI SSIM / PSNR over tissue and per simulator region) beside
the blurred-vessel baseline. Prints and writes `seamless.json` (per run, and mean ± sd with ddof = 1
over seeds). Rerun with the same --work to resume: finished runs and maps are reused.

    python benchmarks/compare_seamless.py --out benchmarks/results/seamless [--seeds 0 1 2]
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

RECIPES = {
    "paper": {"local": False, "latents": "patch", "sampling": "independent"},
    "canvas": {"local": True, "latents": "canvas", "sampling": "shifted"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/seamless"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/compare_seamless"), help="data, runs and maps (kept: rerun to resume)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--draws", type=int, nargs="+", default=[1, 4])
    args = ap.parse_args()

    from wsi_damm.stages.train import run_training

    work = args.work
    t0 = time.perf_counter()
    demo = demo_budget(work)
    runs = []
    for seed in args.seeds:
        for name, recipe in RECIPES.items():
            cfg = budget_config(demo.plan, seed, {"local": recipe["local"]}, {"latents": recipe["latents"]})
            run_dir = work / f"seed{seed}" / name
            row = {"seed": seed, "recipe": name, **recipe}
            if not (run_dir / "unet_ema.safetensors").exists():
                shutil.rmtree(run_dir, ignore_errors=True)
                t = time.perf_counter()
                run_training(demo.data.store, run_dir, cfg, stage="all", progress=False)
                row["train_seconds"] = round(time.perf_counter() - t, 1)
                print(f"seed {seed} {name}: trained in {row['train_seconds']:.0f} s", flush=True)
            for draws in args.draws:
                row[f"draws{draws}"] = predict_and_score(demo, run_dir, draws, seed, recipe["sampling"])
            print(
                json.dumps(
                    {k: row[k] for k in ("seed", "recipe")}
                    | {
                        f"draws{d}": (
                            round(row[f"draws{d}"]["ssim"], 4),
                            round(row[f"draws{d}"]["psnr"], 2),
                            round(row[f"draws{d}"]["seam_score"], 3),
                        )
                        for d in args.draws
                    }
                ),
                flush=True,
            )
            runs.append(row)
    table = {}
    for name in RECIPES:
        mine = [r for r in runs if r["recipe"] == name]
        table[name] = {
            f"draws{d}": {m: summary([r[f"draws{d}"][m] for r in mine]) for m in ("ssim", "psnr", "seam_score", "predict_seconds")}
            for d in args.draws
        }
        for d in args.draws:
            table[name][f"draws{d}"]["regions"] = {
                g: {m: summary([r[f"draws{d}"]["regions"][g][m] for r in mine]) for m in ("ssim", "psnr")}
                for g in mine[0][f"draws{d}"]["regions"]
            }
    result = {
        "simulator_version": demo.simulator_version,
        "plan": demo.plan.__dict__,
        "recipes": RECIPES,
        "seconds": round(time.perf_counter() - t0, 1),
        "blurred_vessels": demo.blur,
        "summary": table,
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "seamless.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(
        json.dumps(
            {"blur": (demo.blur["ssim"], demo.blur["psnr"], demo.blur["seam_score"])}
            | {k: {d: (v[d]["ssim"]["mean"], v[d]["psnr"]["mean"], v[d]["seam_score"]["mean"]) for d in v} for k, v in table.items()}
        )
    )


if __name__ == "__main__":
    main()
