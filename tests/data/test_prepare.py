"""Named datasets: copy or download into the cache, verified by SHA-256, published atomically.
The network is never touched: the download function is replaced with monkeypatch."""

from __future__ import annotations

import json
import shutil
import urllib.error
from pathlib import Path

import pytest

from raysys.data import prepare
from raysys.data.prepare import DATASETS, MANIFEST, resolve_dataset
from raysys.errors import DataError

XQUAD_FILES = DATASETS["xquad-r"].files


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("RAYSYS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(prepare.SOURCE_ENV, raising=False)

    def no_network(url, timeout):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(prepare, "_fetch_url", no_network)
    return tmp_path / "cache"


def test_copy_from_source_dir_verifies_and_is_reused(cache, xquad_r_dir, monkeypatch):
    target = resolve_dataset("xquad-r", source_dir=xquad_r_dir)
    assert target == cache / "data" / "xquad-r"
    manifest = json.loads((target / MANIFEST).read_text())
    assert all(manifest["files"][f]["verified"] for f in XQUAD_FILES)
    assert all((target / f).read_bytes() == (xquad_r_dir / f).read_bytes() for f in XQUAD_FILES)
    assert (target / "LICENSE").exists()
    assert [p.name for p in (cache / "data").iterdir()] == ["xquad-r"]  # no staging left behind

    def must_not_fetch(*args):
        raise AssertionError("a complete cache must not be refilled")

    monkeypatch.setattr(prepare, "_fetch_one", must_not_fetch)
    assert resolve_dataset("xquad-r") == target


def test_env_var_source_and_incomplete_cache_refill(cache, xquad_r_dir, monkeypatch):
    broken = cache / "data" / "xquad-r"
    broken.mkdir(parents=True)
    (broken / "en.json").write_text("half")  # no manifest: an interrupted earlier attempt
    monkeypatch.setenv(prepare.SOURCE_ENV, str(xquad_r_dir))
    target = resolve_dataset("xquad-r")
    assert (target / MANIFEST).exists() and (target / "en.json").stat().st_size > 1000


def test_corrupted_file_is_named(cache, xquad_r_dir, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(xquad_r_dir, source)
    (source / "de.json").chmod(0o644)
    with open(source / "de.json", "ab") as handle:
        handle.write(b" ")
    with pytest.raises(DataError, match=r"de\.json: SHA-256 mismatch") as info:
        resolve_dataset("xquad-r", source_dir=source)
    assert str(source / "de.json") in str(info.value)
    assert not (cache / "data" / "xquad-r").exists()
    assert list((cache / "data").iterdir()) == []


def test_missing_source_and_no_network_names_both_ways(cache, tmp_path):
    with pytest.raises(DataError) as info:
        resolve_dataset("xquad-r", source_dir=tmp_path / "empty")
    message = str(info.value)
    assert "ar.json" in message and "--source-dir" in message
    assert "raw.githubusercontent.com" in message and "network disabled" in message
    with pytest.raises(DataError, match="--source-dir"):
        resolve_dataset("xquad-r")


def test_download_path_verifies_hashes(cache, xquad_r_dir, monkeypatch):
    seen = []

    def fake_download(url, timeout):
        seen.append(url)
        return (xquad_r_dir / url.rsplit("/", 1)[1]).read_bytes()

    monkeypatch.setattr(prepare, "_fetch_url", fake_download)
    target = resolve_dataset("xquad-r")
    assert seen[0] == "https://raw.githubusercontent.com/google-research-datasets/lareqa/master/xquad-r/ar.json"
    assert json.loads((target / MANIFEST).read_text())["source"] == "download"

    shutil.rmtree(target)
    monkeypatch.setattr(prepare, "_fetch_url", lambda url, timeout: b"<html>rate limited</html>")
    with pytest.raises(DataError, match=r"raw\.githubusercontent\.com.*ar\.json: SHA-256 mismatch"):
        resolve_dataset("xquad-r")


def test_unhashed_dataset_is_copied_and_recorded(cache, tmp_path):
    source = tmp_path / "mlqa"
    source.mkdir()
    for file in DATASETS["mlqa-r"].files:
        (source / file).write_text('{"data": []}')
    target = resolve_dataset("mlqa-r", source_dir=source)
    record = json.loads((target / MANIFEST).read_text())["files"]["en.json"]
    assert record["verified"] is False and len(record["sha256"]) == 64


def test_other_names_pass_through(cache, tmp_path):
    assert resolve_dataset("s3://bucket/pairs/") == "s3://bucket/pairs/"
    assert resolve_dataset(tmp_path) == tmp_path
