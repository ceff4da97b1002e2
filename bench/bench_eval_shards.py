#!/usr/bin/env python
"""LAReQA evaluation at scale: index-shard actors over stored embeddings vs the old driver path.

Data (seeded, written once per size by a separate process, so no measured process ever made
them): N candidates, unit vectors of dimension 384 in 4 languages (contiguous ranges, as a
LAReQA pool), stored as the encoder stores them (4,096-row .npz files through raysys.storage);
~10k queries in parallel sets of 2-4 languages whose relevant candidates are planted: a query is
the normalised mean of its relevant candidates plus Gaussian noise.

Each measurement is a fresh process (peak RSS = that process's ru_maxrss):
  * new: `raysys.eval.lareqa.evaluate_lareqa_stored` (2 index-shard Ray actors, 1 CPU each, load
    their range of the candidate files; the driver streams the query files);
  * old: the path before index shards (commit OLD_COMMIT): every embedding file concatenated in the
    driver, then that commit's `evaluate_lareqa` (ShardedIndex in the driver + NumPy score blocks),
    up to --old-up-to candidates.
Checks: new == old (every summary figure, ==) where both ran; else per-query multilingual AP and
rank distance of a query subsample against a brute-force NumPy reference (float64, near-ties
rescored as the shards rescore them; a separate process).

    flock /tmp/raysys-heavy.lock .venv/bin/python bench/bench_eval_shards.py \\
        --sizes 500000 1000000 --old-up-to 1000000 --out bench/results/eval_shards.json
"""

from __future__ import annotations

import argparse
import atexit
import datetime as dt
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

OLD_COMMIT = "8f4df41ec4e89db70e216e3ea0b4e4a97376f232"
DIM, LANGS, FILE_ROWS = 384, ("l0", "l1", "l2", "l3"), 4096


def log(msg: str) -> None:
    print(f"[bench_eval_shards {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# -- data ------------------------------------------------------------------------------------

def generate(data: Path, n: int, queries: int, noise: float, seed: int = 0) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raysys.eval.encode import _write_shard

    rng = np.random.default_rng(seed)
    lang_of = np.arange(n) * len(LANGS) // n  # contiguous language ranges
    starts = np.searchsorted(lang_of, np.arange(len(LANGS)))
    ends = np.append(starts[1:], n)
    q_rows = []  # (parallel id, language, gold candidate)
    pid = 0
    while len(q_rows) < queries:
        langs = rng.choice(len(LANGS), size=int(rng.integers(2, 5)), replace=False)
        q_rows += [(f"p{pid}", int(x), int(rng.integers(starts[x], ends[x]))) for x in sorted(langs)]
        pid += 1
    q_rows = q_rows[:queries]
    golds = {}
    for qid, _, cand in q_rows:
        golds.setdefault(qid, []).append(cand)
    wanted = np.unique([c for _, _, c in q_rows])
    gold_vec = {}
    files = []
    for i, start in enumerate(range(0, n, FILE_ROWS)):
        emb = rng.standard_normal((min(FILE_ROWS, n - start), DIM)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        rows = np.arange(start, start + emb.shape[0])
        for r in wanted[(wanted >= start) & (wanted < start + emb.shape[0])]:
            gold_vec[int(r)] = emb[r - start]
        path = str(data / f"candidates-{i:05d}.npz")
        _write_shard(path, rows, emb)
        files.append((path, int(emb.shape[0])))
    q = np.stack([np.mean([gold_vec[c] for c in golds[qid]], axis=0) for qid, _, _ in q_rows])
    q += noise * rng.standard_normal(q.shape).astype(np.float32) / np.sqrt(DIM)
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    q_files = []
    for i, start in enumerate(range(0, len(q), FILE_ROWS)):
        path = str(data / f"queries-{i:05d}.npz")
        _write_shard(path, np.arange(start, min(start + FILE_ROWS, len(q))), q[start:start + FILE_ROWS])
        q_files.append((path, min(FILE_ROWS, len(q) - start)))
    pq.write_table(pa.table({"id": [r[0] for r in q_rows], "lang": [LANGS[r[1]] for r in q_rows],
                             "text": [""] * len(q_rows), "group": ["g"] * len(q_rows),
                             "gold_cand_id": [r[2] for r in q_rows]}), data / "questions.parquet")
    pq.write_table(pa.table({"lang": pa.array(np.array(LANGS)[lang_of])}), data / "candidate_langs.parquet")
    (data / "files.json").write_text(json.dumps({"candidates": files, "queries": q_files}))


def load_corpus(data: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raysys.data.lareqa import CANDIDATE_SCHEMA, QUESTION_SCHEMA, LareqaCorpus

    questions = pq.read_table(data / "questions.parquet").cast(QUESTION_SCHEMA)
    langs = pq.read_table(data / "candidate_langs.parquet").column("lang")
    n = len(langs)
    empty = pa.nulls(n, pa.string())  # no texts: metadata only
    candidates = pa.table([pa.array(np.arange(n)), langs, empty, empty, empty], schema=CANDIDATE_SCHEMA)
    return LareqaCorpus(pairs=pa.table({}), questions=questions, candidates=candidates, skipped={},
                        languages=list(LANGS))


# -- measured roles (each in its own process) ------------------------------------------------

def run_new(data: Path, shards: int, top_k: int) -> dict:
    from raysys.eval.lareqa import evaluate_lareqa_stored
    from raysys.runtime import ensure_ray

    files = json.loads((data / "files.json").read_text())
    ensure_ray()
    corpus = load_corpus(data)
    start = time.perf_counter()
    result = evaluate_lareqa_stored(corpus, [tuple(f) for f in files["queries"]], [tuple(f) for f in files["candidates"]],
                                    num_shards=shards, top_k=top_k, cpus_per_shard=1)
    wall = time.perf_counter() - start
    save_per_query(data / "new_per_query.npz", corpus, result)
    return {"wall_s": round(wall, 1), "driver_peak_rss_gib": round(peak_rss_gib(), 3), "summary": result["summary"]}


def run_old(data: Path, shards: int, top_k: int) -> dict:
    import importlib.util

    from raysys.eval.shards import read_embedding_file

    source = subprocess.run(["git", "-C", str(REPO), "show", f"{OLD_COMMIT}:raysys/eval/lareqa.py"],
                            check=True, capture_output=True, text=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("old_lareqa", f.name)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    files = json.loads((data / "files.json").read_text())
    corpus = load_corpus(data)
    start = time.perf_counter()
    # As the old encode_texts handed them over: every file read back and concatenated in the driver.
    q = np.concatenate([read_embedding_file(p) for p, _ in files["queries"]])
    c = np.concatenate([read_embedding_file(p) for p, _ in files["candidates"]])
    result = old.evaluate_lareqa(corpus, q, c, num_shards=shards, top_k=top_k)
    wall = time.perf_counter() - start
    save_per_query(data / "old_per_query.npz", corpus, result)
    return {"wall_s": round(wall, 1), "driver_peak_rss_gib": round(peak_rss_gib(), 3), "summary": result["summary"]}


def save_per_query(path: Path, corpus, result: dict) -> None:
    q_langs = np.array(corpus.questions.column("lang").to_pylist())
    ap, rd = np.zeros(len(q_langs)), np.zeros(len(q_langs))
    for x in LANGS:
        rows = np.flatnonzero(q_langs == x)
        ap[rows] = result["per_query"][f"{x}-multi"]["ap"]
        rd[rows] = result["per_query"][f"{x}-multi"]["rank_distance"]
    np.savez(path, ap=ap, rank_distance=rd)


def check_subsample(data: Path, sample: int) -> dict:
    """Brute force (full score rows, the tie rule written out) for `sample` queries: float64 score
    rows, and the candidates within 1e-9 of a relevant one rescored by raysys.eval.shards.exact_scores
    (what the shards compare near-ties by), read back from the files in a second pass."""
    from raysys.eval.metrics import average_precision_from_ranks, max_rank_distance
    from raysys.eval.shards import exact_scores, read_embedding_file

    files = json.loads((data / "files.json").read_text())
    corpus = load_corpus(data)
    rows = np.random.default_rng(1).choice(corpus.questions.num_rows, size=sample, replace=False)
    q = np.concatenate([read_embedding_file(p) for p, _ in files["queries"]])[rows]
    scores = np.concatenate([q.astype(np.float64) @ read_embedding_file(p).astype(np.float64).T
                             for p, _ in files["candidates"]], axis=1)
    gold = corpus.relevant_by_question()
    ids = corpus.questions.column("id").to_pylist()
    rels = [sorted(gold[ids[row]].values()) for row in rows]
    near = {i: np.unique(np.concatenate([np.flatnonzero(np.abs(scores[i] - scores[i, d]) <= 1e-9) for d in rel]))
            for i, rel in enumerate(rels)}
    wanted = np.unique(np.concatenate(list(near.values())))
    vectors, first = {}, 0
    for p, n in files["candidates"]:
        inside = wanted[(wanted >= first) & (wanted < first + n)]
        if inside.size:
            emb = read_embedding_file(p)
            vectors.update(zip(inside.tolist(), emb[inside - first]))
        first += n
    for i, cols in near.items():
        scores[i, cols] = exact_scores(np.repeat(q[i:i + 1], cols.size, axis=0), np.stack([vectors[c] for c in cols]))
    got = np.load(data / "new_per_query.npz")
    mismatches = 0
    for i, row in enumerate(rows):
        rel, s = rels[i], scores[i]
        ranks = np.array([int((s >= s[d]).sum()) - sum(1 for e in rel if e > d and s[e] == s[d]) for d in rel])
        mismatches += (average_precision_from_ranks(ranks) != got["ap"][row]
                       or max_rank_distance(ranks) != got["rank_distance"][row])
    return {"queries_checked": sample, "mismatches": int(mismatches)}


# -- orchestration ---------------------------------------------------------------------------

def child(role: str, data: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--role", role, "--data", str(data), "--shards", str(args.shards),
           "--top-k", str(args.top_k), "--queries", str(args.queries), "--sample", str(args.sample)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[500_000, 1_000_000])
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--top-k", type=int, default=100)
    p.add_argument("--old-up-to", type=int, default=1_000_000, help="largest N the old path runs at")
    p.add_argument("--sample", type=int, default=64, help="queries checked by brute force when old did not run")
    p.add_argument("--noise", type=float, default=2.0)
    p.add_argument("--work", default=None, help="directory for the generated data (default: a temp dir)")
    p.add_argument("--out", default=None)
    p.add_argument("--role", choices=["gen", "new", "old", "check"], help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role:
        data = Path(args.data)
        out = {"new": lambda: run_new(data, args.shards, args.top_k), "old": lambda: run_old(data, args.shards, args.top_k),
               "check": lambda: check_subsample(data, args.sample)}[args.role]()
        print(json.dumps(out))
        return
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-eval-shards-"))
    if not args.work:  # generated data is GBs at the larger sizes; a --work directory is kept for reruns
        atexit.register(shutil.rmtree, work, ignore_errors=True)
    rows = []
    for n in args.sizes:
        data = work / f"n{n}"
        data.mkdir(parents=True, exist_ok=True)
        if not (data / "files.json").exists():
            log(f"N={n}: generating")
            subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); "
                            f"from bench.bench_eval_shards import generate; from pathlib import Path; "
                            f"generate(Path({str(data)!r}), {n}, {args.queries}, {args.noise})"], check=True)
        row = {"candidates": n, "queries": args.queries}
        log(f"N={n}: new path")
        row["new"] = child("new", data, args)
        log(f"N={n}: new {row['new']['wall_s']} s, driver peak {row['new']['driver_peak_rss_gib']} GiB")
        if n <= args.old_up_to:
            row["old"] = child("old", data, args)
            row["identical_to_old"] = row["old"]["summary"] == row["new"]["summary"]
            a, b = np.load(data / "old_per_query.npz"), np.load(data / "new_per_query.npz")
            # Queries whose multilingual AP differs (a rank moved by an ulp-level score difference).
            row["queries_differing_from_old"] = int(np.count_nonzero((a["ap"] != b["ap"]) | (a["rank_distance"] != b["rank_distance"])))
            log(f"N={n}: old {row['old']['wall_s']} s, driver peak {row['old']['driver_peak_rss_gib']} GiB, "
                f"identical={row['identical_to_old']}")
        row["brute_force_subsample"] = child("check", data, args)
        log(f"N={n}: brute force subsample {row['brute_force_subsample']}")
        rows.append(row)
        write(args, command, rows)  # after every size: a cut-short run keeps what it measured


def write(args, command: str, rows: list) -> None:
    result = {
        "benchmark": "LAReQA evaluation at scale: index-shard actors over stored embeddings vs the old driver path",
        "command": command,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "setup": {"dim": DIM, "languages": len(LANGS), "index_shards": args.shards, "top_k": args.top_k,
                  "cpus_per_shard_actor": 1, "file_rows": FILE_ROWS, "noise": args.noise,
                  "old_path": f"commit {OLD_COMMIT[:7]}: embeddings concatenated in the driver + its evaluate_lareqa"},
        "rows": rows,
    }
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
