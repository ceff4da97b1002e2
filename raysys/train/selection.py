"""Model selection: which checkpoint is "the" trained model, and when to stop early.

Hugging Face Trainer's conventions: `metric_for_best_model` ranks checkpoints (loss-like
metrics lower is better, retrieval metrics higher), `export_best_model` (its
`load_best_model_at_end`) makes the best checkpoint's export the run's model, and
`early_stopping_patience` stops after that many evaluations without improvement. The
decision runs in every worker on the same, already rank-averaged metrics; the driver and
`raysys reproduce` find the selected checkpoint again from the run directory.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from raysys import storage
from raysys.errors import RaysysError

LOWER_IS_BETTER = ("val_loss", "val_rank_distance")
RETRIEVAL_METRICS = ("val_map_mono", "val_map_cross", "val_map_multi", "val_map_mean", "val_rank_distance")
SELECTION_METRICS = ("val_loss", "val_accuracy", *RETRIEVAL_METRICS)


def score_order(metric: str) -> str:
    """Ray's CheckpointConfig order for `metric`."""
    return "min" if metric in LOWER_IS_BETTER else "max"


def needs_retrieval(train) -> bool:
    """Validation retrieval runs when asked for, or when the selection metric comes from it."""
    return train.val_retrieval or train.metric_for_best_model in RETRIEVAL_METRICS


@dataclass
class BestModel:
    """The best value of the selection metric so far, its step, and evaluations since (in checkpoints)."""

    metric: str
    patience: int | None = None
    best: float | None = None
    best_step: int | None = None
    evaluations_since_best: int = 0

    def update(self, value: float, step: int) -> bool:
        """Record one evaluation; True when it improved on every earlier one."""
        lower = self.metric in LOWER_IS_BETTER
        if self.best is None or (value < self.best if lower else value > self.best):
            self.best, self.best_step, self.evaluations_since_best = float(value), step, 0
            return True
        self.evaluations_since_best += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.evaluations_since_best >= self.patience

    def to_state(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict | None, metric: str, patience: int | None) -> "BestModel":
        """Resume the record (a checkpoint written with the same metric), else start afresh."""
        if state and state.get("metric") == metric:
            return cls(metric, patience, state["best"], state["best_step"], state["evaluations_since_best"])
        return cls(metric, patience)


def selected_checkpoint(final_checkpoint: str, export_best: bool) -> str:
    """The checkpoint whose export is the run's model: the final one, or with `export_best` the one
    at the best step recorded in the final state (a sibling in the same run directory)."""
    from raysys.train.checkpoint import EXPORT_DIR, complete_checkpoints, verify_checkpoint

    state = verify_checkpoint(final_checkpoint)
    best_step = (state.get("best_model") or {}).get("best_step")
    if not export_best or best_step is None or best_step == state["global_step"]:
        return final_checkpoint
    run_dir = final_checkpoint.rstrip("/").rsplit("/", 1)[0]
    for step, uri in complete_checkpoints(run_dir):
        if step == best_step and storage.is_file(storage.join(uri, EXPORT_DIR, "config.json")):
            return uri
    raise RaysysError(f"{run_dir}: the best checkpoint (step {best_step}) with an exported model is missing; "
                      f"the final one is {final_checkpoint}")


INTERPOLATION_RULES = ("mean_map", "keep_mono", "keep_mono_ci")
RULES_AGAINST_INITIAL = ("keep_mono", "keep_mono_ci")  # they compare with w = 0


def evaluated_weights(weights: list[float] | None, rule: str) -> list[float]:
    """The interpolation weights to evaluate: the keep_mono rules compare against the initial model,
    so w = 0 joins."""
    chosen = set(weights or [])
    if chosen and rule in RULES_AGAINST_INITIAL:
        chosen.add(0.0)
    return sorted(chosen)


def row_is_complete(row: dict, rule: str) -> bool:
    """Whether an earlier curve's row carries what `rule` reads (keep_mono_ci: the bootstrap
    against the initial model, which curves written before it lack)."""
    return rule != "keep_mono_ci" or row["weight"] == 0.0 or "mono_vs_initial" in row


def choose_weight(rows: list[dict], rule: str) -> dict:
    """The winning row of an interpolation curve (rows: weight, mono_map, mean_map, ... on validation).
    mean_map: best mean mAP (ties: the larger weight). keep_mono: the largest weight whose monolingual
    mAP is not below the initial model's (w = 0), i.e. alignment without losing monolingual retrieval.
    keep_mono_ci: the largest weight whose monolingual mAP is above the initial model's with 95 %
    confidence (the lower end of the paired bootstrap interval over validation queries of the
    difference is >= 0; rows' `mono_vs_initial`): keep_mono picks the edge where the validation gain
    is zero, so the held-out gain there is zero give or take the articles' noise."""
    if rule == "mean_map":
        return max(rows, key=lambda r: (r["mean_map"], r["weight"]))
    initial = next((r for r in rows if r["weight"] == 0.0), None)
    if initial is None:
        raise RaysysError(f"the {rule} rule needs the initial model (w = 0) on the curve")
    if rule == "keep_mono_ci":
        missing = [r["weight"] for r in rows if not row_is_complete(r, rule)]
        if missing:
            raise RaysysError(f"the keep_mono_ci rule needs each weight's bootstrap against the initial model; "
                              f"w = {', '.join(f'{w:g}' for w in missing)} lack it")
        return max((r for r in rows if r["weight"] == 0.0 or r["mono_vs_initial"]["low"] >= 0),
                   key=lambda r: r["weight"])
    return max((r for r in rows if r["mono_map"] >= initial["mono_map"]), key=lambda r: r["weight"])
