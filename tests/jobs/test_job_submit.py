"""End to end on a real Ray head: `ray start --head` on 127.0.0.1, `ray job submit` a small
training + evaluation job (the quick demo with the tiny model), wait for SUCCEEDED, check outputs."""

import contextlib
import os
import signal
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, XQUAD_R_DIR
from tests.fixtures.processes import free_port, processes_matching, stop_processes

pytestmark = pytest.mark.timeout(900)
BIN = Path(sys.executable).parent


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head bound to 127.0.0.1, in its own process group, and only that head is stopped
    afterwards: `ray stop` would kill every Ray instance on the machine, including the suite's
    own `ray_local` session (and its driver, this pytest process, with it)."""
    port, dashboard = free_port(), free_port()
    # Ray's Unix sockets live under --temp-dir: keep it short (socket paths max ~107 bytes).
    temp_dir = tempfile.mkdtemp(prefix="rayt-", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAYSYS_CACHE": str(tmp_path / "cache")}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen([BIN / "ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                             f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                             "--num-cpus=4", "--include-dashboard=true", f"--temp-dir={temp_dir}",
                             # its own agent ports: the defaults (52365, ...) are taken when another
                             # Ray instance runs here, e.g. the suite's `ray_local`, and then no job agent starts
                             *(f"--{flag}={free_port()}" for flag in (
                                 "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                 "runtime-env-agent-port", "metrics-export-port", "ray-client-server-port"))],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    client_env = {**env, "RAY_ADDRESS": f"http://127.0.0.1:{dashboard}"}
    try:
        deadline = time.time() + 180
        while subprocess.run([BIN / "ray", "job", "list"], env=client_env, capture_output=True,
                             timeout=60).returncode != 0:
            assert head.poll() is None, "ray start --head exited"
            assert time.time() < deadline, "the Ray head did not come up in 3 minutes"
            time.sleep(2)
        yield client_env
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)
        # Every process of this Ray instance names its temp dir on its command line.
        stop_processes([head.pid, *processes_matching(temp_dir)])
        head.wait(timeout=30)
        assert not processes_matching(temp_dir), "processes of the test head survived"
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_job_submit_trains_and_evaluates(ray_head, tmp_path, tiny_model_dir, xquad_r_dir):
    out = tmp_path / "outputs"
    entrypoint = [str(BIN / "python"), str(REPO_ROOT / "jobs" / "demo.py"), "--quick",
                  f"model.name_or_path={tiny_model_dir}", f"data.train={XQUAD_R_DIR}",
                  f"eval.datasets=[{XQUAD_R_DIR}]", "eval.max_length=48", f"output_dir={out}", "name=jobtest"]
    deadline = time.time() + 120
    while True:  # the head answers before its node's job agent is up ("No available agent ... try again")
        submitted = subprocess.run([BIN / "ray", "job", "submit", "--no-wait", "--submission-id", "raysys-e2e",
                                    "--", *entrypoint], env=ray_head, capture_output=True, text=True, timeout=120)
        if submitted.returncode == 0 or "No available agent" not in submitted.stderr or time.time() > deadline:
            break
        time.sleep(3)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
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
