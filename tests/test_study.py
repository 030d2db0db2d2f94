"""The study's bookkeeping: every row on the same pixels and patches, spreads over seeds with ddof = 1, running time over every leg."""

from __future__ import annotations

import copy
import json
import math
import statistics

import numpy as np
import pytest

from wsi_damm.util.running_time import RunningTime
from wsi_damm.workflows.study_tables import markdown_table, same_pixels, sample_sd


def _result(kind: str, patches: list[tuple[int, int]], tissue: int = 1000, divergent: int = 300) -> dict:
    rows = [{"slide": "heldout_000", "y": y, "x": x, "ssim": 0.5, "psnr": 20.0, "region": 0} for y, x in patches]
    slide = {
        "slide": "heldout_000",
        "wsi": {"pixels_tissue": tissue},
        "regions": {"informative": {"pixels": tissue - divergent}, "divergent": {"pixels": divergent}},
        "patch_rows": rows,
    }
    return {"kind": kind, "slides": [slide]}


def test_rows_keep_only_the_patches_every_row_scored():
    grid = [(0, 0), (0, 128), (128, 0)]
    rows = {"damm": _result("learned", grid), "uni": _result("learned", grid), "baseline": _result("reference", grid + [(128, 128)])}
    assert same_pixels(rows) == 3
    for res in rows.values():  # the baseline's extra patch (the learned maps did not cover it) is not scored anywhere
        assert [(r["y"], r["x"]) for r in res["slides"][0]["patch_rows"]] == grid


def test_rows_on_other_pixels_are_refused():
    grid = [(0, 0), (0, 128)]
    rows = {"damm": _result("learned", grid), "uni": _result("learned", grid[:1])}  # uni-only predicted fewer patches
    with pytest.raises(RuntimeError, match="different patches"):
        same_pixels(copy.deepcopy(rows))
    rows = {"damm": _result("learned", grid), "uni": _result("learned", grid, tissue=990)}  # another tissue mask
    with pytest.raises(RuntimeError, match="different pixels"):
        same_pixels(rows)
    rows = {"damm": _result("learned", grid), "blur": _result("reference", grid, divergent=250)}  # another region split
    with pytest.raises(RuntimeError, match="different pixels"):
        same_pixels(rows)


def test_spread_over_seeds_is_the_sample_sd():
    values = [0.571, 0.566, 0.580]
    assert sample_sd(values) == pytest.approx(statistics.stdev(values))  # ddof = 1, the textbook sample sd
    assert math.isnan(sample_sd([0.57]))  # one seed measures no spread


def test_table_shows_draws_and_spread():
    region = {
        "wsi_ssim": 0.5,
        "wsi_ssim_sd": 0.01,
        "wsi_psnr": 17.0,
        "wsi_psnr_sd": 0.1,
        "patch_ssim_percent": 50.0,
        "patch_ssim_percent_sd": 5.0,
        "multimodal_share": 0.5,
    }
    rows = [
        {"model": "DAMM full", "draws": 1, "seeds": 3, "regions": {"tissue": region}},
        {"model": "DAMM full", "draws": 4, "seeds": 3, "regions": {"tissue": region}},
    ]
    table = markdown_table(rows, 3)
    assert "| DAMM full | 1 | 0.5000 ± 0.010 | 17.00 ± 0.100 |" in table and "| DAMM full | 4 |" in table
    assert "ddof = 1" in table


def test_gate_table_says_when_nothing_was_logged():
    from wsi_damm.workflows.study_tables import gate_table

    assert "no region labels" in gate_table({"damm_seed0": {}})
    table = gate_table({"damm_seed0": {"divergent": {"dfl_label_rate": 0.76, "mean_kappa": 0.72, "samples": 10}}})
    assert "| damm_seed0 | 0.760 | 0.720 |" in table


def test_the_gate_panel_shows_every_seed_and_redraws_from_the_json(tmp_path):
    """A seed-mean bar of 0.67 hides seeds at 1, 0 and 1 (a gate locked into the uni-modal branch): the dots show them."""
    from wsi_damm.util.files import write_json
    from wsi_damm.workflows.study import redraw
    from wsi_damm.workflows.study_tables import gate_points

    def row(name, shares):
        regions = {
            g: {"wsi_ssim": 0.6, "wsi_psnr": 18.0, "multimodal_share": float(np.mean(shares)), "multimodal_share_per_seed": shares}
            for g in ("tissue", "informative", "divergent")
        }
        return {"model": name, "kind": "learned", "draws": 1, "seeds": 3, "regions": regions}

    rows = [row("DAMM full", [1.0, 0.0, 1.0]), row("no MMFM", [1.0, 1.0, 0.0])]
    rows[0]["regions"]["tissue"]["wsi_ssim_sd"] = float("nan")  # one seed: no spread, stored as "nan" by write_json
    xs, ys = gate_points(rows)
    assert len(xs) == len(ys) == 2 * 2 * 3  # regions × models × seeds
    assert ys[:3].tolist() == [1.0, 0.0, 1.0] and ys[3:6].tolist() == [1.0, 1.0, 0.0]
    assert xs[:3].max() < xs[3:6].min() and xs[:6].max() < 0.5 < xs[6:].min()  # each model's dots over its own bar, each region by its tick
    write_json(
        tmp_path / "study.json",
        {"models": rows, "samplers": [{"sampler": "dpm++", "steps": 10, "wsi_ssim": 0.6, "wsi_psnr": 18.0, "seconds": 5.0}]},
    )
    png = redraw(tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_running_time_adds_the_legs_of_a_killed_and_resumed_job(tmp_path):
    now = [100.0]
    path = tmp_path / "out" / "running_time.json"
    first = RunningTime(path, clock=lambda: now[0])
    now[0] = 130.0
    assert first.tick() == 30.0
    now[0] = 150.0  # killed here: the 20 s since the last tick are not on record
    second = RunningTime(path, clock=lambda: now[0])
    now[0] = 162.5
    assert second.tick() == 42.5
    on_disk = json.loads(path.read_text())
    assert on_disk["seconds"] == 42.5 and [leg["seconds"] for leg in on_disk["legs"]] == [30.0, 12.5]


def test_the_study_reports_the_benchs_figures_for_every_row_and_its_oracle():
    """The study's second table is the bench's (one code path): r, spread, NRMSE, spectral error and, for means of
    draws, coverage, for every variant, the regression U-Net, the baseline, the oracle and the ceilings."""
    from wsi_damm.workflows.bench_report import markdown
    from wsi_damm.workflows.ceiling import SOURCES
    from wsi_damm.workflows.study import study_figures
    from wsi_damm.workflows.study_plan import QUICK, VARIANTS

    def scored(r: float, coverage: float | None = None, oracle_r: float = 0.99) -> dict:
        res = _result("learned", [(0, 0)])
        s = res["slides"][0]
        figures = {"pearson_r": r, "nrmse": 1 - r, "spectral_error": 0.5, "ssim": 0.5, "psnr": 20.0}
        s["wsi"] |= {f"{k}_tissue": v for k, v in figures.items()}
        s["oracle_wsi"] = {"pixels_tissue": 1000, "pearson_r_tissue": oracle_r}
        s["check"] = {"spread_ratio": 0.8, "mean_ratio": 1.0}
        if coverage is not None:
            s["uncertainty"] = {"coverage": coverage, "spread_error": {"spearman": 0.4}}
        return res

    results = {}
    for i, v in enumerate(VARIANTS):
        for k in dict.fromkeys((1, QUICK.samples)):
            for seed in QUICK.seeds:
                results[f"{v.name}/k{k}/seed{seed}"] = scored(0.5 + 0.01 * i + 0.001 * seed, 0.55 if k > 1 else None)
    for seed in QUICK.seeds:
        results[f"regression/seed{seed}"] = scored(0.7)
        for source in SOURCES:
            results[f"ceiling/{source}/seed{seed}"] = scored(0.95)
    results["baseline"] = {**scored(0.3), "sigma_um": 8.0}
    rows = study_figures(results, QUICK)
    assert len(rows) == len(VARIANTS) * len(dict.fromkeys((1, QUICK.samples))) + 2 + 1 + len(SOURCES)
    damm = rows[0]
    expected = [0.5 + 0.001 * seed for seed in QUICK.seeds]
    assert damm["pearson_r"]["mean"] == pytest.approx(np.mean(expected))
    assert math.isnan(damm["coverage"]["mean"]) and rows[1]["coverage"]["mean"] == pytest.approx(0.55)
    oracle = next(r for r in rows if r["key"] == "oracle")
    assert oracle["pearson_r"]["mean"] == pytest.approx(0.99)  # read from the noiseless field's own scores
    table = markdown({"rows": rows, "plan": {"samples": QUICK.samples}})
    assert "| oracle (noiseless field) | 1 | 0.990 |" in table and "Pearson's r" in table
