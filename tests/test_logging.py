"""Batch jobs: where no terminal is, progress is plain periodic lines (done / total, rate, ETA);
`--log-file` keeps them with timestamps, with the command and its errors; training metrics are
on disk between checkpoints."""

from __future__ import annotations

import logging
import re

from tests.conftest import TINY_TOML, kill_when, run_process
from wsi_damm.util.progress import LineProgress, progress_bar


def test_line_progress_reports_done_total_rate_and_eta(caplog, monkeypatch):
    monkeypatch.setenv("WSI_DAMM_PROGRESS_SECONDS", "0")
    with caplog.at_level(logging.INFO, logger="wsi_damm.util.progress"):
        for _ in progress_bar(range(40), desc="work", unit="item"):  # pytest's stderr is not a terminal
            pass
    lines = [r.getMessage() for r in caplog.records]
    assert lines and lines[-1].startswith("work: 40/40 item (100 %)") and "item/s" in lines[-1]
    assert any(re.match(r"work: \d+/40 item \(\d+ %\), [\d.e+]+ item/s, ETA ", line) for line in lines[:-1])


def test_line_progress_is_quiet_between_intervals(caplog, monkeypatch):
    monkeypatch.setenv("WSI_DAMM_PROGRESS_SECONDS", "3600")
    with caplog.at_level(logging.INFO, logger="wsi_damm.util.progress"):
        bar = LineProgress(total=1000, desc="slow")
        for _ in range(1000):
            bar.update(1)
        bar.close()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and messages[-1].startswith("slow: 1000/1000")  # the first update, then the end


def test_tile_logs_progress_lines_and_a_log_file(small, tmp_path):
    log = tmp_path / "logs" / "tile.log"
    res = run_process(
        "tile",
        str(small),
        "--out",
        str(tmp_path / "s.zarr"),
        "--patch-size",
        "128",
        "--overlap",
        "32",
        "--log-file",
        str(log),
        env={"WSI_DAMM_PROGRESS_SECONDS": "0"},
    )
    assert res.returncode == 0, res.stderr
    assert re.search(r"wsi-damm: tiling: \d+/\d+ shard \(100 %\)", res.stderr)
    text = log.read_text()
    assert "INFO wsi_damm.cli: wsi-damm tile " in text and re.search(
        r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ INFO wsi_damm.util.progress: tiling: ", text, re.M
    )
    res = run_process("tile", str(tmp_path / "missing.tif"), "--out", str(tmp_path / "t.zarr"), "--log-file", str(log))
    assert res.returncode == 2 and "ERROR wsi_damm.cli: " in log.read_text() and "missing.tif: no such file" in log.read_text()


def test_training_metrics_are_written_between_checkpoints(small_store, tmp_path):
    toml = tmp_path / "t.toml"
    toml.write_text(
        TINY_TOML.replace("steps = 6", "steps = 500").replace("checkpoint_every = 3", "checkpoint_every = 400\nmetrics_every = 5")
    )
    run = tmp_path / "run"
    metrics = run / "metrics.csv"
    kill_when(
        ["train", str(small_store), "--out", str(run), "--config", str(toml), "--quiet"],
        lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3,
    )
    assert not (run / "checkpoints" / "latest.json").exists()  # no checkpoint yet, and yet the curve is on disk
    assert metrics.read_text().splitlines()[0].startswith("step,phase,lr,loss")
