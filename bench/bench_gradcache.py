#!/usr/bin/env python
"""Gradient caching: peak RSS per worker and pairs/s, cached vs plain, by global batch size.

Each (workers, global batch, arm) runs in fresh processes (so `ru_maxrss` is that configuration's
own peak): W gloo ranks, the default model (multilingual-e5-small, fp32), DeepSpeed ZeRO 0 with
raysys's own config (AdamW, clipping 1.0), and `raysys.train.step.train_step` -- the function the
training loop calls -- on synthetic text pairs whose token counts are the maximum lengths
(64 query / 128 passage tokens: every pair costs the same). The first step is not timed (allocator and
kernel warm-up) when a configuration runs two (batches up to 64; larger ones run one step).
Arms: `plain` (one forward per side, activation memory grows with the batch) and `cached` (`train.mini_batch_size`, default 16).
A plain configuration is skipped above --plain-max (its activations would not fit in memory).

MFU: model FLOPs per pair = 6 x (non-embedding parameters x tokens + attention 2 x layers x
seq^2 x hidden) over the measured step time, against this machine's measured fp32 matmul peak
(torch.mm 2048^3 on all cores); the cached arm's extra no-grad forward is not counted as useful work.

    python bench/bench_gradcache.py --out bench/results/gradcache.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def text(i: int, words: int) -> str:
    return " ".join(WORDS[(i * 7 + k) % len(WORDS)] + str((i + k) % 97) for k in range(words))


def _rank(rank, world, port, model_dir, global_batch, mini, steps, threads, out):
    from types import SimpleNamespace

    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      TOKENIZERS_PARALLELISM="false")
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import deepspeed

    from raysys.config import TrainConfig
    from raysys.model.encoder import BiEncoder, EncoderSettings
    from raysys.train.deepspeed_config import build_deepspeed_config
    from raysys.train.step import train_step

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    train = TrainConfig(global_batch_size=global_batch, num_workers=world, mini_batch_size=mini, precision="fp32")
    model = BiEncoder.from_pretrained(model_dir, EncoderSettings(max_query_length=64, max_passage_length=128))
    engine, *_ = deepspeed.initialize(model=model, config=build_deepspeed_config(train, total_steps=100, world_size=world),
                                      model_parameters=list(model.parameters()))
    local = global_batch // world
    times, tokens = [], 0
    for step in range(steps):
        ids = [step * global_batch + rank * local + i for i in range(local)]
        batch = SimpleNamespace(queries=[text(i, 80) for i in ids], passages=[text(i + 1, 160) for i in ids],
                                hard_negatives=None)
        start = time.perf_counter()
        loss, _ = train_step(engine, batch, train, seed=step)
        float(loss)  # wait for the step
        times.append(time.perf_counter() - start)
    rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20])  # KiB -> GiB
    gathered = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(gathered, rss)
    if rank == 0:
        timed = times[1:] if len(times) > 1 else times
        step_s = sum(timed) / len(timed)
        Path(out).write_text(json.dumps({"step_s": step_s, "step_times_s": times, "pairs_per_s": global_batch / step_s,
                                         "peak_rss_gib_per_rank": [round(float(g), 3) for g in gathered]}))
    dist.destroy_process_group()


def model_flops_per_pair(model_dir: str, query_tokens: int = 64, passage_tokens: int = 128) -> float:
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir)
    embedding = sum(p.numel() for n, p in model.named_parameters() if "embeddings" in n)
    dense = sum(p.numel() for p in model.parameters()) - embedding
    layers, hidden = config.num_hidden_layers, config.hidden_size
    per_sequence = lambda seq: 2 * dense * seq + 2 * 2 * layers * seq * seq * hidden  # forward
    return 3 * (per_sequence(query_tokens) + per_sequence(passage_tokens))  # forward + backward


def fp32_peak_flops() -> float:
    torch.set_num_threads(os.cpu_count())
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.mm(a, b)
    start, reps = time.perf_counter(), 5
    for _ in range(reps):
        torch.mm(a, b)
    return 2 * 2048**3 * reps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--batches", default="16,64,256,1024")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--mini-batch-size", type=int, default=16)
    # Plain steps keep every activation: at 64 pairs the default model peaked at 9.7 GiB, and at
    # 256 the OOM killer ended the run on this 24 GiB machine (2026-12-01).
    parser.add_argument("--plain-max", type=int, default=64)
    parser.add_argument("--multi-worker-batches", default="16,64",
                        help="the batch sizes run with more than one worker (each costs minutes on 2 cores)")
    parser.add_argument("--out", default="bench/results/gradcache.json")
    args = parser.parse_args()
    from raysys.model.default import resolve_model_path
    from tests.fixtures.processes import free_port

    model_dir = str(resolve_model_path(args.model))
    flops_per_pair = model_flops_per_pair(model_dir)
    peaks = [fp32_peak_flops()]  # measured again at the end: the best of both is the machine's peak
    results = []
    for world in map(int, args.workers.split(",")):
        for global_batch in map(int, (args.batches if world == 1 else args.multi_worker_batches).split(",")):
            for arm, mini in (("plain", None), ("cached", args.mini_batch_size)):
                if arm == "plain" and global_batch > args.plain_max:
                    results.append({"workers": world, "global_batch": global_batch, "arm": arm,
                                    "skipped": f"above --plain-max {args.plain_max}"})
                    continue
                steps = 2 if global_batch <= 64 else 1  # the first of 2 is not timed; one long step dwarfs warm-up
                out = Path(f"/tmp/bench-gradcache-{os.getpid()}.json")
                row = {"workers": world, "global_batch": global_batch, "arm": arm, "mini_batch_size": mini,
                       "steps": steps}
                try:
                    mp.spawn(_rank, args=(world, free_port(), model_dir, global_batch, mini, steps,
                                          max(1, os.cpu_count() // world), str(out)), nprocs=world, join=True)
                except mp.ProcessExitedException as exc:  # e.g. the OOM killer
                    results.append({**row, "failed": str(exc)})
                    print(json.dumps(results[-1]), flush=True)
                    continue
                row.update(json.loads(out.read_text()))
                results.append(row)
                print(json.dumps(row), flush=True)
    peak = max(peaks + [fp32_peak_flops()])
    by = {(r["workers"], r["global_batch"], r["arm"]): r for r in results if "pairs_per_s" in r}
    for row in by.values():
        row["mfu"] = round(row["pairs_per_s"] * flops_per_pair / peak, 4)
    ratios = []
    for (world, batch, arm), row in sorted(by.items()):
        if arm == "cached" and (world, batch, "plain") in by:
            plain = by[(world, batch, "plain")]
            ratios.append({"workers": world, "global_batch": batch,
                           "cached_over_plain_pairs_per_s": round(row["pairs_per_s"] / plain["pairs_per_s"], 3),
                           "cached_over_plain_peak_rss": round(max(row["peak_rss_gib_per_rank"]) /
                                                               max(plain["peak_rss_gib_per_rank"]), 3)})
    rss_growth = []
    for world in map(int, args.workers.split(",")):
        small, large = by.get((world, 16, "cached")), by.get((world, 1024, "cached"))
        if small and large:
            rss_growth.append({"workers": world, "cached_peak_rss_1024_over_16":
                               round(max(large["peak_rss_gib_per_rank"]) / max(small["peak_rss_gib_per_rank"]), 3)})
    report = {"benchmark": "gradient caching: peak RSS per worker and pairs/s, cached vs plain",
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "command": "python " + " ".join(sys.argv),
              "machine": {"nproc": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
              "targets": {"memory": "cached peak RSS at batch 1024 <= 1.3 x at batch 16",
                          "speed": "cached pairs/s >= 0.7 x plain where both fit"},
              "model_flops_per_pair": flops_per_pair, "fp32_matmul_peak_flops": peak,
              "note": "synthetic pairs at the maximum lengths (64/128 tokens): slower per pair than XQuAD-R's "
                      "shorter texts (bench/results/train.json)",
              "results": results, "ratios": ratios, "rss_growth": rss_growth}
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({"ratios": ratios, "rss_growth": rss_growth}, indent=1))


if __name__ == "__main__":
    main()
