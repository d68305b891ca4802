"""A sweep's parent run that the tracking store lost while its child runs stay (``delete_run`` on the parent only, as
the MLflow UI or an API call may do; the trial and fine-tune runs are still active, and MLflow's searches and UI nest
them by their ``mlflow.parentRunId`` tag, which still names the lost parent). ``MLflowSink.connect`` repairs it, so
every command that logs a sweep does the same (``gmpq sweep --resume``, ``gmpq run``'s stages, ``gmpq finetune
--sweep``, ``gmpq pareto``, ``gmpq sync-mlflow``):

- a parent in the deleted stage, not yet removed by ``mlflow gc``, is restored (``restore_deleted_parent``, before
  the sink looks for its parent): same id, nothing is made or logged again;
- a parent that ``mlflow gc`` removed is gone: the sink makes a new one, and the runs still under the removed one
  get the new one's id as their ``mlflow.parentRunId`` (``reattach_orphans``), so they are found under it rather
  than made again (no duplicate runs, no metric point logged twice).

The sweep's parent run is the one ``mlflow_parent.json`` names (the sink's own store), else the oldest with the
sweep's ``gmpq.role`` / ``gmpq.sweep_dir`` tags (a deleted one of those only when the folder was logged before:
it has ``mlflow_runs.json`` or ``trials.parquet``, so a new sweep in a reused folder path does not take over a parent
someone deleted); a removed parent is also known from the ``mlflow.parentRunId`` of the runs ``mlflow_runs.json``
names (``mlflow_parent.json`` lost too). ``lost_parent_line`` is the one line a command says about it.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gmpq_core.errors import CheckpointError
from gmpq_core.fileio import read_json

from .mlflow_keys import PARENT_FILE, RUNS_FILE

if TYPE_CHECKING:
    from .mlflow_sink import MLflowSink

__all__ = ["LostParent", "PARENT_TAG", "restore_deleted_parent", "reattach_orphans", "lost_parent_line",
           "refused_deleted_run", "run_stage", "restore_meanwhile", "leave_deleted"]

log = logging.getLogger("orchestrator.mlflow_sink")     # the sink's messages

PARENT_TAG = "mlflow.parentRunId"


@dataclass(frozen=True)
class LostParent:
    """What became of a lost parent run: ``restored`` (its id: it was in the deleted stage), or ``removed`` (the id
    ``mlflow gc`` removed) with ``moved`` runs re-attached to the new parent. ``unrecorded``: ``mlflow_parent.json``
    named no parent of this store (the parent was looked for by its tags)."""
    restored: str | None = None
    removed: str | None = None
    moved: int = 0
    unrecorded: bool = False


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


def _logged_before(sink: MLflowSink) -> bool:
    """Whether the sweep folder was logged before (its runs' id file, or results): a deleted parent run with its tags
    is its own, not one of an earlier sweep that a new one in the same folder path should leave deleted."""
    from .results import TRIALS_FILE

    return any((sink.sweep_dir / name).is_file() for name in (RUNS_FILE, TRIALS_FILE))


def restore_deleted_parent(sink: MLflowSink) -> LostParent:
    """With the store open, before the sink finds its parent: restore the sweep's parent run if it is in the
    deleted stage; ``removed``: the recorded parent id when the store no longer has that run."""
    from mlflow.entities import ViewType

    rid = _recorded_parent(sink)
    if rid is not None:
        stage = run_stage(sink, rid)
        if stage is None:
            return LostParent(removed=rid)
        if stage != "deleted":
            return LostParent()
    else:                                   # no id file: its tags, unless a live parent has them
        tags = {"gmpq.role": sink.PARENT_ROLE, "gmpq.sweep_dir": str(sink.sweep_dir.resolve())}
        if not _logged_before(sink) or any("'" in v for v in tags.values()) or sink.find_run(tags) is not None:
            return LostParent(unrecorded=True)
        deleted = sink.client.search_runs(
            [sink._experiment_id], " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items()),
            run_view_type=ViewType.DELETED_ONLY, max_results=1, order_by=["attributes.start_time ASC"])
        if not deleted:
            return LostParent(unrecorded=True)
        rid = deleted[0].info.run_id
    sink.client.restore_run(rid)
    return LostParent(restored=rid)


def reattach_orphans(sink: MLflowSink, lost: LostParent) -> LostParent:
    """Once the sink has its parent: the runs under a removed parent of this sweep are moved under
    ``sink.parent_run_id``; returns ``lost`` with how many. The removed parent is ``lost.removed``, or, when no id
    file named the parent (``lost.unrecorded``), any gone parent of the runs ``mlflow_runs.json`` names (one search
    for them)."""
    c, new = sink.client, sink.parent_run_id
    removed = {lost.removed} - {None, new}
    ours = {rid for kind in sink.runs.values() for rid in kind.values()} if lost.unrecorded else set()
    if ours:
        others = c.search_runs([sink._experiment_id], f"tags.`{PARENT_TAG}` != '{new}'", max_results=50000)
        removed |= {r.data.tags[PARENT_TAG] for r in others if r.info.run_id in ours}
        removed = {p for p in removed if run_stage(sink, p) is None}
    moved = 0
    for old in sorted(removed):
        runs = c.search_runs([sink._experiment_id], f"tags.`{PARENT_TAG}` = '{old}'", max_results=50000)
        for run in runs:
            c.set_tag(run.info.run_id, PARENT_TAG, new)
        moved += len(runs)
    return LostParent(restored=lost.restored, removed=lost.removed or min(removed, default=None), moved=moved,
                      unrecorded=lost.unrecorded)


def lost_parent_line(lost: LostParent | None, parent_run_id: str | None) -> str | None:
    """The one line a command says about its repaired parent run (None: nothing was lost)."""
    if lost is None:
        return None
    if lost.restored:
        return (f"MLflow: the sweep's parent run {lost.restored} was deleted (not yet removed by mlflow gc): restored "
                "it, with the runs under it; nothing is logged twice")
    if lost.removed:
        n = lost.moved
        return (f"MLflow: the sweep's parent run {lost.removed} was removed from the store (mlflow gc): made a new "
                f"parent run {parent_run_id} and moved the {n} run{'' if n == 1 else 's'} that were under the old "
                "one under it (not made again)")
    return None


_REFUSED_DELETED = re.compile(r"The run (\w+) must be in the 'active' state\. Current state is deleted")


def refused_deleted_run(err: BaseException) -> str | None:
    """The run id when ``err`` is MLflow refusing to write a run in the deleted stage (deleted in the UI while a
    command logs to it), else None."""
    m = _REFUSED_DELETED.search(str(err))
    return m.group(1) if m else None


def restore_meanwhile(sink: MLflowSink) -> bool:
    """The parent run was deleted while this command logs to it (MLflow refused a write): restored, once, as
    ``connect`` would; False when it cannot be (removed by gc meanwhile, or deleted again: left as a deleted run)."""
    rid = str(sink.parent_run_id)
    if sink.__dict__.get("_restored_meanwhile") == rid:
        return False                            # restored once already: not in a loop
    sink.__dict__["_restored_meanwhile"] = rid
    try:
        sink.client.restore_run(rid)
    except Exception:  # noqa: BLE001 - any refusal: the run is left as deleted (leave_deleted)
        return False
    log.warning("%s", lost_parent_line(LostParent(restored=rid), rid))
    return True


def leave_deleted(sink: MLflowSink, run_id: str) -> None:
    """A run deleted while this command logs to it (MLflow refused a write): nothing more is logged into it, said
    once; the sink goes on with the other runs."""
    if run_id not in sink.deleted_runs:
        sink.deleted_runs.add(run_id)
        log.warning("MLflow: run %s was deleted while this command logged to it: nothing more is logged into it "
                    "(MLflow refuses a deleted run); after this command, '%s' makes it again from the sweep's "
                    "tables", run_id, sink.sync_command())
