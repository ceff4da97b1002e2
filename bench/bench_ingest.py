#!/usr/bin/env python
"""Training ingest at scale: the bucketed corpus (raysys.data.buckets) against the old path.

A synthetic parallel corpus (`bench_batcher.write_synthetic_corpus`: ids x 10 languages, one
Parquet file per language, ~60-char queries and ~150-char passages) at each `--pairs` size, with
the default split (validation 0.1, test 0.15 by group hash). Every role runs in its own process,
so each peak RSS (ru_maxrss) is that role's alone; ranks run one after another:

  new  * driver: `prepare_corpus` (buckets + manifest; on the driver up to 256 MiB of local input,
         by Ray Data above) and `compute_facts`: time, peak RSS;
       * worker r of W: its `BucketShare` (buffer `--buffer-rows`) -> HybridBatcher -> first batch,
         then the rest of one epoch: rows read, time to the first batch, pairs/s, peak RSS;
  old  * driver: the per-id set of languages over the train split (`bench/old_ingest.driver_facts`);
       * worker r of W: stream the whole train split, keep the ids hashing to r
         (`bench/old_ingest.rows_for_rank`) -> ParallelItems -> first batch, then one epoch.

Ray start-up in a role's process is outside its timings. Batch-building pairs/s is compared with
what one training worker consumes, from `bench/results/train.json` (2 workers, default model).

    flock /tmp/raysys-heavy.lock .venv/bin/python bench/bench_ingest.py --pairs 1000000 4000000 \\
        --world 2 4 --out bench/results/ingest.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
LOCAL_BATCH = 8


def log(msg: str) -> None:
    print(f"[bench_ingest {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def peak_rss_mib() -> float:
    """This process's peak RSS: VmHWM, which starts afresh at exec (ru_maxrss would carry over the
    forking parent's peak, here the corpus writer's, as a floor)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def bench_config(data: str, out: str, world: int):
    from raysys.config import Config

    return Config.from_yaml(None, [f"data.train={data}", f"output_dir={out}", f"train.num_workers={world}",
                                   f"train.global_batch_size={LOCAL_BATCH * world}"])


def start_ray():
    import ray
    import ray.data

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def first_batch_and_rate(items, languages: list[str], rank: int, t0: float) -> dict:
    """Time to the first batch (from t0), then the rest of a whole epoch: pairs/s of batch building."""
    from raysys.data.hybrid import HybridBatcher

    batcher = HybridBatcher(items, languages=languages, alpha=0.5, seed=0, local_batch_size=LOCAL_BATCH, rank=rank)
    epoch = batcher.epoch(0, batcher.local_steps_per_epoch())
    next(epoch)
    first = time.perf_counter() - t0
    t1 = time.perf_counter()
    built = 1 + sum(1 for _ in epoch)
    return {"first_batch_s": round(first, 3), "batches_built": built,
            "pairs_per_s": round((built - 1) * LOCAL_BATCH / max(time.perf_counter() - t1, 1e-9), 0)}


def role_new_driver(a: dict) -> dict:
    from raysys.train.datasets import compute_facts, prepare_corpus

    start_ray()
    config = bench_config(a["data"], a["out"], a["world"])
    t0 = time.perf_counter()
    corpus, manifest = prepare_corpus(config)
    t1 = time.perf_counter()
    facts = compute_facts(manifest, config)
    return {"prepare_s": round(t1 - t0, 2), "facts_s": round(time.perf_counter() - t1, 4), "corpus": corpus,
            "train_rows": facts.num_rows, "train_ids": facts.total_ids,
            "buckets_written": sum(len(s["buckets"]) for s in manifest["splits"].values()),
            "bytes_written": sum(s["bytes"] for s in manifest["splits"].values()), "languages": facts.languages}


def role_new_worker(a: dict) -> dict:
    """As raysys.train.loop: the worker's BucketShare, streamed through data.worker_buffer_rows."""
    from raysys import storage
    from raysys.data.buckets import MANIFEST
    from raysys.data.share import BucketShare

    t0 = time.perf_counter()
    manifest = storage.read_json(storage.join(a["corpus"], MANIFEST))
    share = BucketShare(a["corpus"], manifest, "train", a["rank"], a["world"], a["buffer_rows"])
    result = first_batch_and_rate(share, a["languages"], a["rank"], t0)
    return {"rows_read": share.rows_read, "share_rows": sum(b["rows"] for b in share.buckets), **result}


def old_train_split(data: str):
    from bench.old_ingest import hash_split
    from raysys.data.files import read_pairs

    return hash_split(read_pairs(data), 0.1, 0.15)["train"]


def role_old_driver(a: dict) -> dict:
    from bench.old_ingest import driver_facts

    start_ray()
    t0 = time.perf_counter()
    facts = driver_facts(old_train_split(a["data"]))
    return {"facts_s": round(time.perf_counter() - t0, 2), "train_rows": facts["rows"], "train_ids": facts["ids"]}


def role_old_worker(a: dict) -> dict:
    from bench.old_ingest import rows_for_rank
    from raysys.data.hybrid import ParallelItems

    start_ray()
    ds = old_train_split(a["data"])
    t0 = time.perf_counter()
    table, streamed = rows_for_rank(ds.iterator(), a["rank"], a["world"])
    items = ParallelItems(table)
    del table
    return {"rows_read": streamed, **first_batch_and_rate(items, a["languages"], a["rank"], t0)}


ROLES = {"new_driver": role_new_driver, "new_worker": role_new_worker,
         "old_driver": role_old_driver, "old_worker": role_old_worker}


def run_role(role: str, **args) -> dict:
    """One role in a fresh process: its result plus its peak RSS."""
    proc = subprocess.run([sys.executable, __file__, "--role", role, json.dumps(args)], capture_output=True,
                          text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{role} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def consumer_rate() -> dict:
    train = json.loads((REPO / "bench" / "results" / "train.json").read_text())
    run = train["scaling"]["runs"]["2 workers"]
    return {"pairs_per_s_per_worker": round(run["pairs_per_s"] / run["workers"], 3),
            "source": "bench/results/train.json scaling.runs['2 workers'] (default model, CPU, global batch 16)"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, nargs="+", default=[1_000_000])
    p.add_argument("--world", type=int, nargs="+", default=[2, 4])
    p.add_argument("--buffer-rows", type=int, default=200_000, help="data.worker_buffer_rows of the new path")
    p.add_argument("--skip-old-above", type=int, default=None, help="no old-path run above this many pairs")
    p.add_argument("--out", default=None)
    p.add_argument("--role", default=None, help=argparse.SUPPRESS)
    p.add_argument("role_args", nargs="?", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role:
        result = ROLES[args.role](json.loads(args.role_args))
        print(json.dumps({**result, "peak_rss_mib": peak_rss_mib()}))
        return

    from bench.bench_batcher import write_synthetic_corpus

    consumer = consumer_rate()
    sizes = {}
    for pairs in args.pairs:
        with tempfile.TemporaryDirectory(prefix="raysys-bench-ingest-") as tmp:
            data = Path(tmp, "data")
            data.mkdir()
            corpus_info = write_synthetic_corpus(data, pairs)
            log(f"{corpus_info['rows']} rows written")
            size = {"corpus": corpus_info, "by_world": {}}
            for world in args.world:
                # One output directory per size: the second world size finds the corpus (fingerprint reuse).
                new_driver = run_role("new_driver", data=str(data), out=str(Path(tmp, "out")), world=world)
                log(f"W={world}: prepare {new_driver['prepare_s']} s, driver {new_driver['peak_rss_mib']} MiB")
                common = dict(world=world, languages=new_driver["languages"])
                new_workers = [run_role("new_worker", corpus=new_driver["corpus"], rank=r,
                                        buffer_rows=args.buffer_rows, **common)
                               for r in range(world)]
                entry = {"new": {"driver": new_driver, "workers": new_workers,
                                 "rows_read_total_over_train_rows":
                                     round(sum(w["rows_read"] for w in new_workers) / new_driver["train_rows"], 4)}}
                if args.skip_old_above is None or pairs <= args.skip_old_above:
                    old_driver = run_role("old_driver", data=str(data))
                    old_workers = [run_role("old_worker", data=str(data), rank=r, **common) for r in range(world)]
                    entry["old"] = {"driver": old_driver, "workers": old_workers,
                                    "rows_read_total_over_train_rows":
                                        round(sum(w["rows_read"] for w in old_workers) / old_driver["train_rows"], 4)}
                    entry["first_batch_old_over_new"] = round(
                        max(w["first_batch_s"] for w in old_workers) / max(w["first_batch_s"] for w in new_workers), 2)
                entry["batch_building_over_consumption"] = round(
                    min(w["pairs_per_s"] for w in new_workers) / consumer["pairs_per_s_per_worker"], 0)
                log(json.dumps(entry)[:600])
                size["by_world"][world] = entry
            sizes[pairs] = size
    result = {
        "command": "flock /tmp/raysys-heavy.lock .venv/bin/python bench/bench_ingest.py "
                   + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "date": dt.date.today().isoformat(), "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}",
        "local_batch": LOCAL_BATCH, "worker_buffer_rows": args.buffer_rows, "consumer": consumer, "sizes": sizes,
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
