"""Distributed encoding: a Ray Data actor pool turns texts into embedding shards on disk.

Each actor loads the model once (`__init__`) and encodes batches (`__call__`), one GPU per actor
on a cluster, CPU actors here (Ray's batch-inference pattern). One actor batch is one shard of
rows (`shard_size`): the actor tokenizes the shard once, sorts it by token length and cuts it
into token-budget sub-batches (rows x longest row <= `batch_tokens`), so padding all but
disappears; it streams its embeddings back every few hundred rows. Embeddings are written as
NumPy shards with their row ids (`<name>-00000.npz`), atomically; shards already on disk, and
encoded the same way (`fast_path`), are not encoded again.

`fast_path` (opt-in, approximate): "bf16" runs the backbone in bfloat16 (CPUs with AVX512-BF16
or AMX, and GPUs; on GPUs bf16 is already the default), "int8" applies PyTorch dynamic int8
quantization (per-channel weights) to every Linear layer (CPU only). None: exact fp32 on CPU.
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
    """Ray Data callable class: model loaded once per actor, inference mode, bf16 on GPU."""

    def __init__(self, model_path: str, settings: dict, batch_tokens: int | None = None, threads: int | None = None,
                 fast_path: str | None = None):
        threads = threads or assigned_cpus()  # this actor's own CPUs, on whichever node it landed
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else None
        self.model = BiEncoder.from_pretrained(model_path, EncoderSettings(**settings), torch_dtype=dtype)
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
    files = encode_to_storage(texts, kind, **kwargs)
    return np.concatenate([_load_shard(p)["embedding"] for p, _ in files]) if files else np.zeros((0, 0))


def encode_to_storage(texts: list[str], kind: str | list[str], *, model_path: str, settings: EncoderSettings,
                      out_dir: str | os.PathLike, name: str, shard_size: int = 4096, batch_tokens: int | None = None,
                      num_encoders: int = 1, use_gpu: bool = False, threads: int | None = None,
                      progress: bool = True, fast_path: str | None = None) -> list[tuple[str, int]]:
    """Encode `texts` (row i -> embedding i) into shard files under `out_dir`, reusing shards
    already there; returns [(uri, rows)] in row order. Nothing but these names comes back.

    batch_tokens: padded tokens per forward pass (None: 1024 on CPU, 8192 on GPU).
    One actor batch is one shard, so with `num_encoders` actors up to that many shards are
    encoded at once. `fast_path` ("bf16", "int8"; None = exact) is recorded in each shard, and a
    shard encoded another way is encoded again."""
    fast_path = check_fast_path(fast_path)
    out_dir = str(out_dir)  # a local path or a storage URI (raysys.storage)
    storage.makedirs(out_dir)
    kinds = [kind] * len(texts) if isinstance(kind, str) else list(kind)
    if len(kinds) != len(texts):
        raise ValueError(f"{len(kinds)} kinds for {len(texts)} texts")
    shard_paths = [storage.join(out_dir, f"{name}-{i:05d}.npz") for i in range(-(-len(texts) // shard_size))]
    missing = [i for i, p in enumerate(shard_paths) if not _valid_shard(p, i, shard_size, len(texts), fast_path)]
    if missing:
        # Shard by shard (only the last shard can be short, and it comes last), so every actor
        # batch of shard_size rows is exactly one shard; the actor sorts it by token length.
        rows = np.concatenate([np.arange(i * shard_size, min((i + 1) * shard_size, len(texts))) for i in missing])
        table = pa.table({"row": rows, "text": [texts[r] for r in rows], "kind": [kinds[r] for r in rows]})
        ds = ray.data.from_arrow(table).map_batches(
            EncoderActor, fn_constructor_kwargs={"model_path": model_path, "settings": vars(settings),
                                                 "batch_tokens": batch_tokens, "threads": threads,
                                                 "fast_path": fast_path},
            batch_size=shard_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=num_encoders),
            num_gpus=1 if use_gpu else 0, num_cpus=None if use_gpu else (threads or 1))
        pending: dict[int, dict[int, np.ndarray]] = {i: {} for i in missing}
        bar = Progress(f"encode {name}", len(rows), "texts", mode=None if progress else "off")
        for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
            for row, emb in zip(batch["row"], batch["embedding"]):
                shard = int(row) // shard_size
                pending[shard][int(row)] = emb
                if len(pending[shard]) == _shard_len(shard, shard_size, len(texts)):
                    _write_shard(shard_paths[shard], pending.pop(shard), fast_path)
            bar.advance(len(batch["row"]))
        bar.close()
        if pending:  # an actor returned fewer rows than it was given: never silently short
            raise RuntimeError(f"encode {name}: shards {sorted(pending)} came back incomplete")
    return [(p, _shard_len(i, shard_size, len(texts))) for i, p in enumerate(shard_paths)]


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
