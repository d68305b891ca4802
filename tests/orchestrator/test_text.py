"""orchestrator.text: missing values print as '-', tables align."""
from __future__ import annotations

import math

import numpy as np

from orchestrator.text import fmt, text_table


def test_fmt_prints_a_dash_for_missing_values():
    assert [fmt(v, ".2f") for v in (None, math.nan, np.float64("nan"), math.inf, 1.234)] == ["-", "-", "-", "-", "1.23"]
    assert fmt(3, "d") == "3"


def test_text_table_aligns_columns_and_right_aligns_the_chosen_ones():
    out = text_table(["id", "top1"], [["a", "9.50"], ["bbb", "10.25"]], right={1})
    assert out.splitlines() == ["id    top1", "---  -----", "a     9.50", "bbb  10.25"]
    assert text_table(["id", "x"], []).splitlines() == ["id  x", "--  -"]


def test_the_sweep_summary_names_a_command_that_opens_its_tracking_store(tmp_path):
    """An http store is opened in a browser: 'mlflow ui --backend-store-uri http://...' crashes."""
    from orchestrator.commands.sweep import format_summary
    from orchestrator.sweep import SweepSummary

    summary = SweepSummary(sweep_dir=tmp_path, n_completed=0, n_pruned=0, n_failed=0, wall_seconds=1.0, resumed=False,
                           rows=[], n_unfinished=0, n_planned=0)
    assert "MLflow: open http://127.0.0.1:5000 (MLflow tracking server)" in format_summary(summary, "http://127.0.0.1:5000")
    assert f"MLflow: mlflow ui --backend-store-uri sqlite:///{tmp_path}/mlflow.db" in \
        format_summary(summary, f"sqlite:///{tmp_path}/mlflow.db")


def test_quiet_libraries_stops_mlflows_view_run_lines(monkeypatch):
    """An http tracking store made MLflow print two 'View run / experiment' lines per run on stdout."""
    from mlflow.environment_variables import MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT

    from orchestrator.commands import quiet_libraries

    for var in ("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "MLFLOW_LOGGING_LEVEL", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"):
        monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv(var, "x")          # registered, so the test's changes are undone
        monkeypatch.delenv(var)
    quiet_libraries()
    assert MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT.get() is True


def test_the_trial_tables_say_what_their_proxy_column_measures(tmp_path, capsys):
    """A completed trial's proxy% is its searched policy's, a pruned one's the supernet's at its last epoch."""
    from orchestrator.commands.sweep import format_summary
    from orchestrator.sweep import SweepSummary
    from orchestrator.text import PROXY_NOTE

    row = {"trial_id": "t1", "status": "completed", "budget_avg_bits": 3.0, "proxy_top1": 60.0,
           "transfer_top1": 79.0, "gbitops": 0.4}
    summary = SweepSummary(sweep_dir=tmp_path, n_completed=1, n_pruned=0, n_failed=0, wall_seconds=1.0, resumed=False,
                           rows=[row], n_unfinished=0, n_planned=1)
    assert PROXY_NOTE in format_summary(summary) and "a pruned, running or stopped trial's supernet at its last search epoch" in PROXY_NOTE
