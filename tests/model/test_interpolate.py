"""Weight-space interpolation: the arithmetic, the saved model, the one-line errors, and the
curve over weights chosen on validation articles (`raysys export`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModel

from raysys.cli import main
from raysys.config import Config
from raysys.errors import ConfigError
from raysys.model.encoder import BiEncoder
from raysys.model.interpolate import interpolate_states, write_interpolated
from raysys.train.selection import choose_weight


@pytest.fixture(scope="module")
def tuned_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with every weight moved: a stand-in for a fine-tuned copy of it."""
    encoder = BiEncoder.from_pretrained(str(tiny_model_dir))
    torch.manual_seed(7)
    state = {k: (v + 0.05 * torch.randn_like(v)) if v.is_floating_point() else v
             for k, v in encoder.backbone.state_dict().items()}
    return encoder.save(tmp_path_factory.mktemp("tuned") / "model", state_dict=state)


def test_interpolation_is_elementwise_and_keeps_integer_tensors():
    base = {"w": torch.tensor([0.0, 2.0]), "ids": torch.tensor([1, 2])}
    tuned = {"w": torch.tensor([1.0, 4.0]), "ids": torch.tensor([1, 2])}
    mixed = interpolate_states(base, tuned, 0.25)
    assert torch.equal(mixed["w"], torch.tensor([0.25, 2.5])) and torch.equal(mixed["ids"], tuned["ids"])


@pytest.mark.parametrize("base,weight,message", [
    ({"w": torch.zeros(2)}, 1.5, "outside \\[0, 1\\]"),
    ({"v": torch.zeros(2)}, 0.5, "'v' is in only one of them"),
    ({"w": torch.zeros(3)}, 0.5, "'w' has shape \\(3,\\)"),
])
def test_mismatched_models_fail_in_one_line(base, weight, message):
    with pytest.raises(ConfigError, match=message) as error:
        interpolate_states(base, {"w": torch.ones(2)}, weight)
    assert "\n" not in str(error.value)


def test_written_model_lies_between_base_and_tuned(tiny_model_dir, tuned_dir, tmp_path):
    base = AutoModel.from_pretrained(tiny_model_dir).state_dict()
    tuned = AutoModel.from_pretrained(tuned_dir).state_dict()
    for weight in (0.0, 0.5, 1.0):
        out = write_interpolated(str(tiny_model_dir), str(tuned_dir), weight, str(tmp_path / f"w{weight}"))
        got = AutoModel.from_pretrained(out).state_dict()
        for key in ("embeddings.word_embeddings.weight", "encoder.layer.1.output.dense.bias"):
            torch.testing.assert_close(got[key], (1 - weight) * base[key] + weight * tuned[key])
    assert (tmp_path / "w0.5" / "modules.json").exists()  # a sentence-transformers directory too


@pytest.mark.slow  # three evaluations through Ray Data encoder actors: minutes on 2 cores
def test_export_command_chooses_the_weight_on_validation_articles(ray_local, tiny_model_dir, tuned_dir, tmp_path):
    from tests.eval.lareqa_fixture import write_synthetic_lareqa

    data = write_synthetic_lareqa(tmp_path / "lareqa", articles=5)
    out = tmp_path / "best"
    code = main(["export", "--model", str(tuned_dir), "--base", str(tiny_model_dir), "--interpolate", "0,0.5,1",
                 "--out", str(out), f"output_dir={tmp_path}", f"data.train={data}", "data.validation_fraction=0.4",
                 "data.test_fraction=0.2", "eval.bootstrap_samples=10"])
    assert code == 0
    curve = json.loads((tmp_path / "best-curve" / "interpolation.json").read_text())
    assert [r["weight"] for r in curve["curve"]] == [0.0, 0.5, 1.0] and curve["split"] == "validation"
    best = max(curve["curve"], key=lambda r: (r["mean_map"], r["weight"]))
    assert curve["best"]["weight"] == best["weight"]
    assert all(0 < r["mean_map"] <= 1 for r in curve["curve"])
    assert (tmp_path / "best-curve" / "interpolation.png").stat().st_size > 0
    chosen = AutoModel.from_pretrained(out).state_dict()["pooler.dense.weight"]
    expected = AutoModel.from_pretrained(best["model"]).state_dict()["pooler.dense.weight"]
    assert torch.equal(chosen, expected)
    # A second curve, by the keep_mono rule: the initial model (w = 0) is scored from the cached
    # embeddings of the first curve, not encoded again; the rule's weight is written.
    embeddings = tmp_path / "interpolation-eval" / "embeddings"
    before = {d.name for d in embeddings.iterdir()}
    assert len(before) == 3  # the initial model, w = 0.5, w = 1
    code = main(["export", "--model", str(tuned_dir), "--base", str(tiny_model_dir), "--interpolate", "1",
                 "--out", str(tmp_path / "kept"), f"output_dir={tmp_path}", f"data.train={data}",
                 "data.validation_fraction=0.4", "data.test_fraction=0.2", "train.interpolate_rule=keep_mono"])
    assert code == 0
    second = json.loads((tmp_path / "kept-curve" / "interpolation.json").read_text())
    assert [r["weight"] for r in second["curve"]] == [0.0, 1.0] and second["rule"] == "keep_mono"
    assert second["curve"][0]["mono_map"] == curve["curve"][0]["mono_map"]
    assert len({d.name for d in embeddings.iterdir()} - before) == 1  # only the new w = 1 copy
    assert second["best"]["weight"] == choose_weight(second["curve"], "keep_mono")["weight"]
    # With w = 0 on the curve each weight carries its paired bootstrap against the initial model.
    gain = second["curve"][1]["mono_vs_initial"]
    assert gain["low"] <= gain["mean_diff"] <= gain["high"]
    assert gain["mean_diff"] == pytest.approx(second["curve"][1]["mono_map"] - second["curve"][0]["mono_map"], abs=1e-9)


@pytest.mark.slow  # a training run and two validation evaluations: `make test-slow`
def test_training_ends_with_the_weight_chosen_on_validation(ray_local, tmp_path, tiny_model_dir, xquad_r_dir,
                                                           capsys):
    """train.interpolate_weights: the run's model is the interpolation with the initial model whose
    mean validation mAP is best; `raysys reproduce` finds it again without evaluating anew."""
    from raysys.train.run import train
    from raysys.tune.reproduce import finished_run_model
    from tests.train.test_trainer import tiny_config

    config = tiny_config(tmp_path, tiny_model_dir, "wise", "eval.max_length=48", max_steps=4, checkpoint_every=4,
                         eval_every=4, interpolate_weights="[1, 0]")
    outcome = train(config)
    curve_file = Path(outcome.run_path) / "interpolation" / "interpolation.json"
    curve = json.loads(curve_file.read_text())
    assert [r["weight"] for r in curve["curve"]] == [0.0, 1.0] and curve["split"] == "validation"
    best = max(curve["curve"], key=lambda r: (r["mean_map"], r["weight"]))
    assert outcome.model_path == best["model"] == str(Path(outcome.run_path) / "interpolation" / f"weight-{best['weight']:g}")
    key = "encoder.layer.0.attention.self.query.weight"
    initial = AutoModel.from_pretrained(tiny_model_dir).state_dict()[key]
    trained = AutoModel.from_pretrained(Path(outcome.checkpoint_path) / "hf_model").state_dict()[key]
    assert not torch.equal(initial, trained)
    for row, expected in zip(curve["curve"], (initial, trained)):
        torch.testing.assert_close(AutoModel.from_pretrained(row["model"]).state_dict()[key], expected)
    written = curve_file.stat().st_mtime_ns
    assert finished_run_model(config) == outcome.model_path
    assert curve_file.stat().st_mtime_ns == written  # the finished curve is reused, not evaluated again
    # Another rule is a choice after training: the same run and curve, the rule's weight, no new evaluation.
    keep_mono = Config.from_dict({**config.to_dict(), "train": {**config.to_dict()["train"], "interpolate_rule": "keep_mono"}})
    chosen = choose_weight(curve["curve"], "keep_mono")
    assert finished_run_model(keep_mono) == chosen["model"]
    assert curve_file.stat().st_mtime_ns == written
    # A finer grid for the same run evaluates only its new point; the known rows are kept as they were.
    capsys.readouterr()
    finer = Config.from_dict({**config.to_dict(), "train": {**config.to_dict()["train"], "interpolate_weights": [0, 0.5, 1]}})
    finished_run_model(finer)
    evaluated = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[export] weight")]
    assert len(evaluated) == 1 and evaluated[0].startswith("[export] weight 0.5:")
    refined = json.loads(curve_file.read_text())["curve"]
    assert [r["weight"] for r in refined] == [0.0, 0.5, 1.0] and [refined[0], refined[2]] == curve["curve"]
