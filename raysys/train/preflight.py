"""Driver-side checks of the config against the data facts and the model, before any worker starts.

Config.validate() checks each value on its own; these need the data (how many parallel ids each
worker's shard holds, hence the steps per epoch) or the model. Each would otherwise fail inside
every Ray Train worker after Ray, the data and DeepSpeed have started; here it is one located
ConfigError (or the RaysysError of a bad resume_from).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from raysys.config import Config, TrainConfig

# Models whose position ids start after the padding index (RoBERTa's convention): pad_token_id + 1
# rows of the position table are never used for tokens.
PADDING_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer", "mpnet")


def preflight(config: Config, facts: dict, model_path: str | Path) -> int:
    """Fail now, in the driver, on anything the workers would fail on; returns the optimizer steps."""
    check_shards(config, facts)
    total = total_optimizer_steps(config, facts)
    check_precision(config)
    check_logger(config)
    check_selection(config, facts)
    check_lengths(config, model_path)
    check_resume(config, total)
    return total


def steps_per_epoch(config: Config, facts: dict) -> int:
    """Hybrid batches (micro-steps) per epoch: the fewest any worker's shard can fill, as the loop computes."""
    local = config.train.global_batch_size // config.train.num_workers
    return min(shard["ids"] // local for shard in facts["shards"])


def optimizer_steps(train: TrainConfig, steps_per_epoch: int) -> int:
    """The loop's total: whole optimizer steps in `epochs` epochs, capped by max_steps."""
    total = train.epochs * steps_per_epoch // train.gradient_accumulation_steps
    return min(train.max_steps, total) if train.max_steps is not None else total


def total_optimizer_steps(config: Config, facts: dict) -> int:
    t = config.train
    per_epoch = steps_per_epoch(config, facts)
    total = optimizer_steps(t, per_epoch)
    if total < 1:
        raise config._fail("train.gradient_accumulation_steps",
                           f"{t.gradient_accumulation_steps} hybrid batches per optimizer step, but {t.epochs} "
                           f"epoch(s) x {per_epoch} batches give only {t.epochs * per_epoch}",
                           "lower train.gradient_accumulation_steps or train.global_batch_size, or raise train.epochs")
    return total


def check_shards(config: Config, facts: dict) -> None:
    """Every worker must fill its share of each batch type from its own shard (HybridBatcher's check)."""
    t = config.train
    local, world = t.global_batch_size // t.num_workers, t.num_workers
    hint = "lower train.global_batch_size or train.num_workers (parallel ids are split between workers by a hash)"
    for rank, shard in enumerate(facts["shards"]):
        if shard["ids"] == 0:
            raise config._fail("train.num_workers", f"worker {rank} of {world} gets no parallel ids", hint)
        if t.alpha > 0:
            for lang in facts["languages"]:
                n = shard["ids_per_language"].get(lang, 0)
                if n < local:
                    raise config._fail("train.global_batch_size",
                                       f"{t.global_batch_size} pairs over {world} workers need {local} parallel ids "
                                       f"in '{lang}' on each worker for monolingual batches, but worker {rank} "
                                       f"gets {n}", hint + ", or drop the language via data.languages")
        if t.alpha < 1 and shard["multilingual_ids"] < local:
            raise config._fail("train.global_batch_size",
                               f"{t.global_batch_size} pairs over {world} workers need {local} parallel ids in two "
                               f"or more languages on each worker for cross-lingual batches, but worker {rank} "
                               f"gets {shard['multilingual_ids']}", hint + ", or set train.alpha=1")


def check_precision(config: Config) -> None:
    t = config.train
    if t.precision != "fp16" or t.use_gpu:
        return
    import torch

    # DeepSpeed's CPU accelerator refuses fp16 unless oneDNN has fp16 kernels for this CPU.
    if not torch.ops.mkldnn._is_mkldnn_fp16_supported():
        raise config._fail("train.precision", "fp16 is not supported on CPU workers here",
                           "use bf16 or fp32 on CPU, or train.use_gpu=true")


def check_logger(config: Config) -> None:
    if config.train.logger == "mlflow" and importlib.util.find_spec("mlflow") is None:
        raise config._fail("train.logger", "mlflow is not installed", "pip install mlflow, or use tensorboard")


def check_selection(config: Config, facts: dict) -> None:
    """Selecting or stopping on a validation metric needs validation articles to compute it on."""
    from raysys.train.selection import evaluated_weights

    t = config.train
    if "validation" in facts.get("splits", ["validation"]):  # facts without splits: nothing known to check
        return
    for key, active in (("metric_for_best_model", t.metric_for_best_model != "val_loss"),
                        ("export_best_model", t.export_best_model),
                        ("early_stopping_patience", t.early_stopping_patience is not None),
                        ("interpolate_weights", len(evaluated_weights(t.interpolate_weights, t.interpolate_rule)) > 1)):
        if active:
            raise config._fail(f"train.{key}", f"train.{key} needs validation data, but this training data "
                               "has no validation split", "set data.validation_fraction above 0")


def position_limit(model_path: str | Path) -> int | None:
    """Tokens the model's position table can embed (None: no absolute position table)."""
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(str(model_path))
    positions = getattr(model_config, "max_position_embeddings", None)
    if not isinstance(positions, int):
        return None
    if model_config.model_type in PADDING_OFFSET_POSITIONS:
        positions -= (model_config.pad_token_id or 0) + 1
    return positions


def check_lengths(config: Config, model_path: str | Path) -> None:
    """Longer truncation than the position table makes the first long text crash the forward pass."""
    limit = position_limit(model_path)
    if limit is None:
        return
    for key in ("max_query_length", "max_passage_length"):
        value = getattr(config.model, key)
        if value > limit:
            raise config._fail(f"model.{key}", f"{value} tokens, but the model embeds at most {limit} positions",
                               f"use at most {limit}")


def check_resume(config: Config, total_steps: int) -> None:
    """resume_from must hold a complete checkpoint with steps left to train."""
    path = config.train.resume_from
    if not path:
        return
    from raysys.train.checkpoint import latest_checkpoint_dir, read_state

    checkpoint = latest_checkpoint_dir(str(path))  # a one-line RaysysError when missing or incomplete
    state = read_state(checkpoint)
    step = int(state["global_step"])
    # Which buckets each worker reads, and how it chunks them, decide every batch: a resumed run
    # repeats the interrupted one only with the same workers and data layout.
    trained = {"train.num_workers": state.get("world_size", config.train.num_workers),
               **{f"data.{k}": state.get("config", {}).get("data", {}).get(k, getattr(config.data, k))
                  for k in ("num_buckets", "worker_buffer_rows")}}
    for key, value in trained.items():
        section, name = key.split(".")
        if getattr(getattr(config, section), name) != value:
            raise config._fail(key, f"{checkpoint} was trained with {key}={value}; resuming with "
                               f"{getattr(getattr(config, section), name)} would give the workers other "
                               "data and other batches", f"resume with {key}={value}")
    if step >= total_steps:
        raise config._fail("train.resume_from", f"{checkpoint} is at step {step} but this run has {total_steps} "
                           "optimizer steps: nothing is left to train",
                           "raise train.max_steps (or train.epochs) above the checkpoint's step")
