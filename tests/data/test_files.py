"""User corpora: JSONL/Parquet round trips through Ray Data and a located error per bad input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysys.data.files import _read_with_ray, read_pairs, validate_pairs_file
from raysys.data.schema import PAIR_SCHEMA
from raysys.errors import DataError

ROWS = [
    {"id": "a", "lang": "en", "query": "Who?", "passage": "Ann did.", "hard_negative": "Bob did not."},
    {"id": "a", "lang": "de", "query": "Wer?", "passage": "Anna.", "group": "doc-1", "extra": 3},
    {"id": "b", "lang": "pt-BR", "query": "Quem?", "passage": "Ana.", "context": "Ana. Bia.", "hard_negative": ""},
]



def _jsonl(path: Path, rows: list, gz: bool = False) -> Path:
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
    return path


def _check_rows(rows: list[dict], file: Path) -> None:
    rows = sorted(rows, key=lambda r: r["origin"])
    assert [r["origin"] for r in rows] == [f"{file}:{i}" for i in (1, 2, 3)]
    assert rows[0]["group"] == "a" and rows[1]["group"] == "doc-1"  # group defaults to id
    assert rows[2]["lang"] == "pt-br" and rows[2]["hard_negative"] is None  # "" means not given
    assert rows[0]["hard_negative"] == ["Bob did not."] and rows[2]["context"] == "Ana. Bia."
    assert all(set(r) == set(PAIR_SCHEMA.names) for r in rows)


def test_jsonl_round_trip(ray_local, tmp_path):
    file = _jsonl(tmp_path / "pairs.jsonl", ROWS)
    ds = read_pairs(str(file))
    assert ds.schema().base_schema.equals(PAIR_SCHEMA)
    _check_rows(ds.take_all(), file)


def test_parquet_and_gz_and_directory(ray_local, tmp_path):
    table = pa.Table.from_pylist([{k: r.get(k) for k in ("id", "lang", "query", "passage", "group")} for r in ROWS])
    pq.write_table(table, tmp_path / "b.parquet")
    _jsonl(tmp_path / "a.jsonl.gz", ROWS, gz=True)
    (tmp_path / "notes.txt").write_text("ignored")
    rows = read_pairs(tmp_path).take_all()
    assert len(rows) == 6
    assert {r["origin"].rsplit("/", 1)[1] for r in rows} == {f"{n}:{i}" for n in ("a.jsonl.gz", "b.parquet")
                                                              for i in (1, 2, 3)}
    assert validate_pairs_file(tmp_path / "b.parquet").schema.equals(PAIR_SCHEMA)


def test_several_hard_negatives_per_row_in_jsonl_and_parquet(tmp_path):
    """A list of negatives keeps its order (training takes the first k); blank ones are dropped,
    and a list of only blanks means "not given", like an empty string."""
    rows = [{"id": "a", "lang": "en", "query": "q", "passage": "p", "hard_negative": ["n1", " ", "n2"]},
            {"id": "b", "lang": "en", "query": "q", "passage": "p", "hard_negative": [""]},
            {"id": "c", "lang": "en", "query": "q", "passage": "p", "hard_negative": "n3"}]
    expected = [["n1", "n2"], None, ["n3"]]
    from_jsonl = validate_pairs_file(_jsonl(tmp_path / "pairs.jsonl", rows))
    assert from_jsonl.column("hard_negative").to_pylist() == expected
    pq.write_table(pa.Table.from_pylist(rows[:2]), tmp_path / "pairs.parquet")  # a list<string> column
    assert validate_pairs_file(tmp_path / "pairs.parquet").column("hard_negative").to_pylist() == expected[:2]


def test_ray_task_path_validates_and_raises_data_error(ray_local, tmp_path):
    """The remote-URI path (files read inside Ray tasks), exercised on local files."""
    good = _jsonl(tmp_path / "good.jsonl", ROWS)
    _check_rows(_read_with_ray([str(good)]).take_all(), good)
    bad = _jsonl(tmp_path / "bad.jsonl", [ROWS[0], {**ROWS[1], "lang": "xx"}])
    with pytest.raises(DataError) as info:
        _read_with_ray([str(bad)]).take_all()
    assert (info.value.file, info.value.row, info.value.field) == (str(bad), 2, "lang")
    import ray.data

    assert not ray.data.DataContext.get_current().raise_original_map_exception  # only that dataset


@pytest.mark.parametrize("shared", [True, False], ids=["every-node-sees-them", "pinned-to-this-node"])
def test_large_local_inputs_stream_through_ray_tasks(ray_local, tmp_path, monkeypatch, shared):
    """Local inputs over the driver limit are read and validated inside Ray Data tasks: anywhere
    when every node sees the files, else in read tasks pinned to the driver's node."""
    from raysys.data import files

    monkeypatch.setattr(files, "DRIVER_READ_MAX_BYTES", 0)
    monkeypatch.setattr(files, "_every_node_sees", lambda paths: shared)
    monkeypatch.setattr(files, "validate_pairs_file", None)  # the driver path must not run
    good = _jsonl(tmp_path / "good.jsonl", ROWS)
    rows = read_pairs(good).take_all()
    assert sorted((r["id"], r["lang"]) for r in rows) == sorted((r["id"], r["lang"].lower()) for r in ROWS)
    bad = _jsonl(tmp_path / "bad.jsonl", [ROWS[0], {**ROWS[1], "lang": "xx"}])
    with pytest.raises(DataError) as info:
        read_pairs(bad).take_all()
    assert info.value.row == 2 and info.value.field == "lang" and str(info.value.file).endswith("bad.jsonl")


BAD_LINES = {
    "malformed json": (['{"id": "a", "lang": "en"', ], 1, None, "malformed JSON on line 1"),
    "missing field": ([{"id": "a", "lang": "en", "query": "q"}], 1, "passage", "missing"),
    "null field": ([{"id": "a", "lang": "en", "query": None, "passage": "p"}], 1, "query", "null"),
    "non-string": ([{"id": 5, "lang": "en", "query": "q", "passage": "p"}], 1, "id", "expected a string, got int"),
    "non-string optional": ([{"id": "a", "lang": "en", "query": "q", "passage": "p", "group": [1]}], 1, "group", "got list"),
    "non-string negative": ([{"id": "a", "lang": "en", "query": "q", "passage": "p", "hard_negative": ["n", 3]}], 1,
                            "hard_negative", "expected a string or a list of strings"),
    "empty text": ([ROWS[0], {"id": "a", "lang": "de", "query": "q", "passage": "  "}], 2, "passage", "empty text"),
    "unknown language": ([{"id": "a", "lang": "english", "query": "q", "passage": "p"}], 1, "lang", "unknown language"),
    "duplicate id/lang": ([ROWS[0], "", ROWS[0]], 3, "id", "first on row 1"),
    "not an object": (["[1, 2]"], 1, None, "expected a JSON object"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_line_is_located(tmp_path, case):
    rows, line, field, text = BAD_LINES[case]
    file = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as info:
        validate_pairs_file(file)
    message = str(info.value)
    assert str(file) in message and f"row {line}" in message and text in message, message
    assert info.value.row == line and info.value.field == field


def test_bad_bytes_and_empty_files(tmp_path):
    file = tmp_path / "latin1.jsonl"
    file.write_bytes(json.dumps(ROWS[0]).encode() + b"\n" + '{"id": "b", "lang": "fr", "query": "Où?", '
                     '"passage": "Là."}'.encode("latin-1") + b"\n")
    with pytest.raises(DataError, match=r"latin1\.jsonl, row 2: invalid UTF-8"):
        validate_pairs_file(file)
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.jsonl: file is empty \(0 bytes\)"):
        validate_pairs_file(tmp_path / "empty.jsonl")
    (tmp_path / "blank.jsonl").write_text("\n \n")
    with pytest.raises(DataError, match="no rows"):
        validate_pairs_file(tmp_path / "blank.jsonl")


def test_bad_parquet(tmp_path):
    pq.write_table(pa.table({"id": ["a"], "lang": ["en"], "query": ["q"]}), tmp_path / "x.parquet")
    with pytest.raises(DataError, match=r"x\.parquet, field 'passage': required column is missing"):
        validate_pairs_file(tmp_path / "x.parquet")
    pq.write_table(pa.table({"id": ["a", "b"], "lang": ["en", "en"], "query": ["q", "q"], "passage": ["p", ""]}),
                   tmp_path / "y.parquet")
    with pytest.raises(DataError, match=r"y\.parquet, row 2, field 'passage': empty text"):
        validate_pairs_file(tmp_path / "y.parquet")
    (tmp_path / "z.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        validate_pairs_file(tmp_path / "z.parquet")


def test_missing_or_unsupported_paths(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_pairs(str(tmp_path / "nope.jsonl"))
    (tmp_path / "data.csv").write_text("id,lang\n")
    with pytest.raises(DataError, match="unsupported file type"):
        read_pairs([str(tmp_path / "data.csv")])
    (tmp_path / "sub").mkdir()
    with pytest.raises(DataError, match="holds no"):
        read_pairs(str(tmp_path / "sub"))
