"""A real sweep that grows on resume (``gmpq sweep --out DIR --resume --n-trials 3`` after 2 trials): Ray Tune runs
the third trial only, the Optuna study continues, and everything that counts the trials says 3."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from tiny_sweep import tiny_sweep_config  # same folder (pytest puts it on sys.path)

TINY = tiny_sweep_config("grown", n_trials=2, proxy_eval_size=200, train_size=512)


@pytest.mark.slow
@pytest.mark.ray
def test_a_resumed_sweep_given_more_trials_runs_only_the_new_ones(tmp_path):
    import mlflow
    import optuna
    import pandas as pd

    from orchestrator.sweep_grow import GROWN_TAG, N_TRIALS_TAG

    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(TINY))
    sweep_dir = tmp_path / "sweep"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}

    def gmpq(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=env, capture_output=True,
                              text=True, timeout=300, start_new_session=True)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        return done

    gmpq("sweep", "--config", str(cfg_path), "--out", str(sweep_dir), "--cache-dir", str(tmp_path / "cache"),
         "--quiet")
    first = pd.read_parquet(sweep_dir / "trials.parquet")
    assert len(first) == 2
    events = (sweep_dir / "trial_events.jsonl").read_text().splitlines()

    grown = gmpq("sweep", "--out", str(sweep_dir), "--resume", "--n-trials", "3")
    err = " ".join(grown.stderr.split())
    assert "the sweep grows from 2 to 3 trials (1 new; 2 ended so far)" in err, err[-3000:]
    assert "trial 3/3" in err and "3 completed, 0 pruned, 0 failed" in grown.stdout, grown.stdout[-2000:]
    trials = pd.read_parquet(sweep_dir / "trials.parquet")
    assert len(trials) == 3 and set(trials["status"]) == {"completed"}
    pd.testing.assert_frame_equal(trials[trials["trial_id"].isin(first["trial_id"])].reset_index(drop=True),
                                  first)                                             # the first two kept as they were
    after = [json.loads(e) for e in (sweep_dir / "trial_events.jsonl").read_text().splitlines()[len(events):]]
    assert sum(e["event"] == "start" for e in after) == 1                             # only the new trial ran
    assert yaml.safe_load((sweep_dir / "sweep_config.yaml").read_text())["n_trials"] == 3

    study = optuna.load_study(study_name="grown", storage=f"sqlite:///{sweep_dir}/optuna.db")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3    # the same study, continued

    mlflow.set_tracking_uri(f"sqlite:///{sweep_dir}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["grown"])
    assert len(runs) == 4                                                             # the parent + 3 trials
    parent = runs[runs["tags.gmpq.role"] == "sweep"].iloc[0]
    assert parent["status"] == "FINISHED" and parent["params.n_trials"] == "2"        # params cannot change
    assert parent[f"tags.{N_TRIALS_TAG}"] == "3" and parent[f"tags.{GROWN_TAG}"] == "2 -> 3"

    status = gmpq("status", str(sweep_dir))
    assert "3 of 3 trials ended" in status.stdout, status.stdout[-2000:]
    again = gmpq("sweep", "--out", str(sweep_dir), "--resume")                      # the saved count: nothing to do
    assert "already ran all its 3 trials" in " ".join(again.stderr.split())


def _stopped_once(args: list[str], mark: str, env: dict) -> tuple[int, str]:
    """Run ``gmpq ARGS`` and Ctrl-C it (SIGINT to its process group) once its stderr shows ``mark``."""
    import signal

    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    err, sent = [], False
    for line in proc.stderr:
        err.append(line)
        if mark in line and not sent:
            os.killpg(proc.pid, signal.SIGINT)
            sent = True
    proc.stdout.read()
    return proc.wait(timeout=120), "".join(err)


@pytest.mark.slow
@pytest.mark.ray
def test_a_growth_stopped_before_tune_started_is_recorded_by_the_next_plain_resume(tmp_path):
    """grow 2 -> 3 stopped while Ray started (sweep_config.yaml already says 3, Tune still 2), then a plain
    --resume: it says the growth, how many are new, records it on the MLflow parent run, and its summary says the
    Pareto selection made before is stale (all used to hang on the command that raised the count). A copy whose
    newest Tune experiment state is damaged: one paragraph, exit 2, the count put back (was a RuntimeError)."""
    import shutil

    import mlflow

    from orchestrator.sweep_grow import GROWN_TAG, N_TRIALS_TAG

    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(TINY))
    sweep_dir, broken = tmp_path / "sweep", tmp_path / "broken"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}

    def gmpq(*args: str, rc: int = 0) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=env, capture_output=True,
                              text=True, timeout=300, start_new_session=True)
        assert done.returncode == rc, done.stdout[-2000:] + done.stderr[-3000:]
        return done

    gmpq("sweep", "--config", str(cfg_path), "--out", str(sweep_dir), "--cache-dir", str(tmp_path / "cache"),
         "--quiet")
    gmpq("pareto", str(sweep_dir), "--no-mlflow")                       # a selection of the first 2
    shutil.copytree(sweep_dir, broken)

    rc, err = _stopped_once(["sweep", "--out", str(sweep_dir), "--resume", "--n-trials", "3"], "preparing shared",
                            env)
    assert rc == 130, err[-3000:]
    assert yaml.safe_load((sweep_dir / "sweep_config.yaml").read_text())["n_trials"] == 3

    again = gmpq("sweep", "--out", str(sweep_dir), "--resume")
    err = " ".join(again.stderr.split())
    assert "the sweep grows from 2 to 3 trials (1 new; 2 ended so far) in the same Optuna study" in err, err[-3000:]
    assert "3 trials (1 new), " in err
    out = " ".join(again.stdout.split())
    assert "3 completed, 0 pruned, 0 failed" in out
    assert ("The Pareto selection (pareto.parquet) was made from 2 completed trials, and 3 trials have completed now"
            in out and f"select again with: gmpq pareto {sweep_dir}." in out), out[-2000:]
    mlflow.set_tracking_uri(f"sqlite:///{sweep_dir}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["grown"])
    parent = runs[runs["tags.gmpq.role"] == "sweep"].iloc[0]
    assert parent[f"tags.{N_TRIALS_TAG}"] == "3" and parent[f"tags.{GROWN_TAG}"] == "2 -> 3"
    status = " ".join(gmpq("status", str(sweep_dir)).stdout.split())
    assert f"select again with: gmpq pareto {sweep_dir}." in status and "Next: gmpq finetune" not in status

    newest = sorted((broken / "ray_results" / "grown").glob("experiment_state-*.json"))[-1]
    newest.write_text('{"broken":')
    failed = gmpq("sweep", "--out", str(broken), "--resume", "--n-trials", "3", "--quiet", rc=2)
    err = " ".join(failed.stderr.split())
    assert f"gmpq: error: Ray Tune could not restore the sweep in '{broken}'" in err, err[-3000:]
    assert str(newest) in err and "nothing was run" in err and "RuntimeError" not in err
    assert yaml.safe_load((broken / "sweep_config.yaml").read_text())["n_trials"] == 2
