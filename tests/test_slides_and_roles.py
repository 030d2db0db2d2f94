"""Readers, roles and manifests, on small generated files."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from wsi_damm.slides import parse_channel_map, specs_from_manifest, specs_from_paths
from wsi_damm.tiling.store import PatchStore
from wsi_damm.util.errors import InputError

from .conftest import run_cli


def test_channel_map_parsing_and_errors():
    assert parse_channel_map("vessels=CD31, nuclei=1,target=R") == {"vessels": "CD31", "nuclei": "1", "target": "R"}
    with pytest.raises(InputError, match="unknown role"):
        parse_channel_map("vesels=CD31")
    with pytest.raises(InputError, match="given twice"):
        parse_channel_map("vessels=0,vessels=1")


def test_role_errors_list_the_channels(small):
    with pytest.raises(InputError, match="channels are: CD31, DAPI, NP"):
        specs_from_paths([small], {"vessels": "PECAM"})
    with pytest.raises(InputError, match="both point to channel"):
        specs_from_paths([small], {"vessels": "0", "nuclei": "CD31"})
    with pytest.raises(InputError, match="missing role"):
        specs_from_paths([small], {"nuclei": "DAPI"})


def _write_single(path, plane, mpp=0.5):
    tifffile.imwrite(
        path,
        plane,
        tile=(128, 128),
        compression="zlib",
        photometric="minisblack",
        resolution=(1e4 / mpp, 1e4 / mpp),
        resolutionunit="CENTIMETER",
    )


def test_manifest_assembles_per_channel_files(small, tmp_path):
    full = tifffile.imread(small)
    for i, name in enumerate(("cd31", "dapi", "np")):
        _write_single(tmp_path / f"s_{name}.tif", full[i])
    (tmp_path / "m.csv").write_text("slide_id,vessels,nuclei,target\nS1,s_cd31.tif,s_dapi.tif,s_np.tif\n")
    specs = specs_from_manifest(tmp_path / "m.csv")
    with specs[0].open() as s:
        assert s.channel_names == ["vessels", "nuclei", "target"] and s.mpp == pytest.approx(0.5)
        np.testing.assert_array_equal(s.read_region(0, 10, 20, 30, 40), full[:, 10:40, 20:60])
    out = tmp_path / "st.zarr"
    res = run_cli("tile", "--manifest", str(tmp_path / "m.csv"), "--out", str(out), "--patch-size", "128", "--overlap", "32", "--quiet")
    assert res.returncode == 0, res.stderr
    assert PatchStore.open(out).slides[0]["slide_id"] == "S1"


def test_manifest_with_mismatched_shapes_is_refused(small, tmp_path):
    full = tifffile.imread(small)
    _write_single(tmp_path / "a.tif", full[0])
    _write_single(tmp_path / "b.tif", full[1, :1000, :1000])
    (tmp_path / "m.csv").write_text("slide_id,vessels,nuclei\nS1,a.tif,b.tif\n")
    res = run_cli("tile", "--manifest", str(tmp_path / "m.csv"), "--out", str(tmp_path / "o.zarr"))
    assert res.returncode == 2 and "b.tif" in res.stderr and "same height and width" in res.stderr
    assert not (tmp_path / "o.zarr").exists()
