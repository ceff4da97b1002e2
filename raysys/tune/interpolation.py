"""Choose the interpolation weight between a fine-tuned model and its base on validation articles.

For each weight w the interpolated encoder (raysys.model.interpolate) is written and evaluated on
the validation articles of the training dataset (`eval.split=validation`, never the test
articles); `train.interpolate_rule` picks the winner (raysys.train.selection.choose_weight: best
mean of mono, cross and multi mAP, or the largest weight that keeps the initial model's monolingual
mAP). The whole curve is reported (JSON, Markdown, a figure), not only its chosen point.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from raysys import storage
from raysys.config import Config
from raysys.errors import RaysysError
from raysys.eval.lareqa import per_query_setting_values
from raysys.eval.metrics import paired_bootstrap
from raysys.eval.report import atomic_write, save_figure
from raysys.model.default import resolve_model_path
from raysys.model.interpolate import write_interpolated
from raysys.train.checkpoint import write_json_atomic
from raysys.train.selection import choose_weight, evaluated_weights, row_is_complete

SETTINGS = (("mono_map", "monolingual", "monolingual"), ("cross_map", "cross_lingual", "cross-lingual"),
            ("multi_map", "multilingual", "multilingual"))


def curve_row(weight: float, result: dict) -> dict:
    s = result["summary"]
    row = {"weight": weight, **{key: s[setting]["map"] for key, setting, _ in SETTINGS},
           "rank_distance": s["multilingual"]["rank_distance"]}
    row["mean_map"] = sum(row[key] for key, *_ in SETTINGS) / len(SETTINGS)
    return row


def interpolation_curve(tuned: str, base: str, weights: list[float], config: Config, out_dir: str | Path,
                        datasets: list[str] | None = None, known: list[dict] | None = None) -> dict:
    """Evaluate every weight on the validation articles; returns {"rows", "best", "paths"}, `best`
    chosen by `train.interpolate_rule`. `out_dir` is a local path or a storage URI (each weight's
    model and the curve go there). `known`: rows of an earlier curve of the same models; their
    weights are not evaluated again (a finer grid costs only its new points)."""
    from raysys.eval.run import evaluate

    validation = Config.from_dict(config.to_dict())
    validation.eval = dataclasses.replace(validation.eval, split="validation")
    datasets = datasets or [config.data.train]
    rows = []
    rule = config.train.interpolate_rule
    # One work directory for every curve: embeddings are cached by model identity, so the initial
    # model (w = 0, scored as itself) is encoded once for all the runs of a sweep or reproduction.
    work = storage.join(str(config.output_dir), "interpolation-eval")
    known_rows = {row["weight"]: row for row in known or []}
    initial_mono = None  # per-query validation AP of the initial model, when w = 0 is on the curve

    def scored(model: str) -> dict:
        return evaluate(model, datasets, validation, work)[datasets[0]]

    weights = evaluated_weights(weights, rule)
    for weight in weights:
        model_dir = storage.join(out_dir, f"weight-{weight:g}")
        known_row = known_rows.get(weight)
        if (known_row and row_is_complete(known_row, rule)
                and storage.is_file(storage.join(model_dir, "config.json"))):
            rows.append(known_row)
            continue
        write_interpolated(base, tuned, weight, model_dir)
        result = scored(resolve_model_path(base) if weight == 0.0 else model_dir)
        row = {**curve_row(weight, result), "model": str(model_dir)}
        if weight == 0.0:
            initial_mono = monolingual_per_query(result)
        elif 0.0 in weights:
            if initial_mono is None:  # w = 0 came from an earlier curve: its scores are cached
                initial_mono = monolingual_per_query(scored(resolve_model_path(base)))
            row["mono_vs_initial"] = mono_against(monolingual_per_query(result), initial_mono,
                                                  config.eval.bootstrap_samples)
        rows.append(row)
        print(f"[export] weight {weight:g}: mean validation mAP {rows[-1]['mean_map']:.4f}", flush=True)
    best = choose_weight(rows, rule)
    return {"rows": rows, "best": best, "paths": write_curve(rows, best, rule, out_dir, tuned, base, datasets[0])}


def monolingual_per_query(result: dict) -> dict[str, float]:
    return per_query_setting_values(result["per_query"])["monolingual"]


def mono_against(values: dict[str, float], initial: dict[str, float], samples: int) -> dict:
    """Paired bootstrap over validation queries of monolingual AP(w) - AP(initial)."""
    units = sorted(set(values) & set(initial))
    return paired_bootstrap(np.array([values[u] for u in units]), np.array([initial[u] for u in units]),
                            n_samples=samples)


def curve_table(rows: list[dict]) -> str:
    lines = ["| w | mono mAP | mono − initial [95 % CI] | cross mAP | multi mAP | mean mAP | rank dist. |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        gain = r.get("mono_vs_initial")
        gain_text = f"{gain['mean_diff']:+.4f} [{gain['low']:+.4f}, {gain['high']:+.4f}]" if gain else ""
        lines.append(f"| {r['weight']:g} | {r['mono_map']:.4f} | {gain_text} | {r['cross_map']:.4f} | "
                     f"{r['multi_map']:.4f} | {r['mean_map']:.4f} | {r['rank_distance']:.1f} |")
    return "\n".join(lines)


RULE_TEXT = {"mean_map": "best mean mAP",
             "keep_mono": "largest w whose monolingual mAP is not below the initial model's (w = 0)",
             "keep_mono_ci": "largest w whose monolingual mAP is above the initial model's (w = 0) with 95 % "
                             "confidence, paired bootstrap over validation queries"}


def write_curve(rows: list[dict], best: dict, rule: str, out_dir: str | Path, tuned: str, base: str,
                dataset: str) -> dict[str, str]:
    paths = {kind: storage.join(out_dir, f"interpolation.{ext}")
             for kind, ext in (("json", "json"), ("markdown", "md"), ("plot", "png"))}
    write_json_atomic(paths["json"], {"tuned": tuned, "base": base, "dataset": dataset, "split": "validation",
                                      "rule": rule, "best": best, "curve": rows})
    lines = [f"# Interpolation (1 - w) x base + w x fine-tuned, {dataset} validation articles", "",
             f"base `{base}`, fine-tuned `{tuned}`", "", curve_table(rows), "",
             f"Chosen ({RULE_TEXT[rule]}): w = {best['weight']:g} (`{best['model']}`)"]
    atomic_write(paths["markdown"], "\n".join(lines) + "\n")
    fig = Figure(figsize=(10, 4), layout="tight")
    left, right = fig.subplots(1, 2)
    weights = [r["weight"] for r in rows]
    for key, _, label in SETTINGS:
        left.plot(weights, [r[key] for r in rows], marker="o", label=label)
    left.set(xlabel="w (0: base model, 1: fine-tuned)", ylabel="validation mAP", title="mAP vs interpolation weight")
    left.legend()
    right.plot(weights, [r["rank_distance"] for r in rows], marker="o", color="tab:red")
    right.set(xlabel="w", ylabel="mean max rank distance", title="language bias (lower is better)")
    save_figure(paths["plot"], fig)
    return paths


def interpolation_record(model_path: str) -> dict | None:
    """The validation curve a run's interpolated model was chosen from (`<run>/interpolation/
    interpolation.json`, beside the chosen `weight-<w>` model), or None for a plain export."""
    path = storage.join(model_path.rstrip("/").rsplit("/", 1)[0], "interpolation.json")
    record = storage.read_json(path) if storage.is_file(path) else None
    chosen = [row for row in (record or {}).get("curve", []) if row["model"] == model_path]
    return {**record, "best": chosen[0]} if chosen else None  # "best": the row this model is


def interpolate_with_initial(tuned: str, config: Config, out_dir: str) -> str:
    """`train.interpolate_weights` after training: the run's model becomes (1 - w) x initial + w x
    trained for the weight `train.interpolate_rule` chooses on validation (one weight: that one); the
    curve is written to `out_dir`. A finished curve of the same run is reused (`raysys reproduce`): whole
    for the same weights, else its points, so only new weights are evaluated."""
    weights = evaluated_weights(config.train.interpolate_weights, config.train.interpolate_rule)
    base = config.model.name_or_path
    if len(weights) == 1:
        model_dir = storage.join(out_dir, f"weight-{weights[0]:g}")
        if not storage.is_file(storage.join(model_dir, "config.json")):
            write_interpolated(base, tuned, weights[0], model_dir)
        return model_dir
    done = storage.join(out_dir, "interpolation.json")
    known = None
    if storage.is_file(done):
        record = storage.read_json(done)
        if record["tuned"] == tuned and record.get("base", base) == base:
            rule = config.train.interpolate_rule
            if ([r["weight"] for r in record["curve"]] == weights
                    and all(row_is_complete(r, rule) for r in record["curve"])):
                return choose_weight(record["curve"], rule)["model"]
            known = record["curve"]
    curve = interpolation_curve(tuned, base, weights, config, out_dir, known=known)
    print(f"[train] interpolation with the initial model: w = {curve['best']['weight']:g} is chosen on the "
          f"validation articles ({curve['paths']['markdown']})", flush=True)
    return curve["best"]["model"]


CURVE_METRICS = (*SETTINGS, ("rank_distance", "multilingual", "rank distance (lower is better)"))


def write_curves_over_seeds(curves: dict[str, list[dict]], out_dir: str | Path) -> dict:
    """The validation interpolation curves of several runs (`interpolation.json` records, grouped
    by arm, one per seed) as one figure and table: each metric's mean and spread over seeds against
    w, and the weight each run chose. Returns {"paths", "markdown"}."""
    summary = {}
    for arm, records in curves.items():
        weights = [r["weight"] for r in records[0]["curve"]]
        if any([r["weight"] for r in rec["curve"]] != weights for rec in records):
            raise RaysysError(f"{arm}: the runs' interpolation curves have different weights")
        per_metric = {}
        for key, *_ in CURVE_METRICS:
            values = np.array([[r[key] for r in rec["curve"]] for rec in records], dtype=float)
            per_metric[key] = {"mean": values.mean(0).tolist(), "min": values.min(0).tolist(), "max": values.max(0).tolist()}
        summary[arm] = {"weights": weights, "chosen": [rec["best"]["weight"] for rec in records],
                        "rule": records[0].get("rule", "mean_map"), "seeds": len(records), **per_metric}
    paths = {"json": storage.join(out_dir, "interpolation_curves.json"),
             "plot": storage.join(out_dir, "interpolation_curves.png")}
    write_json_atomic(paths["json"], {"split": "validation", "curves": summary})
    fig = Figure(figsize=(16, 4), layout="tight")
    for ax, (key, _, label) in zip(fig.subplots(1, len(CURVE_METRICS)), CURVE_METRICS):
        for arm, s in summary.items():
            line, = ax.plot(s["weights"], s[key]["mean"], marker="o", label=arm)
            ax.fill_between(s["weights"], s[key]["min"], s[key]["max"], color=line.get_color(), alpha=0.15)
        ax.set(xlabel="w (0: initial model, 1: fine-tuned)", title=f"validation {label}")
    fig.axes[0].legend(fontsize="small")
    save_figure(paths["plot"], fig)
    lines = ["\n## Interpolation with the initial model, validation articles (mean over seeds)\n",
             "| Run | w | mono mAP | cross mAP | multi mAP | rank dist. |", "|---|---:|---:|---:|---:|---:|"]
    for arm, s in summary.items():
        for i, w in enumerate(s["weights"]):
            lines.append(f"| {arm} | {w:g} | " + " | ".join(
                f"{s[key]['mean'][i]:.{1 if key == 'rank_distance' else 4}f}" for key, *_ in CURVE_METRICS) + " |")
    lines.append("")
    lines += [f"- {arm}: chosen w per seed {', '.join(f'{w:g}' for w in s['chosen'])} "
              f"({RULE_TEXT.get(s['rule'], s['rule'])})" for arm, s in summary.items()]
    lines.append(f"\nFigure: `interpolation_curves.png` (lines: mean over seeds; bands: min-max).\n")
    return {"paths": paths, "markdown": "\n".join(lines)}
