"""The driver's progress display: plain lines (rate, ETA) off a terminal, one per training report."""

from __future__ import annotations

import io
import json

import pytest

from raysys.config import Config
from raysys.progress import Progress, format_duration, progress_mode


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_respect_the_interval_and_end_with_a_total():
    clock, out = Clock(), io.StringIO()
    p = Progress("encode queries", 100, "texts", mode="plain", interval_s=30, out=out, clock=clock)
    clock.now += 10
    p.advance(20)  # first update: a line at once (20 texts in 10 s: 2/s, 40 s to go)
    clock.now += 10
    p.advance(20)  # within 30 s of the last line: nothing
    clock.now += 25
    p.advance(20)  # 35 s after the last line
    clock.now += 5
    p.advance(40)
    p.close()  # the final position was not shown yet: a closing line with the total time
    lines = out.getvalue().splitlines()
    assert lines == ["[encode queries] 20/100 texts (20%), 2 texts/s, ETA 40 s",
                     "[encode queries] 60/100 texts (60%), 1.33 texts/s, ETA 30 s",
                     "[encode queries] 100/100 texts (100%), 2 texts/s, in 50 s"]
    p.advance(5)  # closed: silent
    assert out.getvalue().splitlines() == lines


def test_no_closing_line_repeats_the_last_one():
    out = io.StringIO()
    p = Progress("encode candidates", 10, "texts", mode="plain", out=out)
    p.advance(10)
    p.close()
    assert len(out.getvalue().splitlines()) == 1


def test_set_counts_rate_from_the_first_report_and_survives_a_restart():
    clock, out = Clock(), io.StringIO()
    p = Progress("train", None, "steps", mode="plain", interval_s=0, out=out, clock=clock)
    clock.now += 300  # start-up (workers, model, DeepSpeed) is not part of the rate
    p.set(5, total=60, loss=2.5)
    clock.now += 50
    p.set(10, loss=2.0)
    clock.now += 10
    p.set(4, loss=2.6)  # Ray Train restarted the workers from the step-4 checkpoint
    clock.now += 20
    p.set(8)
    lines = out.getvalue().splitlines()
    assert lines[0] == "[train] 5/60 steps (8%), loss 2.5"
    assert lines[1] == "[train] 10/60 steps (17%), 0.1 steps/s, loss 2, ETA 8 min 20 s"
    assert lines[2] == "[train] 4/60 steps (7%), loss 2.6"
    assert lines[3] == "[train] 8/60 steps (13%), 0.2 steps/s, loss 2.6, ETA 4 min 20 s"


def test_bar_mode_draws_a_tqdm_bar_with_the_fields():
    out = io.StringIO()
    p = Progress("train", 10, "steps", mode="bar", out=out)
    p.set(3, loss=1.5, mono=2)
    p.close()
    text = out.getvalue()
    assert "train" in text and "3/10" in text and "loss 1.5" in text and "mono 2" in text


def test_mode_follows_the_terminal_unless_set(monkeypatch):
    monkeypatch.delenv("RAYSYS_PROGRESS", raising=False)
    assert progress_mode() == "plain"  # pytest captures stdout: not a terminal
    monkeypatch.setenv("RAYSYS_PROGRESS", "bar")
    assert progress_mode() == "bar"
    assert format_duration(104) == "1 min 44 s" and format_duration(7500) == "2 h 05 min"


def test_each_report_shows_once_with_steps_loss_rate_and_batch_kinds(tmp_path):
    from raysys.train.progress import ReportRelay, TrainProgress

    out = io.StringIO()
    config = Config.from_yaml(None, ["train.max_steps=6"])
    with TrainProgress(config, mode="plain", out=out, poll_s=0.05) as progress:
        relay = progress.callbacks[0]
        assert isinstance(relay, ReportRelay)
        for step in (2, 4, 6):
            rank0 = {"step": step, "total_steps": 6, "loss": 1.0 / step, "pairs_per_s": 5.4321, "lr": 1e-5,
                     "mono_steps": step // 2, "cross_steps": step - step // 2, "epoch": 0}
            rank1 = {**rank0, "loss": 777.0}
            relay.after_report(None, [rank0, rank1], checkpoint=None)  # as the Ray Train controller calls it
    lines = out.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == ["[train] 2/6 steps (33%)", "[train] 4/6 steps (67%)",
                                                      "[train] 6/6 steps (100%)"]
    assert "loss 0.25" in lines[1] and "pairs/s 5.43" in lines[1] and "mono 2  cross 2" in lines[1]
    assert "loss 777" not in out.getvalue()  # rank 0's metrics only (not a bare number: a rate may contain it)


def test_a_half_written_record_waits_for_the_next_poll(tmp_path):
    from raysys.train.progress import TrainProgress

    out = io.StringIO()
    progress = TrainProgress(Config(), mode="plain", out=out)
    record = json.dumps({"step": 1, "total_steps": 2, "loss": 0.5})
    with open(progress.path, "a") as f:
        f.write(record[:10])
    assert progress.poll() == 0
    with open(progress.path, "a") as f:
        f.write(record[10:] + "\n")
    assert progress.poll() == 1 and out.getvalue().startswith("[train] 1/2 steps")


def test_workers_print_no_progress(capsys, tmp_path):
    from raysys.train.metrics_logger import MetricsLogger

    logger = MetricsLogger(Config.from_yaml(None, [f"output_dir={tmp_path}"]), rank=0, run_name="r")
    logger.log({"step": 5, "epoch": 0, "loss": 1.0, "pairs_per_s": 3.0, "total_steps": 10}, 10)
    logger.close()
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("metrics", [[], [{"loss": 1.0}]])
def test_the_relay_ignores_reports_without_a_step(tmp_path, metrics):
    from raysys.train.progress import ReportRelay

    path = tmp_path / "r.jsonl"
    ReportRelay(str(path), None).after_report(None, metrics, None)
    assert not path.exists()
