"""A LAReQA-style retrieval corpus built from parallel pairs alone (any PAIR_SCHEMA table).

Candidates are the distinct passages of each language; a question's gold candidate in
language Y is the passage of its parallel id in Y. This gives monolingual, cross-lingual and
multilingual retrieval scores for corpora that have no sentence pools (JSONL/Parquet pairs),
and a cheap validation metric during training and sweeps.
"""

from __future__ import annotations

import pyarrow as pa

from raysys.data.lareqa import CANDIDATE_SCHEMA, QUESTION_SCHEMA, LareqaCorpus


def corpus_from_pairs(pairs: pa.Table) -> LareqaCorpus:
    rows = pairs.select(["id", "lang", "query", "passage", "group"]).sort_by(
        [("lang", "ascending"), ("id", "ascending")]).to_pylist()
    cand_of: dict[tuple[str, str], int] = {}
    candidates = {name: [] for name in CANDIDATE_SCHEMA.names}
    questions = {name: [] for name in QUESTION_SCHEMA.names}
    for row in rows:
        key = (row["lang"], row["passage"])
        if key not in cand_of:  # identical passages in one language are one candidate
            cand_of[key] = len(cand_of)
            for name, value in zip(CANDIDATE_SCHEMA.names,
                                   (cand_of[key], row["lang"], row["passage"], row["group"], row["id"])):
                candidates[name].append(value)
        for name, value in zip(QUESTION_SCHEMA.names,
                               (row["id"], row["lang"], row["query"], row["group"], cand_of[key])):
            questions[name].append(value)
    languages = sorted({row["lang"] for row in rows})
    groups = list(dict.fromkeys(row["group"] for row in rows))
    empty_pairs = pairs.slice(0, 0)
    return LareqaCorpus(pairs=empty_pairs, questions=pa.table(questions, schema=QUESTION_SCHEMA),
                        candidates=pa.table(candidates, schema=CANDIDATE_SCHEMA), skipped={},
                        languages=languages, groups=groups)
