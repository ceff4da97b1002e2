"""Per-step metrics on rank 0 to TensorBoard or MLflow, when configured.

Ray Train V2 has no driver-side logger callbacks, so the integrations run in the rank-0
worker: TensorBoard through tensorboardX (a Ray dependency), MLflow through Ray's
`setup_mlflow` (reads MLFLOW_TRACKING_URI; needs `pip install mlflow`).
"""

from __future__ import annotations

import tempfile

from raysys import storage
from raysys.config import Config
from raysys.errors import ConfigError


class MetricsLogger:
    def __init__(self, config: Config, rank: int, run_name: str, storage_root: str | None = None):
        """TensorBoard events go to <storage>/<run_name>/tensorboard (next to the checkpoints), so
        they land where every node and the user can find them; on remote storage they are written
        to a local directory and uploaded at every checkpoint and at the end."""
        self.rank, self.kind, self.sink, self.upload_to = rank, config.train.logger, None, None
        if rank != 0 or self.kind is None:
            return
        if self.kind == "tensorboard":
            from tensorboardX import SummaryWriter

            target = storage.join(storage_root or storage.absolute(f"{config.output_dir}/ray"), run_name, "tensorboard")
            if storage.is_remote(target):
                self.upload_to, self.local_dir = target, tempfile.mkdtemp(prefix="raysys-tensorboard-")
                target = self.local_dir
            self.sink = SummaryWriter(target)
        elif self.kind == "mlflow":
            from ray.air.integrations.mlflow import setup_mlflow

            self.sink = setup_mlflow(config.to_dict(), experiment_name=config.name, run_name=run_name)
        else:
            raise ConfigError(f"train.logger={self.kind!r}: must be tensorboard, mlflow or null")

    def log(self, metrics: dict, total_steps: int) -> None:
        if self.rank != 0:
            return
        # No progress print here: the driver shows the reported metrics (raysys.train.progress).
        numbers = {k: v for k, v in metrics.items()
                   if isinstance(v, (int, float)) and k not in ("step", "epoch", "total_steps")}
        if self.kind == "tensorboard":
            for key, value in numbers.items():
                self.sink.add_scalar(key, value, metrics["step"])
        elif self.kind == "mlflow":
            self.sink.log_metrics(numbers, step=metrics["step"])

    def sync(self) -> None:
        """Flush events and, on remote storage, upload them (called at checkpoints)."""
        if self.kind == "tensorboard" and self.sink is not None:
            self.sink.flush()
            if self.upload_to:
                storage.upload_dir(self.local_dir, self.upload_to)

    def close(self) -> None:
        if self.kind == "tensorboard" and self.sink is not None:
            self.sink.close()
            if self.upload_to:
                storage.upload_dir(self.local_dir, self.upload_to)
            self.sink = None
