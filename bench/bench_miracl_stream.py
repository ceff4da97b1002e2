#!/usr/bin/env python
"""Driver memory of a MIRACL-style evaluation as the corpus grows: today's path (the encoder
actors read corpus.jsonl in byte ranges; the driver holds 8-byte hashes and the top-k docids)
against OLD_COMMIT (the driver read the corpus into a dict and shipped its texts to the encoders),
each in a fresh driver process, one after the other, on the same data.

Data (seeded): one language, N passages of ~500 characters (MIRACL's Wikipedia passages average
about that), 500 topics with one judged passage each. Model: the tiny test encoder (character
tokens, hidden 32) with eval.max_length=32, so encoding stays cheap and the driver's share shows.
Per run: wall time of `raysys.eval.run.evaluate` (Ray started before the timer), the driver's
peak RSS (ru_maxrss), and the summary (nDCG@10, R@100, MRR@10), which must be equal between the
two versions.

    flock /tmp/raysys-heavy.lock .venv/bin/python bench/bench_miracl_stream.py --sizes 50000 200000 400000 \\
        --out bench/results/miracl_stream.json
"""

from __future__ import annotations

import argparse
import atexit
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.results_file import emit  # noqa: E402

OLD_COMMIT = "112a300"  # the last commit whose driver read the MIRACL corpus into a dict

CHILD = """
import json, resource, sys, time
from raysys.config import Config
from raysys.eval.run import evaluate
from raysys.runtime import ensure_ray
model, root, work = sys.argv[1:4]
ensure_ray()
start = time.perf_counter()
result = evaluate(model, [f"miracl:{root}"], Config.from_yaml(None, ["eval.max_length=32"]), work, progress=False)
wall = time.perf_counter() - start
print("RESULT " + json.dumps({"wall_s": wall, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                             "summary": result[f"miracl:{root}"]["summary"]}))
"""


def write_corpus(root: Path, n: int, topics: int = 500, seed: int = 0) -> None:
    import numpy as np

    rng = np.random.default_rng(seed)
    words = np.array(["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.integers(3, 10)))
                      for _ in range(5000)])
    lang = root / "xx"
    lang.mkdir(parents=True)
    with open(lang / "corpus.jsonl", "w", encoding="utf-8") as f:
        for i in range(n):
            text = " ".join(words[rng.integers(0, len(words), size=75)])
            f.write(json.dumps({"docid": f"doc{i}#0", "title": f"T{i % 997}", "text": text}) + "\n")
    judged = rng.choice(n, size=topics, replace=False)
    (lang / "topics.tsv").write_text("".join(f"q{t}\tT{d % 997} {' '.join(words[:3])}\n" for t, d in enumerate(judged)))
    (lang / "qrels.tsv").write_text("".join(f"q{t} Q0 doc{d}#0 1\n" for t, d in enumerate(judged)))


def run_version(tree: Path, model: Path, root: Path, work: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", CHILD, str(model), str(root), str(work)], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=3600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{tree}: exit {done.returncode}\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[50_000, 200_000, 400_000])
    p.add_argument("--out", default=None)
    args = p.parse_args()

    from tests.tiny_model import build_tiny_model

    scratch = Path(tempfile.mkdtemp(prefix="bench-miracl-stream-"))
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    old_tree = scratch / "old"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(old_tree), OLD_COMMIT], check=True)
    atexit.register(subprocess.run, ["git", "-C", str(REPO), "worktree", "remove", "--force", str(old_tree)])
    model = build_tiny_model(scratch / "model")
    runs = []
    for n in args.sizes:
        root = scratch / f"miracl-{n}"
        write_corpus(root, n)
        row = {"passages": n, "corpus_mib": (root / "xx" / "corpus.jsonl").stat().st_size / 2**20}
        for name, tree in (("new", REPO), ("old", old_tree)):
            row[name] = run_version(tree, model, root, scratch / f"work-{name}-{n}")
            print(f"{n} {name}: {row[name]['wall_s']:.1f} s, driver peak {row[name]['peak_rss_mib']:.0f} MiB", flush=True)
        row["same_summary"] = row["new"]["summary"] == row["old"]["summary"]
        runs.append(row)
        shutil.rmtree(root)
    result = {
        "benchmark": "MIRACL-style evaluation: driver peak RSS and wall time, corpus read by the encoder actors "
                     "(new) vs read into a dict on the driver (old)",
        "command": "flock /tmp/raysys-heavy.lock .venv/bin/python bench/bench_miracl_stream.py "
                   + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "setup": {"old_commit": OLD_COMMIT, "model": "tests/tiny_model.py (hidden 32, character tokens)",
                  "eval.max_length": 32, "topics": 500, "passage_chars": "~500", "languages": 1},
        "runs": runs,
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
