"""The training ingest before the bucketed corpus (raysys.data.buckets), kept only so benchmarks can
put the old figures beside the new ones: every worker streamed the whole train split of a lazy Ray
Dataset (`DataConfig(datasets_to_split=[])`) and kept the rows whose parallel id hashed to it, and
the driver kept a set of languages per parallel id for its facts."""

from __future__ import annotations

import hashlib
from collections import defaultdict

import numpy as np
import pyarrow as pa
from ray.data.expressions import col

from raysys.data.buckets import bucket_of as shard_of


def hash_split(ds, validation_fraction: float, test_fraction: float) -> dict:
    """Group-wise split of a lazy dataset: a stable hash of the group decides its split."""

    def bucket(batch: pa.Table) -> pa.Table:
        u = np.array([int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "little") / 2**64
                      for g in batch.column("group").to_pylist()])
        name = np.where(u < test_fraction, "test", np.where(u < test_fraction + validation_fraction,
                                                            "validation", "train"))
        return batch.append_column("split", pa.array(name))

    tagged = ds.map_batches(bucket, batch_format="pyarrow")
    return {name: tagged.filter(expr=col("split") == name).drop_columns(["split"]) for name in ("train", "validation")}


def rows_for_rank(iterator, rank: int, world_size: int) -> tuple[pa.Table, int]:
    """This worker's rows, and how many rows it had to stream to find them (the whole split)."""
    parts, streamed = [], 0
    for batch in iterator.iter_batches(batch_format="pyarrow", batch_size=8192):
        streamed += batch.num_rows
        parts.append(batch.filter(pa.array([shard_of(pid, world_size) == rank
                                            for pid in batch.column("id").to_pylist()])))
    return pa.concat_tables(parts), streamed


def driver_facts(ds) -> dict:
    """The old driver pass: a Python set of languages per parallel id."""
    langs_of: dict[str, set[str]] = defaultdict(set)
    rows = 0
    for batch in ds.select_columns(["id", "lang"]).iter_batches(batch_format="pyarrow", batch_size=65536):
        rows += batch.num_rows
        for pid, lang in zip(batch.column("id").to_pylist(), batch.column("lang").to_pylist()):
            langs_of[pid].add(lang)
    return {"rows": rows, "ids": len(langs_of), "multilingual_ids": sum(len(v) >= 2 for v in langs_of.values())}
