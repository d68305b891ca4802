"""Which trials the sweep's pruner stopped (driver side), so results say "pruned", not "completed".

Ray Tune reports a trial stopped by a scheduler exactly like one that finished (``on_trial_complete``).
The pruning scheduler calls ``mark_pruned``; the results and MLflow callbacks ask ``status_of``.
With a ``path`` the marks persist (atomic JSON) and are reloaded on construction and on unpickling,
so a resumed sweep (Tune restores its scheduler and callbacks by unpickling) keeps them.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from gmpq_core.errors import CheckpointError
from gmpq_core.fileio import atomic_write_json, read_json

__all__ = ["TrialStatusBook", "COMPLETED", "PRUNED", "FAILED", "UNFINISHED"]

log = logging.getLogger(__name__)

COMPLETED, PRUNED, FAILED = "completed", "pruned", "failed"
UNFINISHED = "stopped"   # a summary's trial stopped midway, as gmpq status says; never a row of trials.parquet


class TrialStatusBook:
    """Driver-side record ``trial_id -> pruning reason`` (thread-safe; optional JSON persistence)."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._pruned: dict[str, str] = {}
        self._load()

    def _load(self) -> None:
        if self.path is None or not self.path.is_file():
            return
        try:
            data = read_json(self.path)
        except CheckpointError as e:   # a damaged book loses only the pruned marks: warn, keep going
            log.warning("%s; starting an empty trial status book", e)
            return
        self._pruned.update({str(k): str(v) for k, v in dict(data.get("pruned", {})).items()})

    def _save(self) -> None:
        if self.path is not None:
            atomic_write_json(self.path, {"version": 1, "pruned": dict(self._pruned)})

    def mark_pruned(self, trial_id: str, reason: str) -> None:
        """Record that ``trial_id`` was stopped by the pruner (``reason`` is a short human sentence)."""
        with self._lock:
            self._pruned[str(trial_id)] = str(reason)
            self._save()

    def is_pruned(self, trial_id: str) -> bool:
        return str(trial_id) in self._pruned

    def reason(self, trial_id: str) -> str | None:
        return self._pruned.get(str(trial_id))

    def status_of(self, trial_id: str, errored: bool = False) -> str:
        """"failed" if ``errored``, else "pruned" if the pruner stopped it, else "completed"."""
        if errored:
            return FAILED
        return PRUNED if self.is_pruned(trial_id) else COMPLETED

    def pruned_ids(self) -> list[str]:
        return sorted(self._pruned)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "pruned": dict(self._pruned)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = state["path"]
        self._lock = threading.Lock()
        self._pruned = dict(state["pruned"])
        self._load()
