"""Host-memory allocator settings for CPU training workers (glibc malloc, set per process).

Why: glibc serves large blocks (above its mmap threshold, at most 32 MiB) with mmap and unmaps
them on free, and Ray Train runs `train_loop_per_worker` in a thread other than the main one,
whose glibc arena also hands its 64 MiB heaps back as they empty. So every step's large tensors
(on the default model the 384 MB word-embedding gradient, a batch's activations) come back as
fresh zeroed pages, one minor page fault per 4 KiB. The three settings below make every thread
use the main arena, serve large blocks from its heap instead of mmap, and keep freed memory, so
a step reuses the previous step's pages once the heap has settled (a few steps). The cost: a
worker's RSS stays at its peak, which a training worker reaches every step anyway. Measured
effect: bench/results/train_overhead_reuse*.json (`bench/bench_train.py --ablate-reuse`).

glibc reads these at process start, so they travel in the workers' runtime_env
(`RunConfig(worker_runtime_env=...)`), not through os.environ inside the loop.
GPU workers keep their tensors in CUDA's caching allocator, so they get nothing from this.
"""

from __future__ import annotations

from raysys.config import TrainConfig

REUSE_FREED_MEMORY_ENV = {
    "MALLOC_ARENA_MAX": "1",  # all threads allocate from the main arena (brk heap)
    "MALLOC_MMAP_MAX_": "0",  # large blocks come from that heap, not from mmap
    "MALLOC_TRIM_THRESHOLD_": str(1 << 40),  # freed memory at the top of the heap is kept
}


def reuses_freed_memory(train: TrainConfig) -> bool:
    """train.reuse_freed_memory, or by default: CPU workers at ZeRO stage 0. ZeRO >= 1 is chosen to
    save memory, and there the kept memory raised the peak RSS per rank by 0.4-1.6 GiB
    (bench/results/train_zero_scaling_reuse.json against train_zero_auto_reuse.json)."""
    if train.reuse_freed_memory is not None:
        return train.reuse_freed_memory
    return not train.use_gpu and train.zero_stage == 0


def worker_env_vars(train: TrainConfig) -> dict[str, str]:
    """Environment variables for the Ray Train worker processes of this run."""
    return dict(REUSE_FREED_MEMORY_ENV) if reuses_freed_memory(train) else {}
