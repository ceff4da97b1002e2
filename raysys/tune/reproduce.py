"""Reproduce the reference comparison: X-X-mono (alpha = 1) vs X-Y (alpha = 0) vs hybrid (alpha = 0.5).

Every run gets the same budget (config.train) and each alpha several seeds; each trained model
and the untrained one are evaluated zero-shot on LAReQA-format data not used for training (the
held-out articles of the training set by default, or any other directories). One table in the
shape of the reference work, plus paired bootstrap confidence intervals over queries (per-query
values averaged over seeds) for hybrid vs each baseline. Nothing is tuned on the evaluation data.

A rerun after an interruption reuses every run that already finished with the same training
config (its final checkpoint and exported model), so only the missing runs are trained.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from raysys import storage
from raysys.config import Config
from raysys.errors import ConfigError, RaysysError
from raysys.eval.lareqa import paired_bootstrap_settings
from raysys.eval.report import write_comparison
from raysys.eval.run import evaluate
from raysys.model.default import resolve_model_path
from raysys.progress import format_duration
from raysys.train.checkpoint import EXPORT_DIR, verify_checkpoint
from raysys.train.selection import selected_checkpoint
from raysys.runtime import ensure_ray
from raysys.summary import headline_table, print_summary
from raysys.tune.interpolation import interpolation_record, write_curves_over_seeds
from raysys.train.progress import train_with_progress as train  # train() with the driver's progress display
from raysys.train.run import run_model, storage_dir

ARMS = {"X-X-mono (alpha=1)": 1.0, "X-Y (alpha=0)": 0.0, "hybrid (alpha=0.5)": 0.5}
HYBRID = "hybrid (alpha=0.5)"
ARM_NAMES = dict(zip(("x-x-mono", "x-y", "hybrid"), ARMS))  # `raysys reproduce --arms hybrid x-y`


def select_arms(names: list[str] | None) -> dict[str, float]:
    """The arms named on the command line, in the table's order (all three when none are named)."""
    unknown = [n for n in names or [] if n not in ARM_NAMES]
    if unknown:
        raise ConfigError(f"unknown arm {unknown[0]!r}", field="--arms", hint=f"choose from {', '.join(ARM_NAMES)}")
    wanted = {ARM_NAMES[n] for n in names} if names else set(ARMS)
    return {label: alpha for label, alpha in ARMS.items() if label in wanted}


# Settings that do not change what a run learns: a finished run that differs only in these is reused
# (the interpolation with the initial model is chosen after training, from the run's own checkpoint).
NOT_LEARNED = ("storage_path", "resume_from", "logger", "log_every", "max_failures", "interpolate_weights",
               "interpolate_rule")


def reproduce(config: Config, seeds: list[int], eval_datasets: list[str] | None = None,
              arms: dict[str, float] | None = None, reuse_finished: bool = True) -> dict:
    arms = arms or ARMS
    started = time.perf_counter()
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
        runs[label] = {"seeds": [], "models": []}
        for seed in seeds:
            raw = config.to_dict()
            raw["seed"], raw["train"]["alpha"] = seed, alpha
            raw["name"] = f"{config.name}-alpha{alpha:g}-seed{seed}"
            run_config = Config.from_dict(raw)
            run_started = time.perf_counter()
            model_path = finished_run_model(run_config) if reuse_finished else None
            reused = model_path is not None
            if reused:
                print(f"[reproduce] {label}, seed {seed}: reusing the finished run {model_path}", flush=True)
            else:
                print(f"[reproduce] {label}, seed {seed}", flush=True)
                model_path = train(run_config).model_path
            # The run's own cost (training, choosing the interpolation weight on validation; a reused run:
            # finding it, and any curve points it lacks)...
            cost = {"reused": reused, "run_s": round(time.perf_counter() - run_started, 1)}
            eval_started = time.perf_counter()
            runs[label]["seeds"].append(evaluate(model_path, datasets, config, work))
            cost["held_out_eval_s"] = round(time.perf_counter() - eval_started, 1)  # ...and its measurement's
            print(f"[reproduce] {label}, seed {seed}: {cost_text(cost)}", flush=True)
            runs[label]["models"].append({"seed": seed, "model_path": str(model_path), "cost": cost})
            curve = interpolation_record(str(model_path)) if config.train.interpolate_weights else None
            if curve:
                runs[label].setdefault("curves", []).append(curve)
                runs[label]["models"][-1]["interpolation_weight"] = curve["best"]["weight"]
    summaries = {label: {name: seed_mean_result([r[name] for r in run["seeds"]]) for name in datasets}
                 for label, run in runs.items()}
    bootstrap = {}
    if HYBRID in runs:
        for label in runs:  # the untrained model too: did training keep what it knew?
            if label == HYBRID:
                continue
            bootstrap[f"{HYBRID} vs {label}"] = {
                name: paired_bootstrap_settings(runs[HYBRID]["seeds"], runs[label]["seeds"], name,
                                                config.eval.bootstrap_samples)
                for name in datasets}
    per_seed = {label: {name: [{**model, "summary": result[name]["summary"]}
                               for model, result in zip(run["models"], run["seeds"])] for name in datasets}
                for label, run in runs.items() if "models" in run}
    appendix = seed_spread_markdown(per_seed) + cost_markdown(per_seed)
    curves = {label: run["curves"] for label, run in runs.items() if run.get("curves")}
    if curves:  # the whole validation curve of every run, not only the weights they chose
        appendix += write_curves_over_seeds(curves, str(out))["markdown"]
    paths = write_comparison(summaries, out, baseline="untrained", bootstrap=bootstrap,
                             appendix_md=appendix, extra_json={"per_seed": per_seed})
    print_summary("reproduce", time.perf_counter() - started,
                  [f"{label}: seed(s) {', '.join(map(str, seeds))}" for label in arms]
                  + [f"each model and the untrained one evaluated on {', '.join(map(str, datasets))}"],
                  {"comparison": f"{paths['comparison.md']} (95 % bootstrap CIs, spread over seeds)",
                   "per seed": f"{paths['comparison.json']} (model paths too)"},
                  headline_table(summaries))
    return {"summaries": summaries, "bootstrap": bootstrap, "paths": paths}


def cost_text(cost: dict) -> str:
    run = "reused a finished run" if cost["reused"] else "trained and selected the model"
    return f"{run} in {format_duration(cost['run_s'])}, held-out evaluation {format_duration(cost['held_out_eval_s'])}"


def cost_markdown(per_seed: dict) -> str:
    """What each run cost in this invocation, apart from what measuring it on held-out data cost."""
    rows = ["| Run | Seed | Cost |", "|---|---:|---|"]
    for label, by_dataset in per_seed.items():
        for record in next(iter(by_dataset.values())):
            rows.append(f"| {label} | {record['seed']} | {cost_text(record['cost'])} |")
    return "\n## Cost per run (this invocation, wall clock)\n\n" + "\n".join(rows) + "\n"


def seed_spread_markdown(per_seed: dict) -> str:
    """Mean ± sample standard deviation over seeds (min–max), so seed noise can be set against
    the differences between arms (the bootstrap above resamples queries, not seeds)."""
    rows = ["| Run | Dataset | Seeds | Mono mAP | Cross mAP | Multi mAP | Rank dist. |", "|---|---|---:|---|---|---|---|"]
    for label, by_dataset in per_seed.items():
        for name, results in by_dataset.items():
            cells = []
            for setting, metric, digits in (("monolingual", "map", 3), ("cross_lingual", "map", 3),
                                            ("multilingual", "map", 3), ("multilingual", "rank_distance", 1)):
                v = np.array([r["summary"][setting][metric] for r in results], dtype=float)
                sd = v.std(ddof=1) if len(v) > 1 else 0.0
                cells.append(f"{v.mean():.{digits}f} ± {sd:.{digits}f} ({v.min():.{digits}f}–{v.max():.{digits}f})")
            rows.append(f"| {label} | {name} | {len(results)} | " + " | ".join(cells) + " |")
    return "\n## Spread over seeds (mean ± sd, min–max)\n\n" + "\n".join(rows) + "\n"


def learned_settings(config_dict: dict) -> dict:
    train_settings = {k: v for k, v in config_dict["train"].items() if k not in NOT_LEARNED}
    return {"seed": config_dict["seed"], "data": config_dict["data"], "model": config_dict["model"],
            "train": train_settings}


def _learned_settings_of(stored: dict) -> dict | None:
    """A run's recorded config read as today's Config: a setting added since then has its default
    (which keeps the old behaviour), so the run still matches; an unreadable record never does."""
    try:
        return learned_settings(Config.from_dict(stored).to_dict())
    except RaysysError:
        return None


def finished_run_model(config: Config) -> str | None:
    """The exported model of the newest run named like this one that reached train.max_steps with
    the same learned settings, or None. Any storage (local, NFS, s3://): run names end in their
    start time, so the newest sorts last."""
    root = storage_dir(config)
    wanted = learned_settings(config.to_dict())
    runs = [d for d in storage.list_dirs(root) if d.startswith(f"{config.name}-")]
    for run_dir in sorted(runs, reverse=True):
        checkpoints = [c for c in storage.list_dirs(storage.join(root, run_dir)) if c.startswith("checkpoint_")]
        for ckpt in sorted(checkpoints, reverse=True):
            uri = storage.join(root, run_dir, ckpt)
            try:
                state = verify_checkpoint(uri)
            except RaysysError:  # incomplete (interrupted mid-write): not a finished run
                continue
            # Finished: the last step (a run stopped early records it), with its model exported.
            finished = state.get("finished") or state["global_step"] == config.train.max_steps
            if (finished and storage.is_file(storage.join(uri, EXPORT_DIR, "config.json"))
                    and _learned_settings_of(state["config"]) == wanted):
                return run_model(config, selected_checkpoint(uri, config.train.export_best_model),
                                 storage.join(root, run_dir))
    return None


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
