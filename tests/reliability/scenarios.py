"""Fault scenarios with real processes, shared by tests/reliability/ and benchmarks/reliability_report.py.

Each scenario injects its faults into real ``gmpq`` processes and returns an ``Outcome``: what was
injected, how the trials fared, and what was lost or duplicated in Parquet and MLflow (both must
be 0). The tests add detailed assertions on the folders named in ``Outcome.paths``.
"""
from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from faults import (Procs, count_duplicates, events, free_port, mlflow_children, tiny_config, trials_table, wait_for,
                    write_config)

__all__ = ["Outcome", "trial_faults", "driver_kill", "finetune_kill", "mlflow_down_mid_sweep", "attempts_by_trial",
           "run_scenario"]


@dataclass
class Outcome:
    name: str
    faults_injected: int = 0
    trials_attempted: int = 0       # distinct trials that started
    attempts: int = 0               # trial starts, retries and reruns included
    trials_failed: int = 0          # final status "failed"
    trials_retried: int = 0         # trials started more than once
    trials_recovered: int = 0       # trials hit by a fault that still completed
    rows_expected: int = 0
    rows_lost: int = 0
    duplicate_rows: int = 0
    runs_expected: int = 0
    runs_lost: int = 0
    duplicate_runs: int = 0
    reruns_of_finished: int = 0     # finished trials (or checkpointed epochs) computed again
    seconds: float = 0.0
    ok: bool = True
    notes: list[str] = field(default_factory=list)
    paths: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _count_events(sweep_dir: Path, kind: str) -> dict[str, int]:
    """trial_id -> how many ``kind`` events ("start", "end", ...) the sweep's audit log holds."""
    out: dict[str, int] = {}
    for e in events(sweep_dir):
        if e.get("event") == kind:
            out[e["trial_id"]] = out.get(e["trial_id"], 0) + 1
    return out


def attempts_by_trial(sweep_dir: Path) -> dict[str, int]:
    return _count_events(sweep_dir, "start")


def run_scenario(scenario: Callable[..., "Outcome"], root: Path) -> "Outcome":
    """``scenario(root, procs, root / "cache")`` with its processes' logs under ``root / "logs"``; every
    process it started must be gone afterwards (asserted)."""
    procs = Procs(root / "logs")
    try:
        return scenario(root, procs, root / "cache")
    finally:
        assert procs.stop_all() == []


def _sweep_args(root: Path, cfg: dict, tracking_uri: str | None = None) -> list[str]:
    path = write_config(root / f"{cfg['name']}.yaml", cfg)
    args = ["sweep", "--config", str(path), "--out", str(root / cfg["name"])]
    return args + (["--tracking-uri", tracking_uri] if tracking_uri else [])


def _account_rows_and_runs(o: Outcome, sweep_dir: Path, uri: str, experiment: str) -> None:
    """rows_lost: started trials without a row; runs_lost: rows without a child run (or with another status)."""
    df = trials_table(sweep_dir)
    started = set(attempts_by_trial(sweep_dir))
    rows = [] if df is None else list(df["trial_id"])
    o.rows_expected = len(started)
    o.rows_lost = len(started - set(rows))
    o.duplicate_rows = count_duplicates(rows)
    _, kids = mlflow_children(uri, experiment)
    o.runs_expected = len(rows)
    status_of = {} if df is None else dict(zip(df["trial_id"], df["status"]))
    logged = {r["trial_id"]: r["tag_status"] for r in kids.to_dict("records")}
    o.runs_lost = sum(1 for t, s in status_of.items() if logged.get(t) != s)
    o.duplicate_runs = count_duplicates(kids["trial_id"])


def _sync_twice(procs: Procs, sweep_dir: Path, o: Outcome, tag: str) -> None:
    for i in (1, 2):
        rc, out = procs.run(["sync-mlflow", "--sweep", str(sweep_dir), "--json"], f"{tag}-sync{i}")
        if rc != 0:
            o.ok = False
            o.notes.append(f"sync {i} exited {rc}: {out[-500:]}")
            return
        rep = json.loads(out.strip().splitlines()[-1])
        o.notes.append(f"sync {i}: {rep['runs_created']} runs created, {rep['runs_updated']} completed, "
                       f"{rep['runs_unchanged']} unchanged")
        if i == 2 and rep["changed"]:
            o.ok = False
            o.notes.append("the second sync changed the tracking store")


def trial_faults(root: Path, procs: Procs, cache: Path, *, mlflow_down: bool = False) -> Outcome:
    """4 trials, max_failures 1: trial 1 raises on its first attempt, trial 2's loss turns NaN (every
    attempt), trial 3's worker process is SIGKILLed during its first attempt, trial 4 is left alone.
    ``mlflow_down``: the tracking server is down for the whole sweep, started afterwards, then synced."""
    t0 = time.time()
    o = Outcome("trial_faults")
    name = "trialfaults"
    sweep_dir = root / name
    cfg = tiny_config(name=name, n_trials=4, max_concurrent_trials=2, max_failures=1, cache_dir=str(cache),
                      testing={"raise_trials": [1], "raise_attempts": 1, "nan_trials": [2], "nan_epoch": 1})
    port = free_port()
    uri = f"http://127.0.0.1:{port}" if mlflow_down else f"sqlite:///{sweep_dir}/mlflow.db"
    driver = procs.start(_sweep_args(root, cfg, uri if mlflow_down else None), name)
    o.faults_injected = 2 + int(mlflow_down)
    victim = wait_for(lambda: next((e for e in events(sweep_dir) if e.get("event") == "start"
                                    and e.get("trial_number") == 3), None), 900, driver, poll_s=0.1)
    if victim:
        time.sleep(0.5)                             # inside the search, not in the first instruction
        try:
            os.kill(int(victim["pid"]), signal.SIGKILL)
            o.faults_injected += 1
        except ProcessLookupError:
            o.notes.append("trial 3 finished before it could be killed")
    else:
        o.notes.append("trial 3 never started")
    try:
        rc = driver.wait(1800)
    except Exception:                               # noqa: BLE001 - a hung sweep is the outcome, not a crash
        procs.kill(driver)
        rc = -9
    out = procs.log(name)
    if rc != 0:
        o.ok = False
        o.notes.append(f"sweep exited {rc}: {out[-800:]}")
    if mlflow_down:
        if "MLflow logging disabled" not in out:
            o.ok = False
            o.notes.append("no warning about the unreachable MLflow server")
        procs.run(["mlflow-server", "--port", str(port), "--dir", str(root / f"{name}-mlflow"), "--detach"],
                  f"{name}-server")
        _sync_twice(procs, sweep_dir, o, name)
    _trial_accounting(o, sweep_dir, faulty={"raise": 1, "nan": 2, "kill": 3})
    _account_rows_and_runs(o, sweep_dir, uri, name)
    if mlflow_down:
        procs.run(["mlflow-server", "--stop", "--dir", str(root / f"{name}-mlflow")], f"{name}-server-stop")
    o.paths = {"sweep_dir": str(sweep_dir), "tracking_uri": uri, "log": str(procs.logs / f"{name}.log")}
    o.seconds = time.time() - t0
    return o


def _trial_accounting(o: Outcome, sweep_dir: Path, faulty: dict[str, int]) -> None:
    attempts = attempts_by_trial(sweep_dir)
    numbers = {e["trial_id"]: e.get("trial_number") for e in events(sweep_dir) if e.get("event") == "start"}
    df = trials_table(sweep_dir)
    status = {} if df is None else dict(zip(df["trial_id"], df["status"]))
    o.trials_attempted = len(attempts)
    o.attempts = sum(attempts.values())
    o.trials_failed = sum(s == "failed" for s in status.values())
    o.trials_retried = sum(n > 1 for n in attempts.values())
    hit = {t for t, n in numbers.items() if n in faulty.values()}
    o.trials_recovered = sum(status.get(t) == "completed" for t in hit)


def driver_kill(root: Path, procs: Procs, cache: Path) -> Outcome:
    """SIGKILL the sweep driver as soon as the first trial's row is in trials.parquet, then --resume."""
    t0 = time.time()
    o = Outcome("driver_kill")
    name = "driverkill"
    sweep_dir = root / name
    args = _sweep_args(root, tiny_config(name=name, n_trials=3, cache_dir=str(cache)))
    driver = procs.start(args, name)
    got_row = wait_for(lambda: (df := trials_table(sweep_dir)) is not None and len(df) >= 1, 900, driver, poll_s=0.05)
    if not got_row or driver.poll() is not None:
        o.ok = False
        o.notes.append("the sweep ended before the kill")
    procs.kill(driver)
    o.faults_injected = 1
    procs.stop_all()                                # Ray processes the killed driver left behind
    before = trials_table(sweep_dir)
    finished = set(before["trial_id"]) if before is not None else set()
    in_flight = set(attempts_by_trial(sweep_dir)) - finished
    rc, out = procs.run(args + ["--resume"], f"{name}-resume")
    if rc != 0:
        o.ok = False
        o.notes.append(f"resume exited {rc}: {out[-800:]}")
    attempts, ends = attempts_by_trial(sweep_dir), _count_events(sweep_dir, "end")
    df = trials_table(sweep_dir)
    status = {} if df is None else dict(zip(df["trial_id"], df["status"]))
    o.trials_attempted, o.attempts = len(attempts), sum(attempts.values())
    o.trials_failed = sum(s == "failed" for s in status.values())
    o.trials_retried = sum(n > 1 for n in attempts.values())
    o.trials_recovered = sum(status.get(t) == "completed" for t in in_flight)
    o.reruns_of_finished = sum(attempts.get(t, 0) > 1 or ends.get(t, 0) > 1 for t in finished)
    o.notes.append(f"{len(finished)} finished before the kill, {len(in_flight)} in flight")
    _account_rows_and_runs(o, sweep_dir, f"sqlite:///{sweep_dir}/mlflow.db", name)
    o.rows_lost += len(finished - set(status))
    o.paths = {"sweep_dir": str(sweep_dir)}
    o.seconds = time.time() - t0
    return o


def mlflow_down_mid_sweep(root: Path, procs: Procs, cache: Path, *, keep_server: bool = False) -> Outcome:
    """A real MLflow server stopped once the first trial is logged, restarted after the sweep, then synced.

    ``keep_server``: leave the restarted server running (the caller inspects it, then stops it with
    ``gmpq mlflow-server --stop --dir <paths["mlflow_dir"]>``)."""
    t0 = time.time()
    o = Outcome("mlflow_down_mid_sweep")
    name = "flaky"
    sweep_dir, mlf = root / name, root / f"{name}-mlflow"
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    rc, out = procs.run(["mlflow-server", "--port", str(port), "--dir", str(mlf), "--detach"], f"{name}-server1")
    if rc != 0:
        o.ok = False
        o.notes.append(f"the MLflow server did not start: {out[-500:]}")
        return o
    driver = procs.start(_sweep_args(root, tiny_config(name=name, n_trials=3, cache_dir=str(cache)), uri), name)

    def first_logged() -> bool:
        try:
            ids = json.loads((sweep_dir / "mlflow_runs.json").read_text())["trials"]
        except (OSError, ValueError, KeyError):
            return False
        return len(ids) >= 1 and trials_table(sweep_dir) is not None
    if not wait_for(first_logged, 900, driver):
        o.ok = False
        o.notes.append("no trial was logged before the sweep ended")
    from cluster.mlflow_server import stop_mlflow_server

    stopped = stop_mlflow_server(mlf)          # in this process: a CLI would take seconds to start
    o.faults_injected = 1
    n_logged = len(json.loads((sweep_dir / "mlflow_runs.json").read_text())["trials"])
    o.notes.append(f"server {stopped} with {n_logged} trial run(s) logged")
    rc = driver.wait(1800)
    out = procs.log(name)
    if rc != 0 or "MLflow logging disabled" not in out:
        o.ok = False
        o.notes.append(f"sweep exited {rc}; warning shown: {'MLflow logging disabled' in out}")
    procs.run(["mlflow-server", "--port", str(port), "--dir", str(mlf), "--detach"], f"{name}-server2")
    _sync_twice(procs, sweep_dir, o, name)
    _trial_accounting(o, sweep_dir, faulty={})
    _account_rows_and_runs(o, sweep_dir, uri, name)
    if not keep_server:
        procs.run(["mlflow-server", "--stop", "--dir", str(mlf)], f"{name}-server2-stop")
    o.paths = {"sweep_dir": str(sweep_dir), "tracking_uri": uri, "mlflow_dir": str(mlf)}
    o.seconds = time.time() - t0
    return o


def finetune_kill(root: Path, procs: Procs, epochs: int = 4) -> Outcome:
    """SIGKILL a single-policy ``gmpq finetune --out DIR`` after its first epoch checkpoint, then rerun it."""
    import re

    from gmpq_core.errors import CheckpointError
    from gmpq_core.fileio import load_checkpoint

    t0 = time.time()
    o = Outcome("finetune_kill")
    out_dir = root / "finetune"
    ckpt = out_dir / "checkpoints" / "last.pt"
    args = ["finetune", "--uniform", "4", "4", "--fp-epochs", "1", "--epochs", str(epochs), "--train-size", "1000",
            "--test-size", "200", "--batch-size", "32", "--max-steps-per-epoch", "12", "--out", str(out_dir)]
    first = procs.start(args, "finetune")
    if not wait_for(lambda: ckpt.is_file(), 900, first, poll_s=0.02):
        o.ok = False
        o.notes.append("no checkpoint before the fine-tune ended")
    procs.kill(first)
    o.faults_injected = 1
    try:
        done = int(load_checkpoint(ckpt)["epoch"])
    except (CheckpointError, KeyError):
        done = 0
    rc, out = procs.run(args, "finetune-resume")
    ran = [int(m) for m in re.findall(rf"\[finetune\] epoch (\d+)/{epochs}", out)]
    o.trials_attempted, o.attempts = 1, 2
    o.trials_retried = 1
    o.trials_recovered = int(rc == 0 and (out_dir / "finetune_result.json").is_file())
    o.reruns_of_finished = sum(e <= done for e in ran)
    o.notes.append(f"killed after epoch {done} of {epochs}; the rerun trained epochs {ran}")
    if rc != 0 or ran != list(range(done + 1, epochs + 1)):
        o.ok = False
        o.notes.append(f"rerun exited {rc}: {out[-800:]}")
    o.paths = {"out_dir": str(out_dir)}
    o.seconds = time.time() - t0
    return o
