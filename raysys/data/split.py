"""Deterministic group-wise splits: whole articles (all their languages) go to one split, so no
parallel version of a training item is ever evaluated (that would leak through translation).

Two rules, each applicable to every input type (`data.split_rule`; training and evaluation use
the same one, and the corpus manifest records it):
- `order`: groups in order of first appearance; the last ones are test, the ones before them
  validation (the LAReQA protocol's article split, and `auto`'s choice for LAReQA directories);
- `hash`: a stable hash of the group decides (no global order needed, so it works on rows streamed
  by any Ray Data task: `auto`'s choice for JSONL / Parquet files).
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from raysys.errors import ConfigError

SPLITS = ("train", "validation", "test")
SPLIT_RULES = ("auto", "order", "hash")
RULE_TEXT = {"order": "order: whole groups in order of first appearance; the last ones are test, the ones before "
                      "them validation",
             "hash": "hash: a stable hash (blake2b) of each row's group decides its split"}


def resolve_split_rule(rule: str, lareqa: bool) -> str:
    """`auto` -> `order` for LAReQA directories (the protocol's article split), `hash` for files."""
    if rule not in SPLIT_RULES:
        raise ConfigError(f"unknown data.split_rule {rule!r}: use auto, order or hash")
    return ("order" if lareqa else "hash") if rule == "auto" else rule


def split_names(groups: pa.Array | pa.ChunkedArray, rule: str, validation_fraction: float,
                test_fraction: float) -> pa.Array:
    """The split of each row by its group under `rule` (`order` or `hash`). `order` ranks the groups
    by first appearance in `groups`, so it needs every row in order (driver-side inputs)."""
    if rule == "hash":
        return hash_split_names(groups, validation_fraction, test_fraction)
    values = groups.to_pylist()
    split_of = {group: name for name, members in split_groups(values, validation_fraction, test_fraction).items()
                for group in members}
    return pa.array([split_of[g] for g in values], pa.string())


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


def refuse_order_split(rule: str, location: str) -> None:
    """The order rule ranks groups by first appearance over every row: only inputs read whole on the driver."""
    if rule == "order":
        raise ConfigError(f"data.split_rule=order needs the rows in file order on the driver, and {location} is "
                          "remote or over 256 MiB", field="data.split_rule",
                          hint="use data.split_rule=hash (or auto) for large or remote JSONL / Parquet inputs")
