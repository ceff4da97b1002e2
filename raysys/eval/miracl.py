"""MIRACL-style data (topics TSV, TREC qrels) and run scoring; the JSONL passages are read by the
encoder actors (`raysys.eval.corpus_stream`).

Errors are `DataError`s naming the file, the 1-based line number (as `row`) and the field.
Files ending in `.gz` are read through gzip (MIRACL ships its corpus as jsonl.gz shards).
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from raysys.errors import DataError
from raysys.eval.metrics import fraction_recall_at_k, mrr_at_k, ndcg_at_k

QRELS_FIELDS = ("qid", "iter", "docid", "rel")


def _lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number, text without newline), decoding per line so a bad byte names its line."""
    opener = gzip.open if str(path).endswith(".gz") else open
    line_no = 0
    try:
        with opener(path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                try:
                    text = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as e:
                    raise DataError(f"not valid UTF-8 ({e.reason})", file=str(path), row=line_no,
                                    hint="re-encode the file as UTF-8") from None
                yield line_no, text
    except FileNotFoundError:
        raise DataError("file not found", file=str(path),
                        hint="a MIRACL-style language directory holds topics.tsv, qrels.tsv and corpus.jsonl") from None
    except (OSError, EOFError) as e:  # e.g. a truncated or non-gzip .gz file
        raise DataError(f"cannot read: {e}", file=str(path), row=line_no + 1 if line_no else None,
                        hint="re-download or re-compress the file") from None


def _require_entries(entries: dict, path: str | Path, what: str) -> None:
    if not entries:
        raise DataError(f"no {what} (the file is empty or blank)", file=str(path),
                        hint="check that the file was written completely")


def read_topics(path: str | Path) -> dict[str, str]:
    """`qid<TAB>text` per line (no header; blank lines skipped) -> {qid: text}."""
    topics: dict[str, str] = {}
    for line_no, line in _lines(path):
        if not line.strip():
            continue
        qid, sep, text = line.partition("\t")
        qid = qid.strip()
        if not qid:
            raise DataError("empty query id", file=str(path), row=line_no, field="qid",
                            hint="each line is 'qid<TAB>query text'")
        if not sep or not text.strip():
            raise DataError("missing query text", file=str(path), row=line_no, field="text",
                            hint="each line is 'qid<TAB>query text', separated by a tab")
        if qid in topics:
            raise DataError(f"duplicate query id {qid!r}", file=str(path), row=line_no, field="qid",
                            hint="query ids must be unique; drop or rename the repeat")
        topics[qid] = text.strip()
    _require_entries(topics, path, "queries")
    return topics


def _qrels_rows(path: str | Path) -> Iterator[tuple[int, str, str, int]]:
    for line_no, line in _lines(path):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != len(QRELS_FIELDS):
            missing = QRELS_FIELDS[min(len(parts), len(QRELS_FIELDS) - 1)]
            raise DataError(f"expected 4 whitespace-separated fields 'qid Q0 docid rel', got {len(parts)}",
                            file=str(path), row=line_no, field=missing,
                            hint="TREC qrels: query id, the literal Q0, document id, integer grade")
        qid, _, docid, grade = parts
        try:
            rel = int(grade)
        except ValueError:
            raise DataError(f"relevance grade {grade!r} is not an integer", file=str(path), row=line_no,
                            field="rel", hint="use an integer grade such as 0, 1 or 2") from None
        yield line_no, qid, docid, rel


def read_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    """TREC qrels `qid Q0 docid rel` -> {qid: {docid: grade}}; a repeated (qid, docid) is an error."""
    qrels: dict[str, dict[str, int]] = {}
    for line_no, qid, docid, rel in _qrels_rows(path):
        judged = qrels.setdefault(qid, {})
        if docid in judged:
            raise DataError(f"document {docid!r} judged twice for query {qid!r}", file=str(path),
                            row=line_no, field="docid", hint="keep one judgement per (query, document)")
        judged[docid] = rel
    _require_entries(qrels, path, "judgements")
    return qrels


def check_qrels_against_corpus(qrels: dict[str, dict[str, int]], corpus_ids: Iterable[str],
                               qrels_path: str | Path) -> None:
    """Raise DataError (qrels file, line, field 'docid') for the first judged docid not in the corpus."""
    corpus_ids = corpus_ids if isinstance(corpus_ids, (set, frozenset, dict)) else set(corpus_ids)
    if all(d in corpus_ids for judged in qrels.values() for d in judged):
        return
    # Slow path only on failure: rescan the file to name the offending line.
    for line_no, qid, docid, _ in _qrels_rows(qrels_path):
        if docid not in corpus_ids:
            raise DataError(f"document {docid!r} (query {qid!r}) is not in the corpus", file=str(qrels_path),
                            row=line_no, field="docid", hint="use the corpus the qrels were made for")
    raise DataError("qrels name documents missing from the corpus, but not on any line of this file",
                    file=str(qrels_path), field="docid", hint="check that this is the qrels file that was read")


def trec_run(qids: list[str], run: dict[str, list[str]], scores: np.ndarray, tag: str) -> str:
    """A TREC run file (`qid Q0 docid rank score tag`, as trec_eval and ir_measures read it)."""
    tag = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in tag)
    return "".join(f"{qid} Q0 {docid} {rank} {score:.6f} {tag}\n"
                   for qid, row in zip(qids, scores) for rank, (docid, score) in enumerate(zip(run[qid], row), start=1))


def score_run(run: dict[str, list[str]], qrels: dict[str, dict[str, int]], k_ndcg: int = 10,
              k_recall: int = 100) -> dict:
    """Score ranked docid lists against qrels.

    Evaluated queries: those in qrels with at least one positive grade (as in MIRACL dev/test);
    such a query missing from the run scores 0. Queries only in the run are ignored (counted).
    Returns {"per_query": {qid: {metric: value}}, "mean": {metric: value}, "num_queries": int,
    "skipped_no_relevant": [qid], "num_run_only": int}; metrics ndcg@k_ndcg, recall@k_recall,
    mrr@k_ndcg."""
    names = (f"ndcg@{k_ndcg}", f"recall@{k_recall}", f"mrr@{k_ndcg}")
    per_query: dict[str, dict[str, float]] = {}
    skipped = []
    for qid in sorted(qrels):
        judged = qrels[qid]
        relevant = {d for d, g in judged.items() if g > 0}
        if not relevant:
            skipped.append(qid)
            continue
        ranking = list(run.get(qid, []))
        if len(set(ranking)) != len(ranking):
            raise ValueError(f"run for query {qid!r} lists a document twice")
        hit_ranks = np.array([r for r, d in enumerate(ranking, start=1) if d in relevant], dtype=np.int64)
        per_query[qid] = {
            names[0]: ndcg_at_k(ranking, judged, k_ndcg),
            names[1]: fraction_recall_at_k(hit_ranks, k_recall, num_relevant=len(relevant)),
            names[2]: mrr_at_k(ranking, judged, k_ndcg),
        }
    mean = {m: float(np.mean([v[m] for v in per_query.values()])) if per_query else float("nan")
            for m in names}
    return {"per_query": per_query, "mean": mean, "num_queries": len(per_query),
            "skipped_no_relevant": skipped, "num_run_only": len(set(run) - set(qrels))}
