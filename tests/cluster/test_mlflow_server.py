"""`gmpq mlflow-server`: a real MLflow server (SQLite backend) on 127.0.0.1, used through its REST API."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.errors import ClusterError
from cluster.mlflow_server import load_server_record, server_answers, start_mlflow_server, stop_mlflow_server
from cluster.procs import group_members, port_in_use

REPO = Path(__file__).resolve().parents[2]


def gmpq_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", *args]


@pytest.fixture
def server_dir(tmp_path):
    """The server folder; a server left running there is stopped at the end."""
    d = tmp_path / "mlflow"
    yield d
    stop_mlflow_server(d, grace_s=2.0)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_detached_server_answers_rest_api_with_nested_runs_then_stops(server_dir):
    from mlflow import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    done = subprocess.run(gmpq_cmd("mlflow-server", "--port", "0", "--dir", str(server_dir), "--detach"), cwd=REPO,
                          capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stderr[-2000:]
    uri = done.stdout.strip().splitlines()[-1]  # contract: the URI is the last line
    record = load_server_record(server_dir)
    assert record is not None and record.uri == uri and uri.startswith("http://127.0.0.1:")
    assert server_answers(uri)

    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("cluster-test")
    parent = client.create_run(exp, run_name="sweep")
    for i in range(3):
        child = client.create_run(exp, run_name=f"trial_{i}", tags={MLFLOW_PARENT_RUN_ID: parent.info.run_id})
        client.log_metric(child.info.run_id, "proxy_top1", 50.0 + i, step=0)
        client.set_terminated(child.info.run_id)
    children = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.data.metrics["proxy_top1"] for r in children) == [50.0, 51.0, 52.0]
    assert (server_dir / "mlflow.db").exists()

    stop = subprocess.run(gmpq_cmd("mlflow-server", "--stop", "--dir", str(server_dir)), cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0 and ("stopped" in stop.stdout or "killed" in stop.stdout), stop.stdout
    assert group_members(record.group.pgid) == [] and not port_in_use(record.port)
    assert load_server_record(server_dir) is None


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_foreground_server_prints_its_uri_and_sigterm_stops_it(server_dir):
    proc = subprocess.Popen(gmpq_cmd("mlflow-server", "--port", "0", "--dir", str(server_dir)), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        uri = None
        deadline = time.monotonic() + 200
        while time.monotonic() < deadline and uri is None:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("http://"):
                uri = line.strip()
        assert uri is not None, "no URI printed"
        assert server_answers(uri)
        record = load_server_record(server_dir)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert group_members(record.group.pgid) == [] and not server_answers(uri, timeout_s=1.0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def test_a_taken_port_fails_before_starting_anything(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        with pytest.raises(ClusterError, match=f"port {port} on 127.0.0.1 is already in use"):
            start_mlflow_server(dir=tmp_path, port=port)
    assert not (tmp_path / "mlflow_server.json").exists()


def test_a_server_that_dies_at_startup_reports_its_log(tmp_path, monkeypatch):
    # an mlflow executable that exits at once: the error must carry its output, and nothing is left running
    fake = tmp_path / "bin"
    fake.mkdir()
    script = fake / "mlflow"
    script.write_text("#!/bin/sh\necho 'boom: backend store unreachable' >&2\nexit 3\n")
    script.chmod(0o755)
    monkeypatch.setattr("cluster.mlflow_server._mlflow_command", lambda: [str(script)])
    with pytest.raises(ClusterError, match="boom: backend store unreachable"):
        start_mlflow_server(dir=tmp_path / "srv", timeout_s=30)
    assert load_server_record(tmp_path / "srv") is None
    assert os.path.exists(tmp_path / "srv" / "mlflow_server.log")


def test_a_taken_port_leaves_no_folder_behind(tmp_path, capsys):
    """gmpq mlflow-server --dir D refused (port in use) must not leave an empty D it created."""
    from orchestrator.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        assert main(["mlflow-server", "--port", str(port), "--dir", str(tmp_path / "new" / "mlflow")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"port {port} on 127.0.0.1 is already in use" in err
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_server_runs_without_mlflows_job_runner_and_still_tracks_runs_and_artifacts(server_dir, tmp_path):
    """MLflow's job runner (huey consumers: ~10 processes, ~2 GB) is off; runs, artifacts and the UI still work."""
    from mlflow import MlflowClient

    server = start_mlflow_server(dir=server_dir, timeout_s=240)
    time.sleep(5)                                       # MLflow starts its job runner after the web server
    commands = []
    for pid in group_members(server.group.pgid):
        try:
            commands.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            continue
    assert not [c for c in commands if "huey" in c or "_job_runner" in c], commands
    assert len(commands) <= 3, commands                 # `mlflow server` and its uvicorn worker
    client = MlflowClient(tracking_uri=server.uri)
    run = client.create_run(client.create_experiment("lean"))
    client.log_metric(run.info.run_id, "proxy_top1", 51.0)
    (tmp_path / "policy.json").write_text("{}")
    client.log_artifact(run.info.run_id, str(tmp_path / "policy.json"))
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["policy.json"]
    import urllib.request

    with urllib.request.urlopen(server.uri + "/", timeout=30) as page:    # the UI
        assert page.status == 200 and b"<html" in page.read(4096).lower()
