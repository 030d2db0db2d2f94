"""Pixel-wise maps (the blurred-vessel baseline) rendered block by block equal the same function applied to the whole
slide at once, and are written where the tissue is."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from wsi_damm.slides.roles import specs_from_paths
from wsi_damm.stitching.slide_map import open_map
from wsi_damm.tiling import grid
from wsi_damm.tiling.grid import nearest
from wsi_damm.tiling.plan import TileConfig, plan_slide
from wsi_damm.workflows import baseline


def test_a_pixel_map_rendered_in_blocks_is_the_whole_slide_map_over_tissue(small, tmp_path, monkeypatch):
    """Blocks of 256 px on a 1024² slide: every block edge inside the slide, where the halo must supply what the blur and
    the two-channel function read. Reference: scipy on the whole normalised slide (edges by the nearest pixel)."""
    monkeypatch.setattr(grid, "LAZY_BLOCK", 256)
    [spec] = specs_from_paths([str(small)], {})
    cfg = TileConfig(patch_size=128, overlap=32)
    plan = plan_slide(spec, cfg)
    h, w = plan.choice.shape
    with spec.open() as slide:
        v, d = (plan.normalised(slide, r, 0, 0, h, w) for r in ("vessels", "nuclei"))
    tissue = nearest(plan.mask, plan.choice.downsample / plan.mask_downsample, 0, 0, h, w)
    assert 0.05 < tissue.mean() < 1  # tissue and glass both present

    model = baseline.BlurBaseline(sigma_um=4.0, a=0.8, b=0.05, r2=0.0)
    blur = open_map(baseline.write_map(spec, cfg, model, tmp_path / "blur.ome.zarr")).level0[0]
    want = np.clip(0.8 * ndimage.gaussian_filter(v, 4.0 / plan.choice.mpp, mode="nearest") + 0.05, 0, 1) * tissue
    np.testing.assert_allclose(np.asarray(blur, np.float32), want, atol=5e-4)  # float16 storage

    def two(b: np.ndarray) -> np.ndarray:
        return np.clip(ndimage.gaussian_filter(b[0] * b[1], 3.0, mode="nearest"), 0, 1)

    both = open_map(baseline.write_pixel_map(spec, cfg, ("vessels", "nuclei"), two, 13, tmp_path / "two.ome.zarr", {})).level0[0]
    np.testing.assert_allclose(np.asarray(both, np.float32), two(np.stack([v, d])) * tissue, atol=5e-4)
