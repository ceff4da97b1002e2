"""The one storage layer: every artifact raysys writes or reads back goes through a URI here.

A location is a local path, `file://...`, `s3://bucket/key`, `gs://bucket/key` or anything else
`pyarrow.fs` resolves (HDFS, ...); a shared NFS mount is a local path that every node sees.
S3-compatible servers other than AWS are configured the usual way: `AWS_ENDPOINT_URL` (or
`AWS_ENDPOINT_URL_S3`), `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`.

Writes are atomic: a local file is written to a temporary sibling, fsynced and renamed; an
object store's single PUT is atomic by itself (readers see the old object or the new one).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from raysys.errors import RaysysError


class StorageError(RaysysError):
    """A storage location that cannot be used (unreachable, no credentials, not shared)."""


def scheme(uri: str | os.PathLike) -> str:
    """'' for local paths (and file://), else the URI scheme ('s3', 'gs', ...)."""
    text = str(uri)
    if "://" not in text:
        return ""
    value = urlparse(text).scheme.lower()
    return "" if value == "file" else value


def is_remote(uri: str | os.PathLike) -> bool:
    return scheme(uri) != ""


def join(uri: str | os.PathLike, *parts: str) -> str:
    """Join path parts onto a URI or a local path (always with '/' for URIs)."""
    text = str(uri)
    if not is_remote(text):
        return str(Path(local_path(text), *parts))
    return "/".join([text.rstrip("/"), *(p.strip("/") for p in parts if p)])


def local_path(uri: str | os.PathLike) -> Path:
    text = str(uri)
    return Path(urlparse(text).path if text.startswith("file://") else text).expanduser()


def absolute(uri: str | os.PathLike) -> str:
    """Local paths made absolute (another process may have another working directory)."""
    return str(uri) if is_remote(uri) else str(local_path(uri).resolve())


def s3_filesystem(bucket_creation: bool = False) -> pafs.S3FileSystem:
    """S3FileSystem from the standard AWS variables; pyarrow itself does not read AWS_ENDPOINT_URL."""
    kwargs = {"allow_bucket_creation": bucket_creation}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kwargs.update(access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
                      session_token=os.environ.get("AWS_SESSION_TOKEN"))
    return pafs.S3FileSystem(**kwargs)


@lru_cache(maxsize=None)
def _filesystem_for(kind: str, env_key: tuple) -> pafs.FileSystem:
    if kind == "":
        return pafs.LocalFileSystem()
    if kind in ("s3", "s3a"):
        return s3_filesystem()
    return pafs.FileSystem.from_uri(f"{kind}://placeholder/")[0]


def _env_key() -> tuple:
    names = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION",
             "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN")
    return tuple(os.environ.get(n) for n in names)


def resolve(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a URI or local path."""
    kind = scheme(uri)
    if kind == "":
        return _filesystem_for("", ()), str(local_path(uri).absolute())
    if kind in ("s3", "s3a"):
        parsed = urlparse(str(uri))
        return _filesystem_for("s3", _env_key()), (parsed.netloc + parsed.path).rstrip("/")
    fs, path = pafs.FileSystem.from_uri(str(uri))
    return fs, path.rstrip("/")


def to_uri(filesystem: pafs.FileSystem | None, path: str) -> str:
    """The URI of `path` inside `filesystem` (Ray Train hands back scheme-less paths)."""
    if filesystem is None or "://" in path:
        return path
    kind = filesystem.type_name
    if kind == "local":
        return path
    prefix = {"s3": "s3", "gcs": "gs", "hdfs": "hdfs"}.get(kind, kind)
    return f"{prefix}://{path.lstrip('/')}"


def as_storage_error(uri, exc: BaseException) -> StorageError:
    text = " ".join(str(exc).split())
    hint = ""
    lowered = text.lower()
    if "access denied" in lowered or "credentials" in lowered or "forbidden" in lowered or "signature" in lowered:
        hint = " (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or the bucket's permissions)"
    elif "connect" in lowered or "curl" in lowered or "resolve host" in lowered or "timeout" in lowered:
        hint = " (storage not reachable: check AWS_ENDPOINT_URL and the network)"
    elif "bucket" in lowered and ("not found" in lowered or "does not exist" in lowered):
        hint = " (create the bucket first)"
    return StorageError(f"{uri}: {text[:300]}{hint}")


def file_type(uri) -> pafs.FileType:
    """NotFound, File or Directory (one metadata request; a one-line StorageError on failure)."""
    fs, path = resolve(uri)
    try:
        return fs.get_file_info(path).type
    except OSError as exc:
        raise as_storage_error(uri, exc) from None


def exists(uri) -> bool:
    return file_type(uri) != pafs.FileType.NotFound


def is_dir(uri) -> bool:
    return file_type(uri) == pafs.FileType.Directory


def is_file(uri) -> bool:
    return file_type(uri) == pafs.FileType.File


def makedirs(uri) -> None:
    fs, path = resolve(uri)
    try:
        fs.create_dir(path, recursive=True)
    except OSError as exc:
        raise as_storage_error(uri, exc) from None


def read_bytes(uri) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_json(uri):
    return json.loads(read_bytes(uri).decode("utf-8"))


def write_bytes(uri, data: bytes | str) -> str:
    """Atomic write of a whole file (creates parent directories)."""
    data = data.encode("utf-8") if isinstance(data, str) else data
    if not is_remote(uri):
        path = local_path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return str(path)
    fs, path = resolve(uri)
    try:
        with fs.open_output_stream(path) as f:  # one PUT: atomic on object stores
            f.write(data)
    except OSError as exc:
        raise as_storage_error(uri, exc) from None
    return str(uri)


def write_json(uri, obj, indent: int | None = 2) -> str:
    return write_bytes(uri, json.dumps(obj, indent=indent))


def list_files(uri) -> dict[str, int]:
    """{relative path: size} of every file under a directory (recursive); {} if it is missing."""
    fs, root = resolve(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except OSError as exc:
        raise as_storage_error(uri, exc) from None
    return {info.path[len(root):].lstrip("/"): info.size for info in infos if info.type == pafs.FileType.File}


def list_dirs(uri) -> list[str]:
    """Names of the direct subdirectories of a directory ([] if it is missing)."""
    fs, root = resolve(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=False, allow_not_found=True))
    except OSError as exc:
        raise as_storage_error(uri, exc) from None
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def mtime(uri) -> float:
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    return info.mtime.timestamp() if info.mtime else 0.0


def upload_dir(local_dir: str | os.PathLike, uri: str) -> str:
    """Copy a local directory's files to `uri` (its files land under `uri`/)."""
    dest_fs, dest = resolve(uri)
    try:
        dest_fs.create_dir(dest, recursive=True)
        pafs.copy_files(str(Path(local_dir).resolve()), dest, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=dest_fs, use_threads=True)
    except OSError as exc:
        raise as_storage_error(uri, exc) from None
    return uri


def download_dir(uri: str, local_dir: str | os.PathLike) -> Path:
    """Copy a stored directory into `local_dir` atomically: a temporary sibling, then a rename."""
    local_dir = Path(local_dir)
    local_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{local_dir.name}.download-", dir=local_dir.parent))
    src_fs, src = resolve(uri)
    try:
        pafs.copy_files(src, str(tmp), source_filesystem=src_fs, destination_filesystem=pafs.LocalFileSystem(),
                        use_threads=True)
        os.chmod(tmp, 0o755)
        if local_dir.exists():
            shutil.rmtree(local_dir)
        os.replace(tmp, local_dir)
    except OSError as exc:
        raise as_storage_error(uri, exc) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return local_dir


def delete_dir(uri) -> None:
    fs, path = resolve(uri)
    try:
        fs.delete_dir(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise as_storage_error(uri, exc) from None


def check_writable(uri: str, what: str = "storage") -> None:
    """Fail early, in one line, when a storage location cannot be written (unreachable server,
    missing credentials, missing bucket)."""
    probe = join(uri, f".raysys-probe-{os.getpid()}")
    try:
        write_bytes(probe, b"ok")
        if read_bytes(probe) != b"ok":
            raise StorageError(f"{uri}: a file written to {what} read back differently")
        fs, path = resolve(probe)
        fs.delete_file(path)
    except StorageError as exc:
        raise StorageError(f"{what} {exc}") from None
    except OSError as exc:
        raise StorageError(f"{what} {as_storage_error(uri, exc)}") from None
