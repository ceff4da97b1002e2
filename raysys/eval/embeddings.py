"""Where an evaluation's embeddings are made and kept, shared by LAReQA, MIRACL-style evaluation
and hard-negative mining: their cache key (model, encoder settings, the data, device and
precision), their directory (the work directory on one node, the run's storage on a multi-node
cluster), the encoder actors' threads, and how the index shards that search them are placed."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path

import pyarrow as pa

from raysys import storage
from raysys.config import Config
from raysys.eval.encode import encode_sets
from raysys.model.encoder import EncoderSettings
from raysys.runtime import ensure_ray, is_multi_node


def encoder_settings(config: Config, max_length: int | None = None) -> EncoderSettings:
    m = config.model
    length = max_length or config.eval.max_length
    return EncoderSettings(pooling=m.pooling, normalize=m.normalize, query_prefix=m.query_prefix,
                           passage_prefix=m.passage_prefix, max_query_length=length, max_passage_length=length)


def encoding_mode(config: Config) -> str:
    """Device and precision of the encoding, part of the embedding cache key: embeddings from a GPU
    or a fast path are never reused for another mode (exact fp32 is the default on every device)."""
    return f"{'gpu' if config.train.use_gpu else 'cpu'}-{config.eval.fast_path or 'fp32'}"


def model_fingerprint(model_path: str) -> str:
    """Identity of a local model directory: its weights' sizes and mtimes (cheap), else the name."""
    if storage.is_remote(model_path):  # a stored model: its URI and its weights' sizes
        sizes = sorted((k, v) for k, v in storage.list_files(model_path).items() if k.endswith((".safetensors", ".bin")))
        return model_path + "|" + "|".join(f"{k}:{v}" for k, v in sizes)
    p = Path(model_path)
    if not p.is_dir():
        return model_path
    files = sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin"))
    return model_path + "|" + "|".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)


def embeddings_key(model_path: str, settings: EncoderSettings, config: Config, *data: str) -> str:
    """Embeddings are reused only for the same model, encoder settings, data and encoding mode."""
    parts = (model_fingerprint(model_path), json.dumps(vars(settings), sort_keys=True), *data, encoding_mode(config))
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


def texts_digest(*columns: pa.ChunkedArray | pa.Array) -> str:
    """A digest of text columns' contents (their Arrow buffers, in order), for the cache key: a
    dataset edited in place (same name, same number of rows, other words) is encoded again, never
    answered from stale embeddings."""
    digest = hashlib.blake2b(digest_size=16)
    for column in columns:
        for chunk in getattr(column, "chunks", [column]):
            for buffer in chunk.buffers():
                if buffer is not None:
                    digest.update(buffer)
        digest.update(b"\x00")
    return digest.hexdigest()


def embeddings_dir(work_dir: str | os.PathLike, leaf: str, config: Config) -> str:
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


def encode_cached(sets: dict[str, tuple[list[str], str]], model_path: str, config: Config,
                  work_dir: str | os.PathLike, label: str, data_key: list[str], progress: bool = True,
                  settings: EncoderSettings | None = None) -> dict[str, list[tuple[str, int]]]:
    """encode_sets with the evaluation's encoder settings and resources, into the embeddings
    directory `<label>-<key>` (`data_key` names the data): a finished set is not encoded again."""
    return encode_sets(sets, progress=progress, **_cached_encoding(model_path, config, work_dir, label, data_key,
                                                                     settings))


def encode_corpus_cached(source: str, model_path: str, config: Config, work_dir: str | os.PathLike, label: str,
                         data_key: list[str], progress: bool = True, display: str | None = None) -> list[tuple[str, int]]:
    """`raysys.eval.corpus_stream.encode_corpus` (a JSONL corpus read by the encoder actors, not
    the driver) with the evaluation's settings, into the embeddings directory `<label>-<key>`."""
    from raysys.eval.corpus_stream import encode_corpus

    return encode_corpus(source, name="corpus", progress=progress, display=display,
                         **_cached_encoding(model_path, config, work_dir, label, data_key))


def _cached_encoding(model_path: str, config: Config, work_dir: str | os.PathLike, label: str, data_key: list[str],
                     settings: EncoderSettings | None = None) -> dict:
    """The encoder arguments both cached encodings share: the model, its settings, the encoder
    resources, and the embeddings directory keyed by all of them and the data."""
    settings = settings or encoder_settings(config)
    key = embeddings_key(model_path, settings, config, *data_key)
    ensure_ray()
    e = config.eval
    return dict(model_path=model_path, settings=settings,
                out_dir=embeddings_dir(work_dir, f"{label}-{key}", config), batch_tokens=e.batch_tokens,
                fast_path=e.fast_path, num_encoders=e.num_encoders, use_gpu=config.train.use_gpu,
                threads=encoder_threads(e))


def shard_plan(config: Config, candidates: int) -> dict:
    """How the candidate pool is sharded: num_shards, one GPU per shard or CPUs per shard, and
    whether a small pool on one node is scored in this process (no actor start-up)."""
    e = config.eval
    use_gpu, cpus = _shard_resources(e, config.train.use_gpu)
    in_process = not use_gpu and candidates <= e.in_process_max_candidates and not is_multi_node()
    return {"num_shards": min(e.num_shards, candidates), "use_gpu": use_gpu, "cpus_per_shard": cpus,
            "in_process": in_process, "storage_dtype": e.index_dtype}


def _shard_resources(e, use_gpu: bool) -> tuple[bool, int]:
    """(one GPU per index-shard actor?, CPUs per actor): GPUs when asked for and the cluster has
    them; else the CPU nodes' cores split between the shards (FAISS and BLAS threads)."""
    import ray

    if use_gpu and ray.cluster_resources().get("GPU", 0) >= 1:
        return True, 0
    return False, max(1, encoder_threads(replace(e, num_encoders=e.num_shards)))


def encoder_threads(e) -> int:
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
