#!/usr/bin/env python
"""Length groups (`train.length_groups`): training pairs/s of the recipe with 1 group against G groups.

Each arm is the real job, `raysys train --config configs/recipe.yaml` (2 workers x 1 thread,
global batch 16, three paragraph negatives per pair: 8 queries and 32 candidates per worker per
step), cut to `--steps` steps with no interpolation curve and no mid-run validation or
checkpoint, so only training steps differ. The arms alternate (1, G, 1, G, ...) `--repeats`
times so both sample the machine's drift. Step time per logged window (5 steps) = 16 / the
window's pairs/s (rank 0's clock); the first window (warm-up) is dropped. Same seed, same batches
in both arms; only how the candidates are padded (and so the dropout masks) differs.

    python bench/bench_length_groups.py --out bench/results/length_groups.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.results_file import emit  # noqa: E402

WINDOW = re.compile(r"\[train\] (\d+)/(\d+) steps .*?loss ([0-9.]+)\s+pairs/s ([0-9.]+)")


def run_arm(groups: int, steps: int, config: str, data: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="raysys-bench-groups-") as out:
        command = [sys.executable, "-m", "raysys.cli", "train", "--config", config, f"output_dir={out}",
                   f"train.max_steps={steps}", f"train.length_groups={groups}", "train.interpolate_weights=null",
                   f"train.eval_every={steps * 10}", f"train.checkpoint_every={steps * 10}"]
        env = {**os.environ, "RAYSYS_DATA_SOURCE": data, "RAYSYS_PROGRESS": "plain"}
        started = time.perf_counter()
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"length_groups={groups}: raysys train failed (rc {done.returncode}):\n{done.stderr[-3000:]}")
    windows = [(int(m[1]), float(m[3]), float(m[4])) for m in WINDOW.finditer(done.stdout + done.stderr)]
    if len(windows) < 2:
        sys.exit(f"length_groups={groups}: fewer than two logged windows in the output")
    step_s = [16 / pairs_per_s for _, _, pairs_per_s in windows[1:]]
    return {"groups": groups, "wall_s": round(wall, 1), "step_s": [round(s, 3) for s in step_s],
            "median_step_s": round(statistics.median(step_s), 3), "last_window_loss": windows[-1][1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--config", default="configs/recipe.yaml")
    parser.add_argument("--data", default=str((REPO.parent / "shared" / "data" / "xquad-r").resolve()))
    parser.add_argument("--out")
    args = parser.parse_args()
    runs = []
    for repeat in range(args.repeats):
        for groups in (1, args.groups):
            runs.append({"repeat": repeat, **run_arm(groups, args.steps, args.config, args.data)})
            print(f"[bench_length_groups] repeat {repeat} groups {groups}: median step {runs[-1]['median_step_s']} s",
                  flush=True)
    pooled = {g: statistics.median(s for r in runs if r["groups"] == g for s in r["step_s"]) for g in (1, args.groups)}
    emit({"benchmark": "length_groups", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
          "command": "python bench/bench_length_groups.py " + " ".join(sys.argv[1:]),
          "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
          "config": args.config, "steps_per_run": args.steps, "runs": runs,
          "median_step_s": {str(g): round(v, 3) for g, v in pooled.items()},
          "speedup": round(pooled[1] / pooled[args.groups], 3)}, args.out)


if __name__ == "__main__":
    main()
