"""The rules a Config must satisfy (`Config.validate`): each refusal names the key, where it was
set and what to use instead, so a bad value fails on the driver, not later inside every worker."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from raysys.errors import ConfigError

if TYPE_CHECKING:
    from raysys.config import Config, TrainConfig


def check(config: "Config", fail: Callable[..., ConfigError]) -> None:
    """Raise `fail(key, message, hint)` for the first value that is out of range or unknown."""
    if config.seed < 0:  # numpy's seed sequences (the batch schedule, in every worker) refuse it
        raise fail("seed", f"{config.seed} is negative", "use 0 or a positive integer")
    check_train(config.train, fail)
    check_data_and_model(config, fail)
    check_eval_and_tune(config, fail)


def check_train(t: "TrainConfig", fail: Callable[..., ConfigError]) -> None:
    if not 0.0 <= t.alpha <= 1.0:
        raise fail("train.alpha", f"{t.alpha} is outside [0, 1]",
                   "set it between 0 = cross-lingual batches only and 1 = monolingual batches only")
    if t.global_batch_size < 2:
        raise fail("train.global_batch_size", f"{t.global_batch_size} is below 2",
                   "in-batch negatives need at least 2 pairs per batch")
    if t.num_workers < 1:
        raise fail("train.num_workers", f"{t.num_workers} is below 1", "use 1 or more workers")
    if t.global_batch_size % t.num_workers:
        raise fail("train.global_batch_size", f"{t.global_batch_size} is not a multiple of "
                   f"train.num_workers={t.num_workers}", "every worker takes an equal share of a batch")
    if t.zero_stage not in (0, 1, 2, 3):
        raise fail("train.zero_stage", f"{t.zero_stage} is not a DeepSpeed ZeRO stage", "use 0, 1, 2 or 3")
    if t.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise fail("train.precision", f"unknown precision {t.precision!r}", "use auto, fp32, bf16 or fp16")
    if not t.temperature > 0:
        raise fail("train.temperature", f"{t.temperature} is not positive", "e.g. 0.05")
    if not t.distill_weight >= 0:
        raise fail("train.distill_weight", f"{t.distill_weight} is negative", "use 0 (off) or a positive weight")
    if t.distill_temperature is not None and not t.distill_temperature > 0:
        raise fail("train.distill_temperature", f"{t.distill_temperature} is not positive",
                   "e.g. 0.05, or null for train.temperature")
    for key in ("epochs", "gradient_accumulation_steps", "checkpoint_every", "eval_every", "log_every",
                "keep_checkpoints", "torch_threads"):
        if getattr(t, key) < 1:
            raise fail(f"train.{key}", f"{getattr(t, key)} is below 1", "use a positive integer")
    if t.max_steps is not None and t.max_steps < 1:
        raise fail("train.max_steps", f"{t.max_steps} is below 1",
                   "use a positive integer, or null for full epochs")
    if t.hard_negatives_per_pair < 1:
        raise fail("train.hard_negatives_per_pair", f"{t.hard_negatives_per_pair} is below 1",
                   "set train.use_hard_negatives=false to train without them")
    from raysys.data.hybrid import CROSS_LINGUAL_NEGATIVES

    if t.cross_lingual_negatives not in CROSS_LINGUAL_NEGATIVES:
        raise fail("train.cross_lingual_negatives", f"unknown choice {t.cross_lingual_negatives!r}",
                   f"choose from {', '.join(CROSS_LINGUAL_NEGATIVES)}")
    if t.mini_batch_size is not None and t.mini_batch_size < 1:
        raise fail("train.mini_batch_size", f"{t.mini_batch_size} is below 1",
                   "use a positive number of pairs, e.g. 32, or null for no gradient caching")
    if t.length_groups < 1:
        raise fail("train.length_groups", f"{t.length_groups} is below 1",
                   "use 1 for one forward per batch, or e.g. 4 groups of similar length")
    if t.max_failures < 0:
        raise fail("train.max_failures", f"{t.max_failures} is negative", "use 0 or more")
    if not t.lr > 0:
        raise fail("train.lr", f"{t.lr} is not positive", "e.g. 3e-5")
    if not 0.0 <= t.warmup_ratio < 1.0:
        raise fail("train.warmup_ratio", f"{t.warmup_ratio} is outside [0, 1)",
                   "use 0 for no warmup, or a fraction of the optimizer steps such as 0.1")
    if t.lr_decay not in ("linear", "constant"):
        raise fail("train.lr_decay", f"unknown LR decay {t.lr_decay!r}", "use linear or constant")
    if t.gradient_clipping < 0:
        raise fail("train.gradient_clipping", f"{t.gradient_clipping} is negative", "use 0 to turn clipping off")
    if t.weight_decay < 0:  # torch's AdamW would refuse it inside every worker
        raise fail("train.weight_decay", f"{t.weight_decay} is negative", "use 0 or more, e.g. 0.01")
    if t.cpus_per_worker < 0:
        raise fail("train.cpus_per_worker", f"{t.cpus_per_worker} is negative", "use 0 or more, e.g. 0.5")
    from raysys.train.selection import SELECTION_METRICS

    if t.metric_for_best_model not in SELECTION_METRICS:
        raise fail("train.metric_for_best_model", f"unknown validation metric {t.metric_for_best_model!r}",
                   f"use one of {', '.join(SELECTION_METRICS)}")
    for weight in t.interpolate_weights or []:
        if not 0.0 <= weight <= 1.0:
            raise fail("train.interpolate_weights", f"weight {weight} is outside [0, 1]",
                       "0 is the initial model, 1 the trained one, e.g. [0.5, 0.75, 1]")
    from raysys.train.selection import INTERPOLATION_RULES

    if t.interpolate_rule not in INTERPOLATION_RULES:
        raise fail("train.interpolate_rule", f"unknown rule {t.interpolate_rule!r}",
                   f"use one of {', '.join(INTERPOLATION_RULES)}")
    if t.early_stopping_patience is not None and t.early_stopping_patience < 1:
        raise fail("train.early_stopping_patience", f"{t.early_stopping_patience} is below 1",
                   "use a positive number of evaluations, or null for no early stopping")
    if t.logger not in (None, "tensorboard", "mlflow"):
        raise fail("train.logger", f"unknown logger {t.logger!r}", "use tensorboard, mlflow or null")


def check_data_and_model(config: "Config", fail: Callable[..., ConfigError]) -> None:
    if config.data.hard_negatives not in (None, "paragraph"):
        raise fail("data.hard_negatives", f"unknown source {config.data.hard_negatives!r}",
                   "use paragraph (LAReQA data: another sentence of the gold paragraph) or null")
    if config.model.pooling not in ("mean", "cls"):
        raise fail("model.pooling", f"unknown pooling {config.model.pooling!r}", "use mean or cls")
    for key in ("max_query_length", "max_passage_length"):
        if getattr(config.model, key) < 1:
            raise fail(f"model.{key}", f"{getattr(config.model, key)} is below 1", "use a positive token count")
    d = config.data
    for key in ("validation_fraction", "test_fraction"):
        if not 0 <= getattr(d, key) < 1:
            raise fail(f"data.{key}", f"{getattr(d, key)} is outside [0, 1)", "use a fraction such as 0.1")
    if d.validation_fraction + d.test_fraction >= 1:
        raise fail("data.test_fraction", f"data.validation_fraction + data.test_fraction = "
                   f"{d.validation_fraction + d.test_fraction} leaves nothing to train on", "keep the sum below 1")
    if d.split_rule not in ("auto", "order", "hash"):
        raise fail("data.split_rule", f"unknown rule {d.split_rule!r}", "use auto, order or hash")
    if d.worker_buffer_rows < 1:
        raise fail("data.worker_buffer_rows", f"{d.worker_buffer_rows} is below 1", "use e.g. 200000")
    if d.num_buckets < 1:
        raise fail("data.num_buckets", f"{d.num_buckets} is below 1", "use e.g. 256 (more buckets than workers)")
    if d.languages is not None:
        from raysys.data.languages import normalize_language

        for code in d.languages:
            if normalize_language(code) is None:
                raise fail("data.languages", f"unknown language code {code!r}",
                           "use ISO 639-1 codes such as en, de, zh")


def check_eval_and_tune(config: "Config", fail: Callable[..., ConfigError]) -> None:
    e = config.eval
    if e.split not in ("auto", "test", "validation", "all"):
        raise fail("eval.split", f"unknown split {e.split!r}", "use auto, test, validation or all")
    if e.in_process_max_candidates < 0:
        raise fail("eval.in_process_max_candidates", f"{e.in_process_max_candidates} is negative",
                   "use 0 (always index-shard actors) or a candidate count")
    for key in ("batch_tokens", "num_encoders", "num_shards", "top_k", "max_length", "ann_recall_queries"):
        if getattr(e, key) is not None and getattr(e, key) < 1:
            raise fail(f"eval.{key}", f"{getattr(e, key)} is below 1", "use a positive integer")
    if e.fast_path not in (None, "bf16", "int8"):
        raise fail("eval.fast_path", f"unknown fast path {e.fast_path!r}", "use bf16, int8 or null (exact fp32)")
    if e.index_dtype not in ("fp32", "fp16"):
        raise fail("eval.index_dtype", f"unknown storage {e.index_dtype!r}", "use fp32 or fp16")
    if e.index_dtype == "fp16" and e.ann_index:
        raise fail("eval.index_dtype", "fp16 applies to the exact shards, not to eval.ann_index",
                   "name the approximate index's storage in eval.ann_index, e.g. 'IVF4096,SQfp16'")
    for alpha in config.tune.alphas:
        if not 0.0 <= alpha <= 1.0:
            raise fail("tune.alphas", f"alpha {alpha} is outside [0, 1]", "every alpha must lie in [0, 1]")
