"""`wsi-damm export`: a map and its slide, for QuPath — where these labs draw and count.

- `SLIDE.ome.tif`: one aligned pyramidal OME-TIFF with CD31, DAPI, measured NP, predicted NP,
  |error|, and for maps of several draws their sd, their central interval's bounds and where the measured
  value leaves it (−1 below, +1 above), as named float32 channels with the µm scale; streamed block by block.
- `SLIDE.high_np.geojson`: regions where the predicted NP is at least `threshold` (default 0.5 of
  the slide's normalised NP range: half way between its 0.5th and 99.8th percentiles over tissue),
  as annotations with holes, traced on a level of at most 2048 px.
- `SLIDE.patches.geojson`: every predicted patch as a detection with the gate's divergence and
  multi-modal share as measurements (when the prediction store the map came from is still there).
Coordinates are full-resolution slide pixels, QuPath's convention.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import zarr

from wsi_damm.evaluation.viewer import layer_sources
from wsi_damm.slides import SlideSpec
from wsi_damm.slides.annotations import Region, write_regions
from wsi_damm.slides.ome import build_pyramid, create_level, write_ome_tiff
from wsi_damm.stages.evaluate import load_truth
from wsi_damm.stitching.slide_map import COVERAGE, open_map
from wsi_damm.util.files import write_json

HIGH_NP = 0.5
TRACE_SIDE = 2048
EXPORT_LAYERS = (
    ("vessels", "CD31"),
    ("nuclei", "DAPI"),
    ("measured", "NP measured"),
    ("predicted", "NP predicted"),
    ("error", "NP |error|"),
    ("sd", "NP sd"),
    ("low", "NP interval low"),
    ("high", "NP interval high"),
    ("outside", "NP outside interval"),
)
BLOCK = 2048


def polygons_from_mask(mask: np.ndarray, scale: float) -> list:
    """Polygons (with holes) of a boolean mask's pixel regions, in units of `scale` per mask pixel: the
    traced rings of every connected region, combined even-odd. Traced rings never cross, so a ring's
    nesting depth (how many rings hold one of its vertices) says what it is — even an outline, odd a hole
    of the ring one level up — and each outline meets only its own holes (linear in the rings, where
    folding them one by one into a single geometry grows with their square)."""
    import shapely
    from skimage import measure

    padded = np.pad(mask.astype(np.float32), 1)
    rings = [shapely.Polygon((c[:, ::-1] - 1 + 0.5) * scale) for c in measure.find_contours(padded, 0.5) if len(c) >= 4]
    rings = [r if r.is_valid else r.buffer(0) for r in rings]
    rings = [r for r in rings if not r.is_empty]
    if not rings:
        return []
    vertices = shapely.points([shapely.get_coordinates(r)[0] for r in rings])  # on its own ring's boundary only
    inner, outer = shapely.STRtree(rings).query(vertices, predicate="within")
    depth = np.bincount(inner, minlength=len(rings))
    holes: dict[int, list] = {}
    for i, j in zip(inner, outer):
        if depth[i] % 2 and depth[j] == depth[i] - 1:  # a hole, and the outline right around it
            holes.setdefault(int(j), []).append(rings[i])
    out = []
    for k in np.flatnonzero(depth % 2 == 0):
        shape = rings[k].difference(shapely.union_all(holes[k])) if k in holes else rings[k]
        out.extend(shape.geoms if hasattr(shape, "geoms") else [shape])
    return [p for p in out if not p.is_empty and p.area > scale * scale]


def export_for_qupath(map_path: Path, spec: SlideSpec, out: Path, threshold: float = HIGH_NP) -> dict:
    """Write the three files for one map (see the module docstring); returns their paths and counts."""
    m = open_map(map_path)
    truth = load_truth(spec, m)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    slide, (h, w) = m.slide_id, truth.shape
    d = truth.plan.choice.downsample  # map pixels → full-resolution slide pixels
    sources = layer_sources(m, truth)
    layers = [(key, name) for key, name in EXPORT_LAYERS if key in sources]

    # one aligned multi-channel image, streamed: level 0 block by block, then its pyramid, then the TIFF
    work = out / f".{slide}.export.zarr"
    shutil.rmtree(work, ignore_errors=True)
    try:
        group = zarr.open_group(str(work), mode="w", zarr_format=3)
        level0 = create_level(group, "0", (len(layers), h, w), np.dtype(np.float32), 0)
        for y in range(0, h, BLOCK):
            for x in range(0, w, BLOCK):
                bh, bw = min(BLOCK, h - y), min(BLOCK, w - x)
                level0[:, y : y + bh, x : x + bw] = np.stack(
                    [np.nan_to_num(sources[k].region(1.0, y, x, bh, bw), nan=0.0) for k, _ in layers]
                )
        levels = build_pyramid(group, min_size=512)
        tiff = out / f"{slide}.ome.tif"
        write_ome_tiff(tiff, levels, [name for _, name in layers], m.mpp, description=f"wsi-damm export of {Path(map_path).name}")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    # high-NP regions, traced on a level of at most TRACE_SIDE px
    level = next((lv for lv in m.levels if max(lv.shape[1:]) <= TRACE_SIDE), m.levels[-1])
    f = m.level0.shape[2] / level.shape[2]
    lh, lw = -(-h // round(f)), -(-w // round(f))
    pred = np.asarray(level[0, :lh, :lw], np.float32)
    covered = m.patch_maps_like(pred.shape, level.shape[1:])[COVERAGE] >= 0.5
    regions = [
        Region("High NP", p, {"measurements": {"threshold": threshold}}) for p in polygons_from_mask((pred >= threshold) & covered, f * d)
    ]
    high = write_regions(out / f"{slide}.high_np.geojson", regions)

    # the patches, with what the gate saw
    written = {"tiff": str(tiff), "channels": [name for _, name in layers], "high_np": str(high), "high_np_regions": len(regions)}
    source = dict(zarr.open_group(str(map_path), mode="r").attrs).get("wsi_damm", {}).get("source")
    if source and Path(source).exists():
        from wsi_damm.tiling.store import PredictionStore

        store = PredictionStore.open(source)
        index = next(i for i, s in enumerate(store.slides) if s["slide_id"] == slide)
        rows = np.nonzero(store.coords[:, 0] == index)[0]
        p = int(store.attrs["patch_size"])
        div = np.asarray(store.root["divergence"][:])[rows]
        share = np.asarray(store.root["multimodal_fraction"][:])[rows]
        import shapely

        patches = [
            Region(
                "Patch",
                shapely.box(x * d, y * d, (x + p) * d, (y + p) * d),
                {
                    "objectType": "detection",
                    "measurements": {"divergence": float(dv) if np.isfinite(dv) else None, "multimodal_share": float(sh)},
                },
            )
            for (_, y, x), dv, sh in zip(store.coords[rows], div, share)
        ]
        written["patches"] = str(write_regions(out / f"{slide}.patches.geojson", patches))
        written["patch_count"] = len(patches)
    write_json(out / f"{slide}.export.json", {**written, "threshold": threshold, "map": str(map_path)})
    return written
