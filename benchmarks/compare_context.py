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
import time
from dataclasses import replace
from pathlib import Path

import numpy as np


def _scores(result: dict) -> dict:
    s = result["slides"][0]
    return {"ssim": s["wsi"]["ssim_tissue"], "psnr": s["wsi"]["psnr_tissue"],
            "regions": {k: {"ssim": v["ssim"], "psnr": v["psnr"], "multimodal_share": v.get("multimodal_share")}
                        for k, v in s.get("regions", {}).items()}}


def _summary(values: list[float]) -> dict:
    a = np.asarray(values, float)
    return {"mean": float(a.mean()), "sd": float(a.std(ddof=1)) if len(a) > 1 else None, "n": len(a)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/context"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/compare_context"), help="data, runs and maps (kept: rerun to resume)")
    ap.add_argument("--spans", type=int, nargs="+", default=[0, 4])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()

    from wsi_damm.config import resolve
    from wsi_damm.stages.evaluate import run_evaluate
    from wsi_damm.stages.predict import PredictConfig, predict_maps
    from wsi_damm.stages.tile import TileConfig
    from wsi_damm.stages.train import run_training
    from wsi_damm.workflows import baseline
    from wsi_damm.workflows.dataset import synthetic_data
    from wsi_damm.workflows.demo import FULL
    from wsi_damm.workflows.synth import DIVERGENCE_LABELS, SIMULATOR_VERSION

    plan, work = FULL, args.work
    t0 = time.perf_counter()
    tile_cfg = TileConfig(patch_size=plan.patch, overlap=plan.overlap)
    data = synthetic_data(work / "data", plan.size, plan.train_slides, 1, tile_cfg, False, print)
    held = data.heldout[0]
    scoring = dict(regions=[held.divergence], region_names=DIVERGENCE_LABELS, progress=False)
    fitted = baseline.fit(data.train_specs, tile_cfg)
    blur = _scores(run_evaluate([(baseline.write_map(held.spec, tile_cfg, fitted, work / "blur.ome.zarr"), held.spec)], work / "blur_report",
                                [held.clean], **scoring))
    runs = []
    for seed in args.seeds:
        base = resolve("tiny")
        cfg = replace(base, autoencoder=replace(base.autoencoder, steps=plan.ae_steps),
                      train=replace(base.train, steps=plan.steps, seed=seed, val_every=max(10, plan.steps // 10), checkpoint_every=plan.steps))
        ae = work / f"seed{seed}" / "autoencoders"
        if not (ae / "config.json").exists():
            run_training(data.store, ae, cfg, stage="autoencoder", progress=False)
        for span in args.spans:
            run_dir = work / f"seed{seed}" / f"span{span}"
            if not (run_dir / "unet_ema.safetensors").exists():
                shutil.rmtree(run_dir, ignore_errors=True)
                shutil.copytree(ae, run_dir)
                t = time.perf_counter()
                run_training(data.store, run_dir, replace(cfg, model=replace(cfg.model, context_span=span)), stage="diffusion", progress=False)
                print(f"seed {seed} span {span}: trained in {time.perf_counter() - t:.0f} s", flush=True)
            row = {"seed": seed, "span": span}
            for draws in (1, 4):
                out = run_dir / f"pred{draws}.zarr"
                maps = predict_maps(run_dir, [held.spec], out, PredictConfig(steps=plan.sample_steps, batch_size=32, samples=draws, seed=seed),
                                    map_path=run_dir / f"pred{draws}.ome.zarr", overwrite=True, progress=False).maps
                row[f"draws{draws}"] = _scores(run_evaluate([(maps[0], held.spec)], run_dir / f"report{draws}", [held.clean], **scoring))
            print(json.dumps({k: row[k] for k in ("seed", "span")} | {f"draws{d}": (round(row[f'draws{d}']['ssim'], 4), round(row[f'draws{d}']['psnr'], 2))
                                                                      for d in (1, 4)}), flush=True)
            runs.append(row)
    summary = {}
    for span in args.spans:
        mine = [r for r in runs if r["span"] == span]
        summary[f"span{span}"] = {f"draws{d}": {m: _summary([r[f"draws{d}"][m] for r in mine]) for m in ("ssim", "psnr")} for d in (1, 4)}
        for d in (1, 4):
            summary[f"span{span}"][f"draws{d}"]["regions"] = {
                g: {m: _summary([r[f"draws{d}"]["regions"][g][m] for r in mine]) for m in ("ssim", "psnr")}
                for g in mine[0][f"draws{d}"]["regions"]}
    result = {"simulator_version": SIMULATOR_VERSION, "plan": plan.__dict__, "seconds": round(time.perf_counter() - t0, 1),
              "blurred_vessels": blur | {"sigma_um": fitted.sigma_um}, "summary": summary, "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "context.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(json.dumps({"blur": (blur["ssim"], blur["psnr"])} | {k: {d: (v[d]["ssim"]["mean"], v[d]["psnr"]["mean"]) for d in ("draws1", "draws4")}
                                                                for k, v in summary.items()}))


if __name__ == "__main__":
    main()
