"""Slow end to end on the real default model (multilingual-e5-small): `make test-slow`."""

import json

import pytest

from raysys.config import Config
from raysys.demo import run_demo
from tests.conftest import XQUAD_R_DIR

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def test_quick_demo_on_the_default_model_reduces_language_bias(ray_local, tmp_path, xquad_r_dir):
    config = Config.from_yaml(None, [f"output_dir={tmp_path}", f"data.train={XQUAD_R_DIR}",
                                     f"eval.datasets=[{XQUAD_R_DIR}]", "train.max_steps=8",
                                     "train.interpolate_weights=[0.5,1]"])  # as the recipe: w chosen on validation
    result = run_demo(config, quick=True)
    chosen = result["model_path"].rstrip("/").rsplit("/", 1)[1]
    assert chosen in ("weight-0.5", "weight-1")
    comparison = json.loads((tmp_path / "raysys-quick" / "eval" / "comparison" / "comparison.json").read_text())
    assert f"hybrid alpha=0.5, w={chosen.removeprefix('weight-')}" in comparison["runs"]
    before = result["before"][str(XQUAD_R_DIR)]["summary"]
    after = result["after"][str(XQUAD_R_DIR)]["summary"]
    # cross-lingual and hybrid batches pull translations together: less language bias
    assert after["multilingual"]["map"] > before["multilingual"]["map"]
    assert after["multilingual"]["rank_distance"] < before["multilingual"]["rank_distance"]
    assert before["monolingual"]["map"] > 0.7  # the untrained model is a real retriever
