"""Retrieval metrics (LAReQA and MIRACL conventions), one definition each, pure numpy.

Ranks are 1-based positions in a query's *full* ranking of the candidate pool.

Tie policy (deterministic, pessimistic for relevant candidates): candidates are ordered by
score descending; within a group of exactly equal scores, the non-relevant candidates come
first, then the relevant ones in ascending column order. So the rank of relevant candidate d is
    rank(d) = #{j : s_j >= s_d} - #{relevant j : s_j == s_d and j > d},
and the ranks of one query's relevant set are distinct positions of one concrete ordering.
AP computed from these ranks equals scikit-learn's `average_precision_score` whenever no two
relevant candidates of a query share a score (ties with non-relevant ones included); with
float scores ties are rare.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np

# A query's relevant candidates: a list with one int array of column indices per query, or a
# CSR pair (indptr [Q+1], indices) where query q's indices are indices[indptr[q]:indptr[q+1]].
# Only a *tuple* is read as CSR, so a list of two per-query arrays is never misread.
Relevant = Union[Sequence[np.ndarray], tuple[np.ndarray, np.ndarray]]


def _as_relevant_lists(relevant: Relevant, num_queries: int, num_candidates: int) -> list[np.ndarray]:
    if isinstance(relevant, tuple) and len(relevant) == 2:
        indptr, indices = (np.asarray(a, dtype=np.int64) for a in relevant)
        if len(indptr) != num_queries + 1 or indptr[0] != 0 or indptr[-1] != len(indices) \
                or np.any(np.diff(indptr) < 0):
            raise ValueError(f"CSR relevant: indptr must be non-decreasing, length {num_queries + 1}, "
                             f"from 0 to len(indices)={len(indices)}")
        lists = np.split(indices, indptr[1:-1])
    else:
        lists = [np.asarray(r, dtype=np.int64).reshape(-1) for r in relevant]
    if len(lists) != num_queries:
        raise ValueError(f"relevant has {len(lists)} queries, scores have {num_queries}")
    for q, rel in enumerate(lists):
        if rel.size and (rel.min() < 0 or rel.max() >= num_candidates):
            raise ValueError(f"query {q}: relevant index out of range [0, {num_candidates})")
        if np.unique(rel).size != rel.size:
            raise ValueError(f"query {q}: duplicate relevant indices")
    return lists


def _ranks_of_block(block: np.ndarray, rel_lists: list[np.ndarray], first_query: int) -> list[np.ndarray]:
    """Ranks for a block of score rows [B, N]; vectorised over queries, relevant items and candidates."""
    if not np.all(np.isfinite(block)):
        bad = first_query + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
        raise ValueError(f"query {bad}: scores contain NaN or inf")
    num_rows = block.shape[0]
    max_rel = max((len(r) for r in rel_lists), default=0)
    if max_rel == 0:
        return [np.zeros(0, dtype=np.int64) for _ in rel_lists]
    # Pad every query's relevant set to max_rel; padded slots are masked out at the end.
    rel_idx = np.zeros((num_rows, max_rel), dtype=np.int64)
    valid = np.zeros((num_rows, max_rel), dtype=bool)
    for b, rel in enumerate(rel_lists):
        rel_idx[b, :len(rel)] = rel
        valid[b, :len(rel)] = True
    rel_scores = np.take_along_axis(block, rel_idx, axis=1)                      # [B, R]
    at_or_above = np.count_nonzero(block[:, None, :] >= rel_scores[:, :, None], axis=2)  # [B, R]
    tied_later_relevant = np.count_nonzero(
        (rel_scores[:, :, None] == rel_scores[:, None, :])
        & (rel_idx[:, None, :] > rel_idx[:, :, None]) & valid[:, None, :], axis=2)
    ranks = (at_or_above - tied_later_relevant).astype(np.int64)
    return [ranks[b, :len(rel)] for b, rel in enumerate(rel_lists)]


def relevant_ranks(scores: np.ndarray, relevant: Relevant, chunk_size: int = 256) -> list[np.ndarray]:
    """Exact 1-based full-pool ranks of each query's relevant candidates.

    scores: [Q, N] (any float dtype); relevant: see `Relevant`. Returns one int64 array per query,
    aligned with that query's relevant indices as given (not sorted). Memory per chunk is about
    chunk_size * max_relevant * N bytes."""
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [Q, N], got shape {scores.shape}")
    rel_lists = _as_relevant_lists(relevant, scores.shape[0], scores.shape[1])
    out: list[np.ndarray] = []
    for start in range(0, scores.shape[0], chunk_size):
        stop = start + chunk_size
        out.extend(_ranks_of_block(scores[start:stop], rel_lists[start:stop], start))
    return out


def relevant_ranks_from_embeddings(query_emb: np.ndarray, cand_emb: np.ndarray, relevant: Relevant,
                                   chunk_size: int = 256) -> list[np.ndarray]:
    """As `relevant_ranks` with scores = query_emb @ cand_emb.T, computed one chunk of queries at a
    time so the [Q, N] matrix is never held (13k x 13k float32 would be 680 MB)."""
    query_emb = np.ascontiguousarray(query_emb, dtype=np.float32)
    cand_emb = np.ascontiguousarray(cand_emb, dtype=np.float32)
    if query_emb.ndim != 2 or cand_emb.ndim != 2 or query_emb.shape[1] != cand_emb.shape[1]:
        raise ValueError(f"embedding shapes {query_emb.shape} and {cand_emb.shape} do not match")
    rel_lists = _as_relevant_lists(relevant, query_emb.shape[0], cand_emb.shape[0])
    out: list[np.ndarray] = []
    for start in range(0, query_emb.shape[0], chunk_size):
        stop = start + chunk_size
        block = query_emb[start:stop] @ cand_emb.T
        out.extend(_ranks_of_block(block, rel_lists[start:stop], start))
    return out


def _checked_ranks(ranks: np.ndarray) -> np.ndarray:
    ranks = np.asarray(ranks, dtype=np.int64).reshape(-1)
    if ranks.size == 0:
        raise ValueError("query has no relevant candidates; the metric is undefined")
    if ranks.min() < 1:
        raise ValueError("ranks are 1-based and must be >= 1")
    return ranks


def average_precision_from_ranks(ranks: np.ndarray) -> float:
    """AP = mean over relevant items of i / rank_i, ranks sorted ascending (sorted here), i = 1..R."""
    ranks = np.sort(_checked_ranks(ranks))
    if np.any(np.diff(ranks) == 0):
        raise ValueError("ranks of one query's relevant items must be distinct positions")
    return float(np.mean(np.arange(1, ranks.size + 1) / ranks))


def recall_at_k(ranks: np.ndarray, k: int) -> float:
    """LAReQA Recall@k: 1.0 if any relevant item is in the top k, else 0.0."""
    return float(_checked_ranks(ranks).min() <= k)


def fraction_recall_at_k(ranks: np.ndarray, k: int, num_relevant: int | None = None) -> float:
    """Share of relevant items ranked in the top k (TREC/MIRACL Recall@k). `ranks` may list only
    the retrieved relevant items; num_relevant (default len(ranks)) is the denominator."""
    ranks = np.asarray(ranks, dtype=np.int64).reshape(-1)
    total = ranks.size if num_relevant is None else num_relevant
    if total <= 0 or ranks.size > total:
        raise ValueError(f"need 0 < len(ranks)={ranks.size} <= num_relevant={total}")
    return float(np.count_nonzero(ranks <= k) / total)


def max_rank_distance(ranks: np.ndarray) -> int:
    """Language-bias rank distance: max(rank) - min(rank) over a query's relevant set."""
    ranks = _checked_ranks(ranks)
    return int(ranks.max() - ranks.min())


def per_query_rank_metrics(ranks: Sequence[np.ndarray], ks: Sequence[int] = (1, 10)) -> dict[str, np.ndarray]:
    """Per-query arrays: 'ap', 'recall@k' for each k, 'rank_distance' (mean them for the summary)."""
    out = {"ap": np.array([average_precision_from_ranks(r) for r in ranks])}
    for k in ks:
        out[f"recall@{k}"] = np.array([recall_at_k(r, k) for r in ranks])
    out["rank_distance"] = np.array([max_rank_distance(r) for r in ranks], dtype=np.float64)
    return out


def _gain_ranking(ranked_docids: Sequence[str], qrels_for_query: dict[str, int], k: int) -> np.ndarray:
    top = list(ranked_docids[:k])
    if len(set(top)) != len(top):
        raise ValueError("ranked docids contain duplicates")
    # TREC convention: only positive grades are relevant/gainful.
    return np.array([max(qrels_for_query.get(d, 0), 0) for d in top], dtype=np.float64)


def ndcg_at_k(ranked_docids: Sequence[str], qrels_for_query: dict[str, int], k: int = 10) -> float:
    """nDCG@k, trec_eval ndcg_cut: gain = grade, discount 1/log2(rank+1), ideal DCG from the qrels.
    0.0 when the query has no positive grade."""
    gains = _gain_ranking(ranked_docids, qrels_for_query, k)
    ideal = np.sort(np.array([g for g in qrels_for_query.values() if g > 0], dtype=np.float64))[::-1][:k]
    if ideal.size == 0:
        return 0.0
    dcg = float(np.sum(gains / np.log2(np.arange(2, gains.size + 2))))
    idcg = float(np.sum(ideal / np.log2(np.arange(2, ideal.size + 2))))
    return dcg / idcg


def mrr_at_k(ranked_docids: Sequence[str], qrels_for_query: dict[str, int], k: int = 10) -> float:
    """Reciprocal rank of the first positively graded document in the top k, else 0.0."""
    hits = np.flatnonzero(_gain_ranking(ranked_docids, qrels_for_query, k) > 0)
    return float(1.0 / (hits[0] + 1)) if hits.size else 0.0


def paired_bootstrap(a: np.ndarray, b: np.ndarray, n_samples: int = 1000, seed: int = 0,
                     ci: float = 0.95) -> dict[str, float]:
    """Paired bootstrap over queries of mean(a - b) (per-query metric values, same query order).

    low/high: percentile interval of the resampled mean differences. p_value (two-sided): twice
    the share of resamples whose mean difference is on the other side of 0 from the observed one
    (<= 0 when observed > 0, >= 0 when observed < 0), capped at 1; 1.0 when the observed mean is 0."""
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"need two non-empty arrays of equal length, got {a.size} and {b.size}")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("per-query values contain NaN or inf")
    if not 0 < ci < 1 or n_samples < 1:
        raise ValueError("need 0 < ci < 1 and n_samples >= 1")
    diff = a - b
    rng = np.random.default_rng(seed)
    means = np.empty(n_samples)
    # Resample in slabs so n_samples x n_queries indices never sit in memory at once.
    slab = max(1, 2_000_000 // diff.size)
    for start in range(0, n_samples, slab):
        stop = min(start + slab, n_samples)
        idx = rng.integers(0, diff.size, size=(stop - start, diff.size))
        means[start:stop] = diff[idx].mean(axis=1)
    observed = float(diff.mean())
    low, high = np.quantile(means, [(1 - ci) / 2, 1 - (1 - ci) / 2])
    if observed > 0:
        p_value = min(1.0, 2 * float(np.mean(means <= 0)))
    elif observed < 0:
        p_value = min(1.0, 2 * float(np.mean(means >= 0)))
    else:
        p_value = 1.0
    return {"mean_diff": observed, "low": float(low), "high": float(high), "p_value": p_value}
