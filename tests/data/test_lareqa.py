"""LAReQA reader: the real XQuAD-R numbers, and a located DataError for every bad input."""

from __future__ import annotations

import copy
import json
import time
import warnings
from pathlib import Path

import pyarrow.compute as pc
import pytest

from raysys.data.lareqa import CANDIDATE_SCHEMA, QUESTION_SCHEMA, read_lareqa_dir
from raysys.data.schema import PAIR_SCHEMA
from raysys.errors import DataError

README_CANDIDATES = {"ar": 1222, "de": 1276, "el": 1234, "en": 1180, "es": 1215, "hi": 1244,
                     "ru": 1219, "th": 852, "tr": 1167, "vi": 1209, "zh": 1196}


@pytest.fixture(scope="module")
def corpus(xquad_r_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tr.json's two known span mismatches
        return read_lareqa_dir(xquad_r_dir)


def test_counts_match_the_readme(corpus):
    assert corpus.languages == sorted(README_CANDIDATES)
    cand_langs = corpus.candidates.column("lang").to_pylist()
    assert {lang: cand_langs.count(lang) for lang in README_CANDIDATES} == README_CANDIDATES
    assert corpus.candidates.num_rows == 13_014
    assert corpus.candidates.column("cand_id").to_pylist() == list(range(13_014))
    question_langs = corpus.questions.column("lang").to_pylist()
    assert all(question_langs.count(lang) == 1190 for lang in README_CANDIDATES)
    assert corpus.pairs.num_rows == corpus.questions.num_rows == 11 * 1190
    assert corpus.skipped == {lang: 0 for lang in README_CANDIDATES}
    assert corpus.groups == [f"article-{i:03d}" for i in range(48)]


def test_schemas(corpus):
    assert corpus.pairs.schema.equals(PAIR_SCHEMA)
    assert corpus.questions.schema.equals(QUESTION_SCHEMA)
    assert corpus.candidates.schema.equals(CANDIDATE_SCHEMA)
    row = corpus.pairs.slice(0, 1).to_pylist()[0]
    assert row["hard_negative"] is None and row["passage"] in row["context"]
    assert row["origin"].endswith("ar.json:data[0].paragraphs[0].qas[0]")


def test_gold_sentence_holds_the_answer(corpus, xquad_r_dir):
    raw = json.loads((xquad_r_dir / "en.json").read_text(encoding="utf-8"))
    answer = {qa["id"]: qa["answers"][0]["text"] for article in raw["data"]
              for par in article["paragraphs"] for qa in par["qas"]}
    en = corpus.pairs.filter(pc.equal(corpus.pairs.column("lang"), "en"))
    hits = sum(answer[i] in p for i, p in zip(en.column("id").to_pylist(), en.column("passage").to_pylist()))
    assert hits / en.num_rows > 0.97
    texts = corpus.candidates.column("text").to_pylist()
    for q in corpus.questions.slice(0, 50).to_pylist():  # gold ids point at the pair's passage
        assert q["gold_cand_id"] >= 0 and corpus.candidates.column("lang")[q["gold_cand_id"]].as_py() == q["lang"]
    pairs = {(r["id"], r["lang"]): r["passage"] for r in corpus.pairs.select(["id", "lang", "passage"]).to_pylist()}
    assert all(texts[q["gold_cand_id"]] == pairs[(q["id"], q["lang"])] for q in corpus.questions.to_pylist())


def test_parallel_ids_share_group_across_languages(corpus):
    group_of: dict[str, set[str]] = {}
    for qid, group in zip(corpus.pairs.column("id").to_pylist(), corpus.pairs.column("group").to_pylist()):
        group_of.setdefault(qid, set()).add(group)
    assert len(group_of) == 1190 and all(len(g) == 1 for g in group_of.values())
    relevant = corpus.relevant_by_question()
    assert len(relevant) == 1190 and all(len(r) == 11 for r in relevant.values())


def test_subset_renumbers_candidates(corpus):
    part = corpus.subset({"article-040", "article-047"})
    assert part.candidates.column("cand_id").to_pylist() == list(range(part.candidates.num_rows))
    assert set(part.pairs.column("group").to_pylist()) == {"article-040", "article-047"}
    texts = part.candidates.column("text").to_pylist()
    passages = {(r["id"], r["lang"]): r["passage"] for r in part.pairs.to_pylist()}
    assert all(texts[q["gold_cand_id"]] == passages[(q["id"], q["lang"])] for q in part.questions.to_pylist())
    assert part.groups == ["article-040", "article-047"]


def test_language_selection_and_speed(xquad_r_dir):
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        read_lareqa_dir(xquad_r_dir)
    assert time.perf_counter() - start < 2.0
    only = read_lareqa_dir(xquad_r_dir, ["en", "de"])
    assert only.languages == ["en", "de"] and only.candidates.num_rows == 1180 + 1276


# ---- bad inputs: a tiny valid directory, then one defect at a time -------------------------

def _tiny(lang: str = "en") -> dict:
    context = "Alpha is first. Beta is second."
    return {"version": "1.1", "data": [{"title": "T", "paragraphs": [{
        "context": context, "sentences": ["Alpha is first.", "Beta is second."],
        "sentence_breaks": [[0, 15], [16, 31]],
        "qas": [{"id": "q1", "question": f"What is first? ({lang})", "answers": [{"answer_start": 0, "text": "Alpha"}]},
                {"id": "q2", "question": "What is second?", "answers": [{"answer_start": 16, "text": "Beta"}]}],
    }]}]}


def _write(root: Path, docs: dict[str, dict | str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for lang, doc in docs.items():
        (root / f"{lang}.json").write_text(doc if isinstance(doc, str) else json.dumps(doc), encoding="utf-8")
    return root


def test_tiny_directory_reads(tmp_path):
    corpus = read_lareqa_dir(_write(tmp_path, {"en": _tiny("en"), "de": _tiny("de")}))
    assert corpus.relevant_by_question() == {"q1": {"de": 0, "en": 2}, "q2": {"de": 1, "en": 3}}
    assert set(corpus.candidates.column("paragraph").to_pylist()) == {"article-000/p0"}


def test_unanswerable_question_is_counted_and_warned(tmp_path):
    doc = _tiny()
    doc["data"][0]["paragraphs"][0]["qas"][1]["answers"][0]["answer_start"] = 15  # the gap
    with pytest.warns(UserWarning, match="1 question"):
        corpus = read_lareqa_dir(_write(tmp_path, {"en": doc}))
    assert corpus.skipped == {"en": 1} and corpus.pairs.num_rows == 1


QA = "data[0].paragraphs[0].qas[0]"
PAR = "data[0].paragraphs[0]"


def _drop(path: list, key: str):
    def edit(doc):
        node = doc
        for step in path:
            node = node[step]
        del node[key]
    return edit


def _set(path: list, key: str, value):
    def edit(doc):
        node = doc
        for step in path:
            node = node[step]
        node[key] = value
    return edit


P = ["data", 0, "paragraphs", 0]
Q = P + ["qas", 0]
BAD_DOCS = {
    "missing data": (_drop([], "data"), "data", "$"),
    "missing paragraphs": (_drop(["data", 0], "paragraphs"), "paragraphs", "data[0]"),
    "missing qas": (_drop(P, "qas"), "qas", PAR),
    "missing sentences": (_drop(P, "sentences"), "sentences", PAR),
    "missing sentence_breaks": (_drop(P, "sentence_breaks"), "sentence_breaks", PAR),
    "missing question": (_drop(Q, "question"), "question", QA),
    "missing answers": (_drop(Q, "answers"), "answers", QA),
    "missing id": (_drop(Q, "id"), "id", QA),
    "missing answer_start": (_drop(Q + ["answers", 0], "answer_start"), "answer_start", QA + ".answers[0]"),
    "question not a string": (_set(Q, "question", 7), "question", QA + ".question"),
    "answer_start not an int": (_set(Q + ["answers", 0], "answer_start", "0"), "answer_start", QA),
    "paragraphs not a list": (_set(["data", 0], "paragraphs", {}), "paragraphs", "data[0]"),
    "empty question": (_set(Q, "question", "  "), "question", QA),
    "no answers": (_set(Q, "answers", []), "answers", QA),
    "break outside context": (_set(P, "sentence_breaks", [[0, 15], [16, 99]]), "sentence_breaks", PAR + ".sentence_breaks[1]"),
    "breaks out of order": (_set(P, "sentence_breaks", [[16, 31], [0, 15]]), "sentence_breaks", PAR + ".sentence_breaks[1]"),
    "breaks count": (_set(P, "sentence_breaks", [[0, 15]]), "sentence_breaks", PAR),
    "duplicate id": (_set(P + ["qas", 1], "id", "q1"), "id", PAR + ".qas[1]"),
}


@pytest.mark.parametrize("case", sorted(BAD_DOCS))
def test_bad_document_is_located(tmp_path, case):
    edit, field, location = BAD_DOCS[case]
    doc = copy.deepcopy(_tiny())
    edit(doc)
    with pytest.raises(DataError) as info:
        read_lareqa_dir(_write(tmp_path, {"de": _tiny("de"), "en": doc}))
    message = str(info.value)
    assert "en.json" in message and location in message and f"field '{field}'" in message, message


def test_malformed_json_names_line_and_column(tmp_path):
    text = json.dumps(_tiny(), indent=1).replace('"question": "What is second?"', '"question": "What is second?,')
    with pytest.raises(DataError, match=r"en\.json, row \d+: malformed JSON.*line \d+, column \d+"):
        read_lareqa_dir(_write(tmp_path, {"en": text}))


def test_unknown_language_file(tmp_path):
    with pytest.raises(DataError, match=r"xx\.json, field 'file name': unknown language code 'xx'"):
        read_lareqa_dir(_write(tmp_path, {"en": _tiny(), "xx": _tiny()}))


def test_directory_without_files(tmp_path):
    with pytest.raises(DataError, match="no <lang>.json files"):
        read_lareqa_dir(tmp_path)
    with pytest.raises(DataError, match="not a directory"):
        read_lareqa_dir(tmp_path / "missing")


def test_requested_language_missing(tmp_path):
    root = _write(tmp_path, {"en": _tiny()})
    with pytest.raises(DataError, match=r"field 'languages': requested language 'de' has no file de\.json.*available: en"):
        read_lareqa_dir(root, ["en", "de"])
    with pytest.raises(DataError, match="unknown language code 'english'"):
        read_lareqa_dir(root, ["english"])
