"""Stitching: exact round trip (also property-based), smooth blending, and OME outputs other readers open."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from skimage.measure import block_reduce

from wsi_damm.stages.stitch import run_stitch
from wsi_damm.stitching.merge import window
from wsi_damm.stitching.slide_map import BLOCK, COVERAGE, DIVERGENCE, PATCH_MAPS, SHARE
from wsi_damm.tiling.grid import grid_positions
from wsi_damm.tiling.store import PatchStore, create_prediction_store

from .conftest import run_cli


@pytest.fixture(scope="module")
def odd_store(tmp_path_factory):
    """A 1100² slide (not a multiple of the 96-px stride) tiled at 128 px, uint16."""
    from wsi_damm.workflows.simulator import SynthConfig
    from wsi_damm.workflows.synth import write_slides

    d = tmp_path_factory.mktemp("odd")
    write_slides(d, 1, SynthConfig(size=1100, seed=11), progress=False)
    out = d / "st.zarr"
    res = run_cli(
        "tile",
        str(d / "synth_000.ome.tif"),
        "--out",
        str(out),
        "--patch-size",
        "128",
        "--overlap",
        "32",
        "--store-dtype",
        "uint16",
        "--shard-patches",
        "16",
        "--quiet",
    )
    assert res.returncode == 0, res.stderr
    return out


def _fake_prediction(store_path, path, values) -> None:
    cond = PatchStore.open(store_path)
    root = create_prediction_store(path, cond, {"roles": cond.roles, "nuclei": True})
    root["pred"][:] = values.astype(np.float16)
    root["divergence"][:] = np.linspace(0, 1, len(cond), dtype=np.float32)
    root["multimodal_fraction"][:] = np.random.default_rng(1).random(len(cond)).astype(np.float32)
    root["shard_done"][:] = 1
    root.attrs["complete"] = True


@pytest.mark.parametrize("blend", ["gaussian", "cosine", "linear", "mean"])
def test_true_patches_stitch_back_to_the_normalised_channel(odd_store, tmp_path, blend):
    cond = PatchStore.open(odd_store)
    target = np.asarray(cond.images[:, 2:3]).astype(np.float64) / 65535
    _fake_prediction(odd_store, tmp_path / "pred.zarr", target)
    [path] = run_stitch(tmp_path / "pred.zarr", tmp_path / "map.ome.zarr", blend, progress=False)
    m = np.asarray(zarr.open_group(str(path), mode="r")["0"][:])
    entry = cond.slides[0]
    raw = tifffile.imread(entry["channels"]["target"]["path"])[2].astype(np.float64)
    lo, hi = entry["normalisation"]["low"][2], entry["normalisation"]["high"][2]
    want = np.clip((raw - lo) / (hi - lo), 0, 1)
    covered = _footprints(cond.coords, 128, (1100, 1100))
    assert covered.mean() > 0.3 and m.shape == (1, 1100, 1100)
    assert np.abs(m[0][covered] - want[covered]).max() <= 1e-3
    assert (m[0][~covered] == 0).all()


def _footprints(coords, patch, shape) -> np.ndarray:
    covered = np.zeros(shape, bool)
    for _, y, x in coords:
        covered[y : y + patch, x : x + patch] = True
    return covered


def test_patch_maps_are_block_means_of_the_blended_patch_values(odd_store, tmp_path):
    """Divergence and share per 8-px block = Σ_block Σ_k w_k d_k / Σ_block Σ_k w_k, coverage = the covered
    fraction of the block's pixels inside the slide: brute force at full resolution, blocks by scikit-image."""
    cond = PatchStore.open(odd_store)
    _fake_prediction(odd_store, tmp_path / "pred.zarr", np.asarray(cond.images[:, 2:3]) / 65535)
    [path] = run_stitch(tmp_path / "pred.zarr", tmp_path / "map.ome.zarr", "gaussian", progress=False)
    got = np.asarray(zarr.open_group(str(path), mode="r")[PATCH_MAPS]["0"][:]).astype(np.float64)
    pred = zarr.open_group(str(tmp_path / "pred.zarr"), mode="r")
    gate = {DIVERGENCE: np.asarray(pred["divergence"][:]), SHARE: np.asarray(pred["multimodal_fraction"][:])}
    w = window("gaussian", 128).astype(np.float64)
    sums = np.zeros((3, 1100, 1100))
    for k, (_, y, x) in enumerate(cond.coords):
        sums[:, y : y + 128, x : x + 128] += w * np.array([1.0, gate[DIVERGENCE][k], gate[SHARE][k]])[:, None, None]
    blocks = [block_reduce(plane, (BLOCK, BLOCK), np.sum) for plane in sums]
    inside = block_reduce(np.ones((1100, 1100)), (BLOCK, BLOCK), np.sum)
    want_cover = block_reduce(_footprints(cond.coords, 128, (1100, 1100)).astype(np.float64), (BLOCK, BLOCK), np.sum) / inside
    assert got.shape == (3, 138, 138)
    np.testing.assert_allclose(got[COVERAGE], want_cover, atol=5e-4)
    some = blocks[0] > 0
    assert some.mean() > 0.3 and (got[:2][:, ~some] == 0).all()
    for channel in (DIVERGENCE, SHARE):
        np.testing.assert_allclose(got[channel][some], (blocks[channel + 1] / np.where(some, blocks[0], 1))[some], atol=5e-4)


def _steps(field, mask):
    dy = np.abs(np.diff(field, axis=0))[mask[1:] & mask[:-1]]
    dx = np.abs(np.diff(field, axis=1))[mask[:, 1:] & mask[:, :-1]]
    return np.concatenate([dy, dx])


def test_constant_patches_blend_smoothly(odd_store, tmp_path):
    cond = PatchStore.open(odd_store)
    values = np.random.default_rng(0).random(len(cond))
    steps = {}
    for blend in ("gaussian", "cosine", "linear", "mean"):
        pred = np.broadcast_to(values[:, None, None, None], (len(cond), 1, 128, 128))
        _fake_prediction(odd_store, tmp_path / f"{blend}.zarr", pred)
        [path] = run_stitch(tmp_path / f"{blend}.zarr", tmp_path / f"{blend}.ome.zarr", blend, progress=False)
        field = np.asarray(zarr.open_group(str(path), mode="r")["0"][0])
        mask = _footprints(cond.coords, 128, field.shape)
        # the bound the window implies between neighbours p, q: Σ_i |w_i(p) − w_i(q)| / min(Σw(p), Σw(q)),
        # with each window zero outside its patch (a patch's edge is a step too); brute force
        w = np.pad(window(blend, 128).astype(np.float64), 1)
        canvas = np.zeros((1102, 1102))
        gy, gx = np.zeros((1101, 1102)), np.zeros((1102, 1101))
        for _, y, x in cond.coords:
            canvas[y : y + 130, x : x + 130] += w
            gy[y : y + 129, x : x + 130] += np.abs(np.diff(w, axis=0))
            gx[y : y + 130, x : x + 129] += np.abs(np.diff(w, axis=1))
        canvas, gy, gx = canvas[1:-1, 1:-1], gy[1:-1, 1:-1], gx[1:-1, 1:-1]
        with np.errstate(divide="ignore", invalid="ignore"):
            by = gy / np.minimum(canvas[1:], canvas[:-1])
            bx = gx / np.minimum(canvas[:, 1:], canvas[:, :-1])
        bound = max(by[mask[1:] & mask[:-1]].max(), bx[mask[:, 1:] & mask[:, :-1]].max()) + 2e-3  # float16
        steps[blend] = _steps(field, mask)
        if blend != "mean":
            assert steps[blend].max() <= bound, (blend, steps[blend].max(), bound)
    # seams: a constant window jumps at every patch edge, tapered windows do not
    p99 = {k: np.percentile(v, 99.5) for k, v in steps.items()}
    assert p99["gaussian"] < p99["mean"] / 2 and p99["cosine"] < p99["mean"] / 2, p99


def test_ome_outputs_open_in_other_readers(odd_store, tmp_path):
    cond = PatchStore.open(odd_store)
    _fake_prediction(odd_store, tmp_path / "pred.zarr", np.asarray(cond.images[:, 2:3]) / 65535)
    res = run_cli(
        "stitch", str(tmp_path / "pred.zarr"), "--out", str(tmp_path / "map.ome.zarr"), "--tiff", str(tmp_path / "map.ome.tif"), "--quiet"
    )
    assert res.returncode == 0, res.stderr
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    image = next(iter(Reader(parse_url(str(tmp_path / "map.ome.zarr")))()))
    assert image.metadata["channel_names"] == ["NP (predicted)"]
    assert [tuple(a.shape) for a in image.data] == [(1, 1100, 1100), (1, 550, 550)]
    transforms = image.metadata["coordinateTransformations"]
    assert transforms[0] == [{"type": "scale", "scale": [1.0, 0.5, 0.5]}]
    assert transforms[1] == [{"type": "scale", "scale": [1.0, 1.0, 1.0]}, {"type": "translation", "translation": [0.0, 0.25, 0.25]}]
    assert [a["unit"] for a in image.metadata["axes"][1:]] == ["micrometer", "micrometer"]
    # the patch maps: a second image, 8-px blocks centred on the pixels they average
    maps = next(iter(Reader(parse_url(str(tmp_path / "map.ome.zarr" / PATCH_MAPS)))()))
    assert maps.metadata["channel_names"] == ["divergence", "multi-modal share", "coverage"]
    assert [tuple(a.shape) for a in maps.data] == [(3, 138, 138)]
    assert maps.metadata["coordinateTransformations"][0] == [
        {"type": "scale", "scale": [1.0, 4.0, 4.0]},
        {"type": "translation", "translation": [0.0, 1.75, 1.75]},
    ]
    with tifffile.TiffFile(tmp_path / "map.ome.tif") as tif:
        assert tif.is_ome and len(tif.series[0].levels) == 2
        assert "NP (predicted)" in tif.ome_metadata
        level0 = tif.series[0].levels[0].asarray()
    assert level0.dtype == np.float32  # viewers without half-float support read the TIFF
    np.testing.assert_array_equal(level0, np.asarray(zarr.open_group(str(tmp_path / "map.ome.zarr"), mode="r")["0"][0]).astype(np.float32))


def test_unknown_window_is_refused(tmp_path):
    res = run_cli("stitch", str(tmp_path / "none.zarr"), "--out", str(tmp_path / "m.ome.zarr"), "--blend", "box")
    assert res.returncode == 2


class _Conditions:
    """The parts of a conditions store that a prediction store copies."""

    def __init__(self, coords: np.ndarray, patch: int, overlap: int, shape: tuple[int, int]) -> None:
        self.coords = coords
        self.images = np.empty((len(coords), 1, patch, patch), np.uint8)
        self.attrs = {"shard_patches": 4, "stride": patch - overlap, "overlap": overlap, "mpp": 0.5}
        self.slides = [{"slide_id": "p", "shape": list(shape), "mpp": 0.5}]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    h=st.integers(40, 300),
    w=st.integers(40, 300),
    patch=st.sampled_from([16, 32, 40]),
    overlap_frac=st.floats(0, 0.75),
    blend=st.sampled_from(["gaussian", "cosine", "linear", "mean"]),
    seed=st.integers(0, 10),
)
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
