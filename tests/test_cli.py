"""Command-line parsing (overrides after list options, --verbose) and the closing summary block."""

from __future__ import annotations

import io

import pytest

from raysys.cli import build_parser, main
from raysys.config import Config
from raysys.summary import describe_training, headline_table, print_summary


def parse(*argv):
    args = build_parser().parse_args(list(argv))
    return args, [*getattr(args, "moved_overrides", []), *args.overrides]


def test_overrides_after_a_dataset_list_are_overrides():
    args, overrides = parse("eval", "--model", "m", "--datasets", "xquad-r", "miracl:/d/x", "eval.split=test",
                            "seed=3")
    assert args.datasets == ["xquad-r", "miracl:/d/x"]
    assert overrides == ["eval.split=test", "seed=3"]


def test_seeds_and_datasets_of_reproduce_leave_overrides_alone():
    args, overrides = parse("reproduce", "--seeds", "0", "1", "train.max_steps=3", "--datasets", "xquad-r",
                            "eval.split=all")
    assert args.seeds == [0, 1] and args.datasets == ["xquad-r"]
    assert overrides == ["train.max_steps=3", "eval.split=all"]
    args, overrides = parse("reproduce", "--arms", "hybrid", "x-y", "train.distill_weight=1")
    assert args.arms == ["hybrid", "x-y"] and overrides == ["train.distill_weight=1"]
    with pytest.raises(SystemExit):
        parse("reproduce", "--seeds", "zero")


def test_a_list_of_only_overrides_is_an_error(capsys):
    with pytest.raises(SystemExit):
        parse("eval", "--datasets", "eval.split=test")
    assert "expected at least one value" in capsys.readouterr().err


def test_the_override_reaches_the_config_not_the_dataset_list(monkeypatch, tmp_path):
    """`raysys eval --datasets NAME eval.split=test`: the evaluation sees one dataset and split=test."""
    import raysys.eval.run as run

    seen = {}

    def fake_evaluate(model, datasets, config, work_dir, progress=True):
        seen.update(datasets=list(datasets), split=config.eval.split)
        raise run.ConfigError("stop here")

    monkeypatch.setattr(run, "evaluate", fake_evaluate)
    code = main(["eval", "--model", "m", "--datasets", "xquad-r", "eval.split=test", f"output_dir={tmp_path}"])
    assert code == 2 and seen == {"datasets": ["xquad-r"], "split": "test"}


def test_verbose_is_passed_on_through_the_environment(monkeypatch):
    from raysys import console

    monkeypatch.setenv(console.VERBOSE_ENV, "0")  # recorded, so the "1" main sets is undone after the test
    assert not console.is_verbose()
    args, _ = parse("demo", "--verbose")
    assert args.verbose
    monkeypatch.setattr("raysys.cli.cmd_demo", lambda args: None)
    assert main(["demo", "-v"]) == 0 and console.is_verbose()


def lareqa(mono, cross, multi, dist):
    return {"summary": {"monolingual": {"map": mono}, "cross_lingual": {"map": cross},
                        "multilingual": {"map": multi, "rank_distance": dist}}}


def test_headline_table_has_the_four_figures_per_run_and_dataset():
    table = headline_table({"untrained": {"xquad-r": lareqa(0.8381, 0.6923, 0.3379, 311.66)},
                            "hybrid alpha=0.5": {"xquad-r": lareqa(0.815, 0.714, 0.590, 126.4),
                                                 "miracl:/d": {"summary": {"ndcg@10": 0.5, "recall@100": 0.9}}}})
    lines = table.splitlines()
    assert lines[0] == "| Run | Dataset | Mono mAP | Cross mAP | Multi mAP | Rank dist. |"
    assert lines[2] == "| untrained | xquad-r | 0.838 | 0.692 | 0.338 | 311.7 |"
    assert lines[3] == "| hybrid alpha=0.5 | xquad-r | 0.815 | 0.714 | 0.590 | 126.4 |"
    assert "| hybrid alpha=0.5 | miracl:/d | 0.500 | 0.900 |" in lines  # its own table


def test_summary_block_names_what_ran_and_where_outputs_are():
    out = io.StringIO()
    print_summary("train", 444, ["run-1: hybrid alpha=0.5"],
                  {"final checkpoint": "/r/checkpoint_1", "exported model": "/r/checkpoint_1/hf_model"}, "| t |", out)
    lines = out.getvalue().splitlines()
    # Scripts read these two lines (tests/cluster): the labels start the line, the paths follow.
    assert lines[1:5] == ["[train] done in 7 min 24 s", "ran:              run-1: hybrid alpha=0.5",
                          "final checkpoint: /r/checkpoint_1", "exported model:   /r/checkpoint_1/hf_model"]
    assert lines[-1] == "| t |"


def test_the_training_line_names_the_recipe_levers_only_when_they_are_on():
    plain = describe_training(Config.from_yaml(None, ["name=plain"]))
    assert plain == "plain: hybrid alpha=0.5, 60 steps x 16 pairs, 2 worker(s), ZeRO-0"
    recipe = describe_training(Config.from_yaml(None, [
        "name=r", "data.hard_negatives=paragraph", "train.hard_negatives_per_pair=3",
        "train.interpolate_weights=[0,0.5,1]", "train.interpolate_rule=keep_mono_ci"]))
    assert recipe.startswith(plain.replace("plain:", "r:"))
    assert "3 paragraph negative(s) per pair" in recipe and "chosen on validation (keep_mono_ci)" in recipe
    # One weight is a fixed interpolation: nothing is chosen.
    assert "chosen" not in describe_training(Config.from_yaml(None, ["train.interpolate_weights=[0.5]"]))
