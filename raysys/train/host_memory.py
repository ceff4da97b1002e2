"""Host-memory allocator settings for CPU training workers (glibc malloc, set per process).

Why: Ray Train runs `train_loop_per_worker` in a thread that is not the process's main thread,
and glibc gives such a thread its own arena. A thread arena cannot hold a chunk larger than its
64 MiB heap, so every large tensor (on the default model the 384 MB word-embedding gradient, the
activations of a batch) is mmap'ed and unmapped again each step: the next step faults in fresh
zeroed pages. The three settings below make every thread use the main arena, serve large blocks
from it instead of mmap, and never hand freed memory back, so a step reuses the previous step's
pages. The cost is that a worker's RSS stays at its peak, which a training worker reaches every
step anyway. bench/results/train_overhead_malloc.json has the measured effect.

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


def worker_env_vars(train: TrainConfig) -> dict[str, str]:
    """Environment variables for the Ray Train worker processes of this run."""
    if train.reuse_freed_memory and not train.use_gpu:
        return dict(REUSE_FREED_MEMORY_ENV)
    return {}
