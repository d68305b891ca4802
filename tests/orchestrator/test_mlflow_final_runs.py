"""What the MLflow view shows after the sweep: the parent run's view of the final stage's settings (its params are
immutable), a fine-tune restarted from scratch, and sweeps that share a ``--name`` (so an experiment). The final
stage without Ray (``final_sweep._stage_without_ray``) on a real SQLite MLflow store."""
from __future__ import annotations

import json

import mlflow
import pytest

from test_final_recipes import _edit_config, _finetune_runs, _stage   # same folder (pytest puts it on sys.path)
from final_sweep import make_sweep


def _parent(sweep, uri: str | None = None):
    from orchestrator.mlflow_sink import PARENT_FILE

    client = mlflow.MlflowClient(uri or f"sqlite:///{sweep / 'mlflow.db'}")
    return client.get_run(json.loads((sweep / PARENT_FILE).read_text())["run_id"])


def _sink_disabled(recwarn) -> list[str]:
    from orchestrator.mlflow_sink import DISABLED

    return [str(w.message) for w in recwarn if str(w.message).startswith(DISABLED)]


def test_the_parent_run_tags_the_settings_the_final_stage_last_ran_with(tmp_path, monkeypatch, recwarn):
    """The parent's params stay the sweep's first config (MLflow refuses a new value); its last_finetune.* tags
    follow a changed finetune: section and the command line's settings (no tag shares a param's key)."""
    sweep = tmp_path / "sweep"
    make_sweep(sweep, precision="fp32")
    final_stage = _stage(monkeypatch, tmp_path, [])
    final_stage.finetune_selected(sweep, epochs=1, workers=1)
    tags = _parent(sweep).data.tags
    assert (tags["last_finetune.lr"], tags["last_finetune.epochs"], tags["last_finetune.precision"]) == \
        ("0.01", "1", "fp32")
    _edit_config(sweep, finetune={"lr": 0.05, "epochs": 2})
    final_stage.finetune_selected(sweep, workers=1)
    parent = _parent(sweep)
    assert parent.data.params["finetune.lr"] == "0.01"                 # as the sweep started: params cannot change
    assert (parent.data.tags["last_finetune.lr"], parent.data.tags["last_finetune.epochs"]) == ("0.05", "2")
    assert not parent.data.tags.keys() & parent.data.params.keys()
    final_stage.finetune_selected(sweep, epochs=2, workers=1, lr=0.2)  # gmpq finetune --sweep DIR --lr 0.2
    assert _parent(sweep).data.tags["last_finetune.lr"] == "0.2"
    assert sorted(_finetune_runs(sweep)["params.recipe.lr"]) == ["0.01", "0.05", "0.2"]
    assert _sink_disabled(recwarn) == []


def test_a_param_logged_with_another_value_is_kept_without_disabling_the_sink(tmp_path, recwarn):
    from orchestrator.mlflow_sink import MLflowSink

    sweep = tmp_path / "sweep"
    make_sweep(sweep)
    sink = MLflowSink(None, sweep)
    assert sink.connect()
    kept = sink.log_params(sink.parent_run_id, {"finetune.lr": 0.05, "finetune.top_k": 1, "extra": "x"})
    assert kept == {"finetune.lr": "0.05"} and sink.enabled and _sink_disabled(recwarn) == []
    params = _parent(sweep).data.params
    assert (params["finetune.lr"], params["finetune.top_k"], params["extra"]) == ("0.01", "1", "x")


@pytest.mark.parametrize("ids_lost", [False, True])
def test_a_fine_tune_restarted_from_scratch_in_the_same_recipe_gets_a_run_that_says_so(tmp_path, monkeypatch,
                                                                                       ids_lost):
    """Its checkpoint gone, a continued fine-tune restarts at epoch 1: its history goes to a new run named and tagged
    as a restart, not into the old run's series (also when mlflow_runs.json lost the old run: found by its tags)."""
    from orchestrator.mlflow_sink import RUNS_FILE

    sweep = tmp_path / "sweep"
    make_sweep(sweep)
    final_stage = _stage(monkeypatch, tmp_path, [])            # the workers report resumed_from_epoch 0: afresh
    final_stage.finetune_selected(sweep, epochs=1, workers=1)
    if ids_lost:
        ids = json.loads((sweep / RUNS_FILE).read_text())
        (sweep / RUNS_FILE).write_text(json.dumps({**ids, "finetune": {}}))
    said: list[str] = []
    final_stage.finetune_selected(sweep, epochs=2, workers=1, say=said.append)
    assert any("fine-tuned afresh from epoch 1, not continued" in m for m in said), said
    ft = _finetune_runs(sweep)
    assert ft["tags.mlflow.runName"].tolist() == ["finetune-t1", "finetune-t1 (restart 1)"]
    old, new = ft["run_id"]
    assert ft["tags.gmpq.restarted_from"].tolist()[1] == old and ft["tags.gmpq.replaced_by"].tolist()[0] == new
    client = mlflow.MlflowClient()
    assert [m.value for m in client.get_metric_history(old, "epochs")] == [1.0]      # its own history only
    assert [m.value for m in client.get_metric_history(new, "epochs")] == [2.0]
    final_stage.finetune_selected(sweep, epochs=2, workers=1)                      # done: nothing new
    assert len(_finetune_runs(sweep)) == 2


def test_sweeps_sharing_a_name_and_a_store_keep_their_own_parent_runs(tmp_path, monkeypatch):
    """Two --out folders, one --name, one tracking store: one experiment, a parent run per folder (named and tagged
    by its folder), and a lost id file finds the folder's own parent again, not the other sweep's."""
    from orchestrator.mlflow_sink import PARENT_FILE, RUNS_FILE, MLflowSink
    from orchestrator.sync import sync_mlflow

    uri = f"sqlite:///{tmp_path / 'shared.db'}"
    a, b = tmp_path / "a" / "ft", tmp_path / "b" / "ft"
    for d in (a, b):
        make_sweep(d)
        assert MLflowSink(uri, d).connect()
    pa, pb = _parent(a, uri), _parent(b, uri)
    assert pa.info.experiment_id == pb.info.experiment_id and pa.info.run_id != pb.info.run_id
    assert (pa.data.tags["gmpq.sweep_dir"], pb.data.tags["gmpq.sweep_dir"]) == (str(a.resolve()), str(b.resolve()))
    assert (pa.info.run_name, pb.info.run_name) == ("ft", f"ft ({b.resolve()})")
    for name in (PARENT_FILE, RUNS_FILE):
        (b / name).unlink(missing_ok=True)
    report = sync_mlflow(b, tracking_uri=uri)
    _stage(monkeypatch, tmp_path, []).finetune_selected(b, epochs=1, workers=1, tracking_uri=uri)
    assert report.parent_run_id == pb.info.run_id and _parent(b, uri).info.run_id == pb.info.run_id
    client = mlflow.MlflowClient(uri)
    children = client.search_runs([pa.info.experiment_id], "tags.`gmpq.role` != 'sweep'")
    assert {r.data.tags["gmpq.role"] for r in children} == {"trial", "finetune"}
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {pb.info.run_id}


def test_a_shared_sqlite_stores_artifacts_live_beside_it_not_in_the_first_sweeps_folder(tmp_path):
    """Sweeps of one --name on a SQLite store outside their folders share its experiment: its artifacts go beside
    the store (deleting the first sweep's folder took every later sweep's models with it); a sweep's own store
    keeps them in its folder."""
    import shutil

    from orchestrator.mlflow_sink import MLflowSink

    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    first, second, own = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for sweep in (first, second, own):
        make_sweep(sweep)
    for sweep in (first, second):
        sink = MLflowSink(uri, sweep)
        assert sink.connect()
        sink.client.log_text(sink.parent_run_id, f"made by {sweep.name}", "note.txt")
    client = mlflow.MlflowClient(uri)
    assert client.get_experiment_by_name("ft").artifact_location == (tmp_path / "store" / "mlartifacts").as_uri()
    shutil.rmtree(first)
    run = _parent(second, uri)
    assert client.download_artifacts(run.info.run_id, "note.txt", str(tmp_path)) and \
        (tmp_path / "note.txt").read_text() == "made by b"
    sink = MLflowSink(None, own)
    assert sink.connect()
    assert sink.client.get_experiment(sink._experiment_id).artifact_location == (own.resolve() / "mlartifacts").as_uri()
