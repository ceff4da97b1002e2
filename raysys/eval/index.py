"""Sharded exact inner-product search with FAISS (one shard per GPU when a GPU build sees GPUs).

`search` returns a truncated top-k list; exact full-pool ranks for metrics come from
`raysys.eval.metrics.relevant_ranks` over `score_all` / `iter_score_blocks`, never from the
truncated list (GPU FAISS caps k at 2048, and relevant candidates may rank far below k).
"""

from __future__ import annotations

import json
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np

try:
    import faiss
except ImportError:  # faiss-cpu and faiss-gpu are extras: both ship the `faiss` module, only one may be installed
    raise ImportError("FAISS is not installed: `pip install raysys[cpu]` (faiss-cpu) or, on CUDA machines, "
                      "`pip install raysys[gpu]` (faiss-gpu)") from None

GPU_MAX_K = 2048  # FAISS GPU k-selection limit


def gpus_available() -> int:
    """Number of GPUs usable by this faiss build (0 for faiss-cpu)."""
    if not hasattr(faiss, "StandardGpuResources"):
        return 0
    return int(faiss.get_num_gpus())


class ShardedIndex:
    """Exact IndexFlatIP over `num_shards` contiguous partitions of the embeddings.

    ids[i] is the id returned for embeddings[i] (default: i). use_gpu: None = use GPUs when
    available, True = require them, False = CPU. num_threads sets FAISS's OpenMP threads."""

    def __init__(self, embeddings: np.ndarray, ids: np.ndarray | None = None, num_shards: int = 1,
                 use_gpu: bool | None = None, num_threads: int | None = None):
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or embeddings.shape[0] == 0:
            raise ValueError(f"embeddings must be a non-empty [N, d] array, got shape {embeddings.shape}")
        n = embeddings.shape[0]
        ids = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.shape[0] != n:
            raise ValueError(f"{ids.shape[0]} ids for {n} embeddings")
        if not 1 <= num_shards <= n:
            raise ValueError(f"num_shards must be in [1, {n}], got {num_shards}")
        if num_threads is not None:
            faiss.omp_set_num_threads(int(num_threads))
        num_gpus = gpus_available()
        if use_gpu and num_gpus == 0:
            raise RuntimeError("use_gpu=True but this faiss build sees no GPU (install faiss-gpu)")
        self.on_gpu = bool(num_gpus > 0 if use_gpu is None else use_gpu)
        self.embeddings = embeddings  # kept for exact chunked scoring (score_all)
        self.ids = ids
        self.dim = embeddings.shape[1]
        bounds = np.arange(num_shards + 1, dtype=np.int64) * n // num_shards  # contiguous, sizes differ by <= 1
        self.shard_bounds = bounds
        self._gpu_resources: list = []
        self.shards = [self._place(self._flat_index(embeddings[lo:hi]), s, num_gpus)
                       for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]))]

    def _flat_index(self, vectors: np.ndarray) -> faiss.Index:
        index = faiss.IndexFlatIP(self.dim)
        index.add(vectors)
        return index

    def _place(self, index: faiss.Index, shard: int, num_gpus: int) -> faiss.Index:
        if not self.on_gpu:
            return index
        # One StandardGpuResources per device, shards assigned round-robin (one per GPU when
        # num_shards == num_gpus).
        device = shard % num_gpus
        while len(self._gpu_resources) <= device:
            self._gpu_resources.append(faiss.StandardGpuResources())
        return faiss.index_cpu_to_gpu(self._gpu_resources[device], device, index)

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def ntotal(self) -> int:
        return int(self.embeddings.shape[0])

    def _check_queries(self, queries: np.ndarray) -> np.ndarray:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be [Q, {self.dim}], got shape {queries.shape}")
        return queries

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product over all shards: (scores [Q, k] float32, ids [Q, k] int64),
        score descending, ties broken by ascending id. Columns past the pool size (or past
        GPU_MAX_K on GPU, with a warning) hold score -inf and id -1, as in FAISS."""
        queries = self._check_queries(queries)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        k_valid = min(k, self.ntotal)
        if self.on_gpu and k_valid > GPU_MAX_K:
            warnings.warn(f"GPU FAISS returns at most {GPU_MAX_K} results; columns beyond are -1. "
                          "Use metrics.relevant_ranks for exact full-pool ranks.")
            k_valid = GPU_MAX_K

        def search_shard(s: int) -> tuple[np.ndarray, np.ndarray]:
            size = int(self.shard_bounds[s + 1] - self.shard_bounds[s])
            shard_k = min(k_valid, size)
            scores, local = self.shards[s].search(queries, shard_k)
            return scores, self.ids[self.shard_bounds[s] + local]

        if self.on_gpu and self.num_shards > 1:
            # FAISS releases the GIL, so per-GPU searches overlap.
            with ThreadPoolExecutor(self.num_shards) as pool:
                parts = list(pool.map(search_shard, range(self.num_shards)))
        else:
            parts = [search_shard(s) for s in range(self.num_shards)]
        all_scores = np.concatenate([p[0] for p in parts], axis=1)
        all_ids = np.concatenate([p[1] for p in parts], axis=1)
        # Merge: score descending, then id ascending (lexsort uses the last key as primary).
        order = np.lexsort((all_ids, -all_scores), axis=-1)[:, :k_valid]
        out_scores = np.full((queries.shape[0], k), -np.inf, dtype=np.float32)
        out_ids = np.full((queries.shape[0], k), -1, dtype=np.int64)
        out_scores[:, :k_valid] = np.take_along_axis(all_scores, order, axis=1)
        out_ids[:, :k_valid] = np.take_along_axis(all_ids, order, axis=1)
        return out_scores, out_ids

    def iter_score_blocks(self, queries: np.ndarray, chunk_size: int = 1024) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (first_query, scores [B, N]) for chunks of queries; columns in embedding order."""
        queries = self._check_queries(queries)
        for start in range(0, queries.shape[0], chunk_size):
            yield start, queries[start:start + chunk_size] @ self.embeddings.T

    def score_all(self, queries: np.ndarray, chunk_size: int = 1024) -> np.ndarray:
        """Exact scores [Q, N] against every candidate (columns in embedding order, not id order)."""
        queries = self._check_queries(queries)
        out = np.empty((queries.shape[0], self.ntotal), dtype=np.float32)
        for start, block in self.iter_score_blocks(queries, chunk_size):
            out[start:start + block.shape[0]] = block
        return out

    def save(self, directory: str | Path) -> None:
        """Write shard_<i>.faiss (CPU copies), ids.npy and meta.json under `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for s, shard in enumerate(self.shards):
            cpu = faiss.index_gpu_to_cpu(shard) if self.on_gpu else shard
            faiss.write_index(cpu, str(directory / f"shard_{s}.faiss"))
        np.save(directory / "ids.npy", self.ids)
        (directory / "meta.json").write_text(json.dumps({"num_shards": self.num_shards, "dim": self.dim}))

    @classmethod
    def load(cls, directory: str | Path, use_gpu: bool | None = None,
             num_threads: int | None = None) -> "ShardedIndex":
        """Rebuild an index written by `save` (same shard boundaries, same ids)."""
        directory = Path(directory)
        meta = json.loads((directory / "meta.json").read_text())
        parts = []
        for s in range(meta["num_shards"]):
            shard = faiss.read_index(str(directory / f"shard_{s}.faiss"))
            parts.append(shard.reconstruct_n(0, shard.ntotal))
        return cls(np.concatenate(parts), np.load(directory / "ids.npy"), num_shards=meta["num_shards"],
                   use_gpu=use_gpu, num_threads=num_threads)
