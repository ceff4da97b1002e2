"""Deterministic group-wise splits: whole articles (all their languages) go to one split, so no
parallel version of a training item is ever evaluated (that would leak through translation)."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raysys.errors import ConfigError, DataError

SPLITS = ("train", "validation", "test")


def split_groups(groups_in_order: list[str], validation_fraction: float,
                 test_fraction: float) -> dict[str, set[str]]:
    """The last ceil(test·n) groups are test, the ceil(validation·n) before them validation,
    the rest train; no randomness, so every worker and every run agrees."""
    if not (0 <= validation_fraction < 1 and 0 <= test_fraction < 1
            and validation_fraction + test_fraction < 1):
        raise ConfigError(f"validation_fraction={validation_fraction}, test_fraction={test_fraction}: "
                          "each must lie in [0, 1) and their sum below 1")
    ordered = list(dict.fromkeys(groups_in_order))  # first appearance wins
    n = len(ordered)
    # The epsilon keeps e.g. 0.1 * 50 = 5.000000000000001 from rounding up to 6.
    n_test = math.ceil(test_fraction * n - 1e-9)
    n_validation = math.ceil(validation_fraction * n - 1e-9)
    n_train = n - n_test - n_validation
    if n_train < 1:
        raise ConfigError(f"{n} group(s) are too few for validation_fraction={validation_fraction} and "
                          f"test_fraction={test_fraction}: no group is left for training")
    return {"train": set(ordered[:n_train]),
            "validation": set(ordered[n_train:n_train + n_validation]),
            "test": set(ordered[n_train + n_validation:])}


def hash_split_names(groups: pa.Array | pa.ChunkedArray, validation_fraction: float,
                     test_fraction: float) -> pa.Array:
    """Split of each row of JSONL/Parquet data: a stable hash of its group in [0, 1) below
    test_fraction is test, below test + validation validation, else train (any row order, any node)."""
    from raysys.data.buckets import hash_unit

    u = hash_unit(groups.to_pylist()) / 2**64
    return pa.array(np.where(u < test_fraction, "test",
                             np.where(u < test_fraction + validation_fraction, "validation", "train")))


def split_table(table: pa.Table, splits: dict[str, set[str]]) -> dict[str, pa.Table]:
    """Rows of `table` per split, by its `group` column; every group must belong to a split."""
    groups = table.column("group")
    known = set().union(*splits.values()) if splits else set()
    unknown = set(pc.unique(groups).to_pylist()) - known
    if unknown:
        raise DataError(f"group {sorted(unknown)[0]!r} belongs to no split "
                        f"({len(unknown)} such group(s))", field="group")
    return {name: table.filter(pc.is_in(groups, value_set=pa.array(sorted(members), pa.string())))
            for name, members in splits.items()}


def check_no_leak(splits_tables: dict[str, pa.Table]) -> None:
    """Raise if a parallel id appears in two splits (its translations would leak)."""
    owner: dict[str, str] = {}
    for name, table in splits_tables.items():
        for parallel_id in pc.unique(table.column("id")).to_pylist():
            other = owner.setdefault(parallel_id, name)
            if other != name:
                raise DataError(f"parallel id {parallel_id!r} is in both the {other} and the {name} split",
                                field="id", hint="split by a group that holds all versions of an item")
