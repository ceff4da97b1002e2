#!/usr/bin/env python
"""AdamW step on the default model's parameters: torch's default CPU implementation (for-loop),
foreach, and fused (what `train.fused_optimizer=true`, the default, gives DeepSpeed's `torch_adam`).

All 117.7M parameters of multilingual-e5-small (82 % of them the 250k-token word embedding) get a
fixed random gradient; each implementation does one untimed step (Adam state allocated), then
`--steps` timed steps. Minor page faults per step (getrusage) show the temporaries the unfused
implementations allocate and free for every parameter. Rounds alternate the implementations,
so the machine's load drift hits them alike. 2 torch threads, as the training benchmark's plain loop.

    python bench/bench_optimizer.py --out bench/results/optimizer_step.json    # ~1-2 min on 2 cores
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shlex
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

IMPLEMENTATIONS = {"for-loop (torch default on CPU)": {"foreach": False}, "foreach": {"foreach": True},
                   "fused": {"fused": True}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="default")
    ap.add_argument("--out", default="bench/results/optimizer_step.json")
    args = ap.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])

    import torch
    from transformers import AutoModel

    from raysys.model.default import resolve_model_path

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    params = list(AutoModel.from_pretrained(str(resolve_model_path(args.model))).parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    step_s: dict[str, list[float]] = {name: [] for name in IMPLEMENTATIONS}
    faults: dict[str, list[int]] = {name: [] for name in IMPLEMENTATIONS}
    for round_ in range(args.rounds):
        for name, kwargs in IMPLEMENTATIONS.items():
            optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, **kwargs)
            optimizer.step()  # allocates the Adam state: not timed
            for _ in range(args.steps):
                f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
                optimizer.step()
                step_s[name].append(time.perf_counter() - t0)
                faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
            del optimizer
            print(f"round {round_ + 1} {name}: {statistics.fmean(step_s[name][-args.steps:]):.3f} s/step", flush=True)
    fused_mean = statistics.fmean(step_s["fused"])
    results = {name: {"mean_step_s": round(statistics.fmean(v), 4), "median_step_s": round(statistics.median(v), 4),
                      "minor_page_faults_per_step": round(statistics.fmean(faults[name])),
                      "over_fused": round(statistics.fmean(v) / fused_mean, 2)} for name, v in step_s.items()}
    report = {"benchmark": "AdamW optimizer step on the default model's parameters (CPU)",
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "command": command,
              "machine": {"nproc": os.cpu_count(), "torch": torch.__version__},
              "settings": {"parameters": sum(p.numel() for p in params), "threads": args.threads,
                           "timed_steps_per_round": args.steps, "rounds": args.rounds},
              "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
