#!/usr/bin/env python
"""Device check: everything in raysys that only a GPU can exercise, in one run of a few minutes.

Checks (each reported pass / fail / unavailable, the run goes on after a failure):
1. nccl      -- an NCCL process group: all_reduce, and the differentiable all-gather the InfoNCE
                loss uses for cross-device negatives (its backward is a reduce-scatter).
2. train     -- DeepSpeed ZeRO-2 in bf16 on the model, `raysys.train.step.train_step` with and
                without gradient caching on the same batches: losses agree (bf16 tolerance),
                stay finite, pairs/s and model FLOP utilisation against the measured bf16 matmul peak.
3. export    -- `raysys.train.export.master_weights_state_dict` equals DeepSpeed's fp32 master
                partition and differs from the bf16 working copy.
4. encode    -- `raysys.eval.encode.EncoderActor` (the evaluation's encoder: exact fp32 by default,
                and the opt-in bf16 fast path) texts/s, and its embeddings against a plain fp32
                encoding (cosine).
5. faiss     -- faiss-gpu: GpuIndexFlatIP top-10 on 1M x 384 vectors equals the CPU index's.
6. index_shards -- `raysys.eval.shards.IndexShard` on the GPU (FAISS GPU top-k, torch float64 counts)
                with fp32 and fp16 storage: its counts (the exact ranks) equal the CPU shard's.
Output: one JSON (stdout and --out). No Ray is needed (the device machines have none).

On the device machine (python3 holds CUDA torch, transformers, tokenizers; no DeepSpeed, Ray or
faiss, no network): carry a wheelhouse made here with
    pip download --only-binary=:all: --python-version 3.12 --no-deps -d .wheels hjson pydantic \
        pydantic-core annotated-types typing-inspection && pip wheel --no-deps -w .wheels deepspeed==0.19.8
and the default model directory (or pass --model random-e5-small: the default model's shape with
random weights, which gives the same throughput and FLOP figures), then run
    pip install --no-index --no-deps .wheels/*.whl && python3 bench/gpu_check.py --out $OUT/gpu_check.json
On a CPU machine `--device cpu` runs the same code with gloo and fp32 (bench/results/gpu_check_cpu.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORDS = "river mountain city bridge market school garden harbour forest castle library station".split()


def sentence(i: int, words: int) -> str:
    return " ".join(f"{WORDS[(i * 5 + k) % len(WORDS)]}{(i * 31 + k) % 101}" for k in range(words))


def check(name: str, results: dict, fn) -> None:
    start = time.perf_counter()
    try:
        results[name] = {"status": "pass", **fn()}
    except ModuleNotFoundError as exc:
        results[name] = {"status": "unavailable", "reason": str(exc)}
    except Exception as exc:  # a failed check is reported; the others still run
        results[name] = {"status": "fail", "error": f"{type(exc).__name__}: {exc}",
                         "traceback": traceback.format_exc(limit=6)}
    results[name]["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps({name: results[name]}), flush=True)


def model_dir(name: str, work: Path) -> str:
    if name == "random-e5-small":  # multilingual-e5-small's shape (BERT, 12 x 384, 250k vocab), random weights
        from transformers import BertConfig, BertModel

        from tests.tiny_model import build_tiny_model

        out = build_tiny_model(work / "random-e5-small")  # writes its tokenizer; the model is replaced
        BertModel(BertConfig(vocab_size=250037, hidden_size=384, num_hidden_layers=12, num_attention_heads=12,
                             intermediate_size=1536, max_position_embeddings=514)).save_pretrained(out)
        return str(out)
    from raysys.model.default import resolve_model_path

    return str(resolve_model_path(name))


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    start, reps = time.perf_counter(), 10
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def check_nccl(device: torch.device) -> dict:
    from raysys.train.loss import gather_with_grad

    x = torch.arange(4.0, device=device, requires_grad=True)
    total = x.detach().clone()
    dist.all_reduce(total)
    gathered = gather_with_grad(x * 2)
    gathered.sum().backward()
    world = dist.get_world_size()
    assert torch.equal(total, torch.arange(4.0, device=device) * world), total
    assert gathered.shape[0] == 4 * world and torch.equal(x.grad, torch.full_like(x, 2.0 * world)), x.grad
    return {"backend": dist.get_backend(), "world_size": world}


def train_engine(path: str, train, precision: str):
    import deepspeed

    from raysys.model.encoder import BiEncoder, EncoderSettings
    from raysys.train.deepspeed_config import build_deepspeed_config

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    model = BiEncoder.from_pretrained(path, EncoderSettings(max_query_length=64, max_passage_length=128))
    config = build_deepspeed_config(train, total_steps=100, world_size=dist.get_world_size())
    engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=list(model.parameters()))
    return engine


def check_train(path: str, device: torch.device, args, shared: dict) -> dict:
    from raysys.config import TrainConfig
    from raysys.train.step import train_step

    precision = "bf16" if device.type == "cuda" else "fp32"
    peak = matmul_peak(device, torch.bfloat16 if precision == "bf16" else torch.float32)
    flops_per_pair = 6 * shared["dense_params"] * (64 + 128)  # linear layers, forward + backward
    out = {"precision": precision, "matmul_peak_tflops": round(peak / 1e12, 2), "arms": {}}
    losses = {}
    for arm, mini in (("plain", None), ("cached", args.mini_batch_size)):
        train = TrainConfig(global_batch_size=args.batch, num_workers=1, zero_stage=2, precision=precision,
                            mini_batch_size=mini, use_gpu=device.type == "cuda", lr=1e-5)
        engine = train_engine(path, train, precision)
        times, losses[arm] = [], []
        torch.cuda.reset_peak_memory_stats() if device.type == "cuda" else None
        for step in range(args.steps):
            ids = range(step * args.batch, (step + 1) * args.batch)
            batch = SimpleNamespace(queries=[sentence(i, 60) for i in ids], passages=[sentence(i + 7, 120) for i in ids],
                                    hard_negatives=None)
            sync(device)
            start = time.perf_counter()
            loss, _ = train_step(engine, batch, train, seed=step)
            losses[arm].append(float(loss))  # syncs
            times.append(time.perf_counter() - start)
        steady = times[1:] or times
        pairs_per_s = args.batch * len(steady) / sum(steady)
        out["arms"][arm] = {"pairs_per_s": round(pairs_per_s, 1), "mfu": round(pairs_per_s * flops_per_pair / peak, 4),
                            "losses": losses[arm], "step_s": [round(t, 3) for t in times],
                            "peak_gpu_gib": (round(torch.cuda.max_memory_allocated() / 2**30, 2)
                                             if device.type == "cuda" else None)}
        if arm == "cached":
            shared["engine"] = engine
        del engine
    assert all(map(lambda v: v == v and abs(v) < 1e4, losses["plain"] + losses["cached"])), "non-finite loss"
    # Same batches and weights at step 0: the losses agree up to bf16 rounding of the forward.
    assert abs(losses["plain"][0] - losses["cached"][0]) <= 2e-2 * abs(losses["plain"][0]), losses
    return out


def check_export(shared: dict) -> dict:
    from raysys.train.export import master_weights_state_dict

    engine = shared["engine"]  # ZeRO-2, after the cached arm's steps
    exported = master_weights_state_dict(engine, dist.get_rank())
    names = {id(p): n for n, p in engine.module.backbone.named_parameters()}
    order = [names[id(p)] for p in engine.optimizer.bit16_groups[0]]
    flat = torch.cat([exported[n].flatten() for n in order])
    master = engine.optimizer.single_partition_of_fp32_groups[0].detach().float().cpu()
    working = dict(engine.module.backbone.named_parameters())
    differs = sum(not torch.equal(exported[n], working[n].detach().float().cpu()) for n in order)
    assert torch.equal(flat, master[:flat.numel()]), "export is not DeepSpeed's fp32 master copy"
    return {"working_dtype": str(working[order[0]].dtype), "tensors_differing_from_working_copy": differs,
            "tensors": len(order)}


def check_encode(path: str, device: torch.device, args) -> dict:
    import numpy as np

    from raysys.model.encoder import BiEncoder, EncoderSettings

    settings = {"max_query_length": 64, "max_passage_length": 128}
    texts = [sentence(i, 100) for i in range(args.encode_texts)]
    try:
        from raysys.eval.encode import EncoderActor  # the evaluation's encoder (imports Ray Data)
    except ModuleNotFoundError as exc:  # no Ray here: the same model, dtype and fp32 pooling by hand
        return {**encode_without_ray(path, settings, texts, device), "note": f"EncoderActor not importable ({exc})"}
    exact = BiEncoder.from_pretrained(path, EncoderSettings(**settings)).to(device).eval()
    with torch.inference_mode():
        reference = exact.encode_texts(texts[:256], "passage").float().cpu().numpy()
    out = {}
    for fast_path in (None, "bf16"):  # the default (exact fp32 on every device) and the opt-in fast path
        actor = EncoderActor(path, settings, threads=os.cpu_count(), fast_path=fast_path)
        actor.embed_texts(texts[:64], ["passage"] * 64)  # warm-up
        sync(device)
        start = time.perf_counter()
        emb = actor.embed_texts(texts, ["passage"] * len(texts))
        sync(device)
        seconds = time.perf_counter() - start
        cosine = (emb[:256] * reference).sum(1) / np.linalg.norm(emb[:256], axis=1) / np.linalg.norm(reference, axis=1)
        assert cosine.min() > 0.99, cosine.min()
        out[fast_path or "fp32"] = {"texts_per_s": round(len(texts) / seconds, 1),
                                    "dtype": str(next(actor.model.parameters()).dtype),
                                    "min_cosine_vs_fp32": round(float(cosine.min()), 5)}
    return out


def encode_without_ray(path: str, settings: dict, texts: list[str], device: torch.device) -> dict:
    from raysys.model.encoder import BiEncoder, EncoderSettings

    dtype = torch.float32  # as EncoderActor encodes by default
    model = BiEncoder.from_pretrained(path, EncoderSettings(**settings), torch_dtype=dtype).to(device).eval()
    with torch.inference_mode():
        model.encode_texts(texts[:64], "passage")
        sync(device)
        start = time.perf_counter()
        for i in range(0, len(texts), 512):
            model.encode_texts(texts[i:i + 512], "passage")
        sync(device)
    return {"texts_per_s": round(len(texts) / (time.perf_counter() - start), 1), "dtype": str(dtype)}


def check_faiss(args) -> dict:
    import faiss
    import numpy as np

    if not hasattr(faiss, "StandardGpuResources"):
        raise ModuleNotFoundError("faiss is installed without GPU support (faiss-cpu)")
    rng = np.random.default_rng(0)
    base = rng.standard_normal((args.faiss_vectors, 384), dtype=np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    queries = base[rng.choice(len(base), 10_000, replace=False)] + 0.01
    gpu = faiss.GpuIndexFlatIP(faiss.StandardGpuResources(), 384)
    gpu.add(base)
    start = time.perf_counter()
    _, gpu_ids = gpu.search(queries, 10)
    seconds = time.perf_counter() - start
    cpu = faiss.IndexFlatIP(384)
    cpu.add(base)
    _, cpu_ids = cpu.search(queries[:500], 10)
    agreement = float((gpu_ids[:500] == cpu_ids).mean())
    assert agreement > 0.999, agreement
    return {"vectors": len(base), "queries_per_s": round(len(queries) / seconds), "top10_agreement_with_cpu": agreement}


def check_index_shards(args) -> dict:
    """raysys's index shard on the GPU (FAISS GPU top-k, torch float64 counts), fp32 and fp16
    storage, against the same shard on the CPU: the counts (exact ranks) must be equal; the top-k
    ids are compared (FAISS GPU keeps another member of a tie at the cut)."""
    import faiss
    import numpy as np

    from raysys.eval.shards import IndexShard

    if not hasattr(faiss, "StandardGpuResources"):
        raise ModuleNotFoundError("faiss is installed without GPU support (faiss-cpu)")
    rng = np.random.default_rng(1)
    n = min(args.faiss_vectors, 200_000)
    vectors = rng.standard_normal((n, 384), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    relevant = rng.integers(0, n, size=(512, 3))
    queries = vectors[relevant[:, 0]] + 0.05 * rng.standard_normal((512, 384), dtype=np.float32)
    out = {"vectors": n, "queries": len(queries)}
    for dtype in ("fp32", "fp16"):
        answers = {}
        for device in ("cpu", "gpu"):
            shard = IndexShard(0, vectors=vectors, use_gpu=device == "gpu", storage_dtype=dtype)
            rows = np.repeat(np.arange(len(queries)), relevant.shape[1])
            scores, groups, norms = shard.relevant_scores(queries, rows, relevant.reshape(-1))
            shape = relevant.shape
            start = time.perf_counter()
            answers[device] = shard.search_and_count(queries, scores.reshape(shape), relevant, groups.reshape(shape),
                                                     norms.reshape(shape), 10)
            answers[device]["seconds"] = time.perf_counter() - start
        cpu, gpu = answers["cpu"], answers["gpu"]
        for name in ("above", "tied", "above_group", "tied_group"):
            assert np.array_equal(cpu[name], gpu[name]), f"{dtype}: GPU counts '{name}' differ from the CPU's"
        out[dtype] = {"counts_equal": True, "top10_agreement": float((cpu["ids"] == gpu["ids"]).mean()),
                      "gpu_seconds": round(gpu["seconds"], 3), "cpu_seconds": round(cpu["seconds"], 3)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="default", help="a model path or name, or random-e5-small")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--mini-batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--encode-texts", type=int, default=20_000)
    parser.add_argument("--faiss-vectors", type=int, default=1_000_000)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    os.environ.update(DS_ACCELERATOR=device.type, MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29517"),
                      RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", TOKENIZERS_PARALLELISM="false")
    if device.type == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    results: dict = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                     "torch": torch.__version__, "args": vars(args)}
    with tempfile.TemporaryDirectory() as work:
        path = model_dir(args.model, Path(work))
        from transformers import AutoModel

        backbone = AutoModel.from_pretrained(path)
        shared = {"dense_params": sum(p.numel() for n, p in backbone.named_parameters() if "embeddings" not in n)}
        del backbone
        check("nccl", results, lambda: check_nccl(device))
        check("train", results, lambda: check_train(path, device, args, shared))
        check("export", results, lambda: check_export(shared))
        check("encode", results, lambda: check_encode(path, device, args))
        check("faiss", results, lambda: check_faiss(args))
        check("index_shards", results, lambda: check_index_shards(args))
    dist.destroy_process_group()
    text = json.dumps(results, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
