#!/usr/bin/env python
"""Fixed costs of one LAReQA evaluation on a one-node Ray: encoder pipelines and index-shard actors.

XQuAD-R's test articles (the real files, the default languages and split) encoded by the test
suite's tiny random BERT, so that start-up, not the forward passes, dominates. In one process, alternating variants per round
(fresh embedding directories every time, so nothing is reused):
  * encode, one pipeline: `encode_sets({queries, candidates})` (one actor start and model load);
  * encode, two pipelines: `encode_to_storage` for queries, then for candidates (as before);
  * score in-process: `evaluate_lareqa_stored(..., in_process=True)` over the stored files;
  * score with actors: the same with 2 index-shard Ray actors (start-up included).
Reports the medians and the ratios of each pair.

    flock /tmp/raysys-heavy.lock .venv/bin/python bench/bench_eval_startup.py --rounds 3 \\
        --out bench/results/eval_startup.json
"""

from __future__ import annotations

import argparse
import atexit
import datetime as dt
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.results_file import emit  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "xquad-r"))
    p.add_argument("--out", default=None)
    args = p.parse_args()

    import ray

    from raysys.config import Config
    from raysys.data.lareqa import read_lareqa_dir
    from raysys.data.split import split_groups
    from raysys.eval.encode import encode_sets, encode_to_storage
    from raysys.eval.lareqa import evaluate_lareqa_stored
    from raysys.eval.embeddings import encoder_settings
    from raysys.runtime import ensure_ray
    from tests.tiny_model import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="bench-eval-startup-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    model = str(build_tiny_model(work / "model"))
    config = Config()
    corpus = read_lareqa_dir(args.data, config.data.languages)
    corpus = corpus.subset(split_groups(corpus.groups, config.data.validation_fraction,
                                        config.data.test_fraction)["test"])
    queries = corpus.questions.column("text").to_pylist()
    candidates = corpus.candidates.column("text").to_pylist()
    ensure_ray()
    common = dict(model_path=model, settings=encoder_settings(config), threads=os.cpu_count(), progress=False)

    times: dict[str, list[float]] = {k: [] for k in ("encode_one_pipeline", "encode_two_pipelines",
                                                      "score_in_process", "score_actors")}
    checks = []
    for r in range(args.rounds):
        t = time.perf_counter()
        files = encode_sets({"queries": (queries, "query"), "candidates": (candidates, "passage")},
                            out_dir=work / f"one-{r}", **common)
        times["encode_one_pipeline"].append(time.perf_counter() - t)
        t = time.perf_counter()
        encode_to_storage(queries, "query", name="queries", out_dir=work / f"two-{r}", **common)
        encode_to_storage(candidates, "passage", name="candidates", out_dir=work / f"two-{r}", **common)
        times["encode_two_pipelines"].append(time.perf_counter() - t)
        results = {}
        for variant, in_process in (("score_in_process", True), ("score_actors", False)):
            t = time.perf_counter()
            results[variant] = evaluate_lareqa_stored(corpus, files["queries"], files["candidates"],
                                                      num_shards=2, in_process=in_process)["summary"]
            times[variant].append(time.perf_counter() - t)
        checks.append(results["score_in_process"] == results["score_actors"])
    ray.shutdown()

    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "command": "flock /tmp/raysys-heavy.lock .venv/bin/python bench/bench_eval_startup.py "
                   + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "date": dt.date.today().isoformat(), "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}",
        "data": f"XQuAD-R test articles: {len(queries)} queries, {len(candidates)} candidates; tiny random BERT",
        "rounds": args.rounds, "seconds": times, "median_s": med,
        "ratios": {"encode_two_over_one_pipeline": med["encode_two_pipelines"] / med["encode_one_pipeline"],
                   "score_actors_over_in_process": med["score_actors"] / med["score_in_process"]},
        "saved_per_evaluation_s": (med["encode_two_pipelines"] - med["encode_one_pipeline"])
                                  + (med["score_actors"] - med["score_in_process"]),
        "same_summary_in_process_and_actors": all(checks),
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
