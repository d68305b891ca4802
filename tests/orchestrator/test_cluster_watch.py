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


@pytest.mark.parametrize("raw", ["abc", "0", "31", "-3"])
def test_a_bad_lost_after_setting_is_one_paragraph_naming_it(monkeypatch, raw):
    monkeypatch.setenv(LOST_AFTER_ENV, raw)
    with pytest.raises(ConfigError) as e:
        lost_after_s()
    msg = str(e.value)
    assert f"${LOST_AFTER_ENV}={raw!r}" in msg and "from 1 to 30" in msg and "\n" not in msg


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
    assert "2 trial(s) had ended (1 completed, 1 failed)" in text and "1 was running and stops here" in text
    assert f"gmpq run --out {tmp_path} --resume auto --address ADDRESS" in text    # no Tune state in this folder
    assert f"Exit status {LOST_STATUS}." in text and "\n" not in text
    local = load_sweep_config(preset="demo", overrides={"out_dir": str(tmp_path)})
    text = sweep_lost_text(local, "127.0.0.1:6379", 12, "sweep")
    assert "the Ray instance this process started on this machine" in text and "--address" not in text


def test_the_lost_summary_counts_the_trials_an_earlier_run_stopped_as_its_table_lists_them(tmp_path):
    # t3 started under an earlier driver, gone without a row: the table lists it 'stopped'; the totals count it too
    from orchestrator.sweep_lost import sweep_lost_summary

    _sweep_folder(tmp_path)
    (tmp_path / "driver.json").unlink()
    cfg = load_sweep_config(preset="demo", overrides={"out_dir": str(tmp_path), "address": "192.0.2.2:6379"})
    summary = sweep_lost_summary(cfg, "sweep")
    assert "\nt3             stopped " in summary
    assert "1 completed, 0 pruned, 1 failed; 1 stopped midway. Results:" in summary
    assert "1 was stopped midway before" in sweep_lost_text(cfg, "192.0.2.2:6379", 10)


def test_the_paragraph_of_a_sweep_lost_before_its_first_trial(tmp_path):
    (tmp_path / "sweep_config.yaml").write_text("name: lost\nn_trials: 4\n")
    cfg = load_sweep_config(preset="demo", overrides={"out_dir": str(tmp_path), "address": "192.0.2.2:6379"})
    assert "No trial had started, so nothing is lost." in sweep_lost_text(cfg, "192.0.2.2:6379", 10)


def test_a_trial_whose_node_died_says_so_in_its_error(tmp_path):
    from types import SimpleNamespace

    from orchestrator.results import error_text

    err = tmp_path / "error.txt"
    err.write_text("Traceback (most recent call last):\n  File \"x.py\", line 1\nray.exceptions.ActorDiedError: The "
                   "actor died unexpectedly before finishing this task.\n\tclass_name: ImplicitFunc\nThe actor died "
                   "because its node has died. Node Id: 5443\n\tthe actor's node was terminated expectedly: received "
                   "SIGTERM\n")
    trial = SimpleNamespace(trial_id="t", pickled_error_file=None, error_file=str(err))
    assert error_text(trial) == ("ray.exceptions.ActorDiedError: its node died (the actor's node was terminated "
                                  "expectedly: received SIGTERM)")
    err.write_text("Traceback (most recent call last):\nValueError: bad lr\n")
    assert error_text(trial) == "ValueError: bad lr"


def test_the_final_fine_tunes_paragraph_names_what_is_kept_and_both_commands(tmp_path):
    from orchestrator.final_results import write_final
    from orchestrator.sweep_lost import final_lost_text

    text = final_lost_text(tmp_path, "192.0.2.2:6379", 11, local=False)
    assert text.startswith("gmpq finetune: the Ray cluster at 192.0.2.2:6379 stopped answering 11 s ago")
    assert "No policy had finished its fine-tune" in text and "\n" not in text
    assert f"Continue with: gmpq finetune --sweep {tmp_path} --address ADDRESS (" in text and "gmpq run" not in text
    run = final_lost_text(tmp_path, "192.0.2.2:6379", 11, local=False, command="run")     # gmpq run's last stage
    assert run.startswith("gmpq run: ") and f"Continue with: gmpq run --out {tmp_path} --resume --address" in run
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
    slow = []
    silent = ClusterWatch("10.0.0.1:6379", lambda a, s: time.sleep(0.5) or slow.append(s), lost_after=0.2,
                          interval_s=0.02, probe=lambda *_: False)
    silent.start()
    silent.settle()              # returns only once on_lost has returned (in a driver it never does: it exits)
    assert len(slow) == 1 and silent.lost
    silent.stop()


def _child(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    code = "import time\nfrom orchestrator import cluster_watch\nfrom orchestrator.cluster_watch import *\n" + body
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_an_error_ray_raises_for_the_lost_cluster_waits_for_the_paragraph_and_75(tmp_path):
    """The review: the main thread's Ray error (raised before the verdict) ended the command with exit 1 and that
    error while a slow cleanup (an MLflow server on the lost head) still ran."""
    done = _child(tmp_path, """
def lost(address, seconds):
    exit_lost("the paragraph", cleanup=lambda: time.sleep(7))
watch = ClusterWatch("10.0.0.1:6379", lost, lost_after=0.3, interval_s=0.05, probe=lambda *_: False).start()
try:
    raise RuntimeError("ActorUnavailableError from Ray")
except RuntimeError:
    watch.settle()
    raise
""")
    assert done.returncode == LOST_STATUS and "the paragraph" in done.stderr, done.stderr
    assert "ActorUnavailableError" not in done.stderr


def test_a_handler_that_raises_still_ends_the_command_with_a_paragraph_and_75(tmp_path):
    done = _child(tmp_path, """
def lost(address, seconds):
    raise OSError("the sweep folder's NFS went with the head")
watch = ClusterWatch("10.0.0.1:6379", lost, lost_after=0.3, interval_s=0.05, probe=lambda *_: False).start()
watch.settle()
time.sleep(30)
""")
    assert done.returncode == LOST_STATUS, done.stderr
    assert "the Ray cluster at 10.0.0.1:6379 stopped answering" in done.stderr and "NFS went with" in done.stderr


def test_a_lost_cluster_ends_with_the_summary_on_stdout_and_the_paragraph_on_stderr(tmp_path):
    """`gmpq sweep ... > log`: the log held nothing of a sweep whose cluster was lost (all of it went to stderr); now
    its summary goes where every other end's goes (stdout: the trials' table, the counts, the command that continues)
    and the paragraph of what happened to stderr. The same for the final fine-tune. The watch fires in a child
    process whose main thread waits, as a driver stuck in Ray does."""
    from orchestrator.final_results import write_final

    sweep, final = tmp_path / "sweep", tmp_path / "final"
    sweep.mkdir()
    _sweep_folder(sweep)
    done = _child(tmp_path, f"""
from orchestrator.sweep_config import load_sweep_config
from orchestrator.sweep_lost import sweep_lost_handler
cfg = load_sweep_config(preset="demo", overrides={{"out_dir": {str(sweep)!r}, "address": "192.0.2.2:6379"}})
ClusterWatch("192.0.2.2:6379", sweep_lost_handler(cfg, [], "sweep"), lost_after=0.3, interval_s=0.05,
             probe=lambda *_: False).start()
time.sleep(30)
""")
    assert done.returncode == LOST_STATUS, done.stderr
    out = done.stdout
    assert out.startswith("trial ") and "\nt1 " in out and "\nt2 " in out and "\nt3             stopped " in out
    assert f"1 completed, 0 pruned, 1 failed; 1 stopped midway. Results: {sweep / 'trials.parquet'}" in out
    assert f"The sweep stopped: its Ray cluster was lost (stderr says how). Continue with: gmpq sweep --out {sweep} " \
           "--resume auto --address ADDRESS" in out and "stopped answering" not in out
    assert done.stderr.startswith("gmpq sweep: the Ray cluster at 192.0.2.2:6379 stopped answering")
    assert "2 trial(s) had ended" in done.stderr and "transfer%" not in done.stderr

    write_final(final, {"t1": {"trial_id": "t1", "transfer_top1": 60.0, "final_top1": 80.0, "final_top5": 99.0,
                               "gbitops": 0.3, "epochs": 1, "workers": 1, "seconds": 12.0}})
    done = _child(tmp_path, f"""
from pathlib import Path
from orchestrator.sweep_lost import final_lost_handler
ClusterWatch("192.0.2.2:6379", final_lost_handler(Path({str(final)!r}), local=False), lost_after=0.3,
             interval_s=0.05, probe=lambda *_: False).start()
time.sleep(30)
""")
    assert done.returncode == LOST_STATUS, done.stderr
    assert done.stdout.startswith("trial_id") and "\nt1 " in done.stdout and "80.00" in done.stdout
    assert f"The final fine-tune stopped: its Ray cluster was lost (stderr says how). Continue with: gmpq finetune " \
           f"--sweep {final} --address ADDRESS" in done.stdout
    assert done.stderr.startswith("gmpq finetune: the Ray cluster at 192.0.2.2:6379 stopped answering")
    assert "1 fine-tuned policy is kept" in done.stderr and "final_top1" not in done.stderr


def test_bounded_gives_the_default_for_a_slow_or_failing_read():
    from orchestrator.cluster_watch import bounded

    assert bounded(lambda: 3, 0) == 3
    assert bounded(lambda: time.sleep(5), "late", timeout=0.2) == "late"
    assert bounded(lambda: 1 / 0, "failed") == "failed"


def test_only_a_silent_gcs_counts_not_an_error_of_this_process(monkeypatch):
    import errno

    def raising(code):
        def connect(*_, **__):
            raise OSError(code, os.strerror(code))
        return connect

    monkeypatch.setattr(socket, "create_connection", raising(errno.ECONNREFUSED))
    assert gcs_answers("10.0.0.1", 6379, 0.1) is False
    monkeypatch.setattr(socket, "create_connection", raising(errno.EMFILE))      # out of file handles: no verdict
    assert gcs_answers("10.0.0.1", 6379, 0.1) is True


def test_no_watch_without_a_ray_session():
    import ray

    from orchestrator.cluster_watch import watching_cluster

    if ray.is_initialized():
        pytest.skip("Ray already runs in this test process")
    with watching_cluster(lambda *_: None) as watch:
        assert watch is None


def test_a_pickled_error_of_a_dead_node_says_so_too(tmp_path):
    from types import SimpleNamespace

    import ray.cloudpickle as cloudpickle

    from orchestrator.results import error_text

    pickled = tmp_path / "error.pkl"
    pickled.write_bytes(cloudpickle.dumps(RuntimeError("The actor died unexpectedly.\nThe actor died because its "
                                                       "node has died. Node Id: 1\n\tthe actor's node was "
                                                       "terminated unexpectedly: raylet crashed")))
    trial = SimpleNamespace(trial_id="t", pickled_error_file=str(pickled), error_file=None)
    assert error_text(trial) == ("RuntimeError: its node died (the actor's node was terminated unexpectedly: raylet "
                                 "crashed)")


def test_a_local_ray_gone_with_the_commands_sigterm_is_the_sigterms_stop(monkeypatch):
    """The walkthrough: SIGTERM to the whole process group (systemd, Slurm) stopped the driver's own local Ray too;
    the paragraph blamed 'ray stop' or the OOM killer and exited 75."""
    import orchestrator.ray_env as ray_env
    from orchestrator.cluster_watch import lost_status, lost_text

    monkeypatch.setattr(ray_env, "_sigterm_seen", True)
    text = lost_text("sweep", "127.0.0.1:6379", 10, local=True, work="the sweep", rest="Continue with: X.")
    assert "the command got SIGTERM, and so did the Ray instance it started" in text and "out-of-memory" not in text
    assert "so the sweep was terminated (SIGTERM). Continue with: X. Exit status 143." in text
    assert lost_status() == 143
    monkeypatch.setattr(ray_env, "_sigterm_seen", False)
    assert lost_status() == LOST_STATUS and "out-of-memory" in lost_text("sweep", "a:1", 10, local=True, work="w",
                                                                          rest="r")
