"""`--device`, `--amp` and `--dist-timeout`: one meaning in train and predict, checked on CPU (the GPU
code is the same device-agnostic torch); and every option says what it does."""

from __future__ import annotations

import threading
import time

import click
import pytest
import torch
from safetensors.torch import load_file

from wsi_damm.stages.predict import GatedDenoiser
from wsi_damm.stages.train import run_training
from wsi_damm.training.checkpoint import load_state
from wsi_damm.training.config import RunConfig, TrainConfig, resolve
from wsi_damm.training.run_dir import RunDir, build_unet
from wsi_damm.util.devices import resolve_device
from wsi_damm.util.distributed import Ranks
from wsi_damm.util.errors import InputError
from wsi_damm.util.precision import amp_mode

from .conftest import count_files, run_cli


@pytest.fixture()
def two_gpus(monkeypatch):
    """A machine that reports two CUDA devices (torch.device objects need no GPU to exist)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_device_names_resolve_like_torch_devices(two_gpus):
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    assert resolve_device("CUDA") == torch.device("cuda:0")
    assert resolve_device("auto") == torch.device("cuda:0")
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda:1")  # torchrun: each rank its own GPU
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(InputError, match=r"cuda:2 does not exist: this machine has 2 CUDA device\(s\), cuda:0..cuda:1"):
        resolve_device("cuda:2")
    with pytest.raises(InputError, match="each rank uses cuda:LOCAL_RANK"):
        resolve_device("cuda:0", local_rank=1)


def test_unavailable_or_unknown_devices_are_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    for name, message in (
        ("cuda:0", "no CUDA device is available"),
        ("mps", "Metal backend is not available"),
        ("gpu", "unknown device 'gpu'"),
        ("cuda:x", "unknown device"),
    ):
        with pytest.raises(InputError, match=message):
            resolve_device(name)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("mps") == torch.device("mps")
    assert resolve_device("auto") == torch.device("mps")


def test_cli_refuses_a_bad_device_in_one_line(small_store, tmp_path):
    for args in (
        ["train", str(small_store), "--out", str(tmp_path / "r1"), "--device", "gpu0"],
        ["train", str(small_store), "--out", str(tmp_path / "r2"), "--device", "cuda:0"],
    ):
        r = run_cli(*args)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "--device" in lines[0]
    assert count_files(tmp_path) == 0


def test_amp_modes_and_runs_written_before_them():
    assert [amp_mode(v) for v in (None, False, True, "off", "bf16", "fp16")] == ["off", "off", "bf16", "off", "bf16", "fp16"]
    with pytest.raises(InputError, match="--amp"):
        amp_mode("fp8")
    assert TrainConfig(amp=True).amp == "bf16"  # config.json of older runs stored a flag
    assert RunConfig.from_dict({"train": {"amp": False}}).train.amp == "off"
    with pytest.raises(InputError, match="--dist-timeout"):
        resolve("tiny", flags={"train": {"dist_timeout_min": 0}})


def test_fp16_training_scales_gradients_and_resumes_exactly(small_store, tiny_toml, tmp_path):
    """fp16 with a gradient scaler: the scaler's state is checkpointed, so a resumed run is bitwise the
    uninterrupted one; and autocast really ran (the weights differ from an fp32 run)."""
    cfg = resolve("tiny", tiny_toml, {"train": {"amp": "fp16"}})
    full = run_training(small_store, tmp_path / "full", cfg, progress=False)
    part = tmp_path / "part"
    run_training(small_store, part, cfg, progress=False, stop_after=3)
    state = load_state(RunDir(part).last_checkpoint() / "state.pt")
    assert set(state["scaler"]) >= {"scale", "_growth_tracker"} and state["scaler"]["scale"] > 0
    run_training(small_store, part, cfg, resume=True, progress=False)
    a, b = load_file(str(full.unet)), load_file(str(RunDir(part).unet))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.isfinite(v).all() for v in a.values())
    fp32 = run_training(small_store, tmp_path / "fp32", resolve("tiny", tiny_toml), progress=False)
    c = load_file(str(fp32.unet))
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("mode,tolerance", [("bf16", 0.1), ("fp16", 0.02)])
def test_amp_in_sampling_stays_close_to_fp32(tiny_toml, mode, tolerance):
    cfg = resolve("tiny", tiny_toml)
    torch.manual_seed(0)
    model = build_unet(cfg).eval()
    with torch.no_grad():  # a trained-looking model: the output layers start at zero
        for p in model.parameters():
            p.normal_(0, 0.1)
    x, vessels, nuclei = (torch.randn(4, 2, 16, 16) for _ in range(3))  # latents of 64-px patches, 2 channels
    t = torch.tensor([10, 200, 500, 900])
    with torch.no_grad():
        ref = GatedDenoiser(model, vessels, nuclei, 0.5, True, "off")(x, t)
        low = GatedDenoiser(model, vessels, nuclei, 0.5, True, mode)(x, t)
    err = float((low - ref).abs().max() / ref.abs().max())
    assert 0 < err < tolerance  # autocast ran, and its rounding is small


def test_waiting_ranks_poll_without_a_collective(tmp_path):
    """While rank 0 tiles (unbounded time), the others wait on a file, not in a barrier that the
    process-group timeout would end: here no process group exists at all, so any collective would raise."""
    flag = tmp_path / "ranks_ready"
    threading.Timer(0.3, flag.touch).start()
    t0 = time.perf_counter()
    Ranks(rank=1, world=2).wait_until(flag.exists, poll_s=0.05)
    assert flag.exists() and time.perf_counter() - t0 >= 0.25
    assert not torch.distributed.is_initialized()


def test_every_option_says_what_it_does():
    from wsi_damm_cli.main import cli

    missing = {name: [p.opts[0] for p in cmd.params if isinstance(p, click.Option) and not p.help] for name, cmd in cli.commands.items()}
    assert not {k: v for k, v in missing.items() if v}
    r = run_cli("train", "--help")
    text = " ".join(r.stdout.split())
    assert "tiny 1000, paper 200000" in text and "tiny off, paper off" in text  # what the presets resolve to
    workers = {
        name: next(p.help for p in cmd.params if p.name == "workers")
        for name, cmd in cli.commands.items()
        if any(p.name == "workers" for p in cmd.params)
    }
    assert set(workers) == {"synth", "tile", "stitch"}
    assert all(h.startswith("Tasks run at once on this machine (default: all cores)") for h in workers.values())
    samples = next(p.help for p in cli.commands["predict"].params if p.name == "samples")
    assert "sd (channel 1)" in samples and "interval (channels 2 and 3)" in samples
