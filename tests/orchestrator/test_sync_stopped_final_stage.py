"""``gmpq sync-mlflow`` after a final stage that stopped while it logged to MLflow (Ctrl-C, a killed driver): its
fine-tune runs are in the store, the parent run lacks ``results/final.parquet`` (logged last). The sync adds the
table without logging any row again into the runs that hold it (the old sync logged every final row again: two
points per metric at the last epoch), completes a run the stage left unfinished (RUNNING, without its final row),
once; a second sync changes nothing. Real SQLite stores; the final stage without Ray (``test_final_recipes._stage``)."""
from __future__ import annotations

import json

import mlflow
import pytest

from final_sweep import make_sweep                                 # same folder (pytest puts it on sys.path)
from test_final_recipes import _stage                              # same folder
from test_sync_deleted_parent_run import _children, _parent, _state
from test_sync_finetune_series import EPOCHS


def _stopped_stage(tmp_path, monkeypatch, *, stop_in_row: int | None):
    """Both policies fine-tuned and logged to the sweep's own store, then the parent's final.parquet artifact gone
    (the stage stopped before it logged it); ``stop_in_row``: the stage stopped while it logged that row (its run
    made, its final row not logged: still RUNNING)."""
    from orchestrator import mlflow_stages

    sweep = tmp_path / "sweep"
    make_sweep(sweep, bits=((3, 4), (4, 4)), precision="fp32", workers=1)
    if stop_in_row is not None:
        calls, real = [], mlflow_stages._log_final_metrics

        def stopping(sink, rid, row, history):
            calls.append(rid)
            if len(calls) == stop_in_row:
                raise KeyboardInterrupt
            real(sink, rid, row, history)
        monkeypatch.setattr(mlflow_stages, "_log_final_metrics", stopping)
        with pytest.raises(KeyboardInterrupt):
            _stage(monkeypatch, tmp_path, []).finetune_selected(sweep, epochs=EPOCHS, workers=1)
        monkeypatch.setattr(mlflow_stages, "_log_final_metrics", real)
    else:
        _stage(monkeypatch, tmp_path, []).finetune_selected(sweep, epochs=EPOCHS, workers=1)
    client = mlflow.MlflowClient(f"sqlite:///{sweep / 'mlflow.db'}")
    parent = client.get_run(_parent(sweep))
    table = parent.info.artifact_uri.removeprefix("file://") + "/results/final.parquet"
    if stop_in_row is None:
        import os
        os.remove(table)                                     # as if the stage stopped right before logging it
    assert "results/final.parquet" not in {a.path for a in client.list_artifacts(parent.info.run_id, "results")}
    return sweep, client, parent.info.experiment_id


def test_a_stage_stopped_before_the_table_gets_it_and_no_row_is_logged_again(tmp_path, monkeypatch):
    from orchestrator.sync import sync_mlflow

    sweep, client, exp_id = _stopped_stage(tmp_path, monkeypatch, stop_in_row=None)
    children, points = _children(client, exp_id), _state(client, exp_id)
    assert sum(role == "finetune" for role, *_ in children.values()) == 2

    rep = sync_mlflow(sweep)                                 # (it makes the trial runs: make_sweep logged none)
    assert {rid: pts for rid, pts in _state(client, exp_id).items() if rid in points} == points     # every point once
    assert children.items() <= _children(client, exp_id).items()
    assert "final.parquet" in rep.tables_logged and (rep.finetune_runs_recreated, rep.duplicates) == (0, 0)
    assert "results/final.parquet" in {a.path for a in client.list_artifacts(_parent(sweep), "results")}
    state = _state(client, exp_id)
    again = sync_mlflow(sweep)
    assert not again.changed and _state(client, exp_id) == state


def test_a_run_the_stopped_stage_left_unfinished_gets_its_final_row_once(tmp_path, monkeypatch):
    from orchestrator.commands.sync_mlflow import format_report
    from orchestrator.sync import sync_mlflow

    sweep, client, exp_id = _stopped_stage(tmp_path, monkeypatch, stop_in_row=2)
    ids = json.loads((sweep / "mlflow_runs.json").read_text())["finetune"]
    runs = {rid: client.get_run(rid) for rid in ids.values()}
    (done,) = [rid for rid, r in runs.items() if r.info.status == "FINISHED"]
    (left,) = [rid for rid, r in runs.items() if r.info.status == "RUNNING"]
    assert "final_top1" not in runs[left].data.metrics
    done_points = _state(client, exp_id)[done]

    rep = sync_mlflow(sweep)
    state = _state(client, exp_id)
    assert state[done] == done_points                                      # not logged again
    assert state[left]["final_top1"] == [(EPOCHS, 50.0)] and state[left]["final_top5"] == done_points["final_top5"]
    assert client.get_run(left).info.status == "FINISHED" and rep.finetune_runs_completed == 1
    assert "1 fine-tune run that a stopped final stage left unfinished given the final.parquet row" \
        in format_report(rep)
    assert "policy.json" in {a.path for a in client.list_artifacts(left)}
    assert "final.parquet" in rep.tables_logged and rep.duplicates == 0
    again = sync_mlflow(sweep)
    assert not again.changed and _state(client, exp_id) == state
