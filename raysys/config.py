"""Configuration as plain dataclasses: YAML in, `key=value` overrides, dict out for Ray.

Every default lives here, in one place. `Config.to_dict()` is what Ray Train's
`train_loop_config` and Ray Tune's `param_space` receive; `Config.from_dict()` turns it back.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

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
    # Group-wise split (by article title): the last fractions of groups in file order.
    validation_fraction: float = 0.1
    test_fraction: float = 0.15


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
    global_batch_size: int = 16  # pairs per optimizer step over all workers
    epochs: int = 2
    max_steps: int | None = 60  # stop after this many optimizer steps (None: full epochs)
    lr: float = 3e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    temperature: float = 0.05
    symmetric_loss: bool = False
    use_hard_negatives: bool = True
    gradient_accumulation_steps: int = 1
    gradient_clipping: float = 1.0
    zero_stage: int = 0
    precision: str = "auto"  # auto (bf16 on GPUs that support it, else fp32) | fp32 | bf16 | fp16
    num_workers: int = 2
    use_gpu: bool = False
    # Ray CPUs reserved per worker; fractional leaves room for Ray Data to stream shards on small hosts.
    cpus_per_worker: float = 0.5
    torch_threads: int = 1  # per worker; oversubscription is the worst slowdown on small hosts
    checkpoint_every: int = 30  # steps; a checkpoint is also written at the end
    eval_every: int = 30  # steps between validation-loss evaluations
    val_retrieval: bool = False  # also validation mAP (mono/cross/multi) on the validation pairs
    keep_checkpoints: int = 2  # best K by validation loss
    log_every: int = 5
    max_failures: int = 0  # Ray Train restarts of the worker group from the latest checkpoint
    storage_path: str | None = None  # local dir, NFS or s3://; default: <output_dir>/ray
    resume_from: str | None = None  # a run directory or checkpoint directory
    logger: str | None = None  # None | tensorboard | mlflow


@dataclass
class EvalConfig:
    datasets: list[str] = field(default_factory=lambda: ["xquad-r"])
    split: str = "test"  # test | validation | all: which articles of each dataset to score
    batch_tokens: int = 8192  # token budget per encoder batch (length-bucketed)
    num_encoders: int = 1  # Ray Data actor-pool size
    num_shards: int = 2  # FAISS index shards
    top_k: int = 100
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
    def from_dict(cls, raw: dict[str, Any] | None, *, source: str = "<dict>") -> "Config":
        return _build(cls, raw or {}, source, prefix="")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike | None, overrides: list[str] | None = None) -> "Config":
        raw: dict[str, Any] = {}
        source = "<defaults>"
        if path is not None:
            source = str(path)
            try:
                raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
            except FileNotFoundError:
                raise ConfigError(f"{path}: config file not found") from None
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path}: not valid YAML: {exc}") from None
            if not isinstance(raw, dict):
                raise ConfigError(f"{path}: top level must be a mapping of sections")
        for item in overrides or []:
            _apply_override(raw, item)
        config = cls.from_dict(raw, source=source)
        config.validate()
        return config

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def validate(self) -> None:
        t = self.train
        if not 0.0 <= t.alpha <= 1.0:
            raise ConfigError(f"train.alpha={t.alpha}: must lie in [0, 1] (1 = monolingual only, 0 = cross-lingual only)")
        if t.global_batch_size < 2:
            raise ConfigError("train.global_batch_size must be at least 2 (in-batch negatives)")
        if t.num_workers < 1 or t.global_batch_size % t.num_workers:
            raise ConfigError(f"train.global_batch_size={t.global_batch_size} must be a positive multiple "
                              f"of train.num_workers={t.num_workers}")
        if t.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"train.zero_stage={t.zero_stage}: must be 0, 1, 2 or 3")
        if t.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"train.precision={t.precision!r}: must be auto, fp32, bf16 or fp16")
        if t.temperature <= 0:
            raise ConfigError("train.temperature must be positive")
        if self.model.pooling not in ("mean", "cls"):
            raise ConfigError(f"model.pooling={self.model.pooling!r}: must be mean or cls")
        d = self.data
        if not (0 <= d.validation_fraction < 1 and 0 <= d.test_fraction < 1
                and d.validation_fraction + d.test_fraction < 1):
            raise ConfigError("data.validation_fraction + data.test_fraction must be below 1")
        if self.eval.split not in ("test", "validation", "all"):
            raise ConfigError(f"eval.split={self.eval.split!r}: must be test, validation or all")


def _build(cls, raw: dict[str, Any], source: str, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or 'config'}' must be a mapping")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown key '{prefix}{unknown[0]}' (known: {', '.join(sorted(known))})")
    kwargs = {}
    for f in fields(cls):
        if f.name not in raw:
            continue
        value, hint = raw[f.name], hints[f.name]
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = _build(hint, value, source, prefix + f.name + ".")
        else:
            kwargs[f.name] = _coerce(value, hint, f"{source}: '{prefix}{f.name}'")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check (and gently convert) a YAML value against the dataclass field's type."""
    args = [a for a in get_args(hint) if a is not type(None)]
    if value is None:
        if type(None) in get_args(hint):
            return None
        raise ConfigError(f"{where} may not be null")
    if get_origin(hint) is list or (args and get_origin(args[0]) is list):
        inner = get_args(args[0] if args and get_origin(args[0]) is list else hint)[0]
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_coerce(v, inner, where) for v in value]
    target = args[0] if args else hint
    if target is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if target in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        try:
            number = float(value) if target is float else int(str(value))
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be {'an integer' if target is int else 'a number'}, got {value!r}") from None
        return number
    if target is str:
        return str(value)
    return value


def _apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one `section.key=value` override; the value is parsed as YAML (so 0.5, true, [a,b])."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected section.key=value, e.g. train.alpha=0.5")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: '{part}' is not a section")
    node[parts[-1]] = value
