"""Any slide size works with the defaults. `tile` places the last row and column flush with the border and, where
that is off a 16-px grid, one more on the grid just inside; training on canvas latents leaves the flush ones out (their
pixels lie in the on-grid neighbours). So a 999-px slide trains and predicts, a store tiled before (flush rows only)
still trains, and a store whose stride is off the autoencoder's grid is refused before any training, naming the
cause and the command that fixes it."""

from __future__ import annotations

import shlex

import numpy as np
import pytest
from click.testing import CliRunner

from wsi_damm.stages.tile import run_tile
from wsi_damm.tiling.inputs import resolve_slides
from wsi_damm.tiling.plan import GRID_ALIGN, TileConfig
from wsi_damm.tiling.store import PatchStore
from wsi_damm.workflows.simulator import SynthConfig
from wsi_damm.workflows.synth import write_slides
from wsi_damm_cli.main import cli

from .conftest import TINY_TOML, built_once

CANVAS = ["--ae-local", "--latents", "canvas", "--quiet"]


@pytest.fixture(scope="session")
def odd_slides(tmp_path_factory):
    """Synthetic slides of 999, 1001 and 1026 px (none a multiple of 4 but 1026 of 2)."""

    def build(d):
        for n in (999, 1001, 1026):
            write_slides(d / str(n), 1, SynthConfig(size=n, seed=n), progress=False)

    d = built_once(tmp_path_factory, "odd_slides", build)
    return {n: d / str(n) / "synth_000.ome.tif" for n in (999, 1001, 1026)}


def _tile(slide, out, cfg: TileConfig) -> PatchStore:
    run_tile(resolve_slides([slide]), out, cfg, progress=False)
    return PatchStore.open(out)


def _train(store, run, tmp_path):
    (tmp_path / "tiny.toml").write_text(TINY_TOML)
    return CliRunner().invoke(cli, ["train", str(store), "--out", str(run), "--config", str(tmp_path / "tiny.toml"), *CANVAS])


@pytest.mark.parametrize("n", [999, 1001, 1026])
def test_default_tiling_covers_the_border_and_puts_a_row_on_the_grid(odd_slides, tmp_path, n):
    cfg = TileConfig(min_tissue=0.0)  # the defaults of `wsi-damm tile` (256-px patches, 64 px overlap), every patch kept
    ys = np.unique(_tile(odd_slides[n], tmp_path / "s.zarr", cfg).coords[:, 1])
    assert cfg.grid_align == GRID_ALIGN
    assert ys[-1] + cfg.patch_size == n  # the last row flush with the border: every pixel covered
    assert (np.diff(ys) <= cfg.stride).all()
    on_grid = ys[ys % GRID_ALIGN == 0]
    assert on_grid[-1] + cfg.patch_size > n - GRID_ALIGN  # on the grid, all but fewer than 16 border rows
    assert len(ys) - len(on_grid) == (0 if (n - cfg.patch_size) % GRID_ALIGN == 0 else 1)


def test_a_999_px_slide_trains_on_canvas_latents_and_predicts(odd_slides, tmp_path):
    store = _tile(odd_slides[999], tmp_path / "s.zarr", TileConfig(patch_size=64, overlap=16))
    assert (store.coords[:, 1:] % 4).any()  # the flush row and column
    res = _train(tmp_path / "s.zarr", tmp_path / "run", tmp_path)
    assert res.exit_code == 0, res.stderr
    assert "left out of training on canvas latents" in res.stderr
    res = CliRunner().invoke(
        cli, ["predict", str(tmp_path / "run"), str(odd_slides[999]), "--out", str(tmp_path / "p.zarr"), "--steps", "2"]
    )
    assert res.exit_code == 0, res.stderr
    assert (tmp_path / "p.ome.zarr").exists()


def test_a_store_tiled_before_trains(odd_slides, tmp_path):
    """Before, `tile` placed only the flush row and column: canvas training leaves them out and goes on."""
    store = _tile(odd_slides[999], tmp_path / "old.zarr", TileConfig(patch_size=64, overlap=16, align=1))
    assert (store.coords[:, 1:] % 4).any()
    res = _train(tmp_path / "old.zarr", tmp_path / "run", tmp_path)
    assert res.exit_code == 0, res.stderr


def test_a_stride_off_the_grid_is_refused_before_any_training(odd_slides, tmp_path):
    _tile(odd_slides[999], tmp_path / "s.zarr", TileConfig(patch_size=64, overlap=18))  # stride 46
    run = tmp_path / "run"
    res = _train(tmp_path / "s.zarr", run, tmp_path)
    assert res.exit_code == 2
    [line] = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert line.startswith(f"wsi-damm: error: {tmp_path / 's.zarr'}: has ") and "off the autoencoder's 4-pixel grid" in line
    assert "its stride (64 − 18 = 46 px) is not a multiple of 4" in line
    assert not run.exists() or not any(run.iterdir())  # refused before any training
    # the command it names makes a store whose stride is on the grid
    command = shlex.split(line.split("tile again: ")[1].split(";")[0].replace("NEW.zarr", str(tmp_path / "new.zarr")))
    assert command[:2] == ["wsi-damm", "tile"] and "--overlap" in command
    res = CliRunner().invoke(cli, [*command[1:], "--quiet"])
    assert res.exit_code == 0, res.stderr
    assert PatchStore.open(tmp_path / "new.zarr").attrs["stride"] % 4 == 0
