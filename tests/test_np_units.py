"""NP values comparable across slides: with a fixed or reference range, two slides whose NP differs by
a known factor give maps (read back in measured units) whose ratio is that factor."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr

from wsi_damm import api
from wsi_damm.config import RunConfig
from wsi_damm.errors import InputError
from wsi_damm.np_units import NpScale, np_scale
from wsi_damm.slides import specs_from_paths
from wsi_damm.tile import TileConfig, reference_range
from wsi_damm.workflows.patch_maps import patch_function_map

CHANNELS = {"vessels": "CD31", "nuclei": "DAPI", "target": "NP"}


def _copy_with_np_scaled(src, dst, factor: float) -> None:
    """The same section with `factor` times the NP (a formulation taken up `factor` times as much)."""
    with tifffile.TiffFile(src) as tif:
        img = tif.series[0].levels[0].asarray()
        names = ["CD31", "DAPI", "NP"]
    img = img.astype(np.float64)
    img[names.index("NP")] *= factor
    tifffile.imwrite(dst, np.clip(np.rint(img), 0, 65535).astype(np.uint16), ome=True, resolution=(1e4 / 0.5, 1e4 / 0.5),
                     resolutionunit="CENTIMETER", metadata={"axes": "CYX", "Channel": {"Name": names}, "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})


def _measured_mean(path, scale: NpScale, truth, tmp_path, name) -> dict:
    [spec] = specs_from_paths([truth], CHANNELS)
    rc = RunConfig(patch_size=128, mpp=0.5, roles=spec.roles, np_scale=scale)
    k = spec.roles.index("target")
    identity = lambda x, coords: (x[:, k : k + 1] + 1) / 2  # noqa: E731 (the measured NP patch: a perfect "model")
    m = patch_function_map(rc, spec, tmp_path / f"{name}.ome.zarr", identity, {}, progress=False)
    r = api.evaluate(m, truth=truth, out=tmp_path / f"{name}_report", viewer=False, quiet=True).metrics["slides"][0]
    return {"map": m, **r["measured_units"]}


def test_fixed_and_reference_ranges_keep_the_ratio_between_slides(small, tmp_path):
    dim = tmp_path / "dim.ome.tif"
    _copy_with_np_scaled(small, dim, 0.5)
    with tifffile.TiffFile(small) as tif:
        top = float(tif.series[0].levels[0].asarray()[2].max())
    for scale in (np_scale("fixed", (0.0, top)),
                  np_scale("reference", reference_range(specs_from_paths([small], CHANNELS)[0], TileConfig(patch_size=128, mpp=0.5)),
                           reference=str(small))):
        bright_m = _measured_mean(None, scale, small, tmp_path, f"bright_{scale.mode}")
        dim_m = _measured_mean(None, scale, dim, tmp_path, f"dim_{scale.mode}")
        ratio = dim_m["mean_predicted"] / bright_m["mean_predicted"]
        assert ratio == pytest.approx(0.5, rel=0.05), (scale.mode, ratio)
        assert dim_m["mean_measured"] / bright_m["mean_measured"] == pytest.approx(0.5, rel=0.01)
        info = dict(zarr.open_group(str(bright_m["map"]), mode="r").attrs)["wsi_damm"]
        assert info["np_normalisation"]["mode"] == scale.mode
        assert info["inverse_transform"]["scale"] == pytest.approx(scale.high - scale.low)

    # per slide (the paper's rule) both maps look alike: that is why the ratio needs a common range
    per_slide = _measured_mean(None, NpScale(), dim, tmp_path, "dim_slide")
    assert per_slide["comparable"] is False


def test_np_options_are_checked():
    with pytest.raises(InputError, match="--np-range"):
        np_scale("fixed", None)
    with pytest.raises(InputError, match="LO < HI"):
        np_scale("fixed", "5,1")
    with pytest.raises(InputError, match="--np-reference"):
        np_scale("reference", None)
    with pytest.raises(InputError, match="no common unit"):
        NpScale().to_measured(np.zeros(2))
    assert NpScale("fixed", 10.0, 110.0).to_measured(np.array([0.0, 0.5, 1.0])).tolist() == [10.0, 60.0, 110.0]
    assert RunConfig.from_dict({"np_scale": {"mode": "fixed", "low": 1.0, "high": 2.0}}).np_scale.range == (1.0, 2.0)
