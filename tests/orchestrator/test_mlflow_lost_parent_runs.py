"""A lost parent run as a live command and ``gmpq sync-mlflow`` repair it (``mlflow_parent``), real SQLite stores: a
parent deleted with its child runs (as the MLflow UI can) comes back with the runs deleted with it, while a run deleted
on its own before stays deleted, also past SQLite's limit of SQL variables; when the store does not say when they
were deleted, every deleted run under it comes back and the line says so; a new parent made for one ``mlflow gc``
removed gets the sweep's tables and status, and a failure to log them is said and turns nothing off; a new store
(mlflow.db removed) is said as such; a moved folder that lost mlflow_parent.json finds its deleted parent by the folder
it was written in; and the restore line's way to keep a parent deleted works."""
from __future__ import annotations

import json
import logging
import shutil
import sqlite3

import pytest
import yaml

from test_sync_deleted_finetune_runs import _synced_sweep       # same folder (pytest puts it on sys.path)
from test_sync_deleted_parent_run import _children, _gc, _parent, _state
from test_sync_finetune_series import EPOCHS
from test_final_recipes import _stage


def _said(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("orchestrator")]


def _deleted_earlier(sweep, rid: str, ms: int = 3_600_000) -> None:
    """Run ``rid`` (deleted) as if deleted ``ms`` earlier (MLflow's client cannot say when; its store keeps it)."""
    con = sqlite3.connect(sweep / "mlflow.db")
    with con:
        con.execute("UPDATE runs SET deleted_time = deleted_time - ? WHERE run_uuid = ?", (ms, rid))
    con.close()


def _few_sql_variables(monkeypatch, n: int) -> None:
    """The store's read-only connections (``mlflow_parent._deleted_times``'s) allow ``n`` SQL variables: a parent with
    more child runs than SQLite's limit (32,766 by default; 999 before SQLite 3.32)."""
    if not hasattr(sqlite3.Connection, "setlimit"):
        pytest.skip("sqlite3.Connection.setlimit needs Python 3.11+")
    real = sqlite3.connect

    def connect(database, *args, **kwargs):
        con = real(database, *args, **kwargs)
        if kwargs.get("uri") and "mode=ro" in str(database):
            con.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, n)
        return con
    monkeypatch.setattr(sqlite3, "connect", connect)


@pytest.mark.parametrize("sql_variables", [None, 3])
def test_a_parent_deleted_with_its_runs_comes_back_with_them_and_a_run_deleted_before_stays_deleted(
        tmp_path, monkeypatch, caplog, sql_variables):
    """``sql_variables``: the parent and its 4 runs' ids are more than one query may name (read in chunks)."""
    sweep, client = _synced_sweep(tmp_path, monkeypatch, n=2)
    if sql_variables:
        _few_sql_variables(monkeypatch, sql_variables)
    parent = _parent(sweep)
    exp_id = client.get_run(parent).info.experiment_id
    children, points = _children(client, exp_id), _state(client, exp_id)
    ids = json.loads((sweep / "mlflow_runs.json").read_text())
    alone = next(r for k, r in ids["finetune"].items() if k.startswith("t2"))
    client.delete_run(alone)                                    # deleted on its own, an hour before
    _deleted_earlier(sweep, alone)
    for rid in [parent, *(r for r in children if r != alone)]:  # the UI: the parent with its child runs
        client.delete_run(rid)

    with caplog.at_level(logging.WARNING, logger="orchestrator.mlflow_sink"):
        _stage(monkeypatch, tmp_path, []).finetune_selected(sweep, epochs=EPOCHS, workers=1)
    assert _parent(sweep) == parent and client.get_run(parent).info.lifecycle_stage == "active"
    now = _children(client, exp_id)
    assert {r: v for r, v in now.items() if r in children} == {r: v for r, v in children.items() if r != alone}
    assert client.get_run(alone).info.lifecycle_stage == "deleted"
    t1 = [r for r, (role, tid, _) in now.items() if role == "finetune" and tid == "t1"]
    assert len(t1) == 1 and t1[0] in children                   # not made again beside the deleted one
    assert {r: p for r, p in _state(client, exp_id).items() if r in points} == \
        {r: p for r, p in points.items() if r != alone}         # nothing logged twice
    lines = [m for m in _said(caplog) if "parent run" in m]
    assert len(lines) == 1 and lines[0].startswith(
        f"MLflow: the sweep's parent run {parent} was deleted (not yet removed by mlflow gc): restored it and the 3 "
        "runs under it deleted with it; nothing is logged twice; 1 run under it deleted on its own stays deleted "
        f"('gmpq sync-mlflow --sweep {sweep}' makes it again). To keep it deleted")
    assert not [m for m in _said(caplog) if "logged to it" in m]


def test_a_new_parent_for_a_gc_removed_one_gets_the_sweeps_tables_and_status(tmp_path, monkeypatch, caplog):
    sweep, client = _synced_sweep(tmp_path, monkeypatch, n=2)
    cfg = yaml.safe_load((sweep / "sweep_config.yaml").read_text())
    (sweep / "sweep_config.yaml").write_text(yaml.safe_dump({**cfg, "n_trials": 2}, sort_keys=False))   # all ran
    old = _parent(sweep)
    exp_id = client.get_run(old).info.experiment_id
    points = _state(client, exp_id)
    client.delete_run(old)
    _gc(sweep, old)

    with caplog.at_level(logging.WARNING, logger="orchestrator.mlflow_sink"):
        _stage(monkeypatch, tmp_path, []).finetune_selected(sweep, epochs=EPOCHS, workers=1)
    new = client.get_run(_parent(sweep))
    assert new.info.run_id != old and new.info.status == "FINISHED"
    have = {a.path for a in client.list_artifacts(new.info.run_id, "results")}
    assert {"results/pareto.parquet", "results/trials.parquet", "results/final.parquet"} <= have
    assert new.data.metrics["pareto_size"] == 2 and "Pareto front" in new.data.tags["mlflow.note.content"]
    assert _state(client, exp_id) == points                     # no run made again, no point twice
    (line,) = [m for m in _said(caplog) if "parent run" in m]
    assert line == (f"MLflow: the sweep's parent run {old} was removed from the store (mlflow gc): made a new parent "
                    f"run {new.info.run_id}, moved the 4 runs that were under the old one under it (not made again) "
                    "and logged the sweep's tables onto it")


def test_a_failed_fill_of_a_new_parent_is_said_and_mlflow_stays_on(tmp_path, monkeypatch, caplog, recwarn):
    """The sweep's tables cannot be read (trials.parquet damaged) when a command makes a new parent for one mlflow gc
    removed: the runs are still moved under it, the line says the tables were not logged and why, and the command
    goes on logging."""
    from orchestrator.mlflow_sink import DISABLED, MLflowSink

    sweep, client = _synced_sweep(tmp_path, monkeypatch, n=2)
    old = _parent(sweep)
    exp_id = client.get_run(old).info.experiment_id
    client.delete_run(old)
    _gc(sweep, old)
    (sweep / "trials.parquet").write_bytes(b"not a parquet file")

    sink = MLflowSink(None, sweep)
    with caplog.at_level(logging.WARNING, logger="orchestrator.mlflow_sink"):
        assert sink.connect()
    new = sink.parent_run_id
    assert not [w for w in recwarn if str(w.message).startswith(DISABLED)] and "_disable" not in vars(sink)
    assert {p for _, _, p in _children(client, exp_id).values()} == {new}
    (line,) = [m for m in _said(caplog) if "parent run" in m]
    assert line.startswith(f"MLflow: the sweep's parent run {old} was removed from the store (mlflow gc): made a new "
                           f"parent run {new}, moved the 4 runs that were under the old one under it (not made "
                           "again); logging the sweep's tables onto it failed (CheckpointError: ")
    assert str(sweep / "trials.parquet") in line and line.endswith(f"): 'gmpq sync-mlflow --sweep {sweep}' logs them")
    sink.log_metrics(new, {"later": 1.0})
    assert client.get_run(new).data.metrics == {"later": 1.0}


@pytest.mark.parametrize("command", ["sink", "sync"])
def test_a_parent_whose_deletion_time_is_unknown_comes_back_with_every_deleted_run_under_it(
        tmp_path, monkeypatch, caplog, command):
    """A parent deleted by an MLflow that kept no ``deleted_time``: which runs were deleted with it is not known, so
    all the deleted runs under it come back, the one deleted on its own too, and the line and the report say so."""
    from orchestrator.commands.sync_mlflow import format_report
    from orchestrator.mlflow_sink import MLflowSink
    from orchestrator.sync import sync_mlflow

    sweep, client = _synced_sweep(tmp_path, monkeypatch, n=2)
    parent = _parent(sweep)
    children = _children(client, client.get_run(parent).info.experiment_id)
    alone = next(iter(children))
    client.delete_run(alone)
    _deleted_earlier(sweep, alone)
    for rid in [parent, *(r for r in children if r != alone)]:
        client.delete_run(rid)
    con = sqlite3.connect(sweep / "mlflow.db")
    with con:
        con.execute("UPDATE runs SET deleted_time = NULL WHERE run_uuid = ?", (parent,))
    con.close()

    runs = "the 4 deleted runs under it (the store does not say which were deleted with it)"
    if command == "sink":
        with caplog.at_level(logging.WARNING, logger="orchestrator.mlflow_sink"):
            assert MLflowSink(None, sweep).connect()
        (line,) = [m for m in _said(caplog) if "parent run" in m]
        assert f"restored it and {runs}; nothing is logged twice. To keep it deleted" in line
    else:
        rep = sync_mlflow(sweep)
        assert rep.runs_restored == 4 and rep.runs_restored_unsorted
        assert f"parent run {parent} was deleted (not yet removed by mlflow gc): restored, with {runs}" in \
            format_report(rep).splitlines()
    assert all(client.get_run(r).info.lifecycle_stage == "active" for r in [parent, *children])


def test_a_new_store_is_said_as_such_and_its_runs_are_made_not_written_to(tmp_path, monkeypatch, caplog, recwarn):
    """Every run of the sweep removed by mlflow gc: to the commands, as a new store (mlflow.db removed) is."""
    from orchestrator.mlflow_sink import DISABLED

    sweep, client = _synced_sweep(tmp_path, monkeypatch, n=2)
    old = _parent(sweep)
    for rid in [old, *_children(client, client.get_run(old).info.experiment_id)]:
        client.delete_run(rid)
        _gc(sweep, rid)
    with caplog.at_level(logging.WARNING, logger="orchestrator.mlflow_sink"):
        _stage(monkeypatch, tmp_path, []).finetune_selected(sweep, epochs=EPOCHS, workers=1)
    new = _parent(sweep)
    assert not [w for w in recwarn if str(w.message).startswith(DISABLED)]
    (line,) = [m for m in _said(caplog) if "parent run" in m]
    assert line == (f"MLflow: the store no longer has the sweep's parent run {old} (removed by mlflow gc, or a new "
                    f"store): made {new}; 'gmpq sync-mlflow --sweep {sweep}' logs the sweep into it")


def test_a_moved_folder_without_its_parent_id_file_restores_its_deleted_parent(tmp_path, monkeypatch):
    from orchestrator.commands.sync_mlflow import format_report
    from orchestrator.sync import sync_mlflow

    sweep, client = _synced_sweep(tmp_path, monkeypatch, n=2)
    parent = _parent(sweep)
    exp_id = client.get_run(parent).info.experiment_id
    children, points = _children(client, exp_id), _state(client, exp_id)
    moved = tmp_path / "moved"
    shutil.move(sweep, moved)
    (moved / "mlflow_parent.json").unlink()
    client = type(client)(f"sqlite:///{moved / 'mlflow.db'}")
    for rid in [parent, *children]:                             # with its runs
        client.delete_run(rid)

    rep = sync_mlflow(moved)
    assert rep.parent_run_id == parent and rep.parent_restored and not rep.parent_created and rep.runs_restored == 4
    assert f"parent run {parent} was deleted (not yet removed by mlflow gc): restored, with the 4 runs under it " \
        "deleted with it" in format_report(rep)
    assert [r.info.run_id for r in client.search_runs([exp_id], "tags.`gmpq.role` = 'sweep'")] == [parent]
    assert _children(client, exp_id) == children and _state(client, exp_id) == points


def test_a_deleted_parent_whose_id_files_were_removed_stays_deleted(tmp_path, monkeypatch, caplog):
    """What the restore line says to keep a parent deleted: delete it again, remove the two id files."""
    from orchestrator.sync import sync_mlflow

    sweep, client = _synced_sweep(tmp_path, monkeypatch, n=1)
    parent = _parent(sweep)
    exp_id = client.get_run(parent).info.experiment_id
    for rid in [parent, *_children(client, exp_id)]:
        client.delete_run(rid)
    with caplog.at_level(logging.WARNING, logger="orchestrator.mlflow_sink"):
        _stage(monkeypatch, tmp_path, []).finetune_selected(sweep, epochs=EPOCHS, workers=1)
    (line,) = [m for m in _said(caplog) if "parent run" in m]
    runs = [parent, *_children(client, exp_id)]
    for rid in runs:
        client.delete_run(rid)
    (sweep / "mlflow_parent.json").unlink()
    (sweep / "mlflow_runs.json").unlink()

    rep = sync_mlflow(sweep)
    assert rep.parent_run_id != parent and not rep.parent_restored and rep.parent_created
    assert all(client.get_run(r).info.lifecycle_stage == "deleted" for r in runs)
    assert (f"To keep it deleted, delete it again and remove {sweep / 'mlflow_parent.json'} and "
            f"{sweep / 'mlflow_runs.json'}: later commands then leave it deleted and log the sweep into a new parent "
            "run") in line


def test_runs_under_a_deleted_parent_their_folder_cannot_name_are_moved_under_the_new_one(tmp_path, monkeypatch):
    """mlflow_parent.json lost and the deleted parent's gmpq.sweep_dir names none of the folder's places (moved
    twice): it is lost to the sweep as a removed one is; its runs, which mlflow_runs.json names, are moved."""
    from orchestrator.sync import sync_mlflow

    sweep, client = _synced_sweep(tmp_path, monkeypatch, n=2)
    parent = _parent(sweep)
    exp_id = client.get_run(parent).info.experiment_id
    children, points = _children(client, exp_id), _state(client, exp_id)
    client.set_tag(parent, "gmpq.sweep_dir", str(tmp_path / "elsewhere"))
    client.delete_run(parent)
    (sweep / "mlflow_parent.json").unlink()

    rep = sync_mlflow(sweep)
    new = rep.parent_run_id
    assert new != parent and rep.runs_reattached == 4 and rep.runs_created == 0
    assert _children(client, exp_id) == {rid: (role, tid, new) for rid, (role, tid, _) in children.items()}
    assert _state(client, exp_id) == points
