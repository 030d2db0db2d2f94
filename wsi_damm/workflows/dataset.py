"""The synthetic data set of the demo and the study: training and held-out slides of the simulator,
with its truth (noiseless NP field, divergence mask), and the training patch store."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from wsi_damm.slides import SlideSpec
from wsi_damm.stages.tile import label_patches, run_tile
from wsi_damm.tiling.inputs import resolve_slides
from wsi_damm.tiling.plan import TileConfig
from wsi_damm.tiling.store import PatchStore
from wsi_damm.util.files import write_json
from wsi_damm.workflows.simulator import DIVERGENCE_LABELS, SIMULATOR_VERSION, SynthConfig
from wsi_damm.workflows.synth import write_slides

TRAIN_SEED, HELDOUT_SEED = 1, 1001  # simulator seeds: slide i of each set is `make_layout(SynthConfig(seed=…), i)`


@dataclass(frozen=True)
class HeldOut:
    spec: SlideSpec
    clean: Path  # the simulator's noiseless NP field
    divergence: Path  # 1 where the simulator made DAPI uninformative


@dataclass(frozen=True)
class SyntheticData:
    train_specs: list[SlideSpec]
    heldout: list[HeldOut]
    store: Path  # patch store of the training slides


def synthetic_data(
    out: Path,
    size: int,
    n_train: int,
    n_heldout: int,
    tile_cfg: TileConfig,
    progress: bool,
    log,
    heldout_size: int | None = None,
    target: str = "np",
) -> SyntheticData:
    """Training and held-out synthetic slides (different seeds) and the training patch store; reused if present.
    `heldout_size` (default `size`): held-out slides may be smaller — every model predicts each of them,
    so their area is what a study's prediction time scales with. `target`: the simulator's target kind
    (`SynthConfig.target`: "np", or the sparse "perfusion")."""
    out = Path(out)
    cfg = SynthConfig(size=size, seed=TRAIN_SEED, target=target)
    heldout_size = heldout_size or size
    done = out / "synth_done.json"
    names = [f"synth_{i:03d}" for i in range(n_train)], [f"heldout_{i:03d}" for i in range(n_heldout)]
    wanted = {"size": size, "train": n_train, "heldout": n_heldout, "simulator_version": SIMULATOR_VERSION}
    if heldout_size != size:
        wanted["heldout_size"] = heldout_size
    if target != "np":
        wanted["target"] = target
    if not done.exists() or json.loads(done.read_text()) != wanted:
        sizes = f"{size}² px" if heldout_size == size else f"{size}² px; held out {heldout_size}² px"
        log(f"synthetic slides ({n_train} for training, {n_heldout} held out, {sizes} at {cfg.mpp} µm/px) → {out / 'slides'}")
        write_slides(out / "slides" / "train", n_train, cfg, progress=progress)
        write_slides(
            out / "slides" / "heldout", n_heldout, replace(cfg, seed=HELDOUT_SEED, size=heldout_size), progress=progress, prefix="heldout"
        )
        shutil.rmtree(out / "patches.zarr", ignore_errors=True)  # tiles of other slides
        write_json(done, wanted)
    vessels, nuclei, target_channel = cfg.channels
    channels = f"vessels={vessels},nuclei={nuclei},target={target_channel}"
    train_specs = resolve_slides([out / "slides" / "train" / f"{n}.ome.tif" for n in names[0]], channels=channels)
    held_dir = out / "slides" / "heldout"
    heldout = [
        HeldOut(
            resolve_slides([held_dir / f"{n}.ome.tif"], channels=channels)[0],
            held_dir / "truth" / f"{n}.{cfg.clean_suffix}.ome.tif",
            held_dir / "truth" / f"{n}.divergence.ome.tif",
        )
        for n in names[1]
    ]
    store = out / "patches.zarr"
    if not store.exists():
        log(f"tiling → {store}")
        run_tile(train_specs, store, tile_cfg, resume=True, progress=progress)
    if "region" not in PatchStore.open(store).root:
        # the simulator's divergence mask as region labels: training then logs the gate per region
        truth = {s.slide_id: out / "slides" / "train" / "truth" / f"{s.slide_id}.divergence.ome.tif" for s in train_specs}
        label_patches(store, truth, DIVERGENCE_LABELS)
    return SyntheticData(train_specs, heldout, store)
