"""Named datasets in the cache: `resolve_dataset("xquad-r")` -> `<cache>/data/xquad-r`, filled
once by copying from a local source directory or downloading from the public LAReQA repository,
with every file's SHA-256 checked (where known) and the directory published atomically, so an
interrupted prepare never leaves a half-filled directory that looks complete."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from raysys.config import cache_dir
from raysys.errors import DataError

SOURCE_ENV = "RAYSYS_DATA_SOURCE"
MANIFEST = ".raysys-manifest.json"  # hidden from LAReQA readers; written last: its presence means the directory is complete
DOWNLOAD_TIMEOUT_S = 60


@dataclass(frozen=True)
class DatasetSpec:
    languages: tuple[str, ...]
    url_template: str  # formatted with file=<lang>.json
    sha256: dict[str, str] | None  # None: no published hashes; computed ones are recorded

    @property
    def files(self) -> list[str]:
        return [f"{lang}.json" for lang in self.languages]


_LAREQA = "https://raw.githubusercontent.com/google-research-datasets/lareqa/master"
DATASETS: dict[str, DatasetSpec] = {
    "xquad-r": DatasetSpec(
        languages=("ar", "de", "el", "en", "es", "hi", "ru", "th", "tr", "vi", "zh"),
        url_template=_LAREQA + "/xquad-r/{file}",
        sha256={
            "ar.json": "c52922d3b8ac1ae03ed5ac38647ad59870dca3dda2beefe18ecdc30729acb69d",
            "de.json": "16fb0f4bf4916154b585a20c24c66074591c9718a1affe764ff4697572328949",
            "el.json": "163fd43ee785a30eb534ae2061e9eaa766a7ee4e8ffce5e4b422480c150f64b6",
            "en.json": "7b0954f39297c27a31fef610f0883337dd2907fa8699151dc922afdd0fa12ffe",
            "es.json": "f8e836b2d91009c4363e04315f7ede363eedbbb49c67dda60de6c4aa782f58de",
            "hi.json": "ea45ba8ae4513d1533b222bebdc02a90bc319c055d3aeea68584a053d2e92872",
            "ru.json": "7f4dff853538b9a5fcc28c070b8bb983a5c5d190ac747b8e005a1ada9cab18f1",
            "th.json": "c3a041864c3a9fb0b4dd91cfdf99cf36b411b3e704c58a303c97bc6dc786cfe4",
            "tr.json": "f3e8c13002bbce154a4578f535f7533cb70f3da08840e6b62735935baec7bd94",
            "vi.json": "e35926bf5cc6fc6ecbdfca49467aabeb454f08d152d7818143a906bd31dde995",
            "zh.json": "80c2cde7b9c2fb134c303cbb52f2ba396ead9eb0014aec43993543d2ba9e93ed",
        }),
    # The mlqa-r/ path in the LAReQA repository is unverified from here (no network).
    "mlqa-r": DatasetSpec(languages=("ar", "de", "en", "es", "hi", "vi", "zh"),
                          url_template=_LAREQA + "/mlqa-r/{file}", sha256=None),
}


def resolve_dataset(name_or_path: str | Path, source_dir: str | Path | None = None) -> Path | str:
    """A known dataset name -> its prepared cache directory; a dataset directory published to
    storage by a driver (raysys.artifacts) -> its copy in this node's cache; anything else
    (local paths, JSONL/Parquet URIs that Ray Data reads directly) is returned as is."""
    if str(name_or_path) not in DATASETS:
        from raysys import storage
        from raysys.artifacts import MANIFEST, materialize

        # Only raysys's own published directories (<storage>/published/data/...): a user's data URI is
        # read by Ray Data as it is, without a storage round trip here.
        if (storage.is_remote(name_or_path) and "/published/data/" in str(name_or_path)
                and storage.is_file(storage.join(str(name_or_path), MANIFEST))):
            return materialize(str(name_or_path))
        return name_or_path
    name = str(name_or_path)
    target = cache_dir() / "data" / name
    if is_complete(target, DATASETS[name]):
        return target
    source = source_dir if source_dir is not None else os.environ.get(SOURCE_ENV) or None
    return prepare_dataset(name, source)


def is_complete(target: Path, spec: DatasetSpec) -> bool:
    """The manifest exists and every file is there with its recorded size (cheap; no hashing)."""
    try:
        manifest = json.loads((target / MANIFEST).read_text(encoding="utf-8"))
        return all((target / f).stat().st_size == manifest["files"][f]["bytes"] for f in spec.files)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def prepare_dataset(name: str, source_dir: str | Path | None = None) -> Path:
    """Fill `<cache>/data/<name>` from `source_dir` or the network, verified, atomically."""
    spec = DATASETS[name]
    data_root = cache_dir() / "data"
    target = data_root / name
    staging = data_root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        record = {f: _fetch_one(name, spec, f, source_dir, staging) for f in spec.files}
        manifest = {"dataset": name, "source": str(source_dir) if source_dir else "download",
                    "files": record}
        _write_atomic(staging / MANIFEST, json.dumps(manifest, indent=1).encode("utf-8"))
        if source_dir is not None and (Path(source_dir) / "LICENSE").is_file():
            shutil.copyfile(Path(source_dir) / "LICENSE", staging / "LICENSE")  # CC BY-SA travels along
        if is_complete(target, spec):  # another process finished first
            return target
        if target.exists():  # an incomplete earlier attempt
            shutil.rmtree(target)
        try:
            os.rename(staging, target)
        except OSError:
            if not is_complete(target, spec):  # lost a race to another complete prepare: fine
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _fetch_one(name: str, spec: DatasetSpec, file: str, source_dir, staging: Path) -> dict:
    dest = staging / file
    url = spec.url_template.format(file=file)
    if source_dir is not None and (Path(source_dir) / file).is_file():
        data = (Path(source_dir) / file).read_bytes()
        origin = str(Path(source_dir) / file)
    else:
        try:
            data = _fetch_url(url, DOWNLOAD_TIMEOUT_S)
        except (urllib.error.URLError, OSError) as exc:
            looked = f"not in {source_dir}; " if source_dir is not None else ""
            raise DataError(
                f"dataset '{name}' is not prepared and {file} could not be obtained "
                f"({looked}download from {url} failed: {getattr(exc, 'reason', exc)})",
                file=file, hint=f"either run `raysys prepare --source-dir DIR` with a directory "
                                f"holding {', '.join(spec.files)} (or set {SOURCE_ENV}), or run it "
                                "where the network reaches raw.githubusercontent.com") from None
        origin = url
    digest = hashlib.sha256(data).hexdigest()
    expected = spec.sha256.get(file) if spec.sha256 else None
    if expected is not None and digest != expected:
        what = "file is empty (0 bytes), " if not data else ""
        raise DataError(f"{what}SHA-256 mismatch: got {digest}, expected {expected}", file=origin,
                        hint="the file is corrupted or a different version; replace it with the "
                             "published LAReQA file")
    if expected is None:  # no published hash: at least check it parses, before it is published
        from raysys.data.lareqa import parse_lareqa_bytes

        parse_lareqa_bytes(data, origin)
    _write_atomic(dest, data)
    return {"sha256": digest, "bytes": len(data), "verified": expected is not None, "from": origin}


def _fetch_url(url: str, timeout: float) -> bytes:
    """The network step, on its own so tests can replace it."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def _write_atomic(path: Path, data: bytes) -> None:
    """temp file + fsync + rename (raysys.storage): a crash leaves the old file or the new one."""
    from raysys import storage

    storage.write_bytes(path, data)
