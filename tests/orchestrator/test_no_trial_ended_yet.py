"""A sweep stopped before any trial ended has no trials.parquet: its summary does not name that file, and gmpq
pareto / gmpq finetune --sweep say no trial has ended and how to continue it (as gmpq status does), instead of
"run the stage that writes it first"."""
from __future__ import annotations

import json
import time

import pytest

from orchestrator.cli import main


def _stopped_sweep(d, *, started: bool = True):
    """A sweep folder as Ctrl-C leaves it when one trial had started and none had ended (no driver running)."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "sweep_config.yaml").write_text("name: cut\nmodel: resnet20\nn_trials: 4\n")
    if started:
        event = {"event": "start", "trial_id": "t1", "trial_number": 0, "time": time.time(),
                 "params": {"budget_avg_bits": 3.0, "proxy_size": 512}}
        (d / "trial_events.jsonl").write_text(json.dumps(event) + "\n")
    return d


def test_the_summary_of_a_sweep_stopped_before_any_trial_ended_names_no_results_file(tmp_path):
    from orchestrator.commands.sweep import format_summary
    from orchestrator.results import trial_row, write_results
    from orchestrator.sweep import SweepSummary

    summary = SweepSummary(sweep_dir=tmp_path, n_completed=0, n_pruned=0, n_failed=0, wall_seconds=18.0,
                           n_unfinished=1, n_planned=4)
    text = format_summary(summary)
    assert "Results:" not in text and str(tmp_path / "trials.parquet") not in text
    assert "No trial has ended yet" in text and f"--out {tmp_path} --resume" in text
    write_results(tmp_path, [trial_row(trial_id="t1", config={"budget_avg_bits": 3.0}, status="pruned",
                                       last_result={"proxy_top1": 10.0})], [])
    assert f"Results: {tmp_path / 'trials.parquet'}" in format_summary(summary)


@pytest.mark.parametrize("command", [["pareto", "--no-mlflow"], ["finetune"]])
@pytest.mark.parametrize("started", [True, False])
def test_pareto_and_finetune_of_a_sweep_with_no_ended_trial_say_so_and_how_to_continue(tmp_path, capsys, command,
                                                                                       started):
    sweep = _stopped_sweep(tmp_path / "s", started=started)
    assert main([command[0], "--sweep", str(sweep), *command[1:]]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"No trial of the sweep {sweep} has ended yet" in err
    flag = "--resume" if started else "--resume auto"       # none started: --resume auto starts it from its config
    assert f"Continue with: gmpq sweep --out {sweep} {flag} (or gmpq run --out {sweep} {flag}" in err
    assert "Run the stage that writes it first" not in err and "Results file not found" not in err
    assert not (sweep / "pareto.parquet").exists()


def test_status_and_pareto_word_the_stopped_sweep_alike(tmp_path, capsys):
    sweep = _stopped_sweep(tmp_path / "s")
    assert main(["status", "--sweep", str(sweep)]) == 0
    status_out = " ".join(capsys.readouterr().out.split())
    main(["pareto", "--sweep", str(sweep), "--no-mlflow"])
    err = " ".join(capsys.readouterr().err.split())
    line = f"Continue with: gmpq sweep --out {sweep} --resume (or gmpq run --out {sweep} --resume, which also fine-tunes)."
    assert line in status_out and line in err


def test_a_folder_that_is_no_sweep_still_names_the_missing_file(tmp_path, capsys):
    from gmpq_core.errors import CheckpointError
    from orchestrator.results import read_trials_table

    with pytest.raises(CheckpointError, match="Results file not found"):
        read_trials_table(tmp_path)
