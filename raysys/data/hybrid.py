"""Hybrid batches: the step schedule and the per-worker batch builder.

The schedule is a pure function of (seed, epoch, step): every worker computes the same batch
type (monolingual with probability alpha, else cross-lingual) and the same monolingual language,
so a global batch is never a mix of types (FlagEmbedding's shared-RNG convention). Each worker
fills its local share from its own shard; shards hold disjoint parallel ids, so no parallel id
appears twice in a global batch (two versions of one item would be false negatives).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa

from raysys.errors import ConfigError

MONO, CROSS = "mono", "cross"
_SCHEDULE_STREAM, _SAMPLE_STREAM = 0x5C4E, 0x5A3B  # separate RNG streams for schedule and sampling


@dataclass(frozen=True)
class StepPlan:
    kind: str  # MONO or CROSS
    lang: str | None  # the language of a monolingual step


def plan_step(seed: int, epoch: int, step: int, alpha: float, languages: Sequence[str]) -> StepPlan:
    """The batch type of global step `step` of `epoch`; identical on every rank."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha={alpha}: must lie in [0, 1]")
    rng = np.random.default_rng([_SCHEDULE_STREAM, seed, epoch, step])
    if rng.random() < alpha:
        return StepPlan(MONO, sorted(languages)[int(rng.integers(len(languages)))])
    return StepPlan(CROSS, None)


@dataclass
class PairBatch:
    queries: list[str]
    passages: list[str]
    hard_negatives: list[str] | None  # pair-major: pair i's k negatives at [i * k, (i + 1) * k)
    ids: list[str]
    query_langs: list[str]
    passage_langs: list[str]
    plan: StepPlan

    @property
    def negatives_per_pair(self) -> int:
        return len(self.hard_negatives) // len(self.queries) if self.hard_negatives and self.queries else 0


class ParallelItems:
    """A worker's parallel items: for each id, its language versions (query, passage, negative)."""

    def __init__(self, table: pa.Table | None = None):
        if table is None:  # filled by `carry`
            self.queries, self.passages, self.negatives, self.ids, self.rows, self.languages = [], [], [], [], [], []
            return
        wanted = [c for c in ("id", "lang", "query", "passage", "hard_negative") if c in table.column_names]
        table = table.select(wanted).sort_by([("id", "ascending"), ("lang", "ascending")])
        cols = table.to_pydict()
        self.queries, self.passages = cols["query"], cols["passage"]
        # A list per row (None: none given); a string column (one negative per row) reads as one-item lists.
        self.negatives = [[n] if isinstance(n, str) else n
                          for n in cols.get("hard_negative") or [None] * len(self.queries)]
        self.ids: list[str] = []
        self.rows: list[dict[str, int]] = []  # per id: lang -> row
        for row, (pid, lang) in enumerate(zip(cols["id"], cols["lang"])):
            if not self.ids or self.ids[-1] != pid:
                self.ids.append(pid)
                self.rows.append({})
            self.rows[-1][lang] = row
        self.languages = sorted({lang for r in self.rows for lang in r})

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def carry(cls, entries: list[tuple[ParallelItems, int]]) -> list[tuple[ParallelItems, int]]:
        """The same items re-pointed at a small copy of just their rows, so that the (large) chunks
        they came from can be freed."""
        items = cls()
        for source, i in entries:
            row_of = {}
            for lang, row in source.rows[i].items():
                row_of[lang] = len(items.queries)
                items.queries.append(source.queries[row])
                items.passages.append(source.passages[row])
                items.negatives.append(source.negatives[row])
            items.ids.append(source.ids[i])
            items.rows.append(row_of)
        items.languages = sorted({lang for r in items.rows for lang in r})
        return [(items, j) for j in range(len(entries))]

    def count_with(self, lang: str) -> int:
        return sum(lang in r for r in self.rows)

    def count_multilingual(self) -> int:
        return sum(len(r) >= 2 for r in self.rows)


class _IdStream:
    """A share's items as (chunk, index) entries in a seeded random order, chunk after chunk (only
    when the order runs dry is the next chunk loaded), cycling with a fresh order when exhausted.

    `take(k, accept)` returns the next k acceptable entries with distinct parallel ids; entries it
    passes over go back to the front, so with fully parallel data an epoch uses every id exactly once.
    """

    def __init__(self, share, seed_words: list[int]):
        self.share, self.seed_words, self.cycle, self.chunk_no = share, seed_words, 0, 0
        self.order: deque[tuple[ParallelItems, int]] = deque()
        self.pending: deque = deque()  # loaders of this cycle's remaining chunks

    def _refill(self) -> None:
        if not self.pending:
            self.pending.extend(self.share.chunks(self.seed_words + [self.cycle]))
            self.cycle, self.chunk_no = self.cycle + 1, 0
        items = self.pending.popleft()()
        # A one-chunk share draws exactly the permutation an in-memory shard always drew.
        words = self.seed_words + [self.cycle - 1] + ([self.chunk_no] if self.chunk_no else [])
        self.order.extend((items, i) for i in np.random.default_rng(words).permutation(len(items)).tolist())
        self.chunk_no += 1

    def take(self, k: int, accept) -> list[tuple[ParallelItems, int]]:
        chosen: list[tuple[ParallelItems, int]] = []
        seen, passed = set(), []
        budget = 3 * self.share.num_ids + k  # enough for two refills; more means too few acceptable ids
        while len(chosen) < k:
            if not self.order:
                # What this call passed over is all that is left of the current chunk: keep a copy
                # of just those items, so a passed-over id never holds a whole chunk in memory.
                passed = ParallelItems.carry(passed)
                self._refill()
            entry = self.order.popleft()
            budget -= 1
            if budget < 0:
                raise ConfigError(f"only {len(chosen)} acceptable parallel ids on this worker; "
                                  f"a local batch needs {k}")
            parallel_id = entry[0].ids[entry[1]]
            if parallel_id not in seen and accept(*entry):
                chosen.append(entry)
                seen.add(parallel_id)
            else:
                passed.append(entry)
        self.order.extendleft(reversed(passed))
        return chosen


# Whose hard negatives a pair brings in a cross-lingual batch (train.cross_lingual_negatives): the
# rows to draw from, in turn.
_NEGATIVE_ROWS = {"passage": ("passage",), "query": ("query",), "mixed": ("passage", "query")}
CROSS_LINGUAL_NEGATIVES = tuple(_NEGATIVE_ROWS)


class HybridBatcher:
    """Builds this worker's local share of each global hybrid batch.

    `items`: the worker's ParallelItems, or a share streamed chunk by chunk (raysys.data.share).
    """

    def __init__(self, items, *, languages: Sequence[str], alpha: float, seed: int,
                 local_batch_size: int, rank: int, use_hard_negatives: bool = False,
                 negatives_per_pair: int = 1, cross_lingual_negatives: str = "passage"):
        from raysys.data.share import InMemoryShare

        self.share = InMemoryShare(items) if isinstance(items, ParallelItems) else items
        self.languages = sorted(languages)
        self.alpha, self.seed, self.rank = alpha, seed, rank
        self.local_batch_size = local_batch_size
        # Decided once for the whole dataset by the driver (every rank must agree, or the
        # cross-worker gather of candidates would mismatch); a missing negative is then an error.
        self.use_hard_negatives = use_hard_negatives
        self.negatives_per_pair = negatives_per_pair
        self.negative_rows = _NEGATIVE_ROWS[cross_lingual_negatives]
        self._check_capacity()

    def _check_capacity(self) -> None:
        k, share = self.local_batch_size, self.share
        if self.alpha > 0:
            for lang in self.languages:
                if share.count_with(lang) < k:
                    raise ConfigError(f"worker {self.rank}: {share.count_with(lang)} parallel ids in '{lang}' "
                                      f"but a monolingual local batch needs {k}; lower train.global_batch_size")
        if self.alpha < 1 and share.count_multilingual() < k:
            raise ConfigError(f"worker {self.rank}: {share.count_multilingual()} parallel ids exist in two or "
                              f"more languages but a cross-lingual local batch needs {k}")

    def local_steps_per_epoch(self) -> int:
        """Steps this worker could fill; the trainer takes the minimum over workers."""
        return self.share.num_ids // self.local_batch_size

    def epoch(self, epoch: int, num_steps: int, start_step: int = 0) -> Iterator[tuple[int, PairBatch]]:
        """Yield (step, batch) for steps [start_step, num_steps) of `epoch`.

        Sampling replays the steps before `start_step`, so a resumed run sees exactly the
        batches the uninterrupted run would have seen.
        """
        stream = _IdStream(self.share, [_SAMPLE_STREAM, self.seed, epoch, self.rank])
        for step in range(num_steps):
            plan = plan_step(self.seed, epoch, step, self.alpha, self.languages)
            if plan.kind == MONO:
                chosen = stream.take(self.local_batch_size, lambda items, i: plan.lang in items.rows[i])
            else:
                chosen = stream.take(self.local_batch_size, lambda items, i: len(items.rows[i]) >= 2)
            if step >= start_step:
                yield step, self._materialise(plan, chosen, epoch, step)

    def _materialise(self, plan: StepPlan, chosen: list[tuple[ParallelItems, int]], epoch: int,
                     step: int) -> PairBatch:
        rng = np.random.default_rng([_SAMPLE_STREAM, self.seed, epoch, self.rank, step])
        q_rows, p_rows, q_langs, p_langs = [], [], [], []
        for it, i in chosen:
            if plan.kind == MONO:
                q_lang = p_lang = plan.lang
            else:
                available = sorted(it.rows[i])
                q_lang = available[int(rng.integers(len(available)))]
                others = [lang for lang in available if lang != q_lang]
                p_lang = others[int(rng.integers(len(others)))]
            q_rows.append((it, it.rows[i][q_lang]))
            p_rows.append((it, it.rows[i][p_lang]))
            q_langs.append(q_lang)
            p_langs.append(p_lang)
        negatives = None
        if self.use_hard_negatives:
            negatives = []
            for (it, q_row), (_, p_row), (_, i) in zip(q_rows, p_rows, chosen):
                negatives += self._negatives_of(it, i, {"query": q_row, "passage": p_row})
        return PairBatch(
            queries=[it.queries[r] for it, r in q_rows], passages=[it.passages[r] for it, r in p_rows],
            hard_negatives=negatives, ids=[it.ids[i] for it, i in chosen],
            query_langs=q_langs, passage_langs=p_langs, plan=plan)

    def _negatives_of(self, items: ParallelItems, i: int, rows: dict[str, int]) -> list[str]:
        """A pair's k hard negatives: each source row's list from its start, the rows taken in turn
        (one row when query and passage share it); a short list repeats (Tevatron samples with
        replacement), so every pair brings k and the workers' candidate blocks keep one size."""
        sources = list(dict.fromkeys(rows[name] for name in self.negative_rows))
        lists = []
        for row in sources:
            if not items.negatives[row]:
                lang = next(lang for lang, r in items.rows[i].items() if r == row)
                raise ConfigError(f"parallel id {items.ids[i]!r} ({lang}) has no hard_negative but "
                                  "hard negatives are on; set train.use_hard_negatives=false or give every row one")
            lists.append(items.negatives[row])
        picks = []
        for j in range(self.negatives_per_pair):
            given = lists[j % len(lists)]
            picks.append(given[(j // len(lists)) % len(given)])
        return picks
