"""Every evaluation dataset is checked before any encoding; bf16 is refused where it cannot be fast."""

from __future__ import annotations

import pytest

import raysys.eval.run as run
from raysys.config import Config
from raysys.errors import ConfigError, DataError
from raysys.eval import embeddings, preflight
from tests.eval.lareqa_fixture import write_synthetic_lareqa
from tests.eval.test_run import write_miracl


@pytest.fixture
def no_encoding(monkeypatch):
    """Fail the test if anything is encoded (or Ray started)."""
    def forbidden(*args, **kwargs):
        raise AssertionError("encoding started before every dataset was checked")

    monkeypatch.setattr(embeddings, "encode_sets", forbidden)
    monkeypatch.setattr(embeddings, "ensure_ray", forbidden)


def config_for(tmp_path, *overrides) -> Config:
    return Config.from_yaml(None, [f"output_dir={tmp_path}", "data.languages=[de,en,fr]", *overrides])


@pytest.mark.parametrize("bad", ["eval.split=test", "no-such-dir", "miracl:{tmp}/nowhere", "miracl:{tmp}/empty"])
def test_a_bad_dataset_after_a_good_one_fails_before_any_encoding(tmp_path, tiny_model_dir, no_encoding, bad):
    good = write_synthetic_lareqa(tmp_path / "lareqa")
    (tmp_path / "empty").mkdir()
    with pytest.raises((DataError, ConfigError)) as error:
        run.evaluate(str(tiny_model_dir), [str(good), bad.format(tmp=tmp_path)], config_for(tmp_path),
                     tmp_path / "work")
    assert bad.format(tmp=tmp_path).removeprefix("miracl:") in str(error.value)


def test_a_miracl_language_missing_a_file_is_named(tmp_path, no_encoding, tiny_model_dir):
    root = write_miracl(tmp_path / "miracl")
    (root / "en" / "qrels.tsv").unlink()
    with pytest.raises(DataError, match="en/ has no qrels.tsv"):
        run.evaluate(str(tiny_model_dir), [f"miracl:{root}"], config_for(tmp_path), tmp_path / "work")


def test_good_datasets_pass(tmp_path):
    good = write_synthetic_lareqa(tmp_path / "lareqa")
    root = write_miracl(tmp_path / "miracl")
    preflight.check_evaluation([str(good), f"miracl:{root}"], config_for(tmp_path))


@pytest.mark.parametrize("native", [True, False])
def test_bf16_is_refused_on_a_cpu_without_bf16_instructions(tmp_path, monkeypatch, native):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(preflight, "cpu_has_native_bf16", lambda: native)
    config = config_for(tmp_path, "eval.fast_path=bf16")
    if native:
        preflight.check_fast_path_hardware(config)
    else:
        with pytest.raises(ConfigError, match="eval.fast_path.*no AVX512-BF16 or AMX"):
            preflight.check_fast_path_hardware(config)
    preflight.check_fast_path_hardware(config_for(tmp_path, "eval.fast_path=int8"))  # never refused
    # Joining a cluster: the encoders run on other machines' CPUs, which check (and warn) themselves.
    # (An earlier test may have left a local Ray running in this process; joining means it is not.)
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    preflight.check_fast_path_hardware(config)
    # Already attached to a multi-node cluster: likewise not refused.
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setattr("raysys.runtime.is_multi_node", lambda: True)
    preflight.check_fast_path_hardware(config)


def test_the_bf16_check_reads_this_cpu():
    import torch

    assert preflight.cpu_has_native_bf16() == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
