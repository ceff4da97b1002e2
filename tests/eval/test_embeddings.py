"""The embedding cache key and where embeddings are kept (raysys.eval.embeddings)."""

from __future__ import annotations

from dataclasses import replace

from raysys.config import Config
import pyarrow as pa

from raysys.eval.embeddings import embeddings_dir, embeddings_key, encoder_settings, encoding_mode, texts_digest


def test_embedding_cache_key_records_device_and_precision():
    modes = {encoding_mode(Config.from_yaml(None, overrides)) for overrides in (
        [], ["eval.fast_path=bf16"], ["eval.fast_path=int8"], ["train.use_gpu=true"],
        ["train.use_gpu=true", "eval.fast_path=bf16"])}
    assert modes == {"cpu-fp32", "cpu-bf16", "cpu-int8", "gpu-fp32", "gpu-bf16"}


def test_the_key_changes_with_the_model_the_settings_the_data_and_the_mode(tiny_model_dir, tmp_path):
    config = Config.from_yaml(None, [])
    settings = encoder_settings(config)
    key = embeddings_key(str(tiny_model_dir), settings, config, "xquad-r", "test")
    assert key == embeddings_key(str(tiny_model_dir), settings, config, "xquad-r", "test")  # stable
    other_model = tmp_path / "other"
    other_model.mkdir()
    changed = {
        "model": embeddings_key(str(other_model), settings, config, "xquad-r", "test"),
        "settings": embeddings_key(str(tiny_model_dir), replace(settings, max_passage_length=64), config, "xquad-r", "test"),
        "data": embeddings_key(str(tiny_model_dir), settings, config, "xquad-r", "validation"),
        "mode": embeddings_key(str(tiny_model_dir), settings, Config.from_yaml(None, ["eval.fast_path=bf16"]),
                               "xquad-r", "test"),
    }
    assert key not in changed.values() and len(set(changed.values())) == 4, changed


def test_embeddings_stay_in_the_work_directory_on_one_node(tmp_path):
    config = Config.from_yaml(None, [])
    assert embeddings_dir(tmp_path / "work", "xquad-r-abc", config) == str(tmp_path / "work" / "embeddings" / "xquad-r-abc")
    assert embeddings_dir("s3://bucket/eval", "x", config) == "s3://bucket/eval/embeddings/x"


def test_the_texts_digest_changes_with_any_word_and_with_where_a_text_ends():
    def digest(*lists):
        return texts_digest(*(pa.chunked_array([pa.array(texts, pa.string())]) for texts in lists))

    base = digest(["what is a cat", "wer ist das"], ["a cat is an animal"])
    assert base == digest(["what is a cat", "wer ist das"], ["a cat is an animal"])
    assert base != digest(["what is a dog", "wer ist das"], ["a cat is an animal"])  # same count, other words
    assert digest(["ab", "c"]) != digest(["a", "bc"])
    assert digest(["ab"], ["c"]) != digest(["ab", "c"])
