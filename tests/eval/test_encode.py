"""The Ray Data encoder: same embeddings as the model itself, in row order; shard-level resume;
the opt-in fast paths stay close to fp32 (tiny random BERT, so this runs in seconds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raysys.errors import ConfigError
from raysys.eval import encode
from raysys.eval.encode import EncoderActor, encode_texts, token_budget_chunks
from raysys.model.encoder import BiEncoder, EncoderSettings

SETTINGS = EncoderSettings(max_query_length=24, max_passage_length=40)
SHARD = 5


def _texts() -> tuple[list[str], list[str]]:
    """Lengths deliberately out of row order (long, short, long, ...), queries and passages mixed,
    some longer than the length limits (truncation)."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "épsilon", "zeta", "ηta", "theta", "iota", "kappa"]
    texts, kinds = [], []
    for i in range(23):
        n = int(rng.integers(1, 4)) if i % 2 else int(rng.integers(6, 14))
        texts.append(" ".join(rng.choice(words, n)))
        kinds.append("query" if i % 3 else "passage")
    return texts, kinds


def _direct(model_dir, texts, kinds) -> np.ndarray:
    model = BiEncoder.from_pretrained(str(model_dir), SETTINGS).eval()
    with torch.no_grad():
        return np.stack([model.encode_texts([t], k)[0].numpy() for t, k in zip(texts, kinds)])


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, tiny_model_dir, ray_local):
    texts, kinds = _texts()
    out_dir = tmp_path_factory.mktemp("emb")
    emb = encode_texts(texts, kinds, model_path=str(tiny_model_dir), settings=SETTINGS, out_dir=out_dir,
                       name="mixed", shard_size=SHARD, batch_tokens=64, threads=1, progress=False)
    return texts, kinds, out_dir, emb


def _shards(out_dir):
    return sorted(out_dir.glob("mixed-*.npz"))


def test_embeddings_equal_the_model_in_row_order(encoded, tiny_model_dir):
    texts, kinds, out_dir, emb = encoded
    assert emb.shape == (len(texts), 32) and emb.dtype == np.float32
    assert len(_shards(out_dir)) == -(-len(texts) // SHARD)
    np.testing.assert_allclose(emb, _direct(tiny_model_dir, texts, kinds), atol=1e-5)


def test_resume_encodes_only_missing_or_torn_shards(encoded, tiny_model_dir):
    texts, kinds, out_dir, emb = encoded
    shards = _shards(out_dir)
    before = {p.name: p.stat().st_mtime_ns for p in shards}
    shards[1].unlink()
    shards[3].write_bytes(shards[3].read_bytes()[:100])  # torn write
    again = encode_texts(texts, kinds, model_path=str(tiny_model_dir), settings=SETTINGS, out_dir=out_dir,
                         name="mixed", shard_size=SHARD, batch_tokens=64, threads=1, progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in _shards(out_dir)}
    assert set(after) == set(before)
    changed = sorted(n for n in after if after[n] != before[n])
    assert changed == [shards[1].name, shards[3].name]
    np.testing.assert_allclose(again, emb, atol=1e-6)
    assert not list(out_dir.glob("*.tmp.npz"))


def test_several_sets_in_one_pipeline(encoded, tiny_model_dir, tmp_path):
    """Queries and candidates encoded together (one actor pool): each set's files hold exactly its
    own rows, equal to the set encoded alone, also where an actor batch spans both sets."""
    texts, kinds, _, emb = encoded
    queries = [t for t, k in zip(texts, kinds) if k == "query"]  # 15 rows: shards of 5, 5, 5
    passages = [t for t, k in zip(texts, kinds) if k == "passage"]  # 8 rows: 5 + a short 3
    files = encode.encode_sets({"p": (passages, "passage"), "q": (queries, "query")},
                               model_path=str(tiny_model_dir), settings=SETTINGS, out_dir=tmp_path,
                               shard_size=SHARD, batch_tokens=64, threads=1, progress=False)
    assert [n for _, n in files["p"]] == [5, 3] and [n for _, n in files["q"]] == [5, 5, 5]
    assert [u.rsplit("/", 1)[-1] for u, _ in files["q"]] == ["q-00000.npz", "q-00001.npz", "q-00002.npz"]
    is_query = np.array(kinds) == "query"
    np.testing.assert_allclose(encode.read_embeddings(files["q"]), emb[is_query], atol=1e-5)
    np.testing.assert_allclose(encode.read_embeddings(files["p"]), emb[~is_query], atol=1e-5)
    mtimes = {u: (tmp_path / u.rsplit("/", 1)[-1]).stat().st_mtime_ns for u, _ in files["p"] + files["q"]}
    (tmp_path / "q-00001.npz").unlink()  # only that shard is encoded again
    again = encode.encode_sets({"p": (passages, "passage"), "q": (queries, "query")},
                               model_path=str(tiny_model_dir), settings=SETTINGS, out_dir=tmp_path,
                               shard_size=SHARD, batch_tokens=64, threads=1, progress=False)
    assert again == files
    changed = [u for u in mtimes if (tmp_path / u.rsplit("/", 1)[-1]).stat().st_mtime_ns != mtimes[u]]
    assert [u.rsplit("/", 1)[-1] for u in changed] == ["q-00001.npz"]


class SkipsTheFirstShard(EncoderActor):
    """A faulty encoder (test fixture): it never writes or reports shard 0."""

    def __call__(self, batch):
        yield from super().__call__({k: v[batch["first"] > 0] for k, v in batch.items()})


def test_a_shard_missing_from_the_encoder_output_is_an_error(monkeypatch, tiny_model_dir, tmp_path, ray_local):
    monkeypatch.setattr(encode, "EncoderActor", SkipsTheFirstShard)
    texts, kinds = _texts()
    with pytest.raises(RuntimeError, match=r"q-00000\.npz'\] were not written by the encoders"):
        encode.encode_sets({"q": (texts, kinds)}, model_path=str(tiny_model_dir), settings=SETTINGS,
                           out_dir=tmp_path, shard_size=SHARD, threads=1, progress=False)
    assert not (tmp_path / "q-00000.npz").exists() and (tmp_path / "q-00001.npz").exists()


def test_the_driver_receives_paths_and_counts_only(monkeypatch, tiny_model_dir, tmp_path, ray_local):
    """The actors write the shards (two actors here); what reaches the driver is one (path, rows)
    record per shard, never an embedding."""
    import ray.data

    seen = []
    real = ray.data.Dataset.iter_batches

    def recording(self, *args, **kwargs):  # test fixture: what each batch handed to the driver holds
        for batch in real(self, *args, **kwargs):
            seen.append({k: np.asarray(v) for k, v in batch.items()})
            yield batch

    monkeypatch.setattr(ray.data.Dataset, "iter_batches", recording)
    texts, kinds = _texts()
    files = encode.encode_sets({"q": (texts, kinds)}, model_path=str(tiny_model_dir), settings=SETTINGS,
                               out_dir=tmp_path, shard_size=SHARD, batch_tokens=64, threads=1, num_encoders=2,
                               progress=False)
    assert {k for batch in seen for k in batch} == {"path", "rows"}
    records = sorted(zip(*(np.concatenate([b[k] for b in seen]).tolist() for k in ("path", "rows"))))
    assert records == sorted(files["q"]) and sum(n for _, n in records) == len(texts)
    np.testing.assert_allclose(encode.read_embeddings(files["q"]), _direct(tiny_model_dir, texts, kinds), atol=1e-5)


def _actor_embeddings(model_dir, texts, kinds, fast_path):
    actor = EncoderActor(str(model_dir), vars(SETTINGS), batch_tokens=48, threads=1, fast_path=fast_path)
    return actor.embed_texts(texts, kinds)


@pytest.mark.parametrize("fast_path", ["int8", "bf16"])
def test_fast_path_is_close_to_fp32(tiny_model_dir, fast_path):
    texts, kinds = _texts()
    exact = _actor_embeddings(tiny_model_dir, texts, kinds, None)
    np.testing.assert_allclose(exact, _direct(tiny_model_dir, texts, kinds), atol=1e-5)
    fast = _actor_embeddings(tiny_model_dir, texts, kinds, fast_path)
    cosine = (fast * exact).sum(1) / np.linalg.norm(fast, axis=1) / np.linalg.norm(exact, axis=1)
    assert cosine.min() > 0.95


def test_a_shard_is_reused_only_by_the_same_fast_path(tmp_path):
    path = tmp_path / "c-00000.npz"
    rows, embeddings = np.arange(3), np.repeat(np.arange(3, dtype=np.float32)[:, None], 4, axis=1)
    encode._write_shard(path, rows, embeddings, "int8")
    assert encode._valid_shard(path, 0, 3, 3, "int8")
    assert not encode._valid_shard(path, 0, 3, 3, None)
    encode._write_shard(path, rows, embeddings)
    assert encode._valid_shard(path, 0, 3, 3, None) and not encode._valid_shard(path, 0, 3, 3, "bf16")


def test_fast_path_names(tmp_path):
    assert encode.check_fast_path(None) is None and encode.check_fast_path("none") is None
    assert encode.check_fast_path("INT8") == "int8"
    with pytest.raises(ConfigError, match="fast_path"):
        encode.check_fast_path("fp8")
    with pytest.raises(ConfigError, match="fast_path"):
        encode_texts(["a"], "query", model_path="unused", settings=SETTINGS, out_dir=tmp_path / "never",
                     name="x", fast_path="onnx")
    assert not (tmp_path / "never").exists()


def test_token_budget_chunks_cover_every_row_within_budget():
    lengths = [5, 30, 2, 9, 9, 100, 1, 17]
    chunks = token_budget_chunks(lengths, 32)
    assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))
    flat = [lengths[i] for c in chunks for i in c]
    assert flat == sorted(flat)  # shortest first
    for c in chunks:
        assert len(c) == 1 or max(lengths[i] for i in c) * len(c) <= 32
