"""NP values comparable across slides: with a fixed or reference range, two slides whose NP differs by
a known factor give maps (read back in measured units) whose ratio is that factor."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr

from wsi_damm import api
from wsi_damm.slides import specs_from_paths
from wsi_damm.tiling.np_units import NpScale, np_scale
from wsi_damm.tiling.plan import TileConfig, reference_range
from wsi_damm.training.config import RunConfig
from wsi_damm.util.errors import InputError
from wsi_damm.workflows.patch_maps import patch_function_map

from .conftest import run_cli

CHANNELS = {"vessels": "CD31", "nuclei": "DAPI", "target": "NP"}


def _copy_with_np_scaled(src, dst, factor: float) -> None:
    """The same section with `factor` times the NP (a formulation taken up `factor` times as much)."""
    with tifffile.TiffFile(src) as tif:
        img = tif.series[0].levels[0].asarray()
        names = ["CD31", "DAPI", "NP"]
    img = img.astype(np.float64)
    img[names.index("NP")] *= factor
    tifffile.imwrite(
        dst,
        np.clip(np.rint(img), 0, 65535).astype(np.uint16),
        ome=True,
        resolution=(1e4 / 0.5, 1e4 / 0.5),
        resolutionunit="CENTIMETER",
        metadata={"axes": "CYX", "Channel": {"Name": names}, "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5},
    )


def _measured_mean(scale: NpScale, truth, tmp_path, name, tiff=None) -> dict:
    [spec] = specs_from_paths([truth], CHANNELS)
    rc = RunConfig(patch_size=128, mpp=0.5, roles=spec.roles, np_scale=scale)
    k = spec.roles.index("target")
    identity = lambda x, coords, context: (x[:, k : k + 1] + 1) / 2  # noqa: E731 (the measured NP patch: a perfect "model")
    m = patch_function_map(
        rc, spec, tmp_path / f"{name}.ome.zarr", identity, {}, progress=False, tiff=tiff, tiff_units="measured" if tiff else "normalised"
    )
    r = api.evaluate(m, truth=truth, out=tmp_path / f"{name}_report", viewer=False, quiet=True).metrics["slides"][0]
    return {"map": m, **r["measured_units"]}


def test_fixed_and_reference_ranges_keep_the_ratio_between_slides(small, tmp_path):
    dim = tmp_path / "dim.ome.tif"
    _copy_with_np_scaled(small, dim, 0.5)
    with tifffile.TiffFile(small) as tif:
        top = float(tif.series[0].levels[0].asarray()[2].max())
    for scale in (
        np_scale("fixed", (0.0, top)),
        np_scale(
            "reference",
            reference_range=reference_range(specs_from_paths([small], CHANNELS)[0], TileConfig(patch_size=128, mpp=0.5)),
            reference=str(small),
        ),
    ):
        tiff = tmp_path / f"bright_{scale.mode}.ome.tif"
        bright_m = _measured_mean(scale, small, tmp_path, f"bright_{scale.mode}", tiff=tiff)
        dim_m = _measured_mean(scale, dim, tmp_path, f"dim_{scale.mode}")
        ratio = dim_m["mean_predicted"] / bright_m["mean_predicted"]
        assert ratio == pytest.approx(0.5, rel=0.05), (scale.mode, ratio)
        assert dim_m["mean_measured"] / bright_m["mean_measured"] == pytest.approx(0.5, rel=0.01)
        info = dict(zarr.open_group(str(bright_m["map"]), mode="r").attrs)["wsi_damm"]
        assert info["np_normalisation"]["mode"] == scale.mode
        assert info["inverse_transform"]["scale"] == pytest.approx(scale.high - scale.low)
        # the OME-TIFF in measured units is the map's values through the inverse transform
        stored = np.asarray(zarr.open_group(str(bright_m["map"]), mode="r")["0"][0], dtype=np.float64)
        measured = tifffile.imread(tiff, level=0).astype(np.float64)
        np.testing.assert_allclose(measured, stored * (scale.high - scale.low) + scale.low, rtol=1e-5, atol=1e-3)

    # per slide (the paper's rule) both maps look alike: that is why the ratio needs a common range
    per_slide = _measured_mean(NpScale(), dim, tmp_path, "dim_slide")
    assert per_slide["comparable"] is False
    with pytest.raises(InputError, match="no common unit"):  # nothing to convert a per-slide map with
        _measured_mean(NpScale(), dim, tmp_path, "dim_slide_tiff", tiff=tmp_path / "no.ome.tif")
    assert not (tmp_path / "no.ome.tif").exists()


def test_tile_records_the_np_normalisation_and_refuses_incomplete_options(small, tmp_path):
    out = tmp_path / "ref.zarr"
    r = run_cli(
        "tile",
        str(small),
        "--out",
        str(out),
        "--patch-size",
        "128",
        "--mpp",
        "0.5",
        "--np-norm",
        "reference",
        "--np-reference",
        str(small),
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    attrs = dict(zarr.open_group(str(out), mode="r").attrs)
    norm = attrs.get("np_normalisation") or attrs["wsi_damm"]["np_normalisation"]
    [spec] = specs_from_paths([small], CHANNELS)
    assert norm["mode"] == "reference" and norm["reference"] == str(small)
    assert (norm["low"], norm["high"]) == pytest.approx(reference_range(spec, TileConfig(patch_size=128, mpp=0.5)))
    for bad, word in (
        (["--np-norm", "fixed"], "--np-range"),
        (["--np-norm", "fixed", "--np-range", "9"], "LO,HI"),
        (["--np-norm", "reference"], "--np-reference"),
    ):
        r = run_cli("tile", str(small), "--out", str(tmp_path / "bad.zarr"), "--patch-size", "128", "--quiet", *bad)
        assert r.returncode == 2 and word in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "bad.zarr").exists()


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
