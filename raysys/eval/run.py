"""Evaluation driver: model + datasets -> embeddings (Ray Data actors) -> FAISS -> metrics.

A LAReQA dataset is a known name ("xquad-r", "mlqa-r") or a LAReQA directory; a MIRACL-style
dataset is `miracl:<dir>` with `<dir>/<lang>/{topics.tsv,qrels.tsv,corpus.jsonl}`.
Embeddings are cached per (model, dataset, split), so an interrupted evaluation resumes
without re-encoding finished shards.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raysys import storage
from raysys.artifacts import distribute_dataset, distribute_model
from raysys.config import Config
from raysys.data.lareqa import LareqaCorpus, read_lareqa_dir
from raysys.data.languages import wanted_languages
from raysys.eval.pairs_corpus import is_pairs_input, pairs_eval_corpus, read_pairs_table
from raysys.data.prepare import DATASETS, resolve_dataset
from raysys.data.split import resolve_split_rule, split_names
from raysys.errors import ConfigError
from raysys.eval.embeddings import encode_cached, encode_corpus_cached, shard_plan, texts_digest
from raysys.eval.lareqa import evaluate_lareqa_stored
from raysys.eval.ranking import balanced_bounds, open_shards, search_stored_queries
from raysys.model.default import resolve_model_path
from raysys.runtime import ensure_ray


def load_eval_corpus(name: str, config: Config) -> LareqaCorpus:
    """The dataset's articles (LAReQA directory) or rows (pairs file) selected by eval.split, by
    the same group split training uses."""
    location = resolve_dataset(name, config.data.source_dir)
    d = config.data
    if is_pairs_input(str(location)):  # a JSONL / Parquet pairs file
        rule = resolve_split_rule(d.split_rule, lareqa=False)
        table = read_pairs_table(str(location), rule)  # bad rows fail here, before the split is resolved
        return pairs_eval_corpus(table, str(location), resolve_split(location, config), rule,
                                 d.validation_fraction, d.test_fraction, wanted_languages(d.languages))
    corpus = read_lareqa_dir(location, d.languages)
    split = resolve_split(location, config)
    if split == "all":
        return corpus
    groups = pa.array(corpus.groups, pa.string())
    names = split_names(groups, resolve_split_rule(d.split_rule, lareqa=True), d.validation_fraction,
                        d.test_fraction)
    return corpus.subset(set(groups.filter(pc.equal(names, split)).to_pylist()))


def resolve_split(location, config: Config) -> str:
    """eval.split=auto: held-out test articles of the training dataset, all articles of any other.
    The same directory name counts as the same dataset (a cached copy of it), so a doubt never
    scores training articles."""
    if config.eval.split != "auto":
        return config.eval.split
    train = config.data.train
    if str(train) in DATASETS:
        train = resolve_dataset(train, config.data.source_dir)
    here, trained_on = Path(str(location)), Path(str(train))
    return "test" if here.resolve() == trained_on.resolve() or here.name == trained_on.name else "all"


def evaluate_lareqa_dataset(model_path: str, name: str, config: Config, work_dir: Path,
                            progress: bool = True) -> dict:
    corpus = load_eval_corpus(name, config)  # bad data fails here, in seconds, before Ray starts
    texts_q = corpus.questions.column("text").to_pylist()
    texts_c = corpus.candidates.column("text").to_pylist()
    split = resolve_split(resolve_dataset(name, config.data.source_dir), config)
    digest = texts_digest(corpus.questions.column("text"), corpus.candidates.column("text"))
    files = encode_cached({"queries": (texts_q, "query"), "candidates": (texts_c, "passage")}, model_path, config,
                          work_dir, Path(str(name)).name, [str(name), split, digest], progress)
    # Index-shard actors load the candidate files; the driver only streams the query files.
    return evaluate_lareqa_stored(corpus, files["queries"], files["candidates"], top_k=config.eval.top_k,
                                  **shard_plan(config, len(texts_c)))


def evaluate_miracl_dataset(model_path: str, root: Path, config: Config, work_dir: Path,
                            progress: bool = True) -> dict:
    """Per language: topics and qrels read here (small); the corpus checked by Ray tasks and encoded
    by the encoder actors (`raysys.eval.corpus_stream`), never held by the driver, which reads the
    docid files only to name the top-k documents."""
    from raysys.eval.corpus_stream import check_corpus, docids_of
    from raysys.eval.miracl import check_qrels_against_corpus, read_qrels, read_topics, score_run, trec_run

    e = config.eval
    out = {"per_language": {}, "trec_run": {}}  # the runs are written beside the report (write_report)
    langs = sorted(d.name for d in root.iterdir() if (d / "topics.tsv").exists())
    if not langs:
        raise ConfigError(f"{root}: no <lang>/topics.tsv found (expected topics.tsv, qrels.tsv, corpus.jsonl per language)")
    for lang in langs:
        topics, qrels = read_topics(root / lang / "topics.tsv"), read_qrels(root / lang / "qrels.tsv")
        corpus = root / lang / "corpus.jsonl"
        # The encoder actors read the corpus: a path every node sees, or a copy in the run's storage.
        source = storage.join(distribute_dataset(str(root / lang), config), "corpus.jsonl")
        ensure_ray()
        # Every line parsed (Ray tasks, no model) before encoding: bad lines, repeats, unknown judged docids.
        judged = {d for docs in qrels.values() for d in docs}
        check_qrels_against_corpus(qrels, check_corpus(source, judged, str(corpus)), root / lang / "qrels.tsv")
        stat = corpus.stat()
        corpus_files = encode_corpus_cached(source, model_path, config, work_dir, f"miracl-{lang}",
                                            [str(corpus.resolve()), str(stat.st_size), str(stat.st_mtime_ns)], progress,
                                            display=str(corpus))
        qids = list(topics)
        texts = [topics[q] for q in qids]
        digest = texts_digest(pa.array(qids, pa.string()), pa.array(texts, pa.string()))
        files = encode_cached({"topics": (texts, "query")}, model_path, config, work_dir,
                              f"miracl-{lang}-topics", [str(root), lang, digest], progress)
        num_docs = sum(n for _, n in corpus_files)
        depth, plan = min(max(100, e.top_k), num_docs), shard_plan(config, num_docs)
        if e.ann_index:  # approximate top-k, with its recall against exact search reported
            from raysys.eval.approximate import approximate_top_k

            scores, top, out.setdefault("approximate_search", {})[lang] = approximate_top_k(
                corpus_files, files["topics"], depth, plan, e.ann_index, e.ann_params, e.ann_recall_queries)
        else:
            scores, top = search_stored(corpus_files, files["topics"], depth, plan)
        names = docids_of(corpus_files, top)
        run = {q: [names[int(i)] for i in row if i >= 0] for q, row in zip(qids, top)}
        out["per_language"][lang] = score_run(run, qrels)["mean"]
        out["trec_run"][lang] = trec_run(qids, run, scores, tag=Path(model_path).name or "raysys")
    metrics = sorted(next(iter(out["per_language"].values())))
    out["summary"] = {m: float(np.mean([v[m] for v in out["per_language"].values()])) for m in metrics}
    if e.index_dtype != "fp32":
        out["index_dtype"] = e.index_dtype  # the top-k came from fp16-rounded passages: said in the report
    return out


def search_stored(corpus_files: list[tuple[str, int]], query_files: list[tuple[str, int]], k: int, plan: dict,
                  block: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, corpus rows) of every stored query embedding over the stored corpus
    embeddings: index shards load the corpus files, the driver streams the query files in blocks
    and keeps only the merged top-k lists."""
    plan = dict(plan)
    shards = open_shards(corpus_files, balanced_bounds(sum(n for _, n in corpus_files), plan.pop("num_shards")), **plan)
    try:
        return search_stored_queries(shards, query_files, k, block)
    finally:
        shards.close()


def evaluate(model: str, datasets: list[str], config: Config, work_dir: str | os.PathLike,
             progress: bool = True) -> dict[str, dict]:
    """{dataset: result} for a model (name, hub id, HF directory, or training checkpoint)."""
    from raysys.eval.preflight import check_evaluation
    from raysys.model.encoder import check_model

    check_evaluation(datasets, config)  # every dataset (and the fast path), before any encoding
    model = model_dir_of(model)
    model_path = resolve_model_path(model)  # on this node: a storage URI is downloaded into the cache
    check_model(model_path)  # a bad model fails here, not inside the encoder actors
    # What the encoder actors load: a URI every node can resolve (a remote model as given, a local
    # directory published to storage on a multi-node cluster), or the local path on one node.
    model_path = model if storage.is_remote(model) else distribute_model(model_path, config)
    work = Path(work_dir)
    results = {}
    for name in datasets:
        if str(name).startswith("miracl:"):
            results[name] = evaluate_miracl_dataset(model_path, Path(name.split(":", 1)[1]), config, work, progress)
        else:
            results[name] = evaluate_lareqa_dataset(model_path, name, config, work, progress)
    return results


def model_dir_of(model: str) -> str:
    """A training checkpoint directory holds its exported model in `hf_model/`."""
    from raysys.train.checkpoint import EXPORT_DIR

    if storage.is_remote(model):
        return storage.join(model, EXPORT_DIR) if storage.is_dir(storage.join(model, EXPORT_DIR)) else model
    p = Path(model)
    return str(p / EXPORT_DIR) if (p / EXPORT_DIR).is_dir() else model
