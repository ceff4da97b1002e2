"""Per-step metrics on rank 0: a progress line, and TensorBoard or MLflow when configured.

Ray Train V2 has no driver-side logger callbacks, so the integrations run in the rank-0
worker: TensorBoard through tensorboardX (a Ray dependency), MLflow through Ray's
`setup_mlflow` (reads MLFLOW_TRACKING_URI; needs `pip install mlflow`).
"""

from __future__ import annotations

from pathlib import Path

from raysys.config import Config
from raysys.errors import ConfigError


class MetricsLogger:
    def __init__(self, config: Config, rank: int, run_name: str):
        self.rank, self.kind, self.sink = rank, config.train.logger, None
        if rank != 0 or self.kind is None:
            return
        if self.kind == "tensorboard":
            from tensorboardX import SummaryWriter

            self.sink = SummaryWriter(str(Path(config.output_dir).resolve() / "tensorboard" / run_name))
        elif self.kind == "mlflow":
            from ray.air.integrations.mlflow import setup_mlflow

            self.sink = setup_mlflow(config.to_dict(), experiment_name=config.name, run_name=run_name)
        else:
            raise ConfigError(f"train.logger={self.kind!r}: must be tensorboard, mlflow or null")

    def log(self, metrics: dict, total_steps: int) -> None:
        if self.rank != 0:
            return
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k not in ("step", "epoch")}
        if "pairs_per_s" in metrics or "val_loss" in metrics:  # a log or validation step
            shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in numbers.items())
            print(f"[raysys train] step {metrics['step']}/{total_steps} {shown}", flush=True)
        if self.kind == "tensorboard":
            for key, value in numbers.items():
                self.sink.add_scalar(key, value, metrics["step"])
        elif self.kind == "mlflow":
            self.sink.log_metrics(numbers, step=metrics["step"])

    def close(self) -> None:
        if self.kind == "tensorboard" and self.sink is not None:
            self.sink.close()
