"""The reference comparison end to end with the tiny model: 3 arms x 1 seed + the untrained row."""

import json

import pytest

import raysys.tune.reproduce as reproduce_module
from raysys.config import Config
from raysys.errors import ConfigError
from raysys.tune.reproduce import ARMS, HYBRID, reproduce, select_arms
from tests.conftest import XQUAD_R_DIR

pytestmark = pytest.mark.timeout(900)


@pytest.mark.slow  # nine trainings and evaluations (tiny model): `make test-slow`
def test_reproduce_writes_one_table_with_bootstrap_intervals(ray_local, tmp_path, tiny_model_dir, xquad_r_dir,
                                                             monkeypatch):
    config = Config.from_yaml(None, [
        f"model.name_or_path={tiny_model_dir}", f"data.train={XQUAD_R_DIR}", "data.languages=[de,en,es]",
        f"output_dir={tmp_path}", "name=repro", "model.max_query_length=32", "model.max_passage_length=48",
        "train.global_batch_size=8", "train.max_steps=3", "train.eval_every=3", "train.checkpoint_every=3",
        f"eval.datasets=[{XQUAD_R_DIR}]", "eval.max_length=48", "eval.bootstrap_samples=200"])
    result = reproduce(config, seeds=[0])
    dataset = str(XQUAD_R_DIR)
    assert set(result["summaries"]) == {"untrained", *ARMS}
    for label, by_dataset in result["summaries"].items():
        summary = by_dataset[dataset]["summary"]
        for setting in ("monolingual", "cross_lingual", "multilingual"):
            assert 0 < summary[setting]["map"] <= 1
    assert set(result["bootstrap"]) == {f"{HYBRID} vs {label}" for label in [*ARMS, "untrained"] if label != HYBRID}
    for comparison in result["bootstrap"].values():
        for setting, ci in comparison[dataset].items():
            assert ci["low"] <= ci["mean_diff"] <= ci["high"]
    table = result["paths"]["comparison.md"].read_text()
    assert all(label in table for label in ("untrained", *ARMS))
    saved = json.loads(result["paths"]["comparison.json"].read_text())
    assert saved["baseline"] == "untrained"
    assert "Spread over seeds" in table
    hybrid_seeds = saved["per_seed"][HYBRID][dataset]
    assert [r["seed"] for r in hybrid_seeds] == [0]
    assert hybrid_seeds[0]["summary"]["monolingual"]["map"] == pytest.approx(
        result["summaries"][HYBRID][dataset]["summary"]["monolingual"]["map"])  # one seed: mean = it
    cost = hybrid_seeds[0]["cost"]  # what the run cost, apart from its held-out evaluation
    assert cost["reused"] is False and cost["run_s"] > cost["held_out_eval_s"] > 0
    assert "Cost per run" in table and "trained and selected the model in" in table

    # A rerun (e.g. after an interruption) reuses the finished runs instead of training again...
    def no_training(_config):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(reproduce_module, "train", no_training)
    again = reproduce(config, seeds=[0])
    assert all(record["cost"]["reused"] for label in ARMS
               for record in json.loads(again["paths"]["comparison.json"].read_text())["per_seed"][label][dataset])
    for label, by_dataset in result["summaries"].items():
        assert again["summaries"][label][dataset]["summary"] == by_dataset[dataset]["summary"]
    # `--arms hybrid`: only that arm (reused), compared with the untrained model alone.
    hybrid_only = reproduce(config, seeds=[0], arms=select_arms(["hybrid"]))
    assert set(hybrid_only["summaries"]) == {"untrained", HYBRID}
    assert set(hybrid_only["bootstrap"]) == {f"{HYBRID} vs untrained"}
    assert hybrid_only["summaries"][HYBRID] == result["summaries"][HYBRID]
    # ...but only runs whose learned settings match: another lr or seed is a different run.
    hybrid = config.to_dict()
    hybrid.update(name="repro-alpha0.5-seed0", seed=0)
    hybrid["train"]["alpha"] = 0.5
    assert reproduce_module.finished_run_model(Config.from_dict(hybrid)) is not None
    hybrid["train"]["lr"] = 1e-3
    assert reproduce_module.finished_run_model(Config.from_dict(hybrid)) is None
    hybrid["train"]["lr"], hybrid["seed"] = config.train.lr, 1
    assert reproduce_module.finished_run_model(Config.from_dict(hybrid)) is None


def test_reproduce_refuses_miracl_datasets_before_training(tmp_path):
    from raysys.errors import ConfigError

    with pytest.raises(ConfigError, match="MIRACL-style") as info:
        reproduce(Config.from_yaml(None, [f"output_dir={tmp_path}"]), seeds=[0], eval_datasets=[f"miracl:{tmp_path}"])
    assert "eval.datasets" in str(info.value)
    assert not (tmp_path / "raysys-reproduce").exists()  # nothing trained or written


def test_select_arms_keeps_the_table_order_and_names_an_unknown_arm():
    assert list(select_arms(["hybrid", "x-x-mono"])) == [label for label in ARMS if label != "X-Y (alpha=0)"]
    assert select_arms(None) == ARMS
    with pytest.raises(ConfigError, match="unknown arm 'mono'"):
        select_arms(["hybrid", "mono"])


def test_a_run_recorded_before_a_setting_existed_still_matches():
    """A setting added later (recorded configs lack it) takes its default, which keeps the old
    behaviour: the finished run is reused; with another value, or an unreadable record, it is not."""
    from raysys.tune.reproduce import _learned_settings_of, learned_settings

    config = Config.from_yaml(None, ["data.hard_negatives=paragraph"])
    stored = config.to_dict()
    del stored["train"]["mask_duplicate_positives"], stored["train"]["hard_negatives_per_pair"]
    assert _learned_settings_of(stored) == learned_settings(config.to_dict())
    masked = Config.from_yaml(None, ["data.hard_negatives=paragraph", "train.mask_duplicate_positives=true"])
    assert _learned_settings_of(stored) != learned_settings(masked.to_dict())
    stored["train"]["no_such_setting"] = 1
    assert _learned_settings_of(stored) is None
