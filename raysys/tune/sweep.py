"""Ray Tune over the mono/cross mixing ratio alpha (and optionally lr and temperature).

Train V2 interop: a function trainable per trial builds and fits its own TorchTrainer, whose
reports reach Tune through `TuneReportCallback`. Each trial validates retrieval in all three
settings on the validation articles (`val_map_mean` = mean of mono, cross, multi mAP), which
ASHA uses to stop weak trials early. The evaluation articles are never seen by the sweep.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import ray
from ray import tune

from raysys.config import Config
from raysys.errors import ConfigError

RESULT_COLUMNS = ("alpha", "lr", "temperature", "val_map_mono", "val_map_cross", "val_map_multi",
                  "val_map_mean", "val_rank_distance", "val_loss", "step")
TRIAL_DRIVER_CPU = 0.01  # the trial function only drives its TorchTrainer


def trial_config(params: dict) -> Config:
    """The base config with this trial's alpha / lr / temperature, set up for Tune reporting."""
    raw = json.loads(json.dumps(params["base"]))
    for key in ("alpha", "lr", "temperature"):
        if key in params:
            raw["train"][key] = float(params[key])
    t = raw["train"]
    t["val_retrieval"] = True
    # Every report must carry the metric Tune schedules on: report only at validation steps.
    t["log_every"] = t["eval_every"]
    t["checkpoint_every"] = max(t["checkpoint_every"] // t["eval_every"], 1) * t["eval_every"]
    config = Config.from_dict(raw)
    config.validate()
    return config


def train_trial(params: dict) -> None:
    from ray.tune.integration.ray_train import TuneReportCallback

    from raysys.train.run import train

    config = trial_config(params)
    config.name = f"trial-{tune.get_context().get_trial_id()}"
    train(config, callbacks=[TuneReportCallback()])


def max_concurrent_trials(config: Config) -> int:
    """As many trials as the cluster's CPUs (and GPUs) hold at once, at least one."""
    t, resources = config.train, ray.cluster_resources()
    per_trial_cpu = t.num_workers * t.cpus_per_worker + TRIAL_DRIVER_CPU
    fits = math.floor(resources.get("CPU", 1) / per_trial_cpu)
    if t.use_gpu:
        fits = min(fits, math.floor(resources.get("GPU", 0) / t.num_workers))
    return max(1, fits)


def param_space(config: Config) -> dict:
    s = config.tune
    space: dict = {"base": config.to_dict()}
    space["alpha"] = tune.grid_search(list(s.alphas)) if s.alphas else tune.uniform(0.0, 1.0)
    if s.lrs:
        space["lr"] = tune.grid_search(list(s.lrs))
    if s.temperatures:
        space["temperature"] = tune.grid_search(list(s.temperatures))
    return space


def absolute_paths(config: Config) -> Config:
    """Trials run with the trial directory as working directory: make local paths absolute."""
    raw = config.to_dict()
    raw["output_dir"] = str(Path(raw["output_dir"]).resolve())
    for section, key in (("data", "train"), ("data", "source_dir"), ("model", "name_or_path")):
        value = raw[section][key]
        if value and Path(value).exists():
            raw[section][key] = str(Path(value).resolve())
    if raw["train"]["storage_path"] and "://" not in raw["train"]["storage_path"]:
        raw["train"]["storage_path"] = str(Path(raw["train"]["storage_path"]).resolve())
    return Config.from_dict(raw)


def distribute_inputs(config: Config) -> Config:
    """Trials run on any node: resolve the model and the training data here, once, and give the
    trials URIs that every node can load (on one node this changes nothing)."""
    from raysys.artifacts import distribute_dataset, distribute_model
    from raysys.data.prepare import resolve_dataset
    from raysys.model.default import resolve_model_path

    raw = config.to_dict()
    raw["model"]["name_or_path"] = distribute_model(resolve_model_path(config.model.name_or_path), config)
    raw["data"]["train"] = str(distribute_dataset(str(resolve_dataset(config.data.train, config.data.source_dir)),
                                                  config))
    return Config.from_dict(raw)


@dataclass
class SweepOutcome:
    rows: list[dict]
    best: dict
    out_dir: Path


def run_sweep(config: Config) -> SweepOutcome:
    from raysys.runtime import ensure_ray
    from raysys.train.run import storage_dir

    s, t = config.tune, config.train
    if s.mode not in ("min", "max"):
        raise ConfigError(f"tune.mode={s.mode!r}: must be min or max")
    ensure_ray()
    config = distribute_inputs(absolute_paths(config))
    from raysys.train.datasets import prepare_corpus

    # Once, before the trials: they find it by its fingerprint instead of each bucketing the data
    # (concurrently) themselves. Trials on other nodes see the data under another local path and
    # bucket it once per node.
    prepare_corpus(config)
    storage = storage_dir(config)
    horizon = t.max_steps or 10**9
    scheduler = (tune.schedulers.ASHAScheduler(time_attr="step", max_t=horizon, grace_period=t.eval_every,
                                               reduction_factor=2) if s.asha else None)
    tuner = tune.Tuner(
        tune.with_resources(train_trial, {"CPU": TRIAL_DRIVER_CPU}),
        param_space=param_space(config),
        tune_config=tune.TuneConfig(metric=s.metric, mode=s.mode, scheduler=scheduler, num_samples=s.num_samples,
                                    max_concurrent_trials=s.max_concurrent_trials or max_concurrent_trials(config)),
        run_config=tune.RunConfig(name=f"{config.name}-sweep", storage_path=storage,
                                  failure_config=tune.FailureConfig(max_failures=s.trial_max_failures)),
    )
    grid = tuner.fit()
    rows = []
    for result in grid:
        m = result.metrics or {}
        params = result.config or {}
        row = {"trial": Path(result.path).name, "status": "error" if result.error else "ok",
               "alpha": params.get("alpha"), "lr": params.get("lr", t.lr),
               "temperature": params.get("temperature", t.temperature),
               **{k: m.get(k) for k in RESULT_COLUMNS if k not in ("alpha", "lr", "temperature")},
               "checkpoint": m.get("checkpoint_path"), "error": str(result.error) if result.error else None}
        rows.append(row)
    scored = [r for r in rows if r.get(s.metric) is not None]
    if not scored:
        raise ConfigError(f"no trial reported {s.metric}; see the trial errors in {storage}")
    best = (max if s.mode == "max" else min)(scored, key=lambda r: r[s.metric])
    out_dir = Path(config.output_dir) / f"{config.name}-sweep"
    from raysys.tune.sweep_report import write_sweep_report

    write_sweep_report(rows, best, out_dir, metric=s.metric)
    return SweepOutcome(rows=rows, best=best, out_dir=out_dir)
