"""Deterministic, leak-free group splits."""

from __future__ import annotations

import warnings

import pyarrow as pa
import pytest

from raysys.data.lareqa import read_lareqa_dir
from raysys.data.split import resolve_split_rule, split_groups, split_names
from raysys.errors import ConfigError


def test_xquad_r_split_by_article(xquad_r_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        corpus = read_lareqa_dir(xquad_r_dir)
    groups = list(dict.fromkeys(corpus.pairs.column("group").to_pylist()))
    assert groups == corpus.groups and len(groups) == 48
    splits = split_groups(groups, 0.1, 0.15)
    assert splits == split_groups(groups, 0.1, 0.15)  # no randomness
    assert splits["train"] == {f"article-{i:03d}" for i in range(35)}
    assert splits["validation"] == {f"article-{i:03d}" for i in range(35, 40)}
    assert splits["test"] == {f"article-{i:03d}" for i in range(40, 48)}
    names = split_names(corpus.pairs.column("group"), "order", 0.1, 0.15).to_pylist()
    owner: dict[str, str] = {}
    for parallel_id, group, name in zip(corpus.pairs.column("id").to_pylist(), groups_of(corpus), names):
        assert group in splits[name]
        assert owner.setdefault(parallel_id, name) == name  # all 11 versions of an id in one split: no leak
    assert {n: names.count(n) for n in set(names)}.keys() == {"train", "validation", "test"}


def test_fraction_rounding_and_order():
    groups = [f"g{i}" for i in range(50)]
    splits = split_groups(groups + ["g0"], 0.1, 0.1)  # repeats keep the first appearance
    assert len(splits["validation"]) == 5 and len(splits["test"]) == 5  # not 6 from float error
    assert splits["test"] == {f"g{i}" for i in range(45, 50)}
    assert split_groups(["a", "b"], 0.0, 0.0) == {"train": {"a", "b"}, "validation": set(), "test": set()}


def test_bad_fractions():
    with pytest.raises(ConfigError):
        split_groups(["a", "b"], 0.6, 0.5)
    with pytest.raises(ConfigError, match="no group is left"):
        split_groups(["a", "b"], 0.1, 0.1)


def groups_of(corpus) -> list[str]:
    return corpus.pairs.column("group").to_pylist()


def test_both_rules_split_whole_groups_and_auto_picks_by_input_type():
    groups = pa.array([f"g{i % 40}" for i in range(400)])
    for rule in ("order", "hash"):
        names = split_names(groups, rule, 0.2, 0.2).to_pylist()
        split_of: dict[str, str] = {}
        for group, name in zip(groups.to_pylist(), names):
            assert split_of.setdefault(group, name) == name
        assert set(names) == {"train", "validation", "test"}
    order = split_names(groups, "order", 0.2, 0.2).to_pylist()
    assert order[:40] == ["train"] * 24 + ["validation"] * 8 + ["test"] * 8  # first-appearance order
    assert resolve_split_rule("auto", lareqa=True) == "order" and resolve_split_rule("auto", lareqa=False) == "hash"
    assert resolve_split_rule("hash", lareqa=True) == "hash"
    with pytest.raises(ConfigError, match="split_rule"):
        resolve_split_rule("random", lareqa=False)


@pytest.mark.parametrize("rule", ["order", "hash"])
def test_a_lareqa_set_and_the_same_rows_as_jsonl_split_alike(tmp_path, rule):
    """One rule for every input type: the same groups land in the same split, LAReQA or file."""
    import json

    from raysys.config import Config
    from raysys.train.datasets import lareqa_split_tables, small_pairs_tables
    from tests.eval.lareqa_fixture import write_synthetic_lareqa

    lareqa = write_synthetic_lareqa(tmp_path / "lareqa", articles=12)
    pairs = read_lareqa_dir(lareqa).pairs
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps({k: row[k] for k in ("id", "lang", "query", "passage", "group")}) + "\n"
                             for row in pairs.to_pylist()), encoding="utf-8")
    fractions = ["data.validation_fraction=0.2", "data.test_fraction=0.2", f"data.split_rule={rule}"]
    from_dir = lareqa_split_tables(Config.from_yaml(None, [f"data.train={lareqa}", *fractions]), str(lareqa))
    from_file = small_pairs_tables(Config.from_yaml(None, [f"data.train={jsonl}", *fractions]), str(jsonl))
    for name in ("train", "validation"):
        assert len(from_dir[name]) > 0
        keys = [set(zip(t[name].column("id").to_pylist(), t[name].column("lang").to_pylist()))
                for t in (from_dir, from_file)]
        assert keys[0] == keys[1], name


def test_the_order_rule_is_refused_for_inputs_read_by_ray_data():
    from raysys.config import Config
    from raysys.train.datasets import tagged_pairs

    config = Config.from_yaml(None, ["data.train=s3://corpus/pairs.jsonl", "data.split_rule=order"])
    with pytest.raises(ConfigError, match="data.split_rule=order needs the rows in file order"):
        tagged_pairs(config, config.data.train)
