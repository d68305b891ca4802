"""Service faults: an MLflow tracking server that is down at the start or stops mid-sweep.

Trials must not fail, Parquet must hold every result, the sweep must warn, and ``gmpq sync-mlflow``
must upload what is missing once the server is back, creating nothing on a second run.
The first test drives ``orchestrator.sync`` on a sweep folder in every partial state a dead server can
leave (real SQLite MLflow store, no Ray); the others run real ``gmpq sweep`` / ``gmpq mlflow-server``
processes on loopback.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from faults import (Procs, count_duplicates, fake_sweep_dir, free_port, mlflow_children, tiny_config, trials_table,
                    write_config)
from scenarios import mlflow_down_mid_sweep

@pytest.mark.slow      # ~10 s: MLflow creates its SQLite schema
def test_sync_completes_every_partial_state_and_a_second_sync_changes_nothing(tmp_path):
    from mlflow.tracking import MlflowClient

    from orchestrator.mlflow_sink import RUNS_FILE, MLflowSink, default_tracking_uri
    from orchestrator.sync import sync_mlflow

    d = tmp_path / "sweep"
    rows = fake_sweep_dir(d)
    uri = default_tracking_uri(d)
    # What a server that died mid-sweep leaves: t0 fully logged, t1 created and half logged (RUNNING),
    # t2 and t3 never logged; then the id file is damaged, so only the trial_id tags can find t0 and t1.
    sink = MLflowSink(uri, d, experiment_name="synct", resolved_config={"name": "synct"})
    assert sink.connect()
    r0 = sink.child_run("trials", "t0", run_name="t0", params={"eta": 10.0}, tags={"trial_id": "t0", "gmpq.role": "trial"})
    sink.log_metrics(r0, {"proxy_top1": 40.0, "ce": 1.0}, step=1)
    sink.log_metrics(r0, {k: rows[0][k] for k in ("proxy_top1", "transfer_top1", "bitops", "gbitops", "ard", "p",
                                                  "budget_avg_bits")}, step=2)
    sink.client.log_text(r0, rows[0]["policy_json"], "policy.json")
    sink.finish(r0, "FINISHED", {"status": "completed"})
    r1 = sink.child_run("trials", "t1", run_name="t1", params={"eta": 10.0}, tags={"trial_id": "t1", "gmpq.role": "trial"})
    sink.log_metrics(r1, {"proxy_top1": 41.0, "ce": 1.0}, step=1)
    (d / RUNS_FILE).write_text('{"tracking_uri": "' + uri + '", "trials": {"t0": "')      # truncated

    first = sync_mlflow(d)
    assert (first.runs_created, first.runs_updated, first.runs_unchanged) == (2, 1, 1)
    assert not first.parent_created and first.duplicates == 0 and first.changed
    client = MlflowClient(uri)
    _, kids = mlflow_children(uri, "synct")
    assert sorted(kids["trial_id"]) == ["t0", "t1", "t2", "t3"] and count_duplicates(kids["trial_id"]) == 0
    by = kids.set_index("trial_id")
    assert by.loc["t0", "run_id"] == r0 and by.loc["t1", "run_id"] == r1          # found again by their tags
    assert dict(by["status"]) == {"t0": "FINISHED", "t1": "FINISHED", "t2": "KILLED", "t3": "FAILED"}
    assert dict(by["tag_status"]) == {"t0": "completed", "t1": "completed", "t2": "pruned", "t3": "failed"}
    assert "NonFiniteLossError" in by.loc["t3", "error"]
    assert by.loc["t1", "metrics"]["transfer_top1"] == 51.0
    assert by.loc["t2", "metrics"]["supernet_proxy_top1"] == 42.0     # pruned: the supernet's, by its own name
    assert [a.path for a in client.list_artifacts(r1)] == ["policy.json"]
    assert client.get_run(by.loc["t2", "run_id"]).data.params["budget_avg_bits"] == "5.0"
    assert client.get_run(first.parent_run_id).info.status == "FINISHED"      # every trial has its row

    second = sync_mlflow(d)
    assert (second.runs_created, second.runs_updated, second.runs_unchanged) == (0, 0, 4) and not second.changed
    runs, kids2 = mlflow_children(uri, "synct")
    assert len(kids2) == 4 and len(runs) == 5
    assert len(client.get_metric_history(r1, "transfer_top1")) == 1          # completed once, not twice


def test_sync_refuses_clearly_when_the_server_is_down(tmp_path, capsys):
    from orchestrator.cli import main

    d = tmp_path / "sweep"
    fake_sweep_dir(d)
    rc = main(["sync-mlflow", "--sweep", str(d), "--tracking-uri", f"http://127.0.0.1:{free_port()}"])
    err = capsys.readouterr().err
    assert rc == 2 and "Cannot sync" in err and "Connection refused" in err and "Traceback" not in err
    assert "Work goes on" not in err          # the sink's "goes on" sentence is dropped from the reason
    assert not (d / "mlflow_parent.json").exists()


def test_sync_of_a_damaged_results_file_names_it(tmp_path, capsys):
    from orchestrator.cli import main

    d = tmp_path / "sweep"
    fake_sweep_dir(d)
    data = (d / "trials.parquet").read_bytes()
    (d / "trials.parquet").write_bytes(data[: len(data) // 2])
    rc = main(["sync-mlflow", "--sweep", str(d)])
    err = capsys.readouterr().err
    assert rc == 2 and "trials.parquet" in err and "Traceback" not in err


# -- real processes ------------------------------------------------------------------------------------

def _sweep_args(root: Path, cfg: dict, uri: str) -> list[str]:
    path = write_config(root / f"{cfg['name']}.yaml", cfg)
    return ["sweep", "--config", str(path), "--out", str(root / cfg["name"]), "--tracking-uri", uri]


def _check_synced(procs: Procs, sweep_dir: Path, uri: str, name: str, n_trials: int) -> tuple[dict, dict]:
    rc, out = procs.run(["sync-mlflow", "--sweep", str(sweep_dir), "--json"], f"{name}-sync1")
    assert rc == 0, out[-3000:]
    first = json.loads(out.strip().splitlines()[-1])
    rc, out = procs.run(["sync-mlflow", "--sweep", str(sweep_dir), "--json"], f"{name}-sync2")
    assert rc == 0, out[-3000:]
    second = json.loads(out.strip().splitlines()[-1])
    assert not second["changed"] and second["runs_unchanged"] == n_trials, second
    df = trials_table(sweep_dir)
    runs, kids = mlflow_children(uri, name)
    assert sorted(kids["trial_id"]) == sorted(df["trial_id"]) and count_duplicates(kids["trial_id"]) == 0
    assert len(runs[runs["role"] == "sweep"]) == 1
    by = kids.set_index("trial_id")
    for row in df.to_dict("records"):
        run = by.loc[row["trial_id"]]
        assert run["tag_status"] == row["status"] and run["status"] == "FINISHED"
        assert run["metrics"]["transfer_top1"] == pytest.approx(row["transfer_top1"])
        assert run["metrics"].get("ce") is not None          # per-epoch series (replayed from Tune's files)
    return first, second


@pytest.mark.ray
@pytest.mark.slow
def test_server_down_at_start_then_sync(tmp_path):
    procs = Procs(tmp_path / "logs")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    cfg = tiny_config(name="down", n_trials=2, cache_dir=str(tmp_path / "cache"))
    try:
        rc, out = procs.run(_sweep_args(tmp_path, cfg, uri), "down-sweep")
        assert rc == 0, out[-4000:]
        assert "MLflow logging disabled" in out and "gmpq sync-mlflow" in out       # the warning says so
        df = trials_table(tmp_path / "down")
        assert len(df) == 2 and set(df["status"]) == {"completed"}                  # no trial failed
        rc, out = procs.run(["mlflow-server", "--port", str(port), "--dir", str(tmp_path / "mlf"), "--detach"], "srv")
        assert rc == 0 and uri in out, out[-2000:]
        first, _ = _check_synced(procs, tmp_path / "down", uri, "down", 2)
        assert first["parent_created"] and first["runs_created"] == 2
    finally:
        procs.run(["mlflow-server", "--stop", "--dir", str(tmp_path / "mlf")], "srv-stop")
        assert procs.stop_all() == []


@pytest.mark.ray
@pytest.mark.slow
def test_server_stopped_mid_sweep_then_restarted_and_synced(tmp_path):
    procs = Procs(tmp_path / "logs")
    o = None
    try:
        o = mlflow_down_mid_sweep(tmp_path, procs, tmp_path / "cache", keep_server=True)
        runs, kids = mlflow_children(o.paths["tracking_uri"], "flaky")   # while the restarted server still runs
    finally:
        if o is not None and "mlflow_dir" in o.paths:
            procs.run(["mlflow-server", "--stop", "--dir", o.paths["mlflow_dir"]], "server2-stop")
        assert procs.stop_all() == []
    assert o.ok, o.notes
    assert (o.rows_lost, o.duplicate_rows, o.runs_lost, o.duplicate_runs) == (0, 0, 0, 0), o
    assert o.trials_attempted == 3 and o.trials_failed == 0 and o.attempts == 3     # no trial failed or reran
    df = trials_table(Path(o.paths["sweep_dir"]))
    assert len(df) == 3 and set(df["status"]) == {"completed"}
    assert len(runs[runs["role"] == "sweep"]) == 1 and len(kids) == 3
    assert all(m.get("ce") is not None and m.get("transfer_top1") is not None for m in kids["metrics"])
