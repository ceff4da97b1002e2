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


def tiny_config(tmp_path: Path, model_dir: Path, name: str, **train_overrides) -> Config:
    from tests.conftest import XQUAD_R_DIR

    overrides = [f"model.name_or_path={model_dir}", f"data.train={XQUAD_R_DIR}",
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
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*")), "no TensorBoard event file"
    ckpt = Path(outcome.checkpoint_path)
    losses = state_of(ckpt)["history"]["loss"]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.1
    assert outcome.metrics["mono_steps"] + outcome.metrics["cross_steps"] == 30
    assert 0 < outcome.metrics["mono_steps"] < 30  # alpha 0.5 mixes both types
    assert "val_loss" in outcome.metrics

    probe = json.loads((ckpt / PROBE_FILE).read_text())
    AutoModel.from_pretrained(ckpt / EXPORT_DIR)  # a plain HF directory
    exported = BiEncoder.from_pretrained(str(ckpt / EXPORT_DIR))
    with torch.no_grad():
        ours = exported.encode_texts(probe["texts"], "query").numpy()
    np.testing.assert_allclose(ours, np.array(probe["embeddings"]), atol=1e-5)
    st = SentenceTransformer(str(ckpt / EXPORT_DIR), device="cpu")
    st_emb = st.encode(probe["texts"], prompt_name="query", normalize_embeddings=False)
    np.testing.assert_allclose(st_emb, np.array(probe["embeddings"]), atol=1e-5)


@pytest.mark.parametrize("stage", [1, 2, 3])
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
    full = train(tiny_config(tmp_path / "full", tiny_model_dir, "full", max_steps=8, checkpoint_every=4,
                             eval_every=4, keep_checkpoints=5))
    full_history = state_of(Path(full.checkpoint_path))["history"]
    run_dir = Path(full.run_path)
    at_4 = next(c for c in run_dir.glob("checkpoint_*") if c.is_dir() and state_of(c)["global_step"] == 4)
    resumed = train(tiny_config(tmp_path / "resumed", tiny_model_dir, "resumed", max_steps=8, checkpoint_every=4,
                                eval_every=4, resume_from=str(at_4)))
    resumed_history = state_of(Path(resumed.checkpoint_path))["history"]
    assert resumed_history["batch"] == full_history["batch"]
    np.testing.assert_allclose(resumed_history["loss"], full_history["loss"], rtol=1e-4)
