"""Prediction killed while tiling its inputs, sampling or writing the map resumes to the same map bit for
bit; a finished store of other settings is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from wsi_damm.tiling.store import PredictionStore

from .conftest import count_files, kill_when, predict_store, run_for_sampling, run_process, second_slide

KILL_ARGS = ["--sampler", "ddim", "--steps", "8", "--batch-size", "4", "--shard-patches", "4", "--quiet"]


@pytest.fixture(scope="module")
def uninterrupted(request, synth_dir, tmp_path_factory):
    """The map of an uninterrupted run, per sampling, computed once for every phase killed below."""
    refs: dict[str, Path] = {}

    def ref(sampling: str) -> Path:
        if sampling not in refs:
            out = tmp_path_factory.mktemp(f"ref_{sampling}") / "ref.zarr"
            res = run_process(
                "predict",
                str(run_for_sampling(request, sampling)),
                second_slide(synth_dir),
                "--out",
                str(out),
                "--sampling",
                sampling,
                *KILL_ARGS,
            )
            assert res.returncode == 0, res.stderr
            refs[sampling] = out
        return refs[sampling]

    return ref


@pytest.mark.slow(adds="a SIGKILL at an arbitrary moment of each phase of a real predict process, per sampling")
@pytest.mark.parametrize(
    "sampling,phase",
    [("canvas", "sampling"), ("shifted", "sampling"), ("independent", "sampling"), ("independent", "tiling"), ("independent", "stitching")],
)
def test_kill_and_resume_gives_the_identical_map(request, uninterrupted, synth_dir, tmp_path, sampling, phase):
    """Killed while tiling the inputs, sampling or writing the map, `--resume` finishes the same map bit for bit."""
    tiny_run = run_for_sampling(request, sampling)
    slide = second_slide(synth_dir)
    common = ["--sampling", sampling, *KILL_ARGS]
    ref = uninterrupted(sampling)
    out = tmp_path / "k.zarr"
    partial = out.with_name(out.name + ".partial")
    if phase == "tiling":  # the inputs' patch store is being written
        ready = lambda: count_files(tmp_path / "k.zarr.conditions.zarr.partial" / "shard_done" / "c") >= 1  # noqa: E731
    elif phase == "stitching":  # the prediction store is published; the map is being written
        ready = lambda: (tmp_path / "k.ome.zarr.partial").exists()  # noqa: E731
    elif sampling in ("canvas", "shifted"):  # killed while the canvas steps: at least one step done
        ready = lambda: (partial / "canvas" / "steps_done" / "c" / "0").exists()  # noqa: E731
    else:
        ready = lambda: count_files(partial / "shard_done" / "c") >= 3  # noqa: E731
    kill_when(["predict", str(tiny_run), slide, "--out", str(out), *common], ready, delay=0.0 if phase == "stitching" else 0.3)
    assert not (tmp_path / "k.ome.zarr").exists()
    res = run_process("predict", str(tiny_run), slide, "--out", str(out), "--resume", *common)
    assert res.returncode == 0, res.stderr
    np.testing.assert_array_equal(np.asarray(PredictionStore.open(ref).pred[:]), np.asarray(PredictionStore.open(out).pred[:]))
    ma = np.asarray(zarr.open_group(str(ref.with_name("ref.ome.zarr")), mode="r")["0"][:])
    mb = np.asarray(zarr.open_group(str(tmp_path / "k.ome.zarr"), mode="r")["0"][:])
    np.testing.assert_array_equal(ma, mb)


def test_resume_refuses_a_finished_store_of_other_settings(tiny_run, synth_dir, tmp_path):
    out = tmp_path / "p.zarr"
    predict_store(tiny_run, second_slide(synth_dir), out, "--no-stitch")
    res = run_process("predict", str(tiny_run), second_slide(synth_dir), "--out", str(out), "--steps", "5", "--resume", "--quiet")
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert "other settings" in res.stderr and f"wsi-damm stitch {out} --out <map> --resume" in res.stderr
