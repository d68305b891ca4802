"""The cores a local CPU sweep's tail leaves idle go to the trials still running.

Once the sweep's last trial has started, a slot whose trial ends (an early-pruned one, say) has
nothing left to run: in the 2-core demo one core idled for 26-32 s at the end of a 2.3-minute sweep. ``TailThreads``
(a driver-side Tune callback, local CPU sweeps only) then writes ``<sweep>/trial_threads.json``
``{"threads": k}``, k = the sweep's cores (its slots' share of the machine) // trials still running
(never below one trial's share), and rewrites it on every later start or end. Each trial's per-batch
hook (``ThreadsFollower``, passed as the search's and the transfer check's ``progress``) reads the
file and calls ``torch.set_num_threads(k)`` in the training thread. No file: the trial keeps its own
share.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

from ray.tune import Callback

from gmpq_core.fileio import atomic_write_json

__all__ = ["THREADS_FILE", "TailThreads", "ThreadsFollower", "tail_threads"]

log = logging.getLogger(__name__)

THREADS_FILE = "trial_threads.json"


def tail_threads(cores: int, share: float, running: int) -> int:
    """Torch threads per running trial once nothing is left to start."""
    return max(1, int(share), cores // max(running, 1))


class TailThreads(Callback):
    """Writes the per-trial thread count once every trial of the sweep has started (see the module doc)."""

    def __init__(self, sweep_dir: str | Path, n_trials: int, cores: int, share: float) -> None:
        self.path = Path(sweep_dir) / THREADS_FILE
        self.n_trials, self.cores, self.share = int(n_trials), int(cores), float(share)
        self._written: int | None = None

    def setup(self, **info: Any) -> None:
        self._written = None
        self.path.unlink(missing_ok=True)          # a resumed sweep starts from each trial's own share

    def _update(self, trials: list, *, starting: Any = None, ended: Any = None) -> None:
        # Tune calls on_trial_start before it marks the trial RUNNING, and on_trial_complete before it
        # marks it TERMINATED: the trial in hand is counted (or not) explicitly.
        if len(trials) < self.n_trials or any(t.status == "PENDING" and t is not starting for t in trials):
            return                                 # trials are still to start: every slot stays busy
        running = sum((t.status == "RUNNING" or t is starting) and t is not ended for t in trials)
        k = tail_threads(self.cores, self.share, running)
        if k != self._written and running:
            try:
                atomic_write_json(self.path, {"threads": k, "running": running})
                self._written = k
            except OSError as e:                   # only a speed-up: the trials keep their own share
                log.debug("cannot write %s: %s", self.path, e)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update(trials, starting=trial)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update(trials, ended=trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update(trials, ended=trial)


class ThreadsFollower:
    """``progress(done, total)`` hook for a trial's training loops: applies ``trial_threads.json`` (read at
    every batch while it exists: a few microseconds, and no update is missed). Must run in the training
    thread (OpenMP's thread count belongs to the calling thread)."""

    def __init__(self, sweep_dir: str | Path, on_change: Callable[[int], None] | None = None) -> None:
        self.path = Path(sweep_dir) / THREADS_FILE
        self.on_change = on_change

    def __call__(self, done: int = 0, total: int = 0) -> None:
        try:
            threads = int(json.loads(self.path.read_text())["threads"])
        except (OSError, ValueError, KeyError, TypeError):
            return                                  # no file (not the tail yet), or unreadable: try next batch
        import torch

        if threads >= 1 and threads != torch.get_num_threads():
            torch.set_num_threads(threads)
            if self.on_change is not None:
                self.on_change(threads)
