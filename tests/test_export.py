"""`wsi-damm export` for QuPath: the aligned OME-TIFF's channels and scale read back with tifffile,
the high-NP regions and the patches come back through the GeoJSON reader as they were written."""

from __future__ import annotations

import json

import numpy as np
import shapely
import tifffile
from skimage import measure

from tests.conftest import run_cli
from wsi_damm.slides.annotations import Annotations, read_regions
from wsi_damm.stages.export import polygons_from_mask
from wsi_damm.stitching.slide_map import open_map
from wsi_damm.tiling.store import PredictionStore


def test_mask_to_polygons_keeps_holes_and_areas():
    mask = np.zeros((60, 80), bool)
    mask[10:40, 10:50] = True
    mask[20:30, 20:30] = False  # a hole
    mask[45:55, 60:75] = True  # a second region
    polys = polygons_from_mask(mask, 4.0)
    assert len(polys) == 2 and sum(len(p.interiors) for p in polys) == 1
    # rasterised back by pixel centres at the same scale: the mask again, up to the traced corners
    back = Annotations(None, [type("R", (), {"name": "x", "geometry": shapely.MultiPolygon(polys)})()]).labels(0, 0, 60, 80, 4.0) > 0
    assert (back != mask).sum() <= 8  # marching squares cuts each convex corner by half a pixel


def test_nested_regions_alternate_outline_and_hole():
    """Concentric bands four rings deep, and a grain in every hole: each outline keeps only the holes right inside it."""
    yy, xx = np.mgrid[:120, :120]
    mask = (np.hypot(yy - 60, xx - 60).astype(int) // 8) % 2 == 0
    mask[5:8, 5:8] = True
    polys = polygons_from_mask(mask, 1.0)
    assert all(p.is_valid for p in polys)
    labels = measure.label(mask, connectivity=2)
    assert len(polys) == labels.max()  # one polygon per 8-connected region (marching squares joins diagonal pixels)
    back = Annotations(None, [type("R", (), {"name": "x", "geometry": shapely.MultiPolygon(polys)})()]).labels(0, 0, 120, 120, 1.0) > 0
    assert (back != mask).sum() <= 0.02 * mask.sum()  # traced corners cut by half a pixel


def test_export_for_qupath(small, small_map, tmp_path):
    out = tmp_path / "qupath"
    res = run_cli("export", str(small_map / "m.ome.zarr"), "--truth", str(small), "--out", str(out))
    assert res.returncode == 0, res.stderr
    m = open_map(small_map / "m.ome.zarr")
    with tifffile.TiffFile(out / "synth_000.ome.tif") as tif:
        meta = tif.ome_metadata
        level0 = tif.series[0].levels[0].asarray()
        n_levels = len(tif.series[0].levels)
    for name in ("CD31", "DAPI", "NP measured", "NP predicted", "NP |error|"):
        assert f'Name="{name}"' in meta
    assert 'PhysicalSizeX="0.5"' in meta and n_levels >= 2
    h, w = level0.shape[1:]
    np.testing.assert_allclose(level0[3], np.asarray(m.level0[0, :h, :w], np.float32), atol=1e-6)  # the predicted channel is the map
    high = read_regions(out / "synth_000.high_np.geojson", (w, h))
    pred = np.asarray(m.level0[0, :h, :w], np.float32)
    inside = Annotations(None, high.regions).labels(0, 0, h, w) > 0
    covered = m.patch_maps_like((h, w), m.level0.shape[1:])[2] >= 0.5
    truth = (pred >= 0.5) & covered
    iou = (inside & truth).sum() / (inside | truth).sum()
    assert iou > 0.8  # traced on the map's own grid: thin vessel edges differ by a pixel
    patches = read_regions(out / "synth_000.patches.geojson", (w, h))
    store = PredictionStore.open(small_map / "p.zarr")
    assert len(patches.regions) == len(store)
    div = {(round(r.geometry.bounds[1]), round(r.geometry.bounds[0])): r.properties["measurements"]["divergence"] for r in patches.regions}
    ys, xs = store.coords[:, 1], store.coords[:, 2]
    np.testing.assert_allclose([div[(int(y), int(x))] for y, x in zip(ys, xs)], np.asarray(store.root["divergence"][:]), rtol=1e-6)
    assert json.loads((out / "synth_000.export.json").read_text())["high_np_regions"] == len(high.regions)
