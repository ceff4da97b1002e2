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


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0, keeping the autograd graph (identity when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    # The functional collective's backward is a sum reduce-scatter, like the deprecated
    # torch.distributed.nn.functional.all_gather it replaces.
    from torch.distributed._functional_collectives import all_gather_single

    return all_gather_single(t.contiguous(), 0, dist.group.WORLD)


def info_nce_loss(queries: torch.Tensor, passages: torch.Tensor, hard_negatives: torch.Tensor | None = None,
                  *, temperature: float = 0.05, symmetric: bool = False,
                  gather: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (loss, in-batch accuracy) for this worker's queries.

    Candidates: all workers' positives, then all workers' hard negatives (if any). Query i of
    rank r has its positive at column r * B + i.
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
