#!/usr/bin/env python
"""XQuAD-R evaluation of the untrained default model: full-run wall time, reference figures, and
the mAP cost of the opt-in encoder fast paths.

Parts (`--parts`, each merged into the `--out` JSON under its own key, so they can run apart):
  * full  `raysys.eval.run.evaluate("default", ["xquad-r"], config)` with eval.split=all (13,090
          queries, 13,014 candidates), max length 256, exact fp32, in a fresh work dir: the wall
          time of that call (actor start-ups, encoding, FAISS, metrics; `ray.init` timed apart),
          and its summary against the reference figures of /work/shared/notes/default-model.md
          (mono 0.799, cross 0.639, multi 0.298, rank distance 1232; target |delta| <= 0.005 mAP).
  * fast  the held-out test articles (40-47, eval.split=test) encoded with `encode_texts` exactly
          (fp32) and with each fast path (`fast_path=bf16|int8`), scored with
          `raysys.eval.lareqa.evaluate_lareqa`: mAP per setting and the loss against fp32
          (target: at most 0.005 mAP lost in every setting).

    python bench/bench_eval.py --parts fast,full --out bench/results/eval_xquad_r.json  # ~12 min, 2 cores
"""

from __future__ import annotations

import argparse
import atexit
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

REFERENCE = {"source": "/work/shared/notes/default-model.md (independent implementation, fp32, max length 256)",
             "monolingual_map": 0.799, "cross_lingual_map": 0.639, "multilingual_map": 0.298,
             "rank_distance": 1232.0, "queries": 13090, "candidates": 13014}
MAP_TOLERANCE, WALL_TARGET_S, FAST_MAX_LOSS = 0.005, 600.0, 0.005
SETTINGS = ("monolingual", "cross_lingual", "multilingual")


def log(msg: str) -> None:
    print(f"[bench_eval {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def machine() -> dict:
    import faiss
    import numpy as np
    import ray
    import torch
    import transformers

    return {"nproc": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "transformers": transformers.__version__, "ray": ray.__version__, "faiss": faiss.__version__,
            "numpy": np.__version__}


def make_config(args, split: str):
    from raysys.config import Config

    config = Config()
    config.data.source_dir = args.source
    config.eval.split = split
    config.eval.max_length = args.max_length
    config.eval.batch_tokens = args.batch_tokens
    config.eval.num_encoders = 1
    return config


def headline(summary: dict) -> dict:
    out = {f"{s}_map": round(summary[s]["map"], 4) for s in SETTINGS}
    out |= {f"{s}_recall@1": round(summary[s]["recall@1"], 4) for s in SETTINGS}
    out["rank_distance"] = round(summary["multilingual"]["rank_distance"], 1)
    return out


def part_full(args) -> dict:
    import raysys.eval.embeddings as embeddings_mod
    import raysys.eval.run as run_mod
    from raysys.runtime import ensure_ray

    import ray

    config = make_config(args, "all")
    t = time.perf_counter()
    already = ray.is_initialized()
    ensure_ray(num_cpus=args.threads)
    ray_init_s = None if already else time.perf_counter() - t
    phases: list[dict] = []

    def timed(fn, label):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            phases.append({"phase": label(a, kw), "seconds": round(time.perf_counter() - t0, 1)})
            log(f"{phases[-1]['phase']}: {phases[-1]['seconds']} s")
            return out
        return wrapper

    # Time the phases inside evaluate() without changing it.
    real_encode, real_metrics = embeddings_mod.encode_sets, run_mod.evaluate_lareqa_stored
    embeddings_mod.encode_sets = timed(real_encode, lambda a, kw: "encode " + ", ".join(
        f"{name} ({len(texts)} texts)" for name, (texts, _) in a[0].items()))
    run_mod.evaluate_lareqa_stored = timed(real_metrics, lambda a, kw: "metrics (index-shard actors: exact ranks)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        n_c = run_mod.load_eval_corpus("xquad-r", config).candidates.num_rows  # (prepares the data cache)
    work = Path(tempfile.mkdtemp(prefix="bench-eval-full-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    log(f"full XQuAD-R evaluation, work dir {work}")
    try:
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = run_mod.evaluate("default", ["xquad-r"], config, work, progress=False)["xquad-r"]
        wall = time.perf_counter() - t
    finally:
        embeddings_mod.encode_sets, run_mod.evaluate_lareqa_stored = real_encode, real_metrics
    got = headline(result["summary"])
    n_q = sum(v["num_queries"] for v in result["multilingual_per_language"].values())
    deltas = {f"{s}_map": round(got[f"{s}_map"] - REFERENCE[f"{s}_map"], 4) for s in SETTINGS}
    return {
        "what": "raysys.eval.run.evaluate('default', ['xquad-r'], config) with eval.split=all, exact fp32",
        "config": {"eval.split": "all", "eval.max_length": args.max_length, "eval.batch_tokens": args.batch_tokens,
                   "eval.num_encoders": 1,
                   "encoder threads": "os.cpu_count() // num_encoders = %d" % (os.cpu_count() // 1),
                   "data.source_dir": args.source},
        "queries": n_q, "candidates": n_c,
        "wall_s": round(wall, 1),
        "ray_init_s": None if ray_init_s is None else round(ray_init_s, 1),
        "ray_init_note": ("Ray was already started by an earlier part in this process (ray.init takes 5-10 s "
                          "here)" if ray_init_s is None else "ray.init timed apart, not in wall_s"),
        "phases": phases,
        "loadavg_after": list(os.getloadavg()),
        "summary": got,
        "reference": REFERENCE,
        "delta_vs_reference": deltas | {"rank_distance": round(got["rank_distance"] - REFERENCE["rank_distance"], 1)},
        "targets": {
            "wall_time": {"target": f"full evaluation < {WALL_TARGET_S:.0f} s on 2 cores (fp32)",
                          "value_s": round(wall, 1), "passed": bool(wall < WALL_TARGET_S)},
            "reference_figures": {"target": f"|mAP - reference| <= {MAP_TOLERANCE} for mono, cross, multi",
                                  "max_abs_delta": max(abs(v) for v in deltas.values()),
                                  "passed": bool(max(abs(v) for v in deltas.values()) <= MAP_TOLERANCE)},
        },
    }


def part_fast(args) -> dict:
    from raysys.eval.encode import encode_texts
    from raysys.eval.lareqa import evaluate_lareqa
    from raysys.eval.embeddings import encoder_settings
    from raysys.eval.run import load_eval_corpus
    from raysys.model.default import resolve_model_path
    from raysys.runtime import ensure_ray

    config = make_config(args, "test")
    ensure_ray(num_cpus=args.threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        corpus = load_eval_corpus("xquad-r", config)
    texts_q = corpus.questions.column("text").to_pylist()
    texts_c = corpus.candidates.column("text").to_pylist()
    model_path = resolve_model_path("default")
    settings = encoder_settings(config)
    work = Path(tempfile.mkdtemp(prefix="bench-eval-fast-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    variants = [None] + [f for f in args.fast_paths.split(",") if f]
    out = {}
    for fast_path in variants:
        name = fast_path or "fp32"
        t = time.perf_counter()
        emb = encode_texts(texts_q + texts_c, ["query"] * len(texts_q) + ["passage"] * len(texts_c),
                           model_path=model_path, settings=settings, out_dir=work / name, name="test",
                           shard_size=len(texts_q) + len(texts_c), batch_tokens=args.batch_tokens,
                           threads=args.threads, progress=False, fast_path=fast_path)
        encode_s = time.perf_counter() - t
        summary = evaluate_lareqa(corpus, emb[:len(texts_q)], emb[len(texts_q):],
                                  num_shards=config.eval.num_shards)["summary"]
        out[name] = headline(summary) | {"encode_s": round(encode_s, 1),
                                         "texts_per_s": round((len(texts_q) + len(texts_c)) / encode_s, 1)}
        log(f"{name}: {out[name]}")
    base = out["fp32"]
    losses = {}
    for name in out:
        if name == "fp32":
            continue
        loss = {f"{s}_map": round(base[f"{s}_map"] - out[name][f"{s}_map"], 4) for s in SETTINGS}
        losses[name] = loss | {"max_loss": max(loss.values()),
                               "rank_distance_change": round(out[name]["rank_distance"] - base["rank_distance"], 1),
                               "encode_speedup_vs_fp32": round(base["encode_s"] / out[name]["encode_s"], 2),
                               "passed": bool(max(loss.values()) <= FAST_MAX_LOSS)}
    return {
        "what": "XQuAD-R test articles 40-47 (eval.split=test): encode_texts(fast_path=None|...) + evaluate_lareqa",
        "queries": len(texts_q), "candidates": len(texts_c),
        "config": {"eval.split": "test", "eval.max_length": args.max_length, "eval.batch_tokens": args.batch_tokens,
                   "threads": args.threads},
        "results": out,
        "map_loss_vs_fp32": losses,
        "target": f"mAP loss vs fp32 <= {FAST_MAX_LOSS} in mono, cross and multi (speed: see encode.json)",
        "note": "encode_s is one encode_texts call (queries + candidates, one actor, start-up included); "
                "variants run one after another, so it is only indicative: the speed ratios are in encode.json",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="fast,full")
    ap.add_argument("--fast-paths", default="bf16,int8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-tokens", type=int, default=1024)
    ap.add_argument("--source", default=str(REPO.parent / "shared" / "data" / "xquad-r"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
    report = json.loads(Path(args.out).read_text()) if args.out and Path(args.out).exists() else {}
    report |= {"benchmark": "XQuAD-R evaluation of the untrained default model (wall time, reference "
                            "figures, fast-path mAP cost)"}
    for part in [p for p in args.parts.split(",") if p]:
        t = time.perf_counter()
        section = {"full": part_full, "fast": part_fast}[part](args)
        section |= {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "command": command,
                    "machine": machine() | {"ray_init": f"raysys.runtime.ensure_ray(num_cpus={args.threads})",
                                            "note": "shared 2-core machine: other test runs were active"},
                    "part_wall_s": round(time.perf_counter() - t, 1)}
        report[{"full": "full_split_fp32", "fast": "fast_path_test_split"}[part]] = section
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
            log(f"wrote {part} to {args.out}")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
