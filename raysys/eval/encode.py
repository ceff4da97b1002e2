"""Distributed encoding: a Ray Data actor pool turns texts into embedding shards on disk.

Each actor loads the model once (`__init__`) and encodes batches (`__call__`), one GPU per actor
on a cluster, CPU actors here (Ray's batch-inference pattern). One actor batch is one shard of
rows (`shard_size`): the actor tokenizes the shard once, sorts it by token length and cuts it
into token-budget sub-batches (rows x longest row <= `batch_tokens`), so padding all but
disappears; it streams its embeddings back every few hundred rows. Embeddings are written as
NumPy shards with their row ids (`<name>-00000.npz`), atomically; shards already on disk, and
encoded the same way (`fast_path`), are not encoded again.

`fast_path` (opt-in, approximate): "bf16" runs the backbone in bfloat16 (CPUs with AVX512-BF16
or AMX, and GPUs), "int8" applies PyTorch dynamic int8 quantization (per-channel weights) to
every Linear layer (CPU only). None: exact fp32, on CPUs and GPUs alike, so a GPU evaluation
scores what a CPU one does (the embedding cache key records device and precision).
"""

from __future__ import annotations

import io
import logging
import os
import warnings

import numpy as np
import pyarrow as pa
import ray.data
import torch
import torch.nn.functional as F

from raysys import storage
from raysys.errors import ConfigError
from raysys.model.encoder import BiEncoder, EncoderSettings, pool
from raysys.progress import Progress

log = logging.getLogger(__name__)

FAST_PATHS = ("bf16", "int8")
# Token budget per sub-batch when none is given: small batches stay in cache on CPU (1024 was
# ~1.7x faster than 8192 for multilingual-e5-small on 2 cores, bench/results/encode.json); GPUs
# want large ones.
CPU_BATCH_TOKENS, GPU_BATCH_TOKENS = 1024, 8192
STREAM_ROWS = 256  # an actor hands back embeddings every this many rows (progress, memory)


def check_fast_path(fast_path: str | None) -> str | None:
    """None/""/"none"/"fp32" -> None; else one of FAST_PATHS (ConfigError otherwise)."""
    if fast_path is None or str(fast_path).lower() in ("", "none", "fp32", "off", "false"):
        return None
    value = str(fast_path).lower()
    if value not in FAST_PATHS:
        raise ConfigError(f"eval fast_path must be one of {', '.join(FAST_PATHS)} or none, got {fast_path!r}")
    return value


def apply_fast_path(model: BiEncoder, fast_path: str | None, device: torch.device) -> BiEncoder:
    """Convert the backbone in place for an approximate, faster encoding path."""
    fast_path = check_fast_path(fast_path)
    if fast_path == "bf16":
        if device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            log.warning("fast_path=bf16: this CPU has no native bf16 matrix instructions; expect it to be slower")
        model.backbone.to(torch.bfloat16)
    elif fast_path == "int8":
        if device.type != "cpu":
            raise ConfigError("fast_path=int8 (PyTorch dynamic quantization) runs on CPU only; use bf16 on GPUs")
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        with warnings.catch_warnings():  # torch deprecates its quantized tensor types (still works in 2.13)
            warnings.filterwarnings("ignore", message=".*quantize_per_(tensor|channel).*deprecated",
                                    category=UserWarning)
            # ... and the whole torch.ao.quantization flow. Its successor (torchao) is not a dependency,
            # and torch._int_mm ran ~50x slower than this fbgemm kernel on CPU: kept knowingly until then.
            warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated",
                                    category=DeprecationWarning)
            model.backbone = quantize_dynamic(model.backbone, {torch.nn.Linear: per_channel_dynamic_qconfig},
                                              dtype=torch.qint8)
    return model


class EncoderActor:
    """Ray Data callable class: model loaded once per actor, inference mode (fp32 unless a fast path)."""

    def __init__(self, model_path: str, settings: dict, batch_tokens: int | None = None, threads: int | None = None,
                 fast_path: str | None = None):
        threads = threads or assigned_cpus()  # this actor's own CPUs, on whichever node it landed
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = BiEncoder.from_pretrained(model_path, EncoderSettings(**settings))
        self.model.to(self.device).eval()
        apply_fast_path(self.model, fast_path, self.device)
        self.batch_tokens = batch_tokens or (GPU_BATCH_TOKENS if self.device.type == "cuda" else CPU_BATCH_TOKENS)
        tok = self.model.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.pad_left = getattr(tok, "padding_side", "right") == "left"

    def __call__(self, batch: dict[str, np.ndarray]):
        """Yields {"row", "embedding"} every STREAM_ROWS rows, shortest texts first."""
        texts, kinds, rows = batch["text"].tolist(), batch["kind"].tolist(), np.asarray(batch["row"])
        dim = self.model.backbone.config.hidden_size
        done_idx: list[int] = []
        done_emb: list[np.ndarray] = []
        for kind in sorted(set(kinds)):
            idx = [i for i, k in enumerate(kinds) if k == kind]
            ids = self._tokenize([texts[i] for i in idx], kind)
            for chunk in token_budget_chunks([len(x) for x in ids], self.batch_tokens):
                done_emb.append(self._embed([ids[j] for j in chunk]))
                done_idx.extend(idx[j] for j in chunk)
                if len(done_idx) >= STREAM_ROWS:
                    yield {"row": rows[done_idx], "embedding": np.concatenate(done_emb).reshape(-1, dim)}
                    done_idx, done_emb = [], []
        if done_idx:
            yield {"row": rows[done_idx], "embedding": np.concatenate(done_emb).reshape(-1, dim)}

    def _tokenize(self, texts: list[str], kind: str) -> list[list[int]]:
        """Token ids exactly as BiEncoder.tokenize makes them (prefix, truncation), unpadded."""
        s = self.model.settings
        prefix, limit = ((s.query_prefix, s.max_query_length) if kind == "query"
                         else (s.passage_prefix, s.max_passage_length))
        return self.model.tokenizer([prefix + t for t in texts], truncation=True, max_length=limit)["input_ids"]

    def _embed(self, seqs: list[list[int]]) -> np.ndarray:
        longest = max(len(x) for x in seqs)
        input_ids = torch.full((len(seqs), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), longest), dtype=torch.long)
        for j, seq in enumerate(seqs):
            cols = slice(longest - len(seq), longest) if self.pad_left else slice(0, len(seq))
            input_ids[j, cols] = torch.tensor(seq, dtype=torch.long)
            mask[j, cols] = 1
        with torch.inference_mode():
            input_ids, mask = input_ids.to(self.device), mask.to(self.device)
            hidden = self.model.backbone(input_ids=input_ids, attention_mask=mask).last_hidden_state
            emb = pool(hidden.float(), mask, self.model.settings.pooling)  # pool in fp32 on every path
            if self.model.settings.normalize:
                emb = F.normalize(emb, p=2, dim=-1)
        return emb.cpu().numpy()


def assigned_cpus() -> int | None:
    """Whole CPUs Ray assigned to this actor (its node's share, not the driver's core count)."""
    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # not inside a Ray worker
        return None
    return max(1, int(cpus)) if cpus else None


def token_budget_chunks(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Positions grouped shortest first into sub-batches whose padded size (rows x longest row)
    stays within `batch_tokens` (a longer row than the budget gets a sub-batch of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    chunks, chunk, longest = [], [], 0
    for i in order:
        longest_if_added = max(longest, lengths[i])
        if chunk and longest_if_added * (len(chunk) + 1) > batch_tokens:
            chunks.append(chunk)
            chunk, longest_if_added = [], lengths[i]
        chunk.append(i)
        longest = longest_if_added
    if chunk:
        chunks.append(chunk)
    return chunks


def encode_texts(texts: list[str], kind: str | list[str], **kwargs) -> np.ndarray:
    """`encode_to_storage`, then the embeddings read back as one [N, d] array (row i -> text i)."""
    return read_embeddings(encode_to_storage(texts, kind, **kwargs))


def read_embeddings(files: list[tuple[str, int]]) -> np.ndarray:
    """The [N, d] embeddings of shard files [(uri, rows)] in order (what the encoder returned)."""
    return np.concatenate([_load_shard(p)["embedding"] for p, _ in files]) if files else np.zeros((0, 0))


def encode_to_storage(texts: list[str], kind: str | list[str], *, name: str, **kwargs) -> list[tuple[str, int]]:
    """Encode `texts` (row i -> embedding i) into shard files `<out_dir>/<name>-NNNNN.npz`, reusing
    shards already there; returns [(uri, rows)] in row order (see `encode_sets`)."""
    return encode_sets({name: (texts, kind)}, **kwargs)[name]


def encode_sets(sets: dict[str, tuple[list[str], str | list[str]]], *, model_path: str, settings: EncoderSettings,
                out_dir: str | os.PathLike, shard_size: int = 4096, batch_tokens: int | None = None,
                num_encoders: int = 1, use_gpu: bool = False, threads: int | None = None,
                progress: bool = True, fast_path: str | None = None) -> dict[str, list[tuple[str, int]]]:
    """Encode several named text sets {name: (texts, kind or kinds)} in one Ray Data pipeline (one
    actor pool start and model load for all, e.g. queries and candidates) into shard files under
    `out_dir`, reusing shards already there; returns {name: [(uri, rows)]} in row order. Nothing
    but these names comes back.

    batch_tokens: padded tokens per forward pass (None: 1024 on CPU, 8192 on GPU). Actor batches
    hold `shard_size` rows, so with `num_encoders` actors about that many shards are encoded at
    once. `fast_path` ("bf16", "int8"; None = exact) is recorded in each shard, and a shard
    encoded another way is encoded again."""
    fast_path = check_fast_path(fast_path)
    out_dir = str(out_dir)  # a local path or a storage URI (raysys.storage)
    storage.makedirs(out_dir)
    shards: list[tuple[str, int, int]] = []  # (name, first row, rows) of every shard of every set
    rows, texts, kinds = [], [], []  # of the missing shards, in order; row ids are global (set offset + row)
    pending: dict[int, dict[int, np.ndarray]] = {}  # missing shard -> its rows so far (written when complete)
    offsets, offset = {}, 0
    for name, (set_texts, kind) in sets.items():
        set_kinds = [kind] * len(set_texts) if isinstance(kind, str) else list(kind)
        if len(set_kinds) != len(set_texts):
            raise ValueError(f"{len(set_kinds)} kinds for {len(set_texts)} texts")
        offsets[name] = offset
        for i in range(-(-len(set_texts) // shard_size)):
            first, count = i * shard_size, _shard_len(i, shard_size, len(set_texts))
            shards.append((name, first, count))
            if not _valid_shard(_shard_path(out_dir, name, i), i, shard_size, len(set_texts), fast_path):
                pending[len(shards) - 1] = {}
                rows.extend(range(offset + first, offset + first + count))
                texts.extend(set_texts[first:first + count])
                kinds.extend(set_kinds[first:first + count])
        offset += len(set_texts)
    if rows:
        table = pa.table({"row": np.array(rows, dtype=np.int64), "text": texts, "kind": kinds})
        ds = ray.data.from_arrow(table).map_batches(
            EncoderActor, fn_constructor_kwargs={"model_path": model_path, "settings": vars(settings),
                                                 "batch_tokens": batch_tokens, "threads": threads,
                                                 "fast_path": fast_path},
            batch_size=shard_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=num_encoders),
            num_gpus=1 if use_gpu else 0, num_cpus=None if use_gpu else (threads or 1))
        starts = np.array([offsets[n] + first for n, first, _ in shards])  # global first row of every shard
        bar = Progress(f"encode {'+'.join(sets)}", len(rows), "texts", mode=None if progress else "off")
        for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
            for row, emb in zip(batch["row"], batch["embedding"]):
                s = int(np.searchsorted(starts, row, side="right")) - 1
                name, first, count = shards[s]
                pending[s][int(row) - offsets[name]] = emb
                if len(pending[s]) == count:
                    _write_shard(_shard_path(out_dir, name, first // shard_size), pending.pop(s), fast_path)
            bar.advance(len(batch["row"]))
        bar.close()
        if pending:  # an actor returned fewer rows than it was given: never silently short
            short = sorted(_shard_path(out_dir, shards[s][0], shards[s][1] // shard_size) for s in pending)
            raise RuntimeError(f"encode: shards {short} came back incomplete")
    return {name: [(_shard_path(out_dir, n, first // shard_size), count) for n, first, count in shards if n == name]
            for name in sets}


def _shard_path(out_dir: str, name: str, shard: int) -> str:
    return storage.join(out_dir, f"{name}-{shard:05d}.npz")


def _shard_len(shard: int, shard_size: int, total: int) -> int:
    return min(shard_size, total - shard * shard_size)


def _load_shard(path: str) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(storage.read_bytes(path))) as z:
        return {key: z[key] for key in z.files}


def _valid_shard(path: str, shard: int, shard_size: int, total: int, fast_path: str | None = None) -> bool:
    if not storage.exists(path):
        return False
    try:
        z = _load_shard(path)
        rows = z["row"]
        made_by = str(z["fast_path"]) if "fast_path" in z else ""
        return (len(rows) == _shard_len(shard, shard_size, total) and int(rows[0]) == shard * shard_size
                and z["embedding"].shape[0] == len(rows) and made_by == (fast_path or ""))
    except Exception:  # truncated or corrupt: encode it again
        return False


def _write_shard(path: str, rows_to_emb: dict[int, np.ndarray], fast_path: str | None = None) -> None:
    rows = np.array(sorted(rows_to_emb), dtype=np.int64)
    emb = np.stack([rows_to_emb[r] for r in rows]).astype(np.float32)
    extra = {"fast_path": np.array(fast_path)} if fast_path else {}
    buf = io.BytesIO()
    np.savez(buf, row=rows, embedding=emb, **extra)
    storage.write_bytes(path, buf.getvalue())  # atomic (temp + rename locally, one PUT remotely)
