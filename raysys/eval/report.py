"""Reports of evaluation results: metrics.json, Markdown tables, per-pair CSV and PNG figures.

Inputs are results keyed by dataset name (and, for comparisons, by run label): LAReQA results
(`raysys.eval.lareqa.evaluate_lareqa`: settings, pairs, figures) and MIRACL-style results
(`raysys.eval.run.evaluate_miracl_dataset`: nDCG@10 / Recall@100 / MRR@10 per language). Figures use matplotlib's object API (Figure + Agg canvas), so no
display or global pyplot state is involved. Every file is written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path
from typing import Callable

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from raysys import storage

SETTINGS = ("monolingual", "cross_lingual", "multilingual")
SHORT = {"monolingual": "Mono", "cross_lingual": "Cross", "multilingual": "Multi"}
JSON_KEYS = ("summary", "pairs", "multilingual_per_language", "per_language",  # per_query/top_k are raw arrays
             "approximate_search", "index_dtype")


def is_lareqa(result: dict) -> bool:
    """LAReQA results have language-pair settings; MIRACL-style ones per-language IR metrics."""
    return "pairs" in result


def write_report(results: dict[str, dict], out_dir, title: str = "raysys evaluation") -> dict[str, Path]:
    """Write metrics.json, summary.md and per-dataset pairs CSV, heatmap and rank-distance PNGs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"metrics.json": out / "metrics.json", "summary.md": out / "summary.md"}
    metrics = {name: {k: r[k] for k in JSON_KEYS if k in r} for name, r in results.items()}
    atomic_write(paths["metrics.json"], _to_json(metrics))
    atomic_write(paths["summary.md"], f"# {title}\n\n{format_summary_table(results)}")
    for name, result in results.items():
        if not is_lareqa(result):  # MIRACL-style: its per-language table is in summary.md; TREC runs here
            for lang, text in result.get("trec_run", {}).items():
                path = atomic_write(out / f"run_{_safe_name(name)}_{_safe_name(lang)}.trec", text)
                paths[path.name] = path
            continue
        safe = _safe_name(name)
        q_langs, c_langs, matrix = pair_matrix(result["pairs"])
        files = {kind: out / f"{kind}_{safe}.{'csv' if kind == 'pairs' else 'png'}"
                 for kind in ("pairs", "heatmap", "rank_distance")}
        _write_pairs_csv(files["pairs"], q_langs, c_langs, matrix)
        save_figure(files["heatmap"], _heatmap(name, q_langs, c_langs, matrix))
        save_figure(files["rank_distance"], _rank_distance_bars(name, result["multilingual_per_language"]))
        paths.update({path.name: path for path in files.values()})
    return paths


def format_summary_table(results: dict[str, dict]) -> str:
    """Markdown. LAReQA: mAP per setting + rank distance per dataset, then R@1 / R@10 per setting.
    MIRACL-style: each IR metric per language and the macro mean."""
    main = [["Dataset", "Mono mAP", "Cross mAP", "Multi mAP", "Rank dist."]]
    recall = [["Dataset"] + [f"{SHORT[s]} R@{k}" for s in SETTINGS for k in (1, 10)]]
    tables, notes = [], []
    for name, result in results.items():
        s = result["summary"]
        if not is_lareqa(result):
            metrics = list(s)
            rows = [["Dataset", "Language"] + metrics]
            rows += [[name, lang] + [_fmt(v[m]) for m in metrics] for lang, v in result["per_language"].items()]
            rows.append([name, "**mean**"] + [_fmt(s[m]) for m in metrics])
            tables.append(_md_table(rows, text_cols=2))
            tables += _storage_note(name, result)
            for lang, ann in result.get("approximate_search", {}).items():  # never mistaken for exact
                recalls = ", ".join(f"{key} {_fmt(v)}" for key, v in ann.items() if key.startswith("recall@"))
                params = f" ({ann['params']})" if ann.get("params") else ""
                tables.append(f"\n**Approximate search** ({name}, {lang}): FAISS `{ann['index']}`{params}; its "
                              f"top-k against exact search on {ann['sampled_queries']} topics: {recalls}.\n")
            continue
        notes += _storage_note(name, result)
        main.append([name] + [_fmt(s[x]["map"]) for x in SETTINGS]
                    + [_fmt(s["multilingual"].get("rank_distance"), 1)])
        recall.append([name] + [_fmt(s[x][f"recall@{k}"]) for x in SETTINGS for k in (1, 10)])
    if len(main) > 1:
        tables[:0] = [_md_table(main), _md_table(recall), *notes]
    return "\n".join(tables)


def _storage_note(name: str, result: dict) -> list[str]:
    """A line under the table when the index shards did not keep fp32 candidates."""
    dtype = result.get("index_dtype")
    return [f"\n**Index storage** ({name}): candidates kept in {dtype} (`eval.index_dtype`); ranks are exact "
            f"for the {dtype}-rounded candidate embeddings, not the fp32 figures.\n"] if dtype else []


def write_comparison(runs: dict[str, dict[str, dict]], out_dir, baseline: str | None = None,
                     bootstrap: dict | None = None, appendix_md: str = "",
                     extra_json: dict | None = None) -> dict[str, Path]:
    """Write comparison.md / comparison.json and one comparison_<dataset>.png per dataset.
    appendix_md is added to the Markdown and extra_json to the JSON (e.g. per-seed results)."""
    if baseline is not None and baseline not in runs:
        raise ValueError(f"baseline {baseline!r} is not one of the runs {list(runs)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    datasets = list(dict.fromkeys(d for results in runs.values() for d in results))
    first = {d: next(results[d] for results in runs.values() if d in results) for d in datasets}
    lareqa = [d for d in datasets if is_lareqa(first[d])]
    # one column per (dataset, metric); key picks the value out of a summary, lower=True for rank distance
    columns: list[tuple[str, str, Callable[[dict], float], bool]] = []
    for d in datasets:
        if d not in lareqa:  # MIRACL-style: its IR metrics, all higher-is-better
            columns += [(d, m, lambda sm, m=m: sm[m], False) for m in first[d]["summary"]]
            continue
        columns += [(d, f"{SHORT[s]} mAP", lambda sm, s=s: sm[s]["map"], False) for s in SETTINGS]
        columns += [(d, f"{SHORT[s]} R@{k}", lambda sm, s=s, k=k: sm[s][f"recall@{k}"], False)
                    for k in (1, 10) for s in SETTINGS]
        columns.append((d, "Rank dist.", lambda sm: sm["multilingual"].get("rank_distance"), True))
    values = [[_get(runs[run], d, key) for d, _, key, _ in columns] for run in runs]
    rows = [["Run"] + [f"{d} {label}" for d, label, _, _ in columns]]
    for run, row in zip(runs, values):
        rows.append([run] + [_fmt(v, 1 if lower else 3) for v, (_, _, _, lower) in zip(row, columns)])
    for j, (_, _, _, lower) in enumerate(columns):  # bold the best value(s) as displayed (ties: all)
        shown = [round(r[j], 1 if lower else 3) if _finite(r[j]) else None for r in values]
        finite = [v for v in shown if v is not None]
        best = (min(finite) if lower else max(finite)) if finite else None
        for i, v in enumerate(shown):
            if v is not None and v == best:
                rows[i + 1][j + 1] = f"**{rows[i + 1][j + 1]}**"
    md = ("# Run comparison\n\nmAP / R@k: higher is better; rank distance: lower is better.\n\n"
          + _md_table(rows))

    deltas = {}
    if baseline is not None:  # run − baseline, so a positive mAP delta is an improvement
        picked = [f"{d} {label}" for d, label, _, _ in columns
                  if d not in lareqa or label in ("Mono mAP", "Cross mAP", "Multi mAP", "Rank dist.")]
        head = [["Run"] + [f"Δ {name}" for name in picked]]
        base = values[list(runs).index(baseline)]
        for run, row in zip(runs, values):
            deltas[run] = {f"{d} {label}": _diff(v, b)
                           for v, b, (d, label, _, _) in zip(row, base, columns)}
            head.append([run] + [_fmt(deltas[run][n], 1 if n.endswith("dist.") else 3, signed=True)
                                 for n in picked])
        md += f"\n## Difference from baseline `{baseline}` (run − baseline)\n\n" + _md_table(head)
    if bootstrap:
        boot = [["Comparison", "Dataset", "Setting", "Mean diff.", "95% CI", "p-value"]]
        for pair, per_dataset in bootstrap.items():
            for d, per_setting in per_dataset.items():
                for setting, b in per_setting.items():
                    ci = f"[{_fmt(b.get('low'), 3, True)}, {_fmt(b.get('high'), 3, True)}]"
                    p = b.get("p_value")
                    p_text = "<0.001" if _finite(p) and p < 1e-3 else _fmt(p)
                    boot.append([pair, d, setting, _fmt(b.get("mean_diff"), 3, True), ci, p_text])
        md += "\n## Paired bootstrap (95% confidence intervals)\n\n" + _md_table(boot, text_cols=3)

    md += appendix_md

    paths = {"comparison.md": out / "comparison.md", "comparison.json": out / "comparison.json"}
    atomic_write(paths["comparison.md"], md)
    atomic_write(paths["comparison.json"], _to_json({
        "runs": {run: {d: r["summary"] for d, r in results.items()} for run, results in runs.items()},
        "baseline": baseline, "delta_vs_baseline": deltas or None, "bootstrap": bootstrap, **(extra_json or {})}))
    for d in lareqa:
        name = f"comparison_{_safe_name(d)}.png"
        paths[name] = save_figure(out / name, _comparison_figure(d, runs))
    return paths


def pair_matrix(pairs: dict[str, dict]) -> tuple[list[str], list[str], np.ndarray]:
    """Query-language × candidate-language mAP matrix; NaN where a pair was not evaluated."""
    split = [key.split("-", 1) for key in pairs]
    q_langs = sorted({x for x, _ in split})
    c_langs = sorted({y for _, y in split})
    matrix = np.full((len(q_langs), len(c_langs)), np.nan)
    for (x, y), v in zip(split, pairs.values()):
        matrix[q_langs.index(x), c_langs.index(y)] = _nan(v["map"])
    return q_langs, c_langs, matrix


# ---------------------------------------------------------------- figures

def _heatmap(name: str, q_langs: list[str], c_langs: list[str], matrix: np.ndarray) -> Figure:
    size = max(4.0, 0.55 * max(len(q_langs), len(c_langs)) + 2.0)  # XQuAD-R has 11 languages
    fig = Figure(figsize=(size + 1.0, size), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(matrix), cmap="viridis", vmin=0.0, vmax=1.0)
    for i in range(len(q_langs)):
        for j in range(len(c_langs)):
            v = matrix[i, j]
            ax.text(j, i, "–" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=8,
                    color="black" if np.isnan(v) or v > 0.6 else "white")
    ax.set_xticks(range(len(c_langs)), c_langs)
    ax.set_yticks(range(len(q_langs)), q_langs)
    ax.set_xlabel("candidate language")
    ax.set_ylabel("query language")
    ax.set_title(f"{name}: mAP per language pair")
    fig.colorbar(im, ax=ax, label="mAP")
    return fig


def _rank_distance_bars(name: str, per_language: dict[str, dict]) -> Figure:
    langs = list(per_language)
    values = [_nan(per_language[x].get("rank_distance")) for x in langs]
    fig = Figure(figsize=(max(5.0, 0.5 * len(langs) + 2.0), 3.5), layout="constrained")
    ax = fig.add_subplot()
    ax.bar(langs, values, color="tab:orange")
    if any(_finite(v) for v in values):
        ax.axhline(float(np.nanmean(values)), color="gray", linestyle="--", label="mean")
        ax.legend()
    ax.set_xlabel("query language")
    ax.set_ylabel("mean max. rank distance")
    ax.set_title(f"{name}: multilingual rank distance\n(lower = less language bias)")
    return fig


def _comparison_figure(dataset: str, runs: dict[str, dict[str, dict]]) -> Figure:
    labels = list(runs)
    x = np.arange(len(labels))
    fig = Figure(figsize=(max(7.0, 1.6 * len(labels) + 3.0), 3.8), layout="constrained")
    ax_map, ax_rd = fig.subplots(1, 2, width_ratios=[2, 1])
    width = 0.8 / len(SETTINGS)
    for i, s in enumerate(SETTINGS):
        vals = [_nan(_get(runs[r], dataset, lambda sm, s=s: sm[s]["map"])) for r in labels]
        ax_map.bar(x + (i - 1) * width, vals, width, label=SHORT[s])
    ax_map.set_xticks(x, labels, rotation=25, ha="right")
    ax_map.set_ylim(0, 1)
    ax_map.set_ylabel("mAP")
    ax_map.set_title(f"{dataset}: mAP per setting")
    ax_map.legend(fontsize=8)
    rd = [_nan(_get(runs[r], dataset, lambda sm: sm["multilingual"].get("rank_distance"))) for r in labels]
    ax_rd.bar(x, rd, color="tab:orange")
    ax_rd.set_xticks(x, labels, rotation=25, ha="right")
    ax_rd.set_ylabel("mean max. rank distance")
    ax_rd.set_title("rank distance\n(lower is better)")
    return fig


# ---------------------------------------------------------------- helpers

def _get(results: dict[str, dict], dataset: str, key: Callable[[dict], float]) -> float | None:
    """A summary value of one run on one dataset; None when the run lacks that dataset."""
    return key(results[dataset]["summary"]) if dataset in results else None


def _nan(v) -> float:
    return float("nan") if v is None else float(v)


def _finite(v) -> bool:
    return v is not None and math.isfinite(float(v))


def _diff(a, b) -> float | None:
    return float(a) - float(b) if _finite(a) and _finite(b) else None


def _fmt(v, digits: int = 3, signed: bool = False) -> str:
    if not _finite(v):
        return "n/a"
    return f"{float(v):+.{digits}f}" if signed else f"{float(v):.{digits}f}"


def _md_table(rows: list[list[str]], text_cols: int = 1) -> str:
    """Left-aligned label columns, right-aligned numbers."""
    head, *body = rows
    align = ["---"] * text_cols + ["---:"] * (len(head) - text_cols)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body]) + "\n"


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _json_safe(obj):
    """Plain JSON types; NaN/inf become null (strict JSON has no NaN), numpy values become Python."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def _to_json(obj) -> str:
    return json.dumps(_json_safe(obj), indent=2, allow_nan=False) + "\n"


def atomic_write(path: Path, data: str | bytes) -> Path:
    """Readers never see a partial file (raysys.storage: temp sibling, fsync, rename)."""
    storage.write_bytes(path, data)
    return path


def save_figure(path: Path, fig: Figure) -> Path:
    FigureCanvasAgg(fig)  # attach an Agg canvas: no display, no pyplot state
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return atomic_write(path, buf.getvalue())


def _write_pairs_csv(path: Path, q_langs: list[str], c_langs: list[str], matrix: np.ndarray) -> Path:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["query\\candidate", *c_langs])
    for x, row in zip(q_langs, matrix):
        writer.writerow([x, *("" if np.isnan(v) else f"{v:.6f}" for v in row)])
    return atomic_write(path, buf.getvalue())
