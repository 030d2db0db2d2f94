"""The study's seeds: each seed trains its own autoencoders (rate decayed along a cosine), and every model of
that seed — each variant and the regression U-Net — is trained with that seed on that seed's autoencoders."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from wsi_damm.training.config import RunConfig
from wsi_damm.training.run_dir import ROLES_NEEDED, RunDir
from wsi_damm.util.files import write_json
from wsi_damm.workflows import study, study_plan
from wsi_damm.workflows.dataset import SyntheticData


def test_every_model_of_a_seed_trains_on_that_seeds_autoencoders(tmp_path, monkeypatch):
    trained: dict[Path, tuple[str, RunConfig]] = {}

    def fake_training(store, run_dir, cfg, stage="all", resume=False, progress=True):
        run = RunDir(run_dir)
        run.path.mkdir(parents=True, exist_ok=True)
        if stage == "autoencoder":
            for role in ROLES_NEEDED:  # weights that say which seed made them
                run.autoencoder(role).write_text(f"autoencoders of seed {cfg.train.seed}")
            write_json(run.config, asdict(cfg))
        else:
            write_json(run.state, {"steps_done": cfg.train.steps})
        trained[run.path] = (stage, cfg)

    def fake_regression(store, run_dir, cfg, progress=True):
        trained[Path(run_dir)] = ("regression", cfg)
        return Path(run_dir)

    monkeypatch.setattr(study, "run_training", fake_training)
    monkeypatch.setattr(study, "train_regression", fake_regression)
    plan = study_plan.QUICK
    data = SyntheticData(train_specs=[], heldout=[], store=tmp_path / "store")
    runs = study.train_models(data, tmp_path, plan, "tiny", False, lambda msg: None)

    for seed in plan.seeds:
        stage, cfg = trained[study.autoencoders_dir(tmp_path, seed)]
        assert stage == "autoencoder" and cfg.train.seed == seed and cfg.autoencoder.lr_schedule == "cosine"
        assert cfg.autoencoder.steps == plan.ae_steps
        stage, cfg = trained[runs["regression", seed]]
        assert stage == "regression" and cfg.train.seed == seed and cfg.train.steps == plan.steps
        for v in (v for v in study_plan.VARIANTS if v.trained_as is None):
            run = RunDir(runs[v.name, seed])
            stage, cfg = trained[run.path]
            assert cfg.train.seed == seed and cfg.train.steps == plan.steps
            assert {run.autoencoder(r).read_text() for r in ROLES_NEEDED} == {f"autoencoders of seed {seed}"}
            assert json.loads(run.config.read_text())["train"]["seed"] == seed
    n_models = len([v for v in study_plan.VARIANTS if v.trained_as is None]) * len(plan.seeds)
    assert sum(stage == "all" for stage, _ in trained.values()) == n_models

    trained.clear()  # a finished study trains nothing again
    study.train_models(data, tmp_path, plan, "tiny", False, lambda msg: None)
    assert [stage for stage, _ in trained.values()] == ["regression"] * len(plan.seeds)  # train_regression skips finished runs itself
