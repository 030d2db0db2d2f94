"""Patches with real pixels around them: each tiled patch grown by a margin, read back from the store's neighbouring
patches (overlapping patches hold the same pixels). A model that sees its patch through zero padding answers
differently near the edge than a neighbour that sees the same pixels in its interior, and the stitched map shows the
patch grid; run on the grown window and cropped to its centre, it answers from the slide's own pixels everywhere
(`RegressionPredictor`)."""

from __future__ import annotations

import numpy as np
import torch

from wsi_damm.tiling.store import PatchStore, read_rows, to_model_range
from wsi_damm.training.latent_canvas import GLASS, mirror


class Neighbours:
    """A store's patches indexed by slide and position, so the region around any patch can be assembled."""

    def __init__(self, store: PatchStore) -> None:
        self.store = store
        self.patch = int(store.attrs["patch_size"])
        self.coords = coords = store.coords  # (slide, y, x) of every row
        self.order = np.lexsort((coords[:, 2], coords[:, 1], coords[:, 0]))
        self.sorted = coords[self.order]
        self.span = int(self.sorted[:, 1].max(initial=0)) + self.patch + 1  # a key step past any y: (slide, y) sorts as one number
        self.keys = self.sorted[:, 0] * self.span + self.sorted[:, 1]
        self.shapes = [tuple(int(v) for v in s["shape"]) for s in store.slides]

    def rows_over(self, slide: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Store rows of the patches of `slide` that overlap [y0, y1) × [x0, x1) (slide pixels)."""
        a, b = np.searchsorted(self.keys, [slide * self.span + max(0, y0 - self.patch + 1), slide * self.span + max(0, y1)])
        xs = self.sorted[a:b, 2]
        return self.order[a:b][(xs > x0 - self.patch) & (xs < x1)]

    def region(self, slide: int, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
        """(C, y1 − y0, x1 − x0) model-range pixels of [y0, y1) × [x0, x1): the slide's pixels from its patches, GLASS
        where no patch lies, mirrored past the slide's edges (as canvas sampling mirrors them)."""
        h, w = self.shapes[slide]
        ya, yb, xa, xb = max(0, y0), min(h, y1), max(0, x0), min(w, x1)
        rows = np.sort(self.rows_over(slide, ya, yb, xa, xb))
        out = torch.full((self.store.images.shape[1], yb - ya, xb - xa), GLASS)
        if len(rows):
            patches = to_model_range(read_rows(self.store.images, rows))
            p = self.patch
            for img, (_, y, x) in zip(patches, self.coords[rows]):
                ty, tx = max(y, ya), max(x, xa)
                by, bx = min(y + p, yb), min(x + p, xb)
                out[:, ty - ya : by - ya, tx - xa : bx - xa] = img[:, ty - y : by - y, tx - x : bx - x]
        pad = (xa - x0, x1 - xb, ya - y0, y1 - yb)  # left, right, top, bottom
        if any(pad):
            grown = mirror(out[None], max(pad))[0]
            m = max(pad)
            out = grown[:, m - pad[2] : m + out.shape[1] + pad[3], m - pad[0] : m + out.shape[2] + pad[1]]
        return out


def with_margin(neighbours: Neighbours, rows: np.ndarray, margin: int) -> torch.Tensor:
    """(B, C, P + 2·margin, P + 2·margin) model-range windows: patches `rows` grown by `margin` px on every side. Rows
    are taken a patch row at a time, so the pixels read are those the windows need, not whole slide rows."""
    p = neighbours.patch
    coords = neighbours.coords[rows]
    out = torch.empty((len(rows), neighbours.store.images.shape[1], p + 2 * margin, p + 2 * margin))
    for slide, y in np.unique(coords[:, :2], axis=0):
        sel = np.nonzero((coords[:, 0] == slide) & (coords[:, 1] == y))[0]
        xs = coords[sel, 2]
        x0 = int(xs.min()) - margin
        band = neighbours.region(int(slide), int(y) - margin, int(y) + p + margin, x0, int(xs.max()) + p + margin)
        for i, x in zip(sel, xs):
            out[i] = band[:, :, x - margin - x0 : x + p + margin - x0]
    return out
