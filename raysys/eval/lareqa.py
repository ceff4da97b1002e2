"""LAReQA protocol: monolingual, cross-lingual and multilingual settings over language pairs.

Given embeddings of a corpus' questions and candidate sentences:
- pair (X, Y): queries of X ranked against the candidates of Y only; X = Y is monolingual,
  X != Y cross-lingual; a query with no gold sentence in Y is skipped for that pair (MLQA-R);
- multilingual: queries of X against the pool of every language's candidates, relevant = the
  gold sentence in every language; also the maximum rank distance (language bias).
Ranks are exact over the full pool, from counts that the index shards return per relevant
candidate (`raysys.eval.ranking`): one pass over the queries gives the multilingual rank of each
gold sentence and its rank among its own language's candidates (= its pair's rank). The shards
also give the multilingual top-k list.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np

from raysys.data.lareqa import LareqaCorpus
from raysys.eval.metrics import paired_bootstrap, per_query_rank_metrics
from raysys.eval.ranking import (LocalShards, array_blocks, balanced_bounds, open_shards, rank_block,
                                 stored_blocks)

KS = (1, 10)
METRICS = ("map", "recall@1", "recall@10")


def evaluate_lareqa(corpus: LareqaCorpus, query_emb: np.ndarray, cand_emb: np.ndarray, *,
                    num_shards: int = 1, top_k: int = 100, chunk_size: int = 512,
                    shard_bounds: Sequence[int] | None = None) -> dict:
    """In-memory embeddings (row i = cand_id i), shards in this process.
    Returns {'summary', 'pairs', 'multilingual_per_language', 'per_query', 'top_k'}."""
    bounds = balanced_bounds(len(cand_emb), num_shards) if shard_bounds is None else shard_bounds
    shards = LocalShards(cand_emb, bounds, _candidate_groups(corpus))
    return _evaluate(corpus, shards, array_blocks(query_emb, chunk_size), top_k)


def evaluate_lareqa_stored(corpus: LareqaCorpus, query_files: Sequence[tuple[str, int]],
                           cand_files: Sequence[tuple[str, int]], *, num_shards: int = 1, top_k: int = 100,
                           chunk_size: int = 512, use_gpu: bool = False, cpus_per_shard: int = 1,
                           shard_bounds: Sequence[int] | None = None, in_process: bool = False,
                           storage_dtype: str = "fp32") -> dict:
    """Embeddings in storage [(uri, rows)] (`raysys.eval.encode.encode_to_storage`): one Ray actor
    per index shard loads its candidate range (`in_process`: the same shards in this process, for
    small pools); the driver streams the query files block by block. storage_dtype="fp16": the
    shards keep the candidates in half precision, and the result records it (`index_dtype`)."""
    total = sum(n for _, n in cand_files)
    bounds = balanced_bounds(total, num_shards) if shard_bounds is None else shard_bounds
    shards = open_shards(cand_files, bounds, _candidate_groups(corpus), use_gpu=use_gpu,
                         cpus_per_shard=cpus_per_shard, in_process=in_process, storage_dtype=storage_dtype)
    try:
        result = _evaluate(corpus, shards, stored_blocks(query_files, chunk_size), top_k)
    finally:
        shards.close()
    if storage_dtype != "fp32":
        result["index_dtype"] = storage_dtype  # not the fp32 figures: said in metrics.json and summary.md
    return result


def _candidate_groups(corpus: LareqaCorpus) -> np.ndarray:
    """Language code per candidate row (the shards count within a language for the pairs)."""
    code = {lang: i for i, lang in enumerate(corpus.languages)}
    return np.array([code[lang] for lang in corpus.candidates.column("lang").to_pylist()], dtype=np.int64)


def _evaluate(corpus: LareqaCorpus, shards, blocks: Iterable[tuple[int, np.ndarray]], top_k: int) -> dict:
    q_langs = np.array(corpus.questions.column("lang").to_pylist())
    q_ids = np.array(corpus.questions.column("id").to_pylist())
    c_langs = np.array(corpus.candidates.column("lang").to_pylist())
    languages = [lang for lang in corpus.languages if (q_langs == lang).any()]
    gold = corpus.relevant_by_question()  # id -> {lang: cand_id}
    relevant = [np.array(sorted(gold[qid].values()), dtype=np.int64) for qid in q_ids]
    k = min(top_k, len(c_langs))
    multi_ranks: list[np.ndarray] = [None] * len(q_ids)
    lang_ranks: list[dict[str, int]] = [None] * len(q_ids)  # per query: its gold's rank in each language
    top_ids = np.full((len(q_ids), k), -1, np.int64)
    top_scores = np.full((len(q_ids), k), -np.inf, np.float32)
    seen = 0
    for first, block in blocks:
        rows = slice(first, first + block.shape[0])
        got = rank_block(shards, block, relevant[rows], k)
        for b, (ranks, in_group) in enumerate(zip(got.ranks, got.group_ranks)):
            rel = relevant[first + b]
            multi_ranks[first + b] = ranks
            lang_ranks[first + b] = {str(c_langs[c]): int(r) for c, r in zip(rel, in_group)}
        top_ids[rows], top_scores[rows] = got.top_ids, got.top_scores
        seen += block.shape[0]
    if seen != len(q_ids):
        raise ValueError(f"{seen} query embeddings for {len(q_ids)} questions")

    pairs: dict[str, dict] = {}
    multi: dict[str, dict] = {}
    per_query: dict[str, dict[str, np.ndarray]] = {}
    for x in languages:
        rows = np.flatnonzero(q_langs == x)
        for y in corpus.languages:
            keep = [i for i in rows if y in lang_ranks[i]]
            if not keep:
                continue
            values = per_query_rank_metrics([np.array([lang_ranks[i][y]]) for i in keep], KS)
            pairs[f"{x}-{y}"] = _means(values) | {"num_queries": len(keep)}
            per_query[f"{x}-{y}"] = {"id": q_ids[keep], "ap": values["ap"]}
        values = per_query_rank_metrics([multi_ranks[i] for i in rows], KS)
        multi[x] = _means(values) | {"rank_distance": float(values["rank_distance"].mean()),
                                     "num_queries": len(rows)}
        per_query[f"{x}-multi"] = {"id": q_ids[rows], "ap": values["ap"], "rank_distance": values["rank_distance"]}
    return {"summary": summarise(pairs, multi), "pairs": pairs, "multilingual_per_language": multi,
            "per_query": per_query, "top_k": {"ids": top_ids, "scores": top_scores}}


def _means(values: dict[str, np.ndarray]) -> dict[str, float]:
    return {"map": float(values["ap"].mean()), "recall@1": float(values["recall@1"].mean()),
            "recall@10": float(values["recall@10"].mean())}


def summarise(pairs: dict[str, dict], multi: dict[str, dict]) -> dict:
    """Macro averages: over X-X pairs, over X != Y pairs, and over query languages."""
    mono = [v for k, v in pairs.items() if k.split("-")[0] == k.split("-")[1]]
    cross = [v for k, v in pairs.items() if k.split("-")[0] != k.split("-")[1]]
    out = {}
    for name, group in (("monolingual", mono), ("cross_lingual", cross), ("multilingual", list(multi.values()))):
        out[name] = {m: float(np.mean([g[m] for g in group])) if group else float("nan") for m in METRICS}
        out[name]["num_pairs"] = len(group)
    out["multilingual"]["rank_distance"] = float(np.mean([v["rank_distance"] for v in multi.values()]))
    return out


def per_query_setting_values(per_query: dict) -> dict[str, dict[str, float]]:
    """Per query instance ('<lang>:<id>') values of each setting, for paired bootstrap.

    monolingual: AP on X-X; cross_lingual: mean AP over Y != X; multilingual: AP on the pool;
    rank_distance: the multilingual maximum rank distance.
    """
    mono, cross, multi, rd = {}, defaultdict(list), {}, {}
    for key, v in per_query.items():
        x, y = key.split("-")
        for qid, ap, *rest in zip(v["id"], v["ap"], *( [v["rank_distance"]] if "rank_distance" in v else [])):
            unit = f"{x}:{qid}"
            if y == "multi":
                multi[unit], rd[unit] = float(ap), float(rest[0])
            elif y == x:
                mono[unit] = float(ap)
            else:
                cross[unit].append(float(ap))
    return {"monolingual": mono, "cross_lingual": {u: float(np.mean(a)) for u, a in cross.items()},
            "multilingual": multi, "rank_distance": rd}


BOOTSTRAP_SETTINGS = ("monolingual", "cross_lingual", "multilingual", "rank_distance")


def paired_bootstrap_settings(runs_a: list[dict], runs_b: list[dict], dataset: str, samples: int) -> dict:
    """Paired bootstrap of A - B per setting over query instances, each averaged over its runs
    (seeds). Runs are `raysys.eval.run.evaluate` results keyed by dataset."""
    def per_unit(seed_results):
        tables = [per_query_setting_values(r[dataset]["per_query"]) for r in seed_results]
        return {s: {u: float(np.mean([t[s][u] for t in tables])) for u in tables[0][s]} for s in BOOTSTRAP_SETTINGS}

    values_a, values_b = per_unit(runs_a), per_unit(runs_b)
    out = {}
    for setting in BOOTSTRAP_SETTINGS:
        units = sorted(set(values_a[setting]) & set(values_b[setting]))
        a = np.array([values_a[setting][u] for u in units])
        b = np.array([values_b[setting][u] for u in units])
        out[setting] = paired_bootstrap(a, b, n_samples=samples)
    return out
