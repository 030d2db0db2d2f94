"""Any slide size works with the defaults: `tile` keeps every patch corner on a grid every autoencoder factor
divides, so a store of a 999-px slide trains on canvas latents and predicts; a store tiled before (its last row
and column flush with a border off that grid) is refused before any training, naming the cause and the command."""

from __future__ import annotations

import shlex

import numpy as np
import pytest
from click.testing import CliRunner

from wsi_damm.stages.tile import GRID_ALIGN, TileConfig, run_tile
from wsi_damm.store import PatchStore
from wsi_damm.tiling import grid_positions
from wsi_damm.workflows.synth import SynthConfig, write_slides
from wsi_damm_cli.main import cli

from .conftest import TINY_TOML, built_once


@pytest.fixture(scope="session")
def odd_slides(tmp_path_factory):
    """Synthetic slides of 999, 1001 and 1026 px (none a multiple of 4 but 1026 of 2)."""

    def build(d):
        for n in (999, 1001, 1026):
            write_slides(d / str(n), 1, SynthConfig(size=n, seed=n), progress=False)

    d = built_once(tmp_path_factory, "odd_slides", build)
    return {n: d / str(n) / "synth_000.ome.tif" for n in (999, 1001, 1026)}


@pytest.mark.parametrize("n", [999, 1001, 1026])
def test_default_tiling_keeps_every_corner_on_the_grid(odd_slides, tmp_path, n):
    cfg = TileConfig()  # the defaults of `wsi-damm tile`: 256-px patches, 64 px overlap
    run_tile([odd_slides[n]], tmp_path / "s.zarr", cfg, progress=False)
    store = PatchStore.open(tmp_path / "s.zarr")
    corners = store.coords[:, 1:]
    assert cfg.grid_align == GRID_ALIGN and not (corners % GRID_ALIGN).any()
    # the grid reaches the border but for less than the grid step: every border pixel but those few is covered
    pos = grid_positions(n, cfg.patch_size, cfg.stride, cfg.grid_align)
    assert n - GRID_ALIGN < pos[-1] + cfg.patch_size <= n
    assert (np.diff(pos) <= cfg.stride).all()  # no gap between neighbours
    assert set(np.unique(corners)) <= set(pos.tolist())


def test_a_999_px_slide_trains_on_canvas_latents_and_predicts(odd_slides, tmp_path):
    store = tmp_path / "s.zarr"
    run_tile([odd_slides[999]], store, TileConfig(patch_size=64, overlap=16), progress=False)
    (tmp_path / "tiny.toml").write_text(TINY_TOML)
    args = [
        "train",
        str(store),
        "--out",
        str(tmp_path / "run"),
        "--config",
        str(tmp_path / "tiny.toml"),
        "--ae-local",
        "--latents",
        "canvas",
        "--quiet",
    ]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.stderr
    res = CliRunner().invoke(
        cli, ["predict", str(tmp_path / "run"), str(odd_slides[999]), "--out", str(tmp_path / "p.zarr"), "--steps", "2", "--quiet"]
    )
    assert res.exit_code == 0, res.stderr
    assert (tmp_path / "p.ome.zarr").exists()


def test_a_store_tiled_before_is_refused_before_any_training(odd_slides, tmp_path):
    store = tmp_path / "old.zarr"
    run_tile([odd_slides[999]], store, TileConfig(patch_size=64, overlap=16, align=1), progress=False)  # as tile placed corners before
    assert (PatchStore.open(store).coords[:, 1:] % 4).any()
    (tmp_path / "tiny.toml").write_text(TINY_TOML)
    run = tmp_path / "run"
    res = CliRunner().invoke(
        cli,
        ["train", str(store), "--out", str(run), "--config", str(tmp_path / "tiny.toml"), "--ae-local", "--latents", "canvas", "--quiet"],
    )
    assert res.exit_code == 2
    [line] = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert line.startswith(f"wsi-damm: error: {store}: has ") and "off the autoencoder's 4-pixel grid" in line
    assert "flush with slide borders" in line and "999×999 px" in line
    assert f"tile again: wsi-damm tile {odd_slides[999]} --out NEW.zarr --patch-size 64 --overlap 16" in line
    assert not run.exists() or not any(run.iterdir())  # refused before any training
    # the command it names makes a store whose corners are all on the grid
    command = shlex.split(line.split("tile again: ")[1].split(";")[0].replace("NEW.zarr", str(tmp_path / "new.zarr")))
    assert command[0] == "wsi-damm"
    res = CliRunner().invoke(cli, [*command[1:], "--quiet"])
    assert res.exit_code == 0, res.stderr
    assert not (PatchStore.open(tmp_path / "new.zarr").coords[:, 1:] % 4).any()
