"""The training corpus partitioned once by parallel id (raysys.data.buckets, raysys.train.datasets):
each worker reads only its buckets, every row once over all workers, statistics equal to a direct
count, and a second run with the same inputs reuses the corpus."""

import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysys import storage
from raysys.config import Config
from raysys.data.buckets import MANIFEST, bucket_stats, read_rank_rows
from raysys.data.buckets import bucket_of as shard_of
from raysys.data.hybrid import ParallelItems
from raysys.errors import DataError
from raysys.train.datasets import compute_facts, lareqa_split_tables, prepare_corpus
from tests.eval.lareqa_fixture import write_synthetic_lareqa


def config(tmp_path, data, *overrides: str) -> Config:
    return Config.from_yaml(None, [f"data.train={data}", f"output_dir={tmp_path / 'out'}", *overrides])


def rows_of(table: pa.Table) -> set[tuple]:
    return set(zip(*(table.column(c).to_pylist() for c in ("id", "lang", "query", "passage"))))


def parts_files(corpus: str, manifest: dict) -> list:
    return sorted(storage.local_path(storage.join(corpus, manifest["parts"])).rglob("*.parquet"))


def test_each_worker_reads_only_its_buckets_and_together_every_row_once(tmp_path):
    data = write_synthetic_lareqa(tmp_path / "d", articles=6, paragraphs=3, sentences=4)
    cfg = config(tmp_path, data, "data.num_buckets=16", "data.validation_fraction=0.2", "data.test_fraction=0.2")
    corpus, manifest = prepare_corpus(cfg)
    expected = lareqa_split_tables(cfg, str(data))
    for split in ("train", "validation"):
        for world in (1, 2, 3):
            shares = [read_rank_rows(corpus, manifest, split, rank, world, allow_empty=True) for rank in range(world)]
            shares = [s for s in shares if s is not None]
            assert sum(s.num_rows for s in shares) == expected[split].num_rows  # nothing read twice
            assert set().union(*map(rows_of, shares)) == rows_of(expected[split])
            for rank, share in enumerate(shares):
                assert {shard_of(pid, 16) % world for pid in share.column("id").to_pylist()} == {rank}
    # the statistics are a direct count of the split
    train = manifest["splits"]["train"]
    direct = bucket_stats(expected["train"])
    assert {k: train[k] for k in ("rows", "ids", "multilingual_ids", "ids_per_language")} == \
        {k: direct[k] for k in ("rows", "ids", "multilingual_ids", "ids_per_language")}
    assert manifest["split_rule"].startswith("order: ")  # auto on a LAReQA directory


def test_power_of_two_workers_get_the_old_hash_shards(tmp_path):
    """With W dividing num_buckets, worker r holds exactly the ids with hash % W == r (the shard
    every worker used to filter out of the whole stream), so batches and losses are unchanged."""
    data = write_synthetic_lareqa(tmp_path / "d", articles=5, paragraphs=2, sentences=5)
    cfg = config(tmp_path, data)  # the default 256 buckets
    corpus, manifest = prepare_corpus(cfg)
    train = lareqa_split_tables(cfg, str(data))["train"]
    for world in (2, 4):
        for rank in range(world):
            old = train.filter(pa.array([shard_of(p, world) == rank for p in train.column("id").to_pylist()]))
            new = read_rank_rows(corpus, manifest, "train", rank, world)
            assert ParallelItems(new).ids == ParallelItems(old).ids
            assert rows_of(new) == rows_of(old)


def test_facts_per_worker_equal_what_each_worker_reads(tmp_path):
    data = write_synthetic_lareqa(tmp_path / "d", articles=6, paragraphs=3, sentences=4,
                                  missing={("de", f"a{a}p0s{s}") for a in range(6) for s in range(4)})
    cfg = config(tmp_path, data, "data.num_buckets=8", "train.num_workers=3", "train.global_batch_size=6",
                 "train.alpha=1", "data.validation_fraction=0", "data.test_fraction=0.2")
    corpus, manifest = prepare_corpus(cfg)
    facts = compute_facts(manifest, cfg)
    for rank, shard in enumerate(facts.shards):
        items = ParallelItems(read_rank_rows(corpus, manifest, "train", rank, 3))
        assert shard["ids"] == len(items)
        assert shard["multilingual_ids"] == items.count_multilingual()
        assert shard["ids_per_language"] == {lang: items.count_with(lang) for lang in items.languages}
    assert sum(s["ids"] for s in facts.shards) == facts.total_ids


def test_a_second_run_reuses_the_corpus_and_a_change_makes_a_new_one(tmp_path):
    data = write_synthetic_lareqa(tmp_path / "d", articles=4)
    corpus, manifest = prepare_corpus(config(tmp_path, data))
    files = parts_files(corpus, manifest)
    mtimes = [f.stat().st_mtime_ns for f in files]
    again, manifest_again = prepare_corpus(config(tmp_path, data))
    assert (again, manifest_again) == (corpus, manifest)
    assert [f.stat().st_mtime_ns for f in parts_files(corpus, manifest)] == mtimes  # nothing rewritten
    other, _ = prepare_corpus(config(tmp_path, data, "data.num_buckets=4"))
    assert other != corpus
    (data / "en.json").write_text((data / "en.json").read_text().replace("question about", "Question about"))
    changed, _ = prepare_corpus(config(tmp_path, data))
    assert changed != corpus, "an edited input file is a new corpus"


def test_an_interrupted_prepare_is_not_reused(tmp_path):
    """Bucket files without a manifest (a crash mid-write) are ignored: the next run writes anew."""
    data = write_synthetic_lareqa(tmp_path / "d", articles=4)
    corpus, manifest = prepare_corpus(config(tmp_path, data))
    (storage.local_path(corpus) / MANIFEST).unlink()
    again, manifest_again = prepare_corpus(config(tmp_path, data))
    assert again == corpus and manifest_again["parts"] != manifest["parts"]


def pairs_jsonl(path, ids: int, langs=("de", "en", "es")) -> list[dict]:
    rows = [{"id": f"x{i}", "lang": lang, "query": f"q {i} {lang}", "passage": f"p {i} {lang}", "group": f"g{i // 3}"}
            for i in range(ids) for lang in langs[: 1 + i % len(langs)]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_files_bucketed_on_the_driver_or_by_ray_data_give_the_same_corpus(tmp_path, ray_local, monkeypatch):
    rows = pairs_jsonl(tmp_path / "pairs.jsonl", 300)
    cfg = config(tmp_path, tmp_path / "pairs.jsonl", "data.num_buckets=8")
    corpus, manifest = prepare_corpus(cfg)
    monkeypatch.setattr("raysys.data.files.DRIVER_READ_MAX_BYTES", 0)
    by_tasks, by_tasks_manifest = prepare_corpus(config(tmp_path / "tasks", tmp_path / "pairs.jsonl",
                                                        "data.num_buckets=8"))
    strip = lambda m: {split: {k: v for k, v in s.items() if k != "bytes"} | {  # noqa: E731
        "buckets": [{k: v for k, v in b.items() if k != "bytes"} for b in s["buckets"]]} for split, s in m.items()}
    assert strip(by_tasks_manifest["splits"]) == strip(manifest["splits"])
    for split in ("train", "validation"):
        assert rows_of(read_rank_rows(by_tasks, by_tasks_manifest, split, 0, 1)) == \
            rows_of(read_rank_rows(corpus, manifest, split, 0, 1))
    assert "hash" in manifest["split_rule"]
    train, validation = manifest["splits"]["train"], manifest["splits"]["validation"]
    assert train["rows"] + validation["rows"] < len(rows)  # the test groups are not written
    seen = {}
    for split in ("train", "validation"):
        for rank in range(2):
            share = read_rank_rows(corpus, manifest, split, rank, 2)
            for pid in set(share.column("id").to_pylist()):
                assert seen.setdefault(pid, split) == split, "an id in two splits would leak"
    # statistics = a direct count of the rows each split's files hold
    for split, stats in manifest["splits"].items():
        table = pa.concat_tables(pq.read_table(storage.join(corpus, manifest["parts"], b["file"]))
                                 for b in stats["buckets"])
        direct = bucket_stats(table)
        assert (stats["rows"], stats["ids"], stats["multilingual_ids"]) == \
            (direct["rows"], direct["ids"], direct["multilingual_ids"])
        assert stats["ids_per_language"] == dict(sorted(direct["ids_per_language"].items()))
        assert Counter(b["bucket"] for b in stats["buckets"]).most_common(1)[0][1] == 1  # one file per bucket


@pytest.mark.parametrize("where", ["driver", "ray data"])
def test_a_bad_row_is_one_located_error_and_no_manifest(tmp_path, ray_local, monkeypatch, where):
    if where == "ray data":
        monkeypatch.setattr("raysys.data.files.DRIVER_READ_MAX_BYTES", 0)
    path = tmp_path / "pairs.jsonl"
    pairs_jsonl(path, 20)
    path.write_text(path.read_text() + '{"id": "bad", "lang": "en", "query": "q"}\n')
    cfg = config(tmp_path, path, "data.num_buckets=4")
    with pytest.raises(DataError, match=r"pairs\.jsonl.*passage"):
        prepare_corpus(cfg)
    assert not list((tmp_path / "out").rglob(MANIFEST))


def test_raysys_prepare_corpus_writes_what_train_reuses(tmp_path, capsys):
    from raysys.cli import main

    data = write_synthetic_lareqa(tmp_path / "d", articles=4)
    overrides = [f"data.train={data}", f"output_dir={tmp_path / 'out'}"]
    assert main(["prepare", "--dataset", "xquad-r", "--model", "", "--corpus", *overrides]) == 0
    printed = capsys.readouterr().out
    corpus, manifest = prepare_corpus(Config.from_yaml(None, overrides))  # what train would use
    assert f"training corpus of {data}: {corpus} (train " in printed
    assert len(list(storage.local_path(corpus).glob("parts-*"))) == 1  # reused, not written again
