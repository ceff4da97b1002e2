"""Evaluation driver: model + datasets -> embeddings (Ray Data actors) -> FAISS -> metrics.

A LAReQA dataset is a known name ("xquad-r", "mlqa-r") or a LAReQA directory; a MIRACL-style
dataset is `miracl:<dir>` with `<dir>/<lang>/{topics.tsv,qrels.tsv,corpus.jsonl}`.
Embeddings are cached per (model, dataset, split), so an interrupted evaluation resumes
without re-encoding finished shards.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raysys import storage
from raysys.artifacts import distribute_model
from raysys.config import Config
from raysys.data.lareqa import LareqaCorpus, read_lareqa_dir
from raysys.data.languages import wanted_languages
from raysys.eval.pairs_corpus import is_pairs_input, pairs_eval_corpus, read_pairs_table
from raysys.data.prepare import DATASETS, resolve_dataset
from raysys.data.split import resolve_split_rule, split_names
from raysys.errors import ConfigError
from raysys.eval.encode import encode_sets
from raysys.eval.lareqa import evaluate_lareqa_stored
from raysys.eval.ranking import balanced_bounds, open_shards, search_top_k, stored_blocks
from raysys.model.default import resolve_model_path
from raysys.model.encoder import EncoderSettings
from raysys.runtime import ensure_ray, is_multi_node


def encoder_settings(config: Config, max_length: int | None = None) -> EncoderSettings:
    m = config.model
    length = max_length or config.eval.max_length
    return EncoderSettings(pooling=m.pooling, normalize=m.normalize, query_prefix=m.query_prefix,
                           passage_prefix=m.passage_prefix, max_query_length=length, max_passage_length=length)


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


def encoding_mode(config: Config) -> str:
    """Device and precision of the encoding, part of the embedding cache key: embeddings from a GPU
    or a fast path are never reused for another mode (exact fp32 is the default on every device)."""
    return f"{'gpu' if config.train.use_gpu else 'cpu'}-{config.eval.fast_path or 'fp32'}"


def _cache_key(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


def _model_fingerprint(model_path: str) -> str:
    """Identity of a local model directory: its weights' sizes and mtimes (cheap), else the name."""
    if storage.is_remote(model_path):  # a stored model: its URI and its weights' sizes
        sizes = sorted((k, v) for k, v in storage.list_files(model_path).items() if k.endswith((".safetensors", ".bin")))
        return model_path + "|" + "|".join(f"{k}:{v}" for k, v in sizes)
    p = Path(model_path)
    if not p.is_dir():
        return model_path
    files = sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin"))
    return model_path + "|" + "|".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)


def evaluate_lareqa_dataset(model_path: str, name: str, config: Config, work_dir: Path,
                            progress: bool = True) -> dict:
    corpus = load_eval_corpus(name, config)
    settings = encoder_settings(config)
    e = config.eval
    texts_q = corpus.questions.column("text").to_pylist()
    texts_c = corpus.candidates.column("text").to_pylist()
    key = _cache_key(_model_fingerprint(model_path), json.dumps(vars(settings), sort_keys=True), name,
                     resolve_split(resolve_dataset(name, config.data.source_dir), config), str(len(texts_q)), str(len(texts_c)), encoding_mode(config))
    ensure_ray()  # only now: bad data above fails in seconds, without starting Ray
    emb_dir = _embeddings_dir(work_dir, f"{Path(str(name)).name}-{key}", config)
    common = dict(model_path=model_path, settings=settings, out_dir=emb_dir, batch_tokens=e.batch_tokens,
                  fast_path=e.fast_path,
                  num_encoders=e.num_encoders, use_gpu=config.train.use_gpu, threads=_encoder_threads(e),
                  progress=progress)
    files = encode_sets({"queries": (texts_q, "query"), "candidates": (texts_c, "passage")}, **common)
    # Index-shard actors load the candidate files; the driver only streams the query files.
    return evaluate_lareqa_stored(corpus, files["queries"], files["candidates"], top_k=e.top_k,
                                  **_shard_plan(config, len(texts_c)))


def _embeddings_dir(work_dir: Path, leaf: str, config: Config) -> str:
    """Where the embedding files go: the work directory on one node; on a multi-node cluster the
    run's storage (train.storage_path: s3://, gs:// or NFS), which the encoder actors that write
    them and the index-shard actors that read them see from every node (a local work directory
    exists on the driver's node only)."""
    from raysys.artifacts import check_shared, storage_root

    if storage.is_remote(str(work_dir)) or not is_multi_node():
        return storage.join(str(work_dir), "embeddings", leaf)
    root = storage_root(config)
    check_shared(root)
    return storage.join(root, "embeddings", leaf)


def _shard_plan(config: Config, candidates: int) -> dict:
    """How the candidate pool is sharded: num_shards, one GPU per shard or CPUs per shard, and
    whether a small pool on one node is scored in this process (no actor start-up)."""
    e = config.eval
    use_gpu, cpus = _shard_resources(e, config.train.use_gpu)
    in_process = not use_gpu and candidates <= e.in_process_max_candidates and not is_multi_node()
    return {"num_shards": min(e.num_shards, candidates), "use_gpu": use_gpu, "cpus_per_shard": cpus,
            "in_process": in_process}


def _shard_resources(e, use_gpu: bool) -> tuple[bool, int]:
    """(one GPU per index-shard actor?, CPUs per actor): GPUs when asked for and the cluster has
    them; else the CPU nodes' cores split between the shards (FAISS and BLAS threads)."""
    import ray

    if use_gpu and ray.cluster_resources().get("GPU", 0) >= 1:
        return True, 0
    return False, max(1, _encoder_threads(replace(e, num_encoders=e.num_shards)))


def _encoder_threads(e) -> int:
    """CPUs (= torch threads) per encoder actor: the CPU nodes' cores split between the actors that
    land on each (oversubscription is the big risk). Read from the cluster's nodes, not from the
    driver's machine (on a cluster the driver sits on a head with no CPUs for work)."""
    import ray

    ensure_ray()
    cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) >= 1]
    if not cpus:
        return 1
    if not is_multi_node():  # local Ray may declare more logical CPUs than the machine has cores
        cpus = [min(cpus[0], os.cpu_count() or 1)]
    per_node = -(-max(1, e.num_encoders) // len(cpus))
    return max(1, int(min(cpus)) // per_node)


def evaluate_miracl_dataset(model_path: str, root: Path, config: Config, work_dir: Path,
                            progress: bool = True) -> dict:
    from raysys.eval.miracl import (check_qrels_against_corpus, read_corpus, read_qrels, read_topics, score_run,
                                    trec_run)

    settings = encoder_settings(config)
    e = config.eval
    out = {"per_language": {}, "trec_run": {}}  # the runs are written beside the report (write_report)
    langs = sorted(d.name for d in root.iterdir() if (d / "topics.tsv").exists())
    if not langs:
        raise ConfigError(f"{root}: no <lang>/topics.tsv found (expected topics.tsv, qrels.tsv, corpus.jsonl per language)")
    for lang in langs:
        topics, qrels = read_topics(root / lang / "topics.tsv"), read_qrels(root / lang / "qrels.tsv")
        corpus = read_corpus(root / lang / "corpus.jsonl")
        check_qrels_against_corpus(qrels, set(corpus), root / lang / "qrels.tsv")
        docids, qids = list(corpus), list(topics)
        key = _cache_key(_model_fingerprint(model_path), json.dumps(vars(settings), sort_keys=True), str(root),
                         lang, str(len(docids)), str(len(qids)), encoding_mode(config))
        common = dict(model_path=model_path, settings=settings, out_dir=_embeddings_dir(work_dir, f"miracl-{lang}-{key}", config),
                      batch_tokens=e.batch_tokens, fast_path=e.fast_path, num_encoders=e.num_encoders,
                      use_gpu=config.train.use_gpu,
                      threads=_encoder_threads(e), progress=progress)
        ensure_ray()
        files = encode_sets({"corpus": ([corpus[d] for d in docids], "passage"),
                             "topics": ([topics[q] for q in qids], "query")}, **common)
        depth, plan = min(max(100, e.top_k), len(docids)), _shard_plan(config, len(docids))
        if e.ann_index:  # approximate top-k, with its recall against exact search reported
            from raysys.eval.approximate import approximate_top_k

            scores, top, out.setdefault("approximate_search", {})[lang] = approximate_top_k(
                files["corpus"], files["topics"], depth, plan, e.ann_index, e.ann_params, e.ann_recall_queries)
        else:
            scores, top = search_stored(files["corpus"], files["topics"], depth, plan)
        run = {q: [docids[i] for i in row if i >= 0] for q, row in zip(qids, top)}
        out["per_language"][lang] = score_run(run, qrels)["mean"]
        out["trec_run"][lang] = trec_run(qids, run, scores, tag=Path(model_path).name or "raysys")
    metrics = sorted(next(iter(out["per_language"].values())))
    out["summary"] = {m: float(np.mean([v[m] for v in out["per_language"].values()])) for m in metrics}
    return out


def search_stored(corpus_files: list[tuple[str, int]], query_files: list[tuple[str, int]], k: int, plan: dict,
                  block: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, corpus rows) of every stored query embedding over the stored corpus
    embeddings: index shards load the corpus files, the driver streams the query files in blocks
    and keeps only the merged top-k lists."""
    plan = dict(plan)
    shards = open_shards(corpus_files, balanced_bounds(sum(n for _, n in corpus_files), plan.pop("num_shards")), **plan)
    try:
        tops = [search_top_k(shards, queries, k) for _, queries in stored_blocks(query_files, block)]
    finally:
        shards.close()
    return np.concatenate([s for s, _ in tops]), np.concatenate([i for _, i in tops])


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
