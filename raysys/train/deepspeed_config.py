"""TrainConfig -> the DeepSpeed config dict (ZeRO stage, precision, AdamW) and the LR schedule.

The schedule is one pure function, `lr_factor`; DeepSpeed applies it through `ScheduledLR`, a torch
scheduler handed to `deepspeed.initialize(lr_scheduler=lr_scheduler_factory(...))`. DeepSpeed's own
WarmupDecayLR is not used: it rejects warmup_num_steps=0, forces at least 2 warmup steps, and its
first two updates run at warmup_min_lr (0), so a 1-step run would not train at all.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable

import torch

from raysys.config import TrainConfig

LR_DECAYS = ("linear", "constant")


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


def mini_batches_per_batch(train: TrainConfig, world_size: int) -> int:
    """Backward passes per hybrid batch: 1, or one per mini-batch under gradient caching."""
    local_batch = train.global_batch_size // world_size
    return -(-local_batch // train.mini_batch_size) if train.mini_batch_size else 1


def build_deepspeed_config(train: TrainConfig, *, total_steps: int, world_size: int) -> dict:
    micro_batch = train.global_batch_size // world_size
    if micro_batch * world_size != train.global_batch_size:
        raise ValueError("global_batch_size must be a multiple of the number of workers")
    # Under gradient caching each mini-batch's backward is one DeepSpeed micro-step, so that ZeRO
    # 0-3 reduce, clip and step exactly as they do for plain gradient accumulation.
    backwards = mini_batches_per_batch(train, world_size)
    if backwards > 1:
        micro_batch = train.mini_batch_size
    precision = resolve_precision(train.precision, train.use_gpu)
    adamw = {"lr": train.lr, "weight_decay": train.weight_decay, "betas": [0.9, 0.999], "eps": 1e-8,
             # torch_adam: the stock torch AdamW; avoids DeepSpeed's JIT-compiled CPU Adam (minutes).
             "torch_adam": True}
    if train.fused_optimizer and fused_adamw_available():
        adamw["fused"] = True  # passed through to torch.optim.AdamW
    config = {
        # Our micro batch is the whole local share of a hybrid batch; accumulation multiplies it.
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": train.gradient_accumulation_steps * backwards,
        "train_batch_size": micro_batch * world_size * train.gradient_accumulation_steps * backwards,
        "gradient_clipping": train.gradient_clipping,
        "optimizer": {"type": "AdamW", "params": adamw},
        # No "scheduler": the LR schedule is passed as lr_scheduler=lr_scheduler_factory(...).
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


# ---- the learning-rate schedule ------------------------------------------------------------------

def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """Optimizer steps of linear warmup: ceil(ratio * total), capped so the peak LR is reached."""
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps} must be at least 1")
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio={warmup_ratio} must lie in [0, 1)")
    # The epsilon keeps float products such as 0.07 * 100 = 7.000000000000001 from adding a step.
    return min(total_steps - 1, math.ceil(warmup_ratio * total_steps - 1e-9))


def lr_factor(step: int, *, total_steps: int, warmup_ratio: float, decay: str = "linear") -> float:
    """The multiplier of train.lr for optimizer update `step` (0-based), total_steps >= 1.

    Warmup W = warmup_steps(): updates 0..W-1 use (k+1)/(W+1), so none runs at LR 0; update W
    uses the peak (W = 0: the first update already does). After it, "linear" decays as
    (T-k)/(T-W), ending at 1/(T-W) on the last update (0 from step T on); "constant" stays at 1.
    """
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    if decay not in LR_DECAYS:
        raise ValueError(f"decay={decay!r} must be one of {LR_DECAYS}")
    warmup = warmup_steps(total_steps, warmup_ratio)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if decay == "constant":
        return 1.0
    return max(0.0, (total_steps - step) / (total_steps - warmup))


def lr_at(train: TrainConfig, total_steps: int, step: int) -> float:
    """The learning rate optimizer update `step` applies under `train`."""
    return train.lr * lr_factor(step, total_steps=total_steps, warmup_ratio=train.warmup_ratio,
                                decay=train.lr_decay)


class ScheduledLR(torch.optim.lr_scheduler.LRScheduler):
    """`lr_factor` as a torch scheduler; DeepSpeed steps it once per optimizer update.

    Its checkpointed state is the position only (plain ints): a resumed run continues at the saved
    step with this run's schedule, and load_state_dict writes that step's LR into the optimizer.
    (Under ZeRO >= 1 DeepSpeed restores the optimizer after the scheduler, so the first resumed
    update uses the saved LR: the same value unless train.lr or the step budget changed.)
    """

    def __init__(self, optimizer, *, total_steps: int, warmup_ratio: float, decay: str = "linear"):
        lr_factor(0, total_steps=total_steps, warmup_ratio=warmup_ratio, decay=decay)  # fail here, not mid-run
        self.total_steps, self.warmup_ratio, self.decay = total_steps, warmup_ratio, decay
        super().__init__(optimizer)

    def _factor(self) -> float:
        return lr_factor(self.last_epoch, total_steps=self.total_steps, warmup_ratio=self.warmup_ratio,
                         decay=self.decay)

    def get_lr(self) -> list[float]:
        return [base * self._factor() for base in self.base_lrs]

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch, "_step_count": self._step_count}

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_epoch, self._step_count = state_dict["last_epoch"], state_dict["_step_count"]
        self._last_lr = [base * self._factor() for base in self.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr


def lr_scheduler_factory(train: TrainConfig, total_steps: int) -> Callable:
    """For deepspeed.initialize(lr_scheduler=...): DeepSpeed calls it with its torch optimizer."""
    return lambda optimizer: ScheduledLR(optimizer, total_steps=total_steps, warmup_ratio=train.warmup_ratio,
                                         decay=train.lr_decay)
