"""A small Ray Tune sweep over alpha: 2 trials of the tiny model, each a full TorchTrainer run."""

import json

import pytest

from raysys.config import Config
from raysys.tune.sweep import run_sweep, trial_config
from tests.conftest import XQUAD_R_DIR

pytestmark = pytest.mark.timeout(900)


def test_trial_config_reports_only_at_validation_steps():
    base = Config.from_yaml(None, ["train.eval_every=10", "train.checkpoint_every=25", "train.log_every=1"])
    config = trial_config({"base": base.to_dict(), "alpha": 0.25, "lr": 1e-4})
    assert config.train.alpha == 0.25 and config.train.lr == 1e-4
    assert config.train.val_retrieval and config.train.log_every == 10
    assert config.train.checkpoint_every % config.train.eval_every == 0


@pytest.mark.slow  # a Ray Tune sweep of three trials: `make test-slow`
def test_sweep_over_alpha_reports_all_settings_and_the_best(ray_local, tmp_path, tiny_model_dir, xquad_r_dir):
    config = Config.from_yaml(None, [
        f"model.name_or_path={tiny_model_dir}", f"data.train={XQUAD_R_DIR}", "data.languages=[de,en,es]",
        f"output_dir={tmp_path}", "name=sweeptest", "model.max_query_length=32", "model.max_passage_length=48",
        "train.global_batch_size=8", "train.max_steps=4", "train.eval_every=2", "train.checkpoint_every=4",
        "train.lr=1e-3", "tune.alphas=[0.0,1.0]", "tune.asha=false",
        # a negative learning rate fails its trials (after one retry); the sweep must go on
        "tune.lrs=[1e-3,-1.0]", "tune.trial_max_failures=1"])
    outcome = run_sweep(config)
    failed = [r for r in outcome.rows if r["status"] == "error"]
    assert sorted(r["alpha"] for r in failed) == [0.0, 1.0] and all(r["lr"] == -1.0 for r in failed)
    assert all("lr" in r["error"] for r in failed)
    outcome.rows = [r for r in outcome.rows if r["status"] == "ok"]
    assert sorted(r["alpha"] for r in outcome.rows) == [0.0, 1.0]
    for row in outcome.rows:
        assert row["status"] == "ok"
        assert row["step"] == 4
        for key in ("val_map_mono", "val_map_cross", "val_map_multi", "val_map_mean"):
            assert 0.0 < row[key] <= 1.0
        assert row["val_rank_distance"] >= 0
    assert outcome.best["val_map_mean"] == max(r["val_map_mean"] for r in outcome.rows)
    assert outcome.best["checkpoint"]
    saved = json.loads((outcome.out_dir / "sweep.json").read_text())
    assert len(saved["trials"]) == 4 and sum(t["status"] == "error" for t in saved["trials"]) == 2
    assert (outcome.out_dir / "sweep.png").stat().st_size > 1000
    assert "alpha" in (outcome.out_dir / "sweep.md").read_text()
