"""`wsi-damm study`: the paper's ablations (Tab. 5–7) on held-out synthetic slides, split by region.

Same data and step budget for every model and, within a seed, the same autoencoders (trained with
that seed): only the DAMM part changes. Each model is trained with every seed; every held-out map
is scored over tissue, over the region where nuclei are informative and over the region where the
simulator made them divergent (its truth mask). Two non-learned references sit beside them: the
blurred-vessel baseline and the noiseless oracle.
Every model is scored with a single draw and with the mean of K draws, and every row on the same
pixels and patches (`same_pixels` refuses a table that is not). A sampler comparison (DDIM-150/50,
DPM++-20/10, wall time) runs on the first seed of DAMM full.

Every result is a file under OUT; rerunning skips what is done, so a killed study resumes.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from wsi_damm.stages.evaluate import evaluate_slide
from wsi_damm.stages.predict import PredictConfig, run_predict
from wsi_damm.stages.stitch import run_stitch
from wsi_damm.stages.train import run_training
from wsi_damm.tiling.plan import TileConfig
from wsi_damm.training.config import RunConfig, merge
from wsi_damm.training.gate_regions import gate_in_training
from wsi_damm.training.run_dir import ROLES_NEEDED, RunDir, read_metrics
from wsi_damm.util.files import write_json
from wsi_damm.util.running_time import RunningTime
from wsi_damm.workflows import baseline
from wsi_damm.workflows.bench_report import figure_row, learned_rows
from wsi_damm.workflows.bench_report import markdown as bench_table
from wsi_damm.workflows.ceiling import SOURCES, ceiling_map
from wsi_damm.workflows.dataset import SyntheticData, synthetic_data
from wsi_damm.workflows.regression import regression_map, train_regression
from wsi_damm.workflows.simulator import DIVERGENCE_LABELS, SIMULATOR_VERSION
from wsi_damm.workflows.study_plan import FULL, QUICK, REGRESSION_LABEL, VARIANTS, StudyPlan, base_config, variant_config
from wsi_damm.workflows.study_tables import figure, gate_table, markdown_table, region_numbers, same_pixels, sampler_table, summarise_model

REGIONS = DIVERGENCE_LABELS
RUNNING_TIME = "running_time.json"  # seconds of every leg, for study.json's wall time


def autoencoders_dir(out: Path, seed: int) -> Path:
    return out / "runs" / f"autoencoders_seed{seed}"


def train_models(
    data: SyntheticData, out: Path, plan: StudyPlan, preset: str, progress: bool, log, variants=VARIANTS, base: RunConfig | None = None
) -> dict[tuple[str, int], Path]:
    """Per seed: autoencoders, then every model of that seed on them — a seed's sd contains the autoencoders' spread,
    and the variants of one seed differ only in their DAMM part. `base`: the config (default: the study's recipe)."""
    base = base or base_config(preset, plan)
    runs: dict[tuple[str, int], Path] = {}
    trained = {}
    for seed in plan.seeds:
        runs["autoencoders", seed] = autoencoders_dir(out, seed)
        trained[seed] = train_autoencoders(
            data,
            runs["autoencoders", seed],
            base,
            seed,
            progress,
            f"autoencoders, seed {seed} ({plan.ae_steps} steps) → {runs['autoencoders', seed]}",
            log,
        )
    for seed in plan.seeds:  # the regression U-Net, at DAMM full's budget and batch order
        path = out / "runs" / f"regression_seed{seed}"
        if not RunDir(path).regression.exists():
            log(f"training the regression U-Net, seed {seed} ({plan.steps} steps) → {path}")
        runs["regression", seed] = train_regression(data.store, path, variant_config(trained[seed], plan, VARIANTS[0], seed), progress)
    for v in (v for v in variants if v.trained_as is None):
        for seed in plan.seeds:
            path = out / "runs" / f"{v.name}_seed{seed}"
            runs[v.name, seed] = train_on_autoencoders(
                data,
                path,
                RunDir(runs["autoencoders", seed]),
                variant_config(trained[seed], plan, v, seed),
                progress,
                f"training {v.label}, seed {seed} ({plan.steps} steps) → {path}",
                log,
            )
    return runs


def train_autoencoders(
    data: SyntheticData, path: Path, base: RunConfig, seed: int, progress: bool, message: str = "", log: Callable[[str], None] = print
) -> RunConfig:
    """A seed's autoencoders (`base`'s settings, trained unless done) and their config, with the patch size,
    roles, … filled in from the store: what the diffusion models of that seed build on."""
    run = RunDir(path)
    if not all(run.autoencoder(r).exists() for r in ROLES_NEEDED):
        if message:
            log(message)
        run_training(data.store, run.path, merge(base, {"train": {"seed": seed}}, "study"), stage="autoencoder", progress=progress)
    return RunConfig.from_dict(json.loads(run.config.read_text()))


def train_on_autoencoders(
    data: SyntheticData,
    path: Path,
    autoencoders: RunDir,
    cfg: RunConfig,
    progress: bool,
    message: str = "",
    log: Callable[[str], None] = print,
) -> Path:
    """A diffusion model trained on given autoencoders (copied into its run), resumed if killed, skipped if done;
    `message` is logged when training (re)starts."""
    run = RunDir(path)
    if run.state.exists() and json.loads(run.state.read_text()).get("steps_done") == cfg.train.steps:
        return run.path
    if message:
        log(message)
    run.path.mkdir(parents=True, exist_ok=True)
    for role in ROLES_NEEDED:
        shutil.copyfile(autoencoders.autoencoder(role), run.autoencoder(role))
    if not run.config.exists():  # resume=True below continues the run this file describes
        write_json(run.config, asdict(cfg))
    run_training(data.store, run.path, cfg, resume=True, progress=progress)
    return run.path


def cached_result(out: Path, compute: Callable[[], dict]) -> dict:
    """A study row's result, from OUT/result.json when an earlier run finished it; otherwise OUT is
    cleared (the leftovers of a killed run), `compute()` runs and its result is written last."""
    result_path = out / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    result = compute()
    write_json(result_path, result)
    return result


def predict_and_score(run: Path, data: SyntheticData, out: Path, cfg: PredictConfig, no_nuclei: bool, progress: bool) -> dict:
    """Predict every held-out slide, stitch, score per region."""

    def compute() -> dict:
        t0 = time.perf_counter()
        run_predict(
            run,
            [h.spec for h in data.heldout],
            out / "prediction.zarr",
            replace(cfg, nuclei=not no_nuclei),
            overwrite=True,
            progress=progress,
        )
        seconds = time.perf_counter() - t0
        maps = run_stitch(out / "prediction.zarr", out / "maps", progress=progress)
        slides = [score_map(m, h, progress) for m, h in zip(maps, data.heldout)]
        shutil.rmtree(out / "prediction.zarr")
        return {"predict_seconds": seconds, "sampler": cfg.sampler, "steps": cfg.n_steps, "slides": slides}

    return cached_result(out, compute)


def score_map(map_path: Path, held, progress: bool) -> dict:
    e = evaluate_slide(map_path, held.spec, held.clean, True, progress, held.divergence, getattr(held, "region_names", REGIONS))
    e.result["patch_rows"] = [
        {k: row.get(k) for k in ("slide", "y", "x", "ssim", "psnr", "region", "oracle_ssim", "oracle_psnr")} for row in e.rows
    ]
    return e.result


def score_baseline(data: SyntheticData, out: Path, tile_cfg: TileConfig, progress: bool) -> dict:
    def compute() -> dict:
        fitted = baseline.fit(data.train_specs, tile_cfg)
        slides = [
            score_map(baseline.write_map(h.spec, tile_cfg, fitted, out / f"{h.spec.slide_id}.ome.zarr"), h, progress) for h in data.heldout
        ]
        return {"sigma_um": fitted.sigma_um, "r2_train": fitted.r2, "slides": slides}

    return cached_result(out, compute)


def score_regression(run: Path, data: SyntheticData, out: Path, progress: bool) -> dict:
    def compute() -> dict:
        t0 = time.perf_counter()
        maps = [regression_map(run, h.spec, out / f"{h.spec.slide_id}.ome.zarr", progress) for h in data.heldout]
        seconds = time.perf_counter() - t0
        return {"predict_seconds": seconds, "slides": [score_map(m, h, progress) for m, h in zip(maps, data.heldout)]}

    return cached_result(out, compute)


def score_ceiling(data: SyntheticData, ae_run: Path, out: Path, source: str, progress: bool) -> dict:
    """The autoencoder ceiling (decode(encode(NP)) of the measured or noiseless field) on every held-out slide."""

    def compute() -> dict:
        maps = [ceiling_map(ae_run, h.spec, h.clean, out / f"{h.spec.slide_id}.ome.zarr", source, progress) for h in data.heldout]
        return {"source": source, "slides": [score_map(m, h, progress) for m, h in zip(maps, data.heldout)]}

    return cached_result(out, compute)


def redraw(out: Path) -> Path:
    """study.png again from OUT/study.json (after a change to the figure; nothing is recomputed)."""
    # write_json stores non-finite floats as strings ("nan" for a one-seed spread): numbers again
    nonfinite = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}
    data = json.loads(
        (Path(out) / "study.json").read_text(encoding="utf-8"),
        object_hook=lambda d: {k: nonfinite.get(v, v) if isinstance(v, str) else v for k, v in d.items()},
    )
    figure(Path(out) / "study.png", data["models"], data["samplers"])
    return Path(out) / "study.png"


def run_study(out: Path, preset: str = "tiny", quick: bool = False, seeds: int | None = None, progress: bool = True, log=print) -> dict:
    plan = QUICK if quick else FULL
    if seeds is not None:
        plan = StudyPlan(**{**asdict(plan), "seeds": tuple(range(seeds))})
    out = Path(out)
    clock = RunningTime(out / RUNNING_TIME)  # every leg of a killed and resumed study counts

    def log_step(msg: str) -> None:
        clock.tick()
        log(msg)

    tile_cfg = TileConfig(patch_size=plan.patch, overlap=plan.overlap)
    data = synthetic_data(out / "data", plan.size, plan.train_slides, plan.heldout_slides, tile_cfg, progress, log_step, plan.heldout_size)
    runs = train_models(data, out, plan, preset, progress, log_step)

    results: dict[str, dict] = {}  # every scored row, before summarising: (variant, draws, seed) → result
    for v in VARIANTS:
        for draws in dict.fromkeys((1, plan.samples)):
            cfg = PredictConfig(steps=plan.sample_steps, batch_size=32, samples=draws)
            for seed in plan.seeds:
                log_step(f"predicting with {v.label}, seed {seed}, {draws} draw(s)")
                res = predict_and_score(
                    runs[v.trained_as or v.name, seed],
                    data,
                    out / "predictions" / f"{v.name}_seed{seed}_k{draws}",
                    cfg,
                    v.no_nuclei,
                    progress,
                )
                results[f"{v.name}/k{draws}/seed{seed}"] = {**res, "kind": "learned"}
    results |= regression_rows(runs, data, out, plan.seeds, progress, log_step)
    log_step("blurred-vessel baseline and oracle")
    base = score_baseline(data, out / "predictions" / "baseline", tile_cfg, progress)
    results["baseline"] = {**base, "kind": "reference"}
    for source in SOURCES:
        for seed in plan.seeds:
            log_step(f"autoencoder ceiling: decode(encode({source} NP)), seed {seed}")
            results[f"ceiling/{source}/seed{seed}"] = {
                **score_ceiling(data, runs["autoencoders", seed], out / "predictions" / f"ceiling_{source}_seed{seed}", source, progress),
                "kind": "ceiling",
            }
    scored_patches = same_pixels(results)

    rows = []
    for v in VARIANTS:
        for draws in dict.fromkeys((1, plan.samples)):
            per_seed = [region_numbers(results[f"{v.name}/k{draws}/seed{seed}"]) for seed in plan.seeds]
            rows.append(summarise_model(v.label, per_seed, "learned", draws))
    rows.append(summarise_model(REGRESSION_LABEL, [region_numbers(results[f"regression/seed{seed}"]) for seed in plan.seeds], "regression"))
    rows.append(summarise_model(f"blurred-vessel baseline (σ = {base['sigma_um']:g} µm)", [region_numbers(base)], "reference"))
    rows.append(summarise_model("oracle (noiseless field)", [region_numbers(base, "oracle_regions", oracle=True)], "reference"))
    for source in SOURCES:
        rows.append(
            summarise_model(
                f"autoencoder ceiling: decode(encode({source} NP))",
                [region_numbers(results[f"ceiling/{source}/seed{seed}"]) for seed in plan.seeds],
                "ceiling",
            )
        )

    figures = study_figures(results, plan)

    samplers = []
    for sampler, steps in plan.samplers:
        log_step(f"sampler comparison: {sampler}, {steps} steps")
        cfg = PredictConfig(sampler=sampler, steps=steps, batch_size=32)
        res = predict_and_score(runs["damm", plan.seeds[0]], data, out / "samplers" / f"{sampler}_{steps}", cfg, False, progress)
        tissue = region_numbers(res)["tissue"]
        samplers.append(
            {"sampler": sampler, "steps": steps, "wsi_ssim": tissue["ssim"], "wsi_psnr": tissue["psnr"], "seconds": res["predict_seconds"]}
        )

    first = results[f"damm/k1/seed{plan.seeds[0]}"]["slides"]
    scored = {
        "tissue_pixels": sum(s["wsi"]["pixels_tissue"] for s in first),
        "patches": scored_patches,
        "tissue_uncovered_pixels": {
            name: sum(s["wsi"].get("tissue_uncovered_pixels", 0) for s in r["slides"]) for name, r in results.items()
        },
    }
    gate = {
        f"{v.name}_seed{seed}": gate_in_training(read_metrics(RunDir(runs[v.name, seed]).metrics))
        for v in VARIANTS
        if v.trained_as is None
        for seed in plan.seeds
    }
    summary = {
        "plan": asdict(plan),
        "preset": preset,
        "simulator_version": SIMULATOR_VERSION,
        "seconds": clock.tick(),
        "legs": clock.legs,
        "scored": scored,
        "gate_in_training": gate,
        "models": rows,
        "figures": figures,
        "samplers": samplers,
        "heldout": [h.spec.slide_id for h in data.heldout],
    }
    write_json(out / "study.json", summary)
    md = [
        "# DAMM-Diffusion ablation study on synthetic slides",
        "",
        f"Simulator version {SIMULATOR_VERSION}. Preset `{preset}`, {plan.train_slides} training slides of {plan.size}² px and "
        f"{plan.heldout_slides} held-out slides of {plan.heldout_size or plan.size}² px, {plan.steps} diffusion steps per model, "
        f"seeds {list(plan.seeds)}, "
        f"per seed one autoencoder set ({plan.ae_steps} steps) under all of that seed's models; every model is scored with one draw "
        f"per patch and with the mean of {plan.samples} draws (DPM-Solver++ {plan.sample_steps} steps). Every row is scored on the same "
        f"{scored['tissue_pixels']} tissue pixels and the same {scored_patches} patches.",
        "",
        markdown_table(rows, len(plan.seeds)),
        "",
        "## Every figure over tissue",
        "",
        "The bench's table (`wsi-damm bench`) for the same rows and pixels: Pearson's r and the map's spread and mean against "
        "the measured channel's, NRMSE, spectral error, and for the means of draws their interval's coverage and the rank "
        "correlation of patch spread and error; mean ± sample sd (ddof = 1) over seeds.",
        "",
        bench_table({"rows": figures, "plan": asdict(plan)}),
        "",
        "## The gate in training",
        "",
        gate_table(gate),
        "",
        "## Samplers (DAMM full, first seed, one draw)",
        "",
        sampler_table(samplers),
        "",
        "![study](study.png)",
        "",
    ]
    (out / "study.md").write_text("\n".join(md), encoding="utf-8")
    figure(out / "study.png", rows, samplers)
    return summary


def study_figures(results: dict[str, dict], plan: StudyPlan) -> list[dict]:
    """The bench's rows (`bench_report`) for the study's results: every variant and the regression U-Net, the
    blurred-vessel baseline, the oracle (the noiseless field, scored as a map) and the autoencoder ceilings."""
    rows = learned_rows(results, VARIANTS, plan)
    base = results["baseline"]
    rows.append(figure_row(f"blurred-vessel baseline (σ = {base['sigma_um']:g} µm)", "baseline", "reference", [base]))
    oracle = {"slides": [{**s, "wsi": s["oracle_wsi"], "check": None, "regions": s.get("oracle_regions", {})} for s in base["slides"]]}
    rows.append(figure_row("oracle (noiseless field)", "oracle", "reference", [oracle]))
    for source in SOURCES:
        per_seed = [results[f"ceiling/{source}/seed{seed}"] for seed in plan.seeds]
        rows.append(figure_row(f"autoencoder ceiling: decode(encode({source} NP))", f"ceiling/{source}", "ceiling", per_seed))
    return rows


def regression_rows(runs: dict, data, out: Path, seeds, progress: bool, log_step) -> dict:
    """Every seed's regression U-Net map scored, keyed as the study's and the bench's results are."""
    rows = {}
    for seed in seeds:
        log_step(f"predicting with the regression U-Net, seed {seed}")
        rows[f"regression/seed{seed}"] = {
            **score_regression(runs["regression", seed], data, out / "predictions" / f"regression_seed{seed}", progress),
            "kind": "regression",
        }
    return rows
