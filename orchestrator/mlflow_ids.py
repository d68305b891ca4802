"""The MLflow sink's persisted run ids and its store's identity: reading and writing ``mlflow_parent.json`` and
``mlflow_runs.json``, and telling whether the store an id file names is the sink's own, also after the sweep
folder was moved or copied (``moved_sweep``). A mix-in of ``orchestrator.mlflow_sink.MLflowSink``, which sets
the attributes it reads.
"""
from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Any, Mapping

from gmpq_core.errors import CheckpointError
from gmpq_core.fileio import atomic_write_json, read_json

from .mlflow_keys import PARENT_FILE, RUNS_FILE
from .moved_sweep import artifacts_written_in, moved_path, rebase_mlflow_artifacts, same_folder, sqlite_file

__all__ = ["SinkIdFiles"]

log = logging.getLogger("orchestrator.mlflow_sink")     # the sink's messages, under the name they always had


class SinkIdFiles:
    """Persisted ids and store identity of ``MLflowSink`` (whose ``__init__``/``open_store`` set these attributes)."""

    sweep_dir: Path
    tracking_uri: str
    experiment_name: str
    runs: dict[str, dict[str, str]]
    _written_for: Path | None
    _store_moved_from: Path | None
    _experiment_id: str

    def _written_in(self, data: Mapping[str, Any]) -> Path | None:
        """The sweep folder an id file was written in (None: unknown, or this one)."""
        old = (Path(data["sweep_dir"]) if isinstance(data.get("sweep_dir"), str)
               else self._store_moved_from or self._written_for)
        return old if old is not None and not same_folder(old, self.sweep_dir.resolve()) else None

    def _same_store(self, data: Mapping[str, Any]) -> bool:
        """Whether the store an id file names is this sink's, also after the sweep folder moved."""
        uri, old = data.get("tracking_uri"), self._written_in(data)
        if old is not None:
            uri = moved_path(uri, old, self.sweep_dir.resolve())
        if uri == self.tracking_uri:
            return True
        mine, theirs = sqlite_file(self.tracking_uri), sqlite_file(uri)   # sqlite:///runs/a/... == sqlite:////abs/runs/a/...
        return mine is not None and mine == theirs

    def _own_store(self) -> bool:
        """Whether the tracking store is a SQLite file inside the sweep folder (a copy of the folder copies it)."""
        db = sqlite_file(self.tracking_uri)
        return db is not None and db.is_relative_to(self.sweep_dir.resolve())

    def _follow_move(self) -> None:
        """The sweep's own SQLite store, in a folder moved or copied: artifact locations follow the folder."""
        db, here = sqlite_file(self.tracking_uri), self.sweep_dir.resolve()
        if not self._own_store() or not db.is_file():
            return                      # a store outside the sweep folder is not the sweep's to rewrite
        try:
            old = artifacts_written_in(db, self.experiment_name)
            if old is not None and not same_folder(old, here):
                rebase_mlflow_artifacts(db, old, here)
                self._store_moved_from = old
        except sqlite3.Error as e:
            log.warning("could not point the artifact locations in %s at %s (%s): artifacts logged now go "
                        "where the store says", db, here / "mlartifacts", e)

    def _artifact_location(self) -> str | None:
        """Where a new experiment keeps its artifacts: in the sweep folder when the SQLite store is the sweep's own;
        beside a SQLite store outside it (shared by the sweeps of one ``--name``, which share its experiment: in
        the first sweep's folder, deleting that folder would take every later sweep's artifacts with it); a
        server decides for itself (None), as MLflow's default location would be the working directory."""
        db = sqlite_file(self.tracking_uri)
        if db is None:
            return None
        return ((self.sweep_dir.resolve() if self._own_store() else db.parent) / "mlartifacts").as_uri()

    def _load_ids(self) -> None:
        path = self.sweep_dir / RUNS_FILE
        if path.exists():
            try:
                data = read_json(path)
            except CheckpointError as e:   # damaged: new child runs rather than no MLflow at all
                log.warning("%s Starting new child runs.", e)
                return
            if self._same_store(data):
                self.runs = {"trials": dict(data.get("trials", {})), "finetune": dict(data.get("finetune", {}))}
                if self._written_in(data) is not None:       # moved or copied: the file names this folder now
                    self._save_ids()
            else:
                log.info("%s was written for tracking URI %s; finding the runs on %s by their tags (creating "
                         "only those it lacks)", path, data.get("tracking_uri"), self.tracking_uri)

    def _save_ids(self) -> None:
        atomic_write_json(self.sweep_dir / RUNS_FILE, {"tracking_uri": self.tracking_uri,
                                                       "sweep_dir": str(self.sweep_dir.resolve()), **self.runs})

    def _save_parent(self, run_id: str) -> None:
        atomic_write_json(self.sweep_dir / PARENT_FILE, {
            "tracking_uri": self.tracking_uri, "sweep_dir": str(self.sweep_dir.resolve()),
            "experiment_id": self._experiment_id,
            "experiment_name": self.experiment_name, "run_id": run_id})
