"""``gmpq sync-mlflow --sweep DIR --tracking-uri http://server`` on a sweep that logs to its own SQLite store: the
folder's id files (mlflow_parent.json, mlflow_runs.json) keep naming the sweep's own store and runs. They used to be
rewritten for the server, and a later plain sync wrote them back with an empty fine-tune map, so the next final
stage logged its fine-tunes' metrics a second time (found by their tags, the runs themselves were not duplicated). A
real SQLite store and a real ``gmpq mlflow-server``; the final stage without Ray (``test_final_recipes._stage``)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from test_final_recipes import _stage          # same folder (pytest puts it on sys.path)
from final_sweep import make_sweep

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def server(tmp_path):
    """A detached ``gmpq mlflow-server`` (its own SQLite store); its URI. Stopped at the end."""
    from cluster.mlflow_server import stop_mlflow_server

    d = tmp_path / "server"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "mlflow-server", "--port", "0", "--dir", str(d),
                           "--detach"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=200)
    try:
        assert done.returncode == 0, done.stderr[-2000:]
        yield done.stdout.strip().splitlines()[-1]
    finally:
        stop_mlflow_server(d, grace_s=2.0)


def _id_files(sweep: Path) -> dict:
    from orchestrator.mlflow_sink import PARENT_FILE, RUNS_FILE

    return {name: json.loads((sweep / name).read_text()) for name in (PARENT_FILE, RUNS_FILE)}


def _runs(uri: str) -> dict[str, list]:
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("ft")
    by_role: dict[str, list] = {}
    for r in client.search_runs([exp.experiment_id], max_results=1000):
        by_role.setdefault(r.data.tags.get("gmpq.role"), []).append(r)
    return by_role


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_syncing_to_another_store_and_back_keeps_the_sweeps_own_run_ids_and_duplicates_nothing(tmp_path, monkeypatch,
                                                                                             server):
    from orchestrator.sync import sync_mlflow

    sweep = tmp_path / "sweep"
    make_sweep(sweep, bits=((3, 4), (4, 4)))
    final_stage = _stage(monkeypatch, tmp_path, [])
    final_stage.finetune_selected(sweep, epochs=1, workers=1)     # fine-tune runs in the sweep's own store
    assert sync_mlflow(sweep).runs_created == 2                    # and the trials' runs
    own = _id_files(sweep)
    local = own["mlflow_runs.json"]["tracking_uri"]
    assert local.startswith("sqlite:///") and len(own["mlflow_runs.json"]["finetune"]) == 2

    first = sync_mlflow(sweep, tracking_uri=server)
    assert (first.parent_created, first.runs_created, first.duplicates) == (True, 2, 0)
    assert first.tables_logged == ("pareto.parquet", "final.parquet")
    assert _id_files(sweep) == own                                 # still the sweep's own store's ids
    assert sync_mlflow(sweep).changed is False                     # back to its own store: nothing to do
    assert _id_files(sweep) == own                                 # the fine-tune map is kept

    again = sync_mlflow(sweep, tracking_uri=server)                # the server's runs are found by their tags
    assert (again.parent_created, again.runs_created, again.runs_updated, again.duplicates) == (False, 0, 0, 0)
    assert again.parent_run_id == first.parent_run_id and again.tables_logged == ()
    on_server = _runs(server)
    assert {role: len(runs) for role, runs in on_server.items()} == {"sweep": 1, "trial": 2, "finetune": 2}
    assert {role: len(runs) for role, runs in _runs(local).items()} == {"sweep": 1, "trial": 2, "finetune": 2}
