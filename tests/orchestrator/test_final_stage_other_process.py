"""The final stage (``orchestrator.final_stage.finetune_selected``) while another process may run one in the same
sweep (its ``driver.json`` marker): refused before any work while that process runs a final stage (a fine-tune
there looks like a stopped one: started manifest, no row), not for a sweep still running, for ``gmpq run``'s own
marker, an ended process or another host's marker.

Without Ray: the fake Ray Train run of ``final_sweep.checkpointing_stage``; MLflow and the files are real."""
from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import time

import pytest

from gmpq_core.errors import GMPQError
from final_sweep import checkpointing_stage, make_fp32_sweep   # same folder (pytest puts it on sys.path)


@pytest.mark.parametrize("stage, command, refused", [
    ("finetune", "finetune", "'gmpq finetune --sweep'"), ("run", "run", "'gmpq run'"),
    ("sweep", "run", "'gmpq run' (its sweep stage;"), ("sweep", "sweep", None)])
def test_a_final_stage_is_refused_while_another_process_runs_one_in_the_same_sweep(
        tmp_path, monkeypatch, capsys, other_process, stage, command, refused):
    """The review (L2): a fine-tune running in another process looks like a stopped one (started manifest, no row),
    so a second 'gmpq finetune --sweep' with another recipe moved that process's live Ray Train run folder aside.
    Refused now before any work, naming the process; a sweep still running (no final stage of its own) is not a
    reason, as before: the final stage selects from its ended trials."""
    from orchestrator.cli import main
    from orchestrator.driver_markers import pid_start as _pid_start

    sweep = tmp_path / "sweep"
    make_fp32_sweep(sweep)
    runs = []
    final_stage = checkpointing_stage(monkeypatch, tmp_path, runs)
    (sweep / "driver.json").write_text(json.dumps({
        "stage": stage, "command": command, "host": socket.gethostname(), "pid": other_process.pid,
        "pid_start": _pid_start(other_process.pid), "started": time.time()}))
    before = sorted(p.name for p in sweep.rglob("*"))
    if refused is None:
        final_stage.finetune_selected(sweep, epochs=1, workers=1)
        assert len(runs) == 1
        return
    with pytest.raises(GMPQError) as e:
        final_stage.finetune_selected(sweep, epochs=1, workers=1, lr=0.05)
    text = str(e.value)
    what = "will be fine-tuned by" if stage == "sweep" else "is being fine-tuned by"   # (gmpq run, in its sweep)
    assert text.startswith(f"'{sweep}' {what} {refused}") and f"pid {other_process.pid} on " in text
    assert f"Wait for it to end ('gmpq status --sweep {sweep}' shows whether it runs)" in text
    assert f"if it has ended (the pid is another program's now), delete {sweep / 'driver.json'}" in text
    assert "nothing was changed" in text and runs == [] and sorted(p.name for p in sweep.rglob("*")) == before
    if stage == "finetune":                   # the command: one paragraph, no traceback
        assert main(["finetune", "--sweep", str(sweep)]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert "Traceback" not in err and err.count("gmpq: error:") == 1 and "is being fine-tuned by" in err, err


def test_gmpq_runs_own_final_stage_and_an_ended_process_are_not_refused(tmp_path, monkeypatch, caplog):
    """``gmpq run`` marks the sweep folder as its own before its final stage: that stage is not refused; nor is one
    after a process that has ended (its marker left behind)."""
    from orchestrator.driver_markers import driver_marker

    sweep = tmp_path / "sweep"
    make_fp32_sweep(sweep)
    runs = []
    final_stage = checkpointing_stage(monkeypatch, tmp_path, runs)
    with driver_marker(sweep, "run"):
        final_stage.finetune_selected(sweep, epochs=1, workers=1)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    (sweep / "driver.json").write_text(json.dumps({"stage": "finetune", "host": socket.gethostname(),
                                                   "pid": proc.pid, "started": time.time()}))
    final_stage.finetune_selected(sweep, epochs=1, workers=1, lr=0.05)
    assert len(runs) == 2
    # another host's marker cannot be checked: a retried batch job (a new pod) finds its killed predecessor's there
    (sweep / "driver.json").write_text(json.dumps({"stage": "finetune", "command": "run", "host": "old-pod",
                                                   "pid": 1, "started": time.time()}))
    with caplog.at_level(logging.WARNING, logger="orchestrator.final_results"):
        final_stage.finetune_selected(sweep, epochs=1, workers=1, lr=0.02)
    assert len(runs) == 3
    assert "'gmpq run' (its finetune stage; pid 1 on old-pod" in caplog.text and "from another host" in caplog.text
