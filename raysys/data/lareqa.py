"""LAReQA directories (XQuAD-R, MLQA-R): one SQuAD v1.1 `<lang>.json` per language whose
paragraphs also carry `sentences` and `sentence_breaks`.

Candidates are every sentence occurrence of every paragraph (no dedup: that reproduces the
reference counts, e.g. en 1180, 13,014 over XQuAD-R's 11 languages); a question's gold sentence
is the one whose half-open span [b, e) holds `answer_start`. The split key `group` must be the
same for every language version of an article, and titles may be translated (MLQA-R), so
articles linked by a shared question id are one group, named by first appearance:
"article-000", "article-001", ... (for XQuAD-R that is the article's position in the file).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raysys.data.languages import check_language
from raysys.data.schema import PAIR_SCHEMA
from raysys.errors import DataError

CANDIDATE_SCHEMA = pa.schema([("cand_id", pa.int64()), ("lang", pa.string()), ("text", pa.string()),
                              ("group", pa.string()), ("paragraph", pa.string())])
QUESTION_SCHEMA = pa.schema([("id", pa.string()), ("lang", pa.string()), ("text", pa.string()),
                             ("group", pa.string()), ("gold_cand_id", pa.int64())])


@dataclass
class LareqaCorpus:
    pairs: pa.Table         # PAIR_SCHEMA: one row per answerable question per language
    questions: pa.Table     # QUESTION_SCHEMA: the same questions, with their gold candidate
    candidates: pa.Table    # CANDIDATE_SCHEMA: every sentence of every language, cand_id 0..N-1
    skipped: dict[str, int]  # per language: questions whose answer start lies in no sentence
    languages: list[str]
    groups: list[str] = field(default_factory=list)  # in first-appearance order (split order)

    def relevant_by_question(self) -> dict[str, dict[str, int]]:
        """Parallel id -> {language: gold cand_id}: a query's relevant set in every language."""
        relevant: dict[str, dict[str, int]] = {}
        for qid, lang, cand in zip(*(self.questions.column(c).to_pylist()
                                     for c in ("id", "lang", "gold_cand_id"))):
            relevant.setdefault(qid, {})[lang] = cand
        return relevant

    def subset(self, groups: set[str]) -> "LareqaCorpus":
        """Only these groups (e.g. one split); cand_id is re-numbered contiguously."""
        value_set = pa.array(sorted(groups), pa.string())
        keep = pc.is_in(self.candidates.column("group"), value_set=value_set)
        candidates = self.candidates.filter(keep)
        new_id = np.full(len(self.candidates), -1, dtype=np.int64)
        new_id[candidates.column("cand_id").to_numpy()] = np.arange(len(candidates))
        candidates = candidates.set_column(0, "cand_id", pa.array(np.arange(len(candidates))))
        questions = self.questions.filter(pc.is_in(self.questions.column("group"), value_set=value_set))
        gold = new_id[questions.column("gold_cand_id").to_numpy()]
        questions = questions.set_column(4, "gold_cand_id", pa.array(gold))
        pairs = self.pairs.filter(pc.is_in(self.pairs.column("group"), value_set=value_set))
        return replace(self, pairs=pairs, questions=questions, candidates=candidates,
                       groups=[g for g in self.groups if g in groups])


def is_lareqa_dir(path: str) -> bool:
    p = Path(path)
    return p.is_dir() and any(p.glob("*.json")) and not any(p.glob("*.jsonl")) and not any(p.glob("*.parquet"))


def read_lareqa_dir(path: str | Path, languages: list[str] | None = None) -> LareqaCorpus:
    """Read every (or the requested) `<lang>.json` of a LAReQA directory."""
    root = Path(path)
    if not root.is_dir():
        raise DataError("not a directory", file=str(root),
                        hint="expected a LAReQA directory holding one <lang>.json per language")
    files = {check_language(p.stem, file=str(p), field="file name"): p for p in sorted(root.glob("*.json"))
             if not p.name.startswith(".")}  # dotfiles: e.g. the prepare manifest
    if not files:
        raise DataError("no <lang>.json files found", file=str(root),
                        hint="expected e.g. en.json, de.json (run `raysys prepare` for a named dataset)")
    if languages is None:
        languages = sorted(files)
    else:
        languages = [check_language(code, file=str(root), field="languages") for code in languages]
        for lang in languages:
            if lang not in files:
                raise DataError(f"requested language '{lang}' has no file {lang}.json", file=str(root),
                                field="languages", hint=f"available: {', '.join(sorted(files))}")
    parsed = {lang: _parse_file(files[lang]) for lang in languages}
    group_of = _article_groups(languages, parsed)
    return _build_corpus(languages, parsed, group_of, files)


# ---- parsing with precise locations -------------------------------------------------------

LAREQA_HINT = "each <lang>.json must be SQuAD v1.1 JSON whose paragraphs also carry 'sentences' and 'sentence_breaks'"


class _Locator:
    """Type-checked field access that names the file, the JSON path and the field on error."""

    def __init__(self, file: Path | str):
        self.file = str(file)

    def fail(self, jpath: str, key: str | None, message: str, hint: str | None = None) -> DataError:
        return DataError(f"at {jpath}: {message}", file=self.file, field=key, hint=hint or LAREQA_HINT)

    def get(self, obj: Any, key: str, kind: type | tuple[type, ...], jpath: str) -> Any:
        if not isinstance(obj, dict):
            raise self.fail(jpath, key, f"expected an object, got {type(obj).__name__}")
        if key not in obj:
            raise self.fail(jpath, key, "required field is missing")
        value = obj[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
            names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise self.fail(f"{jpath}.{key}", key, f"expected {names}, got {type(value).__name__}",
                            f"make '{key}' a JSON {_JSON_NAMES.get(names, names)}")
        return value


_JSON_NAMES = {"str": "string", "int": "integer", "list": "array", "dict": "object"}


def _parse_file(file: Path) -> list[list[dict]]:
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read: {exc.strerror}", file=str(file),
                        hint="check the path and its permissions") from None
    return parse_lareqa_bytes(data, str(file))


def parse_lareqa_bytes(data: bytes, file: str) -> list[list[dict]]:
    """Articles -> paragraphs -> {context, sentences, breaks, qas, jpath}, all checked; `file`
    names the source in errors (also used by `raysys prepare` before it publishes a file)."""
    if not data.strip():
        raise DataError(f"file is empty ({len(data)} bytes)", file=file,
                        hint="replace it with the dataset's JSON file; for a named dataset rerun `raysys prepare`")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(f"not UTF-8: invalid byte 0x{data[exc.start]:02x} at column {column}", file=file,
                        row=line, hint="re-encode the file as UTF-8") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"malformed JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}",
                        file=file, row=exc.lineno, hint="fix the JSON syntax there, or re-download the file") from None
    loc = _Locator(file)
    articles = []
    for ai, article in enumerate(loc.get(raw, "data", list, "$")):
        paragraphs = []
        for pi, par in enumerate(loc.get(article, "paragraphs", list, f"data[{ai}]")):
            jp = f"data[{ai}].paragraphs[{pi}]"
            context = loc.get(par, "context", str, jp)
            sentences = loc.get(par, "sentences", list, jp)
            breaks = loc.get(par, "sentence_breaks", list, jp)
            _check_sentences(loc, jp, context, sentences, breaks)
            qas = []
            for qi, qa in enumerate(loc.get(par, "qas", list, jp)):
                qp = f"{jp}.qas[{qi}]"
                qid = loc.get(qa, "id", str, qp)
                if not qid.strip():
                    raise loc.fail(f"{qp}.id", "id", "empty question id", "give every question a unique id")
                question = loc.get(qa, "question", str, qp)
                if not question.strip():
                    raise loc.fail(f"{qp}.question", "question", "empty question text",
                                   "fill in the question or drop the entry")
                answers = loc.get(qa, "answers", list, qp)
                if not answers:
                    raise loc.fail(f"{qp}.answers", "answers", "no answer given",
                                   "give at least one answer with an answer_start, or drop the question")
                start = loc.get(answers[0], "answer_start", int, f"{qp}.answers[0]")
                qas.append({"id": qid, "question": question, "start": start, "jpath": qp})
            paragraphs.append({"context": context, "sentences": sentences, "breaks": breaks,
                               "qas": qas, "jpath": jp})
        articles.append(paragraphs)
    return articles


def _check_sentences(loc: _Locator, jp: str, context: str, sentences: list, breaks: list) -> None:
    if len(sentences) != len(breaks):
        raise loc.fail(f"{jp}.sentence_breaks", "sentence_breaks",
                       f"{len(breaks)} breaks for {len(sentences)} sentences",
                       "give one [begin, end] break per sentence")
    previous_end = 0
    for si, (sentence, span) in enumerate(zip(sentences, breaks)):
        if not isinstance(sentence, str):
            raise loc.fail(f"{jp}.sentences[{si}]", "sentences", f"expected str, got {type(sentence).__name__}",
                           "every sentence must be a JSON string")
        ok = (isinstance(span, list) and len(span) == 2 and all(type(x) is int for x in span))
        if not ok or not previous_end <= span[0] <= span[1] <= len(context):
            raise loc.fail(f"{jp}.sentence_breaks[{si}]", "sentence_breaks",
                           f"{span!r} is not an in-order [begin, end] span inside the "
                           f"{len(context)}-character context",
                           "breaks are character offsets into the context, in order")
        previous_end = span[1]


def _article_groups(languages: list[str], parsed: dict[str, list[list[dict]]]) -> dict[tuple[str, int], str]:
    """(lang, article index) -> group: union of the articles that share a question id."""
    parent: dict[tuple[str, int], tuple[str, int]] = {}

    def find(node):
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    first_article_of: dict[str, tuple[str, int]] = {}
    order: list[tuple[str, int]] = []
    position: dict[tuple[str, int], int] = {}
    for lang in languages:
        for ai, paragraphs in enumerate(parsed[lang]):
            node = (lang, ai)
            parent[node] = node
            position[node] = len(order)
            order.append(node)
            for par in paragraphs:
                for qa in par["qas"]:
                    other = first_article_of.setdefault(qa["id"], node)
                    a, b = find(node), find(other)
                    if a != b:  # keep the earlier-seen root so names follow first appearance
                        parent[max(a, b, key=position.get)] = min(a, b, key=position.get)
    names: dict[tuple[str, int], str] = {}
    width = max(3, len(str(len(order))))
    for node in order:
        root = find(node)
        if root not in names:
            names[root] = f"article-{len(names):0{width}d}"
    return {node: names[find(node)] for node in order}


def _build_corpus(languages, parsed, group_of, files) -> LareqaCorpus:
    cand = {name: [] for name in CANDIDATE_SCHEMA.names}
    ques = {name: [] for name in QUESTION_SCHEMA.names}
    pairs = {name: [] for name in PAIR_SCHEMA.names}
    skipped: dict[str, int] = {}
    groups: list[str] = []
    for lang in languages:
        file = str(files[lang])
        seen_ids: dict[str, str] = {}
        paragraphs_in_group: dict[str, int] = {}
        skipped[lang] = mismatched = 0
        for ai, paragraphs in enumerate(parsed[lang]):
            group = group_of[(lang, ai)]
            if group not in paragraphs_in_group:
                paragraphs_in_group[group] = 0
                if group not in groups:
                    groups.append(group)
            for par in paragraphs:
                paragraph_key = f"{group}/p{paragraphs_in_group[group]}"
                paragraphs_in_group[group] += 1
                first_cand = len(cand["cand_id"])
                for sentence, (b, e) in zip(par["sentences"], par["breaks"]):
                    mismatched += par["context"][b:e] != sentence
                    for key, value in zip(CANDIDATE_SCHEMA.names,
                                          (len(cand["cand_id"]), lang, sentence, group, paragraph_key)):
                        cand[key].append(value)
                for qa in par["qas"]:
                    if qa["id"] in seen_ids:
                        raise DataError(f"at {qa['jpath']}: duplicate question id {qa['id']!r} "
                                        f"(first at {seen_ids[qa['id']]})", file=file, field="id",
                                        hint="question ids must be unique within a language file")
                    seen_ids[qa["id"]] = qa["jpath"]
                    gold = next((si for si, (b, e) in enumerate(par["breaks"]) if b <= qa["start"] < e), None)
                    if gold is None:
                        skipped[lang] += 1
                        continue
                    for key, value in zip(QUESTION_SCHEMA.names,
                                          (qa["id"], lang, qa["question"], group, first_cand + gold)):
                        ques[key].append(value)
                    for key, value in zip(PAIR_SCHEMA.names,
                                          (qa["id"], lang, qa["question"], par["sentences"][gold], None,
                                           par["context"], group, f"{file}:{qa['jpath']}")):
                        pairs[key].append(value)
        if skipped[lang]:  # LAReQA drops these too; say how many so a bad file is noticed
            warnings.warn(f"{file}: {skipped[lang]} question(s) skipped: answer start lies in no sentence",
                          stacklevel=3)
        if mismatched:  # a known quirk of the published tr.json (mojibake shifts two spans)
            warnings.warn(f"{file}: {mismatched} sentence(s) differ from context[begin:end]; "
                          "the sentence text is used as given", stacklevel=3)
    return LareqaCorpus(pairs=pa.table(pairs, schema=PAIR_SCHEMA),
                        questions=pa.table(ques, schema=QUESTION_SCHEMA),
                        candidates=pa.table(cand, schema=CANDIDATE_SCHEMA),
                        skipped=skipped, languages=list(languages), groups=groups)
