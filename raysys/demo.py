"""The default job: build the embedded model, evaluate it, train hybrid alpha=0.5, evaluate again.

Runs offline in local mode on a small CPU machine; everything comes from the config defaults
(multilingual-e5-small, XQuAD-R training articles, held-out XQuAD-R articles for evaluation).
"""

from __future__ import annotations

import time
from pathlib import Path

from raysys.config import Config
from raysys.eval.report import format_summary_table, write_comparison, write_report
from raysys.eval.run import evaluate
from raysys.model.default import resolve_model_path
from raysys.runtime import ensure_ray
from raysys.train.run import train

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
    print(f"[demo] model: {base_model}\n[demo] evaluating the untrained model on "
          f"{', '.join(config.eval.datasets)} (eval.split={config.eval.split})",
          flush=True)
    before = evaluate(base_model, config.eval.datasets, config, out / "eval")
    write_report(before, out / "eval" / "untrained", title="untrained")
    print(format_summary_table(before), flush=True)

    print(f"[demo] training alpha={config.train.alpha} for {config.train.max_steps} steps of "
          f"{config.train.global_batch_size} pairs on {config.train.num_workers} workers", flush=True)
    outcome = train(config)
    after = evaluate(outcome.model_path, config.eval.datasets, config, out / "eval")
    label = f"hybrid alpha={config.train.alpha}"
    write_report(after, out / "eval" / "trained", title=label)
    paths = write_comparison({"untrained": before, label: after}, out / "eval" / "comparison",
                             baseline="untrained")
    print(paths["comparison.md"].read_text(), flush=True)
    print(f"[demo] done in {time.perf_counter() - started:.0f} s; report: {out / 'eval'}; "
          f"model: {outcome.model_path}", flush=True)
    return {"before": before, "after": after, "model_path": outcome.model_path}
