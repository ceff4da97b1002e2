"""Sharded FAISS search against one flat index and brute force."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from raysys.eval.index import ShardedIndex
from raysys.eval.metrics import relevant_ranks


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((1003, 32)).astype(np.float32)
    queries = rng.standard_normal((57, 32)).astype(np.float32)
    ids = rng.permutation(10_000)[:1003].astype(np.int64) + 5  # arbitrary, non-contiguous ids
    return emb, queries, ids


@pytest.mark.parametrize("num_shards", [1, 2, 3, 7, 16])
def test_sharded_search_equals_single_flat_index(data, num_shards):
    emb, queries, ids = data
    flat = faiss.IndexFlatIP(emb.shape[1])
    flat.add(emb)
    ref_scores, ref_pos = flat.search(queries, 50)
    index = ShardedIndex(emb, ids, num_shards=num_shards)
    assert index.num_shards == num_shards and not index.on_gpu
    sizes = np.diff(index.shard_bounds)
    assert sizes.sum() == emb.shape[0] and sizes.max() - sizes.min() <= 1
    scores, got_ids = index.search(queries, 50)
    np.testing.assert_array_equal(got_ids, ids[ref_pos])
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)


def test_k_larger_than_shards_and_pool(data):
    emb, queries, _ = data
    index = ShardedIndex(emb[:10], num_shards=3)  # shard sizes 3, 3, 4 < k
    scores, ids = index.search(queries[:4], 12)
    brute = queries[:4] @ emb[:10].T
    np.testing.assert_array_equal(ids[:, :10], np.argsort(-brute, axis=1, kind="stable"))
    assert (ids[:, 10:] == -1).all() and np.isneginf(scores[:, 10:]).all()


def test_ties_broken_by_ascending_id():
    emb = np.ones((6, 4), dtype=np.float32)  # every candidate scores the same
    index = ShardedIndex(emb, np.array([50, 40, 30, 20, 10, 60]), num_shards=3)
    _, ids = index.search(np.ones((1, 4), dtype=np.float32), 4)
    assert ids.tolist() == [[10, 20, 30, 40]]


def test_score_all_and_exact_ranks(data):
    emb, queries, ids = data
    index = ShardedIndex(emb, ids, num_shards=4)
    full = index.score_all(queries, chunk_size=10)
    np.testing.assert_allclose(full, queries @ emb.T, rtol=1e-5, atol=1e-5)
    # Ranks beyond the searched k come from the full scores, and agree with search where it reaches.
    _, top = index.search(queries, 20)
    id_to_col = {int(i): c for c, i in enumerate(ids)}
    cols = [np.array([id_to_col[int(top[q, 4])], int(np.argsort(-full[q])[700])]) for q in range(len(queries))]
    for q, r in enumerate(relevant_ranks(full, cols)):
        assert r.tolist() == [5, 701]


def test_save_load_roundtrip(data, tmp_path):
    emb, queries, ids = data
    index = ShardedIndex(emb, ids, num_shards=3)
    index.save(tmp_path / "idx")
    loaded = ShardedIndex.load(tmp_path / "idx", num_threads=1)
    assert loaded.num_shards == 3
    np.testing.assert_array_equal(loaded.shard_bounds, index.shard_bounds)
    for a, b in zip(index.search(queries, 30), loaded.search(queries, 30)):
        np.testing.assert_array_equal(a, b)


def test_bad_arguments(data):
    emb, queries, _ = data
    with pytest.raises(ValueError, match="num_shards"):
        ShardedIndex(emb[:3], num_shards=4)
    with pytest.raises(ValueError, match="ids"):
        ShardedIndex(emb, np.arange(5))
    index = ShardedIndex(emb)
    with pytest.raises(ValueError, match="queries"):
        index.search(queries[:, :8], 5)
    with pytest.raises(ValueError, match="k must be"):
        index.search(queries, 0)
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        with pytest.raises(RuntimeError, match="GPU"):
            ShardedIndex(emb, use_gpu=True)
