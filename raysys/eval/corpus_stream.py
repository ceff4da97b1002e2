"""A MIRACL-style corpus (JSONL lines with docid, title, text) encoded without the driver reading it.

The file is cut into byte ranges from its size alone (`corpus_slices`). Each encoder actor reads
its range, keeps the lines that start in it (a line that crosses the range's end is finished from
the bytes after it; one that crosses its start belongs to the range before: Hadoop's rule), checks
and parses them, encodes the passages, and writes the embeddings (`<name>-NNNNN.npz`, as
`raysys.eval.encode` writes them) and the docids beside them (`<name>-NNNNN.docids.npy`). Only
file names and row counts come back to the driver. Before that, `check_corpus` parses every line
in Ray tasks (no model), so bad lines, repeated docids and qrels naming missing documents fail
before any encoding. After the search the driver reads the docid files one at a time
(`docids_of`): about 20 bytes per passage, never the passages.

A bad line fails with the file, the line number and the field; the line number is counted (from
the start of the file) only then.
"""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pyarrow as pa
import ray

from raysys import storage
from raysys.errors import DataError
from raysys.eval.encode import EncoderActor, _load_shard, check_fast_path, map_with_encoders
from raysys.progress import Progress

SLICE_BYTES = 8 << 20  # one encoder task per 8 MiB of JSONL (~10-20k Wikipedia passages)
CORPUS_HINT = "every line of corpus.jsonl is an object with string fields docid, title and text (title may be \"\")"


def corpus_slices(uri: str, slice_bytes: int = SLICE_BYTES, display: str | None = None) -> list[tuple[int, int]]:
    """[(start, end)] byte ranges covering the file ([(0, size)] for a .gz file: it cannot be cut)."""
    size = _size(uri, display)
    if size == 0:
        raise DataError("no documents (the file is empty)", file=display or uri, hint=CORPUS_HINT)
    if uri.endswith(".gz"):
        return [(0, size)]
    return [(start, min(start + slice_bytes, size)) for start in range(0, size, slice_bytes)]


def parse_corpus_line(raw: bytes) -> tuple[str, str] | None:
    """(docid, passage) of one JSONL line, None for a blank line; a bad line raises
    BadLine(message, field). passage = title + " " + text when the title is non-empty (after
    strip), else text: the title names the entity a Wikipedia passage is about (MIRACL/E5)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadLine(f"not valid UTF-8 ({e.reason})", None, "re-encode the file as UTF-8") from None
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadLine(f"malformed JSON at column {e.colno}: {e.msg}", "json", "each line must be one complete JSON object") from None
    if not isinstance(record, dict):
        raise BadLine(f"expected a JSON object, got {type(record).__name__}", "json", CORPUS_HINT)
    for field in ("docid", "title", "text"):
        if field not in record:
            raise BadLine("missing field", field, CORPUS_HINT)
        if not isinstance(record[field], str):
            raise BadLine(f"expected a string, got {type(record[field]).__name__}", field, "give it as a JSON string")
    docid, title, text = record["docid"], record["title"].strip(), record["text"]
    if not docid:
        raise BadLine("empty document id", "docid", "give every passage a unique docid")
    return docid, f"{title} {text}" if title else text


class BadLine(ValueError):
    def __init__(self, message: str, field: str | None, hint: str):
        super().__init__(message)
        self.message, self.field, self.hint = message, field, hint


def read_corpus_slice(uri: str, start: int, end: int, display: str | None = None) -> tuple[list[str], list[str]]:
    """docids and passages of the lines starting in [start, end); a bad line raises DataError with
    its line number, naming the file as `display` (the user's path where `uri` is a copy) or `uri`."""
    data, first_line_start = _slice_bytes(uri, start, end)
    docids, passages = [], []
    for offset, raw in enumerate(data.split(b"\n")[:-1] if data.endswith(b"\n") else data.split(b"\n")):
        try:
            parsed = parse_corpus_line(raw.rstrip(b"\r"))
        except BadLine as e:
            line = (1 if first_line_start == 0 else line_number(uri, first_line_start)) + offset
            raise DataError(e.message, file=display or uri, row=line, field=e.field, hint=e.hint) from None
        if parsed is not None:
            docids.append(parsed[0])
            passages.append(parsed[1])
    return docids, passages


def _slice_bytes(uri: str, start: int, end: int) -> tuple[bytes, int]:
    """The bytes of the lines that start in [start, end), and where the first of them starts."""
    if uri.endswith(".gz"):
        return storage.read_bytes(uri), 0  # pyarrow decompresses by the extension
    fs, path = storage.resolve(uri)
    with fs.open_input_file(path) as f:
        size = f.size()
        first = max(start - 1, 0)
        data = f.read_at(end - first, first)
        if start > 0:  # the line that crosses `start` belongs to the range before (unless one ends at start - 1)
            cut = data.find(b"\n")
            if cut < 0 or first + cut + 1 >= end:  # no line starts in this range
                return b"", end
            data, first = data[cut + 1:], first + cut + 1
        tail, position = [data], end
        while position < size and not tail[-1].endswith(b"\n"):  # finish the line that crosses `end`
            more = f.read_at(min(1 << 20, size - position), position)
            cut = more.find(b"\n")
            tail.append(more if cut < 0 else more[:cut + 1])
            position += len(more)
            if cut >= 0:
                break
        return b"".join(tail), first


def line_number(uri: str, byte_offset: int) -> int:
    """1-based line number of the line that starts at byte_offset of a plain file (newlines before it + 1)."""
    count, (fs, path) = 0, storage.resolve(uri)
    with fs.open_input_stream(path) as f:
        read = 0
        while read < byte_offset:
            chunk = f.read(min(16 << 20, byte_offset - read))
            if not chunk:
                break
            count += chunk.count(b"\n")
            read += len(chunk)
    return count + 1


def _size(uri: str, display: str | None = None) -> int:
    fs, path = storage.resolve(uri)
    info = fs.get_file_info(path)
    if info.type.name != "File":
        raise DataError("file not found", file=display or uri,
                        hint="a MIRACL-style language directory holds topics.tsv, qrels.tsv and corpus.jsonl")
    return int(info.size)



class CorpusEncoderActor(EncoderActor):
    """Ray Data callable class: each row is a byte range of a corpus file to encode into one shard."""

    def __call__(self, batch: dict[str, np.ndarray]):
        """Rows {"path", "source", "display", "start", "end"}; yields {"path", "rows"} once stored."""
        for path, source, display, start, end in zip(batch["path"], batch["source"], batch["display"], batch["start"],
                                                     batch["end"]):
            docids, passages = read_corpus_slice(str(source), int(start), int(end), str(display))
            embeddings = self.embed_texts(passages, ["passage"] * len(passages))  # [0, d] for no lines
            _write_slice(str(path), embeddings, docids, (int(start), int(end)), self.fast_path)
            yield {"path": np.array([str(path)]), "rows": np.array([len(docids)], dtype=np.int64)}


def docids_path(shard_path: str) -> str:
    return shard_path[:-len(".npz")] + ".docids.npy"


def _write_slice(path: str, embeddings: np.ndarray, docids: list[str], byte_range: tuple[int, int],
                 fast_path: str | None) -> None:
    buf = io.BytesIO()
    np.save(buf, np.array([d.encode("utf-8") for d in docids], dtype=bytes) if docids else np.zeros(0, "S1"),
            allow_pickle=False)
    storage.write_bytes(docids_path(path), buf.getvalue())  # first: a shard file means both are there
    buf = io.BytesIO()
    extra = {"fast_path": np.array(fast_path)} if fast_path else {}
    np.savez(buf, row=np.arange(len(docids), dtype=np.int64), embedding=np.asarray(embeddings, np.float32),
             byte_range=np.array(byte_range, np.int64), **extra)
    storage.write_bytes(path, buf.getvalue())


def _stored_rows(path: str, byte_range: tuple[int, int], fast_path: str | None) -> int | None:
    """Rows of a finished shard of this byte range and encoding, else None (encode it again)."""
    if not storage.exists(path) or not storage.exists(docids_path(path)):
        return None
    try:
        z = _load_shard(path)
        made_by = str(z["fast_path"]) if "fast_path" in z else ""
        if tuple(int(x) for x in z["byte_range"]) != byte_range or made_by != (fast_path or ""):
            return None
        return int(z["embedding"].shape[0])
    except Exception:  # truncated or corrupt: encode it again
        return None


def encode_corpus(source: str, *, name: str, model_path: str, settings, out_dir: str,
                  batch_tokens: int | None = None, num_encoders: int = 1, use_gpu: bool = False,
                  threads: int | None = None, progress: bool = True, fast_path: str | None = None,
                  slice_bytes: int = SLICE_BYTES, display: str | None = None) -> list[tuple[str, int]]:
    """Encode a corpus file (a path every node sees, or a storage URI) into shard files under
    out_dir, one per byte range, reusing finished ones; returns [(uri, rows)] in file order.
    Errors name the file as `display` (the user's path where `source` is a copy) or `source`."""
    fast_path = check_fast_path(fast_path)
    storage.makedirs(out_dir)
    slices = corpus_slices(source, slice_bytes, display)
    paths = [storage.join(out_dir, f"{name}-{i:05d}.npz") for i in range(len(slices))]
    rows = {p: _stored_rows(p, s, fast_path) for p, s in zip(paths, slices)}
    missing = [(p, s) for p, s in zip(paths, slices) if rows[p] is None]
    if missing:
        # One block per byte range, so every actor of the pool gets some (one block goes to one actor).
        blocks = [pa.table({"path": [p], "source": [source], "display": [display or source],
                            "start": [s[0]], "end": [s[1]]}) for p, s in missing]
        ds = map_with_encoders(ray.data.from_arrow(blocks), CorpusEncoderActor, model_path=model_path,
                               settings=settings, batch_tokens=batch_tokens, threads=threads, fast_path=fast_path,
                               num_encoders=num_encoders, use_gpu=use_gpu)
        ds.context.raise_original_map_exception = True  # a bad line's DataError, not Ray Data's wrapper
        sizes = {p: e - s for p, (s, e) in missing}
        bar = Progress(f"encode {name}", sum(sizes.values()), "bytes", mode=None if progress else "off")
        try:
            for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
                for path, count in zip(batch["path"], batch["rows"]):
                    rows[str(path)] = int(count)
                    bar.advance(sizes[str(path)])
        except DataError as exc:  # Ray's wrapper of an actor's DataError: the user's one line, unwrapped
            raise getattr(exc, "cause", None) or exc from None
        finally:
            bar.close()
        if any(rows[p] is None for p in paths):  # never silently short
            raise RuntimeError(f"encode: shards {[p for p in paths if rows[p] is None]} were not written by the encoders")
    if sum(rows.values()) == 0:
        raise DataError("no documents (the file holds only blank lines)", file=display or source, hint=CORPUS_HINT)
    return [(p, rows[p]) for p in paths]


def read_docids(shard_path: str) -> np.ndarray:
    """The docids of one shard (utf-8 bytes)."""
    return np.load(io.BytesIO(storage.read_bytes(docids_path(shard_path))), allow_pickle=False)


def check_corpus(source: str, judged: set[str], display: str | None = None,
                 slice_bytes: int = SLICE_BYTES) -> set[str]:
    """Check every line before any model loads: one Ray task per byte range parses its lines and
    returns its row count, the judged docids it holds and an 8-byte hash per docid. Returns the
    judged docids the corpus holds; a bad line, or a docid that appears twice (located at its
    second line), raises DataError. The driver holds the hashes (8 bytes per passage), never the
    docids or passages."""
    judged_ref = ray.put(sorted(judged))
    tasks = [_check_range.remote(source, display or source, start, end, judged_ref)
             for start, end in corpus_slices(source, slice_bytes, display)]
    try:
        answers = ray.get(tasks)
    except DataError as exc:  # Ray's wrapper of a task's DataError: the user's one line, unwrapped
        raise getattr(exc, "cause", None) or exc from None
    if sum(rows for rows, _, _ in answers) == 0:
        raise DataError("no documents (the file holds only blank lines)", file=display or source, hint=CORPUS_HINT)
    values, counts = np.unique(np.concatenate([hashes for _, _, hashes in answers]), return_counts=True)
    if (counts > 1).any():  # a hash seen twice: find the docid itself and its line (or a collision)
        _raise_repeat(source, set(values[counts > 1].tolist()), display or source)
    return {d for _, found, _ in answers for d in found}


@ray.remote(num_cpus=1)
def _check_range(source: str, display: str, start: int, end: int, judged: list[str]):
    docids, _ = read_corpus_slice(source, start, end, display)
    hashes = np.fromiter((docid_hash(d) for d in docids), np.uint64, count=len(docids))
    return len(docids), sorted(set(judged).intersection(docids)), hashes


def docid_hash(docid: str) -> int:
    """The same 64-bit value in every process (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(docid.encode("utf-8"), digest_size=8).digest(), "little")


def _raise_repeat(source: str, suspect: set[int], display: str) -> None:
    """The error path of a repeated hash: read the file once, in chunks, for the repeated docid."""
    seen: set[str] = set()
    fs, path = storage.resolve(source)
    number, rest = 0, b""
    with fs.open_input_stream(path) as f:  # a .gz file is decompressed by its extension
        while True:
            chunk = f.read(16 << 20)
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop() if chunk else b""
            for raw in lines:
                number += 1
                parsed = parse_corpus_line(raw.rstrip(b"\r"))  # every line already parsed once
                if parsed is None or docid_hash(parsed[0]) not in suspect:
                    continue
                if parsed[0] in seen:
                    raise DataError(f"duplicate document id {parsed[0]!r}", file=display, row=number, field="docid",
                                    hint="document ids must be unique; drop or rename the repeat")
                seen.add(parsed[0])
            if not chunk:
                return  # a 64-bit hash collision between different docids: nothing to report


def docids_of(files: list[tuple[str, int]], rows: np.ndarray) -> dict[int, str]:
    """{global row: docid} for the given rows (e.g. every query's top-k), one docid file at a time."""
    wanted, out, first = np.unique(rows[rows >= 0]), {}, 0
    for path, n in files:
        here = wanted[(wanted >= first) & (wanted < first + n)]
        if here.size:
            ids = read_docids(path)
            out.update((int(r), ids[r - first].decode("utf-8")) for r in here)
        first += n
    return out
