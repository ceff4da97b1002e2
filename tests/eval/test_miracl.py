"""MIRACL readers (including every located error) and run scoring."""

from __future__ import annotations

import numpy as np
import pytest

from raysys.errors import DataError
from raysys.eval.miracl import check_qrels_against_corpus, read_qrels, read_topics, score_run


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def _assert_located(excinfo, path, line, field):
    msg = str(excinfo.value)
    assert path.name in msg and f"row {line}" in msg and f"field '{field}'" in msg, msg
    assert excinfo.value.row == line and excinfo.value.field == field


def test_read_topics(tmp_path):
    path = _write(tmp_path / "topics.tsv", "0#1\tWhat is a cat?\n\n1#2\tWo liegt\tBerlin?\n")
    assert read_topics(path) == {"0#1": "What is a cat?", "1#2": "Wo liegt\tBerlin?"}


@pytest.mark.parametrize("body, line, field", [
    ("q1\tok\nq2 no tab\n", 2, "text"),
    ("q1\tok\n\tno id\n", 2, "qid"),
    ("q1\tok\nq3\t  \n", 2, "text"),
    ("q1\tok\nq2\tx\nq1\tagain\n", 3, "qid"),
])
def test_read_topics_errors(tmp_path, body, line, field):
    path = _write(tmp_path / "bad-topics.tsv", body)
    with pytest.raises(DataError) as e:
        read_topics(path)
    _assert_located(e, path, line, field)


def test_read_qrels(tmp_path):
    path = _write(tmp_path / "qrels.txt", "q1 Q0 d1 1\nq1\tQ0\td2\t0\n\nq2 Q0 d3 2\n")
    assert read_qrels(path) == {"q1": {"d1": 1, "d2": 0}, "q2": {"d3": 2}}


@pytest.mark.parametrize("body, line, field", [
    ("q1 Q0 d1 1\nq1 Q0 d2\n", 2, "rel"),
    ("q1 Q0 d1 1\nq1 Q0\n", 2, "docid"),
    ("q1 Q0 d1 1\nq1 Q0 d2 1 extra\n", 2, "rel"),
    ("q1 Q0 d1 1\nq1 Q0 d2 yes\n", 2, "rel"),
    ("q1 Q0 d1 1\nq1 Q0 d2 1.5\n", 2, "rel"),
    ("q1 Q0 d1 1\nq2 Q0 d1 1\nq1 Q0 d1 0\n", 3, "docid"),
])
def test_read_qrels_errors(tmp_path, body, line, field):
    path = _write(tmp_path / "bad-qrels.txt", body)
    with pytest.raises(DataError) as e:
        read_qrels(path)
    _assert_located(e, path, line, field)


def test_invalid_utf8_names_line(tmp_path):
    path = tmp_path / "topics.tsv"
    path.write_bytes(b"q1\tok\nq2\t\xff\xfe\n")
    with pytest.raises(DataError, match="row 2"):
        read_topics(path)


def test_qrels_docid_missing_from_corpus(tmp_path):
    path = _write(tmp_path / "qrels.txt", "q1 Q0 d1 1\nq1 Q0 d2 0\nq2 Q0 d9 1\n")
    qrels = read_qrels(path)
    check_qrels_against_corpus(qrels, {"d1", "d2", "d9"}, path)
    with pytest.raises(DataError) as e:
        check_qrels_against_corpus(qrels, ["d1", "d2"], path)
    _assert_located(e, path, 3, "docid")
    assert "'d9'" in str(e.value)


QRELS = {"q1": {"a": 2, "b": 1, "c": 0, "d": 1},
         "q2": {"e": 1},
         "q3": {"f": 0},            # no positive grade: skipped
         "q4": {"g": 1, "h": 1}}    # missing from the run: scores 0
RUN = {"q1": ["x", "b", "a", "c", "y"], "q2": [f"n{i}" for i in range(120)] + ["e"],
       "q3": ["f"], "q9": ["a"]}


def test_score_run_hand_computed():
    out = score_run(RUN, QRELS)
    assert out["num_queries"] == 3 and out["skipped_no_relevant"] == ["q3"] and out["num_run_only"] == 1
    q1 = out["per_query"]["q1"]
    idcg = 2 + 1 / np.log2(3) + 1 / np.log2(4)
    assert q1["ndcg@10"] == pytest.approx((1 / np.log2(3) + 2 / np.log2(4)) / idcg)
    assert q1["recall@100"] == pytest.approx(2 / 3)
    assert q1["mrr@10"] == pytest.approx(0.5)
    assert out["per_query"]["q2"] == {"ndcg@10": 0.0, "recall@100": 0.0, "mrr@10": 0.0}
    assert out["per_query"]["q4"] == {"ndcg@10": 0.0, "recall@100": 0.0, "mrr@10": 0.0}
    assert out["mean"]["recall@100"] == pytest.approx(2 / 9)
    assert score_run(RUN, QRELS, k_recall=200)["per_query"]["q2"]["recall@200"] == 1.0
    with pytest.raises(ValueError, match="twice"):
        score_run({"q1": ["a", "a"]}, QRELS)


def test_score_run_matches_pytrec_eval():
    pytrec_eval = pytest.importorskip("pytrec_eval")
    rng = np.random.default_rng(0)
    docs = [f"d{i}" for i in range(300)]
    qrels, run = {}, {}
    for q in range(40):
        judged = rng.choice(docs, size=rng.integers(1, 30), replace=False)
        qrels[f"q{q}"] = {d: int(rng.integers(0, 4)) for d in judged}
        qrels[f"q{q}"][str(judged[0])] = int(rng.integers(1, 4))  # at least one positive
        run[f"q{q}"] = list(rng.permutation(docs)[:150])
        run[f"q{q}"][rng.integers(0, 5)] = str(judged[0])  # early hits so MRR is non-trivial
        run[f"q{q}"] = list(dict.fromkeys(run[f"q{q}"]))
    ours = score_run(run, qrels)["per_query"]
    # Strictly decreasing scores so trec_eval keeps our order; recip_rank is uncut, so cut the run.
    as_scores = {q: {d: float(len(r) - i) for i, d in enumerate(r)} for q, r in run.items()}
    cut10 = {q: {d: float(10 - i) for i, d in enumerate(r[:10])} for q, r in run.items()}
    ref = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut_10", "recall_100"}).evaluate(as_scores)
    ref_rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(cut10)
    for q in qrels:
        assert ours[q]["ndcg@10"] == pytest.approx(ref[q]["ndcg_cut_10"], abs=1e-9)
        assert ours[q]["recall@100"] == pytest.approx(ref[q]["recall_100"], abs=1e-9)
        assert ours[q]["mrr@10"] == pytest.approx(ref_rr[q]["recip_rank"], abs=1e-9)
