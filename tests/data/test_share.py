"""A worker's share streamed through a bounded buffer (raysys.data.share + HybridBatcher): the same
batches as in memory when the share fits, every id once per epoch when it does not, bounded chunks,
deterministic, and a resumed epoch repeats the uninterrupted one."""

import pytest

from raysys.config import Config
from raysys.data.buckets import read_rank_rows
from raysys.data.hybrid import HybridBatcher, ParallelItems
from raysys.data.share import BucketShare
from raysys.train.datasets import prepare_corpus
from tests.eval.lareqa_fixture import write_synthetic_lareqa


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """180 parallel ids (15 articles x 3 paragraphs x 4 sentences) in 3 languages, all in train."""
    tmp = tmp_path_factory.mktemp("share")
    data = write_synthetic_lareqa(tmp / "d", articles=15, paragraphs=3, sentences=4)
    cfg = Config.from_yaml(None, [f"data.train={data}", f"output_dir={tmp / 'out'}", "data.num_buckets=32",
                                  "data.validation_fraction=0", "data.test_fraction=0"])
    return prepare_corpus(cfg)


def batches(source, *, alpha=0.5, epoch=0, steps=None, start=0, rank=0, k=4):
    batcher = HybridBatcher(source, languages=["de", "en", "fr"], alpha=alpha, seed=7, local_batch_size=k, rank=rank)
    steps = batcher.local_steps_per_epoch() if steps is None else steps
    return [(b.ids, b.queries, b.passages, b.plan) for _, b in batcher.epoch(epoch, steps, start_step=start)]


@pytest.mark.parametrize("world", [1, 2])
def test_a_share_that_fits_the_buffer_gives_the_in_memory_batches(corpus, world):
    uri, manifest = corpus
    for rank in range(world):
        in_memory = ParallelItems(read_rank_rows(uri, manifest, "train", rank, world))
        share = BucketShare(uri, manifest, "train", rank, world, buffer_rows=10**6)
        for epoch in (0, 1):
            assert batches(share, epoch=epoch, rank=rank) == batches(in_memory, epoch=epoch, rank=rank)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_a_small_buffer_still_uses_every_id_once_per_epoch(corpus, alpha):
    uri, manifest = corpus
    share = BucketShare(uri, manifest, "train", 0, 1, buffer_rows=60)  # 540 rows: ~10 chunks
    assert len(share) == 180
    for epoch in (0, 1):
        ids = [pid for b in batches(share, alpha=alpha, epoch=epoch) for pid in b[0]]
        assert len(ids) == 180 and len(set(ids)) == 180  # fully parallel data: each id exactly once


def test_chunks_are_bounded_and_each_bucket_is_read_once_per_cycle(corpus):
    uri, manifest = corpus
    share = BucketShare(uri, manifest, "train", 0, 1, buffer_rows=60)
    loaders = share.chunks([1, 2, 3])
    sizes = [loader().queries.__len__() for loader in loaders]
    assert len(sizes) > 5 and sum(sizes) == 540
    largest_bucket = max(b["rows"] for b in share.buckets)
    assert max(sizes) <= max(60, largest_bucket)
    assert share.rows_read == 540
    order = [[b["bucket"] for b in group] for group in share.plan([1, 2, 3])]
    assert sorted(sum(order, [])) == sorted(b["bucket"] for b in share.buckets)  # every bucket once
    assert order != [[b["bucket"] for b in group] for group in share.plan([1, 2, 4])]  # reshuffled per cycle


def test_streaming_is_deterministic_and_a_resumed_epoch_repeats_it(corpus):
    uri, manifest = corpus
    make = lambda: BucketShare(uri, manifest, "train", 0, 1, buffer_rows=60)  # noqa: E731
    full = batches(make(), epoch=1)
    assert full == batches(make(), epoch=1)
    assert batches(make(), epoch=1, start=17) == full[17:]
    assert full != batches(make(), epoch=2)


def test_ids_passed_over_do_not_keep_their_chunks_in_memory(tmp_path):
    """Partly parallel data: a quarter of the ids lack German, so every German step passes over
    them; the stream keeps copies of just those items, never the chunks they came from."""
    from raysys.data.hybrid import _IdStream

    data = write_synthetic_lareqa(tmp_path / "d", articles=15, paragraphs=3, sentences=4,
                                  missing={("de", f"a{a}p{p}s0") for a in range(15) for p in range(3)})
    cfg = Config.from_yaml(None, [f"data.train={data}", f"output_dir={tmp_path / 'out'}", "data.num_buckets=32",
                                  "data.validation_fraction=0", "data.test_fraction=0"])
    uri, manifest = prepare_corpus(cfg)
    share = BucketShare(uri, manifest, "train", 0, 1, buffer_rows=60)
    stream = _IdStream(share, [1, 2, 3])
    taken = []
    for _ in range(100):
        chosen = stream.take(4, lambda items, i: "de" in items.rows[i])
        taken += [items.ids[i] for items, i in chosen]
        assert len({id(items) for items, _ in stream.order}) <= 2  # the current chunk and one small carry
    assert len(taken) == 400 and all(not pid.endswith("s0") for pid in taken)
    assert len(set(taken[:135])) == 135  # the 135 ids with German, each once before any repeats
