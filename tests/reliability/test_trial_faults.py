"""Trial faults: a trial that raises, one whose loss turns NaN, one whose worker process is SIGKILLed.

A real 4-trial sweep (``max_failures: 1``) with the faults injected through the sweep config's
``testing`` switches and a real SIGKILL of the Ray worker running trial 3 (its pid is in the trial
event log). Each fault is recorded with its reason in Parquet and MLflow, retried once, and the
sweep goes on to finish every trial: the raising and killed trials recover, the NaN one fails
within its first epoch on both attempts.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from faults import events, mlflow_children, trials_table
from scenarios import run_scenario, trial_faults

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_raise_nan_and_killed_worker_are_failed_retried_and_the_sweep_finishes(tmp_path):
    o = run_scenario(trial_faults, tmp_path)
    assert o.ok, o.notes
    assert o.faults_injected == 3 and o.trials_attempted == 4
    assert (o.rows_lost, o.duplicate_rows, o.runs_lost, o.duplicate_runs) == (0, 0, 0, 0), o
    assert (o.trials_failed, o.trials_retried, o.trials_recovered, o.attempts) == (1, 3, 2, 7), o

    sweep_dir = Path(o.paths["sweep_dir"])
    number = {e["trial_id"]: e["trial_number"] for e in events(sweep_dir) if e["event"] == "start"}
    df = trials_table(sweep_dir).assign(number=lambda d: d["trial_id"].map(number)).set_index("number")
    assert list(df.loc[[1, 3, 4], "status"]) == ["completed"] * 3 and df.loc[2, "status"] == "failed"
    assert list(df.loc[[1, 2, 3, 4], "attempt"]) == [2, 2, 2, 1]
    assert "NonFiniteLossError" in df.loc[2, "error"] and "epoch 1" in df.loc[2, "error"]
    assert df.loc[2, "transfer_top1"] != df.loc[2, "transfer_top1"]      # NaN: never reached the transfer check
    nan_epochs = [e for e in events(sweep_dir) if e["event"] == "end" and number[e["trial_id"]] == 2]
    assert not nan_epochs                                                 # no attempt of it got past the search

    _, kids = mlflow_children(o.paths["tracking_uri"], "trialfaults")
    by = kids.assign(number=kids["trial_id"].map(number)).set_index("number")
    assert by.loc[2, "status"] == "FAILED" and "NonFiniteLossError" in by.loc[2, "error"]
    assert list(by.loc[[1, 3, 4], "status"]) == ["FINISHED"] * 3
    assert "InjectedFault" in by.loc[1, "tags"]["error.attempt1"]
    assert "died" in by.loc[3, "tags"]["error.attempt1"].lower() or "actor" in by.loc[3, "tags"]["error.attempt1"]
    log = Path(o.paths["log"]).read_text()
    assert "4 trials" in log and "FAILED" in log
    json.dumps(o.to_dict())
