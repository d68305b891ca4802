"""orchestrator.cluster_watch / sweep_lost: a lost Ray cluster ends the driver at once, saying what is kept and how
to continue (the real-cluster run: tests/cluster/test_cluster_lost.py)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gmpq_core.errors import ConfigError
from orchestrator.cluster_watch import (LOST_AFTER_ENV, LOST_STATUS, ClusterWatch, gcs_answers, lost_after_s,
                                        split_address)
from orchestrator.results import TRIAL_EVENTS, trial_row, write_results
from orchestrator.sweep_config import load_sweep_config
from orchestrator.sweep_lost import sweep_lost_text

REPO = Path(__file__).resolve().parents[2]


def _watch(answers, *, lost_after: float = 0.3) -> tuple[ClusterWatch, list]:
    """A watch probing every 20 ms; ``answers``: the probe's replies in turn (the last one repeats)."""
    calls: list = []
    replies = list(answers)

    def probe(host: str, port: int, timeout: float) -> bool:
        assert (host, port) == ("10.0.0.1", 6379)
        return replies.pop(0) if len(replies) > 1 else replies[0]

    watch = ClusterWatch("10.0.0.1:6379", lambda a, s: calls.append((a, s)), lost_after=lost_after,
                         interval_s=0.02, probe=probe)
    return watch, calls


def test_the_watch_says_lost_once_after_the_gcs_is_silent_long_enough():
    watch, calls = _watch([True, True, False])
    t0 = time.monotonic()
    watch.start()
    while not calls and time.monotonic() - t0 < 5:
        time.sleep(0.01)
    time.sleep(0.2)
    watch.stop()
    assert len(calls) == 1 and calls[0][0] == "10.0.0.1:6379" and calls[0][1] >= 0.3 and watch.lost


def test_the_watch_never_fires_while_the_gcs_answers_or_answers_again_in_time():
    steady, calls = _watch([True])
    flaky, flaky_calls = _watch(([False] * 5 + [True]) * 10 + [True])     # silent 0.1 s at a time, 0.3 s allowed
    steady.start(), flaky.start()
    time.sleep(1.0)
    steady.stop(), flaky.stop()
    assert calls == [] and flaky_calls == [] and not steady.lost


def test_gcs_answers_is_a_real_connection_and_addresses_are_split():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert gcs_answers("127.0.0.1", port, 1.0)
    assert not gcs_answers("127.0.0.1", port, 1.0)            # closed now: refused
    assert split_address("192.0.2.2:6379") == ("192.0.2.2", 6379)
    assert split_address("[::1]:6379") == ("::1", 6379)
    assert split_address("auto") is None and split_address("host:") is None


@pytest.mark.parametrize("raw", ["abc", "0", "51", "-3"])
def test_a_bad_lost_after_setting_is_one_paragraph_naming_it(monkeypatch, raw):
    monkeypatch.setenv(LOST_AFTER_ENV, raw)
    with pytest.raises(ConfigError) as e:
        lost_after_s()
    msg = str(e.value)
    assert f"${LOST_AFTER_ENV}={raw!r}" in msg and "from 1 to 50" in msg and "\n" not in msg


def test_the_lost_after_setting_defaults_to_ten_seconds(monkeypatch):
    monkeypatch.delenv(LOST_AFTER_ENV, raising=False)
    assert lost_after_s() == 10.0
    monkeypatch.setenv(LOST_AFTER_ENV, "30")
    assert lost_after_s() == 30.0


def test_exit_lost_says_it_cleans_up_removes_the_marker_and_exits_75(tmp_path):
    """In a child process: a driver marker held, then ``exit_lost`` from another thread while the main thread waits
    (as it does, stuck in Ray)."""
    code = f"""
import threading, time
from pathlib import Path
from orchestrator import cluster_watch
from orchestrator.driver_markers import driver_marker
cluster_watch.CLEANUP_S = 1.0
d = Path({str(tmp_path)!r})
def cleanup():
    (d / "cleaned").write_text("yes")
def hang():
    time.sleep(60)
with driver_marker(d, "sweep"):
    assert (d / "driver.json").exists()
    threading.Thread(target=cluster_watch.exit_lost, args=("the cluster is gone",),
                     kwargs={{"cleanup": cleanup}}).start()
    time.sleep(30)
"""
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == LOST_STATUS, done.stderr
    assert time.monotonic() - t0 < 20
    assert "the cluster is gone" in done.stderr and "Traceback" not in done.stderr
    assert (tmp_path / "cleaned").read_text() == "yes" and not (tmp_path / "driver.json").exists()


def _sweep_folder(d: Path) -> None:
    """One completed and one failed trial ended, a third running (this process's marker)."""
    rows = [trial_row(trial_id="t1", config={"budget_avg_bits": 3.0}, status="completed",
                      last_result={"transfer_top1": 75.0, "gbitops": 0.4}),
            trial_row(trial_id="t2", config={"budget_avg_bits": 4.0}, status="failed", last_result={})]
    write_results(d, rows, [])
    (d / "sweep_config.yaml").write_text("name: lost\nn_trials: 4\n")
    now = time.time()
    events = [{"event": "start", "trial_id": t, "trial_number": i, "params": {}, "time": now - 50}
              for i, t in enumerate(("t1", "t2", "t3"), 1)]
    (d / TRIAL_EVENTS).write_text("".join(json.dumps(e) + "\n" for e in events))
    (d / "driver.json").write_text(json.dumps({"stage": "sweep", "host": socket.gethostname(), "pid": os.getpid()}))


def test_the_lost_cluster_paragraph_says_what_is_kept_and_how_to_continue(tmp_path):
    _sweep_folder(tmp_path)
    joined = load_sweep_config(preset="demo", overrides={"out_dir": str(tmp_path), "address": "192.0.2.2:6379"})
    text = sweep_lost_text(joined, "192.0.2.2:6379", 10.4, "run")
    assert text.startswith("gmpq run: the Ray cluster at 192.0.2.2:6379 stopped answering 10 s ago")
    assert "2 trial(s) had ended (1 completed, 1 failed)" in text and "1 was running and stop here" in text
    assert f"gmpq run --out {tmp_path} --resume auto --address ADDRESS" in text    # no Tune state in this folder
    assert f"Exit status {LOST_STATUS}." in text and "\n" not in text
    local = load_sweep_config(preset="demo", overrides={"out_dir": str(tmp_path)})
    text = sweep_lost_text(local, "127.0.0.1:6379", 12, "sweep")
    assert "the Ray instance this process started on this machine" in text and "--address" not in text


def test_the_paragraph_of_a_sweep_lost_before_its_first_trial(tmp_path):
    (tmp_path / "sweep_config.yaml").write_text("name: lost\nn_trials: 4\n")
    cfg = load_sweep_config(preset="demo", overrides={"out_dir": str(tmp_path), "address": "192.0.2.2:6379"})
    assert "No trial had started, so nothing is lost." in sweep_lost_text(cfg, "192.0.2.2:6379", 10)


def test_a_trial_whose_node_died_says_so_in_its_error(tmp_path):
    from types import SimpleNamespace

    from orchestrator.results import _error_text

    err = tmp_path / "error.txt"
    err.write_text("Traceback (most recent call last):\n  File \"x.py\", line 1\nray.exceptions.ActorDiedError: The "
                   "actor died unexpectedly before finishing this task.\n\tclass_name: ImplicitFunc\nThe actor died "
                   "because its node has died. Node Id: 5443\n\tthe actor's node was terminated expectedly: received "
                   "SIGTERM\n")
    trial = SimpleNamespace(trial_id="t", pickled_error_file=None, error_file=str(err))
    assert _error_text(trial) == ("ray.exceptions.ActorDiedError: its node died (the actor's node was terminated "
                                  "expectedly: received SIGTERM)")
    err.write_text("Traceback (most recent call last):\nValueError: bad lr\n")
    assert _error_text(trial) == "ValueError: bad lr"


def test_the_final_fine_tunes_paragraph_names_what_is_kept_and_both_commands(tmp_path):
    from orchestrator.final_results import write_final
    from orchestrator.sweep_lost import final_lost_text

    text = final_lost_text(tmp_path, "192.0.2.2:6379", 11, local=False)
    assert text.startswith("gmpq finetune: the Ray cluster at 192.0.2.2:6379 stopped answering 11 s ago")
    assert "No policy had finished its fine-tune" in text and "\n" not in text
    assert f"gmpq finetune --sweep {tmp_path} --address ADDRESS" in text
    assert f"gmpq run --out {tmp_path} --resume --address ADDRESS." in text
    write_final(tmp_path, {"t1": {"trial_id": "t1", "final_top1": 80.0, "gbitops": 0.3, "epochs": 1}})
    text = final_lost_text(tmp_path, "127.0.0.1:6379", 11, local=True)
    assert f"1 fine-tuned policy is kept in {tmp_path / 'final.parquet'}" in text and "--address" not in text


def test_settle_returns_at_once_while_the_gcs_answers_and_waits_for_the_verdict_when_not():
    answering, calls = _watch([True])
    answering.start()
    t0 = time.monotonic()
    answering.settle()
    assert time.monotonic() - t0 < 0.5 and calls == []
    answering.stop()
    silent, calls = _watch([False])
    silent.start()
    silent.settle()                       # returns once on_lost has run (in a driver it ends the process)
    silent.stop()
    assert len(calls) == 1 and silent.lost
