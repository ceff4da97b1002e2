"""Driver side of the training data: files -> split Ray Datasets + the facts every worker needs.

The driver never holds a large corpus: LAReQA directories are small JSON files, and JSONL /
Parquet inputs stay lazy Ray Datasets that are split by a hash of their group key. Statistics
(languages, ids per language) are computed by streaming only the `id` and `lang` columns.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray.data
from ray.data.expressions import col

from raysys.config import Config
from raysys.data.prepare import resolve_dataset
from raysys.data.split import split_groups, split_table
from raysys.errors import ConfigError, DataError


@dataclass
class DataFacts:
    """What every worker must agree on before the first step."""
    languages: list[str]
    ids_per_language: dict[str, int]
    multilingual_ids: int
    total_ids: int
    has_hard_negatives: bool
    num_rows: int
    # Per worker rank (ids are sharded by hash, see rows_for_rank): what each worker's batches draw from.
    shards: list[dict] = field(default_factory=list)


def is_lareqa_dir(path: str) -> bool:
    p = Path(path)
    return p.is_dir() and any(p.glob("*.json")) and not any(p.glob("*.jsonl")) and not any(p.glob("*.parquet"))


def load_split_datasets(config: Config) -> dict[str, ray.data.Dataset]:
    """{'train': ..., 'validation': ...} as Ray Datasets of PAIR_SCHEMA rows, split by group."""
    data = config.data
    location = str(resolve_dataset(data.train, data.source_dir))
    if is_lareqa_dir(location):
        from raysys.data.lareqa import read_lareqa_dir

        corpus = read_lareqa_dir(location, data.languages)
        if data.hard_negatives == "paragraph":
            from raysys.data.negatives import with_paragraph_negatives

            corpus = with_paragraph_negatives(corpus)
        groups = list(dict.fromkeys(corpus.pairs.column("group").to_pylist()))
        tables = split_table(corpus.pairs, split_groups(groups, data.validation_fraction, data.test_fraction))
        return {name: ray.data.from_arrow(tables[name]) for name in ("train", "validation")
                if tables[name].num_rows}
    if data.hard_negatives:
        raise ConfigError(f"data.hard_negatives={data.hard_negatives} needs LAReQA training data; {location} is "
                          "JSONL/Parquet", field="data.hard_negatives",
                          hint="give JSONL/Parquet rows a hard_negative column instead, or set it to null")
    from raysys.data.files import read_pairs

    ds = read_pairs(location)
    if data.languages:
        from raysys.data.languages import normalize_language

        wanted = {normalize_language(code) for code in data.languages}  # rows hold normalised codes
        ds = ds.filter(expr=col("lang").is_in(sorted(wanted)))  # vectorised
    return _hash_split(ds, data.validation_fraction, data.test_fraction)


def _hash_split(ds: ray.data.Dataset, validation_fraction: float, test_fraction: float) -> dict[str, ray.data.Dataset]:
    """Group-wise split of a lazy dataset: a stable hash of the group decides its split."""

    def bucket(batch: pa.Table) -> pa.Table:
        u = np.array([int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "little") / 2**64
                      for g in batch.column("group").to_pylist()])
        name = np.where(u < test_fraction, "test", np.where(u < test_fraction + validation_fraction,
                                                            "validation", "train"))
        return batch.append_column("split", pa.array(name))

    tagged = ds.map_batches(bucket, batch_format="pyarrow")
    out = {}
    for name in ("train", "validation"):
        part = tagged.filter(expr=col("split") == name).drop_columns(["split"])  # vectorised
        out[name] = part
    return out


def compute_facts(ds: ray.data.Dataset, config: Config, source: str = "train data") -> DataFacts:
    """Stream id/lang/hard_negative columns once and check the data can fill hybrid batches."""
    langs_of: dict[str, set[str]] = defaultdict(set)
    rows, negatives_missing = 0, 0
    for batch in ds.select_columns(["id", "lang", "hard_negative"]).iter_batches(batch_format="pyarrow",
                                                                                 batch_size=65536):
        rows += batch.num_rows
        negatives_missing += batch.column("hard_negative").null_count
        for pid, lang in zip(batch.column("id").to_pylist(), batch.column("lang").to_pylist()):
            langs_of[pid].add(lang)
    if rows == 0:
        raise DataError("no training pairs (check data.train, data.languages and the split fractions)",
                        file=source)
    per_lang = Counter(lang for langs in langs_of.values() for lang in langs)
    facts = DataFacts(languages=sorted(per_lang), ids_per_language=dict(sorted(per_lang.items())),
                      multilingual_ids=sum(len(v) >= 2 for v in langs_of.values()), total_ids=len(langs_of),
                      has_hard_negatives=negatives_missing == 0, num_rows=rows,
                      shards=shard_facts(langs_of, config.train.num_workers))
    check_batch_capacity(facts, config, source)
    return facts


def shard_facts(langs_of: dict[str, set[str]], world_size: int) -> list[dict]:
    """Per rank: parallel ids, ids in 2+ languages and ids per language (the worker's own counts)."""
    from raysys.data.hybrid import shard_of

    shards = [{"ids": 0, "multilingual_ids": 0, "ids_per_language": Counter()} for _ in range(world_size)]
    for pid, langs in langs_of.items():
        shard = shards[shard_of(pid, world_size)]
        shard["ids"] += 1
        shard["multilingual_ids"] += len(langs) >= 2
        shard["ids_per_language"].update(langs)
    for shard in shards:
        shard["ids_per_language"] = dict(sorted(shard["ids_per_language"].items()))
    return shards


def check_batch_capacity(facts: DataFacts, config: Config, source: str | None = None) -> None:
    t, need = config.train, config.train.global_batch_size
    where = {"file": source, "field": "train.global_batch_size"}
    # Each worker draws from its own shard, so leave headroom for uneven hash shards.
    if t.alpha > 0:
        for lang, n in facts.ids_per_language.items():
            if n < need:
                raise ConfigError(f"train.global_batch_size={need} but language '{lang}' has only {n} parallel ids; "
                                  "a monolingual batch needs one distinct id per pair", **where,
                                  hint="lower the batch size or drop the language via data.languages")
    if t.alpha < 1:
        if facts.multilingual_ids < need:
            raise ConfigError(f"train.global_batch_size={need} but only {facts.multilingual_ids} parallel ids exist "
                              "in two or more languages; cross-lingual batches (alpha < 1) need that many", **where,
                              hint="lower train.global_batch_size, set train.alpha=1, or give translations the same id")
        if len(facts.languages) < 2:
            raise ConfigError(f"cross-lingual batches (train.alpha={t.alpha} < 1) need at least two languages; "
                              f"the data has {facts.languages}", file=source, field="train.alpha",
                              hint="set train.alpha=1 or add translations")


def rows_for_rank(iterator, rank: int, world_size: int, allow_empty: bool = False) -> pa.Table | None:
    """Collect this worker's shard from a Ray Data iterator: the rows whose parallel id hashes to it.

    Sharding by id (not by block) keeps all language versions of an id on one worker, which is
    what makes cross-lingual pairs local and a global batch free of duplicate ids; it is also
    deterministic, unlike streaming_split's timing-dependent block assignment, so a resumed or
    repeated run sees the same shards. An empty shard is an error, or None with `allow_empty`
    (a validation split may be empty).
    """
    from raysys.data.hybrid import shard_of

    parts = []
    for batch in iterator.iter_batches(batch_format="pyarrow", batch_size=8192):
        mask = pa.array([shard_of(pid, world_size) == rank for pid in batch.column("id").to_pylist()])
        parts.append(batch.filter(mask))
    rows = pa.concat_tables(parts) if parts else None
    if rows is None or rows.num_rows == 0:
        if allow_empty:
            return None
        raise DataError(f"worker {rank} of {world_size} received no training rows",
                        hint="give more parallel ids or fewer workers")
    return rows


def facts_to_dict(facts: DataFacts) -> dict:
    return asdict(facts)
