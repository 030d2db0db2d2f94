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
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from ..config import RunConfig, merge, resolve
from ..files import write_json
from ..gate_regions import gate_in_training
from ..metrics import psnr_from_mse
from ..run_dir import ROLES_NEEDED, RunDir, read_metrics
from ..running_time import RunningTime
from ..stages.evaluate import evaluate_slide
from ..stages.predict import PredictConfig, run_predict
from ..stages.stitch import run_stitch
from ..stages.tile import TileConfig
from ..stages.train import run_training
from . import baseline
from .ceiling import SOURCES, ceiling_map
from .dataset import SyntheticData, synthetic_data
from .regression import WEIGHTS as REGRESSION_WEIGHTS
from .regression import regression_map, train_regression
from .synth import DIVERGENCE_LABELS, SIMULATOR_VERSION

REGIONS = DIVERGENCE_LABELS
RUNNING_TIME = "running_time.json"  # seconds of every leg, for study.json's wall time


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
REGRESSION_LABEL = "regression U-Net (L1; pix2pix generator, no GAN)"
SAMPLERS = (("ddim", 150), ("ddim", 50), ("dpm++", 20), ("dpm++", 10))


@dataclass(frozen=True)
class StudyPlan:
    size: int
    train_slides: int
    heldout_slides: int
    ae_steps: int
    steps: int
    seeds: tuple[int, ...]
    sample_steps: int = 20
    samples: int = 4  # draws per patch of the mean-of-draws rows; every model also gets a single-draw row
    samplers: tuple[tuple[str, int], ...] = SAMPLERS
    patch: int = 128
    overlap: int = 32
    heldout_size: int | None = None  # default: `size`


# Sized for about 2 hours on 2 cores: per seed an autoencoder set (300 steps), 4 diffusion models and a regression
# U-Net (600 steps each), and 11 maps per seed of two 1024² held-out slides (the demo trains 1000 steps on the same preset)
FULL = StudyPlan(size=2048, heldout_size=1024, train_slides=3, heldout_slides=2, ae_steps=300, steps=600, seeds=(0, 1, 2), sample_steps=10)
QUICK = StudyPlan(
    size=1024,
    train_slides=2,
    heldout_slides=2,
    ae_steps=30,
    steps=40,
    seeds=(0, 1),
    sample_steps=5,
    samples=2,
    samplers=(("ddim", 10), ("dpm++", 5)),
)


def variant_config(base: RunConfig, plan: StudyPlan, v: Variant, seed: int) -> RunConfig:
    cfg = merge(base, v.overrides, f"study variant {v.name}")
    # every training slide trains: the held-out slides are the test, no model selection happens
    return merge(cfg, {"train": {"steps": plan.steps, "seed": seed, "val_fraction": 0.0, "checkpoint_every": plan.steps}}, "study")


def base_config(preset: str, plan: StudyPlan) -> RunConfig:
    """The paper's recipe (GroupNorm autoencoders, patch latents, patch-by-patch sampling): its ablations are the paper's.
    The autoencoders' rate decays along a cosine: at a constant rate their ceiling over seeds was 0.64 ± 0.18 SSIM,
    so one seed's autoencoders decided every DAMM row; decayed, 0.75 ± 0.03. The target is coded as it is
    (`target_gamma` 1), as the paper codes it. A collapsed autoencoder is said, not fatal: the study's ceiling
    rows show what it cost every row above them."""
    return merge(
        resolve(preset),
        {
            "autoencoder": {"steps": plan.ae_steps, "local": False, "lr_schedule": "cosine", "target_gamma": 1.0, "on_collapse": "warn"},
            "model": {"latents": "patch"},
            "train": {"val_fraction": 0.0},
        },
        "study",
    )


def autoencoders_dir(out: Path, seed: int) -> Path:
    return out / "runs" / f"autoencoders_seed{seed}"


def _train(data: SyntheticData, out: Path, plan: StudyPlan, preset: str, progress: bool, log) -> dict[tuple[str, int], Path]:
    """Per seed: autoencoders, then every model of that seed on them — a seed's sd contains the autoencoders' spread,
    and the variants of one seed differ only in their DAMM part."""
    base = base_config(preset, plan)
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
        if not (path / REGRESSION_WEIGHTS).exists():
            log(f"training the regression U-Net, seed {seed} ({plan.steps} steps) → {path}")
        runs["regression", seed] = train_regression(data.store, path, variant_config(trained[seed], plan, VARIANTS[0], seed), progress)
    for v in (v for v in VARIANTS if v.trained_as is None):
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


def _cached(out: Path, compute: Callable[[], dict]) -> dict:
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
        slides = [_score(m, h, progress) for m, h in zip(maps, data.heldout)]
        shutil.rmtree(out / "prediction.zarr")
        return {"predict_seconds": seconds, "sampler": cfg.sampler, "steps": cfg.n_steps, "slides": slides}

    return _cached(out, compute)


def _score(map_path: Path, held, progress: bool) -> dict:
    e = evaluate_slide(map_path, held.spec, held.clean, True, progress, held.divergence, REGIONS)
    e.result["patch_rows"] = [
        {k: row[k] for k in ("slide", "y", "x", "ssim", "psnr", "region", "oracle_ssim", "oracle_psnr")} for row in e.rows
    ]
    return e.result


def _baseline(data: SyntheticData, out: Path, tile_cfg: TileConfig, progress: bool) -> dict:
    def compute() -> dict:
        fitted = baseline.fit(data.train_specs, tile_cfg)
        slides = [
            _score(baseline.write_map(h.spec, tile_cfg, fitted, out / f"{h.spec.slide_id}.ome.zarr"), h, progress) for h in data.heldout
        ]
        return {"sigma_um": fitted.sigma_um, "r2_train": fitted.r2, "slides": slides}

    return _cached(out, compute)


def _regression(run: Path, data: SyntheticData, out: Path, progress: bool) -> dict:
    def compute() -> dict:
        t0 = time.perf_counter()
        maps = [regression_map(run, h.spec, out / f"{h.spec.slide_id}.ome.zarr", progress) for h in data.heldout]
        seconds = time.perf_counter() - t0
        return {"predict_seconds": seconds, "slides": [_score(m, h, progress) for m, h in zip(maps, data.heldout)]}

    return _cached(out, compute)


def score_ceiling(data: SyntheticData, ae_run: Path, out: Path, source: str, progress: bool) -> dict:
    """The autoencoder ceiling (decode(encode(NP)) of the measured or noiseless field) on every held-out slide."""

    def compute() -> dict:
        maps = [ceiling_map(ae_run, h.spec, h.clean, out / f"{h.spec.slide_id}.ome.zarr", source, progress) for h in data.heldout]
        return {"source": source, "slides": [_score(m, h, progress) for m, h in zip(maps, data.heldout)]}

    return _cached(out, compute)


def region_numbers(result: dict, key: str = "regions", oracle: bool = False) -> dict[str, dict]:
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
        out[region] = {
            "ssim": sum(p[0] * p[1] for p in parts) / n,
            "psnr": psnr_from_mse(mse),
            "share": sum(p[0] * p[3] for p in parts) / n,
            "patch_ssim": ps,
            "patch_psnr": [r["oracle_psnr" if oracle else "psnr"] for r in rows],
        }
    return out


def sample_sd(values) -> float:
    """Sample standard deviation (ddof = 1); NaN below two values — a spread is not measured from one."""
    values = np.asarray(values, np.float64)
    return float(values.std(ddof=1)) if len(values) > 1 else math.nan


def same_pixels(rows: dict[str, dict]) -> int:
    """Score every row on the same pixels and patches: checks that each held-out slide's tissue and region
    pixel counts are the same in every row (one mask per slide), keeps in every row only the patches every
    row scored, and returns how many that is. Raises when the learned rows (same tiling) scored different
    patches or when any pixel count differs — a comparison on other pixels is not a comparison."""

    def pixel_counts(res: dict) -> list:
        return [
            (s["slide"], s["wsi"]["pixels_tissue"], sorted((k, g["pixels"]) for k, g in s.get("regions", {}).items()))
            for s in res["slides"]
        ]

    def patches(res: dict) -> set:
        return {(r["slide"], r["y"], r["x"]) for s in res["slides"] for r in s["patch_rows"]}

    names = list(rows)
    first = pixel_counts(rows[names[0]])
    for name in names[1:]:
        if pixel_counts(rows[name]) != first:
            raise RuntimeError(f"study rows {names[0]!r} and {name!r} were scored on different pixels")
    learned = [n for n in names if rows[n].get("kind") != "reference"]  # every row on predict's tiling
    for name in learned[1:]:
        if patches(rows[name]) != patches(rows[learned[0]]):
            raise RuntimeError(f"study rows {learned[0]!r} and {name!r} scored different patches")
    common = set.intersection(*(patches(rows[n]) for n in names))
    for res in rows.values():
        for s in res["slides"]:
            s["patch_rows"] = [r for r in s["patch_rows"] if (r["slide"], r["y"], r["x"]) in common]
    return len(common)


def _summarise_model(label: str, per_seed: list[dict], kind: str, draws: int | None = None) -> dict:
    """Mean and sample sd (ddof = 1) over seeds of WSI numbers; patch numbers pooled over seeds (mean ± sd over patches)."""
    row = {"model": label, "kind": kind, "draws": draws, "seeds": len(per_seed), "regions": {}}
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
            "wsi_ssim": float(ssim.mean()),
            "wsi_ssim_sd": sample_sd(ssim),
            "wsi_psnr": float(psnr.mean()),
            "wsi_psnr_sd": sample_sd(psnr),
            "wsi_ssim_per_seed": ssim.tolist(),
            "wsi_psnr_per_seed": psnr.tolist(),
            "patch_ssim_percent": float(ps.mean()) if len(ps) else math.nan,
            "patch_ssim_percent_sd": sample_sd(ps),
            "patch_psnr": float(pp.mean()) if len(pp) else math.nan,
            "patch_psnr_sd": sample_sd(pp),
            "patches": int(len(ps)) // max(1, len(vals)),
            "multimodal_share": float(np.mean(share)) if share else None,
            "multimodal_share_per_seed": [v["share"] for v in vals] if kind == "learned" else None,
        }
    return row


def markdown_table(rows: list[dict], seeds: int) -> str:
    head = ["model", "draws"]
    for region in ("tissue", *REGIONS.values()):
        head += [f"{region} WSI SSIM", f"{region} WSI PSNR", f"{region} patch SSIM %", f"{region} multi-modal share"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], "–" if r.get("draws") is None else str(r["draws"])]
        for region in ("tissue", *REGIONS.values()):
            g = r["regions"].get(region)
            if g is None:
                cells += ["–"] * 4
                continue
            sd = lambda v: f" ± {v:.3f}" if r["seeds"] > 1 else ""  # noqa: E731 (sd over seeds, ddof = 1)
            cells += [
                f"{g['wsi_ssim']:.4f}{sd(g['wsi_ssim_sd'])}",
                f"{g['wsi_psnr']:.2f}{sd(g['wsi_psnr_sd'])}",
                f"{g['patch_ssim_percent']:.1f} ± {g['patch_ssim_percent_sd']:.1f}",
                "–" if g["multimodal_share"] is None else f"{g['multimodal_share']:.2f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"WSI columns: mean ± sample sd (ddof = 1) over {seeds} training seed(s) (pixel-weighted over held-out slides); patch columns: "
        "mean ± sd over the paper's non-overlapping patches, pooled over seeds; a patch belongs to its majority region. "
        "Multi-modal share: fraction of sampling steps on which the DAMMP gate chose the multi-modal branch."
    )
    return "\n".join(lines)


def gate_table(gate: dict[str, dict]) -> str:
    """The DFL labels the gate was trained on, per run and region (DAMMP phase)."""
    regions = list(dict.fromkeys(name for per in gate.values() for name in per))
    if not regions:
        return "No run logged the gate per region (their patch store had no region labels when they trained)."
    head = ["run"] + [f"{g} {what}" for g in regions for what in ("DFL label rate", "mean κ")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run, per in gate.items():
        cells = [run] + [f"{per[g][k]:.3f}" if g in per else "–" for g in regions for k in ("dfl_label_rate", "mean_kappa")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "DFL label rate: share of training samples on which the multi-modal branch's loss was no larger than the "
        "uni-modal one's — what the divergence feedback loss teaches the gate (1 = always trust nuclei).",
    ]
    return "\n".join(lines)


def sampler_table(rows: list[dict]) -> str:
    ref = max(rows, key=lambda r: (r["sampler"] == "ddim", r["steps"]))  # the paper's sampler, most steps
    lines = [
        f"| sampler | steps | WSI SSIM (tissue) | WSI PSNR (tissue) | SSIM vs {ref['sampler']}-{ref['steps']} | predict wall time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        rel = 100 * (r["wsi_ssim"] - ref["wsi_ssim"]) / ref["wsi_ssim"]
        lines.append(f"| {r['sampler']} | {r['steps']} | {r['wsi_ssim']:.4f} | {r['wsi_psnr']:.2f} | {rel:+.2f} % | {r['seconds']:.1f} |")
    return "\n".join(lines)


def _label(row: dict) -> str:
    return row["model"] if row.get("draws") is None else f"{row['model']}, {row['draws']} draw{'s' if row['draws'] > 1 else ''}"


def gate_points(gated: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of one dot per seed on the gate panel: a seed-mean bar hides a gate that locked into one
    branch for some seeds and not for others, the dots show it. Bars of `gated` rows sit side by side
    around each region's tick; a bar's seeds are spread across its width in seed order."""
    width = 0.8 / max(1, len(gated))
    xs, ys = [], []
    for j, g in enumerate(REGIONS.values()):
        for i, r in enumerate(gated):
            shares = r["regions"].get(g, {}).get("multimodal_share_per_seed") or []
            centre = j + (i - len(gated) / 2 + 0.5) * width
            offsets = np.linspace(-width / 3, width / 3, len(shares)) if len(shares) > 1 else np.zeros(len(shares))
            xs += list(centre + offsets)
            ys += [float(v) for v in shares]
    return np.asarray(xs), np.asarray(ys)


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


def figure(path: Path, rows: list[dict], samplers: list[dict]) -> None:
    """Bars per model and region (seed spread as error bars), gate share, and SSIM vs sampling time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regions = ("tissue", *REGIONS.values())
    fig, axes = plt.subplots(1, 4, figsize=(22, 6.5), gridspec_kw={"width_ratios": [3, 3, 2, 2]})
    width = 0.8 / len(rows)
    xs = np.arange(len(regions))
    colours = plt.cm.tab20(np.arange(len(rows)) % 20)
    for ax, key, title in ((axes[0], "wsi_ssim", "WSI SSIM"), (axes[1], "wsi_psnr", "WSI PSNR (dB)")):
        for i, r in enumerate(rows):
            vals = [r["regions"].get(g, {}).get(key, np.nan) for g in regions]
            err = np.nan_to_num([r["regions"].get(g, {}).get(key + "_sd", 0.0) for g in regions])
            ax.bar(xs + (i - len(rows) / 2 + 0.5) * width, vals, width, yerr=err, capsize=2, label=_label(r), color=colours[i])
        ax.set_xticks(xs, regions)
        ax.set_title(title + " on held-out slides")
        lo = np.nanmin([r["regions"].get(g, {}).get(key, np.nan) for r in rows for g in regions])
        hi = np.nanmax([r["regions"].get(g, {}).get(key, np.nan) for r in rows for g in regions])
        ax.set_ylim(lo - 0.15 * (hi - lo), hi + 0.1 * (hi - lo))
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=min(len(rows), 6), fontsize=9, frameon=False)
    gated = [r for r in rows if r["regions"]["tissue"].get("multimodal_share") is not None and r["kind"] == "learned"]
    for i, r in enumerate(gated):
        axes[2].bar(
            np.arange(2) + (i - len(gated) / 2 + 0.5) * (0.8 / max(1, len(gated))),
            [r["regions"].get(g, {}).get("multimodal_share") or 0 for g in REGIONS.values()],
            0.8 / max(1, len(gated)),
            label=_label(r),
            color=colours[rows.index(r)],
            alpha=0.6,
        )  # the colours of the legend
    xs_dots, ys_dots = gate_points(gated)
    axes[2].scatter(xs_dots, ys_dots, s=14, color="black", zorder=3)
    axes[2].set_xticks(np.arange(2), list(REGIONS.values()))
    axes[2].set_ylim(-0.03, 1.05)
    axes[2].set_title("DAMMP: share of steps on the multi-modal branch\n(bars: mean over seeds; dots: each seed)", fontsize=10)
    for s in samplers:
        axes[3].scatter(s["seconds"], s["wsi_ssim"], s=40)
        axes[3].annotate(
            f"{s['sampler']}-{s['steps']}", (s["seconds"], s["wsi_ssim"]), fontsize=9, xytext=(4, 4), textcoords="offset points"
        )
    axes[3].set_xlabel("predict wall time (s)")
    axes[3].set_ylabel("WSI SSIM (tissue)")
    axes[3].set_title("samplers (DAMM full, seed 0)")
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    runs = _train(data, out, plan, preset, progress, log_step)

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
    for seed in plan.seeds:
        log_step(f"predicting with the regression U-Net, seed {seed}")
        results[f"regression/seed{seed}"] = {
            **_regression(runs["regression", seed], data, out / "predictions" / f"regression_seed{seed}", progress),
            "kind": "regression",
        }
    log_step("blurred-vessel baseline and oracle")
    base = _baseline(data, out / "predictions" / "baseline", tile_cfg, progress)
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
            rows.append(_summarise_model(v.label, per_seed, "learned", draws))
    rows.append(
        _summarise_model(REGRESSION_LABEL, [region_numbers(results[f"regression/seed{seed}"]) for seed in plan.seeds], "regression")
    )
    rows.append(_summarise_model(f"blurred-vessel baseline (σ = {base['sigma_um']:g} µm)", [region_numbers(base)], "reference"))
    rows.append(_summarise_model("oracle (noiseless field)", [region_numbers(base, "oracle_regions", oracle=True)], "reference"))
    for source in SOURCES:
        rows.append(
            _summarise_model(
                f"autoencoder ceiling: decode(encode({source} NP))",
                [region_numbers(results[f"ceiling/{source}/seed{seed}"]) for seed in plan.seeds],
                "ceiling",
            )
        )

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
