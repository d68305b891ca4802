"""MLflowCallback's writer thread: hooks return at once, writes keep their order, nothing queued is lost.

The MLflow store itself is exercised by test_mlflow_sink.py (both modes, real Tune runs, real SQLite);
here the sink's write methods are replaced by recorders to see when and in which order they run.
"""
from __future__ import annotations

import pickle
import threading
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("ray")

from orchestrator.mlflow_callback import MLflowCallback  # noqa: E402


def _recording_callback(tmp_path, *, gate: threading.Event | None = None, fail_on: str | None = None):
    cb = MLflowCallback("sqlite:///unused.db", "t", tmp_path, {"name": "t"}, None, background=True)
    calls: list[tuple] = []

    def record(name):
        def fn(*args, **kwargs):
            if gate is not None:
                gate.wait(10)
            if name == fail_on:
                raise RuntimeError(f"{name} broke")
            calls.append((name, threading.current_thread().name, args))
            return f"run-{args[1]}" if name == "child_run" else None
        return fn

    cb.sink.connect = record("connect")
    cb.sink.child_run = record("child_run")
    cb.sink.log_metrics = record("log_metrics")
    cb.sink.finish = record("finish")
    return cb, calls


def _trial(tid="t1", **result):
    return SimpleNamespace(trial_id=tid, config={"x": 1.0}, last_result=result)


def test_hooks_return_before_the_writes_and_the_writes_keep_their_order(tmp_path):
    gate = threading.Event()
    cb, calls = _recording_callback(tmp_path, gate=gate)
    t0 = time.perf_counter()
    cb.setup()
    cb.on_trial_start(0, [], _trial())
    cb.on_trial_result(0, [], _trial(), {"epoch": 1, "proxy_top1": 12.5, "phase": "search"})
    assert time.perf_counter() - t0 < 1.0 and calls == []          # nothing written yet: the writer waits
    threading.Timer(0.3, gate.set).start()
    cb.on_trial_complete(0, [], _trial(done=True, transfer_top1=50.0, epoch=2))
    # a trial's end is written before its hook returns (Tune saves the trial as finished next)
    assert [c[0] for c in calls] == ["connect", "child_run", "log_metrics", "log_metrics", "finish"]
    assert all(c[1].startswith("gmpq-mlflow") for c in calls)
    assert calls[2][2][0] == "run-t1" and calls[2][2][1]["supernet_proxy_top1"] == 12.5     # the supernet's, per epoch
    cb.close()


def test_the_result_is_copied_when_the_hook_runs(tmp_path):
    gate = threading.Event()
    cb, calls = _recording_callback(tmp_path, gate=gate)
    result = {"epoch": 1, "proxy_top1": 10.0}
    cb.on_trial_result(0, [], _trial(), result)
    result["proxy_top1"] = 99.0                                    # Tune reuses / mutates its dicts
    gate.set()
    cb.close()
    metrics = [c[2][1] for c in calls if c[0] == "log_metrics"]
    assert metrics == [{"supernet_proxy_top1": 10.0}]


def test_a_failing_write_is_logged_and_the_later_writes_still_happen(tmp_path, caplog):
    cb, calls = _recording_callback(tmp_path, fail_on="connect")
    cb.setup()
    cb.on_trial_start(0, [], _trial())
    cb.on_experiment_end([])                                       # flushes
    assert [c[0] for c in calls] == ["child_run", "finish", "finish"]   # the started trial's run, the parent
    assert "MLflow logging step failed" in caplog.text


def test_close_drains_the_queue(tmp_path):
    gate = threading.Event()
    cb, calls = _recording_callback(tmp_path, gate=gate)
    cb.on_trial_start(0, [], _trial("a"))
    threading.Timer(0.2, gate.set).start()
    cb.close()
    assert [c[0] for c in calls] == ["child_run"] and cb._writer is None


def test_the_callback_pickles_without_its_thread(tmp_path):
    cb = MLflowCallback("sqlite:///unused.db", "t", tmp_path, {"name": "t"}, None, background=True)
    cb._do(time.sleep, 0.2)                       # the writer thread is running
    clone = pickle.loads(pickle.dumps(cb))        # Tune saves callbacks with the experiment state
    assert clone.background and clone._writer is None and clone._queued == []
    cb.close()


def test_in_hook_mode_writes_before_the_hook_returns(tmp_path):
    cb, calls = _recording_callback(tmp_path)
    cb.background = False
    cb.on_trial_start(0, [], _trial())
    assert [c[0] for c in calls] == ["child_run"] and calls[0][1] == threading.current_thread().name


def test_a_callback_pickled_before_the_writer_thread_existed_still_loads(tmp_path, monkeypatch):
    cb = MLflowCallback("sqlite:///unused.db", "t", tmp_path, {"name": "t"}, None, background=True)
    monkeypatch.setattr(MLflowCallback, "__module__", "orchestrator.mlflow_sink")   # where the class used to live
    data = pickle.dumps(cb)
    monkeypatch.undo()
    assert b"orchestrator.mlflow_sink" in data
    assert isinstance(pickle.loads(data), MLflowCallback)              # resuming such a sweep unpickles this
    old_state = {k: v for k, v in cb.__getstate__().items() if k not in ("background", "_writer", "_queued")}
    old = MLflowCallback.__new__(MLflowCallback)
    old.__setstate__(old_state)
    assert old.background is False and old._writer is None and old._queued == [] and old.sink.experiment_name == "t"


def test_runs_of_trials_stopped_midway_end_killed_and_so_does_the_parent(tmp_path):
    """Ctrl-C: Tune ends the experiment with a trial still running; its run must not stay RUNNING for ever
    (a resumed sweep reopens it)."""
    cb, calls = _recording_callback(tmp_path)
    cb.setup()
    for tid in ("a", "b"):
        cb.on_trial_start(0, [], _trial(tid))
    cb.on_trial_complete(0, [], _trial("a", done=True, transfer_top1=50.0, epoch=2))
    cb.on_experiment_end([])
    finishes = [c[2] for c in calls if c[0] == "finish"]
    assert finishes[0][:2] == ("run-a", "FINISHED")
    assert finishes[1] == ("run-b", "KILLED", {"status": "interrupted"})
    assert finishes[2][1] == "KILLED" and len(finishes) == 3        # the parent run

    cb2, calls2 = _recording_callback(tmp_path)                     # every trial ended: parent FINISHED
    cb2.setup()
    cb2.on_trial_start(0, [], _trial("a"))
    cb2.on_trial_complete(0, [], _trial("a", done=True, transfer_top1=50.0, epoch=2))
    cb2.on_experiment_end([])
    assert [c[2][1] for c in calls2 if c[0] == "finish"] == ["FINISHED", "FINISHED"]


def test_a_sweep_ended_by_a_lost_cluster_ends_its_parent_run_killed_even_with_every_started_trial_ended(tmp_path):
    """The head died: Tune recorded the running trials as errored (their nodes died first), so none is "stopped",
    yet the sweep did not finish: the parent run ends KILLED, not FINISHED (``end_interrupted``)."""
    cb, calls = _recording_callback(tmp_path)
    cb.setup()
    cb.on_trial_start(0, [], _trial("a"))
    cb.on_trial_error(0, [], _trial("a"))
    cb.end_interrupted()
    assert [c[2][1] for c in calls if c[0] == "finish"] == ["FAILED", "KILLED"] and cb._writer is None
