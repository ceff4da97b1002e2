"""LAReQA protocol: monolingual, cross-lingual and multilingual settings over language pairs.

Given embeddings of a corpus' questions and candidate sentences:
- pair (X, Y): queries of X ranked against the candidates of Y only; X = Y is monolingual,
  X != Y cross-lingual; a query with no gold sentence in Y is skipped for that pair (MLQA-R);
- multilingual: queries of X against the pool of every language's candidates, relevant = the
  gold sentence in every language; also the maximum rank distance (language bias).
Ranks are exact over the full pool (counted from all scores, never from a truncated top-k);
the sharded FAISS index provides the score blocks and the multilingual top-k run.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from raysys.data.lareqa import LareqaCorpus
from raysys.eval.index import ShardedIndex
from raysys.eval.metrics import paired_bootstrap, per_query_rank_metrics, relevant_ranks

KS = (1, 10)
METRICS = ("map", "recall@1", "recall@10")


def evaluate_lareqa(corpus: LareqaCorpus, query_emb: np.ndarray, cand_emb: np.ndarray, *,
                    num_shards: int = 1, top_k: int = 100, chunk_size: int = 512) -> dict:
    """Return {'summary', 'pairs', 'multilingual_per_language', 'per_query', 'top_k'}."""
    q_langs = np.array(corpus.questions.column("lang").to_pylist())
    q_ids = np.array(corpus.questions.column("id").to_pylist())
    c_langs = np.array(corpus.candidates.column("lang").to_pylist())
    languages = [lang for lang in corpus.languages if (q_langs == lang).any()]
    cand_cols = {lang: np.flatnonzero(c_langs == lang) for lang in corpus.languages}
    gold = corpus.relevant_by_question()  # id -> {lang: cand_id}
    position_in_language = np.empty(len(c_langs), dtype=np.int64)
    for cols in cand_cols.values():
        position_in_language[cols] = np.arange(len(cols))

    index = ShardedIndex(cand_emb.astype(np.float32), num_shards=num_shards)
    pairs: dict[str, dict] = {}
    multi: dict[str, dict] = {}
    per_query: dict[str, dict[str, np.ndarray]] = {}
    for x in languages:
        rows = np.flatnonzero(q_langs == x)
        ids_x = q_ids[rows]
        pair_ranks: dict[str, list] = defaultdict(list)
        pair_queries: dict[str, list] = defaultdict(list)
        multi_ranks: list[np.ndarray] = []
        for first, block in index.iter_score_blocks(query_emb[rows], chunk_size=chunk_size):
            block_ids = ids_x[first:first + block.shape[0]]
            for y, cols in cand_cols.items():
                keep = [i for i, qid in enumerate(block_ids) if y in gold[qid]]
                if not keep:
                    continue
                rel = [position_in_language[[gold[block_ids[i]][y]]] for i in keep]
                pair_ranks[y].extend(relevant_ranks(block[keep][:, cols], rel))
                pair_queries[y].extend(block_ids[keep])
            multi_rel = [np.array(sorted(gold[qid].values())) for qid in block_ids]
            multi_ranks.extend(relevant_ranks(block, multi_rel))
        for y, ranks in pair_ranks.items():
            values = per_query_rank_metrics(ranks, KS)
            pairs[f"{x}-{y}"] = _means(values) | {"num_queries": len(ranks)}
            per_query[f"{x}-{y}"] = {"id": np.array(pair_queries[y]), "ap": values["ap"]}
        values = per_query_rank_metrics(multi_ranks, KS)
        multi[x] = _means(values) | {"rank_distance": float(values["rank_distance"].mean()),
                                     "num_queries": len(multi_ranks)}
        per_query[f"{x}-multi"] = {"id": ids_x, "ap": values["ap"], "rank_distance": values["rank_distance"]}

    scores, top_ids = index.search(query_emb.astype(np.float32), min(top_k, len(cand_emb)))
    return {"summary": summarise(pairs, multi), "pairs": pairs, "multilingual_per_language": multi,
            "per_query": per_query, "top_k": {"ids": top_ids, "scores": scores}}


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
