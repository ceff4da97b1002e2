"""`raysys prepare|train|eval|tune|reproduce|demo`: thin commands over the library.

Every command takes `--config some.yaml` plus `section.key=value` overrides. User errors (bad
data, bad config) print one line and exit 2, also when they happened inside a Ray worker.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from raysys.config import Config
from raysys.errors import RaysysError


def _config(args) -> Config:
    return Config.from_yaml(args.config, args.overrides)


def cmd_prepare(args) -> None:
    from raysys.data.prepare import resolve_dataset
    from raysys.model.default import resolve_model_path

    for name in args.dataset:
        print(f"dataset {name}: {resolve_dataset(name, args.source_dir)}")
    if args.model:
        print(f"model {args.model}: {resolve_model_path(args.model)}")


def cmd_train(args) -> None:
    config = _config(args)  # config errors first, before the heavy imports
    from raysys.train.run import train

    print(config.to_yaml())
    outcome = train(config)
    print(f"final checkpoint: {outcome.checkpoint_path}\nexported model:   {outcome.model_path}")
    print(json.dumps({k: v for k, v in outcome.metrics.items() if isinstance(v, (int, float))}, indent=2))


def cmd_eval(args) -> None:
    config = _config(args)
    from raysys.eval.lareqa import paired_bootstrap_settings
    from raysys.eval.report import format_summary_table, is_lareqa, write_comparison, write_report
    from raysys.eval.run import evaluate

    out_dir = Path(args.out or Path(config.output_dir) / "eval")
    models = dict(_label(m) for m in (args.model or [config.model.name_or_path]))
    runs = {}
    for label, model in models.items():
        runs[label] = evaluate(model, args.datasets or config.eval.datasets, config, out_dir)
        paths = write_report(runs[label], out_dir / label, title=f"{label} ({model})")
        print(format_summary_table(runs[label]))
        print(f"report: {paths['summary.md']}")
    if len(runs) > 1:  # side by side, with paired bootstrap CIs of each run against the first
        first = next(iter(runs))
        bootstrap = {f"{label} vs {first}": {name: paired_bootstrap_settings([runs[label]], [runs[first]], name,
                                                                             config.eval.bootstrap_samples)
                                             for name, result in runs[first].items() if is_lareqa(result)}
                     for label in list(runs)[1:]}
        paths = write_comparison(runs, out_dir / "comparison", baseline=first, bootstrap=bootstrap)
        print(paths["comparison.md"].read_text())


def _label(spec: str) -> tuple[str, str]:
    """`label=path` or a bare path (its directory name is the label)."""
    if "=" in spec and not Path(spec).exists():
        label, model = spec.split("=", 1)
        return label, model
    return Path(spec).name or spec, spec


def cmd_tune(args) -> None:
    config = _config(args)
    from raysys.tune.sweep import run_sweep

    run_sweep(config)


def cmd_reproduce(args) -> None:
    config = _config(args)
    from raysys.tune.reproduce import reproduce

    reproduce(config, seeds=args.seeds, eval_datasets=args.datasets, reuse_finished=not args.retrain)


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
        p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.alpha=0.5")
        p.set_defaults(func=func)
        return p

    p = add("prepare", cmd_prepare, "fill the cache: datasets and the default model")
    p.add_argument("--dataset", action="append", default=None, help="xquad-r (default), mlqa-r")
    p.add_argument("--source-dir", help="local directory holding the dataset's <lang>.json files")
    p.add_argument("--model", default="default", help="build/resolve this model too ('' to skip)")
    add("train", cmd_train, "fine-tune with hybrid batches (Ray Train + DeepSpeed)")
    p = add("eval", cmd_eval, "evaluate models on LAReQA / MIRACL-style datasets")
    p.add_argument("--model", action="append", help="model, checkpoint dir or label=path (repeatable)")
    p.add_argument("--datasets", nargs="+", help="dataset names or directories (miracl:<dir> for MIRACL)")
    p.add_argument("--out", help="report directory (default <output_dir>/eval)")
    add("tune", cmd_tune, "Ray Tune sweep over alpha (and lr, temperature)")
    p = add("reproduce", cmd_reproduce, "alpha = 1 vs 0.5 vs 0 with several seeds, evaluated zero-shot")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--datasets", nargs="+", help="held-out LAReQA-format datasets to evaluate on")
    p.add_argument("--retrain", action="store_true",
                   help="train every run again (default: reuse runs that already finished with the same config)")
    p = add("demo", cmd_demo, "the default job: build model, train alpha=0.5, evaluate before/after")
    p.add_argument("--quick", action="store_true", help="a smoke test in a couple of minutes")
    return parser


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
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # our own progress bars say enough
    args = build_parser().parse_args(argv)
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
