"""Autoencoder recipes on a sparse target: the ceiling and the whole pipeline at the demo's budget.

The simulator's perfusion target (`synth --target perfusion`: a tracer in the lumens of perfused vessels,
a few per cent of the pixels) stands in for a real sparse stain. For each autoencoder recipe and training
seed this trains the demo's run (`demo_config` with that seed, the recipe's `[autoencoder]` settings), and
scores on the held-out slide, over tissue: the target autoencoder's ceiling decode(encode(measured)) and the
map of one draw — Pearson's r, mean and spread against the measured channel's, SSIM, PSNR, seam score —
beside the blurred-vessel baseline; and, with `--fixture FILE` (akoyabio/phenoptr's inForm test field,
component data), the ceiling on that real field's sparse channel (Alexa 594). A recipe whose autoencoder the training guard refuses is
recorded as refused, then trained with `force` so its map can be scored too.

    python benchmarks/compare_sparse_target.py --work /tmp/sparse [--target perfusion] [--seeds 0 1 2]
        [--recipes pixel-constant none-cosine-sqrt none-cosine-sqrt-l2] [--json benchmarks/results/sparse/sparse_perfusion.json]
    python benchmarks/compare_sparse_target.py --work /tmp/sparse --only-done --json …   # collect what has run
    python benchmarks/compare_sparse_target.py --render benchmarks/results/sparse/*.json > benchmarks/results/sparse/sparse.md

Rerun to resume: finished runs are reused. Prints JSON: per recipe and seed the figures and seconds, per
recipe the mean ± sd (ddof = 1) over seeds.
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parent))
import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from _common import machine, report  # noqa: E402
from _demo_budget import budget_config, demo_budget, predict_and_score, scores, summary  # noqa: E402

from wsi_damm.stages.evaluate import run_evaluate  # noqa: E402
from wsi_damm.stages.train import run_training  # noqa: E402
from wsi_damm.training.autoencoder_check import ceiling_of  # noqa: E402
from wsi_damm.training.data import PatchImages  # noqa: E402
from wsi_damm.training.run_dir import RunDir, load_autoencoders, load_run_config  # noqa: E402
from wsi_damm.util.errors import InputError  # noqa: E402
from wsi_damm.workflows.ceiling import ceiling_map  # noqa: E402

# the autoencoder settings the recipes share: the tiny preset's (no norm, each channel standardised by its training
# mean and sd; REFIT: and the output refit), autoencoder.sparse_target = "yes" (SPARSE_RECIPE) and the paper's GroupNorm autoencoders
STANDARDISED = {
    "sparse_target": "no",
    "local_norm": "none",
    "standardise": True,
    "refit": False,
    "lr_schedule": "constant",
    "target_gamma": 1.0,
}
REFIT = STANDARDISED | {"refit": True}
SPARSE = {"sparse_target": "yes", "local_norm": "none", "standardise": False, "refit": False, "lr_schedule": "cosine", "target_gamma": 0.5}
PAPER = {"sparse_target": "no", "local": False, "standardise": False, "refit": False, "lr_schedule": "constant", "target_gamma": 1.0}

# each recipe: its [autoencoder] and [damm] settings on top of the demo's
RECIPES = {  # autoencoder settings, damm settings, model settings (over the tiny preset at the demo's budget)
    # the tiny preset until simulator version 2: per-pixel layer norm, constant rate, the target coded as it is, L1 denoiser
    "pixel-constant": (
        {
            "sparse_target": "no",
            "local_norm": "pixel",
            "standardise": False,
            "refit": False,
            "lr_schedule": "constant",
            "target_gamma": 1.0,
        },
        {"loss": "l1"},
        {},
    ),
    # the tiny preset until the refit: no norm, each channel standardised by its training mean and sd (autoencoder.standardise)
    "none-standardised": (
        STANDARDISED,
        {"loss": "l1"},
        {},
    ),
    # … and its denoiser trained on squared error: the conditional mean the samplers assume, not L1's median (black on
    # a sparse stain)
    "none-standardised-l2": (
        STANDARDISED,
        {"loss": "l2"},
        {},
    ),
    # standardised, and the decoder's output gain and shift refit on training patches after training (autoencoder.refit)
    "none-standardised-refit": (
        REFIT,
        {"loss": "l1"},
        {},
    ),
    # … and its denoiser trained on squared error: the tiny preset now
    "none-standardised-refit-l2": (
        REFIT,
        {"loss": "l2"},
        {},
    ),
    # … and its timesteps weighted by Min-SNR-5 (damm.min_snr): the short budget's effort on the noisy steps that
    # place the rare bright lumens
    "none-standardised-refit-l2-minsnr": (
        REFIT,
        {"loss": "l2", "min_snr": 5.0},
        {},
    ),
    # … and the denoiser predicting ε (the authors' objective) instead of the preset's v: v weights the noisiest steps
    # more, ε the nearly clean ones, where a lumen's brightness is drawn
    "none-standardised-refit-l2-eps": (
        REFIT,
        {"loss": "l2"},
        {},
        {"schedule": {"objective": "eps"}},
    ),
    # autoencoder.sparse_target = "yes" (SPARSE_RECIPE): no normalisation (still local), the rate decayed along a cosine,
    # the target coded as its square root; what "auto" picks for a sparse stain
    "none-cosine-sqrt": (
        SPARSE,
        {"loss": "l1"},
        {},
    ),
    # … and the denoiser trained on squared error (the conditional mean) instead of the authors' L1 (the median)
    "none-cosine-sqrt-l2": (
        SPARSE,
        {"loss": "l2"},
        {},
    ),
    # the paper's recipe: GroupNorm autoencoders, patches encoded one by one, each patch sampled on its own
    "paper": (
        PAPER,
        {"loss": "l1"},
        {"latents": "patch"},
    ),
    # … its denoiser trained on squared error (the conditional mean the samplers' updates assume) instead of L1
    "paper-l2": (
        PAPER,
        {"loss": "l2"},
        {"latents": "patch"},
    ),
    # … and with four times the demo's diffusion steps (is the budget what the sparse target lacks?)
    "paper-2000": (
        PAPER,
        {"loss": "l1"},
        {"latents": "patch"},
        {"train": {"steps": 2000}},
    ),
}
REGRESSION = "regression"  # the row of `train --model regression` at the demo's budget (no autoencoder, no ceiling)
FIXTURE_CHANNELS = "vessels=Cy5,nuclei=DAPI,target=Alexa 594"  # Alexa 594: the field's sparse channel


def fixture_images(work: Path, fixture: Path):
    """The inForm field tiled as the demo tiles (128-px patches, 32 px overlap), every patch; None if the file is missing."""
    from wsi_damm.stages.tile import run_tile
    from wsi_damm.tiling.inputs import resolve_slides
    from wsi_damm.tiling.plan import TileConfig
    from wsi_damm.tiling.store import PatchStore

    if not fixture.exists():
        return None
    store = work / "fixture.zarr"
    if not store.exists():
        run_tile(resolve_slides([fixture], channels=FIXTURE_CHANNELS), store, TileConfig(patch_size=128, overlap=32), progress=False)
    s = PatchStore.open(store)
    return PatchImages(s, np.arange(len(s))), s.roles.index("target")


def fixture_trained_ceiling(demo, work: Path, recipe: str, seed: int) -> dict:
    """What a lab with one real sparse field meets: the recipe's autoencoders trained on the inForm field itself at the
    demo's autoencoder budget, the target's ceiling on the field's validation patches (the run's own split), as `train`
    measures it; cached in the run."""
    from wsi_damm.training.config import merge

    run_dir = work / f"fixture_{recipe}_seed{seed}"
    run = RunDir(run_dir)
    if not run.ae_ceiling.exists():
        cfg = merge(budget_config(demo.plan, seed, autoencoder=RECIPES[recipe][0]), {"autoencoder": {"on_collapse": "warn"}}, "benchmark")
        run_training(work / "fixture.zarr", run_dir, cfg, stage="autoencoder", progress=False, log=print)
    report = json.loads(run.ae_ceiling.read_text())
    return report["roles"]["target"] | {"which": report["patches"]}


def regression_run(demo, work: Path, seed: int, draws: int) -> dict:
    """`train --model regression` at the demo's budget (the tiny preset's `[train]`, this seed), its map scored like a draw's."""
    from wsi_damm.training.run_dir import RunDir as Run
    from wsi_damm.workflows.regression import regression_map, train_regression

    run_dir = work / f"{REGRESSION}_seed{seed}"
    done = run_dir / "scores.json"
    if done.exists():
        return json.loads(done.read_text())
    t = time.perf_counter()
    train_regression(demo.data.store, run_dir, budget_config(demo.plan, seed), progress=False)
    seconds = round(time.perf_counter() - t, 1)
    path = regression_map(run_dir, demo.held.spec, run_dir / "map.ome.zarr", progress=False)
    scored = scores(run_evaluate([(path, demo.held.spec)], run_dir / "report", [demo.held.clean], **demo.scoring))
    row = {"recipe": REGRESSION, "seed": seed, "train_seconds": seconds, "diffusion_seconds": seconds, "map": scored}
    row["refused_by_guard"] = None
    assert Run(run_dir).regression.exists()
    done.write_text(json.dumps(row, indent=2))
    return row


def one_run(demo, work: Path, recipe: str, seed: int, fixture, draws: int = 1, fixture_trained: bool = False) -> dict:
    """Train (the autoencoders shared by every recipe with the same autoencoder settings and seed), score, cache;
    with `draws` > 1 also the map that is the mean of that many draws; with `fixture_trained` also the ceiling of
    autoencoders trained on the real field itself."""
    from wsi_damm.training.config import merge
    from wsi_damm.workflows.study import train_autoencoders, train_on_autoencoders

    if recipe == REGRESSION:
        return regression_run(demo, work, seed, draws)
    autoencoder, damm, model, *more = RECIPES[recipe]
    extra = more[0] if more else {}  # other sections: train, schedule
    train, schedule = extra.get("train", {}), extra.get("schedule", {})
    run_dir = work / f"{recipe}_seed{seed}"
    done = run_dir / "scores.json"
    if done.exists():
        row = json.loads(done.read_text())
    else:
        base = budget_config(demo.plan, seed, autoencoder=autoencoder, model=model, train=train)
        own = merge(base, {"damm": damm, "schedule": schedule}, "benchmark")
        shared = work / (
            "autoencoders_" + "_".join(f"{k}-{v}" for k, v in sorted(autoencoder.items()) if k != "sparse_target") + f"_seed{seed}"
        )
        t = time.perf_counter()
        # the shared autoencoders' config is the first recipe's that trained them: the denoiser's sections are set
        # whole from this recipe, so no setting of another recipe carries over
        cfg = train_autoencoders(demo.data, shared, base, seed, False)
        cfg = merge(cfg, {"damm": asdict(own.damm), "schedule": asdict(own.schedule), "model": model, "train": train}, "benchmark")
        ae_seconds = round(time.perf_counter() - t, 1)
        refused = None
        if not RunDir(run_dir).unet.exists():
            try:
                train_on_autoencoders(demo.data, run_dir, RunDir(shared), cfg, False)
            except InputError as exc:  # the guard: recorded, then trained regardless so the map can be scored
                refused = exc.one_line()
                run_training(demo.data.store, run_dir, cfg, resume=True, progress=False, force=True)
        state = RunDir(run_dir).state
        row = {
            "recipe": recipe,
            "seed": seed,
            "autoencoder": autoencoder,
            "damm": damm,
            "model": model,
            "train": train,
            "schedule": schedule,
            "autoencoder_seconds": ae_seconds,
            "train_seconds": round(time.perf_counter() - t, 1),
            "diffusion_seconds": round(json.loads(state.read_text())["seconds"], 1),
            "refused_by_guard": refused,
            "guard_ceiling": json.loads(RunDir(run_dir).ae_ceiling.read_text())["roles"]["target"],
        }
        ceiling = ceiling_map(run_dir, demo.held.spec, None, run_dir / "ceiling.ome.zarr", progress=False)
        row["ceiling"] = scores(run_evaluate([(ceiling, demo.held.spec)], run_dir / "ceiling_report", [demo.held.clean], **demo.scoring))
        row["map"] = predict_and_score(demo, run_dir, 1, seed)
    if draws > 1 and f"map_mean{draws}" not in row:
        row[f"map_mean{draws}"] = predict_and_score(demo, run_dir, draws, seed)
    if fixture is not None and fixture_trained and "fixture_trained_ceiling" not in row:
        row["fixture_trained_ceiling"] = fixture_trained_ceiling(demo, work, recipe, seed)
    if fixture is not None and "fixture_ceiling" not in row:
        images, channel = fixture
        ae = load_autoencoders(RunDir(run_dir), load_run_config(RunDir(run_dir)))["target"]
        row["fixture_ceiling"] = ceiling_of(ae, images, channel, torch.device("cpu"))
    done.write_text(json.dumps(row, indent=2))
    return row


def figures(row: dict) -> dict:
    """The numbers a recipe is judged by, flat: r, mean and spread ratios of ceiling and map, and the map's SSIM / PSNR."""
    out = {}
    for key in ("ceiling", "map", *(k for k in row if k.startswith("map_mean"))):
        if key not in row:
            continue
        c = row[key]["check"]
        out |= {f"{key}_r": c["pearson_r"], f"{key}_mean_ratio": c["mean_ratio"], f"{key}_spread_ratio": c["spread_ratio"]}
    out |= {"map_ssim": row["map"]["ssim"], "map_psnr": row["map"]["psnr"], "map_seam_score": row["map"]["seam_score"]}
    for key in ("fixture_trained_ceiling", "fixture_ceiling"):  # ceiling_of's dicts: no "check" level
        if key in row:
            f = row[key]
            out |= {f"{key}_r": f["pearson_r"], f"{key}_mean_ratio": f["mean_ratio"], f"{key}_spread_ratio": f["spread_ratio"]}
    return out


def _cell(s: dict, key: str, digits: int = 3) -> str:
    v = s.get(key)
    if v is None or v["mean"] is None:
        return ""
    return f"{v['mean']:.{digits}f}" + (f" ± {v['sd']:.{digits}f}" if v["sd"] is not None else "")


def markdown(results: list[dict]) -> str:
    """The tables of one or more JSON results of this benchmark: per recipe, mean ± sd (ddof = 1) over seeds, and per run."""
    out = [
        "# Autoencoder recipes on a sparse and a dense target",
        "",
        "Generated by `python benchmarks/compare_sparse_target.py --render` from the JSON beside this page; "
        "the demo's budget, one draw, the held-out slide over tissue. r: Pearson's r with the measured channel; "
        "mean and spread: the ratio of the map's (or the ceiling's) to the measured channel's. Ceiling: the target autoencoder's "
        "decode(encode(measured)). Refused by the guard: runs `train` stopped before the diffusion stage (a collapsed "
        "autoencoder); they were trained on with `force` to score their maps. Real field (akoyabio/phenoptr's inForm field, "
        "its sparse Alexa 594 channel): the ceiling of the run's target autoencoder, trained on the simulator's slides, on "
        "every patch of the field; and of one trained on the field itself (`--fixture-train`, the demo's autoencoder budget), "
        "on the field's validation patches.",
        "",
        "Recipes (settings on top of the demo's; `none-standardised-refit-l2` is the `tiny` preset's, what the demo trains; "
        "`pixel-constant` was the preset's until simulator version 2):",
        "",
    ]
    recipes = {row["recipe"]: row for res in results for row in res["runs"]}
    out += [
        f"- `{name}`: the L1 U-Net of `train --model regression` (pixel space, no autoencoder), the demo's `[train]` budget"
        if name == REGRESSION
        else f"- `{name}`: `[autoencoder]` {row['autoencoder']}, `[damm]` {row.get('damm') or {'loss': 'l1'}}"
        + (f", `[train]` {row['train']}" if row.get("train") else "")
        + (f", `[schedule]` {row['schedule']}" if row.get("schedule") else "")
        for name, row in recipes.items()
    ] + [""]
    for res in results:
        p = res["plan"]
        out += [
            f"## Target `{res['target']}` (simulator version {res['simulator_version']})",
            "",
            f"{p['train_slides']} training slides of {p['size']}² px, {p['ae_steps']} autoencoder and {p['steps']} diffusion steps, "
            f"DPM++ {p['sample_steps']} steps, {p['draws']} draw; machine {res['machine']}; training "
            f"{np.mean([r['train_seconds'] for r in res['runs']]):.0f} s a run on average (autoencoders shared between recipes "
            f"that differ only in the denoiser are counted once). "
            f"Blurred-vessel baseline: r {res['blur']['check']['pearson_r']:.3f}, SSIM {res['blur']['ssim']:.3f}, "
            f"PSNR {res['blur']['psnr']:.2f} dB.",
            "",
            "| recipe | seeds | refused by the guard | ceiling r | ceiling mean | ceiling spread | map r | map mean | map spread | "
            "map SSIM | map PSNR (dB) | seam score | mean of 4 draws: r | its mean | its spread | real field ceiling r | its mean | "
            "… trained on the field: r | its mean |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for recipe, s in res["summary"].items():
            n = s["map_r"]["n"]
            out.append(
                f"| {recipe} | {n} | {s['refused_by_guard']} of {n} | {_cell(s, 'ceiling_r')} | {_cell(s, 'ceiling_mean_ratio', 2)} | "
                f"{_cell(s, 'ceiling_spread_ratio', 2)} | {_cell(s, 'map_r')} | {_cell(s, 'map_mean_ratio', 2)} | "
                f"{_cell(s, 'map_spread_ratio', 2)} | {_cell(s, 'map_ssim')} |"
                f" {_cell(s, 'map_psnr', 2)} | {_cell(s, 'map_seam_score', 2)} | {_cell(s, 'map_mean4_r')} | "
                f"{_cell(s, 'map_mean4_mean_ratio', 2)} | {_cell(s, 'map_mean4_spread_ratio', 2)} | "
                f"{_cell(s, 'fixture_ceiling_r')} | {_cell(s, 'fixture_ceiling_mean_ratio', 2)} | "
                f"{_cell(s, 'fixture_trained_ceiling_r')} | {_cell(s, 'fixture_trained_ceiling_mean_ratio', 2)} |"
            )
        out += [
            "",
            "Per run:",
            "",
            "| recipe | seed | ceiling r / mean / spread | map r / mean / spread | map SSIM / PSNR | real field ceiling r / mean | "
            "… trained on the field: r / mean |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in res["runs"]:
            f = figures(row)
            fx = f"{f['fixture_ceiling_r']:.3f} / {f['fixture_ceiling_mean_ratio']:.2f}" if "fixture_ceiling_r" in f else ""
            if "fixture_trained_ceiling_r" in f:
                fx += f" | {f['fixture_trained_ceiling_r']:.3f} / {f['fixture_trained_ceiling_mean_ratio']:.2f}"
            else:
                fx += " |"
            ceiling = f"{f['ceiling_r']:.3f} / {f['ceiling_mean_ratio']:.2f} / {f['ceiling_spread_ratio']:.2f}" if "ceiling_r" in f else "–"
            out.append(
                f"| {row['recipe']} | {row['seed']} | {ceiling} | "
                f"{f['map_r']:.3f} / {f['map_mean_ratio']:.2f} / {f['map_spread_ratio']:.2f} |"
                f" {f['map_ssim']:.3f} / {f['map_psnr']:.2f} | {fx} |"
            )
        out.append("")
    return "\n".join(out)


def main() -> None:
    if _sys.argv[1:2] == ["--render"]:
        results = [json.loads(Path(p).read_text()) for p in _sys.argv[2:]]
        print(markdown([r for r in results if r.get("benchmark") == "compare_sparse_target"]))  # others beside them: their own pages
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--target", default="perfusion", choices=["perfusion", "np"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=[*RECIPES, REGRESSION])
    ap.add_argument("--draws", type=int, default=1, help="also score the map that is the mean of this many draws")
    ap.add_argument("--fixture", type=Path, help="a real inForm field (component data) whose Alexa 594 channel is sparse")
    ap.add_argument(
        "--fixture-train", action="store_true", help="also train the autoencoders on the fixture, scored on its validation patches"
    )
    ap.add_argument("--json", type=Path)
    ap.add_argument("--only-done", action="store_true", help="collect the finished runs of these recipes and seeds, train nothing")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    work = args.work / args.target
    demo = demo_budget(work, args.target)
    fixture = fixture_images(work, args.fixture) if args.fixture and args.target == "perfusion" else None
    runs = [
        (recipe, seed)
        for recipe in args.recipes
        for seed in args.seeds
        if not args.only_done or (work / f"{recipe}_seed{seed}" / "scores.json").exists()
    ]
    rows = [one_run(demo, work, recipe, seed, fixture, args.draws, args.fixture_train) for recipe, seed in runs]
    per_recipe = {}
    for recipe in dict.fromkeys(recipe for recipe, _ in runs):
        flat = [figures(r) for r in rows if r["recipe"] == recipe]
        per_recipe[recipe] = {k: summary([f[k] for f in flat]) for k in flat[0] if all(k in f for f in flat)} | {
            "refused_by_guard": sum(r["refused_by_guard"] is not None for r in rows if r["recipe"] == recipe)
        }
    report(
        {
            "benchmark": "compare_sparse_target",
            "target": args.target,
            "simulator_version": demo.simulator_version,
            "machine": machine(),
            "plan": {
                "size": demo.plan.size,
                "train_slides": demo.plan.train_slides,
                "ae_steps": demo.plan.ae_steps,
                "steps": demo.plan.steps,
                "sample_steps": demo.plan.sample_steps,
                "draws": 1,
            },
            "blur": demo.blur,
            "runs": rows,
            "summary": per_recipe,
            "seconds_this_invocation": round(time.perf_counter() - t0, 1),
        },
        args.json,
    )


if __name__ == "__main__":
    main()
