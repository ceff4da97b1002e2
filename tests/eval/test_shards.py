"""Index shards (in-process and Ray actors over stored files) against a brute-force reference:
ranks, metrics and top-k identical (==), with 1, 2 and 3 uneven shards and exact score ties."""

from __future__ import annotations

import numpy as np
import pytest

from raysys.config import Config
from raysys.data.lareqa import read_lareqa_dir
from raysys.data.split import split_groups
from raysys.eval import encode
from raysys.eval.lareqa import KS, evaluate_lareqa, evaluate_lareqa_stored, summarise
from raysys.eval.metrics import per_query_rank_metrics, relevant_ranks
from raysys.eval.ranking import LocalShards, merge_top_k, parts_for_range, rank_block
from raysys.eval.shards import IndexShard, exact_scores
from tests.eval.lareqa_fixture import write_synthetic_lareqa

LANGS = ("ar", "de", "en", "es")
SHARDINGS = [None, [0, 7], [0, 1, 30], [0, 23, 24]]  # None: 1 shard; else the inner bounds (uneven)


def reference_ranks(scores: np.ndarray, rel: np.ndarray, c_langs: np.ndarray):
    """The tie rule written out per candidate: equal scores put non-relevant first, then relevant
    by ascending id; and within one language, the query's one gold of that language."""
    multi = np.array([int((scores >= scores[d]).sum()) - sum(1 for e in rel if e > d and scores[e] == scores[d])
                      for d in rel])
    per_lang = {str(c_langs[d]): int((scores[c_langs == c_langs[d]] >= scores[d]).sum()) for d in rel}
    return multi, per_lang


def brute_force(corpus, q: np.ndarray, c: np.ndarray, top_k: int) -> dict:
    """The LAReQA result from the full score matrix, one query at a time: ranks from the
    reproducible float64 scores (what shards decide near-ties by), the top-k from float32 ones."""
    float32_scores = q.astype(np.float32) @ c.astype(np.float32).T
    scores = np.stack([exact_scores(np.broadcast_to(row, c.shape), c) for row in q])
    q_langs = np.array(corpus.questions.column("lang").to_pylist())
    q_ids = np.array(corpus.questions.column("id").to_pylist())
    c_langs = np.array(corpus.candidates.column("lang").to_pylist())
    gold = corpus.relevant_by_question()
    multi, per_lang = [], []
    for i, qid in enumerate(q_ids):
        m, p = reference_ranks(scores[i], np.array(sorted(gold[qid].values())), c_langs)
        multi.append(m)
        per_lang.append(p)
    pairs, multi_out = {}, {}
    for x in [lang for lang in corpus.languages if (q_langs == lang).any()]:
        rows = np.flatnonzero(q_langs == x)
        for y in corpus.languages:
            keep = [i for i in rows if y in per_lang[i]]
            if keep:
                v = per_query_rank_metrics([np.array([per_lang[i][y]]) for i in keep], KS)
                pairs[f"{x}-{y}"] = {"map": float(v["ap"].mean()), "recall@1": float(v["recall@1"].mean()),
                                     "recall@10": float(v["recall@10"].mean()), "num_queries": len(keep)}
        v = per_query_rank_metrics([multi[i] for i in rows], KS)
        multi_out[x] = {"map": float(v["ap"].mean()), "recall@1": float(v["recall@1"].mean()),
                        "recall@10": float(v["recall@10"].mean()),
                        "rank_distance": float(v["rank_distance"].mean()), "num_queries": len(rows)}
    k = min(top_k, len(c))
    order = np.lexsort((np.broadcast_to(np.arange(len(c)), scores.shape), -float32_scores), axis=-1)[:, :k]
    return {"summary": summarise(pairs, multi_out), "pairs": pairs, "multilingual_per_language": multi_out,
            "top_ids": order, "multi_ranks": multi}


def assert_same(result: dict, expected: dict):
    assert result["pairs"] == expected["pairs"]
    assert result["multilingual_per_language"] == expected["multilingual_per_language"]
    assert result["summary"] == expected["summary"]
    np.testing.assert_array_equal(result["top_k"]["ids"], expected["top_ids"])


@pytest.fixture(scope="module")
def mlqa_like(tmp_path_factory):
    """4 languages; each question exists in 2-4 of them (MLQA-R's partial parallelism)."""
    rng = np.random.default_rng(1)
    qids = [f"a{a}p{p}s{s}" for a in range(3) for p in range(2) for s in range(3)]
    missing = set()
    for qid in qids:
        for lang in rng.choice(LANGS, size=int(rng.integers(0, 3)), replace=False):
            missing.add((str(lang), qid))
    root = write_synthetic_lareqa(tmp_path_factory.mktemp("mlqa"), articles=3, langs=LANGS, missing=missing)
    corpus = read_lareqa_dir(root)
    sizes = [len(v) for v in corpus.relevant_by_question().values()]
    assert min(sizes) == 2 and max(sizes) == 4
    return corpus


def tied_embeddings(corpus, rng):
    """Dyadic values in a small dimension: every product is exact (no rounding anywhere), many
    scores tie exactly, and some candidates duplicate a gold sentence (relevant-relevant ties)."""
    q = rng.integers(-2, 3, size=(corpus.questions.num_rows, 6)).astype(np.float32) / 4
    c = rng.integers(-2, 3, size=(corpus.candidates.num_rows, 6)).astype(np.float32) / 4
    gold = sorted({g for rel in corpus.relevant_by_question().values() for g in rel.values()})
    c[gold[1::3]] = c[gold[0::3][:len(gold[1::3])]]  # pairs of gold sentences with equal vectors
    return q, c


@pytest.mark.parametrize("inner", SHARDINGS)
@pytest.mark.parametrize("kind", ["ties", "random"])
def test_in_process_shards_equal_brute_force(mlqa_like, inner, kind):
    rng = np.random.default_rng(7)
    if kind == "ties":
        q, c = tied_embeddings(mlqa_like, rng)
    else:
        q = rng.standard_normal((mlqa_like.questions.num_rows, 16)).astype(np.float32)
        c = rng.standard_normal((mlqa_like.candidates.num_rows, 16)).astype(np.float32)
    n = len(c)
    bounds = None if inner is None else inner + [n]
    result = evaluate_lareqa(mlqa_like, q, c, top_k=20, chunk_size=5, shard_bounds=bounds)
    assert_same(result, brute_force(mlqa_like, q, c, top_k=20))


def test_rank_block_counts_across_column_chunks_and_ties():
    """Many exact ties, relevant sets of 1-5, column chunks smaller than a shard: the summed
    counts equal metrics.relevant_ranks (today's single-process rule) on the full matrix."""
    rng = np.random.default_rng(3)
    c = rng.integers(-1, 2, size=(103, 3)).astype(np.float32)
    q = rng.integers(-1, 2, size=(40, 3)).astype(np.float32)
    relevant = [rng.choice(103, size=int(rng.integers(1, 6)), replace=False) for _ in range(40)]
    groups = rng.integers(0, 3, size=103)
    shards = LocalShards(c, [0, 10, 11, 103], groups, count_chunk=7)
    got = rank_block(shards, q, relevant, k=15)
    full = q @ c.T
    for a, b in zip(got.ranks, relevant_ranks(full, relevant)):
        np.testing.assert_array_equal(a, b)
    for i, rel in enumerate(relevant):
        expected = [int((full[i][groups == groups[d]] >= full[i, d]).sum()) for d in rel]
        assert got.group_ranks[i].tolist() == expected
    order = np.lexsort((np.broadcast_to(np.arange(103), full.shape), -full), axis=-1)[:, :15]
    np.testing.assert_array_equal(got.top_ids, order)


def test_merge_top_k_pads_and_breaks_ties_by_id():
    scores, ids = merge_top_k([np.array([[1.0, 0.5]], np.float32), np.array([[1.0]], np.float32)],
                              [np.array([[7, 3]]), np.array([[2]])], k=4)
    assert ids.tolist() == [[2, 7, 3, -1]] and np.isneginf(scores[0, 3])


def test_parts_for_range_spans_files():
    files = [("a", 4), ("b", 4), ("c", 2)]
    assert parts_for_range(files, 3, 9) == [("a", 3, 4), ("b", 0, 4), ("c", 0, 1)]
    assert parts_for_range(files, 0, 10) == [("a", 0, 4), ("b", 0, 4), ("c", 0, 2)]


def store(tmp_path, name: str, emb: np.ndarray, sizes: list[int]) -> list[tuple[str, int]]:
    """Embedding files as the encoder writes them (uneven sizes), through the storage layer."""
    files, start = [], 0
    for i, size in enumerate(sizes):
        path = str(tmp_path / f"{name}-{i:05d}.npz")
        encode._write_shard(path, np.arange(start, start + size), emb[start:start + size])
        files.append((path, size))
        start += size
    assert start == len(emb)
    return files


@pytest.mark.parametrize("in_process", [False, True], ids=["actors", "in-process"])
@pytest.mark.parametrize("inner", SHARDINGS)
def test_stored_shards_equal_brute_force(ray_local, mlqa_like, tmp_path, inner, in_process):
    q, c = tied_embeddings(mlqa_like, np.random.default_rng(11))
    n, nq = len(c), len(q)
    cand_files = store(tmp_path, "candidates", c, [5, n - 5 - 9, 9])  # shards cut across files
    query_files = store(tmp_path, "queries", q, [nq - 3, 3])
    bounds = None if inner is None else inner + [n]
    result = evaluate_lareqa_stored(mlqa_like, query_files, cand_files, top_k=20, chunk_size=8, shard_bounds=bounds,
                                    in_process=in_process)
    assert_same(result, brute_force(mlqa_like, q, c, top_k=20))


def test_xquad_r_test_split(ray_local, xquad_r_dir, tmp_path):
    """The real XQuAD-R test articles (11 relevant per query), random float embeddings, 3 actors."""
    corpus = read_lareqa_dir(xquad_r_dir, Config().data.languages)
    data = Config().data
    corpus = corpus.subset(split_groups(corpus.groups, data.validation_fraction, data.test_fraction)["test"])
    rng = np.random.default_rng(0)
    q = rng.standard_normal((corpus.questions.num_rows, 16)).astype(np.float32)
    c = rng.standard_normal((corpus.candidates.num_rows, 16)).astype(np.float32)
    n = len(c)
    cand_files = store(tmp_path, "candidates", c, [1000, 1000, n - 2000])
    query_files = store(tmp_path, "queries", q, [len(q)])
    result = evaluate_lareqa_stored(corpus, query_files, cand_files, top_k=10, shard_bounds=[0, 700, 1900, n])
    expected = brute_force(corpus, q, c, top_k=10)
    assert result["summary"]["multilingual"]["num_pairs"] == 11
    assert_same(result, expected)


@pytest.mark.parametrize("in_process", [False, True], ids=["actors", "in-process"])
@pytest.mark.parametrize("kind", ["ties", "random"])
def test_fp16_storage_ranks_exactly_the_rounded_candidates(ray_local, mlqa_like, tmp_path, kind, in_process):
    """eval.index_dtype=fp16: the shards keep half-precision candidates, and every rank, metric and
    top-k equals the brute-force reference over those rounded candidates (fp32 queries)."""
    rng = np.random.default_rng(3)
    if kind == "ties":  # dyadic values: exact in fp16 too, so the tie rule is what is checked
        q, c = tied_embeddings(mlqa_like, rng)
    else:
        q = rng.standard_normal((mlqa_like.questions.num_rows, 16)).astype(np.float32)
        c = rng.standard_normal((mlqa_like.candidates.num_rows, 16)).astype(np.float32)
    rounded = c.astype(np.float16).astype(np.float32)
    assert (kind == "ties") == np.array_equal(rounded, c)
    n = len(c)
    cand_files = store(tmp_path, "candidates", c, [5, n - 5 - 9, 9])
    query_files = store(tmp_path, "queries", q, [len(q)])
    result = evaluate_lareqa_stored(mlqa_like, query_files, cand_files, top_k=20, chunk_size=8, shard_bounds=[0, 7, n],
                                    in_process=in_process, storage_dtype="fp16")
    assert_same(result, brute_force(mlqa_like, q, rounded, top_k=20))
    assert result["index_dtype"] == "fp16"
    if kind == "random":  # the fp32 figures are another result: the rounding is not hidden
        fp32 = evaluate_lareqa_stored(mlqa_like, query_files, cand_files, top_k=20, shard_bounds=[0, 7, n],
                                      in_process=True)
        assert "index_dtype" not in fp32 and not np.array_equal(fp32["top_k"]["scores"], result["top_k"]["scores"])


def test_an_fp16_shard_holds_half_the_bytes_and_refuses_values_beyond_its_range():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((300, 8)).astype(np.float32)
    shard = IndexShard(100, vectors=vectors, storage_dtype="fp16", count_chunk=64)
    assert shard.vectors.dtype == np.float16 and shard.vectors.nbytes == vectors.nbytes // 2
    assert shard.index is None and shard.info()["storage_dtype"] == "fp16"
    queries = rng.standard_normal((5, 8)).astype(np.float32)
    scores, ids = shard.search(queries, 10)  # the top-k across count chunks, ties by id
    full = (queries.astype(np.float64) @ vectors.astype(np.float16).astype(np.float64).T).astype(np.float32)
    expected = np.stack([np.lexsort((np.arange(len(vectors)), -row))[:10] for row in full])
    assert np.array_equal(ids, expected + 100) and np.array_equal(scores, np.take_along_axis(full, expected, 1))
    with pytest.raises(ValueError, match="float16's range"):
        IndexShard(0, vectors=np.full((2, 8), 1e5, np.float32), storage_dtype="fp16")
    with pytest.raises(ValueError, match="storage_dtype"):
        IndexShard(0, vectors=vectors, storage_dtype="bf16")


@pytest.mark.parametrize("storage_dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("in_process", [False, True], ids=["actors", "in-process"])
def test_search_stored_equals_a_brute_force_top_k(ray_local, tmp_path, in_process, storage_dtype):
    """MIRACL-style top-k (raysys.eval.run.search_stored): stored corpus files loaded by 3 uneven
    index shards, queries streamed in blocks; exactly the brute-force top-k with ties by id.
    Vectors on a coarse grid make every score exact, so ties are real and plenty."""
    from raysys.eval.run import search_stored

    rng = np.random.default_rng(5)
    corpus = rng.integers(-2, 3, size=(41, 8)).astype(np.float32) / 4
    queries = rng.integers(-2, 3, size=(13, 8)).astype(np.float32) / 4
    corpus_files = store(tmp_path, "corpus", corpus, [10, 25, 6])
    query_files = store(tmp_path, "topics", queries, [9, 4])
    plan = {"num_shards": 3, "use_gpu": False, "cpus_per_shard": 1, "in_process": in_process,
            "storage_dtype": storage_dtype}  # grid values: exact in fp16, so the same answer
    scores, ids = search_stored(corpus_files, query_files, k=7, plan=plan, block=5)
    full = queries @ corpus.T
    expected = np.stack([np.lexsort((np.arange(len(corpus)), -row))[:7] for row in full])
    assert np.array_equal(ids, expected)
    assert np.array_equal(scores, np.take_along_axis(full, expected, 1))


class RoundsOneColumnLower(IndexShard):
    """Test fixture: the count pass's chunk GEMM rounds candidate 2's product one ulp lower than
    the small GEMM of round 1, as OpenBLAS does for some shapes."""

    def _scores(self, q, cols):
        scores = super()._scores(q, cols)
        if isinstance(cols, slice) and cols.start <= 2 - self.first_id < cols.stop:
            scores[:, 2 - self.first_id - cols.start] = np.nextafter(scores[:, 2 - self.first_id - cols.start], -np.inf)
        return scores


def test_relevant_candidates_never_share_a_rank_when_a_product_rounds_differently():
    """Relevant 1 and 2 are the same vector, and so is non-relevant 4: round 1 scores both relevant
    0.5, the count pass scores candidate 2 one ulp lower. Ranks follow the tie rule on the round-1
    scores (non-relevant 4 first, then 1, then 2), distinct, on one shard and across two."""
    candidates = np.array([[1.0, 0.0], [0.5, 0.0], [0.5, 0.0], [0.25, 0.0], [0.5, 0.0]], np.float32)
    query = np.array([[1.0, 0.0]], np.float32)
    for bounds in ([0, 5], [0, 2, 5]):
        shards = LocalShards.__new__(LocalShards)
        shards.bounds = np.array(bounds)
        shards.shards = [RoundsOneColumnLower(lo, vectors=candidates[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]
        got = rank_block(shards, query, [np.array([1, 2])], k=5)
        assert got.ranks[0].tolist() == [3, 4], bounds
        assert got.group_ranks[0].tolist() == [4, 4], bounds  # one group: every score >= 0.5 counts


class RoundsColumnsApart(IndexShard):
    """Test fixture: the count pass's chunk GEMM rounds the products of the given candidates
    (global rows) one ulp up or down, as another GEMM shape may; round 1 is left exact."""
    nudges: dict[int, float] = {}

    def _scores(self, q, cols):
        scores = super()._scores(q, cols)
        if isinstance(cols, slice):
            for row, direction in self.nudges.items():
                if cols.start <= row - self.first_id < cols.stop:
                    col = row - self.first_id - cols.start
                    scores[:, col] = np.nextafter(scores[:, col], direction)
        return scores


def shards_of(shard_class, candidates: np.ndarray, bounds: list[int], groups=None, count_chunk: int = 32768):
    shards = LocalShards.__new__(LocalShards)
    shards.bounds = np.array(bounds)
    shards.shards = [shard_class(lo, vectors=candidates[lo:hi], count_chunk=count_chunk,
                                 groups=None if groups is None else groups[lo:hi])
                     for lo, hi in zip(bounds[:-1], bounds[1:])]
    return shards


@pytest.mark.parametrize("direction", [-np.inf, np.inf])
def test_a_non_relevant_tie_keeps_its_rank_when_its_product_rounds_one_ulp_apart(direction):
    """Non-relevant 2 has relevant 1's vector: an exact tie, which ranks it first (rank of 1 = 3).
    A count pass that rounds 2's product one ulp lower would rank it below, one ulp higher above:
    the exact comparison keeps the tie either way, on one shard and across two."""
    candidates = np.array([[1.0, 0.0], [0.3, 0.1], [0.3, 0.1], [0.2, 0.0]], np.float32)
    query = np.array([[0.7, 0.3]], np.float32)
    RoundsColumnsApart.nudges = {2: direction}
    for bounds in ([0, 4], [0, 2, 4], [0, 1, 2, 4]):
        got = rank_block(shards_of(RoundsColumnsApart, candidates, bounds), query, [np.array([1])], k=4)
        assert got.ranks[0].tolist() == [3], (bounds, direction)
        assert got.group_ranks[0].tolist() == [3], (bounds, direction)


def test_ranks_are_the_same_for_every_sharding_and_chunking():
    """Random float32 embeddings (products round), many near-ties (candidates that are a relevant
    one plus a tiny perturbation, and exact copies): every sharding and column chunking gives
    the ranks of the reproducible float64 scores (shards.exact_scores on the full matrix)."""
    rng = np.random.default_rng(11)
    c = rng.standard_normal((90, 48)).astype(np.float32)
    c[60:75] = c[0:15] + (rng.standard_normal((15, 48)) * 1e-7).astype(np.float32)  # within an ulp or so
    c[75:90] = c[15:30]  # exact copies: ties in every arithmetic
    q = rng.standard_normal((25, 48)).astype(np.float32)
    relevant = [rng.choice(30, size=int(rng.integers(1, 4)), replace=False) for _ in range(25)]
    groups = rng.integers(0, 3, size=90)
    exact = exact_scores(np.repeat(q, 90, axis=0), np.tile(c, (25, 1))).reshape(25, 90)
    expected = relevant_ranks(exact, relevant)
    for bounds, chunk in (([0, 90], 32768), ([0, 45, 90], 7), ([0, 1, 61, 90], 13), ([0, 30, 31, 75, 90], 4)):
        got = rank_block(shards_of(IndexShard, c, bounds, groups, count_chunk=chunk), q, relevant, k=10)
        for i, rel in enumerate(relevant):
            np.testing.assert_array_equal(got.ranks[i], expected[i], err_msg=str((bounds, chunk, i)))
            group_expected = [int((exact[i][groups == groups[d]] >= exact[i, d]).sum()) for d in rel]
            assert got.group_ranks[i].tolist() == group_expected, (bounds, chunk, i)


def test_exact_scores_depend_on_the_vectors_only():
    rng = np.random.default_rng(5)
    q, v = rng.standard_normal((50, 384)).astype(np.float32), rng.standard_normal((50, 384)).astype(np.float32)
    alone = np.array([exact_scores(q[i:i + 1], v[i:i + 1])[0] for i in range(50)])
    assert np.array_equal(exact_scores(q, v), alone)
    assert np.array_equal(exact_scores(q[::-1], v[::-1])[::-1], alone)
    import math

    exact = np.array([math.fsum((a.astype(np.float64) * b).tolist()) for a, b in zip(q, v)])
    assert np.abs(alone - exact).max() <= 384 * 2.0 ** -53 * np.linalg.norm(q, axis=1).max() * np.linalg.norm(v, axis=1).max()
