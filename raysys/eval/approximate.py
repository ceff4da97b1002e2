"""Approximate top-k for corpora too large for exact search: FAISS index_factory shards (IVF, PQ,
HNSW, ...) with their recall against exact search measured in the same run.

`eval.ann_index` (e.g. "IVF4096,PQ32", "HNSW32"; `eval.ann_params` such as "nprobe=32" or
"efSearch=128", FAISS's ParameterSpace syntax) replaces each MIRACL-style shard's IndexFlatIP.
A shard trains its index on a uniform sample of its own rows (`ANN_TRAIN_ROWS` at most), then
adds its files one by one; with PQ it holds far less than the float32 vectors. Only top-k lists
come from it: LAReQA's exact ranks never do. For `eval.ann_recall_queries` topics spread over the
set, every shard also answers exactly by streaming its files again (one file in memory at a time),
and recall@10 / recall@k of the approximate lists against the exact ones are reported with the
metrics, so an approximate figure is never mistaken for an exact one.
"""

from __future__ import annotations

import numpy as np

from raysys.errors import ConfigError
from raysys.eval.ranking import balanced_bounds, merge_top_k, open_shards, search_stored_queries, stored_blocks
from raysys.eval.shards import chunk_top_k, faiss, merge_sorted, read_embedding_file

ANN_TRAIN_ROWS = 100_000  # per shard: FAISS asks for 30-256 training points per IVF list


def check_ann_index(spec: str, dim: int) -> None:
    """One line naming eval.ann_index when FAISS cannot build `spec` for `dim`-dimensional vectors."""
    try:
        faiss.index_factory(int(dim), spec, faiss.METRIC_INNER_PRODUCT)
    except Exception as exc:  # FAISS raises RuntimeError with a multi-line C++ trace
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"FAISS cannot build index {spec!r} for {dim}-dimensional embeddings: {first}",
                          field="eval.ann_index", hint="a FAISS index_factory string, e.g. IVF1024,Flat or HNSW32") from None


class ApproximateShard:
    """Candidates first_id .. first_id + n - 1 of stored files in a FAISS index_factory index."""

    def __init__(self, first_id: int, *, parts: list[tuple[str, int, int]], ann: str, ann_params: str | None = None,
                 groups: np.ndarray | None = None, use_gpu: bool = False, threads: int | None = None,
                 train_rows: int = ANN_TRAIN_ROWS, seed: int = 0, storage_dtype: str = "fp32"):
        if storage_dtype != "fp32":  # the index_factory string names an approximate index's storage
            raise ValueError(f"storage_dtype={storage_dtype!r} applies to exact shards; name it in eval.ann_index")
        if threads:
            faiss.omp_set_num_threads(int(threads))
        self.first_id, self.parts = int(first_id), list(parts)
        total = sum(hi - lo for _, lo, hi in self.parts)
        rng = np.random.default_rng(seed + self.first_id)
        share = min(1.0, train_rows / max(total, 1))
        sample = np.concatenate([block[rng.random(len(block)) < share] for block in self._blocks()])
        index = faiss.index_factory(sample.shape[1], ann, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            try:
                index.train(sample)
            except RuntimeError as exc:
                raise ValueError(f"eval.ann_index={ann!r}: training on {len(sample)} vectors of shard {first_id} "
                                 f"failed: {str(exc).strip().splitlines()[-1]}") from None
        for block in self._blocks():  # file by file: never a second full copy
            index.add(block)
        if ann_params:
            faiss.ParameterSpace().set_index_parameters(index, ann_params)
        if use_gpu:
            self._res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._res, 0, index)
        self.index, self.n, self.dim = index, int(index.ntotal), int(index.d)

    def _blocks(self):
        for uri, lo, hi in self.parts:
            yield np.ascontiguousarray(read_embedding_file(uri)[lo:hi])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top-k of this shard, (score desc, id asc); missing hits are -1 / -inf."""
        k = min(int(k), self.n)
        scores, labels = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        ids = np.where(labels >= 0, labels + self.first_id, -1)
        scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)
        order = np.lexsort((np.where(ids >= 0, ids, np.iinfo(np.int64).max), -scores), axis=-1)
        return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)

    def exact_search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k of this shard's rows, re-read from storage one file at a time."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        top = (np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64))
        offset = self.first_id
        for block in self._blocks():
            top = merge_sorted(top, chunk_top_k(q @ block.T, k, offset), k)
            offset += len(block)
        return top

    def info(self) -> dict:
        return {"first_id": self.first_id, "n": self.n, "dim": self.dim}


def approximate_top_k(corpus_files: list[tuple[str, int]], query_files: list[tuple[str, int]], k: int, plan: dict,
                      ann: str, ann_params: str | None, recall_queries: int,
                      block: int = 512) -> tuple[np.ndarray, np.ndarray, dict]:
    """(scores, ids) as `raysys.eval.run.search_stored`, from approximate shards, plus the recall
    of those lists against exact search on a sample of the queries."""
    check_ann_index(ann, read_embedding_file(corpus_files[0][0]).shape[1])
    plan = dict(plan)
    bounds = balanced_bounds(sum(n for _, n in corpus_files), plan.pop("num_shards"))
    shards = open_shards(corpus_files, bounds, shard_class=ApproximateShard, ann=ann, ann_params=ann_params, **plan)
    try:
        scores, ids = search_stored_queries(shards, query_files, k, block)
        # Recall: a sample spread over the queries, picked while the files stream past.
        sample = np.unique(np.linspace(0, len(ids) - 1, min(recall_queries, len(ids))).round().astype(np.int64))
        picked = [q[sample[(sample >= first) & (sample < first + len(q))] - first]
                  for first, q in stored_blocks(query_files, block)]
        q = shards.put(np.concatenate(picked))
        exact = shards.call("exact_search", {s: (q, k) for s in range(len(bounds) - 1)})
        _, exact_ids = merge_top_k([s for s, _ in exact.values()], [i for _, i in exact.values()], k)
    finally:
        shards.close()
    report = {"index": ann, "params": ann_params, "sampled_queries": int(len(sample)),
              **{f"recall@{depth}": recall_at(ids[sample], exact_ids, depth) for depth in sorted({min(10, k), k})}}
    return scores, ids, report


def recall_at(approximate: np.ndarray, exact: np.ndarray, depth: int) -> float:
    """Mean share of each query's exact top-`depth` ids found in its approximate top-`depth`."""
    found = [len(set(a[:depth][a[:depth] >= 0]) & set(e[:depth][e[:depth] >= 0])) / max(1, int((e[:depth] >= 0).sum()))
             for a, e in zip(approximate, exact)]
    return float(np.mean(found)) if found else float("nan")
