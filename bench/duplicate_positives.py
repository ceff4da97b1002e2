#!/usr/bin/env python
"""How often a query meets an exact copy of its positive among the in-batch candidates.

Same-paragraph hard negatives (`data.hard_negatives=paragraph`) are often another pair's gold
sentence, and two questions can share a gold sentence: without `train.mask_duplicate_positives`
such a copy counts as a negative of the query whose positive it is. The real data plane (the
config's train split with its negatives, `HybridBatcher`, one worker holding the global batch)
over `--steps` steps, for each k in `--negatives-per-pair`: the share of queries with at least
one copy, over all batches and over monolingual batches (cross-lingual batches rarely have one:
a copy must also be in the same passage language).

    RAYSYS_DATA_SOURCE=../shared/data/xquad-r .venv/bin/python bench/duplicate_positives.py --config configs/recipe.yaml \\
        --out bench/results/duplicate_positives.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import sys
import warnings
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.results_file import emit  # noqa: E402


def share_with_copies(table, config, k: int, steps: int) -> dict:
    from raysys.data.hybrid import MONO, HybridBatcher, ParallelItems

    items = ParallelItems(table)
    batcher = HybridBatcher(items, languages=items.languages, alpha=config.train.alpha, seed=config.seed,
                            local_batch_size=config.train.global_batch_size, rank=0,
                            use_hard_negatives=True, negatives_per_pair=k)
    counts = Counter()
    for _, batch in batcher.epoch(0, steps):
        candidates = Counter(batch.passages) + Counter(batch.hard_negatives)
        for passage in batch.passages:
            hit = candidates[passage] > 1  # one of them is the query's own positive
            counts["queries"] += 1
            counts["with_copy"] += hit
            if batch.plan.kind == MONO:
                counts["mono_queries"] += 1
                counts["mono_with_copy"] += hit
    return {"queries": counts["queries"], "share_with_copy": round(counts["with_copy"] / counts["queries"], 4),
            "mono_queries": counts["mono_queries"],
            "mono_share_with_copy": round(counts["mono_with_copy"] / max(counts["mono_queries"], 1), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/recipe.yaml")
    parser.add_argument("--negatives-per-pair", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out")
    args = parser.parse_args()
    from raysys.config import Config
    from raysys.data.prepare import resolve_dataset
    from raysys.train.datasets import lareqa_split_tables

    config = Config.from_yaml(args.config, ["data.hard_negatives=paragraph"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = lareqa_split_tables(config, str(resolve_dataset(config.data.train, config.data.source_dir)))["train"]
    emit({"command": shlex.join(["python", *sys.argv]), "date": dt.date.today().isoformat(),
          "global_batch_size": config.train.global_batch_size, "alpha": config.train.alpha, "steps": args.steps,
          "train_rows": table.num_rows,
          "by_negatives_per_pair": {str(k): share_with_copies(table, config, k, args.steps)
                                    for k in args.negatives_per_pair}}, args.out)


if __name__ == "__main__":
    main()
