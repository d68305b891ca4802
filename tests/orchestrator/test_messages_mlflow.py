"""What a sweep says about MLflow, and what it logs there (real SQLite stores, a real Ray Tune sweep in the slow tests):

- a sweep whose tracking store could not be reached ends with a line saying logging was off and how to upload the
  runs (``gmpq sync-mlflow --sweep DIR``), not "MLflow: open URI"; ``gmpq status`` says the store lacks the runs;
- one name, one quantity, as in trials.parquet: a completed trial's final ``proxy_top1`` / ``ard`` are its derived
  policy's, the supernet's per-epoch values are ``supernet_proxy_top1`` / ``supernet_ard`` (runs of earlier versions,
  with the supernet's under the plain names and the policy's as ``policy_*``, keep their names: test_mlflow_layout).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
import yaml

from final_sweep import make_sweep   # same folder (pytest puts it on sys.path)
from tiny_sweep import tiny_sweep_config  # same folder (pytest puts it on sys.path)

ROOT = Path(__file__).resolve().parents[2]


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _ids(sweep: Path, trials: dict, finetune: dict | None = None, parent: bool = True) -> None:
    from orchestrator.mlflow_sink import PARENT_FILE, RUNS_FILE

    uri = f"sqlite:///{sweep / 'mlflow.db'}"
    if parent:
        (sweep / PARENT_FILE).write_text(json.dumps({"tracking_uri": uri, "run_id": "p0", "experiment_name": "ft"}))
    (sweep / RUNS_FILE).write_text(json.dumps({"tracking_uri": uri, "trials": trials, "finetune": finetune or {}}))


# -- gmpq status: what the tracking store lacks, from the folder's id files --------------------------------------------

def test_status_says_mlflow_lacks_a_sweep_nothing_was_logged_of_and_how_to_upload_it(tmp_path, capsys):
    from orchestrator.cli import main

    sweep = tmp_path / "ms3"
    make_sweep(sweep, bits=((3, 4), (4, 4)))               # two completed trials; no MLflow id file: nothing logged
    assert main(["status", "--sweep", str(sweep)]) == 0
    out = _one_line(capsys.readouterr().out)
    assert (f"MLflow lacks this sweep: nothing of it was logged to sqlite:///{sweep / 'mlflow.db'} (its logging was "
            "off: the tracking store could not be reached).") in out, out
    assert f"upload them with: gmpq sync-mlflow --sweep {sweep}" in out
    assert main(["status", "--sweep", str(sweep), "--json"]) == 0
    view = json.loads(capsys.readouterr().out)["mlflow"]
    assert view["parent_run"] is False and view["missing_trials"] == ["t1", "t2"]


def test_status_names_the_runs_a_sweep_whose_store_failed_midway_lacks_and_nothing_when_all_are_there(tmp_path, capsys):
    import pandas as pd

    from orchestrator.cli import main

    sweep = tmp_path / "ms4"
    make_sweep(sweep, bits=((3, 4), (4, 4)))
    _ids(sweep, {"t1": "r1"})                                 # t2's run was never made
    pd.DataFrame({"trial_id": ["t1"], "final_top1": [81.0], "gbitops": [0.4], "epochs": [1], "seconds": [20.0],
                  "model_path": ["models/t1.pt"]}).to_parquet(sweep / "final.parquet")
    assert main(["status", "--sweep", str(sweep)]) == 0
    out = _one_line(capsys.readouterr().out)
    assert (f"MLflow lacks 1 trial run(s) (t2) and 1 fine-tune run(s) (t1) in sqlite:///{sweep / 'mlflow.db'} (its "
            "logging was off for part of the sweep") in out, out
    assert f"Upload them with: gmpq sync-mlflow --sweep {sweep}" in out
    _ids(sweep, {"t1": "r1", "t2": "r2"}, {"t1:0123456789": "f1"})
    assert main(["status", "--sweep", str(sweep)]) == 0
    assert "MLflow lacks" not in capsys.readouterr().out


def test_the_summary_line_of_a_sweep_whose_logging_was_off_says_so_and_names_the_sync(tmp_path):
    from orchestrator.commands.sweep import format_summary

    summary = SimpleNamespace(sweep_dir=tmp_path, rows=[], n_completed=1, n_pruned=0, n_failed=0, wall_seconds=30.0,
                              interrupted=False)
    summary.rows = [{"trial_id": "t1", "status": "completed", "budget_avg_bits": 3.0, "proxy_top1": 10.0,
                     "transfer_top1": 20.0, "gbitops": 0.3}]
    warning = ("MLflow logging disabled: connecting failed on tracking URI 'http://127.0.0.1:1' ([Errno 111] "
               "Connection refused). Work goes on without it; ...")
    last = format_summary(summary, "http://127.0.0.1:1", logging_off=warning).splitlines()[-1]
    assert last == ("MLflow: logging was off (connecting failed on tracking URI 'http://127.0.0.1:1' ([Errno 111] "
                    "Connection refused)): nothing of this sweep is there; the results are complete in the Parquet "
                    f"tables. Once the store answers, upload them with: gmpq sync-mlflow --sweep {tmp_path}")
    _ids(tmp_path, {"t1": "r1"})                              # logged: how to look at it, as before
    assert format_summary(summary, "http://127.0.0.1:1").splitlines()[-1] == \
        "MLflow: open http://127.0.0.1:1 (MLflow tracking server)"


# -- the final metrics of a trial: proxy_top1 is the policy's, supernet_proxy_top1 the supernet's per epoch ----------

def test_a_completed_trials_proxy_top1_is_the_policys_as_in_parquet_and_the_supernets_epochs_have_their_own_key(
        tmp_path):
    from orchestrator.mlflow_callback import MLflowCallback

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cb = MLflowCallback(uri, "cbt", tmp_path, {"name": "cbt"}, None, background=False)
    trial = SimpleNamespace(trial_id="t1", config={"budget_avg_bits": 3.9}, last_result={})
    cb.setup()
    cb.on_trial_start(0, [], trial)
    cb.on_trial_result(0, [], trial, {"phase": "search", "epoch": 1, "proxy_top1": 14.0, "ard": 0.31, "ce": 2.0})
    trial.last_result = {"phase": "transfer", "epoch": 1, "done": True, "proxy_top1": 10.0, "ard": 0.22, "p": 2.0,
                         "transfer_top1": 20.5, "bitops": 1000}
    cb.on_trial_complete(0, [], trial)
    client = mlflow.MlflowClient(uri)
    rid = cb.sink.runs["trials"]["t1"]
    history = {k: [(m.step, m.value) for m in client.get_metric_history(rid, k)]
               for k in ("supernet_proxy_top1", "supernet_ard", "proxy_top1", "ard", "policy_proxy_top1",
                         "transfer_top1")}
    assert history == {"supernet_proxy_top1": [(1, 14.0)], "supernet_ard": [(1, 0.31)], "proxy_top1": [(1, 10.0)],
                       "ard": [(1, 0.22)], "policy_proxy_top1": [], "transfer_top1": [(1, 20.5)]}


def test_a_pruned_trials_last_epoch_is_its_supernets_and_it_has_no_policy_proxy_top1(tmp_path):
    from orchestrator.mlflow_callback import MLflowCallback

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cb = MLflowCallback(uri, "cbt", tmp_path, {"name": "cbt"}, None, background=False)
    epoch = {"phase": "search", "epoch": 1, "proxy_top1": 12.0, "ard": 0.4}
    trial = SimpleNamespace(trial_id="t2", config={}, last_result=epoch)
    cb.setup()
    cb.on_trial_start(0, [], trial)
    cb.on_trial_result(0, [], trial, epoch)
    cb.on_trial_complete(0, [], trial)                    # no transfer_top1: pruned
    run = mlflow.MlflowClient(uri).get_run(cb.sink.runs["trials"]["t2"])
    assert run.data.metrics["supernet_proxy_top1"] == 12.0 and run.data.metrics["supernet_ard"] == 0.4
    assert not run.data.metrics.keys() & {"proxy_top1", "ard", "policy_proxy_top1"}


def test_a_trials_p_is_logged_once_per_step_and_a_pruned_trials_last_epoch_once(tmp_path):
    """The final metrics repeated the last epoch's p (the search result's p is that epoch's) at the same step."""
    from orchestrator.mlflow_callback import MLflowCallback

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cb = MLflowCallback(uri, "cbt", tmp_path, {"name": "cbt"}, None, background=False)
    done = SimpleNamespace(trial_id="t1", config={}, last_result={})
    pruned = SimpleNamespace(trial_id="t2", config={}, last_result={})
    cb.setup()
    for trial in (done, pruned):
        cb.on_trial_start(0, [], trial)
        for e in (1, 2):
            trial.last_result = {"phase": "search", "epoch": e, "proxy_top1": 10.0 + e, "ard": 0.5, "p": 1.5 + e}
            cb.on_trial_result(0, [], trial, trial.last_result)
    done.last_result = {"phase": "transfer", "epoch": 2, "done": True, "proxy_top1": 30.0, "ard": 0.2, "p": 3.5,
                        "transfer_top1": 20.5}
    cb.on_trial_complete(0, [], done)
    cb.on_trial_complete(0, [], pruned)                   # no transfer_top1: pruned after epoch 2
    client = mlflow.MlflowClient(uri)
    for tid in ("t1", "t2"):
        rid = cb.sink.runs["trials"][tid]
        assert [(m.step, m.value) for m in client.get_metric_history(rid, "p")] == [(1, 2.5), (2, 3.5)], tid
        assert [(m.step, m.value) for m in client.get_metric_history(rid, "supernet_proxy_top1")] == \
            [(1, 11.0), (2, 12.0)]
    assert [m.value for m in client.get_metric_history(cb.sink.runs["trials"]["t1"], "transfer_top1")] == [20.5]


def test_sync_uploads_the_supernets_epochs_and_the_policys_proxy_top1_each_its_key_and_a_second_sync_changes_nothing(
        tmp_path):
    """A sweep whose store was down: the sync replays the epochs (Tune's result.json) and the Parquet row."""
    from orchestrator.results import TRIALS_FILE, read_trials
    from orchestrator.sync import sync_mlflow

    sweep = tmp_path / "sweep"
    make_sweep(sweep)                                         # one completed trial, t1
    df = read_trials(sweep)
    df["proxy_top1"], df["last_epoch"] = 33.0, 2                 # the derived policy's, as the trial reported it
    df.to_parquet(sweep / TRIALS_FILE)
    trial_dir = sweep / "ray_results" / "ft" / "trainable_t1"
    trial_dir.mkdir(parents=True)
    (trial_dir / "result.json").write_text("\n".join(json.dumps(r) for r in [
        {"trial_id": "t1", "phase": "search", "epoch": 1, "proxy_top1": 14.0, "ce": 2.0},
        {"trial_id": "t1", "phase": "search", "epoch": 2, "proxy_top1": 16.0, "ce": 1.5},
        {"trial_id": "t1", "phase": "transfer", "epoch": 2, "done": True, "proxy_top1": 33.0}]) + "\n")
    rep = sync_mlflow(sweep)
    assert (rep.runs_created, rep.duplicates) == (1, 0)
    client = mlflow.MlflowClient(f"sqlite:///{sweep / 'mlflow.db'}")
    rid = json.loads((sweep / "mlflow_runs.json").read_text())["trials"]["t1"]
    assert [(m.step, m.value) for m in client.get_metric_history(rid, "supernet_proxy_top1")] == [(1, 14.0), (2, 16.0)]
    assert [(m.step, m.value) for m in client.get_metric_history(rid, "proxy_top1")] == [(2, 33.0)]
    again = sync_mlflow(sweep)
    assert (again.runs_created, again.runs_updated, again.runs_unchanged) == (0, 0, 1)


# -- real sweeps --------------------------------------------------------------------------------------------------------

CONFIG = tiny_sweep_config("ms")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One teacher/FP-target cache for the module: trained by the first sweep, read by the other."""
    return tmp_path_factory.mktemp("ms_cache")


def _gmpq(*args: str, timeout: float = 500) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, start_new_session=True)


def _sweep(tmp_path: Path, cache: Path, *extra: str) -> tuple[Path, subprocess.CompletedProcess]:
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({**CONFIG, "cache_dir": str(cache)}))
    out = tmp_path / "sweep"
    done = _gmpq("sweep", "--config", str(cfg), "--out", str(out), "--quiet", *extra)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return out, done


@pytest.mark.slow
@pytest.mark.ray
def test_a_sweep_whose_tracking_server_is_unreachable_ends_saying_logging_was_off_and_status_says_so(tmp_path, cache):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    out, done = _sweep(tmp_path, cache, "--tracking-uri", dead)
    assert "MLflow logging disabled" in done.stderr                       # warned at the start, as before
    last = done.stdout.rstrip().splitlines()[-1]
    assert last.startswith(f"MLflow: logging was off (connecting failed on tracking URI '{dead}'"), done.stdout
    assert last.endswith(f"upload them with: gmpq sync-mlflow --sweep {out}") and "nothing of this sweep" in last
    assert f"open {dead}" not in done.stdout
    status = _gmpq("status", "--sweep", str(out), timeout=120)
    assert status.returncode == 0, status.stderr[-2000:]
    assert f"MLflow lacks this sweep: nothing of it was logged to {dead}" in _one_line(status.stdout), status.stdout
    assert f"gmpq sync-mlflow --sweep {out}" in _one_line(status.stdout)


@pytest.mark.slow
@pytest.mark.ray
def test_a_real_sweeps_trial_run_keeps_one_quantity_per_metric_and_the_parquet_proxy_top1(tmp_path, cache):
    import pandas as pd

    out, done = _sweep(tmp_path, cache)
    assert done.stdout.rstrip().splitlines()[-1].startswith("MLflow: mlflow ui --backend-store-uri sqlite:///")
    row = pd.read_parquet(out / "trials.parquet").iloc[0]
    assert row["status"] == "completed"
    epochs = [e for e in map(json.loads, (out / "trial_events.jsonl").read_text().splitlines()) if e["event"] == "epoch"]
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    rid = json.loads((out / "mlflow_runs.json").read_text())["trials"][row["trial_id"]]
    proxy = [(m.step, m.value) for m in client.get_metric_history(rid, "supernet_proxy_top1")]
    assert proxy == [(e["epoch"], pytest.approx(e["proxy_top1"])) for e in epochs], proxy      # one per epoch
    assert [m.value for m in client.get_metric_history(rid, "proxy_top1")] == [pytest.approx(row["proxy_top1"])]
    assert [m.value for m in client.get_metric_history(rid, "ard")] == [pytest.approx(row["ard"])]
