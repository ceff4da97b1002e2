"""InfoNCE over in-batch negatives, with candidates gathered across workers.

Follows sentence-transformers' MultipleNegativesRankingLoss with `gather_across_devices`:
only the candidate side is gathered, differentiably, and labels are offset by
rank x local batch, so every query sees the global batch as negatives. With W workers each
computing the mean over its local queries, DeepSpeed's gradient averaging gives exactly the
gradient of the single-process loss on the concatenated batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _all_gather(t: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 (every rank the same number of rows); the backward sums the gathered
    gradient over ranks and keeps this rank's rows: the gradient of all ranks' losses w.r.t. its
    own embeddings. Plain blocking collectives (all_gather, all_reduce) that every backend has,
    instead of the functional collectives' async all_gather / reduce-scatter pair: those are the
    suspect (not proven) of an intermittent SIGSEGV in malloc of gloo workers with hard negatives."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), t.size(0)
        return _all_gather(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()  # reduced in place: never the engine's own buffer
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0, keeping the autograd graph (identity when not distributed)."""
    return _GatherWithGrad.apply(t.contiguous()) if _distributed() else t


def gather_keys(t: torch.Tensor) -> torch.Tensor:
    """All-gather of a tensor without gradient (text keys) along dim 0; identity when not distributed."""
    return _all_gather(t) if _distributed() else t


def info_nce_loss(queries: torch.Tensor, passages: torch.Tensor, hard_negatives: torch.Tensor | None = None,
                  *, temperature: float = 0.05, symmetric: bool = False, gather: bool = True,
                  passage_keys: torch.Tensor | None = None,
                  negative_keys: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (loss, in-batch accuracy) for this worker's queries.

    Candidates: all workers' positives, then all workers' hard negatives (if any). Query i of
    rank r has its positive at column r * B + i. With `passage_keys` (and `negative_keys` when
    there are hard negatives): one int64 key per text, equal for equal texts; a candidate whose key
    is the query's positive's (another pair's identical passage, or any pair's hard negative with
    the positive's text) is left out of its negatives: it is the positive, not a confuser.
    """
    # fp32 similarities and cross-entropy whatever the embeddings' dtype (scores are divided by a
    # temperature such as 0.05: bf16's 8 mantissa bits would round logits by up to ~0.3).
    queries, passages = queries.float(), passages.float()
    hard_negatives = hard_negatives.float() if hard_negatives is not None else None
    batch = queries.size(0)
    rank = dist.get_rank() if gather and dist.is_available() and dist.is_initialized() else 0
    all_passages = gather_with_grad(passages) if gather else passages
    candidates = [all_passages]
    if hard_negatives is not None:
        candidates.append(gather_with_grad(hard_negatives) if gather else hard_negatives)
    scores = queries @ torch.cat(candidates).T / temperature
    labels = torch.arange(batch, device=queries.device) + rank * batch
    if passage_keys is not None:
        keys = [gather_keys(passage_keys) if gather else passage_keys]
        if hard_negatives is not None:
            keys.append(gather_keys(negative_keys) if gather else negative_keys)
        duplicate = passage_keys[:, None] == torch.cat(keys)[None, :]
        duplicate[torch.arange(batch, device=queries.device), labels] = False
        scores = scores.masked_fill(duplicate, float("-inf"))
    loss = F.cross_entropy(scores, labels)
    if symmetric:
        # Passage -> query: this worker's passages against all workers' queries.
        all_queries = gather_with_grad(queries) if gather else queries
        backward_scores = passages @ all_queries.T / temperature
        loss = (loss + F.cross_entropy(backward_scores, labels)) / 2
    accuracy = (scores.argmax(dim=1) == labels).float().mean()
    return loss, accuracy.detach()


def similarity_distillation_loss(queries: torch.Tensor, passages: torch.Tensor, teacher_queries: torch.Tensor,
                                 teacher_passages: torch.Tensor, *, temperature: float = 0.05,
                                 gather: bool = True) -> torch.Tensor:
    """KL(teacher || student) between each query's softmax over the in-batch passages (all
    workers' positives, gathered as for InfoNCE), mean over this worker's queries: keeps the
    student's ranking of a batch close to a frozen teacher's (the initial model's). The teacher's
    embeddings carry no gradient."""
    all_passages = gather_with_grad(passages.float()) if gather else passages.float()
    with torch.no_grad():
        teacher_all = gather_with_grad(teacher_passages.float()) if gather else teacher_passages.float()
        target = F.log_softmax(teacher_queries.float() @ teacher_all.T / temperature, dim=1)
    student = F.log_softmax(queries.float() @ all_passages.T / temperature, dim=1)
    return F.kl_div(student, target, reduction="batchmean", log_target=True)
