"""How much do the autoencoders decide the study? Until 4 Dec the study trained one autoencoder set
(seed 0, constant rate) and gave it to all 12 diffusion models, so the DAMM rows could never pass
that set's ceiling and their seed sd did not contain its spread (the study now trains one set per
seed, rate decayed along a cosine, because of what this measured). This trains the study's
autoencoders exactly as the study does (same data, preset, steps, batch order) with each seed and
learning-rate schedule (`autoencoder.lr_schedule`), and scores each one's ceiling,
decode(encode(measured NP)), on the study's held-out slides and pixels.

    python benchmarks/study_autoencoders.py --work /tmp/study [--seeds 0 1 2] [--schedules constant cosine] [--json FILE]
    python benchmarks/study_autoencoders.py --work /tmp/study --damm cosine   # and DAMM full on them

`--work` is a study's OUT (its data is reused, or made as the study makes it); runs and maps go to
WORK/autoencoder_seeds/. Prints JSON: per run the tissue and region SSIM / PSNR and the training
seconds, and per schedule the mean ± sd (ddof = 1) over seeds. `--damm SCHEDULE` (WORK a finished
study) also trains DAMM full with the study's seeds and budget on that schedule's seed-0 autoencoders
— one autoencoder set shared by every seed, as the study ran until 4 Dec — and scores one draw and the
mean of the study's draws beside the study's own DAMM full maps (read from WORK, the same pixels). Rerun
to resume.
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parent))
import argparse
import json
import time
from pathlib import Path

from _common import machine, report  # noqa: E402
from _demo_budget import summary  # noqa: E402

from wsi_damm.stages.predict import PredictConfig  # noqa: E402
from wsi_damm.stages.tile import TileConfig  # noqa: E402
from wsi_damm.training.config import LR_SCHEDULES, RunConfig, merge  # noqa: E402
from wsi_damm.training.run_dir import ROLES_NEEDED, RunDir  # noqa: E402
from wsi_damm.workflows.dataset import synthetic_data  # noqa: E402
from wsi_damm.workflows.study import predict_and_score, score_ceiling, train_autoencoders, train_on_autoencoders  # noqa: E402
from wsi_damm.workflows.study_plan import FULL, VARIANTS, base_config, variant_config  # noqa: E402
from wsi_damm.workflows.study_tables import region_numbers  # noqa: E402


def mean_sd(rows: list[dict], region: str) -> dict:
    """Mean ± sample sd (ddof = 1) of SSIM and PSNR over `rows` (one per seed)."""
    return {m: summary([r["regions"][region][m] for r in rows]) for m in ("ssim", "psnr")}


def scored(result: dict) -> dict:
    return {k: {"ssim": v["ssim"], "psnr": v["psnr"], "multimodal_share": v["share"]} for k, v in region_numbers(result).items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="a study's OUT: its data is reused")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--schedules", nargs="+", default=list(LR_SCHEDULES[::-1]), choices=LR_SCHEDULES)
    p.add_argument("--preset", default="tiny")
    p.add_argument(
        "--damm", choices=LR_SCHEDULES, help="also train DAMM full on this schedule's seed-0 autoencoders (WORK a finished study)"
    )
    p.add_argument("--json", type=Path, help="also write the JSON here")
    args = p.parse_args()
    plan = FULL
    tile_cfg = TileConfig(patch_size=plan.patch, overlap=plan.overlap)
    data = synthetic_data(
        args.work / "data",
        plan.size,
        plan.train_slides,
        plan.heldout_slides,
        tile_cfg,
        False,
        lambda m: print(m, file=_sys.stderr),
        plan.heldout_size,
    )
    runs = []
    for schedule in args.schedules:
        for seed in args.seeds:
            path = args.work / "autoencoder_seeds" / f"{schedule}_seed{seed}"
            seconds_file = path / "train_seconds.json"
            if not all(RunDir(path).autoencoder(r).exists() for r in ROLES_NEEDED):
                base = merge(base_config(args.preset, plan), {"autoencoder": {"lr_schedule": schedule}}, "benchmark")
                t0 = time.perf_counter()
                train_autoencoders(
                    data,
                    path,
                    base,
                    seed,
                    False,
                    f"autoencoders, {schedule} lr, seed {seed} → {path}",
                    lambda m: print(m, file=_sys.stderr),
                )
                seconds_file.write_text(json.dumps({"seconds": time.perf_counter() - t0}))
            seconds = (
                round(json.loads(seconds_file.read_text())["seconds"], 1) if seconds_file.exists() else None
            )  # None: trained in a killed leg
            runs.append(
                {
                    "schedule": schedule,
                    "seed": seed,
                    "train_seconds": seconds,
                    "regions": scored(score_ceiling(data, path, path / "ceiling", "measured", False)),
                }
            )
    summary = {
        s: {region: mean_sd([r for r in runs if r["schedule"] == s], region) for region in runs[0]["regions"]} for s in args.schedules
    }
    out = {
        "benchmark": "study_autoencoders",
        "plan": {
            "size": plan.size,
            "heldout_size": plan.heldout_size,
            "train_slides": plan.train_slides,
            "heldout_slides": plan.heldout_slides,
            "ae_steps": plan.ae_steps,
            "steps": plan.steps,
            "seeds": list(plan.seeds),
            "sample_steps": plan.sample_steps,
            "samples": plan.samples,
        },
        "machine": machine(),
        "summary": summary,
        "runs": runs,
    }
    if args.damm:
        out["damm"] = damm_on(args.damm, data, args.work, plan)
    report(out, args.json)


def damm_on(schedule: str, data, work: Path, plan) -> dict:
    """DAMM full, the study's seeds and budget, on `schedule`'s seed-0 autoencoders, beside the study's own DAMM full."""
    ae = RunDir(work / "autoencoder_seeds" / f"{schedule}_seed0")
    if not (work / "study.json").exists():
        raise SystemExit(f"{work}: --damm compares with a finished study's DAMM full maps; run `wsi-damm study --out {work}` first")
    trained = RunConfig.from_dict(json.loads(ae.config.read_text()))
    rows = {"study": [], schedule: []}
    for seed in plan.seeds:
        path = work / "autoencoder_seeds" / f"damm_on_{schedule}_seed0" / f"seed{seed}"
        run = train_on_autoencoders(
            data,
            path,
            ae,
            variant_config(trained, plan, VARIANTS[0], seed),
            False,
            f"DAMM full, seed {seed}, on the {schedule} autoencoders → {path}",
            lambda m: print(m, file=_sys.stderr),
        )
        for draws in dict.fromkeys((1, plan.samples)):
            cfg = PredictConfig(steps=plan.sample_steps, batch_size=32, samples=draws)
            mine = predict_and_score(run, data, path / f"k{draws}", cfg, False, False)
            theirs = predict_and_score(
                work / "runs" / f"damm_seed{seed}", data, work / "predictions" / f"damm_seed{seed}_k{draws}", cfg, False, False
            )
            rows[schedule].append({"seed": seed, "draws": draws, "regions": scored(mine)})
            rows["study"].append({"seed": seed, "draws": draws, "regions": scored(theirs)})
    summary = {
        name: {
            f"k{k}": {region: mean_sd([r for r in rr if r["draws"] == k], region) for region in rr[0]["regions"]}
            for k in dict.fromkeys((1, plan.samples))
        }
        for name, rr in rows.items()
    }
    return {
        "autoencoders": {"study": "the study's own (its config.json)", schedule: str(ae.path.relative_to(work))},
        "summary": summary,
        "runs": rows,
    }


if __name__ == "__main__":
    main()
