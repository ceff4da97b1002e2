"""Checkpoints: every rank saves its ZeRO shard, rank 0 the schedule state, then all report.

A checkpoint directory holds DeepSpeed's files (tag `ds`), `raysys_state.json` (the step
schedule's position, best validation loss, per-step history) and, for the final one, the
exported HF model (`hf_model/`) plus probe embeddings from the in-training engine. Every rank
adds a manifest of the files it wrote (`manifest-rank<r>.json`: relative path -> bytes). A
checkpoint whose state is unreadable, or whose files do not match the manifests (a shard
missing or truncated), is incomplete: resuming skips it for the newest complete one.
"""

from __future__ import annotations

import os
import tempfile
from fnmatch import fnmatch
from pathlib import Path

import torch
import torch.distributed as dist

import ray.train
from raysys import storage
from raysys.errors import RaysysError
from raysys.train.export import export_hf_model

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


def verify_checkpoint(ckpt_dir: str | os.PathLike) -> dict:
    """The state, once every rank's manifest is there and every listed file has its size.
    `ckpt_dir` is a local path or a storage URI (s3://...)."""
    ckpt_dir = str(ckpt_dir)
    state = read_state(ckpt_dir)
    present = storage.list_files(ckpt_dir)
    manifests = sorted(name for name in present if "/" not in name and fnmatch(name, MANIFEST_GLOB))
    expected = state.get("world_size", len(manifests))
    hint = "resume from the run directory to use the newest complete checkpoint"
    if len(manifests) < expected:
        raise RaysysError(f"{ckpt_dir}: {len(manifests)} of {expected} rank manifests; the checkpoint is "
                          f"incomplete ({hint})")
    for manifest in manifests:
        try:
            files = storage.read_json(storage.join(ckpt_dir, manifest))
        except (OSError, ValueError) as exc:
            raise RaysysError(f"{storage.join(ckpt_dir, manifest)}: unreadable ({exc}); the checkpoint is "
                              f"incomplete ({hint})") from None
        for name, size in files.items():
            actual = present.get(name)
            if actual != size:
                found = "missing" if actual is None else f"{actual} bytes, {size} written"
                raise RaysysError(f"{storage.join(ckpt_dir, name)}: {found}; the checkpoint is corrupted ({hint})")
    return state


def checkpoint_uri(checkpoint: ray.train.Checkpoint) -> str:
    """Ray Train hands back paths without their scheme (bucket/run/checkpoint_x): the full URI."""
    return storage.to_uri(checkpoint.filesystem, checkpoint.path)


def usable_checkpoint(checkpoint: ray.train.Checkpoint) -> ray.train.Checkpoint:
    """Ray Train's latest checkpoint after a worker failure, or the newest complete one before
    it in the same run directory when that one is corrupted (local or remote storage)."""
    uri = checkpoint_uri(checkpoint)
    try:
        verify_checkpoint(uri)
        return checkpoint
    except RaysysError as exc:
        fallback = latest_checkpoint_dir(uri.rstrip("/").rsplit("/", 1)[0])
        print(f"[raysys] {exc}; restoring {fallback} instead", flush=True)
        return checkpoint_at(fallback)


def checkpoint_at(uri: str) -> ray.train.Checkpoint:
    filesystem, path = storage.resolve(uri)
    return ray.train.Checkpoint(path, filesystem=filesystem)


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


def checkpoint_from_path(path: str | None) -> ray.train.Checkpoint | None:
    """`resume_from`: a checkpoint directory, or a run directory (its newest complete checkpoint),
    as a local path or a storage URI."""
    if not path:
        return None
    return checkpoint_at(latest_checkpoint_dir(str(path)))


def latest_checkpoint_dir(path: str | os.PathLike) -> str:
    path = str(path)
    if not storage.exists(path):
        raise RaysysError(f"{path}: resume_from does not exist")
    if storage.is_file(storage.join(path, STATE_FILE)):
        verify_checkpoint(path)  # a clear error if it is truncated or a shard is missing
        return path
    candidates = complete_checkpoints(path)
    if not candidates:
        raise RaysysError(f"{path}: no complete raysys checkpoint found (expected {STATE_FILE} in it or "
                          "in a checkpoint_* subdirectory)")
    return max(candidates)[1]


def complete_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(global step, URI) of every complete checkpoint_* directory of a run directory; an incomplete
    one (a crash mid-write, an upload still running) is skipped, not fatal."""
    found = []
    for child in storage.list_dirs(run_dir):
        if child.startswith("checkpoint_"):
            uri = storage.join(run_dir, child)
            try:
                found.append((verify_checkpoint(uri)["global_step"], uri))
            except RaysysError:
                continue
    return found


def read_state(ckpt_dir: str | os.PathLike) -> dict:
    path = storage.join(ckpt_dir, STATE_FILE)
    try:
        state = storage.read_json(path)
        int(state["global_step"])
        return state
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RaysysError(f"{path}: checkpoint state unreadable ({exc}); the checkpoint is incomplete "
                          "(resume from the run directory to use the newest complete one)") from None


def write_json_atomic(path: Path, obj) -> None:
    """Temp file, fsync, rename (raysys.storage): a crash leaves the old file or the new one."""
    storage.write_json(path, obj)
