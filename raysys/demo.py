"""The default job: build the embedded model, evaluate it, train hybrid alpha=0.5, evaluate again.

Runs offline in local mode on a small CPU machine, on the config given (`make demo`:
configs/recipe.yaml) or else the built-in defaults: multilingual-e5-small, XQuAD-R training
articles, held-out XQuAD-R articles for evaluation.
"""

from __future__ import annotations

import time
from pathlib import Path

from raysys.config import Config
from raysys.eval.report import write_comparison, write_report
from raysys.eval.run import evaluate
from raysys.model.default import resolve_model_path
from raysys.runtime import ensure_ray
from raysys.summary import describe_training, headline_lines, headline_table, print_summary
from raysys.train.progress import train_with_progress
from raysys.tune.interpolation import interpolation_record

QUICK_OVERRIDES = {"train": {"max_steps": 4, "global_batch_size": 8, "checkpoint_every": 4, "eval_every": 4,
                             "log_every": 1},
                   "data": {"languages": ["de", "en", "es"]}}


def quick_config(config: Config) -> Config:
    """Smaller budget and 3 languages; explicit overrides of those keys still win."""
    raw, defaults = config.to_dict(), Config().to_dict()
    for section, values in QUICK_OVERRIDES.items():
        raw[section].update({k: v for k, v in values.items() if raw[section][k] == defaults[section][k]})
    raw["name"] = raw["name"] + "-quick"
    return Config.from_dict(raw)


def run_demo(config: Config, quick: bool = False) -> dict:
    if quick:
        config = quick_config(config)
    started = time.perf_counter()
    out = Path(config.output_dir) / config.name
    ensure_ray()
    base_model = resolve_model_path(config.model.name_or_path)
    datasets = ", ".join(map(str, config.eval.datasets))
    print(f"[demo] 1/3 evaluating the untrained model ({base_model}) on {datasets} "
          f"(eval.split={config.eval.split})", flush=True)
    before = evaluate(base_model, config.eval.datasets, config, out / "eval")
    write_report(before, out / "eval" / "untrained", title="untrained")
    for line in headline_lines("[demo] untrained", before):
        print(line, flush=True)

    print(f"[demo] 2/3 training {describe_training(config)}", flush=True)
    outcome = train_with_progress(config)
    print("[demo] 3/3 evaluating the trained model", flush=True)
    after = evaluate(outcome.model_path, config.eval.datasets, config, out / "eval")
    label = f"hybrid alpha={config.train.alpha}"
    curve = interpolation_record(outcome.model_path) if config.train.interpolate_weights else None
    if curve:  # the recipe: the model is (1 - w) x initial + w x trained, w chosen on validation
        label += f", w={curve['best']['weight']:g}"
    write_report(after, out / "eval" / "trained", title=label)
    runs = {"untrained": before, label: after}
    paths = write_comparison(runs, out / "eval" / "comparison", baseline="untrained")
    print_summary("demo", time.perf_counter() - started,
                  [f"evaluated the untrained model ({config.model.name_or_path}) on {datasets}",
                   f"trained {describe_training(config)}", "evaluated the trained model on the same articles"],
                  {"report": str(paths["comparison.md"]),
                   "per run": f"{out / 'eval' / 'untrained'}, {out / 'eval' / 'trained'}",
                   "model": outcome.model_path},
                  headline_table(runs))
    return {"before": before, "after": after, "model_path": outcome.model_path}
