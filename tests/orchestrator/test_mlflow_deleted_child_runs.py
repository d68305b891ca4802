"""Child runs the store lost while a command logs the sweep, and what the sink costs the store (real SQLite stores,
the final stage without Ray as ``test_sync_deleted_finetune_runs`` runs it): a trial run removed by ``mlflow gc`` is
left alone as a deleted one is (the others go on, MLflow stays on), each said once per run and process whatever the
number of sinks; ``gmpq pareto`` run again logs no point the parent holds; a lost mlflow_parent.json does not read
the whole experiment; a new fine-tune run is not read back; a pickled sink keeps none of this process's state."""
from __future__ import annotations

import logging
import pickle

import mlflow
import pytest

from final_sweep import make_fp32_sweep                          # same folder (pytest puts it on sys.path)
from test_sync_deleted_finetune_runs import _ids, _synced_sweep
from test_sync_deleted_parent_run import _gc, _parent
from test_sync_finetune_series import EPOCHS
from test_final_recipes import _stage


def _pareto(sweep) -> bool:
    """``gmpq pareto``'s MLflow step, on the folder's front."""
    from orchestrator.mlflow_stages import log_pareto
    from orchestrator.results import read_table

    return log_pareto(None, sweep, read_table(sweep / "pareto.parquet").to_pandas(), sweep / "pareto.png")


def _said(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("orchestrator")]


@pytest.mark.parametrize("how", ["deleted", "gc"])
def test_a_lost_trial_run_is_left_alone_said_once_and_the_others_go_on(tmp_path, monkeypatch, caplog, recwarn, how):
    from orchestrator.mlflow_sink import DISABLED

    sweep, client = _synced_sweep(tmp_path, monkeypatch, n=2)
    t1, t2 = _ids(sweep)["trials"]["t1"], _ids(sweep)["trials"]["t2"]
    for rid in (t1, t2):
        client.delete_tag(rid, "pareto")                        # gmpq pareto writes both
    client.delete_run(t1)
    if how == "gc":
        _gc(sweep, t1)
    with caplog.at_level(logging.WARNING, logger="orchestrator.mlflow_sink"):
        assert _pareto(sweep) and _pareto(sweep)                # two commands' sinks, one process
    assert not [w for w in recwarn if str(w.message).startswith(DISABLED)]
    assert client.get_run(t2).data.tags["pareto"] in ("selected", "front")
    state = "is no longer in the store (removed by mlflow gc)" if how == "gc" else "is deleted in the store"
    assert _said(caplog) == [f"MLflow run {t1} (trial t1) {state}: nothing is logged into it; 'gmpq sync-mlflow "
                             f"--sweep {sweep}' makes it again"]


def test_gmpq_pareto_again_logs_no_point_the_parent_holds(tmp_path, monkeypatch):
    sweep, client = _synced_sweep(tmp_path, monkeypatch, n=2)
    parent = _parent(sweep)
    assert _pareto(sweep)
    for key in ("pareto_size", "n_selected"):
        assert len(client.get_metric_history(parent, key)) == 1, key


def test_a_lost_parent_id_file_does_not_read_the_whole_experiment(tmp_path, monkeypatch):
    from orchestrator.mlflow_sink import MLflowSink

    sweep, _ = _synced_sweep(tmp_path, monkeypatch, n=2)
    (sweep / "mlflow_parent.json").unlink()
    searches = []
    search = mlflow.MlflowClient.search_runs

    def spy(self, experiment_ids, filter_string="", *args, **kwargs):
        searches.append(filter_string)
        return search(self, experiment_ids, filter_string, *args, **kwargs)
    monkeypatch.setattr(mlflow.MlflowClient, "search_runs", spy)
    sink = MLflowSink(None, sweep)
    assert sink.connect() and sink.parent_run_id is not None
    assert searches and all(("gmpq.sweep_dir" in f or "run_id IN" in f) and "!=" not in f for f in searches), searches


def test_a_fine_tune_run_made_by_the_stage_is_not_read_back_before_its_metrics(tmp_path, monkeypatch):
    calls: list[tuple[str, str]] = []
    for name in ("get_run", "log_batch", "create_run"):
        real = getattr(mlflow.MlflowClient, name)

        def spy(self, *args, _real=real, _name=name, **kwargs):
            out = _real(self, *args, **kwargs)
            calls.append((_name, out.info.run_id if _name == "create_run" else args[0]))
            return out
        monkeypatch.setattr(mlflow.MlflowClient, name, spy)
    sweep = tmp_path / "sweep"
    make_fp32_sweep(sweep)
    _stage(monkeypatch, tmp_path, []).finetune_selected(sweep, epochs=EPOCHS, workers=1)
    (rid,) = _ids(sweep)["finetune"].values()
    mine = [name for name, r in calls if r == rid]
    assert mine[0] == "create_run" and "get_run" not in mine[:mine.index("log_batch") + 2], mine


def test_a_pickled_sink_keeps_no_state_of_this_process(tmp_path):
    from orchestrator.mlflow_parent import restore_meanwhile
    from orchestrator.mlflow_sink import MLflowSink

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "sweep_config.yaml").write_text("name: p\nmodel: resnet20\n")
    sink = MLflowSink(None, sweep)
    assert sink.connect()
    rid = sink.child_run("trials", "t1", run_name="t1", params={"x": 1}, tags={"trial_id": "t1"})
    sink.deleted_runs.add(rid)
    mlflow.MlflowClient(sink.tracking_uri).delete_run(sink.parent_run_id)
    assert restore_meanwhile(sink)
    assert sink.made_runs == {rid} and sink.__dict__["_restored_meanwhile"] == sink.parent_run_id
    again = pickle.loads(pickle.dumps(sink))
    assert not {"_made_runs", "_restored_meanwhile", "_deleted_runs"} & set(again.__dict__)
    assert again._client is None and not again.made_runs and not again.deleted_runs
    assert again.runs == {"trials": {"t1": rid}, "finetune": {}}       # the persisted ids stay
