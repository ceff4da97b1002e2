"""LAReQA-native hard negatives: the other sentences of the gold paragraph, in the pair's language."""

from __future__ import annotations

import pytest

from raysys.config import Config
from raysys.data.lareqa import read_lareqa_dir
from raysys.data.negatives import with_paragraph_negatives
from raysys.errors import ConfigError
from tests.eval.lareqa_fixture import write_synthetic_lareqa


def test_every_pair_gets_the_other_sentences_of_its_own_paragraph_in_its_language(tmp_path):
    corpus = with_paragraph_negatives(read_lareqa_dir(write_synthetic_lareqa(tmp_path / "d", sentences=4)))
    rows = corpus.pairs.to_pylist()
    assert rows and all(r["hard_negative"] for r in rows)
    for row in rows:
        # Fixture sentences read "<lang> article A paragraph P sentence S."; questions "a{A}p{P}s{S}".
        lang, article, paragraph = row["lang"], row["id"][1], row["id"][3]
        prefix = f"{lang} article {article} paragraph {paragraph} sentence "
        assert len(row["hard_negative"]) == 3 and len(set(row["hard_negative"])) == 3  # all the others, once
        assert all(n.startswith(prefix) and n != row["passage"] for n in row["hard_negative"])
    first = {r["hard_negative"][0].rsplit(" ", 1)[1] for r in rows}
    assert len(first) > 1  # the hash spreads the first (a one-negative run's) choice over the paragraph
    again = with_paragraph_negatives(read_lareqa_dir(tmp_path / "d")).pairs.column("hard_negative")
    assert again.to_pylist() == [r["hard_negative"] for r in rows]  # stable across runs


def test_a_one_sentence_paragraph_borrows_from_its_article(tmp_path):
    corpus = with_paragraph_negatives(read_lareqa_dir(write_synthetic_lareqa(tmp_path / "d", sentences=1)))
    for row in corpus.pairs.to_pylist():
        article, paragraph = row["id"][1], row["id"][3]
        assert row["hard_negative"]
        for negative in row["hard_negative"]:
            assert negative.startswith(f"{row['lang']} article {article} paragraph ")
            assert f"paragraph {paragraph} " not in negative


def test_unknown_source_and_jsonl_data_are_refused(tmp_path, ray_local):
    with pytest.raises(ConfigError, match="data.hard_negatives.*unknown source"):
        Config.from_yaml(None, ["data.hard_negatives=article"]).validate()
    from raysys.train.datasets import prepare_corpus

    data = tmp_path / "pairs.jsonl"
    data.write_text('{"id": "a", "lang": "en", "query": "q", "passage": "p"}\n')
    with pytest.raises(ConfigError, match="needs LAReQA training data"):
        prepare_corpus(Config.from_yaml(None, [f"data.train={data}", "data.hard_negatives=paragraph",
                                               f"output_dir={tmp_path / 'out'}"]))
