"""Validation inside the training loop: InfoNCE loss on fixed batches, and (optionally)
retrieval mAP in all three LAReQA settings on the validation pairs.

Both are collectives: every rank runs the same number of forward passes (ZeRO-3 gathers
parameters inside each forward, so a rank that skipped one would hang the others).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from raysys.data.hybrid import HybridBatcher, ParallelItems
from raysys.train.collectives import all_gather_objects, all_reduce_max, all_reduce_min, mean_over_ranks
from raysys.train.loss import info_nce_loss

VALIDATION_ALPHA = 0.5  # a fixed mix, so validation losses are comparable across swept alphas
ENCODE_CHUNK = 32


def validation_batches(items: ParallelItems, languages: list[str], seed: int, rank: int,
                       local_batch: int) -> list:
    """Fixed validation batches (seeded; alpha 0.5 where both types fit on every rank)."""
    mono_ok = all_reduce_min(int(all(items.count_with(lang) >= local_batch for lang in languages)))
    cross_ok = all_reduce_min(int(items.count_multilingual() >= local_batch))
    if not (mono_ok or cross_ok):
        return []
    alpha = VALIDATION_ALPHA if (mono_ok and cross_ok) else float(mono_ok)
    batcher = HybridBatcher(items, languages=languages, alpha=alpha, seed=seed + 1,
                            local_batch_size=local_batch, rank=rank)
    steps = all_reduce_min(batcher.local_steps_per_epoch())
    return [b for _, b in batcher.epoch(0, steps)]


@torch.no_grad()
def validation_loss(engine, batches: list, temperature: float) -> dict:
    engine.eval()
    losses, accuracies = [], []
    for batch in batches:
        q = engine.module.tokenize(batch.queries, "query", engine.device)
        p = engine.module.tokenize(batch.passages, "passage", engine.device)
        loss, acc = info_nce_loss(engine(q["input_ids"], q["attention_mask"]),
                                  engine(p["input_ids"], p["attention_mask"]), temperature=temperature)
        losses.append(loss.item())
        accuracies.append(acc.item())
    engine.train()
    return {"val_loss": mean_over_ranks(float(np.mean(losses))),
            "val_accuracy": mean_over_ranks(float(np.mean(accuracies)))}


@torch.no_grad()
def _encode(engine, texts: list[str], kind: str) -> np.ndarray:
    chunks = [texts[i:i + ENCODE_CHUNK] for i in range(0, len(texts), ENCODE_CHUNK)]
    out = []
    for i in range(all_reduce_max(len(chunks))):  # equal forward count on every rank
        chunk = chunks[i] if i < len(chunks) else ["."]
        batch = engine.module.tokenize(chunk, kind, engine.device)
        emb = engine(batch["input_ids"], batch["attention_mask"]).float().cpu().numpy()
        if i < len(chunks):
            out.append(emb)
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def validation_retrieval(engine, local_rows: pa.Table) -> dict:
    """mAP in the monolingual, cross-lingual and multilingual settings over the validation pairs
    (candidates: each language's distinct passages), plus the multilingual rank distance."""
    from raysys.eval.lareqa import evaluate_lareqa
    from raysys.eval.pairs_corpus import corpus_from_pairs

    engine.eval()
    cols = local_rows.select(["id", "lang", "query", "passage", "group"]).to_pydict()
    q_emb = _encode(engine, cols["query"], "query")
    p_emb = _encode(engine, cols["passage"], "passage")
    engine.train()
    gathered = all_gather_objects((cols, q_emb, p_emb))
    table = pa.Table.from_pylist([dict(zip(c, row)) for c, _, _ in gathered for row in zip(*c.values())])
    q_all = np.concatenate([q for _, q, _ in gathered if len(q)])
    p_all = np.concatenate([p for _, _, p in gathered if len(p)])
    row_of = {(pid, lang): i for i, (pid, lang) in enumerate(zip(table.column("id").to_pylist(),
                                                                 table.column("lang").to_pylist()))}
    passage_row = {(lang, text): i for i, (lang, text) in reversed(list(enumerate(
        zip(table.column("lang").to_pylist(), table.column("passage").to_pylist()))))}
    corpus = corpus_from_pairs(table.append_column("hard_negative", pa.nulls(len(table), pa.list_(pa.string()))))
    questions = corpus.questions.to_pydict()
    candidates = corpus.candidates.to_pydict()
    q = q_all[[row_of[(pid, lang)] for pid, lang in zip(questions["id"], questions["lang"])]]
    c = p_all[[passage_row[(lang, text)] for lang, text in zip(candidates["lang"], candidates["text"])]]
    summary = evaluate_lareqa(corpus, q, c, top_k=1)["summary"]
    maps = [summary[s]["map"] for s in ("monolingual", "cross_lingual", "multilingual")]
    return {"val_map_mono": maps[0], "val_map_cross": maps[1], "val_map_multi": maps[2],
            "val_map_mean": float(np.mean(maps)), "val_rank_distance": summary["multilingual"]["rank_distance"]}
