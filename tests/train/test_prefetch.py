"""The prefetch thread: same batches and tokens as tokenizing in the step, in order; it works
ahead of the consumer but no further than its depth; its errors reach the training loop; close()
stops it even while it is blocked on a full queue."""

from __future__ import annotations

import itertools
import threading

import pytest
import torch

from raysys.errors import DataError
from raysys.model.encoder import BiEncoder
from raysys.train.prefetch import Prefetcher, thread_tokenizer
from raysys.train.step import batch_tokens
from tests.train.test_step import hybrid_batch


@pytest.mark.parametrize("mini_batch_size", [None, 4])
def test_prefetched_tokens_equal_the_step_s_own(tiny_model_dir, mini_batch_size):
    model = BiEncoder.from_pretrained(str(tiny_model_dir))
    batches = [(step // 3, hybrid_batch(0, 1, 6, step)) for step in range(7)]
    with Prefetcher(iter(batches), thread_tokenizer(model), mini_batch_size) as prefetcher:
        ready = list(prefetcher)
    assert [(r.epoch, r.batch) for r in ready] == batches
    for r in ready:
        expected = batch_tokens(model.tokenize, r.batch, mini_batch_size)
        assert len(r.tokens) == (2 if mini_batch_size else 1)  # 6 pairs in mini-batches of 4: 4 + 2
        for got, want in zip(r.tokens, expected):
            for part_got, part_want in zip(got, want):
                assert part_got.keys() == part_want.keys()
                for key in part_want:
                    assert torch.equal(part_got[key], part_want[key])


def _recording_tokenizer(calls: list, tokenized: threading.Event, after: int):
    def tokenize(texts, kind):
        calls.append(kind)
        if calls.count("query") >= after:
            tokenized.set()
        return {"input_ids": torch.zeros(len(texts), 2, dtype=torch.long)}
    return tokenize


def test_works_ahead_of_the_consumer_within_its_depth():
    drawn: list[int] = []

    def batches():
        for step in itertools.count():
            drawn.append(step)
            yield 0, hybrid_batch(0, 1, 4, step)

    calls: list[str] = []
    ahead = threading.Event()
    with Prefetcher(batches(), _recording_tokenizer(calls, ahead, after=3), None, depth=2) as prefetcher:
        first = next(iter(prefetcher))
        # The consumer holds batch 0; batches 1 and 2 are tokenized before anyone asks for them.
        assert ahead.wait(timeout=30), "the thread did not tokenize the next batches ahead"
        assert first.batch.queries == hybrid_batch(0, 1, 4, 0).queries
        # Bounded: two queued + at most one being tokenized, blocked on the full queue.
        assert len(drawn) <= 4


def test_an_error_while_drawing_batches_is_raised_in_the_loop():
    def batches():
        yield 0, hybrid_batch(0, 1, 4, 0)
        raise DataError("bad row", file="train.jsonl", row=7, field="query")

    model_calls: list[str] = []
    with Prefetcher(batches(), _recording_tokenizer(model_calls, threading.Event(), 99), None) as prefetcher:
        seen = []
        with pytest.raises(DataError, match="bad row"):
            for ready in prefetcher:
                seen.append(ready)
    assert len(seen) == 1


def test_close_stops_a_thread_blocked_on_a_full_queue():
    batches = ((0, hybrid_batch(0, 1, 4, step)) for step in itertools.count())
    calls: list[str] = []
    blocked = threading.Event()
    prefetcher = Prefetcher(batches, _recording_tokenizer(calls, blocked, after=3), None, depth=1)
    next(iter(prefetcher))
    assert blocked.wait(timeout=30)  # it has filled the queue and waits with the next batch
    prefetcher.close()
    assert not prefetcher._thread.is_alive()
