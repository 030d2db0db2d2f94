"""Tissue detection: glass around the section keeps Otsu's split; a field that is tissue edge to edge
stays tissue (dim tissue is not thrown away); `--tissue all` and `--min-tissue 0` take every patch."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from tests.conftest import fixture
from wsi_damm.tiling import grid as tiling
from wsi_damm.tiling.grid import tissue_mask
from wsi_damm.tiling.inputs import resolve_slides
from wsi_damm.tiling.plan import TileConfig, plan_slide

N = 512


def _tissue(rng: np.random.Generator, dim: float = 0.25) -> np.ndarray:
    """(2, N, N) vessels / nuclei of tissue that fills the field: a dim left half (sparse cells on weak
    autofluorescence) and a bright right half (dense cells) — two populations Otsu would split."""
    base = np.where(np.arange(N)[None, :] < N // 2, dim, 0.6) * np.ones((N, N))
    nuclei = np.zeros((N, N))
    for y, x in rng.integers(0, N, (1500, 2)):
        nuclei[max(0, y - 2) : y + 3, max(0, x - 2) : x + 3] = 0.4 if x < N // 2 else 0.8
    vessels = base + 0.05 * rng.standard_normal((N, N))
    return np.stack([vessels, base + nuclei + 0.05 * rng.standard_normal((N, N))]).astype(np.float32)


def _disk(radius: float) -> np.ndarray:
    yy, xx = np.mgrid[:N, :N]
    return (yy - N / 2) ** 2 + (xx - N / 2) ** 2 < radius**2


def test_a_tissue_filling_field_is_all_tissue():
    img = _tissue(np.random.default_rng(0))
    mask = tissue_mask(img, 2.0)
    assert mask.mean() >= 0.99
    # the two populations are real: without the glass rule, Otsu alone drops the dim half
    signal = np.max([(c - np.percentile(c, 1)) / (np.percentile(c, 99.5) - np.percentile(c, 1)) for c in img], axis=0)
    from skimage.filters import threshold_otsu

    assert (signal > threshold_otsu(signal)).mean() < 0.7


def test_glass_around_the_section_keeps_otsus_split(monkeypatch):
    rng = np.random.default_rng(1)
    disk = _disk(0.35 * N)
    img = np.where(disk, _tissue(rng, dim=0.6), 0.02 + 0.01 * rng.standard_normal((2, N, N))).astype(np.float32)
    mask = tissue_mask(img, 2.0)
    iou = (mask & disk).sum() / (mask | disk).sum()
    assert iou > 0.95
    monkeypatch.setattr(tiling, "GLASS_LEVEL", np.inf)  # Otsu's split, always: the rule before glass detection
    assert np.array_equal(tissue_mask(img, 2.0), mask)


def test_an_empty_corner_of_a_tissue_field_is_left_out():
    rng = np.random.default_rng(2)
    img = _tissue(rng)
    corner = np.zeros((N, N), bool)
    corner[: N // 5, : N // 5] = True  # 4 % glass: too little for Otsu to see a glass class
    img[:, corner] = 0.02
    mask = tissue_mask(img, 2.0)
    assert mask[~corner].mean() >= 0.99
    assert mask[corner].mean() < 0.2


def test_tissue_all_is_every_pixel():
    assert tissue_mask(np.zeros((2, 64, 80), np.float32), 1.0, "all").all()


def _write(path, img: np.ndarray, mpp: float = 0.5):
    tifffile.imwrite(
        path,
        (img.clip(0, 1) * 255).astype(np.uint8),
        ome=True,
        metadata={"axes": "CYX", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp, "Channel": {"Name": ["CD31", "DAPI"]}},
    )
    return resolve_slides([path], channels="vessels=CD31,nuclei=DAPI")[0]


def test_every_patch_with_tissue_all_or_min_tissue_zero(tmp_path):
    rng = np.random.default_rng(3)
    img = np.where(_disk(0.3 * N), _tissue(rng), 0.0).astype(np.float32)
    spec = _write(tmp_path / "glass.ome.tif", img)
    cfg = TileConfig(patch_size=128, overlap=32)
    n_grid = len(tiling.grid_positions(N, 128, 96)) ** 2
    assert len(plan_slide(spec, cfg).ys) < n_grid  # the corners are glass
    assert len(plan_slide(spec, TileConfig(patch_size=128, overlap=32, tissue="all")).ys) == n_grid
    assert len(plan_slide(spec, TileConfig(patch_size=128, overlap=32, min_tissue=0.0)).ys) == n_grid


def test_tissue_mode_is_checked():
    from wsi_damm.util.errors import InputError

    with pytest.raises(InputError, match="--tissue"):
        TileConfig(tissue="some").validate()


# Real fields. Reference numbers: the Vectra TMA core sits on glass (49.6 % of the field is tissue
# with Otsu's split, unchanged by the glass rule); its interior and the inForm field are tissue throughout.
def test_real_core_on_glass_keeps_its_mask():
    img = tifffile.imread(fixture("fluorescence/pathml_small_vectra.qptiff")).astype(np.float32)
    assert tissue_mask(img, 0.5).mean() == pytest.approx(0.496, abs=0.003)


def test_real_fields_of_tissue_are_tissue():
    img = tifffile.imread(fixture("fluorescence/pathml_small_vectra.qptiff")).astype(np.float32)
    assert tissue_mask(img[:, 400:1000, 300:900], 0.5).mean() >= 0.99  # inside the core: no glass in view
    inform = tifffile.imread(fixture("fluorescence/phenoptr_FIHC4__0929309_HP_IM3_2_component_data.tif")).astype(np.float32)
    assert tissue_mask(inform, 0.5).mean() >= 0.99


@pytest.mark.parametrize("radius", [1, 4, 13])
def test_gaps_close_as_a_disk_footprint_closes_them(radius):
    """`close_gaps` (distance maps) against scikit-image's closing with a disk footprint (min/max filters),
    on blobs that touch the border and leave gaps of every width."""
    from scipy import ndimage
    from skimage import morphology

    rng = np.random.default_rng(radius)
    mask = ndimage.gaussian_filter(rng.random((160, 190)), 3) > 0.52
    expect = morphology.closing(mask, morphology.disk(radius))
    got = tiling.close_gaps(mask, radius)
    assert got.dtype == bool and 0 < mask.sum() < got.sum() < mask.size
    np.testing.assert_array_equal(got, expect)
