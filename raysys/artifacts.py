"""Inputs resolved where they are used: directories published once to storage, materialised per node.

On a multi-node cluster a path on the driver's disk (the built default model in its cache, a
local model directory, a prepared dataset) means nothing to a process on another node. The
driver publishes such a directory under the run's storage, content-addressed
(`<storage>/published/<kind>/<name>-<digest>/`, a manifest written last), and ships the URI;
each node materialises a stored directory into its own cache once, under a file lock, and
checks every file's size against the manifest. Hub ids are left alone: every node loads them
from the hub itself. On one node nothing is copied.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import uuid
from pathlib import Path

from raysys import storage
from raysys.config import Config, cache_dir
from raysys.storage import StorageError

MANIFEST = ".raysys-published.json"  # written last: its presence means the upload completed
LOCAL_MARKER = ".raysys-materialized.json"


def storage_root(config: Config) -> str:
    """Where a run keeps what every node must see: train.storage_path (s3://, gs://, NFS) or
    <output_dir>/ray, made absolute."""
    return storage.absolute(config.train.storage_path or Path(config.output_dir, "ray"))


def dir_digest(local_dir: str | os.PathLike) -> str:
    """Content hash of a directory: every file's relative path and bytes."""
    root = Path(local_dir)
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def publish_dir(local_dir: str | os.PathLike, root: str, kind: str) -> str:
    """Upload a local directory under `root` once (same content, same URI); returns its URI."""
    local_dir = Path(local_dir)
    digest = dir_digest(local_dir)
    uri = storage.join(root, "published", kind, f"{local_dir.name}-{digest[:16]}")
    if storage.is_file(storage.join(uri, MANIFEST)):
        return uri
    print(f"[raysys] publishing {local_dir} to {uri} for the other nodes", flush=True)
    storage.upload_dir(local_dir, uri)
    files = {str(p.relative_to(local_dir)): p.stat().st_size for p in local_dir.rglob("*") if p.is_file()}
    storage.write_json(storage.join(uri, MANIFEST), {"digest": digest, "source": str(local_dir), "files": files})
    return uri


def materialize(uri: str) -> Path:
    """A stored directory as a local directory on this node: local paths as they are, remote ones
    downloaded once into <cache>/remote/ (under a lock, so concurrent workers download once)."""
    if not storage.is_remote(uri):
        return storage.local_path(uri)
    listing = storage.list_files(uri)
    if not listing:
        raise StorageError(f"{uri}: no such directory in storage (or it is empty)")
    key = hashlib.sha256((uri + repr(sorted(listing.items()))).encode()).hexdigest()[:16]
    target = cache_dir() / "remote" / f"{uri.rstrip('/').rsplit('/', 1)[-1]}-{key}"
    if (target / LOCAL_MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(f".{target.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if (target / LOCAL_MARKER).exists():
            return target
        storage.download_dir(uri, target)
        expected = listing
        if MANIFEST in listing:
            expected = storage.read_json(storage.join(uri, MANIFEST))["files"] | {MANIFEST: listing[MANIFEST]}
        for name, size in expected.items():
            found = (target / name).stat().st_size if (target / name).is_file() else None
            if found != size:
                raise StorageError(f"{uri}/{name}: {found} bytes downloaded, {size} stored; the copy is incomplete")
        storage.write_json(target / LOCAL_MARKER, {"uri": uri})
    return target


def nodes_not_seeing(files: dict[str, int | str]) -> tuple[list[str], int]:
    """Alive nodes on which some local file is missing or differs: `files` maps a path to its size
    in bytes or to its text. Returns (those nodes, how many nodes were asked)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def sees(expected: dict) -> bool:
        try:
            return all((Path(p).stat().st_size if isinstance(v, int) else Path(p).read_text()) == v
                       for p, v in expected.items())
        except OSError:
            return False

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    refs = {n["NodeManagerAddress"] + "/" + n["NodeID"][:8]: sees.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(files) for n in nodes}
    return [node for node, ref in refs.items() if not ray.get(ref)], len(refs)


def check_shared(root: str, what: str = "train.storage_path") -> None:
    """On a multi-node cluster a local storage path must be one filesystem that every node sees
    (NFS): write a token here, read it on every node, fail in one line when a node cannot."""
    if storage.is_remote(root):
        return
    token = uuid.uuid4().hex
    probe = storage.join(root, f".raysys-shared-{token}")
    storage.write_bytes(probe, token)
    try:
        blind, asked = nodes_not_seeing({probe: token})
    finally:
        Path(probe).unlink(missing_ok=True)
    if blind:
        raise StorageError(f"{what}={root} is a local path that {len(blind)} of {asked} nodes do not see "
                           f"(e.g. node {blind[0]}): on a multi-node cluster use s3://, gs:// or a filesystem "
                           "shared by every node (NFS)")


def distribute_model(model_path: str, config: Config) -> str:
    """The model reference to ship to workers: a URI every node can load, or the path itself on
    one node (and for hub ids, which every node loads from the hub)."""
    return _distribute(model_path, config, "models")


def distribute_dataset(location: str, config: Config) -> str:
    """The same for a dataset directory read on another node (a Tune trial's driver)."""
    return _distribute(location, config, "data")


def _distribute(location: str, config: Config, kind: str) -> str:
    from raysys.runtime import ensure_ray, is_multi_node

    if os.environ.get("RAY_ADDRESS"):  # a cluster: join it to see its nodes
        ensure_ray()
    if storage.is_remote(location) or not Path(location).is_dir() or not is_multi_node():
        return location
    root = storage_root(config)
    check_shared(root)
    return publish_dir(location, root, kind)
