"""The LR schedule: one pure function (lr_factor) at its edges, and the LRs DeepSpeed really applies.

The DeepSpeed checks run the tiny model in a spawned process (torchrun-style env vars, world 1), so
this pytest process never joins a process group.
"""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from raysys.config import TrainConfig
from raysys.train.deepspeed_config import ScheduledLR, build_deepspeed_config, lr_at, lr_factor, warmup_steps

pytestmark = pytest.mark.timeout(600)


def factors(total, ratio, decay="linear"):
    return [lr_factor(k, total_steps=total, warmup_ratio=ratio, decay=decay) for k in range(total)]


# ---- the pure function ---------------------------------------------------------------------------

@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.5, 0.99])
def test_one_step_runs_at_the_full_lr(ratio):
    assert warmup_steps(1, ratio) == 0
    assert factors(1, ratio) == [1.0]
    assert factors(1, ratio, "constant") == [1.0]


def test_two_steps():
    assert factors(2, 0.0) == [1.0, 0.5]  # no warmup: full LR, then linear decay
    assert factors(2, 0.0, "constant") == [1.0, 1.0]
    for ratio in (0.1, 0.5, 0.99):  # any warmup: one warmup step, then the peak
        assert warmup_steps(2, ratio) == 1
        assert factors(2, ratio) == [0.5, 1.0]


def test_ratio_zero_starts_at_the_peak_and_decays_linearly():
    assert warmup_steps(60, 0.0) == 0
    assert factors(4, 0.0) == [1.0, 0.75, 0.5, 0.25]
    assert factors(4, 0.0, "constant") == [1.0] * 4
    assert lr_factor(4, total_steps=4, warmup_ratio=0.0) == 0.0  # after the last update


def test_ratio_099_warms_up_until_the_last_step():
    f = factors(100, 0.99)
    assert warmup_steps(100, 0.99) == 99
    assert f[:99] == pytest.approx([(k + 1) / 100 for k in range(99)])
    assert f[99] == 1.0
    assert factors(10, 0.99) == pytest.approx([(k + 1) / 10 for k in range(10)])  # capped at T - 1


def test_default_shape_and_float_rounding():
    assert warmup_steps(60, 0.1) == 6
    assert warmup_steps(100, 0.07) == 7  # 0.07 * 100 = 7.000000000000001 in floats
    assert warmup_steps(61, 0.1) == 7  # a partial step still warms up
    f = factors(60, 0.1)
    assert f[:7] == pytest.approx([1 / 7, 2 / 7, 3 / 7, 4 / 7, 5 / 7, 6 / 7, 1.0])
    assert f[7] == pytest.approx(53 / 54) and f[-1] == pytest.approx(1 / 54)


@pytest.mark.parametrize("total", [1, 2, 3, 7, 60])
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.5, 0.99])
@pytest.mark.parametrize("decay", ["linear", "constant"])
def test_every_update_trains_and_the_peak_is_reached(total, ratio, decay):
    f = factors(total, ratio, decay)
    warmup = warmup_steps(total, ratio)
    assert all(0 < x <= 1 for x in f)
    assert f[warmup] == 1.0 and max(f) == 1.0
    assert f[:warmup + 1] == sorted(f[:warmup + 1])  # rising
    assert f[warmup:] == sorted(f[warmup:], reverse=True)  # then falling (or flat)


@pytest.mark.parametrize("bad", [dict(warmup_ratio=1.0), dict(warmup_ratio=-0.1), dict(total_steps=0),
                                 dict(decay="cosine"), dict(step=-1)])
def test_out_of_range_arguments_raise(bad):
    kwargs = dict(step=0, total_steps=10, warmup_ratio=0.1, decay="linear") | bad
    with pytest.raises(ValueError):
        lr_factor(kwargs.pop("step"), **kwargs)


def test_lr_at_scales_the_configured_lr():
    t = TrainConfig(lr=2e-3, warmup_ratio=0.5)
    assert [lr_at(t, 4, k) for k in range(4)] == pytest.approx([2e-3 / 3, 4e-3 / 3, 2e-3, 1e-3])


def test_the_deepspeed_config_carries_no_scheduler():
    # The schedule goes in as lr_scheduler=; a config scheduler would be built instead of it.
    assert "scheduler" not in build_deepspeed_config(TrainConfig(warmup_ratio=0.0), total_steps=1, world_size=2)


def _optimizer(lr):
    return torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=lr)


def _run(optimizer, scheduler, steps):
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])  # what this update applies
        optimizer.step()
        scheduler.step()
    return lrs


def test_scheduler_follows_the_function_and_resumes_mid_warmup():
    total, ratio = 8, 0.5  # warmup 4
    full_opt = _optimizer(0.1)
    full = _run(full_opt, ScheduledLR(full_opt, total_steps=total, warmup_ratio=ratio), total)
    assert full == pytest.approx([0.1 * f for f in factors(total, ratio)])

    first_opt = _optimizer(0.1)
    first = ScheduledLR(first_opt, total_steps=total, warmup_ratio=ratio)
    _run(first_opt, first, 2)
    saved = first.state_dict()
    assert json.loads(json.dumps(saved)) == saved  # plain data: no closure to pickle

    resumed_opt = _optimizer(0.1)  # a fresh optimizer sits at step 0's LR until the state is loaded
    resumed = ScheduledLR(resumed_opt, total_steps=total, warmup_ratio=ratio)
    assert resumed_opt.param_groups[0]["lr"] == pytest.approx(0.1 * factors(total, ratio)[0])
    resumed.load_state_dict(saved)
    assert _run(resumed_opt, resumed, total - 2) == pytest.approx(full[2:])


def test_resume_with_a_longer_run_follows_the_new_schedule():
    first_opt = _optimizer(0.1)
    first = ScheduledLR(first_opt, total_steps=4, warmup_ratio=0.0)
    _run(first_opt, first, 2)
    longer_opt = _optimizer(0.1)
    longer = ScheduledLR(longer_opt, total_steps=10, warmup_ratio=0.0)
    longer.load_state_dict(first.state_dict())
    assert _run(longer_opt, longer, 8) == pytest.approx([0.1 * f for f in factors(10, 0.0)[2:]])


# ---- what DeepSpeed applies, on the tiny model -----------------------------------------------------

SCENARIOS = {
    # name: (TrainConfig overrides, total optimizer steps, optimizer step to checkpoint and resume at)
    "max-steps-1": (dict(zero_stage=0, warmup_ratio=0.1), 1, None),
    "no-warmup-linear": (dict(zero_stage=0, warmup_ratio=0.0), 4, None),
    "no-warmup-constant": (dict(zero_stage=0, warmup_ratio=0.0, lr_decay="constant"), 3, None),
    "zero0-resume-mid-warmup": (dict(zero_stage=0, warmup_ratio=0.6), 5, 1),
    "zero2-accumulation-resume-mid-warmup": (dict(zero_stage=2, warmup_ratio=0.5, gradient_accumulation_steps=2),
                                             6, 2),
}
LR = 1e-2
TEXTS = [f"sentence number {i} about topic {i % 3}" for i in range(64)]


def train_config(overrides: dict) -> TrainConfig:
    # weight_decay 0: Adam's first update is then lr * g / (|g| + eps) per weight.
    return TrainConfig(lr=LR, weight_decay=0.0, global_batch_size=4, **overrides)


def _engine(model_dir, t, total):
    import deepspeed

    from raysys.model.encoder import BiEncoder, EncoderSettings
    from raysys.train.deepspeed_config import lr_scheduler_factory

    torch.manual_seed(0)
    model = BiEncoder.from_pretrained(model_dir, EncoderSettings(max_query_length=16, max_passage_length=16))
    ds_config = build_deepspeed_config(t, total_steps=total, world_size=1)
    # The random tiny model's gradients are ~1e-7, near Adam's eps=1e-8; a negligible eps makes
    # the first update exactly lr * sign(g) per weight, so it measures the LR applied.
    ds_config["optimizer"]["params"]["eps"] = 1e-30
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config,
                                           model_parameters=[p for p in model.parameters() if p.requires_grad],
                                           lr_scheduler=lr_scheduler_factory(t, total))
    return engine


def _steps(engine, t, first, last, save_dir=None, save_at=None):
    """Optimizer steps [first, last): the LR each applied, and the first one's median |update|."""
    from raysys.train.loss import info_nce_loss

    lrs, measured = [], None
    for step in range(first, last):
        before = [p.detach().clone() for p in engine.module.parameters()]
        for micro in range(t.gradient_accumulation_steps):
            i = (step * t.gradient_accumulation_steps + micro) * 4 % len(TEXTS)
            q = engine.module.tokenize(TEXTS[i:i + 4], "query")
            p = engine.module.tokenize(TEXTS[i + 1:i + 5], "passage")
            loss, _ = info_nce_loss(engine(q["input_ids"], q["attention_mask"]),
                                    engine(p["input_ids"], p["attention_mask"]), gather=False)
            engine.backward(loss)
            if micro == t.gradient_accumulation_steps - 1:
                lrs.append(engine.get_lr()[0])
            engine.step()
        if step == first:
            deltas = torch.cat([(a.detach() - b).abs().flatten() for a, b in zip(engine.module.parameters(), before)])
            measured = deltas[deltas > 0].median().item()
        if save_at is not None and step + 1 == save_at:
            engine.save_checkpoint(save_dir, tag="ds")
    return lrs, measured


def _deepspeed_worker(_, port, model_dir, out_dir):
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip a ~65 s JIT build
    torch.set_num_threads(1)
    results = {}
    for name, (overrides, total, resume_at) in SCENARIOS.items():
        t = train_config(overrides)
        save_dir = os.path.join(out_dir, name)
        engine = _engine(model_dir, t, total)
        lrs, measured = _steps(engine, t, 0, total, save_dir, resume_at)
        results[name] = {"lrs": lrs, "first_update": measured}
        if resume_at is not None:
            resumed = _engine(model_dir, t, total)
            resumed.load_checkpoint(save_dir, tag="ds")
            results[name]["resumed_lrs"] = _steps(resumed, t, resume_at, total)[0]
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f)
    os._exit(0)  # skip gloo teardown at exit (see test_loss.py)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def deepspeed_lrs(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ds-lr")
    mp.spawn(_deepspeed_worker, args=(free_port(), str(tiny_model_dir), str(out)), nprocs=1, join=True)
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_deepspeed_applies_the_schedule(deepspeed_lrs, name):
    overrides, total, resume_at = SCENARIOS[name]
    t = train_config(overrides)
    expected = [lr_at(t, total, k) for k in range(total)]
    got = deepspeed_lrs[name]
    assert got["lrs"] == pytest.approx(expected, rel=1e-9)
    # The first update really moved the weights by that LR (Adam's first step: lr per weight).
    assert got["first_update"] == pytest.approx(expected[0], rel=1e-3)
    if resume_at is not None:
        assert got["resumed_lrs"] == pytest.approx(expected[resume_at:], rel=1e-9)
        assert resume_at < warmup_steps(total, t.warmup_ratio)  # the resume point is inside the warmup
