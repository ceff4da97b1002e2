"""The per-worker training function, top to bottom: data -> model -> DeepSpeed -> steps -> reports.

Runs inside each Ray Train worker. Follows Ray's DeepSpeed example: `deepspeed.initialize`
(not `prepare_model`); at a checkpoint every rank saves its ZeRO shard, then every rank
reports the same `ray.train.Checkpoint` (raysys.train.checkpoint).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import Counter

import numpy as np
import torch

import ray.train
from raysys.config import Config
from raysys.data.buckets import read_rank_rows
from raysys.data.hybrid import CROSS, MONO, HybridBatcher, ParallelItems
from raysys.data.share import BucketShare
from raysys.errors import RaysysError
from raysys.model.encoder import BiEncoder, EncoderSettings
from raysys.train.checkpoint import (EXPORT_DIR, STATE_FILE, checkpoint_from_path, load_checkpoint, save_and_report,
                                     usable_checkpoint)
from raysys.train.collectives import all_reduce_max, all_reduce_min, mean_over_ranks_each
from raysys.train.deepspeed_config import build_deepspeed_config, lr_scheduler_factory
from raysys.train.metrics_logger import MetricsLogger
from raysys.train.prefetch import Prefetcher, thread_tokenizer
from raysys.train.selection import BestModel, needs_retrieval
from raysys.train.step import train_step
from raysys.train.validation import validation_batches, validation_loss, validation_retrieval

__all__ = ["train_loop_per_worker", "EXPORT_DIR", "STATE_FILE"]


def train_loop_per_worker(loop_config: dict) -> None:
    config = Config.from_dict(loop_config["config"])
    facts, model_path = loop_config["facts"], loop_config["model_path"]
    t = config.train
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if t.use_gpu else "cpu")
    torch.set_num_threads(t.torch_threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    local_batch = t.global_batch_size // world

    # ---- data: this worker's shard of parallel ids, batched by the shared schedule ----------
    corpus, manifest = loop_config["corpus"], loop_config["manifest"]  # the driver's: read only our buckets
    train_share = BucketShare(corpus, manifest, "train", rank, world, config.data.worker_buffer_rows)
    batcher = HybridBatcher(train_share, languages=facts["languages"], alpha=t.alpha, seed=config.seed,
                            local_batch_size=local_batch, rank=rank,
                            use_hard_negatives=t.use_hard_negatives and facts["has_hard_negatives"],
                            negatives_per_pair=t.hard_negatives_per_pair,
                            cross_lingual_negatives=t.cross_lingual_negatives)
    # The schedule counts micro-steps (one global batch each); an optimizer step takes
    # `gradient_accumulation_steps` of them. max_steps, checkpoints and reports count optimizer steps.
    accumulation = t.gradient_accumulation_steps
    steps_per_epoch = all_reduce_min(batcher.local_steps_per_epoch())  # micro-steps, identical on all ranks
    total_steps = t.epochs * steps_per_epoch // accumulation
    if t.max_steps is not None:
        total_steps = min(t.max_steps, total_steps)
    if total_steps < 1:
        raise RaysysError(f"train.gradient_accumulation_steps={accumulation} needs more hybrid batches than the "
                          f"{t.epochs} epoch(s) x {steps_per_epoch} this data gives: lower it or raise train.epochs")
    val_rows = (read_rank_rows(corpus, manifest, "validation", rank, world, allow_empty=True)
                if "validation" in facts["splits"] else None)
    # Validation is collective: every rank validates, or none does (an empty validation shard).
    if not all_reduce_min(int(val_rows is not None)):
        val_rows = None
    val_batches = (validation_batches(ParallelItems(val_rows), facts["languages"], config.seed, rank, local_batch)
                   if val_rows is not None else [])

    # ---- model and DeepSpeed engine ---------------------------------------------------------
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip a ~65 s JIT build on CPU
    model = BiEncoder.from_pretrained(model_path, encoder_settings(config))
    if t.freeze_embeddings:
        model.backbone.get_input_embeddings().requires_grad_(False)
    ds_config = build_deepspeed_config(t, total_steps=total_steps, world_size=world)
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config,
                                           model_parameters=[p for p in model.parameters() if p.requires_grad],
                                           lr_scheduler=lr_scheduler_factory(t, total_steps))
    # The regulariser's teacher: the initial model (model_path, also when resuming), frozen, in the
    # engine's dtype and on its device; dropout off, so it gives one target per batch.
    teacher = None
    if t.distill_weight > 0:
        teacher = BiEncoder.from_pretrained(model_path, encoder_settings(config)).eval().requires_grad_(False)
        teacher.to(engine.device, next(engine.module.parameters()).dtype)
    if world == 1 and t.zero_stage == 0:
        # One worker has nothing to all-reduce; DeepSpeed would still flatten and copy back every
        # gradient each step (ZeRO >= 1 needs that hook for its partition bookkeeping).
        engine.enable_backward_allreduce = False

    # ---- resume: same schedule position, same optimizer and LR-scheduler state -------------
    global_step = 0  # optimizer steps
    history: dict[str, list] = {"loss": [], "batch": [], "kinds": []}  # per micro-step, kept in checkpoints
    restored = ray.train.get_checkpoint()  # set when Ray Train restarts the worker group after a failure
    checkpoint = usable_checkpoint(restored) if restored else checkpoint_from_path(loop_config.get("resume_from"))
    restores = 0
    if checkpoint is not None:
        state = load_checkpoint(engine, checkpoint)
        global_step, history = state["global_step"], state["history"]
        restores = state.get("restores", 0) + 1
    kinds = Counter(history["kinds"])
    best = BestModel.from_state(state.get("best_model") if checkpoint is not None else None,
                                t.metric_for_best_model, t.early_stopping_patience)
    logger = MetricsLogger(config, rank, ctx.get_experiment_name(), loop_config.get("storage_root"))

    # ---- steps --------------------------------------------------------------------------------
    pairs_done, window_start, wait_at_window = 0, time.perf_counter(), 0.0
    pending_losses: list = []  # this rank's losses since the last report, on the device
    last = False
    micro_step = global_step * accumulation  # checkpoints are taken at optimizer-step boundaries
    # The next batches are drawn and tokenized in a thread while this one trains (raysys.train.prefetch).
    prefetcher = Prefetcher(scheduled_batches(batcher, steps_per_epoch, t.epochs, micro_step),
                            thread_tokenizer(engine.module), t.mini_batch_size, pin_memory=t.use_gpu)
    with prefetcher:
        for ready in prefetcher:
            epoch, batch = ready.epoch, ready.batch
            if last or global_step >= total_steps:
                break
            lr = engine.get_lr()[0]  # what this batch's update applies (the scheduler moves at a boundary)
            # Dropout noise as a function of (seed, step, rank): a resumed run repeats it exactly.
            loss, accuracy = train_step(engine, batch, t, seed=config.seed * 1_000_003 + micro_step * 1_009 + rank,
                                        tokens=ready.tokens, teacher=teacher)
            micro_step += 1
            pairs_done += len(batch.queries) * world
            kinds[batch.plan.kind] += 1
            pending_losses.append(loss)  # a device tensor: the host waits for the GPU only when reporting
            history["batch"].append(batch_digest(batch))
            history["kinds"].append(batch.plan.kind)
            if micro_step % accumulation:
                continue
            global_step += 1
            last = global_step >= total_steps
            validating = global_step % t.eval_every == 0 or global_step % t.checkpoint_every == 0 or last
            logging = global_step % t.log_every == 0 or last
            if not (logging or validating):
                continue
            history["loss"] += mean_over_ranks_each(pending_losses)  # per micro-step; one collective
            pending_losses = []
            metrics = {"step": global_step, "epoch": epoch, "loss": float(np.mean(history["loss"][-accumulation:])),
                       "train_accuracy": accuracy.item(), "lr": lr,
                       "mono_steps": kinds[MONO], "cross_steps": kinds[CROSS],
                       "total_steps": total_steps}  # for the driver's progress display
            improved = False
            # Checkpoints are ranked by a validation metric of their own step, so validate there too.
            if validating:
                if val_batches:
                    metrics.update(validation_loss(engine, val_batches, t.temperature))
                if needs_retrieval(t) and val_rows is not None:
                    metrics.update(validation_retrieval(engine, val_rows))
                if t.metric_for_best_model in metrics:
                    # The metrics are rank-averaged, so every rank decides alike; the collective makes sure.
                    improved = bool(all_reduce_max(int(best.update(metrics[t.metric_for_best_model], global_step))))
                    if all_reduce_max(int(best.should_stop)) and not last:
                        last = True
                        metrics["early_stopped"] = True
                        print(f"[raysys] early stopping at step {global_step}: {t.metric_for_best_model} has not "
                              f"improved for {best.evaluations_since_best} evaluations (best "
                              f"{best.best:.4f} at step {best.best_step})", flush=True)
                metrics["best_step"] = best.best_step if best.best_step is not None else global_step
            checkpointing = global_step % t.checkpoint_every == 0 or last or (t.export_best_model and improved)
            if logging:
                window = max(time.perf_counter() - window_start, 1e-9)
                metrics["pairs_per_s"] = pairs_done / window
                # Share of the window the step waited for its batch: ~0 when the prefetch keeps up.
                metrics["data_wait_fraction"] = (prefetcher.wait_s - wait_at_window) / window
                pairs_done, window_start, wait_at_window = 0, time.perf_counter(), prefetcher.wait_s
            logger.log(metrics, total_steps)
            if checkpointing:
                metrics.setdefault("val_loss", metrics["loss"])  # no validation split: rank by training loss
                state = {"global_step": global_step, "world_size": world, "val_loss": metrics["val_loss"],
                         "seed": config.seed, "finished": last, "best_model": best.to_state(),
                         "config": config.to_dict(), "metrics": metrics, "history": history, "restores": restores}
                logger.sync()
                save_and_report(engine, state, metrics, export=last or (t.export_best_model and improved))
            elif logging:
                ray.train.report(metrics)
    logger.close()


def scheduled_batches(batcher: HybridBatcher, steps_per_epoch: int, epochs: int, micro_step: int):
    """(epoch, batch) from schedule position `micro_step` (a resumed run's) to the last epoch's end."""
    first_epoch = micro_step // max(steps_per_epoch, 1)
    for epoch in range(first_epoch, epochs):
        start = micro_step - epoch * steps_per_epoch if epoch == first_epoch else 0
        for _, batch in batcher.epoch(epoch, steps_per_epoch, start_step=start):
            yield epoch, batch


def encoder_settings(config: Config) -> EncoderSettings:
    m = config.model
    return EncoderSettings(pooling=m.pooling, normalize=m.normalize, query_prefix=m.query_prefix,
                           passage_prefix=m.passage_prefix, max_query_length=m.max_query_length,
                           max_passage_length=m.max_passage_length)


def batch_digest(batch) -> str:
    """A short fingerprint of this rank's batch (ids and languages), to compare runs step by step."""
    text = "\x1f".join("|".join(c) for c in (batch.ids, batch.query_langs, batch.passage_langs))
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
