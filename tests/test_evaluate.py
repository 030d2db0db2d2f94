"""Evaluation end to end on a synthetic slide, `compare`, and refusing mismatched maps."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import tifffile
import zarr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from wsi_damm.stages.stitch import run_stitch
from wsi_damm.tiling.store import PatchStore, create_prediction_store

from .conftest import run_cli


@pytest.fixture(scope="module")
def perfect_map(tmp_path_factory):
    """A map that is the measured NP channel itself (true patches stitched), for a 1100² slide."""
    from wsi_damm.workflows.simulator import SynthConfig
    from wsi_damm.workflows.synth import write_slides

    d = tmp_path_factory.mktemp("eval")
    write_slides(d, 1, SynthConfig(size=1100, seed=21), progress=False)
    slide = d / "synth_000.ome.tif"
    store = d / "st.zarr"
    assert (
        run_cli(
            "tile", str(slide), "--out", str(store), "--patch-size", "128", "--overlap", "32", "--store-dtype", "uint16", "--quiet"
        ).returncode
        == 0
    )
    cond = PatchStore.open(store)
    root = create_prediction_store(d / "pred.zarr", cond, {"roles": cond.roles, "nuclei": True})
    root["pred"][:] = (np.asarray(cond.images[:, 2:3]) / 65535).astype(np.float16)
    root["divergence"][:] = 0.2
    root["multimodal_fraction"][:] = 1.0
    root["shard_done"][:] = 1
    root.attrs["complete"] = True
    [m] = run_stitch(d / "pred.zarr", d / "map.ome.zarr", progress=False)
    return d, m, slide


def test_evaluate_writes_the_report_and_scores_a_perfect_map(perfect_map, tmp_path):
    d, m, slide = perfect_map
    out = tmp_path / "report"
    res = run_cli(
        "evaluate", str(m), "--truth", str(slide), "--clean", str(d / "truth" / "synth_000.np_clean.ome.tif"), "--out", str(out), "--quiet"
    )
    assert res.returncode == 0, res.stderr
    for name in ("metrics.json", "patches.csv", "overview.png", "zoom.png", "metrics_hist.png", "divergence_vs_error.png", "report.html"):
        assert (out / name).exists() and (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    r = metrics["slides"][0]
    assert r["wsi"]["ssim_tissue"] > 0.999 and r["wsi"]["psnr_tissue"] > 60  # float16 storage only
    assert r["patches"]["ssim_percent"]["mean"] > 99.9 and r["patches"]["ssim_percent"]["n"] > 10
    assert 0 < r["oracle_wsi"]["ssim_tissue"] < 0.999 and 10 < r["oracle_wsi"]["psnr_tissue"] < 60  # noise bounds the oracle
    seams = r["seams"]  # the true patches stitched back: the map has the measured channel's seam score
    assert seams["stride"] > 0 and seams["pairs"] > 10_000 and abs(seams["map"] - seams["measured"]) < 0.02 and seams["measured"] < 1.2
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5 and "synth_000" in html and "Seam score" in html  # 4 figures + the map thumbnail
    rows = (out / "patches.csv").read_text().splitlines()
    assert rows[0].startswith("slide,y,x,ssim,psnr") and len(rows) - 1 == r["patches"]["ssim_percent"]["n"]
    header = rows[0].split(",")
    for row in rows[1:]:  # read from the patch maps: every patch had divergence 0.2, share 1
        values = dict(zip(header, row.split(",")))
        assert abs(float(values["divergence"]) - 0.2) < 1e-3 and float(values["multimodal_share"]) == 1.0


def test_evaluate_names_a_map_without_patch_maps(perfect_map, tmp_path):
    d, m, slide = perfect_map
    old = tmp_path / "old.ome.zarr"
    shutil.copytree(m, old)
    shutil.rmtree(old / "patch_maps")
    res = run_cli("evaluate", str(old), "--truth", str(slide), "--out", str(tmp_path / "r"))
    assert res.returncode == 2 and "old.ome.zarr" in res.stderr and "patch_maps" in res.stderr and "Traceback" not in res.stderr


def test_evaluate_refuses_a_map_of_another_size(perfect_map, synth_dir, tmp_path):
    _, m, _ = perfect_map
    other = sorted(synth_dir.glob("*.ome.tif"))[0]  # 2048² slide
    res = run_cli("evaluate", str(m), "--truth", str(other), "--out", str(tmp_path / "r"))
    assert res.returncode == 2 and "covers" in res.stderr and "Traceback" not in res.stderr


def test_compare_equals_scikit_image(tmp_path, perfect_map):
    rng = np.random.default_rng(5)
    a = rng.random((300, 451))
    b = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    res = run_cli("compare", str(tmp_path / "a.npy"), str(tmp_path / "b.npy"), "--json")
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    want = structural_similarity(a, b, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert r["ssim"] == pytest.approx(want, abs=1e-4)
    assert r["psnr"] == pytest.approx(peak_signal_noise_ratio(a, b, data_range=1.0), abs=1e-9)
    same = json.loads(run_cli("compare", str(tmp_path / "a.npy"), str(tmp_path / "a.npy"), "--json").stdout)
    assert same["psnr"] == "inf" and same["ssim"] == pytest.approx(1.0)
    # an OME-Zarr map and a TIFF, as stored
    _, m, _ = perfect_map
    np_map = np.asarray(zarr.open_group(str(m), mode="r")["0"][0])
    tifffile.imwrite(tmp_path / "m.tif", np_map)
    r = json.loads(run_cli("compare", str(m), str(tmp_path / "m.tif"), "--json").stdout)
    assert r["psnr"] == "inf"


def test_several_slides_give_per_slide_rows_and_pooled_numbers(perfect_map, tmp_path):
    import shutil

    d, m, slide = perfect_map
    twin = tmp_path / "twin.ome.tif"  # the same section under another slide id
    shutil.copy(slide, twin)
    out = tmp_path / "multi"
    res = run_cli("evaluate", str(m), str(m), "--truth", str(slide), "--truth", str(twin), "--out", str(out), "--quiet")
    assert res.returncode == 0, res.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["slides"]) == 2 and metrics["pooled"]["slides"] == 2
    one = metrics["slides"][0]
    assert metrics["pooled"]["wsi"]["ssim"] == pytest.approx(one["wsi"]["ssim"])
    assert metrics["pooled"]["patches"]["ssim_percent"]["n"] == 2 * one["patches"]["ssim_percent"]["n"]
    res = run_cli("evaluate", str(m), "--truth", str(slide), "--truth", str(slide), "--out", str(out))
    assert res.returncode == 2 and "one --truth per map" in res.stderr


def test_the_overview_leaves_the_divergence_blank_for_a_map_without_a_gate(perfect_map):
    """A map whose run had no gate (this one, like the baseline's or the regression U-Net's) stores zeros as its
    divergence; drawn, they would read as 'the gate fused everywhere'."""
    from dataclasses import replace

    from wsi_damm.evaluation.report import divergence_panel
    from wsi_damm.stitching.slide_map import open_map

    _, m, _ = perfect_map
    div = np.full((4, 5), 0.2)
    assert open_map(m).gamma is None
    shown, title = divergence_panel(div, open_map(m))
    assert np.isnan(shown).all() and "no gate" in title
    shown, title = divergence_panel(div, replace(open_map(m), gamma=0.5))
    assert np.array_equal(shown, div) and title == "divergence d = 1 − mean κ"
    assert divergence_panel(div, replace(open_map(m), gamma=0.5, nuclei=False))[1] == "divergence: uni-modal only"
