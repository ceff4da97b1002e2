"""User corpora: JSONL (optionally .gz) and Parquet files of parallel QA pairs, read into
PAIR_SCHEMA rows. Required columns: id, lang, query, passage; optional: hard_negative (one string,
or a list of them: Tevatron's `negative_passages`), context, group (defaults to id, so parallel
versions of one item share a split).

Every row is validated with its exact location (`origin` = "file:line" for JSONL, "file:row"
for Parquet, both 1-based): small local inputs on the driver before Ray sees them, so errors
surface at once; remote URIs (s3://, gs://, ...) and local inputs over DRIVER_READ_MAX_BYTES
inside Ray Data tasks with the same validator, streaming, one file per task (so a file's line
numbers are known; shard very large corpora into several files).
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from raysys.data.languages import check_language
from raysys.data.schema import PAIR_SCHEMA, REQUIRED_COLUMNS
from raysys.errors import DataError

if TYPE_CHECKING:
    import ray.data

OPTIONAL_COLUMNS = ("hard_negative", "context", "group")
JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet", ".parq")
# Local inputs above this size are not copied into the driver: Ray Data tasks read and validate them.
DRIVER_READ_MAX_BYTES = 256 * 2**20


def read_pairs(paths: str | Path | list[str | Path]) -> ray.data.Dataset:
    """A Ray Dataset of PAIR_SCHEMA rows from files, directories of them, or URIs."""
    import ray.data

    local, remote = [], []
    for path in [paths] if isinstance(paths, (str, Path)) else list(paths):
        text = str(path)
        if "://" in text and not text.startswith("file://"):
            remote.append(text)
        else:
            local.extend(_expand_local(Path(text.removeprefix("file://"))))
    if not local and not remote:
        raise DataError("no input files given", hint="set data.train to a file, a directory of files or a URI")
    pinned: list[str] = []
    if sum(p.stat().st_size for p in local) > DRIVER_READ_MAX_BYTES:
        if _every_node_sees(local):  # one node, or a shared filesystem: read tasks may run anywhere
            remote += [str(p.resolve()) for p in local]
        else:  # the read tasks are pinned to this node, where the files are
            pinned = [str(p.resolve()) for p in local]
        local = []
    datasets = []
    if local:  # validated here, on the driver: a bad line fails before any cluster work
        datasets.append(ray.data.from_arrow([validate_pairs_file(p) for p in local]))
    if remote:
        datasets.append(_read_with_ray(remote))
    if pinned:
        # The driver's node may have no CPUs for work (the head of the shipped cluster configs):
        # reading takes none; validation then runs on any node. (Node affinity, not Ray Data's
        # deprecated `local://` scheme, which does the same.)
        datasets.append(_read_with_ray(pinned, on_this_node=True))
    return datasets[0] if len(datasets) == 1 else datasets[0].union(*datasets[1:])


def small_local_pairs(path: str | Path) -> pa.Table | None:
    """The validated rows of local input files that together fit DRIVER_READ_MAX_BYTES (what
    read_pairs would validate on the driver anyway), or None for remote or larger inputs."""
    text = str(path)
    if "://" in text and not text.startswith("file://"):
        return None
    files = _expand_local(Path(text.removeprefix("file://")))
    if sum(p.stat().st_size for p in files) > DRIVER_READ_MAX_BYTES:
        return None
    return pa.concat_tables([validate_pairs_file(p) for p in files])


def _every_node_sees(paths: list[Path]) -> bool:
    """True on one node, or when every node of the cluster sees these files with their sizes."""
    from raysys.artifacts import nodes_not_seeing
    from raysys.runtime import ensure_ray, is_multi_node

    ensure_ray()
    if not is_multi_node():
        return True
    return not nodes_not_seeing({str(p.resolve()): p.stat().st_size for p in paths})[0]


def _read_with_ray(uris: list[str], on_this_node: bool = False) -> ray.data.Dataset:
    """Remote files through Ray Data: one whole file per row, validated in the map tasks."""
    import ray
    import ray.data

    extensions = [s.lstrip(".") for s in JSONL_SUFFIXES + PARQUET_SUFFIXES]
    pin = {}
    if on_this_node:  # every Ray node carries its id as the label ray.io/node-id
        pin = {"num_cpus": 0, "label_selector": {"ray.io/node-id": ray.get_runtime_context().get_node_id()}}
    files = ray.data.read_binary_files(uris, include_paths=True, file_extensions=extensions, **pin)
    pairs = files.map_batches(_validate_file_batch, batch_format="pyarrow", batch_size=1)
    # Per-dataset setting (inherited by derived datasets): the caller gets the DataError itself,
    # with file/row/field, instead of Ray Data's generic UserCodeException wrapper.
    pairs.context.raise_original_map_exception = True
    return pairs


def _validate_file_batch(batch: pa.Table) -> pa.Table:
    tables = [parse_pairs_bytes(data, path) for data, path in
              zip(batch.column("bytes").to_pylist(), batch.column("path").to_pylist())]
    return pa.concat_tables(tables) if tables else PAIR_SCHEMA.empty_table()


def _expand_local(path: Path) -> list[Path]:
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and _format_of(p) is not None)
        if not found:
            raise DataError("directory holds no .jsonl/.json(.gz) or .parquet files", file=str(path),
                            hint="point data.train at the files themselves or at a LAReQA directory")
        return found
    if not path.exists():
        raise DataError("file not found", file=str(path), hint="check the data.train path")
    if _format_of(path) is None:
        raise DataError("unsupported file type", file=str(path),
                        hint=f"expected one of {', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)}")
    return [path]


def _format_of(path: Path | str) -> str | None:
    name = str(path).lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def validate_pairs_file(path: str | Path) -> pa.Table:
    """Read and check one local JSONL/Parquet file; a PAIR_SCHEMA table or a located DataError."""
    path = Path(path)
    if _format_of(path) is None:
        raise DataError("unsupported file type", file=str(path),
                        hint=f"expected one of {', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read: {exc.strerror}", file=str(path),
                        hint="check the path and its permissions") from None
    return parse_pairs_bytes(data, str(path))


def parse_pairs_bytes(data: bytes, file: str) -> pa.Table:
    """Validate one file's raw bytes (format from its name) into a PAIR_SCHEMA table."""
    if not data:
        raise DataError("file is empty (0 bytes)", file=file,
                        hint="expected one JSON object per line, or a Parquet table")
    if _format_of(file) == "parquet":
        try:
            table = pq.read_table(io.BytesIO(data))
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"not a readable Parquet file: {exc}", file=file,
                            hint="re-export it, or give JSONL instead") from None
        for name in REQUIRED_COLUMNS:
            if name not in table.column_names:
                raise DataError("required column is missing", file=file, field=name,
                                hint=f"columns found: {', '.join(table.column_names)}")
        return _rows_to_table(table.to_pylist(), file, start=1)
    if file.lower().endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise DataError(f"not a valid gzip file: {exc}", file=file,
                            hint="re-compress it with gzip, or drop the .gz suffix") from None
        if not data:
            raise DataError("file is empty (0 bytes after decompression)", file=file,
                            hint="expected one JSON object per line")
    return _rows_to_table(_jsonl_records(data, file), file, start=None)


def _jsonl_records(data: bytes, file: str) -> Iterable[tuple[int, Any]]:
    """(1-based line number, parsed value) for every non-blank line."""
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"invalid UTF-8 at byte {exc.start} of the line", file=file, row=lineno,
                            hint="re-encode the file as UTF-8") from None
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"malformed JSON on line {lineno}, column {exc.colno}: {exc.msg}",
                            file=file, row=lineno,
                            hint="each non-blank line must be one complete JSON object") from None


def _negatives(value: Any, file: str, row: int) -> list[str] | None:
    """A row's hard negatives: one string or a list of strings; blank ones mean "not given"."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(item, str) for item in items):
        raise DataError(f"expected a string or a list of strings, got {value!r:.60}", file=file, row=row,
                        field="hard_negative", hint='give one negative as "text", several as ["text", ...]')
    return [item for item in items if item.strip()] or None


def _rows_to_table(records: Iterable, file: str, start: int | None) -> pa.Table:
    """Check each record; `start` numbers plain records (Parquet), else records are (line, obj)."""
    columns: dict[str, list] = {name: [] for name in PAIR_SCHEMA.names}
    first_seen: dict[tuple[str, str], int] = {}
    for index, item in enumerate(records):
        row, record = (start + index, item) if start is not None else item
        if not isinstance(record, dict):
            raise DataError(f"expected a JSON object, got {type(record).__name__}", file=file, row=row,
                            hint=f"each row is an object with {', '.join(REQUIRED_COLUMNS)}")
        values = {}
        for name in REQUIRED_COLUMNS + OPTIONAL_COLUMNS:
            value = record.get(name)
            if value is None:
                if name in REQUIRED_COLUMNS:
                    what = "is null" if name in record else "is missing"
                    raise DataError(f"required field {what}", file=file, row=row, field=name,
                                    hint=f"every row needs {', '.join(REQUIRED_COLUMNS)}")
                values[name] = None
                continue
            if name == "hard_negative":
                values[name] = _negatives(value, file, row)
                continue
            if not isinstance(value, str):
                raise DataError(f"expected a string, got {type(value).__name__} {value!r:.40}",
                                file=file, row=row, field=name, hint="give it as a JSON string")
            if not value.strip():
                if name in REQUIRED_COLUMNS:
                    raise DataError("empty text", file=file, row=row, field=name,
                                    hint="fill it in or drop the row")
                value = None  # an empty optional field means "not given"
            values[name] = value
        values["lang"] = check_language(values["lang"], file=file, row=row)
        key = (values["id"], values["lang"])
        if key in first_seen:
            raise DataError(f"duplicate (id, lang) = {key} (first on row {first_seen[key]})",
                            file=file, row=row, field="id",
                            hint="each parallel item may appear once per language")
        first_seen[key] = row
        values["group"] = values["group"] or values["id"]
        values["origin"] = f"{file}:{row}"
        for name in PAIR_SCHEMA.names:
            columns[name].append(values[name])
    if not first_seen:
        raise DataError("no rows (only blank lines)", file=file, hint="expected one JSON object per line")
    return pa.table(columns, schema=PAIR_SCHEMA)
