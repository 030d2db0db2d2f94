"""`--scheduler ADDRESS`: tile, stitch and evaluate on a dask.distributed cluster with worker processes
give the arrays and numbers the local schedulers give."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from wsi_damm import api
from wsi_damm.tiling.store import PatchStore
from wsi_damm.util.errors import InputError

from .conftest import count_files, run_cli

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def cluster():
    """Two worker processes, one thread each: every task crosses a process boundary (pickled), as on SLURM."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as c:
        yield c.scheduler_address


def _arrays(path) -> dict[str, np.ndarray]:
    root = zarr.open_group(str(path), mode="r")
    return {name: np.asarray(node[...]) for name, node in root.members(max_depth=None) if isinstance(node, zarr.Array)}


def test_tile_stitch_and_evaluate_on_a_cluster_match_local(small, small_map, cluster, tmp_path):
    kw = {"channels": "vessels=CD31,nuclei=DAPI,target=NP", "patch_size": 128, "overlap": 32, "quiet": True}
    local = api.tile([small], out=tmp_path / "local.zarr", **kw)
    remote = api.tile([small], out=tmp_path / "remote.zarr", scheduler=cluster, **kw)
    assert remote.patches == local.patches > 0
    a, b = PatchStore.open(local.store), PatchStore.open(remote.store)
    np.testing.assert_array_equal(a.coords, b.coords)
    np.testing.assert_array_equal(np.asarray(a.root["images"][:]), np.asarray(b.root["images"][:]))

    [m] = api.stitch(small_map / "p.zarr", out=tmp_path / "remote.ome.zarr", scheduler=cluster, quiet=True)
    here, there = _arrays(small_map / "m.ome.zarr"), _arrays(m)
    assert here.keys() == there.keys() and "0" in here and "patch_maps/0" in here
    for key in here:
        np.testing.assert_array_equal(here[key], there[key], err_msg=key)

    scores = [
        api.evaluate(small_map / "m.ome.zarr", truth=small, out=tmp_path / name, viewer=False, quiet=True, scheduler=sched).metrics
        for name, sched in (("threads", "threads"), ("cluster", cluster))
    ]
    here, there = scores[0]["slides"][0]["wsi"], scores[1]["slides"][0]["wsi"]
    assert here.keys() == there.keys() and here["pixels_tissue"] > 0
    for key, value in here.items():  # counts exact; float sums may combine partial sums in another order (last bit)
        _assert_close(there[key], value, key)


def _assert_close(there, here, key: str) -> None:
    """Equal counts and floats equal to the last bits, through the nested lists and dicts of a metrics entry."""
    if isinstance(here, dict):
        assert there.keys() == here.keys(), key
        for k in here:
            _assert_close(there[k], here[k], f"{key}.{k}")
    elif isinstance(here, list):
        assert len(there) == len(here), key
        for i, (a, b) in enumerate(zip(there, here)):
            _assert_close(a, b, f"{key}[{i}]")
    else:
        assert there == (here if isinstance(here, int) or here is None else pytest.approx(here, rel=1e-12, abs=0)), key


def test_an_unreachable_scheduler_is_one_clear_line(small_map, tmp_path):
    with pytest.raises(InputError, match="cannot reach a dask scheduler at tcp://127.0.0.1:9"):
        api.stitch(small_map / "p.zarr", out=tmp_path / "m.ome.zarr", scheduler="tcp://127.0.0.1:9", quiet=True)
    assert count_files(tmp_path) == 0
    r = run_cli("evaluate", "--help")
    assert "--scheduler" in r.stdout and "dask.distributed" in " ".join(r.stdout.split())
