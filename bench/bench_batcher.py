#!/usr/bin/env python
"""Hybrid batcher throughput: can the data path ever be the bottleneck of training?

Runs the per-worker data path that `raysys.train.loop.train_loop_per_worker` had before the
bucketed corpus (`bench/old_ingest.py`; `bench_ingest.py` compares the two), minus the
model: a Ray Dataset -> `rows_for_rank(iterator, rank, world)` (every worker streams the whole
dataset and keeps the parallel ids that hash to it, as with `DataConfig(datasets_to_split=[])`)
-> `ParallelItems` -> `HybridBatcher.epoch(...)`. Tokenization is not included.

Two corpora:
  1. XQuAD-R (the real 13,014 pairs, 11 languages) from `read_lareqa_dir` -> `ray.data.from_arrow`;
     a full epoch of batch building per rank (repeated over a few epochs for a stable timing).
  2. A synthetic parallel corpus of `--pairs` rows (ids x 10 languages; ~60-char queries, ~150-char
     passages), written as one Parquet file per language and read with `raysys.data.files.read_pairs`
     (the path the old `load_split_datasets` took for a Parquet directory). Streamed per rank twice:
     straight from `read_pairs`, and through the group-hash train/validation split training uses
     (`bench.old_ingest.hash_split`). Then `--steps` steps of batch building per rank.

Ranks run one after another in this process (each streams the full dataset, as each training
worker does); per-rank figures are what one worker sees with the other core free for Ray Data.

The batcher rate is compared with the rate one training worker consumes pairs (the default model:
--consumer-step-s seconds per step of --global-batch pairs over --world workers, from
/work/shared/notes/protocol.md, unless a measured figure exists in bench/results/*.json).

    python bench/bench_batcher.py --pairs 1000000 --world 2 --local-batch 8 --out bench/results/batcher.json
    python bench/bench_batcher.py --quick          # < 1 min smoke run (100k pairs, fewer steps)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SYNTH_LANGS = ["ar", "de", "el", "en", "es", "hi", "ru", "th", "tr", "vi"]
# Letters weighted towards frequent ones, plus spaces (~1 in 6 characters).
_ALPHABET = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz" + b"etaoinshr" + b" " * 7, dtype=np.uint8)


def log(msg: str) -> None:
    print(f"[bench_batcher {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- synthetic corpus --------------------------------------------------------------------------

def _random_texts(rng: np.random.Generator, n: int, mean_len: int, sd: int) -> pa.StringArray:
    """n random ASCII strings of ~mean_len characters, built straight into an Arrow buffer."""
    lengths = np.clip(rng.normal(mean_len, sd, n), mean_len // 4, mean_len * 3).astype(np.int32)
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    chars = _ALPHABET[rng.integers(0, len(_ALPHABET), int(offsets[-1]), dtype=np.uint8)]
    chars[offsets[:-1]] = ord("Q")  # no leading blank: every text is non-empty after strip()
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets.tobytes()), pa.py_buffer(chars.tobytes()))


def write_synthetic_corpus(out_dir: Path, total_pairs: int, seed: int = 0) -> dict:
    """~total_pairs rows: total_pairs // 10 parallel ids, each in all 10 languages; one Parquet
    file per language, rows in a per-language random id order (as independent per-language dumps)."""
    rng = np.random.default_rng(seed)
    n_ids = max(1, total_pairs // len(SYNTH_LANGS))
    ids = np.array([f"syn-{i:07d}" for i in range(n_ids)], dtype=object)
    for lang in SYNTH_LANGS:
        order = rng.permutation(n_ids)
        pid = pa.array(ids[order], pa.string())
        table = pa.table({
            "id": pid,
            "lang": pa.array([lang] * n_ids, pa.string()),
            "query": _random_texts(rng, n_ids, 60, 15),
            "passage": _random_texts(rng, n_ids, 150, 40),
            "group": pid,
        })
        pq.write_table(table, out_dir / f"{lang}.parquet", row_group_size=50_000)
    return {"parallel_ids": n_ids, "languages": len(SYNTH_LANGS), "rows": n_ids * len(SYNTH_LANGS),
            "files": len(SYNTH_LANGS), "mean_query_chars": 60, "mean_passage_chars": 150}


# ---- the measured data path --------------------------------------------------------------------

def load_shards(ds, world: int) -> tuple[list, list[dict]]:
    """Per rank: rows_for_rank over a fresh iterator of the whole dataset, then ParallelItems."""
    from raysys.data.hybrid import ParallelItems
    from bench.old_ingest import rows_for_rank

    items, stats = [], []
    for rank in range(world):
        t0 = time.perf_counter()
        table, _ = rows_for_rank(ds.iterator(), rank, world)
        t1 = time.perf_counter()
        it = ParallelItems(table)
        t2 = time.perf_counter()
        items.append(it)
        stats.append({"rank": rank, "shard_rows": table.num_rows, "shard_ids": len(it),
                      "rows_for_rank_s": round(t1 - t0, 3), "parallel_items_s": round(t2 - t1, 3),
                      "shard_load_s": round(t2 - t0, 3)})
        log(f"  rank {rank}: {table.num_rows} rows / {len(it)} ids; rows_for_rank {t1 - t0:.2f} s, "
            f"ParallelItems {t2 - t1:.2f} s")
        del table
    return items, stats


def build_batches(items_per_rank: list, languages: list[str], *, alpha: float, seed: int,
                  local_batch: int, steps: int | None, repeats: int = 3, min_seconds: float = 0.0) -> dict:
    """Time HybridBatcher.epoch per rank, `repeats` times (epochs 0, 1, ...) after an untimed warm-up.

    steps=None: full epochs (the trainer's min over ranks), each timed run repeated over further
    epochs until it lasts min_seconds. Every timed run starts an epoch, so it includes the
    epoch's id permutation (reported as first_step_s). The median run is the figure."""
    from raysys.data.hybrid import HybridBatcher

    batchers = [HybridBatcher(it, languages=languages, alpha=alpha, seed=seed, local_batch_size=local_batch,
                              rank=rank) for rank, it in enumerate(items_per_rank)]
    steps_per_epoch = min(b.local_steps_per_epoch() for b in batchers)  # the trainer's all-reduce min
    n_steps = steps_per_epoch if steps is None else min(steps, steps_per_epoch)
    per_rank = []
    for rank, batcher in enumerate(batchers):
        for _ in batcher.epoch(10_000, min(n_steps, 50)):  # warm-up, untimed
            pass
        runs, epoch = [], 0
        for _ in range(repeats):
            pairs, steps_done, kinds, first_step_s = 0, 0, {"mono": 0, "cross": 0}, None
            t0 = time.perf_counter()
            while True:
                for _, batch in batcher.epoch(epoch, n_steps):
                    if first_step_s is None:
                        first_step_s = time.perf_counter() - t0
                    pairs += len(batch.queries)
                    kinds[batch.plan.kind] += 1
                    steps_done += 1
                epoch += 1
                elapsed = time.perf_counter() - t0
                if steps is not None or elapsed >= min_seconds:
                    break
            runs.append({"steps": steps_done, "pairs": pairs, "seconds": round(elapsed, 4),
                         "pairs_per_s": round(pairs / elapsed, 1), "first_step_s": round(first_step_s, 4),
                         "mono_steps": kinds["mono"], "cross_steps": kinds["cross"]})
        median = sorted(runs, key=lambda r: r["pairs_per_s"])[len(runs) // 2]
        per_rank.append({"rank": rank, "pairs_per_s": median["pairs_per_s"],
                         "steps_per_s": round(median["steps"] / median["seconds"], 1), "runs": runs})
    rates = [r["pairs_per_s"] for r in per_rank]
    return {"alpha": alpha, "steps_per_epoch": steps_per_epoch, "steps_per_timed_run": n_steps if steps else
            f"{n_steps} x epochs until >= {min_seconds} s", "repeats": repeats, "per_rank": per_rank,
            "min_pairs_per_s": min(rates), "mean_pairs_per_s": round(float(np.mean(rates)), 1)}


def stream_and_batch(name: str, ds, languages: list[str], args, *, steps: int | None, input_rows: int,
                     alphas: list[float], **kw) -> dict:
    log(f"{name}: streaming the dataset to {args.world} ranks")
    items, shard_stats = load_shards(ds, args.world)
    # Shards partition the rows, so their sum is what each rank's iterator delivered (every rank
    # streams the whole dataset and keeps its share).
    streamed = sum(s["shard_rows"] for s in shard_stats)
    for s in shard_stats:
        s["rows_streamed"] = streamed
        s["rows_streamed_per_s"] = round(streamed / s["rows_for_rank_s"], 0)
        s["input_rows_per_s"] = round(input_rows / s["rows_for_rank_s"], 0)
    out = {"input_rows": input_rows, "rows_streamed_per_rank": streamed, "shards": shard_stats,
           "shard_load_s_max": max(s["shard_load_s"] for s in shard_stats)}
    out["batching"] = []
    for alpha in alphas:
        res = build_batches(items, languages, alpha=alpha, seed=0, local_batch=args.local_batch, steps=steps,
                            repeats=args.repeats, **kw)
        log(f"  alpha={alpha}: {res['steps_per_epoch']} steps/rank/epoch; batch building "
            f"min {res['min_pairs_per_s']:.0f} pairs/s per rank "
            f"({[r['pairs_per_s'] for r in res['per_rank']]})")
        out["batching"].append(res)
    return out


# ---- consumer rate -----------------------------------------------------------------------------

def consumer_rate(args) -> dict:
    """Pairs/s one training worker consumes: a measured figure from bench/results if any, else protocol."""
    for path in sorted((REPO / "bench" / "results").glob("*.json")):
        if path.name == Path(args.out).name:
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        value = data.get("train_pairs_per_s_per_worker") if isinstance(data, dict) else None
        if isinstance(value, (int, float)) and value > 0:
            return {"pairs_per_s_per_worker": float(value), "source": f"measured: {path.relative_to(REPO)}"}
    per_worker = args.global_batch / args.world / args.consumer_step_s
    return {"pairs_per_s_per_worker": round(per_worker, 3),
            "whole_job_pairs_per_s": round(args.global_batch / args.consumer_step_s, 3),
            "source": (f"assumed, not measured here: /work/shared/notes/protocol.md 'What to expect at CPU scale' "
                       f"(~{args.consumer_step_s} s per step of {args.global_batch} pairs on 2 cores, default model); "
                       f"per worker = {args.global_batch} / {args.world} workers / {args.consumer_step_s} s")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=1_000_000, help="rows of the synthetic corpus")
    p.add_argument("--world", type=int, default=2, help="training workers (ranks)")
    p.add_argument("--local-batch", type=int, default=8, help="pairs per worker per step")
    p.add_argument("--steps", type=int, default=2000, help="batch-building steps per rank, synthetic corpus")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.5, 0.0, 1.0],
                   help="batch-type mixes to time (the first is the headline)")
    p.add_argument("--xquad-r", default="../shared/data/xquad-r", help="LAReQA directory of XQuAD-R")
    p.add_argument("--no-split-path", action="store_true",
                   help="skip streaming the synthetic corpus through the training train/validation split")
    p.add_argument("--global-batch", type=int, default=16, help="for the consumer rate")
    p.add_argument("--consumer-step-s", type=float, default=6.5, help="seconds per training step (protocol)")
    p.add_argument("--target-ratio", type=float, default=100.0)
    p.add_argument("--out", default="bench/results/batcher.json")
    p.add_argument("--repeats", type=int, default=5, help="timed batch-building runs per rank (median reported)")
    p.add_argument("--quick", action="store_true", help="100k synthetic pairs, 300 steps, one alpha, 3 repeats (< 1 min)")
    args = p.parse_args(argv)
    if args.quick:
        args.pairs, args.steps, args.alphas = min(args.pairs, 100_000), min(args.steps, 300), args.alphas[:1]
        args.repeats = min(args.repeats, 3)
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, os.getcwd())] +
                                   (sys.argv[1:] if argv is None else argv))

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import ray
    import ray.data

    from raysys.data.files import read_pairs
    from raysys.data.lareqa import read_lareqa_dir
    from bench.old_ingest import hash_split

    t_start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False

    result: dict = {
        "benchmark": "hybrid batcher throughput (Ray Data -> rows_for_rank -> ParallelItems -> HybridBatcher.epoch)",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "machine": {"nproc": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "ray": ray.__version__, "pyarrow": pa.__version__, "numpy": np.__version__,
                    "ray_init": "ray.init(num_cpus=2, include_dashboard=False)"},
        "settings": {"world": args.world, "local_batch": args.local_batch, "alphas": args.alphas,
                     "tokenization_included": False, "quick": args.quick,
                     "ranks": "run one after another in the driver process; each streams the full dataset"},
    }

    # 1. XQuAD-R --------------------------------------------------------------------------------
    xq_path = Path(args.xquad_r)
    if not xq_path.is_absolute():
        xq_path = (REPO / xq_path).resolve() if not xq_path.exists() else xq_path
    t0 = time.perf_counter()
    corpus = read_lareqa_dir(xq_path)
    t_read = time.perf_counter() - t0
    log(f"XQuAD-R: {corpus.pairs.num_rows} pairs, {len(corpus.languages)} languages, read in {t_read:.2f} s")
    xq_ds = ray.data.from_arrow(corpus.pairs)
    xq = stream_and_batch("XQuAD-R", xq_ds, corpus.languages, args, steps=None, input_rows=corpus.pairs.num_rows,
                          alphas=args.alphas, min_seconds=0.3 if args.quick else 1.0)
    xq.update({"source": str(args.xquad_r), "languages": corpus.languages, "read_lareqa_dir_s": round(t_read, 3),
               "note": "all 13k pairs (no train/validation split); full epochs of batch building"})
    result["xquad_r"] = xq
    del corpus, xq_ds

    # 2. synthetic 1M-pair parallel corpus ----------------------------------------------------------
    with tempfile.TemporaryDirectory(prefix="raysys-bench-batcher-") as tmp:
        t0 = time.perf_counter()
        synth_info = write_synthetic_corpus(Path(tmp), args.pairs)
        t_gen = time.perf_counter() - t0
        log(f"synthetic: {synth_info['rows']} rows in {synth_info['files']} Parquet files, written in {t_gen:.1f} s")
        t0 = time.perf_counter()
        ds = read_pairs(tmp)  # local files: validated row by row on the driver, then from_arrow
        t_read = time.perf_counter() - t0
        log(f"synthetic: read_pairs (driver-side validation) {t_read:.1f} s "
            f"= {synth_info['rows'] / t_read:.0f} rows/s")
        synth = {"corpus": synth_info, "generate_and_write_s": round(t_gen, 2),
                 "reader": "raysys.data.files.read_pairs (handles a local Parquet directory: "
                           "driver-side validation, then ray.data.from_arrow)",
                 "read_pairs_s": round(t_read, 2), "read_pairs_rows_per_s": round(synth_info["rows"] / t_read, 0)}
        direct = stream_and_batch("synthetic (read_pairs dataset)", ds, SYNTH_LANGS, args, steps=args.steps,
                                  input_rows=synth_info["rows"], alphas=args.alphas)
        synth["read_pairs_dataset"] = direct
        if not args.no_split_path:
            train_ds = hash_split(ds, 0.1, 0.15)["train"]  # what the old load_split_datasets gave Ray Train
            # Only the streaming matters here; batching was timed on the direct path.
            split = stream_and_batch("synthetic (train split, as training streams it)", train_ds, SYNTH_LANGS,
                                     args, steps=args.steps, input_rows=synth_info["rows"], alphas=args.alphas[:1])
            split["note"] = ("read_pairs -> bench.old_ingest.hash_split(validation 0.1, test 0.15)['train'], "
                             "exactly what the old load_split_datasets handed Ray Train for a Parquet directory")
            synth["train_split_dataset"] = split
        del ds
    result["synthetic"] = synth

    # 3. versus the consumer ----------------------------------------------------------------------
    consumer = consumer_rate(args)
    rate = consumer["pairs_per_s_per_worker"]
    headline = {
        "xquad_r_batcher_pairs_per_s_per_rank": xq["batching"][0]["min_pairs_per_s"],
        "synthetic_batcher_pairs_per_s_per_rank": direct["batching"][0]["min_pairs_per_s"],
        "xquad_r_shard_load_s": xq["shard_load_s_max"],
        "synthetic_shard_load_s": direct["shard_load_s_max"],
        "synthetic_stream_rows_per_s": min(s["input_rows_per_s"] for s in direct["shards"]),
        "alpha": args.alphas[0],
    }
    if "train_split_dataset" in synth:
        headline["synthetic_train_split_shard_load_s"] = synth["train_split_dataset"]["shard_load_s_max"]
    worst = min(headline["xquad_r_batcher_pairs_per_s_per_rank"], headline["synthetic_batcher_pairs_per_s_per_rank"],
                *[b["min_pairs_per_s"] for b in xq["batching"] + direct["batching"]])
    startup = max(v for k, v in headline.items() if k.endswith("shard_load_s"))
    result["consumer"] = consumer
    result["comparison"] = {
        "target_ratio": args.target_ratio,
        "xquad_r_ratio": round(headline["xquad_r_batcher_pairs_per_s_per_rank"] / rate, 0),
        "synthetic_ratio": round(headline["synthetic_batcher_pairs_per_s_per_rank"] / rate, 0),
        "worst_ratio_any_alpha": round(worst / rate, 0),
        "meets_target": worst / rate >= args.target_ratio,
        "worst_ratio_vs_whole_job_rate": (round(worst / consumer["whole_job_pairs_per_s"], 0)
                                          if "whole_job_pairs_per_s" in consumer else None),
        "startup_shard_load_s_max": startup,
        "startup_shard_load_in_training_steps": round(startup / args.consumer_step_s, 2),
        "note": "ratio = batcher pairs/s per rank / pairs/s one training worker consumes; shard load is a one-off "
                "cost at worker start (and per validation set), not per step",
    }
    result["headline"] = headline
    result["total_wall_s"] = round(time.perf_counter() - t_start, 1)
    ray.shutdown()

    out = Path(args.out)
    if not out.is_absolute():
        out = Path.cwd() / out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"headline: {json.dumps(headline)}")
    log(f"comparison: {json.dumps(result['comparison'])}")
    log(f"wrote {out} (total {result['total_wall_s']} s)")
    return 0 if result["comparison"]["meets_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
