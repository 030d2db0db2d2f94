"""Patches grown by a margin of the slide's own pixels (`sampling.margins`), checked against the whole tiled image
assembled independently: numpy's reflection past the slide's edges, glass where no patch lies."""

from __future__ import annotations

import numpy as np
import torch

from wsi_damm.sampling.margins import Neighbours, with_margin
from wsi_damm.tiling.store import PatchStore, to_model_range
from wsi_damm.training.latent_canvas import GLASS


def _whole(store: PatchStore, slide: int) -> np.ndarray:
    """(C, H, W) model-range image of one slide, every patch written where it lies (GLASS elsewhere)."""
    h, w = store.slides[slide]["shape"]
    p = int(store.attrs["patch_size"])
    out = np.full((store.images.shape[1], h, w), GLASS, np.float32)
    coords = store.coords
    images = to_model_range(np.asarray(store.images[:])).numpy()
    for (s, y, x), img in zip(coords, images):
        if s == slide:
            out[:, y : y + p, x : x + p] = img
    return out


def test_patches_grown_by_a_margin_show_the_slide_around_them(small_map):
    store = PatchStore.open(small_map / "c.zarr")
    p, m = int(store.attrs["patch_size"]), 40
    whole = _whole(store, 0)
    assert (whole == GLASS).any() and (whole != GLASS).any()  # glass and tissue both present
    padded = np.pad(whole, ((0, 0), (m, m), (m, m)), mode="reflect")  # past the slide's edges: its mirror image
    coords = store.coords
    at_edge = np.nonzero((coords[:, 1] == coords[:, 1].min()) | (coords[:, 2] == coords[:, 2].max()))[0]
    inside = np.setdiff1d(np.arange(len(store)), at_edge)
    rows = np.concatenate([at_edge[:6], inside[::7], at_edge[-3:]])  # several patch rows, out of store order
    got = with_margin(Neighbours(store), rows, m).numpy()
    assert got.shape == (len(rows), store.images.shape[1], p + 2 * m, p + 2 * m)
    for window, (_, y, x) in zip(got, coords[rows]):
        np.testing.assert_array_equal(window, padded[:, y : y + p + 2 * m, x : x + p + 2 * m])


def test_a_margin_of_zero_gives_the_patches_themselves(small_map):
    store = PatchStore.open(small_map / "c.zarr")
    rows = np.arange(0, len(store), 5)
    torch.testing.assert_close(with_margin(Neighbours(store), rows, 0), to_model_range(np.asarray(store.images[:])[rows]))
