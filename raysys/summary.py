"""The block every command ends with: what ran, where its outputs are, the headline table."""

from __future__ import annotations

import sys
from typing import TextIO

from raysys.progress import format_duration

# The four LAReQA figures (setting, metric, column, digits) the README and the reports lead with.
HEADLINE = (("monolingual", "map", "Mono mAP", 3), ("cross_lingual", "map", "Cross mAP", 3),
            ("multilingual", "map", "Multi mAP", 3), ("multilingual", "rank_distance", "Rank dist.", 1))


def _lareqa(result: dict) -> bool:
    return "monolingual" in result.get("summary", {})


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown_table(rows: list[list[str]], text_cols: int = 1) -> str:
    align = ["---"] * text_cols + ["---:"] * (len(rows[0]) - text_cols)
    lines = [rows[0], align, *rows[1:]]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def headline_table(runs: dict[str, dict[str, dict]]) -> str:
    """Markdown, one row per run and dataset: the four LAReQA figures; a MIRACL-style dataset
    gets a second table with its macro-averaged IR metrics."""
    lareqa = [["Run", "Dataset"] + [column for *_, column, _ in HEADLINE]]
    other: list[list[str]] = []
    for label, results in runs.items():
        for name, result in results.items():
            s = result["summary"]
            if _lareqa(result):
                lareqa.append([label, str(name)] + [_fmt(s[setting].get(metric), digits)
                                                    for setting, metric, _, digits in HEADLINE])
            else:
                if not other:
                    other.append(["Run", "Dataset"] + list(s))
                other.append([label, str(name)] + [_fmt(s.get(m)) for m in other[0][2:]])
    tables = [markdown_table(t, text_cols=2) for t in (lareqa, other) if len(t) > 1]
    return "\n\n".join(tables)


def headline_lines(label: str, results: dict[str, dict]) -> list[str]:
    """One line per dataset with the four figures (or the IR means), for a phase's result."""
    lines = []
    for name, result in results.items():
        s = result["summary"]
        if _lareqa(result):
            figures = ", ".join(f"{column} {_fmt(s[setting].get(metric), digits)}"
                                for setting, metric, column, digits in HEADLINE)
        else:
            figures = ", ".join(f"{metric} {_fmt(value)}" for metric, value in s.items())
        lines.append(f"{label} on {name}: {figures}")
    return lines


def describe_training(config) -> str:
    """One line: what a training run of `config` does."""
    t = config.train
    budget = f"{t.max_steps} steps" if t.max_steps else f"{t.epochs} epoch(s)"
    line = (f"{config.name}: hybrid alpha={t.alpha:g}, {budget} x {t.global_batch_size} pairs, "
            f"{t.num_workers} worker(s), ZeRO-{t.zero_stage}")
    if config.data.hard_negatives and t.use_hard_negatives and t.hard_negatives_per_pair:
        line += f", {t.hard_negatives_per_pair} {config.data.hard_negatives} negative(s) per pair"
    if len(t.interpolate_weights or []) > 1:
        line += f", then w of (1 - w) x initial + w x trained chosen on validation ({t.interpolate_rule})"
    return line


def print_summary(command: str, elapsed_s: float, ran: list[str], outputs: dict[str, str], table: str = "",
                  out: TextIO | None = None) -> str:
    """Print (and return) the closing block of `raysys <command>`:

        [demo] done in 7 min 24 s
        ran:     ...
        report:  ...

        | Run | Dataset | Mono mAP | ...
    """
    width = max([len(k) for k in outputs] + [3]) + 1
    lines = ["", f"[{command}] done in {format_duration(elapsed_s)}"]
    lines += [f"{'ran:' if i == 0 else '':<{width}} {item}" for i, item in enumerate(ran)]
    lines += [f"{key + ':':<{width}} {value}" for key, value in outputs.items()]
    if table:
        lines += ["", table]
    text = "\n".join(lines)
    print(text, file=out or sys.stdout, flush=True)
    return text
