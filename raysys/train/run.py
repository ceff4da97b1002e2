"""Driver: build the TorchTrainer (scaling, run, checkpoint and failure configs) and fit it."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from raysys import storage
from raysys.artifacts import distribute_model, storage_root
from raysys.config import Config
from raysys.console import train_logging_config
from raysys.model.default import resolve_model_path
from raysys.model.encoder import check_model
from raysys.runtime import ensure_ray
from raysys.train.datasets import compute_facts, facts_to_dict, prepare_corpus
from raysys.train.checkpoint import EXPORT_DIR, checkpoint_uri, read_state
from raysys.train.host_memory import worker_env_vars
from raysys.train.loop import train_loop_per_worker
from raysys.train.preflight import preflight
from raysys.train.selection import score_order, selected_checkpoint


@dataclass
class TrainOutcome:
    checkpoint_path: str  # the selected checkpoint (the final one, or the best): DeepSpeed shards + state + export
    model_path: str  # the exported HF / sentence-transformers directory
    metrics: dict
    run_path: str


def run_name(config: Config) -> str:
    """A fresh run directory per invocation: Ray Train resumes any run whose name it finds in
    storage, which would silently skip training after a config change. Resuming is explicit
    (`train.resume_from`); set RAYSYS_RUN_NAME to pin the name (e.g. for Ray job retries)."""
    return os.environ.get("RAYSYS_RUN_NAME") or f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def storage_dir(config: Config) -> str:
    """Where Ray Train writes run directories: train.storage_path (s3://, gs://, NFS) or <output_dir>/ray."""
    return storage_root(config)


def ray_storage(uri: str) -> dict:
    """RunConfig arguments for a storage URI: a remote one goes through raysys.storage's filesystem
    (so AWS_ENDPOINT_URL and friends apply to Ray Train exactly as to everything else)."""
    if not storage.is_remote(uri):
        return {"storage_path": uri}
    filesystem, path = storage.resolve(uri)
    return {"storage_path": path, "storage_filesystem": filesystem}


def build_trainer(config: Config, *, callbacks: list | None = None,
                  train_loop: Callable[[dict], None] = train_loop_per_worker) -> TorchTrainer:
    """The TorchTrainer for `config`; `train_loop` is the per-worker function (tests wrap it)."""
    t = config.train
    root = storage_dir(config)
    if storage.is_remote(root):
        storage.check_writable(root, "train.storage_path")  # unreachable / no credentials: one line, now
    corpus_uri, manifest = prepare_corpus(config)  # bucketed once by parallel id; reused when unchanged
    facts = facts_to_dict(compute_facts(manifest, config, source=config.data.train))
    facts["splits"] = sorted(manifest["splits"])
    model_path = resolve_model_path(config.model.name_or_path)  # build the default model once, here
    check_model(model_path)  # a bad model path fails in the driver with one line
    preflight(config, facts, model_path)  # config values the workers would fail on: one line, here
    # A URI every node can load on a multi-node cluster (a stored model as given); else the local path.
    name = config.model.name_or_path
    model_ref = name if storage.is_remote(name) else distribute_model(model_path, config)
    resources = {"CPU": t.cpus_per_worker}
    if t.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop,
        train_loop_config={"config": config.to_dict(), "facts": facts, "model_path": model_ref,
                           "corpus": corpus_uri, "manifest": manifest, "resume_from": t.resume_from, "storage_root": root},
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name(config), callbacks=callbacks, **ray_storage(root),
            logging_config=train_logging_config(),  # Ray Train's INFO lines only with --verbose
            worker_runtime_env={"env_vars": worker_env_vars(t)},  # merged into the job's runtime_env
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints,
                                               checkpoint_score_attribute=t.metric_for_best_model,
                                               checkpoint_score_order=score_order(t.metric_for_best_model)),
            failure_config=FailureConfig(max_failures=t.max_failures)),
    )


def train(config: Config, *, callbacks: list | None = None,
          train_loop: Callable[[dict], None] = train_loop_per_worker) -> TrainOutcome:
    ensure_ray()  # Ray Data needs Ray even for local files; data errors still come first (driver side)
    result = build_trainer(config, callbacks=callbacks, train_loop=train_loop).fit()
    if result.error:
        raise result.error
    # With its scheme (s3://bucket/run/checkpoint_x); the best one's under train.export_best_model.
    final = checkpoint_uri(result.checkpoint)
    checkpoint = selected_checkpoint(final, config.train.export_best_model)
    metrics = dict(result.metrics or {}) if checkpoint == final else read_state(checkpoint)["metrics"]
    run_path = storage.to_uri(getattr(result, "filesystem", None), result.path)
    return TrainOutcome(checkpoint_path=checkpoint, model_path=run_model(config, checkpoint, run_path),
                        metrics=metrics, run_path=run_path)


def run_model(config: Config, checkpoint: str, run_path: str) -> str:
    """The run's model: the checkpoint's export, or its interpolation with the initial model
    (train.interpolate_weights), written beside the checkpoints."""
    model = storage.join(checkpoint, EXPORT_DIR)
    if not config.train.interpolate_weights:
        return model
    from raysys.tune.interpolation import interpolate_with_initial

    return interpolate_with_initial(model, config, storage.join(run_path, "interpolation"))
