"""Driver-side progress: a live bar on a terminal, plain lines anywhere else.

A bar (tqdm, with rate and ETA) when stdout and stderr are both terminals; otherwise (CI, `ray job
submit` logs, `| tee`) one plain line per interval and a final one, because carriage-return
redraws turn into a wall of partial lines in a log file. RAYSYS_PROGRESS=bar|plain|off overrides.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import Callable, TextIO

MODES = ("bar", "plain", "off")


def progress_mode() -> str:
    mode = os.environ.get("RAYSYS_PROGRESS", "").strip().lower()
    if mode in MODES:
        return mode
    # A pseudo-terminal that reports no size (some CI runners) gets empty bars from tqdm: plain lines.
    sized = shutil.get_terminal_size((0, 0)).columns > 0
    return "bar" if sys.stdout.isatty() and sys.stderr.isatty() and sized else "plain"


def format_duration(seconds: float) -> str:
    """7 s, 1 min 44 s, 2 h 05 min."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def format_fields(fields: dict) -> str:
    return "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items()
                     if v is not None)


class Progress:
    """One phase's progress towards `total` units.

    `advance(n)` counts units done (encoding; rate from creation), `set(done)` jumps to a position
    (training reports carry their step number; rate and ETA from the first report, so the workers'
    start-up does not skew them). Plain mode prints at most one line per `interval_s` (0: every
    update) and, from `close()`, a final line unless the last one already showed the end.
    """

    def __init__(self, desc: str, total: int | None, unit: str, *, mode: str | None = None,
                 interval_s: float = 30.0, out: TextIO | None = None, clock: Callable[[], float] = time.monotonic,
                 started: float | None = None):
        self.desc, self.total, self.unit = desc, total, unit
        self.mode = mode or progress_mode()
        self.interval_s, self.clock = interval_s, clock
        self.out = out
        self.done, self.fields = 0, {}
        self.started = clock() if started is None else started  # for "in <duration>" at the end
        self._origin: tuple[float, int] | None = None  # (time, done) of the first position seen
        self._last_line, self._printed_at, self._printed_done = None, None, None
        self._bar = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=out or sys.stderr, dynamic_ncols=True,
                             leave=True, smoothing=0.1)

    # ---- updates ------------------------------------------------------------------------------
    def advance(self, n: int = 1, **fields) -> None:
        if self._origin is None:
            self._origin = (self.started, self.done)
        self._move(self.done + n, fields)

    def set(self, done: int, total: int | None = None, **fields) -> None:
        if total is not None and total != self.total:
            self.total = total
            if self._bar is not None:
                self._bar.total = total
        if self._origin is None or done < self.done:  # first report, or a restart from a checkpoint
            self._origin, self.done = (self.clock(), done), done
            if self._bar is not None:  # tqdm's rate and ETA count from here too
                self._bar.reset(total=self.total)
                self._bar.initial = self._bar.n = self._bar.last_print_n = done
        self._move(done, fields)

    def _move(self, done: int, fields: dict) -> None:
        step, self.done = done - self.done, done
        self.fields.update(fields)
        if self._bar is not None:
            if fields:
                self._bar.set_postfix_str(format_fields(self.fields), refresh=False)
            if step:
                self._bar.update(step)
            else:
                self._bar.refresh()
        elif self.mode == "plain":
            now = self.clock()
            if self._printed_at is None or now - self._printed_at >= self.interval_s:
                self._print(self.line())
                self._printed_at = now

    def refresh(self) -> None:
        """Redraw the bar (its elapsed time), e.g. while waiting for the next training report."""
        if self._bar is not None:
            self._bar.refresh()

    def close(self, **fields) -> None:
        self.fields.update(fields)
        if self._bar is not None:
            if fields:
                self._bar.set_postfix_str(format_fields(self.fields), refresh=False)
            self._bar.close()
            self._bar = None
        elif self.mode == "plain" and (self._printed_done != self.done or self._last_line is None):
            self._print(self.line(final=True))  # not when the last line already showed this position
        self.mode = "off"  # closed: later updates print nothing

    # ---- plain lines ------------------------------------------------------------------------------
    def rate(self) -> float | None:
        """Units per second since the first position seen (None before any progress)."""
        if self._origin is None:
            return None
        elapsed, progressed = self.clock() - self._origin[0], self.done - self._origin[1]
        return progressed / elapsed if elapsed > 0 and progressed > 0 else None

    def eta(self) -> float | None:
        rate = self.rate()
        if rate is None or self.total is None:
            return None
        return max(0, self.total - self.done) / rate

    def line(self, final: bool = False) -> str:
        count = f"{self.done}/{self.total}" if self.total else str(self.done)
        percent = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        parts = [f"[{self.desc}] {count} {self.unit}{percent}"]
        rate = self.rate()
        if rate is not None:
            parts.append(f"{rate:.3g} {self.unit}/s")
        if self.fields:
            parts.append(format_fields(self.fields))
        if final or (self.total and self.done >= self.total):
            parts.append(f"in {format_duration(self.clock() - self.started)}")
        else:
            eta = self.eta()
            if eta is not None:
                parts.append(f"ETA {format_duration(eta)}")
        return ", ".join(parts)

    def _print(self, line: str) -> None:
        self._last_line, self._printed_done = line, self.done
        print(line, file=self.out or sys.stdout, flush=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
