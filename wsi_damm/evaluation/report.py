"""Figures and the self-contained HTML report of `wsi-damm evaluate`, drawn from what evaluation
hands over (its metrics, patch rows, and each slide's map and measured slide); computes no score."""

from __future__ import annotations

import base64
import html
import math
import shutil
import textwrap
from pathlib import Path

import matplotlib
import numpy as np
from skimage.transform import resize

from wsi_damm.evaluation.reliability import reliability_figure, uncertainty_html
from wsi_damm.evaluation.truth import SlideEvaluation, Truth
from wsi_damm.evaluation.viewer import LAYERS, write_viewer
from wsi_damm.stitching.slide_map import COVERAGE, DIVERGENCE, MapImage
from wsi_damm.tiling.grid import low_resolution, unit_range
from wsi_damm.tiling.qc import pictures_of_map

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from mpl_toolkits.axes_grid1 import make_axes_locatable  # noqa: E402

THUMB = 1024
LAYER_STYLE = {layer.key: layer for layer in LAYERS}  # one colour scale per layer, figures and viewer alike


def _scale_bar(ax, um_per_px: float | None, width_px: int) -> None:
    if not um_per_px:
        ax.text(0.02, 0.03, "scale unknown (no µm/px)", transform=ax.transAxes, color="w", fontsize=7)
        return
    target = width_px * um_per_px / 5
    nice = 10 ** math.floor(math.log10(target))
    for m in (5, 2, 1):
        if m * nice <= target:
            nice *= m
            break
    length = nice / um_per_px
    x0, y0 = 0.04 * width_px, 0.94
    ax.plot([x0, x0 + length], [y0, y0], transform=ax.get_xaxis_transform(), color="white", lw=3, solid_capstyle="butt")
    label = f"{nice / 1000:g} mm" if nice >= 1000 else f"{nice:g} µm"
    ax.text(x0 + length / 2, 0.89, label, transform=ax.get_xaxis_transform(), color="white", ha="center", va="top", fontsize=8)


def _panel(fig, ax, img, title, cmap, vmin, vmax, um_per_px, cbar_label):
    cmap = plt.get_cmap(cmap).with_extremes(bad="0.12")  # outside the predicted tissue: dark grey, so white labels stay legible
    im = ax.imshow(img, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    _scale_bar(ax, um_per_px, img.shape[1])
    cax = make_axes_locatable(ax).append_axes("right", size="4%", pad=0.04)
    cb = fig.colorbar(im, cax=cax)
    cb.set_label(cbar_label, fontsize=8)
    cb.ax.tick_params(labelsize=7)


def divergence_panel(div: np.ndarray, m: MapImage) -> tuple[np.ndarray, str]:
    """The overview's divergence picture and title. A map without a gate (the baseline, the regression
    U-Net, an autoencoder ceiling) stores zeros there, which are no divergence: it is left blank."""
    if m.gamma is None:
        return np.full_like(div, np.nan), "divergence: none (this map has no gate)"
    return div, "divergence d = 1 − mean κ" if m.nuclei else "divergence: uni-modal only"


def overview(path: Path, m: MapImage, truth: Truth, result: dict) -> None:
    """CD31, DAPI, measured NP, predicted NP, |error| and divergence on one field of view."""
    level = next((lv for lv in m.levels if max(lv.shape[1:]) <= THUMB * 1.5), m.levels[-1])
    h, w = truth.shape
    fy = level.shape[1] / m.level0.shape[1]
    th, tw = max(1, round(h * fy)), max(1, round(w * fy))
    pred = np.asarray(level[0, :th, :tw]).astype(np.float32)
    pm = m.patch_maps_like((th, tw), level.shape[1:])
    low, _ = low_resolution(truth.slide, max(th, tw))
    plan = truth.plan
    chans = {}
    for k, role in enumerate(plan.spec.roles):
        raw = resize(low[k], (th, tw), order=1, anti_aliasing=True, preserve_range=True)
        chans[role] = unit_range(raw, plan.lo[k], plan.hi[k])
    um = m.mpp / fy if m.mpp else None
    covered = pm[COVERAGE] > 0.5
    err = np.where(covered, np.abs(pred - chans["target"]), np.nan)
    div = np.where(covered, pm[DIVERGENCE], np.nan)
    fig, axes = plt.subplots(2, 3, figsize=(15, 9.5))
    blank = np.zeros((th, tw))
    scale = lambda key: (LAYER_STYLE[key].cmap, LAYER_STYLE[key].vmin, LAYER_STYLE[key].vmax)  # noqa: E731 - the viewer's colour scales
    _panel(fig, axes[0, 0], chans.get("vessels", blank), "CD31 (vessels)", *scale("vessels"), um, "normalised intensity")
    _panel(
        fig,
        axes[0, 1],
        chans.get("nuclei", blank),
        "DAPI (nuclei)" if "nuclei" in chans else "DAPI: not in slide",
        *scale("nuclei"),
        um,
        "normalised intensity",
    )
    _panel(fig, axes[0, 2], chans["target"], "NP measured", *scale("measured"), um, "normalised NP")
    _panel(fig, axes[1, 0], pred, "NP predicted", *scale("predicted"), um, "normalised NP")
    _panel(fig, axes[1, 1], err, "|predicted − measured|", *scale("error"), um, "absolute error")
    _panel(fig, axes[1, 2], *divergence_panel(div, m), *scale("divergence"), um, "d (gate uses uni-modal where d ≥ γ)")
    wsi, check = result["wsi"], result.get("check") or {}
    where = "tissue" if "ssim_tissue" in wsi else "whole slide"
    key = (lambda k: f"{k}_tissue") if "ssim_tissue" in wsi else (lambda k: k)  # noqa: E731
    title = (
        f"{m.slide_id} — {where}: Pearson's r {wsi[key('pearson_r')]:.3f}, spread {check.get('spread_ratio', float('nan')):.2f}× "
        f"the measured, PSNR {wsi[key('psnr')]:.2f} dB, SSIM {wsi[key('ssim')]:.3f}"
    )
    if check.get("warning"):
        title += "\n" + textwrap.fill(f"WARNING: {check['warning']}", 130)
    fig.suptitle(title, fontsize=13, color="firebrick" if check.get("warning") else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def zoom(path: Path, m: MapImage, truth: Truth, rows: list[dict]) -> None:
    """Full-resolution crops of the best, median and worst patches by SSIM."""
    if not rows:
        return
    ranked = sorted(rows, key=lambda r: r["ssim"])
    picks = [("best", ranked[-1]), ("median", ranked[len(ranked) // 2]), ("worst", ranked[0])]
    p = m.patch_size
    roles = truth.plan.spec.roles
    cols = [r for r in ("vessels", "nuclei") if r in roles] + ["target", "pred", "error"]
    names = {"vessels": "CD31", "nuclei": "DAPI", "target": "NP measured", "pred": "NP predicted", "error": "|error|"}
    fig, axes = plt.subplots(3, len(cols), figsize=(3.1 * len(cols), 9.6), squeeze=False)
    for i, (label, r) in enumerate(picks):
        y, x = r["y"], r["x"]
        imgs = {role: truth.normalised(role, y, x, p, p) for role in roles}
        imgs["pred"] = np.asarray(m.level0[0, y : y + p, x : x + p])
        imgs["error"] = np.abs(imgs["pred"] - imgs["target"])
        for j, c in enumerate(cols):
            ax = axes[i, j]
            cmap = {"vessels": "magma", "nuclei": "Blues_r", "error": "inferno"}.get(c, "viridis")
            ax.imshow(imgs[c], cmap=cmap, vmin=0, vmax=0.5 if c == "error" else 1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(names[c], fontsize=10)
            if j == 0:
                ax.set_ylabel(f"{label}\nSSIM {r['ssim']:.3f}\nPSNR {r['psnr']:.1f} dB\n(y={y}, x={x})", fontsize=9)
            _scale_bar(ax, m.mpp, p)
    fig.suptitle(f"{m.slide_id}: best, median and worst {p}-px patches (full resolution)", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def histograms(path: Path, rows: list[dict]) -> None:
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    ssim_v = [100 * r["ssim"] for r in rows]
    psnr_v = [r["psnr"] for r in rows if math.isfinite(r["psnr"])]
    for ax, vals, label in ((a1, ssim_v, "SSIM (%)"), (a2, psnr_v, "PSNR (dB)")):
        if vals:
            ax.hist(vals, bins=30, color="#4477aa", edgecolor="white")
            ax.axvline(np.mean(vals), color="k", ls="--", label=f"mean {np.mean(vals):.2f} ± {np.std(vals):.2f}")
            ax.legend(fontsize=9)
        ax.set(xlabel=label, ylabel="patches", title=f"Per-patch {label} (n = {len(vals)})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def divergence_scatter(path: Path, rows: list[dict], gamma: float | None) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 5))
    usable = [r for r in rows if math.isfinite(r["divergence"])]
    if usable:
        sc = ax.scatter(
            [r["divergence"] for r in usable],
            [r["mae"] for r in usable],
            c=[r["multimodal_share"] for r in usable],
            cmap="viridis",
            vmin=0,
            vmax=1,
            s=12,
            alpha=0.8,
        )
        fig.colorbar(sc, ax=ax, label="share of steps on the multi-modal branch")
        if gamma is not None:
            ax.axvline(gamma, color="r", ls=":", label=f"γ = {gamma:g}: uni-modal at or above")
            ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no divergence: uni-modal prediction (no nuclei)", ha="center", transform=ax.transAxes)
    ax.set(
        xlabel="mean divergence d of the patch", ylabel="mean |predicted − measured|", title="Where the gate doubted fusion, and the error"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "∞" if v == math.inf else ("n/a" if not math.isfinite(v) else f"{v:.4g}")
    return html.escape(str(v))


def html_report(path: Path, metrics: dict, figures: list[Path], viewers: list[dict] = ()) -> None:
    """One offline page: headline numbers, per-slide tables, every figure embedded, links to the viewers."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>wsi-damm evaluation</title>",
        "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}th{background:#f3f3f3}img{max-width:100%;margin:1em 0}"
        ".note{color:#666;font-size:90%}</style></head><body><h1>NP distribution prediction — evaluation</h1>",
    ]
    percentiles = sorted({tuple(r["normalisation"]["percentiles"]) for r in metrics["slides"]})
    rule = " or ".join(f"{lo:g} / {hi:g}" for lo, hi in percentiles)
    parts.append(
        "<p><b>Read Pearson's r and the map's spread first.</b> On a sparse target (a stain that marks a few per cent "
        "of the pixels) SSIM and PSNR reward a black map, because both images agree wherever both are near zero; "
        "Pearson's r and the ratio of the map's spread to the measured channel's do not.</p>"
    )
    parts.append(
        "<p class='note'>SSIM: Gaussian window σ = 1.5 (11 × 11), K1 = 0.01, K2 = 0.03, 5-px border excluded — "
        "the definition of scikit-image. PSNR = 10·log10(1 / MSE) on maps normalised to [0, 1] by the slide's "
        f"{html.escape(rule)} percentiles over tissue. Patch protocol: non-overlapping patches with ≥ 50 % tissue (paper Tab. 1).</p>"
    )
    pages = {v["page"].removeprefix("viewer_").removesuffix(".html"): v for v in viewers}
    for r in metrics["slides"]:
        wsi = r["wsi"]
        parts.append(f"<h2>{html.escape(r['slide'])}</h2>")
        if r["slide"] in pages:
            v = pages[r["slide"]]
            parts.append(
                f"<p><a href='{html.escape(v['page'])}'><b>Open the deep-zoom viewer</b></a>: {len(v['layers'])} layers "
                f"({html.escape(', '.join(v['layers']))}) side by side with linked pan and zoom, or overlaid; full resolution "
                "to the whole slide. Opens from disk, no server needed.</p>"
            )
        check = r.get("check")
        if check:
            if check.get("warning"):
                parts.append(f"<p style='color:#b22222'><b>Warning: {html.escape(check['warning'])}.</b></p>")
            parts.append(
                f"<p>Headline ({'tissue' if 'ssim_tissue' in wsi else 'whole slide'}): Pearson's r with the measured channel "
                f"<b>{_fmt(check['pearson_r'])}</b>, the map's spread <b>{_fmt(check['spread_ratio'])}×</b> and its mean "
                f"<b>{_fmt(check['mean_ratio'])}×</b> the measured channel's.</p>"
            )
        ceiling = r.get("autoencoder_ceiling")
        if ceiling:
            style = " style='color:#b22222'" if ceiling["collapsed"] else ""
            parts.append(
                f"<p{style}>The run's target autoencoder reconstructs its {html.escape(ceiling['measured_on'])} "
                f"with Pearson's r {_fmt(ceiling['pearson_r'])}, {_fmt(ceiling['spread_ratio'])}× "
                f"their spread and {_fmt(ceiling['mean_ratio'])}× their mean — the best any map of this run can be"
                + (" (<b>collapsed</b>: this map cannot be better than a flat image)" if ceiling["collapsed"] else "")
                + ".</p>"
            )
        if r.get("uni_modal_only"):
            parts.append("<p><b>Uni-modal prediction:</b> the slide had no nuclei channel; only the vessels branch was used.</p>")
        parts.append(
            "<table><tr><th></th><th>Pearson's r</th><th>mean (map / measured)</th><th>sd (map / measured)</th>"
            "<th>NRMSE (÷ measured sd)</th><th>spectral error</th><th>SSIM</th><th>PSNR (dB)</th><th>pixels</th></tr>"
        )

        def moments(sfx: str) -> str:
            get = lambda k: _fmt(wsi.get(k + sfx))  # noqa: E731
            return (
                f"<td>{get('pearson_r')}</td><td>{get('mean')} / {get('mean_measured')}</td><td>{get('sd')} / {get('sd_measured')}</td>"
                f"<td>{get('nrmse')}</td><td>{get('spectral_error')}</td>"
            )

        parts.append(
            f"<tr><th>whole slide</th>{moments('')}<td>{_fmt(wsi['ssim'])}</td><td>{_fmt(wsi['psnr'])}</td><td>{wsi['pixels']}</td></tr>"
        )
        if "ssim_tissue" in wsi:
            parts.append(
                f"<tr><th>tissue only</th>{moments('_tissue')}<td>{_fmt(wsi['ssim_tissue'])}</td>"
                f"<td>{_fmt(wsi['psnr_tissue'])}</td><td>{wsi['pixels_tissue']}</td></tr>"
            )
        pp = r["patches"]
        parts.append(
            f"<tr><th>patches ({pp['ssim_percent']['n']})</th>{'<td></td>' * 5}"
            f"<td>{_fmt(pp['ssim_percent']['mean'])} ± {_fmt(pp['ssim_percent']['sd'])} %</td>"
            f"<td>{_fmt(pp['psnr']['mean'])} ± {_fmt(pp['psnr']['sd'])}</td><td></td></tr>"
        )
        if "oracle_wsi" in r:
            o = r["oracle_wsi"]
            parts.append(
                f"<tr><th>oracle (noiseless field), whole slide</th><td>{_fmt(o.get('pearson_r'))}</td><td></td><td></td>"
                f"<td>{_fmt(o.get('nrmse'))}</td><td>{_fmt(o.get('spectral_error'))}</td>"
                f"<td>{_fmt(o['ssim'])}</td><td>{_fmt(o['psnr'])}</td><td></td></tr>"
            )
        parts.append("</table>")
        parts.append(
            "<p>NRMSE is the RMSE over the measured channel's spread (1 = what a constant map at the measured mean scores). "
            "Spectral error: the mean |log10| ratio of the map's radially averaged power to the measured channel's over eight "
            "frequency bands (0 = the same texture at every scale; 0.3 ≈ a factor of two; per band in metrics.json): a map "
            "too smooth or too noisy shows here, not in SSIM.</p>"
        )
        if "uncertainty" in r:
            parts.append(uncertainty_html(r["uncertainty"], _fmt))
        seams = r.get("seams") or {}
        if seams:
            parts.append(
                f"<p>Seam score at the {seams['stride']}-px patch stride (worst phase's mean adjacent-pixel difference over the "
                f"median phase's; 1 = no grid): map <b>{_fmt(seams['map'])}</b>, measured NP {_fmt(seams['measured'])}"
                + (f" ({html.escape(r['sampling'])} sampling)" if r.get("sampling") else "")
                + ".</p>"
            )
        if "regions" in r:
            parts.append(
                "<table><tr><th>region</th><th>pixels</th><th>SSIM</th><th>PSNR (dB)</th><th>patch SSIM (%)</th>"
                "<th>patch PSNR (dB)</th><th>multi-modal share</th></tr>"
            )
            for name, g in r["regions"].items():
                ps, pp = g["patches"]["ssim_percent"], g["patches"]["psnr"]
                parts.append(
                    f"<tr><th>{html.escape(name)}</th><td>{g['pixels']}</td><td>{_fmt(g['ssim'])}</td><td>{_fmt(g['psnr'])}</td>"
                    f"<td>{_fmt(ps['mean'])} ± {_fmt(ps['sd'])} (n={ps['n']})</td><td>{_fmt(pp['mean'])} ± {_fmt(pp['sd'])}</td>"
                    f"<td>{_fmt(g['multimodal_share'])}</td></tr>"
                )
            parts.append("</table>")
    if len(metrics["slides"]) > 1:
        pw = metrics["pooled"]
        parts.append(
            f"<h2>Pooled over {pw['slides']} slides</h2><p>WSI SSIM {_fmt(pw['wsi']['ssim'])}, PSNR {_fmt(pw['wsi']['psnr'])} dB; "
            f"patches SSIM {_fmt(pw['patches']['ssim_percent']['mean'])} ± {_fmt(pw['patches']['ssim_percent']['sd'])} %, "
            f"PSNR {_fmt(pw['patches']['psnr']['mean'])} ± {_fmt(pw['patches']['psnr']['sd'])} dB</p>"
        )
    for fig in figures:
        if fig.exists():
            data = base64.b64encode(fig.read_bytes()).decode()
            parts.append(f"<h3>{html.escape(fig.stem)}</h3><img alt='{html.escape(fig.stem)}' src='data:image/png;base64,{data}'>")
    parts.append(f"<p class='note'>versions: {html.escape(str(metrics.get('versions', {})))}</p></body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")


def write_report(out: Path, metrics: dict, evaluated: list[SlideEvaluation], viewer: bool = True) -> list[Path]:
    """overview and zoom figures per slide, patch histograms, divergence scatter, `report.html` (every
    figure embedded) and, with `viewer`, a deep-zoom comparison page per slide, in `out`; returns the figures."""
    out = Path(out)
    figures = []
    viewers = [write_viewer(out, e.map, e.truth) for e in evaluated] if viewer else []
    for e in evaluated:
        suffix = "" if len(evaluated) == 1 else f"_{e.map.slide_id}"
        overview(out / f"overview{suffix}.png", e.map, e.truth, e.result)
        zoom(out / f"zoom{suffix}.png", e.map, e.truth, e.rows)
        figures += [out / f"overview{suffix}.png", out / f"zoom{suffix}.png"]
        for picture in pictures_of_map(e.map.path, e.map.slide_id):  # what was tiled, what stitch wrote
            copy = out / f"qc_{e.map.slide_id}_{picture.name}"
            shutil.copyfile(picture, copy)
            figures.append(copy)
    rows = [r for e in evaluated for r in e.rows]
    histograms(out / "metrics_hist.png", rows)
    gammas = {e.result.get("gamma") for e in evaluated} - {None}
    divergence_scatter(out / "divergence_vs_error.png", rows, gammas.pop() if len(gammas) == 1 else None)
    figures += [out / "metrics_hist.png", out / "divergence_vs_error.png"]
    if (picture := reliability_figure(out / "reliability.png", [e.result for e in evaluated])) is not None:
        figures.append(picture)
    html_report(out / "report.html", metrics, figures, viewers)
    return figures
