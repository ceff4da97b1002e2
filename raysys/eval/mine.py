"""`raysys mine`: retrieved hard negatives for every training pair of a JSONL / Parquet corpus.

LAReQA directories have their own hard negatives (`data.hard_negatives=paragraph`); other corpora
get them by retrieval, as sentence-transformers' `mine_hard_negatives` does: every row's query is
searched, with the model, among the distinct passages of the row's own language (one index shard
per language, the evaluation's shards and Ray Data encoders), and the `num_negatives` best-ranked
passages that
- is not a passage of the row's own parallel id (the positive or a duplicate of it),
- ranks at `range_min` or below (the very top is where unlabelled positives hide), and
- scores at most (1 - `relative_margin`) x the positive's score,
become the row's `hard_negative` list, best first. Rows with none keep an empty value (training then treats the
whole input as having no hard negatives only if any row lacks one; see docs/training_data.md).
"""

from __future__ import annotations

import io
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raysys import storage
from raysys.config import Config
from raysys.errors import ConfigError
from raysys.eval.pairs_corpus import corpus_from_pairs
from raysys.eval.ranking import open_shards, stored_blocks


def mine_hard_negatives(pairs: pa.Table, model_path: str, config: Config, work_dir: str | Path, *,
                        range_min: int = 0, range_max: int = 50, relative_margin: float = 0.05,
                        num_negatives: int = 1, progress: bool = True) -> tuple[pa.Table, dict]:
    """`pairs` (PAIR_SCHEMA rows) with `hard_negative` mined; and a small summary."""
    from raysys.eval.embeddings import encode_cached, shard_plan, texts_digest

    if not 0 <= range_min < range_max:
        raise ConfigError(f"range_min {range_min} and range_max {range_max} leave no rank to mine from",
                          field="--range-min", hint="0 <= range-min < range-max, e.g. 0 and 50")
    if num_negatives < 1:
        raise ConfigError(f"num_negatives {num_negatives} is below 1", field="--num-negatives",
                          hint="mine at least one negative per row")
    # corpus_from_pairs sorts rows by (lang, id): questions[i] is pairs row order[i], and every
    # language's distinct passages are one contiguous range of candidates (one shard each).
    order = pc.sort_indices(pairs, [("lang", "ascending"), ("id", "ascending")]).to_numpy()
    corpus = corpus_from_pairs(pairs)
    q_ids = np.array(corpus.questions.column("id").to_pylist(), dtype=object)
    q_gold = corpus.questions.column("gold_cand_id").to_numpy()
    c_langs = np.array(corpus.candidates.column("lang").to_pylist(), dtype=object)
    c_texts = corpus.candidates.column("text").to_pylist()
    owners = defaultdict(set)  # candidate -> the parallel ids whose passage it is
    for qid, gold in zip(q_ids, q_gold):
        owners[int(gold)].add(qid)
    languages = list(dict.fromkeys(c_langs))
    bounds = np.array([0] + [int(np.flatnonzero(c_langs == lang)[-1]) + 1 for lang in languages])
    shard_of = {lang: s for s, lang in enumerate(languages)}

    # Embeddings are reused only for the same model, encoder settings, texts and encoding mode.
    digest = texts_digest(corpus.questions.column("text"), corpus.candidates.column("text"))
    files = encode_cached({"queries": (corpus.questions.column("text").to_pylist(), "query"),
                           "passages": (c_texts, "passage")}, model_path, config, work_dir, "mine", [digest], progress)
    plan = shard_plan(config, len(c_texts))
    plan.pop("num_shards")
    shards = open_shards(files["passages"], bounds, **plan)
    negatives: list[list[str]] = [[] for _ in q_ids]
    chosen_ranks = []
    try:
        q_langs = np.array(corpus.questions.column("lang").to_pylist(), dtype=object)
        for first, block in stored_blocks(files["queries"], 512):
            rows = np.arange(first, first + len(block))
            q = shards.put(block)
            asks = {shard_of[lang]: rows[q_langs[rows] == lang] - first for lang in set(q_langs[rows])}
            tops = shards.call("search", {s: (q, range_max) for s in asks})
            positives = shards.call("relevant_scores", {s: (q, local, q_gold[local + first]) for s, local in asks.items()})
            for s, local in asks.items():
                scores, ids = tops[s]
                for score_pos, row in zip(positives[s][0], local):
                    qid, found = q_ids[row + first], negatives[row + first]
                    for rank in range(range_min, scores.shape[1]):
                        cand, score = int(ids[row, rank]), float(scores[row, rank])
                        if cand < 0 or qid in owners[cand] or score > (1 - relative_margin) * float(score_pos):
                            continue
                        found.append(c_texts[cand])
                        chosen_ranks.append(rank + 1)
                        if len(found) == num_negatives:
                            break
    finally:
        shards.close()
    by_row = [None] * len(pairs)
    for i, row in enumerate(order):
        by_row[int(row)] = negatives[i] or None
    column = pairs.schema.get_field_index("hard_negative")
    mined = pairs.set_column(column, "hard_negative", pa.array(by_row, pa.list_(pa.string())))
    with_any = sum(1 for found in negatives if found)
    summary = {"rows": len(pairs), "mined": with_any, "without": len(pairs) - with_any,
               "negatives": len(chosen_ranks), "with_all": sum(len(found) == num_negatives for found in negatives),
               "median_rank": float(np.median(chosen_ranks)) if chosen_ranks else None,
               "range_min": range_min, "range_max": range_max, "relative_margin": relative_margin,
               "num_negatives": num_negatives}
    return mined, summary


def write_pairs(table: pa.Table, out: str) -> str:
    """The mined rows as a pairs file raysys reads back (`.parquet`, else JSONL), written atomically."""
    columns = [name for name in ("id", "lang", "query", "passage", "hard_negative", "context", "group")
               if name in table.column_names]
    table = table.select(columns)
    if str(out).endswith((".parquet", ".parq")):
        buf = io.BytesIO()
        pq.write_table(table, buf)
        return storage.write_bytes(out, buf.getvalue())
    if not str(out).endswith((".jsonl", ".json")):
        raise ConfigError(f"{out}: write mined pairs as .parquet or .jsonl", field="--out")
    lines = (json.dumps({k: v for k, v in row.items() if v is not None}, ensure_ascii=False) for row in table.to_pylist())
    return storage.write_bytes(out, "\n".join(lines) + "\n")
