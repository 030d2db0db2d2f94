"""Training runs: outputs, exact resume, DDP on two CPU ranks, safe and clear loading."""

from __future__ import annotations

import csv
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from wsi_damm.config import resolve
from wsi_damm.errors import InputError
from wsi_damm.run_dir import RunDir
from wsi_damm.stages.train import run_training

from .conftest import free_port, run_cli


def _metrics(run_dir):
    with open(run_dir / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_train_cli_writes_a_complete_run(small_store, tiny_toml, tmp_path):
    out = tmp_path / "run"
    res = run_cli("train", str(small_store), "--out", str(out), "--config", str(tiny_toml), "--steps", "12", "--quiet")
    assert res.returncode == 0, res.stderr
    for name in ("config.json", "unet_ema.safetensors", "unet.safetensors", "metrics.csv", "loss.png",
                 "autoencoder_vessels.safetensors", "autoencoder_nuclei.safetensors", "autoencoder_target.safetensors"):
        assert (out / name).exists(), name
    assert not list(out.rglob("*.pkl")) and not list(out.rglob("*.pth"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["patch_size"] == 64 and cfg["train"]["steps"] == 12 and cfg["model"]["channels"] == [8, 16]
    vals = [float(r["val_loss"]) for r in _metrics(out) if r["val_loss"]]
    assert len(vals) == 4 and vals[-1] < vals[0]
    info = json.loads(run_cli("info", str(out), "--json").stdout)
    assert info["steps_done"] == 12 and info["finished"] and info["parameters"]["total"] > 0


def test_resume_continues_on_the_same_curve(small_store, tiny_toml, tmp_path):
    cfg = resolve("tiny", tiny_toml)
    full = run_training(small_store, tmp_path / "full", cfg, progress=False)
    part = tmp_path / "part"
    run_training(small_store, part, cfg, progress=False, stop_after=3)
    assert (RunDir(part).last_checkpoint() / "state.pt").exists() and not (part / "unet_ema.safetensors").exists()
    run_training(small_store, part, cfg, resume=True, progress=False)
    a, b = load_file(str(full.unet)), load_file(str(RunDir(part).unet))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    strip = lambda rows: [{k: v for k, v in r.items() if k != "steps_per_s"} for r in rows]  # noqa: E731
    assert strip(_metrics(full.path)) == strip(_metrics(part))


def test_two_rank_gloo_ddp_keeps_ranks_identical(small_store, tiny_toml, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "wsi_damm_cli.main", "train", str(small_store), "--out", str(out), "--config", str(tiny_toml), "--quiet"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    state = json.loads((out / "training_state.json").read_text())
    sums = state["ddp_param_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]
    assert state["world_size"] == 2 and (out / "unet_ema.safetensors").exists()


def test_truncated_weights_are_a_clear_error(small_store, tiny_toml, tmp_path):
    cfg = resolve("tiny", tiny_toml)
    run = run_training(small_store, tmp_path / "r", cfg, stage="autoencoder", progress=False)
    path = run.autoencoder("nuclei")
    path.write_bytes(path.read_bytes()[:100])
    res = run_cli("train", str(small_store), "--out", str(run.path), "--config", str(tiny_toml), "--stage", "diffusion")
    assert res.returncode == 2 and "autoencoder_nuclei.safetensors" in res.stderr and "Traceback" not in res.stderr


def test_malicious_pickle_is_refused_without_running(small_store, tiny_toml, tmp_path):
    cfg = resolve("tiny", tiny_toml)
    run = run_training(small_store, tmp_path / "m", cfg, progress=False, stop_after=3)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (run.last_checkpoint() / "state.pt").write_bytes(pickle.dumps({"step": Evil()}))
    with pytest.raises(InputError, match="refused to load"):
        run_training(small_store, run.path, cfg, resume=True, progress=False)
    assert not marker.exists()


def test_store_with_other_patch_size_is_refused(small_store, synth_dir, tiny_toml, tmp_path):
    cfg = resolve("tiny", tiny_toml)
    run = run_training(small_store, tmp_path / "p", cfg, stage="autoencoder", progress=False)
    other = tmp_path / "other.zarr"
    slide = str(sorted(synth_dir.glob("*.ome.tif"))[0])
    assert run_cli("tile", slide, "--out", str(other), "--patch-size", "128", "--overlap", "0", "--mpp", "2.0", "--quiet").returncode == 0
    res = run_cli("train", str(other), "--out", str(run.path), "--config", str(tiny_toml))
    assert res.returncode == 2 and "64-px" in res.stderr and "128-px" in res.stderr


def test_autoencoder_weight_decay_comes_from_the_config(small_store, tiny_toml, tmp_path):
    """One step apart in weight decay alone, AdamW's decoupled decay moves every weight by exactly
    −lr·Δwd·w₀ (Loshchilov & Hutter): the Adam part of the step is the same, so the config's value is
    the one the optimiser used."""
    from wsi_damm.run_dir import ROLES_NEEDED, build_autoencoder

    base = resolve("tiny", tiny_toml, {"autoencoder": {"steps": 1}})
    weights = {}
    for wd in (0.0, 0.5):
        cfg = resolve("tiny", tiny_toml, {"autoencoder": {"steps": 1, "weight_decay": wd}})
        run = run_training(small_store, tmp_path / f"wd{wd}", cfg, stage="autoencoder", progress=False)
        weights[wd] = load_file(str(run.autoencoder("target")))
        assert json.loads(run.config.read_text())["autoencoder"]["weight_decay"] == wd
    torch.manual_seed(base.train.seed)
    initial = [build_autoencoder(base).state_dict() for _ in ROLES_NEEDED][ROLES_NEEDED.index("target")]  # built in this order
    lr0 = base.autoencoder.lr / 50  # the first step of the autoencoders' warm-up
    for name, w0 in initial.items():
        if name == "scale":
            continue
        moved = weights[0.5][name].double() - weights[0.0][name].double()
        rounding = 4 * torch.finfo(torch.float32).eps * (w0.double().abs() + lr0)  # float32 weights, a few ulps
        assert ((moved + lr0 * 0.5 * w0.double()).abs() <= rounding).all(), name
    assert base.autoencoder.weight_decay == 0.01  # torch's AdamW default, which the README's autoencoders were trained with


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_autoencoder_learning_rate_follows_its_schedule(small_store, tiny_toml, tmp_path, schedule):
    """The rate the autoencoders stepped with (logged per step) against the closed form: linear warm-up
    over 50 steps, then constant or a half cosine from lr down to lr/10 at the last step."""
    import math

    steps = 60
    cfg = resolve("tiny", tiny_toml, {"autoencoder": {"steps": steps, "lr_schedule": schedule}})
    run = run_training(small_store, tmp_path / schedule, cfg, stage="autoencoder", progress=False)
    with open(run.ae_metrics, newline="") as fh:
        logged = [float(r["lr"]) for r in csv.DictReader(fh)]
    lr = cfg.autoencoder.lr
    expected = [lr * (s + 1) / 50 if s < 50 else
                lr if schedule == "constant" else lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (s - 50) / (steps - 50))))
                for s in range(steps)]
    assert logged == pytest.approx(expected, rel=1e-12)
    assert json.loads(run.config.read_text())["autoencoder"]["lr_schedule"] == schedule


def test_an_unknown_learning_rate_schedule_is_refused(tiny_toml):
    for section in ("train", "autoencoder"):
        with pytest.raises(InputError, match=f"{section}.lr_schedule"):
            resolve("tiny", tiny_toml, {section: {"lr_schedule": "linear"}})
