"""Deterministic, leak-free group splits."""

from __future__ import annotations

import warnings

import pyarrow as pa
import pytest

from raysys.data.lareqa import read_lareqa_dir
from raysys.data.schema import PAIR_SCHEMA
from raysys.data.split import check_no_leak, split_groups, split_table
from raysys.errors import ConfigError, DataError


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
    tables = split_table(corpus.pairs, splits)
    assert sum(t.num_rows for t in tables.values()) == corpus.pairs.num_rows
    check_no_leak(tables)
    for table in tables.values():  # all 11 versions of every id stay together
        ids = table.column("id").to_pylist()
        assert all(ids.count(i) == 11 for i in set(ids[:50]))


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


def _pairs(rows: list[tuple[str, str]]) -> pa.Table:
    return pa.table({"id": [r[0] for r in rows], "lang": ["en"] * len(rows), "query": ["q"] * len(rows),
                     "passage": ["p"] * len(rows), "hard_negative": [None] * len(rows),
                     "context": [None] * len(rows), "group": [r[1] for r in rows],
                     "origin": ["f:1"] * len(rows)}, schema=PAIR_SCHEMA)


def test_leak_and_unknown_group_are_reported():
    tables = {"train": _pairs([("x", "a")]), "test": _pairs([("x", "b")])}
    with pytest.raises(DataError, match="'x' is in both the train and the test split"):
        check_no_leak(tables)
    with pytest.raises(DataError, match="group 'c' belongs to no split"):
        split_table(_pairs([("x", "c")]), {"train": {"a"}, "validation": set(), "test": set()})
