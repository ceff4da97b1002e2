"""Worker failures: a SIGKILLed Ray Train worker is recovered from the latest checkpoint by
FailureConfig, and a failed job resumed by hand from its run directory; both finish with the
same steps, the same batch schedule and the same losses as an uninterrupted run."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from raysys.errors import RaysysError
from raysys.train.checkpoint import STATE_FILE, latest_checkpoint_dir, verify_checkpoint
from raysys.train.run import train
from tests.fixtures.faults import CrashOnceAfterStep
from tests.train.test_trainer import tiny_config

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]  # minutes: `make test-slow` (CI runs it)
STEPS = dict(max_steps=8, checkpoint_every=4, eval_every=4, keep_checkpoints=3)


def final_state(outcome) -> dict:
    return json.loads((Path(outcome.checkpoint_path) / STATE_FILE).read_text())


@pytest.fixture(scope="module")
def reference_run(ray_local, tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("reference")
    return train(tiny_config(tmp, tiny_model_dir, "reference", **STEPS))


@pytest.fixture(scope="module")
def reference(reference_run):
    return final_state(reference_run)


def test_killed_worker_is_recovered_from_the_latest_checkpoint(reference, tmp_path, tiny_model_dir, monkeypatch):
    crash = CrashOnceAfterStep(6, tmp_path)  # checkpoint at 4, crash at 6
    state = final_state(train(tiny_config(tmp_path, tiny_model_dir, "recovered", max_failures=1, **STEPS),
                              train_loop=crash))
    assert state["restores"] == 1, "the worker group was not restarted from a checkpoint"
    assert state["global_step"] == reference["global_step"] == 8
    assert state["history"]["batch"] == reference["history"]["batch"]
    np.testing.assert_allclose(state["history"]["loss"], reference["history"]["loss"], rtol=1e-4)
    assert state["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-4)


def test_failed_job_resumes_by_hand_from_its_run_directory(reference, tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("RAYSYS_RUN_NAME", "crashed")
    with pytest.raises(Exception) as failure:  # checkpoint at 4, crash at 6
        train(tiny_config(tmp_path, tiny_model_dir, "crashed", max_failures=0, **STEPS),
              train_loop=CrashOnceAfterStep(6, tmp_path))
    assert not isinstance(failure.value, RaysysError)  # a crash, not a user error
    run_dir = tmp_path / "ray" / "crashed"
    monkeypatch.setenv("RAYSYS_RUN_NAME", "resumed")
    state = final_state(train(tiny_config(tmp_path, tiny_model_dir, "resumed", resume_from=str(run_dir), **STEPS)))
    assert state["restores"] == 1 and state["global_step"] == 8
    assert state["history"]["batch"] == reference["history"]["batch"]
    np.testing.assert_allclose(state["history"]["loss"], reference["history"]["loss"], rtol=1e-4)


def test_corrupted_checkpoint_is_detected_and_the_previous_one_used(reference_run, tmp_path):
    """A truncated DeepSpeed shard in the newest checkpoint (checked against the rank manifests) is
    reported with its path, and resuming from the run directory falls back to the previous one."""
    run = tmp_path / "run"
    shutil.copytree(reference_run.run_path, run)
    checkpoints = {final_state_of(c)["global_step"]: c for c in run.glob("checkpoint_*") if c.is_dir()}
    assert set(checkpoints) >= {4, 8} and Path(latest_checkpoint_dir(run)) == checkpoints[8]
    shard = max((checkpoints[8] / "ds").glob("*.pt"), key=lambda f: f.stat().st_size)
    shard.write_bytes(shard.read_bytes()[:100])  # a crash in the middle of copying the shard
    with pytest.raises(RaysysError) as info:
        verify_checkpoint(checkpoints[8])
    assert shard.name in str(info.value) and "corrupted" in str(info.value)
    assert Path(latest_checkpoint_dir(run)) == checkpoints[4]
    (checkpoints[4] / "manifest-rank1.json").unlink()  # a rank that never finished writing
    with pytest.raises(RaysysError, match="1 of 2 rank manifests"):
        verify_checkpoint(checkpoints[4])


def final_state_of(checkpoint_dir: Path) -> dict:
    return json.loads((checkpoint_dir / STATE_FILE).read_text())
