"""Upload to MLflow what a sweep folder holds but the tracking store lacks (``gmpq sync-mlflow``).

Parquet is the sweep's source of truth; MLflow is a view that can miss runs when the tracking server was down at the
start or went down mid-sweep (the sink warns once and stops logging). ``sync_mlflow(sweep_dir)`` makes it whole:

- the parent run (reused through ``mlflow_parent.json`` or its ``gmpq.sweep_dir`` tag, else created; one deleted:
  restored with the runs deleted with it, or, once ``mlflow gc`` removed it, a new one with the runs left under the
  old one moved under it, ``mlflow_parent``, as every command that logs the sweep does);
- one child run per row of ``trials.parquet`` (reused through ``mlflow_runs.json`` or its ``trial_id``
  tag, else created) with the trial's params (a created one: its numbers also as ``param_<name>`` metrics), the
  per-epoch points it lacks, per metric and step, read back from the Ray Tune trial folder's ``result.json``
  (``sync_epochs``: a run made by a resumed sweep after the first was deleted holds only the later epochs), the final
  metrics, ``policy.json``, the ``status`` and ``error`` tags and the run status FINISHED / KILLED (pruned) / FAILED;
- the Pareto and final fine-tune tables on the parent run when the folder has them and the run lacks them (the Pareto
  table, its plots and ``pareto_size`` / ``n_selected`` also when the run's pareto.parquet is another one), and on
  the trial runs the ``pareto`` tag (and ``selection_reason``), and a fine-tuned policy's ``finetune_run_id`` tag and
  ``final_top1``, on its fine-tune run the ``trial_run_id`` tag, and the runs' descriptions, where they lack them (a
  sweep whose tables an earlier version logged). A fine-tune run an earlier version logged keeps its ``top1`` /
  ``top5`` / ``loss`` / ``world_size`` series (today's: ``final_top1`` ... ``workers``);
- a fine-tune run of a final.parquet row that the store lost (deleted in the UI, by ``mlflow gc``, or in a store
  replaced) while the parent still has the table: made again from the row, linked to its trial run both ways
  (``_Syncer.finetune_runs``); the runs still there, also those the id file lost, are not logged into again;
- on a fine-tune run that lacks its per-epoch series (created here from its final.parquet row), the epochs its Ray
  Train checkpoint holds, as the live stage logs them (``finetune_history``; no checkpoint left: the final row only).
- a fine-tune kept aside (``models/kept/``: a policy's earlier recipe) whose run the store lacks (MLflow down when it
  ran, or deleted): made as the live stage made it, tagged ``gmpq.kept``, the trial run still pointing to the current
  recipe's (``sync_kept``).

A run that already holds everything is left alone, so a second sync changes nothing (idempotent). Syncing to another
store (``--tracking-uri``) leaves the folder's id files naming the sweep's own store (``sync_guards.id_files_kept``).
Run it after the sweep, or while the sweep's own MLflow logging is disabled (one writer at a time): while a
``gmpq sweep`` / ``run`` / ``finetune --sweep`` of the folder still runs, it refuses unless told ``while_running``. A
sweep folder with no results yet (no row in ``trials.parquet``, or no such file: no trial has finished) has nothing
to sync: the store is checked (when it exists) and no run is created.
"""
from __future__ import annotations

import logging
import math
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

from mlflow.exceptions import MlflowException
from requests.exceptions import RequestException

from .mlflow_keys import config_metrics, legacy_layout, trial_run_name
from .mlflow_parent import LostParent
from .mlflow_notes import final_metrics
from .mlflow_sink import DISABLED, FINAL_METRICS, RUN_STATUS, MLflowSink, default_tracking_uri
from .finetune_history import SeriesFill, complete_final_row, fill_finetune_series, finetune_run
from .mlflow_stages import backfill_trial_tags, log_final, log_pareto
from .moved_sweep import sqlite_file
from .results import CONFIG_FILE, FINAL_FILE, PARETO_FILE, load_resolved_config, read_table, read_trials
from .sync_epochs import missing_epochs, trial_histories
from .sync_kept import sync_kept
from .sync_guards import SyncError, id_files_kept, refuse_while_running
from .sync_report import SyncReport

__all__ = ["SyncError", "SyncReport", "sync_mlflow", "trial_histories", "child_runs_by_trial", "parent_step"]

log = logging.getLogger(__name__)

PARAM_PREFIX = "param_"


def _present(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def child_runs_by_trial(sink: MLflowSink, role: str = "trial") -> dict[str, list[str]]:
    """``trial_id -> [run ids]`` of the parent's child runs with ``gmpq.role`` = ``role``."""
    runs = sink.client.search_runs(
        [sink._experiment_id], max_results=50000,
        filter_string=f"tags.`mlflow.parentRunId` = '{sink.parent_run_id}' and tags.`gmpq.role` = '{role}'")
    out: dict[str, list[str]] = {}
    for r in runs:
        out.setdefault(r.data.tags.get("trial_id", ""), []).append(r.info.run_id)
    return out


def _final_keys(row: Mapping[str, Any], legacy: bool = False) -> list[str]:
    """The MLflow keys of ``FINAL_METRICS`` for a trials.parquet row (``mlflow_notes.final_metrics``; ``legacy``: in a
    run an earlier version logged, ``mlflow_keys.legacy_layout``)."""
    return list(final_metrics(row, row["status"], legacy=legacy))


class _Syncer:
    def __init__(self, sink: MLflowSink, cfg: Mapping[str, Any], sweep_dir: Path, moved: int = 0) -> None:
        self.sink, self.cfg, self.sweep_dir, self.moved = sink, cfg, sweep_dir, moved    # (runs re-attached)
        self._histories: dict[str, list[dict]] | None = None
        self._epochs: dict[str, list[tuple[int, dict]]] = {}     # run id -> the per-epoch points it lacks
        self.recreated = 0                      # fine-tune runs made again (``finetune_runs``)
        self.completed = 0                      # fine-tune runs a stopped stage left unfinished, completed

    @property
    def histories(self) -> dict[str, list[dict]]:
        if self._histories is None:
            self._histories = trial_histories(self.cfg, self.sweep_dir)
        return self._histories

    def existing(self, tid: str) -> str | None:
        sink = self.sink
        rid = sink.runs["trials"].get(tid)
        if sink._run_exists(rid):
            return rid
        rid = sink.find_run({"mlflow.parentRunId": sink.parent_run_id, "trial_id": tid, "gmpq.role": "trial"})
        if rid is not None:
            sink.runs["trials"][tid] = rid
            sink._save_ids()
        return rid

    def missing(self, rid: str, row: Mapping[str, Any]) -> list[str]:
        """What run ``rid`` lacks of ``row`` (empty: nothing to do)."""
        c, status = self.sink.client, row["status"]
        run = c.get_run(rid)
        need = []
        if run.info.status != RUN_STATUS[status] or run.data.tags.get("status") != status:
            need.append("status")
        have = run.data.metrics.keys()              # (a run logged before the policy keys has them under k)
        if any(_present(row.get(k)) and not {k, key} & have
               for k, key in zip(FINAL_METRICS, _final_keys(row, legacy_layout(have)))):
            need.append("metrics")
        if status == "failed" and _present(row.get("error")) and "error" not in run.data.tags:
            need.append("error")
        lacking = self._epochs[rid] = missing_epochs(self.sink, rid, self.histories.get(str(row["trial_id"]), []),
                                                     legacy=legacy_layout(have), logged=have)
        if lacking:
            need.append("epochs")
        if _present(row.get("policy_json")) and "policy.json" not in {a.path for a in c.list_artifacts(rid)}:
            need.append("policy")
        return need

    def fill(self, rid: str, row: Mapping[str, Any], need: list[str]) -> None:
        sink, c, tid, status = self.sink, self.sink.client, str(row["trial_id"]), row["status"]
        metrics = c.get_run(rid).data.metrics
        legacy = legacy_layout(metrics)                # an earlier version's run keeps its names
        lacking = self._epochs.pop(rid, None)          # the per-epoch points it lacks, from Tune's files
        if lacking is None:
            lacking = missing_epochs(sink, rid, self.histories.get(tid, []), legacy=legacy, logged=metrics)
        for step, points in lacking:
            sink.log_metrics(rid, points, step=step)
        if lacking:
            metrics = c.get_run(rid).data.metrics
        if "metrics" in need:                          # those the run lacks (a partly logged run: not twice)
            step = row.get("last_epoch") if _present(row.get("last_epoch")) else row.get("epochs_run")
            final = final_metrics(row, status, legacy=legacy)
            sink.log_metrics(rid, {k: v for k, v in final.items() if _present(v) and k not in metrics},
                             step=int(step) if _present(step) else 0)
        if "policy" in need:
            sink.call("logging policy.json", c.log_text, rid, str(row["policy_json"]), "policy.json")
        tags = {"status": status, "gmpq.synced": "true"}
        if status == "failed" and _present(row.get("error")):
            tags["error"] = str(row["error"])[:5000]
        sink.finish(rid, RUN_STATUS[status], tags)

    def trial(self, row: Mapping[str, Any]) -> str:
        """Sync one row; returns "created", "updated" or "unchanged"."""
        tid, status = str(row["trial_id"]), row["status"]
        rid = self.existing(tid)
        outcome = "updated"
        if rid is None:
            params = {k[len(PARAM_PREFIX):]: v for k, v in row.items() if k.startswith(PARAM_PREFIX) and _present(v)}
            name = trial_run_name(tid, params, self.cfg.get("space"))      # (as the live sweep names it)
            rid = self.sink.child_run("trials", tid, run_name=name, params=params,
                                      tags={"trial_id": tid, "status": status, "gmpq.role": "trial"})
            if rid is None:
                raise SyncError(f"MLflow refused a new run for trial {tid} on '{self.sink.tracking_uri}'.")
            self.sink.log_metrics(rid, config_metrics(params))     # as the sweep logs them (numbers sort as numbers)
            outcome = "created"
        need = self.missing(rid, row) if outcome == "updated" else ["status", "metrics", "error", "policy"]
        if not need:
            return "unchanged"
        self.fill(rid, row, need)
        return outcome

    def tables(self) -> list[str]:
        """Pareto / final tables on the parent run, when the folder has them and the run lacks them; the Pareto
        table also when the run's copy differs from the folder's (``gmpq pareto`` ran again while MLflow was off).
        final.parquet's rows: the fine-tune runs the store lacks are made (``finetune_runs``), those it has are not
        logged into again (also when the parent lacks the table: a final stage stopped before it logged it, or a
        new parent with the runs moved under it, ``mlflow_parent``), but completed when that stage left one
        unfinished."""
        sink, d, done = self.sink, self.sweep_dir, []
        have = {a.path for a in sink.client.list_artifacts(sink.parent_run_id, "results")}
        if (d / PARETO_FILE).is_file() and (f"results/{PARETO_FILE}" not in have or self._differs(PARETO_FILE)):
            from .pareto import PARETO_PNG
            log_pareto(sink.tracking_uri, d, read_table(d / PARETO_FILE).to_pandas(), d / PARETO_PNG)
            done.append(PARETO_FILE)
        table = (d / FINAL_FILE).is_file() and f"results/{FINAL_FILE}" not in have
        if (d / FINAL_FILE).is_file():
            made = self.finetune_runs(read_table(d / FINAL_FILE).to_pandas(), table=table)
            self.recreated = made if not table or self.moved else 0     # (else: made for the first time)
        return done + [FINAL_FILE] * table

    def finetune_runs(self, final_df, table: bool = False) -> int:
        """Make again the fine-tune runs of ``final_df``'s rows that the store lacks (deleted in the UI or by ``mlflow
        gc``, or a store replaced): ``log_final`` with no policy fresh logs only the rows whose run is not in the
        id file. The others' runs, found by their tags when the id file lost them (``finetune_run``), are saved
        there first, or it would log their final rows again into them; one a stopped final stage left RUNNING gets
        what it lacks (``complete_final_row``; ``self.completed``). ``table``: the parent lacks final.parquet
        (``log_final`` adds it). Returns how many runs it made."""
        sink, d, rows = self.sink, self.sweep_dir, final_df.to_dict("records")
        known = dict(sink.runs["finetune"])
        had = [finetune_run(sink, row) for row in rows]
        if sink.runs["finetune"] != known:
            sink._save_ids()                    # (runs the id file had lost, found by their tags)
        self.completed = sum(complete_final_row(sink, rid, row) for rid, row in zip(had, rows) if rid is not None)
        if all(rid is not None for rid in had) and not table:
            return 0
        from .final_stage import FINAL_PNG

        sink._save_ids()
        before = {r for rids in child_runs_by_trial(sink, "finetune").values() for r in rids}
        log_final(sink.tracking_uri, d, final_df, png_path=d / FINAL_PNG, fresh=())
        sink._load_ids()                        # (log_final's own sink saved the new runs' ids)
        return sum(r not in before for rids in child_runs_by_trial(sink, "finetune").values() for r in rids)

    def _differs(self, name: str) -> bool:
        """Whether the parent run's ``results/<name>`` holds other bytes than the folder's ``name``."""
        with tempfile.TemporaryDirectory() as tmp:
            logged = self.sink.client.download_artifacts(self.sink.parent_run_id, f"results/{name}", tmp)
            return Path(logged).read_bytes() != (self.sweep_dir / name).read_bytes()

    def trial_tags(self) -> int:
        """The ``pareto`` / ``finetune_run_id`` tags and ``final_top1`` on trial runs that lack them (tables an
        earlier version logged); how many runs changed."""
        d = self.sweep_dir
        pareto = read_table(d / PARETO_FILE).to_pandas() if (d / PARETO_FILE).is_file() else None
        final = read_table(d / FINAL_FILE).to_pandas() if (d / FINAL_FILE).is_file() else None
        return backfill_trial_tags(self.sink, d, pareto, final)


def parent_step(sink: MLflowSink, cfg: Mapping[str, Any], sweep_dir: Path, rows: list[dict], moved: int = 0, *,
                finish: bool = True, syncer: _Syncer | None = None) -> tuple[_Syncer, list[str]]:
    """The sync's parent run step (also a live command's for a new parent replacing a removed one,
    ``mlflow_parent.fill_new_parent``): ended FINISHED once every trial has a row (``finish``: no driver runs the
    sweep), then the tables it lacks (``_Syncer.tables``). Returns the syncer and the tables logged."""
    syncer = syncer or _Syncer(sink, cfg, sweep_dir, moved)
    n_trials = cfg.get("n_trials")
    if finish and isinstance(n_trials, int) and len(rows) >= n_trials and \
            sink.client.get_run(sink.parent_run_id).info.status != "FINISHED":
        sink.finish(sink.parent_run_id, "FINISHED")      # every trial has a row: the sweep is over
    return syncer, syncer.tables()


def _sync_all(sink: MLflowSink, cfg: Mapping[str, Any], sweep_dir: Path, rows: list[dict], moved: int) -> tuple:
    syncer = _Syncer(sink, cfg, sweep_dir, moved)
    outcomes = {"created": 0, "updated": 0, "unchanged": 0}
    for row in sorted(rows, key=lambda r: str(r["trial_id"])):
        outcomes[syncer.trial(row)] += 1
    _, tables = parent_step(sink, cfg, sweep_dir, rows, syncer=syncer)
    final = sweep_dir / FINAL_FILE          # the fine-tune runs just created (and older ones) get their epochs
    final_df = read_table(final).to_pandas() if final.is_file() else None
    series = fill_finetune_series(sink, cfg, sweep_dir, final_df) if final_df is not None else SeriesFill(0, (), "")
    kept = sync_kept(sink, cfg, sweep_dir, final_df)        # the recipes kept aside: their runs, not the current
    tagged = syncer.trial_tags()
    dup = sum(len(v) > 1 for v in child_runs_by_trial(sink).values())
    made = (syncer.recreated, syncer.completed, kept)
    return outcomes, sink.client.get_run(sink.parent_run_id), tables, tagged, dup, series, made


def _sink_warnings(caught: list) -> list[str]:
    """The MLflow sink's own warnings among ``caught`` (what failed, and why), not a library's: an SQLAlchemy
    deprecation notice raised by MLflow's store on the way is no reason."""
    return [str(w.message) for w in caught
            if issubclass(w.category, RuntimeWarning) and str(w.message).startswith(DISABLED)]


def _cannot_sync(sink: MLflowSink, sweep_dir: Path, caught: list) -> SyncError:
    why = "; ".join(m.replace(f". {sink.goes_on()}", "") for m in _sink_warnings(caught)) or "unreachable"
    return SyncError(f"Cannot sync '{sweep_dir}' to MLflow: {why}. Start the tracking server (e.g. 'gmpq "
                     "mlflow-server --dir DIR --port P --detach') or pass the right --tracking-uri, then rerun "
                     "'gmpq sync-mlflow'; nothing was changed that a rerun does not finish.")


def _nothing_to_sync(sink: MLflowSink, sweep_dir: Path) -> SyncReport:
    """The report of a folder with no results yet, once the store is known to answer (an existing store is opened,
    which finds or creates the experiment and no run; a SQLite file not there yet is not created)."""
    db = sqlite_file(sink.tracking_uri)
    if db is None or db.exists():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            if not sink.open_store():
                raise _cannot_sync(sink, sweep_dir, caught)
    return SyncReport(sweep_dir=sweep_dir, tracking_uri=sink.tracking_uri, experiment_name=sink.experiment_name,
                      parent_run_id=None, parent_created=False, trials=0, runs_created=0, runs_updated=0,
                      runs_unchanged=0, tables_logged=(), duplicates=0, nothing_to_sync=True)


def sync_mlflow(sweep_dir: str | Path, *, tracking_uri: str | None = None, while_running: bool = False) -> SyncReport:
    """Make the MLflow view of ``sweep_dir`` whole (see the module docstring); returns what it did.

    ``tracking_uri``: default the sweep's own (``sweep_config.yaml``). Raises ConfigError for a tracking URI
    that cannot work (an unknown scheme, a SQLite file in a folder that is a file), before anything else;
    CheckpointError for a folder that is not a sweep or a damaged ``trials.parquet``; SyncError when MLflow
    cannot be reached. A folder with no results yet returns a report with ``nothing_to_sync`` and creates no run.
    SyncError, before MLflow is opened, while another process runs a stage of the sweep
    (``sync_guards.refuse_while_running``), unless ``while_running`` (that process's MLflow logging is off: one
    writer at a time).
    """
    from .sweep_checks import check_tracking_uri

    if tracking_uri:
        check_tracking_uri(tracking_uri, default="the sweep's own store", leave_out="sync to the sweep's own store")
    sweep_dir = Path(sweep_dir).expanduser().resolve()
    cfg = load_resolved_config(sweep_dir, missing_ok=False)
    uri = tracking_uri or cfg.get("tracking_uri") or default_tracking_uri(sweep_dir)
    if not tracking_uri:       # the sweep's own: its folder may have been replaced since, e.g. by a file
        check_tracking_uri(uri, f"tracking_uri (in {sweep_dir / CONFIG_FILE})", leave_out=None)
    if not while_running:
        refuse_while_running(sweep_dir)
    rows = read_trials(sweep_dir, missing_ok=True).to_dict("records")
    t0_ms = int(time.time() * 1000)
    sink = MLflowSink(uri, sweep_dir, resolved_config=cfg)
    if not rows and not any((sweep_dir / f).is_file() for f in (PARETO_FILE, FINAL_FILE)):
        return _nothing_to_sync(sink, sweep_dir)
    with warnings.catch_warnings(record=True) as caught, id_files_kept(sink):
        warnings.simplefilter("always", RuntimeWarning)     # the sink's warning even if shown before: it says why
        if not sink.open_store():
            raise _cannot_sync(sink, sweep_dir, caught)
        try:
            sink.tell_lost_parent = sink.fill_lost_parent = False     # (the report says it; _sync_all fills it)
            if not sink.connect():                  # a lost parent: restored, or a new one (``mlflow_parent``)
                raise _cannot_sync(sink, sweep_dir, caught)
            lost = sink.lost_parent or LostParent()
            outcomes, parent, tables, tagged, dup, series, made = _sync_all(sink, cfg, sweep_dir, rows, lost.moved)
        except (MlflowException, RequestException, OSError) as e:
            raise SyncError(f"MLflow at '{uri}' failed during the sync ({type(e).__name__}: {e}); rerun "
                            "'gmpq sync-mlflow' when it answers again (finished uploads are not repeated).") from None
    if not sink.enabled:
        raise SyncError(f"MLflow at '{uri}' failed during the sync ({'; '.join(_sink_warnings(caught))}); "
                        "rerun 'gmpq sync-mlflow' when it answers again (finished uploads are not repeated).")
    return SyncReport(sweep_dir=sweep_dir, tracking_uri=uri, experiment_name=sink.experiment_name,
                      parent_run_id=str(sink.parent_run_id), parent_created=parent.info.start_time >= t0_ms,
                      trials=len(rows), runs_created=outcomes["created"], runs_updated=outcomes["updated"],
                      runs_unchanged=outcomes["unchanged"], tables_logged=tuple(tables), duplicates=dup,
                      runs_tagged=tagged, finetune_series_logged=series.runs_filled,
                      finetunes_without_history=series.without_history, checkpoint_storage=series.storage,
                      finetune_runs_recreated=made[0], finetune_runs_completed=made[1],
                      kept_runs_made=made[2].made, kept_runs_tagged=made[2].tagged,
                      parent_restored=lost.restored is not None, runs_restored=lost.runs_restored,
                      runs_restored_unsorted=lost.times_unknown and lost.runs_restored > 0,
                      removed_parent_run_id=lost.removed, runs_reattached=lost.moved)
