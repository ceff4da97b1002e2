"""Driver side of the training data: files -> a bucketed corpus in storage + the facts every worker needs.

The corpus is partitioned once by parallel id (`raysys.data.buckets`): LAReQA directories (small
JSON files) and local JSONL / Parquet inputs up to `DRIVER_READ_MAX_BYTES` are bucketed on the
driver; larger or remote inputs stay lazy Ray Datasets, bucketed by Ray Data tasks. JSONL / Parquet
rows are split by a hash of their group key either way. The driver never holds per-id state: the facts
are sums of per-bucket statistics, and each worker reads only its own buckets.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import ray.data
from ray.data.expressions import col

from raysys import storage
from raysys.artifacts import check_shared, storage_root
from raysys.config import Config
from raysys.data.buckets import (find_corpus, input_fingerprint, new_parts_dir, partition_dataset, partition_tables,
                                 write_manifest)
from raysys.data.languages import wanted_languages
from raysys.data.lareqa import is_lareqa_dir
from raysys.data.prepare import resolve_dataset
from raysys.data.split import RULE_TEXT, refuse_order_split, resolve_split_rule, split_names
from raysys.errors import ConfigError, DataError
from raysys.runtime import is_multi_node



@dataclass
class DataFacts:
    """What every worker must agree on before the first step."""
    languages: list[str]
    ids_per_language: dict[str, int]
    multilingual_ids: int
    total_ids: int
    has_hard_negatives: bool
    num_rows: int
    # Per worker rank (its buckets, see raysys.data.buckets): what each worker's batches draw from.
    shards: list[dict] = field(default_factory=list)


def prepare_corpus(config: Config) -> tuple[str, dict]:
    """The run's bucketed training corpus at `<storage>/corpora/<input>-<fingerprint>` (train and
    validation splits), written unless a complete one with the same fingerprint exists: (uri, manifest)."""
    data = config.data
    location = str(resolve_dataset(data.train, data.source_dir))
    lareqa = is_lareqa_dir(location)
    rule = resolve_split_rule(data.split_rule, lareqa)
    settings = {"languages": data.languages, "validation_fraction": data.validation_fraction,
                "test_fraction": data.test_fraction, "hard_negatives": data.hard_negatives,
                "num_buckets": data.num_buckets}
    if rule != ("order" if lareqa else "hash"):  # the default rule keeps the fingerprints of earlier corpora
        settings["split_rule"] = rule
    fingerprint, input_bytes = input_fingerprint(location, settings)
    root = storage_root(config)
    if is_multi_node():
        check_shared(root)  # workers on other nodes read their buckets from here
    corpus_uri = storage.join(root, "corpora", f"{location.rstrip('/').rsplit('/', 1)[-1]}-{fingerprint}")
    manifest = find_corpus(corpus_uri)
    if manifest is not None:
        return corpus_uri, manifest
    parts, parts_uri = new_parts_dir(corpus_uri)
    if lareqa:
        buckets = partition_tables(lareqa_split_tables(config, location), parts_uri, data.num_buckets)
    elif (small := small_pairs_tables(config, location)) is not None:  # on the driver: no Ray Data round trip
        buckets = partition_tables(small, parts_uri, data.num_buckets)
    else:
        from raysys.runtime import ensure_ray

        ensure_ray()  # Ray Data reads, buckets and writes large or remote inputs
        buckets = partition_dataset(tagged_pairs(config, location), parts_uri, data.num_buckets, input_bytes)
    return corpus_uri, write_manifest(corpus_uri, parts, buckets, source=location, fingerprint=fingerprint,
                                      settings=settings, num_buckets=data.num_buckets, split_rule=RULE_TEXT[rule])


def lareqa_split_tables(config: Config, location: str) -> dict[str, pa.Table]:
    """Train and validation pairs of a LAReQA directory (read on the driver: small JSON files)."""
    from raysys.data.lareqa import read_lareqa_dir

    data = config.data
    corpus = read_lareqa_dir(location, data.languages)
    if data.hard_negatives == "paragraph":
        from raysys.data.negatives import with_paragraph_negatives

        corpus = with_paragraph_negatives(corpus)
    return _split_tables(corpus.pairs, resolve_split_rule(data.split_rule, lareqa=True), config)


def _split_tables(table: pa.Table, rule: str, config: Config) -> dict[str, pa.Table]:
    names = split_names(table.column("group"), rule, config.data.validation_fraction, config.data.test_fraction)
    return {name: table.filter(pc.equal(names, name)) for name in ("train", "validation")}


def _refuse_hard_negatives(config: Config, location: str) -> None:
    if config.data.hard_negatives:
        raise ConfigError(f"data.hard_negatives={config.data.hard_negatives} needs LAReQA training data; {location} "
                          "is JSONL/Parquet", field="data.hard_negatives",
                          hint="give JSONL/Parquet rows a hard_negative column instead, or set it to null")


def small_pairs_tables(config: Config, location: str) -> dict[str, pa.Table] | None:
    """Train and validation rows of local JSONL/Parquet inputs small enough for the driver, else None."""
    from raysys.data.files import small_local_pairs

    _refuse_hard_negatives(config, location)
    table = small_local_pairs(location)
    if table is None:
        return None
    if (wanted := wanted_languages(config.data.languages)) is not None:
        table = table.filter(pc.is_in(table.column("lang"), value_set=pa.array(wanted, pa.string())))
    return _split_tables(table, resolve_split_rule(config.data.split_rule, lareqa=False), config)


def tagged_pairs(config: Config, location: str) -> ray.data.Dataset:
    """Large or remote JSONL / Parquet inputs as a lazy Ray Dataset with a `split` column (test rows dropped)."""
    from raysys.data.files import read_pairs

    _refuse_hard_negatives(config, location)
    refuse_order_split(config.data.split_rule, location)
    ds = read_pairs(location)
    if (wanted := wanted_languages(config.data.languages)) is not None:
        ds = ds.filter(expr=col("lang").is_in(wanted))  # vectorised
    validation, test = config.data.validation_fraction, config.data.test_fraction

    def tag_split(batch: pa.Table) -> pa.Table:
        return batch.append_column("split", split_names(batch.column("group"), "hash", validation, test))

    return ds.map_batches(tag_split, batch_format="pyarrow").filter(expr=col("split") != "test")


def compute_facts(manifest: dict, config: Config, source: str = "train data") -> DataFacts:
    """The facts of the corpus's train split, from its per-bucket statistics; checks that the data
    can fill hybrid batches."""
    train = manifest["splits"].get("train")
    if not train or not train["rows"]:
        raise DataError("no training pairs (check data.train, data.languages and the split fractions)",
                        file=source)
    facts = DataFacts(languages=train["languages"], ids_per_language=train["ids_per_language"],
                      multilingual_ids=train["multilingual_ids"], total_ids=train["ids"],
                      has_hard_negatives=train["negatives_missing"] == 0, num_rows=train["rows"],
                      shards=shard_facts(train["buckets"], config.train.num_workers))
    check_batch_capacity(facts, config, source)
    return facts


def shard_facts(buckets: list[dict], world_size: int) -> list[dict]:
    """Per rank: parallel ids, ids in 2+ languages and ids per language of the buckets it reads."""
    shards = [{"ids": 0, "multilingual_ids": 0, "ids_per_language": Counter()} for _ in range(world_size)]
    for bucket in buckets:
        shard = shards[bucket["bucket"] % world_size]
        shard["ids"] += bucket["ids"]
        shard["multilingual_ids"] += bucket["multilingual_ids"]
        shard["ids_per_language"].update(bucket["ids_per_language"])
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


def facts_to_dict(facts: DataFacts) -> dict:
    return asdict(facts)
