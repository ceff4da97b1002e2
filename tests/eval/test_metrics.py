"""Metric definitions against scikit-learn, brute force and hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from raysys.eval.metrics import (average_precision_from_ranks, fraction_recall_at_k, max_rank_distance,
                                 mrr_at_k, ndcg_at_k, paired_bootstrap, per_query_rank_metrics,
                                 recall_at_k, relevant_ranks, relevant_ranks_from_embeddings)


def _tie_free_scores(rng, num_queries, num_candidates):
    # A random permutation of 0..N-1 per row plus jitter < 0.5: distinct even in float32.
    perm = np.argsort(rng.random((num_queries, num_candidates)), axis=1)
    scores = ((perm + 0.5 * rng.random(perm.shape)) / num_candidates).astype(np.float32)
    assert all(np.unique(row).size == num_candidates for row in scores)
    return scores


def _brute_force_ranks(row, rel):
    order = np.argsort(-row, kind="stable")
    position = np.empty_like(order)
    position[order] = np.arange(1, row.size + 1)
    return position[rel]


def test_ap_matches_sklearn_on_random_rows():
    rng = np.random.default_rng(0)
    scores = _tie_free_scores(rng, 300, 400)
    relevant = [rng.choice(400, size=rng.integers(1, 16), replace=False) for _ in range(300)]
    ranks = relevant_ranks(scores, relevant, chunk_size=37)
    for row, rel, r in zip(scores, relevant, ranks):
        y_true = np.zeros(row.size, dtype=int)
        y_true[rel] = 1
        assert average_precision_from_ranks(r) == pytest.approx(
            average_precision_score(y_true, row), abs=1e-9)


def test_ap_matches_sklearn_with_ties_to_non_relevant_only():
    # One relevant candidate tied with non-relevant ones: the pessimistic policy equals sklearn.
    row = np.array([0.9, 0.5, 0.5, 0.5, 0.1, 0.7], dtype=np.float32)
    rel = np.array([2, 4])
    ranks = relevant_ranks(row[None], [rel])[0]
    assert ranks.tolist() == [5, 6]
    y_true = np.isin(np.arange(row.size), rel).astype(int)
    assert average_precision_from_ranks(ranks) == pytest.approx(average_precision_score(y_true, row))


def test_tie_policy_among_relevant_candidates():
    # Scores 0.5 tied for columns 1 (non-rel), 2 (rel), 3 (rel): non-relevant first, then by column.
    row = np.array([[0.9, 0.5, 0.5, 0.5, 0.1]])
    assert relevant_ranks(row, [np.array([3, 2])])[0].tolist() == [4, 3]


def test_exact_ranks_far_beyond_top_k_match_argsort():
    rng = np.random.default_rng(1)
    scores = _tie_free_scores(rng, 8, 5000)
    relevant = []
    for row in scores:
        order = np.argsort(-row)
        relevant.append(order[[2999, 3001, 3500, 10]])  # deliberately ranked ~3000 and one high
    ranks = relevant_ranks(scores, relevant)
    for row, rel, r in zip(scores, relevant, ranks):
        assert r.tolist() == _brute_force_ranks(row, rel).tolist()
    assert ranks[0].tolist() == [3000, 3002, 3501, 11]


def test_csr_input_and_embedding_variant_agree():
    rng = np.random.default_rng(2)
    q, c = rng.standard_normal((50, 16)).astype(np.float32), rng.standard_normal((300, 16)).astype(np.float32)
    relevant = [rng.choice(300, size=rng.integers(0, 6), replace=False) for _ in range(50)]
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in relevant])])
    csr = (indptr, np.concatenate(relevant))
    scores = q @ c.T
    from_list = relevant_ranks(scores, relevant)
    from_csr = relevant_ranks(scores, csr, chunk_size=7)
    from_emb = relevant_ranks_from_embeddings(q, c, csr, chunk_size=11)
    for a, b, e, rel, row in zip(from_list, from_csr, from_emb, relevant, scores):
        assert a.tolist() == b.tolist() == e.tolist() == _brute_force_ranks(row, rel).tolist()


def test_bad_inputs_are_rejected():
    scores = np.zeros((2, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="out of range"):
        relevant_ranks(scores, [np.array([4]), np.array([0])])
    with pytest.raises(ValueError, match="duplicate"):
        relevant_ranks(scores, [np.array([1, 1]), np.array([0])])
    with pytest.raises(ValueError, match="2 queries|has 1 queries"):
        relevant_ranks(scores, [np.array([1])])
    with pytest.raises(ValueError, match="NaN"):
        relevant_ranks(np.array([[0.1, np.nan]]), [np.array([0])])
    with pytest.raises(ValueError, match="no relevant"):
        average_precision_from_ranks(np.array([], dtype=int))


def test_recall_and_rank_distance_on_hand_made_rankings():
    ranks = np.array([3, 12, 40])
    assert recall_at_k(ranks, 1) == 0.0
    assert recall_at_k(ranks, 3) == 1.0
    assert recall_at_k(ranks, 10) == 1.0
    assert fraction_recall_at_k(ranks, 12) == pytest.approx(2 / 3)
    assert fraction_recall_at_k(ranks, 12, num_relevant=4) == pytest.approx(0.5)
    assert max_rank_distance(ranks) == 37
    assert max_rank_distance(np.array([5])) == 0
    assert average_precision_from_ranks(np.array([40, 3, 12])) == pytest.approx((1 / 3 + 2 / 12 + 3 / 40) / 3)
    m = per_query_rank_metrics([np.array([1, 4]), np.array([11])], ks=(1, 10))
    assert m["recall@1"].tolist() == [1.0, 0.0]
    assert m["recall@10"].tolist() == [1.0, 0.0]
    assert m["rank_distance"].tolist() == [3.0, 0.0]
    assert m["ap"] == pytest.approx([(1 + 2 / 4) / 2, 1 / 11])


def test_ndcg_and_mrr_hand_computed():
    qrels = {"a": 2, "b": 1, "c": 0, "d": 1}
    ranking = ["x", "b", "a", "c", "y"]
    dcg = 1 / np.log2(3) + 2 / np.log2(4)
    idcg = 2 / np.log2(2) + 1 / np.log2(3) + 1 / np.log2(4)
    assert ndcg_at_k(ranking, qrels, k=10) == pytest.approx(dcg / idcg)
    assert ndcg_at_k(ranking, qrels, k=2) == pytest.approx((1 / np.log2(3)) / (2 + 1 / np.log2(3)))
    assert ndcg_at_k(["a", "b", "d"], qrels) == pytest.approx(1.0)
    assert ndcg_at_k(ranking, {"c": 0}) == 0.0
    assert mrr_at_k(ranking, qrels, k=10) == pytest.approx(0.5)
    assert mrr_at_k(ranking, qrels, k=1) == 0.0
    assert mrr_at_k(["c", "y"], qrels) == 0.0


def test_bootstrap_identical_runs():
    a = np.random.default_rng(3).random(200)
    out = paired_bootstrap(a, a.copy())
    assert out["mean_diff"] == 0.0
    assert out["low"] <= 0.0 <= out["high"]
    assert out["p_value"] == 1.0


def test_bootstrap_clearly_better_run_excludes_zero():
    rng = np.random.default_rng(4)
    b = rng.random(300)
    a = np.clip(b + 0.1 + 0.05 * rng.standard_normal(300), 0, None)
    out = paired_bootstrap(a, b, n_samples=2000, seed=1)
    assert 0 < out["low"] <= out["mean_diff"] <= out["high"]
    assert out["p_value"] < 0.01
    flipped = paired_bootstrap(b, a, n_samples=2000, seed=1)
    assert flipped["high"] < 0 and flipped["mean_diff"] == pytest.approx(-out["mean_diff"])
    assert paired_bootstrap(a, b, n_samples=2000, seed=1) == out  # seeded, deterministic


def test_bootstrap_noise_only_gives_large_p():
    rng = np.random.default_rng(5)
    a, b = rng.random(200), rng.random(200)
    out = paired_bootstrap(a, b)
    assert out["low"] < 0 < out["high"]
    assert out["p_value"] > 0.05
