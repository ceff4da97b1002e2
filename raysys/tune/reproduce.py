"""Reproduce the reference comparison: X-X-mono (alpha = 1) vs X-Y (alpha = 0) vs hybrid (alpha = 0.5).

Every run gets the same budget (config.train) and each alpha several seeds; each trained model
and the untrained one are evaluated zero-shot on LAReQA-format data not used for training (the
held-out articles of the training set by default, or any other directories). One table in the
shape of the reference work, plus paired bootstrap confidence intervals over queries (per-query
values averaged over seeds) for hybrid vs each baseline. Nothing is tuned on the evaluation data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from raysys.config import Config
from raysys.errors import ConfigError
from raysys.eval.lareqa import paired_bootstrap_settings
from raysys.eval.report import write_comparison
from raysys.eval.run import evaluate
from raysys.model.default import resolve_model_path
from raysys.train.run import ensure_ray, train

ARMS = {"X-X-mono (alpha=1)": 1.0, "X-Y (alpha=0)": 0.0, "hybrid (alpha=0.5)": 0.5}
HYBRID = "hybrid (alpha=0.5)"


def reproduce(config: Config, seeds: list[int], eval_datasets: list[str] | None = None,
              arms: dict[str, float] | None = None) -> dict:
    arms = arms or ARMS
    datasets = eval_datasets or config.eval.datasets
    not_lareqa = [d for d in datasets if str(d).startswith("miracl:")]
    if not_lareqa:
        raise ConfigError(f"reproduce compares LAReQA settings; {not_lareqa[0]} is a MIRACL-style dataset",
                          field="eval.datasets", hint="evaluate MIRACL-style data with `raysys eval`")
    ensure_ray()
    out = Path(config.output_dir) / f"{config.name}-reproduce"
    work = out / "eval"
    base_model = resolve_model_path(config.model.name_or_path)
    runs = {"untrained": {"seeds": [evaluate(base_model, datasets, config, work)]}}
    for label, alpha in arms.items():
        runs[label] = {"seeds": []}
        for seed in seeds:
            raw = config.to_dict()
            raw["seed"], raw["train"]["alpha"] = seed, alpha
            raw["name"] = f"{config.name}-alpha{alpha:g}-seed{seed}"
            print(f"[reproduce] {label}, seed {seed}", flush=True)
            outcome = train(Config.from_dict(raw))
            runs[label]["seeds"].append(evaluate(outcome.model_path, datasets, config, work))
    summaries = {label: {name: seed_mean_result([r[name] for r in run["seeds"]]) for name in datasets}
                 for label, run in runs.items()}
    bootstrap = {}
    if HYBRID in runs:
        for label in runs:
            if label in (HYBRID, "untrained"):
                continue
            bootstrap[f"{HYBRID} vs {label}"] = {
                name: paired_bootstrap_settings(runs[HYBRID]["seeds"], runs[label]["seeds"], name,
                                                config.eval.bootstrap_samples)
                for name in datasets}
    paths = write_comparison(summaries, out, baseline="untrained", bootstrap=bootstrap)
    print(paths["comparison.md"].read_text(), flush=True)
    return {"summaries": summaries, "bootstrap": bootstrap, "paths": paths}


def seed_mean_result(results: list[dict]) -> dict:
    """Average each summary metric over seeds (the table's numbers are seed means)."""
    first = results[0]

    def mean_of(path):
        values = []
        for r in results:
            node = r
            for key in path:
                node = node[key]
            values.append(node)
        return float(np.mean(values))

    summary = {setting: {metric: mean_of(("summary", setting, metric)) for metric in values}
               for setting, values in first["summary"].items()}
    pairs = {pair: {metric: mean_of(("pairs", pair, metric)) for metric in values}
             for pair, values in first["pairs"].items()}
    multi = {lang: {metric: mean_of(("multilingual_per_language", lang, metric)) for metric in values}
             for lang, values in first["multilingual_per_language"].items()}
    return {"summary": summary, "pairs": pairs, "multilingual_per_language": multi}
