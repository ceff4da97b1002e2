"""Freed host memory is reused by CPU training workers instead of being faulted in again each step."""

import json
import os
import subprocess
import sys

import pytest

from raysys.config import Config
from raysys.train.host_memory import REUSE_FREED_MEMORY_ENV, worker_env_vars

# Runs in a non-main thread, as Ray Train runs train_loop_per_worker: "steps" that each allocate,
# touch and free tensors larger than a glibc thread-arena heap (64 MiB), like a training step's
# gradients and activations; counts the minor page faults of each step.
MEASURE = r"""
import resource, torch
def measure(out, steps=16):
    out["faults"] = []  # minor page faults per step
    for _ in range(steps):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        a, b = torch.ones(96 << 18), torch.ones(256 << 18)  # 96 MiB and 256 MiB of float32
        (a.sum() + b.sum()).item()
        del a, b
        out["faults"].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    out["pages"] = ((96 + 256) << 20) // resource.getpagesize()
"""


def fewest_faults(out: dict) -> float:
    """The fewest faults of the last 8 steps, as a fraction of the pages a step touches. glibc's
    placements can creep for a few steps in a heap that earlier work fragmented, so this asks
    whether steps reuse memory at all, not how soon."""
    return min(out["faults"][-8:]) / out["pages"]


FAULTS_IN_A_THREAD = MEASURE + r"""
import json, threading
out = {}
thread = threading.Thread(target=measure, args=(out,))
thread.start(); thread.join()
print(json.dumps(out))
"""


def faults_in_a_thread(env_vars: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(env_vars)
    result = subprocess.run([sys.executable, "-c", FAULTS_IN_A_THREAD], env=env, capture_output=True, text=True,
                            check=True, timeout=120)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_default_is_cpu_workers_at_zero_stage_0_and_an_explicit_value_wins():
    def env(*overrides):
        return worker_env_vars(Config.from_yaml(None, list(overrides)).train)

    assert env() == REUSE_FREED_MEMORY_ENV  # CPU, ZeRO 0
    assert env("train.use_gpu=true") == {}
    assert env("train.zero_stage=2") == {}  # ZeRO is chosen to save memory; kept memory would spend it
    assert env("train.zero_stage=2", "train.reuse_freed_memory=true") == REUSE_FREED_MEMORY_ENV
    assert env("train.reuse_freed_memory=false") == {}


def test_settings_turn_per_step_page_faults_into_reuse():
    default = faults_in_a_thread({})
    reused = faults_in_a_thread(REUSE_FREED_MEMORY_ENV)
    # glibc's default in a thread: each block is mmap'ed and unmapped on free, so every page faults again.
    assert fewest_faults(default) > 0.9, default
    assert fewest_faults(reused) < 0.1, reused


@pytest.mark.timeout(300)
def test_ray_train_workers_run_with_the_settings(ray_local, tmp_path):
    """The same measurement inside a real Ray Train worker, configured as raysys.train.run does."""
    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raysys.runtime import WORKER_ENV

    out_file = tmp_path / "faults.json"

    def loop(_):
        namespace: dict = {}
        exec(MEASURE, namespace)
        out = {"env": {k: os.environ.get(k) for k in REUSE_FREED_MEMORY_ENV},
               "job_env": {k: os.environ.get(k) for k in WORKER_ENV}}
        namespace["measure"](out)  # in the thread Ray Train runs this loop in
        out_file.write_text(json.dumps(out))

    train_config = Config.from_yaml(None, []).train
    trainer = TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
                           run_config=RunConfig(name="host-memory", storage_path=str(tmp_path / "ray"),
                                                worker_runtime_env={"env_vars": worker_env_vars(train_config)}))
    assert trainer.fit().error is None
    out = json.loads(out_file.read_text())
    assert out["env"] == REUSE_FREED_MEMORY_ENV
    assert out["job_env"] == WORKER_ENV  # merged with the job's runtime_env (ray_local), not replacing it
    assert fewest_faults(out) < 0.1, out


def test_build_trainer_passes_the_settings_to_the_workers(tmp_path, tiny_model_dir, xquad_r_dir):
    from raysys.train.run import build_trainer

    config = Config.from_yaml(None, [f"model.name_or_path={tiny_model_dir}", f"data.train={xquad_r_dir}",
                                     "data.languages=[de,en]", f"output_dir={tmp_path}"])
    trainer = build_trainer(config)
    assert trainer.run_config.worker_runtime_env["env_vars"] == REUSE_FREED_MEMORY_ENV
