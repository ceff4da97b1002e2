"""Approximate top-k (raysys.eval.approximate): FAISS index_factory shards over stored files, and
the recall against exact search that is reported with them."""

from __future__ import annotations

import numpy as np
import pytest

from raysys.config import Config
from raysys.errors import ConfigError
from raysys.eval.approximate import approximate_top_k, check_ann_index, recall_at
from raysys.eval.run import search_stored
from tests.eval.test_shards import store

PLAN = {"num_shards": 2, "use_gpu": False, "cpus_per_shard": 1, "in_process": True}


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """2,000 random unit vectors in uneven files (a query's neighbours spread over many IVF lists)
    and 40 random queries."""
    rng = np.random.default_rng(3)
    corpus = rng.standard_normal((2000, 16)).astype(np.float32)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    queries = rng.standard_normal((40, 16)).astype(np.float32)
    tmp = tmp_path_factory.mktemp("ann")
    return store(tmp, "corpus", corpus, [700, 900, 400]), store(tmp, "topics", queries.astype(np.float32), [25, 15])


def test_visiting_every_list_is_exact_and_one_list_is_not(stored):
    corpus_files, query_files = stored
    exact_scores, exact_ids = search_stored(corpus_files, query_files, 20, PLAN, block=16)
    scores, ids, report = approximate_top_k(corpus_files, query_files, 20, PLAN, "IVF8,Flat", "nprobe=8",
                                            recall_queries=40, block=16)
    assert np.array_equal(ids, exact_ids) and np.allclose(scores, exact_scores, atol=1e-6)
    assert report == {"index": "IVF8,Flat", "params": "nprobe=8", "sampled_queries": 40,
                      "recall@10": 1.0, "recall@20": 1.0}
    _, ids, report = approximate_top_k(corpus_files, query_files, 20, PLAN, "IVF8,Flat", "nprobe=1",
                                       recall_queries=10, block=16)
    assert report["sampled_queries"] == 10 and report["recall@20"] < 1.0
    sample = np.linspace(0, 39, 10).round().astype(int)
    assert report["recall@20"] == pytest.approx(recall_at(ids[sample], exact_ids[sample], 20))


def test_hnsw_through_index_shard_actors(ray_local, stored):
    corpus_files, query_files = stored
    _, exact_ids = search_stored(corpus_files, query_files, 10, PLAN)
    _, ids, report = approximate_top_k(corpus_files, query_files, 10, {**PLAN, "in_process": False}, "HNSW16",
                                       "efSearch=64", recall_queries=40)
    assert report["recall@10"] == pytest.approx(recall_at(ids, exact_ids, 10)) and report["recall@10"] > 0.9


def test_recall_counts_shared_ids():
    approximate = np.array([[1, 2, 3], [4, 5, -1]])
    exact = np.array([[3, 2, 9], [4, 5, 6]])
    assert recall_at(approximate, exact, 3) == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert recall_at(approximate, exact, 1) == pytest.approx(0.5)


def test_a_bad_index_string_is_one_line_naming_the_field():
    with pytest.raises(ConfigError) as err:
        check_ann_index("IVF8,PQ5", 16)  # 16 dimensions do not split into 5 sub-quantizers
    assert err.value.field == "eval.ann_index" and "\n" not in str(err.value)
    check_ann_index("IVF8,PQ4", 16)
    with pytest.raises(ConfigError, match="below 1"):
        Config.from_yaml(None, ["eval.ann_recall_queries=0"])


def test_fp16_storage_is_for_exact_shards_and_an_unknown_storage_is_named():
    with pytest.raises(ConfigError) as err:
        Config.from_yaml(None, ["eval.index_dtype=fp16", "eval.ann_index=HNSW32"])
    assert err.value.field == "eval.index_dtype" and "SQfp16" in str(err.value)
    with pytest.raises(ConfigError, match="unknown storage 'int4'"):
        Config.from_yaml(None, ["eval.index_dtype=int4"])
    assert Config.from_yaml(None, ["eval.index_dtype=fp16"]).eval.index_dtype == "fp16"
