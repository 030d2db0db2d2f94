"""Regions drawn in QuPath, as GeoJSON: read (everything QuPath exports — a Feature, a
FeatureCollection, a bare geometry or a list of them; Polygon / MultiPolygon with holes;
`classification` names), checked, and rasterised on any grid; and written back for QuPath.

Coordinates are full-resolution pixels, origin top-left, y down (QuPath's convention). A pixel
belongs to a region when its centre does — QuPath's own rule — so at a grid of downsample d the
pixel (r, c) is tested at ((c + 0.5)·d, (r + 0.5)·d). Regions get labels 1, 2, … by class name in
sorted order; 0 is outside every region; where regions overlap, the later feature wins.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsi_damm.util.errors import InputError

AREA_TYPES = ("Polygon", "MultiPolygon")
UNCLASSIFIED = "Unclassified"


@dataclass(frozen=True)
class Region:
    name: str
    geometry: object  # shapely Polygon or MultiPolygon, full-resolution pixels
    properties: dict | None = None


@dataclass
class Annotations:
    path: Path
    regions: list[Region]

    @property
    def names(self) -> dict[int, str]:
        return {i + 1: n for i, n in enumerate(sorted({r.name for r in self.regions}))}

    def labels(self, y: int, x: int, h: int, w: int, downsample: float = 1.0) -> np.ndarray:
        """(h, w) int32 labels of the grid region (y, x, h, w) at `downsample` full-resolution px per px."""
        import shapely

        out = np.zeros((h, w), np.int32)
        label_of = {n: k for k, n in self.names.items()}
        cy, cx = (np.arange(y, y + h) + 0.5) * downsample, (np.arange(x, x + w) + 0.5) * downsample
        window = shapely.box(cx[0] - downsample, cy[0] - downsample, cx[-1] + downsample, cy[-1] + downsample)
        gx, gy = np.meshgrid(cx, cy)
        for region in self.regions:
            if not region.geometry.intersects(window):
                continue
            shapely.prepare(region.geometry)
            out[shapely.contains_xy(region.geometry, gx, gy)] = label_of[region.name]
        return out


def _class_name(properties: dict) -> str:
    c = properties.get("classification")
    if isinstance(c, dict):
        if c.get("names"):
            return ": ".join(str(n) for n in c["names"])
        if c.get("name"):
            return str(c["name"])
    if isinstance(c, str) and c:
        return c
    return str(properties.get("name") or UNCLASSIFIED)


def _features(data, path: Path) -> list[dict]:
    """Every Feature of what QuPath writes or reads, as dicts with `geometry` and `properties`."""
    if isinstance(data, list):
        return [f for item in data for f in _features(item, path)]
    if not isinstance(data, dict) or "type" not in data:
        raise InputError(path, "is not GeoJSON: expected a Feature, a FeatureCollection, a geometry or a list of them")
    kind = data["type"]
    if kind == "FeatureCollection":
        if not isinstance(data.get("features"), list):
            raise InputError(path, "is a FeatureCollection without a list of features")
        return [f for item in data["features"] for f in _features(item, path)]
    if kind == "Feature":
        return [{"geometry": data.get("geometry"), "properties": data.get("properties") or {}}]
    if kind in AREA_TYPES or kind in ("Point", "MultiPoint", "LineString", "MultiLineString", "GeometryCollection"):
        return [{"geometry": data, "properties": {}}]
    raise InputError(path, f"is not GeoJSON: unknown type {kind!r}")


def read_regions(path: str | Path, size: tuple[int, int] | None = None) -> Annotations:
    """Polygons of a QuPath GeoJSON export, checked: valid (no self-intersection) and, when `size`
    (full-resolution width, height) is given, inside the slide (a pixel of slack)."""
    import shapely
    from shapely.geometry import shape
    from shapely.validation import explain_validity

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(path, f"is not valid JSON ({exc})") from exc
    regions = []
    for k, feature in enumerate(_features(data, path)):
        geom, props = feature["geometry"], feature["properties"]
        name = _class_name(props if isinstance(props, dict) else {})
        if not isinstance(geom, dict) or geom.get("type") not in AREA_TYPES:
            continue  # points and lines mark, they do not delimit: not regions
        try:
            g = shape(geom)
        except Exception as exc:
            raise InputError(path, f"feature {k} ({name}): malformed {geom.get('type')} coordinates ({exc})") from exc
        if g.is_empty:
            continue
        if not g.is_valid:
            raise InputError(
                path,
                f"feature {k} ({name}): invalid {g.geom_type}: {explain_validity(g)}",
                "fix it in QuPath (e.g. Objects > Annotations > Simplify or redraw the shape)",
            )
        if size is not None:
            w, h = size
            if not shapely.box(-1, -1, w + 1, h + 1).contains(g):
                x0, y0, x1, y1 = g.bounds
                raise InputError(
                    path,
                    f"feature {k} ({name}) reaches outside the slide: bounds x {x0:.0f}…{x1:.0f}, y {y0:.0f}…{y1:.0f} px, slide {w}×{h} px",
                    "export the annotations from this slide's image",
                )
        regions.append(Region(name, g, props if isinstance(props, dict) else {}))
    if not regions:
        raise InputError(path, "holds no polygons (an empty collection, or only points and lines)")
    return Annotations(path, regions)


def write_regions(path: str | Path, regions: list[Region]) -> Path:
    """A FeatureCollection QuPath imports (File > Import objects): one annotation per region, its class
    name as `classification`, coordinates rounded to 2 decimals like QuPath's own export."""
    from shapely.geometry import mapping

    from wsi_damm.util.files import write_json

    def rounded(obj):
        if isinstance(obj, (list, tuple)):
            return [rounded(v) for v in obj]
        return round(float(obj), 2) if isinstance(obj, float) else obj

    features = []
    for r in regions:
        geom = mapping(r.geometry)
        props = {"objectType": "annotation", "classification": {"name": r.name}, **(r.properties or {})}
        features.append(
            {"type": "Feature", "geometry": {"type": geom["type"], "coordinates": rounded(geom["coordinates"])}, "properties": props}
        )
    path = Path(path)
    write_json(path, {"type": "FeatureCollection", "features": features})
    return path
