"""`gmpq pareto` and `gmpq finetune --sweep` on a sweep folder another process still runs: one warning line (the
selection covers the trials ended so far), not a refusal; none for this process's own marker. Also what those
commands (and `gmpq sync-mlflow`) say first about a folder that does not exist and a --tracking-uri MLflow
cannot use."""
from __future__ import annotations

import json
import os
import socket
import time

import pytest
import yaml
from final_sweep import make_sweep

from orchestrator.cli import main


@pytest.fixture
def sweep(tmp_path):
    d = tmp_path / "sweep"
    make_sweep(d)                    # one completed trial of the demo preset's 6
    return d


def mark(d, stage: str, pid: int, host: str | None = None) -> None:
    (d / "driver.json").write_text(json.dumps({"stage": stage, "host": host or socket.gethostname(), "pid": pid,
                                               "started": time.time()}))


def warnings_in(err: str) -> list[str]:
    return [line for line in err.splitlines() if ": warning: the sweep in " in line]


@pytest.mark.parametrize("stage, named", [("sweep", "'gmpq sweep'"), ("run", "'gmpq run'")])
def test_pareto_beside_a_running_sweep_warns_once_and_still_selects(sweep, other_process, capsys, stage, named):
    mark(sweep, stage, other_process.pid)
    assert main(["pareto", str(sweep), "--no-mlflow"]) == 0
    err = capsys.readouterr().err
    [line] = warnings_in(err)
    assert line.startswith(f"gmpq pareto: warning: the sweep in {sweep} is still running ({named} (pid "
                           f"{other_process.pid} on {socket.gethostname()}, started ")
    assert "1 of its 6 planned trials has ended so far, and this selection covers only those" in line
    assert line.endswith(f"run 'gmpq pareto {sweep}' again once the sweep ends.")
    assert (sweep / "pareto.parquet").is_file()          # an early look is allowed


def test_no_warning_for_this_process_an_ended_one_or_a_final_stage(sweep, capsys):
    from orchestrator.commands.pareto import sweep_running_text

    mark(sweep, "sweep", os.getpid())                     # gmpq run's own marker around its own stages
    assert sweep_running_text(sweep, "gmpq pareto") is None
    mark(sweep, "finetune", 1, host="some-other-host")     # a fine-tune: the sweep has ended
    assert sweep_running_text(sweep, "gmpq pareto") is None
    assert main(["pareto", str(sweep), "--no-mlflow"]) == 0
    assert not warnings_in(capsys.readouterr().err)


def test_no_warning_once_every_planned_trial_has_ended(sweep, other_process):
    from orchestrator.commands.pareto import sweep_running_text

    cfg = yaml.safe_load((sweep / "sweep_config.yaml").read_text())
    (sweep / "sweep_config.yaml").write_text(yaml.safe_dump({**cfg, "n_trials": 1}))
    mark(sweep, "sweep", other_process.pid)
    assert sweep_running_text(sweep, "gmpq pareto") is None


def test_a_sweep_on_another_host_may_still_run(sweep):
    from orchestrator.commands.pareto import sweep_running_text

    mark(sweep, "sweep", 4242, host="some-other-host")
    assert "may still be running (on another host: not checked)" in sweep_running_text(sweep, "gmpq pareto")


def test_finetune_of_a_running_sweep_warns_that_a_policy_may_leave_the_front(sweep, other_process, capsys,
                                                                              monkeypatch):
    from gmpq_core.errors import ConfigError
    from orchestrator.commands import _finetune_sweep

    def stage(*a, **k):
        raise ConfigError("stopped here by the test")
    monkeypatch.setattr(_finetune_sweep, "finetune_stage", stage)
    mark(sweep, "sweep", other_process.pid)
    assert main(["finetune", "--sweep", str(sweep)]) == 2
    err = capsys.readouterr().err
    [line] = warnings_in(err)
    assert line.startswith(f"gmpq finetune: warning: the sweep in {sweep} is still running ('gmpq sweep' (pid ")
    assert "1 of its 6 planned trials has ended so far" in line
    assert "a policy fine-tuned now may leave the front as more trials end" in line
    assert err.index(line) < err.index("stopped here by the test")        # said before the work


@pytest.mark.parametrize("argv, fix", [
    (["pareto", "{d}"], "whose Pareto front you want"),
    (["finetune", "--sweep", "{d}"], "whose policies you want to fine-tune"),
    (["sync-mlflow", "{d}"], "you want to sync")])
def test_a_folder_that_does_not_exist_is_named_as_gmpq_status_names_it(tmp_path, capsys, argv, fix):
    d = tmp_path / "nonexist"
    assert main([a.format(d=d) for a in argv]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"--sweep {d}: no such folder ({d}). Pass the --out of the gmpq sweep or gmpq run {fix}." in err
    assert "not a sweep made by" not in err and "Results file not found" not in err and "Traceback" not in err


def test_pareto_refuses_a_tracking_uri_mlflow_cannot_use_before_any_work(sweep, capsys):
    assert main(["pareto", str(sweep), "--tracking-uri", "foo://bar"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert err.count("gmpq: error:") == 1 and "Traceback" not in err
    assert "--tracking-uri 'foo://bar' has a scheme MLflow does not know ('foo')" in err
    assert "sync-mlflow" not in err
    assert not (sweep / "pareto.parquet").exists() and not (sweep / "mlflow.db").exists()
