"""`wsi-damm study`: the paper's ablations (Tab. 5–7) on held-out synthetic slides, split by region.

Same data, autoencoders and step budget for every model; only the DAMM part changes. Each model is
trained with every seed; every held-out map is scored over tissue, over the region where nuclei are
informative and over the region where the simulator made them divergent (its truth mask). Two
non-learned references sit beside them: the blurred-vessel baseline and the noiseless oracle.
A sampler comparison (DDIM-150/50, DPM++-20/10, wall time) runs on the first seed of DAMM full.

Every result is a file under OUT; rerunning skips what is done, so a killed study resumes.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..config import RunConfig, merge, resolve
from ..evaluate import evaluate_slide
from ..files import write_json
from ..metrics import psnr_from_mse
from ..predict import PredictConfig, run_predict
from ..run_dir import ROLES_NEEDED, RunDir
from ..stitch import run_stitch
from ..tile import TileConfig
from ..train import run_training
from . import baseline
from .dataset import SyntheticData, synthetic_data
from .synth import DIVERGENCE_LABELS

REGIONS = DIVERGENCE_LABELS


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    overrides: dict  # RunConfig overrides; {} = DAMM full
    trained_as: str | None = None  # predicts with another variant's run …
    no_nuclei: bool = False  # … without the nuclei channel


VARIANTS = (
    Variant("damm", "DAMM full", {}),
    Variant("uni_only", "uni-modal only (vessels)", {}, trained_as="damm", no_nuclei=True),
    Variant("no_dammp", "always fused (no DAMMP)", {"damm": {"dammp": False}}),
    Variant("no_mmfm", "no MMFM", {"model": {"mmfm": False}}),
    Variant("cross_attention", "cross-attention instead of UAFM", {"model": {"fusion": "cross-attention"}}),
)
SAMPLERS = (("ddim", 150), ("ddim", 50), ("dpm++", 20), ("dpm++", 10))


@dataclass(frozen=True)
class StudyPlan:
    size: int
    train_slides: int
    ae_steps: int
    steps: int
    seeds: tuple[int, ...]
    sample_steps: int = 20
    samples: int = 4  # draws per patch; the map is their mean (the sampler comparison uses one draw)
    samplers: tuple[tuple[str, int], ...] = SAMPLERS
    patch: int = 128
    overlap: int = 32


FULL = StudyPlan(size=2048, train_slides=3, ae_steps=300, steps=1000, seeds=(0, 1))
QUICK = StudyPlan(size=1024, train_slides=2, ae_steps=30, steps=40, seeds=(0,), sample_steps=5, samples=2,
                  samplers=(("ddim", 10), ("dpm++", 5)))


def _variant_config(base: RunConfig, plan: StudyPlan, v: Variant, seed: int) -> RunConfig:
    cfg = merge(base, v.overrides, f"study variant {v.name}")
    # every training slide trains: the held-out slides are the test, no model selection happens
    return merge(cfg, {"train": {"steps": plan.steps, "seed": seed, "val_fraction": 0.0, "checkpoint_every": plan.steps}}, "study")


def _train(data: SyntheticData, out: Path, plan: StudyPlan, preset: str, progress: bool, log) -> dict[tuple[str, int], Path]:
    base = merge(resolve(preset), {"autoencoder": {"steps": plan.ae_steps}, "train": {"val_fraction": 0.0}}, "study")
    shared = RunDir(out / "runs" / "autoencoders")
    if not all(shared.autoencoder(r).exists() for r in ROLES_NEEDED):
        log(f"autoencoders ({plan.ae_steps} steps), shared by every model → {shared.path}")
        run_training(data.store, shared.path, base, stage="autoencoder", progress=progress)
    trained = RunConfig.from_dict(json.loads(shared.config.read_text()))  # patch size, roles, … filled in from the store
    runs = {}
    for v in (v for v in VARIANTS if v.trained_as is None):
        for seed in plan.seeds:
            run = RunDir(out / "runs" / f"{v.name}_seed{seed}")
            runs[v.name, seed] = run.path
            if run.state.exists() and json.loads(run.state.read_text()).get("steps_done") == plan.steps:
                continue
            log(f"training {v.label}, seed {seed} ({plan.steps} steps) → {run.path}")
            run.path.mkdir(parents=True, exist_ok=True)
            for role in ROLES_NEEDED:
                shutil.copyfile(shared.autoencoder(role), run.autoencoder(role))
            cfg = _variant_config(trained, plan, v, seed)
            if not run.config.exists():  # resume=True below continues the run this file describes
                write_json(run.config, asdict(cfg))
            run_training(data.store, run.path, cfg, resume=True, progress=progress)
    return runs


def _predict_and_score(run: Path, data: SyntheticData, out: Path, cfg: PredictConfig, no_nuclei: bool, progress: bool) -> dict:
    """Predict every held-out slide, stitch, score per region; cached in OUT/result.json."""
    result_path = out / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    specs = [h.spec.without("nuclei") if no_nuclei else h.spec for h in data.heldout]
    t0 = time.perf_counter()
    run_predict(run, specs, out / "prediction.zarr", cfg, overwrite=True, progress=progress)
    seconds = time.perf_counter() - t0
    maps = run_stitch(out / "prediction.zarr", out / "maps", progress=progress)
    slides = [_score(m, h, progress) for m, h in zip(maps, data.heldout)]
    result = {"predict_seconds": seconds, "sampler": cfg.sampler, "steps": cfg.n_steps, "slides": slides}
    shutil.rmtree(out / "prediction.zarr")
    write_json(result_path, result)
    return result


def _score(map_path: Path, held, progress: bool) -> dict:
    e = evaluate_slide(map_path, held.spec, held.clean, True, progress, held.divergence, REGIONS)
    e.result["patch_rows"] = [{k: row[k] for k in ("ssim", "psnr", "region", "oracle_ssim", "oracle_psnr")} for row in e.rows]
    return e.result


def _baseline(data: SyntheticData, out: Path, tile_cfg: TileConfig, progress: bool) -> dict:
    result_path = out / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    fitted = baseline.fit(data.train_specs, tile_cfg)
    slides = [_score(baseline.write_map(h.spec, tile_cfg, fitted, out / f"{h.spec.slide_id}.ome.zarr"), h, progress) for h in data.heldout]
    result = {"sigma_um": fitted.sigma_um, "r2_train": fitted.r2, "slides": slides}
    write_json(result_path, result)
    return result


def _region_numbers(result: dict, key: str = "regions", oracle: bool = False) -> dict[str, dict]:
    """Pixel-weighted WSI numbers per region (and over all tissue) pooled over held-out slides."""
    out = {}
    for region in ("tissue", *REGIONS.values()):
        parts = []
        for s in result["slides"]:
            if region == "tissue":
                w = s["oracle_wsi" if oracle else "wsi"]
                parts.append((w["pixels_tissue"], w["ssim_tissue"], w["mse_tissue"], math.nan))
            elif region in s.get(key, {}):
                g = s[key][region]
                parts.append((g["pixels"], g["ssim"], g["mse"], g["multimodal_share"]))
        n = sum(p[0] for p in parts)
        if not n:
            continue
        if region == "tissue":  # the regions partition the tissue: its share is their pixel-weighted mean
            shares = [(g["pixels"], g["multimodal_share"]) for s in result["slides"] for g in s.get(key, {}).values()]
            parts = [(p[0], p[1], p[2], sum(k * v for k, v in shares) / max(1, sum(k for k, _ in shares))) for p in parts]
        mse = sum(p[0] * p[2] for p in parts) / n
        rows = [r for s in result["slides"] for r in s["patch_rows"] if region == "tissue" or REGIONS.get(r.get("region")) == region]
        ps = [100 * r["oracle_ssim" if oracle else "ssim"] for r in rows]
        out[region] = {"ssim": sum(p[0] * p[1] for p in parts) / n, "psnr": psnr_from_mse(mse),
                       "share": sum(p[0] * p[3] for p in parts) / n, "patch_ssim": ps,
                       "patch_psnr": [r["oracle_psnr" if oracle else "psnr"] for r in rows]}
    return out


def _summarise_model(label: str, per_seed: list[dict], kind: str) -> dict:
    """Mean and spread over seeds of WSI numbers; patch numbers pooled over seeds (mean ± sd over patches)."""
    row = {"model": label, "kind": kind, "seeds": len(per_seed), "regions": {}}
    for region in ("tissue", *REGIONS.values()):
        vals = [s[region] for s in per_seed if region in s]
        if not vals:
            continue
        ssim, psnr = np.array([v["ssim"] for v in vals]), np.array([v["psnr"] for v in vals])
        ps = np.concatenate([v["patch_ssim"] for v in vals]) if vals[0]["patch_ssim"] else np.array([])
        pp = np.concatenate([v["patch_psnr"] for v in vals]) if vals[0]["patch_psnr"] else np.array([])
        pp = pp[np.isfinite(pp)]
        share = [v["share"] for v in vals if math.isfinite(v["share"])] if kind == "learned" else []
        row["regions"][region] = {
            "wsi_ssim": float(ssim.mean()), "wsi_ssim_sd": float(ssim.std()), "wsi_psnr": float(psnr.mean()), "wsi_psnr_sd": float(psnr.std()),
            "wsi_ssim_per_seed": ssim.tolist(), "wsi_psnr_per_seed": psnr.tolist(),
            "patch_ssim_percent": float(ps.mean()) if len(ps) else math.nan, "patch_ssim_percent_sd": float(ps.std()) if len(ps) else math.nan,
            "patch_psnr": float(pp.mean()) if len(pp) else math.nan, "patch_psnr_sd": float(pp.std()) if len(pp) else math.nan,
            "patches": int(len(ps)), "multimodal_share": float(np.mean(share)) if share else None,
        }
    return row


def markdown_table(rows: list[dict], seeds: int) -> str:
    head = ["model"]
    for region in ("tissue", *REGIONS.values()):
        head += [f"{region} WSI SSIM", f"{region} WSI PSNR", f"{region} patch SSIM %", f"{region} multi-modal share"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"]]
        for region in ("tissue", *REGIONS.values()):
            g = r["regions"].get(region)
            if g is None:
                cells += ["–"] * 4
                continue
            sd = lambda v: f" ± {v:.3f}" if r["seeds"] > 1 else ""  # noqa: E731
            cells += [f"{g['wsi_ssim']:.4f}{sd(g['wsi_ssim_sd'])}", f"{g['wsi_psnr']:.2f}{sd(g['wsi_psnr_sd'])}",
                      f"{g['patch_ssim_percent']:.1f} ± {g['patch_ssim_percent_sd']:.1f}",
                      "–" if g["multimodal_share"] is None else f"{g['multimodal_share']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"WSI columns: mean ± sd over {seeds} training seed(s) (pixel-weighted over held-out slides); patch columns: "
                 "mean ± sd over the paper's non-overlapping patches, pooled over seeds; a patch belongs to its majority region. "
                 "Multi-modal share: fraction of sampling steps on which the DAMMP gate chose the multi-modal branch.")
    return "\n".join(lines)


def sampler_table(rows: list[dict]) -> str:
    ref = max(rows, key=lambda r: (r["sampler"] == "ddim", r["steps"]))  # the paper's sampler, most steps
    lines = [f"| sampler | steps | WSI SSIM (tissue) | WSI PSNR (tissue) | SSIM vs {ref['sampler']}-{ref['steps']} | predict wall time (s) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        rel = 100 * (r["wsi_ssim"] - ref["wsi_ssim"]) / ref["wsi_ssim"]
        lines.append(f"| {r['sampler']} | {r['steps']} | {r['wsi_ssim']:.4f} | {r['wsi_psnr']:.2f} | {rel:+.2f} % | {r['seconds']:.1f} |")
    return "\n".join(lines)


def figure(path: Path, rows: list[dict], samplers: list[dict]) -> None:
    """Bars per model and region (seed spread as error bars), gate share, and SSIM vs sampling time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regions = ("tissue", *REGIONS.values())
    fig, axes = plt.subplots(1, 4, figsize=(22, 5.5), gridspec_kw={"width_ratios": [3, 3, 2, 2]})
    width = 0.8 / len(rows)
    xs = np.arange(len(regions))
    colours = plt.cm.tab10(np.arange(len(rows)))
    for ax, key, title in ((axes[0], "wsi_ssim", "WSI SSIM"), (axes[1], "wsi_psnr", "WSI PSNR (dB)")):
        for i, r in enumerate(rows):
            vals = [r["regions"].get(g, {}).get(key, np.nan) for g in regions]
            err = [r["regions"].get(g, {}).get(key + "_sd", 0.0) for g in regions]
            ax.bar(xs + (i - len(rows) / 2 + 0.5) * width, vals, width, yerr=err, capsize=2, label=r["model"], color=colours[i])
        ax.set_xticks(xs, regions)
        ax.set_title(title + " on held-out slides")
        lo = np.nanmin([r["regions"].get(g, {}).get(key, np.nan) for r in rows for g in regions])
        hi = np.nanmax([r["regions"].get(g, {}).get(key, np.nan) for r in rows for g in regions])
        ax.set_ylim(lo - 0.15 * (hi - lo), hi + 0.1 * (hi - lo))
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(rows), fontsize=9, frameon=False)
    gated = [r for r in rows if r["regions"]["tissue"].get("multimodal_share") is not None and r["kind"] == "learned"]
    for i, r in enumerate(gated):
        axes[2].bar(np.arange(2) + (i - len(gated) / 2 + 0.5) * (0.8 / max(1, len(gated))),
                    [r["regions"].get(g, {}).get("multimodal_share") or 0 for g in REGIONS.values()], 0.8 / max(1, len(gated)), label=r["model"])
    axes[2].set_xticks(np.arange(2), list(REGIONS.values()))
    axes[2].set_ylim(0, 1.05)
    axes[2].set_title("DAMMP: share of steps on the multi-modal branch")
    for s in samplers:
        axes[3].scatter(s["seconds"], s["wsi_ssim"], s=40)
        axes[3].annotate(f"{s['sampler']}-{s['steps']}", (s["seconds"], s["wsi_ssim"]), fontsize=9, xytext=(4, 4), textcoords="offset points")
    axes[3].set_xlabel("predict wall time (s)")
    axes[3].set_ylabel("WSI SSIM (tissue)")
    axes[3].set_title("samplers (DAMM full, seed 0)")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_study(out: Path, preset: str = "tiny", quick: bool = False, seeds: int | None = None, progress: bool = True, log=print) -> dict:
    plan = QUICK if quick else FULL
    if seeds is not None:
        plan = StudyPlan(**{**asdict(plan), "seeds": tuple(range(seeds))})
    out = Path(out)
    t0 = time.perf_counter()
    tile_cfg = TileConfig(patch_size=plan.patch, overlap=plan.overlap)
    data = synthetic_data(out / "data", plan.size, plan.train_slides, 1, tile_cfg, progress, log)
    runs = _train(data, out, plan, preset, progress, log)

    default = PredictConfig(steps=plan.sample_steps, batch_size=32, samples=plan.samples)
    rows = []
    for v in VARIANTS:
        per_seed = []
        for seed in plan.seeds:
            log(f"predicting with {v.label}, seed {seed}")
            run = runs[v.trained_as or v.name, seed]
            res = _predict_and_score(run, data, out / "predictions" / f"{v.name}_seed{seed}_k{plan.samples}", default, v.no_nuclei, progress)
            per_seed.append(_region_numbers(res))
        rows.append(_summarise_model(v.label, per_seed, "learned"))
    log("blurred-vessel baseline and oracle")
    base = _baseline(data, out / "predictions" / "baseline", tile_cfg, progress)
    rows.append(_summarise_model(f"blurred-vessel baseline (σ = {base['sigma_um']:g} µm)", [_region_numbers(base)], "reference"))
    rows.append(_summarise_model("oracle (noiseless field)", [_region_numbers(base, "oracle_regions", oracle=True)], "reference"))

    samplers = []
    for sampler, steps in plan.samplers:
        log(f"sampler comparison: {sampler}, {steps} steps")
        cfg = PredictConfig(sampler=sampler, steps=steps, batch_size=32)
        res = _predict_and_score(runs["damm", plan.seeds[0]], data, out / "samplers" / f"{sampler}_{steps}", cfg, False, progress)
        tissue = _region_numbers(res)["tissue"]
        samplers.append({"sampler": sampler, "steps": steps, "wsi_ssim": tissue["ssim"], "wsi_psnr": tissue["psnr"], "seconds": res["predict_seconds"]})

    summary = {"plan": asdict(plan), "preset": preset, "seconds": round(time.perf_counter() - t0, 1), "models": rows, "samplers": samplers,
               "heldout": [h.spec.slide_id for h in data.heldout]}
    write_json(out / "study.json", summary)
    md = ["# DAMM-Diffusion ablation study on synthetic slides", "",
          f"Preset `{preset}`, {plan.train_slides} training slides and 1 held-out slide of {plan.size}² px, "
          f"{plan.steps} diffusion steps per model, seeds {list(plan.seeds)}; maps are the mean of {plan.samples} draws per patch "
          f"(DPM-Solver++ {plan.sample_steps} steps).", "",
          markdown_table(rows, len(plan.seeds)), "", "## Samplers (DAMM full, first seed)", "", sampler_table(samplers), "", "![study](study.png)", ""]
    (out / "study.md").write_text("\n".join(md), encoding="utf-8")
    figure(out / "study.png", rows, samplers)
    return summary
