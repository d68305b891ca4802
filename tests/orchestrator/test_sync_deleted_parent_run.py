"""``gmpq sync-mlflow`` on a store whose sweep parent run was deleted while its child runs stay (``delete_run`` on the
parent only, as the MLflow UI or an API call may do): a parent in the deleted stage is restored (same id, nothing
made or logged again); a parent removed by ``mlflow gc`` gets a new parent run, and the trial and fine-tune runs
still under the removed one are moved under it (their ``mlflow.parentRunId`` tag), not made again, with every
metric point once. A second sync changes nothing. Real SQLite stores; the sweep as
``test_sync_deleted_finetune_runs`` builds it (a final stage of two policies, then one sync)."""
from __future__ import annotations

import json

import mlflow
import pytest

from test_sync_deleted_finetune_runs import _synced_sweep       # same folder (pytest puts it on sys.path)
from test_sync_finetune_series import _points                   # same folder


def _parent(sweep) -> str:
    return json.loads((sweep / "mlflow_parent.json").read_text())["run_id"]


def _children(client, exp_id: str) -> dict[str, tuple]:
    """``run id -> (role, trial_id, parent run id)`` of the experiment's active trial and fine-tune runs."""
    runs = client.search_runs([exp_id], "tags.`gmpq.role` != 'sweep'", max_results=1000)
    return {r.info.run_id: (r.data.tags["gmpq.role"], r.data.tags["trial_id"], r.data.tags["mlflow.parentRunId"])
            for r in runs}


def _state(client, exp_id: str) -> dict[str, dict]:
    """Every child run's metric points: ``run id -> key -> [(step, value)]`` (a point logged twice shows)."""
    return {rid: _points(client, rid) for rid in _children(client, exp_id)}


def _gc(sweep, rid: str) -> None:
    from click.testing import CliRunner
    from mlflow.cli import gc

    uri = f"sqlite:///{sweep / 'mlflow.db'}"
    res = CliRunner().invoke(gc, ["--backend-store-uri", uri, "--tracking-uri", uri, "--run-ids", rid])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("id_file", ["kept", "lost"])
def test_a_deleted_parent_run_is_restored_and_nothing_is_logged_twice(tmp_path, monkeypatch, id_file):
    """``lost``: mlflow_parent.json gone too: the deleted parent is found by its tags (gmpq.sweep_dir) and restored."""
    from orchestrator.commands.sync_mlflow import format_report
    from orchestrator.sync import sync_mlflow

    sweep, client = _synced_sweep(tmp_path, monkeypatch, n=2)
    parent = _parent(sweep)
    exp_id = client.get_run(parent).info.experiment_id
    children, points, parent_points = _children(client, exp_id), _state(client, exp_id), _points(client, parent)
    assert len(children) == 4 and {p for *_, p in children.values()} == {parent}
    client.delete_run(parent)
    if id_file == "lost":
        (sweep / "mlflow_parent.json").unlink()

    rep = sync_mlflow(sweep)
    assert _children(client, exp_id) == children                          # the same runs, under the same parent
    assert _state(client, exp_id) == points and _points(client, parent) == parent_points
    assert rep.parent_run_id == parent == _parent(sweep) and rep.parent_restored and not rep.parent_created
    assert client.get_run(parent).info.lifecycle_stage == "active"
    assert (rep.runs_created, rep.tables_logged, rep.finetune_runs_recreated, rep.duplicates) == (0, (), 0, 0)
    assert f"parent run {parent} was deleted (not yet removed by mlflow gc): restored" in format_report(rep)
    assert len(client.search_runs([exp_id], "tags.`gmpq.role` = 'sweep'")) == 1

    again = sync_mlflow(sweep)
    assert not again.changed and not again.parent_restored and again.parent_run_id == parent
    assert _state(client, exp_id) == points and _points(client, parent) == parent_points


@pytest.mark.parametrize("id_file", ["kept", "lost"])
def test_a_parent_run_removed_by_gc_gets_a_new_one_that_its_runs_are_moved_under(tmp_path, monkeypatch, id_file):
    """``lost``: mlflow_parent.json gone too: the removed parent is the one the runs of mlflow_runs.json name."""
    from orchestrator.commands.sync_mlflow import format_report
    from orchestrator.sync import sync_mlflow

    sweep, client = _synced_sweep(tmp_path, monkeypatch, n=2)
    old = _parent(sweep)
    exp_id = client.get_run(old).info.experiment_id
    children, points = _children(client, exp_id), _state(client, exp_id)
    client.delete_run(old)
    _gc(sweep, old)
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_run(old)
    if id_file == "lost":
        (sweep / "mlflow_parent.json").unlink()

    rep = sync_mlflow(sweep)
    new = rep.parent_run_id
    moved = {rid: (role, tid, new) for rid, (role, tid, _) in children.items()}
    assert _state(client, exp_id) == points                                # every point once, none logged again
    assert _children(client, exp_id) == moved                             # the same runs, under the new parent
    assert new != old and new == _parent(sweep) and rep.parent_created and rep.runs_reattached == 4
    assert (rep.runs_created, rep.finetune_runs_recreated, rep.duplicates) == (0, 0, 0)
    assert set(rep.tables_logged) == {"pareto.parquet", "final.parquet"}
    have = {a.path for a in client.list_artifacts(new, "results")}
    assert {"results/pareto.parquet", "results/final.parquet"} <= have
    assert f"parent run {old} was removed from the store (mlflow gc): 4 runs moved under the new one" \
        in format_report(rep)
    ids = json.loads((sweep / "mlflow_runs.json").read_text())
    for tid, rid in ids["trials"].items():                                 # the links both ways still hold
        assert client.get_run(rid).data.tags["finetune_run_id"] in ids["finetune"].values()
    assert len(client.search_runs([exp_id], "tags.`gmpq.role` = 'sweep'")) == 1

    again = sync_mlflow(sweep)
    assert not again.changed and again.parent_run_id == new and again.runs_reattached == 0
    assert _state(client, exp_id) == points and _children(client, exp_id) == moved
