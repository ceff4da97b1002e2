"""Configuration as plain dataclasses: YAML in, `key=value` overrides, dict out for Ray.

Every default lives here, in one place. `Config.to_dict()` is what Ray Train's
`train_loop_config` and Ray Tune's `param_space` receive; `Config.from_dict()` turns it back.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raysys.config_loading import Origins, apply_override, build, read_yaml
from raysys.errors import ConfigError

DEFAULT_MODEL = "default"  # the embedded multilingual-e5-small, built offline (raysys.model.default)


def cache_dir() -> Path:
    """Where raysys keeps built models and prepared datasets (override with RAYSYS_CACHE)."""
    return Path(os.environ.get("RAYSYS_CACHE", Path.home() / ".cache" / "raysys")).expanduser()


@dataclass
class DataConfig:
    # A named LAReQA dataset ("xquad-r", "mlqa-r"), a LAReQA directory, or JSONL/Parquet
    # file(s) / directory / URI with columns id, lang, query, passage.
    train: str = "xquad-r"
    # A local directory to copy a named dataset from when it is not in the cache yet.
    source_dir: str | None = None
    languages: list[str] | None = None  # None: every language found
    # Group-wise split (whole groups: LAReQA articles, a file's `group` column, default its id).
    validation_fraction: float = 0.1
    test_fraction: float = 0.15
    # auto (order for LAReQA directories: the protocol's article split; hash for files) | order (the
    # last groups in order of first appearance; files: local inputs up to 256 MiB) | hash (a stable hash of
    # the group). Training and evaluation apply the same rule; raysys.data.split.
    split_rule: str = "auto"
    # LAReQA training data: None (random in-batch negatives only) | "paragraph" (each pair also gets
    # another sentence of its gold paragraph as a hard negative: raysys.data.negatives).
    hard_negatives: str | None = None
    # The training corpus is written once as this many Parquet buckets by parallel id; worker r of W
    # reads buckets b with b % W == r. A power of two keeps every power-of-two worker count balanced.
    num_buckets: int = 256
    # Rows of its buckets a training worker holds at a time (more when one bucket is larger): its
    # memory is bounded by this, not by its share; a share that fits is held whole (same batches).
    worker_buffer_rows: int = 200_000


@dataclass
class ModelConfig:
    name_or_path: str = DEFAULT_MODEL
    pooling: str = "mean"  # mean | cls
    normalize: bool = True
    query_prefix: str = "query: "
    passage_prefix: str = "passage: "
    max_query_length: int = 64
    max_passage_length: int = 128


@dataclass
class TrainConfig:
    alpha: float = 0.5  # probability that a step's global batch is monolingual
    # Pairs per hybrid batch over all workers (the in-batch negative pool); an optimizer step
    # accumulates gradient_accumulation_steps such batches.
    global_batch_size: int = 16
    epochs: int = 2
    max_steps: int | None = 60  # stop after this many optimizer steps (None: full epochs)
    lr: float = 3e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1  # in [0, 1): share of optimizer steps that ramp the LR up linearly
    lr_decay: str = "linear"  # after warmup: linear (towards 0 at the end) | constant
    temperature: float = 0.05
    symmetric_loss: bool = False
    # Regulariser toward the initial model: on monolingual batches, add distill_weight x KL(initial
    # model's in-batch similarity distribution || the student's), at distill_temperature (None: the
    # InfoNCE temperature). Each worker holds a frozen copy of the initial model. 0: off.
    distill_weight: float = 0.0
    distill_temperature: float | None = None
    use_hard_negatives: bool = True
    gradient_accumulation_steps: int = 1
    # Gradient caching (sentence-transformers' CachedMultipleNegativesRankingLoss, GradCache): each
    # worker embeds its share of a batch this many pairs at a time, so a batch of thousands of
    # in-batch negatives needs the activation memory of one mini-batch. None: one forward per batch.
    mini_batch_size: int | None = None
    gradient_clipping: float = 1.0
    # torch's fused AdamW kernel (CPU and CUDA): no per-parameter temporaries, ~5x faster optimizer
    # step on the default model on CPU (bench/results/optimizer_step.json); false: torch's default.
    fused_optimizer: bool = True
    zero_stage: int = 0
    precision: str = "auto"  # auto (bf16 on GPUs that support it, else fp32) | fp32 | bf16 | fp16
    num_workers: int = 2
    use_gpu: bool = False
    # Ray CPUs reserved per worker; fractional leaves room for Ray Data to stream shards on small hosts.
    cpus_per_worker: float = 0.5
    torch_threads: int = 1  # per worker; oversubscription is the worst slowdown on small hosts
    # glibc keeps freed host memory for reuse instead of unmapping large tensors every step
    # (raysys.train.host_memory): ~1.3x faster CPU steps, RSS stays at its peak. None: on for CPU
    # workers at ZeRO stage 0; off on GPUs and at ZeRO >= 1 (it raised their peak RSS by 0.4-1.6 GiB/rank).
    reuse_freed_memory: bool | None = None
    checkpoint_every: int = 30  # steps; a checkpoint is also written at the end
    eval_every: int = 30  # steps between validation-loss evaluations
    val_retrieval: bool = False  # also validation mAP (mono/cross/multi) on the validation pairs
    keep_checkpoints: int = 2  # best K by metric_for_best_model (the latest is kept too)
    # Model selection, with Hugging Face Trainer's names (raysys.train.selection): the validation
    # metric that ranks checkpoints: val_loss | val_accuracy | val_map_mono | val_map_cross |
    # val_map_multi | val_map_mean | val_rank_distance (val_map_* and rank distance turn validation
    # retrieval on; loss and rank distance: lower is better).
    metric_for_best_model: str = "val_loss"
    # The run's model (its export, what eval/demo/reproduce use) is the best checkpoint's instead
    # of the last one's; an evaluation that improves the metric also writes a checkpoint.
    export_best_model: bool = False
    early_stopping_patience: int | None = None  # stop after this many evaluations without improvement
    # After training, interpolate the run's model with the initial one, (1 - w) x initial + w x trained
    # (WiSE-FT; raysys.tune.interpolation): each weight is evaluated on the validation articles and
    # the best by mean mAP becomes the run's model (curve in <run>/interpolation). None: as trained.
    interpolate_weights: list[float] | None = None
    # Which weight wins: mean_map (best mean of mono, cross and multi validation mAP) | keep_mono (the
    # largest weight whose validation monolingual mAP is not below the initial model's; w = 0 is
    # always evaluated then): gain cross-lingual alignment without losing monolingual retrieval.
    interpolate_rule: str = "mean_map"
    log_every: int = 5
    max_failures: int = 0  # Ray Train restarts of the worker group from the latest checkpoint
    storage_path: str | None = None  # local dir, NFS or s3://; default: <output_dir>/ray
    resume_from: str | None = None  # a run directory or checkpoint directory
    logger: str | None = None  # None | tensorboard | mlflow


@dataclass
class EvalConfig:
    datasets: list[str] = field(default_factory=lambda: ["xquad-r"])
    # Which articles of each dataset to score: auto (the training dataset's held-out test articles,
    # every article of any other dataset: zero-shot) | test | validation | all
    split: str = "auto"
    batch_tokens: int | None = None  # padded tokens per encoder forward; None: 1024 on CPU, 8192 on GPU
    # None: exact fp32 on CPU and GPU | "bf16" (~3x on AVX512-BF16/AMX CPUs, no mAP lost; refused on CPUs without
    # them, where it runs ~7x slower: raysys.eval.preflight) | "int8" (lossy)
    fast_path: str | None = None
    num_encoders: int = 1  # Ray Data actor-pool size
    num_shards: int = 2  # FAISS index shards
    # How the index shards store the candidates: fp32 (as encoded) | fp16 (half the shard memory,
    # CPU and GPU; ranks are then exact for the fp16-rounded candidates, and the report says so).
    index_dtype: str = "fp32"
    # Pools up to this many candidates are scored by the same shards inside the driver's process
    # when Ray runs on one node without GPU shards (no actor start-up; XQuAD-R: 13k); larger
    # pools, multi-node clusters and GPU shards use index-shard actors. 0: always actors.
    in_process_max_candidates: int = 100_000
    top_k: int = 100
    # Approximate top-k for MIRACL-style corpora too large for exact search (raysys.eval.approximate):
    # a FAISS index_factory string ("IVF4096,PQ32", "HNSW32") and its search parameters ("nprobe=32");
    # recall@k against exact search on ann_recall_queries topics is reported beside the metrics.
    # LAReQA's ranks are always exact. None: exact IndexFlatIP.
    ann_index: str | None = None
    ann_params: str | None = None
    ann_recall_queries: int = 1000
    bootstrap_samples: int = 1000
    max_length: int = 256


@dataclass
class TuneConfig:
    alphas: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])
    num_samples: int = 1  # repeats of the grid (or samples when alphas is empty)
    lrs: list[float] | None = None
    temperatures: list[float] | None = None
    metric: str = "val_map_mean"
    mode: str = "max"
    asha: bool = True
    max_concurrent_trials: int | None = None  # None: derived from cluster resources
    trial_max_failures: int = 1


@dataclass
class Config:
    name: str = "raysys"
    seed: int = 0
    output_dir: str = "outputs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    # ---- conversions -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON/YAML-safe): Ray's train_loop_config / Tune's param_space."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None, *, source: str = "<dict>",
                  origins: "Origins | None" = None) -> "Config":
        origins = origins or Origins(source)
        config = build(cls, raw or {}, origins, prefix="")
        config._origins = origins  # not a field: to_dict() and Ray never see it
        return config

    @classmethod
    def from_yaml(cls, path: str | os.PathLike | None, overrides: list[str] | None = None) -> "Config":
        raw: dict[str, Any] = {}
        origins = Origins("<defaults>")
        if path is not None:
            raw, origins = read_yaml(Path(path))
        for item in overrides or []:
            apply_override(raw, item, origins)
        config = cls.from_dict(raw, origins=origins)
        config.validate()
        return config

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def _fail(self, key: str, message: str, hint: str | None = None) -> ConfigError:
        """A ConfigError located where `key` was set: the file and line, or the override."""
        origins = getattr(self, "_origins", None) or Origins("<config>")
        file, line = origins.where(key)
        return ConfigError(message, file=file, line=line, field=key, hint=hint)

    def validate(self) -> None:
        t, fail = self.train, self._fail
        if self.seed < 0:  # numpy's seed sequences (the batch schedule, in every worker) refuse it
            raise fail("seed", f"{self.seed} is negative", "use 0 or a positive integer")
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
        if t.mini_batch_size is not None and t.mini_batch_size < 1:
            raise fail("train.mini_batch_size", f"{t.mini_batch_size} is below 1",
                       "use a positive number of pairs, e.g. 32, or null for no gradient caching")
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
        if self.data.hard_negatives not in (None, "paragraph"):
            raise fail("data.hard_negatives", f"unknown source {self.data.hard_negatives!r}",
                       "use paragraph (LAReQA data: another sentence of the gold paragraph) or null")
        if self.model.pooling not in ("mean", "cls"):
            raise fail("model.pooling", f"unknown pooling {self.model.pooling!r}", "use mean or cls")
        for key in ("max_query_length", "max_passage_length"):
            if getattr(self.model, key) < 1:
                raise fail(f"model.{key}", f"{getattr(self.model, key)} is below 1", "use a positive token count")
        d = self.data
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
        e = self.eval
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
        for alpha in self.tune.alphas:
            if not 0.0 <= alpha <= 1.0:
                raise fail("tune.alphas", f"alpha {alpha} is outside [0, 1]", "every alpha must lie in [0, 1]")
