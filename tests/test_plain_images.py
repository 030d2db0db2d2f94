"""Plain microscope exports — RGB JPEG / PNG / TIFF composites, written here by Pillow — open as
single-level slides with channels R, G, B, need a declared pixel size, and tile like any slide."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tests.conftest import count_files, run_cli
from wsi_damm.slides.open import open_file
from wsi_damm.tiling.store import PatchStore
from wsi_damm.util.errors import InputError


def _composite(n: int = 384) -> np.ndarray:
    """(n, n, 3) uint8: red vessels (lines), green NP around them, blue nuclei (dots) — a stained field."""
    rng = np.random.default_rng(0)
    img = np.zeros((n, n, 3), np.uint8)
    img[:, :, 2] = 30
    for y, x in rng.integers(4, n - 4, (400, 2)):
        img[y - 3 : y + 4, x - 3 : x + 4, 2] = 220
    for k in range(6):
        img[40 + 55 * k : 46 + 55 * k, :, 0] = 250
    img[:, :, 1] = (np.convolve(img[:, n // 2, 0].astype(float), np.ones(31) / 31, "same")[:, None] * 0.8).astype(np.uint8)
    return img


@pytest.fixture()
def images(tmp_path):
    rgb = _composite()
    paths = {
        "png": tmp_path / "field.png",
        "jpg": tmp_path / "field.jpg",
        "jpg444": tmp_path / "field444.jpg",
        "tif": tmp_path / "field.tif",
    }
    Image.fromarray(rgb).save(paths["png"])
    Image.fromarray(rgb).save(paths["jpg"], quality=95)  # Pillow's default: 4:2:0 chroma subsampling
    Image.fromarray(rgb).save(paths["jpg444"], quality=95, subsampling=0)
    Image.fromarray(rgb).save(paths["tif"])
    return rgb, paths


def test_plain_images_read_as_rgb_channels(images):
    rgb, paths = images
    for kind in ("png", "jpg", "tif"):
        with open_file(paths[kind], mpp=0.5) as slide:
            assert slide.channel_names == ["R", "G", "B"]
            assert len(slide.levels) == 1 and slide.levels[0].shape == (3, 384, 384)
            assert slide.mpp == 0.5
            region = slide.read_region(0, 10, 20, 100, 120)
        reference = np.moveaxis(np.asarray(Image.open(paths[kind]).convert("RGB")), -1, 0)[:, 10:110, 20:140]
        assert np.array_equal(region, reference)
    with open_file(paths["png"], mpp=0.5) as slide:  # lossless: the pixels written
        assert np.array_equal(slide.read_region(0, 0, 0, 384, 384), np.moveaxis(rgb, -1, 0))


def test_plain_images_need_a_pixel_size(images):
    _, paths = images
    with pytest.raises(InputError, match="carries no pixel size.*--mpp"):
        open_file(paths["jpg"])
    with open_file(paths["tif"]) as slide:  # a TIFF opens (it could carry resolution tags); this one has no scale
        assert slide.mpp is None


def test_tile_a_jpeg_composite(images, tmp_path):
    _, paths = images
    out = tmp_path / "s.zarr"
    args = [
        "tile",
        str(paths["jpg"]),
        "--channels",
        "vessels=R,nuclei=B,target=G",
        "--out",
        str(out),
        "--patch-size",
        "128",
        "--overlap",
        "32",
        "--quiet",
    ]
    res = run_cli(*args)
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "field.jpg" in res.stderr and "--mpp" in res.stderr
    assert not out.exists() and count_files(tmp_path) == 4  # nothing half-written
    res = run_cli(*args, "--mpp", "0.5")
    assert res.returncode == 0, res.stderr
    store = PatchStore.open(out)
    assert len(store) > 0 and store.attrs["roles"] == ["vessels", "nuclei", "target"] and store.attrs["mpp"] == pytest.approx(0.5)


def test_info_notes_jpeg_chroma_subsampling(images):
    _, paths = images
    res = run_cli("info", str(paths["jpg"]), "--mpp", "0.5", "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["chroma_subsampling"] == "4:2:0" and any("4:2:0 chroma subsampling" in n for n in info["notes"])
    assert info["channels"] == ["R", "G", "B"] and info["mpp"] == 0.5
    info = json.loads(run_cli("info", str(paths["jpg444"]), "--mpp", "0.5", "--json").stdout)
    assert info["chroma_subsampling"] == "4:4:4" and not any("subsampling" in n for n in info["notes"])


def test_grey_png_is_one_channel(tmp_path):
    path = tmp_path / "dapi.png"
    grey = (np.arange(200 * 300) % 251).astype(np.uint8).reshape(200, 300)
    Image.fromarray(grey).save(path)
    with open_file(path, mpp=1.0) as slide:
        assert slide.channel_names == ["gray"]
        assert np.array_equal(slide.read_region(0, 0, 0, 200, 300)[0], grey)
