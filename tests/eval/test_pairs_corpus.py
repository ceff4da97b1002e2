"""A pairs file as an evaluation set: a query's relevant answers are its parallel id's passages
in every language, and eval.split=test holds exactly the groups that training on the file leaves out."""

from __future__ import annotations

import json

import pyarrow as pa

from raysys.config import Config
from raysys.eval.pairs_corpus import corpus_from_pairs, is_pairs_input, pairs_eval_corpus, read_pairs_table
from raysys.train.datasets import small_pairs_tables


def write_pairs(path, n_groups: int = 60, langs=("en", "de")):
    rows = [{"id": f"g{g}-q{q}", "lang": lang, "query": f"{lang} question {g} {q}",
             "passage": f"{lang} answer {g} {q}", "group": f"g{g}"}
            for g in range(n_groups) for q in range(2) for lang in langs]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_relevant_answers_are_the_parallel_id_in_every_language():
    table = pa.table({"id": ["a", "a", "b", "b", "c"], "lang": ["en", "de", "en", "de", "en"],
                      "query": ["qa", "qa-de", "qb", "qb-de", "qc"],
                      "passage": ["pa", "pa-de", "pb", "pb-de", "pa"], "group": ["x", "x", "y", "y", "x"]})
    corpus = corpus_from_pairs(table)
    texts = corpus.candidates.column("text").to_pylist()
    assert texts == ["pa-de", "pb-de", "pa", "pb"]  # one candidate per distinct passage and language
    assert corpus.relevant_by_question() == {"a": {"de": 0, "en": 2}, "b": {"de": 1, "en": 3}, "c": {"en": 2}}
    assert corpus.languages == ["de", "en"]


def test_test_split_is_what_training_leaves_out(tmp_path):
    path = write_pairs(tmp_path / "pairs.jsonl")
    assert is_pairs_input(str(path)) and not is_pairs_input(str(tmp_path / "missing-dir"))
    config = Config.from_yaml(None, [f"data.train={path}", "data.validation_fraction=0.2",
                                     "data.test_fraction=0.2"])
    trained = small_pairs_tables(config, str(path))
    rows = read_pairs_table(str(path), "hash")

    def ids_of(split: str) -> set:
        return set(pairs_eval_corpus(rows, str(path), split, "hash", 0.2, 0.2).questions.column("id").to_pylist())

    ids = {name: ids_of(name) for name in ("train", "validation", "test")}
    assert ids["test"], "60 groups at test_fraction 0.2 left no test rows"
    assert ids["train"] == set(trained["train"].column("id").to_pylist())
    assert ids["validation"] == set(trained["validation"].column("id").to_pylist())
    assert not ids["test"] & (ids["train"] | ids["validation"])
    everything = ids_of("all")
    assert ids["train"] | ids["validation"] | ids["test"] == everything and len(everything) == 120
