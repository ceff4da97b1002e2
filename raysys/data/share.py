"""A worker's share of the parallel items, as chunks that `HybridBatcher` streams through.

`InMemoryShare` is one chunk of items already in memory (validation sets, tests). `BucketShare`
is this worker's buckets of the bucketed corpus (raysys.data.buckets), read a chunk at a time: the
buckets, in a seeded order per (epoch, cycle), grouped into chunks of at most `buffer_rows` rows
(a larger bucket is a chunk of its own). The batcher holds one chunk plus the ids it passed over,
so a worker's memory is bounded by the buffer, not by its share of the corpus. A share that fits
the buffer is one chunk in bucket order: exactly the batches of an in-memory share.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

import numpy as np

from raysys.data.buckets import buckets_of_rank, read_bucket_files
from raysys.data.hybrid import ParallelItems

_BUCKET_ORDER_STREAM = 0xB0C4


class InMemoryShare:
    def __init__(self, items: ParallelItems):
        self.items = items
        self.num_ids = len(items)
        self.languages = items.languages

    def count_with(self, lang: str) -> int:
        return self.items.count_with(lang)

    def count_multilingual(self) -> int:
        return self.items.count_multilingual()

    def chunks(self, seed_words: list[int]) -> list[Callable[[], ParallelItems]]:
        return [lambda: self.items]


class BucketShare:
    def __init__(self, corpus_uri: str, manifest: dict, split: str, rank: int, world_size: int, buffer_rows: int):
        mine = set(buckets_of_rank(manifest["num_buckets"], rank, world_size))
        self.buckets = [b for b in manifest["splits"].get(split, {}).get("buckets", []) if b["bucket"] in mine]
        self.corpus_uri, self.manifest, self.buffer_rows = corpus_uri, manifest, buffer_rows
        self.num_ids = sum(b["ids"] for b in self.buckets)
        self._per_language = Counter()
        for b in self.buckets:
            self._per_language.update(b["ids_per_language"])
        self.languages = sorted(self._per_language)
        self.rows_read = 0  # over the worker's life (benchmarks, tests)
        self._whole: ParallelItems | None = None

    def __len__(self) -> int:
        return self.num_ids

    def count_with(self, lang: str) -> int:
        return self._per_language.get(lang, 0)

    def count_multilingual(self) -> int:
        return sum(b["multilingual_ids"] for b in self.buckets)

    def chunks(self, seed_words: list[int]) -> list[Callable[[], ParallelItems]]:
        """This cycle's chunks, each a loader of the bucket group `plan` gives (a share that fits
        the buffer is read once and kept)."""
        groups = self.plan(seed_words)
        if len(groups) == 1:
            if self._whole is None:
                self._whole = self._load(groups[0])
            return [lambda: self._whole]
        return [lambda group=group: self._load(group) for group in groups]

    def plan(self, seed_words: list[int]) -> list[list[dict]]:
        """Bucket groups of a cycle: one in bucket order if the share fits the buffer, else the
        buckets in a seeded order, grouped up to `buffer_rows` rows."""
        if sum(b["rows"] for b in self.buckets) <= self.buffer_rows:
            groups = [self.buckets]
        else:
            order = np.random.default_rng([_BUCKET_ORDER_STREAM, *seed_words]).permutation(len(self.buckets))
            groups, rows = [[]], 0
            for b in (self.buckets[i] for i in order):
                if groups[-1] and rows + b["rows"] > self.buffer_rows:
                    groups.append([])
                    rows = 0
                groups[-1].append(b)
                rows += b["rows"]
        return [group for group in groups if group]

    def _load(self, group: list[dict]) -> ParallelItems:
        table = read_bucket_files(self.corpus_uri, self.manifest, [b["file"] for b in group])
        self.rows_read += table.num_rows
        return ParallelItems(table)
