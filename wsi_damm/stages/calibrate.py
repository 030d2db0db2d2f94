"""`wsi-damm calibrate`: fit one scale on the draws' spread on the run's validation pixels, for `predict --calibrated`.

The run's own split of its patch store (`training.data.split_of`, the same call training made) names what it
never trained on: whole validation slides, or the last part of each slide past the recorded cut. Those are
predicted as `predict` would (K draws, the run's sampling), and the scale is the quantile of each validation
pixel's needed stretch at the interval's nominal level (`evaluation.calibration`). The scale, the coverage before
and after and what it was fitted on go to `RUN/calibration.json`; `predict --calibrated` applies it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from wsi_damm.evaluation.calibration import ScaleHistogram, needed_scale
from wsi_damm.evaluation.truth import load_truth
from wsi_damm.sampling.draws import interval_attrs
from wsi_damm.sampling.predictor import PredictConfig
from wsi_damm.slides.annotations import Region, write_regions
from wsi_damm.slides.roles import ChannelRef, SlideSpec
from wsi_damm.stages.predict import predict_maps
from wsi_damm.stitching.slide_map import HIGH, LOW, MEAN, open_map
from wsi_damm.tiling.grid import LAZY_BLOCK as BLOCK
from wsi_damm.tiling.store import PatchStore
from wsi_damm.training.data import split_of
from wsi_damm.training.run_dir import RunDir, load_run_config
from wsi_damm.util.errors import InputError
from wsi_damm.util.files import write_json


def _spec_of(entry: dict) -> SlideSpec:
    """The slide a store entry was tiled from (its recorded channels and planes)."""
    channels = tuple((role, ChannelRef(ref["path"], int(ref["index"]), ref["channel"])) for role, ref in entry["channels"].items())
    for _, ref in channels:
        if not Path(ref.path).exists():
            raise InputError(ref.path, f"is missing: the store's slide {entry['slide_id']} was tiled from it")
    return SlideSpec(entry["slide_id"], channels, tuple((entry.get("planes") or {}).items()))


def _validation_parts(store: PatchStore, run: RunDir) -> list[tuple[dict, tuple[str, int] | None]]:
    """(store entry, cut) of every slide holding validation pixels: cut None for a whole validation slide, else
    (axis, first validation pixel at the store's resolution)."""
    split = split_of(store, load_run_config(run).train)
    if split.kind == "none" or not len(split.val):
        raise InputError(run.path, "was trained without validation patches: nothing it has not seen to calibrate on")
    slides = sorted(set(store.coords[split.val, 0].tolist()))
    return [(store.slides[k], tuple(split.cuts[store.slides[k]["slide_id"]]) if split.kind == "region" else None) for k in slides]


def validation_roi(entry: dict, cut: tuple[str, int], out: Path) -> Path:
    """A GeoJSON rectangle over the validation part (level-0 pixels)."""
    import shapely

    axis, first = cut
    ds = float(entry.get("downsample", 1.0))
    h, w = (round(v * ds) for v in entry["shape"])
    start = first * ds
    box = shapely.box(start, 0, w, h) if axis == "x" else shapely.box(0, start, w, h)
    return write_regions(out, [Region("Validation", box)])


def fit_scale(
    run_dir: Path,
    store_path: Path,
    out: Path,
    cfg: PredictConfig,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Predict the run's validation pixels with K draws into `out`, fit the scale and write `RUN/calibration.json`."""
    if cfg.samples < 2:
        raise InputError("--samples", "calibration needs several draws per patch (at least 2; 9 give an 80 % interval)")
    run = RunDir(Path(run_dir))
    if load_run_config(run).model.kind == "regression":
        raise InputError(run_dir, "is a regression run: one deterministic map has no spread to calibrate")
    store = PatchStore.open(store_path)
    parts = _validation_parts(store, run)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    interval = interval_attrs(cfg.samples, cfg.interval)
    hist, fitted_on = ScaleHistogram(), []
    for entry, cut in parts:
        sid = entry["slide_id"]
        roi = validation_roi(entry, cut, out / f"{sid}.validation.geojson") if cut else None
        predicted = predict_maps(
            run.path,
            [_spec_of(entry)],
            out / f"{sid}.zarr",
            replace(cfg, roi=str(roi) if roi else None),
            resume=not overwrite,
            overwrite=overwrite,
            progress=progress,
        )
        m = open_map(predicted.maps[0])
        truth = load_truth(_spec_of(entry), m)
        h, w = truth.shape
        for y in range(0, h, BLOCK):
            y1 = min(h, y + BLOCK)
            values = np.asarray(m.level0[: HIGH + 1, y:y1, :w]).astype(np.float64)
            where = m.covered(y, 0, y1 - y, w) & truth.tissue(y, 0, y1 - y, w)
            if cut:
                axis, first = cut
                rows, cols = np.mgrid[y:y1, 0:w]
                where &= (cols if axis == "x" else rows) >= first
            meas = truth.normalised("target", y, 0, y1 - y, w)
            hist.add(needed_scale(values[MEAN], values[LOW], values[HIGH], meas)[where])
        fitted_on.append({"slide": sid, "part": f"{cut[0]} ≥ {cut[1]} px" if cut else "whole slide"})
    if not hist.n:
        raise InputError(run_dir, "its validation part holds no predicted tissue pixel to calibrate on")
    scale = hist.quantile(interval["nominal"])
    result = {
        "scale": scale,
        "interval": interval,
        "pixels": hist.n,
        "coverage_before": hist.within_one / hist.n,
        "coverage_after": hist.share_within(scale),
        "fitted_on": fitted_on,
        "store": str(Path(store_path).resolve()),
        "predict": {"sampler": cfg.sampler, "steps": cfg.n_steps, "sampling": cfg.sampling, "seed": cfg.seed},
    }
    write_json(run.calibration, result)
    return result
