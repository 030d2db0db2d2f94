"""The study's numbers: per-region figures of a result, means and sd over seeds, the markdown tables and the figure."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from wsi_damm.evaluation.metrics import psnr_from_mse
from wsi_damm.workflows.simulator import DIVERGENCE_LABELS

REGIONS = DIVERGENCE_LABELS


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


def summarise_model(label: str, per_seed: list[dict], kind: str, draws: int | None = None) -> dict:
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


def row_label(row: dict) -> str:
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
            ax.bar(xs + (i - len(rows) / 2 + 0.5) * width, vals, width, yerr=err, capsize=2, label=row_label(r), color=colours[i])
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
            label=row_label(r),
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
