"""Every evaluation dataset checked before any encoding starts.

A bad name in `--datasets a b` used to fail only after `a` had been encoded (minutes); here each
LAReQA dataset is resolved and read (about a second for XQuAD-R) and each MIRACL-style
directory is checked for its per-language files, so a typo fails in seconds with one line.
An `eval.fast_path=bf16` that this machine's CPU cannot run fast is refused here too.
"""

from __future__ import annotations

import os
from pathlib import Path

from raysys.config import Config
from raysys.errors import ConfigError, DataError

MIRACL_FILES = ("topics.tsv", "qrels.tsv", "corpus.jsonl")


def check_evaluation(datasets: list[str], config: Config) -> None:
    check_fast_path_hardware(config)
    check_datasets(datasets, config)


def check_fast_path_hardware(config: Config) -> None:
    """bf16 on a CPU without native bf16 matrix instructions (AVX512-BF16 or AMX) is emulated: on
    an AVX2-only EPYC it encoded 6.7 texts/s against 46 for exact fp32 (int8: 65), slower and less
    exact. Refused when the encoders run on this machine's CPU; on a multi-node cluster the
    encoder actors check their own node's CPU and warn (raysys.eval.encode.apply_fast_path)."""
    import ray

    from raysys.eval.encode import check_fast_path
    from raysys.runtime import is_multi_node

    if check_fast_path(config.eval.fast_path) != "bf16" or config.train.use_gpu:
        return
    joining = not ray.is_initialized() and os.environ.get("RAY_ADDRESS", "local") != "local"
    if joining or is_multi_node():  # the encoders may run on other CPUs than this one
        return
    if not cpu_has_native_bf16():
        import torch

        raise ConfigError(
            f"bf16 on this CPU ({torch.backends.cpu.get_cpu_capability()}, no AVX512-BF16 or AMX instructions) "
            "is emulated and encodes several times slower than exact fp32",
            field="eval.fast_path", hint="use eval.fast_path=int8 (faster, approximate) or none (exact)")


def cpu_has_native_bf16() -> bool:
    """oneDNN's own test (the same one the encoder actors use): AVX512-BF16 or AMX."""
    import torch

    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def check_datasets(datasets: list[str], config: Config) -> None:
    if not datasets:
        raise ConfigError("no evaluation datasets", field="eval.datasets", hint="name one, e.g. xquad-r")
    for name in datasets:
        if str(name).startswith("miracl:"):
            check_miracl_root(Path(str(name).split(":", 1)[1]))
        else:
            check_lareqa(name, config)


def check_lareqa(name: str, config: Config) -> None:
    from raysys.eval.run import load_eval_corpus  # the same reader (and split) the evaluation uses

    load_eval_corpus(name, config)  # resolves, reads and splits it: every data error surfaces here


def check_miracl_root(root: Path) -> None:
    """At least one <lang>/ with topics.tsv, and each such language with all three files (the
    paths the evaluation reads); their contents are checked when each language is evaluated."""
    hint = "a MIRACL-style dataset is miracl:<dir> with <dir>/<lang>/{topics.tsv,qrels.tsv,corpus.jsonl}"
    if not root.is_dir():
        raise DataError(f"miracl:{root}: not a directory", hint=hint)
    langs = sorted(d for d in root.iterdir() if (d / "topics.tsv").exists())
    if not langs:
        raise DataError(f"miracl:{root}: no <lang>/topics.tsv found", hint=hint)
    for lang_dir in langs:
        missing = [f for f in MIRACL_FILES if not (lang_dir / f).is_file()]
        if missing:
            raise DataError(f"miracl:{root}: {lang_dir.name}/ has no {', '.join(missing)}", hint=hint)
