"""Region labels on patches and the gate's training signal per region, checked by brute force."""

from __future__ import annotations

import shutil

import numpy as np
import tifffile
import torch

from wsi_damm.diffusion.damm import divergence
from wsi_damm.stages.tile import label_patches
from wsi_damm.stages.train import run_training
from wsi_damm.tiling.store import PatchStore
from wsi_damm.training.config import resolve
from wsi_damm.training.gate_regions import GateByRegion, gate_in_training
from wsi_damm.training.run_dir import RunDir, read_metrics

from .conftest import TINY_TOML, run_cli

NAMES = {0: "informative", 1: "divergent"}


def test_patch_labels_are_the_majority_of_their_footprint(small, tmp_path):
    store = tmp_path / "s.zarr"
    assert run_cli("tile", str(small), "--out", str(store), "--patch-size", "64", "--overlap", "0", "--quiet").returncode == 0
    truth = small.parent / "truth" / "synth_000.divergence.ome.tif"
    region = label_patches(store, {"synth_000": truth}, NAMES)
    mask = tifffile.imread(truth)
    mask = mask[0] if mask.ndim == 3 else mask
    coords = PatchStore.open(store).coords
    want = [np.bincount(mask[y : y + 64, x : x + 64].ravel(), minlength=2).argmax() for _, y, x in coords]
    np.testing.assert_array_equal(region, want)
    assert set(np.unique(region)) == {0, 1}  # the slide has both regions
    opened = PatchStore.open(store)
    np.testing.assert_array_equal(np.asarray(opened.root["region"][:]), region)
    assert opened.attrs["region_names"] == {"0": "informative", "1": "divergent"}


def test_gate_sums_per_region_match_a_loop():
    g = torch.Generator().manual_seed(0)
    b = 12
    eps_uni, eps_multi, target = (torch.randn(b, 2, 4, 4, generator=g) for _ in range(3))
    kappa = torch.rand(b, 4, 4, generator=g)
    regions = torch.tensor([0, 1, -1, 0, 1, 1, 0, -1, 1, 0, 0, 1])
    tracker = GateByRegion(NAMES)
    tracker.add(regions, eps_uni, eps_multi, kappa, target)
    tracker.add(regions[:5], eps_uni[:5], eps_multi[:5], kappa[:5], target[:5])
    row = tracker.row()
    k = 1 - divergence(kappa)
    for label, name in NAMES.items():
        picks = [i for i in range(b) if regions[i] == label] + [i for i in range(5) if regions[i] == label]
        y = [float((eps_multi[i] - target[i]).abs().mean() <= (eps_uni[i] - target[i]).abs().mean()) for i in picks]
        assert row[f"samples_{name}"] == len(picks)
        assert abs(row[f"dfl_label_rate_{name}"] - np.mean(y)) < 1e-12
        assert abs(row[f"mean_kappa_{name}"] - float(np.mean([k[i] for i in picks]))) < 1e-6
    assert tracker.row()["samples_informative"] == 0  # a row resets the sums


def test_gate_in_training_pools_the_dammp_rows_sample_by_sample():
    """Two log rows of the DAMMP phase pooled equal the rates over all their samples at once; warm-up rows do not count."""
    g = torch.Generator().manual_seed(1)
    batches = [
        (
            torch.randint(-1, 2, (n,), generator=g),
            *(torch.randn(n, 2, 4, 4, generator=g) for _ in range(2)),
            torch.rand(n, 4, 4, generator=g),
            torch.randn(n, 2, 4, 4, generator=g),
        )
        for n in (9, 14, 6)
    ]
    tracker, rows = GateByRegion(NAMES), []
    for step, (phase, batch) in enumerate(zip(("warmup", "dammp", "dammp"), batches)):
        tracker.add(*batch)
        rows.append({"step": step, "phase": phase, **tracker.row()})
    pooled = GateByRegion(NAMES)
    for batch in batches[1:]:
        pooled.add(*batch)
    want = pooled.row()
    got = gate_in_training(rows)
    for name in NAMES.values():
        assert got[name]["samples"] == want[f"samples_{name}"] > 0
        assert abs(got[name]["dfl_label_rate"] - want[f"dfl_label_rate_{name}"]) < 1e-12
        assert abs(got[name]["mean_kappa"] - want[f"mean_kappa_{name}"]) < 1e-12
    assert gate_in_training([]) == {}


def test_training_on_a_labelled_store_logs_the_gate_per_region(small_store, synth_dir, tmp_path):
    store = tmp_path / "labelled.zarr"
    shutil.copytree(small_store, store)
    ids = [e["slide_id"] for e in PatchStore.open(store).slides]
    label_patches(store, {i: synth_dir / "truth" / f"{i}.divergence.ome.tif" for i in ids}, NAMES)
    (tmp_path / "tiny.toml").write_text(TINY_TOML)
    run = run_training(store, tmp_path / "run", resolve("tiny", tmp_path / "tiny.toml"), progress=False)
    rows = read_metrics(RunDir(run.path).metrics)
    assert rows and all(f"dfl_label_rate_{n}" in rows[0] for n in NAMES.values())
    counted = sum(r["samples_informative"] + r["samples_divergent"] for r in rows)
    assert counted > 0
    for r in rows:
        for n in NAMES.values():
            if r[f"samples_{n}"]:
                assert 0 <= r[f"dfl_label_rate_{n}"] <= 1 and 0 <= r[f"mean_kappa_{n}"] <= 1
    assert (run.path / "loss.png").exists()
