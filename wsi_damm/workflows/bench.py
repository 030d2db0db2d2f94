"""`wsi-damm bench`: which map to use on the user's own slides.

Trained on the same patches of the training slides at the same budget, over several seeds, and scored on the
same held-out pixels (per region with a QuPath GeoJSON or a label image): DAMM full (one draw and the mean of K),
its vessels-only branch, always fused (no DAMMP gate), the regression U-Net (`train --model regression`), the
blurred-vessel baseline fitted on the training slides and a constant map at the training target's mean. It runs
the study's machinery (`workflows/study.py`) on user slides; every step is a file, so a killed bench resumes.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from wsi_damm.slides import SlideSpec
from wsi_damm.stages.predict import PredictConfig
from wsi_damm.tiling.inputs import resolve_slides
from wsi_damm.tiling.plan import TileConfig
from wsi_damm.tiling.store import PatchStore
from wsi_damm.training.config import RunConfig, merge, resolve
from wsi_damm.training.run_dir import RunDir, load_run_config
from wsi_damm.util.errors import InputError
from wsi_damm.util.files import write_json
from wsi_damm.util.machine import machine
from wsi_damm.util.running_time import RunningTime
from wsi_damm.workflows.bench_report import recommend, summarise, write_outputs
from wsi_damm.workflows.bench_split import part_channels, split_slides
from wsi_damm.workflows.patch_maps import patch_function_map
from wsi_damm.workflows.study import cached_result, predict_and_score, regression_rows, score_baseline, score_map, train_models
from wsi_damm.workflows.study_plan import VARIANTS, StudyPlan
from wsi_damm.workflows.study_tables import same_pixels

BENCH_VARIANTS = tuple(v for v in VARIANTS if v.name in ("damm", "uni_only", "no_dammp"))


@dataclass(frozen=True)
class BenchData:
    """What the study's functions read: the training slides, their patch store, the held-out slides."""

    train_specs: list[SlideSpec]
    heldout: list[HeldOutSlide]
    store: Path


@dataclass(frozen=True)
class HeldOutSlide:
    spec: SlideSpec
    clean: Path | None = None  # no noiseless field on real slides: no oracle row
    divergence: Path | None = None  # the regions to score separately (label image or GeoJSON), if any
    region_names: dict[int, str] | None = None  # GeoJSON regions carry their own names


def plan_of(seeds: int, draws: int, ae_steps: int, steps: int, sample_steps: int, patch: int, overlap: int) -> StudyPlan:
    """The bench's budget as the study's plan type (sizes are the user's slides', not the plan's)."""
    return StudyPlan(
        size=0,
        train_slides=0,
        heldout_slides=0,
        ae_steps=ae_steps,
        steps=steps,
        seeds=tuple(range(seeds)),
        sample_steps=sample_steps,
        samples=draws,
        samplers=(),
        patch=patch,
        overlap=overlap,
    )


def bench_data(
    out: Path,
    train: list[Path],
    heldout: list[Path],
    channels: str | None,
    regions: Path | None,
    tile_cfg: TileConfig,
    log,
    heldout_fraction: float | None = None,
) -> BenchData:
    """The slides resolved (each needs vessels, nuclei and the target; with `heldout_fraction`, the training images'
    two parts), the training slides tiled once into OUT/patches.zarr."""
    from wsi_damm.stages.tile import run_tile

    need = ("vessels", "nuclei", "target")
    train_specs = resolve_slides(train, channels=channels, required=need)
    if heldout_fraction is not None:
        if heldout or regions is not None:
            raise InputError("--heldout-fraction", "holds out part of each training image: give no --heldout slides or --regions with it")
        *parts, wrote = split_slides(train_specs, heldout_fraction, out / "inputs", tile_cfg.patch_size, log)
        if wrote and (out / "patches.zarr").exists():  # what was tiled and trained came from other parts
            raise InputError(out, "holds a bench on another split of these images", "give a new --out")
        train_specs, held_specs = (resolve_slides(p, channels=part_channels(), required=need) for p in parts)
    elif not heldout:
        raise InputError("--heldout", "no held-out slide", "give --heldout SLIDE (repeat), or --heldout-fraction F")
    else:
        held_specs = resolve_slides(heldout, channels=channels, required=need)
    if regions is not None and len(held_specs) != 1:
        raise InputError(regions, "regions belong to one held-out slide; give one --heldout slide with --regions")
    store = out / "patches.zarr"
    if not (store / "zarr.json").exists() or not PatchStore.open(store, require_complete=False).attrs.get("complete"):
        log(f"tiling {len(train_specs)} training slide(s) → {store}")
        run_tile(train_specs, store, tile_cfg, resume=True, progress=False)
    held = [HeldOutSlide(s, None, regions, None) for s in held_specs]
    return BenchData(train_specs, held, store)


def base_config(preset: str, config: Path | None, plan: StudyPlan) -> RunConfig:
    """The preset (the product's default recipe unless a TOML says otherwise) at the bench's budget; both branches learn
    from every sample, as in the demo; a collapsed autoencoder is said, and its ceiling is in the run."""
    return merge(
        resolve(preset, config),
        {
            "autoencoder": {"steps": plan.ae_steps, "on_collapse": "warn"},
            "damm": {"multi_loss": "always"},
            "train": {"steps": plan.steps, "val_fraction": 0.0, "checkpoint_every": plan.steps},
        },
        "bench",
    )


def target_mean(store_path: Path) -> float:
    """The training patches' mean target value in [0, 1] (what the constant row predicts everywhere)."""
    store = PatchStore.open(store_path)
    k, total, n = store.roles.index("target"), 0.0, 0
    s = int(store.attrs["shard_patches"])
    for a in range(0, len(store), s):
        block = np.asarray(store.images[a : a + s, k], np.float64)
        total, n = total + block.sum(), n + block.size
    top = 255.0 if store.images.dtype == np.uint8 else 65535.0
    return total / max(n, 1) / top


def _constant(data: BenchData, rc: RunConfig, value: float, out: Path, progress: bool) -> dict:
    def compute() -> dict:
        def fn(images: torch.Tensor, coords, context) -> torch.Tensor:
            return torch.full((len(images), 1, images.shape[-2], images.shape[-1]), value)

        slides = []
        for h in data.heldout:
            path = patch_function_map(rc, h.spec.without("target"), out / f"{h.spec.slide_id}.ome.zarr", fn, {"constant": value}, progress)
            slides.append(score_map(path, h, progress))
        return {"value": value, "slides": slides}

    return cached_result(out, compute)


def autoencoder_ceilings(runs: dict, seeds) -> dict:
    """Each seed's autoencoders as training measured them (`RUN/autoencoder_ceiling.json`): Pearson's r, spread and
    mean of decode(encode(x)) against x per channel, and which collapsed — what explains a flat DAMM row."""
    out = {}
    for seed in seeds:
        path = RunDir(runs["autoencoders", seed]).ae_ceiling
        if path.exists():
            c = json.loads(path.read_text(encoding="utf-8"))
            figures = {r: {k: v.get(k) for k in ("pearson_r", "spread_ratio", "mean_ratio")} for r, v in c["roles"].items()}
            out[f"seed{seed}"] = {"patches": c["patches"], "collapsed": c["collapsed"], "roles": figures}
    return out


def run_bench(
    out: Path,
    train: list[Path],
    heldout: list[Path] | None = None,
    channels: str | None = None,
    regions: Path | None = None,
    heldout_fraction: float | None = None,
    seeds: int = 3,
    draws: int = 4,
    ae_steps: int = 150,
    steps: int = 500,
    sample_steps: int = 10,
    preset: str = "tiny",
    config: Path | None = None,
    patch: int = 128,
    overlap: int = 32,
    mpp: float | None = None,
    progress: bool = True,
    log=print,
) -> dict:
    """Train, predict, score and compare (see the module docstring); writes OUT/bench.json, bench.md, bench.png and
    bench.html, and returns the summary with its one-sentence `recommendation`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clock = RunningTime(out / "running_time.json")
    t0 = time.perf_counter()

    def step(msg: str) -> None:
        clock.tick()
        log(msg)

    plan = plan_of(seeds, draws, ae_steps, steps, sample_steps, patch, overlap)
    tile_cfg = TileConfig(patch_size=patch, overlap=overlap, mpp=mpp)
    data = bench_data(
        out,
        [Path(p) for p in train],
        [Path(p) for p in heldout or ()],
        channels,
        Path(regions) if regions else None,
        tile_cfg,
        step,
        heldout_fraction,
    )
    base = base_config(preset, Path(config) if config else None, plan)
    runs = train_models(data, out, plan, preset, progress, step, variants=BENCH_VARIANTS, base=base)
    results: dict[str, dict] = {}
    for v in BENCH_VARIANTS:
        for k in dict.fromkeys((1, draws)):
            cfg = PredictConfig(steps=sample_steps, batch_size=32, samples=k)
            for seed in plan.seeds:
                step(f"predicting with {v.label}, seed {seed}, {k} draw(s)")
                res = predict_and_score(
                    runs[v.trained_as or v.name, seed], data, out / "predictions" / f"{v.name}_seed{seed}_k{k}", cfg, v.no_nuclei, progress
                )
                results[f"{v.name}/k{k}/seed{seed}"] = {**res, "kind": "learned"}
    results |= regression_rows(runs, data, out, plan.seeds, progress, step)
    step("blurred-vessel baseline and the constant map")
    results["baseline"] = {**score_baseline(data, out / "predictions" / "baseline", tile_cfg, progress), "kind": "reference"}
    rc = load_run_config(RunDir(runs["damm", plan.seeds[0]]))
    results["constant"] = {**_constant(data, rc, target_mean(data.store), out / "predictions" / "constant", progress), "kind": "reference"}
    patches = same_pixels(results)
    rows = summarise(results, BENCH_VARIANTS, plan)
    summary = {
        "plan": asdict(plan),
        "preset": preset,
        "train": [str(p) for p in train],
        "heldout": [h.spec.slide_id for h in data.heldout],
        "regions": str(regions) if regions else None,
        "heldout_fraction": heldout_fraction,
        "scored_patches": patches,
        "autoencoders": autoencoder_ceilings(runs, plan.seeds),
        "rows": rows,
        "recommendation": recommend(rows),
        "seconds": clock.tick(),
        "machine": machine(),
        "seconds_this_invocation": round(time.perf_counter() - t0, 1),
    }
    write_json(out / "bench.json", summary)
    write_outputs(out, summary)
    return summary
