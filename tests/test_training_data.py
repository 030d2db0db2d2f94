"""What training reads from a patch store: the slide-level split and the torch Dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsi_damm.errors import InputError
from wsi_damm.store import PatchStore
from wsi_damm.training_data import PatchDataset, split_by_slide


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
    tr, va = split_by_slide(store, 0.5, (), seed=0)
    slides = store.coords[:, 0]
    assert set(slides[tr]).isdisjoint(set(slides[va])) and len(va) > 0
    ids = [s["slide_id"] for s in store.slides]
    tr, va = split_by_slide(store, 0.2, (ids[1],), seed=0)
    assert set(slides[va]) == {1} and set(slides[tr]) == {0}
    with pytest.raises(InputError, match="not in the store"):
        split_by_slide(store, 0.2, ("nope",), seed=0)
    assert np.intersect1d(tr, va).size == 0
