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

from raysys.console import ray_init_args
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
    # Ray enables token auth by itself only for clusters it finds without an address; with an explicit
    # address and no RAY_AUTH_MODE it never sends the token, and retries "Unauthenticated" forever.
    if "RAY_AUTH_MODE" in os.environ:
        return
    token = os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
    if AUTH_TOKEN_FILE.exists() or token:
        raise RayConnectionError(
            f"RAY_ADDRESS={address}: RAY_AUTH_MODE is not set, so Ray would not send this machine's auth token "
            f"({AUTH_TOKEN_FILE if not token else 'RAY_AUTH_TOKEN'}) and a `ray start` cluster refuses the "
            "connection (set RAY_AUTH_MODE=token, as on every node and driver; RAY_AUTH_MODE=disabled if the "
            "cluster runs without token auth)")


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to a cluster when RAY_ADDRESS is set, else start local Ray (idempotent)."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    check_cluster_auth(address)
    # Under `ray job submit --runtime-env ...` the job's runtime env and ours both set env vars
    # (e.g. TOKENIZERS_PARALLELISM); Ray refuses any shared key unless told to combine them.
    os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
    # runtime_env (WORKER_ENV plus a worker setup hook) and Ray's log level: raysys.console
    ray.init(num_cpus=None if address else num_cpus, log_to_driver=True, ignore_reinit_error=True,
             **ray_init_args(address, WORKER_ENV))
    # The DataContext travels to the workers: per-worker shard bars would only add noise.
    ray.data.DataContext.get_current().enable_progress_bars = False


def is_multi_node() -> bool:
    """True when Ray work may run on another machine than this driver."""
    if not ray.is_initialized():
        return False
    here = ray.get_runtime_context().get_node_id()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return len(nodes) > 1 or any(n["NodeID"] != here for n in nodes)
