"""Sweep results: a table (Markdown + JSON) and a plot of each setting's mAP and rank distance vs alpha."""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.figure import Figure

from raysys.eval.report import atomic_write, save_figure
from raysys.train.checkpoint import write_json_atomic

SETTINGS = (("val_map_mono", "monolingual"), ("val_map_cross", "cross-lingual"), ("val_map_multi", "multilingual"))


def _fmt(value, digits=3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def sweep_table(rows: list[dict], metric: str) -> str:
    lines = ["| trial | status | alpha | lr | temperature | mono mAP | cross mAP | multi mAP | mean mAP | rank dist. | steps |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["alpha"] is None, r["alpha"] or 0)):
        lines.append(f"| {r['trial']} | {r['status']} | {_fmt(r['alpha'], 2)} | {_fmt(r['lr'], 6)} | "
                     f"{_fmt(r['temperature'], 3)} | {_fmt(r['val_map_mono'])} | {_fmt(r['val_map_cross'])} | "
                     f"{_fmt(r['val_map_multi'])} | {_fmt(r['val_map_mean'])} | {_fmt(r['val_rank_distance'], 1)} | "
                     f"{_fmt(r['step'])} |")
    return "\n".join(lines)


def write_sweep_report(rows: list[dict], best: dict, out_dir: Path, metric: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "sweep.json", "markdown": out_dir / "sweep.md", "plot": out_dir / "sweep.png"}
    write_json_atomic(paths["json"], {"metric": metric, "best": best, "trials": rows})
    text = (f"# Sweep over alpha (validation articles)\n\n{sweep_table(rows, metric)}\n\n"
            f"Best by `{metric}`: alpha = {_fmt(best['alpha'], 2)} ({metric} = {_fmt(best[metric])}), "
            f"checkpoint `{best.get('checkpoint')}`\n")
    atomic_write(paths["markdown"], text)

    ok = sorted((r for r in rows if r["alpha"] is not None and r["val_map_mean"] is not None), key=lambda r: r["alpha"])
    fig = Figure(figsize=(10, 4), layout="tight")
    left, right = fig.subplots(1, 2)
    for key, label in SETTINGS:
        left.plot([r["alpha"] for r in ok], [r[key] for r in ok], marker="o", label=label)
    left.set(xlabel="alpha (share of monolingual batches)", ylabel="validation mAP", title="mAP vs alpha")
    left.legend()
    right.plot([r["alpha"] for r in ok], [r["val_rank_distance"] for r in ok], marker="o", color="tab:red")
    right.set(xlabel="alpha", ylabel="mean max rank distance", title="language bias vs alpha (lower is better)")
    save_figure(paths["plot"], fig)
    print(text, flush=True)
    return paths
