"""`wsi-damm evaluate` / `wsi-damm compare`: measured NP channel vs predicted whole-slide map.

The measured channel is normalised by the rule training used (the slide's percentiles over
tissue, at the map's resolution), read lazily block by block; the map is read from its OME-Zarr.
WSI-level SSIM/PSNR are streamed (`metrics.whole_slide_metrics`); the paper's patch protocol
(Tab. 1: non-overlapping patches) runs band by band. Memory is bounded by bands and chunks.
This module computes and writes numbers (`metrics.json`, `patches.csv`); `report` draws them.
"""

from __future__ import annotations

import math
from importlib.metadata import version
from pathlib import Path

import dask.array as da
import numpy as np
import zarr

from wsi_damm.evaluation.intervals import calibration_check, coverage, interval_summary
from wsi_damm.evaluation.metrics import map_check, psnr, psnr_from_mse, seam_score, seam_sums, ssim, whole_slide_metrics
from wsi_damm.evaluation.report import write_report
from wsi_damm.evaluation.truth import Companion, GeoJSONRegions, ReopensSlide, SlideEvaluation, Truth, load_truth, open_regions  # noqa: F401 (re-exported)
from wsi_damm.slides import SlideSpec, open_file
from wsi_damm.stitching.slide_map import COVERAGE, DIVERGENCE, HIGH, LOW, MEAN, SD, SHARE, MapImage, open_map
from wsi_damm.tiling.grid import LAZY_BLOCK as BLOCK
from wsi_damm.tiling.grid import lazy_blocks, tissue_fractions
from wsi_damm.tiling.np_units import MEASURED_UNIT, NpScale
from wsi_damm.util.errors import InputError
from wsi_damm.util.files import read_json, write_csv, write_json
from wsi_damm.util.jobs import compute_scheduler
from wsi_damm.util.progress import progress_bar

PATCH_FIELDS = ["slide", "y", "x", "ssim", "psnr", "mae", "rmse", "spread", "divergence", "multimodal_share", "oracle_ssim", "oracle_psnr"]


def _patch_protocol(m: MapImage, truth: Truth, clean: Companion | None, regions: Companion | None, progress: bool) -> list[dict]:
    """SSIM / PSNR per non-overlapping patch with ≥ 50 % tissue and full prediction coverage; with draws, the
    patch's spread (RMS of the draws' sd) beside its RMSE."""
    p = m.patch_size
    h, w = truth.shape
    ys = np.arange(0, h - p + 1, p)
    xs = np.arange(0, w - p + 1, p)
    frac = tissue_fractions(truth.plan.mask, truth.plan.mask_downsample / truth.plan.choice.downsample, ys, xs, p)
    rows = []
    for i, y in enumerate(progress_bar(ys, desc="patch protocol", unit="row", disable=None if progress else True)):
        keep = np.nonzero(frac[i] >= 0.5)[0]
        if not len(keep):
            continue
        bands = np.asarray(m.level0[: SD + 1 if m.interval else 1, y : y + p, :w])
        band = bands[MEAN]
        blocks = m.blocks(int(y), 0, p, w)
        meas = truth.normalised("target", int(y), 0, p, w)
        ref = clean.normalised(int(y), 0, p, w) if clean else None
        labels = regions.labels(int(y), 0, p, w) if regions else None
        for j in keep:
            x = int(xs[j])
            sl = np.s_[:, x : x + p]
            near = blocks[:, :, x // m.block : -(-(x + p) // m.block)]  # the blocks this patch touches
            if near[COVERAGE].min() < 1:  # not fully predicted
                continue
            pred, truth_p = band[sl], meas[sl]
            row = {
                "slide": m.slide_id,
                "y": int(y),
                "x": x,
                "ssim": ssim(pred, truth_p),
                "psnr": psnr(pred, truth_p),
                "mae": float(np.abs(pred - truth_p).mean()),
                "rmse": float(np.sqrt(((pred.astype(np.float64) - truth_p) ** 2).mean())),
                "divergence": float(near[DIVERGENCE].mean()),
                "multimodal_share": float(near[SHARE].mean()),
            }
            if m.interval:
                row["spread"] = float(np.sqrt((bands[SD][sl].astype(np.float64) ** 2).mean()))
            if ref is not None:
                row["oracle_ssim"] = ssim(ref[sl], truth_p)
                row["oracle_psnr"] = psnr(ref[sl], truth_p)
            if labels is not None:
                row["region"] = int(np.bincount(labels[sl].ravel().clip(0)).argmax())  # the patch's majority label
            rows.append(row)
    return rows


def seam_numbers(m: MapImage, truth: Truth, progress: bool) -> dict:
    """Seam score (`metrics.seam_score`) of the map and of the measured channel over the map's
    covered pixels, at the map's patch stride, streamed in bands of rows."""
    if not m.stride:
        return {}
    h, w = truth.shape
    sums = {"map": np.zeros((2, m.stride)), "measured": np.zeros((2, m.stride))}
    last = None
    for y in progress_bar(range(0, h, BLOCK), desc="seam score", unit="band", disable=None if progress else True):
        y1 = min(h, y + BLOCK)
        bands = {"map": np.asarray(m.level0[0, y:y1, :w]).astype(np.float64), "measured": truth.normalised("target", y, 0, y1 - y, w)}
        covered = m.covered(y, 0, y1 - y, w)
        for name, band in bands.items():
            sums[name] += seam_sums(band, covered, m.stride, y)
            if last is not None:  # the pairs across the band edge
                sums[name] += seam_sums(
                    np.stack([last[name], band[0]]), np.stack([last["covered"], covered[0]]), m.stride, y - 1, axes=(0,)
                )
        last = {**{name: band[-1] for name, band in bands.items()}, "covered": covered[-1]}
    return {
        "stride": m.stride,
        "map": seam_score(sums["map"]),
        "measured": seam_score(sums["measured"]),
        "pairs": int(sums["map"][1].sum()),
    }


def measured_units(pred: da.Array, truth: Truth, mask: da.Array | None, covered: da.Array | None, scale: NpScale, scheduler) -> dict:
    """The map read back in measured NP intensity (`np_units`) beside the measured channel, over the
    predicted tissue: mean intensities, their ratio (the uptake comparison across slides) and the MAE.
    With per-slide normalisation the map has no common unit, and this says so."""
    if not scale.comparable:
        return {"comparable": False, "note": "NP normalised per slide: map values do not share a unit across slides"}
    where = (mask & covered) if mask is not None else da.ones(truth.shape, bool, chunks=BLOCK)
    meas = lazy_blocks(lambda y, x, h, w: truth.raw("target", y, x, h, w), truth.shape, "truth-raw-target", np.float64)
    pred_m = scale.to_measured(pred)
    n, s_pred, s_meas, s_abs = da.compute(
        where.sum(),
        da.where(where, pred_m, 0).sum(),
        da.where(where, meas, 0).sum(),
        da.where(where, abs(pred_m - meas), 0).sum(),
        scheduler=scheduler,
    )
    if not n:
        return {"comparable": True, "pixels": 0}
    mean_pred, mean_meas = float(s_pred / n), float(s_meas / n)
    return {
        "comparable": True,
        "unit": MEASURED_UNIT,
        "range": [scale.low, scale.high],
        "pixels": int(n),
        "mean_predicted": mean_pred,
        "mean_measured": mean_meas,
        "ratio_predicted_to_measured": mean_pred / mean_meas if mean_meas else math.nan,
        "mae": float(s_abs / n),
    }


def summarise(values: list[float]) -> dict:
    finite = [v for v in values if math.isfinite(v)]
    return {
        "mean": float(np.mean(finite)) if finite else math.nan,
        "sd": float(np.std(finite)) if finite else math.nan,
        "n": len(values),
        "n_infinite": len(values) - len(finite),
    }


def region_metrics(
    pred: da.Array,
    meas: da.Array,
    share: da.Array,
    tissue: da.Array,
    labels: da.Array,
    names: dict[int, str],
    rows: list[dict],
    scheduler="threads",
) -> dict:
    """WSI SSIM / PSNR, multi-modal share and patch-protocol numbers inside each labelled region of tissue."""
    present = np.unique(labels[:: max(1, labels.shape[0] // 512), :: max(1, labels.shape[1] // 512)].compute(scheduler=scheduler))
    out = {}
    for label in sorted(set(present.tolist()) | set(names)):
        inside = tissue & (labels == label)
        w = whole_slide_metrics(pred, meas, inside, scheduler=scheduler)
        n_in, share_sum = da.compute(inside.sum(), da.where(inside, share, 0).sum(), scheduler=scheduler)
        if not n_in:
            continue
        sel = [r for r in rows if r.get("region") == label]
        out[names.get(label, f"label {label}")] = {
            "label": label,
            "pixels": int(n_in),
            "ssim": w["ssim_tissue"],
            "psnr": w["psnr_tissue"],
            "mse": w["mse_tissue"],
            "pearson_r": w["pearson_r_tissue"],
            "nrmse": w["nrmse_tissue"],
            "spectral_error": w["spectral_error_tissue"],
            "multimodal_share": float(share_sum / n_in),
            "patches": {"ssim_percent": summarise([100 * r["ssim"] for r in sel]), "psnr": summarise([r["psnr"] for r in sel])},
        }
    return out


def autoencoder_ceiling_of(m: MapImage) -> dict | None:
    """The ceiling of the target autoencoder of the run that made `m` (`RUN/autoencoder_ceiling.json`), when the
    map's prediction store and its run are still where they were written; else None."""
    try:
        run_dir = Path(dict(zarr.open_group(str(m.source), mode="r").attrs)["run_dir"])
        report = read_json(run_dir / "autoencoder_ceiling.json")
        return {
            **report["roles"]["target"],
            "run": str(run_dir),
            "measured_on": report["patches"],
            "collapsed": "target" in report["collapsed"],
        }
    except (OSError, KeyError, TypeError, ValueError, zarr.errors.BaseZarrError):
        return None


def evaluate_slide(
    map_path: Path,
    spec: SlideSpec,
    clean_path: Path | None,
    use_mask: bool,
    progress: bool,
    regions_path: Path | None = None,
    region_names: dict[int, str] | None = None,
    scheduler="threads",
) -> SlideEvaluation:
    """`regions_path`: an integer label image registered to the slide (e.g. annotations); metrics per label.
    `scheduler`: where the streamed whole-slide reductions run (a local scheduler name or a dask Client)."""
    if "target" not in spec.roles:
        raise InputError(spec.paths[0], "has no target (NP) channel to evaluate against", "map it with --channels target=<name|index>")
    m = open_map(map_path)
    truth = load_truth(spec, m)
    h, w = truth.shape
    pred = da.from_zarr(m.level0)[0, :h, :w].rechunk(BLOCK).astype(np.float64)
    meas = truth.lazy("target").astype(np.float64)
    mask = truth.lazy_tissue() if use_mask else None
    result = {
        "slide": m.slide_id,
        "map": str(map_path),
        "truth": spec.paths[0],
        "shape": [h, w],
        "mpp": m.mpp,
        "data_range": 1.0,
        "normalisation": {
            "low": truth.plan.lo[truth.index("target")],
            "high": truth.plan.hi[truth.index("target")],
            "percentiles": list(m.percentiles),
            "np": m.np_scale.attrs(),
        },
        "gamma": m.gamma,
        "uni_modal_only": not m.nuclei,
    }
    result["wsi"] = whole_slide_metrics(pred, meas, mask, scheduler=scheduler)
    result["check"] = map_check(result["wsi"], "_tissue" if mask is not None else "")
    if m.source is not None and (ceiling := autoencoder_ceiling_of(m)) is not None:
        result["autoencoder_ceiling"] = ceiling
    covered = m.lazy_patch_map(COVERAGE, (h, w), BLOCK) >= 1  # lazy: read only where a number needs it
    if mask is not None:  # tissue the map leaves unpredicted scores as 0: say how much there is
        result["wsi"]["tissue_uncovered_pixels"] = int((mask & ~covered).sum().compute(scheduler=scheduler))
    result["measured_units"] = measured_units(pred, truth, mask, covered if mask is not None else None, m.np_scale, scheduler)
    result["sampling"] = m.sampling
    result["seams"] = seam_numbers(m, truth, progress)
    clean = Companion.open(clean_path, truth) if clean_path is not None else None
    if clean is not None:
        oracle = lazy_blocks(clean.normalised, truth.shape, "clean").astype(np.float64)
        result["oracle_wsi"] = whole_slide_metrics(oracle, meas, mask, scheduler=scheduler)
    regions = open_regions(regions_path, truth) if regions_path is not None else None
    if isinstance(regions, GeoJSONRegions) and not region_names:
        region_names = regions.annotations.names
    rows = _patch_protocol(m, truth, clean, regions, progress)
    if m.interval:  # the draws' spread, checked: coverage of their interval, spread against error, reliability
        lo, hi = (da.from_zarr(m.level0)[c, :h, :w].rechunk(BLOCK).astype(np.float64) for c in (LOW, HIGH))
        where = covered & mask if mask is not None else covered
        cov = coverage(lo, hi, meas, where, scheduler)
        result["uncertainty"] = interval_summary(cov, m.interval, [r["spread"] for r in rows], [r["rmse"] for r in rows])
        if (scale := float(m.interval.get("scale", 1.0))) != 1.0:  # the draws' own interval, before predict --calibrated
            raw = coverage(pred - (pred - lo) / scale, pred + (hi - pred) / scale, meas, where, scheduler)
            result["uncertainty"]["before_calibration"] = {**raw, "check": calibration_check(raw["coverage"], m.interval["nominal"])}
    result["patches"] = {
        "size": m.patch_size,
        "ssim_percent": summarise([100 * r["ssim"] for r in rows]),
        "psnr": summarise([r["psnr"] for r in rows]),
    }
    if clean is not None and rows:
        result["oracle_patches"] = {
            "ssim_percent": summarise([100 * r["oracle_ssim"] for r in rows]),
            "psnr": summarise([r["oracle_psnr"] for r in rows]),
        }
    if regions is not None:
        labels = lazy_blocks(regions.labels, truth.shape, f"regions-{regions_path}", np.int32)
        share = m.lazy_patch_map(SHARE, (h, w), BLOCK).astype(np.float64)
        tissue = mask if mask is not None else da.ones(truth.shape, bool, chunks=BLOCK)
        result["regions"] = region_metrics(pred, meas, share, tissue, labels, region_names or {}, rows, scheduler)
        if clean is not None:
            oracle_rows = [{**r, "ssim": r["oracle_ssim"], "psnr": r["oracle_psnr"]} for r in rows]
            result["oracle_regions"] = region_metrics(oracle, meas, share, tissue, labels, region_names or {}, oracle_rows, scheduler)
    return SlideEvaluation(result, rows, m, truth)


def pooled(results: list[dict], rows: list[dict]) -> dict:
    """Pixel-weighted WSI numbers and patch-protocol numbers over every slide."""
    n = sum(r["wsi"]["pixels"] for r in results)
    mse = sum(r["wsi"]["mse"] * r["wsi"]["pixels"] for r in results) / n
    ssim_w = sum(r["wsi"]["ssim"] * r["wsi"]["pixels"] for r in results) / n
    out = {
        "slides": len(results),
        "wsi": {"ssim": ssim_w, "mse": mse, "psnr": psnr_from_mse(mse), "pixels": n},
        "patches": {"ssim_percent": summarise([100 * r["ssim"] for r in rows]), "psnr": summarise([r["psnr"] for r in rows])},
    }
    return out


def read_single_channel(path: str | Path) -> da.Array:
    """A 2-D image as stored (no normalisation): .npy, OME-Zarr / zarr, or TIFF (first channel, level 0)."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file")
    if path.suffix == ".npy":
        arr = np.load(path, mmap_mode="r")
        arr = arr.reshape(arr.shape[-2:]) if arr.ndim > 2 and np.prod(arr.shape[:-2]) == 1 else (arr[0] if arr.ndim == 3 else arr)
        return da.from_array(arr, chunks=BLOCK)
    if path.is_dir():
        try:
            node = zarr.open(str(path), mode="r")
        except Exception as exc:
            raise InputError(path, f"not a zarr image: {exc}") from exc
        if isinstance(node, zarr.Group):
            ms = dict(node.attrs).get("ome", dict(node.attrs)).get("multiscales")
            node = node[ms[0]["datasets"][0]["path"]] if ms else node[next(iter(node.array_keys()))]
        arr = da.from_zarr(node)
        while arr.ndim > 2:
            arr = arr[0]
        return arr.rechunk(BLOCK)
    with open_file(path) as slide:
        shape = slide.levels[0].shape[1:]
    slide = open_file(path)
    return lazy_blocks(lambda y, x, h, w: slide.read_region(0, y, x, h, w, (0,))[0].astype(np.float64), shape, f"img-{path}", np.float64)


def compare(a_path: Path, b_path: Path, data_range: float | None) -> dict:
    a, b = read_single_channel(a_path), read_single_channel(b_path)
    if a.shape != b.shape:
        raise InputError(b_path, f"shape {b.shape} differs from {a_path} {a.shape}")
    if data_range is None:
        if np.issubdtype(a.dtype, np.integer):
            data_range = float(np.iinfo(a.dtype).max - np.iinfo(a.dtype).min)
        else:
            data_range = 1.0
    m = whole_slide_metrics(a.astype(np.float64), b.astype(np.float64), data_range=data_range)
    return {"a": str(a_path), "b": str(b_path), "shape": list(a.shape), "data_range": data_range, **m}


def run_evaluate(
    pairs: list[tuple[Path, SlideSpec]],
    out: Path,
    clean: list[Path | None],
    use_mask: bool = True,
    progress: bool = True,
    regions: list[Path | None] | None = None,
    region_names: dict[int, str] | None = None,
    viewer: bool = True,
    scheduler: str = "threads",
) -> dict:
    """Score (map, slide spec) pairs; write `metrics.json` and `patches.csv`, then the figures,
    `report.html` and (with `viewer`) the deep-zoom pages (`report.write_report`). Returns the metrics.
    `scheduler`: threads, sync or a dask.distributed address for the streamed whole-slide numbers."""
    out = Path(out)
    with compute_scheduler(scheduler) as sched:
        evaluated = [
            evaluate_slide(map_path, spec, clean_path, use_mask, progress, regions_path, region_names, sched)
            for (map_path, spec), clean_path, regions_path in zip(pairs, clean, regions or [None] * len(pairs))
        ]
    out.mkdir(parents=True, exist_ok=True)  # only once every input has been read: a refused input leaves nothing
    results = [e.result for e in evaluated]
    rows = [r for e in evaluated for r in e.rows]
    metrics = {
        "slides": results,
        "pooled": pooled(results, rows),
        "versions": {p: version(p) for p in ("wsi-damm", "numpy", "scikit-image", "torch", "zarr", "dask")},
    }
    write_json(out / "metrics.json", metrics)
    write_csv(out / "patches.csv", rows, PATCH_FIELDS)
    write_report(out, metrics, evaluated, viewer)
    return metrics
