"""A LAReQA-style retrieval corpus built from parallel pairs alone (any PAIR_SCHEMA table).

Candidates are the distinct passages of each language; a question's gold candidate in
language Y is the passage of its parallel id in Y. This gives monolingual, cross-lingual and
multilingual retrieval scores for corpora that have no sentence pools (JSONL/Parquet pairs:
`raysys eval --datasets pairs.jsonl`), and a cheap validation metric during training and sweeps.

Evaluating a file applies the split training applies to it (`data.split_rule` by each row's group,
`data.validation_fraction` / `data.test_fraction`), so `eval.split=test` scores exactly the groups a
run trained on this file never saw.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from raysys.data.lareqa import CANDIDATE_SCHEMA, QUESTION_SCHEMA, LareqaCorpus, is_lareqa_dir
from raysys.data.split import refuse_order_split, split_names
from raysys.errors import DataError


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


def is_pairs_input(location: str) -> bool:
    """A remote URI, a local file, or a directory of JSONL / Parquet files (not a LAReQA directory)."""
    text = str(location)
    if "://" in text and not text.startswith("file://"):
        return True
    path = Path(text.removeprefix("file://"))
    return path.is_file() or (path.is_dir() and not is_lareqa_dir(str(path))
                              and (any(path.glob("*.jsonl*")) or any(path.glob("*.parquet"))))


def read_pairs_table(location: str, rule: str) -> pa.Table:
    """Every validated row: on the driver for small local files, else read by Ray Data tasks."""
    from raysys.data.files import read_pairs, small_local_pairs

    table = small_local_pairs(location)
    if table is not None:
        return table
    refuse_order_split(rule, location)  # as training does: no file order across Ray Data tasks
    import ray

    from raysys.runtime import ensure_ray

    ensure_ray()
    return pa.concat_tables(ray.get(read_pairs(location).to_arrow_refs()))


def pairs_eval_corpus(table: pa.Table, location: str, split: str, rule: str, validation_fraction: float,
                      test_fraction: float, languages: list[str] | None = None) -> LareqaCorpus:
    """The rows of `table` (read from `location`) in `split` (or all) under split rule `rule`
    (`order` / `hash`) as an evaluation set."""
    if languages is not None:
        table = table.filter(pc.is_in(table.column("lang"), value_set=pa.array(languages, pa.string())))
    if split != "all":
        names = split_names(table.column("group"), rule, validation_fraction, test_fraction)
        table = table.filter(pc.equal(names, split))
    if len(table) == 0:
        raise DataError(f"no rows in the {split} split", file=str(location),
                        hint="raise data.test_fraction / data.validation_fraction, or set eval.split=all")
    return corpus_from_pairs(table)
