"""SIGKILL at an arbitrary point, then --resume: tile, train and stitch end bit-identical to an
uninterrupted run (predict: tests/test_predict.py)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file

from .conftest import TINY_TOML, count_files, kill_when, run_process


@pytest.fixture(scope="module")
def big_slide(tmp_path_factory):
    out = tmp_path_factory.mktemp("big")
    res = run_process("synth", str(out), "--slides", "1", "--size", "4096", "--seed", "5", "--quiet")
    assert res.returncode == 0, res.stderr
    return out / "synth_000.ome.tif"


@pytest.mark.slow(adds="a SIGKILL of `tile` on a 4096² slide, between shards, and its --resume bit for bit")
def test_kill_then_resume_is_identical(big_slide, tmp_path):
    ref, killed = tmp_path / "ref.zarr", tmp_path / "killed.zarr"
    common = ["--patch-size", "256", "--overlap", "64", "--shard-patches", "8", "--workers", "1", "--quiet"]
    assert run_process("tile", str(big_slide), "--out", str(ref), *common).returncode == 0

    partial = killed.with_name(killed.name + ".partial")
    kill_when(["tile", str(big_slide), "--out", str(killed), *common], lambda: count_files(partial / "shard_done" / "c") >= 5)
    n_total = zarr.open_group(str(partial), mode="r")["shard_done"].shape[0]
    assert 0 < count_files(partial / "shard_done" / "c") < n_total
    assert not killed.exists()  # a killed run never looks complete

    res = run_process("tile", str(big_slide), "--out", str(killed), *common)
    assert res.returncode == 2 and "--resume" in res.stderr  # refuses to silently restart
    res = run_process("tile", str(big_slide), "--out", str(killed), "--resume", *common)
    assert res.returncode == 0, res.stderr
    assert not partial.exists()

    a, b = zarr.open_group(str(ref), mode="r"), zarr.open_group(str(killed), mode="r")
    assert dict(a.attrs) == dict(b.attrs)
    for name in ("images", "coords", "tissue", "shard_done"):
        np.testing.assert_array_equal(np.asarray(a[name][:]), np.asarray(b[name][:]), err_msg=name)


# per stage: checkpoints every 7 steps, killed after the second; the 16 steps left take seconds (0.2–0.3 s
# a step on 2 cores), far longer than the kill's delay (0–0.3 s), so the kill always lands inside the stage
KILL_TOML = {
    "diffusion": TINY_TOML.replace("steps = 6", "steps = 30").replace("checkpoint_every = 3", "checkpoint_every = 7"),
    "autoencoder": TINY_TOML.replace("steps = 8", "steps = 30").replace("checkpoint_every = 3", "checkpoint_every = 7"),
}
CHECKPOINTS = {"diffusion": "checkpoints", "autoencoder": "checkpoints_autoencoder"}
WEIGHTS = {"diffusion": ["unet_ema"], "autoencoder": ["autoencoder_vessels", "autoencoder_nuclei", "autoencoder_target", "unet_ema"]}


@pytest.mark.slow(adds="a SIGKILL of a real training process between checkpoints (the fast tier resumes in process: test_train)")
@pytest.mark.parametrize("stage", ["diffusion", "autoencoder"])
def test_killed_training_resumes_to_identical_weights(small_store, tmp_path, stage):
    """Killed between two checkpoints of either stage, `--resume` continues it (the autoencoder stage used
    to restart) to weights bitwise equal to an uninterrupted run's."""
    toml = tmp_path / "kill.toml"
    toml.write_text(KILL_TOML[stage])
    common = ["--config", str(toml), "--quiet"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    res = run_process("train", str(small_store), "--out", str(ref), *common)
    assert res.returncode == 0, res.stderr[-2000:]

    def checkpointed(n: int) -> bool:
        try:
            return json.loads((killed / CHECKPOINTS[stage] / "latest.json").read_text())["step"] >= n
        except (OSError, ValueError):
            return False

    delay = float(np.random.default_rng(7).uniform(0, 0.3))  # somewhere between two checkpoints
    kill_when(["train", str(small_store), "--out", str(killed), *common], lambda: checkpointed(14), delay=delay)
    assert not (killed / f"{WEIGHTS[stage][0]}.safetensors").exists()
    res = run_process("train", str(small_store), "--out", str(killed), "--resume", *common)
    assert res.returncode == 0, res.stderr[-2000:]
    for name in WEIGHTS[stage]:
        a, b = load_file(str(ref / f"{name}.safetensors")), load_file(str(killed / f"{name}.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    if stage == "diffusion":
        assert len(list((killed / "checkpoints").glob("step_*"))) == 1  # old checkpoints are cleaned up
    else:
        assert (ref / "autoencoder_metrics.csv").read_text() == (killed / "autoencoder_metrics.csv").read_text()
        assert not (killed / "checkpoints_autoencoder").exists()  # work state of a finished stage is removed


@pytest.fixture(scope="module")
def wide_prediction(tmp_path_factory):
    """A fake prediction store over a 3072² slide: nine 1024-px canvas tiles at --band-mb 1, to kill a stitch between them."""
    import tifffile

    from wsi_damm.tiling.store import PatchStore, create_prediction_store

    d = tmp_path_factory.mktemp("wide")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:3072, :3072]
    disc = (yy - 1536) ** 2 + (xx - 1536) ** 2 < 1400**2
    data = np.stack([(100 + 2000 * disc * rng.random((3072, 3072))).astype(np.uint16) for _ in range(3)])
    tifffile.imwrite(
        d / "w.ome.tif",
        data,
        metadata={"axes": "CYX", "Channel": {"Name": ["CD31", "DAPI", "NP"]}},
        tile=(256, 256),
        compression="zlib",
        photometric="minisblack",
    )
    res = run_process("tile", str(d / "w.ome.tif"), "--out", str(d / "c.zarr"), "--patch-size", "128", "--overlap", "32", "--quiet")
    assert res.returncode == 0, res.stderr
    cond = PatchStore.open(d / "c.zarr")
    root = create_prediction_store(d / "p.zarr", cond, {"roles": cond.roles, "nuclei": True})
    root["pred"][:] = rng.random(root["pred"].shape).astype(np.float16)
    root["divergence"][:] = rng.random(len(cond)).astype(np.float32)
    root["multimodal_fraction"][:] = 0.5
    root["shard_done"][:] = 1
    root.attrs["complete"] = True
    return d / "p.zarr"


@pytest.mark.slow(adds="a SIGKILL of `stitch` between canvas tiles of a 3072² map, in process and with worker processes")
@pytest.mark.parametrize("workers", ["1", "2"])  # in process / in worker processes that must die with it
def test_killed_stitch_resumes_to_the_identical_map(wide_prediction, tmp_path, workers):
    common = ["--band-mb", "1", "--workers", workers, "--quiet"]
    ref, killed = tmp_path / "ref.ome.zarr", tmp_path / "killed.ome.zarr"
    assert run_process("stitch", str(wide_prediction), "--out", str(ref), *common).returncode == 0
    partial = killed.with_name(killed.name + ".partial")
    kill_when(["stitch", str(wide_prediction), "--out", str(killed), *common], lambda: count_files(partial / "bands_done" / "c") >= 2)
    n_bands = zarr.open_group(str(partial), mode="r")["bands_done"].shape[0]
    finished = count_files(partial / "bands_done" / "c")
    assert 2 <= finished < n_bands and not killed.exists()
    time.sleep(1.0)
    assert count_files(partial / "bands_done" / "c") == finished, "a worker kept writing after its run was killed"
    res = run_process("stitch", str(wide_prediction), "--out", str(killed), "--resume", *common)
    assert res.returncode == 0, res.stderr
    a, b = zarr.open_group(str(ref), mode="r"), zarr.open_group(str(killed), mode="r")
    arrays = lambda g: {name: node for name, node in g.members(max_depth=None) if isinstance(node, zarr.Array)}  # noqa: E731
    assert dict(a.attrs) == dict(b.attrs) and sorted(arrays(a)) == sorted(arrays(b)) and "patch_maps/0" in arrays(a)
    for name, array in arrays(a).items():
        np.testing.assert_array_equal(np.asarray(array[:]), np.asarray(b[name][:]), err_msg=name)
