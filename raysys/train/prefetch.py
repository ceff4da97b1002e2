"""Tokenization off the training step's critical path.

A background thread draws the next hybrid batches from the schedule and tokenizes them while the
current step runs forward and backward, so a step starts on ready token tensors (pinned host
memory when training on a GPU, copied with `non_blocking`). The thread holds its own copy of
the tokenizer: the main thread tokenizes during validation, and a fast tokenizer used from two
threads at once fails ("Already borrowed"). Batches come out in schedule order, unchanged, so a
run gives the same steps with or without the thread. An error in the thread is raised in the
training loop at the batch where it happened; `close()` stops the thread even when it is blocked
on a full queue (a run that ends early: max_steps, early stopping).
"""

from __future__ import annotations

import copy
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from raysys.model.encoder import tokenize_texts
from raysys.train.step import Tokens, batch_tokens


@dataclass
class ReadyBatch:
    epoch: int
    batch: Any  # raysys.data.hybrid.HybridBatch
    tokens: Tokens


_END = object()


@dataclass
class _Failure:
    error: BaseException


def thread_tokenizer(module) -> Callable[[list[str], str], dict]:
    """`tokenize(texts, kind)` for the prefetch thread, on a private copy of `module`'s tokenizer."""
    tokenizer, settings = copy.deepcopy(module.tokenizer), module.settings
    return lambda texts, kind: tokenize_texts(tokenizer, settings, texts, kind)


class Prefetcher:
    """Iterates `ReadyBatch`es for `(epoch, batch)` pairs, tokenized up to `depth` batches ahead.
    `wait_s`: total time the consumer has waited for a batch (the data plane on the critical path)."""

    def __init__(self, batches: Iterable[tuple[int, Any]], tokenize: Callable[[list[str], str], dict],
                 mini_batch_size: int | None, depth: int = 2, pin_memory: bool = False):
        self._batches, self._tokenize, self._mini_batch_size = batches, tokenize, mini_batch_size
        self._pin_memory = pin_memory
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self.wait_s = 0.0
        self._thread = threading.Thread(target=self._produce, name="raysys-prefetch", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            for epoch, batch in self._batches:
                tokens = batch_tokens(self._tokenize, batch, self._mini_batch_size)
                if self._pin_memory:
                    tokens = [tuple({k: v.pin_memory() for k, v in part.items()} for part in chunk)
                              for chunk in tokens]
                if not self._put(ReadyBatch(epoch, batch, tokens)):
                    return
            self._put(_END)
        except BaseException as error:  # handed to the training loop, raised there
            self._put(_Failure(error))

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[ReadyBatch]:
        while True:
            started = time.perf_counter()
            item = self._queue.get()
            self.wait_s += time.perf_counter() - started
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
