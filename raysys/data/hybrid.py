"""Hybrid batches: the step schedule and the per-worker batch builder.

The schedule is a pure function of (seed, epoch, step): every worker computes the same batch
type (monolingual with probability alpha, else cross-lingual) and the same monolingual language,
so a global batch is never a mix of types (FlagEmbedding's shared-RNG convention). Each worker
fills its local share from its own shard; shards hold disjoint parallel ids, so no parallel id
appears twice in a global batch (two versions of one item would be false negatives).
"""

from __future__ import annotations

import hashlib
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


def shard_of(parallel_id: str, world_size: int) -> int:
    """Stable shard of a parallel id: all language versions of an id land on one worker."""
    digest = hashlib.blake2b(parallel_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % world_size


@dataclass
class PairBatch:
    queries: list[str]
    passages: list[str]
    hard_negatives: list[str] | None
    ids: list[str]
    query_langs: list[str]
    passage_langs: list[str]
    plan: StepPlan


class ParallelItems:
    """A worker's parallel items: for each id, its language versions (query, passage, negative)."""

    def __init__(self, table: pa.Table):
        wanted = [c for c in ("id", "lang", "query", "passage", "hard_negative") if c in table.column_names]
        table = table.select(wanted).sort_by([("id", "ascending"), ("lang", "ascending")])
        cols = table.to_pydict()
        self.queries, self.passages = cols["query"], cols["passage"]
        self.negatives = cols.get("hard_negative") or [None] * len(self.queries)
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

    def count_with(self, lang: str) -> int:
        return sum(lang in r for r in self.rows)

    def count_multilingual(self) -> int:
        return sum(len(r) >= 2 for r in self.rows)


class _IdStream:
    """Ids in a seeded random order, cycling with a fresh permutation when exhausted.

    `take(k, accept)` returns the next k distinct acceptable ids; ids it passes over go back to
    the front, so with fully parallel data an epoch uses every id exactly once.
    """

    def __init__(self, n: int, seed_words: list[int]):
        self.n, self.seed_words, self.cycle = n, seed_words, 0
        self.order: deque[int] = deque()

    def _refill(self) -> None:
        rng = np.random.default_rng(self.seed_words + [self.cycle])
        self.order.extend(rng.permutation(self.n).tolist())
        self.cycle += 1

    def take(self, k: int, accept) -> list[int]:
        chosen: list[int] = []
        seen, passed = set(), []
        budget = 3 * self.n + k  # enough for two refills; more means too few acceptable ids
        while len(chosen) < k:
            if not self.order:
                self._refill()
            i = self.order.popleft()
            budget -= 1
            if budget < 0:
                raise ConfigError(f"only {len(set(chosen))} acceptable parallel ids on this worker; "
                                  f"a local batch needs {k}")
            if i not in seen and accept(i):
                chosen.append(i)
                seen.add(i)
            else:
                passed.append(i)
        self.order.extendleft(reversed(passed))
        return chosen


class HybridBatcher:
    """Builds this worker's local share of each global hybrid batch."""

    def __init__(self, items: ParallelItems, *, languages: Sequence[str], alpha: float, seed: int,
                 local_batch_size: int, rank: int, use_hard_negatives: bool = False):
        self.items, self.languages = items, sorted(languages)
        self.alpha, self.seed, self.rank = alpha, seed, rank
        self.local_batch_size = local_batch_size
        # Decided once for the whole dataset by the driver (every rank must agree, or the
        # cross-worker gather of candidates would mismatch); a missing negative is then an error.
        self.use_hard_negatives = use_hard_negatives
        self._check_capacity()

    def _check_capacity(self) -> None:
        k, items = self.local_batch_size, self.items
        if self.alpha > 0:
            for lang in self.languages:
                if items.count_with(lang) < k:
                    raise ConfigError(f"worker {self.rank}: {items.count_with(lang)} parallel ids in '{lang}' "
                                      f"but a monolingual local batch needs {k}; lower train.global_batch_size")
        if self.alpha < 1 and items.count_multilingual() < k:
            raise ConfigError(f"worker {self.rank}: {items.count_multilingual()} parallel ids exist in two or "
                              f"more languages but a cross-lingual local batch needs {k}")

    def local_steps_per_epoch(self) -> int:
        """Steps this worker could fill; the trainer takes the minimum over workers."""
        return len(self.items) // self.local_batch_size

    def epoch(self, epoch: int, num_steps: int, start_step: int = 0) -> Iterator[tuple[int, PairBatch]]:
        """Yield (step, batch) for steps [start_step, num_steps) of `epoch`.

        Sampling replays the steps before `start_step`, so a resumed run sees exactly the
        batches the uninterrupted run would have seen.
        """
        stream = _IdStream(len(self.items), [_SAMPLE_STREAM, self.seed, epoch, self.rank])
        for step in range(num_steps):
            plan = plan_step(self.seed, epoch, step, self.alpha, self.languages)
            rows = self.items.rows
            if plan.kind == MONO:
                chosen = stream.take(self.local_batch_size, lambda i: plan.lang in rows[i])
            else:
                chosen = stream.take(self.local_batch_size, lambda i: len(rows[i]) >= 2)
            if step >= start_step:
                yield step, self._materialise(plan, chosen, epoch, step)

    def _materialise(self, plan: StepPlan, chosen: list[int], epoch: int, step: int) -> PairBatch:
        it = self.items
        rng = np.random.default_rng([_SAMPLE_STREAM, self.seed, epoch, self.rank, step])
        q_rows, p_rows, q_langs, p_langs = [], [], [], []
        for i in chosen:
            if plan.kind == MONO:
                q_lang = p_lang = plan.lang
            else:
                available = sorted(it.rows[i])
                q_lang = available[int(rng.integers(len(available)))]
                others = [lang for lang in available if lang != q_lang]
                p_lang = others[int(rng.integers(len(others)))]
            q_rows.append(it.rows[i][q_lang])
            p_rows.append(it.rows[i][p_lang])
            q_langs.append(q_lang)
            p_langs.append(p_lang)
        negatives = None
        if self.use_hard_negatives:
            negatives = [it.negatives[r] for r in p_rows]  # in the passage's language
            if any(n is None for n in negatives):
                missing = next(it.ids[i] for i, r in zip(chosen, p_rows) if it.negatives[r] is None)
                raise ConfigError(f"parallel id {missing!r} has no hard_negative but hard negatives are on; "
                                  "set train.use_hard_negatives=false or give every row one")
        return PairBatch(
            queries=[it.queries[r] for r in q_rows], passages=[it.passages[r] for r in p_rows],
            hard_negatives=negatives, ids=[it.ids[i] for i in chosen],
            query_langs=q_langs, passage_langs=p_langs, plan=plan)
