"""``gmpq sync-mlflow`` on a store that lost the sweep's parent run while its child runs stay (``delete_run`` on the
parent only, as the MLflow UI or an API call may do; the trial and fine-tune runs are still active, and MLflow's
searches and UI nest them by their ``mlflow.parentRunId`` tag, which still names the lost parent):

- a parent in the deleted stage, not yet removed by ``mlflow gc``, is restored (``restore_deleted_parent``, before
  the sink looks for its parent), so the sync goes on as with a live parent: nothing is made or logged again;
- a parent that ``mlflow gc`` removed is gone: the sink makes a new one, and the runs still under the removed one
  get the new one's id as their ``mlflow.parentRunId`` (``reattach_orphans``), so they are found under it rather
  than made again, and the final table is logged on the new parent without logging their rows into them again.

The sweep's parent run is the one ``mlflow_parent.json`` names (the sink's own store), else the oldest with the
sweep's ``gmpq.role`` / ``gmpq.sweep_dir`` tags; a removed parent is also known from the ``mlflow.parentRunId`` of
the runs ``mlflow_runs.json`` names (``mlflow_parent.json`` lost too).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from mlflow.exceptions import MlflowException

from gmpq_core.errors import CheckpointError
from gmpq_core.fileio import read_json

from .mlflow_sink import PARENT_FILE, MLflowSink

__all__ = ["LostParent", "restore_deleted_parent", "reattach_orphans"]

log = logging.getLogger("orchestrator.sync")        # the sync's messages

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


def _stage(sink: MLflowSink, run_id: str) -> str | None:
    """The lifecycle stage of run ``run_id`` ("active", "deleted"); None when the store has no such run."""
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


def restore_deleted_parent(sink: MLflowSink) -> LostParent:
    """Before ``sink.connect()`` (the store open): restore the sweep's parent run if it is in the deleted stage;
    ``removed``: the recorded parent id when the store no longer has that run."""
    from mlflow.entities import ViewType

    rid = _recorded_parent(sink)
    if rid is not None:
        stage = _stage(sink, rid)
        if stage is None:
            return LostParent(removed=rid)
        if stage != "deleted":
            return LostParent()
    else:                                   # no id file: its tags, unless a live parent has them
        tags = {"gmpq.role": sink.PARENT_ROLE, "gmpq.sweep_dir": str(sink.sweep_dir.resolve())}
        if sink.find_run(tags) is not None or any("'" in v for v in tags.values()):
            return LostParent(unrecorded=True)
        deleted = sink.client.search_runs(
            [sink._experiment_id], " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items()),
            run_view_type=ViewType.DELETED_ONLY, max_results=1, order_by=["attributes.start_time ASC"])
        if not deleted:
            return LostParent(unrecorded=True)
        rid = deleted[0].info.run_id
    sink.client.restore_run(rid)
    log.info("restored the sweep's parent run %s (it was in the deleted stage)", rid)
    return LostParent(restored=rid)


def reattach_orphans(sink: MLflowSink, lost: LostParent) -> LostParent:
    """After ``sink.connect()``: the runs under a removed parent of this sweep are moved under ``sink.parent_run_id``;
    returns ``lost`` with how many. The removed parent is ``lost.removed``, or, when no id file named the parent
    (``lost.unrecorded``), any gone parent of the runs ``mlflow_runs.json`` names (one search for them)."""
    c, new = sink.client, sink.parent_run_id
    removed = {lost.removed} - {None, new}
    ours = {rid for kind in sink.runs.values() for rid in kind.values()} if lost.unrecorded else set()
    if ours:
        others = c.search_runs([sink._experiment_id], f"tags.`{PARENT_TAG}` != '{new}'", max_results=50000)
        removed |= {r.data.tags[PARENT_TAG] for r in others if r.info.run_id in ours}
        removed = {p for p in removed if _stage(sink, p) is None}
    moved = 0
    for old in sorted(removed):
        runs = c.search_runs([sink._experiment_id], f"tags.`{PARENT_TAG}` = '{old}'", max_results=50000)
        for run in runs:
            c.set_tag(run.info.run_id, PARENT_TAG, new)
        moved += len(runs)
        log.info("moved %d runs under the new parent run %s (their parent %s was removed)", len(runs), new, old)
    return LostParent(restored=lost.restored, removed=lost.removed or min(removed, default=None), moved=moved,
                      unrecorded=lost.unrecorded)
