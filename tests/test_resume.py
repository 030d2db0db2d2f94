"""A SIGKILLed tiling run resumed with --resume equals an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

from .conftest import run_cli


@pytest.fixture(scope="module")
def big_slide(tmp_path_factory):
    out = tmp_path_factory.mktemp("big")
    res = run_cli("synth", str(out), "--slides", "1", "--size", "8192", "--seed", "5", "--quiet")
    assert res.returncode == 0, res.stderr
    return out / "synth_000.ome.tif"


def _done_shards(partial) -> int:
    d = partial / "shard_done" / "c"
    return len(list(d.iterdir())) if d.exists() else 0


def test_kill_then_resume_is_identical(big_slide, tmp_path):
    ref, killed = tmp_path / "ref.zarr", tmp_path / "killed.zarr"
    common = ["--patch-size", "256", "--overlap", "64", "--shard-patches", "32", "--workers", "1", "--quiet"]
    assert run_cli("tile", str(big_slide), "--out", str(ref), *common).returncode == 0

    cmd = [sys.executable, "-m", "wsi_damm_cli.main", "tile", str(big_slide), "--out", str(killed), *common]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    partial = killed.with_name(killed.name + ".partial")
    deadline = time.time() + 120
    while _done_shards(partial) < 5 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "tiling finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_total = zarr.open_group(str(partial), mode="r")["shard_done"].shape[0]
    assert 0 < _done_shards(partial) < n_total
    assert not killed.exists()  # a killed run never looks complete

    res = run_cli("tile", str(big_slide), "--out", str(killed), *common)
    assert res.returncode == 2 and "--resume" in res.stderr  # refuses to silently restart
    res = run_cli("tile", str(big_slide), "--out", str(killed), "--resume", *common)
    assert res.returncode == 0, res.stderr
    assert not partial.exists()

    a, b = zarr.open_group(str(ref), mode="r"), zarr.open_group(str(killed), mode="r")
    assert dict(a.attrs) == dict(b.attrs)
    for name in ("images", "coords", "tissue", "shard_done"):
        np.testing.assert_array_equal(np.asarray(a[name][:]), np.asarray(b[name][:]), err_msg=name)
