"""The Python API: the whole pipeline through `wsi_damm.tile` & co. on a tiny synthetic slide, its result
objects checked against the files written."""

from __future__ import annotations

import json

import pytest

import wsi_damm
import wsi_damm.stages.tile  # noqa: F401 (importing a stage module must not shadow the function of its name)
from tests.conftest import TINY_TOML
from wsi_damm import api
from wsi_damm.tiling.store import PatchStore, PredictionStore
from wsi_damm.util.errors import InputError


def test_the_pipeline_from_python(tmp_path):
    assert all(getattr(wsi_damm, name) is getattr(api, name) for name in wsi_damm.__all__ if name != "__version__")
    made = wsi_damm.synth(tmp_path / "slides", slides=2, size=768, seed=5, quiet=True)
    assert [p.name for p in made.slides] == ["synth_000.ome.tif", "synth_001.ome.tif"] and all(p.exists() for p in made.slides + made.clean)

    tiled = wsi_damm.tile(made.slides[:1], out=tmp_path / "s.zarr", patch_size=64, overlap=16, mpp=2.0, quiet=True)
    store = PatchStore.open(tiled.store)
    assert tiled.patches == len(store) > 0 and tiled.roles == store.roles == ["vessels", "nuclei", "target"]
    assert (tiled.qc / "synth_000.png").exists()

    (tmp_path / "tiny.toml").write_text(TINY_TOML)
    run = wsi_damm.train(tiled.store, out=tmp_path / "run", config=tmp_path / "tiny.toml", quiet=True)
    assert run.weights == run.run / "unet_ema.safetensors" and run.weights.exists() and run.metrics.exists() and run.loss_plot.exists()
    assert json.loads(run.config.read_text())["train"]["val_split"] == "region"  # one slide: a held-out region validates

    pred = wsi_damm.predict(run.run, made.slides[1], out=tmp_path / "p.zarr", steps=3, samples=2, quiet=True)
    assert pred.patches == len(PredictionStore.open(pred.store)) > 0
    assert pred.maps == [tmp_path / "p.ome.zarr"] and pred.maps[0].exists() and (pred.qc / "synth_001.png").exists()

    again = wsi_damm.stitch(pred.store, out=tmp_path / "again.ome.zarr", blend="linear", quiet=True)
    assert again == [tmp_path / "again.ome.zarr"]

    report = wsi_damm.evaluate(
        pred.maps, truth=[made.slides[1]], clean=[made.clean[1]], regions=[made.divergence[1]], out=tmp_path / "report", quiet=True
    )
    on_disk = json.loads(report.metrics_path.read_text())
    assert report.report.exists() and report.viewers == [tmp_path / "report" / "viewer_synth_001.html"] and report.viewers[0].exists()
    assert on_disk["slides"][0]["wsi"]["ssim_tissue"] == report.metrics["slides"][0]["wsi"]["ssim_tissue"]

    same = api.compare(pred.maps[0], pred.maps[0])
    assert same["ssim"] == pytest.approx(1.0)


def test_api_errors_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        wsi_damm.tile([tmp_path / "missing.ome.tif"], out=tmp_path / "s.zarr")
    with pytest.raises(InputError, match="one --truth per map"):
        wsi_damm.evaluate([tmp_path / "a.ome.zarr", tmp_path / "b.ome.zarr"], truth=[tmp_path / "a.ome.tif"])
