"""Registration of separately scanned stains: known shifts and rotations are recovered, patches of a
moved slide match those of the original, per-channel files of slightly different sizes are aligned."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from scipy import fft as sfft
from scipy import ndimage

from wsi_damm.slides import specs_from_manifest
from wsi_damm.slides.roles import Transform
from wsi_damm.tiling.correlation import band_pass, band_radius, fourier_moved, gaussian
from wsi_damm.tiling.registration import register_specs
from wsi_damm.tiling.store import PatchStore
from wsi_damm_cli.main import cli

from .conftest import run_cli

NAMES = ["CD31", "DAPI", "NP"]
SHIFTS = {"nuclei": (13.4, -27.7, 0.0), "target": (-21.6, 17.3, 0.0)}
RIGID = {"nuclei": (-9.5, 24.2, 2.5), "target": (15.3, -8.8, -1.8)}


def _move(channel: np.ndarray, dy: float, dx: float, degrees: float) -> np.ndarray:
    """The channel as a scanner with this transform would have recorded it (Transform convention:
    reference pixel p shows channel pixel R(p − c) + c + t), cubic resampling."""
    a = np.deg2rad(degrees)
    inv = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])
    c = (np.array(channel.shape) - 1) / 2
    out = ndimage.affine_transform(
        channel.astype(np.float64),
        inv,
        offset=c - inv @ (c + np.array([dy, dx])),
        order=3,
        mode="constant",
        cval=float(np.percentile(channel, 1)),
    )
    return np.clip(np.rint(out), 0, 65535).astype(np.uint16)


def _write(path, data):
    tifffile.imwrite(
        path,
        data,
        metadata={"axes": "CYX", "Channel": {"Name": NAMES[: len(data)]}, "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5},
        tile=(256, 256),
        compression="zlib",
        photometric="minisblack",
    )
    return path


@pytest.fixture(scope="module")
def slides(synth_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("moved")
    original = sorted(synth_dir.glob("*.ome.tif"))[0]
    img = tifffile.imread(original)
    out = {"original": original}
    for name, moves in (("translation", SHIFTS), ("rigid", RIGID)):
        data = img.copy()
        data[1], data[2] = _move(img[1], *moves["nuclei"]), _move(img[2], *moves["target"])
        out[name] = _write(d / f"{name}.ome.tif", data)
    return out


@pytest.fixture(scope="module")
def tiled(slides, tmp_path_factory):
    """`tile --register` run once per (slide, method) as a user would; every test reads the transforms the
    store records, so each registration is computed once."""
    d = tmp_path_factory.mktemp("registered")
    out = {}
    for name, method in (("original", "translation"), ("translation", "translation"), ("original", "rigid"), ("rigid", "rigid")):
        store = d / f"{name}_{method}.zarr"
        res = CliRunner().invoke(
            cli,
            [
                "tile",
                str(slides[name]),
                "--out",
                str(store),
                "--patch-size",
                "128",
                "--overlap",
                "0",
                "--register",
                method,
                "--store-dtype",
                "uint16",
                "--qc",
                str(d / f"qc_{method}"),
                "--quiet",
                "--log-file",
                str(d / "tile.log"),
            ],
        )
        assert res.exit_code == 0, res.stderr[-2000:]
        assert "registration:" in res.stderr
        out[name, method] = (store, d / f"qc_{method}")
    # the registration lines reach --log-file too, timestamped (not only stderr)
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ INFO wsi_damm.cli: registration: ", (d / "tile.log").read_text(), re.M)
    return out


def _transforms(tiled, name, method) -> dict[str, Transform]:
    """The transforms recorded in the slide table of the store tiled from `name` with `--register method`."""
    channels = PatchStore.open(tiled[name, method][0]).slides[0]["channels"]
    return {role: Transform(**channels[role]["registration"]) for role in ("nuclei", "target")}


def test_translation_is_recovered(tiled):
    base, moved = _transforms(tiled, "original", "translation"), _transforms(tiled, "translation", "translation")
    for role, (dy, dx, _) in SHIFTS.items():
        t, b = moved[role], base[role]
        # different stains have no pixel-exact common optimum: the unmoved slide's stains register a
        # fraction of a pixel apart (its content, random across slides); what registration must
        # recover is the shift that was applied on top
        assert np.hypot(t.dy - b.dy - dy, t.dx - b.dx - dx) <= 0.25, (role, t, b)  # 0.02–0.13 px seen
        if role == "target":  # NP follows the vessels closely, so even the absolute shift is close
            assert np.hypot(t.dy - dy, t.dx - dx) <= 0.5, (role, t)
        assert t.degrees == 0 and t.score > t.score_before and t.score > 0.1


def test_rotation_is_recovered(tiled):
    base, moved = _transforms(tiled, "original", "rigid"), _transforms(tiled, "rigid", "rigid")
    for role, (dy, dx, degrees) in RIGID.items():
        t, b = moved[role], base[role]
        assert abs(t.degrees - b.degrees - degrees) <= 0.2, (role, t, b)
        # the content offset b of the unmoved stains, carried through the applied rotation
        a = np.deg2rad(degrees)
        ey, ex = dy + np.cos(a) * b.dy - np.sin(a) * b.dx, dx + np.sin(a) * b.dy + np.cos(a) * b.dx
        assert np.hypot(t.dy - ey, t.dx - ex) <= 0.5, (role, t, b)


@pytest.mark.parametrize("method", ["translation", "rigid"])  # the slide moved that way, registered that way
def test_registered_patches_match_the_original(tiled, method):
    a, b = (PatchStore.open(tiled[name, method][0]) for name in ("original", method))
    assert (tiled[method, method][1] / f"{method}_registration.png").stat().st_size > 10_000
    assert "registration" in b.slides[0]["channels"]["nuclei"]  # recorded in the slide table
    key = {tuple(c[1:]): i for i, c in enumerate(a.coords)}
    pairs = [(key[tuple(c[1:])], j) for j, c in enumerate(b.coords) if tuple(c[1:]) in key]
    assert len(pairs) > 50
    m = 48  # interiors: away from where the moved channel's content was cut off at the slide edge
    inner = [(i, j) for i, j in pairs if all(m <= v <= 2048 - 128 - m for v in a.coords[i, 1:])]
    ia, ib = (np.array(v) for v in zip(*inner))
    pa = np.asarray(a.images[:])[ia].astype(np.float64) / 65535
    pb = np.asarray(b.images[:])[ib].astype(np.float64) / 65535
    for k, role in ((1, "nuclei"), (2, "target")):
        mse = np.mean((pa[:, k, m:-m, m:-m] - pb[:, k, m:-m, m:-m]) ** 2)
        assert 10 * np.log10(1 / mse) >= 40, (role, 10 * np.log10(1 / mse))


def test_per_channel_files_of_different_sizes_are_aligned(slides, tiled, tmp_path):
    img = tifffile.imread(slides["original"])
    cd31 = _write(tmp_path / "cd31.ome.tif", img[:1])
    dapi = _write(tmp_path / "dapi.ome.tif", np.ascontiguousarray(img[1:2, 6:, 4:]))  # cropped by 6 and 4 px
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"slide_id,vessels,nuclei\ns,{cd31},{dapi}\n")
    res = run_cli("tile", "--manifest", str(manifest), "--out", str(tmp_path / "x.zarr"), "--patch-size", "128", "--quiet")
    assert res.returncode == 2 and "--size-tolerance" in res.stderr
    [spec] = specs_from_manifest(manifest)
    from dataclasses import replace

    [reg] = register_specs([replace(spec, size_tolerance=0.01)], "translation")
    t, b = dict(reg.transforms)["nuclei"], _transforms(tiled, "original", "translation")["nuclei"]
    assert np.hypot(t.dy - b.dy + 6, t.dx - b.dx + 4) <= 0.5, (t, b)  # nuclei pixel p − (6, 4) shows reference pixel p


@pytest.mark.parametrize("shape", [(2048, 2048), (301, 211), (12, 9)])
def test_band_pass_equals_two_gaussian_filters(shape):
    """The Fourier-domain band-pass is scipy's spatial one (mirror boundary included), to float32 rounding."""
    img = (np.random.default_rng(1).random(shape) * 4000).astype(np.uint16)
    x = np.log1p(img.astype(np.float32))
    expected = ndimage.gaussian_filter(x, 4.0) - ndimage.gaussian_filter(x, 16.0)
    np.testing.assert_allclose(band_pass(img, 4.0, 16.0), expected, atol=1e-5)


@pytest.mark.parametrize("shape", [(96, 96), (120, 97)])  # even and odd widths: the half spectrum's last column differs
def test_phase_shift_equals_scikit_image_and_its_peak_the_shifted_sum(shape):
    """Our phase correlation on half spectra against scikit-image's `phase_cross_correlation` (normalization None,
    1/50 px); its magnitude against Σ ref · (mov moved by s, linear interpolation) on tapered windows."""
    from skimage.registration import phase_cross_correlation

    from wsi_damm.tiling.correlation import phase_shift, taper

    rng = np.random.default_rng(5)
    base = band_pass(rng.random((shape[0] + 40, shape[1] + 40)).astype(np.float32) * 1000, 1.5, 6.0)
    weights = taper(shape, 12)
    for d in rng.uniform(-4, 4, (4, 2)):
        ref = base[20:-20, 20:-20] * weights
        mov = ndimage.shift(base, -d, order=3)[20:-20, 20:-20] * weights
        mov = mov + rng.normal(0, 0.3 * ref.std(), shape).astype(np.float32)
        expected, _, _ = phase_cross_correlation(ref, mov, upsample_factor=50, normalization=None)
        got, peak = phase_shift(ref, mov)
        np.testing.assert_allclose(got, expected, atol=1e-6)
        assert peak == pytest.approx(abs(float(np.sum(ref * ndimage.shift(mov, got, order=1, mode="constant")))), rel=1e-3)


@pytest.mark.parametrize("shape", [(1024, 1024), (301, 211), (12, 9)])
def test_fourier_gaussian_equals_scipy(shape):
    """The tissue outline's smoothing in the Fourier domain is scipy's `gaussian_filter` (mirror boundary), to float32
    rounding."""
    img = (np.random.default_rng(2).random(shape) * 4000).astype(np.uint16)
    np.testing.assert_allclose(gaussian(img, 12.0), ndimage.gaussian_filter(img.astype(np.float32), 12.0), atol=2e-3)


@pytest.mark.parametrize("shape", [(64, 48), (63, 47)])
def test_fourier_move_equals_scipys_fourier_shift(shape):
    """A fractional move by one phase ramp per axis is `ndimage.fourier_shift` on the half spectrum, even and odd sides."""
    band = np.random.default_rng(4).normal(size=shape).astype(np.float32)
    d = np.array([1.37, -2.61])
    want = sfft.irfft2(ndimage.fourier_shift(sfft.rfft2(band), d, n=shape[1]), s=shape)
    np.testing.assert_allclose(fourier_moved(band, d), want, atol=2e-6)


def test_band_pass_far_from_the_edge_does_not_depend_on_the_window():
    """What the unmoved score slices from a larger window read before: past `band_radius` from the edge the band-passed
    pixels are those of the window itself."""
    img = (np.random.default_rng(5).random((300, 260)) * 4000).astype(np.uint16)
    fine, coarse = 2.0, 8.0
    r = band_radius(coarse)
    inner = band_pass(img[40:240, 30:220], fine, coarse)[r:-r, r:-r]
    from_larger = band_pass(img, fine, coarse)[40 + r : 240 - r, 30 + r : 220 - r]
    np.testing.assert_allclose(inner, from_larger, atol=1e-5)
    near_edge = band_pass(img[40:240, 30:220], fine, coarse)[:r, :r]
    assert not np.allclose(near_edge, band_pass(img, fine, coarse)[40 : 40 + r, 30 : 30 + r], atol=1e-5)  # the mirror shows
