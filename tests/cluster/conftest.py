"""One real multi-node Ray cluster for the module (3 worker nodes, private filesystems) and the
S3 server that holds its storage. The driver runs on the head, in a subprocess, as a user's would."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from tests.fixtures.cluster import can_unshare, start_cluster

pytestmark = pytest.mark.cluster
RAYSYS = str(Path(sys.executable).parent / "raysys")
TINY_TRAIN = ["data.languages=[de,en,es,zh]", "model.max_query_length=32", "model.max_passage_length=48",
              "train.global_batch_size=8", "train.lr=1e-3", "train.log_every=1", "eval.max_length=48"]


@pytest.fixture(scope="module")
def cluster(s3_server, xquad_r_dir, tiny_model_dir):
    """Head (0 CPUs) + 3 worker nodes of 2 CPUs. The head's private directory holds what only the
    driver's machine has: a local model directory, a local copy of the data, its raysys cache."""
    reason = can_unshare()
    if reason:
        pytest.skip(reason)
    from raysys.config import cache_dir
    from raysys.model.default import build_default_model

    build_default_model()  # the driver's cache has the default model; the nodes' caches are empty
    running = start_cluster(num_nodes=3, cpus_per_node=2, hidden=[str(cache_dir())], node_env=s3_server.env)
    try:
        shutil.copytree(tiny_model_dir, running.head_dir / "models" / "tiny")
        shutil.copytree(xquad_r_dir, running.head_dir / "data" / "xquad-r")
        running.s3 = s3_server
        running.base_env = {**s3_server.env, "RAYSYS_CACHE": str(cache_dir())}
        yield running
    finally:
        running.stop()


def tiny_args(cluster, name: str, storage: str, *extra: str) -> list[str]:
    head = cluster.head_dir
    return [f"model.name_or_path={head / 'models' / 'tiny'}", f"data.train={head / 'data' / 'xquad-r'}",
            f"output_dir={head / 'outputs'}", f"name={name}", f"train.storage_path={storage}", *TINY_TRAIN, *extra]
