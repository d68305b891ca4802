"""A final stage marks the sweep folder as its own in ``driver.finetune.json`` too, also while a sweep of another
process holds ``driver.json``: two ``gmpq finetune --sweep`` started during a running sweep see each other (the
second is refused), ``gmpq sync-mlflow`` waits for either, and ``gmpq status`` shows both."""
from __future__ import annotations

import json
import os
import re
import socket
import time

import pytest
from final_sweep import checkpointing_stage, make_sweep

from gmpq_core.errors import GMPQError
from orchestrator.driver_markers import (DRIVER_FILE, FINETUNE_DRIVER_FILE, driver_marker, final_stage_marker,
                                         live_driver, pid_start)


def mark(d, name: str, stage: str, pid: int, command: str | None = None, host: str | None = None) -> None:
    now = time.time()
    (d / name).write_text(json.dumps({"stage": stage, "command": command or stage, "host": host or socket.gethostname(),
                                      "pid": pid, "pid_start": pid_start(pid), "started": now, "heartbeat": now}))


def read(d, name: str) -> dict | None:
    return json.loads((d / name).read_text()) if (d / name).exists() else None


def test_a_final_stage_marks_both_files_and_removes_them(tmp_path):
    with final_stage_marker(tmp_path):
        main, fine = read(tmp_path, DRIVER_FILE), read(tmp_path, FINETUNE_DRIVER_FILE)
        assert main["stage"] == fine["stage"] == "finetune" and fine["command"] == "finetune"
        assert fine["pid"] == os.getpid() and fine["pid_start"] == pid_start(os.getpid())
        assert live_driver(tmp_path, FINETUNE_DRIVER_FILE) is None      # this process: not "another" one
    assert read(tmp_path, DRIVER_FILE) is None and read(tmp_path, FINETUNE_DRIVER_FILE) is None


def test_gmpq_runs_final_stage_is_named_as_gmpq_run_and_its_outer_marker_comes_back(tmp_path):
    with driver_marker(tmp_path, "run"):
        with final_stage_marker(tmp_path):
            assert read(tmp_path, FINETUNE_DRIVER_FILE)["command"] == "run"
            assert read(tmp_path, DRIVER_FILE)["stage"] == "finetune"
        assert read(tmp_path, DRIVER_FILE)["stage"] == "run" and read(tmp_path, FINETUNE_DRIVER_FILE) is None


def test_beside_another_processs_sweep_the_final_stage_still_marks_its_own_file(tmp_path, other_process):
    mark(tmp_path, DRIVER_FILE, "sweep", other_process.pid)
    sweep_marker = (tmp_path / DRIVER_FILE).read_text()
    with final_stage_marker(tmp_path):
        assert (tmp_path / DRIVER_FILE).read_text() == sweep_marker              # the sweep's: left alone
        assert read(tmp_path, FINETUNE_DRIVER_FILE)["pid"] == os.getpid()
    assert (tmp_path / DRIVER_FILE).read_text() == sweep_marker and read(tmp_path, FINETUNE_DRIVER_FILE) is None


def test_a_second_final_stage_during_a_sweep_is_refused(tmp_path, monkeypatch, other_process, second_process):
    """Before: the first final stage wrote no marker while the sweep held driver.json, so the second saw only the
    sweep (no reason to refuse) and moved the first one's live Ray Train run aside."""
    sweep = tmp_path / "sweep"
    make_sweep(sweep, precision="fp32", workers=1)
    runs = []
    final_stage = checkpointing_stage(monkeypatch, tmp_path, runs)
    mark(sweep, DRIVER_FILE, "sweep", other_process.pid)
    mark(sweep, FINETUNE_DRIVER_FILE, "finetune", second_process.pid)
    before = sorted(p.name for p in sweep.rglob("*"))
    with pytest.raises(GMPQError) as e:
        final_stage.finetune_selected(sweep, epochs=1, workers=1, lr=0.05)
    text = " ".join(str(e.value).split())
    assert text.startswith(f"'{sweep}' is being fine-tuned by 'gmpq finetune --sweep' (pid {second_process.pid} on ")
    assert f"delete {sweep / FINETUNE_DRIVER_FILE}" in text and "nothing was changed" in text
    assert runs == [] and sorted(p.name for p in sweep.rglob("*")) == before
    second_process.kill()
    second_process.wait()                                  # that final stage ended: its marker no longer counts
    final_stage.finetune_selected(sweep, epochs=1, workers=1, lr=0.05)
    assert len(runs) == 1 and read(sweep, FINETUNE_DRIVER_FILE) is None
    assert read(sweep, DRIVER_FILE)["pid"] == other_process.pid


def test_sync_waits_for_a_final_stage_beside_an_ended_sweep(tmp_path, capsys, other_process):
    from orchestrator.cli import main

    sweep = tmp_path / "sweep"
    make_sweep(sweep)
    mark(sweep, FINETUNE_DRIVER_FILE, "finetune", other_process.pid)
    assert main(["sync-mlflow", "--sweep", str(sweep)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"is being written by 'gmpq finetune --sweep' (pid {other_process.pid} on " in err
    assert f"delete {sweep / FINETUNE_DRIVER_FILE}" in err and not (sweep / "mlflow.db").exists()


def test_status_shows_a_final_stage_beside_a_sweep_and_after_it(tmp_path, capsys, other_process, second_process):
    from orchestrator.cli import main
    from orchestrator.sweep_status import read_sweep_status

    sweep = tmp_path / "sweep"
    make_sweep(sweep)
    mark(sweep, DRIVER_FILE, "sweep", other_process.pid)
    mark(sweep, FINETUNE_DRIVER_FILE, "finetune", second_process.pid)
    assert read_sweep_status(sweep).state == "running"
    assert main(["status", "--sweep", str(sweep)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"running (pid {other_process.pid} on " in out
    assert f"a final stage runs beside it: 'gmpq finetune --sweep' (pid {second_process.pid} on " in out
    (sweep / DRIVER_FILE).unlink()                          # the sweep ended; the final stage goes on
    st = read_sweep_status(sweep)
    assert st.state == "fine-tuning" and st.active_driver["pid"] == second_process.pid
    assert main(["status", "--sweep", str(sweep)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"fine-tuning the selected policies (pid {second_process.pid} on " in out and "beside" not in out


def test_a_marker_carries_a_heartbeat_that_its_process_refreshes(tmp_path, monkeypatch):
    from orchestrator import driver_markers

    monkeypatch.setattr(driver_markers, "HEARTBEAT_S", 0.05)
    monkeypatch.setattr(driver_markers, "_beating", [])       # a thread of its own, beating at that pace
    with driver_marker(tmp_path, "sweep"):
        first = read(tmp_path, DRIVER_FILE)
        assert first["heartbeat"] >= first["started"]
        deadline = time.time() + 10
        while read(tmp_path, DRIVER_FILE)["heartbeat"] == first["heartbeat"] and time.time() < deadline:
            time.sleep(0.05)
        later = read(tmp_path, DRIVER_FILE)
        assert later["heartbeat"] > first["heartbeat"] and {**later, "heartbeat": 0} == {**first, "heartbeat": 0}
        with final_stage_marker(tmp_path):                   # nested: the inner stage is refreshed, not overwritten
            time.sleep(0.2)
            assert read(tmp_path, DRIVER_FILE)["stage"] == "finetune"
        assert read(tmp_path, DRIVER_FILE)["stage"] == "sweep"
    assert read(tmp_path, DRIVER_FILE) is None and read(tmp_path, FINETUNE_DRIVER_FILE) is None


def test_another_hosts_marker_without_a_recent_heartbeat_is_taken_as_ended(tmp_path, capsys):
    """A driver killed on another host (SIGKILL, a lost node) leaves its marker; before, status said "cannot be
    checked" for ever and sync refused it. Its heartbeat tells now (markers without one: as before)."""
    from orchestrator import driver_markers
    from orchestrator.cli import main
    from orchestrator.sweep_status import read_sweep_status

    sweep = tmp_path / "sweep"
    make_sweep(sweep)
    stale = time.time() - driver_markers.STALE_AFTER_S - 60
    for beat, alive in ((time.time() - 90, None), (stale, False), (None, None)):
        marker = {"stage": "sweep", "host": "lost-node", "pid": 77, "started": stale - 100,
                  **({"heartbeat": beat} if beat else {})}
        (sweep / DRIVER_FILE).write_text(json.dumps(marker))
        assert driver_markers.driver_alive(marker) is alive
        assert (live_driver(sweep) is None) == (alive is False)
        assert main(["status", "--sweep", str(sweep)]) == 0
        out = " ".join(capsys.readouterr().out.split())
        if beat is None:
            assert "driven from another host (pid 77 on lost-node): whether it still runs cannot be checked from " \
                   "here;" in out
        elif alive is None:
            assert re.search(r"cannot be checked from here \(its marker was last refreshed 1m(29|30|31)s ago\)", out)
        else:
            assert read_sweep_status(sweep).state == "stopped"      # 1 of its trials ended, none runs
            assert re.search(r"; its driver \(pid 77 on lost-node\) stopped refreshing its marker (10m59|11m00|11m01)s "
                             r"ago, so it is taken as ended\.", out)
    (sweep / DRIVER_FILE).write_text(json.dumps({"stage": "sweep", "host": "lost-node", "pid": 77, "heartbeat": stale}))
    with driver_marker(sweep, "finetune"):                 # a dead driver's marker is replaced, as on this host
        assert read(sweep, DRIVER_FILE)["pid"] == os.getpid()
    assert read(sweep, DRIVER_FILE) is None


def test_a_marker_left_alone_is_taken_over_once_its_process_has_ended(tmp_path, other_process):
    """The review: a command that found another process's live marker ran unmarked to its end; once that process
    ended (a sweep over while 'gmpq finetune --sweep' goes on; a killed job's marker gone stale on another node),
    status called the folder idle and nothing refused a second final stage."""
    from orchestrator.driver_markers import beat_once

    mark(tmp_path, DRIVER_FILE, "sweep", other_process.pid)
    mark(tmp_path, FINETUNE_DRIVER_FILE, "finetune", 77, host="lost-node")      # a fresh heartbeat: maybe alive
    with final_stage_marker(tmp_path):
        beat_once()
        assert read(tmp_path, DRIVER_FILE)["pid"] == other_process.pid
        assert read(tmp_path, FINETUNE_DRIVER_FILE)["pid"] == 77
        other_process.kill()
        other_process.wait()
        old = {**read(tmp_path, FINETUNE_DRIVER_FILE), "heartbeat": time.time() - 3600}
        (tmp_path / FINETUNE_DRIVER_FILE).write_text(json.dumps(old))
        beat_once()                                            # the heartbeat's step: both ended, both taken over
        for name in (DRIVER_FILE, FINETUNE_DRIVER_FILE):
            assert read(tmp_path, name)["pid"] == os.getpid() and read(tmp_path, name)["stage"] == "finetune"
    assert read(tmp_path, DRIVER_FILE) is None and read(tmp_path, FINETUNE_DRIVER_FILE) is None


def test_nested_stages_find_each_other_however_the_folder_is_spelled(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sweep").mkdir()
    with driver_marker("sweep", "run"):
        with final_stage_marker(tmp_path / "sweep"):
            assert read(tmp_path / "sweep", FINETUNE_DRIVER_FILE)["command"] == "run"
        assert read(tmp_path / "sweep", DRIVER_FILE)["stage"] == "run"
    assert read(tmp_path / "sweep", DRIVER_FILE) is None



def test_the_final_stage_is_marked_from_before_its_work_to_its_last_mlflow_write(tmp_path, monkeypatch):
    """The review: the check came first and the marker minutes later (the Pareto table, maybe the FP model's
    training in between), so two final stages started together both ran; and the MLflow logging ran unmarked."""
    from orchestrator import mlflow_stages, pareto

    sweep = tmp_path / "sweep"
    make_sweep(sweep, precision="fp32", workers=1)
    final_stage = checkpointing_stage(monkeypatch, tmp_path, [])
    seen = []
    real_pareto, real_log = pareto.write_pareto, mlflow_stages.log_final

    def marked(what, fn):
        def wrapper(*a, **k):
            seen.append((what, (read(sweep, FINETUNE_DRIVER_FILE) or {}).get("pid")))
            return fn(*a, **k)
        return wrapper

    monkeypatch.setattr(pareto, "write_pareto", marked("pareto", real_pareto))
    monkeypatch.setattr(mlflow_stages, "log_final", marked("mlflow", real_log))
    final_stage.finetune_selected(sweep, epochs=1, workers=1)
    assert seen == [("pareto", os.getpid()), ("mlflow", os.getpid())]
    assert read(sweep, FINETUNE_DRIVER_FILE) is None and read(sweep, DRIVER_FILE) is None


def test_gmpq_runs_sweep_stage_is_marked_as_gmpq_run(tmp_path, monkeypatch, other_process):
    """The review: during 'gmpq run''s sweep, driver.json said 'gmpq sweep', so a 'gmpq finetune --sweep' started
    then was not refused (its final stage would follow) and 'gmpq run''s own final stage was refused later."""
    import contextlib

    from orchestrator import ray_env, sweep
    from orchestrator.cli import main
    from orchestrator.final_results import refuse_beside_other_finetune

    out, seen = tmp_path / "run", {}

    def run_sweep(cfg, resume=False, progress=True, **kw):
        seen.update(kw)
        raise KeyboardInterrupt                      # stopped in its sweep: the stub needs no summary

    monkeypatch.setattr(ray_env, "ray_session", lambda address=None: contextlib.nullcontext(True))
    monkeypatch.setattr(sweep, "run_sweep", run_sweep)
    main(["run", "--preset", "demo", "--out", str(out), "--quiet"])
    assert seen["command"] == "run" and seen["checked"].cfg.out_dir == str(out.resolve())   # checked before Ray
    out.mkdir(parents=True, exist_ok=True)
    mark(out, DRIVER_FILE, "sweep", other_process.pid, command="run")    # what run_sweep(command="run") writes
    with pytest.raises(GMPQError, match=r"will be fine-tuned by 'gmpq run' \(its sweep stage; pid"):
        refuse_beside_other_finetune(out)
    with driver_marker(tmp_path, "sweep", command="run"):
        assert read(tmp_path, DRIVER_FILE)["command"] == "run" and read(tmp_path, DRIVER_FILE)["stage"] == "sweep"


def test_sync_names_the_process_checked_alive_before_one_on_another_host(tmp_path, capsys, other_process):
    from orchestrator.cli import main

    sweep = tmp_path / "sweep"
    make_sweep(sweep)
    mark(sweep, DRIVER_FILE, "sweep", 4242, host="head-node")              # cannot be checked from here
    mark(sweep, FINETUNE_DRIVER_FILE, "finetune", other_process.pid)       # alive on this host
    assert main(["sync-mlflow", str(sweep)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"is being written by 'gmpq finetune --sweep' (pid {other_process.pid} on " in err
    assert "on another host" not in err
