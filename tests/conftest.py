"""Fixtures: synthetic slides made once per session, the reference data, the real-file folder."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n 2` (the README's test command): one thread per worker and per process it starts, so two
    # workers share the two cores without oversubscribing them; set before any test module imports torch
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = "1"

SHARED = Path(__file__).resolve().parents[2] / "shared"  # third-party real files, when present
FIXTURES = SHARED / "fixtures"
DATA = Path(__file__).resolve().parent / "data"  # reference numbers the tests need, kept with them


def pytest_collection_modifyitems(config, items) -> None:
    """Every slow-tier test says in one line what it adds to the fast tier's cover (`@pytest.mark.slow(adds=...)`)."""
    for item in items:
        for mark in item.iter_markers("slow"):
            if not mark.kwargs.get("adds"):
                raise pytest.UsageError(f'{item.nodeid}: @pytest.mark.slow needs adds="what this test adds"')


def run_process(*args: str, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    """Run `wsi-damm …` in a subprocess exactly as a user would: for tests about processes (kill, resume, the
    console script's exit code)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **kw.pop("env", {})}
    return subprocess.run(
        [sys.executable, "-m", "wsi_damm_cli.main", *args], capture_output=True, text=True, timeout=timeout, env=env, **kw
    )


def run_cli(*args: str, timeout: float | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `wsi-damm …` in this process through click's runner and answer as `run_process` would: exit code, stdout,
    stderr (warnings ignored, as there), and for an exception that would have been a traceback, exit code 1 with
    the traceback on stderr. Saves starting an interpreter and importing torch for every command."""
    import traceback
    import warnings

    from click.testing import CliRunner

    from wsi_damm_cli.main import cli

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = CliRunner().invoke(cli, list(args), env=env)
    code, err = res.exit_code, res.stderr
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        code, err = 1, err + "".join(traceback.format_exception(*res.exc_info))
    return subprocess.CompletedProcess(["wsi-damm", *args], code, res.stdout, err)


def kill_when(argv: list[str], ready: Callable[[], bool], delay: float = 0.0, timeout: float = 240) -> None:
    """Start `wsi-damm argv` and SIGKILL it once `ready()` holds, `delay` s later: an interruption at an arbitrary point."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "wsi_damm_cli.main", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline and not ready():
        time.sleep(0.005)
    time.sleep(delay)
    assert proc.poll() is None, f"`wsi-damm {argv[0]}` finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def free_port() -> int:
    """A TCP port nobody listens on now: torchrun's rendezvous, so tests on parallel workers never collide."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def count_files(folder: Path) -> int:
    return len(list(folder.iterdir())) if folder.exists() else 0


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """A folder `build` fills once per pytest run and every xdist worker then reads: the first worker to ask
    builds it under a file lock, the others wait and reuse it. Tests read these folders, never write into them."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    path = root / "built_once" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not (path.parent / f"{name}.done").exists():
            shutil.rmtree(path, ignore_errors=True)  # what a worker that failed half-way left
            path.mkdir()
            build(path)
            (path.parent / f"{name}.done").touch()
    return path


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """Two 2048² synthetic slides (the size the tiling acceptance test names)."""

    def build(out: Path) -> None:
        res = run_cli("synth", str(out), "--slides", "2", "--size", "2048", "--seed", "3", "--quiet")
        assert res.returncode == 0, res.stderr

    return built_once(tmp_path_factory, "synth", build)


@pytest.fixture(scope="session")
def small(tmp_path_factory) -> Path:
    """One 1024² synthetic slide (CD31, DAPI, NP; 0.5 µm/px, two pyramid levels)."""
    from wsi_damm.workflows.simulator import SynthConfig
    from wsi_damm.workflows.synth import write_slides

    out = built_once(tmp_path_factory, "small", lambda d: write_slides(d, 1, SynthConfig(size=1024, seed=7), progress=False))
    return out / "synth_000.ome.tif"


@pytest.fixture(scope="session")
def small_map(small, tmp_path_factory) -> Path:
    """A map of the `small` slide without a model: its own CD31 channel as the 'prediction' (so it has
    structure), a known divergence ramp and gate share; `c.zarr` (tiled), `p.zarr` (prediction store),
    `m.ome.zarr` (stitched) in the returned folder."""
    return built_once(tmp_path_factory, "small_map", lambda d: _fake_map(small, d))


def _fake_map(small: Path, d: Path) -> None:
    import numpy as np

    from wsi_damm.tiling.store import PatchStore, create_prediction_store

    res = run_cli("tile", str(small), "--out", str(d / "c.zarr"), "--patch-size", "128", "--overlap", "32", "--quiet")
    assert res.returncode == 0, res.stderr
    cond = PatchStore.open(d / "c.zarr")
    root = create_prediction_store(d / "p.zarr", cond, {"roles": cond.roles, "nuclei": True, "model": {"dammp": True, "gamma": 0.5}})
    root["pred"][:] = (np.asarray(cond.images[:, :1]) / 255.0).astype(np.float16)
    root["divergence"][:] = np.linspace(0, 1, len(cond)).astype(np.float32)
    root["multimodal_fraction"][:] = 0.75
    root["shard_done"][:] = 1
    root.attrs["complete"] = True
    res = run_cli("stitch", str(d / "p.zarr"), "--out", str(d / "m.ome.zarr"), "--quiet")
    assert res.returncode == 0, res.stderr


def fixture(rel: str) -> Path:
    path = FIXTURES / rel
    if not path.exists():
        pytest.skip(f"shared fixture {rel} not available")
    return path


@pytest.fixture(scope="session")
def small_store(synth_dir, tmp_path_factory) -> Path:
    """A small 64-px patch store at 2 µm/px from the two synthetic slides (~200 patches)."""

    def build(d: Path) -> None:
        slides = sorted(str(p) for p in synth_dir.glob("*.ome.tif"))
        res = run_cli("tile", *slides, "--out", str(d / "small.zarr"), "--patch-size", "64", "--overlap", "16", "--mpp", "2.0", "--quiet")
        assert res.returncode == 0, res.stderr

    return built_once(tmp_path_factory, "small_store", build) / "small.zarr"


# the paper's recipe (patch latents, GroupNorm autoencoders); the canvas recipe has fixtures of its own
TINY_TOML = """
[autoencoder]
factor = 4
latent_channels = 2
channels = [8, 16]
steps = 8
batch_size = 8
local = false
on_collapse = "warn"  # 8 steps do not make a usable autoencoder; the guard has tests of its own
sparse_target = "no"  # the settings above as they are, whatever the target's sparsity

[model]
channels = [8, 16]
res_blocks = 1
heads = 2
latents = "patch"

[train]
steps = 6
batch_size = 4
val_every = 3
log_every = 1
checkpoint_every = 3
ema_decay = 0.9
lr_warmup_steps = 1

[damm]
warmup_fraction = 0.5
"""


@pytest.fixture()
def tiny_toml(tmp_path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_TOML)
    return path


# the runs the prediction tests sample: trained once per pytest run, read by every worker
@pytest.fixture(scope="session")
def tiny_run(small_store, tmp_path_factory):
    """A tiny run for independent and canvas sampling. Conditioned on context too, so every prediction test
    also checks that the context windows follow their patches through batching, ranks, resume and canvas sampling."""
    from wsi_damm.stages.train import run_training
    from wsi_damm.training.config import resolve

    def build(d: Path) -> None:
        (d / "tiny.toml").write_text(TINY_TOML)
        run_training(small_store, d / "run", resolve("tiny", d / "tiny.toml", {"model": {"context_span": 4}}), progress=False)

    return built_once(tmp_path_factory, "tiny_run", build) / "run"


@pytest.fixture(scope="session")
def canvas_run(small_store, tmp_path_factory):
    """Trained for shifted-grid sampling: local autoencoders, the U-Net on canvas-latent crops; with
    context 2 patches wide (resampled to the latent grid), cut where each window lies."""
    from wsi_damm.stages.train import run_training
    from wsi_damm.training.config import resolve

    def build(d: Path) -> None:
        (d / "tiny.toml").write_text(TINY_TOML)
        flags = {"autoencoder": {"local": True}, "model": {"latents": "canvas", "context_span": 2}}
        run_training(small_store, d / "run", resolve("tiny", d / "tiny.toml", flags), progress=False)

    return built_once(tmp_path_factory, "canvas_run", build) / "run"


def run_for_sampling(request, sampling: str):
    """The run each sampling needs: shifted grids sample runs trained on canvas latents."""
    return request.getfixturevalue("canvas_run" if sampling == "shifted" else "tiny_run")


def second_slide(synth_dir) -> str:
    """The slide the prediction tests predict (the second of `synth_dir`)."""
    return str(sorted(synth_dir.glob("*.ome.tif"))[1])


def predict_store(run, slide, out, *extra):
    """`wsi-damm predict` with 4 steps, as a user would; its prediction store."""
    from wsi_damm.tiling.store import PredictionStore

    res = run_cli("predict", str(run), slide, "--out", str(out), "--steps", "4", "--quiet", *extra)
    assert res.returncode == 0, res.stderr
    return PredictionStore.open(out)
