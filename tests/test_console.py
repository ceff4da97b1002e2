"""What a raysys command prints: Ray at WARNING, known-harmless notices off, nothing deprecated.

The last test runs `raysys demo --quick` (tiny model) in a fresh process with its own local Ray
and checks its whole transcript, as a user would see it in a log file."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

import pytest

from raysys import console


@pytest.fixture
def quiet(monkeypatch):
    monkeypatch.setenv(console.VERBOSE_ENV, "0")
    calls = []
    monkeypatch.setattr(console, "_enable_token_auth_quietly", lambda: calls.append("token"))
    # ray_init_args sets this for a local Ray; record it so the test leaves the environment as it was
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "sentinel")
    monkeypatch.delenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")
    return calls


def test_a_local_ray_starts_quiet(quiet):
    args = console.ray_init_args(None, {"TOKENIZERS_PARALLELISM": "false"})
    assert args["logging_level"] == logging.WARNING
    assert args["runtime_env"]["worker_process_setup_hook"] == "raysys.console.setup_worker"
    assert args["runtime_env"]["env_vars"] == {"TOKENIZERS_PARALLELISM": "false", console.VERBOSE_ENV: "0",
                                               "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    assert quiet == ["token"] and os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"


def test_joining_a_cluster_keeps_its_auth_and_preemption_watcher(quiet):
    args = console.ray_init_args("10.0.0.1:6379", {})
    assert args["logging_level"] == logging.WARNING and quiet == []
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in os.environ


def test_verbose_keeps_ray_at_info(quiet, monkeypatch):
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    args = console.ray_init_args(None, {})
    assert args == {"runtime_env": {"env_vars": {console.VERBOSE_ENV: "1"}}, "logging_level": logging.INFO}
    assert console.train_logging_config().log_level == "INFO"
    monkeypatch.setenv(console.VERBOSE_ENV, "0")
    assert console.train_logging_config().log_level == "WARNING"


def test_token_auth_is_enabled_the_way_ray_does_unless_the_user_chose(monkeypatch):
    from ray._private.authentication import authentication_token_setup as setup

    calls = []
    monkeypatch.setattr(setup, "_enable_token_auth", lambda: calls.append(1))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    console._enable_token_auth_quietly()
    assert calls == []
    monkeypatch.delenv("RAY_AUTH_MODE")
    console._enable_token_auth_quietly()
    assert calls == [1]


def test_ray_data_console_shows_warnings_not_info():
    console.quiet_ray_data()
    data_logger = logging.getLogger("ray.data")
    console_handlers = [h for h in data_logger.handlers if type(h).__name__ == "PlainRayHandler"]  # Ray's console
    assert console_handlers and all(h.level == logging.WARNING for h in console_handlers)
    assert data_logger.level <= logging.INFO  # the file log in the Ray session keeps INFO

    def record(name, msg):
        return logging.LogRecord(name, logging.WARNING, __file__, 1, msg, None, None)

    progress = logging.getLogger("ray.data._internal.progress")
    assert not progress.filter(record(progress.name, "Progress bars disabled. To enable, set ..."))
    assert progress.filter(record(progress.name, "Progress bars for operators disabled."))


def test_the_worker_hook_quiets_ray_trains_per_report_lines(monkeypatch):
    import ray.train.collective.collectives as collectives
    import ray.train.v2._internal.execution.context as context

    monkeypatch.setenv(console.VERBOSE_ENV, "0")
    console.setup_worker()
    for module in (context, collectives):
        assert module.logger.level == logging.WARNING  # the very logger those lines come from


def test_the_worker_hook_never_stops_a_worker(monkeypatch):
    def broken():
        raise RuntimeError("boom")

    monkeypatch.setenv(console.VERBOSE_ENV, "0")
    monkeypatch.setattr(console, "quiet_ray_data", broken)
    console.setup_worker()  # no exception


def test_encoding_logs_nothing_deprecated(ray_local, tmp_path, tiny_model_dir):
    from raysys.eval.encode import encode_texts
    from raysys.model.encoder import EncoderSettings

    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger("ray.data").addHandler(handler)
    try:
        encode_texts(["a b", "c d e", "f"], "query", model_path=str(tiny_model_dir), settings=EncoderSettings(),
                     out_dir=tmp_path, name="q", shard_size=2, threads=1, progress=False)
    finally:
        logging.getLogger("ray.data").removeHandler(handler)
    assert not [r.getMessage() for r in records if "deprecat" in r.getMessage().lower()]


# Ray's Python log format ("2026-12-01 05:32:12,122<TAB>INFO streaming_executor.py:215 -- ...") and
# forwarded worker output ("(RayTrainWorker pid=8424) ..."), with or without colour codes.
RAY_INFO = re.compile(r"^\S+ \S+\tINFO \S+:\d+ -- ")
WORKER_PREFIX = re.compile(r"^(\x1b\[\d+m)?\(\w[^)]* pid=\d+")


@pytest.mark.timeout(900)
def test_quick_demo_transcript(tmp_path, tiny_model_dir, xquad_r_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "RAYSYS_"))}
    env.update(RAYSYS_CACHE=str(tmp_path / "cache"), RAYSYS_DATA_SOURCE=str(xquad_r_dir), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    argv = [sys.executable, "-m", "raysys.cli", "demo", "--quick", f"output_dir={tmp_path / 'out'}",
            f"model.name_or_path={tiny_model_dir}", "model.max_query_length=32", "model.max_passage_length=48",
            "eval.max_length=48", "train.cpus_per_worker=0.5", "train.global_batch_size=8"]
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=840)
    transcript = done.stdout + done.stderr
    lines = transcript.splitlines()
    if "Found multiple active Ray instances" in transcript:
        # The suite's own Ray runs too: Ray Train's placement-group cleaner cannot tell which cluster
        # is its own and prints a traceback (a Ray issue of two local clusters, not of raysys).
        lines = [line for line in lines if "(PlacementGroupCleaner pid=" not in line]
        transcript = "\n".join(lines)
    assert done.returncode == 0, transcript[-5000:]
    assert not [line for line in lines if RAY_INFO.match(line)], transcript
    assert not [line for line in lines if WORKER_PREFIX.match(line)], transcript
    for noise in ("deprecat", "futurewarning", "progress bars disabled", "token authentication",
                  "reporting training result", "loading weights"):
        assert noise not in transcript.lower(), transcript
    # Ray core (C++) still notes that Ray Data's restartable encoder actors get object-store
    # arguments (no non-deprecated way to change either); Ray Train's preemption watcher is off locally.
    notices = [line for line in lines if "constructor arguments in the object store" in line]
    assert all("MapWorker(MapBatches(EncoderActor))" in line for line in notices), transcript
    steps = [line for line in lines if line.startswith("[train] ")]
    assert [line.split(" steps")[0] for line in steps] == [f"[train] {n}/4" for n in (1, 2, 3, 4)], transcript
    assert all("loss" in line and "mono" in line and "cross" in line for line in steps), transcript
    assert "[demo] done in" in transcript
    assert any(line.startswith("| untrained |") for line in lines)
    assert any(line.startswith("| hybrid alpha=0.5 |") for line in lines)
    assert len(lines) < 40, transcript


@pytest.mark.slow  # a CLI subprocess: `make test-slow`
def test_driver_model_loads_draw_no_bars(tmp_path, tiny_model_dir):
    """`raysys export` loads two models in the driver: no per-load "Loading weights" bar."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAYSYS_", "HF_HUB_DISABLE"))}
    env.update(RAYSYS_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    argv = [sys.executable, "-m", "raysys.cli", "export", "--model", str(tiny_model_dir), "--base", str(tiny_model_dir),
            "--interpolate", "0.5", "--out", str(tmp_path / "mixed")]
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "mixed" / "config.json").exists()
    assert "loading weights" not in (done.stdout + done.stderr).lower(), done.stderr
