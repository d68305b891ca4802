"""A Ray cluster lost mid-sweep (its head node killed): the driver says so within seconds and exits 75 with the
command that continues, keeping what ended; a new cluster then finishes the sweep with --resume --address.

Before ``orchestrator.cluster_watch`` the driver hung ~60 s and was ended by Ray's core worker with no summary, no
--resume command and its driver marker left behind."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cluster.local import kill_node, start_local_cluster, stop_local_cluster
from orchestrator.cluster_watch import LOST_AFTER_ENV, LOST_STATUS

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(1800)]

CONFIG = {"preset": "demo", "n_trials": 2, "max_concurrent_trials": 2, "teacher_epochs": 1,
          "pruner": {"name": "none", "kwargs": {}},
          "space": {"proxy_size": [300], "search_epochs": 2},
          "search": {"batch_size": 32, "max_steps_per_epoch": 12, "recalibrate_bn_batches": 2},
          "transfer": {"train_size": 600, "test_size": 300, "epochs": 1, "batch_size": 64, "lr": 0.01,
                       "fp_epochs": 1, "fp_train_size": 1000}}


def _env() -> dict[str, str]:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", **{LOST_AFTER_ENV: "3"})
    env.pop("RAY_AUTH_MODE", None)
    return env


def _gmpq(*args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", *args]


def test_a_sweep_whose_cluster_dies_exits_75_at_once_and_resumes_on_a_new_cluster(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    out = tmp_path / "sweep"
    first = start_local_cluster(workers=1, cpus_per_node=2, state_dir=tmp_path / "cl1", timeout_s=300)
    err_path = tmp_path / "sweep.err"
    try:
        with open(err_path, "w") as err:
            proc = subprocess.Popen(_gmpq("sweep", "--config", str(config), "--out", str(out), "--address",
                                          first.address), cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=err,
                                    text=True)
            deadline = time.monotonic() + 900
            while "search epoch 1" not in err_path.read_text() and proc.poll() is None:
                assert time.monotonic() < deadline, err_path.read_text()[-3000:]
                time.sleep(0.5)
            assert proc.poll() is None, err_path.read_text()[-3000:]
            kill_node(first, "head")                 # the GCS gone: the driver's cluster is lost
            killed = time.monotonic()
            stdout, _ = proc.communicate(timeout=120)
            after = time.monotonic() - killed
    finally:
        stop_local_cluster(tmp_path / "cl1", grace_s=2.0)
    text = err_path.read_text()
    assert proc.returncode == LOST_STATUS, text[-3000:]
    assert after < 30, f"the driver ended {after:.0f} s after the head died (Ray alone: ~60 s)"
    lost = next(ln for ln in text.splitlines() if "stopped answering" in ln)
    assert lost.startswith(f"gmpq sweep: the Ray cluster at {first.address} stopped answering")
    assert f"Continue with: gmpq sweep --out {out} --resume --address ADDRESS" in lost
    assert "Traceback" not in text and "Failed to connect to GCS" not in text
    assert not (out / "driver.json").exists()
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert runs and all(r.info.status == "KILLED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]

    second = start_local_cluster(workers=1, cpus_per_node=2, state_dir=tmp_path / "cl2", timeout_s=300)
    try:
        done = subprocess.run(_gmpq("sweep", "--out", str(out), "--resume", "--address", second.address), cwd=REPO,
                              env=_env(), capture_output=True, text=True, timeout=1200)
    finally:
        stop_local_cluster(tmp_path / "cl2", grace_s=2.0)
    assert done.returncode == 0, done.stderr[-3000:]
    df = pd.read_parquet(out / "trials.parquet")
    assert len(df) == 2 and set(df["status"]) == {"completed"}, df[["trial_id", "status"]]
    print(f"\n[cluster lost] driver ended {after:.1f} s after the head was killed (rc {proc.returncode}); "
          f"resumed on a new cluster: {len(df)} completed")
