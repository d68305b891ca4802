"""A tiny sweep end to end, and resume after the driver is killed (real Ray, Optuna, MLflow, Fashion-MNIST)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.ray

TINY = {
    "preset": "demo", "name": "tiny", "n_trials": 3, "max_concurrent_trials": 2, "teacher_epochs": 1,
    "proxy_eval_size": 200,
    "pruner": {"name": "median", "kwargs": {"n_startup_trials": 1, "n_warmup_steps": 0}},
    "sampler": {"name": "nsga2", "kwargs": {"population_size": 2}},     # not the default: the third is bred
    "space": {"proxy_size": [100, 200], "search_epochs": 2, "budget_avg_bits": {"type": "float", "low": 2.5, "high": 5.0}},
    "search": {"batch_size": 32, "max_steps_per_epoch": 2, "recalibrate_bn_batches": 1},
    "transfer": {"train_size": 1024, "test_size": 200, "batch_size": 64, "fp_epochs": 1, "fp_train_size": 2000,
                 "fp_batch_size": 64},
}


def _events(sweep_dir: Path) -> list[dict]:
    path = sweep_dir / "trial_events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _check_trials_table(sweep_dir: Path, n_trials: int):
    import pandas as pd

    df = pd.read_parquet(sweep_dir / "trials.parquet")
    assert len(df) == n_trials and df["trial_id"].is_unique
    assert {"trial_id", "status", "transfer_top1", "bitops", "proxy_top1", "budget_bitops"} <= set(df.columns)
    assert set(df["status"]) <= {"completed", "pruned"}
    done = df[df["status"] == "completed"]
    assert len(done) >= 1
    assert done["transfer_top1"].between(0, 100).all() and (done["transfer_top1"] > 10).all()   # beats chance
    assert (done["bitops"] > 0).all() and (done["bitops"] <= done["budget_bitops"]).all()     # budget honoured
    assert df[df["status"] == "pruned"]["transfer_top1"].isna().all()
    from gmpq_core.layers import searchable_layers
    from gmpq_core.models import build_model

    n_layers = len(searchable_layers(build_model("resnet20", num_classes=10, in_channels=1, small_input=True)))
    layers = pd.read_parquet(sweep_dir / "layers.parquet")
    assert set(layers["trial_id"]) == set(done["trial_id"]) and (layers.groupby("trial_id").size() == n_layers).all()
    return df


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One teacher/FP-target cache for the module: the second sweep only reads it."""
    return tmp_path_factory.mktemp("gmpq_cache")


def test_tiny_sweep_end_to_end(tmp_path, shared_cache):
    import mlflow
    import optuna

    from orchestrator.sweep import run_sweep
    from orchestrator.sweep_config import load_sweep_config

    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(TINY))
    cfg = load_sweep_config(cfg_path, overrides={"out_dir": str(tmp_path / "sweep"), "cache_dir": str(shared_cache)})
    summary = run_sweep(cfg, progress=False, prep_threads=1)   # starts and stops its own local Ray
    sweep_dir = tmp_path / "sweep"
    assert summary.n_trials == 3 and summary.n_failed == 0 and summary.n_completed >= 1
    df = _check_trials_table(sweep_dir, 3)
    assert (df["status"] == "pruned").sum() == summary.n_pruned
    # gmpq status reads the same from the folder; the driver's marker is gone with the driver's sweep
    from orchestrator.driver_markers import DRIVER_FILE
    from orchestrator.sweep_status import read_sweep_status
    status = read_sweep_status(sweep_dir)
    assert not (sweep_dir / DRIVER_FILE).exists() and status.state == "finished"
    assert {t.trial_id: t.status for t in status.trials} == dict(zip(df["trial_id"], df["status"]))
    assert sorted(t.number for t in status.trials) == [1, 2, 3]
    # the sweep's tail: once trial 3 had started, the first of the last two to end gave its core away
    from orchestrator.ray_env import local_cpu_count
    tail = json.loads((sweep_dir / "trial_threads.json").read_text())
    assert tail == {"threads": min(local_cpu_count(), 2), "running": 1}      # 2 slots x 1 CPU
    # Optuna storage: a multi-objective study whose finished trials carry the same numbers as the table
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{sweep_dir}/optuna.db")
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert sorted(round(t.values[0], 4) for t in complete) == \
        sorted(round(v, 4) for v in df[df["status"] == "completed"]["transfer_top1"])
    assert sum(t.state.name == "PRUNED" for t in study.trials) == summary.n_pruned
    # teachers and the FP target model were trained once (side by side as Ray tasks), before any trial started
    starts = [e["time"] for e in _events(sweep_dir) if e["event"] == "start"]
    cache_files = [p for p in shared_cache.rglob("*") if p.is_file()]
    assert len(starts) == 3 and cache_files and max(p.stat().st_mtime for p in cache_files) < min(starts)
    assert yaml.safe_load((sweep_dir / "sweep_config.yaml").read_text())["sampler"] == TINY["sampler"]
    assert any("NSGAII" in key for t in study.trials for key in t.system_attrs)   # the sampler that ran: NSGA-II's
    shared = json.loads((sweep_dir / "shared.json").read_text())
    assert set(shared["teacher_seconds"]) == {"100", "200"} and min(shared["teacher_seconds"].values()) > 0
    assert shared["target_seconds"] > 0 and 10 < shared["target_fp_top1"] <= 100
    # each teacher measured on held-out images once; every trial carries its own proxy size's teacher figure
    assert set(shared["teacher_top1"]) == {"100", "200"} and all(0 < v <= 100 for v in shared["teacher_top1"].values())
    for _, row in df[df["status"] == "completed"].iterrows():
        assert round(row["teacher_top1"], 2) == shared["teacher_top1"][str(int(row["param_proxy_size"]))]
    # MLflow: one parent run for the sweep, one child per trial
    mlflow.set_tracking_uri(f"sqlite:///{sweep_dir}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["tiny"])
    children = runs[runs["tags.mlflow.parentRunId"].notna()]
    assert len(runs) == 4 and len(children) == 3
    finished = children[children["tags.status"] == "completed"]
    assert finished["metrics.teacher_top1"].notna().all() and len(finished) == (df["status"] == "completed").sum()


def _wait_for(pred, timeout, proc):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.5)
    return False


@pytest.mark.slow
def test_resume_after_the_driver_is_killed_runs_only_the_remaining_trials(tmp_path, shared_cache):
    """... after the killed sweep's folder was renamed: the sweep goes on with the Tune state, Optuna study and
    MLflow store in the folder under its new name, and nothing is written where it was."""
    import pandas as pd

    cfg = dict(TINY, name="resumable", max_concurrent_trials=1, cache_dir=str(shared_cache),
               pruner={"name": "none"}, space={**TINY["space"], "proxy_size": [100]})
    cfg_path = tmp_path / "resumable.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "orchestrator.cli", "sweep", "--config", str(cfg_path), "--out", str(sweep_dir),
           "--quiet"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        first_done = _wait_for(lambda: any(e["event"] == "end" for e in _events(sweep_dir)), 180, proc)
        assert first_done, proc.stdout.read().decode()[-3000:] if proc.poll() is not None else "no trial finished"
        # wait until the results table shows it (the driver has processed the completion), then a little
        # longer than the experiment-state period (2 s), then kill the driver hard
        assert _wait_for(lambda: (sweep_dir / "trials.parquet").exists(), 60, proc)
        time.sleep(3)
        assert proc.poll() is None, "the sweep finished before it could be interrupted; make trials longer"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        try:   # Ray processes the killed driver started: end them (they are in the session we created)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # A trial running in a Ray worker can outlive the killed driver by a moment and still log its "end":
    # the driver never recorded it, so it is not finished. Wait until the log stops growing.
    quiet_since, n = time.monotonic(), len(_events(sweep_dir))
    while time.monotonic() - quiet_since < 8:
        time.sleep(1)
        if len(_events(sweep_dir)) != n:
            quiet_since, n = time.monotonic(), len(_events(sweep_dir))
    original, sweep_dir = sweep_dir, tmp_path / "renamed"
    original.rename(sweep_dir)
    cmd[cmd.index("--out") + 1] = str(sweep_dir)
    rows_before = pd.read_parquet(sweep_dir / "trials.parquet")
    finished_before = set(rows_before["trial_id"])                        # what the driver recorded
    assert finished_before and len(finished_before) < 3 and set(rows_before["status"]) == {"completed"}
    n_before = len(_events(sweep_dir))

    resumed = subprocess.run([c for c in cmd if c != "--quiet"] + ["--resume"], env=env, capture_output=True,
                             text=True, timeout=300, start_new_session=True)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    after = _events(sweep_dir)[n_before:]
    started_again = {e["trial_id"] for e in after if e["event"] == "start"}
    assert not started_again & finished_before, (started_again, finished_before)   # never computed again
    assert started_again, "the resumed sweep ran nothing"
    df = _check_trials_table(sweep_dir, 3)                                # 3 trials in all, one row each
    assert finished_before < set(df["trial_id"]) and set(df["trial_id"]) - finished_before <= started_again
    numbers = {e["trial_id"]: e["trial_number"] for e in _events(sweep_dir) if e["event"] == "start"}
    for tid in started_again:   # the resumed run's progress lines keep each trial's number from the first run
        assert f"trial {numbers[tid]}/3 {tid}: start" in resumed.stderr, resumed.stderr[-2000:]
    replayed = {e["trial_id"] for e in after if e["event"] == "replay"}
    assert replayed <= finished_before                                    # a replay reports the recorded row
    import optuna                                                         # nothing left RUNNING in Optuna
    study = optuna.load_study(study_name="resumable", storage=f"sqlite:///{sweep_dir}/optuna.db")
    assert not [t for t in study.trials if t.state.name == "RUNNING"]
    assert sorted(round(t.values[0], 4) for t in study.trials if t.state.name == "COMPLETE") == \
        sorted(round(v, 4) for v in df["transfer_top1"])                 # the study has every trial
    assert not original.exists()                                          # nothing written where it was
    import mlflow                                                         # MLflow: one run per trial,
    mlflow.set_tracking_uri(f"sqlite:///{sweep_dir}/mlflow.db")           # artifacts in the renamed folder
    runs = mlflow.search_runs(experiment_names=["resumable"])
    children = runs[runs["tags.mlflow.parentRunId"].notna()]
    assert len(runs) == 4 and sorted(children["tags.trial_id"]) == sorted(df["trial_id"])
    assert runs["artifact_uri"].str.startswith((sweep_dir / "mlartifacts").as_uri()).all()


def test_a_trial_request_no_node_can_run_fails_before_training(tmp_path):
    from gmpq_core.errors import ConfigError
    from orchestrator.sweep import run_sweep
    from orchestrator.sweep_config import load_sweep_config

    cfg = load_sweep_config(preset="demo", overrides={"out_dir": str(tmp_path / "sweep"), "cache_dir": str(tmp_path / "c"),
                                                      "resources": {"cpu": 64, "gpu": 0}})
    with pytest.raises(ConfigError, match="cpu=64"):        # Ray would queue it for ever
        run_sweep(cfg, progress=False)
    assert not (tmp_path / "c").exists()                    # no teacher or FP target model trained
    assert not (tmp_path / "sweep" / "mlflow_parent.json").exists()   # no MLflow parent run left RUNNING
