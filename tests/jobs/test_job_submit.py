"""End to end on a real Ray head: `ray start --head` on 127.0.0.1, `ray job submit` a small
training + evaluation job (the quick demo with the tiny model), wait for SUCCEEDED, check outputs."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, XQUAD_R_DIR

pytestmark = pytest.mark.timeout(900)
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head bound to 127.0.0.1, always stopped afterwards."""
    port, dashboard = free_port(), free_port()
    # Ray's Unix sockets live under --temp-dir: keep it short (socket paths max ~107 bytes).
    temp_dir = tempfile.mkdtemp(prefix="rayt-", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAYSYS_CACHE": str(tmp_path / "cache")}
    subprocess.run([BIN / "ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=4",
                    "--include-dashboard=true", f"--temp-dir={temp_dir}"],
                   check=True, env=env, capture_output=True, timeout=180)
    try:
        yield {**env, "RAY_ADDRESS": f"http://127.0.0.1:{dashboard}"}
    finally:
        subprocess.run([BIN / "ray", "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_job_submit_trains_and_evaluates(ray_head, tmp_path, tiny_model_dir, xquad_r_dir):
    out = tmp_path / "outputs"
    entrypoint = [str(BIN / "python"), str(REPO_ROOT / "jobs" / "demo.py"), "--quick",
                  f"model.name_or_path={tiny_model_dir}", f"data.train={XQUAD_R_DIR}",
                  f"eval.datasets=[{XQUAD_R_DIR}]", "eval.max_length=48", f"output_dir={out}", "name=jobtest"]
    submitted = subprocess.run([BIN / "ray", "job", "submit", "--no-wait", "--submission-id", "raysys-e2e",
                                "--", *entrypoint], env=ray_head, capture_output=True, text=True, timeout=120)
    assert submitted.returncode == 0, submitted.stderr
    def ray_job(*args) -> str:
        done = subprocess.run([BIN / "ray", "job", *args], env=ray_head, capture_output=True, text=True, timeout=120)
        return done.stdout + done.stderr

    deadline, status = time.time() + 600, ""
    while not any(word in status for word in ("succeeded", "failed", "stopped")):
        assert time.time() < deadline, "job did not finish in 10 minutes"
        time.sleep(3)
        status = ray_job("status", "raysys-e2e").lower()
    logs = ray_job("logs", "raysys-e2e")
    assert "job 'raysys-e2e' succeeded" in status, logs[-3000:]
    report = out / "jobtest-quick" / "eval"
    comparison = (report / "comparison" / "comparison.md").read_text()
    assert "untrained" in comparison and "hybrid alpha=0.5" in comparison
    assert (report / "trained" / "metrics.json").exists()
    assert "[demo] done" in logs
