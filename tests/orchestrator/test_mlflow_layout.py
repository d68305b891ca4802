"""What a trial's MLflow run says, and runs of earlier versions read back (real SQLite stores, no Ray cluster):

- one name, one quantity (as trials.parquet names them): ``proxy_top1`` / ``ard`` are a completed trial's derived
  policy's, ``supernet_proxy_top1`` / ``supernet_ard`` the supernet's per search epoch; a run an earlier version
  logged (the supernet's under the plain names, the policy's as ``policy_*``) keeps its names when a resumed sweep
  or ``gmpq sync-mlflow`` completes it, and one that is complete is left alone;
- every completed trial's run is tagged ``pareto`` = selected / front / dominated (pruned ones not);
- a fine-tuned policy's trial run names its fine-tune run (tag ``finetune_run_id``) and its ``final_top1``; the
  fine-tune run logs the cost as the trial run does (``bitops``, ``gbitops``);
- the parent run's params stay the sweep's config: the final stage's settings are ``last_finetune.*`` tags, and the
  ``finetune.*`` tags earlier versions wrote beside the params of those names are dropped.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import mlflow
import pytest

from final_sweep import make_sweep   # same folder (pytest puts it on sys.path)
from test_final_recipes import _stage   # same folder

pytest.importorskip("ray")


def _history(client, rid: str, *keys: str) -> dict[str, list[tuple]]:
    return {k: [(m.step, m.value) for m in client.get_metric_history(rid, k)] for k in keys}


def _old_run(sink, tid: str, metrics_by_step: dict[int, dict], status: str | None = None) -> str:
    """A trial run as an earlier version logged it (``metrics_by_step`` under the names given)."""
    rid = sink.child_run("trials", tid, run_name=tid, params={},
                         tags={"trial_id": tid, "status": status or "running", "gmpq.role": "trial"})
    for step, metrics in metrics_by_step.items():
        sink.log_metrics(rid, metrics, step=step)
    return rid


KEYS = ("proxy_top1", "ard", "supernet_proxy_top1", "supernet_ard", "policy_proxy_top1", "policy_ard")


def test_a_resumed_sweep_logs_new_trials_by_the_new_names_and_an_earlier_versions_run_by_its_own(tmp_path):
    from orchestrator.mlflow_callback import MLflowCallback

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    before = MLflowCallback(uri, "cbt", tmp_path, {"name": "cbt"}, None, background=False)
    before.setup()                                   # the earlier version logged epoch 1 of "old", then stopped
    _old_run(before.sink, "old", {1: {"proxy_top1": 11.0, "ard": 0.5, "ce": 2.0}})
    before.on_experiment_end([])

    cb = MLflowCallback(uri, "cbt", tmp_path, {"name": "cbt"}, None, background=False)     # resumed
    cb.setup()
    old, new = (SimpleNamespace(trial_id=t, config={}, last_result={}) for t in ("old", "new"))
    for trial, epoch in ((old, 2), (new, 1)):
        cb.on_trial_start(0, [], trial)
        cb.on_trial_result(0, [], trial, {"phase": "search", "epoch": epoch, "proxy_top1": 12.0, "ard": 0.45,
                                          "ce": 1.9})
        trial.last_result = {"phase": "transfer", "epoch": epoch, "done": True, "proxy_top1": 30.0, "ard": 0.2,
                             "transfer_top1": 20.5}
        cb.on_trial_complete(0, [], trial)
    client = mlflow.MlflowClient(uri)
    assert _history(client, cb.sink.runs["trials"]["new"], *KEYS) == {
        "proxy_top1": [(1, 30.0)], "ard": [(1, 0.2)], "supernet_proxy_top1": [(1, 12.0)], "supernet_ard": [(1, 0.45)],
        "policy_proxy_top1": [], "policy_ard": []}
    old_rid = cb.sink.runs["trials"]["old"]
    expected_old = {"proxy_top1": [(1, 11.0), (2, 12.0)], "ard": [(1, 0.5), (2, 0.45)], "supernet_proxy_top1": [],
                    "supernet_ard": [], "policy_proxy_top1": [(2, 30.0)], "policy_ard": [(2, 0.2)]}
    assert _history(client, old_rid, *KEYS) == expected_old

    again = MLflowCallback(uri, "cbt", tmp_path, {"name": "cbt"}, None, background=False)  # crashed, rerun by Tune
    again.setup()
    old.last_result = {**old.last_result, "phase": "replay", "replayed": True}
    again.on_trial_start(0, [], old)
    again.on_trial_complete(0, [], old)
    assert _history(client, old_rid, *KEYS) == expected_old           # complete: nothing logged again


def test_sync_completes_a_new_run_by_the_new_names_and_leaves_an_earlier_versions_complete_run_alone(tmp_path):
    from orchestrator.mlflow_sink import FINAL_METRICS, MLflowSink
    from orchestrator.results import TRIALS_FILE, read_trials
    from orchestrator.sync import sync_mlflow

    sweep = tmp_path / "sweep"
    make_sweep(sweep, bits=((3, 4), (4, 4)))
    df = read_trials(sweep)
    df["proxy_top1"], df["ard"], df["last_epoch"] = 33.0, 0.2, 2
    df.to_parquet(sweep / TRIALS_FILE)
    rows = {r["trial_id"]: r for r in df.to_dict("records")}
    sink = MLflowSink(None, sweep)
    assert sink.connect()
    for tid, legacy in (("t1", True), ("t2", False)):
        final = {k: rows[tid][k] for k in FINAL_METRICS if k not in ("proxy_top1", "ard")}
        if legacy:                 # all of it, as an earlier version logged it
            epoch = {"proxy_top1": 14.0, "ard": 0.4, "ce": 2.0}
            final.update(policy_proxy_top1=33.0, policy_ard=0.2)
        else:                      # stopped before the policy's proxy_top1 and ard were logged
            epoch = {"supernet_proxy_top1": 14.0, "supernet_ard": 0.4, "ce": 2.0}
        rid = _old_run(sink, tid, {1: epoch, 2: final}, status="completed")
        sink.client.log_text(rid, rows[tid]["policy_json"], "policy.json")
        sink.finish(rid, "FINISHED")
    rep = sync_mlflow(sweep)
    assert (rep.runs_created, rep.runs_updated, rep.runs_unchanged, rep.duplicates) == (0, 1, 1, 0)
    client = mlflow.MlflowClient(f"sqlite:///{sweep / 'mlflow.db'}")
    assert _history(client, sink.runs["trials"]["t2"], *KEYS) == {
        "proxy_top1": [(2, 33.0)], "ard": [(2, 0.2)], "supernet_proxy_top1": [(1, 14.0)], "supernet_ard": [(1, 0.4)],
        "policy_proxy_top1": [], "policy_ard": []}
    assert _history(client, sink.runs["trials"]["t1"], *KEYS) == {
        "proxy_top1": [(1, 14.0)], "ard": [(1, 0.4)], "supernet_proxy_top1": [], "supernet_ard": [],
        "policy_proxy_top1": [(2, 33.0)], "policy_ard": [(2, 0.2)]}
    again = sync_mlflow(sweep)
    assert (again.runs_updated, again.runs_unchanged) == (0, 2)


def test_pareto_tags_every_completed_trials_run_selected_front_or_dominated_and_a_pruned_one_not(tmp_path):
    from orchestrator.commands.pareto import pareto_stage
    from orchestrator.results import TRIALS_FILE, read_trials
    from orchestrator.sync import sync_mlflow

    sweep = tmp_path / "sweep"
    make_sweep(sweep, bits=((3, 4), (4, 4), (6, 6), (5, 5)))    # top-1 60, 65, 70, 75 as the cost grows
    df = read_trials(sweep)
    df.loc[df["trial_id"] == "t2", "transfer_top1"] = 58.0      # costlier than t1 and less accurate: dominated
    df.loc[df["trial_id"] == "t4", ["status", "transfer_top1"]] = ["pruned", float("nan")]
    df.to_parquet(sweep / TRIALS_FILE)
    sync_mlflow(sweep)                                          # the trials' runs
    front = pareto_stage(sweep, 1, None)
    assert sorted(front["trial_id"]) == ["t1", "t3"] and int(front["selected"].sum()) == 1
    client = mlflow.MlflowClient(f"sqlite:///{sweep / 'mlflow.db'}")
    runs = json.loads((sweep / "mlflow_runs.json").read_text())["trials"]
    tags = {tid: client.get_run(rid).data.tags.get("pareto") for tid, rid in runs.items()}
    chosen = front.loc[front["selected"], "trial_id"].item()
    assert tags == {"t1": "selected" if chosen == "t1" else "front", "t3": "selected" if chosen == "t3" else "front",
                    "t2": "dominated", "t4": None}


def test_a_fine_tuned_policys_trial_run_names_its_fine_tune_run_and_the_parent_tags_say_the_last_finetune(
        tmp_path, monkeypatch):
    from orchestrator.final_results import read_final
    from orchestrator.mlflow_sink import PARENT_FILE
    from orchestrator.sync import sync_mlflow

    sweep = tmp_path / "sweep"
    make_sweep(sweep, precision="fp32")
    sync_mlflow(sweep)                                          # the parent and t1's run
    client = mlflow.MlflowClient(f"sqlite:///{sweep / 'mlflow.db'}")
    pid = json.loads((sweep / PARENT_FILE).read_text())["run_id"]
    client.set_tag(pid, "finetune.train_size", "500")           # as an earlier version's final stage tagged it
    final_stage = _stage(monkeypatch, tmp_path, [])
    for lr in (None, 0.2):                                      # a second recipe: the pointer follows it
        final_stage.finetune_selected(sweep, epochs=1, workers=1, **({"lr": lr} if lr else {}))
        runs = json.loads((sweep / "mlflow_runs.json").read_text())
        trial = client.get_run(runs["trials"]["t1"]).data
        finetune_rid = trial.tags["finetune_run_id"]
        assert client.get_run(finetune_rid).data.params.get("recipe.lr") == str(lr or 0.01)
        assert finetune_rid in runs["finetune"].values()
        assert trial.metrics["final_top1"] == pytest.approx(read_final(sweep)["final_top1"].item())
        ft = client.get_run(finetune_rid).data.metrics          # the trial run's cost names, GBitOPs included
        assert ft["bitops"] == trial.metrics["bitops"] and ft["gbitops"] == pytest.approx(ft["bitops"] / 1e9)
    parent = client.get_run(pid).data
    assert parent.tags["last_finetune.lr"] == "0.2" and parent.params["finetune.lr"] == "0.01"
    assert not parent.tags.keys() & parent.params.keys()        # no key both a param and a tag


def test_sync_gives_trial_runs_the_pareto_and_fine_tune_tags_an_earlier_version_did_not_set(tmp_path, monkeypatch):
    """A sweep whose Pareto and final tables an earlier version logged: its trial runs lack ``pareto``,
    ``finetune_run_id`` and ``final_top1``; ``gmpq sync-mlflow`` sets them once (a second sync changes nothing)."""
    from orchestrator.commands.pareto import pareto_stage
    from orchestrator.commands.sync_mlflow import format_report
    from orchestrator.final_results import read_final
    from orchestrator.sync import sync_mlflow

    sweep = tmp_path / "sweep"
    make_sweep(sweep, precision="fp32")
    sync_mlflow(sweep)
    pareto_stage(sweep, 1, None)
    _stage(monkeypatch, tmp_path, []).finetune_selected(sweep, epochs=1, workers=1)
    client = mlflow.MlflowClient(f"sqlite:///{sweep / 'mlflow.db'}")
    runs = json.loads((sweep / "mlflow_runs.json").read_text())
    rid = runs["trials"]["t1"]
    want = client.get_run(rid).data
    assert want.tags["pareto"] == "selected" and want.tags["finetune_run_id"] in runs["finetune"].values()
    for tag in ("pareto", "finetune_run_id"):                   # as an earlier version left the trial run
        client.delete_tag(rid, tag)
    rep = sync_mlflow(sweep)
    got = client.get_run(rid).data
    assert rep.runs_tagged == 1 and rep.changed and "1 run given their Pareto / fine-tune links" in format_report(rep)
    assert got.tags["pareto"] == "selected" and got.tags["finetune_run_id"] == want.tags["finetune_run_id"]
    assert got.metrics["final_top1"] == pytest.approx(read_final(sweep)["final_top1"].item())
    again = sync_mlflow(sweep)
    assert again.runs_tagged == 0 and not again.changed
