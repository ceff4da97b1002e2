"""Checkpoints: every rank saves its ZeRO shard, rank 0 the schedule state, then all report.

A checkpoint directory holds DeepSpeed's files (tag `ds`), `raysys_state.json` (the step
schedule's position, best validation loss, per-step history) and, for the final one, the
exported HF model (`hf_model/`) plus probe embeddings from the in-training engine. Every rank
adds a manifest of the files it wrote (`manifest-rank<r>.json`: relative path -> bytes). A
checkpoint whose state is unreadable, or whose files do not match the manifests (a shard
missing or truncated), is incomplete: resuming skips it for the newest complete one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

import ray.train
from raysys.errors import RaysysError

STATE_FILE = "raysys_state.json"
DS_TAG = "ds"
EXPORT_DIR = "hf_model"
PROBE_FILE = "probe_embeddings.json"
MANIFEST_GLOB = "manifest-rank*.json"
# Embedded by the in-training engine at export, so the exported model can be checked against it.
PROBE_TEXTS = ["Where is the Eiffel Tower?", "Wo steht der Eiffelturm?", "埃菲尔铁塔在哪里？"]


def save_and_report(engine, state: dict, metrics: dict, export: bool) -> None:
    """Collective: every rank must call it at the same step."""
    rank = ray.train.get_context().get_world_rank()
    with tempfile.TemporaryDirectory(prefix="raysys-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=DS_TAG)  # every rank writes its own ZeRO shard
        if rank == 0:
            write_json_atomic(Path(tmp) / STATE_FILE, state)
        if export:
            probe = probe_embeddings(engine)  # all ranks: a ZeRO-3 forward needs every shard
            if rank == 0:
                write_json_atomic(Path(tmp) / PROBE_FILE, {"texts": PROBE_TEXTS, "embeddings": probe})
            export_hf_model(engine, Path(tmp) / EXPORT_DIR, rank)
        write_manifest(Path(tmp), rank)
        dist.barrier()
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def write_manifest(ckpt_dir: Path, rank: int) -> None:
    files = {str(f.relative_to(ckpt_dir)): f.stat().st_size for f in sorted(ckpt_dir.rglob("*"))
             if f.is_file() and not f.match(MANIFEST_GLOB)}
    write_json_atomic(ckpt_dir / f"manifest-rank{rank}.json", files)


def verify_checkpoint(ckpt_dir: Path) -> dict:
    """The state, once every rank's manifest is there and every listed file has its size."""
    state = read_state(ckpt_dir)
    manifests = sorted(Path(ckpt_dir).glob(MANIFEST_GLOB))
    expected = state.get("world_size", len(manifests))
    hint = "resume from the run directory to use the newest complete checkpoint"
    if len(manifests) < expected:
        raise RaysysError(f"{ckpt_dir}: {len(manifests)} of {expected} rank manifests; the checkpoint is "
                          f"incomplete ({hint})")
    for manifest in manifests:
        try:
            files = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RaysysError(f"{manifest}: unreadable ({exc}); the checkpoint is incomplete ({hint})") from None
        for name, size in files.items():
            path = Path(ckpt_dir) / name
            actual = path.stat().st_size if path.is_file() else None
            if actual != size:
                found = "missing" if actual is None else f"{actual} bytes, {size} written"
                raise RaysysError(f"{path}: {found}; the checkpoint is corrupted ({hint})")
    return state


def usable_checkpoint(checkpoint: ray.train.Checkpoint) -> ray.train.Checkpoint:
    """Ray Train's latest checkpoint after a worker failure, or the newest complete one before
    it in the same run directory when that one is corrupted."""
    path = Path(checkpoint.path)
    if not path.is_dir():  # remote storage: verified while loading
        return checkpoint
    try:
        verify_checkpoint(path)
        return checkpoint
    except RaysysError as exc:
        fallback = latest_checkpoint_dir(path.parent)
        print(f"[raysys] {exc}; restoring {fallback} instead", flush=True)
        return ray.train.Checkpoint.from_directory(str(fallback))


def load_checkpoint(engine, checkpoint: ray.train.Checkpoint) -> dict:
    with checkpoint.as_directory() as ckpt_dir:
        state = verify_checkpoint(Path(ckpt_dir))
        load_path, _ = engine.load_checkpoint(ckpt_dir, tag=DS_TAG)
        if load_path is None:
            raise RaysysError(f"{ckpt_dir}: DeepSpeed found no '{DS_TAG}' checkpoint; the checkpoint is incomplete")
    return state


@torch.no_grad()
def probe_embeddings(engine) -> list[list[float]]:
    engine.eval()
    batch = engine.module.tokenize(PROBE_TEXTS, "query", engine.device)
    embeddings = engine(batch["input_ids"], batch["attention_mask"]).float().cpu().tolist()
    engine.train()
    return embeddings


def export_hf_model(engine, out_dir: Path, rank: int) -> None:
    """Consolidated fp32 HF + sentence-transformers directory, also from ZeRO-3 partitions."""
    module = engine.module
    state = None
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.backbone.parameters()), modifier_rank=None):
            if rank == 0:
                state = {k: v.detach().float().cpu().clone() for k, v in module.backbone.state_dict().items()}
    elif rank == 0:
        state = {k: v.detach().float().cpu() for k, v in module.backbone.state_dict().items()}
    if rank == 0:
        module.save(out_dir, state_dict=state)


def checkpoint_from_path(path: str | None) -> ray.train.Checkpoint | None:
    """`resume_from`: a checkpoint directory, or a run directory (its newest complete checkpoint)."""
    if not path:
        return None
    return ray.train.Checkpoint.from_directory(str(latest_checkpoint_dir(Path(path))))


def latest_checkpoint_dir(path: Path) -> Path:
    if not path.exists():
        raise RaysysError(f"{path}: resume_from does not exist")
    if (path / STATE_FILE).exists():
        verify_checkpoint(path)  # a clear error if it is truncated or a shard is missing
        return path
    candidates = []
    for child in path.glob("checkpoint_*"):
        if not child.is_dir():
            continue
        try:
            candidates.append((verify_checkpoint(child)["global_step"], child))
        except RaysysError:  # an incomplete checkpoint (crash mid-write) is skipped, not fatal
            continue
    if not candidates:
        raise RaysysError(f"{path}: no complete raysys checkpoint found (expected {STATE_FILE} in it or "
                          "in a checkpoint_* subdirectory)")
    return max(candidates)[1]


def read_state(ckpt_dir: Path) -> dict:
    path = Path(ckpt_dir) / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        int(state["global_step"])
        return state
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RaysysError(f"{path}: checkpoint state unreadable ({exc}); the checkpoint is incomplete "
                          "(resume from the run directory to use the newest complete one)") from None


def write_json_atomic(path: Path, obj) -> None:
    """Temp file, fsync, rename: a crash leaves the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
