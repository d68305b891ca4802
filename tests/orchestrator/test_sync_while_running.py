"""`gmpq sync-mlflow` while a gmpq command still runs the sweep: refused before MLflow is opened (its logging writes
the same runs and id files; a sync to another store put the folder's id files back over the ids written meanwhile),
unless --while-running; a marker whose process has ended does not count."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from final_sweep import make_sweep

from orchestrator.cli import main


@pytest.fixture
def sweep(tmp_path):
    d = tmp_path / "sweep"
    make_sweep(d)
    return d


def mark(d, stage: str, pid: int, host: str | None = None, **more) -> None:
    (d / "driver.json").write_text(json.dumps({"stage": stage, "host": host or socket.gethostname(), "pid": pid,
                                               "started": time.time(), **more}))


def refused(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("gmpq: error:") == 1, err
    return " ".join(err.split())


@pytest.mark.parametrize("stage, named", [("sweep", "'gmpq sweep'"), ("run", "'gmpq run'"),
                                          ("finetune", "'gmpq finetune --sweep'")])
def test_a_sync_beside_a_running_command_is_refused_before_mlflow_is_opened(sweep, other_process, capsys, stage,
                                                                            named):
    mark(sweep, stage, other_process.pid)
    before = sorted(p.name for p in sweep.iterdir())
    err = refused(capsys, ["sync-mlflow", "--sweep", str(sweep), "--tracking-uri", f"sqlite:///{sweep.parent}/o.db"])
    assert f"'{sweep}' is being written by {named} (pid {other_process.pid} on {socket.gethostname()}, started " in err
    assert "Sync after it ends" in err and f"gmpq status --sweep {sweep}" in err and "nothing was synced" in err
    assert f"if it has ended (the pid is another program's now), delete {sweep / 'driver.json'}" in err
    assert "--while-running syncs now, safe only while that command logs nothing to MLflow" in err
    assert "on another host" not in err
    assert sorted(p.name for p in sweep.iterdir()) == before          # no mlflow.db, no id file written
    assert not (sweep.parent / "o.db").exists()


def test_a_command_on_another_host_cannot_be_checked_and_is_named_as_such(sweep, capsys):
    mark(sweep, "sweep", 4242, host="some-other-host")
    err = refused(capsys, ["sync-mlflow", "--sweep", str(sweep)])
    assert "(pid 4242 on some-other-host, started " in err
    assert "on another host: whether it still runs cannot be checked from here (if it has ended, sync with " \
           "--while-running)" in err
    assert not (sweep / "mlflow.db").exists()


def ended_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.slow    # ~10-20 s: MLflow creates its SQLite schema and the runs
@pytest.mark.parametrize("how", ["ended", "while-running"])
def test_an_ended_command_or_while_running_syncs(sweep, other_process, capsys, how):
    mark(sweep, "sweep", ended_pid() if how == "ended" else other_process.pid)
    argv = ["sync-mlflow", "--sweep", str(sweep), "--json"] + (["--while-running"] if how == "while-running" else [])
    assert main(argv) == 0, capsys.readouterr().err
    rep = json.loads(capsys.readouterr().out)
    assert rep["trials"] == 1 and rep["runs_created"] == 1
    assert json.loads((sweep / "mlflow_runs.json").read_text())["trials"].keys() == {"t1"}


def test_this_process_own_marker_is_not_another_command(sweep):
    from orchestrator.driver_markers import live_driver

    mark(sweep, "run", os.getpid())
    assert live_driver(sweep) is None


def test_a_running_sweep_with_no_result_yet_is_refused_too_and_no_store_is_opened(tmp_path, other_process, capsys):
    d = tmp_path / "started"
    d.mkdir()
    (d / "sweep_config.yaml").write_text("name: demo\nmodel: resnet20\n")
    mark(d, "sweep", other_process.pid)
    assert "is being written by 'gmpq sweep'" in refused(capsys, ["sync-mlflow", "--sweep", str(d)])
    assert main(["sync-mlflow", "--sweep", str(d), "--while-running"]) == 0      # past the refusal: nothing to sync
    assert "nothing to sync" in capsys.readouterr().out
    assert sorted(p.name for p in d.iterdir()) == ["driver.json", "sweep_config.yaml"]


def test_a_reused_pid_or_another_hosts_marker_with_our_pid(sweep, other_process):
    from orchestrator.driver_markers import live_driver, pid_start as _pid_start

    start = _pid_start(other_process.pid)
    if start is None:
        pytest.skip("no /proc: process start times are Linux's")
    mark(sweep, "sweep", other_process.pid, pid_start=start)
    assert live_driver(sweep)["alive"] is True
    mark(sweep, "sweep", other_process.pid, pid_start=start - 1)      # that pid is another program's now
    assert live_driver(sweep) is None
    mark(sweep, "sweep", os.getpid(), host="pod-a")                  # our pid, but another host's process
    assert live_driver(sweep)["alive"] is None


def test_a_gmpq_run_is_named_with_its_stage(sweep):
    from orchestrator.driver_markers import DRIVER_FILE, driver_marker, driver_text, pid_start as _pid_start

    with driver_marker(sweep, "run"), driver_marker(sweep, "sweep"):
        marker = json.loads((sweep / DRIVER_FILE).read_text())
        assert marker["stage"] == "sweep" and marker["command"] == "run"
        assert marker["pid_start"] == _pid_start(os.getpid())
        assert driver_text(marker).startswith(f"'gmpq run' (its sweep stage; pid {os.getpid()} on ")
    assert not (sweep / DRIVER_FILE).exists()


def test_status_says_to_sync_once_the_running_command_ends(sweep, other_process, capsys):
    mark(sweep, "sweep", other_process.pid)
    assert main(["status", "--sweep", str(sweep)]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "gmpq sync-mlflow" in ln)
    assert "once the command running it has ended and the store answers, upload them with: " in line
    assert line.endswith(f": gmpq sync-mlflow --sweep {sweep}")          # the command ends the line: copied as it is
