"""wsi-damm from Python: one function per command, taking paths and keyword options with the CLI's
names and defaults (`--patch-size` → `patch_size`), returning a small result object. The CLI is a
thin layer over these.

    import wsi_damm as wd
    wd.synth("slides", slides=3, size=2048)
    store = wd.tile(["slides/synth_000.ome.tif", "slides/synth_001.ome.tif"], out="s.zarr", patch_size=128, overlap=32)
    run = wd.train(store.store, out="run", steps=1000)
    pred = wd.predict(run.run, ["slides/synth_002.ome.tif"], out="p.zarr", samples=4)
    report = wd.evaluate(pred.maps, truth=["slides/synth_002.ome.tif"], out="report")
    report.metrics["slides"][0]["wsi"]["ssim_tissue"]
"""

from wsi_damm.api.commands import calibrate, predict, synth, tile, train
from wsi_damm.api.maps import compare, evaluate, export, stitch
from wsi_damm.api.results import EvaluateResult, PredictResult, SynthResult, TileResult, TrainResult

__all__ = [
    "synth",
    "tile",
    "train",
    "predict",
    "calibrate",
    "stitch",
    "evaluate",
    "compare",
    "export",
    "SynthResult",
    "TileResult",
    "TrainResult",
    "PredictResult",
    "EvaluateResult",
]
