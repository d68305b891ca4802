"""A sweep's parent run that the tracking store lost (``delete_run`` on the parent, alone or with its child runs, as
the MLflow UI or an API call may do; MLflow's searches and UI nest the child runs by their ``mlflow.parentRunId``
tag, which still names the lost parent). ``MLflowSink.connect`` repairs it, so every command that logs a sweep does
the same (``gmpq sweep --resume``, ``gmpq run``'s stages, ``gmpq finetune --sweep``, ``gmpq pareto``, ``gmpq
sync-mlflow``):

- a parent in the deleted stage, not yet removed by ``mlflow gc``, is restored (``restore_deleted_parent``, before
  the sink looks for its parent): same id, nothing is made or logged again; so are the runs under it deleted with
  it (within ``WITH_PARENT_MS`` of it: the UI's delete of a parent with its child runs), while a run deleted on its
  own (before, or later) stays deleted (``gmpq sync-mlflow`` makes it again). When that time cannot be read (RunInfo
  has no ``deleted_time`` in MLflow 3.17, and a server's REST API does not give it; the sweep's SQLite store does,
  read ``_SQL_CHUNK`` ids a query), every deleted run under the parent is restored, and the line says so;
- a parent that ``mlflow gc`` removed (or a store made anew) is gone: the sink makes a new one, the runs still under
  the removed one get the new one's id as their ``mlflow.parentRunId`` (``reattach_orphans``), so they are found
  under it rather than made again (no duplicate runs, no metric point logged twice), and the new one gets what the
  sync's parent step logs (``fill_new_parent``: the Pareto and final tables, the description, FINISHED once every
  trial has a row and no other process runs the sweep); the persisted ids of runs the store no longer has are
  dropped (made again, rather than written to and refused); one removed while a command logs to it is replaced the
  same way at the first write the store refuses for it (``replace_removed_parent``, once per removed id), and the
  write goes to the new one, so logging goes on rather than turning itself off.

The sweep's parent run is the one ``mlflow_parent.json`` names (the sink's own store), else the oldest with the
sweep's ``gmpq.role`` / ``gmpq.sweep_dir`` tags, the folder as now or as the moved folder's store or config recorded
it (as ``MLflowSink._parent`` looks), a deleted one of those only when the folder has ``mlflow_runs.json``: a new
sweep in a reused folder path, or a folder whose two id files were removed on purpose, leaves a deleted parent alone;
a removed or deleted parent is also known from the ``mlflow.parentRunId`` of the runs ``mlflow_runs.json`` names
(``mlflow_parent.json`` lost too). ``lost_parent_line`` is the one line a command says about it.
"""
from __future__ import annotations

import logging
import re
import sqlite3
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from gmpq_core.errors import CheckpointError
from gmpq_core.fileio import read_json

from .mlflow_keys import PARENT_FILE, RUNS_FILE
from .moved_sweep import same_folder, sqlite_file

if TYPE_CHECKING:
    from .mlflow_sink import MLflowSink

__all__ = ["LostParent", "PARENT_TAG", "WITH_PARENT_MS", "restore_deleted_parent", "reattach_orphans",
           "fill_new_parent", "lost_parent_line", "refused_deleted_run", "gone_run", "run_stage", "restore_meanwhile",
           "leave_deleted", "removed_parent", "replace_removed_parent", "parent_for"]

log = logging.getLogger("orchestrator.mlflow_sink")     # the sink's messages

PARENT_TAG = "mlflow.parentRunId"
WITH_PARENT_MS = 60_000      # a child run deleted this close to its parent was deleted with it (one UI action)
_CHUNK = 100                 # run ids per ``attributes.run_id IN (...)`` search
_SQL_CHUNK = 500             # run ids per SQLite ``IN (?, ...)`` query (SQLite before 3.32 allows 999 variables)
_told: set[str] = set()      # runs said deleted or gone in this process (``leave_deleted``: once per run)


@dataclass(frozen=True)
class LostParent:
    """What became of a lost parent run: ``restored`` (its id: it was in the deleted stage) with ``runs_restored``
    runs under it deleted with it and ``runs_left`` deleted on their own (left deleted), or, ``times_unknown`` (the
    store did not say when they were deleted), every deleted run under it; or ``removed`` (the id ``mlflow gc``
    removed, or a new store lacks) with ``moved`` runs re-attached to the new parent, which ``filled`` says got the
    sweep's tables (``fill_new_parent``; ``fill_error``: why not). ``unrecorded``: ``mlflow_parent.json`` named no
    parent of this store (the parent was looked for by its tags)."""
    restored: str | None = None
    removed: str | None = None
    moved: int = 0
    unrecorded: bool = False
    runs_restored: int = 0
    runs_left: int = 0
    times_unknown: bool = False
    filled: bool = False
    fill_error: str = ""


def run_stage(sink: MLflowSink, run_id: str) -> str | None:
    """The lifecycle stage of run ``run_id`` ("active", "deleted"); None when the store has no such run."""
    from mlflow.exceptions import MlflowException

    try:
        return sink.client.get_run(run_id).info.lifecycle_stage
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def _recorded_parent(sink: MLflowSink) -> str | None:
    """The parent run id ``mlflow_parent.json`` names for the sink's store (None: no such file, damaged, another's)."""
    path = sink.sweep_dir / PARENT_FILE
    try:
        data = read_json(path) if path.is_file() else {}
    except CheckpointError:
        return None                         # the sink says so and looks for the parent by its tags
    rid = data.get("run_id") if isinstance(data, dict) and sink._same_store(data) else None
    return str(rid) if rid else None


def _folders(sink: MLflowSink) -> list[str]:
    """The ``gmpq.sweep_dir`` values the sweep's parent may carry: the folder now, then where a moved folder's store
    or config says it was (``MLflowSink._parent`` looks in this order)."""
    here = sink.sweep_dir.resolve()
    out = [str(here)]
    for old in (sink._store_moved_from, sink._written_for):
        if old is not None and not same_folder(old, here) and str(old) not in out:
            out.append(str(old))
    return [f for f in out if "'" not in f]          # (the filter language: quoted in '...')


def _deleted_by_tags(sink: MLflowSink) -> str | None:
    """With no id file naming the parent: the oldest deleted parent run with the sweep's tags (``_folders``), unless
    a live one has them (the sink takes that) or the folder has no ``mlflow_runs.json``."""
    from mlflow.entities import ViewType

    if not (sink.sweep_dir / RUNS_FILE).is_file():
        return None
    tags = [f"tags.`gmpq.role` = '{sink.PARENT_ROLE}' and tags.`gmpq.sweep_dir` = '{f}'" for f in _folders(sink)]
    if any(sink.client.search_runs([sink._experiment_id], t, max_results=1) for t in tags):
        return None
    for t in tags:
        deleted = sink.client.search_runs([sink._experiment_id], t, run_view_type=ViewType.DELETED_ONLY,
                                          max_results=1, order_by=["attributes.start_time ASC"])
        if deleted:
            return deleted[0].info.run_id
    return None


def _deleted_times(sink: MLflowSink, ids: list[str]) -> dict[str, int | None] | None:
    """``run id -> deleted_time`` (ms) from the sink's SQLite store (MLflow's client does not give it), ``_SQL_CHUNK``
    ids a query (fewer if the connection allows fewer variables); None for another store or when it cannot be read."""
    db = sqlite_file(sink.tracking_uri)
    if db is None or not db.is_file() or not ids:
        return None
    try:
        con = sqlite3.connect(f"{Path(db).as_uri()}?mode=ro", uri=True, timeout=30)
        try:
            n = min(_SQL_CHUNK, con.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)) if hasattr(con, "getlimit") \
                else _SQL_CHUNK                 # (Python 3.11+)
            rows = []
            for i in range(0, len(ids), n):
                chunk = ids[i:i + n]
                rows += con.execute("SELECT run_uuid, deleted_time FROM runs WHERE run_uuid IN ({})".format(  # noqa: S608
                    ",".join("?" * len(chunk))), chunk).fetchall()
        finally:
            con.close()
    except sqlite3.Error:
        return None
    return {str(r): t for r, t in rows}


def _restore(sink: MLflowSink, rid: str) -> tuple[LostParent, list[str]]:
    """Restore the deleted parent ``rid`` and the runs under it deleted with it (``WITH_PARENT_MS``; every deleted run
    under it when the store does not tell when); returns what was done and the child run ids restored."""
    from mlflow.entities import ViewType

    c = sink.client
    children = [r.info.run_id for r in c.search_runs([sink._experiment_id], f"tags.`{PARENT_TAG}` = '{rid}'",
                                                     run_view_type=ViewType.DELETED_ONLY, max_results=50000)]
    times = _deleted_times(sink, [rid, *children]) or {}
    at = times.get(rid)
    unknown = {r for r in children if at is None or times.get(r) is None}
    with_it = [r for r in children if r in unknown or abs(times[r] - at) <= WITH_PARENT_MS]
    c.restore_run(rid)
    for r in with_it:
        c.restore_run(r)
    return LostParent(restored=rid, runs_restored=len(with_it), runs_left=len(children) - len(with_it),
                      times_unknown=bool(unknown)), with_it


def restore_deleted_parent(sink: MLflowSink) -> LostParent:
    """With the store open, before the sink finds its parent: restore the sweep's parent run if it is in the
    deleted stage, with the runs deleted with it; ``removed``: the recorded parent id when the store no longer has
    that run."""
    rid = _recorded_parent(sink)
    if rid is not None:
        stage = run_stage(sink, rid)
        if stage is None:
            return LostParent(removed=rid)
        if stage != "deleted":
            return LostParent()
    else:
        rid = _deleted_by_tags(sink)
        if rid is None:
            return LostParent(unrecorded=True)
    return _restore(sink, rid)[0]


def _found(sink: MLflowSink, ids: list[str]) -> list:
    """The runs (active and deleted) of the experiment among ``ids``: searches by id, ``_CHUNK`` at a time."""
    from mlflow.entities import ViewType

    out = []
    for i in range(0, len(ids), _CHUNK):
        chunk = ids[i:i + _CHUNK]
        out += sink.client.search_runs([sink._experiment_id], "attributes.run_id IN ({})".format(
            ", ".join(f"'{r}'" for r in chunk)), run_view_type=ViewType.ALL, max_results=len(chunk))
    return out


def reattach_orphans(sink: MLflowSink, lost: LostParent) -> LostParent:
    """Once the sink has its parent: the runs under a removed parent of this sweep are moved under
    ``sink.parent_run_id``; returns ``lost`` with how many. The removed parent is ``lost.removed``, or, when no id
    file named the parent (``lost.unrecorded``), any gone or deleted parent of the runs ``mlflow_runs.json`` names
    (searched by their ids). When a parent was removed, the persisted ids of runs the store no longer has are
    dropped (saved), so they are made again rather than written to."""
    c, new = sink.client, sink.parent_run_id
    removed = {lost.removed} - {None, new}
    ours = sorted({rid for kind in sink.runs.values() for rid in kind.values()})
    found = _found(sink, ours) if ours and (lost.unrecorded or removed) else []
    if lost.unrecorded:
        parents = {r.data.tags.get(PARENT_TAG) for r in found if r.info.lifecycle_stage == "active"} - {None, new}
        removed |= {p for p in parents if run_stage(sink, p) in (None, "deleted")}
    moved = 0
    for old in sorted(removed):
        runs = c.search_runs([sink._experiment_id], f"tags.`{PARENT_TAG}` = '{old}'", max_results=50000)
        for run in runs:
            c.set_tag(run.info.run_id, PARENT_TAG, new)
        moved += len(runs)
    if removed and ours:
        have = {r.info.run_id for r in found}
        gone = {k: [key for key, rid in kind.items() if rid not in have] for k, kind in sink.runs.items()}
        if any(gone.values()):
            for k, keys in gone.items():
                for key in keys:
                    del sink.runs[k][key]
            sink._save_ids()
    return replace(lost, removed=lost.removed or min(removed, default=None), moved=moved)


def fill_new_parent(sink: MLflowSink, lost: LostParent, *, reopen: bool) -> LostParent:
    """A new parent run made for a removed one gets what ``gmpq sync-mlflow``'s parent step logs (``sync.parent_step``:
    the Pareto and final tables it lacks, ended FINISHED once every trial has a row, unless the sweep's driver runs:
    ``reopen``, this process's sweep, or another process's ``driver.json``) and the description (``note_sweep``).
    A failure of it (a damaged table, a refused write) is the fill's only (``fill_error``, said in the sink's line:
    ``gmpq sync-mlflow`` logs them later): the sink goes on."""
    if not lost.removed or lost.removed == sink.parent_run_id or sink.PARENT_ROLE != "sweep":
        return lost
    from .driver_markers import live_driver
    from .mlflow_links import note_sweep
    from .results import read_trials
    from .sync import parent_step

    failed: list[str] = []
    sink._disable = lambda what, err: failed.append(f"{what} failed: {err}")    # a refused sink.call: the sink
    try:
        rows = read_trials(sink.sweep_dir, missing_ok=True).to_dict("records")
        parent_step(sink, sink.resolved_config, sink.sweep_dir, rows, lost.moved,
                    finish=not reopen and live_driver(sink.sweep_dir) is None)
        note_sweep(sink, sink.sweep_dir)
    except Exception as e:  # noqa: BLE001 - the tables are a view of the folder's: a later sync logs them
        failed.append(f"{type(e).__name__}: {e}")
    finally:                                                                    # stays on (MLflowSink._disable)
        del sink._disable
    return replace(lost, filled=not failed, fill_error=failed[0] if failed else "")


def lost_parent_line(lost: LostParent | None, sink: MLflowSink) -> str | None:
    """The one line a command says about its repaired parent run (None: nothing was lost)."""
    if lost is None:
        return None
    sync, d = sink.sync_command(), sink.sweep_dir
    if lost.restored:
        n, left = lost.runs_restored, lost.runs_left
        runs = f" and the {n} run{'' if n == 1 else 's'} under it deleted with it" if n else ""
        if n and lost.times_unknown:        # (every deleted run under it: _restore)
            runs = f" and the {n} deleted run{'' if n == 1 else 's'} under it (the store does not say which were " \
                "deleted with it)"
        kept = (f"; {left} run{'' if left == 1 else 's'} under it deleted on {'its' if left == 1 else 'their'} own "
                f"stay{'s' if left == 1 else ''} deleted ('{sync}' makes {'it' if left == 1 else 'them'} again)") \
            if left else ""
        return (f"MLflow: the sweep's parent run {lost.restored} was deleted (not yet removed by mlflow gc): restored "
                f"it{runs}; nothing is logged twice{kept}. To keep it deleted, delete it again and remove "
                f"{d / PARENT_FILE} and {d / RUNS_FILE}: later commands then leave it deleted and log the sweep "
                "into a new parent run")
    if lost.removed:
        n = lost.moved
        if not n:
            return (f"MLflow: the store no longer has the sweep's parent run {lost.removed} (removed by mlflow gc, or "
                    f"a new store): made {sink.parent_run_id}; '{sync}' logs the sweep into it")
        from .results import FINAL_FILE, PARETO_FILE

        has_tables = any((d / name).exists() for name in (PARETO_FILE, FINAL_FILE))     # none yet: mid-sweep
        tables = (" and logged the sweep's tables onto it" if has_tables else " and noted the sweep on it") \
            if lost.filled else f"; '{sync}' logs the sweep's tables onto it"
        if lost.fill_error:
            tables = f"; logging the sweep's tables onto it failed ({lost.fill_error}): '{sync}' logs them"
        return (f"MLflow: the sweep's parent run {lost.removed} was removed from the store (mlflow gc): made a new "
                f"parent run {sink.parent_run_id}, moved the {n} run{'' if n == 1 else 's'} that were under the old "
                f"one under it (not made again){tables}")
    return None


_REFUSED_DELETED = re.compile(r"The run (\w+) must be in the 'active' state\. Current state is deleted")
_NOT_FOUND = re.compile(r"Run (?:with id=|')(\w+)'? not found")


def refused_deleted_run(err: BaseException) -> str | None:
    """The run id when ``err`` is MLflow refusing to write a run in the deleted stage (deleted in the UI while a
    command logs to it, or before it started), else None."""
    m = _REFUSED_DELETED.search(str(err))
    return m.group(1) if m else None


def gone_run(sink: MLflowSink, err: BaseException) -> str | None:
    """The run id when ``err`` is the store lacking one of the sweep's child runs (``RESOURCE_DOES_NOT_EXIST``: removed
    by ``mlflow gc``), else None (another error, or another run: the sink turns itself off as for any failure)."""
    m = _NOT_FOUND.search(str(err)) if getattr(err, "error_code", None) == "RESOURCE_DOES_NOT_EXIST" else None
    ours = {rid for kind in sink.runs.values() for rid in kind.values()}
    return m.group(1) if m and m.group(1) in ours else None


def removed_parent(sink: MLflowSink, err: BaseException) -> bool:
    """Whether ``err`` is the store lacking the sink's parent run (``RESOURCE_DOES_NOT_EXIST``: ``mlflow gc`` removed
    it while this command logs to it)."""
    m = _NOT_FOUND.search(str(err)) if getattr(err, "error_code", None) == "RESOURCE_DOES_NOT_EXIST" else None
    return bool(m and sink.parent_run_id and m.group(1) == sink.parent_run_id)


def replace_removed_parent(sink: MLflowSink) -> bool:
    """The parent run was removed by ``mlflow gc`` while this command logs to it (``removed_parent``): once per removed
    id, the sink connects again as a command starting now does (a new parent run, the runs under the removed one moved
    under it, a sweep's tables logged onto it: ``connect``; its one line), and the removed id stands for the new one
    in the calls that still name it (``parent_for``). False when that id was replaced already, or connecting fails
    (the sink is then off, with its warning, as before)."""
    old, moved = str(sink.parent_run_id), sink.__dict__.setdefault("_parent_moved", {})
    if old in moved:
        return False
    moved[old] = None
    sink.parent_run_id = None
    if not sink.connect():
        return False
    for was, now in moved.items():              # (replaced before: its old ids name the newest one)
        if now in (old, None):
            moved[was] = sink.parent_run_id
    return True


def parent_for(sink: MLflowSink, value):
    """``value``, or the new parent run's id when ``value`` is a parent run id replaced by ``replace_removed_parent``
    (a caller that read ``sink.parent_run_id`` before)."""
    moved = sink.__dict__.get("_parent_moved")
    return moved.get(value) or value if moved and isinstance(value, str) else value


def restore_meanwhile(sink: MLflowSink) -> bool:
    """The parent run was deleted while this command logs to it (MLflow refused a write): restored, once, as
    ``connect`` would, with the runs deleted with it (logged into again); False when it cannot be (removed by gc
    meanwhile, or deleted again: left as a deleted run)."""
    rid = str(sink.parent_run_id)
    if sink.__dict__.get("_restored_meanwhile") == rid:
        return False                            # restored once already: not in a loop
    sink.__dict__["_restored_meanwhile"] = rid
    try:
        lost, children = _restore(sink, rid)
    except Exception:  # noqa: BLE001 - any refusal: the run is left as deleted (leave_deleted)
        return False
    sink.deleted_runs.difference_update(children)
    log.warning("%s", lost_parent_line(lost, sink))
    return True


def _which(sink: MLflowSink, run_id: str) -> str:
    """`` (trial t1)``, `` (fine-tune of policy t1)``, `` (the sweep's parent run)``: what run ``run_id`` is."""
    if run_id == sink.parent_run_id:
        return " (the sweep's parent run)"
    for kind, runs in sink.runs.items():
        key = next((k for k, v in runs.items() if v == run_id), None)
        if key is not None:
            tid = key.split("#")[0].split(":")[0]
            return f" (trial {tid})" if kind == "trials" else f" (fine-tune of policy {tid})"
    return ""


def leave_deleted(sink: MLflowSink, run_id: str, *, gone: bool = False) -> None:
    """A run deleted in the store (MLflow refused a write), or removed by ``mlflow gc`` (``gone``): nothing more is
    logged into it, said once per run and process (every sink of a ``gmpq run`` meets it); the sink goes on with the
    other runs."""
    sink.deleted_runs.add(run_id)
    if run_id in _told:
        return
    _told.add(run_id)
    state = "is no longer in the store (removed by mlflow gc)" if gone else "is deleted in the store"
    again = "restores it" if run_id == sink.parent_run_id and not gone else "makes it again"
    log.warning("MLflow run %s%s %s: nothing is logged into it; '%s' %s", run_id, _which(sink, run_id), state,
                sink.sync_command(), again)
