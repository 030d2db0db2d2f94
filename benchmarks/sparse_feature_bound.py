"""How far can a map of the conditional mean get on the sparse target, and what does that allow one draw?

On the simulator's perfusion target (`synth --target perfusion`) no model at the demo's budget has yet drawn a map
with Pearson's r ≥ 0.5. This asks whether the information is there. A per-pixel model of hand features of the
normalised CD31 and DAPI channels — Gaussian blurs at 1–16 px, their differences, local maxima of the vessels channel,
its gradient, and (quadratic) products of the finest blurs — is fitted by least squares on tissue pixels of the
training slides against their measured target, then rendered on the held-out slide (`baseline.write_pixel_map`) and
scored by `evaluate` over tissue against the simulator's noiseless field, the same pixels and code as every map of
`compare_sparse_target.py` and its blurred-vessel baseline.

A diffusion draw is a sample, not the mean. For a calibrated sampler (draw = E[t | c] + a residual as wide as the
target's own given the conditions) one draw's r with the target is r_m², where r_m is the conditional mean's, and the
mean of K draws' is r_m² / sqrt(r_m² + (1 − r_m²) / K). The JSON gives both for each row's r, and the r_m one draw
would need for r ≥ 0.5 (0.707). No torch; the simulator is read, never changed.

    python benchmarks/sparse_feature_bound.py --work /tmp/sparse_bound [--json benchmarks/results/sparse/sparse_feature_bound.json]
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parent))
import argparse
import math
import time
from pathlib import Path

import numpy as np
from _common import machine, report  # noqa: E402
from _demo_budget import demo_budget, scores  # noqa: E402
from scipy import ndimage

SIGMAS = (1, 2, 4, 8, 16)  # px
MAX_SIZES = (9, 25)  # px: local maxima of the vessels channel (a lumen's wall around it)
DEPTH = 4 * SIGMAS[-1] + MAX_SIZES[-1]  # px a feature reads around a pixel
PRODUCTS = ((0, 3), (1, 2))  # (channel, how many of its finest blurs) whose pairwise products the quadratic model adds
PIXELS_PER_SLIDE = 400_000  # tissue pixels of each training slide the least squares sees
ROLES = ("vessels", "nuclei")


def features(block: np.ndarray, quadratic: bool) -> np.ndarray:
    """(F, h, w) features of a (2, h, w) block of normalised vessels and nuclei; the first is the constant."""
    out = [np.ones(block.shape[1:], np.float32)]
    blurs = [[ndimage.gaussian_filter(channel, s, mode="nearest") for s in SIGMAS] for channel in block]
    for b in blurs:
        out += b + [fine - coarse for fine, coarse in zip(b, b[1:])]
    out += [ndimage.maximum_filter(blurs[0][0], k, mode="nearest") for k in MAX_SIZES]
    out.append(ndimage.gaussian_gradient_magnitude(block[0], 2, mode="nearest"))
    if quadratic:
        picks = [blurs[c][i] for c, n in PRODUCTS for i in range(n)]
        out += [a * b for i, a in enumerate(picks) for b in picks[i:]]
    return np.stack(out).astype(np.float32)


def training_pixels(specs, tile_cfg, rng: np.random.Generator, quadratic: bool) -> tuple[np.ndarray, np.ndarray]:
    """Features and measured target of tissue pixels sampled from every training slide."""
    from wsi_damm.tiling.grid import nearest
    from wsi_damm.tiling.plan import plan_slide

    xs, ys = [], []
    for spec in specs:
        plan = plan_slide(spec, tile_cfg)
        h, w = plan.choice.shape
        with spec.open() as slide:
            block = np.stack([plan.normalised(slide, r, 0, 0, h, w) for r in ROLES])
            target = plan.normalised(slide, "target", 0, 0, h, w)
        tissue = nearest(plan.mask, plan.choice.downsample / plan.mask_downsample, 0, 0, h, w).ravel().nonzero()[0]
        pick = rng.choice(tissue, min(PIXELS_PER_SLIDE, len(tissue)), replace=False)
        xs.append(features(block, quadratic).reshape(-1, h * w)[:, pick])
        ys.append(target.ravel()[pick])
    return np.concatenate(xs, 1), np.concatenate(ys)


def draw_r(r_mean: float, k: int) -> float:
    """r of the mean of `k` draws of a calibrated sampler whose conditional mean has r `r_mean` with the target."""
    r2 = r_mean**2
    return r2 / math.sqrt(r2 + (1 - r2) / k)


def main() -> None:
    from wsi_damm.stages.evaluate import run_evaluate
    from wsi_damm.tiling.plan import TileConfig
    from wsi_damm.workflows.baseline import write_pixel_map

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--target", default="perfusion", choices=["perfusion", "np"])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    t0 = time.perf_counter()
    work = args.work / args.target
    demo = demo_budget(work, args.target)
    tile_cfg = TileConfig(patch_size=demo.plan.patch, overlap=demo.plan.overlap)
    maps = {"blurred vessels": demo.blur}
    for name, quadratic in (("features, linear", False), ("features, quadratic", True)):
        x, y = training_pixels(demo.data.train_specs, tile_cfg, np.random.default_rng(0), quadratic)
        weights = np.linalg.lstsq(x.T.astype(np.float64), y.astype(np.float64), rcond=None)[0].astype(np.float32)

        def predict(block: np.ndarray, weights=weights, quadratic=quadratic) -> np.ndarray:
            f = features(block, quadratic)
            return np.clip(np.tensordot(weights, f, 1), 0, 1).astype(np.float32)

        slug = name.replace(", ", "_")
        path = write_pixel_map(
            demo.held.spec, tile_cfg, ROLES, predict, DEPTH, work / f"{slug}.ome.zarr", {"baseline": name, "nuclei": True}
        )
        maps[name] = scores(run_evaluate([(path, demo.held.spec)], work / f"{slug}_report", [demo.held.clean], **demo.scoring))
        maps[name]["features"] = int(len(weights))
    for row in maps.values():
        r = row["check"]["pearson_r"]
        row["calibrated_sampler"] = {"one_draw_r": draw_r(r, 1), "mean_of_4_r": draw_r(r, 4)}
    report(
        {
            "benchmark": "sparse_feature_bound",
            "target": args.target,
            "simulator_version": demo.simulator_version,
            "machine": machine(),
            "plan": {"size": demo.plan.size, "train_slides": demo.plan.train_slides, "pixels_per_slide": PIXELS_PER_SLIDE},
            "maps": maps,
            "conditional_mean_r_for_one_draw_r_0.5": math.sqrt(0.5),
            "seconds": round(time.perf_counter() - t0, 1),
        },
        args.json,
    )


if __name__ == "__main__":
    main()
