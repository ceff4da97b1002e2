"""One hybrid batch through the DeepSpeed engine: forwards, InfoNCE, backward(s), step(s).

Two ways to the same gradient:
- `plain_step`: queries in one forward, candidates (positives and hard negatives together) in
  another, one backward. Activation memory grows with the batch.
- `cached_step` (`train.mini_batch_size`; sentence-transformers' CachedMultipleNegativesRankingLoss,
  Tevatron's GradCache): embed the local batch mini-batch by mini-batch without a graph, compute
  the loss over the gathered global batch and its gradient w.r.t. the embeddings once, then re-run
  each mini-batch with a graph and back-propagate the cached embedding gradients. Activation
  memory is one mini-batch's. Each mini-batch's backward is one DeepSpeed micro-step
  (raysys.train.deepspeed_config.mini_batches_per_batch), so ZeRO 0-3 reduce, clip and update
  exactly as for plain gradient accumulation: GradCache implementations that call backward
  outside the engine do not work with DeepSpeed.

Dropout is seeded per (batch, mini-batch): the graph pass replays the embedding pass's masks.
Both return the loss and accuracy as device tensors; nothing here syncs with the host.

With `train.length_groups` > 1 each forward of candidates runs in groups of similar token length
(`LengthGroups`, planned on the host), each padded only to its own longest row, and the embeddings
are put back in order: the same function of the parameters with fewer padded tokens (4 groups:
~1.9x fewer on batches of 32 XQuAD-R sentences). Dropout masks are drawn per group, so a run is
not bit-identical to one with 1 group.

With `train.distill_weight` > 0 a frozen teacher (the initial model, in eval mode) embeds the
same tokens of a monolingual batch, and the similarity-distillation term joins the loss; in the
cached step its embeddings are made in the no-graph pass, so the term's gradient reaches the
parameters through the cached embedding gradients like InfoNCE's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from raysys.config import TrainConfig
from raysys.data.buckets import hash_unit
from raysys.data.hybrid import MONO
from raysys.train.loss import info_nce_loss, similarity_distillation_loss


Tokens = list  # per mini-batch (the whole batch for a plain step): (queries, candidates) tensor dicts


def train_step(engine, batch, train: TrainConfig, seed: int, tokens: Tokens | None = None, teacher=None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and in-batch accuracy (detached device tensors) of this worker's share of `batch`;
    the engine has run one backward and `engine.step()` per DeepSpeed micro-step. `tokens`:
    `batch_tokens(batch, ...)` made ahead of time (raysys.train.prefetch); tokenized here if absent.
    `teacher`: the frozen initial model when train.distill_weight > 0 (used on monolingual batches:
    their passages share the query's language, the setting the regulariser keeps)."""
    engine.train()
    if tokens is None:
        tokens = batch_tokens(engine.module.tokenize, batch, train.mini_batch_size)
    device = engine.device
    # Planned from the host tensors (no device sync), carried with each mini-batch's candidates.
    plans = [LengthGroups.plan(candidates["attention_mask"], train.length_groups) for _, candidates in tokens]
    def to_device(part: dict) -> dict:
        return {k: v.to(device, non_blocking=True) for k, v in part.items()}

    chunks = [(to_device(queries), to_device(candidates), plan.to(device) if plan else None)
              for (queries, candidates), plan in zip(tokens, plans)]
    if teacher is None or not train.distill_weight > 0 or batch.plan.kind != MONO:
        teacher = None
    keys = text_keys(batch, device) if train.mask_duplicate_positives else None
    if train.mini_batch_size:
        return cached_step(engine, batch, chunks, train, seed, teacher, keys)
    return plain_step(engine, batch, chunks[0], train, seed, teacher, keys)


def text_keys(batch, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stable int64 keys of the batch's passages and hard negatives (equal texts, equal keys, on
    every worker): InfoNCE leaves a query's positive's duplicates out of its negatives."""
    def keys(texts):  # the buckets' stable 64-bit text hash, read as int64
        return torch.from_numpy(hash_unit(list(texts)).view(np.int64)).to(device)
    return keys(batch.passages), keys(batch.hard_negatives) if batch.hard_negatives is not None else None


def batch_tokens(tokenize, batch, mini_batch_size: int | None) -> Tokens:
    """Host tensors of each mini-batch [start, stop): queries, and candidates = passages then hard
    negatives (one forward: same prefix and length limit). `tokenize(texts, kind)` -> tensor dict."""
    pairs = len(batch.queries)
    tokens = []
    for start, stop in mini_batch_bounds(pairs, mini_batch_size or max(pairs, 1)):
        texts = list(batch.passages[start:stop])
        if batch.hard_negatives is not None:
            k = batch.negatives_per_pair
            texts += list(batch.hard_negatives[start * k:stop * k])
        tokens.append((tokenize(batch.queries[start:stop], "query"), tokenize(texts, "passage")))
    return tokens


@dataclass
class LengthGroups:
    """Rows of a padded batch sorted by token count and cut into groups: `rows[g]` are group g's
    row indices, `columns[g]` the (start, stop) of the columns any of them uses (either padding
    side), `inverse` puts the concatenated group outputs back in the batch's row order."""
    rows: list[torch.Tensor]
    columns: list[tuple[int, int]]
    inverse: torch.Tensor

    @classmethod
    def plan(cls, attention_mask: torch.Tensor, groups: int) -> "LengthGroups | None":
        """None when one forward is asked for (or there are fewer than two rows)."""
        groups = min(groups, attention_mask.size(0))
        if groups <= 1:
            return None
        used = attention_mask.bool()
        order = torch.argsort(used.sum(1), stable=True)
        rows = [part for part in torch.tensor_split(order, groups) if len(part)]
        columns = []
        for part in rows:
            any_row = used[part].any(0).nonzero().flatten()
            columns.append((int(any_row[0]), int(any_row[-1]) + 1) if len(any_row) else (0, 1))
        return cls(rows, columns, torch.argsort(order))

    def to(self, device) -> "LengthGroups":
        return LengthGroups([r.to(device, non_blocking=True) for r in self.rows], self.columns,
                            self.inverse.to(device, non_blocking=True))


def embed_tokens(model, tokens: dict, groups: LengthGroups | None = None) -> torch.Tensor:
    """`model(input_ids, attention_mask)`, in length groups when a plan is given."""
    if groups is None:
        return model(tokens["input_ids"], tokens["attention_mask"])
    parts = [model(tokens["input_ids"][rows, start:stop], tokens["attention_mask"][rows, start:stop])
             for rows, (start, stop) in zip(groups.rows, groups.columns)]
    return torch.cat(parts)[groups.inverse]


def _embed(engine, queries, candidates, groups=None) -> tuple[torch.Tensor, torch.Tensor]:
    return embed_tokens(engine, queries), embed_tokens(engine, candidates, groups)


def _teacher_embed(teacher, queries, candidates, groups=None) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return embed_tokens(teacher, queries), embed_tokens(teacher, candidates, groups)


def _loss(q_emb, passages, negatives, train: TrainConfig, teacher_emb=None, keys=None):
    """InfoNCE, plus the weighted similarity distillation toward the teacher's (queries, positives)."""
    passage_keys, negative_keys = keys or (None, None)
    loss, accuracy = info_nce_loss(q_emb, passages, negatives, temperature=train.temperature,
                                   symmetric=train.symmetric_loss, passage_keys=passage_keys,
                                   negative_keys=negative_keys)
    if teacher_emb is not None:
        loss = loss + train.distill_weight * similarity_distillation_loss(
            q_emb, passages, *teacher_emb, temperature=train.distill_temperature or train.temperature)
    return loss, accuracy


def plain_step(engine, batch, tokens, train: TrainConfig, seed: int, teacher=None, keys=None):
    torch.manual_seed(seed)
    q_emb, c_emb = _embed(engine, *tokens)
    n_pairs = len(batch.queries)
    negatives = c_emb[n_pairs:] if batch.hard_negatives is not None else None
    teacher_emb = None
    if teacher is not None:
        t_q, t_c = _teacher_embed(teacher, *tokens)
        teacher_emb = (t_q, t_c[:n_pairs])
    loss, accuracy = _loss(q_emb, c_emb[:n_pairs], negatives, train, teacher_emb, keys)
    engine.backward(loss)
    engine.step()  # DeepSpeed updates only at an accumulation boundary
    return loss.detach(), accuracy


def mini_batch_bounds(pairs: int, mini_batch_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + mini_batch_size, pairs)) for start in range(0, pairs, mini_batch_size)]


def cached_step(engine, batch, chunks, train: TrainConfig, seed: int, teacher=None, keys=None):
    pairs, has_negatives = len(batch.queries), batch.hard_negatives is not None
    bounds = mini_batch_bounds(pairs, train.mini_batch_size)
    # 1. Embeddings without a graph, mini-batch by mini-batch (and the teacher's, if any).
    q_parts, p_parts, n_parts, teacher_parts = [], [], [], []
    with torch.no_grad():
        for index, (queries, candidates, groups) in enumerate(chunks):
            torch.manual_seed(seed + index * 2**40)  # mini-batch 0: the plain step's seed
            q, c = _embed(engine, queries, candidates, groups)
            size = q.size(0)
            q_parts.append(q)
            p_parts.append(c[:size])
            n_parts.append(c[size:])
            if teacher is not None:
                t_q, t_c = _teacher_embed(teacher, queries, candidates, groups)
                teacher_parts.append((t_q, t_c[:size]))
    # 2. The loss over the (gathered) global batch and its gradient w.r.t. this worker's embeddings;
    #    the gather's backward hands each worker the gradient of every worker's queries on its candidates.
    q_all = torch.cat(q_parts).requires_grad_()
    p_all = torch.cat(p_parts).requires_grad_()
    n_all = torch.cat(n_parts).requires_grad_() if has_negatives else None
    teacher_emb = None
    if teacher_parts:
        teacher_emb = (torch.cat([q for q, _ in teacher_parts]), torch.cat([p for _, p in teacher_parts]))
    loss, accuracy = _loss(q_all, p_all, n_all, train, teacher_emb, keys)
    loss.backward()
    # 3. Each mini-batch again, with a graph and the same dropout masks; its embeddings' cached
    #    gradients flow into the parameters. DeepSpeed divides by its accumulation count, which
    #    counts mini-batches, so each surrogate is scaled by the gradient-accumulation steps only.
    scale = 1.0 / train.gradient_accumulation_steps
    for index, ((queries, candidates, groups), (start, stop)) in enumerate(zip(chunks, bounds)):
        torch.manual_seed(seed + index * 2**40)  # mini-batch 0: the plain step's seed
        q, c = _embed(engine, queries, candidates, groups)
        c_grad = p_all.grad[start:stop]
        if has_negatives:
            k = batch.negatives_per_pair
            c_grad = torch.cat([c_grad, n_all.grad[start * k:stop * k]])
        surrogate = (q * q_all.grad[start:stop]).sum() + (c * c_grad).sum()
        engine.backward(surrogate * scale, scale_wrt_gas=False)
        engine.step()
    return loss.detach(), accuracy
