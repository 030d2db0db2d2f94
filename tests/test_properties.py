"""Property-based checks of the grid and the stitcher, and a guard against unsafe deserialisation."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wsi_damm.slide_map import COVERAGE
from wsi_damm.stitch import run_stitch
from wsi_damm.store import create_prediction_store
from wsi_damm.tiling import grid_positions


@given(length=st.integers(1, 3000), patch=st.integers(1, 300), overlap_frac=st.floats(0, 0.9))
def test_grid_covers_every_pixel_and_stays_inside(length, patch, overlap_frac):
    overlap = min(patch - 1, int(patch * overlap_frac))
    pos = grid_positions(length, patch, patch - overlap)
    if length < patch:
        assert len(pos) == 0
        return
    covered = np.zeros(length, bool)
    for p in pos:
        covered[p : p + patch] = True
    assert covered.all() and pos[0] == 0 and pos[-1] == length - patch
    assert (np.diff(pos) > 0).all() and (np.diff(pos) <= patch - overlap).all()


class _Conditions:
    """The parts of a conditions store that a prediction store copies."""

    def __init__(self, coords: np.ndarray, patch: int, overlap: int, shape: tuple[int, int]) -> None:
        self.coords = coords
        self.images = np.empty((len(coords), 1, patch, patch), np.uint8)
        self.attrs = {"shard_patches": 4, "stride": patch - overlap, "overlap": overlap, "mpp": 0.5}
        self.slides = [{"slide_id": "p", "shape": list(shape), "mpp": 0.5}]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(h=st.integers(40, 300), w=st.integers(40, 300), patch=st.sampled_from([16, 32, 40]), overlap_frac=st.floats(0, 0.75),
       blend=st.sampled_from(["gaussian", "cosine", "linear", "mean"]), seed=st.integers(0, 10))
def test_stitching_true_patches_round_trips(tmp_path_factory, h, w, patch, overlap_frac, blend, seed):
    overlap = int(patch * overlap_frac)
    ys, xs = grid_positions(h, patch, patch - overlap), grid_positions(w, patch, patch - overlap)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    coords = np.stack([np.zeros(yy.size, np.int64), yy.ravel(), xx.ravel()], 1)
    image = np.random.default_rng(seed).random((h, w)).astype(np.float16).astype(np.float64)
    d = tmp_path_factory.mktemp("prop")
    root = create_prediction_store(d / "pred.zarr", _Conditions(coords, patch, overlap, (h, w)), {"roles": ["vessels"], "nuclei": False})
    root["pred"][:] = np.stack([image[y : y + patch, x : x + patch] for _, y, x in coords])[:, None].astype(np.float16)
    root["divergence"][:] = 0.5
    root["multimodal_fraction"][:] = 0.0
    root["shard_done"][:] = 1
    root.attrs["complete"] = True
    [m] = run_stitch(d / "pred.zarr", d / "map.ome.zarr", blend, progress=False)
    out = zarr.open_group(str(m), mode="r")
    assert (np.asarray(out["patch_maps/0"][COVERAGE]) == 1).all()  # every pixel covered, weights > 0 everywhere
    assert np.abs(np.asarray(out["0"][0]).astype(np.float64) - image).max() <= 1e-3


def test_no_unsafe_deserialisation_in_the_package():
    root = Path(__file__).resolve().parents[1]
    offenders = []
    for path in list((root / "wsi_damm").rglob("*.py")) + list((root / "cli").rglob("*.py")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"pickle\.loads?\(|torch\.load\(", line) and "weights_only=True" not in line:
                offenders.append(f"{path.name}:{i}: {line.strip()}")
    assert not offenders, offenders
