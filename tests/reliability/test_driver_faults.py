"""Driver faults: ``gmpq sweep`` and ``gmpq finetune`` killed with SIGKILL (or a sweep stopped with
Ctrl-C), then resumed.

The sweep driver is killed as soon as the first trial's row is in trials.parquet (the worst moment:
Tune may not have saved its experiment state yet). ``gmpq sweep --resume`` must finish the sweep
without rerunning a finished trial and without duplicate Parquet rows or MLflow runs. A
single-policy ``gmpq finetune --out DIR`` killed after its first epoch checkpoint must resume from
that checkpoint, not from scratch.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from faults import Procs, events, mlflow_children, tiny_config, trials_table, wait_for, write_config
from scenarios import attempts_by_trial, driver_kill, finetune_kill, run_scenario

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_sweep_driver_killed_mid_sweep_resumes_without_reruns_or_duplicates(tmp_path):
    o = run_scenario(driver_kill, tmp_path)
    assert o.ok, o.notes
    assert (o.rows_lost, o.duplicate_rows, o.runs_lost, o.duplicate_runs, o.reruns_of_finished) == (0, 0, 0, 0, 0), o
    sweep_dir = Path(o.paths["sweep_dir"])
    df = trials_table(sweep_dir)
    assert len(df) == 3 and set(df["status"]) == {"completed"} and o.trials_attempted == 3
    runs, kids = mlflow_children(f"sqlite:///{sweep_dir}/mlflow.db", "driverkill")
    assert len(runs[runs["role"] == "sweep"]) == 1 and len(kids) == 3 and set(kids["status"]) == {"FINISHED"}


def test_finetune_killed_after_an_epoch_resumes_from_its_checkpoint(tmp_path):
    procs = Procs(tmp_path / "logs")
    try:
        o = finetune_kill(tmp_path, procs, epochs=4)
    finally:
        assert procs.stop_all() == []
    assert o.ok and o.reruns_of_finished == 0 and o.trials_recovered == 1, o.notes
    assert "reusing the FP model" in procs.log("finetune-resume")
    result = json.loads((Path(o.paths["out_dir"]) / "finetune_result.json").read_text())
    assert result["epochs_run"] == 4 and [h["epoch"] for h in result["history"]] == [1, 2, 3, 4]


def test_a_sweep_stopped_with_ctrl_c_says_so_and_resume_reruns_the_stopped_trial(tmp_path):
    """SIGINT (Ctrl-C) mid-trial: Tune stops the running trial; it must not be written as completed
    (it used to be, with no results, and --resume then replayed that empty row). Exit 130 with the
    resume command; --resume runs the stopped trial again and finishes the sweep."""
    procs = Procs(tmp_path / "logs")
    name, sweep_dir = "ctrlc", tmp_path / "ctrlc"
    cfg = tiny_config(name=name, n_trials=2, cache_dir=str(tmp_path / "cache"),   # trials long enough to stop midway
                      space={"proxy_size": [200], "search_epochs": 3}, search={"max_steps_per_epoch": 6})
    args = ["sweep", "--config", str(write_config(tmp_path / "ctrlc.yaml", cfg)), "--out", str(sweep_dir)]
    try:
        driver = procs.start(args, name)
        first = wait_for(lambda: next((e for e in events(sweep_dir) if e.get("event") == "start"), None), 600, driver,
                         poll_s=0.1)
        assert first, procs.log(name)[-2000:]
        time.sleep(1.5)                                  # inside the first trial's search
        os.kill(driver.pid, signal.SIGINT)
        assert driver.wait(120) == 130, procs.log(name)[-2000:]
        out = procs.log(name)
        assert "The sweep was interrupted" in out and f"gmpq sweep --out {sweep_dir} --resume" in out, out[-2000:]
        before = trials_table(sweep_dir)
        assert before is None or first["trial_id"] not in set(before["trial_id"]), before
        uri = f"sqlite:///{sweep_dir}/mlflow.db"
        runs, kids = mlflow_children(uri, name)
        stopped = kids.set_index("trial_id").loc[first["trial_id"]]
        assert (stopped["status"], stopped["tag_status"]) == ("KILLED", "interrupted"), kids
        assert runs[runs["role"] == "sweep"]["status"].tolist() == ["KILLED"]
        from orchestrator.sweep_status import read_sweep_status      # gmpq status: stopped, the trial too
        status = read_sweep_status(sweep_dir)
        assert status.state == "stopped" and not (sweep_dir / "driver.json").exists()
        assert {t.trial_id: t.status for t in status.trials}[first["trial_id"]] == "stopped"
        rc, out = procs.run(args + ["--resume"], f"{name}-resume")
        assert rc == 0, out[-2000:]
    finally:
        assert procs.stop_all() == []
    df = trials_table(sweep_dir)
    assert len(df) == 2 and set(df["status"]) == {"completed"} and df["transfer_top1"].notna().all(), df
    assert attempts_by_trial(sweep_dir)[first["trial_id"]] == 2       # stopped once, run again in full
    runs, kids = mlflow_children(uri, name)                          # the same runs, reopened and ended
    assert len(kids) == 2 and set(kids["status"]) == {"FINISHED"} and set(kids["tag_status"]) == {"completed"}
    assert runs[runs["role"] == "sweep"]["status"].tolist() == ["FINISHED"]
