"""``SweepProgress``: the sweep's one stderr line per trial event (start, search epoch, done, pruned, failed, a failed
attempt retried), numbered as Tune numbers the trials, with the time since the trials started."""
from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from search_spaces.space import bucket_label

from .results import error_text
from .trainable import trial_number
from .trial_status import TrialStatusBook

__all__ = ["SweepProgress", "error_where"]


class SweepProgress(Callback):
    """One short stderr line per trial event (start, search epoch, done, pruned, failed)."""

    def __init__(self, n_trials: int, status_book: TrialStatusBook, edges: tuple,
                 sweep_dir: str | Path | None = None) -> None:
        self.n_trials, self.book, self.edges = n_trials, status_book, tuple(edges)
        self.sweep_dir = sweep_dir
        self.t0 = time.time()
        self.index: dict[str, int] = {}

    def _number(self, trial: Any) -> int:
        """Tune's creation number (from the trial folder's name), so a resumed sweep's trial keeps its number;
        the next number after the highest given where the name has none."""
        if trial.trial_id not in self.index:
            try:
                path = trial.path
            except Exception:  # noqa: BLE001 (a trial without storage yet: no folder name to read)
                path = None
            self.index[trial.trial_id] = trial_number(path, trial.trial_id) or max(self.index.values(), default=0) + 1
        return self.index[trial.trial_id]

    def _say(self, trial: Any, text: str) -> None:
        el = int(time.time() - self.t0)
        i = self._number(trial)
        print(f"[{el // 60:3d}m{el % 60:02d}s] trial {i}/{self.n_trials} {trial.trial_id}: {text}",
              file=sys.stderr, flush=True)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        c = trial.config
        extra = f", proxy {c['proxy_size']}" if "proxy_size" in c else ""
        self._say(trial, f"start (budget {c.get('budget_avg_bits', float('nan')):.2f} bits{extra})")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if result.get("phase") == "search":
            of = f"/{result['search_epochs']}" if result.get("search_epochs") else ""     # (the trial's epoch count)
            self._say(trial, f"search epoch {result.get('epoch')}{of}: proxy_top1 {result.get('proxy_top1', 0):.1f}%, "
                             f"{result.get('expected_gbitops', 0):.3f} expected GBitOPs, bucket "
                             f"{bucket_label(result.get('budget_bucket', 0), self.edges)}")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        r = trial.last_result or {}
        if self.book.is_pruned(trial.trial_id):
            self._say(trial, self.book.reason(trial.trial_id) or "pruned")
        else:
            self._say(trial, f"done: transfer_top1 {r.get('transfer_top1', float('nan')):.2f}%, "
                             f"{r.get('gbitops', float('nan')):.4f} GBitOPs (search {r.get('search_seconds', 0):.0f}s, "
                             f"transfer {r.get('transfer_seconds', 0):.0f}s)")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._say(trial, f"FAILED: {error_text(trial)[:300]} ({error_where(trial.error_file, self.sweep_dir)})")

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        self._say(trial, f"attempt failed: {error_text(trial)[:300]}; retrying (max_failures)")


_SESSION_DIR = re.compile(r"session_(\d{4}-\d\d-\d\d_|latest$)")    # Ray's session_<date>_<time>_<pid> folders


def error_where(error_file: str | None, sweep_dir: str | Path | None) -> str:
    """Where a failed trial's full error is: Tune's ``error.txt`` under the Ray session's temp dir is removed with it
    (``gmpq cluster down`` deletes the cluster's temp dir), so the text the sweep keeps (trials.parquet, ``gmpq
    status``) is named too."""
    if not error_file:
        return "see the trial folder"
    if sweep_dir is None or not any(_SESSION_DIR.match(part) for part in Path(error_file).parts):
        return error_file
    return f"{error_file}, a Ray temp file; the error is also kept in trials.parquet: gmpq status --sweep {sweep_dir}"
