#!/usr/bin/env python
"""Training benchmarks: Ray Train + DeepSpeed overhead, ZeRO memory per rank, 1 vs 2 workers.

Three parts (`--parts overhead,zero,scaling`), all on the default model (multilingual-e5-small,
118M parameters, fp32), XQuAD-R pairs (the training split `raysys.train.datasets` gives the workers),
global batch 16, max lengths 64 (query) / 128 (passage), AdamW, gradient clipping 1.0:

1. overhead -- per-step time of `raysys.train.run.train` with one worker (ZeRO 0, 2 torch
   threads, 2 Ray CPUs) against a plain single-process PyTorch loop that does the same work per
   step: the next batch from the real `HybridBatcher` (same split, seed, rank 0 / world 1, so the
   very same batches; checked via `raysys.train.loop.batch_digest`), tokenization, two encoder
   forwards, InfoNCE, backward, gradient clipping, AdamW + the same warmup/decay LR schedule,
   `loss.item()`; 2 torch threads, TOKENIZERS_PARALLELISM=false as in the Ray workers.
   Ray side: `train.log_every=1`, so the loop reports `pairs_per_s` for a window of exactly one
   step; step time = 16 / pairs_per_s. That window is measured inside the worker and runs from the
   end of the previous step's `pairs_per_s` computation to this one's, so it contains everything the
   real loop does per step: the batcher, tokenization, forward/backward, `engine.step`, the
   `mean_over_ranks` all-reduce, the batch digest, the metrics logger and the previous step's
   `ray.train.report` (reporting every step is the worst case; the default is every 5 steps).
   Start-up (Ray, data, model load, `deepspeed.initialize`) is excluded; the first `--warmup`
   steps and the last step (it also runs the validation loss) are dropped on both sides, so both
   sides are compared over the same steps and batches. `--repeats N` rounds of (plain, DeepSpeed
   only, Ray) run one after another and a last plain and DeepSpeed-only run closes them (no Ray
   running during those), so every arm is sampled across the drift in the machine load; each
   arm's mean pools its runs.
   Target: median Ray step time <= 1.15 x median plain step time.
2. zero -- per-rank memory for ZeRO 0/1/2/3 with 2 workers (1 thread each). A small Ray Train
   loop in this file (the same `TorchTrainer` + bucketed corpus (`prepare_corpus`,
   `read_rank_rows`) + `HybridBatcher` + `BiEncoder` + `build_deepspeed_config` +
   `deepspeed.initialize` + `info_nce_loss` as raysys) runs `--zero-steps` steps and, after each
   backward from step 2 on (Adam state exists from step 1), sums the bytes of the tensor storages
   reachable from the DeepSpeed optimizer and the parameters' `.grad`, de-duplicated by storage and
   excluding the storages that hold model parameters. Categories: Adam moments, fp32 master weights
   (DeepSpeed's ZeRO 1-3 optimizers clone the fp32 partition even for fp32 training), gradients
   (`.grad`, ZeRO gradient partitions), communication buckets (allocated with `torch.empty`; only the
   touched part becomes resident). Also per-rank RSS (after model load, after `deepspeed.initialize`,
   peak = `ru_maxrss`). Target: stage 2 <= 0.6 x stage 0 for optimizer + gradient state
   (moments + master weights + gradients, buckets reported apart), worst rank.
3. scaling -- pairs/s of `raysys.train.run.train` with 1 worker x 2 threads (the overhead part's
   run) and 2 workers x 1 thread (1 Ray CPU each), global batch 16, ZeRO 0, fp32: steady-state
   pairs/s = 16 / median step time measured as in part 1 (rank 0's clock).

Before timing it waits (polls every 30 s, up to --wait-max s) until no other `bench/bench_`
process runs, and records the load average around every part.

    python bench/bench_train.py --out bench/results/train.json
    python bench/bench_train.py --parts overhead --repeats 3 --skip-log-every-1 --out bench/results/train_overhead_repeats.json
    python bench/bench_train.py --parts overhead --repeats 3 --ablate-reuse --skip-log-every-1 \
        --out bench/results/train_overhead_reuse_ablation.json
    python bench/bench_train.py --quick       # smoke run: 4 steps, ZeRO 0 and 2, ~6 min
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from raysys.train.host_memory import REUSE_FREED_MEMORY_ENV, worker_env_vars  # noqa: E402
DEFAULT_DATA = (REPO.parent / "shared" / "data" / "xquad-r").resolve()
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
os.environ.update(WORKER_ENV)  # the plain loop tokenizes like the Ray workers (no tokenizer threads)
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def log(msg: str) -> None:
    print(f"[bench_train {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"loadavg {loadavg()}"


def other_benches() -> list[str]:
    out = subprocess.run(["pgrep", "-af", "bench/bench_"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "bench_train" not in line and "pgrep" not in line]


def cpu_busy(seconds: float = 3.0) -> float:
    """Fraction of all cores busy over `seconds` (from /proc/stat), whoever uses them."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait

    t0, i0 = sample()
    time.sleep(seconds)
    t1, i1 = sample()
    return round(1 - (i1 - i0) / max(t1 - t0, 1), 3)


_TCK = os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v) - v[3] - v[4]) / _TCK


def _proc_table() -> dict[int, tuple[int, int, float]]:
    """pid -> (ppid, start time, CPU seconds incl. reaped children)."""
    procs = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            procs[int(d)] = (int(fields[1]), int(fields[19]), sum(int(x) for x in fields[11:15]) / _TCK)
    return procs


def _tree(procs: dict, root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    out, stack = set(), [root]
    while stack:
        pid = stack.pop()
        out.add(pid)
        stack.extend(children.get(pid, []))
    return out


class CpuProbe:
    """Cores used during a part: the whole machine, and processes outside this benchmark's
    process tree (a lower bound: a foreign process that started and ended inside the part is missed)."""

    def __enter__(self):
        self.t, self.m, self.procs = time.perf_counter(), machine_busy_s(), _proc_table()
        return self

    def __exit__(self, *exc):
        wall = max(time.perf_counter() - self.t, 1e-9)
        m = machine_busy_s() - self.m
        procs = _proc_table()
        ours = _tree(procs, os.getpid())
        foreign = 0.0
        for pid, (_, start, cpu) in procs.items():
            if pid in ours:
                continue
            before = self.procs.get(pid)
            foreign += cpu - before[2] if before and before[1] == start else cpu
        self.result = {"wall_s": round(wall, 1), "machine_busy_cores": round(m / wall, 2),
                       "other_processes_cores": round(foreign / wall, 2)}
        log(f"cpu: {self.result}")
        return False


def wait_for_quiet(max_wait_s: float, idle_below: float, poll_s: float = 30.0) -> dict:
    """Wait until no other bench/bench_ process runs and the cores are mostly idle (capped)."""
    start = time.time()
    while True:
        seen, busy = other_benches(), cpu_busy(5.0)
        if (not seen and busy < idle_below) or time.time() - start >= max_wait_s:
            break
        log(f"waiting: {len(seen)} other benchmark(s), cores {busy:.0%} busy "
            f"{('- ' + seen[0][:100]) if seen else ''}")
        time.sleep(poll_s)
    return {"waited_s": round(time.time() - start, 1), "others_still_running": seen, "cpu_busy_at_start": busy,
            "idle_threshold": idle_below}


def machine() -> dict:
    import deepspeed
    import ray
    import torch
    import transformers

    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "mem_gib": round(os.sysconf("SC_PAGE_SIZE") *
                                                                   os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "deepspeed": deepspeed.__version__, "ray": ray.__version__, "transformers": transformers.__version__}


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def stats(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    return {"n": len(values), "median": round(statistics.median(values), 4), "mean": round(statistics.fmean(values), 4),
            "min": round(min(values), 4), "max": round(max(values), 4),
            "stdev": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0}


# ---- configuration -----------------------------------------------------------------------------

def overrides(args, output_dir: Path, *, workers: int, threads: int, cpus: float, zero: int = 0,
              steps: int | None = None, log_every: int | None = None, extra: tuple[str, ...] = ()) -> list[str]:
    return [f"name=bench-train-{workers}w", f"output_dir={output_dir}", f"data.train={args.data}",
            f"model.name_or_path={args.model}", f"model.max_query_length={args.max_query_length}",
            f"model.max_passage_length={args.max_passage_length}",
            f"train.global_batch_size={args.global_batch}", f"train.max_steps={steps or args.steps}",
            f"train.num_workers={workers}", f"train.torch_threads={threads}", f"train.cpus_per_worker={cpus}",
            f"train.zero_stage={zero}", f"train.precision={args.precision}", f"train.alpha={args.alpha}",
            f"train.log_every={log_every or args.log_every}",
            "train.eval_every=1000000", "train.checkpoint_every=1000000", f"seed={args.seed}", *extra]


def make_config(ov: list[str]):
    from raysys.config import Config

    return Config.from_yaml(None, ov)


def train_table(config):
    """The train split exactly as `raysys.train.datasets.lareqa_split_tables` builds it."""
    from raysys.data.prepare import resolve_dataset
    from raysys.train.datasets import lareqa_split_tables

    location = str(resolve_dataset(config.data.train, config.data.source_dir))
    return lareqa_split_tables(config, location)["train"]


# ---- 1. the plain single-process loop ------------------------------------------------------------

def plain_loop(config, threads: int, steps: int, label: str, use_deepspeed: bool = False) -> dict:
    """Same per-step work as raysys.train.loop without Ray (world 1, rank 0): plain PyTorch, or
    (use_deepspeed) the same DeepSpeed engine as raysys in one process (needs torchrun env vars)."""
    import warnings

    import torch
    from raysys.data.hybrid import HybridBatcher, ParallelItems
    from raysys.model.default import resolve_model_path
    from raysys.model.encoder import BiEncoder
    from raysys.train.collectives import mean_over_ranks
    from raysys.train.deepspeed_config import ScheduledLR, build_deepspeed_config, lr_scheduler_factory
    from raysys.train.loop import batch_digest, encoder_settings
    from raysys.train.loss import info_nce_loss

    torch.set_num_threads(threads)
    t = config.train
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = train_table(config)
    items = ParallelItems(table)
    has_negatives = table.column("hard_negative").null_count == 0
    batcher = HybridBatcher(items, languages=items.languages, alpha=t.alpha, seed=config.seed,
                            local_batch_size=t.global_batch_size, rank=0,
                            use_hard_negatives=t.use_hard_negatives and has_negatives,
                            negatives_per_pair=t.hard_negatives_per_pair)
    steps_per_epoch = batcher.local_steps_per_epoch()
    total = min(steps, t.epochs * steps_per_epoch)
    model = BiEncoder.from_pretrained(str(resolve_model_path(config.model.name_or_path)), encoder_settings(config))
    params = [p for p in model.parameters() if p.requires_grad]
    ds = build_deepspeed_config(t, total_steps=total, world_size=1)
    if use_deepspeed:
        import deepspeed

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        engine, _, _, _ = deepspeed.initialize(model=model, config=ds, model_parameters=params,
                                               lr_scheduler=lr_scheduler_factory(t, total))
        if t.zero_stage == 0:
            engine.enable_backward_allreduce = False  # as raysys.train.loop does with one worker
        net = engine
    else:
        net = model
        optimizer = torch.optim.AdamW(params, lr=t.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=t.weight_decay,
                                      fused=bool(ds["optimizer"]["params"].get("fused")))  # as raysys
        scheduler = ScheduledLR(optimizer, total_steps=total, warmup_ratio=t.warmup_ratio, decay=t.lr_decay)
    step_s, losses, digests, lrs = [], [], [], []
    global_step, last = 0, time.perf_counter()
    for epoch in range(t.epochs):
        for _, batch in batcher.epoch(epoch, steps_per_epoch):
            if global_step >= total:
                break
            net.train()
            torch.manual_seed(config.seed * 1_000_003 + global_step * 1_009 + 0)
            q = model.tokenize(batch.queries, "query")
            p = model.tokenize(batch.passages, "passage")
            q_emb = net(q["input_ids"], q["attention_mask"])
            p_emb = net(p["input_ids"], p["attention_mask"])
            n_emb = None
            if batch.hard_negatives is not None:
                n = model.tokenize(batch.hard_negatives, "passage")
                n_emb = net(n["input_ids"], n["attention_mask"])
            loss, accuracy = info_nce_loss(q_emb, p_emb, n_emb, temperature=t.temperature,
                                           symmetric=t.symmetric_loss)
            if use_deepspeed:
                lrs.append(engine.get_lr()[0])
                engine.backward(loss)
                engine.step()
                losses.append(mean_over_ranks(loss.item()))  # as the raysys loop (an all-reduce here)
            else:
                lrs.append(optimizer.param_groups[0]["lr"])
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, t.gradient_clipping)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
            accuracy.item()
            digests.append(batch_digest(batch))
            global_step += 1
            now = time.perf_counter()
            step_s.append(now - last)
            last = now
            log(f"{label} step {global_step}/{total} {step_s[-1]:.2f} s loss {losses[-1]:.4f}")
        if global_step >= total:
            break
    del model, params, net
    gc.collect()
    return {"label": label, "engine": "deepspeed (no Ray)" if use_deepspeed else "plain torch", "threads": threads,
            "step_s": [round(s, 4) for s in step_s], "loss": [round(x, 6) for x in losses],
            "lr_used": [round(x, 9) for x in lrs], "batch_digest": digests}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_loop(ov: list[str], threads: int, steps: int, label: str, workdir: Path, *, use_deepspeed: bool,
               env_extra: dict | None = None) -> dict:
    """`plain_loop` in a child process (no Ray): for the DeepSpeed engine (it needs torchrun-style env
    vars), or with environment variables that must be set when the process starts (glibc malloc)."""
    spec, out = workdir / f"{label}-spec.json", workdir / f"{label}-result.json"
    spec.write_text(json.dumps({"overrides": ov, "threads": threads, "steps": steps, "label": label,
                                "use_deepspeed": use_deepspeed, "out": str(out)}))
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), DS_ACCELERATOR="cpu", **(env_extra or {}))
    subprocess.run([sys.executable, __file__, "--child", str(spec)], env=env, check=True)
    return json.loads(out.read_text())


def child_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    result = plain_loop(make_config(spec["overrides"]), spec["threads"], spec["steps"], spec["label"],
                        use_deepspeed=spec["use_deepspeed"])
    Path(spec["out"]).write_text(json.dumps(result))


# ---- Ray Train runs through raysys.train.run.train ------------------------------------------------

def _recorder_class():
    from ray.train import UserCallback

    class ReportRecorder(UserCallback):
        """Runs in the Ray Train controller: appends every report (all ranks' metrics) to a file."""

        def __init__(self, path: str):
            self.path = path

        def after_report(self, run_context, metrics, checkpoint):
            row = {"t": time.time(), "checkpoint": checkpoint is not None,
                   "metrics": [{k: v for k, v in m.items() if isinstance(v, (int, float, str))} for m in metrics]}
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    return ReportRecorder


def start_ray(num_cpus: int) -> None:
    """As raysys does (`raysys.runtime.ensure_ray`), with more logical CPUs than cores so Ray Data
    keeps a slot next to the workers. Keep the dashboard: Ray Train V2's PlacementGroupCleaner asks
    the State API whether the controller lives; without a dashboard, and with another Ray instance on
    the host, it decided the controller was dead and removed the workers' placement group."""
    from raysys.runtime import ensure_ray

    ensure_ray(num_cpus=num_cpus)


def stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    time.sleep(2)


def raysys_run(args, label: str, workdir: Path, *, workers: int, threads: int, cpus: float,
               log_every: int | None = None, extra: tuple[str, ...] = ()) -> dict:
    """`raysys.train.run.train` as the CLI runs it; per-step time from the loop's own `pairs_per_s`
    reports: each covers the steps since the previous report (`train.log_every`), so a window's
    mean step time is global_batch / pairs_per_s (rank 0's clock)."""
    from raysys.train.run import train

    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    ov = overrides(args, workdir / "out", workers=workers, threads=threads, cpus=cpus, log_every=log_every,
                   extra=extra)
    config = make_config(ov)
    reports = workdir / "reports.jsonl"
    load_before = loadavg()
    t0 = time.perf_counter()
    with CpuProbe() as probe:
        outcome = train(config, callbacks=[_recorder_class()(str(reports))])
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in reports.read_text().splitlines()]
    windows, prev = [], 0
    for r in rows:
        m = r["metrics"][0]
        if "pairs_per_s" in m:
            windows.append({"first_step": prev + 1, "last_step": m["step"],
                            "mean_step_s": round(config.train.global_batch_size / m["pairs_per_s"], 4),
                            "pairs_per_s": round(m["pairs_per_s"], 4), "controller_t": round(r["t"] - rows[0]["t"], 2)})
            prev = m["step"]
    state = json.loads((Path(outcome.checkpoint_path) / "raysys_state.json").read_text())
    result = {
        "label": label, "workers": workers, "torch_threads_per_worker": threads, "ray_cpus_per_worker": cpus,
        "log_every": config.train.log_every, "total_steps": state["global_step"], "overrides": ov,
        "windows": windows, "loss": [round(x, 6) for x in state["history"]["loss"]],
        "batch_digest_rank0": state["history"]["batch"] if workers == 1 else None,
        "fit_wall_s": round(wall, 1), "loadavg_before": load_before, "loadavg_after": loadavg(),
        "cpu_during_fit": probe.result,
        "final_metrics": {k: v for k, v in outcome.metrics.items() if isinstance(v, (int, float))},
    }
    if not args.keep_outputs:
        shutil.rmtree(workdir / "out", ignore_errors=True)
    return result


def steady_windows(run: dict, warmup: int) -> list[dict]:
    """Report windows after the warm-up steps and before the last step (which also runs validation)."""
    return [w for w in run["windows"] if w["first_step"] > warmup and w["last_step"] < run["total_steps"]]


def window_mean(windows: list[dict]) -> tuple[float, int, int]:
    """Mean step time over the steps the windows cover, and that step range."""
    n = sum(w["last_step"] - w["first_step"] + 1 for w in windows)
    total = sum(w["mean_step_s"] * (w["last_step"] - w["first_step"] + 1) for w in windows)
    return total / n, windows[0]["first_step"], windows[-1]["last_step"]


# ---- 2. ZeRO memory: a small Ray Train loop with the same pieces as raysys ----------------------

def _state_snapshot(engine, model) -> dict:
    """Bytes of the tensor storages held by the optimizer and the gradients (this rank), by kind."""
    import torch
    from torch import nn

    def storage(t):
        s = t.untyped_storage()
        return s.data_ptr(), s.nbytes()

    model_ptrs = set()
    for p in model.parameters():
        for t in (p.data, getattr(p, "ds_tensor", None)):
            if t is not None and t.device.type != "meta" and t.untyped_storage().nbytes():
                model_ptrs.add(storage(t)[0])
    found: dict[int, tuple[str, int]] = {}  # storage ptr -> (first path, bytes)

    def add(t, path):
        if t.device.type == "meta":
            return
        ptr, nbytes = storage(t)
        if nbytes and ptr not in model_ptrs and ptr not in found:
            found[ptr] = (path, nbytes)

    for name, p in model.named_parameters():
        if p.grad is not None:
            add(p.grad, f"param.grad:{name}")
    seen: set[int] = set()

    def walk(obj, path, depth):
        if isinstance(obj, torch.Tensor):
            add(obj, path)
            if isinstance(obj, nn.Parameter) and obj.grad is not None:
                add(obj.grad, path + ".grad")
            return
        if depth > 8 or id(obj) in seen or isinstance(obj, nn.Module):
            return
        seen.add(id(obj))
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{path}[{'T' if isinstance(k, torch.Tensor) else k}]", depth + 1)
        elif isinstance(obj, (list, tuple, set)):
            for i, v in enumerate(obj):
                walk(v, f"{path}[{i}]", depth + 1)
        elif hasattr(obj, "__dict__") and type(obj).__module__.startswith(("deepspeed", "torch.optim")):
            for k, v in vars(obj).items():
                walk(v, f"{path}.{k}", depth + 1)

    walk(engine.optimizer, "opt", 0)
    kinds = {"adam_moments": 0, "master_weights": 0, "gradients": 0, "comm_buckets": 0, "other": 0}
    paths: dict[str, list] = {k: [] for k in kinds}
    for path, nbytes in found.values():
        low = path.lower()
        if "ipg" in low or "bucket" in low:
            kind = "comm_buckets"
        elif path.startswith("param.grad:"):
            kind = "gradients"
        elif ".state[" in low and ("exp_avg" in low or "step" in low):
            kind = "adam_moments"
        elif "grad" in low and "grad_norm" not in low:
            kind = "gradients"
        elif "fp32" in low or "param_groups" in low:
            kind = "master_weights"
        else:
            kind = "other"
        kinds[kind] += nbytes
        if len(paths[kind]) < 6:
            paths[kind].append(f"{path} ({nbytes / 2**20:.1f} MiB)")
    param_bytes = 0
    seen_ptrs = set()
    for p in model.parameters():
        t = p.ds_tensor if getattr(p, "ds_tensor", None) is not None else p.data
        ptr, nbytes = storage(t)
        if ptr not in seen_ptrs:
            seen_ptrs.add(ptr)
            param_bytes += nbytes
    kinds["state_total"] = kinds["adam_moments"] + kinds["master_weights"] + kinds["gradients"]
    return {"bytes": kinds, "param_storage_bytes": param_bytes, "example_paths": paths}


def zero_loop(loop_config: dict) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    import ray.train
    from raysys.config import Config
    from raysys.data.hybrid import HybridBatcher, ParallelItems
    from raysys.model.encoder import BiEncoder
    from raysys.data.buckets import MANIFEST, read_rank_rows
    from raysys import storage
    from raysys.train.deepspeed_config import build_deepspeed_config, lr_scheduler_factory
    from raysys.train.loop import encoder_settings
    from raysys.train.loss import info_nce_loss

    config = Config.from_dict(loop_config["config"])
    t = config.train
    torch.set_num_threads(t.torch_threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    rss_start = rss_bytes()
    corpus = loop_config["corpus"]
    manifest = storage.read_json(storage.join(corpus, MANIFEST))
    items = ParallelItems(read_rank_rows(corpus, manifest, "train", rank, world))
    batcher = HybridBatcher(items, languages=loop_config["languages"], alpha=t.alpha, seed=config.seed,
                            local_batch_size=t.global_batch_size // world, rank=rank, use_hard_negatives=False)
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    model = BiEncoder.from_pretrained(loop_config["model_path"], encoder_settings(config))
    n_params = sum(p.numel() for p in model.parameters())
    rss_model = rss_bytes()
    steps = t.max_steps
    ds_config = build_deepspeed_config(t, total_steps=steps, world_size=world)
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config,
                                           model_parameters=[p for p in model.parameters() if p.requires_grad],
                                           lr_scheduler=lr_scheduler_factory(t, steps))
    rss_init = rss_bytes()
    snapshots, step_s, rss_after_step = [], [], []
    last = time.perf_counter()
    for step, batch in batcher.epoch(0, steps):
        engine.train()
        torch.manual_seed(config.seed * 1_000_003 + step * 1_009 + rank)
        q = engine.module.tokenize(batch.queries, "query")
        p = engine.module.tokenize(batch.passages, "passage")
        loss, _ = info_nce_loss(engine(q["input_ids"], q["attention_mask"]),
                                engine(p["input_ids"], p["attention_mask"]), None, temperature=t.temperature)
        engine.backward(loss)
        if step >= 1:  # Adam state exists after the first step
            snap = _state_snapshot(engine, engine.module)
            snap["step"] = step + 1
            snap["rss_after_backward"] = rss_bytes()
            snapshots.append(snap)
        engine.step()
        loss.item()
        rss_after_step.append(rss_bytes())
        now = time.perf_counter()
        step_s.append(round(now - last, 3))
        last = now
    best = max(snapshots, key=lambda s: s["bytes"]["state_total"])
    out = {"rank": rank, "world": world, "zero_stage": t.zero_stage, "optimizer": type(engine.optimizer).__name__,
           "model_params": n_params, "rss_start": rss_start, "rss_after_model_load": rss_model,
           "rss_after_ds_init": rss_init, "rss_after_step": rss_after_step, "peak_rss": peak_rss_bytes(),
           "step_s": step_s, "state": best,
           "state_total_per_snapshot": [s["bytes"]["state_total"] for s in snapshots]}
    Path(loop_config["out_dir"], f"rank{rank}.json").write_text(json.dumps(out, indent=1))


def zero_run(args, stage: int, workdir: Path, corpus: str, languages: list[str], model_path: str) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    shutil.rmtree(workdir, ignore_errors=True)
    (workdir / "ranks").mkdir(parents=True)
    ov = overrides(args, workdir / "out", workers=2, threads=1, cpus=0.5, zero=stage, steps=args.zero_steps)
    config = make_config(ov)
    load_before = loadavg()
    t0 = time.perf_counter()
    trainer = TorchTrainer(
        zero_loop,
        train_loop_config={"config": config.to_dict(), "languages": languages, "model_path": model_path,
                           "corpus": corpus, "out_dir": str(workdir / "ranks")},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name=f"zero{stage}", storage_path=str(workdir / "ray"),
                             worker_runtime_env={"env_vars": worker_env_vars(config.train)}))  # as raysys
    with CpuProbe() as probe:
        result = trainer.fit()
    if result.error:
        raise result.error
    ranks = [json.loads((workdir / "ranks" / f"rank{r}.json").read_text()) for r in range(2)]
    return {"zero_stage": stage, "fit_wall_s": round(time.perf_counter() - t0, 1), "loadavg_before": load_before,
            "loadavg_after": loadavg(), "cpu_during_fit": probe.result, "ranks": ranks, "overrides": ov}


# ---- main ----------------------------------------------------------------------------------------

def mib(x: float) -> float:
    return round(x / 2**20, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="overhead,zero,scaling")
    ap.add_argument("--steps", type=int, default=17, help="optimizer steps per timed run")
    ap.add_argument("--warmup", type=int, default=5, help="steps dropped at the start (and the last window)")
    ap.add_argument("--log-every", type=int, default=5, help="train.log_every of the timed Ray runs (raysys default)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="rounds of plain / DeepSpeed-only / Ray runs for the overhead part (load drifts)")
    ap.add_argument("--ablate-reuse", action="store_true",
                    help="overhead part: per round also a Ray run with train.reuse_freed_memory=false and a "
                         "plain run in a process started with raysys's allocator settings")
    ap.add_argument("--skip-log-every-1", action="store_true", help="skip the extra Ray run with train.log_every=1")
    ap.add_argument("--zero-steps", type=int, default=3)
    ap.add_argument("--zero-stages", default="0,1,2,3")
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--max-query-length", type=int, default=64)
    ap.add_argument("--max-passage-length", type=int, default=128)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                    help="train.precision of the Ray runs and the ZeRO part (the plain loop is fp32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="default", help="model path or 'default' (multilingual-e5-small)")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="XQuAD-R LAReQA directory")
    ap.add_argument("--workdir", default="/tmp/bench_train")
    ap.add_argument("--ray-cpus", type=int, default=4, help="logical CPUs for ray.init (2 for workers + Ray Data)")
    ap.add_argument("--wait-max", type=float, default=1200, help="max seconds to wait for other bench/bench_ runs")
    ap.add_argument("--wait-idle", type=float, default=0.3,
                    help="also wait until the cores are less than this fraction busy (5 s sample)")
    ap.add_argument("--keep-outputs", action="store_true", help="keep the training runs' checkpoints")
    ap.add_argument("--quick", action="store_true", help="smoke run: 7 steps, log_every 2, ZeRO 0 and 2")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "train.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)  # internal: the DeepSpeed-only arm's process
    args = ap.parse_args()
    if args.child:
        return child_main(args.child)
    if args.quick:
        args.steps, args.warmup, args.log_every, args.zero_steps, args.zero_stages = 7, 2, 2, 2, "0,2"
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, REPO)] + sys.argv[1:])

    waited = wait_for_quiet(args.wait_max, args.wait_idle)
    log(f"start; waited {waited['waited_s']} s; {uptime()}")
    out = {"benchmark": "training: Ray Train + DeepSpeed step overhead, ZeRO memory per rank, 1 vs 2 workers",
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "command": command,
           "machine": machine(), "uptime_start": uptime(), "wait_for_other_benchmarks": waited,
           "settings": {"model": args.model, "data": args.data, "global_batch": args.global_batch,
                        "max_query_length": args.max_query_length, "max_passage_length": args.max_passage_length,
                        "precision": args.precision, "alpha": args.alpha, "seed": args.seed, "steps": args.steps,
                        "warmup_steps_dropped": args.warmup, "last_window_dropped": True, "log_every": args.log_every,
                        "zero_steps": args.zero_steps, "ray_init": f"raysys.runtime.ensure_ray(num_cpus={args.ray_cpus})",
                        "quick": args.quick, "hard_negatives": "none in XQuAD-R (2 encoder forwards per step)"},
           "targets": {}, "pass": {}}
    t_start = time.perf_counter()
    ray_1w = None

    if "overhead" in parts or "scaling" in parts:
        base_ov = overrides(args, work / "plain", workers=1, threads=2, cpus=2)
        base = make_config(base_ov)
        arms: dict[str, list] = {"plain": [], "deepspeed": [], "plain_reuse": []}

        def arm(kind: str, label: str) -> None:
            log(f"{label} (no Ray running)")
            la = loadavg()
            with CpuProbe() as probe:
                if kind == "plain":
                    run = plain_loop(base, 2, args.steps, label)
                elif kind == "plain_reuse":  # the same allocator settings raysys gives its CPU workers
                    run = child_loop(base_ov, 2, args.steps, label, work, use_deepspeed=False,
                                     env_extra=REUSE_FREED_MEMORY_ENV)
                else:
                    run = child_loop(base_ov, 2, args.steps, label, work, use_deepspeed=True)
            arms[kind].append(run | {"loadavg_before": la, "loadavg_after": loadavg(), "cpu": probe.result})

        # Rounds of plain, DeepSpeed-only, Ray, closed by one more DeepSpeed-only and plain run: the
        # machine's load drifts by 10-20 % over minutes, so every arm is sampled across the whole span.
        order, ray_runs, ray_1w_le1, noreuse_runs = [], [], None, []
        for round_ in range(1, args.repeats + 1):
            if "overhead" in parts:
                arm("plain", f"plain-{round_}")
                arm("deepspeed", f"deepspeed-{round_}")
                order += [f"plain-{round_}", f"deepspeed-{round_}"]
                if args.ablate_reuse:
                    arm("plain_reuse", f"plain-reuse-{round_}")
                    order.append(f"plain-reuse-{round_}")
            start_ray(args.ray_cpus)
            log(f"Ray Train + DeepSpeed (raysys.train.run.train), 1 worker x 2 threads, log_every={args.log_every}")
            ray_runs.append(raysys_run(args, "1 worker" if round_ == 1 else f"1 worker, round {round_}",
                                       work / f"ray1-{round_}", workers=1, threads=2, cpus=2))
            order.append(f"ray-{round_} (1 worker)")
            if "overhead" in parts and args.ablate_reuse:
                log("the same with train.reuse_freed_memory=false (glibc's default allocator behaviour)")
                noreuse_runs.append(raysys_run(args, f"1 worker, no memory reuse, round {round_}",
                                               work / f"ray1-noreuse-{round_}", workers=1, threads=2, cpus=2,
                                               extra=("train.reuse_freed_memory=false",)))
                order.append(f"ray-{round_} (1 worker, reuse_freed_memory=false)")
            if round_ == 1 and "overhead" in parts and args.log_every != 1 and not args.skip_log_every_1:
                log("the same with train.log_every=1 (a ray.train.report every step)")
                ray_1w_le1 = raysys_run(args, "1 worker, log_every=1", work / "ray1le1", workers=1, threads=2,
                                        cpus=2, log_every=1)
                order.append("ray (1 worker, log_every=1)")
            stop_ray()
            if "overhead" not in parts:
                break
        ray_1w = ray_runs[0]
        if "overhead" in parts:
            arm("deepspeed", "deepspeed-last")
            arm("plain", "plain-last")
            order += ["deepspeed-last", "plain-last"]
            first, last = window_mean(steady_windows(ray_1w, args.warmup))[1:]
            ray_means = [window_mean(steady_windows(run, args.warmup))[0] for run in ray_runs]
            ray_mean = statistics.fmean(ray_means)

            def mean_over(runs):  # per-step times of the same steps, pooled over runs
                return statistics.fmean([x for run in runs for x in run["step_s"][first - 1:last]])

            plain_mean, ds_mean = mean_over(arms["plain"]), mean_over(arms["deepspeed"])
            ratio = ray_mean / plain_mean
            runs = arms["plain"] + arms["deepspeed"] + arms["plain_reuse"]
            digest = ray_1w["batch_digest_rank0"]
            same_batches = (all(run["batch_digest"] == digest for run in runs)
                            and all(run["batch_digest_rank0"] == digest for run in ray_runs + noreuse_runs))
            loss_diff = {run["label"]: round(max(abs(a - b) for a, b in zip(run["loss"], ray_1w["loss"])), 6)
                         for run in runs + ray_runs[1:] + noreuse_runs}
            out["overhead"] = {
                "runs_in_order": order, "repeats": args.repeats,
                "steady_steps": [first, last], "steps_per_run": args.steps,
                "plain_mean_step_s": round(plain_mean, 4), "deepspeed_only_mean_step_s": round(ds_mean, 4),
                "ray_mean_step_s": round(ray_mean, 4), "ray_mean_step_s_per_run": [round(m, 4) for m in ray_means],
                "plain_mean_step_s_per_run": [round(mean_over([r]), 4) for r in arms["plain"]],
                "deepspeed_only_mean_step_s_per_run": [round(mean_over([r]), 4) for r in arms["deepspeed"]],
                "plain_step_s_stats": stats([x for r in arms["plain"] for x in r["step_s"][first - 1:last]]),
                "deepspeed_only_step_s_stats": stats([x for r in arms["deepspeed"] for x in r["step_s"][first - 1:last]]),
                "ratio_ray_over_plain": round(ratio, 3),
                "ratio_deepspeed_only_over_plain": round(ds_mean / plain_mean, 3),
                "ratio_ray_over_deepspeed_only": round(ray_mean / ds_mean, 3),
                "same_batches_as_ray": same_batches, "max_abs_loss_diff_vs_ray": loss_diff,
                "plain_runs": arms["plain"], "deepspeed_only_runs": arms["deepspeed"],
                "ray_runs": [{k: v for k, v in run.items() if k != "batch_digest_rank0"} for run in ray_runs]}
            if noreuse_runs:
                noreuse_means = [window_mean(steady_windows(run, args.warmup))[0] for run in noreuse_runs]
                noreuse_mean = statistics.fmean(noreuse_means)
                plain_reuse_mean = mean_over(arms["plain_reuse"])
                out["overhead"]["plain_with_reuse_settings"] = {
                    "env": REUSE_FREED_MEMORY_ENV, "mean_step_s": round(plain_reuse_mean, 4),
                    "mean_step_s_per_run": [round(mean_over([r]), 4) for r in arms["plain_reuse"]],
                    "ratio_ray_over_it": round(ray_mean / plain_reuse_mean, 3), "runs": arms["plain_reuse"]}
                log(f"plain with the reuse settings: {plain_reuse_mean:.3f} s; ray / it {ray_mean / plain_reuse_mean:.3f}")
                out["overhead"]["without_reuse_freed_memory"] = {
                    "ray_mean_step_s": round(noreuse_mean, 4),
                    "ray_mean_step_s_per_run": [round(m, 4) for m in noreuse_means],
                    "ratio_over_plain": round(noreuse_mean / plain_mean, 3),
                    "ratio_with_over_without": round(ray_mean / noreuse_mean, 3),
                    "runs": [{k: v for k, v in run.items() if k != "batch_digest_rank0"} for run in noreuse_runs]}
                log(f"without reuse_freed_memory: ray {noreuse_mean:.3f} s, ratio {noreuse_mean / plain_mean:.3f}")
            if ray_1w_le1:
                le1 = steady_windows(ray_1w_le1, args.warmup)
                le1_mean = window_mean(le1)[0]
                out["overhead"]["log_every_1"] = {
                    "ray_mean_step_s": round(le1_mean, 4), "ratio_over_plain": round(le1_mean / plain_mean, 3),
                    "step_s_stats": stats([w["mean_step_s"] for w in le1 if first <= w["first_step"] <= last]),
                    "run": {k: v for k, v in ray_1w_le1.items() if k != "batch_digest_rank0"}}
            out["targets"]["overhead"] = ("Ray Train + DeepSpeed (raysys.train.run.train, 1 worker, ZeRO 0, "
                                          "default log_every) mean step time <= 1.15 x plain PyTorch")
            out["pass"]["overhead"] = ratio <= 1.15
            log(f"overhead: steps {first}..{last}: plain {plain_mean:.3f} s, deepspeed-only {ds_mean:.3f} s, "
                f"ray {ray_mean:.3f} s, ratio {ratio:.3f}; same batches {same_batches}; loss diff {loss_diff}")

    if "scaling" in parts:
        start_ray(args.ray_cpus)
        log("Ray Train + DeepSpeed, 2 workers x 1 thread")
        ray_2w = raysys_run(args, "2 workers", work / "ray2", workers=2, threads=1, cpus=1)
        rows = {}
        for run in (ray_1w, ray_2w):
            wins = steady_windows(run, args.warmup)
            mean, first, last = window_mean(wins)
            rows[run["label"]] = {"workers": run["workers"], "threads_per_worker": run["torch_threads_per_worker"],
                                  "steady_steps": [first, last], "mean_step_s": round(mean, 4),
                                  "pairs_per_s": round(args.global_batch / mean, 3),
                                  "window_pairs_per_s": [w["pairs_per_s"] for w in wins],
                                  "fit_wall_s": run["fit_wall_s"], "loadavg_before": run["loadavg_before"],
                                  "loadavg_after": run["loadavg_after"], "cpu_during_fit": run["cpu_during_fit"]}
        out["scaling"] = {"runs": rows, "speedup_2w_over_1w": round(rows["2 workers"]["pairs_per_s"] /
                                                                   rows["1 worker"]["pairs_per_s"], 3),
                          "ray_run_2w": ray_2w, "note": "1-worker figures are the overhead part's Ray run"}
        log(f"scaling: 1w {rows['1 worker']['pairs_per_s']} pairs/s, 2w {rows['2 workers']['pairs_per_s']} pairs/s")

    if "zero" in parts:
        import warnings

        from raysys.model.default import resolve_model_path
        from raysys.train.datasets import prepare_corpus

        start_ray(args.ray_cpus)
        cfg = make_config(overrides(args, work / "zero", workers=2, threads=1, cpus=0.5))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            corpus, manifest = prepare_corpus(cfg)
        languages = manifest["splits"]["train"]["languages"]
        model_path = str(resolve_model_path(args.model))
        stages = {}
        for stage in [int(s) for s in args.zero_stages.split(",")]:
            log(f"ZeRO stage {stage}, 2 workers")
            run = zero_run(args, stage, work / f"zero{stage}", corpus, languages, model_path)
            r = run["ranks"]
            stages[stage] = {
                "optimizer": r[0]["optimizer"],
                "state_bytes_per_rank": [x["state"]["bytes"] for x in r],
                "param_storage_bytes_per_rank": [x["state"]["param_storage_bytes"] for x in r],
                "state_total_mib_max_rank": mib(max(x["state"]["bytes"]["state_total"] for x in r)),
                "comm_buckets_mib_max_rank": mib(max(x["state"]["bytes"]["comm_buckets"] for x in r)),
                "peak_rss_mib_per_rank": [mib(x["peak_rss"]) for x in r],
                "rss_after_model_load_mib_per_rank": [mib(x["rss_after_model_load"]) for x in r],
                "rss_after_ds_init_mib_per_rank": [mib(x["rss_after_ds_init"]) for x in r],
                "peak_minus_model_load_mib_per_rank": [mib(x["peak_rss"] - x["rss_after_model_load"]) for x in r],
                "step_s_per_rank": [x["step_s"] for x in r],
                "fit_wall_s": run["fit_wall_s"], "loadavg_before": run["loadavg_before"],
                "loadavg_after": run["loadavg_after"], "cpu_during_fit": run["cpu_during_fit"], "raw": run}
            log(f"ZeRO {stage}: state {stages[stage]['state_total_mib_max_rank']} MiB/rank, "
                f"peak RSS {stages[stage]['peak_rss_mib_per_rank']} MiB")
        n_params = stages[min(stages)]["raw"]["ranks"][0]["model_params"]
        zero = {"stages": {str(k): v for k, v in stages.items()}, "model_params": n_params,
                "theory_fp32_bytes_per_param": {
                    "0": "grads 4 + Adam moments 8 = 12 (params 4 not counted)",
                    "1/2": "Adam 8/N + fp32 master copy 4/N + gradient partition 4/N = 16/N (8 for N=2: 0.667x)",
                    "3": "as 2, and the params themselves are partitioned (4/N)"}}
        if 0 in stages:
            s0 = max(x["state"]["bytes"]["state_total"] for x in stages[0]["raw"]["ranks"])
            p0 = max(x["peak_rss"] for x in stages[0]["raw"]["ranks"])
            d0 = max(x["peak_rss"] - x["rss_after_model_load"] for x in stages[0]["raw"]["ranks"])
            ratios = {}
            for k, v in stages.items():
                ranks = v["raw"]["ranks"]
                st = max(x["state"]["bytes"]["state_total"] for x in ranks)
                no_master = max(x["state"]["bytes"]["adam_moments"] + x["state"]["bytes"]["gradients"] for x in ranks)
                ratios[str(k)] = {
                    "state_total": round(st / s0, 3),
                    "state_without_master_weights": round(no_master / s0, 3),
                    "peak_rss": round(max(x["peak_rss"] for x in ranks) / p0, 3),
                    "peak_rss_minus_model_load": round(max(x["peak_rss"] - x["rss_after_model_load"]
                                                           for x in ranks) / d0, 3)}
            zero["ratio_vs_stage0"] = ratios
            if 2 in stages:
                r2 = ratios["2"]["state_total"]
                out["targets"]["zero"] = "ZeRO 2 optimizer + gradient state per rank <= 0.6 x ZeRO 0 (2 workers)"
                out["pass"]["zero"] = r2 <= 0.6
        out["zero"] = zero

    stop_ray()
    out["uptime_end"] = uptime()
    out["total_wall_s"] = round(time.perf_counter() - t_start, 1)
    out["others_running_at_end"] = other_benches()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    log(f"wrote {args.out} in {out['total_wall_s']} s; pass: {out['pass']}")


if __name__ == "__main__":
    main()
