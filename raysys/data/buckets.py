"""The training corpus partitioned once, by parallel id: Parquet buckets plus a manifest, at a storage URI.

Each split's rows go to `<corpus>/<parts>/<split>/bucket-00042.parquet`, the bucket being a stable
hash of the parallel id modulo `data.num_buckets`, so all language versions of an item share one
file. Worker r of W reads the buckets b with b % W == r: the workers together read every row once
(no worker streams the whole corpus), and when W divides the bucket count a worker holds exactly
the ids of the old `hash % W` shard. Every bucket's statistics (rows, ids, ids in 2+ languages, ids
per language) are computed where it is written, so the driver only adds up per-bucket numbers.

The manifest is written last: its presence means the corpus is complete. It records the split
rule and a fingerprint of the inputs (paths, sizes, modification times) and of the settings that
shape the rows, so a second run with the same inputs reuses the corpus. Each attempt writes its own
parts directory; two concurrent preparers both produce a complete corpus and the last manifest wins.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raysys import storage
from raysys.errors import DataError

FORMAT_VERSION = 2  # 2: hard_negative is a list of strings
MANIFEST = "manifest.json"
SHUFFLE_PARTITION_BYTES = 256 * 2**20
COLUMNS = ("id", "lang", "query", "passage", "hard_negative", "group")  # what training workers read


def hash_unit(keys: list[str]) -> np.ndarray:
    """A stable 64-bit hash of each key (blake2b), as integers; the same on every node and run."""
    return np.array([int.from_bytes(hashlib.blake2b(k.encode("utf-8"), digest_size=8).digest(), "little")
                     for k in keys], dtype=np.uint64)


def bucket_of(parallel_id: str, num_buckets: int) -> int:
    """Bucket of one parallel id: all language versions of an id share it."""
    return int(hash_unit([parallel_id])[0] % np.uint64(num_buckets))


def bucket_column(ids: pa.ChunkedArray | pa.Array, num_buckets: int) -> pa.Array:
    """Bucket of each parallel id (`bucket_of`, vectorised)."""
    return pa.array(hash_unit(ids.to_pylist()) % np.uint64(num_buckets), pa.int32())


def buckets_of_rank(num_buckets: int, rank: int, world_size: int) -> list[int]:
    return list(range(rank, num_buckets, world_size))


def bucket_stats(table: pa.Table) -> dict:
    """Counts of one bucket (vectorised Arrow group-bys; an id counts once per language)."""
    per_id = table.group_by("id").aggregate([("lang", "count_distinct")])
    per_lang = table.group_by("lang").aggregate([("id", "count_distinct")])
    negatives = table.column("hard_negative") if "hard_negative" in table.column_names else None
    return {"rows": table.num_rows, "ids": per_id.num_rows,
            "multilingual_ids": int(pc.sum(pc.greater_equal(per_id.column("lang_count_distinct"), 2)).as_py() or 0),
            "ids_per_language": dict(zip(per_lang.column("lang").to_pylist(),
                                         per_lang.column("id_count_distinct").to_pylist())),
            "negatives_missing": table.num_rows if negatives is None else negatives.null_count}


def write_bucket(table: pa.Table, parts_uri: str, split: str, bucket: int) -> dict:
    """Write one bucket's rows (sorted by id, lang) and return its statistics and file."""
    table = table.select([c for c in COLUMNS if c in table.column_names])
    table = table.sort_by([("id", "ascending"), ("lang", "ascending")])
    name = f"{split}/bucket-{bucket:05d}.parquet"
    uri = storage.join(parts_uri, name)
    fs, path = storage.resolve(uri)
    try:
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        pq.write_table(table, path, filesystem=fs)
        size = fs.get_file_info(path).size
    except OSError as exc:
        raise storage.as_storage_error(uri, exc) from None
    return {"split": split, "bucket": bucket, "file": name, "bytes": size, **bucket_stats(table)}


def partition_tables(tables: dict[str, pa.Table], parts_uri: str, num_buckets: int) -> list[dict]:
    """Small inputs already in the driver (LAReQA directories): bucket and write them here, in threads."""
    jobs = []
    for split, table in tables.items():
        if not table.num_rows:
            continue
        table = table.append_column("bucket", bucket_column(table.column("id"), num_buckets)).sort_by("bucket")
        values, starts = np.unique(table.column("bucket").to_numpy(), return_index=True)
        ends = list(starts[1:]) + [table.num_rows]
        jobs += [(table.slice(s, e - s), split, int(b)) for b, s, e in zip(values, starts, ends)]
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:  # Parquet writes drop the GIL
        return list(pool.map(lambda job: write_bucket(job[0], parts_uri, job[1], job[2]), jobs))


def _write_group(group: pa.Table, parts_uri: str) -> pa.Table:
    """map_groups: one (split, bucket) group -> its file, and one row of statistics."""
    stats = write_bucket(group.drop_columns(["split", "bucket"]), parts_uri,
                         group.column("split")[0].as_py(), group.column("bucket")[0].as_py())
    return pa.table({"stats": [json.dumps(stats)]})


def partition_dataset(tagged, parts_uri: str, num_buckets: int, input_bytes: int) -> list[dict]:
    """A lazy Ray Dataset whose rows carry a `split` column: bucket, shuffle by (split, bucket) and
    write each group where it lands; only the statistics come back."""
    import ray

    # Shuffle partitions: one per CPU of the cluster at least, ~256 MiB of input each at most
    # (Ray Data's default of 200 costs seconds of scheduling on a small cluster).
    cpus = int(ray.cluster_resources().get("CPU", 1))
    partitions = max(1, min(2 * num_buckets, max(cpus, -(-input_bytes // SHUFFLE_PARTITION_BYTES))))

    def add_bucket(batch: pa.Table) -> pa.Table:
        return batch.append_column("bucket", bucket_column(batch.column("id"), num_buckets))

    written = (tagged.map_batches(add_bucket, batch_format="pyarrow")
               .groupby(["split", "bucket"], num_partitions=partitions)
               .map_groups(_write_group, batch_format="pyarrow", fn_kwargs={"parts_uri": parts_uri}))
    return [json.loads(s) for batch in written.iter_batches(batch_format="pyarrow", batch_size=None)
            for s in batch.column("stats").to_pylist()]


def summarize(buckets: list[dict]) -> dict:
    """Per split: totals over buckets, and the buckets themselves (sorted)."""
    splits: dict[str, dict] = {}
    for b in sorted(buckets, key=lambda b: (b["split"], b["bucket"])):
        s = splits.setdefault(b["split"], {"rows": 0, "bytes": 0, "ids": 0, "multilingual_ids": 0,
                                           "negatives_missing": 0, "ids_per_language": Counter(), "buckets": []})
        for key in ("rows", "bytes", "ids", "multilingual_ids", "negatives_missing"):
            s[key] += b[key]
        s["ids_per_language"].update(b["ids_per_language"])
        s["buckets"].append({k: v for k, v in b.items() if k != "split"})
    for s in splits.values():
        s["ids_per_language"] = dict(sorted(s["ids_per_language"].items()))
        s["languages"] = list(s["ids_per_language"])
    return splits


def input_fingerprint(location: str, settings: dict) -> tuple[str, int]:
    """A fingerprint of the inputs (every file's path, size and modification time) and of the
    settings that shape the rows; and the inputs' total bytes."""
    from pyarrow import fs as pafs

    listing = []
    fs, root = storage.resolve(location)
    try:
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            raise DataError("file not found", file=location, hint="check the data.train path")
        infos = [info] if info.type == pafs.FileType.File else fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except OSError as exc:
        raise storage.as_storage_error(location, exc) from None
    for i in sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path):
        listing.append([i.path, i.size, i.mtime_ns])
    text = json.dumps({"version": FORMAT_VERSION, "inputs": listing, "settings": settings}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20], sum(size for _, size, _ in listing)


def find_corpus(corpus_uri: str) -> dict | None:
    """The manifest of a complete corpus at `corpus_uri`, or None."""
    manifest_uri = storage.join(corpus_uri, MANIFEST)
    if not storage.is_file(manifest_uri):
        return None
    manifest = storage.read_json(manifest_uri)
    return manifest if manifest.get("version") == FORMAT_VERSION else None


def new_parts_dir(corpus_uri: str) -> tuple[str, str]:
    name = f"parts-{uuid.uuid4().hex[:12]}"
    return name, storage.join(corpus_uri, name)


def write_manifest(corpus_uri: str, parts: str, buckets: list[dict], **record) -> dict:
    manifest = {"version": FORMAT_VERSION, "parts": parts, **record, "splits": summarize(buckets)}
    storage.write_json(storage.join(corpus_uri, MANIFEST), manifest, indent=1)
    return manifest


def read_bucket_files(corpus_uri: str, manifest: dict, files: list[str]):
    """The rows of some bucket files of a corpus (one threaded Arrow dataset read)."""
    import pyarrow.dataset as pads

    uri = storage.join(corpus_uri, manifest["parts"])
    fs, parts = storage.resolve(uri)
    try:
        return pads.dataset([f"{parts}/{f}" for f in files], filesystem=fs, format="parquet").to_table()
    except OSError as exc:
        raise storage.as_storage_error(uri, exc) from None


def read_rank_rows(corpus_uri: str, manifest: dict, split: str, rank: int, world_size: int,
                   allow_empty: bool = False) -> pa.Table | None:
    """This worker's rows of `split`: only its own buckets' files are read.

    An empty share is an error, or None with `allow_empty` (a validation split may be empty)."""
    num_buckets = manifest["num_buckets"]
    mine = set(buckets_of_rank(num_buckets, rank, world_size))
    files = [b["file"] for b in manifest["splits"].get(split, {}).get("buckets", []) if b["bucket"] in mine]
    if not files:
        if allow_empty:
            return None
        raise DataError(f"worker {rank} of {world_size} received no {split} rows "
                        f"(its buckets of {num_buckets} are empty)", hint="give more parallel ids or fewer workers")
    return read_bucket_files(corpus_uri, manifest, files)
