"""QuPath GeoJSON: every container QuPath writes is read, polygons with holes survive a round trip,
rasterising follows QuPath's pixel-centre rule (checked against scikit-image), `tile --roi` keeps
only annotated patches, `evaluate --regions` takes GeoJSON like a label image, bad files are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import shapely
import tifffile
from shapely.geometry import MultiPolygon, Polygon
from skimage.draw import polygon2mask

from tests.conftest import count_files, run_cli
from wsi_damm.slides.annotations import Region, read_regions, write_regions
from wsi_damm.util.errors import InputError

SQUARE_WITH_HOLE = Polygon([(10, 10), (20, 10), (20, 20), (10, 20)], [[(13, 13), (17, 13), (17, 17), (13, 17)]])


def _shapes() -> list[Region]:
    ring = [(300 + 200 * np.cos(t), 400 + 120 * np.sin(t)) for t in np.linspace(0, 2 * np.pi, 60, endpoint=False)]
    hole = [(300 + 80 * np.cos(t), 400 + 40 * np.sin(t)) for t in np.linspace(0, 2 * np.pi, 30, endpoint=False)]
    tumour = Polygon(ring, [hole])
    stroma = MultiPolygon([Polygon([(600, 100), (900, 120), (750, 350)]), SQUARE_WITH_HOLE])
    return [Region("Tumor", tumour), Region("Stroma", stroma)]


def test_polygons_with_holes_survive_export_and_import(tmp_path):
    path = write_regions(tmp_path / "r.geojson", _shapes())
    back = read_regions(path)
    assert [r.name for r in back.regions] == ["Tumor", "Stroma"]
    for a, b in zip(_shapes(), back.regions):
        assert b.geometry.geom_type == a.geometry.geom_type
        assert shapely.hausdorff_distance(a.geometry, b.geometry) < 1.0  # within a pixel (2-decimal coordinates)
        assert abs(a.geometry.area - b.geometry.area) < 1e-3 * a.geometry.area
    assert len(back.regions[0].geometry.interiors) == 1 and back.names == {1: "Stroma", 2: "Tumor"}


def test_every_container_qupath_writes(tmp_path):
    feature = {
        "type": "Feature",
        "id": "3f1c…",
        "geometry": shapely.geometry.mapping(SQUARE_WITH_HOLE),
        "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}},
    }
    variants = {
        "feature": feature,
        "array": [feature, {**feature, "properties": {"classification": {"names": ["Tumor", "Necrosis"]}}}],
        "collection": {
            "type": "FeatureCollection",
            "features": [feature, {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}, "properties": {}}],
        },
        "geometry": shapely.geometry.mapping(SQUARE_WITH_HOLE),
        "string_class": {**feature, "properties": {"classification": "Tumor"}},
    }
    for name, data in variants.items():
        (tmp_path / f"{name}.geojson").write_text(json.dumps(data, default=list))
        regions = read_regions(tmp_path / f"{name}.geojson").regions
        assert regions[0].geometry.area == pytest.approx(84), name
        assert regions[0].name == ("Unclassified" if name == "geometry" else "Tumor"), name
    assert read_regions(tmp_path / "array.geojson").regions[1].name == "Tumor: Necrosis"


def test_rasterising_follows_the_pixel_centre_rule(tmp_path):
    from wsi_damm.slides.annotations import Annotations

    ann = Annotations(tmp_path, [Region("x", SQUARE_WITH_HOLE)])
    assert ann.labels(0, 0, 40, 40).sum() == 84  # the exact area: 100 − 16 pixels
    shapes = _shapes()
    ann = Annotations(tmp_path, shapes)
    for d in (1, 4):
        h, w = 600 // d, 1000 // d
        got = ann.labels(0, 0, h, w, d)
        expect = np.zeros((h, w), np.int32)
        for label, region in ((2, shapes[0]), (1, shapes[1])):  # names sorted: Stroma 1, Tumor 2
            polys = region.geometry.geoms if region.geometry.geom_type == "MultiPolygon" else [region.geometry]
            for p in polys:  # scikit-image: (row, col), pixel centres at (x/d − 0.5, y/d − 0.5)
                rc = lambda ring: np.array(ring.coords)[:, ::-1] / d - 0.5  # noqa: E731
                inside = polygon2mask((h, w), rc(p.exterior))
                for hole in p.interiors:
                    inside &= ~polygon2mask((h, w), rc(hole))
                expect[inside] = label
        assert (got != expect).mean() < 2e-3, d  # differences only where a pixel centre sits on an edge


@pytest.mark.parametrize(
    "content,problem",
    [
        ("{not json", "is not valid JSON"),
        ('{"type": "FeatureCollection", "features": []}', "holds no polygons"),
        ('{"type": "Polygon", "coordinates": [[[0, 0], [50, 50], [50, 0], [0, 50], [0, 0]]]}', "Self-intersection"),
        ('{"type": "Polygon", "coordinates": [[[900, 900], [1500, 900], [1500, 1500], [900, 900]]]}', "reaches outside the slide"),
        ('{"type": "Polygon", "coordinates": [[[0, 0], [1]]]}', "malformed Polygon coordinates"),
        ('{"hello": 1}', "is not GeoJSON"),
    ],
)
def test_bad_geojson_is_refused_in_one_line(small, tmp_path, content, problem):
    roi = tmp_path / "bad.geojson"
    roi.write_text(content)
    out = tmp_path / "s.zarr"
    res = run_cli("tile", str(small), "--out", str(out), "--patch-size", "128", "--overlap", "32", "--roi", str(roi), "--quiet")
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert str(roi) in res.stderr and problem in res.stderr
    assert count_files(tmp_path) == 1  # nothing written


def test_tile_roi_keeps_only_annotated_patches(small, tmp_path):
    from wsi_damm.tiling.store import PatchStore

    roi = write_regions(tmp_path / "roi.geojson", [Region("Tumor", Polygon([(100, 100), (600, 100), (600, 500), (100, 500)]))])
    common = ["--patch-size", "128", "--overlap", "32", "--quiet"]
    assert run_cli("tile", str(small), "--out", str(tmp_path / "all.zarr"), *common).returncode == 0
    res = run_cli("tile", str(small), "--out", str(tmp_path / "roi.zarr"), "--roi", str(roi), *common)
    assert res.returncode == 0, res.stderr
    every, kept = PatchStore.open(tmp_path / "all.zarr"), PatchStore.open(tmp_path / "roi.zarr")
    assert 0 < len(kept) < len(every)
    ys, xs = kept.coords[:, 1], kept.coords[:, 2]
    assert ((ys + 128 > 100) & (ys < 500) & (xs + 128 > 100) & (xs < 600)).all()  # every kept patch touches the region
    assert kept.slides[0]["low"] == every.slides[0]["low"] if "low" in every.slides[0] else True  # same normalisation


def test_evaluate_regions_from_geojson_match_a_label_image(small, small_map, tmp_path):
    """The same regions as QuPath GeoJSON and as a label TIFF rasterised independently give the same numbers."""
    shapes = [
        Region(
            "Tumor",
            Polygon([(100.3, 120.7), (700.2, 90.1), (650.5, 600.9), (150.4, 700.6)], [[(300, 300), (400, 300), (400, 400), (300, 400)]]),
        ),
        Region("Stroma", Polygon([(80, 760), (420, 760), (420, 1000), (80, 1000)])),
    ]
    write_regions(tmp_path / "r.geojson", shapes)
    h, w = tifffile.TiffFile(small).series[0].shape[1:]
    labels = np.zeros((h, w), np.uint8)
    for label, region in ((2, shapes[0]), (1, shapes[1])):
        p = region.geometry
        rc = lambda ring: np.array(ring.coords)[:, ::-1] - 0.5  # noqa: E731
        inside = polygon2mask((h, w), rc(p.exterior))
        for hole in p.interiors:
            inside &= ~polygon2mask((h, w), rc(hole))
        labels[inside] = label
    tifffile.imwrite(tmp_path / "labels.tif", labels)
    results = {}
    for name, regions in (("geojson", tmp_path / "r.geojson"), ("tiff", tmp_path / "labels.tif")):
        res = run_cli(
            "evaluate",
            str(small_map / "m.ome.zarr"),
            "--truth",
            str(small),
            "--regions",
            str(regions),
            "--out",
            str(tmp_path / name),
            "--no-viewer",
            "--quiet",
        )
        assert res.returncode == 0, res.stderr
        results[name] = json.loads((tmp_path / name / "metrics.json").read_text())["slides"][0]["regions"]
    assert set(results["geojson"]) == {"Stroma", "Tumor"} | ({"label 0"} & set(results["geojson"]))
    for key, tiff_name in (("Tumor", "label 2"), ("Stroma", "label 1")):
        g, t = results["geojson"][key], results["tiff"][tiff_name]
        assert abs(g["pixels"] - t["pixels"]) <= 2e-3 * t["pixels"]
        assert g["ssim"] == pytest.approx(t["ssim"], abs=2e-3) and g["psnr"] == pytest.approx(t["psnr"], abs=0.05)


def test_invalid_regions_raise_input_error(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(
        json.dumps([{"type": "Feature", "geometry": {"type": "LineString", "coordinates": [[0, 0], [1, 1]]}, "properties": {}}])
    )
    with pytest.raises(InputError, match="holds no polygons"):
        read_regions(path)
