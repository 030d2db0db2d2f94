"""Every bad input, through the CLI as a user runs it: exit code 2, one line naming the file and the
problem, no traceback, nothing left behind. The case list is the one the closing note reports."""

from __future__ import annotations

import json
import pickle
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import tifffile

from wsi_damm.training.config import resolve

from .conftest import FIXTURES, run_cli, run_process


def _slide(path: Path, data: np.ndarray, names=("CD31", "DAPI", "NP"), tile: int | None = 64) -> Path:
    """A small OME-TIFF (C, Y, X) with channel names, tiled and compressed like a scanner's."""
    opts = {"tile": (tile, tile), "compression": "zlib"} if tile else {}
    tifffile.imwrite(
        path,
        data,
        photometric="minisblack",
        metadata={"axes": "CYX", "Channel": {"Name": list(names[: len(data)])}, "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5},
        **opts,
    )
    return path


def _tissue(size: int = 384, dtype=np.uint16, seed: int = 0) -> np.ndarray:
    """Three channels with a bright disc of 'tissue' on a dark background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.4 * size) ** 2).astype(np.float64)
    data = np.stack([100 + 2000 * disc * rng.random((size, size)) for _ in range(3)])
    return data.astype(dtype)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return _slide(tmp_path_factory.mktemp("good") / "good.ome.tif", _tissue())


@pytest.fixture(scope="module")
def store(good, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("store") / "s.zarr"
    res = run_cli("tile", str(good), "--out", str(out), "--patch-size", "64", "--overlap", "16", "--quiet")
    assert res.returncode == 0, res.stderr
    return out


def _copy_store(store: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(store, dst)
    return dst


def _run_dir(path: Path, patch: int = 64, broken: str | None = None) -> Path:
    """A run directory as `train` leaves it (real, untrained weights); `broken` names a weights file to truncate."""
    from wsi_damm.training.checkpoint import save_weights
    from wsi_damm.training.run_dir import build_autoencoder, build_unet

    path.mkdir()
    cfg = replace(resolve("tiny"), patch_size=patch, roles=("vessels", "nuclei", "target"), mpp=0.5, level=0)
    (path / "config.json").write_text(json.dumps(asdict(cfg)))
    for role in ("vessels", "nuclei", "target"):
        save_weights(path / f"autoencoder_{role}.safetensors", build_autoencoder(cfg), {"role": role})
    save_weights(path / "unet_ema.safetensors", build_unet(cfg), {})
    if broken:
        target = path / f"{broken}.safetensors"
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    return path


# Each case: (id, builder(tmp_path, good, store) -> (argv, path named in the message, text in the message))
def _fixture_case(rel: str):
    def build(tmp, good, store):
        path = FIXTURES / rel
        if not path.exists():
            pytest.skip(f"shared fixture {rel} not available")
        return ["tile", str(path), "--channels", "vessels=0", "--out", str(tmp / "o.zarr"), "--patch-size", "8", "--overlap", "0"], path, ""

    return build


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _truncated(fraction: float):
    def build(tmp, good, store):
        data = good.read_bytes()
        path = tmp / f"cut{int(fraction * 100)}.ome.tif"
        path.write_bytes(data[: int(len(data) * fraction)])
        return ["tile", str(path), "--out", str(tmp / "o.zarr"), "--patch-size", "64", "--overlap", "0"], path, "truncated"

    return build


def _huge_declared(tmp, good, store):
    path = tmp / "huge.tif"
    tifffile.imwrite(path, np.zeros((256, 256), np.uint16), tile=(256, 256), compression="zlib")
    with tifffile.TiffFile(path, mode="r+b") as tif:  # now it declares 10⁶ × 10⁶ px and stores one tile
        tif.pages[0].tags["ImageWidth"].overwrite(1_000_000)
        tif.pages[0].tags["ImageLength"].overwrite(1_000_000)
    return ["tile", str(path), "--channels", "vessels=0", "--out", str(tmp / "o.zarr")], path, "GiB"


def _tile_args(tmp, path, *extra):
    return ["tile", str(path), "--out", str(tmp / "o.zarr"), "--patch-size", "64", "--overlap", "16", *extra]


def _simple(make, text: str = "", extra: tuple[str, ...] = ()):
    def build(tmp, good, store):
        path = make(tmp, good)
        return _tile_args(tmp, path, *extra), path, text

    return build


def _float_slide(value: float):
    def make(tmp, good):
        data = _tissue().astype(np.float32)
        data[1, 100:110, 100:110] = value
        return _slide(tmp / "float.ome.tif", data)

    return make


def _manifest_shapes(tmp, good, store):
    a = _slide(tmp / "a.ome.tif", _tissue()[:1], ("CD31",))
    b = _slide(tmp / "b.ome.tif", _tissue(320)[:1], ("DAPI",))
    m = tmp / "m.csv"
    m.write_text(f"slide_id,vessels,nuclei\ns1,{a},{b}\n")
    return ["tile", "--manifest", str(m), "--out", str(tmp / "o.zarr"), "--patch-size", "64", "--overlap", "0"], b, "size"


def _bad_manifest(tmp, good, store):
    m = tmp / "m.csv"
    m.write_text("slide,cd31\nx,y\n")
    return ["tile", "--manifest", str(m), "--out", str(tmp / "o.zarr")], m, "header"


def _newer_store(tmp, good, store):
    s = _copy_store(store, tmp / "new.zarr")
    meta = json.loads((s / "zarr.json").read_text())
    meta["attributes"]["format_version"] = 99
    (s / "zarr.json").write_text(json.dumps(meta))
    return ["train", str(s), "--out", str(tmp / "run")], s, "newer"


def _incomplete_store(tmp, good, store):
    s = _copy_store(store, tmp / "half.zarr")
    meta = json.loads((s / "zarr.json").read_text())
    meta["attributes"]["complete"] = False
    (s / "zarr.json").write_text(json.dumps(meta))
    return ["train", str(s), "--out", str(tmp / "run")], s, "complete"


def _truncated_weights(tmp, good, store):
    run = _run_dir(tmp / "run", broken="unet_ema")
    return ["predict", str(run), str(good), "--out", str(tmp / "p.zarr")], run / "unet_ema.safetensors", ""


def _pickle_checkpoint(tmp, good, store):
    run = _run_dir(tmp / "run")
    marker = tmp / "executed"
    (run / "unet_ema.safetensors").write_bytes(pickle.dumps(_Exploit(str(marker))))
    return ["predict", str(run), str(good), "--out", str(tmp / "p.zarr")], run / "unet_ema.safetensors", ""


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def _patch_mismatch(tmp, good, store):
    run = _run_dir(tmp / "run", patch=128)
    return ["train", str(store), "--out", str(run)], run, "128-px"


def _not_a_run(tmp, good, store):
    (tmp / "empty").mkdir()
    return ["predict", str(tmp / "empty"), str(good), "--out", str(tmp / "p.zarr")], tmp / "empty", "run directory"


def _not_a_map(tmp, good, store):
    return ["evaluate", str(store), "--truth", str(good), "--out", str(tmp / "rep")], store, "OME-Zarr"


def _no_vessels(tmp, good, store):
    run = _run_dir(tmp / "run")
    path = _slide(tmp / "dapi.ome.tif", _tissue()[1:2], ("DAPI",))
    return ["predict", str(run), str(path), "--out", str(tmp / "p.zarr")], path, "vessels"


CASES = {
    **{f"fixture:{p.name}": _fixture_case(f"broken/{p.name}") for p in sorted((FIXTURES / "broken").glob("*"))},
    "fixture:unopenable.tiff": _fixture_case("openslide/unopenable.tiff"),
    "fixture:unreadable.svs": _fixture_case("openslide/unreadable.svs"),
    "fixture:16-bit DICOM": _fixture_case("wsi/highdicom_sm_image_grayscale.dcm"),
    "fixture:fluorescence DICOM": _fixture_case("dicom_fluorescence_wsi/FluorCell_4/2"),
    "truncated 10 %": _truncated(0.10),
    "truncated 50 %": _truncated(0.50),
    "truncated 99 %": _truncated(0.99),
    "declared 10⁶ × 10⁶": _huge_declared,
    "zero-byte file": _simple(lambda tmp, good: _write(tmp / "empty.ome.tif", b""), "empty"),
    "missing file": _simple(lambda tmp, good: tmp / "nope.ome.tif", "no such file"),
    "directory as slide": _simple(lambda tmp, good: (tmp / "d").mkdir() or tmp / "d", "directory"),
    # a PNG signature is read as a plain image whatever the name; this one has no image after it
    "broken PNG named .svs": _simple(
        lambda tmp, good: _write(tmp / "x.svs", bytes.fromhex("89504e470d0a1a0a") + bytes(64)), "cannot open the png file"
    ),
    "manifest shapes differ": _manifest_shapes,
    "manifest without role columns": _bad_manifest,
    "missing role": _simple(lambda tmp, good: _slide(tmp / "two.ome.tif", _tissue()[:2], ("GFP", "DAPI")), "vessels"),
    "unknown channel name": _simple(lambda tmp, good: good, "CD99", ("--channels", "vessels=CD99")),
    "duplicate roles": _simple(lambda tmp, good: good, "both point to", ("--channels", "vessels=CD31,nuclei=CD31")),
    "NaN in a float channel": _simple(_float_slide(np.nan), "NaN"),
    "Inf in a float channel": _simple(_float_slide(np.inf), "Inf"),
    "all-zero slide": _simple(lambda tmp, good: _slide(tmp / "zero.ome.tif", np.zeros((3, 256, 256), np.uint16)), "tissue"),
    "slide smaller than a patch": _simple(lambda tmp, good: _slide(tmp / "tiny.ome.tif", _tissue(48), tile=16), "smaller"),
    "negative patch size": lambda tmp, good, store: (
        ["tile", str(good), "--out", str(tmp / "o.zarr"), "--patch-size", "-64"],
        "--patch-size",
        "positive",
    ),
    "zero patch size": lambda tmp, good, store: (
        ["tile", str(good), "--out", str(tmp / "o.zarr"), "--patch-size", "0"],
        "--patch-size",
        "positive",
    ),
    "overlap ≥ patch": lambda tmp, good, store: (
        ["tile", str(good), "--out", str(tmp / "o.zarr"), "--patch-size", "64", "--overlap", "64"],
        "--overlap",
        "",
    ),
    "negative overlap": lambda tmp, good, store: (["tile", str(good), "--out", str(tmp / "o.zarr"), "--overlap", "-1"], "--overlap", ""),
    "store from a newer version": _newer_store,
    "store never completed": _incomplete_store,
    "truncated safetensors": _truncated_weights,
    "pickle where a checkpoint belongs": _pickle_checkpoint,
    "run trained on another patch size": _patch_mismatch,
    "not a run directory": _not_a_run,
    "evaluate a non-map": _not_a_map,
    "predict without vessels": _no_vessels,
    "bad --plane": lambda tmp, good, store: (_tile_args(tmp, good, "--plane", "Z"), "--plane", "AXIS=INDEX"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_line(case, tmp_path, good, store):
    """In process through click's runner (what a user's shell sees: stderr and the exit code)."""
    import traceback

    from click.testing import CliRunner

    from wsi_damm_cli.main import cli

    argv, named, text = CASES[case](tmp_path, good, store)
    before = {p.name for p in tmp_path.iterdir()}
    res = CliRunner().invoke(cli, argv)
    assert isinstance(res.exception, SystemExit) or res.exception is None, "".join(traceback.format_exception(*res.exc_info))
    assert res.exit_code == 2, (res.exit_code, res.stderr[-2000:])
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith("wsi-damm: warning:")]
    assert len(lines) == 1 and lines[0].startswith("wsi-damm: error: "), res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert str(named) in lines[0], lines[0]
    assert text.lower() in lines[0].lower(), lines[0]
    assert {p.name for p in tmp_path.iterdir()} == before, "output left behind"
    assert not (tmp_path / "executed").exists(), "a pickle was executed"


def test_the_console_script_exits_2_with_one_line(tmp_path, good, store):
    """The same contract from a real process: the console script's exit code and nothing else on stderr."""
    argv, named, _ = CASES["store from a newer version"](tmp_path, good, store)
    res = run_process(*argv, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("wsi-damm: error: ") and str(named) in lines[0], res.stderr[-2000:]


def test_the_suite_covers_thirty_distinct_inputs():
    assert len(CASES) >= 30


@pytest.mark.parametrize("limit", ["disk", "memory"])
def test_tile_and_stitch_refuse_what_would_not_fit(limit, good, store, tmp_path, monkeypatch):
    from wsi_damm.slides import specs_from_paths
    from wsi_damm.stages.stitch import run_stitch
    from wsi_damm.stages.tile import run_tile
    from wsi_damm.tiling.plan import TileConfig
    from wsi_damm.tiling.store import PatchStore, create_prediction_store
    from wsi_damm.util import jobs
    from wsi_damm.util.errors import InputError

    cond = PatchStore.open(store)
    pred = tmp_path / "pred.zarr"
    root = create_prediction_store(pred, cond, {"roles": cond.roles, "nuclei": True})
    root["shard_done"][:] = 1
    root.attrs["complete"] = True
    if limit == "disk":
        monkeypatch.setattr(jobs, "free_disk", lambda path: 10_000)
        match, kw = "free there", {}
    else:
        monkeypatch.setattr(jobs, "available_memory", lambda: 16 * 2**20)
        match, kw = "memory available", {"workers": 4}
    with pytest.raises(InputError, match=match):
        run_tile(specs_from_paths([str(good)], {}), tmp_path / "o.zarr", TileConfig(patch_size=64, overlap=16), progress=False, **kw)
    with pytest.raises(InputError, match=match):
        run_stitch(pred, tmp_path / "map.ome.zarr", progress=False, **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.zarr"]
