"""An MLflow tracking server for sweeps that log from many processes or machines.

``start_mlflow_server(dir=D)`` runs, in a session of its own,
``mlflow server --backend-store-uri sqlite:///D/mlflow.db --artifacts-destination D/artifacts
--host 127.0.0.1 --port P --workers 1`` and waits until ``GET /health`` answers. MLflow's job runner (huey
consumers for GenAI jobs) is off unless ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true`` is set (``LEAN_ENV``).
The server holds the only SQLite connection pool, so trials on any node may log through ``http://HOST:P`` at
once (a ``sqlite:///`` URI used directly allows one writer). The handle is recorded in
``D/mlflow_server.json`` so ``stop_mlflow_server(D)`` (or ``gmpq mlflow-server --stop``) stops a
detached server later.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from gmpq_core.fileio import atomic_write_json

from .errors import ClusterError, ConfigError
from .procs import (ProcessGroup, check_bind_host, check_timeout, free_port, group_alive, group_members, make_state_dir,
                    port_in_use, record_problem, start_time_of, stop_groups)

__all__ = ["MlflowServer", "start_mlflow_server", "stop_mlflow_server", "server_answers",
           "wait_until_ready", "load_server_record", "running_mlflow_server", "RECORD_FILE", "LEAN_ENV"]

log = logging.getLogger(__name__)
RECORD_FILE = "mlflow_server.json"
_HOLDS = "the server's mlflow.db and artifacts/, e.g. runs/mlflow"
# MLflow (3.5+) starts a job runner and 7 huey consumer processes next to the web server, for GenAI jobs (scorers,
# evaluation) and periodic trace tasks: 10 processes, ~2 GB RSS with --workers 1 (MLflow 3.17). A tracking server
# for sweeps (runs, metrics, artifacts, the UI) needs none of it; MLflow's own switch (mlflow/server/__init__.py,
# _run_server) turns it off: 2 processes, ~0.5 GB. MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true in the environment keeps it.
LEAN_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


@dataclass(frozen=True, kw_only=True)
class MlflowServer:
    """A started server: ``uri`` (``http://host:port``) is what ``--tracking-uri`` takes."""

    uri: str
    host: str
    port: int
    dir: str
    backend_store_uri: str
    artifacts_destination: str
    log_path: str
    group: ProcessGroup

    def to_dict(self) -> dict:
        d = asdict(self)
        d["group"] = self.group.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MlflowServer":
        d = dict(d)
        d["group"] = ProcessGroup.from_dict(d["group"])
        return cls(**d)

    @property
    def alive(self) -> bool:
        return group_alive(self.group)


def _mlflow_command() -> list[str]:
    candidate = Path(sys.executable).parent / "mlflow"
    if candidate.exists():
        return [str(candidate)]
    found = shutil.which("mlflow")
    if found:
        return [found]
    return [sys.executable, "-m", "mlflow"]


def server_answers(uri: str, timeout_s: float = 2.0) -> bool:
    """True when ``GET <uri>/health`` returns HTTP 200."""
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def _tail(path: str | os.PathLike, n: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").strip().splitlines()[-n:])
    except FileNotFoundError:
        return "(no log written)"


def wait_until_ready(server: MlflowServer, timeout_s: float) -> None:
    """Poll ``/health`` every 0.25 s; ``ClusterError`` with the log tail when the server exits
    or does not answer within ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server_answers(server.uri, timeout_s=1.0):
            return
        if not group_members(server.group.pgid):
            raise ClusterError(f"the MLflow server exited during startup; last lines of {server.log_path}:\n"
                               f"{_tail(server.log_path)}")
        time.sleep(0.25)
    raise ClusterError(f"the MLflow server at {server.uri} did not answer GET /health within {timeout_s:.0f} s "
                       f"(its log: {server.log_path}); on a busy machine raise --timeout.")


def load_server_record(dir: str | os.PathLike) -> MlflowServer | None:
    """The server recorded in ``dir/mlflow_server.json`` (running or not), or None."""
    path = Path(dir) / RECORD_FILE
    if not path.exists():
        return None
    try:
        return MlflowServer.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ClusterError(f"'{path}' is unreadable ({record_problem(e)}); delete it if no server of it "
                           "runs.") from None


def start_mlflow_server(*, dir: str | os.PathLike, host: str = "127.0.0.1", port: int | None = None,
                        workers: int = 1, timeout_s: float = 120.0, wait: bool = True,
                        allowed_hosts: str | None = None) -> MlflowServer:
    """Start ``mlflow server`` on ``host:port`` (a free port when None or 0) with its SQLite database and
    artifacts under ``dir``; wait until it answers (``wait``) and return its handle.
    ``allowed_hosts`` is passed to ``--allowed-hosts`` (MLflow accepts only localhost and private-IP
    Host headers by default; a server reached through a DNS name must list it). Raises
    ``ClusterError`` when the port is taken, a server recorded in ``dir`` still runs, or it fails
    to come up in ``timeout_s`` seconds (then it is stopped again)."""
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 <= port < 65536):
        raise ConfigError(f"--port must be a whole number in 0..65535 (0 picks a free port), but got --port {port!r}.")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"--workers must be a whole number >= 1 (the server's worker processes), but got "
                          f"--workers {workers!r}.")
    check_timeout(timeout_s, "until the server answers", 120)
    check_bind_host(host)
    # Every refusal comes before --dir is created: a refused call leaves no empty folder behind.
    root = Path(dir).expanduser().absolute()
    if root.exists() and not root.is_dir():
        make_state_dir(root, _HOLDS)                          # the ConfigError naming --dir
    previous = load_server_record(root) if root.is_dir() else None
    if previous is not None and previous.alive:
        raise ClusterError(f"an MLflow server recorded in '{root}' still runs at {previous.uri}; reuse it, "
                           f"or stop it with `gmpq mlflow-server --stop --dir {root}`.")
    port = free_port(host) if not port else port
    if port_in_use(port, host):
        raise ClusterError(f"port {port} on {host} is already in use; pick another --port (0 picks a free one) or "
                           "stop what holds it.")
    root = make_state_dir(root, _HOLDS)
    artifacts = make_state_dir(root / "artifacts", "the server's artifacts")
    backend = f"sqlite:///{root / 'mlflow.db'}"
    cmd = _mlflow_command() + ["server", "--backend-store-uri", backend, "--artifacts-destination", str(artifacts),
                               "--host", host, "--port", str(port), "--workers", str(workers)]
    if allowed_hosts:
        cmd += ["--allowed-hosts", allowed_hosts]
    log_path = root / "mlflow_server.log"
    env = {**os.environ, **{k: v for k, v in LEAN_ENV.items() if k not in os.environ}}   # the user's settings win
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=root, close_fds=True, env=env)
    display_host = f"[{host}]" if ":" in host else host
    server = MlflowServer(uri=f"http://{display_host}:{port}", host=host, port=port, dir=str(root),
                          backend_store_uri=backend, artifacts_destination=str(artifacts), log_path=str(log_path),
                          group=ProcessGroup(name="mlflow-server", pgid=proc.pid, start_time=start_time_of(proc.pid)))
    atomic_write_json(root / RECORD_FILE, server.to_dict())
    if wait:
        try:
            wait_until_ready(server, timeout_s)
        except BaseException:
            stop_mlflow_server(server)
            raise
    log.info("MLflow server %s answers (pgid %d)", server.uri, proc.pid)
    return server


def stop_mlflow_server(server: MlflowServer | str | os.PathLike, *, grace_s: float = 10.0) -> str:
    """Stop a server (a handle, or the ``dir`` it was started with): SIGTERM its session,
    SIGKILL after ``grace_s`` seconds. Returns "stopped", "killed", "not running" or "survived";
    the record file is removed once nothing of it runs."""
    if not isinstance(server, MlflowServer):
        record = load_server_record(server)
        if record is None:
            return "not running"
        server = record
    outcome = stop_groups([server.group], grace_s=grace_s)[server.group.name]
    if outcome != "survived":
        (Path(server.dir) / RECORD_FILE).unlink(missing_ok=True)
    return outcome


@contextlib.contextmanager
def running_mlflow_server(dir: str | os.PathLike, **kwargs) -> Iterator[MlflowServer]:
    """``with running_mlflow_server(d) as s: ... s.uri``: started on entry, stopped on exit."""
    server = start_mlflow_server(dir=dir, **kwargs)
    try:
        yield server
    finally:
        stop_mlflow_server(server)
