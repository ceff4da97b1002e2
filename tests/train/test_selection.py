"""Model selection: the best checkpoint by a validation metric becomes the run's model, and early
stopping ends a run whose metric stopped improving (raysys.train.selection)."""

import json
from pathlib import Path

import pytest

from raysys.config import Config
from raysys.errors import ConfigError
from raysys.train.checkpoint import EXPORT_DIR, read_state
from raysys.train.preflight import check_selection
from raysys.errors import RaysysError
from raysys.train.selection import BestModel, choose_weight, evaluated_weights, score_order, selected_checkpoint

pytestmark = pytest.mark.timeout(900)


@pytest.mark.parametrize("metric,values,best_step,since", [
    ("val_loss", [2.0, 1.5, 1.7, 1.5], 2, 2),  # lower is better; an equal value is no improvement
    ("val_map_mean", [0.5, 0.4, 0.6, 0.6], 3, 1),  # higher is better
    ("val_rank_distance", [300.0, 120.0, 125.0], 2, 1)])
def test_best_model_follows_the_metric_direction(metric, values, best_step, since):
    best = BestModel(metric, patience=2)
    improved = [best.update(v, step) for step, v in enumerate(values, start=1)]
    assert improved[0] and best.best_step == best_step and best.evaluations_since_best == since
    assert best.should_stop == (since >= 2)
    assert score_order(metric) == ("min" if metric != "val_map_mean" else "max")
    restored = BestModel.from_state(json.loads(json.dumps(best.to_state())), metric, patience=2)
    assert restored == best
    assert BestModel.from_state(best.to_state(), "val_accuracy", None).best is None  # another metric: afresh


def test_selection_settings_are_checked():
    with pytest.raises(ConfigError, match="unknown validation metric 'val_mrr'") as err:
        Config.from_yaml(None, ["train.metric_for_best_model=val_mrr"])
    assert err.value.field == "train.metric_for_best_model"
    with pytest.raises(ConfigError, match="below 1"):
        Config.from_yaml(None, ["train.early_stopping_patience=0"])
    no_validation = {"splits": ["train"]}
    for override in ("train.export_best_model=true", "train.early_stopping_patience=3",
                     "train.metric_for_best_model=val_map_mean"):
        with pytest.raises(ConfigError, match="no validation split") as err:
            check_selection(Config.from_yaml(None, [override, "data.validation_fraction=0"]), no_validation)
        assert err.value.field == override.split("=")[0]
    check_selection(Config.from_yaml(None, ["train.export_best_model=true"]), {"splits": ["train", "validation"]})
    with pytest.raises(ConfigError, match="unknown rule 'best'") as err:
        Config.from_yaml(None, ["train.interpolate_rule=best"])
    assert err.value.field == "train.interpolate_rule"
    # One weight is a plain interpolation, but keep_mono adds the initial model: a curve on validation.
    one_weight = ["train.interpolate_weights=[0.5]", "data.validation_fraction=0"]
    check_selection(Config.from_yaml(None, one_weight), no_validation)
    with pytest.raises(ConfigError, match="no validation split"):
        check_selection(Config.from_yaml(None, [*one_weight, "train.interpolate_rule=keep_mono"]), no_validation)


def curve(*rows):
    return [{"weight": w, "mono_map": mono, "mean_map": mean} for w, mono, mean in rows]


def test_interpolation_rules_choose_on_the_validation_curve():
    rows = curve((0.0, 0.80, 0.55), (0.25, 0.81, 0.60), (0.5, 0.80, 0.64), (0.75, 0.79, 0.66), (1.0, 0.78, 0.66))
    assert choose_weight(rows, "mean_map")["weight"] == 1.0  # a tie goes to the larger weight
    assert choose_weight(rows, "keep_mono")["weight"] == 0.5  # the largest w with mono >= the initial model's
    assert choose_weight(curve((0.0, 0.80, 0.5), (1.0, 0.70, 0.7)), "keep_mono")["weight"] == 0.0
    with pytest.raises(RaysysError, match="needs the initial model"):
        choose_weight(rows[1:], "keep_mono")
    assert evaluated_weights([1, 0.5], "keep_mono") == [0.0, 0.5, 1]
    assert evaluated_weights([1, 0.5, 0.5], "mean_map") == [0.5, 1]
    assert evaluated_weights(None, "keep_mono") == []


def test_keep_mono_ci_wants_the_monolingual_gain_confidently_above_zero():
    """keep_mono takes the edge where the validation gain is zero; keep_mono_ci the largest w whose
    bootstrap interval of the gain over the initial model lies at or above zero."""
    import numpy as np

    from raysys.tune.interpolation import mono_against

    rng = np.random.default_rng(0)
    initial = {f"q{i}": float(v) for i, v in enumerate(rng.uniform(0.3, 1.0, 400))}
    shifted = lambda gain: {u: v + gain + float(rng.normal(0, 0.02)) for u, v in initial.items()}
    rows = curve((0.0, 0.80, 0.55), (0.25, 0.81, 0.60), (0.5, 0.806, 0.64), (0.75, 0.80, 0.66), (1.0, 0.78, 0.66))
    for row, gain in zip(rows[1:], (0.010, 0.006, 0.0003, -0.02)):
        row["mono_vs_initial"] = mono_against(shifted(gain), initial, samples=1000)
    assert rows[1]["mono_vs_initial"]["low"] > 0 and rows[3]["mono_vs_initial"]["low"] < 0
    assert choose_weight(rows, "keep_mono")["weight"] == 0.75
    assert choose_weight(rows, "keep_mono_ci")["weight"] == 0.5
    for row in rows[1:]:
        row["mono_vs_initial"]["low"] = -0.001
    assert choose_weight(rows, "keep_mono_ci")["weight"] == 0.0  # nothing confidently above: the initial model
    del rows[2]["mono_vs_initial"]  # a curve written before the rule existed
    with pytest.raises(RaysysError, match="w = 0.5 lack it"):
        choose_weight(rows, "keep_mono_ci")
    assert evaluated_weights([1, 0.5], "keep_mono_ci") == [0.0, 0.5, 1]


def test_early_stopping_exports_the_best_checkpoint(ray_local, tmp_path, tiny_model_dir, xquad_r_dir):
    """A learning rate far below one ulp of the weights keeps them (and so every validation score)
    unchanged: the first evaluation is the best, and patience 2 stops the run at the third."""
    from raysys.train.run import train
    from raysys.tune.reproduce import finished_run_model
    from tests.train.test_trainer import tiny_config

    config = tiny_config(tmp_path, tiny_model_dir, "select", max_steps=20, lr=1e-30,
                         warmup_ratio=0, eval_every=2, checkpoint_every=100, log_every=2,
                         metric_for_best_model="val_map_mean", export_best_model="true", early_stopping_patience=2)
    outcome = train(config)
    assert read_state(outcome.checkpoint_path)["global_step"] == 2  # the best, not the last
    assert outcome.model_path == f"{outcome.checkpoint_path}/{EXPORT_DIR}"
    assert (Path(outcome.model_path) / "config.json").is_file()
    assert outcome.metrics["step"] == 2 and 0 < outcome.metrics["val_map_mean"] <= 1

    run_dir = Path(outcome.run_path)
    checkpoints = [c for c in run_dir.glob("checkpoint_*") if c.is_dir()]
    states = sorted((read_state(c) for c in checkpoints), key=lambda s: s["global_step"])
    assert [s["global_step"] for s in states] == [2, 6]  # the improving evaluation, then the stop at 6 of 20
    final = states[-1]
    assert final["finished"] and final["metrics"]["early_stopped"]
    assert final["best_model"] == {"metric": "val_map_mean", "patience": 2, "best": states[0]["metrics"]["val_map_mean"],
                                   "best_step": 2, "evaluations_since_best": 2}
    assert final["metrics"]["val_map_mean"] == states[0]["metrics"]["val_map_mean"]
    final_dir = next(str(c) for c in checkpoints if read_state(c)["global_step"] == 6)
    assert selected_checkpoint(final_dir, export_best=False) == final_dir
    # `raysys reproduce` finds the same model again: the run stopped early, but it finished.
    assert finished_run_model(config) == outcome.model_path
