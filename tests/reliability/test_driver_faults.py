"""Driver faults: ``gmpq sweep`` and ``gmpq finetune`` killed with SIGKILL, then resumed.

The sweep driver is killed as soon as the first trial's row is in trials.parquet (the worst moment:
Tune may not have saved its experiment state yet). ``gmpq sweep --resume`` must finish the sweep
without rerunning a finished trial and without duplicate Parquet rows or MLflow runs. A
single-policy ``gmpq finetune --out DIR`` killed after its first epoch checkpoint must resume from
that checkpoint, not from scratch.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from faults import Procs, mlflow_children, trials_table
from scenarios import driver_kill, finetune_kill, run_scenario

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
