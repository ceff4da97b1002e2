#!/usr/bin/env python
"""Top-k search throughput: the evaluation's index shards (`raysys.eval.shards.IndexShard`, a FAISS
IndexFlatIP each, merged by `raysys.eval.ranking.merge_top_k`) in-process vs brute force in NumPy
(`q @ c.T` per chunk of queries + `argpartition` + a sort of the k best), exact both.

Data: XQuAD-R-sized, 13,014 candidates and 13,090 queries of dimension 384 (the default model's),
random Gaussian vectors, L2-normalised (seeded); exact flat search costs the same for any values.
`--embeddings DIR` takes real ones instead: the `queries-*.npz` and `candidates-*.npz` shards
that `raysys.eval.run.evaluate` caches (e.g. the work dir of bench_eval.py's full run).

Contenders, 2 threads each (FAISS via IndexShard's `threads=`, NumPy's BLAS via threadpoolctl), alternated
per round: 1 index shard and 2 (EvalConfig.num_shards's default), and NumPy brute force. Index
build time is reported apart; search time is all queries through every shard's `search(q, k)` and
the merge.
The NumPy result is checked against FAISS (same top-k sets up to ties).

    python bench/bench_search.py --out bench/results/search.json    # ~1-2 min on 2 cores
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402


def log(msg: str) -> None:
    print(f"[bench_search {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def numpy_topk(queries: np.ndarray, cands: np.ndarray, k: int, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product, score descending: (scores [Q, k], ids [Q, k])."""
    out_s = np.empty((queries.shape[0], k), np.float32)
    out_i = np.empty((queries.shape[0], k), np.int64)
    cands_t = np.ascontiguousarray(cands.T)
    for start in range(0, queries.shape[0], chunk):
        scores = queries[start:start + chunk] @ cands_t
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        part_scores = np.take_along_axis(scores, part, axis=1)
        order = np.argsort(-part_scores, axis=1, kind="stable")
        out_i[start:start + chunk] = np.take_along_axis(part, order, axis=1)
        out_s[start:start + chunk] = np.take_along_axis(part_scores, order, axis=1)
    return out_s, out_i


def load_shards(directory: Path, name: str) -> np.ndarray:
    paths = sorted(directory.glob(f"{name}-*.npz"))
    if not paths:
        raise SystemExit(f"{directory}: no {name}-*.npz shards")
    return np.concatenate([np.load(p)["embedding"] for p in paths]).astype(np.float32)


def agreement(ids_a: np.ndarray, ids_b: np.ndarray) -> float:
    """Mean fraction of each query's top-k set found in the other's."""
    return float(np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(ids_a, ids_b)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--candidates", type=int, default=13014)
    ap.add_argument("--queries", type=int, default=13090)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--ks", default="10,100")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=1024, help="NumPy brute force: queries per matrix product")
    ap.add_argument("--embeddings", default=None, help="directory of queries-*.npz / candidates-*.npz shards")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
    t_start = time.perf_counter()

    import faiss

    from raysys.eval.ranking import balanced_bounds, merge_top_k
    from raysys.eval.shards import IndexShard

    if args.embeddings:
        queries = load_shards(Path(args.embeddings), "queries")
        cands = load_shards(Path(args.embeddings), "candidates")
        data = f"real embeddings from {args.embeddings}"
    else:
        rng = np.random.default_rng(args.seed)
        cands = rng.standard_normal((args.candidates, args.dim), dtype=np.float32)
        queries = rng.standard_normal((args.queries, args.dim), dtype=np.float32)
        cands /= np.linalg.norm(cands, axis=1, keepdims=True)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        data = f"random Gaussian, L2-normalised, seed {args.seed}"
    log(f"{queries.shape[0]} queries x {cands.shape[0]} candidates, d={cands.shape[1]} ({data})")

    build = {}
    indexes = {}
    for shards in (1, 2):
        t = time.perf_counter()
        bounds = balanced_bounds(cands.shape[0], shards)
        indexes[f"faiss-{shards}shard"] = [IndexShard(int(lo), vectors=cands[lo:hi], threads=args.threads)
                                           for lo, hi in zip(bounds[:-1], bounds[1:])]
        build[f"faiss-{shards}shard"] = round(time.perf_counter() - t, 4)

    def faiss_search(name, k):
        parts = [shard.search(queries, k) for shard in indexes[name]]
        return merge_top_k([scores for scores, _ in parts], [ids for _, ids in parts], k)

    def numpy_search(k):
        with threadpool_limits(limits=args.threads):
            return numpy_topk(queries, cands, k, args.chunk)

    ks = [int(k) for k in args.ks.split(",")]
    results = {}
    for k in ks:
        contenders = {"faiss-1shard": lambda k=k: faiss_search("faiss-1shard", k),
                      "faiss-2shard": lambda k=k: faiss_search("faiss-2shard", k),
                      "numpy": lambda k=k: numpy_search(k)}
        times = {c: [] for c in contenders}
        outs = {}
        for r in range(args.rounds):
            order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
            for c in order:
                t = time.perf_counter()
                outs[c] = contenders[c]()
                times[c].append(time.perf_counter() - t)
            log(f"k={k} round {r}: " + ", ".join(f"{c} {times[c][-1]:.2f} s" for c in contenders))
        med = {c: statistics.median(v) for c, v in times.items()}
        ref_scores = outs["faiss-1shard"][0]
        results[f"top{k}"] = {
            c: {"seconds": [round(x, 3) for x in times[c]], "median_s": round(med[c], 3),
                "queries_per_s": round(queries.shape[0] / med[c], 1),
                "topk_set_agreement_with_faiss_1shard": round(agreement(outs[c][1], outs["faiss-1shard"][1]), 6),
                "max_abs_score_diff_vs_faiss_1shard": float(np.abs(outs[c][0] - ref_scores).max())}
            for c in contenders}
        results[f"top{k}"]["ratio_faiss_over_numpy"] = {
            c: round(med["numpy"] / med[c], 2) for c in ("faiss-1shard", "faiss-2shard")}

    ratios = [results[f"top{k}"]["ratio_faiss_over_numpy"][c] for k in ks for c in ("faiss-1shard", "faiss-2shard")]
    report = {
        "benchmark": "top-k search throughput: IndexShard (FAISS flat IP) shards + merge_top_k vs NumPy brute force",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "machine": {"nproc": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "numpy": np.__version__, "faiss": faiss.__version__,
                    "note": "shared 2-core machine: other test runs may have been active"},
        "settings": {"queries": int(queries.shape[0]), "candidates": int(cands.shape[0]), "dim": int(cands.shape[1]),
                     "data": data, "threads": args.threads, "rounds": args.rounds, "numpy_chunk": args.chunk,
                     "timing": "median over rounds of one search of all queries; contenders alternated per round"},
        "build_s": build,
        "results": results,
        "target": {"target": "no numeric target in the issue; recorded: are the index shards at least as fast as "
                             "NumPy brute force (ratio >= 1) for every k and shard count",
                   "min_ratio": min(ratios), "passed": bool(min(ratios) >= 1.0)},
        "total_wall_s": round(time.perf_counter() - t_start, 1),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
        log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
