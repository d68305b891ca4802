"""Ctrl-C (and SIGTERM, a preempted batch job) ends a command with exit 130 (SIGTERM: 143, "terminated") and one
line: what is kept, and the command that continues it; never Ray Train's silent status 1 or Ray's C++ stack dump."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.side_by_side import run_side_by_side


def test_ctrl_c_during_a_single_fine_tune_reaches_the_caller_even_under_another_handler():
    """One slot too: the job runs in a thread, so Ray Train's fit() cannot install its SIGINT handler (whose
    sys.exit(0) came back from ray.get as SystemExit(1)), and a handler left by Ray Tune does not swallow it."""
    started, release, threads = [], threading.Event(), []
    previous = signal.signal(signal.SIGINT, lambda *a: None)          # what Tune leaves behind
    try:
        def job(i: int) -> None:
            started.append(i)
            threads.append(threading.current_thread() is threading.main_thread())
            threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
            release.wait(5)
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            run_side_by_side(range(3), job, slots=1)
        assert time.monotonic() - t0 < 3                               # at once, not after the job
        release.set()
        time.sleep(0.2)
        assert started == [0] and threads == [False]                   # jobs 1 and 2 never started
    finally:
        signal.signal(signal.SIGINT, previous)


def test_sigterm_inside_a_ray_session_does_what_ctrl_c_does_and_the_handler_is_put_back():
    from orchestrator.ray_env import Terminated, ctrl_c_signals

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated):                                    # Python's Ctrl-C: a KeyboardInterrupt
        with ctrl_c_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(2)
    assert signal.getsignal(signal.SIGTERM) is before
    seen = []
    previous = signal.signal(signal.SIGINT, lambda sig, frame: seen.append(sig))     # a sweep's Ray Tune handler
    try:
        with ctrl_c_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
        assert seen == [signal.SIGINT]                                  # handed to it: a graceful stop
    finally:
        signal.signal(signal.SIGINT, previous)


def test_an_interrupted_sweep_fine_tune_says_what_is_kept_and_the_command_that_continues_it(
        tmp_path, monkeypatch, capsys):
    from orchestrator.commands import finetune

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(finetune, "run_sweep_finetune", interrupted)
    assert main(["finetune", "--sweep", str(tmp_path), "--top-k", "1"]) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("gmpq finetune: the fine-tune was interrupted;") and "\n" not in err
    assert f"({tmp_path / 'final.parquet'})" in err
    assert err.endswith(f"Continue with: gmpq finetune --sweep {tmp_path} --top-k 1")


def test_gmpq_run_interrupted_in_its_final_stage_says_so_and_removes_its_driver_marker(tmp_path, monkeypatch,
                                                                                         capsys):
    import contextlib

    import pandas as pd

    from orchestrator import final_stage, ray_env, sweep  # noqa: F401 (final_stage binds ray_session as it is
    from orchestrator.commands import _finetune_sweep, pareto  # imported: before the patch, or the fake stays)

    out = tmp_path / "run"
    summary = types.SimpleNamespace(rows=[], n_completed=2, n_pruned=0, n_failed=0, wall_seconds=1.0,
                                    sweep_dir=out, interrupted=False)

    def stage3(sweep_dir, args, *, say=None):
        assert (sweep_dir / "driver.json").is_file()
        raise KeyboardInterrupt
    monkeypatch.setattr(ray_env, "ray_session", lambda address=None: contextlib.nullcontext(True))
    monkeypatch.setattr(sweep, "run_sweep", lambda cfg, resume, progress, **kw: summary)
    monkeypatch.setattr(pareto, "pareto_stage", lambda *a: pd.DataFrame({"selected": [True, False]}))
    monkeypatch.setattr(_finetune_sweep, "finetune_stage", stage3)
    before = signal.getsignal(signal.SIGINT)     # Python's default; ignored when the suite runs as a background job
    assert main(["run", "--preset", "demo", "--out", str(out), "--workers", "auto", "--quiet"]) == 130
    err = capsys.readouterr().err
    assert (f"gmpq run: the final fine-tune was interrupted; the sweep, its Pareto selection, the policies "
            f"fine-tuned before ({out / 'final.parquet'})") in err
    assert err.rstrip().endswith(f"Continue with: gmpq run --out {out} --resume")
    assert not (out / "driver.json").exists()
    assert signal.getsignal(signal.SIGINT) is before                 # put back as it was


def _sweep_to_fine_tune(root: Path) -> Path:
    """A tiny finished sweep (mnist5k, one selected policy) whose final fine-tune runs long enough to interrupt."""
    from final_sweep import make_sweep

    make_sweep(root)
    return root


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("sig, status, word", [(signal.SIGINT, 130, "interrupted"),
                                               (signal.SIGTERM, 143, "terminated (SIGTERM)")], ids=["ctrl-c", "sigterm"])
def test_interrupting_gmpq_finetune_sweep_exits_with_the_command_that_continues_it(tmp_path, sig, status, word):
    """The real command (Ray Train, one policy at a time), signalled as a terminal (Ctrl-C) or a batch system
    (SIGTERM: exit 143, "terminated") does it: its whole process group, once the fine-tune reports progress."""
    sweep_dir = _sweep_to_fine_tune(tmp_path / "sweep")
    cmd = [sys.executable, "-m", "orchestrator.cli", "finetune", "--sweep", str(sweep_dir), "--epochs", "20"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    lines: list[str] = []
    progress = threading.Event()

    def read() -> None:
        for line in p.stderr:
            lines.append(line)
            if re.search(r"epoch \d+/20: step \d+/\d+", line):   # the first line printed may be a later epoch
                progress.set()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert progress.wait(240), "".join(lines)[-3000:]
        os.killpg(p.pid, sig)
        rc = p.wait(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    reader.join(10)
    err = "".join(lines)
    assert rc == status, err[-3000:]
    assert f"gmpq finetune: the fine-tune was {word};" in err, err[-3000:]
    assert err.rstrip().endswith(f"Continue with: gmpq finetune --sweep {sweep_dir} --epochs 20"), err[-3000:]
    assert "Traceback" not in err and "SIGTERM received" not in err and "PC: @" not in err, err[-3000:]
    assert not (sweep_dir / "driver.json").exists()                     # gmpq status: not a dead driver's marker
