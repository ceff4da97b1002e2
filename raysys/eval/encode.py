"""Distributed encoding: a Ray Data actor pool turns texts into embedding shards in storage.

Each actor loads the model once (`__init__`) and encodes shards (`__call__`), one GPU per actor
on a cluster, CPU actors here (Ray's batch-inference pattern). One input row is one shard of
texts (`shard_size`): the actor tokenizes it once, sorts it by token length and cuts it into
token-budget sub-batches (rows x longest row <= `batch_tokens`), so padding all but disappears,
then writes the shard itself (`<name>-00000.npz`: row ids and embeddings, atomically, through
raysys.storage) and hands back only its path and row count: no embedding passes through the
driver. Shards already in storage, and encoded the same way (`fast_path`), are not encoded again.

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
        self.fast_path = check_fast_path(fast_path)
        self.batch_tokens = batch_tokens or (GPU_BATCH_TOKENS if self.device.type == "cuda" else CPU_BATCH_TOKENS)
        tok = self.model.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.pad_left = getattr(tok, "padding_side", "right") == "left"

    def __call__(self, batch: dict[str, np.ndarray]):
        """Each row is a shard to write: {"path", "first" (its first row id), "texts", "kinds"}.
        Yields {"path", "rows"} once the shard is in storage."""
        for path, first, texts, kinds in zip(batch["path"], batch["first"], batch["texts"], batch["kinds"]):
            embeddings = self.embed_texts([str(t) for t in texts], [str(k) for k in kinds])
            _write_shard(str(path), np.arange(int(first), int(first) + len(embeddings)), embeddings, self.fast_path)
            yield {"path": np.array([str(path)]), "rows": np.array([len(embeddings)], dtype=np.int64)}

    def embed_texts(self, texts: list[str], kinds: list[str]) -> np.ndarray:
        """[len(texts), d] float32 embeddings in row order, encoded shortest first per kind."""
        out = np.zeros((len(texts), self.model.backbone.config.hidden_size), dtype=np.float32)
        for kind in sorted(set(kinds)):
            idx = [i for i, k in enumerate(kinds) if k == kind]
            ids = self._tokenize([texts[i] for i in idx], kind)
            for chunk in token_budget_chunks([len(x) for x in ids], self.batch_tokens):
                out[[idx[j] for j in chunk]] = self._embed([ids[j] for j in chunk])
        return out

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
    `out_dir`, reusing shards already there; returns {name: [(uri, rows)]} in row order. The
    actors write the shards; only their paths and row counts come back to the driver.

    batch_tokens: padded tokens per forward pass (None: 1024 on CPU, 8192 on GPU). Each actor
    encodes one shard of `shard_size` rows at a time, so `num_encoders` shards are encoded at
    once. `fast_path` ("bf16", "int8"; None = exact) is recorded in each shard, and a shard
    encoded another way is encoded again."""
    fast_path = check_fast_path(fast_path)
    out_dir = str(out_dir)  # a local path or a storage URI (raysys.storage)
    storage.makedirs(out_dir)
    files: dict[str, list[tuple[str, int]]] = {}
    missing: list[pa.Table] = []  # one single-row table (one Ray Data block) per shard to encode
    for name, (set_texts, kind) in sets.items():
        set_kinds = [kind] * len(set_texts) if isinstance(kind, str) else list(kind)
        if len(set_kinds) != len(set_texts):
            raise ValueError(f"{len(set_kinds)} kinds for {len(set_texts)} texts")
        files[name] = []
        for i in range(-(-len(set_texts) // shard_size)):
            first, count = i * shard_size, _shard_len(i, shard_size, len(set_texts))
            path = _shard_path(out_dir, name, i)
            files[name].append((path, count))
            if not _valid_shard(path, i, shard_size, len(set_texts), fast_path):
                missing.append(pa.table({"path": [path], "first": [first], "texts": [set_texts[first:first + count]],
                                         "kinds": [set_kinds[first:first + count]]}))
    if missing:
        # One block per shard, so every actor of the pool gets shards (one block goes to one actor).
        ds = map_with_encoders(ray.data.from_arrow(missing), EncoderActor, model_path=model_path, settings=settings,
                               batch_tokens=batch_tokens, threads=threads, fast_path=fast_path,
                               num_encoders=num_encoders, use_gpu=use_gpu)
        wanted = {t["path"][0].as_py(): len(t["texts"][0]) for t in missing}
        written: set[str] = set()
        bar = Progress(f"encode {'+'.join(sets)}", sum(wanted.values()), "texts", mode=None if progress else "off")
        for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
            written.update(str(p) for p in batch["path"])
            bar.advance(int(batch["rows"].sum()))
        bar.close()
        if set(wanted) - written:  # an actor reported fewer shards than it was given: never silently short
            raise RuntimeError(f"encode: shards {sorted(set(wanted) - written)} were not written by the encoders")
    return files


def map_with_encoders(ds: "ray.data.Dataset", actor_class: type, *, model_path: str, settings: EncoderSettings,
                      batch_tokens: int | None, threads: int | None, fast_path: str | None, num_encoders: int,
                      use_gpu: bool) -> "ray.data.Dataset":
    """ds (one shard to write per row) mapped by a pool of `num_encoders` encoder actors, each
    loading the model once, with one GPU or `threads` CPUs."""
    return ds.map_batches(
        actor_class, fn_constructor_kwargs={"model_path": model_path, "settings": vars(settings),
                                            "batch_tokens": batch_tokens, "threads": threads, "fast_path": fast_path},
        batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=num_encoders),
        num_gpus=1 if use_gpu else 0, num_cpus=None if use_gpu else (threads or 1))


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


def _write_shard(path: str, rows: np.ndarray, embeddings: np.ndarray, fast_path: str | None = None) -> None:
    extra = {"fast_path": np.array(fast_path)} if fast_path else {}
    buf = io.BytesIO()
    np.savez(buf, row=np.asarray(rows, dtype=np.int64), embedding=np.asarray(embeddings, dtype=np.float32), **extra)
    storage.write_bytes(path, buf.getvalue())  # atomic (temp + rename locally, one PUT remotely)
