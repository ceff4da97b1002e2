"""A MIRACL-style corpus read in byte ranges by the encoder actors: every line once, bad lines
located in the whole file, docids kept beside the embeddings and streamed back by the driver."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from raysys.errors import DataError
from raysys.eval.corpus_stream import (_write_slice, check_corpus, corpus_slices, docids_of, encode_corpus,
                                       read_corpus_slice)
from raysys.eval.embeddings import encoder_settings
from raysys.config import Config

GOOD = {"docid": "d1", "title": "t", "text": "x"}


def _jsonl(records, newline="\n"):
    return "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + newline for r in records)


def _corpus(n: int = 60) -> list:
    """Passages of very different lengths (some longer than the byte ranges), titles and none,
    non-ASCII text, and blank lines between them."""
    records = []
    for i in range(n):
        records.append({"docid": f"doc-{i}", "title": "Zürich" if i % 3 == 0 else "",
                        "text": f"passage {i} " + "wort " * (i * 7 % 50)})
        if i % 11 == 0:
            records.append("   ")
    return records


def _expected(records):
    return [(r["docid"], f"{r['title']} {r['text']}" if r["title"] else r["text"]) for r in records if isinstance(r, dict)]


def _read_all(path, slice_bytes):
    out = []
    for start, end in corpus_slices(str(path), slice_bytes):
        docids, passages = read_corpus_slice(str(path), start, end)
        out.extend(zip(docids, passages))
    return out


@pytest.mark.parametrize("slice_bytes", [1, 7, 64, 333, 1 << 20])
@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_byte_ranges_read_every_line_once(tmp_path, slice_bytes, newline):
    records = _corpus()
    path = tmp_path / "corpus.jsonl"
    path.write_text(_jsonl(records, newline).rstrip("\n"), encoding="utf-8")  # the last line without a newline
    assert _read_all(path, slice_bytes) == _expected(records)


def test_a_gz_corpus_is_one_range(tmp_path):
    records = _corpus(20)
    path = tmp_path / "corpus.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(_jsonl(records))
    assert corpus_slices(str(path), 16) == [(0, path.stat().st_size)]
    assert _read_all(path, 16) == _expected(records)


@pytest.mark.parametrize("bad, field", [
    ('{"docid": "d2", "title": "t", ', "json"),
    ('["d2", "t", "x"]', "json"),
    ({"title": "t", "text": "x"}, "docid"),
    ({"docid": "d2", "text": "x"}, "title"),
    ({"docid": "d2", "title": "t"}, "text"),
    ({"docid": 7, "title": "t", "text": "x"}, "docid"),
    ({"docid": "", "title": "t", "text": "x"}, "docid"),
    ({"docid": "d2", "title": None, "text": "x"}, "title"),
    ({"docid": "d2", "title": "t", "text": ["x"]}, "text"),
])
def test_a_bad_line_names_its_line_in_the_whole_file(tmp_path, bad, field):
    records = _corpus(40)
    records.insert(33, bad)
    path = tmp_path / "corpus.jsonl"
    path.write_text(_jsonl(records), encoding="utf-8")
    with pytest.raises(DataError) as e:
        _read_all(path, 50)  # the bad line is far from the first range
    assert e.value.row == 34 and e.value.field == field, str(e.value)
    assert "corpus.jsonl" in str(e.value) and "row 34" in str(e.value)


def test_invalid_utf8_names_its_line(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(_jsonl(_corpus(5)).encode() + b'{"docid": "x", "title": "\xff", "text": "y"}\n')
    with pytest.raises(DataError, match="row 7"):
        _read_all(path, 64)


def _stored(tmp_path, path, slice_bytes=80):
    """Shard files as the encoder actors write them (zero embeddings: the docids are under test)."""
    files = []
    for i, (start, end) in enumerate(corpus_slices(str(path), slice_bytes)):
        docids, _ = read_corpus_slice(str(path), start, end)
        shard = str(tmp_path / "emb" / f"corpus-{i:05d}.npz")
        _write_slice(shard, np.zeros((len(docids), 4), np.float32), docids, (start, end), None)
        files.append((shard, len(docids)))
    return files


def test_docids_of_names_rows_from_the_docid_files(tmp_path):
    records = _corpus(30)
    path = tmp_path / "corpus.jsonl"
    path.write_text(_jsonl(records), encoding="utf-8")
    files = _stored(tmp_path, path)
    assert len(files) > 3
    rows = np.array([[0, 29, -1], [17, 17, 5]])
    assert docids_of(files, rows) == {0: "doc-0", 29: "doc-29", 17: "doc-17", 5: "doc-5"}


def test_check_corpus_finds_judged_documents(ray_local, tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text(_jsonl(_corpus(30)), encoding="utf-8")
    assert check_corpus(str(path), {"doc-3", "doc-29", "nope"}, slice_bytes=80) == {"doc-3", "doc-29"}


def test_check_corpus_locates_a_duplicate_docid_in_another_range(ray_local, tmp_path):
    records = _corpus(30)
    again = {"docid": "doc-2", "title": "", "text": "again"}
    records.insert(25, again)
    path = tmp_path / "corpus.jsonl"
    path.write_text(_jsonl(records), encoding="utf-8")
    with pytest.raises(DataError) as e:
        check_corpus(str(path), set(), display="my/corpus.jsonl", slice_bytes=80)
    assert e.value.row == records.index(again) + 1 and e.value.field == "docid"
    assert str(e.value).startswith(f"my/corpus.jsonl, row {records.index(again) + 1}, field 'docid': duplicate document id 'doc-2'")


def test_check_corpus_names_a_bad_line_through_ray(ray_local, tmp_path):
    records = _corpus(30)
    records.insert(27, {"docid": "x", "title": "t", "text": 3})
    path = tmp_path / "corpus.jsonl"
    path.write_text(_jsonl(records), encoding="utf-8")
    with pytest.raises(DataError) as e:
        check_corpus(str(path), set(), slice_bytes=80)
    assert str(e.value).startswith(f"{path}, row 28, field 'text': expected a string")


def test_encode_corpus_matches_encoding_the_passages(ray_local, tmp_path, tiny_model_dir):
    """The actors' embeddings equal the in-memory encoder's on the same passages, in file order;
    a second call reuses every shard; a bad line fails with its line, through Ray."""
    from raysys.eval.encode import encode_texts, read_embeddings

    records = _corpus(25)
    path = tmp_path / "corpus.jsonl"
    path.write_text(_jsonl(records), encoding="utf-8")
    settings = encoder_settings(Config.from_yaml(None, ["eval.max_length=32"]))
    kwargs = dict(name="corpus", model_path=str(tiny_model_dir), settings=settings, progress=False, slice_bytes=500)
    files = encode_corpus(str(path), out_dir=str(tmp_path / "emb"), **kwargs)
    assert len(files) > 2 and sum(n for _, n in files) == 25
    passages = [p for _, p in _expected(records)]
    expected = encode_texts(passages, "passage", name="passages", model_path=str(tiny_model_dir), settings=settings,
                            out_dir=str(tmp_path / "reference"), progress=False)
    # other batch shapes round differently: equal to float32 precision, not bit for bit
    np.testing.assert_allclose(read_embeddings(files), expected, rtol=1e-5, atol=1e-6)
    mtimes = [(tmp_path / "emb" / f"corpus-{i:05d}.npz").stat().st_mtime_ns for i in range(len(files))]
    assert encode_corpus(str(path), out_dir=str(tmp_path / "emb"), **kwargs) == files
    assert [(tmp_path / "emb" / f"corpus-{i:05d}.npz").stat().st_mtime_ns for i in range(len(files))] == mtimes

    records.insert(20, {"docid": "bad", "title": "t"})
    path.write_text(_jsonl(records), encoding="utf-8")
    with pytest.raises(DataError) as e:
        encode_corpus(str(path), out_dir=str(tmp_path / "emb-bad"), display="my/corpus.jsonl", **kwargs)
    assert e.value.row == 21 and e.value.field == "text" and str(e.value).startswith("my/corpus.jsonl, row 21")
