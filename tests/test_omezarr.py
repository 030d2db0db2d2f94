"""OME-Zarr (NGFF 0.4 and 0.5) as input, written by a third-party writer (ome-zarr-py); vendor
formats we do not decode are refused in one line naming the converter."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr

from wsi_damm.api import tile
from wsi_damm.slides import open_file
from wsi_damm.tiling.store import PatchStore
from wsi_damm.util.errors import InputError

from .conftest import count_files, run_cli

ome_writer = pytest.importorskip("ome_zarr.writer")
ome_format = pytest.importorskip("ome_zarr.format")
NAMES = ["CD31", "DAPI", "NP"]


def _image(shape=(3, 300, 420), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(50, 4000, size=shape, dtype=np.uint16)
    img[:, 100:220, 120:330] += 20000  # a bright block of "tissue" on dim glass
    return img


def _omero(n: int) -> dict:
    return {
        "channels": [{"label": NAMES[i], "color": "FFFFFF", "window": {"min": 0, "max": 65535, "start": 0, "end": 30000}} for i in range(n)]
    }


def _write(path, img, fmt, axes="cyx", mpp=0.5, units=True) -> None:
    group = zarr.open_group(str(path), mode="w", zarr_format=2 if fmt.version == "0.4" else 3)
    spatial = {"y": mpp, "x": mpp, **({"z": 2.0} if "z" in axes else {})}
    scale = {"c": 1.0, **spatial}
    ome_writer.write_image(
        img,
        group,
        scale_factors=(2,),
        fmt=fmt,
        axes=axes,
        scale=scale,
        axes_units={a: "micrometer" for a in spatial} if units else None,
        omero=_omero(img.shape[axes.index("c")]),
    )


@pytest.mark.parametrize("fmt", [ome_format.FormatV04(), ome_format.FormatV05()], ids=["ngff0.4", "ngff0.5"])
def test_ome_zarr_opens_lazily_by_level_with_names_and_microns(tmp_path, fmt):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    img = _image()
    path = tmp_path / "slide.ome.zarr"
    _write(path, img, fmt)
    third_party = Reader(parse_url(str(path)))()
    levels = [np.asarray(a) for a in next(iter(third_party)).data]
    with open_file(path) as slide:
        assert type(slide).__name__ == "OmeZarrSlide"
        assert slide.channel_names == NAMES
        assert slide.mpp == pytest.approx(0.5)
        assert [lev.shape for lev in slide.levels] == [(3, 300, 420), (3, 150, 210)]
        assert [lev.downsample for lev in slide.levels] == [1.0, 2.0]
        np.testing.assert_array_equal(slide.read_region(0, 0, 0, 300, 420), img)
        np.testing.assert_array_equal(slide.read_region(0, 37, 51, 64, 80, (2, 0)), img[[2, 0], 37:101, 51:131])
        np.testing.assert_array_equal(slide.read_region(1, 10, 20, 50, 60), levels[1][:, 10:60, 20:80])


def test_ome_zarr_planes_units_and_bioformats2raw_layout(tmp_path):
    img = np.stack([_image(seed=z) for z in range(3)], 1)  # c, z, y, x
    path = tmp_path / "z.ome.zarr"
    _write(path, img, ome_format.FormatV05(), axes="czyx")
    with pytest.raises(InputError, match=r"z axis of size 3 .*--plane Z="):
        open_file(path)
    with open_file(path, planes={"Z": 1}) as slide:
        assert slide.levels[0].shape == (3, 300, 420)
        np.testing.assert_array_equal(slide.read_region(0, 5, 6, 30, 40, (1,)), img[1:2, 1, 5:35, 6:46])

    # bioformats2raw: a root group that points to series 0, 1, … each an image
    root = zarr.open_group(str(tmp_path / "b2r.zarr"), mode="w", zarr_format=3)
    root.attrs["ome"] = {"version": "0.5", "bioformats2raw.layout": 3}
    for series in range(2):
        _write(tmp_path / "b2r.zarr" / str(series), _image(seed=10 + series), ome_format.FormatV05())
    with open_file(tmp_path / "b2r.zarr") as slide:
        np.testing.assert_array_equal(slide.read_region(0, 0, 0, 300, 420), _image(seed=10))
    with open_file(tmp_path / "b2r.zarr", planes={"S": 1}) as slide:
        np.testing.assert_array_equal(slide.read_region(0, 0, 0, 300, 420), _image(seed=11))
    with pytest.raises(InputError, match="series 0..1, not 2"):
        open_file(tmp_path / "b2r.zarr", planes={"S": 2})

    # a scale without a length unit says nothing about µm: the pixel size must be declared
    _write(tmp_path / "nounit.ome.zarr", _image(), ome_format.FormatV04(), units=False)
    assert open_file(tmp_path / "nounit.ome.zarr").mpp is None
    assert open_file(tmp_path / "nounit.ome.zarr", mpp=0.25).mpp == 0.25


def test_ome_zarr_tiles_like_the_same_pixels_as_ome_tiff(tmp_path):
    """The same pixels, as OME-Zarr (ome-zarr-py) and as OME-TIFF (tifffile), give the same patch store."""
    img = _image((3, 512, 640))
    _write(tmp_path / "s.ome.zarr", img, ome_format.FormatV05())
    tifffile.imwrite(
        tmp_path / "s.ome.tif",
        img,
        ome=True,
        resolution=(1e4 / 0.5, 1e4 / 0.5),
        resolutionunit="CENTIMETER",
        metadata={"axes": "CYX", "Channel": {"Name": NAMES}, "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5},
    )
    stores = []
    for name in ("s.ome.zarr", "s.ome.tif"):
        out = tmp_path / f"{name}.patches.zarr"
        tile([tmp_path / name], out=out, channels="vessels=CD31,nuclei=DAPI,target=NP", patch_size=64, overlap=0, quiet=True)
        stores.append(PatchStore.open(out))
    assert len(stores[0].coords) > 0
    np.testing.assert_array_equal(stores[0].coords, stores[1].coords)
    np.testing.assert_array_equal(np.asarray(stores[0].root["images"][:]), np.asarray(stores[1].root["images"][:]))
    assert stores[0].slides[0]["mpp"] == pytest.approx(0.5)

    r = run_cli("info", str(tmp_path / "s.ome.zarr"), "--json")
    assert r.returncode == 0, r.stderr
    assert '"OmeZarrSlide"' in r.stdout and '"CD31"' in r.stdout


@pytest.mark.parametrize(
    "name,head,what",
    [
        ("scan.czi", b"ZISRAWFILE" + bytes(100), "Zeiss CZI"),
        ("scan.bin", b"ZISRAWFILE" + bytes(100), "Zeiss CZI"),  # by signature, whatever the name
        ("scan.nd2", b"\xda\xce\xbe\x0a" + bytes(100), "Nikon ND2"),
        ("scan.lif", b"\x70\x00\x00\x00" + bytes(100), "Leica LIF"),
        ("scan.vsi", b"II*\x00" + bytes(100), "Olympus/Evident VSI"),
    ],
)
def test_vendor_formats_are_refused_naming_the_converter(tmp_path, name, head, what):
    path = tmp_path / name
    path.write_bytes(head)
    out = tmp_path / "patches.zarr"
    r = run_cli("tile", str(path), "--out", str(out))
    assert r.returncode == 2
    line = r.stderr.strip().splitlines()[-1]
    assert str(path) in line and what in line and "bioformats2raw" in line and "bfconvert" in line
    assert len(r.stderr.strip().splitlines()) == 1
    assert not out.exists() and count_files(tmp_path) == 1


def test_directory_that_is_not_ome_zarr_is_refused(tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(InputError, match="not an OME-Zarr image"):
        open_file(tmp_path / "folder")
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w").create_array("a", shape=(4, 4), dtype="u1")
    with pytest.raises(InputError, match="no 'multiscales' metadata"):
        open_file(tmp_path / "plain.zarr")
