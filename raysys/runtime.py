"""The one place that starts or joins Ray.

`ensure_ray()` connects to a cluster when RAY_ADDRESS is set (`ray job submit`, a driver on the
head node) and starts a local Ray otherwise. Every raysys entry point (train, eval, tune,
reproduce, demo, benchmarks) goes through it, so the environment the workers get is decided here.
"""

from __future__ import annotations

import os
from pathlib import Path

import ray
import ray.data

from raysys.errors import RaysysError

# Environment every Ray worker process needs (merged into the job's runtime_env).
# (DS_ACCELERATOR is set per run in the training loop: cpu, or cuda when train.use_gpu.)
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
AUTH_TOKEN_FILE = Path("~/.ray/auth_token").expanduser()


class RayConnectionError(RaysysError):
    """The cluster could not be joined (address, authentication)."""


def check_cluster_auth(address: str | None) -> None:
    """A `ray start` cluster of Ray >= 2.60 uses token authentication: a driver without
    RAY_AUTH_MODE=token retries "Failed to get cluster ID ... Unauthenticated" forever instead of
    failing, so refuse up front when a token is available on this machine but not enabled."""
    if not address or address == "local" or address.startswith(("http://", "https://")):
        return  # local Ray, or the job-submission HTTP API (the CLI handles its own auth)
    mode = os.environ.get("RAY_AUTH_MODE", "").lower()
    token = os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
    if mode != "token" and (AUTH_TOKEN_FILE.exists() or token):
        raise RayConnectionError(
            f"RAY_ADDRESS={address}: this machine has a Ray auth token ({AUTH_TOKEN_FILE}) but RAY_AUTH_MODE "
            "is not 'token', so the cluster would refuse the connection (set RAY_AUTH_MODE=token, as for every "
            "node and driver of a `ray start` cluster; or run through `ray job submit`)")


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to a cluster when RAY_ADDRESS is set, else start local Ray (idempotent)."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    check_cluster_auth(address)
    ray.init(num_cpus=None if address else num_cpus, runtime_env={"env_vars": dict(WORKER_ENV)},
             log_to_driver=True, ignore_reinit_error=True)
    # The DataContext travels to the workers: per-worker shard bars would only add noise.
    ray.data.DataContext.get_current().enable_progress_bars = False


def cluster_node_count() -> int:
    """Alive nodes that can run work (CPUs or GPUs); 1 for a local Ray."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    workers = [n for n in nodes if n.get("Resources", {}).get("CPU", 0) or n.get("Resources", {}).get("GPU", 0)]
    return max(1, len(workers))


def is_multi_node() -> bool:
    """True when Ray work may run on another machine than this driver."""
    if not ray.is_initialized():
        return False
    here = ray.get_runtime_context().get_node_id()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return len(nodes) > 1 or any(n["NodeID"] != here for n in nodes)
