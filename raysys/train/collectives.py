"""Small collectives the training loop needs (no-ops when not distributed)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _device() -> torch.device:
    """NCCL reduces only CUDA tensors; gloo only CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_min(value: int) -> int:
    if not distributed():
        return value
    t = torch.tensor([value], dtype=torch.long, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def all_reduce_max(value: int) -> int:
    return -all_reduce_min(-value)


def mean_over_ranks(value: float) -> float:
    if not distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def mean_over_ranks_each(values: list[torch.Tensor]) -> list[float]:
    """Scalar device tensors (e.g. per-step losses) averaged over ranks: one collective and one
    device-to-host copy for all of them."""
    if not values:
        return []
    stacked = torch.stack([v.detach().double() for v in values])
    if distributed():
        stacked = stacked.to(_device())
        dist.all_reduce(stacked)
        stacked /= dist.get_world_size()
    return stacked.cpu().tolist()


def all_gather_objects(obj) -> list:
    if not distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
