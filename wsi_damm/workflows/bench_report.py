"""The bench's numbers and what it says: per row the figures over tissue and per region (mean ± sd over seeds,
each seed's held-out slides pooled by tissue pixels), the one-sentence recommendation, the table, the figure
and the HTML page."""

from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np

from wsi_damm.sampling.draws import DEFAULT_INTERVAL, interval_attrs
from wsi_damm.training.autoencoder_check import MIN_CEILING_R, MIN_CEILING_SPREAD
from wsi_damm.workflows.study_tables import sample_sd

FIGURES = ("pearson_r", "spread_ratio", "mean_ratio", "nrmse", "spectral_error", "ssim", "psnr", "coverage", "spread_spearman")
NAMES = {
    "pearson_r": "Pearson's r",
    "spread_ratio": "spread ×",
    "mean_ratio": "mean ×",
    "nrmse": "NRMSE",
    "spectral_error": "spectral error",
    "ssim": "SSIM",
    "psnr": "PSNR (dB)",
    "coverage": "interval coverage",
    "spread_spearman": "spread–error ρ",
}
UNCERTAINTY = {"coverage": ("coverage",), "spread_spearman": ("spread_error", "spearman")}  # where evaluate keeps them
REGION_FIGURES = ("pearson_r", "nrmse", "ssim")


def _lookup(d: dict, path: tuple[str, ...]) -> float:
    for key in path:
        d = d.get(key, {}) if isinstance(d, dict) else {}
    return float(d) if isinstance(d, (int, float)) and d is not None else math.nan


def seed_figures(result: dict) -> dict:
    """One seed's figures over tissue, its held-out slides pooled by tissue pixels; and per region likewise."""
    slides = result["slides"]
    weights = np.array([s["wsi"]["pixels_tissue"] for s in slides], np.float64)

    def mean(values: list[float], w: np.ndarray) -> float:
        v = np.asarray(values, np.float64)
        ok = ~np.isnan(v)
        return float((v[ok] * w[ok]).sum() / w[ok].sum()) if ok.any() and w[ok].sum() > 0 else math.nan

    out = {}
    for key in FIGURES:
        if key in ("spread_ratio", "mean_ratio"):
            vals = [s["check"][key] if s.get("check") else math.nan for s in slides]
        elif key in UNCERTAINTY:  # only maps of several draws have a spread to check
            vals = [_lookup(s.get("uncertainty", {}), UNCERTAINTY[key]) for s in slides]
        else:
            vals = [s["wsi"].get(f"{key}_tissue", math.nan) for s in slides]
        out[key] = mean(vals, weights)
    regions: dict[str, dict] = {}
    for name in sorted({r for s in slides for r in s.get("regions", {})}):
        present = [s["regions"][name] for s in slides if name in s.get("regions", {})]
        w = np.array([g["pixels"] for g in present], np.float64)
        regions[name] = {k: mean([g.get(k, math.nan) for g in present], w) for k in REGION_FIGURES}
    out["regions"] = regions
    return out


def _stats(per_seed: list[dict]) -> dict:
    out = {}
    for key in FIGURES:
        vals = [p[key] for p in per_seed]
        out[key] = {"mean": float(np.nanmean(vals)) if not all(math.isnan(v) for v in vals) else math.nan, "sd": sample_sd(vals)}
    out["per_seed"] = {key: [p[key] for p in per_seed] for key in FIGURES}
    names = sorted({r for p in per_seed for r in p["regions"]})
    out["regions"] = {
        name: {k: {"mean": float(np.nanmean([p["regions"].get(name, {}).get(k, math.nan) for p in per_seed]))} for k in REGION_FIGURES}
        for name in names
    }
    return out


def figure_row(label: str, key: str, kind: str, per_seed: list[dict]) -> dict:
    """A row of the table from one scored result per seed (a deterministic reference: one)."""
    figures = [seed_figures(r) for r in per_seed]
    return {"model": label, "key": key, "kind": kind, "seeds": len(figures), **_stats(figures)}


def learned_rows(results: dict[str, dict], variants, plan) -> list[dict]:
    """The trained models' rows, the bench's and the study's alike: each variant at one draw and the mean of K, then
    the regression U-Net."""
    rows = [
        figure_row(
            f"{v.label}, {'1 draw' if k == 1 else f'mean of {k} draws'}",
            f"{v.name}/k{k}",
            "learned",
            [results[f"{v.name}/k{k}/seed{s}"] for s in plan.seeds],
        )
        for v in variants
        for k in dict.fromkeys((1, plan.samples))
    ]
    rows.append(figure_row("regression U-Net (L1)", "regression", "regression", [results[f"regression/seed{s}"] for s in plan.seeds]))
    return rows


def summarise(results: dict[str, dict], variants, plan) -> list[dict]:
    """The bench's rows, in the order of the table."""
    rows = learned_rows(results, variants, plan)
    base = results["baseline"]
    label = f"blurred-vessel baseline (σ = {base['sigma_um']:g} µm, fitted on the training slides)"
    rows.append(figure_row(label, "baseline", "reference", [base]))
    const = results["constant"]
    rows.append(figure_row(f"constant (the training target's mean, {const['value']:.3f})", "constant", "reference", [const]))
    return rows


MEAN_TOLERANCE = 0.25  # a map whose mean is further than this from the measured one's (as a ratio) misstates amounts


def _mean_ratio(row: dict) -> float:
    return row.get("mean_ratio", {}).get("mean", math.nan)


def _amounts(best: dict, candidates: list[dict]) -> str:
    """A clause for when the best-correlated map misstates the amount: r ranks where signal is, not how much; and the
    best-correlated map whose mean is within MEAN_TOLERANCE of the measured, if another is."""
    m = _mean_ratio(best)
    if math.isnan(m) or abs(m - 1) <= MEAN_TOLERANCE:
        return ""
    text = f"; but its mean is {m:.2f}× the measured one's: it shows where the signal is, not how much"
    level = [r for r in candidates if r is not best and abs(_mean_ratio(r) - 1) <= MEAN_TOLERANCE]
    if level:
        other = max(level, key=lambda r: r["pearson_r"]["mean"])
        text += f" — for amounts use {other['model']} (r {other['pearson_r']['mean']:.3f}, mean {_mean_ratio(other):.2f}×)"
    return text


def recommend(rows: list[dict]) -> str:
    """Which map to use, by Pearson's r with the measured channel (on a sparse stain SSIM rewards a dark map), and by
    how much it leads the next one: the difference per seed (a deterministic reference counts the same in every seed)
    with its sd over seeds; a lead within that sd is said to be none. When that map's mean is off the measured one's
    by more than MEAN_TOLERANCE, the sentence says so and names the best map whose mean is not."""
    candidates = [r for r in rows if r["key"] != "constant" and not math.isnan(r["pearson_r"]["mean"])]
    if not candidates:
        return "No map could be scored on these slides."
    ranked = sorted(candidates, key=lambda r: r["pearson_r"]["mean"], reverse=True)
    best, second = ranked[0], ranked[1] if len(ranked) > 1 else None
    r = best["pearson_r"]
    text = f"On these slides, use {best['model']}: Pearson's r {r['mean']:.3f}" + (
        f" ± {r['sd']:.3f} over {best['seeds']} seeds" if not math.isnan(r["sd"]) else ""
    )
    text += f", its map spreading {best['spread_ratio']['mean']:.2f}× the measured channel's"
    amounts = _amounts(best, candidates)
    if second is None:
        return text + amounts + "."
    a, b = best["per_seed"]["pearson_r"], second["per_seed"]["pearson_r"]
    n = max(len(a), len(b))
    diffs = [a[i % len(a)] - b[i % len(b)] for i in range(n)]
    d, sd = float(np.mean(diffs)), sample_sd(diffs)
    lead = f"ahead of {second['model']} ({second['pearson_r']['mean']:.3f}) by {d:.3f}" + (f" ± {sd:.3f}" if not math.isnan(sd) else "")
    if not math.isnan(sd) and d <= sd:
        return text + f"; {lead}, which is within the seeds' spread: treat the two as level{amounts}."
    return text + f"; {lead}{amounts}."


def _cell(v: dict, digits: int = 3) -> str:
    if math.isnan(v["mean"]):
        return "–"
    return f"{v['mean']:.{digits}f}" + (f" ± {v['sd']:.{digits}f}" if not math.isnan(v.get("sd", math.nan)) else "")


def markdown(summary: dict) -> str:
    rows = summary["rows"]
    lines = [
        "| map | seeds | " + " | ".join(NAMES[k] for k in FIGURES) + " |",
        "|---|---|" + "---|" * len(FIGURES),
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['seeds']} | " + " | ".join(_cell(r[k], 2 if k == "psnr" else 3) for k in FIGURES) + " |")
    k = summary["plan"]["samples"]
    if k > 1:
        lines += [
            "",
            f"Interval coverage: the share of tissue pixels whose measured value lies inside the central interval of the {k} "
            f"draws, nominally {100 * interval_attrs(k, DEFAULT_INTERVAL)['nominal']:.0f} % when the draws are honest; "
            "spread–error ρ: Spearman's rank "
            "correlation of a patch's spread over the draws and its error.",
        ]
    regions = sorted({name for r in rows for name in r["regions"]})
    if regions:
        lines += ["", "Per region (mean over seeds): " + ", ".join(f"{NAMES[k]}" for k in REGION_FIGURES), ""]
        lines += ["| map | " + " | ".join(regions) + " |", "|---|" + "---|" * len(regions)]
        for r in rows:
            cells = [
                " / ".join(f"{r['regions'].get(g, {}).get(k, {'mean': math.nan})['mean']:.3f}" for k in REGION_FIGURES) for g in regions
            ]
            lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("pearson_r", "spread_ratio", "nrmse", "spectral_error", "ssim")
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 0.45 * len(rows) + 1.5), sharey=True)
    ys = np.arange(len(rows))
    colours = {"learned": "#1f77b4", "regression": "#ff7f0e", "reference": "#7f7f7f"}
    for ax, key in zip(axes, keys):
        means = [r[key]["mean"] for r in rows]
        err = [0 if math.isnan(r[key]["sd"]) else r[key]["sd"] for r in rows]
        ax.barh(ys, means, xerr=err, color=[colours[r["kind"]] for r in rows], capsize=2)
        ax.set(title=NAMES[key])
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(ys, [r["model"] for r in rows], fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle("Bench on the held-out slides, over tissue (bars: mean over seeds; whiskers: sd)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def collapsed_autoencoders(ceilings: dict) -> str:
    """One sentence naming the autoencoders that collapsed in training, per channel with their seeds and Pearson's r
    (empty when none did): the DAMM rows of those seeds are what diffusion on flat latents draws."""
    hit: dict[str, list[tuple[str, float]]] = {}
    for seed, c in ceilings.items():
        for role in c["collapsed"]:
            hit.setdefault(role, []).append((seed.removeprefix("seed"), c["roles"][role]["pearson_r"]))
    if not hit:
        return ""
    parts = [
        f"the {role} autoencoder of seed{'s' if len(v) > 1 else ''} {', '.join(s for s, _ in v)} (r {', '.join(f'{r:.2f}' for _, r in v)})"
        for role, v in hit.items()
    ]
    return (
        f"Collapsed in training (decode(encode(x)) against x: r < {MIN_CEILING_R} or spread < {MIN_CEILING_SPREAD}×): {'; '.join(parts)}; "
        "the DAMM rows of those seeds are what diffusion on such latents draws."
    )


def write_outputs(out: Path, summary: dict) -> None:
    """bench.md, bench.png and bench.html beside bench.json."""
    table = markdown(summary)
    plan = summary["plan"]
    head = (
        f"Trained on {len(summary['train'])} slide(s), scored on {', '.join(summary['heldout'])} over tissue "
        f"({summary['scored_patches']} patches, the same pixels for every row); {len(plan['seeds'])} seed(s), "
        f"{plan['ae_steps']} autoencoder and {plan['steps']} training steps, DPM++ {plan['sample_steps']} steps; "
        f"{summary['seconds']:.0f} s of work."
    )
    collapsed = collapsed_autoencoders(summary.get("autoencoders", {}))
    if collapsed:
        head += " " + collapsed
    (out / "bench.md").write_text(
        f"# Bench\n\n{head}\n\n**{summary['recommendation']}**\n\n{table}\n\n![bench](bench.png)\n", encoding="utf-8"
    )
    figure(out / "bench.png", summary["rows"])
    rows_html = "".join(
        "<tr><td>"
        + html.escape(r["model"])
        + f"</td><td>{r['seeds']}</td>"
        + "".join(f"<td>{html.escape(_cell(r[k], 2 if k == 'psnr' else 3))}</td>" for k in FIGURES)
        + "</tr>"
        for r in summary["rows"]
    )
    (out / "bench.html").write_text(
        "<!doctype html><meta charset='utf-8'><title>wsi-damm bench</title>"
        "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto}td,th{padding:3px 8px;border-bottom:1px solid #ddd}</style>"
        f"<h1>Which map to use on these slides</h1><p><b>{html.escape(summary['recommendation'])}</b></p><p>{html.escape(head)}</p>"
        "<p>Read Pearson's r and the map's spread against the measured channel's first: on a sparse stain SSIM rewards a dark "
        "map. NRMSE: RMSE over the measured sd (1 = a constant map); spectral error: 0 = the measured texture.</p>"
        "<table><tr><th>map</th><th>seeds</th>"
        + "".join(f"<th>{html.escape(NAMES[k])}</th>" for k in FIGURES)
        + f"</tr>{rows_html}</table><p><img src='bench.png' style='max-width:100%'></p>",
        encoding="utf-8",
    )
