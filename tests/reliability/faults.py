"""Fault-injection helpers shared by tests/reliability/ and benchmarks/reliability_report.py.

Everything runs as real processes on loopback: ``gmpq`` subprocesses (each in its own session, with
a private short ``RAY_TMPDIR`` so the Ray processes it starts can be found and stopped), real MLflow
servers (``gmpq mlflow-server``), real SIGKILLs. ``Procs`` remembers what was started and stops it.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

__all__ = ["TINY", "tiny_config", "fake_sweep_dir", "write_config", "gmpq_cmd", "Procs", "events", "wait_for", "free_port",
           "trials_table", "mlflow_children", "count_duplicates", "trial_index"]

# A tiny sweep: tiny proxies, 2 steps per epoch, 1 search epoch, a transfer check on a few hundred images.
TINY: dict[str, Any] = {
    "preset": "demo", "name": "rel", "n_trials": 3, "max_concurrent_trials": 1, "teacher_epochs": 1,
    "proxy_eval_size": 100, "max_failures": 1, "pruner": {"name": "none"},
    "space": {"proxy_size": [100], "search_epochs": 1,
              "budget_avg_bits": {"type": "float", "low": 2.5, "high": 5.0}},
    "search": {"batch_size": 32, "max_steps_per_epoch": 2, "recalibrate_bn_batches": 1},
    "transfer": {"train_size": 256, "test_size": 200, "batch_size": 64, "fp_epochs": 1, "fp_train_size": 1000,
                 "fp_batch_size": 64},
}


def tiny_config(**changes: Any) -> dict[str, Any]:
    cfg = copy.deepcopy(TINY)
    for k, v in changes.items():
        if isinstance(v, Mapping) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    return cfg


def write_config(path: Path, cfg: Mapping[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dict(cfg), sort_keys=False))
    return path


def gmpq_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("gmpq")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "orchestrator.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


class Procs:
    """Starts ``gmpq`` subprocesses with a private RAY_TMPDIR and stops every process they left behind."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        self.ray_tmp = tempfile.mkdtemp(prefix="gr", dir="/tmp")   # short: Ray's socket paths are <= 107 bytes
        self.env = {**os.environ, "RAY_TMPDIR": self.ray_tmp, "RAY_USAGE_STATS_ENABLED": "0",
                    "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
        self.started: list[subprocess.Popen] = []

    def start(self, args: list[str], name: str, env: Mapping[str, str] | None = None) -> subprocess.Popen:
        out = open(self.logs / f"{name}.log", "ab")
        proc = subprocess.Popen(gmpq_cmd() + args, env={**self.env, **(env or {})}, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()
        self.started.append(proc)
        return proc

    def run(self, args: list[str], name: str, timeout_s: float = 900) -> tuple[int, str]:
        """Run to the end; (exit status, its output)."""
        proc = self.start(args, name)
        try:
            rc = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill(proc)
            rc = -9
        return rc, self.log(name)

    def log(self, name: str) -> str:
        p = self.logs / f"{name}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    @staticmethod
    def kill(proc: subprocess.Popen) -> None:
        """SIGKILL the process (a crash: no handler runs), then the rest of its session's group."""
        for fn in (lambda: os.kill(proc.pid, signal.SIGKILL), lambda: os.killpg(proc.pid, signal.SIGKILL)):
            try:
                fn()
            except ProcessLookupError:
                pass
        proc.wait(60)

    def leftovers(self) -> list[int]:
        """Live processes whose environment carries this helper's RAY_TMPDIR (Ray's raylet, workers ...)."""
        tag = f"RAY_TMPDIR={self.ray_tmp}".encode()
        me = os.getpid()
        return [int(p.name) for p in Path("/proc").iterdir()
                if p.name.isdigit() and int(p.name) != me and tag in _environ(int(p.name)).split(b"\0")]

    def stop_all(self, grace_s: float = 20.0) -> list[int]:
        """Kill what is still running; returns the leftover pids that had to be killed after ``grace_s``."""
        for proc in self.started:
            if proc.poll() is None:
                self.kill(proc)
        end = time.time() + grace_s
        while self.leftovers() and time.time() < end:
            time.sleep(0.5)
        late = self.leftovers()
        for pid in late:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.ray_tmp, ignore_errors=True)    # Ray's session logs (recreated if Ray starts again)
        return late


LAYERS = [{"name": "layer1.0.conv1", "macs": 1000, "w_bits": 4, "a_bits": 2}]


def fake_sweep_dir(d: Path) -> list[dict]:
    """A finished 4-trial sweep folder (config + Parquet written by the real results code)."""
    from orchestrator.results import layer_rows, trial_row, write_results

    d.mkdir(parents=True)
    (d / "sweep_config.yaml").write_text("name: synct\nn_trials: 4\nmodel: resnet20\n")
    rows = []
    for i, status in enumerate(["completed", "completed", "pruned", "failed"]):
        last = {"phase": "search", "epoch": 2, "proxy_top1": 40.0 + i, "ard": 0.1, "p": 3.0}
        if status == "completed":
            last.update(phase="transfer", transfer_top1=50.0 + i, bitops=8000, gbitops=8e-6, budget_avg_bits=3.0,
                        policy_json=json.dumps({"version": 1, "layers": {"layer1.0.conv1": {"w_bits": 4, "a_bits": 2}}}),
                        layers_json=json.dumps(LAYERS))
        rows.append(trial_row(trial_id=f"t{i}", config={"budget_avg_bits": 3.0 + i, "eta": 10.0}, last_result=last,
                              status=status, error="NonFiniteLossError: loss is nan at epoch 1" if status == "failed"
                              else None))
    write_results(d, rows, [x for r in rows for x in layer_rows(r["trial_id"], r.get("layers_json"))])
    return rows


def events(sweep_dir: Path) -> list[dict]:
    """The trainable's audit log (start/end per attempt, with the worker pid)."""
    path = sweep_dir / "trial_events.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass      # a line being written right now
    return out


def trial_index(trial_id: str) -> int:
    """Tune's trial ids end with the trial's 0-based creation index (``<exp>_00002``)."""
    return int(str(trial_id).rsplit("_", 1)[-1])


def wait_for(pred: Callable[[], Any], timeout_s: float, proc: subprocess.Popen | None = None,
             poll_s: float = 0.3) -> Any:
    """Poll ``pred`` until it returns something truthy (returned), the timeout, or ``proc`` exits (None)."""
    end = time.time() + timeout_s
    while time.time() < end:
        value = pred()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            return pred() or None
        time.sleep(poll_s)
    return None


def trials_table(sweep_dir: Path):
    import pandas as pd
    path = sweep_dir / "trials.parquet"
    return pd.read_parquet(path) if path.exists() else None


def mlflow_children(uri: str, experiment: str):
    """(all runs, trial child runs) of an experiment as DataFrames."""
    from mlflow.tracking import MlflowClient
    import pandas as pd

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return pd.DataFrame(), pd.DataFrame()
    runs = client.search_runs([exp.experiment_id], max_results=5000)
    rows = [{"run_id": r.info.run_id, "status": r.info.status, "role": r.data.tags.get("gmpq.role"),
             "trial_id": r.data.tags.get("trial_id"), "tag_status": r.data.tags.get("status"),
             "error": r.data.tags.get("error"), "parent": r.data.tags.get("mlflow.parentRunId"),
             "metrics": dict(r.data.metrics), "tags": dict(r.data.tags)} for r in runs]
    df = pd.DataFrame(rows, columns=["run_id", "status", "role", "trial_id", "tag_status", "error", "parent",
                                     "metrics", "tags"])
    return df, df[df["role"] == "trial"]


def count_duplicates(values) -> int:
    """How many entries repeat an earlier one."""
    values = list(values)
    return len(values) - len(set(values))
