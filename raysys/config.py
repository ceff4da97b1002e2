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
    # Keep the backbone's token-embedding matrix as the initial model had it (a common lever for
    # keeping what a multilingual model knew: the vocabulary rows of languages and words a batch never
    # shows keep their place). On multilingual-e5-small it is 96M of the 117.5M parameters, so it also
    # leaves them out of the gradient all-reduce and the optimizer step. Under bf16 they have no fp32
    # master copy, so the export holds them bf16-rounded.
    freeze_embeddings: bool = False
    use_hard_negatives: bool = True
    # Hard negatives each pair brings into the candidate pool (its row's first k; a row with fewer
    # repeats them), as Tevatron's train_group_size - 1 or a sentence-transformers n-tuple.
    hard_negatives_per_pair: int = 1
    # In a cross-lingual batch (query in X, passage in Y), whose hard negatives a pair brings:
    # passage (Y's row: confusers in the answer's language) | query (X's row: same-topic sentences in
    # the query's own language, the ones language bias ranks above a right answer in Y) | mixed
    # (alternating, passage first). Monolingual batches have one row per pair, so this changes nothing there.
    cross_lingual_negatives: str = "passage"
    # Leave exact copies of a query's positive (another pair's identical passage, any hard negative
    # with its text: same-paragraph negatives are often another pair's positive) out of its InfoNCE
    # negatives, over all workers' candidates. sentence-transformers' NO_DUPLICATES batch sampler
    # keeps such copies out of a batch instead.
    mask_duplicate_positives: bool = False
    gradient_accumulation_steps: int = 1
    # Gradient caching (sentence-transformers' CachedMultipleNegativesRankingLoss, GradCache): each
    # worker embeds its share of a batch this many pairs at a time, so a batch of thousands of
    # in-batch negatives needs the activation memory of one mini-batch. None: one forward per batch.
    mini_batch_size: int | None = None
    # Each forward of passages and hard negatives runs in this many groups of similar token length,
    # each padded only to its own longest (raysys.train.step.LengthGroups): the same embeddings and
    # gradient with less padding (4: 1.42x the recipe's training steps/s on 2 CPU workers with three
    # negatives per pair, bench/results/length_groups.json). Dropout masks are drawn per group. 1: one forward.
    length_groups: int = 1
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
    # always evaluated then): gain cross-lingual alignment without losing monolingual retrieval |
    # keep_mono_ci (the largest weight whose validation monolingual mAP is above the initial model's
    # with 95 % confidence, paired bootstrap over the validation queries; eval.bootstrap_samples).
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
        """Refuse values the workers would fail on later, located where they were set."""
        from raysys.config_checks import check

        check(self, self._fail)
