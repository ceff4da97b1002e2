"""Exact full-pool ranks and a merged top-k from index shards, one block of queries at a time.

The driver holds no embeddings and no score matrix: per block it asks the shards that hold
each query's relevant candidates for their scores (round 1), then every shard for its top-k and
its counts above / tied with each relevant score (round 2), and adds the counts up. Ranks follow
the tie rule of `raysys.eval.metrics` exactly: within equal scores, non-relevant candidates come
first, then relevant ones by ascending id, so for relevant d of a query with relevant set R
    rank(d) = #{j : s_j > s_d} + #{j : s_j == s_d} - #{e in R : s_e == s_d, e > d};
in its group alone (the query's one relevant candidate of that language, LAReQA pairs)
    group_rank(d) = #{j in group(d) : s_j >= s_d}.
The shards count only non-relevant j; the relevant candidates are placed among themselves by
their round-1 scores, one value each, so two of them never share a rank even where another GEMM
shape rounds a product one ulp differently.
Shards are in-process objects (`LocalShards`: arrays in memory, or a small pool's stored files on
one node) or Ray actors that load their range of the stored embedding files themselves
(`ActorShards`); all run the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from raysys.eval.shards import COUNT_CHUNK, IndexShard

COUNTS = ("above", "tied", "above_group", "tied_group")


def balanced_bounds(total: int, num_shards: int) -> np.ndarray:
    """Contiguous ranges whose sizes differ by at most 1."""
    if not 1 <= num_shards <= total:
        raise ValueError(f"num_shards must be in [1, {total}], got {num_shards}")
    return np.arange(num_shards + 1, dtype=np.int64) * total // num_shards


def _check_bounds(bounds: Sequence[int], total: int) -> np.ndarray:
    bounds = np.asarray(bounds, dtype=np.int64)
    if bounds[0] != 0 or bounds[-1] != total or np.any(np.diff(bounds) <= 0):
        raise ValueError(f"shard bounds must rise strictly from 0 to {total}, got {bounds.tolist()}")
    return bounds


class LocalShards:
    """In-process shards over an in-memory [N, d] array (tests, training-time validation)."""

    def __init__(self, vectors: np.ndarray, bounds: Sequence[int], groups: np.ndarray | None = None,
                 count_chunk: int = COUNT_CHUNK):
        self.bounds = _check_bounds(bounds, len(vectors))
        self.shards = [IndexShard(lo, vectors=vectors[lo:hi], groups=None if groups is None else groups[lo:hi],
                                  count_chunk=count_chunk)
                       for lo, hi in zip(self.bounds[:-1], self.bounds[1:])]

    @classmethod
    def from_files(cls, files: Sequence[tuple[str, int]], bounds: Sequence[int],
                   groups: np.ndarray | None = None, shard_class=IndexShard, **shard_kwargs) -> "LocalShards":
        """The same shards over stored embedding files, loaded in this process (a small pool on
        one node: no actor start-up; each shard reads only its range, as an actor would)."""
        shards = cls.__new__(cls)
        shards.bounds = _check_bounds(bounds, sum(n for _, n in files))
        shards.shards = [shard_class(int(lo), parts=parts_for_range(files, int(lo), int(hi)),
                                     groups=None if groups is None else groups[lo:hi], **shard_kwargs)
                         for lo, hi in zip(shards.bounds[:-1], shards.bounds[1:])]
        return shards

    def put(self, queries: np.ndarray):
        return queries

    def call(self, method: str, args: dict[int, tuple]) -> dict[int, object]:
        return {s: getattr(self.shards[s], method)(*a) for s, a in args.items()}

    def close(self) -> None:
        self.shards = []


class ActorShards:
    """One Ray actor per shard; each loads rows bounds[s]..bounds[s+1]-1 of the stored embedding
    files [(uri, rows)] itself. use_gpu: one GPU per actor (FAISS GPU index + counts on it)."""

    def __init__(self, files: Sequence[tuple[str, int]], bounds: Sequence[int], groups: np.ndarray | None = None,
                 use_gpu: bool = False, cpus_per_shard: int = 1, shard_class=IndexShard, **shard_kwargs):
        import ray

        total = sum(n for _, n in files)
        self.bounds = _check_bounds(bounds, total)
        cls = ray.remote(shard_class).options(num_cpus=0 if use_gpu else cpus_per_shard, num_gpus=1 if use_gpu else 0)
        self.actors = [cls.remote(int(lo), parts=parts_for_range(files, int(lo), int(hi)),
                                  groups=None if groups is None else groups[lo:hi], use_gpu=use_gpu,
                                  threads=cpus_per_shard, **shard_kwargs)
                       for lo, hi in zip(self.bounds[:-1], self.bounds[1:])]
        ray.get([a.info.remote() for a in self.actors])  # load now: a bad file fails here, named

    def put(self, queries: np.ndarray):
        import ray

        return ray.put(np.ascontiguousarray(queries, dtype=np.float32))  # sent once, read by every shard

    def call(self, method: str, args: dict[int, tuple]) -> dict[int, object]:
        import ray

        refs = {s: getattr(self.actors[s], method).remote(*a) for s, a in args.items()}
        return dict(zip(refs, ray.get(list(refs.values()))))

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


def open_shards(files: Sequence[tuple[str, int]], bounds: Sequence[int], groups: np.ndarray | None = None, *,
                use_gpu: bool = False, cpus_per_shard: int = 1, in_process: bool = False, shard_class=IndexShard,
                **shard_kwargs):
    """Index shards over stored embedding files: Ray actors, or (`in_process`, small pools on one
    node) the same shards in this process. `shard_class`: IndexShard (exact) or another shard with
    the same constructor (raysys.eval.approximate). Call `close()` when done."""
    if in_process:
        return LocalShards.from_files(files, bounds, groups, shard_class=shard_class, **shard_kwargs)
    return ActorShards(files, bounds, groups, use_gpu=use_gpu, cpus_per_shard=cpus_per_shard,
                       shard_class=shard_class, **shard_kwargs)


def search_top_k(shards, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The merged top-k [B, k] of a block of queries over every shard (score descending, then id
    ascending; pad -inf / -1): only k (score, id) pairs per query and shard reach the caller."""
    q = shards.put(queries)
    parts = shards.call("search", {s: (q, k) for s in range(len(shards.bounds) - 1)})
    return merge_top_k([scores for scores, _ in parts.values()], [ids for _, ids in parts.values()], k)


def search_stored_queries(shards, query_files: Sequence[tuple[str, int]], k: int,
                          block: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """search_top_k of every stored query embedding, streamed from its files in blocks: the
    driver holds one block of queries and the merged top-k lists, never the corpus."""
    tops = [search_top_k(shards, queries, k) for _, queries in stored_blocks(query_files, block)]
    return np.concatenate([s for s, _ in tops]), np.concatenate([i for _, i in tops])


def parts_for_range(files: Sequence[tuple[str, int]], lo: int, hi: int) -> list[tuple[str, int, int]]:
    """[(uri, first row, end row)] of the files that rows lo..hi-1 of their concatenation span."""
    parts, start = [], 0
    for uri, n in files:
        a, b = max(lo, start), min(hi, start + n)
        if a < b:
            parts.append((uri, a - start, b - start))
        start += n
    return parts


@dataclass
class BlockRanks:
    ranks: list[np.ndarray]        # per query: full-pool ranks of its relevant ids (in the order given)
    group_ranks: list[np.ndarray]  # per query: each relevant id's rank within its own group
    top_scores: np.ndarray         # [B, k] score descending, ties by ascending id; pad -inf
    top_ids: np.ndarray            # [B, k]; pad -1


def rank_block(shards, queries: np.ndarray, relevant: Sequence[np.ndarray], k: int) -> BlockRanks:
    """Exact ranks of each query's relevant candidate ids (global rows) and the merged top-k."""
    num, width = len(relevant), max((len(r) for r in relevant), default=0)
    if queries.shape[0] != num:
        raise ValueError(f"{queries.shape[0]} queries but {num} relevant lists")
    rel_ids = np.full((num, width), -1, np.int64)
    for b, rel in enumerate(relevant):
        rel = np.asarray(rel, np.int64).reshape(-1)
        if rel.size and (rel.min() < 0 or rel.max() >= shards.bounds[-1] or np.unique(rel).size != rel.size):
            raise ValueError(f"query {b}: relevant ids must be distinct and in [0, {shards.bounds[-1]})")
        rel_ids[b, :rel.size] = rel
    valid = rel_ids >= 0
    owner = np.searchsorted(shards.bounds, rel_ids, side="right") - 1
    q = shards.put(queries)
    # Round 1: each relevant candidate's score and group, from the shard that holds it.
    asked = {s: np.nonzero(valid & (owner == s)) for s in range(len(shards.bounds) - 1)}
    asked = {s: (rows, cols) for s, (rows, cols) in asked.items() if rows.size}
    exact = np.full((num, width), np.inf, np.float64)  # padding: nothing scores above or ties
    rel_norms = np.zeros((num, width), np.float64)
    rel_groups = np.full((num, width), -1, np.int64)
    answers = shards.call("relevant_scores", {s: (q, rows, rel_ids[rows, cols]) for s, (rows, cols) in asked.items()})
    for s, (scores, groups, norms) in answers.items():
        exact[asked[s]], rel_groups[asked[s]], rel_norms[asked[s]] = scores, groups, norms
    # Round 2: every shard's top-k and counts against those scores.
    args = (q, exact, rel_ids, rel_groups, rel_norms, k)
    parts = shards.call("search_and_count", {s: args for s in range(len(shards.bounds) - 1)})
    # The shards counted non-relevant candidates only; the relevant ones are ordered here, by their
    # exact scores (one value each), so their ranks are distinct whatever the GEMM rounding.
    total = {name: sum(p[name] for p in parts.values()) for name in COUNTS}
    t_other, t_self = exact[:, None, :], exact[:, :, None]  # [B, R(d), R(e)]: e against d
    other = valid[:, None, :] & ~np.eye(width, dtype=bool)[None]
    ahead = (t_other > t_self) | ((t_other == t_self) & (rel_ids[:, None, :] < rel_ids[:, :, None]))
    ranks = total["above"] + total["tied"] + 1 + (ahead & other).sum(2)  # + 1: the candidate itself
    same_group = rel_groups[:, None, :] == rel_groups[:, :, None]
    group_ranks = total["above_group"] + total["tied_group"] + 1 + ((t_other >= t_self) & same_group & other).sum(2)
    top_scores, top_ids = merge_top_k([p["scores"] for p in parts.values()], [p["ids"] for p in parts.values()], k)
    sizes = valid.sum(1)
    return BlockRanks([ranks[b, :n] for b, n in enumerate(sizes)], [group_ranks[b, :n] for b, n in enumerate(sizes)],
                      top_scores, top_ids)


def merge_top_k(scores: list[np.ndarray], ids: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Shard top-k lists -> one [B, k] list: score descending, then id ascending; pad -inf / -1."""
    all_scores, all_ids = np.concatenate(scores, axis=1), np.concatenate(ids, axis=1)
    num = all_scores.shape[0]
    all_scores = np.where(all_ids >= 0, all_scores, -np.inf)
    order = np.lexsort((np.where(all_ids >= 0, all_ids, np.iinfo(np.int64).max), -all_scores), axis=-1)[:, :k]
    out_scores = np.full((num, k), -np.inf, np.float32)
    out_ids = np.full((num, k), -1, np.int64)
    width = order.shape[1]
    out_scores[:, :width] = np.take_along_axis(all_scores, order, axis=1)
    out_ids[:, :width] = np.take_along_axis(all_ids, order, axis=1)
    return out_scores, out_ids


def array_blocks(queries: np.ndarray, block: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, rows) of an in-memory query array."""
    for start in range(0, queries.shape[0], block):
        yield start, np.ascontiguousarray(queries[start:start + block], dtype=np.float32)


def stored_blocks(files: Sequence[tuple[str, int]], block: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, rows) read one stored embedding file at a time (never the whole set)."""
    from raysys.eval.shards import read_embedding_file

    first = 0
    for uri, n in files:
        emb = read_embedding_file(uri)
        if emb.shape[0] != n:
            raise ValueError(f"{uri}: {emb.shape[0]} rows, expected {n}")
        for start in range(0, n, block):
            yield first + start, emb[start:start + block]
        first += n
