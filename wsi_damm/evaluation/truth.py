"""What a map is scored against: the measured slide on the map's grid (`Truth`), images registered to it
(`Companion`: the noiseless field, label images; `GeoJSONRegions`), and one scored map (`SlideEvaluation`),
which the report and the viewer draw from. Shared by `stages.evaluate`, `report` and `viewer`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np

from wsi_damm.slides import SlideSpec, open_file
from wsi_damm.slides.annotations import Annotations, read_regions
from wsi_damm.stitching.slide_map import MapImage
from wsi_damm.tiling.grid import lazy_blocks, nearest, read_scaled, unit_range
from wsi_damm.tiling.plan import SlidePlan, TileConfig, plan_slide
from wsi_damm.util.errors import InputError

SIZE_TOLERANCE = 0.01  # the share by which a map and its slide may differ in size (rounding of levels)


class ReopensSlide:
    """Holds an open slide for lazy reads, and travels to other processes (a dask cluster's workers)
    as the recipe to open it again: open file handles do not pickle."""

    _slide: object | None = None

    def _open(self) -> object:
        raise NotImplementedError

    @property
    def slide(self):
        if self._slide is None:
            self._slide = self._open()
        return self._slide

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_slide": None}


@dataclass
class Truth(ReopensSlide):
    """The measured slide on the map's grid: normalised channels, tissue mask, plan."""

    plan: SlidePlan
    shape: tuple[int, int]
    _slide: object | None = None  # RoleSlide, kept open for lazy reads

    def _open(self) -> object:
        return self.plan.spec.open()

    def index(self, role: str) -> int:
        return self.plan.spec.roles.index(role)

    def normalised(self, role: str, y: int, x: int, h: int, w: int) -> np.ndarray:
        return self.plan.normalised(self.slide, role, y, x, h, w)

    def raw(self, role: str, y: int, x: int, h: int, w: int) -> np.ndarray:
        """One channel as measured (no normalisation), on the map's grid."""
        return read_scaled(self.slide, self.plan.choice, y, x, h, w)[self.index(role)].astype(np.float64)

    def tissue(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        return nearest(self.plan.mask, self.plan.choice.downsample / self.plan.mask_downsample, y, x, h, w)

    def lazy(self, role: str) -> da.Array:
        return lazy_blocks(lambda y, x, h, w: self.normalised(role, y, x, h, w), self.shape, f"truth-{role}")

    def lazy_tissue(self) -> da.Array:
        return lazy_blocks(self.tissue, self.shape, "tissue", dtype=bool)


def load_truth(spec: SlideSpec, m: MapImage) -> Truth:
    """Plan the truth slide at the map's resolution and check that both cover the same tissue."""
    cfg = TileConfig(
        patch_size=m.patch_size,
        overlap=0,
        mpp=m.mpp,
        level=None if m.mpp else 0,
        min_tissue=0.0,
        percentiles=m.percentiles,
        align=1,
        tissue=m.tissue,
        np_scale=m.np_scale,
    )  # a fixed / reference NP range normalises the truth the same way
    plan = plan_slide(spec, cfg)
    mh, mw = m.level0.shape[1:]
    th, tw = plan.choice.shape
    if abs(mh - th) > SIZE_TOLERANCE * th or abs(mw - tw) > SIZE_TOLERANCE * tw:
        size = lambda h, w: f"{h}×{w} px" + (f" = {h * m.mpp:.0f}×{w * m.mpp:.0f} µm" if m.mpp else "")  # noqa: E731
        raise InputError(
            spec.paths[0],
            f"covers {size(th, tw)} at the map's resolution but the map {m.path} covers {size(mh, mw)}",
            "evaluate the map against the slide it was predicted from",
        )
    return Truth(plan, (min(mh, th), min(mw, tw)), spec.open())


@dataclass
class Companion(ReopensSlide):
    """A single-channel image registered to the slide (noiseless field, region labels), read on the map's grid."""

    path: Path
    truth: Truth
    _slide: object | None = None

    def _open(self) -> object:
        return open_file(self.path)

    @classmethod
    def open(cls, path: Path, truth: Truth) -> Companion:
        slide = open_file(path)
        if slide.levels[0].shape[1:] != truth.slide.levels[0].shape[1:]:
            raise InputError(path, f"size {slide.levels[0].shape[1:]} differs from the slide's {truth.slide.levels[0].shape[1:]}")
        return cls(Path(path), truth, slide)

    def raw(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        return read_scaled(self.slide, self.truth.plan.choice, y, x, h, w)[0]

    def normalised(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """Normalised with the measured NP channel's mapping (the noiseless field's use)."""
        k = self.truth.index("target")
        return unit_range(self.raw(y, x, h, w).astype(np.float32), self.truth.plan.lo[k], self.truth.plan.hi[k])

    def labels(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        return np.rint(self.raw(y, x, h, w)).astype(np.int32)


@dataclass
class GeoJSONRegions:
    """Regions drawn in QuPath (GeoJSON), rasterised on the map's grid block by block."""

    annotations: Annotations
    truth: Truth

    @classmethod
    def open(cls, path: Path, truth: Truth) -> GeoJSONRegions:
        h, w = truth.slide.levels[0].shape[1:]
        return cls(read_regions(path, (w, h)), truth)

    def labels(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        return self.annotations.labels(y, x, h, w, self.truth.plan.choice.downsample)


def open_regions(path: Path, truth: Truth) -> Companion | GeoJSONRegions:
    """`--regions`: an integer label image registered to the slide, or QuPath GeoJSON."""
    if Path(path).suffix.lower() in (".geojson", ".json"):
        return GeoJSONRegions.open(path, truth)
    return Companion.open(path, truth)


@dataclass
class SlideEvaluation:
    """One map scored against its slide: the numbers, the patch rows, and what the report draws from."""

    result: dict
    rows: list[dict]
    map: MapImage
    truth: Truth
