"""The exported model: an HF + sentence-transformers directory from DeepSpeed's fp32 master weights.

Under bf16 the module holds a rounded working copy of each weight and the optimizer the fp32
master; under ZeRO 1-3 each rank holds a partition of the master (and, at ZeRO-3, of the working
copy too). The export takes the master, assembled from every rank's partition. No Ray import: the
device check (bench/gpu_check.py) uses it on machines without Ray.
"""

from __future__ import annotations

from pathlib import Path


def export_hf_model(engine, out_dir: Path, rank: int) -> None:
    """Collective: the HF + sentence-transformers directory from the fp32 master weights."""
    state = master_weights_state_dict(engine, rank)
    if rank == 0:
        engine.module.save(out_dir, state_dict=state)


def master_weights_state_dict(engine, rank: int) -> dict | None:
    """The backbone's state dict (on rank 0; None elsewhere) with every trained parameter taken from
    the optimizer's fp32 master copy: under bf16 the module holds a rounded working copy, and under
    ZeRO-3 only a partition of it. Collective: every rank must call it (ZeRO assembles partitions)."""
    from deepspeed.utils import safe_get_full_fp32_param

    backbone = engine.module.backbone
    masters = {}
    for name, param in backbone.named_parameters():  # same order on every rank
        full = safe_get_full_fp32_param(param)  # None without a master copy (ZeRO-0 in fp32: param is it)
        if rank == 0:
            masters[name] = (full if full is not None else param).detach().float().cpu().clone()
    if rank != 0:
        return None
    # Buffers (e.g. position ids) and the key set come from the module's own state dict.
    return {key: masters.get(key, value.detach().cpu().clone()) for key, value in backbone.state_dict().items()}
