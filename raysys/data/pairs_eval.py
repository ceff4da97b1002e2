"""A JSONL / Parquet pairs file as a LAReQA-style evaluation set.

Each row's query retrieves from a pool that holds the passage of every row; a query's relevant
answers are the passages of its parallel id in every language, as LAReQA's gold sentences are
(so mono / cross / multi mAP and rank distance mean the same). One candidate per (id, language):
a repeated row is one item, not two golds. The split is the one training applies to the file
(`data.split_rule`, by each row's group, `data.validation_fraction` / `data.test_fraction`), so
`eval.split=test` scores exactly the groups a run trained on this file never saw.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raysys.data.lareqa import CANDIDATE_SCHEMA, QUESTION_SCHEMA, LareqaCorpus, is_lareqa_dir
from raysys.data.split import split_names
from raysys.errors import DataError


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
    from raysys.train.datasets import refuse_order_split

    refuse_order_split(rule, location)  # as training does: no file order across Ray Data tasks
    import ray

    from raysys.runtime import ensure_ray

    ensure_ray()
    return pa.concat_tables(ray.get(read_pairs(location).to_arrow_refs()))


def pairs_eval_corpus(location: str, split: str, rule: str, validation_fraction: float, test_fraction: float,
                      languages: list[str] | None = None) -> LareqaCorpus:
    """The rows of `split` (or all) under split rule `rule` (`order` / `hash`) as an evaluation set."""
    table = read_pairs_table(location, rule)
    if languages is not None:
        table = table.filter(pc.is_in(table.column("lang"), value_set=pa.array(languages, pa.string())))
    if split != "all":
        names = split_names(table.column("group"), rule, validation_fraction, test_fraction)
        table = table.filter(pc.equal(names, split))
    if len(table) == 0:
        raise DataError(f"no rows in the {split} split", file=str(location),
                        hint="raise data.test_fraction / data.validation_fraction, or set eval.split=all")
    return corpus_from_pairs(table)


def corpus_from_pairs(table: pa.Table) -> LareqaCorpus:
    # First row of each (id, lang) wins; the pool keeps the file's order.
    keys = pc.binary_join_element_wise(table.column("id"), table.column("lang"), "\x1f")
    _, first = np.unique(keys.to_numpy(zero_copy_only=False), return_index=True)
    items = table.take(pa.array(np.sort(first)))
    n = len(items)
    cand_ids = pa.array(np.arange(n, dtype=np.int64))
    candidates = pa.table([cand_ids, items.column("lang"), items.column("passage"), items.column("group"),
                           items.column("id")], schema=CANDIDATE_SCHEMA)
    questions = pa.table([items.column("id"), items.column("lang"), items.column("query"), items.column("group"),
                          cand_ids], schema=QUESTION_SCHEMA)
    groups = list(dict.fromkeys(items.column("group").to_pylist()))
    return LareqaCorpus(pairs=items, questions=questions, candidates=candidates, skipped={},
                        languages=sorted(set(items.column("lang").to_pylist())), groups=groups)
