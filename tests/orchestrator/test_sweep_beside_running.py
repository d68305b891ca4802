"""A second driver is refused beside a live sweep (``sweep_resume.refuse_beside_running_sweep``): the walkthrough ran
``gmpq sweep --out D --resume`` while the first ``gmpq sweep`` still ran; both ran the last trials, trials.parquet
kept only the second's rows (two completed trials of the first lost), MLflow had 6 runs for 4 trials."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from gmpq_core.errors import ConfigError
from orchestrator.driver_markers import DRIVER_FILE, pid_start
from orchestrator.sweep import run_sweep
from orchestrator.sweep_config import load_sweep_config, save_resolved_config


@pytest.fixture
def other_process():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def _mark(d, pid, stage="sweep", command=None, host=None):
    now = time.time()
    (d / DRIVER_FILE).write_text(json.dumps({"stage": stage, "command": command or stage,
                                             "host": host or socket.gethostname(), "pid": pid,
                                             "pid_start": pid_start(pid), "started": now, "heartbeat": now}))


def _cfg(tmp_path):
    cfg = load_sweep_config(preset="demo", overrides={"out_dir": str(tmp_path), "n_trials": 2})
    save_resolved_config(cfg)
    return cfg


@pytest.mark.parametrize("resume, stage, command", [(True, "sweep", "sweep"), (False, "sweep", "sweep"),
                                                    (True, "finetune", "run")])
def test_a_second_driver_beside_a_live_sweep_is_refused_before_it_writes(tmp_path, other_process, resume, stage,
                                                                          command):
    cfg = _cfg(tmp_path)
    _mark(tmp_path, other_process, stage, command)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ConfigError) as e:
        run_sweep(cfg, resume=resume, progress=False)
    msg = str(e.value)
    assert f"The sweep in '{tmp_path}' is running: 'gmpq {command}'" in msg and f"pid {other_process}" in msg
    assert f"gmpq status {tmp_path}" in msg and f"kill {other_process}" in msg and "\n" not in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_final_stage_or_an_ended_driver_is_no_reason_to_refuse(tmp_path, other_process):
    from orchestrator.sweep_resume import refuse_beside_running_sweep

    _mark(tmp_path, other_process, "finetune", "finetune")        # gmpq finetune --sweep reads the ended trials
    refuse_beside_running_sweep(tmp_path, True)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    _mark(tmp_path, proc.pid)                                      # its driver has ended
    refuse_beside_running_sweep(tmp_path, True)


def test_another_hosts_driver_is_a_warning_not_a_refusal(tmp_path, caplog):
    from orchestrator.sweep_resume import refuse_beside_running_sweep

    _mark(tmp_path, 4242, host="another-host")
    refuse_beside_running_sweep(tmp_path, True)
    assert "from another host (cannot be checked from here)" in caplog.text
