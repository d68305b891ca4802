"""``gmpq sweep`` (real Ray Tune, Optuna, MLflow) stopped by Ctrl-C or SIGTERM: in its last steps, once the trials
ended (Ray Tune's handler, left installed, used to swallow Ctrl-C there), and SIGTERM in its trials. Exit 130
(Ctrl-C) or 143 (SIGTERM) with one line: what is kept and the command that continues it; nothing finished is lost."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tiny_sweep import tiny_sweep_config  # same folder (pytest puts it on sys.path)

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[2]

CONFIG = tiny_sweep_config("sig")

# gmpq, paused in the sweep's last steps: its trials ended and Ray is shut down (orchestrator.sweep._tune
# returned); a line says so, then it waits there to be signalled.
PAUSED = '''
import sys, time
from orchestrator import sweep
_tune = sweep._tune
def paused(*args, **kwargs):
    grid = _tune(*args, **kwargs)
    print("test: the trials ended", file=sys.stderr, flush=True)
    time.sleep(120)
    return grid
sweep._tune = paused
from orchestrator.cli import main
sys.exit(main(sys.argv[1:]))
'''


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One teacher/FP-target cache for the module: trained by the first sweep, read by the others."""
    return tmp_path_factory.mktemp("sig_cache")


def _config(root: Path, cache: Path, **changes) -> Path:
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "cache_dir": str(cache), **changes}))
    return path


def _signalled(cmd: list[str], sig: int, when: str, timeout: float = 400) -> tuple[int, str]:
    """Run ``cmd`` in its own session, send ``sig`` to it once a stderr line contains ``when``; (status, stderr)."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    lines: list[str] = []
    seen = threading.Event()

    def read() -> None:
        for line in p.stdout:
            lines.append(line)
            if when in line:
                seen.set()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert seen.wait(timeout), "".join(lines)[-3000:]
        time.sleep(1.0)
        os.kill(p.pid, sig)
        rc = p.wait(timeout=60)                  # old behaviour: the signal ignored, the pause runs on (120 s)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    reader.join(10)
    return rc, "".join(lines)


@pytest.mark.parametrize("sig, status, word", [(signal.SIGINT, 130, "interrupted"),
                                               (signal.SIGTERM, 143, "terminated (SIGTERM)")], ids=["ctrl-c", "sigterm"])
def test_a_sweep_stopped_in_its_last_steps_keeps_its_trials_and_continues(tmp_path, cache, sig, status, word):
    import pandas as pd

    out = tmp_path / "sweep"
    script = tmp_path / "paused_gmpq.py"
    script.write_text(PAUSED)
    cmd = [sys.executable, str(script), "sweep", "--config", str(_config(tmp_path, cache)), "--out", str(out), "--quiet"]
    rc, text = _signalled(cmd, sig, "test: the trials ended")
    assert rc == status, text[-3000:]
    assert text.rstrip().endswith(f"gmpq sweep: the sweep was {word}; its finished trials are kept "
                                  f"({out / 'trials.parquet'}). Continue with: gmpq sweep --out {out} --resume"), text[-3000:]
    assert "Traceback" not in text and "Stop signal received" not in text, text[-3000:]
    assert not (out / "driver.json").exists()                            # gmpq status: not a dead driver's
    rows = pd.read_parquet(out / "trials.parquet")
    assert len(rows) == 1 and set(rows["status"]) == {"completed"}       # the finished trial is kept
    if sig == signal.SIGTERM:
        return
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "sweep", "--out", str(out), "--resume"],
                          env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}, cwd=ROOT, capture_output=True,
                          text=True, timeout=400, start_new_session=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "1 completed, 0 pruned, 0 failed" in done.stdout                # nothing run again
    after = pd.read_parquet(out / "trials.parquet")
    assert after["trial_id"].tolist() == rows["trial_id"].tolist()
    assert ": start (" not in done.stderr, done.stderr[-2000:]          # no trial started again


def test_sigterm_in_a_sweeps_trials_exits_143_and_says_it_was_terminated(tmp_path, cache):
    """SIGTERM (a batch job preempted) reaches Ray Tune as Ctrl-C does: the running trial stops gracefully, the
    summary says the sweep was terminated and how to continue it, exit 143 (Ctrl-C: 130)."""
    out = tmp_path / "sweep"
    cfg = _config(tmp_path, cache, n_trials=2, space={**CONFIG["space"], "search_epochs": 3},
                  search={**CONFIG["search"], "max_steps_per_epoch": 6})          # long enough to stop midway
    cmd = [sys.executable, "-m", "orchestrator.cli", "sweep", "--config", str(cfg), "--out", str(out)]
    rc, text = _signalled(cmd, signal.SIGTERM, ": start (budget")
    assert rc == 143, text[-3000:]
    assert "The sweep was terminated (SIGTERM): " in text, text[-3000:]
    assert f"Continue with: gmpq sweep --out {out} --resume" in text, text[-3000:]
    assert "Traceback" not in text and "PC: @" not in text, text[-3000:]
    assert not (out / "driver.json").exists()


@pytest.mark.parametrize("sig, status, word", [(signal.SIGINT, 130, "interrupted"),
                                               (signal.SIGTERM, 143, "terminated (SIGTERM)")], ids=["ctrl-c", "sigterm"])
def test_a_sweep_stopped_while_it_trains_its_shared_models_says_so(tmp_path, sig, status, word):
    """The walkthrough: SIGTERM while the teacher and FP target model trained as Ray tasks said "interrupted" and
    exited 130, as Ctrl-C does. A fresh cache, so they train; 8 teacher epochs leave time to signal."""
    out = tmp_path / "sweep"
    cfg = _config(tmp_path, tmp_path / "fresh_cache", teacher_epochs=8)
    cmd = [sys.executable, "-m", "orchestrator.cli", "sweep", "--config", str(cfg), "--out", str(out)]
    rc, text = _signalled(cmd, sig, "shared models side by side")
    assert rc == status, text[-3000:]
    assert f"the sweep was {word}; no trial had finished yet, so nothing was lost. Continue with: gmpq sweep --out " \
           f"{out} --resume auto" in text, text[-3000:]
    assert "Traceback" not in text and not (out / "driver.json").exists()
    assert "(a new model cache: the shared models train there; an existing cache elsewhere? pass its --cache-dir)" \
        in text                                                 # the walkthrough: a mistyped --cache-dir retrained all
