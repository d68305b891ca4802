"""Comparing a sweep's runs in MLflow (real SQLite stores, the final stage without Ray):

- a fine-tune run's per-epoch test figures are named as final.parquet and the trial run name them (``final_top1``,
  ``final_top5``, ``final_loss``, ``workers``), so the compare view lines up a trial's and its fine-tune's top-1; a
  fine-tune continued in an earlier version's run keeps that run's ``top1`` series;
- a selected trial run says why (tag ``selection_reason``, dropped once a later front does not select it) and a
  fine-tune run names its trial's run (tag ``trial_run_id``), which names it back;
- every run is described (``mlflow.note.content``): the parent where things are, a trial what became of it, a
  fine-tune whose policy it is; a description a user edited is kept; ``gmpq sync-mlflow`` adds what an earlier
  version's runs lack, once.
"""
from __future__ import annotations

import json

import mlflow
import pandas as pd
import pytest

from final_sweep import make_sweep   # same folder (pytest puts it on sys.path)
from test_final_recipes import _stage   # same folder

pytest.importorskip("ray")

NOTE = "mlflow.note.content"


def _swept(tmp_path, monkeypatch, bits=((3, 4),)):
    """A sweep folder with its trial runs (synced), its front (``gmpq pareto``) and its fine-tunes (one epoch)."""
    from orchestrator.commands.pareto import pareto_stage
    from orchestrator.sync import sync_mlflow

    sweep = tmp_path / "sweep"
    make_sweep(sweep, bits=bits, precision="fp32", workers=1)
    sync_mlflow(sweep)
    pareto_stage(sweep, len(bits), None)
    _stage(monkeypatch, tmp_path, []).finetune_selected(sweep, epochs=1, workers=1)
    client = mlflow.MlflowClient(f"sqlite:///{sweep / 'mlflow.db'}")
    return sweep, client, json.loads((sweep / "mlflow_runs.json").read_text())


def _reason(sweep, tid: str = "t1") -> str:
    front = pd.read_parquet(sweep / "pareto.parquet")
    return str(front.loc[front["trial_id"] == tid, "selection_reason"].item())


def _parent_id(sweep) -> str:
    return json.loads((sweep / "mlflow_parent.json").read_text())["run_id"]


def test_a_fine_tune_run_logs_its_epochs_by_the_names_final_parquet_and_the_trial_run_use(tmp_path, monkeypatch):
    sweep, client, runs = _swept(tmp_path, monkeypatch)
    trial, (ft,) = runs["trials"]["t1"], runs["finetune"].values()
    metrics = client.get_run(ft).data.metrics
    assert not {"top1", "top5", "loss", "world_size"} & metrics.keys()       # no second name for one quantity
    assert metrics["final_top1"] == 50.0 and metrics["final_loss"] == 1.0 and metrics["workers"] == 1
    assert [(m.step, m.value) for m in client.get_metric_history(ft, "final_top1")] == [(1, 50.0)]   # not twice
    shared = client.get_run(trial).data.metrics.keys() & metrics.keys()      # what the compare view lines up
    assert {"final_top1", "transfer_top1", "bitops"} <= shared    # (the fixture's rows have no gbitops)


def test_a_fine_tune_continued_in_an_earlier_versions_run_keeps_its_top1_series(tmp_path, monkeypatch):
    from orchestrator.final_results import read_final
    from orchestrator.mlflow_sink import MLflowSink
    from orchestrator.mlflow_stages import log_final

    sweep, client, runs = _swept(tmp_path, monkeypatch)
    (ft,) = runs["finetune"].values()
    sink = MLflowSink(None, sweep)
    assert sink.connect()
    sink.log_metrics(ft, {"top1": 50.0, "top5": 90.0, "loss": 1.0}, step=1)   # epoch 1 as an earlier version logged it
    row = read_final(sweep).assign(epochs=2, resumed_from_epoch=1, final_top1=51.0, final_loss=0.9)   # continued
    log_final(None, sweep, row, histories={"t1": [{"epoch": 2, "top1": 51.0, "top5": 91.0, "loss": 0.9}]},
              fresh={"t1"})
    assert [(m.step, m.value) for m in client.get_metric_history(ft, "top1")] == [(1, 50.0), (2, 51.0)]
    assert (2, 0.9) in [(m.step, m.value) for m in client.get_metric_history(ft, "final_loss")]


def test_a_selected_trial_run_says_why_and_it_and_its_fine_tune_name_each_other(tmp_path, monkeypatch):
    sweep, client, runs = _swept(tmp_path, monkeypatch)
    trial, (ft,) = runs["trials"]["t1"], runs["finetune"].values()
    tags = client.get_run(trial).data.tags
    assert tags["pareto"] == "selected" and tags["selection_reason"] == _reason(sweep) != ""
    assert tags["finetune_run_id"] == ft and client.get_run(ft).data.tags["trial_run_id"] == trial
    mlflow.set_tracking_uri(f"sqlite:///{sweep / 'mlflow.db'}")
    found = mlflow.search_runs(experiment_names=["ft"], filter_string="tags.selection_reason != ''")
    assert list(found["run_id"]) == [trial]


def test_a_trial_a_later_front_does_not_select_loses_its_selection_reason(tmp_path, monkeypatch):
    from orchestrator.mlflow_stages import log_pareto

    sweep, client, runs = _swept(tmp_path, monkeypatch, bits=((3, 4), (4, 4)))
    front = pd.read_parquet(sweep / "pareto.parquet")
    assert client.get_run(runs["trials"]["t2"]).data.tags.get("selection_reason")
    log_pareto(None, sweep, front.assign(selected=front["trial_id"] == "t1"), None)
    tags = client.get_run(runs["trials"]["t2"]).data.tags
    assert tags["pareto"] == "front" and "selection_reason" not in tags
    assert "on the front, not selected" in tags[NOTE]


def test_every_run_is_described_and_a_description_a_user_edited_is_kept(tmp_path, monkeypatch):
    from orchestrator.mlflow_stages import log_pareto

    sweep, client, runs = _swept(tmp_path, monkeypatch)
    trial, (ft,) = runs["trials"]["t1"], runs["finetune"].values()
    parent = client.get_run(_parent_id(sweep)).data.tags[NOTE]
    assert "pareto/pareto_table.json" in parent and "`t1`" in parent and _reason(sweep) in parent
    assert "Fine-tuned (final.parquet): `t1` 50.00%" in parent
    note = client.get_run(trial).data.tags[NOTE]
    assert f"selected for the final fine-tune ({_reason(sweep)})" in note and ft in note and "50.00%" in note
    assert trial in client.get_run(ft).data.tags[NOTE]
    client.set_tag(trial, NOTE, "my pick")                         # the UI's description, edited by hand
    log_pareto(None, sweep, pd.read_parquet(sweep / "pareto.parquet"), None)
    assert client.get_run(trial).data.tags[NOTE] == "my pick"


def test_a_new_sweeps_parent_run_describes_its_layout_and_a_studys_does_not(tmp_path):
    from experiments.generalization_ray import StudySink
    from orchestrator.mlflow_sink import MLflowSink

    make_sweep(tmp_path / "sweep")
    sink = MLflowSink(None, tmp_path / "sweep")
    assert sink.connect()
    note = sink.client.get_run(sink.parent_run_id).data.tags[NOTE]
    assert note.startswith("GMPQ sweep `ft`") and "tags.pareto = 'selected'" in note
    study = StudySink(f"sqlite:///{tmp_path / 'study.db'}", tmp_path / "study", experiment_name="s",
                      resolved_config={"name": "s"})
    assert study.connect()
    assert NOTE not in study.client.get_run(study.parent_run_id).data.tags


def test_sync_links_and_describes_the_runs_of_an_earlier_version_once(tmp_path, monkeypatch):
    from orchestrator.commands.sync_mlflow import format_report
    from orchestrator.sync import sync_mlflow

    sweep, client, runs = _swept(tmp_path, monkeypatch)
    trial, (ft,) = runs["trials"]["t1"], runs["finetune"].values()
    for rid, tags in ((trial, ("selection_reason",)), (ft, ("trial_run_id",)), (_parent_id(sweep), ())):
        for tag in (*tags, NOTE, "gmpq.note_digest"):                # as an earlier version left them
            client.delete_tag(rid, tag)
    rep = sync_mlflow(sweep)
    assert rep.runs_tagged == 3 and "3 runs given their Pareto / fine-tune links" in format_report(rep)
    assert client.get_run(trial).data.tags["selection_reason"] == _reason(sweep) != ""
    assert client.get_run(ft).data.tags["trial_run_id"] == trial
    assert all(NOTE in client.get_run(r).data.tags for r in (trial, ft, _parent_id(sweep)))
    again = sync_mlflow(sweep)
    assert again.runs_tagged == 0 and not again.changed


def test_a_trials_numeric_config_is_also_a_metric_so_runs_sort_by_it_as_numbers(tmp_path):
    """Params are text in MLflow ('7e-05' sorts after '0.0004', '1000' before '500'): the sampled numbers are also
    metrics named as trials.parquet's columns, once per run (a resumed sweep adds no second point); a value the trial
    reports under its own name (``budget_avg_bits``) and what is not a number stay as they were."""
    from types import SimpleNamespace

    from orchestrator.mlflow_callback import MLflowCallback

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    configs = {"a": {"lam": 7e-05, "proxy_size": 1000, "p_mode": "fixed", "budget_avg_bits": 3.5, "flag": True},
               "b": {"lam": 0.0004, "proxy_size": 500, "p_mode": "capacity", "budget_avg_bits": 4.0, "flag": False}}
    for _ in range(2):                                              # the sweep, then the sweep resumed
        cb = MLflowCallback(uri, "num", tmp_path, {"name": "num"}, None, background=False)
        cb.setup()
        for tid, config in configs.items():
            cb.on_trial_start(0, [], SimpleNamespace(trial_id=tid, config=config, last_result={}))
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["num"], filter_string="metrics.param_lam > 0.0001")
    assert list(runs["tags.trial_id"]) == ["b"]
    order = mlflow.search_runs(experiment_names=["num"], order_by=["metrics.param_proxy_size DESC"],
                               filter_string="tags.`gmpq.role` = 'trial'")
    assert list(order["tags.trial_id"]) == ["a", "b"]
    client = mlflow.MlflowClient(uri)
    rid = runs["run_id"].item()
    metrics = client.get_run(rid).data.metrics
    assert {k for k in metrics if k.startswith("param_")} == {"param_lam", "param_proxy_size"}
    assert len(client.get_metric_history(rid, "param_lam")) == 1
