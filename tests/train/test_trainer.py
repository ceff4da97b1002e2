"""Ray Train + DeepSpeed on 2 CPU workers with the tiny model and the real XQuAD-R files."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from raysys.config import Config
from raysys.model.encoder import BiEncoder
from raysys.train.checkpoint import EXPORT_DIR, PROBE_FILE, STATE_FILE
from raysys.train.run import train

pytestmark = pytest.mark.timeout(900)


def tiny_config(tmp_path: Path, model_dir: Path, name: str, *extra: str, **train_overrides) -> Config:
    from tests.conftest import XQUAD_R_DIR

    overrides = [*extra, f"model.name_or_path={model_dir}", f"data.train={XQUAD_R_DIR}",
                 "data.languages=[de,en,es,zh]", f"output_dir={tmp_path}", f"name={name}",
                 "model.max_query_length=32", "model.max_passage_length=48",
                 "train.global_batch_size=8", "train.cpus_per_worker=0.5", "train.lr=1e-3", "train.log_every=1"]
    overrides += [f"train.{k}={v}" for k, v in train_overrides.items()]
    return Config.from_yaml(None, overrides)


def state_of(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE_FILE).read_text())


def test_training_lowers_loss_and_exports_a_loadable_model(ray_local, tmp_path, tiny_model_dir, xquad_r_dir):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    config = tiny_config(tmp_path, tiny_model_dir, "lowers", max_steps=30, checkpoint_every=15, eval_every=15,
                         logger="tensorboard")
    outcome = train(config)
    run_dir = Path(outcome.run_path)
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents.*")), "no TensorBoard event file in the run"
    ckpt = Path(outcome.checkpoint_path)
    losses = state_of(ckpt)["history"]["loss"]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.1
    assert outcome.metrics["mono_steps"] + outcome.metrics["cross_steps"] == 30
    assert 0 < outcome.metrics["mono_steps"] < 30  # alpha 0.5 mixes both types
    # The last step validated (checkpoints are ranked by validation loss, not training loss).
    assert "val_accuracy" in outcome.metrics and outcome.metrics["val_loss"] != outcome.metrics["loss"]
    assert 0.0 <= outcome.metrics["data_wait_fraction"] < 1.0  # batches are tokenized ahead (train.prefetch)

    probe = json.loads((ckpt / PROBE_FILE).read_text())
    AutoModel.from_pretrained(ckpt / EXPORT_DIR)  # a plain HF directory
    exported = BiEncoder.from_pretrained(str(ckpt / EXPORT_DIR))
    with torch.no_grad():
        ours = exported.encode_texts(probe["texts"], "query").numpy()
    np.testing.assert_allclose(ours, np.array(probe["embeddings"]), atol=1e-5)
    st = SentenceTransformer(str(ckpt / EXPORT_DIR), device="cpu")
    st_emb = st.encode(probe["texts"], prompt_name="query", normalize_embeddings=False)
    np.testing.assert_allclose(st_emb, np.array(probe["embeddings"]), atol=1e-5)


# ZeRO-3 (the hardest: partitioned parameters) in the default suite; 1 and 2 in `make test-slow`.
@pytest.mark.parametrize("stage", [pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow), 3])
def test_zero_stages_checkpoint_and_consolidate(ray_local, tmp_path, tiny_model_dir, xquad_r_dir, stage):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    config = tiny_config(tmp_path, tiny_model_dir, f"zero{stage}", zero_stage=stage, max_steps=4,
                         checkpoint_every=2, eval_every=2)
    outcome = train(config)
    ckpt = Path(outcome.checkpoint_path)
    assert state_of(ckpt)["global_step"] == 4
    # Reload the ZeRO shards every rank wrote and compare with the exported consolidated model.
    sharded = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="ds")
    exported = load_file(ckpt / EXPORT_DIR / "model.safetensors")
    assert len([k for k in sharded if k.startswith("backbone.")]) == len(exported)
    for key, value in exported.items():
        torch.testing.assert_close(sharded["backbone." + key].float(), value.float())


def test_resume_continues_the_same_batch_schedule(ray_local, tmp_path, tiny_model_dir, xquad_r_dir):
    """With two same-paragraph hard negatives per pair (more candidates than pairs), the resumed
    run repeats the batches and losses of the uninterrupted one."""
    negatives = "data.hard_negatives=paragraph"
    full = train(tiny_config(tmp_path / "full", tiny_model_dir, "full", negatives, max_steps=8, checkpoint_every=4,
                             eval_every=4, keep_checkpoints=5, hard_negatives_per_pair=2))
    full_history = state_of(Path(full.checkpoint_path))["history"]
    run_dir = Path(full.run_path)
    at_4 = next(c for c in run_dir.glob("checkpoint_*") if c.is_dir() and state_of(c)["global_step"] == 4)
    resumed = train(tiny_config(tmp_path / "resumed", tiny_model_dir, "resumed", negatives, max_steps=8,
                                checkpoint_every=4, eval_every=4, resume_from=str(at_4), hard_negatives_per_pair=2))
    resumed_history = state_of(Path(resumed.checkpoint_path))["history"]
    assert resumed_history["batch"] == full_history["batch"]
    np.testing.assert_allclose(resumed_history["loss"], full_history["loss"], rtol=1e-4)


def test_accumulation_zero2_resume(ray_local, tmp_path, tiny_model_dir, xquad_r_dir):
    """Optimizer steps accumulate 2 hybrid batches, each under gradient caching (mini-batches of 2
    of a worker's 4 pairs), with the regulariser toward the initial model on; a ZeRO-2 checkpoint
    reloads into the engine and the resumed run repeats the uninterrupted one micro-step for
    micro-step (its teacher is the initial model again, not the checkpoint)."""
    common = dict(max_steps=4, checkpoint_every=2, eval_every=2, gradient_accumulation_steps=2, zero_stage=2,
                  keep_checkpoints=5, mini_batch_size=2, distill_weight=0.5)
    full = train(tiny_config(tmp_path / "full", tiny_model_dir, "acc", **common))
    full_state = state_of(Path(full.checkpoint_path))
    assert full_state["global_step"] == 4 and full.metrics["step"] == 4
    assert len(full_state["history"]["batch"]) == 8  # 4 optimizer steps x 2 micro-batches
    assert full.metrics["mono_steps"] + full.metrics["cross_steps"] == 8
    at_2 = next(c for c in Path(full.run_path).glob("checkpoint_*") if c.is_dir() and state_of(c)["global_step"] == 2)
    assert len(state_of(at_2)["history"]["batch"]) == 4
    resumed = train(tiny_config(tmp_path / "resumed", tiny_model_dir, "acc-resumed", resume_from=str(at_2),
                                **common))
    resumed_history = state_of(Path(resumed.checkpoint_path))["history"]
    assert resumed_history["batch"] == full_state["history"]["batch"]
    np.testing.assert_allclose(resumed_history["loss"], full_state["history"]["loss"], rtol=1e-4)


def test_trains_from_jsonl_without_a_validation_split(ray_local, tmp_path, tiny_model_dir):
    """A user's own parallel corpus as JSONL (Ray Data path, hash split by group), region-tagged
    language filter, and no validation split: training runs and ranks checkpoints by training loss."""
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    rows = [{"id": f"q{i}", "lang": lang, "query": f"{lang} question {words[i % 8]} {i}",
             "passage": f"{lang} passage about {words[(i * 3) % 8]} number {i}", "group": f"doc{i // 4}"}
            for i in range(64) for lang in ("de", "en", "pt-BR")]
    data = tmp_path / "corpus"
    data.mkdir()
    (data / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    config = Config.from_yaml(None, [
        f"model.name_or_path={tiny_model_dir}", f"data.train={data}", "data.languages=[en,pt_BR]",
        "data.validation_fraction=0", "data.test_fraction=0.1", f"output_dir={tmp_path}", "name=jsonl",
        "model.max_query_length=16", "model.max_passage_length=16", "train.global_batch_size=8",
        "train.max_steps=3", "train.checkpoint_every=3", "train.eval_every=3", "train.log_every=1"])
    outcome = train(config)
    state = state_of(Path(outcome.checkpoint_path))
    assert state["global_step"] == 3
    assert "val_accuracy" not in outcome.metrics and outcome.metrics["val_loss"] == outcome.metrics["loss"]
    assert (Path(outcome.model_path) / "config.json").exists()


def test_frozen_embeddings_stay_as_the_initial_model_had_them(ray_local, tmp_path, tiny_model_dir, xquad_r_dir):
    """train.freeze_embeddings: the exported token embeddings are the initial ones, bit for bit,
    while the layers above them trained."""
    from safetensors.torch import load_file

    outcome = train(tiny_config(tmp_path, tiny_model_dir, "frozen", max_steps=3, checkpoint_every=3, eval_every=3,
                                freeze_embeddings="true"))
    initial = load_file(tiny_model_dir / "model.safetensors")
    exported = load_file(Path(outcome.checkpoint_path) / EXPORT_DIR / "model.safetensors")
    key = next(k for k in exported if k.endswith("word_embeddings.weight"))
    assert torch.equal(exported[key], initial[key])
    layer = next(k for k in exported if k.endswith("attention.self.query.weight"))
    assert not torch.equal(exported[layer], initial[layer])
