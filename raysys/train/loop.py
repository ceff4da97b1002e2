"""The per-worker training function, top to bottom: data -> model -> DeepSpeed -> steps -> reports.

Runs inside each Ray Train worker. Follows Ray's DeepSpeed example: `deepspeed.initialize`
(not `prepare_model`); at a checkpoint every rank saves its ZeRO shard, then every rank
reports the same `ray.train.Checkpoint`.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

import ray.train
from raysys.config import Config
from raysys.data.hybrid import MONO, HybridBatcher, ParallelItems
from raysys.model.encoder import BiEncoder, EncoderSettings
from raysys.train.datasets import rows_for_rank
from raysys.train.deepspeed_config import build_deepspeed_config
from raysys.train.loss import info_nce_loss

STATE_FILE = "raysys_state.json"
DS_TAG = "ds"
EXPORT_DIR = "hf_model"
PROBE_FILE = "probe_embeddings.json"
# Embedded by the in-training engine at export, so the exported model can be checked against it.
PROBE_TEXTS = ["Where is the Eiffel Tower?", "Wo steht der Eiffelturm?", "埃菲尔铁塔在哪里？"]
VALIDATION_ALPHA = 0.5  # a fixed mix, so validation losses are comparable across swept alphas


def train_loop_per_worker(loop_config: dict) -> None:
    config = Config.from_dict(loop_config["config"])
    facts, model_path = loop_config["facts"], loop_config["model_path"]
    t = config.train
    torch.set_num_threads(t.torch_threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    local_batch = t.global_batch_size // world

    # ---- data: this worker's shard of parallel ids, batched by the shared schedule ----------
    train_items = ParallelItems(rows_for_rank(ray.train.get_dataset_shard("train"), rank, world))
    batcher = HybridBatcher(train_items, languages=facts["languages"], alpha=t.alpha, seed=config.seed,
                            local_batch_size=local_batch, rank=rank,
                            use_hard_negatives=t.use_hard_negatives and facts["has_hard_negatives"])
    steps_per_epoch = _all_reduce_min(batcher.local_steps_per_epoch())  # identical on all ranks
    total_steps = t.epochs * steps_per_epoch
    if t.max_steps is not None:
        total_steps = min(total_steps, t.max_steps)
    validation = _validation_batches(config, facts, rank, world, local_batch)

    # ---- model and DeepSpeed engine ---------------------------------------------------------
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip a ~65 s JIT build on CPU
    model = BiEncoder.from_pretrained(model_path, _encoder_settings(config))
    optimizer_steps = -(-total_steps // t.gradient_accumulation_steps)
    ds_config = build_deepspeed_config(t, total_steps=optimizer_steps, world_size=world)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()
                                                                          if p.requires_grad], config=ds_config)

    # ---- resume: same schedule position, same optimizer and LR-scheduler state -------------
    global_step, best_val = 0, float("inf")
    history: dict[str, list] = {"loss": [], "batch": []}  # per step, kept in every checkpoint
    checkpoint = ray.train.get_checkpoint() or _checkpoint_from_path(loop_config.get("resume_from"))
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state = _read_state(Path(ckpt_dir))
            engine.load_checkpoint(ckpt_dir, tag=DS_TAG)
        global_step, best_val = state["global_step"], state.get("best_val_loss", float("inf"))
        history = state.get("history", history)

    # ---- steps --------------------------------------------------------------------------------
    start_epoch = global_step // steps_per_epoch if steps_per_epoch else 0
    kinds, pairs_done, window_start = Counter(), 0, time.perf_counter()
    for epoch in range(start_epoch, t.epochs):
        if global_step >= total_steps:
            break
        for step, batch in batcher.epoch(epoch, steps_per_epoch, start_step=global_step - epoch * steps_per_epoch):
            engine.train()
            # Dropout noise as a function of (seed, step, rank): a resumed run repeats it exactly.
            torch.manual_seed(config.seed * 1_000_003 + global_step * 1_009 + rank)
            q = engine.module.tokenize(batch.queries, "query")
            p = engine.module.tokenize(batch.passages, "passage")
            q_emb = engine(q["input_ids"], q["attention_mask"])
            p_emb = engine(p["input_ids"], p["attention_mask"])
            n_emb = None
            if batch.hard_negatives is not None:
                n = engine.module.tokenize(batch.hard_negatives, "passage")
                n_emb = engine(n["input_ids"], n["attention_mask"])
            loss, accuracy = info_nce_loss(q_emb, p_emb, n_emb, temperature=t.temperature,
                                           symmetric=t.symmetric_loss)
            engine.backward(loss)
            engine.step()
            global_step += 1
            kinds[batch.plan.kind] += 1
            pairs_done += len(batch.queries) * world

            history["loss"].append(_mean_over_ranks(loss.item()))
            history["batch"].append(_digest(batch.ids, batch.query_langs, batch.passage_langs))
            metrics = {"step": global_step, "epoch": epoch, "loss": history["loss"][-1],
                       "train_accuracy": accuracy.item(), "lr": engine.get_lr()[0],
                       "mono_steps": kinds[MONO], "cross_steps": kinds["cross"]}
            last = global_step >= total_steps
            if validation and (global_step % t.eval_every == 0 or last):
                metrics.update(_validate(engine, validation, t))
                best_val = min(best_val, metrics["val_loss"])
            if global_step % t.log_every == 0 or last:
                elapsed = time.perf_counter() - window_start
                metrics["pairs_per_s"] = pairs_done / max(elapsed, 1e-9)
                pairs_done, window_start = 0, time.perf_counter()
                if rank == 0:
                    _print_progress(metrics, total_steps)
            if global_step % t.checkpoint_every == 0 or last:
                metrics.setdefault("val_loss", best_val if validation else metrics["loss"])
                _save_and_report(engine, config, metrics, global_step, best_val, history, export=last)
            elif global_step % t.log_every == 0:
                ray.train.report(metrics)
            if last:
                break


def _encoder_settings(config: Config) -> EncoderSettings:
    m = config.model
    return EncoderSettings(pooling=m.pooling, normalize=m.normalize, query_prefix=m.query_prefix,
                           passage_prefix=m.passage_prefix, max_query_length=m.max_query_length,
                           max_passage_length=m.max_passage_length)


def _validation_batches(config: Config, facts: dict, rank: int, world: int, local_batch: int) -> list:
    """Fixed validation batches (seeded; alpha 0.5 where both types fit) from this worker's shard."""
    if "validation" not in facts.get("splits", []):
        return []
    items = ParallelItems(rows_for_rank(ray.train.get_dataset_shard("validation"), rank, world))
    languages = facts["languages"]
    # Every rank must agree on the validation schedule, so feasibility is decided by all-reduce.
    mono_ok = _all_reduce_min(int(all(items.count_with(lang) >= local_batch for lang in languages)))
    cross_ok = _all_reduce_min(int(items.count_multilingual() >= local_batch))
    if not (mono_ok or cross_ok):
        return []
    alpha = VALIDATION_ALPHA if (mono_ok and cross_ok) else float(mono_ok)
    batcher = HybridBatcher(items, languages=languages, alpha=alpha, seed=config.seed + 1,
                            local_batch_size=local_batch, rank=rank, use_hard_negatives=False)
    steps = _all_reduce_min(batcher.local_steps_per_epoch())
    return [b for _, b in batcher.epoch(0, steps)]


@torch.no_grad()
def _validate(engine, batches: list, t) -> dict:
    engine.eval()
    losses, accuracies = [], []
    for batch in batches:
        q = engine.module.tokenize(batch.queries, "query")
        p = engine.module.tokenize(batch.passages, "passage")
        loss, acc = info_nce_loss(engine(q["input_ids"], q["attention_mask"]),
                                  engine(p["input_ids"], p["attention_mask"]), temperature=t.temperature)
        losses.append(loss.item())
        accuracies.append(acc.item())
    engine.train()
    return {"val_loss": _mean_over_ranks(sum(losses) / len(losses)),
            "val_accuracy": _mean_over_ranks(sum(accuracies) / len(accuracies))}


def _save_and_report(engine, config: Config, metrics: dict, global_step: int, best_val: float,
                     history: dict, export: bool) -> None:
    rank = ray.train.get_context().get_world_rank()
    with tempfile.TemporaryDirectory(prefix="raysys-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=DS_TAG)  # every rank writes its own ZeRO shard
        if rank == 0:
            state = {"global_step": global_step, "best_val_loss": best_val, "seed": config.seed,
                     "config": config.to_dict(), "metrics": metrics, "history": history}
            _write_json_atomic(Path(tmp) / STATE_FILE, state)
        if export:
            probe = _probe_embeddings(engine)  # all ranks: a ZeRO-3 forward needs every shard
            if rank == 0:
                _write_json_atomic(Path(tmp) / PROBE_FILE, {"texts": PROBE_TEXTS, "embeddings": probe})
            export_hf_model(engine, Path(tmp) / EXPORT_DIR, rank)
        dist.barrier()
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


@torch.no_grad()
def _probe_embeddings(engine) -> list[list[float]]:
    engine.eval()
    batch = engine.module.tokenize(PROBE_TEXTS, "query")
    embeddings = engine(batch["input_ids"], batch["attention_mask"]).float().cpu().tolist()
    engine.train()
    return embeddings


def export_hf_model(engine, out_dir: Path, rank: int) -> None:
    """Consolidated fp32 HF + sentence-transformers directory, also from ZeRO-3 partitions."""
    module: BiEncoder = engine.module
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.backbone.parameters()), modifier_rank=None):
            if rank == 0:
                state = {k: v.detach().float().cpu().clone() for k, v in module.backbone.state_dict().items()}
    elif rank == 0:
        state = {k: v.detach().float().cpu() for k, v in module.backbone.state_dict().items()}
    if rank == 0:
        module.save(out_dir, state_dict=state)


def _checkpoint_from_path(path: str | None) -> "ray.train.Checkpoint | None":
    """`resume_from`: a checkpoint directory, or a run directory (its newest valid checkpoint)."""
    if not path:
        return None
    return ray.train.Checkpoint.from_directory(str(latest_checkpoint_dir(Path(path))))


def latest_checkpoint_dir(path: Path) -> Path:
    from raysys.errors import RaysysError

    if (path / STATE_FILE).exists():
        return path
    candidates = []
    for child in path.glob("checkpoint_*"):
        if not child.is_dir():
            continue
        try:
            candidates.append((_read_state(child)["global_step"], child))
        except Exception:  # an incomplete checkpoint (crash mid-write) is skipped, not fatal
            continue
    if not candidates:
        raise RaysysError(f"{path}: no complete raysys checkpoint found (expected {STATE_FILE} in it or "
                          "in a checkpoint_* subdirectory)")
    return max(candidates)[1]


def _read_state(ckpt_dir: Path) -> dict:
    from raysys.errors import RaysysError

    path = ckpt_dir / STATE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RaysysError(f"{path}: checkpoint state unreadable ({exc}); the checkpoint is incomplete") from None


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _digest(*columns: list[str]) -> str:
    """A short fingerprint of this rank's batch (ids and languages), to compare runs step by step."""
    import hashlib

    return hashlib.blake2b("\x1f".join("|".join(c) for c in columns).encode(), digest_size=8).hexdigest()


def _all_reduce_min(value: int) -> int:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def _mean_over_ranks(value: float) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def _print_progress(metrics: dict, total_steps: int) -> None:
    shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
                     if k not in ("epoch",))
    print(f"[raysys train] {metrics['step']}/{total_steps} {shown}", flush=True)
