"""raysys.storage against a local directory and a real S3 server (SeaweedFS): the same calls,
the same results; atomic writes; one-line errors for an unreachable server and bad credentials."""

from __future__ import annotations

import os

import pytest

from raysys import storage
from raysys.storage import StorageError


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    server = request.getfixturevalue("s3_env")
    return server.uri("storage-test", request.node.name.replace("[", "-").replace("]", ""))


def test_write_read_list_and_copy_directories(root, tmp_path):
    storage.write_json(storage.join(root, "a", "state.json"), {"step": 3})
    storage.write_bytes(storage.join(root, "a", "deep", "blob.bin"), b"x" * 1000)
    assert storage.read_json(storage.join(root, "a", "state.json")) == {"step": 3}
    assert storage.list_files(storage.join(root, "a")) == {"state.json": len('{\n  "step": 3\n}'), "deep/blob.bin": 1000}
    assert storage.is_dir(storage.join(root, "a")) and storage.is_file(storage.join(root, "a", "state.json"))
    assert not storage.exists(storage.join(root, "missing"))
    assert storage.list_files(storage.join(root, "missing")) == {}
    assert storage.list_dirs(root) == ["a"]

    local = tmp_path / "src"
    (local / "sub").mkdir(parents=True)
    (local / "sub" / "f.txt").write_text("hello")
    (local / "g.txt").write_text("world")
    storage.upload_dir(local, storage.join(root, "copy"))
    assert storage.list_files(storage.join(root, "copy")) == {"sub/f.txt": 5, "g.txt": 5}
    back = storage.download_dir(storage.join(root, "copy"), tmp_path / "back")
    assert (back / "sub" / "f.txt").read_text() == "hello" and (back / "g.txt").read_text() == "world"
    assert not [p for p in tmp_path.iterdir() if ".download-" in p.name], "the temporary download dir stayed"


def test_uris_keep_their_scheme():
    assert storage.join("s3://bucket/runs", "x", "hf_model") == "s3://bucket/runs/x/hf_model"
    assert storage.join("/data/runs", "x") == "/data/runs/x"
    assert storage.is_remote("s3://b/k") and storage.is_remote("gs://b/k")
    assert not storage.is_remote("/tmp/x") and not storage.is_remote("file:///tmp/x")
    fs, path = storage.resolve("s3://bucket/runs/x")
    assert path == "bucket/runs/x" and storage.to_uri(fs, path) == "s3://bucket/runs/x"
    local_fs, local = storage.resolve("/tmp/x")
    assert storage.to_uri(local_fs, local) == "/tmp/x"


def test_local_writes_are_atomic(tmp_path):
    target = tmp_path / "f.json"
    storage.write_json(target, {"v": 1})
    storage.write_json(target, {"v": 2})
    assert storage.read_json(target) == {"v": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"], "a temporary file was left behind"


def test_unreachable_server_is_one_line(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StorageError) as info:
        storage.check_writable("s3://bucket/runs", "train.storage_path")
    message = str(info.value)
    assert "\n" not in message and "train.storage_path" in message and "not reachable" in message


def test_wrong_credentials_are_one_line(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(StorageError) as info:
        storage.check_writable(s3_env.uri("runs"), "train.storage_path")
    message = str(info.value)
    assert "\n" not in message and "AWS_SECRET_ACCESS_KEY" in message, message


def test_materialize_downloads_a_published_directory_once(s3_env, tmp_path, monkeypatch):
    from raysys.artifacts import materialize, publish_dir

    monkeypatch.setenv("RAYSYS_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"a": 1}')
    (model / "weights.bin").write_bytes(os.urandom(4096))
    uri = publish_dir(model, s3_env.uri("publish-test"), "models")
    assert uri == publish_dir(model, s3_env.uri("publish-test"), "models"), "same content, same URI"
    local = materialize(uri)
    assert (local / "weights.bin").read_bytes() == (model / "weights.bin").read_bytes()
    assert str(local).startswith(str(tmp_path / "cache"))
    (local / "config.json").write_text("changed locally")  # a second call does not download again
    assert materialize(uri) == local and (local / "config.json").read_text() == "changed locally"
    (model / "config.json").write_text('{"a": 2}')
    assert publish_dir(model, s3_env.uri("publish-test"), "models") != uri, "new content, new URI"
