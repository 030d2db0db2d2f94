"""What training reads from a patch store: the slide-level split and the torch Dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsi_damm.tiling.store import PatchStore
from wsi_damm.training.data import PatchDataset, split_validation
from wsi_damm.util.errors import InputError

from .conftest import TINY_TOML, run_cli


def test_dataset_gives_minus_one_to_one_per_role(small_store):
    ds = PatchDataset(small_store)
    mem = PatchDataset(small_store, in_memory=True)
    p = int(PatchStore.open(small_store).attrs["patch_size"])
    item, item_mem = ds[3], mem[3]
    assert set(item) == {"vessels", "nuclei", "target", "index"}
    for role in ("vessels", "nuclei", "target"):
        t = item[role]
        assert t.shape == (1, p, p) and t.dtype == torch.float32
        assert -1.0 <= float(t.min()) and float(t.max()) <= 1.0
        assert torch.equal(t, item_mem[role])
    raw = np.asarray(PatchStore.open(small_store).images[3, 0]).astype(np.float32)
    assert torch.allclose(item["vessels"][0], torch.from_numpy(raw / 127.5 - 1), atol=1e-6)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))  # what the Dataset is for
    assert batch["vessels"].shape == (4, 1, p, p) and batch["index"].tolist() == [0, 1, 2, 3]
    assert torch.equal(batch["target"][3], item["target"])


def test_validation_split_is_by_slide(small_store):
    store = PatchStore.open(small_store)
    split = split_validation(store, 0.5, (), seed=0)
    tr, va = split.train, split.val
    slides = store.coords[:, 0]
    assert split.kind == "slides" and set(slides[tr]).isdisjoint(set(slides[va])) and len(va) > 0
    ids = [s["slide_id"] for s in store.slides]
    split = split_validation(store, 0.2, (ids[1],), seed=0)
    tr, va = split.train, split.val
    assert set(slides[va]) == {1} and set(slides[tr]) == {0}
    with pytest.raises(InputError, match="not in the store"):
        split_validation(store, 0.2, ("nope",), seed=0)
    assert np.intersect1d(tr, va).size == 0


def _overlapping_pairs(coords: np.ndarray, a: np.ndarray, b: np.ndarray, patch: int) -> int:
    """Brute force: patch pairs (one from each set, same slide) whose squares share a pixel."""
    ca, cb = coords[a][:, None, :], coords[b][None, :, :]
    same = ca[..., 0] == cb[..., 0]
    return int((same & (np.abs(ca[..., 1] - cb[..., 1]) < patch) & (np.abs(ca[..., 2] - cb[..., 2]) < patch)).sum())


@pytest.mark.parametrize("fraction", [0.2, 0.35])
def test_region_split_never_overlaps_training(small_store, fraction):
    store = PatchStore.open(small_store)
    patch = int(store.attrs["patch_size"])
    split = split_validation(store, fraction, (), seed=0, how="region")
    assert split.kind == "region" and len(split.val) and len(split.train)
    assert _overlapping_pairs(store.coords, split.train, split.val, patch) == 0
    for k, entry in enumerate(store.slides):  # every slide gives a block near the asked share of its patches
        on = store.coords[:, 0] == k
        share = np.isin(np.nonzero(on)[0], split.val).mean()
        assert abs(share - fraction) < 0.1, (entry["slide_id"], share)
        axis, cut = split.cuts[entry["slide_id"]]
        col = 2 if axis == "x" else 1
        assert (store.coords[split.val][store.coords[split.val][:, 0] == k][:, col] >= cut).all()
    left_out = len(store) - len(split.train) - len(split.val)
    assert 0 < left_out < 0.2 * len(store) and f"{left_out} patches on the boundary" in split.description


def test_one_slide_trains_with_a_held_out_region(synth_dir, tmp_path):
    from wsi_damm.stages.train import run_training
    from wsi_damm.training.config import resolve
    from wsi_damm.training.run_dir import RunDir

    store = tmp_path / "one.zarr"
    slide = sorted(synth_dir.glob("*.ome.tif"))[0]
    res = run_cli("tile", str(slide), "--out", str(store), "--patch-size", "64", "--overlap", "16", "--mpp", "2.0", "--quiet")
    assert res.returncode == 0, res.stderr
    (tmp_path / "tiny.toml").write_text(TINY_TOML)
    run = run_training(store, tmp_path / "run", resolve("tiny", tmp_path / "tiny.toml"), progress=False)
    import json

    cfg = json.loads(run.config.read_text())
    validation = json.loads(RunDir(run.path).validation.read_text())
    assert cfg["train"]["val_split"] == "region" and validation["kind"] == "region" and validation["val_patches"] > 0
    assert "validation region" in validation["description"]
    from wsi_damm.training.run_info import run_summary

    assert run_summary(run.path)["last_val_loss"] is not None  # validated, from the one slide
