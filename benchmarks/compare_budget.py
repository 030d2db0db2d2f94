"""Training budget and context: the canvas recipe (the demo's) trained with more diffusion steps, or
given the context around each window, on the demo's data, scored on its held-out slide — does the
distance to the oracle shrink?

Same data, autoencoder steps, batch, sampler (DPM-Solver++, the demo's 10 steps) and scoring as
`compare_seamless.py`'s canvas rows. A run is named by `--runs` entries STEPS or STEPS:SPAN: the
diffusion steps (the demo's 500 since 3 Dec, 900 before; the DAMMP warm-up stays the same fraction of them) and the context
window in patches (`model.context_span`; none by default). Each run predicts one draw and the mean
of 4, scored on the same pixels as every other demo-budget benchmark, and its autoencoder ceiling
(decode(encode(measured NP)), patch by patch: the best its latents allow). A run with context takes
the autoencoders of the same seed's run without it when that exists (trained alike: same data, seed and
steps), so the two differ in the context alone. `--ae-norm none` / `--ae-ssim-weight W` /
`--ae-lr-schedule cosine` train every run on an autoencoder variant (runs named `STEPS:normnone`, …), taking the variant's autoencoders from
its autoencoder-only run when that exists. `--multi-loss gated` (runs named `STEPS:multigated`) trains
the multi-modal branch after warm-up only on the samples the gate fuses, the paper's loss; the demo's
(since 3 Dec) lets both branches learn from every sample (`damm.multi_loss = "always"`); both on the
same autoencoders. Rows written before that option existed were all gated and are read as such.
`--val-fraction 0` trains both stages on both training
slides (runs named `STEPS:val0`); the preset's 0.2 holds one of the two out for the validation curve, as
the demo does. `budget.json` is rewritten after every run (mean ± sd with
ddof = 1 over seeds, and per run) and keeps the runs of earlier invocations; rerun with the same
--work to resume.

    python benchmarks/compare_budget.py --out benchmarks/results/budget [--runs 900 1800 900:4] [--seeds 0 1 2]
    # the autoencoders alone: their ceiling
    python benchmarks/compare_budget.py --autoencoder-steps 150 600 [--ae-norm none] [--ae-ssim-weight 0.5] [--ae-lr-schedule cosine]
    python benchmarks/compare_budget.py --runs 900 --ae-norm none   # the canvas recipe on that variant
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys as _sys
import time
from pathlib import Path

_sys.path.insert(0, str(Path(__file__).resolve().parent))
from _demo_budget import budget_config, demo_budget, predict_and_score, scores, summary  # noqa: E402

from wsi_damm.training.config import LOCAL_NORMS, LR_SCHEDULES, merge  # noqa: E402
from wsi_damm.training.gate_regions import gate_in_training  # noqa: E402
from wsi_damm.training.run_dir import RunDir, read_metrics  # noqa: E402

RECIPE = {"local": True, "latents": "canvas", "sampling": "shifted"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/budget"))
    ap.add_argument(
        "--work",
        type=Path,
        default=Path("/tmp/compare_seamless"),
        help="data (shared with compare_seamless), runs and maps; rerun to resume",
    )
    ap.add_argument(
        "--runs",
        nargs="+",
        default=["900", "1800", "900:4"],
        help="STEPS (diffusion training steps) or STEPS:SPAN (and a context window SPAN patches wide)",
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--draws", type=int, nargs="+", default=[1, 4])
    ap.add_argument(
        "--autoencoder-steps",
        type=int,
        nargs="*",
        default=[],
        help="instead: train only the autoencoders with these steps, per seed, and score their ceilings",
    )
    ap.add_argument("--ae-ssim-weight", type=float, default=0.0, help="weight of the autoencoders' SSIM loss term")
    ap.add_argument("--ae-norm", choices=LOCAL_NORMS, default="pixel", help="how the local autoencoders normalise (autoencoder.local_norm)")
    ap.add_argument(
        "--ae-lr-schedule",
        choices=LR_SCHEDULES,
        default="constant",
        help="the autoencoders' learning rate after warm-up (autoencoder.lr_schedule): constant or a cosine down to a tenth",
    )
    ap.add_argument(
        "--multi-loss",
        choices=("gated", "always"),
        default=VARIANT_DEFAULTS["multi_loss"],
        help="damm.multi_loss: after warm-up the multi-modal branch learns where the gate fuses"
        " (the paper) or from every sample (the demo)",
    )
    ap.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="train.val_fraction: 0.2 (the preset) holds one of the two training slides out for validation, 0 trains on both",
    )
    args = ap.parse_args()

    from wsi_damm.stages.train import run_training

    t0 = time.perf_counter()
    demo = demo_budget(args.work)
    if args.autoencoder_steps:
        return autoencoder_ceilings(args, demo, t0)
    runs: list[dict] = []
    variant = ae_variant(args)
    for spec in args.runs:
        steps, span = (int(v) for v in (spec.split(":") + ["0"])[:2])
        plan = dataclasses.replace(demo.plan, steps=steps)
        for seed in args.seeds:
            run_dir = args.work / f"budget{steps}{f'_context{span}' if span else ''}{variant_suffix(variant)}" / f"seed{seed}"
            row = {"seed": seed, "diffusion_steps": steps, "context_span": span, "autoencoder_steps": plan.ae_steps, **variant}
            done = run_dir / "row.json"
            if done.exists():
                row = {"context_span": 0} | VARIANT_DEFAULTS | LEGACY | json.loads(done.read_text())
                missing = {"ceiling", "gate_in_training"} - set(row)  # rows of earlier versions of this script
                if "ceiling" in missing:
                    row["ceiling"] = ceiling(demo, run_dir)
                if "gate_in_training" in missing:
                    row["gate_in_training"] = gate_in_training(read_metrics(RunDir(run_dir).metrics))
                if missing:
                    done.write_text(json.dumps(row) + "\n")
                runs.append(row)
                continue
            if not (run_dir / "unet_ema.safetensors").exists():
                shutil.rmtree(run_dir, ignore_errors=True)
                t = time.perf_counter()
                cfg = variant_config(plan, seed, variant, {"latents": RECIPE["latents"], "context_span": span})
                # autoencoders trained alike (same data, seed, steps and variant) are reused, so runs differ in the diffusion alone
                alike = [
                    args.work / f"budget{steps}{variant_suffix(variant)}" / f"seed{seed}" if span else None,
                    args.work / f"autoencoder{plan.ae_steps}{variant_suffix(variant, DATA_DEFAULTS)}" / f"seed{seed}",
                ]
                shared = next((d for d in alike if d is not None and (d / "autoencoder_target.safetensors").exists()), None)
                stage = "all"
                if shared is not None:
                    run_dir.mkdir(parents=True)
                    for f in [*shared.glob("autoencoder*"), shared / "config.json"]:
                        shutil.copy2(f, run_dir / f.name)
                    stage, row["autoencoders_from"] = "diffusion", str(shared.relative_to(args.work))
                run_training(demo.data.store, run_dir, cfg, stage=stage, progress=False)
                row["train_seconds"] = round(time.perf_counter() - t, 1)
                print(f"{spec}, seed {seed}: trained in {row['train_seconds']:.0f} s", flush=True)
            for draws in args.draws:
                row[f"draws{draws}"] = predict_and_score(demo, run_dir, draws, seed, RECIPE["sampling"])
            row["ceiling"] = ceiling(demo, run_dir)
            row["gate_in_training"] = gate_in_training(read_metrics(RunDir(run_dir).metrics))
            done.write_text(json.dumps(row) + "\n")
            runs.append(row)
            print(
                json.dumps(
                    {"run": spec, "seed": seed}
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
            write(args.out, demo, runs, args.draws, time.perf_counter() - t0)
    write(args.out, demo, runs, args.draws, time.perf_counter() - t0)


AE_DEFAULTS = {"ssim_weight": 0.0, "local_norm": "pixel", "lr_schedule": "constant"}  # the autoencoder settings a variant can change
# and the training data: the tiny preset's validation fraction, which with the demo's two training slides holds one
# of them out (split by slide); 0 trains both stages on both
DATA_DEFAULTS = AE_DEFAULTS | {"val_fraction": 0.2}
# and the diffusion's DAMMP training: which samples the multi-modal branch learns from after warm-up
VARIANT_DEFAULTS = DATA_DEFAULTS | {"multi_loss": "always"}  # the demo's, from its demo_config
LEGACY = {"multi_loss": "gated"}  # what a row written before a setting was recorded was trained with


def ae_variant(args) -> dict:
    return {
        "ssim_weight": args.ae_ssim_weight,
        "local_norm": args.ae_norm,
        "lr_schedule": args.ae_lr_schedule,
        "val_fraction": args.val_fraction,
        "multi_loss": args.multi_loss,
    }


def variant_config(plan, seed: int, variant: dict, model: dict):
    """The demo-budget config of a run of this variant. Its autoencoders are the kind every run here was trained with:
    neither standardised nor refit (`autoencoder.standardise`, `autoencoder.refit`, which the tiny preset now sets)."""
    variant = VARIANT_DEFAULTS | variant
    autoencoder = {"local": RECIPE["local"], "standardise": False, "refit": False, **{k: variant[k] for k in AE_DEFAULTS}}
    return merge(
        budget_config(plan, seed, autoencoder, model, {"val_fraction": variant["val_fraction"]}),
        {"damm": {"multi_loss": variant["multi_loss"]}},
        "benchmark",
    )


def variant_suffix(variant: dict, keys: dict = VARIANT_DEFAULTS) -> str:
    """How a run directory names its variant (autoencoder settings, training data, DAMMP training; only `keys`):
    empty for the demo's."""
    variant = VARIANT_DEFAULTS | variant
    return (
        (f"_ssim{variant['ssim_weight']:g}" if variant["ssim_weight"] else "")
        + (f"_norm{variant['local_norm']}" if variant["local_norm"] != AE_DEFAULTS["local_norm"] else "")
        + (f"_aelr{variant['lr_schedule']}" if variant["lr_schedule"] != AE_DEFAULTS["lr_schedule"] else "")
        + (f"_val{variant['val_fraction']:g}" if variant["val_fraction"] != DATA_DEFAULTS["val_fraction"] else "")
        + (f"_multi{variant['multi_loss']}" if "multi_loss" in keys and variant["multi_loss"] != VARIANT_DEFAULTS["multi_loss"] else "")
    )


def autoencoder_ceilings(args, demo, t0: float) -> None:
    """The autoencoder ceiling against the autoencoder's training steps: `autoencoders.json`."""
    from wsi_damm.stages.train import run_training

    file = args.out / "autoencoders.json"  # runs of earlier invocations are kept: one file for every variant
    earlier = [DATA_DEFAULTS | r for r in json.loads(file.read_text())["runs"]] if file.exists() else []
    rows = []
    variant = {k: v for k, v in ae_variant(args).items() if k in DATA_DEFAULTS}
    for steps in args.autoencoder_steps:
        plan = dataclasses.replace(demo.plan, ae_steps=steps)
        for seed in args.seeds:
            run_dir = args.work / f"autoencoder{steps}{variant_suffix(variant, DATA_DEFAULTS)}" / f"seed{seed}"
            done = run_dir / "row.json"
            if not done.exists():
                shutil.rmtree(run_dir, ignore_errors=True)
                t = time.perf_counter()
                cfg = variant_config(plan, seed, variant, {"latents": RECIPE["latents"]})
                run_training(demo.data.store, run_dir, cfg, stage="autoencoder", progress=False)
                row = {
                    "seed": seed,
                    "autoencoder_steps": steps,
                    **variant,
                    "train_seconds": round(time.perf_counter() - t, 1),
                    "ceiling": ceiling(demo, run_dir),
                }
                done.write_text(json.dumps(row) + "\n")
            rows.append(DATA_DEFAULTS | json.loads(done.read_text()))
            mine = {ident(r) for r in rows}
            merged = sorted([r for r in earlier if ident(r) not in mine] + rows, key=ident)
            print(
                json.dumps(
                    {k: rows[-1][k] for k in ("seed", "autoencoder_steps", *DATA_DEFAULTS)}
                    | {"ssim": round(rows[-1]["ceiling"]["ssim"], 4), "psnr": round(rows[-1]["ceiling"]["psnr"], 2)}
                ),
                flush=True,
            )
            names = {ident(r)[:-1]: f"{r['autoencoder_steps']}{variant_suffix(r, DATA_DEFAULTS).replace('_', ':')}" for r in merged}
            table = {
                name: {m: summary([r["ceiling"][m] for r in merged if ident(r)[:-1] == key]) for m in ("ssim", "psnr")}
                for key, name in sorted(names.items())
            }
            args.out.mkdir(parents=True, exist_ok=True)
            file.write_text(
                json.dumps(
                    {
                        "simulator_version": demo.simulator_version,
                        "recipe": RECIPE,
                        "summary": table,
                        "seconds_this_invocation": round(time.perf_counter() - t0, 1),
                        "runs": merged,
                    },
                    indent=1,
                )
                + "\n",
                encoding="utf-8",
            )


def ident(row: dict) -> tuple:
    """An autoencoder-only run: its steps, variant and seed."""
    return (row["autoencoder_steps"], *(row[k] for k in DATA_DEFAULTS), row["seed"])


def ceiling(demo, run_dir: Path) -> dict:
    """The run's autoencoder ceiling: decode(encode(measured NP)), patch by patch, scored like its maps."""
    from wsi_damm.stages.evaluate import run_evaluate
    from wsi_damm.workflows.ceiling import ceiling_map

    made = ceiling_map(run_dir, demo.held.spec, demo.held.clean, run_dir / "ceiling.ome.zarr", "measured", progress=False)
    return scores(run_evaluate([(made, demo.held.spec)], run_dir / "ceiling_report", [demo.held.clean], **demo.scoring))


def run_name(row: dict) -> str:
    """A run's key in the summary: its diffusion steps, with its context span if it has one."""
    return (
        f"{row['diffusion_steps']}" + (f":{row['context_span']}" if row.get("context_span") else "") + variant_suffix(row).replace("_", ":")
    )


def write(out: Path, demo, runs: list[dict], draws: list[int], seconds: float) -> None:
    """`budget.json`: this invocation's runs and those of earlier ones it did not redo (other variants)."""
    file = out / "budget.json"
    mine = {(run_name(r), r["seed"]) for r in runs}
    earlier = [LEGACY | r for r in json.loads(file.read_text())["runs"]] if file.exists() else []
    earlier = [r for r in earlier if (run_name(r), r["seed"]) not in mine]
    runs = sorted(earlier + runs, key=lambda r: (r["diffusion_steps"], r.get("context_span", 0), variant_suffix(r), r["seed"]))
    table = {}
    for name in dict.fromkeys(run_name(r) for r in runs):
        mine = [r for r in runs if run_name(r) == name]
        table[name] = {f"draws{d}": {m: summary([r[f"draws{d}"][m] for r in mine]) for m in ("ssim", "psnr", "seam_score")} for d in draws}
        gated = [r["gate_in_training"] for r in mine if r.get("gate_in_training")]  # DAMMP phase, per region: what the DFL taught
        if gated:
            table[name]["gate_in_training"] = {
                g: {k: summary([r[g][k] for r in gated]) for k in ("dfl_label_rate", "mean_kappa")} for g in gated[0]
            }
        with_ceiling = [r for r in mine if "ceiling" in r]
        if with_ceiling:
            table[name]["ceiling"] = {m: summary([r["ceiling"][m] for r in with_ceiling]) for m in ("ssim", "psnr")}
        for d in draws:
            table[name][f"draws{d}"]["regions"] = {
                g: {m: summary([r[f"draws{d}"]["regions"][g][m] for r in mine]) for m in ("ssim", "psnr", "multimodal_share")}
                for g in mine[0][f"draws{d}"]["regions"]
            }
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "simulator_version": demo.simulator_version,
        "plan": demo.plan.__dict__,
        "recipe": RECIPE,
        "seconds_this_invocation": round(seconds, 1),
        "blurred_vessels": demo.blur,
        "summary": table,
        "runs": runs,
    }
    file.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
