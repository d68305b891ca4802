"""What keeps ``gmpq sync-mlflow`` (``orchestrator.sync``) from harming a sweep folder: ``SyncError``, the refusal
while another process still writes the sweep's runs (``refuse_while_running``), and the folder's id files put back
as they were after a sync to another store than the one they name (``id_files_kept``)."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator

from gmpq_core.errors import CheckpointError, GMPQError
from gmpq_core.fileio import atomic_write_json, read_json

from .mlflow_sink import PARENT_FILE, RUNS_FILE, MLflowSink

__all__ = ["SyncError", "id_files_kept", "refuse_while_running"]

log = logging.getLogger("orchestrator.sync")        # the sync's messages, under the name they always had


class SyncError(GMPQError, RuntimeError):
    """The tracking store cannot be reached or written while syncing (nothing is lost: rerun the sync)."""


@contextlib.contextmanager
def id_files_kept(sink: MLflowSink) -> Iterator[None]:
    """Syncing to another store than the one the folder's id files name (``mlflow_parent.json``, ``mlflow_runs.json``:
    the sweep's own store, where its sweep and final stage log): those files are put back as they were afterwards.
    The sync's sinks rewrite them for the store they write to, which used to drop the other store's ids (its
    fine-tune runs' map, which a plain sync does not rebuild, so the next final stage logged their metrics again).
    Runs of the other store are found again by their tags; the sweep's own keep their recorded ids."""
    kept = {}
    for name in (PARENT_FILE, RUNS_FILE):
        path = sink.sweep_dir / name
        try:
            data = read_json(path) if path.is_file() else None
        except CheckpointError:
            continue                  # damaged: the sink says so and starts afresh, as before
        if isinstance(data, dict) and data.get("tracking_uri") and not sink._same_store(data):
            kept[path] = data
    try:
        yield
    finally:
        for path, data in kept.items():
            atomic_write_json(path, data)
        if kept:
            log.info("kept %s for %s (the store they name); the runs in %s are found by their tags",
                     ", ".join(p.name for p in kept), next(iter(kept.values()))["tracking_uri"], sink.tracking_uri)


def refuse_while_running(sweep_dir: Path) -> None:
    """SyncError when another process still runs a stage of this sweep (``driver_markers.live_driver``: driver.json
    or driver.finetune.json, one checked alive on this host named first): its MLflow
    logging writes the same runs and id files, so a sync beside it could overwrite the ids it writes meanwhile
    (another store's sync puts the folder's id files back as they were) or log a run twice."""
    from .driver_markers import FINETUNE_DRIVER_FILE, driver_text, ended_marker_text, live_driver

    marked = [d for d in (live_driver(sweep_dir), live_driver(sweep_dir, FINETUNE_DRIVER_FILE)) if d is not None]
    if not marked:                                        # (the second: a final stage beside another's sweep)
        return
    driver = next((d for d in marked if d["alive"]), marked[0])    # --while-running would override it too
    where = (f"; {ended_marker_text(sweep_dir, driver['file'])}" if driver["alive"]
             else " on another host: whether it still runs cannot be checked from here (if it has ended, sync with "
             "--while-running)")
    raise SyncError(f"'{sweep_dir}' is being written by {driver_text(driver)}. While its MLflow logging is on, it "
                    "logs the same runs and writes the same id files (mlflow_runs.json, mlflow_parent.json), and a "
                    "sync beside it could overwrite the ids it writes meanwhile or log a run twice. Sync after it "
                    f"ends ('gmpq status --sweep {sweep_dir}' shows whether it runs; nothing was synced){where}. "
                    "--while-running syncs now, safe only while that command logs nothing to MLflow: a 'gmpq "
                    "sweep' that warned 'MLflow logging disabled' (a 'gmpq run' connects again for its Pareto and "
                    "fine-tune stages).")
