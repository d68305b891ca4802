"""``--resume auto`` (gmpq sweep, gmpq run): resume when the folder holds the sweep's Tune state, else start it,
so a batch job retried with the same command continues (cluster/kuberay/rayjob.yaml)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gmpq_core.errors import ConfigError
from orchestrator.cli import build_parser, main
from orchestrator.results import write_results, trial_row
from orchestrator.sweep_config import load_sweep_config, save_resolved_config
from tiny_sweep import tiny_sweep_config  # same folder (pytest puts it on sys.path)


def _cfg(folder: Path, **overrides):
    return load_sweep_config(preset="demo", overrides={"out_dir": str(folder), "cache_dir": str(folder / "cache"),
                                                       **overrides})


def _tune_state(cfg) -> Path:
    """The file whose presence ``tune.Tuner.can_restore`` checks (Ray's ``_TUNER_PKL``), where Tune writes it for
    this sweep: a stand-in for a real experiment state (the slow test below makes a real one)."""
    from ray.tune.impl.tuner_internal import _TUNER_PKL

    from orchestrator.sweep import experiment_path

    exp = Path(experiment_path(cfg))
    exp.mkdir(parents=True, exist_ok=True)
    (exp / _TUNER_PKL).write_bytes(b"")
    return exp


@pytest.mark.parametrize("command", ["sweep", "run"])
def test_resume_flag_parses_bare_auto_and_before_another_option(command):
    p = build_parser(command)
    assert p.parse_args([command, "--out", "D"]).resume is False
    assert p.parse_args([command, "--out", "D", "--resume"]).resume is True          # bare: must resume
    assert p.parse_args([command, "--resume", "--out", "D"]).resume is True          # another option follows
    assert p.parse_args([command, "--resume", "--quiet"]).resume is True
    assert p.parse_args([command, "--resume", "auto", "--out", "D"]).resume == "auto"
    assert p.parse_args([command, "--resume=AUTO"]).resume == "auto"


@pytest.mark.parametrize("command", ["sweep", "run"])
def test_resume_with_another_value_exits_2_naming_it(command, capsys):
    import ray

    assert main([command, "--preset", "demo", "--resume", "runs/x"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "but got --resume 'runs/x'" in err and "'auto'" in err and "--out" in err, err
    assert not ray.is_initialized()


def test_resume_auto_alone_reads_the_saved_config_like_resume(tmp_path):
    from orchestrator.commands.sweep import config_from_args

    started = _cfg(tmp_path, n_trials=4)
    save_resolved_config(started)
    args = build_parser("run").parse_args(["run", "--out", str(tmp_path), "--resume", "auto"])
    assert config_from_args(args).resolved().to_dict() == started.resolved().to_dict()


def test_resume_auto_alone_without_a_saved_config_names_the_fix(tmp_path):
    """Nothing to resume and nothing to start from: the message asks for --config / --preset."""
    from orchestrator.commands.sweep import config_from_args

    args = build_parser().parse_args(["sweep", "--out", str(tmp_path / "new"), "--resume", "auto"])
    with pytest.raises(ConfigError, match=r"--resume auto .* Give the sweep's --config FILE \(or --preset NAME\)"):
        config_from_args(args)
    with_preset = build_parser().parse_args(["sweep", "--preset", "demo", "--out", str(tmp_path / "new"),
                                             "--resume", "auto"])
    assert config_from_args(with_preset).name == "demo"          # a new sweep from the preset


def test_resume_auto_resumes_only_a_folder_holding_the_sweeps_tune_state(tmp_path):
    from orchestrator.sweep import choose_resume, resolve_resume

    cfg = _cfg(tmp_path / "sweep")
    said: list[str] = []
    assert choose_resume(cfg, "auto", said.append) is False              # empty folder: start
    assert said == [f"no sweep to resume in {tmp_path / 'sweep'}: starting one"]
    save_resolved_config(cfg)                                           # a first try that died before Tune started
    assert resolve_resume(cfg, "auto") is False
    _tune_state(cfg)
    said.clear()
    assert choose_resume(cfg, "auto", said.append) is True
    assert said == [f"resuming the sweep in {tmp_path / 'sweep'}"]
    assert resolve_resume(cfg, True) is True and resolve_resume(cfg, False) is False    # as given
    assert choose_resume(cfg, True, said.append) is True and len(said) == 1            # said for auto only
    with pytest.raises(ConfigError, match=r"resume must be True, False or 'auto', but got resume='yes'"):
        resolve_resume(cfg, "yes")


@pytest.mark.parametrize("command", ["sweep", "run"])
def test_both_commands_take_resume_auto_from_the_one_rule(tmp_path, monkeypatch, capsys, command):
    """gmpq sweep (before run_sweep) and gmpq run (in check_sweep) both choose through ``sweep.choose_resume``, not a
    copy of the rule each: called once with the flag's value, its refusal theirs."""
    import orchestrator.sweep as sweep

    real, seen = sweep.choose_resume, []
    monkeypatch.setattr(sweep, "choose_resume", lambda cfg, resume, say=print: seen.append(resume) or real(
        cfg, resume, say))
    save_resolved_config(_cfg(tmp_path, name="hand"))                # sweep 'hand' started here
    assert main([command, "--preset", "demo", "--out", str(tmp_path), "--resume", "auto"]) == 2
    assert seen == ["auto"]
    assert "found the sweep 'hand'" in " ".join(capsys.readouterr().err.split())


def test_resume_auto_refuses_a_folder_holding_another_sweep(tmp_path, capsys):
    import ray

    from orchestrator.sweep import resolve_resume

    save_resolved_config(_cfg(tmp_path, name="hand"))                # sweep 'hand' started here
    with pytest.raises(ConfigError, match=r"found the sweep 'hand' in .* not 'demo'"):
        resolve_resume(_cfg(tmp_path), "auto")
    write_results(tmp_path, [trial_row(trial_id="t1", config={"budget_avg_bits": 3.0}, status="completed",
                                       last_result={"transfer_top1": 70.0, "bitops": 1})], [])
    assert main(["run", "--preset", "demo", "--out", str(tmp_path), "--resume", "auto"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "found the sweep 'hand'" in err and "--out a new folder" in err, err
    assert not ray.is_initialized() and "name: hand" in (tmp_path / "sweep_config.yaml").read_text()


def test_resume_auto_in_a_study_folder_is_refused_as_a_study(tmp_path, capsys):
    (tmp_path / "study_config.yaml").write_text("name: s\n")
    assert main(["sweep", "--preset", "demo", "--out", str(tmp_path), "--resume", "auto"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "holds the results of a study" in err and "starting one" not in err, err


def test_resume_auto_refuses_results_it_cannot_resume(tmp_path):
    """This sweep's trials.parquet but no Tune state (another --storage): a new sweep would mix its trials in."""
    from orchestrator.sweep import resolve_resume

    cfg = _cfg(tmp_path)
    save_resolved_config(cfg)
    write_results(tmp_path, [trial_row(trial_id="t1", config={"budget_avg_bits": 3.0}, status="completed",
                                       last_result={"transfer_top1": 70.0, "bitops": 1})], [])
    with pytest.raises(ConfigError, match=r"results of the sweep 'demo' .* no Tune experiment state .* --storage"):
        resolve_resume(_cfg(tmp_path, storage_path=str(tmp_path / "elsewhere")), "auto")
    _tune_state(cfg)
    assert resolve_resume(cfg, "auto") is True


def test_resume_auto_does_not_resume_another_folders_sweep_on_a_shared_storage(tmp_path):
    """The RayJob layout: --out per run, one --storage. Tune state of this name that folder A wrote must not be
    continued in folder B (B would take over A's sweep); before B's own start it is refused, naming the fix."""
    from orchestrator.sweep import resolve_resume

    shared = str(tmp_path / "ray_results")
    a = _cfg(tmp_path / "a", storage_path=shared)
    save_resolved_config(a)
    _tune_state(a)
    assert resolve_resume(a, "auto") is True
    with pytest.raises(ConfigError, match=r"holds no sweep .* another --out sharing this --storage wrote it"):
        resolve_resume(_cfg(tmp_path / "b", storage_path=shared), "auto")
    assert not (tmp_path / "b").exists()
    assert resolve_resume(_cfg(tmp_path / "b", storage_path=shared, name="other"), "auto") is False


def test_resume_auto_names_a_storage_it_cannot_read(tmp_path):
    from orchestrator.sweep import resolve_resume

    with pytest.raises(ConfigError, match=r"cannot look for the sweep's Tune state at 'hdfs://nohost:1/x/demo'"):
        resolve_resume(_cfg(tmp_path, storage_path="hdfs://nohost:1/x"), "auto")


def test_resume_auto_that_resumes_keeps_the_same_config_check(tmp_path, capsys):
    """Resuming with other sweep settings is refused as with --resume (Tune restores the old searcher)."""
    import ray

    save_resolved_config(_cfg(tmp_path, n_trials=4))
    _tune_state(_cfg(tmp_path))
    assert main(["sweep", "--preset", "demo", "--out", str(tmp_path), "--cache-dir", str(tmp_path / "cache"),
                 "--seed", "9", "--resume", "auto"]) == 2     # (more --n-trials: it grows, test_sweep_grow.py)
    err = " ".join(capsys.readouterr().err.split())
    assert f"resuming the sweep in {tmp_path}" in err and "these settings differ" in err and "seed" in err, err
    assert not ray.is_initialized()


def test_resume_auto_that_resumes_keeps_the_moved_folder_check(tmp_path, capsys):
    """A moved sweep folder is not resumed through Ray Client, --resume auto included."""
    from orchestrator.sweep import run_sweep

    save_resolved_config(_cfg(tmp_path / "a"))
    (tmp_path / "a").rename(tmp_path / "b")
    cfg = load_sweep_config(tmp_path / "b" / "sweep_config.yaml",
                            overrides={"out_dir": str(tmp_path / "b"), "address": "ray://head:10001"})
    _tune_state(cfg)
    with pytest.raises(ConfigError, match="Ray Client"):
        run_sweep(cfg, resume="auto")
    assert f"gmpq sweep: resuming the sweep in {tmp_path / 'b'}" in capsys.readouterr().err


def test_the_rayjob_entrypoint_resumes_auto():
    """A RayJob retried (or resubmitted) with the same entrypoint continues its sweep instead of stopping."""
    import shlex

    job = yaml.safe_load((Path(__file__).parents[2] / "cluster" / "kuberay" / "rayjob.yaml").read_text())
    argv = shlex.split(job["spec"]["entrypoint"])
    if argv[:2] == ["sh", "-c"]:          # the script the head's shell runs (it reads $MLFLOW_TRACKING_URI there)
        argv = shlex.split(argv[2].removeprefix("exec "))
    assert argv[:2] == ["gmpq", "run"] and build_parser("run").parse_args(argv[1:]).resume == "auto"


TINY = tiny_sweep_config("retried", n_trials=2, proxy_eval_size=200, train_size=512)


@pytest.mark.slow
@pytest.mark.ray
def test_the_same_resume_auto_command_starts_a_sweep_then_resumes_it(tmp_path):
    """What a retried batch job does: the first run starts the sweep, the same command again resumes it (real
    Ray, Optuna, MLflow) and recomputes no trial."""
    import mlflow
    import pandas as pd

    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(TINY))
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "orchestrator.cli", "sweep", "--config", str(cfg_path), "--out", str(sweep_dir),
           "--cache-dir", str(tmp_path / "cache"), "--resume", "auto", "--quiet"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}

    def gmpq():
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, start_new_session=True)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        return done

    first = gmpq()
    assert f"gmpq sweep: no sweep to resume in {sweep_dir}: starting one" in first.stderr
    trials = pd.read_parquet(sweep_dir / "trials.parquet")
    assert len(trials) == 2 and set(trials["status"]) == {"completed"}
    events = (sweep_dir / "trial_events.jsonl").read_text().splitlines()
    assert sum(json.loads(e)["event"] == "start" for e in events) == 2

    again = gmpq()
    assert f"gmpq sweep: resuming the sweep in {sweep_dir}" in again.stderr, again.stderr[-2000:]
    assert "2 completed, 0 pruned, 0 failed" in again.stdout
    after = [json.loads(e) for e in (sweep_dir / "trial_events.jsonl").read_text().splitlines()[len(events):]]
    assert not [e for e in after if e["event"] == "start"], after                     # no trial computed again
    pd.testing.assert_frame_equal(pd.read_parquet(sweep_dir / "trials.parquet"), trials)
    mlflow.set_tracking_uri(f"sqlite:///{sweep_dir}/mlflow.db")
    assert len(mlflow.search_runs(experiment_names=["retried"])) == 3                  # parent + 2 trials, no new
