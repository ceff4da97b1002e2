#!/usr/bin/env python
"""Cost of shape-independent ranks: `raysys.eval.ranking.rank_block` with today's index shards
(float64 GEMM count pass; candidates within its error bound of a relevant one compared by float64
scores summed in a fixed order) against the same code at BEFORE_COMMIT (float32 comparisons only,
whose ranks can move by one with the GEMM shape), in one process, alternating, on the same data.

Data (seeded): N unit vectors of dimension 384 in 4 languages; B queries, each the normalised
mean of R planted relevant candidates plus noise (as bench_eval_shards.py), and a share of the
candidates are copies of relevant ones, one ulp-level perturbation apart (the near-ties the
float64 comparison exists for). Both versions rank the same blocks in-process (one shard, the
default column chunk); the result records seconds per block for each, their ratio, how many
ranks differ between the two, and how many candidates per (query, relevant) pair fell within the
float64 GEMM's error margin (scored again in the fixed order; the relevant candidate included).

    flock /tmp/raysys-heavy.lock .venv/bin/python bench/bench_exact_ties.py --out bench/results/exact_ties.json
"""

from __future__ import annotations

import argparse
import atexit
import datetime as dt
import importlib.util
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.results_file import emit  # noqa: E402

import numpy as np  # noqa: E402

BEFORE_COMMIT = "97d34a6"  # the last commit whose shards compared float32 scores only
DIM = 384


def old_modules():
    """raysys.eval.shards and raysys.eval.ranking as they were at BEFORE_COMMIT."""
    modules, folder = {}, Path(tempfile.mkdtemp(prefix="bench-exact-ties-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    sys.path.insert(0, str(folder))
    for name in ("shards", "ranking"):
        source = subprocess.run(["git", "-C", str(REPO), "show", f"{BEFORE_COMMIT}:raysys/eval/{name}.py"],
                                check=True, capture_output=True, text=True).stdout
        path = folder / f"old_{name}.py"
        path.write_text(source.replace("from raysys.eval.shards import", "from old_shards import"))
        spec = importlib.util.spec_from_file_location(f"old_{name}", path)
        modules[name] = importlib.util.module_from_spec(spec)
        sys.modules[f"old_{name}"] = modules[name]
        spec.loader.exec_module(modules[name])
    return modules


def make_data(n: int, queries: int, relevant: int, near_share: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((n, DIM)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    rel = [rng.choice(n, size=relevant, replace=False) for _ in range(queries)]
    q = np.stack([c[r].mean(0) for r in rel]) + rng.standard_normal((queries, DIM)).astype(np.float32) * 0.05
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    # Near-ties: candidates that copy a relevant vector with a one-ulp change in one coordinate.
    planted = np.concatenate(rel)
    copies = rng.choice(np.setdiff1d(np.arange(n), planted), size=int(near_share * n), replace=False)
    sources = rng.choice(planted, size=copies.size)
    c[copies] = c[sources]
    coords = rng.integers(0, DIM, size=copies.size)
    c[copies, coords] = np.nextafter(c[copies, coords], np.inf)
    groups = (np.arange(n) * 4 // n).astype(np.int64)
    return q, c, rel, groups


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--candidates", type=int, default=200_000)
    p.add_argument("--queries", type=int, default=512, help="one block")
    p.add_argument("--relevant", type=int, default=11, help="relevant candidates per query (XQuAD-R: 11)")
    p.add_argument("--near-share", type=float, default=0.01, help="share of candidates that near-copy a relevant one")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    from raysys.eval import ranking, shards

    old = old_modules()
    q, c, rel, groups = make_data(args.candidates, args.queries, args.relevant, args.near_share)
    versions = {"float32_only": (old["ranking"], old["shards"]), "float64_gemm": (ranking, shards)}
    built = {name: mod_ranking.LocalShards(c, [0, len(c)], groups)
             for name, (mod_ranking, _) in versions.items()}
    seconds = {name: [] for name in versions}
    results = {}
    for _ in range(args.rounds):
        for name, (mod_ranking, _) in versions.items():
            start = time.perf_counter()
            results[name] = mod_ranking.rank_block(built[name], q, rel, k=100)
            seconds[name].append(time.perf_counter() - start)
    differing = sum(int(not np.array_equal(a, b)) for a, b in zip(results["float32_only"].ranks,
                                                                  results["float64_gemm"].ranks))
    # How many candidates fell inside the float64 GEMM's error margin (scored again), per pair.
    shard = built["float64_gemm"].shards[0]
    s = q.astype(np.float64) @ c.astype(np.float64).T
    thresholds = np.stack([s[i, r] for i, r in enumerate(rel)])
    margin = 2 * shards.float64_error_bound(DIM) * (max(shard.chunk_norms) + 1.0)
    near = np.mean([np.count_nonzero(np.abs(s[i][None, :] - thresholds[i][:, None]) <= margin) / len(rel[i])
                    for i in range(len(rel))])
    median = {name: float(np.median(v)) for name, v in seconds.items()}
    result = {
        "benchmark": "rank_block, one in-process shard: float64 GEMM count pass (near-ties in fixed-order float64) vs float32 only",
        "command": "flock /tmp/raysys-heavy.lock .venv/bin/python bench/bench_exact_ties.py "
                   + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "setup": {"candidates": args.candidates, "queries": args.queries, "relevant_per_query": args.relevant,
                  "dim": DIM, "near_copies_share": args.near_share, "blas_threads": "numpy's default (all cores)",
                  "before_commit": BEFORE_COMMIT},
        "seconds_per_block": seconds, "median_s": median,
        "ratio_float64_gemm_over_float32_only": median["float64_gemm"] / median["float32_only"],
        "candidates_within_margin_per_relevant_pair": float(near),
        "queries_whose_ranks_differ": differing,
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
