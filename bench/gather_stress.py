#!/usr/bin/env python
"""Stress the cross-worker gather of InfoNCE's candidates until the heap breaks, or `--steps` pass.

Three training runs with paragraph negatives lost a gloo (CPU) worker to a SIGSEGV in a native
thread, inside malloc, while InfoNCE gathered candidates with torch's functional collectives
(`all_gather_single`: an async all_gather whose backward is an async reduce-scatter). This runs the
same pattern without a model: 2 gloo ranks, each step encodes 8 queries, 8 positives and 24 hard
negatives with a small MLP, gathers positives and negatives over ranks, takes InfoNCE, backward,
averages gradients with all_reduce (as DeepSpeed does) and steps AdamW, with glibc's heap checks on
(MALLOC_CHECK_=3, MALLOC_PERTURB_), which turn a corrupted heap into an abort naming the check.
`--gather functional` is the old gather; `--gather raysys` is raysys.train.loss.gather_with_grad.

    .venv/bin/python bench/gather_stress.py --gather raysys --steps 40000 --out bench/results/gather_stress.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.results_file import emit  # noqa: E402

GLIBC_CHECKS = ("malloc()", "free()", "realloc()", "corrupted", "double free")  # glibc's abort messages


def functional_gather(t):
    import torch.distributed as dist
    from torch.distributed._functional_collectives import all_gather_single

    return all_gather_single(t.contiguous(), 0, dist.group.WORLD)


def rank_main(rank: int, world: int, gather_name: str, steps: int, store: str, progress: str) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from raysys.train.loss import gather_with_grad

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    gather = functional_gather if gather_name == "functional" else gather_with_grad
    torch.manual_seed(rank)
    encoder = torch.nn.Sequential(torch.nn.Linear(256, 768), torch.nn.Tanh(), torch.nn.Linear(768, 768))
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-4)
    batch = 8
    for step in range(1, steps + 1):
        queries, positives, negatives = (F.normalize(encoder(torch.randn(n, 256)), dim=-1)
                                         for n in (batch, batch, 3 * batch))
        scores = queries @ torch.cat([gather(positives), gather(negatives)]).T / 0.05
        F.cross_entropy(scores, torch.arange(batch) + rank * batch).backward()
        for p in encoder.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if rank == 0 and step % 500 == 0:
            Path(progress).write_text(str(step))
    dist.destroy_process_group()


def run_one(gather_name: str, steps: int) -> dict:
    """One stress run in a child interpreter (glibc reads MALLOC_CHECK_ at start-up)."""
    with tempfile.TemporaryDirectory() as tmp:
        progress = Path(tmp) / "progress"
        env = {**os.environ, "MALLOC_CHECK_": "3", "MALLOC_PERTURB_": "165"}
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--rank-group", gather_name, str(steps), tmp],
                              env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        done = int(progress.read_text()) if progress.exists() else 0
    crashed = proc.returncode != 0
    return {"gather": gather_name, "steps_asked": steps, "crashed": crashed,
            "steps_completed": steps if not crashed else f"{done} to {done + 500}",
            "glibc": sorted({line.strip() for line in proc.stderr.splitlines()
                             if any(check in line for check in GLIBC_CHECKS)})[:3],
            "stderr_tail": proc.stderr.strip().splitlines()[-1:] if crashed else [],
            "seconds": round(seconds, 1)}


def main() -> None:
    if sys.argv[1:2] == ["--rank-group"]:
        import torch.multiprocessing as mp

        gather_name, steps, tmp = sys.argv[2], int(sys.argv[3]), sys.argv[4]
        mp.spawn(rank_main, args=(2, gather_name, steps, f"{tmp}/store", f"{tmp}/progress"), nprocs=2)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gather", nargs="+", choices=("functional", "raysys"), default=["functional", "raysys"])
    parser.add_argument("--steps", type=int, default=40000)
    parser.add_argument("--out")
    args = parser.parse_args()
    emit({"command": shlex.join(["python", *sys.argv]), "date": dt.date.today().isoformat(),
          "ranks": 2, "backend": "gloo", "runs": [run_one(g, args.steps) for g in args.gather]}, args.out)


if __name__ == "__main__":
    main()
