"""gmpq status / orchestrator.sweep_status: a sweep folder's state, read from its files only."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from orchestrator.cli import main
from orchestrator.results import TRIAL_EVENTS, trial_row, write_results
from orchestrator.driver_markers import DRIVER_FILE, driver_marker
from orchestrator.sweep_status import read_sweep_status


def _sweep(d: Path, *, n_trials: int = 4, driver: dict | None = None) -> None:
    """Two ended trials (t1 completed, t2 pruned), t3 started and half-way through its search, t4 not started."""
    rows = [trial_row(trial_id="t1", config={"budget_avg_bits": 3.0, "proxy_size": 500}, status="completed",
                      last_result={"transfer_top1": 75.0, "proxy_top1": 50.0, "bitops": 400_000_000, "gbitops": 0.4}),
            trial_row(trial_id="t2", config={"budget_avg_bits": 4.0, "proxy_size": 500}, status="pruned",
                      last_result={"proxy_top1": 12.0})]
    write_results(d, rows, [])
    (d / "sweep_config.yaml").write_text(f"name: st\nn_trials: {n_trials}\n")
    (d / "trial_status.json").write_text(json.dumps({"version": 1, "pruned": {"t2": "pruned by median at epoch 1"}}))
    now = time.time()
    events = [{"event": "start", "trial_id": "t1", "trial_number": 1, "params": {}, "time": now - 100},
              {"event": "start", "trial_id": "t2", "trial_number": 2, "params": {}, "time": now - 100},
              {"event": "start", "trial_id": "t3", "trial_number": 3, "time": now - 30,
               "params": {"budget_avg_bits": 3.5, "proxy_size": 1000}},
              {"event": "epoch", "trial_id": "t3", "epoch": 1, "of": 2, "proxy_top1": 42.3, "time": now - 10}]
    (d / TRIAL_EVENTS).write_text("".join(json.dumps(e) + "\n" for e in events) + '{"event": "end", "tri')  # cut line
    if driver is not None:
        (d / DRIVER_FILE).write_text(json.dumps(driver))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_running_sweep_shows_each_trial_and_where_the_running_one_is(tmp_path, capsys):
    _sweep(tmp_path, driver={"stage": "sweep", "host": socket.gethostname(), "pid": os.getpid()})
    st = read_sweep_status(tmp_path)
    assert st.state == "running" and st.n_ended == 2
    assert [(t.number, t.trial_id, t.status) for t in st.trials] == \
        [(1, "t1", "completed"), (2, "t2", "pruned"), (3, "t3", "running")]
    assert st.trials[1].note == "pruned by median at epoch 1"
    assert st.trials[2].phase == "search epoch 1/2 done" and 29 < st.trials[2].seconds < 60
    assert main(["status", "--sweep", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"running (pid {os.getpid()}" in out and "2 of 4 trials ended (1 completed, 1 pruned, 0 failed, 1 running)" in out
    assert "1 trial(s) not started yet." in out and "Continue with" not in out
    t3 = next(ln for ln in out.splitlines() if " t3 " in ln)
    assert "running" in t3 and "3.50" in t3 and "1000" in t3 and "so far" in t3 and "search epoch 1/2 done" in t3


def test_a_sweep_whose_driver_died_is_stopped_and_says_how_to_continue(tmp_path, capsys):
    _sweep(tmp_path, driver={"stage": "sweep", "host": socket.gethostname(), "pid": _dead_pid()})
    st = read_sweep_status(tmp_path)
    assert st.state == "stopped" and st.trials[2].status == "stopped"
    assert st.trials[2].seconds == pytest.approx(20)                     # start to its last event, not to now
    assert st.trials[2].proxy_top1 == 42.3     # its supernet's at its last epoch, as the sweep's own table shows it
    assert main(["status", "--sweep", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    t3 = next(ln for ln in out.splitlines() if " t3 " in ln)
    assert "stopped" in t3 and "42.30" in t3 and "a pruned, running or stopped trial's supernet" in out
    assert f"Continue with: gmpq sweep --out {tmp_path} --resume" in out
    assert "Completed and pruned trials are kept; trials stopped midway run again." in out


def test_a_stopped_sweep_with_a_failed_trial_says_that_it_runs_again(tmp_path, capsys):
    """--resume restores errored trials too (Tuner.restore(resume_errored=True)): "ended trials are kept" was wrong
    for a failed one (e.g. its node died)."""
    _sweep(tmp_path, driver={"stage": "sweep", "host": socket.gethostname(), "pid": _dead_pid()})
    rows = pd.read_parquet(tmp_path / "trials.parquet")
    rows.loc[rows["trial_id"] == "t2", "status"] = "failed"
    rows.to_parquet(tmp_path / "trials.parquet")
    assert main(["status", "--sweep", str(tmp_path)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "Completed and pruned trials are kept; failed trials and those stopped midway run again." in out


def test_a_driver_on_another_host_cannot_be_checked_from_here(tmp_path, capsys):
    _sweep(tmp_path, driver={"stage": "sweep", "host": "another-host", "pid": 1})
    st = read_sweep_status(tmp_path)
    assert st.state == "unknown" and st.trials[2].status == "running"      # assumed running, and said so
    assert main(["status", "--sweep", str(tmp_path)]) == 0
    assert "cannot be checked from here" in capsys.readouterr().out


def test_a_finished_sweep_names_the_next_stage_and_the_final_fine_tune(tmp_path, capsys):
    _sweep(tmp_path, n_trials=3)
    (tmp_path / TRIAL_EVENTS).write_text((tmp_path / TRIAL_EVENTS).read_text().split('{"event": "end"')[0])
    rows = pd.read_parquet(tmp_path / "trials.parquet")
    extra = trial_row(trial_id="t3", config={"budget_avg_bits": 3.5}, status="failed", last_result=None,
                      error="RuntimeError: boom")
    write_results(tmp_path, [*rows.to_dict("records"), extra], [])
    st = read_sweep_status(tmp_path)
    assert st.state == "finished" and [t.status for t in st.trials] == ["completed", "pruned", "failed"]
    assert main(["status", "--sweep", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"Next: gmpq pareto --sweep {tmp_path}" in out and "Shared models" not in out   # no shared.json
    (tmp_path / "shared.json").write_text(json.dumps({"target_fp_top1": 79.85,
                                                      "teacher_top1": {"500": 73.5, "1000": 79.46}}))
    assert main(["status", "--sweep", str(tmp_path)]) == 0
    assert ("Shared models: FP teachers' held-out top-1: 73.50% (proxy 500), 79.46% (proxy 1000); FP target model "
            "top-1 79.85%.") in capsys.readouterr().out
    pd.DataFrame({"trial_id": ["t1"], "selected": [True]}).to_parquet(tmp_path / "pareto.parquet")
    progress = tmp_path / "ray_results" / "finetune-t1.progress.json"
    progress.parent.mkdir()
    progress.write_text(json.dumps({"epoch": 1, "step": 40, "steps": 468}))
    assert main(["status", "--sweep", str(tmp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["state"] == "finished" and data["selected"] == ["t1"] and data["finetune_progress"]["t1"]["step"] == 40
    assert main(["status", "--sweep", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Final fine-tune: 0 of 1 selected policies done." in out and "t1: epoch 1, step 40/468" in out
    assert f"Next: gmpq finetune --sweep {tmp_path}" in out
    pd.DataFrame({"trial_id": ["t1"], "final_top1": [81.0], "gbitops": [0.4], "epochs": [1], "seconds": [200.0],
                  "model_path": [str(tmp_path / "models" / "t1.pt")]}).to_parquet(tmp_path / "final.parquet")
    assert main(["status", "--sweep", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Final fine-tune: 1 of 1 selected policies done." in out
    assert "t1: top1 81.00% at 0.4000 GBitOPs (1 epoch(s), " in out and f"; model {tmp_path / 'models' / 't1.pt'}" in out
    # a smaller --top-k later: the policy fine-tuned before is still on disk, and still listed
    pd.DataFrame({"trial_id": ["t1", "t2"], "selected": [False, True]}).to_parquet(tmp_path / "pareto.parquet")
    pd.DataFrame({"trial_id": ["t1", "t2"], "final_top1": [81.0, 83.0], "gbitops": [0.4, 0.5], "epochs": [1, 1],
                  "seconds": [200.0, 210.0], "model_path": ["models/t1.pt", "models/t2.pt"]}).to_parquet(
        tmp_path / "final.parquet")
    assert main(["status", "--sweep", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Final fine-tune: 1 of 1 selected policies done; 1 more fine-tuned earlier, not selected now." in out
    assert "t2: top1 83.00%" in out and "t1: top1 81.00% at 0.4000 GBitOPs (1 epoch(s), " in out
    assert out.rstrip().splitlines()[-1].endswith("(not selected now)")


def test_nested_markers_show_the_inner_stage_then_the_outer_and_a_live_foreign_one_is_left_alone(tmp_path):
    path = tmp_path / DRIVER_FILE
    with driver_marker(tmp_path, "run"):
        with driver_marker(tmp_path, "finetune"):
            assert json.loads(path.read_text())["stage"] == "finetune"
        assert json.loads(path.read_text())["stage"] == "run"                # gmpq run goes on
    assert not path.exists()
    sweep = {"stage": "sweep", "host": socket.gethostname(), "pid": os.getppid()}   # a live sweep elsewhere
    path.write_text(json.dumps(sweep))
    with driver_marker(tmp_path, "finetune"):
        assert json.loads(path.read_text()) == sweep
    assert json.loads(path.read_text()) == sweep                             # still the sweep's
    path.write_text(json.dumps({**sweep, "pid": _dead_pid()}))                # a dead driver's: replaced
    with driver_marker(tmp_path, "finetune"):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not path.exists()


def test_driver_marker_names_this_process_while_the_block_runs(tmp_path):
    with driver_marker(tmp_path, "finetune"):
        mark = json.loads((tmp_path / DRIVER_FILE).read_text())
        assert mark["pid"] == os.getpid() and mark["stage"] == "finetune" and mark["host"] == socket.gethostname()
    assert not (tmp_path / DRIVER_FILE).exists()


def test_status_of_a_folder_that_does_not_exist_says_so(tmp_path, capsys):
    assert main(["status", "--sweep", str(tmp_path / "nope")]) == 2
    assert "no such folder" in " ".join(capsys.readouterr().err.split())


def test_status_of_a_folder_that_is_not_a_sweep_is_a_clear_error(tmp_path, capsys):
    assert main(["status", "--sweep", str(tmp_path)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "sweep_config.yaml' not found" in err and "--out" in err


def test_a_sweep_that_stopped_before_its_first_trial_says_so(tmp_path, capsys):
    (tmp_path / "sweep_config.yaml").write_text("name: st\nn_trials: 2\n")
    assert main(["status", "--sweep", str(tmp_path)]) == 0
    assert "no command is running it: it stopped before its first trial" in capsys.readouterr().out
    (tmp_path / DRIVER_FILE).write_text(json.dumps({"stage": "sweep", "host": socket.gethostname(), "pid": os.getpid()}))
    assert main(["status", "--sweep", str(tmp_path)]) == 0
    assert "preparing the shared models; no trial has started yet" in capsys.readouterr().out


def test_gmpq_status_reads_a_sweep_folder_without_importing_ray_or_torch(tmp_path):
    """It runs beside a live sweep, often in a loop: no Ray or PyTorch import (3.8 s -> 0.6 s on 2 cores)."""
    _sweep(tmp_path)
    code = ("import sys; from orchestrator.cli import main; main(['status', '--sweep', sys.argv[1]]); "
            "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'torch', 'mlflow', 'optuna'}); "
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr[-2000:]
    assert "t1" in out.stdout and "HEAVY []" in out.stdout


def test_a_finished_sweep_without_a_completed_trial_names_the_cause_not_gmpq_pareto(tmp_path, capsys):
    """It said "Next: gmpq pareto", which then refused: nothing to select."""
    write_results(tmp_path, [trial_row(trial_id=t, config={"budget_avg_bits": 3.0}, status="failed", last_result=None,
                                       error="ConfigError: boom") for t in ("t1", "t2")], [])
    (tmp_path / "sweep_config.yaml").write_text("name: st\nn_trials: 2\n")
    assert read_sweep_status(tmp_path).state == "finished"
    assert main(["status", "--sweep", str(tmp_path)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "gmpq pareto" not in out
    assert (f"No trial of the sweep {tmp_path} completed (2 failed), so there is no Pareto front and nothing to select."
            in out and f"gmpq sweep --out {tmp_path} --resume (failed trials run again)" in out)


def test_the_sweeps_own_summary_shows_a_stopped_trials_last_epoch_as_status_does(tmp_path):
    """The walkthrough: after Ctrl-C the sweep's table showed '-' for a stopped trial whose epoch Tune had not passed
    on yet, while gmpq status showed its last epoch's proxy% from trial_events.jsonl."""
    from types import SimpleNamespace

    from orchestrator.sweep import _summary_rows
    from orchestrator.trial_status import UNFINISHED, TrialStatusBook

    _sweep(tmp_path, driver={"stage": "sweep", "host": socket.gethostname(), "pid": os.getpid()})
    grid = [SimpleNamespace(metrics={"trial_id": "t3"}, path=None, error=None, config={"budget_avg_bits": 3.5})]
    rows = _summary_rows(grid, TrialStatusBook(tmp_path / "trial_status.json"), tmp_path)
    assert rows[0]["status"] == UNFINISHED and rows[0]["proxy_top1"] == 42.3


def test_a_pareto_selection_made_before_trials_ended_says_to_select_again(tmp_path, capsys):
    """The walkthrough: gmpq pareto ran while the sweep ran; a trial that completed later was on the front, and
    gmpq status presented the old selection as final ("Next: gmpq finetune")."""
    _sweep(tmp_path, n_trials=2, driver={"stage": "sweep", "host": socket.gethostname(), "pid": _dead_pid()})
    (tmp_path / TRIAL_EVENTS).write_text("")                    # only t1 (completed) and t2 (pruned)
    pd.read_parquet(tmp_path / "trials.parquet").iloc[:0].assign(selected=[], selection_reason=[]).to_parquet(
        tmp_path / "pareto.parquet")                            # selected among none: made before t1 ended
    assert read_sweep_status(tmp_path).unselected_since == ["t1"]
    assert main(["status", "--sweep", str(tmp_path)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert (f"The Pareto selection (pareto.parquet) was made before 1 trial(s) now on the front ended (t1): select "
            f"again with: gmpq pareto {tmp_path}.") in out and "Next: gmpq finetune" not in out
    from orchestrator.pareto import write_pareto

    write_pareto(tmp_path, plot=False)                          # selected again: nothing said
    assert read_sweep_status(tmp_path).unselected_since == []


@pytest.mark.parametrize("alive", [True, False])
def test_a_started_fine_tune_is_not_said_to_be_not_fine_tuned_yet(tmp_path, capsys, alive):
    """The walkthrough: while gmpq finetune --sweep ran (before its first progress report), and after it was
    stopped, gmpq status said "not fine-tuned yet"."""
    from orchestrator.kept_finetunes import mark_started
    from orchestrator.pareto import write_pareto

    _sweep(tmp_path, n_trials=2)
    (tmp_path / TRIAL_EVENTS).write_text("")
    write_pareto(tmp_path, plot=False)                          # t1 selected
    mark_started(tmp_path, "t1", "{}", 2)
    pid = os.getpid() if alive else _dead_pid()
    (tmp_path / DRIVER_FILE).write_text(json.dumps({"stage": "finetune", "host": socket.gethostname(), "pid": pid}))
    assert main(["status", "--sweep", str(tmp_path)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "t1: not fine-tuned yet" not in out and "t1: fine-tune started at " in out
    assert ("no epoch reported yet" in out) is alive
    assert (f"stopped: gmpq finetune --sweep {tmp_path} continues it" in out) is not alive


def test_a_fine_tune_running_beside_a_live_sweep_is_not_called_stopped(tmp_path, capsys):
    """The review: with a sweep running (driver.json) and gmpq finetune --sweep beside it (driver.finetune.json),
    the state is "running", and the started fine-tune was said to be stopped."""
    from orchestrator.driver_markers import FINETUNE_DRIVER_FILE, pid_start
    from orchestrator.kept_finetunes import mark_started
    from orchestrator.pareto import write_pareto

    _sweep(tmp_path, n_trials=4)
    write_pareto(tmp_path, plot=False)
    mark_started(tmp_path, "t1", "{}", 2)
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(2)]
    try:
        for proc, name, stage in zip(procs, (DRIVER_FILE, FINETUNE_DRIVER_FILE), ("sweep", "finetune")):
            (tmp_path / name).write_text(json.dumps({"stage": stage, "host": socket.gethostname(), "pid": proc.pid,
                                                     "pid_start": pid_start(proc.pid)}))
        assert main(["status", "--sweep", str(tmp_path)]) == 0
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    out = " ".join(capsys.readouterr().out.split())
    assert "t1: fine-tune started at" in out and "no epoch reported yet" in out and "stopped: gmpq finetune" not in out
