"""The live commands on a store that lost the sweep's parent run while its child runs stay (``mlflow_parent``): a
resumed sweep (its Tune callback, driven here with stand-in trials on a real SQLite store, no Ray cluster) and a new
final stage (``gmpq finetune --sweep`` / ``gmpq run``'s stage, ``test_final_recipes._stage``) restore a parent in the
deleted stage (same id) and, for one ``mlflow gc`` removed, make a new parent and move the existing runs under it:
no duplicate runs, no metric point logged twice, one line said. A trial run deleted while the sweep logs to it is
not logged into again and does not turn MLflow off for the others."""
from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import mlflow
import pytest

pytest.importorskip("ray")

from test_sync_deleted_finetune_runs import _synced_sweep      # noqa: E402  same folder (pytest puts it on sys.path)
from test_sync_deleted_parent_run import _children, _gc, _parent, _state   # noqa: E402
from test_sync_finetune_series import EPOCHS, _points           # noqa: E402
from test_final_recipes import _stage                           # noqa: E402

CFG = {"name": "lp", "model": "resnet20"}


def _trial(tid: str, **result):
    return SimpleNamespace(trial_id=tid, config={"x": 1.0 if tid == "a" else 2.0}, last_result=result)


def _callback(sweep):
    from orchestrator.mlflow_callback import MLflowCallback

    return MLflowCallback(f"sqlite:///{sweep / 'mlflow.db'}", "lp", sweep, CFG, None)


def _live_sweep(tmp_path):
    """A sweep folder, its store's client and the sweep's MLflow callback, set up (its parent run made)."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "sweep_config.yaml").write_text("name: lp\nmodel: resnet20\n")
    cb = _callback(sweep)
    cb.setup()
    return sweep, mlflow.MlflowClient(f"sqlite:///{sweep / 'mlflow.db'}"), cb


def _sweep_stopped_midway(tmp_path):
    """Trial a completed, trial b stopped after its first epoch (Ctrl-C): the store as a resumed sweep finds it."""
    sweep, client, cb = _live_sweep(tmp_path)
    for tid in ("a", "b"):
        cb.on_trial_start(0, [], _trial(tid))
        cb.on_trial_result(0, [], _trial(tid), {"epoch": 1, "ce": 1.0, "proxy_top1": 10.0})
    cb.on_trial_complete(0, [], _trial("a", done=True, epoch=1, transfer_top1=50.0, proxy_top1=12.0))
    cb.on_experiment_end([])
    return sweep, client


def _resume(sweep):
    """The resumed sweep: trial b goes on from epoch 2 and completes."""
    cb = _callback(sweep)
    cb.setup()
    cb.on_trial_start(0, [], _trial("b"))
    cb.on_trial_result(0, [], _trial("b"), {"epoch": 2, "ce": 0.5, "proxy_top1": 20.0})
    cb.on_trial_complete(0, [], _trial("b", done=True, epoch=2, transfer_top1=60.0, proxy_top1=22.0))
    cb.on_experiment_end([])
    return cb


def _sweep_parents(client, exp_id):
    return client.search_runs([exp_id], "tags.`gmpq.role` = 'sweep'")


@pytest.mark.parametrize("how", ["deleted", "gc"])
def test_a_resumed_sweep_restores_or_replaces_its_lost_parent_and_keeps_its_trial_runs(tmp_path, caplog, how):
    sweep, client = _sweep_stopped_midway(tmp_path)
    old = _parent(sweep)
    exp_id = client.get_run(old).info.experiment_id
    children, a_points = _children(client, exp_id), _points(client, json.loads(
        (sweep / "mlflow_runs.json").read_text())["trials"]["a"])
    client.delete_run(old)
    if how == "gc":
        _gc(sweep, old)

    with caplog.at_level(logging.WARNING, logger="orchestrator.mlflow_sink"):
        cb = _resume(sweep)
    new = cb.parent_run_id
    assert cb.sink.enabled and [p.info.run_id for p in _sweep_parents(client, exp_id)] == [new] == [_parent(sweep)]
    assert _children(client, exp_id) == {rid: (role, tid, new) for rid, (role, tid, _) in children.items()}
    ids = json.loads((sweep / "mlflow_runs.json").read_text())["trials"]
    assert _points(client, ids["a"]) == a_points                           # nothing logged again into a
    b = client.get_run(ids["b"])
    assert b.info.status == "FINISHED" and [m.step for m in client.get_metric_history(ids["b"], "ce")] == [1, 2]
    said = [r.getMessage() for r in caplog.records if "parent run" in r.getMessage()]
    if how == "deleted":
        assert new == old and client.get_run(old).info.lifecycle_stage == "active"
        assert len(said) == 1 and said[0].startswith(
            f"MLflow: the sweep's parent run {old} was deleted (not yet removed by mlflow gc): restored it; nothing "
            f"is logged twice. To keep it deleted, delete it again and remove {sweep / 'mlflow_parent.json'} and ")
    else:
        assert new != old and len(said) == 1 and f"parent run {old} was removed" in said[0] \
            and "moved the 2 runs" in said[0]


@pytest.mark.parametrize("how", ["kept", "deleted", "gc"])
def test_a_new_final_stage_restores_or_replaces_the_lost_parent_without_duplicate_fine_tune_runs(
        tmp_path, monkeypatch, caplog, how):
    sweep, client = _synced_sweep(tmp_path, monkeypatch, n=2)
    old = _parent(sweep)
    exp_id = client.get_run(old).info.experiment_id
    children, points = _children(client, exp_id), _state(client, exp_id)
    if how != "kept":
        client.delete_run(old)
    if how == "gc":
        _gc(sweep, old)

    with caplog.at_level(logging.WARNING, logger="orchestrator.mlflow_sink"):      # done: nothing trained (kept:
        _stage(monkeypatch, tmp_path, []).finetune_selected(sweep, epochs=EPOCHS, workers=1)     # model files refilled)
    new = _parent(sweep)
    assert [p.info.run_id for p in _sweep_parents(client, exp_id)] == [new]
    assert (new == old) == (how != "gc")
    assert _children(client, exp_id) == {rid: (role, tid, new) for rid, (role, tid, _) in children.items()}
    assert _state(client, exp_id) == points                                # every point once
    assert len([r for r in caplog.records if "the sweep's parent run" in r.getMessage()]) == (how != "kept")
    results = {a.path for a in client.list_artifacts(new, "results")}
    assert "results/final.parquet" in results


def test_a_trial_run_deleted_while_the_sweep_logs_is_left_alone_and_the_others_go_on(tmp_path, caplog, recwarn):
    from orchestrator.mlflow_sink import DISABLED

    sweep, client, cb = _live_sweep(tmp_path)
    for tid in ("a", "b"):
        cb.on_trial_start(0, [], _trial(tid))
        cb.on_trial_result(0, [], _trial(tid), {"epoch": 1, "ce": 1.0, "proxy_top1": 10.0})
    ids = json.loads((sweep / "mlflow_runs.json").read_text())["trials"]
    client.delete_run(ids["a"])                                       # in the MLflow UI, mid-sweep
    with caplog.at_level(logging.WARNING, logger="orchestrator.mlflow_sink"):
        for tid in ("a", "b"):
            cb.on_trial_result(0, [], _trial(tid), {"epoch": 2, "ce": 0.5, "proxy_top1": 20.0})
            cb.on_trial_complete(0, [], _trial(tid, done=True, epoch=2, transfer_top1=60.0, proxy_top1=22.0))
        cb.on_experiment_end([])
    assert cb.sink.enabled and not [w for w in recwarn if str(w.message).startswith(DISABLED)]
    assert [m.step for m in client.get_metric_history(ids["a"], "ce")] == [1]        # nothing after its deletion
    assert client.get_run(ids["a"]).info.lifecycle_stage == "deleted"
    assert [m.step for m in client.get_metric_history(ids["b"], "ce")] == [1, 2]
    assert client.get_run(ids["b"]).info.status == "FINISHED"
    assert client.get_run(cb.parent_run_id).info.status == "FINISHED"
    said = [r.getMessage() for r in caplog.records if r.name.startswith("orchestrator")]
    assert said == [f"MLflow run {ids['a']} (trial a) is deleted in the store: nothing is logged into it; "
                    f"'gmpq sync-mlflow --sweep {sweep}' makes it again"]


def test_a_parent_run_deleted_while_the_sweep_logs_is_restored(tmp_path, caplog):
    sweep, client, cb = _live_sweep(tmp_path)
    cb.on_trial_start(0, [], _trial("a"))
    client.delete_run(cb.parent_run_id)
    with caplog.at_level(logging.WARNING, logger="orchestrator.mlflow_sink"):
        cb.on_trial_complete(0, [], _trial("a", done=True, epoch=2, transfer_top1=60.0, proxy_top1=22.0))
        cb.on_experiment_end([])
    parent = client.get_run(cb.parent_run_id)
    assert cb.sink.enabled and parent.info.lifecycle_stage == "active" and parent.info.status == "FINISHED"
    assert len([r for r in caplog.records if "restored it" in r.getMessage()]) == 1
