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

from wsi_damm.stages.train import run_training
from wsi_damm.training.config import resolve
from wsi_damm.training.run_dir import RunDir
from wsi_damm.util.errors import InputError

from .conftest import free_port, run_cli


def _metrics(run_dir):
    with open(run_dir / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_train_cli_writes_a_complete_run(small_store, tiny_toml, tmp_path):
    out = tmp_path / "run"
    res = run_cli("train", str(small_store), "--out", str(out), "--config", str(tiny_toml), "--steps", "12", "--quiet")
    assert res.returncode == 0, res.stderr
    for name in (
        "config.json",
        "unet_ema.safetensors",
        "unet.safetensors",
        "metrics.csv",
        "loss.png",
        "autoencoder_vessels.safetensors",
        "autoencoder_nuclei.safetensors",
        "autoencoder_target.safetensors",
    ):
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


@pytest.mark.slow(adds="two torchrun ranks training with gloo DDP keep identical parameters")
def test_two_rank_gloo_ddp_keeps_ranks_identical(small_store, tiny_toml, tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        "-m",
        "wsi_damm_cli.main",
        "train",
        str(small_store),
        "--out",
        str(out),
        "--config",
        str(tiny_toml),
        "--quiet",
    ]
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
    from wsi_damm.training.run_dir import ROLES_NEEDED, build_autoencoder

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
        if name in ("scale", "decoded_gain", "decoded_shift"):  # fitted after training, not stepped
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
    expected = [
        lr * (s + 1) / 50
        if s < 50
        else lr
        if schedule == "constant"
        else lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (s - 50) / (steps - 50))))
        for s in range(steps)
    ]
    assert logged == pytest.approx(expected, rel=1e-12)
    assert json.loads(run.config.read_text())["autoencoder"]["lr_schedule"] == schedule


def test_an_unknown_learning_rate_schedule_is_refused(tiny_toml):
    for section in ("train", "autoencoder"):
        with pytest.raises(InputError, match=f"{section}.lr_schedule"):
            resolve("tiny", tiny_toml, {section: {"lr_schedule": "linear"}})


def test_a_collapsed_autoencoder_stops_the_run_before_the_diffusion_stage(small_store, tiny_toml, tmp_path):
    """The guard: the ceiling of every autoencoder is written into the run; one whose decoder returns a flat image
    (what a sparse stain did to an L1-trained autoencoder) is refused in one line before any diffusion step,
    and --force trains regardless, saying so. The ceiling is checked against numpy on the same patches."""
    import numpy as np
    from click.testing import CliRunner

    from wsi_damm.tiling.store import PatchStore
    from wsi_damm.training.autoencoder_check import ceiling_of
    from wsi_damm.training.checkpoint import save_weights
    from wsi_damm.training.data import PatchImages
    from wsi_damm.training.run_dir import load_autoencoders, load_run_config
    from wsi_damm_cli.main import cli

    out = tmp_path / "run"
    toml = tmp_path / "guarded.toml"  # the tests' tiny settings with the guard on
    toml.write_text(tiny_toml.read_text().replace('on_collapse = "warn"', 'on_collapse = "stop"'))
    run_training(small_store, out, resolve("tiny", toml), stage="autoencoder", progress=False)
    run = RunDir(out)
    report = json.loads(run.ae_ceiling.read_text())
    assert set(report["roles"]) == {"vessels", "nuclei", "target"} and report["patches"] == "validation patches"
    aes = load_autoencoders(run, load_run_config(run))
    val = json.loads(run.validation.read_text())
    assert val["val_patches"] > 0
    # the same figure by brute force on a few patches
    store = PatchStore.open(small_store)
    images = PatchImages(store, np.arange(5))
    k = store.roles.index("target")
    with torch.no_grad():
        x = images.get(np.arange(5))[:, k : k + 1]
        y = aes["target"].decode(aes["target"].encode(x)).clamp(-1, 1)
    want = np.corrcoef(((x + 1) / 2).double().numpy().ravel(), ((y + 1) / 2).double().numpy().ravel())[0, 1]
    assert ceiling_of(aes["target"], images, k, torch.device("cpu"))["pearson_r"] == pytest.approx(want, abs=1e-9)

    with torch.no_grad():  # the collapse: the decoder's last layer returns its bias, a flat image
        aes["target"].decoder[-1].weight.zero_()
    save_weights(run.autoencoder("target"), aes["target"], {"role": "target", "factor": aes["target"].factor})
    runner = CliRunner()
    args = ["train", str(small_store), "--out", str(out), "--config", str(toml), "--stage", "diffusion", "--quiet"]
    res = runner.invoke(cli, args)
    assert res.exit_code == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert "the target autoencoder reconstructs its channel with Pearson's r nan, 0.00× its spread" in lines[0]
    assert "collapsed" in lines[0] and "--force" in lines[0]
    assert not run.unet.exists()
    after = json.loads(run.ae_ceiling.read_text())
    assert "target" in after["collapsed"] and after["roles"]["target"]["spread_ratio"] == 0
    from wsi_damm.training.run_info import run_summary

    shown = run_summary(out)["autoencoder_ceiling"]  # what `wsi-damm info RUN` prints
    assert shown["target"].endswith("COLLAPSED") and shown["measured on"] == "validation patches"
    assert report["roles"]["target"]["spread_ratio"] > 0
    res = runner.invoke(cli, [*args, "--force"])
    assert res.exit_code == 0, res.output
    assert "going on because of --force" in res.stderr and run.unet.exists()


def test_a_sparse_target_is_recognised_and_its_recipe_recorded(small_store, tiny_toml, tmp_path):
    """`autoencoder.sparse_target = "auto"`: the share of target pixels above 0.1 (checked by brute force on the store)
    decides SPARSE_RECIPE; the choice and the share are written into the run's config; "no" keeps the settings."""
    import numpy as np

    from wsi_damm.stages.train import bright_fraction
    from wsi_damm.tiling.store import PatchStore, read_rows
    from wsi_damm.training.config import SPARSE_BELOW, SPARSE_RECIPE, with_sparse_choice

    store = PatchStore.open(small_store)
    k = store.roles.index("target")
    rows = np.arange(len(store))
    want = float((read_rows(store.images, rows)[:, k].astype(np.float64) / 255 * 2 - 1 > -0.8).mean())
    assert bright_fraction(store, rows, k) == pytest.approx(want, abs=1e-12)

    base = resolve("tiny", tiny_toml)
    sparse = with_sparse_choice(replace_ae(base, local=True), True, 0.05).autoencoder
    assert {key: getattr(sparse, key) for key in SPARSE_RECIPE} == SPARSE_RECIPE and sparse.sparse_target == "yes"
    group = with_sparse_choice(base, True).autoencoder  # GroupNorm autoencoders keep their norm
    assert group.local_norm == base.autoencoder.local_norm and group.target_gamma == 0.5
    assert with_sparse_choice(base, False).autoencoder.lr_schedule == base.autoencoder.lr_schedule

    cfg = resolve("tiny", tiny_toml, {"autoencoder": {"sparse_target": "auto", "steps": 1}})
    run_training(small_store, tmp_path / "run", cfg, stage="autoencoder", progress=False)
    written = json.loads((tmp_path / "run" / "config.json").read_text())["autoencoder"]
    split = json.loads((tmp_path / "run" / "validation.json").read_text())
    assert written["target_bright_fraction"] is not None and split["train_patches"] > 0
    assert written["sparse_target"] == ("yes" if written["target_bright_fraction"] < SPARSE_BELOW else "no")
    assert (written["target_gamma"] == 0.5) == (written["sparse_target"] == "yes")


def replace_ae(cfg, **changes):
    from dataclasses import replace

    return replace(cfg, autoencoder=replace(cfg.autoencoder, **changes))


def test_the_real_inform_fields_sparse_channel_is_recognised_as_sparse(tmp_path):
    """A real sparse stain (the inForm field's Alexa 594: about 2.5 % of its pixels above 0.1 after its own
    percentile normalisation) gets the sparse recipe; the same field's dense DAPI as the target does not."""
    import numpy as np

    from wsi_damm.stages.tile import run_tile
    from wsi_damm.stages.train import bright_fraction
    from wsi_damm.tiling.inputs import resolve_slides
    from wsi_damm.tiling.plan import TileConfig
    from wsi_damm.tiling.store import PatchStore
    from wsi_damm.training.config import SPARSE_BELOW

    from .conftest import fixture

    field = fixture("fluorescence/phenoptr_FIHC4__0929309_HP_IM3_2_component_data.tif")
    shares = {}
    for target in ("Alexa 594", "DAPI"):
        out = tmp_path / f"{target.replace(' ', '_')}.zarr"
        run_tile(
            resolve_slides([field], channels=f"vessels=Cy5,nuclei=FITC,target={target}"),
            out,
            TileConfig(patch_size=64, overlap=16),
            progress=False,
        )
        store = PatchStore.open(out)
        shares[target] = bright_fraction(store, np.arange(len(store)), store.roles.index("target"))
    assert shares["Alexa 594"] < 0.05 < SPARSE_BELOW < shares["DAPI"]
