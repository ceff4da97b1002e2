"""Training progress on the driver, fed by the metrics the workers report to Ray Train.

Ray Train V2 runs a `UserCallback` in its controller, an actor Ray Train pins to the driver's
node. `ReportRelay.after_report` appends rank 0's reported metrics to a file there, and a driver
thread (`TrainProgress`) turns each record into one progress update: a bar on a terminal, one line
per report (= per `train.log_every` steps, and at checkpoints) elsewhere. The workers print
nothing. Should the controller ever run on another node, the relay prints the line itself (Ray
forwards it to the driver).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import TextIO

import ray
from ray.train import UserCallback

from raysys.config import Config
from raysys.progress import Progress, format_fields

# Reported metrics shown, under their display names (the rest stay in the checkpoints and logs).
SHOWN = {"loss": "loss", "val_loss": "val_loss", "val_map_mean": "val_mAP", "pairs_per_s": "pairs/s",
         "mono_steps": "mono", "cross_steps": "cross"}


def progress_record(metrics: dict) -> dict:
    """The JSON-safe part of one worker's reported metrics that the display needs."""
    keep = ("step", "total_steps", *SHOWN)
    return {k: (float(v) if isinstance(v, float) else v) for k, v in metrics.items()
            if k in keep and isinstance(v, (int, float))}


def display_fields(record: dict) -> dict:
    fields = {SHOWN[k]: record[k] for k in SHOWN if k in record}
    if "pairs/s" in fields:
        fields["pairs/s"] = round(fields["pairs/s"], 2)
    return fields


class ReportRelay(UserCallback):
    """Runs in the Ray Train controller: hands rank 0's reports to the driver through `path`."""

    def __init__(self, path: str, node_id: str | None):
        self.path, self.node_id = path, node_id

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        if not metrics:
            return
        record = progress_record(metrics[0])
        if "step" not in record:
            return
        if self.node_id is None or ray.get_runtime_context().get_node_id() == self.node_id:
            with open(self.path, "a") as f:  # one short line: appended atomically enough for a reader
                f.write(json.dumps(record) + "\n")
        else:
            total = record.get("total_steps", "?")
            print(f"[train] step {record['step']}/{total}, {format_fields(display_fields(record))}", flush=True)


class TrainProgress:
    """`with TrainProgress(config) as p: train(config, callbacks=p.callbacks)`."""

    def __init__(self, config: Config, *, mode: str | None = None, out: TextIO | None = None,
                 poll_s: float = 0.5):
        self.total = config.train.max_steps  # until the first report says otherwise
        self.started = time.monotonic()
        self.mode, self.out, self.poll_s = mode, out, poll_s
        self._dir = tempfile.mkdtemp(prefix="raysys-progress-")
        self.path = os.path.join(self._dir, "reports.jsonl")
        Path(self.path).touch()
        node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        self.callbacks = [ReportRelay(self.path, node_id)]
        self.progress: Progress | None = None
        self._offset, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._follow, name="raysys-train-progress", daemon=True)

    def __enter__(self) -> "TrainProgress":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()  # reports that arrived after the thread's last look
        if self.progress is not None:
            self.progress.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def _follow(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll()
            if self.progress is not None:
                self.progress.refresh()

    def poll(self) -> int:
        """Show every complete record written since the last call; returns how many."""
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        complete = chunk[:chunk.rfind(b"\n") + 1]  # a half-written last line waits for the next poll
        self._offset += len(complete)
        records = [json.loads(line) for line in complete.decode().splitlines() if line.strip()]
        for record in records:
            self.show(record)
        return len(records)

    def show(self, record: dict) -> None:
        total = record.get("total_steps", self.total)
        if self.progress is None:
            self.progress = Progress("train", total, "steps", mode=self.mode, interval_s=0, out=self.out,
                                     started=self.started)
        self.progress.set(record["step"], total=total, **display_fields(record))


def train_with_progress(config: Config, **kwargs):
    """raysys.train.run.train with the driver's progress display (the commands use this)."""
    from raysys.runtime import ensure_ray
    from raysys.train.run import train

    ensure_ray()  # first, so the relay knows the driver's node
    with TrainProgress(config) as progress:
        return train(config, **{**kwargs, "callbacks": [*(kwargs.get("callbacks") or []), *progress.callbacks]})
