"""raysys on a real multi-node Ray cluster whose nodes share no home directory, with storage on a
real S3 server: train (ZeRO-2, one worker per node), resume from S3, export, evaluate with the same
metrics as one node, Tune trials on other nodes, `ray job submit`, losing a node mid-run, and the
one-line errors of a misconfigured cluster. The node-loss test runs last (it takes a node away)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raysys import storage
from raysys.train.checkpoint import complete_checkpoints, read_state, verify_checkpoint
from tests.cluster.conftest import RAYSYS, tiny_args
from tests.conftest import REPO_ROOT
from tests.eval.miracl_fixture import write_miracl

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1500)]
ONE_WORKER_PER_NODE = ["train.num_workers=2", "train.cpus_per_worker=2", "train.zero_stage=2"]


def run_ok(cluster, args: list[str], timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    done = cluster.run_driver(args, env={**cluster.base_env, **(env or {})}, timeout=timeout)
    assert done.returncode == 0, f"{args[:2]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


# A line Ray's log monitor forwarded from a cluster process ("(raylet) ...", "(pid=..., ip=...) ..."),
# possibly coloured: these can arrive after the driver's own last line (a raylet's full-disk warning did).
FORWARDED = re.compile(r"^(\x1b\[\d+m)*\((raylet|[\w.]*\s*pid=)")


def last_own_line(stderr: str) -> str:
    """The driver's own last stderr line, skipping what Ray forwarded from the nodes."""
    return [line for line in stderr.strip().splitlines() if not FORWARDED.match(line)][-1]


def printed(stdout: str, label: str) -> str:
    return next(line.split(label, 1)[1].strip() for line in stdout.splitlines() if line.startswith(label))


def single_node_eval(model: str, out: Path, args: list[str], s3_env: dict, cache: Path,
                     more_datasets: tuple[str, ...] = ()) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(s3_env, RAYSYS_CACHE=str(cache))
    done = subprocess.run([RAYSYS, "eval", *args, "--model", model, "--out", str(out), "--datasets",
                           args_value(args, "data.train="), *more_datasets], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return summaries(out)


def args_value(args: list[str], prefix: str) -> str:
    return next(a.split("=", 1)[1] for a in args if a.startswith(prefix))


def summaries(report_dir: Path) -> dict:
    """{dataset directory name: summary metrics} from a report's metrics.json."""
    metrics = json.loads(next(report_dir.rglob("metrics.json")).read_text())
    return {Path(name).name: result["summary"] for name, result in metrics.items()}


def test_train_resume_export_and_evaluate_on_the_cluster(cluster, s3_env, tmp_path):
    store = cluster.s3.uri("runs-tiny")
    args = tiny_args(cluster, "tiny", store, *ONE_WORKER_PER_NODE, "train.max_steps=4", "train.checkpoint_every=2",
                     "train.eval_every=2", "train.logger=tensorboard")
    done = run_ok(cluster, [RAYSYS, "train", *args])
    checkpoint, model = printed(done.stdout, "final checkpoint:"), printed(done.stdout, "exported model:")
    assert checkpoint.startswith(store + "/") and model == checkpoint + "/hf_model"
    first = verify_checkpoint(checkpoint)  # every rank's shards are in S3, with their sizes
    assert first["global_step"] == 4 and first["world_size"] == 2
    assert storage.is_file(storage.join(model, "model.safetensors"))
    run_dir = checkpoint.rsplit("/", 1)[0]
    assert any(name.startswith("tensorboard/") for name in storage.list_files(run_dir)), "no TensorBoard events in S3"

    resumed = run_ok(cluster, [RAYSYS, "train", *args[:-4], "train.max_steps=6", "train.checkpoint_every=3",
                               "train.eval_every=3", f"train.resume_from={checkpoint}"])
    state = read_state(printed(resumed.stdout, "final checkpoint:"))
    assert state["global_step"] == 6 and state["restores"] == 1
    assert state["history"]["batch"][:4] == first["history"]["batch"], "the resumed run left the schedule"

    # A LAReQA dataset and a MIRACL-style directory on the head only: the encoder tasks and actors on
    # the other node read the corpus from the copy published to S3.
    eval_args = tiny_args(cluster, "tiny", store)
    write_miracl(cluster.head_dir / "miracl")
    report = cluster.head_dir / "eval-cluster"
    run_ok(cluster, [RAYSYS, "eval", *eval_args, "--model", model, "--out", str(report), "--datasets",
                     args_value(eval_args, "data.train="), f"miracl:{cluster.head_dir / 'miracl'}"])
    on_cluster = summaries(report)
    assert set(on_cluster) == {Path(args_value(eval_args, "data.train=")).name, "miracl"}
    assert any(name.startswith("published/data/de-") for name in storage.list_files(store)), "corpus not published"
    # The same model from S3, the same data, on one node (local Ray, another cache).
    local_args = [a.replace(str(cluster.head_dir), str(tmp_path / "head")) for a in eval_args]
    shutil.copytree(cluster.head_dir / "data", tmp_path / "head" / "data")
    shutil.copytree(cluster.head_dir / "miracl", tmp_path / "head" / "miracl")
    on_one_node = single_node_eval(model, tmp_path / "eval-local", local_args, cluster.s3.env, tmp_path / "cache",
                                   more_datasets=(f"miracl:{tmp_path / 'head' / 'miracl'}",))
    assert json.dumps(on_cluster, sort_keys=True) == json.dumps(on_one_node, sort_keys=True)


def test_default_model_trains_and_evaluates_on_the_cluster(cluster, s3_env, tmp_path):
    """`default` is built on the driver only: the nodes load it from storage, not from their caches."""
    head = cluster.head_dir
    args = [f"data.train={head / 'data' / 'xquad-r'}", "data.languages=[de,en]", f"output_dir={head / 'outputs'}",
            "name=default", f"train.storage_path={cluster.s3.uri('runs-default')}", "model.max_query_length=32",
            "model.max_passage_length=48", "eval.max_length=48", "train.global_batch_size=4", "train.max_steps=2",
            "train.checkpoint_every=2", "train.eval_every=2", *ONE_WORKER_PER_NODE]
    done = run_ok(cluster, [RAYSYS, "train", *args])
    model = printed(done.stdout, "exported model:")
    assert "published/models/multilingual-e5-small-" in done.stdout, "the default model was not published"
    report = head / "eval-default"
    run_ok(cluster, [RAYSYS, "eval", *args, "--model", model, "--out", str(report), "--datasets",
                     str(head / "data" / "xquad-r")])
    shutil.copytree(head / "data", tmp_path / "head" / "data")
    local_args = [a.replace(str(head), str(tmp_path / "head")) for a in args]
    assert json.dumps(summaries(report), sort_keys=True) == json.dumps(
        single_node_eval(model, tmp_path / "eval-local", local_args, cluster.s3.env, tmp_path / "cache"),
        sort_keys=True)


def test_tune_trials_run_on_other_nodes(cluster):
    """Two trials of one 2-CPU worker each: each needs a whole node, and each trial's driver resolves
    the model and the data that only the head has, from storage."""
    args = tiny_args(cluster, "sweep", cluster.s3.uri("tune"), "tune.alphas=[0.0,1.0]", "tune.asha=false",
                     "train.num_workers=1", "train.cpus_per_worker=2", "train.max_steps=2", "train.eval_every=2",
                     "train.checkpoint_every=2", "train.global_batch_size=4")
    run_ok(cluster, [RAYSYS, "tune", *args])
    report = json.loads(next((cluster.head_dir / "outputs").rglob("sweep.json")).read_text())
    trials = report["trials"]
    assert len(trials) == 2 and all(t["status"] == "ok" for t in trials), trials
    assert all(t["val_map_mean"] is not None for t in trials)


def test_reproduce_on_the_cluster_reuses_finished_runs_from_s3(cluster):
    """The three arms train on the workers with storage in S3; a rerun finds every finished run
    there (reproduce's run lookup goes through the storage layer) and trains nothing again."""
    args = tiny_args(cluster, "repro", cluster.s3.uri("repro"), *ONE_WORKER_PER_NODE, "train.max_steps=2",
                     "train.checkpoint_every=2", "train.eval_every=2", "eval.bootstrap_samples=50")
    first = run_ok(cluster, [RAYSYS, "reproduce", *args, "--seeds", "0"])
    assert first.stdout.count("reusing the finished run") == 0
    again = run_ok(cluster, [RAYSYS, "reproduce", *args, "--seeds", "0"])
    assert again.stdout.count("reusing the finished run s3://") == 3, again.stdout[-3000:]
    table = (cluster.head_dir / "outputs" / "repro-reproduce" / "comparison.md").read_text()
    assert "hybrid (alpha=0.5)" in table and "X-Y (alpha=0)" in table


def test_job_submit_with_the_shipped_cpu_runtime_env(cluster):
    env = cluster.driver_env(cluster.base_env)
    env.pop("RAY_ADDRESS")
    entry = [str(Path(sys.executable)), "jobs/train.py",
             *tiny_args(cluster, "job", cluster.s3.uri("job"), *ONE_WORKER_PER_NODE, "train.max_steps=2",
                        "train.checkpoint_every=2", "train.eval_every=2")]
    done = subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "submit", "--address",
                           cluster.dashboard, "--working-dir", str(REPO_ROOT), "--runtime-env",
                           str(REPO_ROOT / "cluster" / "runtime_env_cpu.yaml"), "--", *entry],
                          env=env, capture_output=True, text=True, timeout=900, cwd=REPO_ROOT)
    assert done.returncode == 0 and "succeeded" in done.stdout.lower(), done.stdout[-4000:] + done.stderr[-3000:]
    assert "exported model:   s3://" in done.stdout


def test_misconfigured_cluster_fails_in_one_line(cluster):
    private = cluster.head_dir / "private-runs"  # a local path on the driver's machine only
    done = cluster.run_driver([RAYSYS, "train", *tiny_args(cluster, "bad", str(private), "train.max_steps=1")],
                              env=cluster.base_env, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    error = last_own_line(done.stderr)
    assert "do not see" in error and "train.storage_path" in error and str(private) in error

    env = {**cluster.base_env, "RAY_AUTH_MODE": ""}
    started = time.time()
    no_auth = subprocess.run([RAYSYS, "train", "train.max_steps=1"],
                             env={k: v for k, v in cluster.driver_env(env).items() if k != "RAY_AUTH_MODE"},
                             cwd=cluster.head_dir, capture_output=True, text=True, timeout=120)
    assert no_auth.returncode == 2 and time.time() - started < 60
    assert "RAY_AUTH_MODE=token" in last_own_line(no_auth.stderr)


def test_losing_a_node_mid_run_finishes_from_the_last_checkpoint(cluster, s3_env):
    """SIGKILL the raylet of a node that hosts a training worker after the first checkpoint: Ray
    Train restarts the worker group on the two nodes left and the run finishes every step."""
    store = cluster.s3.uri("runs-kill")
    args = tiny_args(cluster, "kill", store, *ONE_WORKER_PER_NODE, "train.max_steps=12",
                     "train.checkpoint_every=2", "train.eval_every=2", "train.max_failures=3")
    log = cluster.base / "kill-driver.log"
    driver = cluster.popen_driver([RAYSYS, "train", *args], env=cluster.base_env, log=log)
    try:
        deadline = time.time() + 600
        # Find the workers' nodes first (a query takes many seconds on 2 loaded cores; the steps after
        # the first checkpoint take fewer), then kill one the moment the first checkpoint is stored.
        hosts: list[int] = []
        while not hosts:
            assert driver.poll() is None, log.read_text()[-4000:]
            assert time.time() < deadline, "no training worker on any worker node in 10 minutes"
            hosts = cluster.nodes_running("RayTrainWorker")
        # A checkpoint directory appears when its upload starts: wait until one is complete (every
        # rank's manifest), and a moment for Ray Train to register it, so the restart restores it.
        while not any(complete_checkpoints(storage.join(store, run)) for run in storage.list_dirs(store)):
            assert driver.poll() is None, log.read_text()[-4000:]
            assert time.time() < deadline, "no complete checkpoint in 10 minutes"
            time.sleep(0.5)
        time.sleep(3)
        cluster.kill_node(hosts[0])
        assert driver.wait(timeout=900) == 0, log.read_text()[-5000:]
    finally:
        if driver.poll() is None:
            driver.kill()
    output = log.read_text()
    state = read_state(printed(output, "final checkpoint:"))
    assert state["global_step"] == 12 and state["restores"] >= 1, state
