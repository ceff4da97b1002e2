"""TrainConfig -> the DeepSpeed config dict (ZeRO stage, precision, AdamW, warmup + linear decay)."""

from __future__ import annotations

import inspect
import math

import torch

from raysys.config import TrainConfig


def resolve_precision(requested: str, use_gpu: bool) -> str:
    """'auto' means bf16 on GPUs that support it, fp32 otherwise (bf16 is slow on most CPUs)."""
    if requested != "auto":
        return requested
    if use_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def fused_adamw_available() -> bool:
    """torch >= 2.4 has a fused AdamW for CPU as well as CUDA tensors."""
    return "fused" in inspect.signature(torch.optim.AdamW).parameters and hasattr(torch, "_fused_adamw_")


def build_deepspeed_config(train: TrainConfig, *, total_steps: int, world_size: int) -> dict:
    micro_batch = train.global_batch_size // world_size
    if micro_batch * world_size != train.global_batch_size:
        raise ValueError("global_batch_size must be a multiple of the number of workers")
    precision = resolve_precision(train.precision, train.use_gpu)
    warmup = min(total_steps - 1, math.ceil(train.warmup_ratio * total_steps)) if total_steps > 1 else 0
    adamw = {"lr": train.lr, "weight_decay": train.weight_decay, "betas": [0.9, 0.999], "eps": 1e-8,
             # torch_adam: the stock torch AdamW; avoids DeepSpeed's JIT-compiled CPU Adam (minutes).
             "torch_adam": True}
    if train.fused_optimizer and fused_adamw_available():
        adamw["fused"] = True  # passed through to torch.optim.AdamW
    config = {
        # Our micro batch is the whole local share of a hybrid batch; accumulation multiplies it.
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "train_batch_size": micro_batch * world_size * train.gradient_accumulation_steps,
        "gradient_clipping": train.gradient_clipping,
        "optimizer": {"type": "AdamW", "params": adamw},
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {"total_num_steps": max(total_steps, 1), "warmup_num_steps": warmup,
                       "warmup_min_lr": 0.0, "warmup_max_lr": train.lr, "warmup_type": "linear"},
        },
        "zero_optimization": {"stage": train.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 10**9,  # progress comes from ray.train.report, not DeepSpeed's logger
        "wall_clock_breakdown": False,
    }
    if train.zero_stage == 3:
        # Small encoders: gather whole layers instead of many tiny prefetches.
        config["zero_optimization"].update({"stage3_param_persistence_threshold": 0,
                                            "stage3_gather_16bit_weights_on_model_save": True})
    return config
