"""SweepProgress: one stderr line per trial event, numbered by Tune's creation number."""
from __future__ import annotations

from types import SimpleNamespace

from orchestrator.sweep import SweepProgress
from orchestrator.trial_status import TrialStatusBook


def _trial(tid: str, folder: str | None):
    return SimpleNamespace(trial_id=tid, path=folder, config={"budget_avg_bits": 3.0, "proxy_size": 100})


def test_a_trial_keeps_its_creation_number_in_a_resumed_sweep(tmp_path, capsys):
    progress = SweepProgress(3, TrialStatusBook(), (0.3, 0.6))
    # a resumed sweep: trial 2 is the first (and only) trial this run starts
    second = _trial("ab12_00001", str(tmp_path / "gmpq_trial_ab12_00001_2_budget_avg_bits=3.0_2026-11-27"))
    progress.on_trial_start(0, [], second)
    # no folder name to read (no storage yet): the next number after the highest given
    progress.on_trial_start(0, [], _trial("ab12_00002", None))
    lines = capsys.readouterr().err.splitlines()
    assert "trial 2/3 ab12_00001: start (budget 3.00 bits, proxy 100)" in lines[0]
    assert "trial 3/3 ab12_00002: start" in lines[1]


def test_a_search_epoch_line_says_how_many_epochs_the_trial_searches(tmp_path, capsys):
    progress = SweepProgress(2, TrialStatusBook(), (0.3, 0.6))
    trial = _trial("ab12_00000", str(tmp_path / "gmpq_trial_ab12_00000_1_budget_avg_bits=3.0_2026-11-29"))
    progress.on_trial_start(0, [], trial)
    result = {"phase": "search", "epoch": 1, "proxy_top1": 55.0, "expected_gbitops": 0.441, "budget_bucket": 0}
    progress.on_trial_result(0, [], trial, {**result, "search_epochs": 3})
    progress.on_trial_result(0, [], trial, result)            # (a result without the count: a trial before it)
    lines = capsys.readouterr().err.splitlines()
    assert "trial 1/2 ab12_00000: search epoch 1/3: proxy_top1 55.0%, 0.441 expected GBitOPs" in lines[1]
    assert "trial 1/2 ab12_00000: search epoch 1: proxy_top1 55.0%" in lines[2]
