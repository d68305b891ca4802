"""Progress display for the CLI: a tqdm bar per epoch and one summary line per epoch on stderr.

Core loops call ``progress(done_batches, total_batches)`` per batch and ``reporter.report(epoch,
metrics)`` per epoch (``gmpq_core.reporting.Reporter``); this module turns those into output.
The bar is drawn only when stderr is a terminal (and TQDM_DISABLE is unset); elsewhere (a log file, a
pipe, a batch job) a pass that runs longer than ``$GMPQ_PROGRESS_SECONDS`` (default 30; 0 switches them
off) gets a plain line at that interval: batches done, elapsed, an estimate of what is left. The per-epoch
line is always printed, so logs of non-interactive runs still show how training went.
"""
from __future__ import annotations

import os
import sys
import time
from typing import IO, Callable, Mapping

from gmpq_core.reporting import NullReporter, Reporter

__all__ = ["BarProgress", "make_progress", "ProgressReporter", "format_metrics", "log_interval"]

PROGRESS_SECONDS_ENV = "GMPQ_PROGRESS_SECONDS"


def _is_tty(stream: IO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or a non-file object
        return False


def log_interval() -> float:
    """Seconds between plain progress lines off a terminal: ``$GMPQ_PROGRESS_SECONDS`` (default 30, 0 = none);
    a value that is not a number is passed over (progress is cosmetic: it never stops a run)."""
    raw = os.environ.get(PROGRESS_SECONDS_ENV, "").strip()
    try:
        return max(float(raw), 0.0) if raw else 30.0
    except ValueError:
        return 30.0


class BarProgress:
    """``progress(done, total)`` callable drawing one tqdm bar per pass (a new bar when ``done`` restarts).

    ``enabled=None`` draws only when ``stream`` is a terminal; otherwise (``enabled=None`` on another stream)
    a pass longer than ``every`` seconds (default ``log_interval()``) prints a plain line at that interval.
    Call ``close()`` when finished.
    """

    def __init__(self, desc: str = "", *, stream: IO | None = None, enabled: bool | None = None,
                 unit: str = "batch", every: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.desc = desc
        self.stream = stream if stream is not None else sys.stderr
        tty = _is_tty(self.stream)
        self.enabled = tty and not os.environ.get("TQDM_DISABLE") if enabled is None else enabled
        self.every = (log_interval() if every is None else every) if enabled is None and not tty else 0.0
        self.unit = unit
        self.passes = 0
        self._bar = None
        self._last = 0
        self._clock = clock
        self._pass_start: float | None = None
        self._next_line = 0.0
        self._first = 0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            if self.every > 0:
                self._log_line(done, total)
            return
        if self._bar is None or done <= self._last or total != self._bar.total:
            self.close()
            from tqdm.auto import tqdm  # imported on first draw only (keeps CLI start-up light)
            self.passes += 1
            self._bar = tqdm(total=total, desc=f"{self.desc} {self.passes}".strip(), unit=self.unit,
                             file=self.stream, leave=False, dynamic_ncols=True)
            self._last = 0
        self._bar.update(done - self._last)
        self._last = done
        if done >= total:
            self.close()

    def _log_line(self, done: int, total: int) -> None:
        now = self._clock()
        if done <= self._last or self._pass_start is None:      # a new pass: its clock starts at its first batch
            self.passes += 1
            self._pass_start, self._next_line, self._first = now, now + self.every, done
        self._last = done
        if now < self._next_line or done >= total:
            return
        self._next_line = now + self.every
        spent = now - self._pass_start
        left = spent * (total - done) / max(done - self._first, 1)
        print(f"[{self.desc or 'progress'}] {self.unit} {done}/{total} ({100 * done / max(total, 1):.0f} %), "
              f"{spent:.0f} s elapsed, ~{left:.0f} s left", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._last = 0
        self._pass_start = None


def make_progress(desc: str = "", *, enabled: bool | None = None) -> BarProgress:
    """A per-batch progress callable for the core loops (a bar on a terminal, silent otherwise)."""
    return BarProgress(desc, enabled=enabled)


def format_metrics(metrics: Mapping[str, float]) -> str:
    """``top1 91.23  top5 99.80  loss 0.2512 ...``: percentages with 2 decimals, the rest with 4 digits; ``seconds``
    (the time since the loop started, not the epoch's) as ``elapsed 12.3 s``; a ``train_X`` equal to its ``X`` (no
    held-out images: the figures are the training ones) once."""
    parts = []
    for k, v in metrics.items():
        if k == "epoch" or (k.startswith("train_") and metrics.get(k.removeprefix("train_")) == v):
            continue
        if k == "seconds" and isinstance(v, (int, float)):
            parts.append(f"elapsed {v:.1f} s")
        elif isinstance(v, float):
            parts.append(f"{k} {v:.2f}" if "top" in k else f"{k} {v:.4g}")
        else:
            parts.append(f"{k} {v}")
    return "  ".join(parts)


class ProgressReporter:
    """Reporter printing ``[desc] epoch e/E: top1 ...`` to stderr per epoch; forwards to ``inner``.

    ``should_stop`` defers to ``inner`` (never stops by itself), so it can wrap a Ray or Optuna
    reporter without changing its decisions.
    """

    def __init__(self, desc: str, *, total_epochs: int | None = None, stream: IO | None = None,
                 inner: Reporter | None = None) -> None:
        self.desc = desc
        self.total_epochs = total_epochs
        self.stream = stream
        self.inner = inner or NullReporter()

    def report(self, step: int, metrics: Mapping[str, float]) -> None:
        of = f"/{self.total_epochs}" if self.total_epochs else ""
        stream = self.stream if self.stream is not None else sys.stderr
        print(f"[{self.desc}] epoch {step}{of}: {format_metrics(metrics)}", file=stream, flush=True)
        self.inner.report(step, metrics)

    def should_stop(self) -> bool:
        return self.inner.should_stop()
