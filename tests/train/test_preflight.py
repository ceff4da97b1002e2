"""Config values that used to pass Config.validate() and then crash every training worker: each now
trains, or fails in the driver with one located line (raysys.train.preflight, Config.validate)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from raysys.config import Config
from raysys.data.buckets import bucket_of as shard_of
from raysys.errors import ConfigError, RaysysError
from raysys.train.datasets import shard_facts
from raysys.train.preflight import optimizer_steps, position_limit, preflight

pytestmark = pytest.mark.timeout(600)


def config(*overrides: str) -> Config:
    return Config.from_yaml(None, list(overrides))


def facts_for(ids: dict[str, list[str]], world: int) -> dict:
    """Facts as compute_facts gives them, for parallel id -> its languages (one bucket entry per id)."""
    langs = sorted({lang for v in ids.values() for lang in v})
    buckets = [{"bucket": shard_of(pid, 256), "ids": 1, "multilingual_ids": int(len(set(v)) >= 2),
                "ids_per_language": {lang: 1 for lang in set(v)}} for pid, v in ids.items()]
    return {"languages": langs, "shards": shard_facts(buckets, world)}


def parallel(n: int, langs=("de", "en")) -> dict[str, list[str]]:
    return {f"q{i}": list(langs) for i in range(n)}


# ---- Config.validate: values that need no data ------------------------------------------------

@pytest.mark.parametrize("override,field", [
    ("train.warmup_ratio=1.0", "train.warmup_ratio"), ("train.warmup_ratio=-0.1", "train.warmup_ratio"),
    ("train.warmup_ratio=1.5", "train.warmup_ratio"), ("train.lr_decay=cosine", "train.lr_decay"),
    ("train.weight_decay=-0.01", "train.weight_decay"), ("train.logger=wandb", "train.logger"),
    ("train.cpus_per_worker=-1", "train.cpus_per_worker"), ("train.gradient_clipping=-1", "train.gradient_clipping"),
    ("seed=-1", "seed")])
def test_out_of_range_values_are_located_config_errors(override, field):
    with pytest.raises(ConfigError) as err:
        config(override)
    assert err.value.field == field and err.value.file == f"override {override!r}"
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("override", ["train.warmup_ratio=0", "train.warmup_ratio=0.99", "train.max_steps=1",
                                      "train.lr_decay=constant", "train.weight_decay=0"])
def test_edge_values_are_accepted(override):
    config(override)


def test_yaml_location_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.001\n  warmup_ratio: 1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml, line 3, field 'train\.warmup_ratio': 1\.0? is outside \[0, 1\)"):
        Config.from_yaml(path)


def test_optimizer_steps_count_whole_accumulated_steps():
    assert optimizer_steps(config("train.epochs=2", "train.max_steps=null",
                                  "train.gradient_accumulation_steps=3").train, 5) == 3
    assert optimizer_steps(config("train.epochs=2", "train.max_steps=2").train, 5) == 2
    assert optimizer_steps(config("train.epochs=1", "train.max_steps=1000").train, 5) == 5  # data ends first


# ---- preflight ------------------------------------------------------------------------------------

def test_valid_plan_returns_the_total_steps(tiny_model_dir):
    facts = facts_for(parallel(40), world=2)
    per_epoch = min(s["ids"] // 2 for s in facts["shards"])
    assert preflight(config("train.global_batch_size=4", "train.max_steps=null", "train.epochs=2"),
                     facts, tiny_model_dir) == 2 * per_epoch
    assert preflight(config("train.global_batch_size=4", "train.max_steps=1", "train.warmup_ratio=0"),
                     facts, tiny_model_dir) == 1


def test_accumulation_beyond_the_data_fails_in_the_driver(tiny_model_dir):
    facts = facts_for(parallel(40), world=2)
    per_epoch = min(s["ids"] // 2 for s in facts["shards"])
    with pytest.raises(ConfigError) as err:
        preflight(config("train.global_batch_size=4", "train.epochs=1", "train.max_steps=null",
                         f"train.gradient_accumulation_steps={per_epoch + 1}"), facts, tiny_model_dir)
    assert err.value.field == "train.gradient_accumulation_steps"
    assert f"1 epoch(s) x {per_epoch} batches give only {per_epoch}" in str(err.value)


def test_a_worker_short_of_a_language_fails_in_the_driver(tiny_model_dir):
    # 8 ids in 'de' pass the global check for a batch of 8, but 2 workers split them unevenly.
    ids = parallel(40, ("en", "es")) | {f"d{i}": ["de", "en"] for i in range(8)}
    facts = facts_for(ids, world=2)
    counts = [s["ids_per_language"].get("de", 0) for s in facts["shards"]]
    assert sum(counts) == 8 and min(counts) < 4
    with pytest.raises(ConfigError, match=f"need 4 parallel ids in 'de' on each worker .* gets {min(counts)}") as err:
        preflight(config("train.global_batch_size=8", "train.alpha=0.5"), facts, tiny_model_dir)
    assert err.value.field == "train.global_batch_size"
    preflight(config("train.global_batch_size=8", "train.alpha=0.5", "train.num_workers=1"),
              facts_for(ids, world=1), tiny_model_dir)


def test_cross_lingual_capacity_per_worker(tiny_model_dir):
    ids = {f"m{i}": ["de", "en"] for i in range(5)} | {f"s{i}": ["en"] for i in range(40)}
    facts = facts_for(ids, world=2)
    with pytest.raises(ConfigError, match="in two or more languages on each worker"):
        preflight(config("train.global_batch_size=6", "train.alpha=0"), facts, tiny_model_dir)


def test_more_workers_than_ids_fails_in_the_driver(tiny_model_dir):
    facts = facts_for(parallel(2), world=4)
    with pytest.raises(ConfigError, match="gets no parallel ids") as err:
        preflight(config("train.global_batch_size=4", "train.num_workers=4"), facts, tiny_model_dir)
    assert err.value.field == "train.num_workers"


def test_lengths_beyond_the_position_table_fail_in_the_driver(tiny_model_dir):
    assert position_limit(tiny_model_dir) == 256
    facts = facts_for(parallel(40), world=2)
    preflight(config("train.global_batch_size=4", "model.max_passage_length=256"), facts, tiny_model_dir)
    with pytest.raises(ConfigError, match="300 tokens, but the model embeds at most 256 positions") as err:
        preflight(config("train.global_batch_size=4", "model.max_passage_length=300"), facts, tiny_model_dir)
    assert err.value.field == "model.max_passage_length"


def test_roberta_position_tables_lose_the_padding_offset(tmp_path):
    from transformers import XLMRobertaConfig

    XLMRobertaConfig(max_position_embeddings=514, pad_token_id=1).save_pretrained(tmp_path)
    assert position_limit(tmp_path) == 512  # as in multilingual-e5-small


def test_fp16_on_cpu_workers(tiny_model_dir):
    facts = facts_for(parallel(40), world=2)
    cfg = config("train.global_batch_size=4", "train.precision=fp16")
    if torch.ops.mkldnn._is_mkldnn_fp16_supported():
        preflight(cfg, facts, tiny_model_dir)
    else:
        with pytest.raises(ConfigError, match="fp16 is not supported on CPU workers"):
            preflight(cfg, facts, tiny_model_dir)
    preflight(config("train.global_batch_size=4", "train.precision=bf16"), facts, tiny_model_dir)


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is not None, reason="mlflow is installed here")
def test_mlflow_logger_without_mlflow(tiny_model_dir):
    with pytest.raises(ConfigError, match="mlflow is not installed"):
        preflight(config("train.global_batch_size=4", "train.logger=mlflow"), facts_for(parallel(40), 2),
                  tiny_model_dir)


def fake_checkpoint(path: Path, step: int, world: int = 2, data: dict | None = None) -> Path:
    path.mkdir(parents=True)
    state = {"global_step": step, "world_size": world, "config": {"data": data or {}}}
    (path / "raysys_state.json").write_text(json.dumps(state))
    for rank in range(world):
        (path / f"manifest-rank{rank}.json").write_text(json.dumps({"raysys_state.json":
                                                                    (path / "raysys_state.json").stat().st_size}))
    return path


def test_resume_from_is_checked_in_the_driver(tmp_path, tiny_model_dir):
    facts = facts_for(parallel(40), world=2)
    base = ["train.global_batch_size=4", "train.max_steps=5"]
    with pytest.raises(RaysysError, match="resume_from does not exist"):
        preflight(config(*base, f"train.resume_from={tmp_path / 'nope'}"), facts, tiny_model_dir)
    done = fake_checkpoint(tmp_path / "run" / "checkpoint_5", 5)
    with pytest.raises(ConfigError, match="is at step 5 but this run has 5 optimizer steps") as err:
        preflight(config(*base, f"train.resume_from={done}"), facts, tiny_model_dir)
    assert err.value.field == "train.resume_from"
    middle = fake_checkpoint(tmp_path / "run2" / "checkpoint_3", 3)
    assert preflight(config(*base, f"train.resume_from={middle}"), facts, tiny_model_dir) == 5
    # other workers or another data layout would give other batches than the interrupted run's
    for name, kwargs, field in (("w4", {"world": 4}, "train.num_workers"),
                                ("buf", {"data": {"worker_buffer_rows": 1000}}, "data.worker_buffer_rows"),
                                ("buckets", {"data": {"num_buckets": 64}}, "data.num_buckets")):
        other = fake_checkpoint(tmp_path / name / "checkpoint_3", 3, **kwargs)
        with pytest.raises(ConfigError, match=f"was trained with {field}=") as err:
            preflight(config(*base, f"train.resume_from={other}"), facts, tiny_model_dir)
        assert err.value.field == field


# ---- through Ray Train: the issue's reproduction, and a driver-side failure --------------------------

def tiny_config(tmp_path: Path, model_dir: Path, *overrides: str) -> Config:
    from tests.conftest import XQUAD_R_DIR

    return Config.from_yaml(None, [
        f"model.name_or_path={model_dir}", f"data.train={XQUAD_R_DIR}", "data.languages=[de,en,es,zh]",
        f"output_dir={tmp_path}", "name=preflight", "model.max_query_length=32", "model.max_passage_length=48",
        "train.global_batch_size=8", "train.cpus_per_worker=0.5", "train.lr=1e-3", "train.log_every=1",
        *overrides])


def test_one_step_run_trains_at_the_full_lr(ray_local, tmp_path, tiny_model_dir, xquad_r_dir):
    from raysys.train.run import train

    outcome = train(tiny_config(tmp_path, tiny_model_dir, "train.max_steps=1"))  # warmup_ratio 0.1 as default
    assert outcome.metrics["step"] == 1
    assert outcome.metrics["lr"] == pytest.approx(1e-3)  # the LR step 1 applied: the full train.lr
    state = json.loads((Path(outcome.checkpoint_path) / "raysys_state.json").read_text())
    assert state["global_step"] == 1


def test_too_much_accumulation_fails_before_any_worker(ray_local, tmp_path, tiny_model_dir, xquad_r_dir):
    from raysys.train.run import build_trainer

    with pytest.raises(ConfigError) as err:
        build_trainer(tiny_config(tmp_path, tiny_model_dir, "train.epochs=1", "train.max_steps=null",
                                  "train.gradient_accumulation_steps=100000"))
    assert err.value.field == "train.gradient_accumulation_steps"
    assert str(err.value).startswith("override 'train.gradient_accumulation_steps=100000'")
