#!/usr/bin/env python
"""Tokenization off the critical path: the training step with and without the prefetch thread.

The real data plane (XQuAD-R's train split, `HybridBatcher`, the default model's tokenizer and
encoder) and a plain PyTorch step (two forwards, InfoNCE, backward, AdamW) in one process, with
1 torch thread so the prefetch thread has the other core. Two arms over the same batches:
  * inline: draw the batch and tokenize it (`raysys.train.step.batch_tokens`), then train;
  * prefetch: `raysys.train.prefetch.Prefetcher` draws and tokenizes ahead; the step only waits.
Per step: time until the step has its tokens ("data") and the rest ("compute"). The first
`--warmup` steps are dropped. The losses of both arms must be equal (same batches, same tokens).
Also the time to tokenize one local batch of 16 / 64 / 128 pairs, to set against a GPU
step (tens of ms), where an inline tokenizer would be a large share of every step.

    flock /tmp/raysys-heavy.lock .venv/bin/python bench/bench_prefetch.py --steps 14 \\
        --out bench/results/prefetch.json
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
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def batches(config, local_batch: int):
    """(epoch, batch) of epoch 0 of the real hybrid schedule, rank 0 of 1."""
    from raysys.data.hybrid import HybridBatcher, ParallelItems
    from raysys.data.prepare import resolve_dataset
    from raysys.train.datasets import lareqa_split_tables

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = lareqa_split_tables(config, str(resolve_dataset(config.data.train, config.data.source_dir)))["train"]
    items = ParallelItems(table)
    batcher = HybridBatcher(items, languages=items.languages, alpha=config.train.alpha, seed=config.seed,
                            local_batch_size=local_batch, rank=0, use_hard_negatives=False)
    return ((0, batch) for _, batch in batcher.epoch(0, batcher.local_steps_per_epoch()))


def run_arm(config, model, arm: str, steps: int, local_batch: int) -> dict:
    import torch

    from raysys.train.loss import info_nce_loss
    from raysys.train.prefetch import Prefetcher, thread_tokenizer
    from raysys.train.step import batch_tokens

    model.load_state_dict(INITIAL)  # both arms start from the same weights
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.train.lr)
    source = batches(config, local_batch)
    prefetcher = Prefetcher(source, thread_tokenizer(model), None) if arm == "prefetch" else None
    stream = iter(prefetcher) if prefetcher else None
    data_s, compute_s, losses = [], [], []
    for step in range(steps):
        started = time.perf_counter()
        if stream is not None:
            tokens = next(stream).tokens
        else:
            _, batch = next(source)
            tokens = batch_tokens(model.tokenize, batch, None)
        ready = time.perf_counter()
        torch.manual_seed(config.seed + step)
        queries, passages = tokens[0]
        loss, _ = info_nce_loss(model(queries["input_ids"], queries["attention_mask"]),
                                model(passages["input_ids"], passages["attention_mask"]), None,
                                temperature=config.train.temperature)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        data_s.append(ready - started)
        compute_s.append(time.perf_counter() - ready)
        print(f"{arm} step {step + 1}/{steps}: data {data_s[-1] * 1e3:.1f} ms, compute {compute_s[-1]:.2f} s",
              flush=True)
    if prefetcher:
        prefetcher.close()
    return {"data_s": data_s, "compute_s": compute_s, "loss": losses}


def main() -> None:
    global INITIAL
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=14)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--local-batch", type=int, default=16)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "xquad-r"))
    p.add_argument("--out", default=None)
    args = p.parse_args()

    import copy

    import torch

    from raysys.config import Config
    from raysys.model.default import resolve_model_path
    from raysys.model.encoder import BiEncoder
    from raysys.train.loop import encoder_settings
    from raysys.train.step import batch_tokens

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # as in the Ray workers
    torch.set_num_threads(1)
    config = Config.from_yaml(None, [f"data.train={args.data}"])
    model = BiEncoder.from_pretrained(str(resolve_model_path(config.model.name_or_path)), encoder_settings(config))
    INITIAL = copy.deepcopy(model.state_dict())

    tokenize_ms = {}
    for size in (16, 64, 128):
        source = batches(config, size)
        times = []
        for _, (_, batch) in zip(range(3), source):  # an epoch of 128-pair batches is short on XQuAD-R
            started = time.perf_counter()
            batch_tokens(model.tokenize, batch, None)
            times.append((time.perf_counter() - started) * 1e3)
        tokenize_ms[str(size)] = statistics.median(times)

    arms = {arm: run_arm(config, model, arm, args.steps, args.local_batch) for arm in ("inline", "prefetch")}
    w = args.warmup
    summary = {}
    for arm, r in arms.items():
        data, compute = r["data_s"][w:], r["compute_s"][w:]
        step = [d + c for d, c in zip(data, compute)]
        summary[arm] = {"mean_data_ms": statistics.mean(data) * 1e3, "mean_step_s": statistics.mean(step),
                        "data_share_of_step": sum(data) / sum(step)}
    result = {
        "command": "flock /tmp/raysys-heavy.lock .venv/bin/python bench/bench_prefetch.py "
                   + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "date": dt.date.today().isoformat(), "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}",
        "setup": f"{config.model.name_or_path}, 1 torch thread, local batch {args.local_batch}, max lengths "
                 f"{config.model.max_query_length}/{config.model.max_passage_length}, {args.steps} steps "
                 f"({w} warm-up dropped), XQuAD-R train split",
        "tokenize_ms_per_local_batch": tokenize_ms,
        "arms": summary,
        "data_ms_ratio_inline_over_prefetch": summary["inline"]["mean_data_ms"] / summary["prefetch"]["mean_data_ms"],
        "same_losses": arms["inline"]["loss"] == arms["prefetch"]["loss"],
        "per_step": arms,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")


INITIAL: dict = {}

if __name__ == "__main__":
    main()
