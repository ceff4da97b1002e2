"""Gradient caching under DeepSpeed: the cached step's update equals the plain step's on the same
global batch (1 and 2 gloo workers, ZeRO 0/2/3, hard negatives, accumulation, clipping), dropout
is replayed, length groups change no update, and the export takes DeepSpeed's fp32 master weights."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.fixtures.processes import free_port

# Lengths from 3 to 14 words: length groups have different widths.
TEXTS = ["the cat sat", "ein Hund lief", "le train part durant la nuit vers la mer et la ville", "el sol brilla",
         "il mare blu", "o livro velho", "de boom groeit langzaam naast het oude huis", "ett hus stod",
         "a red door in a long grey wall at the end of the narrow old street", "eine alte Uhr",
         "un petit pont", "una casa fría"]


def hybrid_batch(rank: int, world: int, global_batch: int, step: int, kind: str = "mono", negatives: int = 1):
    """This rank's share of a deterministic global batch with `negatives` hard negatives per pair."""
    from raysys.data.hybrid import PairBatch, StepPlan

    local = global_batch // world
    ids = [(step * global_batch + rank * local + i) % len(TEXTS) for i in range(local)]
    return PairBatch(queries=[f"q {TEXTS[i]}" for i in ids], passages=[TEXTS[i] for i in ids],
                     hard_negatives=[TEXTS[(i + 5 + j) % len(TEXTS)] for i in ids for j in range(negatives)],
                     ids=[str(i) for i in ids], query_langs=["en"] * local, passage_langs=["en"] * local,
                     plan=StepPlan(kind, "en" if kind == "mono" else None))


def engine_for(model_dir: str, train, world: int, dropout: bool):
    import deepspeed

    from raysys.model.encoder import BiEncoder
    from raysys.train.deepspeed_config import build_deepspeed_config

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    model = BiEncoder.from_pretrained(model_dir)
    if not dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    config = build_deepspeed_config(train, total_steps=10, world_size=world)
    del config["optimizer"]  # plain SGD (lr 1): the update is minus the (clipped) gradient itself
    config["zero_allow_untested_optimizer"] = True
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def full_parameters(engine) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)
        out[name] = (full if full is not None else param).detach().float().cpu().clone()
    return out


def _worker(rank, world, port, model_dir, overrides, out_dir):
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from raysys.config import TrainConfig
    from raysys.train.step import train_step

    dropout = overrides.pop("dropout", False)
    kind, teacher_dir = overrides.pop("kind", "mono"), overrides.pop("teacher_dir", None)
    negatives = overrides.pop("negatives", 1)
    teacher = None
    if teacher_dir:
        from raysys.model.encoder import BiEncoder

        teacher = BiEncoder.from_pretrained(teacher_dir).eval().requires_grad_(False)
    # Two arms on the same batches: the reference (one forward per batch) and the compared one
    # (gradient caching in mini-batches, and/or `compared` settings such as length groups).
    mini, compared = overrides.pop("mini_batch_size"), overrides.pop("compared", {})
    updates = {}
    for arm, settings in (("reference", {"mini_batch_size": None}), ("compared", {"mini_batch_size": mini, **compared})):
        train = TrainConfig(**overrides, **settings, num_workers=world)
        engine = engine_for(model_dir, train, world, dropout)
        before = full_parameters(engine)
        losses = []
        for step in range(train.gradient_accumulation_steps):  # one optimizer update
            batch = hybrid_batch(rank, world, train.global_batch_size, step, kind, negatives)
            loss, _ = train_step(engine, batch, train, seed=1234 + step * 1009 + rank, teacher=teacher)
            losses.append(float(loss))
        after = full_parameters(engine)
        updates[arm] = {name: (after[name] - before[name]).flatten().tolist() for name in before}
        updates[arm + "_losses"] = losses
    if rank == 0:
        with open(os.path.join(out_dir, "updates.json"), "w") as f:
            json.dump(updates, f)
    dist.barrier()
    dist.destroy_process_group()


def run_both_arms(tiny_model_dir, tmp_path, world: int, **overrides) -> dict:
    mp.spawn(_worker, args=(world, free_port(), str(tiny_model_dir), overrides, str(tmp_path)), nprocs=world, join=True)
    return json.loads((tmp_path / "updates.json").read_text())


def assert_same_update(updates: dict, rtol: float = 1e-5) -> None:
    reference = torch.cat([torch.tensor(v) for v in updates["reference"].values()])
    compared = torch.cat([torch.tensor(v) for v in updates["compared"].values()])
    assert reference.norm() > 0
    relative = ((compared - reference).norm() / reference.norm()).item()
    assert relative <= rtol, f"the compared update differs from the reference one by {relative:.2e} (relative)"
    assert updates["compared_losses"] == pytest.approx(updates["reference_losses"], rel=1e-6)


@pytest.mark.parametrize("world,zero_stage,clipping,negatives", [(1, 0, 0.0, 1), (2, 2, 0.05, 1), (2, 3, 0.0, 3)])
def test_cached_update_equals_the_plain_one(tiny_model_dir, tmp_path, world, zero_stage, clipping, negatives):
    # Local batch 6 in mini-batches of 4: uneven (4 + 2); two batches accumulated. Clipping at 0.05
    # is active (it would hide a wrongly scaled gradient, hence not in every case). Three negatives
    # per pair: each mini-batch must take its own pairs' negatives and their cached gradients; they
    # repeat other pairs' passages, so the duplicate mask is on there.
    updates = run_both_arms(tiny_model_dir, tmp_path, world, global_batch_size=6 * world, mini_batch_size=4,
                            zero_stage=zero_stage, gradient_accumulation_steps=2, gradient_clipping=clipping,
                            precision="fp32", negatives=negatives, mask_duplicate_positives=negatives > 1)
    assert_same_update(updates)


def test_dropout_is_replayed_in_the_graph_pass(tiny_model_dir, tmp_path):
    """With dropout on and one mini-batch, the cached step draws the plain step's masks: if the
    graph pass drew other masks than the embedding pass, its gradient would not match."""
    updates = run_both_arms(tiny_model_dir, tmp_path, 1, global_batch_size=6, mini_batch_size=6, dropout=True,
                            zero_stage=0, gradient_clipping=0.0, precision="fp32")
    assert_same_update(updates)


def test_distillation_toward_a_teacher_in_both_steps_and_on_monolingual_batches_only(tiny_model_dir, tmp_path):
    """With a teacher (another tiny model) the cached update still equals the plain one, and the
    term changes it on a monolingual batch; on a cross-lingual batch the teacher is not used."""
    from tests.tiny_model import build_tiny_model

    teacher = str(build_tiny_model(tmp_path / "teacher", seed=1))
    # One worker keeps it short: the cross-worker gather of the term is checked in test_loss.py.
    common = dict(global_batch_size=6, mini_batch_size=4, zero_stage=0, gradient_clipping=0.0, precision="fp32")
    runs = {}
    for name, extra in (("mono", dict(kind="mono", teacher_dir=teacher, distill_weight=2.0)),
                        ("mono_without", dict(kind="mono")),
                        ("cross", dict(kind="cross", teacher_dir=teacher, distill_weight=2.0)),
                        ("cross_without", dict(kind="cross"))):
        (tmp_path / name).mkdir()
        runs[name] = run_both_arms(tiny_model_dir, tmp_path / name, 1, **common, **extra)
    assert_same_update(runs["mono"])
    flat = {name: torch.cat([torch.tensor(v) for v in run["reference"].values()]) for name, run in runs.items()}
    assert (flat["mono"] - flat["mono_without"]).norm() > 1e-3 * flat["mono_without"].norm()
    assert torch.equal(flat["cross"], flat["cross_without"])


@pytest.mark.parametrize("world,zero_stage,mini_batch_size", [(1, 0, None), (2, 3, 4)])
def test_length_groups_give_the_update_of_one_forward(tiny_model_dir, tmp_path, world, zero_stage, mini_batch_size):
    """Candidates forwarded in 3 length groups (each padded to its own longest, put back in order)
    give one forward's loss and update: plain step on 1 worker, and cached mini-batches of 4 pairs
    with 2 negatives each under ZeRO-3 on 2 workers (groups planned per mini-batch)."""
    updates = run_both_arms(tiny_model_dir, tmp_path, world, global_batch_size=6 * world,
                            mini_batch_size=mini_batch_size, compared={"length_groups": 3}, zero_stage=zero_stage,
                            gradient_clipping=0.0, precision="fp32", negatives=2)
    assert_same_update(updates)


def test_length_groups_plan_sorts_rows_and_trims_padding_on_either_side():
    from raysys.train.step import LengthGroups

    lengths = [5, 2, 7, 3, 1]
    right = torch.tensor([[1] * n + [0] * (7 - n) for n in lengths])
    plan = LengthGroups.plan(right, 2)
    assert [r.tolist() for r in plan.rows] == [[4, 1, 3], [0, 2]] and plan.columns == [(0, 3), (0, 7)]
    order = torch.cat(plan.rows)
    assert torch.equal(order[plan.inverse], torch.arange(5))
    left = right.flip(1)
    assert LengthGroups.plan(left, 2).columns == [(4, 7), (0, 7)]
    assert LengthGroups.plan(right, 1) is None and LengthGroups.plan(right[:1], 4) is None
    assert len(LengthGroups.plan(right, 9).rows) == 5  # never more groups than rows


def test_embeddings_in_length_groups_equal_one_forward(tiny_model_dir):
    from raysys.model.encoder import BiEncoder
    from raysys.train.step import LengthGroups, embed_tokens

    model = BiEncoder.from_pretrained(str(tiny_model_dir)).eval()
    tokens = model.tokenize(TEXTS, "passage")
    plan = LengthGroups.plan(tokens["attention_mask"], 4)
    assert len({stop - start for start, stop in plan.columns}) > 1  # the groups really are narrower
    with torch.no_grad():
        torch.testing.assert_close(embed_tokens(model, tokens, plan), embed_tokens(model, tokens), rtol=1e-5, atol=1e-6)


def _export_worker(rank, world, port, model_dir, out_dir):
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=0, world_size=1)
    import deepspeed

    from raysys.config import TrainConfig
    from raysys.model.encoder import BiEncoder
    from raysys.train.export import master_weights_state_dict
    from raysys.train.deepspeed_config import build_deepspeed_config
    from raysys.train.step import train_step

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    train = TrainConfig(global_batch_size=6, num_workers=1, zero_stage=2, precision="bf16", lr=1e-3)
    model = BiEncoder.from_pretrained(model_dir)
    engine, *_ = deepspeed.initialize(model=model, config=build_deepspeed_config(train, total_steps=10, world_size=1),
                                      model_parameters=list(model.parameters()))
    for step in range(2):
        train_step(engine, hybrid_batch(0, 1, 6, step), train, seed=step)
    exported = master_weights_state_dict(engine, 0)
    # DeepSpeed's own fp32 master copy: ZeRO-2's flat fp32 partition (whole, on one rank), in its group order.
    names = {id(p): "backbone." + n for n, p in engine.module.backbone.named_parameters()}
    order = [names[id(p)].removeprefix("backbone.") for p in engine.optimizer.bit16_groups[0]]
    flat = torch.cat([exported[name].flatten() for name in order])
    master = engine.optimizer.single_partition_of_fp32_groups[0].detach().float()
    working = dict(engine.module.backbone.named_parameters())
    result = {"equal_to_master": torch.equal(flat, master[:flat.numel()]),
              "working_dtype": str(working[order[0]].dtype),
              "differs_from_working_copy": any(not torch.equal(exported[n], working[n].detach().float()) for n in order)}
    with open(os.path.join(out_dir, "export.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def test_export_takes_the_fp32_master_weights_under_bf16(tiny_model_dir, tmp_path):
    mp.spawn(_export_worker, args=(1, free_port(), str(tiny_model_dir), str(tmp_path)), nprocs=1, join=True)
    result = json.loads((tmp_path / "export.json").read_text())
    assert result == {"equal_to_master": True, "working_dtype": "torch.bfloat16", "differs_from_working_copy": True}
