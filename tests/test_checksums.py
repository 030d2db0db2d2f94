"""Silent corruption is caught: every patch chunk of the patch and prediction stores carries a crc32c,
so a flipped byte on disk is a one-line error naming the store, the array and the patch — never a wrong map."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import run_cli
from wsi_damm.tiling.store import PatchStore, create_prediction_store, read_rows
from wsi_damm.util.errors import InputError


def _flip(shard_file, offset: int = 40) -> None:
    """Flip every bit of one byte inside the shard's first chunk (chunks come first, the index last)."""
    data = bytearray(shard_file.read_bytes())
    data[offset] ^= 0xFF
    shard_file.write_bytes(bytes(data))


@pytest.fixture()
def store(small, tmp_path):
    out = tmp_path / "s.zarr"
    res = run_cli("tile", str(small), "--out", str(out), "--patch-size", "128", "--overlap", "32", "--shard-patches", "16", "--quiet")
    assert res.returncode == 0, res.stderr
    return out


def test_stores_are_written_with_checksums(store):
    codecs = PatchStore.open(store).images.metadata.codecs[0].codecs  # inside the sharding codec
    assert [type(c).__name__ for c in codecs][-1] == "Crc32cCodec"


def test_a_flipped_byte_names_the_store_array_and_patch(store):
    images = PatchStore.open(store).images
    before = read_rows(images, np.arange(images.shape[0]))
    _flip(store / "images" / "c" / "1" / "0" / "0" / "0")  # shard 1: patches 16…31
    with pytest.raises(InputError) as err:
        read_rows(PatchStore.open(store).images, np.arange(images.shape[0]))
    line = str(err.value.one_line())
    assert str(store) in line and "'images'" in line and "patch 16 (shard 1)" in line and "\n" not in line
    intact = np.r_[0:16, 17 : images.shape[0]]  # every other patch still reads, unchanged
    np.testing.assert_array_equal(read_rows(PatchStore.open(store).images, intact), before[intact])


def test_stitch_refuses_a_corrupted_prediction(store, tmp_path):
    cond = PatchStore.open(store)
    pred = tmp_path / "p.zarr"
    root = create_prediction_store(pred, cond, {"roles": cond.roles, "nuclei": True})
    root["pred"][:] = np.random.default_rng(0).random(root["pred"].shape).astype(np.float16)
    root["divergence"][:] = 0.5
    root["multimodal_fraction"][:] = 0.5
    root["shard_done"][:] = 1
    root.attrs["complete"] = True
    _flip(pred / "pred" / "c" / "0" / "0" / "0" / "0")
    out = tmp_path / "m.ome.zarr"
    res = run_cli("stitch", str(pred), "--out", str(out), "--quiet")
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and str(pred) in res.stderr and "'pred', patch 0" in res.stderr
    assert not out.exists() and not (tmp_path / "m.ome.zarr.partial").exists()
