"""Bad inputs, one row each: every one gives a one-line error naming the file, the line/row and
the field (where there is one) and what to do; nothing half-written is left behind; the CLI
prints that line and exits 2, without a traceback.

Two tables: LIBRARY_CASES call the loaders and Config directly (fast); CLI_CASES run
`python -m raysys.cli` as subprocesses. The CLI cases that need Ray connect to the test
session's local Ray (RAY_ADDRESS) instead of each starting their own, and all CLI cases run
concurrently, so the whole file stays under a minute. docs/reliability.md lists these rows
next to the faults other test files cover.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from raysys.config import Config
from raysys.errors import ConfigError, DataError, RaysysError

pytestmark = pytest.mark.timeout(300)


# ---- small valid inputs, broken one defect at a time ----------------------------------------

PAIR = {"id": "a", "lang": "en", "query": "Who?", "passage": "Ann did."}


def jsonl(path: Path, rows: list) -> Path:
    """Rows as JSONL; a str row is written verbatim, a bytes row as raw bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = b"".join((r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode())
                    + b"\n" for r in rows)
    path.write_bytes(data)
    return path


def lareqa_doc(ids: list[str], lang: str = "en", articles: int = 1) -> dict:
    """A valid LAReQA (SQuAD v1.1 + sentences) document: each id one question, spread over articles."""
    context = "Alpha is first. Beta is second."
    per_article = -(-len(ids) // articles)
    data = []
    for a in range(articles):
        chunk = ids[a * per_article:(a + 1) * per_article]
        data.append({"title": f"T{a}", "paragraphs": [{
            "context": context, "sentences": ["Alpha is first.", "Beta is second."],
            "sentence_breaks": [[0, 15], [16, 31]],
            "qas": [{"id": qid, "question": f"What is {qid}? ({lang})",
                     "answers": [{"answer_start": 0 if i % 2 == 0 else 16, "text": "x"}]}
                    for i, qid in enumerate(chunk)]}]})
    return {"version": "1.1", "data": data}


def lareqa_dir(root: Path, docs: dict[str, dict | str | bytes]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for lang, doc in docs.items():
        path = root / f"{lang}.json"
        if isinstance(doc, bytes):
            path.write_bytes(doc)
        else:
            path.write_text(doc if isinstance(doc, str) else json.dumps(doc, indent=1), encoding="utf-8")
    return root


def qa(doc: dict, article: int = 0, question: int = 0) -> dict:
    return doc["data"][article]["paragraphs"][0]["qas"][question]


def yaml_file(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


# ---- library cases --------------------------------------------------------------------------

@dataclass
class Case:
    trigger: Callable[[Path, pytest.FixtureRequest], object]  # must raise
    error: type[Exception]
    file: str | None  # a substring of the named file (its base name), or the override
    where: str | None  # "row 2", "line 3" or a JSON path
    field: str | None
    todo: str  # a substring of the advice on what to do


def _validate_jsonl(rows):
    from raysys.data.files import validate_pairs_file

    return lambda tmp, _: validate_pairs_file(jsonl(tmp / "pairs.jsonl", rows))


def _read_lareqa(docs, languages=None):
    from raysys.data.lareqa import read_lareqa_dir

    return lambda tmp, _: read_lareqa_dir(lareqa_dir(tmp / "lareqa", docs), languages)


def _edited(edit: Callable[[dict], None], lang: str = "en") -> dict:
    doc = copy.deepcopy(lareqa_doc(["q1", "q2"], lang))
    edit(doc)
    return doc


def _config_yaml(text: str | bytes, overrides=()):
    return lambda tmp, _: Config.from_yaml(yaml_file(tmp / "bad.yaml", text), list(overrides))


def _capacity(ids_per_language: dict[str, int], multilingual: int, *overrides: str):
    def trigger(tmp, _):
        from raysys.train.datasets import DataFacts, check_batch_capacity

        facts = DataFacts(languages=sorted(ids_per_language), ids_per_language=ids_per_language,
                          multilingual_ids=multilingual, total_ids=max(ids_per_language.values()),
                          has_hard_negatives=False, num_rows=sum(ids_per_language.values()))
        check_batch_capacity(facts, Config.from_yaml(None, list(overrides)))
    return trigger


def _model_copy(tmp: Path, request, drop: tuple[str, ...] = ()) -> Path:
    source = request.getfixturevalue("tiny_model_dir")
    target = tmp / "model"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*drop) if drop else None)
    return target


def _load_model(drop=(), extra_tokens: int = 0, missing: bool = False, name: str | None = None):
    def trigger(tmp, request):
        from transformers import AutoTokenizer

        from raysys.model.encoder import BiEncoder

        if name is not None:  # a hub id: HF_HUB_OFFLINE=1 in tests, so it cannot be fetched
            return BiEncoder.from_pretrained(name)
        if missing:
            return BiEncoder.from_pretrained(str(tmp / "no-such-dir" / "model"))
        path = _model_copy(tmp, request, drop)
        if extra_tokens:  # a tokenizer that does not belong to this model: more ids than embeddings
            tokenizer = AutoTokenizer.from_pretrained(path)
            tokenizer.add_tokens([f"newtoken{i}" for i in range(extra_tokens)])
            tokenizer.save_pretrained(path)
        return BiEncoder.from_pretrained(str(path))
    return trigger


def _miracl(topics: str, qrels: str, corpus: list):
    def trigger(tmp, _):
        from raysys.eval.corpus_stream import corpus_slices, read_corpus_slice
        from raysys.eval.miracl import check_qrels_against_corpus, read_qrels, read_topics

        root = tmp / "miracl" / "en"
        root.mkdir(parents=True)
        (root / "topics.tsv").write_text(topics, encoding="utf-8")
        (root / "qrels.tsv").write_text(qrels, encoding="utf-8")
        jsonl(root / "corpus.jsonl", corpus)
        read_topics(root / "topics.tsv")
        judged = read_qrels(root / "qrels.tsv")
        corpus_path = str(root / "corpus.jsonl")  # read as the encoder actors read it, in byte ranges
        docids = {d for start, end in corpus_slices(corpus_path, 16) for d in read_corpus_slice(corpus_path, start, end)[0]}
        check_qrels_against_corpus(judged, docids, root / "qrels.tsv")
    return trigger


def _prepare_unhashed(bad: bytes):
    def trigger(tmp, request):
        from raysys.data import prepare

        monkeypatch = request.getfixturevalue("monkeypatch")
        monkeypatch.setenv("RAYSYS_CACHE", str(tmp / "cache"))
        monkeypatch.delenv(prepare.SOURCE_ENV, raising=False)
        source = tmp / "mlqa-src"
        source.mkdir()
        for file in prepare.DATASETS["mlqa-r"].files:
            (source / file).write_text('{"data": []}')
        (source / "de.json").write_bytes(bad)
        try:
            prepare.resolve_dataset("mlqa-r", source_dir=source)
        finally:  # nothing half-written: no dataset directory, no staging directory
            leftovers = list((tmp / "cache" / "data").iterdir()) if (tmp / "cache" / "data").exists() else []
            assert leftovers == [], leftovers
    return trigger


LATIN1_DOC = (json.dumps(lareqa_doc(["q1"]), indent=1, ensure_ascii=False)
              .replace("What is q1?", "Qué es q1?").encode("latin-1"))
LATIN1_LINE = LATIN1_DOC[:LATIN1_DOC.index("Qu".encode())].count(b"\n") + 1
GOOD_DOCS = [{"docid": "d1", "title": "t", "text": "x"}, {"docid": "d2", "title": "", "text": "y"}]
LAREQA_QA = "data[0].paragraphs[0].qas[0]"

LIBRARY_CASES = {
    # JSONL / Parquet user corpora (raysys.data.files)
    "jsonl-malformed-line": Case(_validate_jsonl([PAIR, '{"id": "b", "lang": "en", "query": "Q?"']),
                                 DataError, "pairs.jsonl", "row 2", None, "one complete JSON object"),
    "jsonl-wrong-type": Case(_validate_jsonl([PAIR, {**PAIR, "id": "b", "query": 42}]),
                             DataError, "pairs.jsonl", "row 2", "query", "JSON string"),
    "jsonl-missing-field": Case(_validate_jsonl([{"id": "a", "lang": "en", "query": "Q?"}]),
                                DataError, "pairs.jsonl", "row 1", "passage", "every row needs"),
    "jsonl-empty-field": Case(_validate_jsonl([PAIR, {**PAIR, "id": "b", "passage": "   "}]),
                              DataError, "pairs.jsonl", "row 2", "passage", "fill it in"),
    "jsonl-non-utf8": Case(_validate_jsonl([PAIR, '{"id": "b", "lang": "fr", "query": "Où?", "passage": "Là."}'
                                            .encode("latin-1")]),
                           DataError, "pairs.jsonl", "row 2", None, "re-encode the file as UTF-8"),
    "jsonl-duplicate-id-in-language": Case(_validate_jsonl([PAIR, {**PAIR, "lang": "de"}, {**PAIR, "query": "Again?"}]),
                                           DataError, "pairs.jsonl", "row 3", "id", "once per language"),
    "jsonl-unknown-language": Case(_validate_jsonl([{**PAIR, "lang": "english"}]),
                                   DataError, "pairs.jsonl", "row 1", "lang", "ISO 639-1"),
    "jsonl-zero-length-file": Case(_validate_jsonl([]), DataError, "pairs.jsonl", None, None,
                                   "one JSON object per line"),
    # LAReQA directories (raysys.data.lareqa)
    "lareqa-malformed-json": Case(_read_lareqa({"en": json.dumps(lareqa_doc(["q1"]), indent=1)[:-30]}),
                                  DataError, "en.json", "row ", None, "fix the JSON syntax"),
    "lareqa-wrong-type": Case(_read_lareqa({"en": _edited(lambda d: qa(d)["answers"][0].update(answer_start="0"))}),
                              DataError, "en.json", LAREQA_QA, "answer_start", "JSON integer"),
    "lareqa-missing-field": Case(_read_lareqa({"en": _edited(lambda d: d["data"][0]["paragraphs"][0]
                                                             .pop("sentences"))}),
                                 DataError, "en.json", "data[0].paragraphs[0]", "sentences", "sentence_breaks"),
    "lareqa-empty-field": Case(_read_lareqa({"en": _edited(lambda d: qa(d).update(question=" "))}),
                               DataError, "en.json", LAREQA_QA, "question", "fill in the question"),
    "lareqa-non-utf8": Case(_read_lareqa({"en": LATIN1_DOC}), DataError, "en.json", f"row {LATIN1_LINE}", None,
                            "re-encode the file as UTF-8"),
    "lareqa-zero-length-file": Case(_read_lareqa({"de": lareqa_doc(["q1"], "de"), "en": b""}),
                                    DataError, "en.json", None, None, "replace it"),
    "lareqa-duplicate-id-in-language": Case(_read_lareqa({"en": _edited(lambda d: qa(d, 0, 1).update(id="q1"))}),
                                            DataError, "en.json", "data[0].paragraphs[0].qas[1]", "id",
                                            "unique within a language file"),
    "lareqa-unknown-language-file": Case(_read_lareqa({"en": lareqa_doc(["q1"]), "xx": lareqa_doc(["q1"])}),
                                         DataError, "xx.json", None, "file name", "ISO 639-1"),
    "lareqa-unknown-language-requested": Case(_read_lareqa({"en": lareqa_doc(["q1"])}, ["english"]),
                                              DataError, "lareqa", None, "languages", "ISO 639-1"),
    # Configuration (raysys.config)
    "config-malformed-yaml": Case(_config_yaml("name: x\ntrain:\n  alpha: [0.5\n  lr: 1e-3\n"),
                                  ConfigError, "bad.yaml", "line 4", None, "fix the YAML syntax"),
    "config-unknown-key": Case(_config_yaml("train:\n  alpah: 0.5\n"),
                               ConfigError, "bad.yaml", "line 2", "train.alpah", "did you mean 'train.alpha'"),
    "config-wrong-value-type": Case(_config_yaml("train:\n  alpha: 0.5\n  global_batch_size: sixteen\n"),
                                    ConfigError, "bad.yaml", "line 3", "train.global_batch_size", "an integer"),
    "config-alpha-above-1": Case(_config_yaml("name: x\ntrain:\n  alpha: 1.5\n"),
                                 ConfigError, "bad.yaml", "line 3", "train.alpha", "between 0"),
    "config-alpha-below-0-override": Case(_config_yaml("train:\n  alpha: 0.5\n", ["train.alpha=-0.1"]),
                                          ConfigError, "override 'train.alpha=-0.1'", None, "train.alpha", "between 0"),
    "config-missing-file": Case(lambda tmp, _: Config.from_yaml(tmp / "nope.yaml"),
                                ConfigError, "nope.yaml", None, None, "check the --config path"),
    "config-override-without-equals": Case(lambda tmp, _: Config.from_yaml(None, ["train.alpha"]),
                                           ConfigError, "override 'train.alpha'", None, None, "train.alpha=0.5"),
    "config-duplicate-key": Case(_config_yaml("train:\n  lr: 1e-3\n  lr: 1e-4\n"),
                                 ConfigError, "bad.yaml", "line 3", "train.lr", "first on line 2"),
    "config-section-not-mapping": Case(_config_yaml("name: x\ntrain: 5\n"),
                                       ConfigError, "bad.yaml", "line 2", "train", "indented 'key: value'"),
    "config-null-value": Case(_config_yaml("train:\n  epochs:\n"),
                              ConfigError, "bad.yaml", "line 2", "train.epochs", "delete the line"),
    "config-non-utf8": Case(_config_yaml(b"name: x\nname2: \xff\n"),
                            ConfigError, "bad.yaml", "line 2", None, "save the config as UTF-8"),
    "config-unknown-language": Case(_config_yaml("data:\n  languages: [en, english]\n"),
                                    ConfigError, "bad.yaml", "line 2", "data.languages", "ISO 639-1"),
    # Data that cannot fill the requested batches (raysys.train.datasets, on the driver)
    "batch-larger-than-parallel-ids": Case(_capacity({"de": 40, "en": 6}, 6, "train.global_batch_size=8"),
                                           ConfigError, None, None, None, "lower the batch size"),
    "cross-lingual-ids-in-one-language": Case(_capacity({"de": 20, "en": 20}, 0, "train.alpha=0.5"),
                                              ConfigError, None, None, None, "cross-lingual batches"),
    # Models (raysys.model.encoder)
    "model-path-missing": Case(_load_model(missing=True), ConfigError, "no-such-dir", None,
                               "model.name_or_path", "give a local model directory"),
    "model-hub-id-unavailable": Case(_load_model(name="no-such-org/no-such-model"), ConfigError,
                                     "no-such-org/no-such-model", None, "model.name_or_path", "give a model directory"),
    "model-tokenizer-mismatch": Case(_load_model(extra_tokens=50), ConfigError, "model", None,
                                     "model.name_or_path", "tokenizer that was saved with this model"),
    "model-weights-missing": Case(_load_model(drop=("*.safetensors",)), ConfigError, "model", None,
                                  "model.name_or_path", "give a complete model directory"),
    "model-tokenizer-missing": Case(_load_model(drop=("tokenizer*", "special_tokens_map.json")), ConfigError,
                                    "model", None, "model.name_or_path", "save the model's tokenizer"),
    # MIRACL-style evaluation data (raysys.eval.miracl)
    "qrels-unknown-docid": Case(_miracl("q1\tWhat?\n", "q1 Q0 d1 1\nq1 Q0 d9 1\n", GOOD_DOCS),
                                DataError, "qrels.tsv", "row 2", "docid", "use the corpus the qrels were made for"),
    "miracl-corpus-malformed-line": Case(_miracl("q1\tWhat?\n", "q1 Q0 d1 1\n", GOOD_DOCS + ['{"docid": "d3",']),
                                         DataError, "corpus.jsonl", "row 3", "json", "one complete JSON object"),
    "miracl-zero-length-topics": Case(_miracl("", "q1 Q0 d1 1\n", GOOD_DOCS),
                                      DataError, "topics.tsv", None, None, "written completely"),
    # Named datasets (raysys.data.prepare): validated before anything is published
    "prepare-unhashed-malformed": Case(_prepare_unhashed(b'{"data": [\n  {"title": "T",\n'),
                                       DataError, "mlqa-src/de.json", "row 3", None, "fix the JSON syntax"),
}


def assert_one_line_located(message: str, case: Case) -> None:
    assert "\n" not in message and "Traceback" not in message, message
    for part in (case.file, case.where, case.todo):
        if part is not None:
            assert part in message, f"{part!r} not in: {message}"
    if case.field is not None:
        assert f"field '{case.field}'" in message, message


@pytest.mark.parametrize("name", list(LIBRARY_CASES))
def test_library_bad_input(name, tmp_path, request):
    case = LIBRARY_CASES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(case.error) as info:
            case.trigger(tmp_path, request)
    assert isinstance(info.value, RaysysError)  # so the CLI prints it as one line, exit 2
    assert_one_line_located(str(info.value), case)


def test_answer_outside_every_sentence_is_skipped_with_a_counted_warning(tmp_path):
    """Not an error: LAReQA drops such questions; we drop them too and say how many."""
    from raysys.data.lareqa import read_lareqa_dir

    doc = lareqa_doc(["q1", "q2", "q3"])
    qa(doc, 0, 1)["answers"][0]["answer_start"] = 15  # the gap between the two sentences
    qa(doc, 0, 2)["answers"][0]["answer_start"] = 999  # past the end of the context
    with pytest.warns(UserWarning, match=r"en\.json: 2 question\(s\) skipped: answer start lies in no sentence"):
        corpus = read_lareqa_dir(lareqa_dir(tmp_path, {"en": doc, "de": lareqa_doc(["q1", "q2", "q3"], "de")}))
    assert corpus.skipped == {"de": 0, "en": 2}
    assert corpus.pairs.num_rows == 4 and corpus.questions.num_rows == 4


# ---- faults with something half-written: the complete state survives ------------------------

def test_fault_atomic_json_write_leaves_the_old_file_when_interrupted(tmp_path, monkeypatch):
    """Checkpoint state is written temp file + fsync + rename: a crash before the rename leaves
    the previous complete file, never a torn one."""
    from raysys.train import checkpoint

    target = tmp_path / checkpoint.STATE_FILE
    checkpoint.write_json_atomic(target, {"global_step": 4})

    def crash(*args):
        raise OSError("killed mid-write")

    monkeypatch.setattr(checkpoint.os, "replace", crash)
    with pytest.raises(OSError, match="killed"):
        checkpoint.write_json_atomic(target, {"global_step": 8})
    assert json.loads(target.read_text()) == {"global_step": 4}


def test_fault_resume_skips_an_incomplete_checkpoint(tmp_path):
    """Resuming from a run directory takes the newest *complete* checkpoint; naming a torn one
    directly is a one-line RaysysError that says what to do."""
    from raysys.train.checkpoint import STATE_FILE, latest_checkpoint_dir, write_json_atomic

    run = tmp_path / "run"
    for name, step in (("checkpoint_000000", 4), ("checkpoint_000001", 8)):
        (run / name).mkdir(parents=True)
        write_json_atomic(run / name / STATE_FILE, {"global_step": step})
    (run / "checkpoint_000002").mkdir()
    (run / "checkpoint_000002" / STATE_FILE).write_text('{"global_step": 1')  # crashed mid-write
    (run / "checkpoint_000003").mkdir()  # crashed before the state was written
    assert latest_checkpoint_dir(run) == str(run / "checkpoint_000001")
    with pytest.raises(RaysysError) as info:
        latest_checkpoint_dir(run / "checkpoint_000002")
    message = str(info.value)
    assert "\n" not in message and STATE_FILE in message and "resume from the run directory" in message
    with pytest.raises(RaysysError, match="no complete raysys checkpoint"):
        latest_checkpoint_dir(run / "checkpoint_000003")


def test_fault_eval_resume_encodes_only_missing_or_torn_shards(tmp_path, monkeypatch):
    """Embedding shards are written atomically and reused: after an interruption only the shards
    that are missing or unreadable are encoded again (the fake encoder records what it gets)."""
    import numpy as np
    import ray.data

    from raysys.eval import encode
    from raysys.model.encoder import EncoderSettings

    texts = [f"text {i}" for i in range(10)]
    rows = np.arange(8)
    embeddings = np.repeat(rows[:, None].astype(np.float32), 4, axis=1)
    encode._write_shard(tmp_path / "c-00000.npz", rows[:4], embeddings[:4])
    encode._write_shard(tmp_path / "c-00001.npz", rows[4:], embeddings[4:])
    (tmp_path / "c-00001.npz").write_bytes((tmp_path / "c-00001.npz").read_bytes()[:50])  # torn
    requested = []

    class FakeDataset:  # the pipeline and its encoder actors: each shard written as 100 + row
        def __init__(self, tables):
            self.shards = [(t["path"][0].as_py(), t["first"][0].as_py(), len(t["texts"][0])) for t in tables]
            for _, first, n in self.shards:
                requested.extend(range(first, first + n))

        def map_batches(self, *args, **kwargs):
            return self

        def iter_batches(self, **kwargs):
            for path, first, n in self.shards:
                shard_rows = np.arange(first, first + n)
                encode._write_shard(path, shard_rows, np.repeat((100 + shard_rows)[:, None].astype(np.float32), 4, 1))
                yield {"path": np.array([path]), "rows": np.array([n])}

    monkeypatch.setattr(ray.data, "from_arrow", FakeDataset)
    out = encode.encode_texts(texts, "passage", model_path="unused", settings=EncoderSettings(), out_dir=tmp_path,
                              name="c", shard_size=4, progress=False)
    assert sorted(requested) == [4, 5, 6, 7, 8, 9]  # shard 0 was complete: not encoded again
    assert out[:4, 0].tolist() == [0, 1, 2, 3] and out[4:, 0].tolist() == [104, 105, 106, 107, 108, 109]
    requested.clear()
    again = encode.encode_texts(texts, "passage", model_path="unused", settings=EncoderSettings(), out_dir=tmp_path,
                                name="c", shard_size=4, progress=False)
    assert requested == [] and np.array_equal(again, out)  # a finished run is pure reuse


def test_library_table_is_large_enough():
    assert len(LIBRARY_CASES) + len(CLI_CASES) >= 20 and len(CLI_CASES) >= 8


# ---- CLI cases: subprocesses, one line on stderr, exit code 2 -------------------------------

@dataclass
class CliCase:
    setup: Callable[[Path, dict], list[str]]  # (case dir, fixtures) -> argv after `raysys`
    file: str | None
    where: str | None
    field: str | None
    todo: str
    needs_ray: bool = False
    clean: tuple[str, ...] = ()  # paths under the case dir that must not exist afterwards


def _cli_config(text: str, *overrides: str) -> Callable:
    return lambda d, _: ["train", "--config", str(yaml_file(d / "bad.yaml", text)), *overrides]


def _cli_prepare_corrupted_xquad(d: Path, fx: dict) -> list[str]:
    source = d / "src"
    shutil.copytree(fx["xquad_r_dir"], source, ignore=shutil.ignore_patterns("LICENSE"))
    for f in source.iterdir():
        f.chmod(0o644)
    with open(source / "de.json", "ab") as handle:
        handle.write(b"\n")  # one stray byte: the SHA-256 check catches it
    return ["prepare", "--dataset", "xquad-r", "--source-dir", str(source), "--model", ""]


def _cli_prepare_malformed_mlqa(d: Path, fx: dict) -> list[str]:
    source = d / "src"
    source.mkdir()
    for lang in ("ar", "de", "en", "es", "hi", "vi", "zh"):
        (source / f"{lang}.json").write_text(json.dumps(lareqa_doc(["q1"], lang), indent=1))
    (source / "hi.json").write_text(json.dumps(lareqa_doc(["q1"], "hi"), indent=1).replace('"qas"', '"qas" 1', 1))
    return ["prepare", "--dataset", "mlqa-r", "--source-dir", str(source), "--model", ""]


def _cli_train_bad_jsonl(d: Path, fx: dict) -> list[str]:
    data = jsonl(d / "train.jsonl", [PAIR, {**PAIR, "lang": "de"}, {**PAIR, "id": "b", "query": ["Who?"]}])
    return ["train", f"data.train={data}", f"model.name_or_path={fx['tiny_model_dir']}", f"output_dir={d / 'out'}"]


def _cli_train_missing_data(d: Path, fx: dict) -> list[str]:
    return ["train", f"data.train={d / 'no-such.jsonl'}", f"model.name_or_path={fx['tiny_model_dir']}",
            f"output_dir={d / 'out'}"]


def _cli_train_one_language_ids(d: Path, fx: dict) -> list[str]:
    root = lareqa_dir(d / "lareqa", {"en": lareqa_doc([f"e{i}" for i in range(12)], "en", articles=3),
                                     "de": lareqa_doc([f"g{i}" for i in range(12)], "de", articles=3)})
    return ["train", f"data.train={root}", f"model.name_or_path={fx['tiny_model_dir']}", f"output_dir={d / 'out'}",
            "data.validation_fraction=0", "data.test_fraction=0", "train.global_batch_size=4", "train.alpha=0.5"]


def _cli_eval_bad_lareqa(d: Path, fx: dict) -> list[str]:
    bad = _edited(lambda doc: qa(doc, 0, 1)["answers"][0].update(answer_start=None), "de")
    root = lareqa_dir(d / "lareqa", {"en": lareqa_doc(["q1", "q2"]), "de": bad})
    return ["eval", "--model", str(fx["tiny_model_dir"]), "--out", str(d / "report"), "--datasets", str(root)]


def _cli_eval_miracl_unknown_docid(d: Path, fx: dict) -> list[str]:
    lang = d / "miracl" / "de"
    lang.mkdir(parents=True)
    (lang / "topics.tsv").write_text("q1\tWas?\nq2\tWer?\n")
    (lang / "qrels.tsv").write_text("q1 Q0 d1 1\nq2 Q0 d2 1\nq2 Q0 d7 0\n")
    jsonl(lang / "corpus.jsonl", GOOD_DOCS)
    return ["eval", "--model", str(fx["tiny_model_dir"]), "--out", str(d / "report"),
            "--datasets", f"miracl:{d / 'miracl'}"]


CLI_CASES = {
    "cli-config-malformed-yaml": CliCase(_cli_config("train:\n  alpha: 0.5\n lr: 1e-3\n"),
                                         "bad.yaml", "line 3", None, "fix the YAML syntax"),
    "cli-config-unknown-key": CliCase(_cli_config("model:\n  poolin: cls\n"),
                                      "bad.yaml", "line 2", "model.poolin", "did you mean 'model.pooling'"),
    "cli-config-alpha-out-of-range": CliCase(_cli_config("train:\n  alpha: 0.5\n", "train.alpha=2"),
                                             "override 'train.alpha=2'", None, "train.alpha", "between 0"),
    "cli-override-without-equals": CliCase(lambda d, _: ["train", "train.alpha", "0.5"],
                                           "override 'train.alpha'", None, None, "train.alpha=0.5"),
    "cli-prepare-corrupted-file": CliCase(_cli_prepare_corrupted_xquad, "src/de.json", None, None,
                                          "replace it with the published LAReQA file", clean=("cache/data/xquad-r",)),
    "cli-prepare-malformed-json": CliCase(_cli_prepare_malformed_mlqa, "src/hi.json", "row ", None,
                                          "fix the JSON syntax", clean=("cache/data/mlqa-r",)),
    "cli-train-bad-jsonl-row": CliCase(_cli_train_bad_jsonl, "train.jsonl", "row 3", "query", "JSON string",
                                       needs_ray=True, clean=("out",)),
    "cli-train-missing-data": CliCase(_cli_train_missing_data, "no-such.jsonl", None, None, "data.train path",
                                      needs_ray=True, clean=("out",)),
    # The batch check needs the data's counts, which come with bucketing it: the complete corpus
    # (manifest included) stays under out/ray/corpora for the next run, as a prepared dataset would.
    "cli-train-ids-in-one-language": CliCase(_cli_train_one_language_ids, None, None, None,
                                             "cross-lingual batches", needs_ray=True),
    "cli-eval-bad-lareqa-field": CliCase(_cli_eval_bad_lareqa, "de.json", "data[0].paragraphs[0].qas[1]",
                                         "answer_start", "JSON integer", needs_ray=True, clean=("report",)),
    "cli-eval-qrels-unknown-docid": CliCase(_cli_eval_miracl_unknown_docid, "qrels.tsv", "row 3", "docid",
                                            "use the corpus the qrels were made for", needs_ray=True,
                                            clean=("report",)),
}

# Ray's own log lines (e.g. "2026-01-01 10:00:00,000	INFO worker.py:... -- Connecting to ...") are
# not ours to silence here; everything else on stderr must be the one error line.
RAY_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(DEBUG|INFO|WARNING)\s")


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, request):
    """Run every CLI case once, concurrently; {name: (CompletedProcess, case dir, seconds)}.
    The cases without Ray run while the session's local Ray starts; the others then connect to it."""
    fixtures = {"tiny_model_dir": request.getfixturevalue("tiny_model_dir")}
    try:
        fixtures["xquad_r_dir"] = request.getfixturevalue("xquad_r_dir")
    except pytest.skip.Exception:
        pass
    root = tmp_path_factory.mktemp("cli")
    ray_address: list[str] = []

    def run(name: str):
        case = CLI_CASES[name]
        if "xquad_r_dir" not in fixtures and case.setup is _cli_prepare_corrupted_xquad:
            return None
        case_dir = root / name
        case_dir.mkdir()
        argv = case.setup(case_dir, fixtures)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAYSYS_"))}
        env.update(RAYSYS_CACHE=str(case_dir / "cache"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
        if case.needs_ray:
            env["RAY_ADDRESS"] = ray_address[0]
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "raysys.cli", *argv], cwd=case_dir, env=env,
                              capture_output=True, text=True, timeout=240)
        return done, case_dir, time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=6) as pool:
        futures = {name: pool.submit(run, name) for name, c in CLI_CASES.items() if not c.needs_ray}
        if any(c.needs_ray for c in CLI_CASES.values()):
            ray_address.append(request.getfixturevalue("ray_local").get_runtime_context().gcs_address)
            print(f"\nray ready after {time.perf_counter() - start:.1f} s")  # timings show with pytest -s
            futures.update({name: pool.submit(run, name) for name, c in CLI_CASES.items() if c.needs_ray})
        results = {name: futures[name].result() for name in CLI_CASES}
    for name, result in results.items():
        print(f"{name}: {result[2]:.1f} s" if result else f"{name}: skipped")
    return results


@pytest.mark.parametrize("name", list(CLI_CASES))
def test_cli_bad_input(name, cli_runs):
    if cli_runs[name] is None:
        pytest.skip("XQuAD-R files not available")
    done, case_dir, seconds = cli_runs[name]
    case = CLI_CASES[name]
    report = (f"exit {done.returncode} after {seconds:.1f} s\nstderr:\n{done.stderr}\n"
              f"stdout tail:\n{done.stdout[-2000:]}")
    assert done.returncode == 2, report
    assert "Traceback" not in done.stderr, report
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    ours = [line for line in lines if line.startswith("raysys ")]
    assert len(ours) == 1 and lines[-1] == ours[0], report
    assert re.match(r"raysys (train|eval|prepare): error: ", ours[0]), report
    others = [line for line in lines if line is not ours[0]]
    if case.needs_ray:
        assert all(RAY_LOG_LINE.match(line) for line in others), report
    else:
        assert others == [], report
    assert_one_line_located(ours[0], Case(None, RaysysError, case.file, case.where, case.field, case.todo))
    for path in case.clean:  # nothing half-written
        assert not (case_dir / path).exists(), f"{path} was left behind"
    data_dir = case_dir / "cache" / "data"
    assert not data_dir.exists() or list(data_dir.iterdir()) == [], list(data_dir.iterdir())
