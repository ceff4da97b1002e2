import numpy as np
import pyarrow as pa
import pytest

from raysys.data.buckets import bucket_of as shard_of
from raysys.data.hybrid import CROSS, MONO, HybridBatcher, ParallelItems, plan_step
from raysys.data.schema import PAIR_SCHEMA
from raysys.errors import ConfigError

LANGS = ["de", "en", "es", "zh"]


def parallel_table(n_ids: int, langs=LANGS, drop=None) -> pa.Table:
    """n_ids parallel items in every language (minus the (id, lang) pairs in `drop`)."""
    rows = [{"id": f"q{i}", "lang": lang, "query": f"{lang} question {i}", "passage": f"{lang} passage {i}",
             "hard_negative": None, "context": None, "group": f"g{i // 10}", "origin": f"t:{i}"}
            for i in range(n_ids) for lang in langs if not (drop and (f"q{i}", lang) in drop)]
    return pa.Table.from_pylist(rows, schema=PAIR_SCHEMA)


def rank_batchers(table: pa.Table, world: int, local: int, alpha=0.5, seed=0):
    batchers = []
    for rank in range(world):
        mask = pa.array([shard_of(pid, world) == rank for pid in table.column("id").to_pylist()])
        batchers.append(HybridBatcher(ParallelItems(table.filter(mask)), languages=LANGS, alpha=alpha,
                                      seed=seed, local_batch_size=local, rank=rank))
    return batchers


def global_batches(batchers, epoch=0, start=0):
    steps = min(b.local_steps_per_epoch() for b in batchers)
    per_rank = [list(b.epoch(epoch, steps, start_step=start)) for b in batchers]
    return list(zip(*per_rank))


def test_schedule_is_shared_by_all_ranks_and_batches_are_pure():
    batchers = rank_batchers(parallel_table(400), world=4, local=8)
    steps = global_batches(batchers)
    assert len(steps) >= 10
    kinds = set()
    for parts in steps:
        plans = {b.plan for _, b in parts}
        assert len(plans) == 1, "ranks disagree on the batch type"
        plan = plans.pop()
        kinds.add(plan.kind)
        ids = [pid for _, b in parts for pid in b.ids]
        assert len(ids) == len(set(ids)) == 32, "a parallel id twice in one global batch"
        for _, b in parts:
            if plan.kind == MONO:
                assert set(b.query_langs) == set(b.passage_langs) == {plan.lang}
                assert all(q.startswith(plan.lang) and p.startswith(plan.lang) for q, p in zip(b.queries, b.passages))
            else:
                assert all(q != p for q, p in zip(b.query_langs, b.passage_langs))
                # query and passage come from the same parallel item
                assert all(q.split()[-1] == p.split()[-1] for q, p in zip(b.queries, b.passages))
    assert kinds == {MONO, CROSS}


def test_alpha_extremes_give_the_baselines():
    assert all(plan_step(3, 0, s, 1.0, LANGS).kind == MONO for s in range(200))
    assert all(plan_step(3, 0, s, 0.0, LANGS).kind == CROSS for s in range(200))


@pytest.mark.parametrize("alpha", [0.2, 0.5, 0.8])
def test_alpha_is_respected_statistically(alpha):
    n = 4000
    mono = sum(plan_step(7, 0, s, alpha, LANGS).kind == MONO for s in range(n))
    sd = np.sqrt(n * alpha * (1 - alpha))
    assert abs(mono - n * alpha) < 4 * sd
    langs = [plan_step(7, 0, s, 1.0, LANGS).lang for s in range(n)]
    counts = np.array([langs.count(lang) for lang in LANGS])
    assert counts.min() > n / len(LANGS) * 0.85  # uniform over training languages


def test_determinism_per_seed_and_change_across_epochs():
    table = parallel_table(200)
    first = [b.ids for parts in global_batches(rank_batchers(table, 2, 8, seed=1)) for _, b in parts]
    again = [b.ids for parts in global_batches(rank_batchers(table, 2, 8, seed=1)) for _, b in parts]
    other_seed = [b.ids for parts in global_batches(rank_batchers(table, 2, 8, seed=2)) for _, b in parts]
    next_epoch = [b.ids for parts in global_batches(rank_batchers(table, 2, 8, seed=1), epoch=1) for _, b in parts]
    assert first == again
    assert first != other_seed
    assert first != next_epoch


def test_epoch_uses_each_id_once_with_full_parallelism():
    batchers = rank_batchers(parallel_table(160), world=2, local=8, alpha=0.5)
    ids = [pid for parts in global_batches(batchers) for _, b in parts for pid in b.ids]
    assert len(ids) == len(set(ids))


def test_resume_replays_the_same_batches():
    batchers = rank_batchers(parallel_table(200), world=2, local=8)
    full = global_batches(batchers)
    resumed = global_batches(batchers, start=5)
    assert [[(s, b.ids, b.queries, b.passages) for s, b in p] for p in full[5:]] == \
           [[(s, b.ids, b.queries, b.passages) for s, b in p] for p in resumed]


def test_partial_parallelism_still_fills_batches():
    # ids 0..99 lack 'zh' half of the time: monolingual zh batches draw only ids that have zh.
    drop = {(f"q{i}", "zh") for i in range(0, 200, 2)}
    batchers = rank_batchers(parallel_table(200, drop=drop), world=2, local=8, alpha=1.0)
    for parts in global_batches(batchers):
        for _, b in parts:
            assert set(b.query_langs) == {b.plan.lang}


def test_too_large_batch_is_a_clear_error():
    table = parallel_table(6)
    with pytest.raises(ConfigError, match="lower train.global_batch_size"):
        HybridBatcher(ParallelItems(table), languages=LANGS, alpha=0.5, seed=0, local_batch_size=8, rank=0)
    single_language = parallel_table(50, langs=["en"])
    with pytest.raises(ConfigError, match="two or\\s+more languages"):
        HybridBatcher(ParallelItems(single_language), languages=["en"], alpha=0.5, seed=0,
                      local_batch_size=8, rank=0)
    with pytest.raises(ConfigError, match="alpha"):
        plan_step(0, 0, 0, 1.5, LANGS)


def test_missing_hard_negative_is_an_error_when_enabled():
    table = parallel_table(40)
    batcher = HybridBatcher(ParallelItems(table), languages=LANGS, alpha=0.5, seed=0, local_batch_size=4,
                            rank=0, use_hard_negatives=True)
    with pytest.raises(ConfigError, match="hard_negative"):
        next(iter(batcher.epoch(0, 2)))


def test_each_pair_brings_its_first_k_negatives_pair_major():
    """k = 3 from rows with 2 to 4 negatives: the first three, a short list repeated from its start;
    pair i's negatives sit at [3i, 3i + 3), in the passage's language."""
    table = parallel_table(40)
    rows = zip(table.column("id").to_pylist(), table.column("lang").to_pylist())
    negatives = [[f"{lang} {pid} n{j}" for j in range(2 + int(pid[1:]) % 3)] for pid, lang in rows]
    table = table.set_column(table.schema.get_field_index("hard_negative"), "hard_negative",
                             pa.array(negatives, pa.list_(pa.string())))
    batcher = HybridBatcher(ParallelItems(table), languages=LANGS, alpha=0.5, seed=0, local_batch_size=4,
                            rank=0, use_hard_negatives=True, negatives_per_pair=3)
    for _, b in batcher.epoch(0, 6):
        assert b.negatives_per_pair == 3 and len(b.hard_negatives) == 3 * len(b.queries)
        for i, (pid, lang) in enumerate(zip(b.ids, b.passage_langs)):
            given = 2 + int(pid[1:]) % 3
            assert b.hard_negatives[3 * i:3 * i + 3] == [f"{lang} {pid} n{j % given}" for j in range(3)]


def with_negatives(table: pa.Table, per_row: int) -> pa.Table:
    """Every row gets `per_row` negatives named "<lang> <id> n<j>"."""
    rows = zip(table.column("id").to_pylist(), table.column("lang").to_pylist())
    negatives = [[f"{lang} {pid} n{j}" for j in range(per_row)] for pid, lang in rows]
    return table.set_column(table.schema.get_field_index("hard_negative"), "hard_negative",
                            pa.array(negatives, pa.list_(pa.string())))


@pytest.mark.parametrize("choice, expected", [
    ("passage", lambda q, p, pid: [f"{p} {pid} n0", f"{p} {pid} n1", f"{p} {pid} n2"]),
    ("query", lambda q, p, pid: [f"{q} {pid} n0", f"{q} {pid} n1", f"{q} {pid} n2"]),
    ("mixed", lambda q, p, pid: [f"{p} {pid} n0", f"{q} {pid} n0", f"{p} {pid} n1"]),
])
def test_cross_lingual_negatives_come_from_the_chosen_row(choice, expected):
    """Cross-lingual pairs take their negatives from the passage's row, the query's, or both in turn;
    a monolingual pair has one row, whose first k it takes whatever the choice."""
    batcher = HybridBatcher(ParallelItems(with_negatives(parallel_table(40), 4)), languages=LANGS, alpha=0.5,
                            seed=0, local_batch_size=4, rank=0, use_hard_negatives=True, negatives_per_pair=3,
                            cross_lingual_negatives=choice)
    kinds = set()
    for _, b in batcher.epoch(0, 8):
        kinds.add(b.plan.kind)
        for i, (pid, q, p) in enumerate(zip(b.ids, b.query_langs, b.passage_langs)):
            one_row = [f"{p} {pid} n{j}" for j in range(3)]
            assert b.hard_negatives[3 * i:3 * i + 3] == (one_row if q == p else expected(q, p, pid))
    assert kinds == {MONO, CROSS}


def test_missing_negative_on_the_query_row_is_an_error_naming_it():
    table = with_negatives(parallel_table(40), 2)
    negatives = table.column("hard_negative").to_pylist()
    for row, lang in enumerate(table.column("lang").to_pylist()):
        if lang == "zh":
            negatives[row] = None
    table = table.set_column(table.schema.get_field_index("hard_negative"), "hard_negative",
                             pa.array(negatives, pa.list_(pa.string())))
    batcher = HybridBatcher(ParallelItems(table), languages=LANGS, alpha=0.0, seed=0, local_batch_size=4,
                            rank=0, use_hard_negatives=True, cross_lingual_negatives="query")
    with pytest.raises(ConfigError, match=r"\(zh\) has no hard_negative"):
        for _ in batcher.epoch(0, 10):
            pass


def test_hard_negatives_follow_the_passage_language():
    table = parallel_table(40)
    negatives = [f"{lang} negative {pid}" for pid, lang in zip(table.column("id").to_pylist(),
                                                                table.column("lang").to_pylist())]
    table = table.set_column(table.schema.get_field_index("hard_negative"), "hard_negative", pa.array(negatives))
    batcher = HybridBatcher(ParallelItems(table), languages=LANGS, alpha=0.0, seed=0, local_batch_size=4,
                            rank=0, use_hard_negatives=True)
    for _, b in batcher.epoch(0, 5):
        assert all(n.split()[0] == lang for n, lang in zip(b.hard_negatives, b.passage_langs))
