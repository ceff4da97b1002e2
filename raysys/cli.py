"""`raysys prepare|train|eval|export|tune|reproduce|demo`: thin commands over the library.

Every command takes `--config some.yaml` plus `section.key=value` overrides (also after a list
option: `--datasets a b eval.split=test`). User errors (bad data, bad config) print one line and
exit 2, also when they happened inside a Ray worker. Ray's own logs stay at WARNING unless
`--verbose`; progress is drawn by the driver (raysys.progress) and each command ends with a summary.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

from raysys.config import Config
from raysys.console import is_verbose, quiet_driver, set_verbose
from raysys.errors import ConfigError, RaysysError

# `section.key=value` (or `key=value`): an override, never a dataset name or a seed.
OVERRIDE_WORD = re.compile(r"^[A-Za-z_][\w.]*=")


def _config(args) -> Config:
    return Config.from_yaml(args.config, args.overrides)


def cmd_prepare(args) -> None:
    from raysys.data.prepare import resolve_dataset
    from raysys.model.default import resolve_model_path

    for name in args.dataset:
        print(f"dataset {name}: {resolve_dataset(name, args.source_dir)}")
    if args.model:
        print(f"model {args.model}: {resolve_model_path(args.model)}")
    if args.corpus:
        from raysys.train.datasets import prepare_corpus

        uri, manifest = prepare_corpus(_config(args))
        splits = ", ".join(f"{name} {s['rows']} rows / {s['ids']} ids in {len(s['buckets'])} buckets"
                           for name, s in manifest["splits"].items())
        print(f"training corpus of {manifest['source']}: {uri} ({splits})")


def cmd_train(args) -> None:
    config = _config(args)  # config errors first, before the heavy imports
    from raysys.summary import describe_training, markdown_table, print_summary
    from raysys.train.progress import train_with_progress

    started = time.perf_counter()
    if is_verbose():
        print(config.to_yaml())  # also saved in every checkpoint's state
    print(f"[train] {describe_training(config)}", flush=True)
    outcome = train_with_progress(config)
    m = outcome.metrics
    columns = [("step", "Step"), ("loss", "Loss"), ("val_loss", "Val loss"), ("train_accuracy", "Train acc."),
               ("mono_steps", "Mono steps"), ("cross_steps", "Cross steps")]
    shown = [(key, title) for key, title in columns if isinstance(m.get(key), (int, float))]
    table = markdown_table([[title for _, title in shown],
                            [f"{m[key]:.4g}" if isinstance(m[key], float) else str(m[key]) for key, _ in shown]],
                           text_cols=0) if shown else ""
    which = "best checkpoint" if config.train.export_best_model else "final checkpoint"
    print_summary("train", time.perf_counter() - started, [describe_training(config)],
                  {which: outcome.checkpoint_path, "exported model": outcome.model_path, "run": outcome.run_path}, table)


def cmd_eval(args) -> None:
    config = _config(args)
    from raysys.eval.lareqa import paired_bootstrap_settings
    from raysys.eval.report import is_lareqa, write_comparison, write_report
    from raysys.eval.run import evaluate
    from raysys.summary import headline_table, print_summary

    started = time.perf_counter()
    out_dir = Path(args.out or Path(config.output_dir) / "eval")
    models = dict(_label(m) for m in (args.model or [config.model.name_or_path]))
    datasets = args.datasets or config.eval.datasets
    runs, reports = {}, {}
    for label, model in models.items():
        print(f"[eval] {label}: {', '.join(map(str, datasets))} (eval.split={config.eval.split})", flush=True)
        runs[label] = evaluate(model, datasets, config, out_dir)
        paths = write_report(runs[label], out_dir / label, title=f"{label} ({model})")
        reports[f"report {label}"] = str(paths["summary.md"])  # every metric, per language pair too
    if len(runs) > 1:  # side by side, with paired bootstrap CIs of each run against the first
        first = next(iter(runs))
        bootstrap = {f"{label} vs {first}": {name: paired_bootstrap_settings([runs[label]], [runs[first]], name,
                                                                             config.eval.bootstrap_samples)
                                             for name, result in runs[first].items() if is_lareqa(result)}
                     for label in list(runs)[1:]}
        paths = write_comparison(runs, out_dir / "comparison", baseline=first, bootstrap=bootstrap)
        reports["comparison"] = str(paths["comparison.md"])
    print_summary("eval", time.perf_counter() - started,
                  [f"{label} ({model}) on {', '.join(map(str, datasets))}" for label, model in models.items()],
                  reports, headline_table(runs))


def _label(spec: str) -> tuple[str, str]:
    """`label=path` or a bare path (its directory name is the label)."""
    if "=" in spec and not Path(spec).exists():
        label, model = spec.split("=", 1)
        return label, model
    return Path(spec).name or spec, spec


def cmd_export(args) -> None:
    """One interpolation weight: write that model. Several: evaluate each on the validation
    articles, write the curve, and keep the best as `--out`."""
    config = _config(args)
    from raysys.eval.run import model_dir_of
    from raysys.model.interpolate import write_interpolated
    from raysys.summary import print_summary
    from raysys.train.selection import evaluated_weights

    started = time.perf_counter()
    tuned, base = model_dir_of(args.model), args.base or config.model.name_or_path
    weights = [float(w) for w in args.interpolate.split(",")]
    out = args.out or str(Path(config.output_dir) / "export" / f"interpolated-{'-'.join(f'{w:g}' for w in weights)}")
    if len(evaluated_weights(weights, config.train.interpolate_rule)) == 1:  # keep_mono adds w = 0
        write_interpolated(base, tuned, weights[0], out)
        print_summary("export", time.perf_counter() - started, [f"(1 - {weights[0]:g}) x {base} + {weights[0]:g} x {tuned}"],
                      {"model": out})
        return
    from raysys.tune.interpolation import curve_table, interpolation_curve

    curve = interpolation_curve(tuned, base, weights, config, Path(out).with_name(Path(out).name + "-curve"),
                                datasets=args.datasets)
    best, evaluated = curve["best"], [r["weight"] for r in curve["rows"]]
    write_interpolated(base, tuned, best["weight"], out)
    print_summary("export", time.perf_counter() - started,
                  [f"weights {', '.join(format(w, 'g') for w in evaluated)} on the validation articles; "
                   f"chosen w = {best['weight']:g} ({config.train.interpolate_rule})"],
                  {"model": out, **{k: str(v) for k, v in curve["paths"].items()}}, curve_table(curve["rows"]))


def cmd_mine(args) -> None:
    """Retrieve hard negatives for every pair of a JSONL / Parquet corpus and write the mined file."""
    config = _config(args)
    from raysys.data.split import resolve_split_rule
    from raysys.eval.mine import mine_hard_negatives, write_pairs
    from raysys.eval.pairs_corpus import is_pairs_input, read_pairs_table
    from raysys.model.default import resolve_model_path
    from raysys.summary import print_summary

    started = time.perf_counter()
    source = args.input or config.data.train
    if not is_pairs_input(str(source)):
        raise ConfigError(f"{source} is not a JSONL / Parquet pairs input", field="--input",
                          hint="LAReQA directories have their own negatives: data.hard_negatives=paragraph")
    pairs = read_pairs_table(str(source), resolve_split_rule(config.data.split_rule, lareqa=False))
    model = resolve_model_path(args.model or config.model.name_or_path)
    mined, summary = mine_hard_negatives(pairs, str(model), config, Path(config.output_dir) / "mine",
                                         range_min=args.range_min, range_max=args.range_max,
                                         relative_margin=args.margin, num_negatives=args.num_negatives)
    out = write_pairs(mined, args.out)
    print_summary("mine", time.perf_counter() - started,
                  [f"{summary['mined']} of {summary['rows']} rows got a hard negative, {summary['with_all']} all "
                   f"{args.num_negatives} (median rank "
                   f"{summary['median_rank']}; ranks {args.range_min + 1}-{args.range_max}, margin {args.margin:g})"],
                  {"pairs": f"{out} (train on it with data.train={out})"})


def cmd_tune(args) -> None:
    config = _config(args)
    from raysys.tune.sweep import run_sweep

    run_sweep(config)


def cmd_reproduce(args) -> None:
    config = _config(args)
    from raysys.tune.reproduce import reproduce, select_arms

    reproduce(config, seeds=args.seeds, eval_datasets=args.datasets, arms=select_arms(args.arms),
              reuse_finished=not args.retrain)


def cmd_demo(args) -> None:
    config = _config(args)
    from raysys.demo import run_demo

    run_demo(config, quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raysys", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, func, help_text):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", help="YAML config (sections: data, model, train, eval, tune)")
        p.add_argument("-v", "--verbose", action="store_true",
                       help="also show Ray's own INFO logs (cluster start, data plans, Ray Train reports)")
        p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.alpha=0.5")
        p.set_defaults(func=func)
        return p

    p = add("prepare", cmd_prepare, "fill the cache: datasets and the default model")
    p.add_argument("--dataset", action="append", default=None, help="xquad-r (default), mlqa-r")
    p.add_argument("--source-dir", help="local directory holding the dataset's <lang>.json files")
    p.add_argument("--model", default="default", help="build/resolve this model too ('' to skip)")
    p.add_argument("--corpus", action="store_true",
                   help="also write data.train's bucketed training corpus under the run storage (as train does; "
                        "reused while the inputs and data settings are unchanged)")
    add("train", cmd_train, "fine-tune with hybrid batches (Ray Train + DeepSpeed)")
    p = add("eval", cmd_eval, "evaluate models on LAReQA / MIRACL-style datasets")
    p.add_argument("--model", action="append", help="model, checkpoint dir or label=path (repeatable)")
    p.add_argument("--datasets", nargs="+", action=ListThenOverrides,
                   help="dataset names or directories (miracl:<dir> for MIRACL)")
    p.add_argument("--out", help="report directory (default <output_dir>/eval)")
    p = add("export", cmd_export, "interpolate a fine-tuned model with its base (w=1: fine-tuned)")
    p.add_argument("--model", required=True, help="fine-tuned model directory or training checkpoint")
    p.add_argument("--base", help="the model it was fine-tuned from (default: model.name_or_path)")
    p.add_argument("--interpolate", required=True,
                   help="weight w of the fine-tuned model, e.g. 0.5; a list 0,0.25,0.5,0.75,1 picks the best "
                        "on the validation articles and reports the curve")
    p.add_argument("--datasets", nargs="+", action=ListThenOverrides,
                   help="LAReQA datasets whose validation articles choose w (default: data.train)")
    p.add_argument("--out", help="output model directory or storage URI")
    p = add("mine", cmd_mine, "retrieve hard negatives for every pair of a JSONL / Parquet corpus")
    p.add_argument("--input", help="pairs file, directory or URI (default: data.train)")
    p.add_argument("--model", help="the retriever (default: model.name_or_path)")
    p.add_argument("--out", required=True, help="the mined pairs file (.parquet or .jsonl; a path or storage URI)")
    p.add_argument("--range-min", type=int, default=0, help="skip this many top-ranked candidates (likely positives)")
    p.add_argument("--range-max", type=int, default=50, help="search this deep")
    p.add_argument("--margin", type=float, default=0.05,
                   help="relative margin: a negative scores at most (1 - margin) x the positive")
    p.add_argument("--num-negatives", type=int, default=1,
                   help="negatives per row, best first (train with train.hard_negatives_per_pair up to this)")
    add("tune", cmd_tune, "Ray Tune sweep over alpha (and lr, temperature)")
    p = add("reproduce", cmd_reproduce, "alpha = 1 vs 0.5 vs 0 with several seeds, evaluated zero-shot")
    p.add_argument("--seeds", type=int_or_override, nargs="+", default=[0, 1, 2], action=ListThenOverrides)
    p.add_argument("--datasets", nargs="+", action=ListThenOverrides,
                   help="held-out LAReQA-format datasets to evaluate on")
    p.add_argument("--arms", nargs="+", action=ListThenOverrides,
                   help="train only these: x-x-mono (alpha = 1), x-y (alpha = 0), hybrid (alpha = 0.5); default all "
                        "three (the untrained model is always evaluated; a rerun with more arms reuses these runs)")
    p.add_argument("--retrain", action="store_true",
                   help="train every run again (default: reuse runs that already finished with the same config)")
    p = add("demo", cmd_demo, "the default job: build model, train alpha=0.5, evaluate before/after")
    p.add_argument("--quick", action="store_true", help="a smoke test in a couple of minutes")
    return parser


def int_or_override(text: str) -> int | str:
    if OVERRIDE_WORD.match(text):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None


class ListThenOverrides(argparse.Action):
    """A `nargs="+"` option that leaves `key=value` words to the overrides: in `--datasets xquad-r
    eval.split=test` the second word is an override, never a dataset called 'eval.split=test'."""

    def __call__(self, parser, namespace, values, option_string=None):
        overrides = [v for v in values if isinstance(v, str) and OVERRIDE_WORD.match(v)]
        items = [v for v in values if v not in overrides]
        if not items:
            parser.error(f"{option_string}: expected at least one value before {overrides[0]}")
        setattr(namespace, self.dest, items)
        namespace.moved_overrides = [*getattr(namespace, "moved_overrides", []), *overrides]


def find_user_error(exc: BaseException) -> RaysysError | None:
    """A RaysysError anywhere in the chain, including inside Ray worker failures."""
    seen, stack = set(), [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, RaysysError):
            return e
        stack.extend([e.__cause__, e.__context__, getattr(e, "cause", None),
                      getattr(e, "controller_failure", None)])
        stack.extend(getattr(e, "worker_failures", {}).values())
    return None


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    args.overrides = [*getattr(args, "moved_overrides", []), *args.overrides]
    if args.verbose:
        set_verbose()
    quiet_driver()
    if args.command == "prepare" and args.dataset is None:
        args.dataset = ["xquad-r"]
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # user errors get one line; bugs keep their traceback
        user_error = find_user_error(exc)
        if user_error is None:
            raise
        print(f"raysys {args.command}: error: {user_error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
