"""Field of view: how well could a model do that knew everything inside its window and nothing outside?

The simulator's NP field is linear in its sources (NP released along leaky vessels, then spread by a
length that shrinks with cell density, up to 60 µm σ). So the NP a pixel owes to the vessels inside a
window is the simulator's own spread of those sources alone. For each patch `predict` would cut from
the demo's held-out slide, this builds an idealised predictor that sees a window of `span` patches
centred on it (span 1: the patch itself, what the `tiny` preset's U-Net sees) with perfect knowledge
there — true vessels, leakiness, cell density, the slide's NP scale — and replaces the NP from vessels
outside by its mean for the pixel's cell density, fitted on the training slides. Its patches go
through `predict`'s tiling, stitching and `evaluate`'s scoring like any map, beside the same pipeline
fed the whole field (span "all": what perfect knowledge of the whole slide scores through patches).

It is not a proof of a ceiling — a model could guess outside vessels from those entering its window
better than a mean — but it measures how much of the distance to the oracle the field of view alone
can explain. No torch; the simulator is read, never changed.

    python benchmarks/fov_bound.py --out benchmarks/results/fov [--spans 1 2 3 4 6 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys as _sys
import time
from pathlib import Path

import numpy as np
import torch

_sys.path.insert(0, str(Path(__file__).resolve().parent))
from _demo_budget import budget_config, scores  # noqa: E402

DENSITY_BINS = 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/fov"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/compare_seamless"), help="the demo's data (shared with compare_seamless)")
    ap.add_argument("--spans", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8], help="window widths in patches, centred on each patch")
    args = ap.parse_args()

    from wsi_damm.stages.evaluate import run_evaluate
    from wsi_damm.stages.train import with_store_tiling
    from wsi_damm.tiling.plan import TileConfig
    from wsi_damm.tiling.store import PatchStore
    from wsi_damm.workflows.dataset import HELDOUT_SEED, TRAIN_SEED, synthetic_data
    from wsi_damm.workflows.demo import FULL
    from wsi_damm.workflows.patch_maps import patch_function_map
    from wsi_damm.workflows.simulator import DIVERGENCE_LABELS, SIMULATOR_VERSION, SynthConfig, make_layout

    t0 = time.perf_counter()
    data = synthetic_data(
        args.work / "data", FULL.size, FULL.train_slides, 1, TileConfig(patch_size=FULL.patch, overlap=FULL.overlap), False, print
    )
    held = data.heldout[0]
    # the tiling `predict` uses for a run of the demo's recipe on this store (its canvas sampling aligns the patch grid)
    rc = with_store_tiling(budget_config(FULL, 0, {"local": True}, {"latents": "canvas"}), PatchStore.open(data.store))
    # the layouts of the slides `dataset.synthetic_data` wrote
    train_layouts = [make_layout(SynthConfig(size=FULL.size, seed=TRAIN_SEED), i) for i in range(FULL.train_slides)]
    held_cfg = SynthConfig(size=FULL.size, seed=HELDOUT_SEED)
    held_lay = make_layout(held_cfg, 0)
    scales = {"train": [lay.np_scale for lay in train_layouts], "heldout": held_lay.np_scale}
    rows = []
    for span in ["all", *args.spans]:
        margin_px = None if span == "all" else (span - 1) * FULL.patch // 2
        outside = None if margin_px is None else outside_mean(held_cfg, train_layouts, margin_px, FULL.patch)
        variants = [("mean outside", outside)] + ([("nothing outside", np.zeros_like(outside))] if span == 1 else [])
        for label, table in variants:
            t = time.perf_counter()
            out = args.out / "maps" / f"span_{span}_{label.split()[0]}.ome.zarr"
            fn = window_predictor(held_cfg, held_lay, held.spec, rc, margin_px, table, FULL.patch)
            made = patch_function_map(rc, held.spec, out, fn, {"fov_bound": str(span)}, progress=False)
            result = scores(
                run_evaluate(
                    [(made, held.spec)],
                    out.with_suffix(".report"),
                    [held.clean],
                    regions=[held.divergence],
                    region_names=DIVERGENCE_LABELS,
                    progress=False,
                )
            )
            row = {
                "span": span,
                "window_um": None if margin_px is None else (FULL.patch + 2 * margin_px) * held_cfg.mpp,
                "outside": label if margin_px is not None else "none needed",
                "seconds": round(time.perf_counter() - t, 1),
                **result,
            }
            rows.append(row)
            print(
                json.dumps(
                    {k: row[k] for k in ("span", "window_um", "outside")} | {"ssim": round(row["ssim"], 4), "psnr": round(row["psnr"], 2)}
                ),
                flush=True,
            )
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "simulator_version": SIMULATOR_VERSION,
        "plan": FULL.__dict__,
        "slide_np_scale": scales,
        "seconds": round(time.perf_counter() - t0, 1),
        "rows": rows,
    }
    (args.out / "fov.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


def coarse_box(lay, y: int, x: int, size: int, margin: int) -> tuple[slice, slice]:
    """The coarse pixels of the full-resolution window [y - margin, y + size + margin)², clipped to the grid."""
    c, (h, w) = lay.c, lay.tissue.shape
    return (
        slice(max((y - margin) // c, 0), min(-(-(y + size + margin) // c), h)),
        slice(max((x - margin) // c, 0), min(-(-(x + size + margin) // c), w)),
    )


def inside_field(cfg, lay, src: np.ndarray, box: tuple[slice, slice]) -> np.ndarray:
    """The NP field (coarse, before the slide's scale) that the sources inside `box` alone produce, on the
    whole grid but computed on a crop: the box and the reach of the widest spread (scipy truncates its
    Gaussians at 4 σ), so nothing but zeros lies between the sources and any crop edge inside the grid."""
    from wsi_damm.workflows.simulator import np_spread

    reach = int(np.ceil(4 * cfg.penetration_sparse / (lay.c * cfg.mpp))) + 1
    h, w = src.shape
    crop = (
        slice(max(box[0].start - reach, 0), min(box[0].stop + reach, h)),
        slice(max(box[1].start - reach, 0), min(box[1].stop + reach, w)),
    )
    masked = np.zeros_like(src[crop])
    inner = (
        slice(box[0].start - crop[0].start, box[0].stop - crop[0].start),
        slice(box[1].start - crop[1].start, box[1].stop - crop[1].start),
    )
    masked[inner] = src[box]
    field = np.zeros_like(src)
    field[crop] = np_spread(cfg, lay.c, masked, lay.density[crop])
    return field


def sources(cfg, lay) -> np.ndarray:
    from wsi_damm.workflows.synth import np_sources

    return np_sources(cfg, lay.c, lay.tissue.shape, lay.p0, lay.p1, lay.radius, lay.leak)


def outside_mean(cfg, layouts, margin_px: int, patch: int) -> np.ndarray:
    """Mean NP (before scale) a patch pixel owes to vessels beyond `margin_px` of the patch, per bin of true
    cell density, over patches on a grid of the training slides' tissue."""
    from wsi_damm.workflows.simulator import np_spread

    total, count = np.zeros(DENSITY_BINS), np.zeros(DENSITY_BINS)
    for lay in layouts:
        src = sources(cfg, lay)
        full = np_spread(cfg, lay.c, src, lay.density)
        size = lay.tissue.shape[0] * lay.c
        for y in range(0, size - patch + 1, patch):
            for x in range(0, size - patch + 1, patch):
                box = coarse_box(lay, y, x, patch, 0)
                if lay.tissue[box].mean() < 0.5:
                    continue
                diff = (full - inside_field(cfg, lay, src, coarse_box(lay, y, x, patch, margin_px)))[box]
                b = np.minimum((lay.density[box] * DENSITY_BINS).astype(int), DENSITY_BINS - 1)
                total += np.bincount(b.ravel(), diff.ravel(), DENSITY_BINS)
                count += np.bincount(b.ravel(), minlength=DENSITY_BINS)
    return np.where(count > 0, total / np.maximum(count, 1), 0.0)


def window_predictor(cfg, lay, spec, rc, margin_px: int | None, outside: np.ndarray | None, patch: int):
    """A patch function for `patch_function_map`: each patch's expected NP signal (the simulator's, before the
    camera) from the sources in its window plus `outside`, normalised as `evaluate` normalises the measured channel."""
    from wsi_damm.tiling.grid import unit_range
    from wsi_damm.tiling.plan import plan_slide
    from wsi_damm.workflows.patch_maps import tiling
    from wsi_damm.workflows.simulator import MARGIN, render_window

    plan = plan_slide(spec, tiling(rc))
    if plan.choice.downsample != 1:
        raise SystemExit("fov_bound needs slides tiled at full resolution (the demo's)")
    k = spec.roles.index("target")
    src = sources(cfg, lay)
    density_bin = np.minimum((lay.density * DENSITY_BINS).astype(int), DENSITY_BINS - 1)

    def predict(images: torch.Tensor, coords: np.ndarray, context) -> torch.Tensor:
        out = np.empty((len(coords), 1, patch, patch), np.float32)
        for i, (_, y, x) in enumerate(coords):
            y, x = int(y), int(x)
            if margin_px is None:
                est = lay
            else:
                render = coarse_box(lay, y, x, patch, MARGIN + 2 * lay.c)  # what rendering the patch reads
                field = inside_field(cfg, lay, src, coarse_box(lay, y, x, patch, margin_px))
                guess = np.zeros_like(lay.np_field)
                guess[render] = ((field + outside[density_bin]) / lay.np_scale * lay.tissue)[render]
                est = dataclasses.replace(lay, np_field=guess.astype(np.float32))
            y0, x0 = max(y - MARGIN, 0), max(x - MARGIN, 0)  # as `synth` renders a tile at the slide's edge
            sig = render_window(cfg, est, 0, y0, x0, y + patch + MARGIN - y0, x + patch + MARGIN - x0)["NP"]
            out[i, 0] = unit_range(sig[y - y0 : y - y0 + patch, x - x0 : x - x0 + patch].astype(np.float32), plan.lo[k], plan.hi[k])
        return torch.from_numpy(out)

    return predict


if __name__ == "__main__":
    main()
