"""`wsi-damm bench`: every row trained and scored on the same held-out pixels, resumable, and a recommendation
that follows the numbers."""

from __future__ import annotations

import json
import math

from tests.conftest import TINY_TOML, run_cli
from wsi_damm.util.files import read_json
from wsi_damm.workflows.bench_report import collapsed_autoencoders, recommend, seed_figures


def _row(key: str, r: list[float], spread: float = 1.0, level: float = 1.0) -> dict:
    mean = sum(r) / len(r)
    sd = math.sqrt(sum((x - mean) ** 2 for x in r) / (len(r) - 1)) if len(r) > 1 else math.nan
    return {
        "model": key,
        "key": key,
        "seeds": len(r),
        "pearson_r": {"mean": mean, "sd": sd},
        "spread_ratio": {"mean": spread, "sd": math.nan},
        "mean_ratio": {"mean": level, "sd": math.nan},
        "per_seed": {"pearson_r": r},
    }


def test_the_recommendation_follows_pearsons_r_and_says_when_a_lead_is_within_the_seeds_spread():
    clear = recommend([_row("DAMM", [0.61, 0.63, 0.62]), _row("U-Net", [0.50, 0.52, 0.51]), _row("constant", [0.99])])
    assert clear.startswith("On these slides, use DAMM: Pearson's r 0.620 ± 0.010 over 3 seeds") and "by 0.110 ± 0.000." in clear
    level = recommend([_row("DAMM", [0.60, 0.70, 0.50]), _row("U-Net", [0.58, 0.57, 0.59])])
    assert "within the seeds' spread: treat the two as level" in level
    versus_blur = recommend([_row("blur", [0.40]), _row("U-Net", [0.45, 0.47])])  # a deterministic row pairs with every seed
    assert "use U-Net" in versus_blur and "ahead of blur (0.400) by 0.060 ± 0.014" in versus_blur


def test_the_recommendation_says_when_the_best_correlated_map_misstates_the_amount():
    """r ranks where the signal is; a map 30 % too dim is named with its mean and the best map whose mean is right."""
    rows = [_row("blur", [0.906], level=0.70), _row("DAMM", [0.87, 0.85, 0.89], level=1.02), _row("U-Net", [0.79, 0.80, 0.78], level=1.14)]
    text = recommend(rows)
    assert text.startswith("On these slides, use blur")
    assert "but its mean is 0.70× the measured one's: it shows where the signal is, not how much" in text
    assert text.endswith("— for amounts use DAMM (r 0.870, mean 1.02×).")
    assert "but its mean" not in recommend([_row("DAMM", [0.87, 0.85, 0.89], level=1.2), _row("blur", [0.80], level=0.7)])


def test_collapsed_autoencoders_are_named_with_their_seeds_and_r():
    ceilings = {
        "seed0": {"collapsed": ["vessels"], "roles": {"vessels": {"pearson_r": 0.012}}},
        "seed1": {"collapsed": [], "roles": {"vessels": {"pearson_r": 0.97}}},
        "seed2": {"collapsed": ["vessels"], "roles": {"vessels": {"pearson_r": 0.031}}},
    }
    assert "the vessels autoencoder of seeds 0, 2 (r 0.01, 0.03)" in collapsed_autoencoders(ceilings)
    assert collapsed_autoencoders({"seed0": {"collapsed": [], "roles": {}}}) == ""


def test_a_seed_pools_its_slides_checks_of_the_draws_by_tissue_pixels():
    def slide(pixels: int, cov: float | None, rho: float | None) -> dict:
        s = {"wsi": {"pixels_tissue": pixels, "pearson_r_tissue": 0.5}, "check": {"spread_ratio": 1.0, "mean_ratio": 1.0}}
        if cov is not None:
            s["uncertainty"] = {"coverage": cov, "spread_error": {"spearman": rho}}
        return s

    drawn = seed_figures({"slides": [slide(1, 0.5, 0.2), slide(3, 0.7, 0.6)]})
    assert math.isclose(drawn["coverage"], (0.5 + 3 * 0.7) / 4) and math.isclose(drawn["spread_spearman"], (0.2 + 3 * 0.6) / 4)
    one_draw = seed_figures({"slides": [slide(1, None, None)]})
    assert math.isnan(one_draw["coverage"]) and math.isnan(one_draw["spread_spearman"])


def test_a_bench_on_two_slides_scores_every_row_on_the_same_pixels_and_resumes(synth_dir, tmp_path):
    (tmp_path / "tiny.toml").write_text(TINY_TOML)
    train, held = sorted(synth_dir.glob("*.ome.tif"))[:2]
    args = ["bench", "--train", str(train), "--heldout", str(held), "--seeds", "1", "--draws", "1", "--ae-steps", "8", "--steps", "6"]
    args += ["--sample-steps", "2", "--patch-size", "64", "--overlap", "16", "--mpp", "2.0", "--config", str(tmp_path / "tiny.toml")]
    args += ["--out", str(tmp_path / "bench"), "--quiet"]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    summary = read_json(tmp_path / "bench" / "bench.json")
    keys = [row["key"] for row in summary["rows"]]
    assert keys == ["damm/k1", "uni_only/k1", "no_dammp/k1", "regression", "baseline", "constant"]
    assert summary["scored_patches"] > 0 and summary["recommendation"] in r.stdout
    for name in ("bench.md", "bench.png", "bench.html"):
        assert (tmp_path / "bench" / name).stat().st_size > 0
    ceilings = summary["autoencoders"]["seed0"]
    measured = read_json(tmp_path / "bench" / "runs" / "autoencoders_seed0" / "autoencoder_ceiling.json")
    assert ceilings["collapsed"] == measured["collapsed"] and set(ceilings["roles"]) == {"vessels", "nuclei", "target"}
    assert ceilings["roles"]["target"]["pearson_r"] == measured["roles"]["target"]["pearson_r"]
    constant = summary["rows"][-1]
    assert constant["spread_ratio"]["mean"] == 0 and math.isnan(constant["pearson_r"]["mean"])  # a flat map has no r
    again = run_cli(*args)  # every step is on disk: nothing is trained or predicted again
    assert again.returncode == 0 and "training" not in again.stderr and "predicting" in again.stderr
    assert json.dumps(read_json(tmp_path / "bench" / "bench.json")["rows"]) == json.dumps(summary["rows"])


def test_one_image_splits_into_a_training_part_and_a_held_out_part_that_never_overlap(synth_dir, tmp_path):
    import numpy as np
    import pytest
    import tifffile

    from wsi_damm.tiling.inputs import resolve_slides
    from wsi_damm.util.errors import InputError
    from wsi_damm.workflows.bench_split import part_channels, split_cut, split_slides, tissue_profile

    assert split_cut(np.ones(1920), 0.25, 128) == 1408  # even tissue: round(0.75 · 1920 / 128) = 11 patches
    assert split_cut(np.zeros(1920), 0.25, 128) == 1408  # no tissue at all: a share of the pixels
    assert split_cut(np.ones(300), 0.9, 128) == 128 and split_cut(np.ones(300), 0.01, 128) == 128  # a patch each side, on the grid
    core = np.where(np.arange(1920) < 1300, 1.0, 0.0)  # a section in the left two thirds of its image, as in a TMA core
    cut = split_cut(core, 0.3, 128)
    assert cut == 896 and abs(core[cut:].sum() / core.sum() - 0.3) < 128 / 1300  # 30 % of the tissue, not of the pixels
    with pytest.raises(InputError, match="cannot hold a 128-px patch on each side"):
        split_cut(np.ones(200), 0.5, 128)
    source = sorted(synth_dir.glob("*.ome.tif"))[0]
    [spec] = resolve_slides([source], channels=None, required=("vessels", "nuclei", "target"))
    (train,), (held,), wrote = split_slides([spec], 0.25, tmp_path / "inputs", 64, log=lambda m: None)
    assert wrote
    whole = tifffile.imread(source, level=0)
    with tifffile.TiffFile(train) as a, tifffile.TiffFile(held) as b:
        left, right = a.series[0].levels[0].asarray(), b.series[0].levels[0].asarray()
        names = tifffile.xml2dict(a.ome_metadata)["OME"]["Image"]["Pixels"]["Channel"]
    cut = split_cut(tissue_profile(spec, 64, 1), 0.25, 64)
    np.testing.assert_array_equal(left, whole[:, :, :cut])
    np.testing.assert_array_equal(right, whole[:, :, cut:])
    assert [c["Name"] for c in names] == [ref.name for _, ref in spec.channels]
    parts = resolve_slides([train, held], channels=part_channels(), required=("vessels", "nuclei", "target"))
    assert [p.roles for p in parts] == [spec.roles] * 2
    with spec.open() as s, parts[1].open() as p:
        assert p.mpp == s.mpp and p.dtype == s.dtype
    stamp = train.stat().st_mtime_ns
    *_, wrote = split_slides([spec], 0.25, tmp_path / "inputs", 64, log=lambda m: None)  # the same request: the parts are reused
    assert train.stat().st_mtime_ns == stamp and not wrote


def test_the_bench_takes_held_out_slides_or_a_held_out_fraction_not_both(synth_dir, tmp_path):
    train, held = sorted(synth_dir.glob("*.ome.tif"))[:2]
    r = run_cli("bench", "--train", str(train), "--heldout", str(held), "--heldout-fraction", "0.3", "--out", str(tmp_path / "b"))
    assert r.returncode == 2 and "give no --heldout slides or --regions with it" in r.stderr
    r = run_cli("bench", "--train", str(train), "--out", str(tmp_path / "b"))
    assert r.returncode == 2 and "--heldout-fraction F" in r.stderr
    (tmp_path / "old" / "patches.zarr").mkdir(parents=True)  # a bench tiled from parts of another split
    r = run_cli("bench", "--train", str(train), "--heldout-fraction", "0.3", "--patch-size", "64", "--out", str(tmp_path / "old"))
    assert r.returncode == 2 and "holds a bench on another split of these images" in r.stderr and "new --out" in r.stderr
