"""Progress display for the CLI: a tqdm bar per epoch and one summary line per epoch on stderr.

Core loops call ``progress(done_batches, total_batches)`` per batch and ``reporter.report(epoch,
metrics)`` per epoch (``gmpq_core.reporting.Reporter``); this module turns those into output.
The bar is drawn only when stderr is a terminal (and TQDM_DISABLE is unset); the per-epoch line is
always printed, so logs of non-interactive runs still show how training went.
"""
from __future__ import annotations

import os
import sys
from typing import IO, Mapping

from gmpq_core.reporting import NullReporter, Reporter

__all__ = ["BarProgress", "make_progress", "ProgressReporter", "format_metrics"]


def _is_tty(stream: IO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or a non-file object
        return False


class BarProgress:
    """``progress(done, total)`` callable drawing one tqdm bar per pass (a new bar when ``done`` restarts).

    ``enabled=None`` draws only when ``stream`` is a terminal. Call ``close()`` when finished.
    """

    def __init__(self, desc: str = "", *, stream: IO | None = None, enabled: bool | None = None,
                 unit: str = "batch") -> None:
        self.desc = desc
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = _is_tty(self.stream) and not os.environ.get("TQDM_DISABLE") if enabled is None else enabled
        self.unit = unit
        self.passes = 0
        self._bar = None
        self._last = 0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
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

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._last = 0


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
