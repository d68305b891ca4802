"""The idle cores of a local CPU sweep's tail go to the trials still running (no Ray: plain trial records)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from orchestrator.tail_threads import THREADS_FILE, TailThreads, ThreadsFollower, tail_threads


def _trials(*statuses: str) -> list:
    return [SimpleNamespace(status=s) for s in statuses]


def test_tail_threads_shares_the_cores_among_the_running_trials_never_below_one_share():
    assert tail_threads(cores=2, share=1, running=1) == 2
    assert tail_threads(cores=8, share=1, running=3) == 2
    assert tail_threads(cores=8, share=4, running=3) == 4        # never below a trial's own share
    assert tail_threads(cores=1, share=1, running=2) == 1


def test_nothing_is_written_while_trials_are_still_to_start(tmp_path):
    cb = TailThreads(tmp_path, n_trials=4, cores=2, share=1)
    cb.setup()
    trials = _trials("TERMINATED", "RUNNING", "RUNNING")          # the 4th is not created yet
    cb.on_trial_complete(0, trials, trials[0])
    trials = _trials("TERMINATED", "RUNNING", "RUNNING", "PENDING")
    cb.on_trial_complete(0, trials, trials[0])
    assert not (tmp_path / THREADS_FILE).exists()


def test_once_every_trial_started_an_ending_trial_gives_its_cores_to_the_others(tmp_path):
    cb = TailThreads(tmp_path, n_trials=3, cores=2, share=1)
    cb.setup()
    trials = _trials("TERMINATED", "RUNNING", "PENDING")           # Tune: on_trial_start before RUNNING
    cb.on_trial_start(0, trials, trials[2])                       # both slots busy: one thread each
    assert json.loads((tmp_path / THREADS_FILE).read_text()) == {"threads": 1, "running": 2}
    trials[2].status = "RUNNING"
    cb.on_trial_complete(0, trials, trials[1])                    # on_trial_complete before TERMINATED
    assert json.loads((tmp_path / THREADS_FILE).read_text()) == {"threads": 2, "running": 1}
    trials[1].status = "TERMINATED"
    trials[2].status = "ERROR"
    cb.on_trial_error(0, trials, trials[2])                       # nobody left: the file stays as it was
    assert json.loads((tmp_path / THREADS_FILE).read_text())["threads"] == 2
    trials[2].status = "PENDING"                                  # retried alone: both cores (already so)
    cb.on_trial_start(0, trials, trials[2])
    assert json.loads((tmp_path / THREADS_FILE).read_text()) == {"threads": 2, "running": 1}


def test_setup_removes_a_file_left_by_an_earlier_run(tmp_path):
    (tmp_path / THREADS_FILE).write_text('{"threads": 2}')
    TailThreads(tmp_path, n_trials=3, cores=2, share=1).setup()
    assert not (tmp_path / THREADS_FILE).exists()


@pytest.fixture
def keep_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_the_follower_applies_the_file_when_it_changes_and_reports_it(tmp_path, keep_torch_threads):
    from gmpq_core.fileio import atomic_write_json

    seen = []
    follow = ThreadsFollower(tmp_path, on_change=seen.append)
    torch.set_num_threads(1)
    follow(1, 10)                                                  # no file: nothing changes
    assert torch.get_num_threads() == 1 and seen == []
    atomic_write_json(tmp_path / THREADS_FILE, {"threads": 2, "running": 1})
    follow(2, 10)
    assert torch.get_num_threads() == 2 and seen == [2]
    follow(3, 10)                                                  # unchanged: no second call
    assert seen == [2]
    (tmp_path / THREADS_FILE).write_text("{not json")             # unreadable: ignored, retried next batch
    follow(4, 10)
    assert torch.get_num_threads() == 2 and seen == [2]
    (tmp_path / THREADS_FILE).write_text('{"threads": 1}')        # same size, maybe the same mtime tick
    follow(5, 10)
    assert torch.get_num_threads() == 1 and seen == [2, 1]
