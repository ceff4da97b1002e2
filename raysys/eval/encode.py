"""Distributed encoding: a Ray Data actor pool turns texts into embedding shards on disk.

Each actor loads the model once (`__init__`) and encodes batches (`__call__`), one GPU per actor
on a cluster, CPU actors here (Ray's batch-inference pattern). Texts are sorted by length so a
batch holds similar lengths, and each actor batch is cut into token-budget sub-batches, which
removes most padding. Embeddings are written as NumPy shards with their row ids
(`<name>-00000.npz`), atomically; shards already on disk are not encoded again.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray.data
import torch
from tqdm.auto import tqdm

from raysys.model.encoder import BiEncoder, EncoderSettings


class EncoderActor:
    """Ray Data callable class: model loaded once per actor, inference mode, bf16 on GPU."""

    def __init__(self, model_path: str, settings: dict, batch_tokens: int = 8192, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else None
        self.model = BiEncoder.from_pretrained(model_path, EncoderSettings(**settings), torch_dtype=dtype)
        self.model.to(self.device).eval()
        self.batch_tokens = batch_tokens

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts, kinds = batch["text"].tolist(), batch["kind"].tolist()
        out = np.zeros((len(texts), self.model.backbone.config.hidden_size), dtype=np.float32)
        for kind in sorted(set(kinds)):
            idx = [i for i, k in enumerate(kinds) if k == kind]
            for chunk in self._token_budget_chunks(idx, texts, kind):
                with torch.inference_mode():
                    enc = self.model.tokenize([texts[i] for i in chunk], kind)
                    emb = self.model(enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device))
                out[chunk] = emb.float().cpu().numpy()
        return {"row": batch["row"], "embedding": out}

    def _token_budget_chunks(self, idx: list[int], texts: list[str], kind: str):
        """Sub-batches whose padded size (rows x longest row) stays under the token budget."""
        s = self.model.settings
        limit = s.max_query_length if kind == "query" else s.max_passage_length
        lengths = {i: min(limit, len(ids)) for i, ids in
                   zip(idx, self.model.tokenizer([texts[i] for i in idx], add_special_tokens=True)["input_ids"])}
        idx = sorted(idx, key=lambda i: lengths[i])
        chunk, longest = [], 0
        for i in idx:
            longest_if_added = max(longest, lengths[i])
            if chunk and longest_if_added * (len(chunk) + 1) > self.batch_tokens:
                yield chunk
                chunk, longest_if_added = [], lengths[i]
            chunk.append(i)
            longest = longest_if_added
        if chunk:
            yield chunk


def encode_texts(texts: list[str], kind: str | list[str], *, model_path: str, settings: EncoderSettings,
                 out_dir: str | os.PathLike, name: str, shard_size: int = 4096, batch_tokens: int = 8192,
                 num_encoders: int = 1, use_gpu: bool = False, threads: int | None = None,
                 progress: bool = True) -> np.ndarray:
    """Encode `texts` (row i -> embedding i), reusing shards already in `out_dir`; returns [N, d]."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kinds = [kind] * len(texts) if isinstance(kind, str) else list(kind)
    shard_paths = [out_dir / f"{name}-{i:05d}.npz" for i in range(-(-len(texts) // shard_size))]
    missing = [i for i, p in enumerate(shard_paths) if not _valid_shard(p, i, shard_size, len(texts))]
    if missing:
        rows = np.concatenate([np.arange(i * shard_size, min((i + 1) * shard_size, len(texts))) for i in missing])
        # Length order: each actor batch then holds texts of similar length (less padding).
        rows = rows[np.argsort([len(texts[r]) for r in rows], kind="stable")]
        table = pa.table({"row": rows, "text": [texts[r] for r in rows], "kind": [kinds[r] for r in rows]})
        ds = ray.data.from_arrow(table).map_batches(
            EncoderActor, fn_constructor_kwargs={"model_path": model_path, "settings": vars(settings),
                                                 "batch_tokens": batch_tokens, "threads": threads},
            batch_size=256, batch_format="numpy", concurrency=num_encoders,
            num_gpus=1 if use_gpu else 0, num_cpus=None if use_gpu else (threads or 1))
        pending: dict[int, dict[int, np.ndarray]] = {i: {} for i in missing}
        bar = tqdm(total=len(rows), desc=f"encode {name}", unit="text", disable=not progress)
        for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
            for row, emb in zip(batch["row"], batch["embedding"]):
                shard = int(row) // shard_size
                pending[shard][int(row)] = emb
                if len(pending[shard]) == _shard_len(shard, shard_size, len(texts)):
                    _write_shard(shard_paths[shard], pending.pop(shard))
            bar.update(len(batch["row"]))
        bar.close()
    return np.concatenate([np.load(p)["embedding"] for p in shard_paths]) if shard_paths else np.zeros((0, 0))


def _shard_len(shard: int, shard_size: int, total: int) -> int:
    return min(shard_size, total - shard * shard_size)


def _valid_shard(path: Path, shard: int, shard_size: int, total: int) -> bool:
    if not path.exists():
        return False
    try:
        with np.load(path) as z:
            rows = z["row"]
            return len(rows) == _shard_len(shard, shard_size, total) and int(rows[0]) == shard * shard_size
    except Exception:  # truncated or corrupt: encode it again
        return False


def _write_shard(path: Path, rows_to_emb: dict[int, np.ndarray]) -> None:
    rows = np.array(sorted(rows_to_emb), dtype=np.int64)
    emb = np.stack([rows_to_emb[r] for r in rows]).astype(np.float32)
    tmp = path.with_name(path.name + ".tmp.npz")
    with open(tmp, "wb") as f:
        np.savez(f, row=rows, embedding=emb)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
