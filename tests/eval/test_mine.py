"""`raysys mine`: retrieved hard negatives for a pairs file, checked against the rule applied to
the full score matrix of the same stored embeddings."""

from __future__ import annotations

import numpy as np
import pytest

from raysys.cli import main
from raysys.eval.encode import read_embeddings
from raysys.eval.pairs_corpus import corpus_from_pairs, read_pairs_table
from tests.eval.test_pairs_corpus import write_pairs


def expected_negatives(pairs, q_emb, c_emb, range_min, range_max, margin, num_negatives=1):
    """The mining rule on the full matrix, row by row of `pairs`: the first `num_negatives` eligible
    passages, best first (None: no eligible passage)."""
    corpus = corpus_from_pairs(pairs)
    q_ids = corpus.questions.column("id").to_pylist()
    q_langs = corpus.questions.column("lang").to_pylist()
    gold = corpus.questions.column("gold_cand_id").to_pylist()
    c_langs = np.array(corpus.candidates.column("lang").to_pylist())
    c_texts = corpus.candidates.column("text").to_pylist()
    owners = {}
    for qid, g in zip(q_ids, gold):
        owners.setdefault(g, set()).add(qid)
    by_key = {}
    for i, (qid, lang) in enumerate(zip(q_ids, q_langs)):
        scores = q_emb[i] @ c_emb.T
        pool = np.flatnonzero(c_langs == lang)
        ranked = pool[np.lexsort((pool, -scores[pool]))][:range_max]
        eligible = [c for rank, c in enumerate(ranked) if rank >= range_min and qid not in owners[c]
                    and scores[c] <= (1 - margin) * scores[gold[i]]]
        by_key[(qid, lang)] = [c_texts[c] for c in eligible[:num_negatives]] or None
    return [by_key[(r["id"], r["lang"])] for r in pairs.select(["id", "lang"]).to_pylist()]


@pytest.mark.slow  # three mining runs through Ray Data encoders: `make test-slow`
def test_mined_negatives_follow_the_rule(ray_local, tmp_path, tiny_model_dir):
    """Three settings on the same pairs (the tiny model's scores lie within ~1.5 % of each other,
    so a 0.2 % margin bites): each mined column equals the rule on the full score matrix, and
    skipping the top ranks or asking for a margin changes some rows' negatives."""
    source = write_pairs(tmp_path / "pairs.jsonl", n_groups=6, langs=("en", "de", "fr"))
    pairs = read_pairs_table(str(source), "hash")
    mined = {}
    for range_min, margin, k in ((0, 0.0, 1), (2, 0.0, 1), (0, 0.002, 1), (0, 0.0, 3)):
        out = tmp_path / f"mined-{range_min}-{margin}-{k}.parquet"
        code = main(["mine", "--input", str(source), "--model", str(tiny_model_dir), "--out", str(out),
                     "--range-min", str(range_min), "--range-max", "8", "--margin", str(margin),
                     "--num-negatives", str(k), f"output_dir={tmp_path / 'out'}", "eval.max_length=32"])
        assert code == 0
        table = read_pairs_table(str(out), "hash")
        columns = ["id", "lang", "query", "passage", "group"]
        assert table.select(columns).equals(pairs.select(columns))
        (embeddings,) = list((tmp_path / "out" / "mine" / "embeddings").iterdir())  # encoded once, reused
        files = lambda name: [(str(p), int(np.load(p)["row"].size)) for p in sorted(embeddings.glob(f"{name}-*.npz"))]
        expected = expected_negatives(pairs, read_embeddings(files("queries")), read_embeddings(files("passages")),
                                      range_min, 8, margin, k)
        mined[(range_min, margin, k)] = table.column("hard_negative").to_pylist()
        assert mined[(range_min, margin, k)] == expected
        assert any(n is not None for n in expected)
        for row, negatives in zip(table.to_pylist(), expected):  # same language, never the row's own passage
            assert all(n.startswith(row["lang"] + " ") and n != row["passage"] for n in negatives or [])
    assert mined[(2, 0.0, 1)] != mined[(0, 0.0, 1)] and mined[(0, 0.002, 1)] != mined[(0, 0.0, 1)]
    assert any(n and len(n) == 3 for n in mined[(0, 0.0, 3)])
    assert [n and n[:1] for n in mined[(0, 0.0, 3)]] == mined[(0, 0.0, 1)]  # best first


def test_a_lareqa_directory_is_refused(tmp_path, xquad_r_dir, capsys):
    assert main(["mine", "--input", str(xquad_r_dir), "--out", str(tmp_path / "x.parquet")]) == 2
    assert "not a JSONL / Parquet pairs input" in capsys.readouterr().err
