"""The Ray Tune callback (driver side) that keeps a sweep's ``trials.parquet`` and ``layers.parquet``
up to date as trials end (``ResultsCallback``). The tables and their schema are ``orchestrator.results``."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from .results import (LAYERS_FILE, TRIALS_FILE, error_text, has_ended, layer_rows, read_table, resolve_status,
                      trial_row, utc_now_iso, write_results)

__all__ = ["ResultsCallback"]

log = logging.getLogger("orchestrator.results")


class ResultsCallback(Callback):
    """Ray Tune callback (driver side) keeping trials.parquet and layers.parquet up to date.

    ``status_book`` is the sweep's ``TrialStatusBook`` (``status_of(trial_id, errored) -> str``);
    without one, a trial is "failed" if it errored, "completed" if it reported ``transfer_top1``,
    else "pruned".
    """

    def __init__(self, sweep_dir: str | Path, status_book: Any = None) -> None:
        self.sweep_dir = Path(sweep_dir)
        self.status_book = status_book
        self._load()

    def _load(self) -> None:
        """(Re)load the rows already on disk: a damaged file raises CheckpointError before Ray runs."""
        self._rows: dict[str, dict[str, Any]] = {}
        self._layers: dict[str, list[dict[str, Any]]] = {}
        self._started: dict[str, tuple[str, float]] = {}
        self._starts: dict[str, int] = {}
        self._attempts_before: dict[str, int] = {}     # attempts of each trial in earlier driver runs
        if (self.sweep_dir / TRIALS_FILE).exists():
            for r in read_table(self.sweep_dir / TRIALS_FILE).to_pylist():
                self._rows[str(r["trial_id"])] = r
        if (self.sweep_dir / LAYERS_FILE).exists():
            for r in read_table(self.sweep_dir / LAYERS_FILE).to_pylist():
                self._layers.setdefault(str(r["trial_id"]), []).append(r)
        self._attempts_before = {k: int(r.get("attempt") or 0) for k, r in self._rows.items()}
        if self._rows:
            log.info("results: resuming with %d trial rows from %s", len(self._rows), self.sweep_dir)

    def __getstate__(self) -> dict[str, Any]:
        # Tuner pickles its callbacks (tuner.pkl) and Tuner.restore unpickles them: the rows are
        # reloaded from disk in setup(), the Parquet files being the source of truth.
        return {"sweep_dir": self.sweep_dir, "status_book": self.status_book}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._rows, self._layers, self._started, self._starts = {}, {}, {}, {}
        self._attempts_before = {}

    def setup(self, **info: Any) -> None:
        self._load()
        self._backfilled = False

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if not getattr(self, "_backfilled", True):
            self._backfilled = True
            self.backfill(trials)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.backfill(trials)

    def backfill(self, trials: list) -> list[str]:
        """Write the rows of finished trials the table lacks; returns their ids.

        After a driver crash the Tune state may know a finished trial whose row never reached the
        table (or the table was deleted because it was damaged): the row is rebuilt from the
        trial's last result, so a resumed sweep loses no finished trial. A trial stopped unfinished
        (the sweep interrupted) gets no row: ``--resume`` runs it again.
        """
        missing = [t for t in trials if str(t.trial_id) not in self._rows and t.last_result
                   and (t.status == "ERROR" or (t.status == "TERMINATED"
                                                and has_ended(str(t.trial_id), t.last_result, self.status_book)))]
        for t in missing:
            log.warning("results: trial %s finished before the restart but had no row; writing it now", t.trial_id)
            self.record(t, errored=t.status == "ERROR")
        return [str(t.trial_id) for t in missing]

    @property
    def rows(self) -> list[dict[str, Any]]:
        return [self._rows[k] for k in sorted(self._rows)]

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        tid = str(trial.trial_id)
        self._started[tid] = (utc_now_iso(), time.monotonic())
        self._starts[tid] = self._starts.get(tid, 0) + 1

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.record(trial, errored=False)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.record(trial, errored=True)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """A failed attempt Tune will retry: its row says "failed" with the error until the retry ends."""
        self.record(trial, errored=True)

    def record(self, trial: Any, *, errored: bool) -> dict[str, Any]:
        """Build the trial's row (replacing any earlier row of the same trial) and rewrite both files."""
        tid = str(trial.trial_id)
        last = dict(trial.last_result or {})
        prior = self._rows.get(tid)
        if last.get("replayed") and prior is not None and not errored:
            return prior                   # a finished trial Tune reran after a driver crash: row unchanged
        started, t0 = self._started.get(tid, (prior.get("started_at") if prior else None, None))
        attempt = max(1, self._attempts_before.get(tid, 0) + self._starts.get(tid, 0))
        row = trial_row(trial_id=tid, config=dict(trial.config or {}), last_result=last,
                        status=resolve_status(self.status_book, tid, errored, last),
                        error=error_text(trial) if errored else None,
                        started_at=started, wall_seconds=(time.monotonic() - t0) if t0 is not None else None,
                        attempt=attempt)
        self._rows[tid] = row
        self._layers[tid] = layer_rows(tid, row.get("layers_json"))
        self.flush()
        return row

    def flush(self) -> None:
        write_results(self.sweep_dir, self._rows.values(), [r for v in self._layers.values() for r in v])
