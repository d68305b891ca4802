"""run_side_by_side: at most `slots` jobs at once, every job runs, the first error comes back."""
from __future__ import annotations

import threading
import time

import pytest

from orchestrator.side_by_side import run_side_by_side, side_by_side_slots


def test_slots_are_what_the_devices_hold_capped_and_at_least_one():
    assert side_by_side_slots(n_jobs=3, per_job=1, available=2) == 2
    assert side_by_side_slots(n_jobs=3, per_job=2, available=2) == 1
    assert side_by_side_slots(n_jobs=2, per_job=2, available=8) == 2          # no more than there are jobs
    assert side_by_side_slots(n_jobs=4, per_job=1, available=8, cap=3) == 3
    assert side_by_side_slots(n_jobs=4, per_job=4, available=2) == 1          # too few devices: one at a time
    assert side_by_side_slots(n_jobs=0, per_job=1, available=2) == 1


def test_jobs_overlap_up_to_the_slots_and_never_beyond():
    lock, running, peak, done = threading.Lock(), [0], [0], []

    def job(i: int) -> None:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
            done.append(i)
    run_side_by_side(range(5), job, slots=2)
    assert sorted(done) == [0, 1, 2, 3, 4] and peak[0] == 2


def test_one_slot_runs_in_order_outside_the_main_thread_and_a_failure_does_not_stop_the_rest():
    # not the main thread: Ray Train's fit() there installs its own SIGINT handler (test_interrupts.py)
    seen = []

    def job(i: int) -> None:
        seen.append((i, threading.current_thread() is threading.main_thread()))
        if i == 1:
            raise ValueError("job 1")
    with pytest.raises(ValueError, match="job 1"):
        run_side_by_side(range(3), job, slots=1)
    assert seen == [(0, False), (1, False), (2, False)]


def test_an_interrupt_stops_at_once_and_no_queued_job_starts():
    started = []

    def job(i: int) -> None:
        started.append(i)
        if i == 0:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run_side_by_side(range(3), job, slots=1)
    assert started == [0]


def test_ctrl_c_while_jobs_run_side_by_side_reaches_the_caller_even_under_another_handler():
    """A Ray Tune run leaves a SIGINT handler that only logs; the wait must still be interruptible."""
    import os
    import signal

    started, release = [], threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *a: None)          # what Tune leaves behind
    try:
        def job(i: int) -> None:
            started.append(i)
            if i == 0:
                threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
            release.wait(5)
        with pytest.raises(KeyboardInterrupt):
            run_side_by_side(range(4), job, slots=2)
        release.set()
        time.sleep(0.2)
        assert sorted(started) == [0, 1]                               # jobs 2 and 3 never started
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler     # put back
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_failing_job_does_not_stop_the_others_and_the_first_error_in_item_order_is_raised():
    done = []

    def job(i: int) -> None:
        if i in (1, 2):
            time.sleep(0.05 if i == 1 else 0.0)            # job 2 fails first in time, job 1 first in order
            raise RuntimeError(f"job {i}")
        time.sleep(0.02)
        done.append(i)
    with pytest.raises(RuntimeError, match="job 1"):
        run_side_by_side(range(5), job, slots=2)
    assert sorted(done) == [0, 3, 4]


def test_an_exit_inside_a_side_by_side_job_stops_the_rest_and_comes_back_first():
    done = []

    def job(i: int) -> None:
        if i == 0:
            raise ValueError("job 0")
        if i == 1:
            time.sleep(0.05)
            raise SystemExit(3)
        time.sleep(0.2)
        done.append(i)
    with pytest.raises(SystemExit) as e:                 # not job 0's ValueError, raised earlier in time
        run_side_by_side(range(6), job, slots=2)
    assert e.value.code == 3
    assert len(done) <= 2                               # jobs queued after the exit never started
