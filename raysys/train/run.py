"""Driver: build the TorchTrainer (scaling, run, checkpoint and failure configs) and fit it."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from raysys.config import Config
from raysys.model.default import resolve_model_path
from raysys.model.encoder import check_model
from raysys.runtime import ensure_ray
from raysys.train.datasets import compute_facts, facts_to_dict, load_split_datasets
from raysys.train.checkpoint import EXPORT_DIR, STATE_FILE
from raysys.train.host_memory import worker_env_vars
from raysys.train.loop import train_loop_per_worker


@dataclass
class TrainOutcome:
    checkpoint_path: str  # the final checkpoint (DeepSpeed shards + state + exported model)
    model_path: str  # the exported HF / sentence-transformers directory
    metrics: dict
    run_path: str


def run_name(config: Config) -> str:
    """A fresh run directory per invocation: Ray Train resumes any run whose name it finds in
    storage, which would silently skip training after a config change. Resuming is explicit
    (`train.resume_from`); set RAYSYS_RUN_NAME to pin the name (e.g. for Ray job retries)."""
    return os.environ.get("RAYSYS_RUN_NAME") or f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def storage_dir(config: Config) -> str:
    """Where Ray Train writes run directories: train.storage_path (s3://, NFS) or <output_dir>/ray."""
    return config.train.storage_path or str(Path(config.output_dir, "ray").resolve())


def build_trainer(config: Config, *, callbacks: list | None = None) -> TorchTrainer:
    t = config.train
    datasets = load_split_datasets(config)
    facts = facts_to_dict(compute_facts(datasets["train"], config, source=config.data.train))
    facts["splits"] = sorted(datasets)
    model_path = resolve_model_path(config.model.name_or_path)  # build the default model once, here
    check_model(model_path)  # a bad model path fails in the driver with one line
    storage = storage_dir(config)
    resources = {"CPU": t.cpus_per_worker}
    if t.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.to_dict(), "facts": facts, "model_path": str(model_path),
                           "resume_from": t.resume_from,
                           # Fault injection for reliability tests: SIGKILL rank 1 once after this step.
                           "crash_after_step": int(os.environ.get("RAYSYS_FAULT_CRASH_AFTER_STEP", 0))},
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name(config), storage_path=storage, callbacks=callbacks,
            worker_runtime_env={"env_vars": worker_env_vars(t)},  # merged into the job's runtime_env
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints, checkpoint_score_attribute="val_loss",
                                               checkpoint_score_order="min"),
            failure_config=FailureConfig(max_failures=t.max_failures)),
        datasets=datasets,
        # Every worker streams the whole dataset and keeps the parallel ids that hash to it
        # (see raysys.train.datasets.rows_for_rank): deterministic, language versions together.
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )


def train(config: Config, *, callbacks: list | None = None) -> TrainOutcome:
    ensure_ray()  # Ray Data needs Ray even for local files; data errors still come first (driver side)
    result = build_trainer(config, callbacks=callbacks).fit()
    if result.error:
        raise result.error
    checkpoint_path = result.checkpoint.path
    return TrainOutcome(checkpoint_path=checkpoint_path, model_path=str(Path(checkpoint_path) / EXPORT_DIR),
                        metrics=dict(result.metrics or {}), run_path=result.path)


def find_state(checkpoint_dir: str | os.PathLike) -> Path:
    return Path(checkpoint_dir) / STATE_FILE
