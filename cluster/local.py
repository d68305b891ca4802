"""A multi-node Ray cluster on this one machine, for development and tests.

``start_local_cluster(workers=N)`` runs ``ray start --head --block`` and N times
``ray start --address=HEAD --block``, each in its own session (so a node is one session of processes:
see :mod:`cluster.procs`), with its own ports and its CPUs, plus a custom resource ``node_<i>: 1``
(``node_0`` is the head) so tests can pin tasks to a node. The started groups and the address are
recorded in ``<state_dir>/cluster.json``; ``stop_local_cluster`` signals exactly those groups.

Ray keeps one session directory per cluster: all nodes share the head's ``--temp-dir`` (a short
``/tmp/gmpq-ray-XXXX`` folder, because Ray's Unix socket paths must stay under 107 characters).
Since Ray then writes ``ray_current_cluster`` there and not in ``/tmp/ray``, ``ray.init("auto")``
alone does not find this cluster; :func:`cluster.connect.resolve_address` reads the state file.

By default the head gets 0 CPUs (like a production head node, it runs no trials) when there are
workers, so trials land on the workers; ``head_cpus`` changes that. GPUs: the head then gets 0
too; each worker advertises ``gpus_per_node`` GPUs, or (None) what Ray detects. All nodes of one
machine see the same physical GPUs, so with autodetection they oversubscribe them (like the CPUs).
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from gmpq_core.fileio import atomic_write_json

from .errors import ClusterError, ConfigError
from .procs import (ProcessGroup, check_timeout, free_port, group_alive, group_members, make_state_dir,
                    record_problem, start_time_of, stop_groups)

__all__ = ["DEFAULT_STATE_DIR", "MIN_OBJECT_STORE_MB", "LocalNode", "LocalCluster", "start_local_cluster",
           "stop_local_cluster", "load_cluster_state", "node_status", "kill_node", "detected_gpus", "STATE_FILE"]

log = logging.getLogger(__name__)
DEFAULT_STATE_DIR = Path(os.environ.get("GMPQ_CLUSTER_DIR", Path.home() / ".cache" / "gmpq" / "cluster"))
STATE_FILE = "cluster.json"
MIN_OBJECT_STORE_MB = 75          # Ray's minimum object store: 78643200 bytes = 75 MiB
_READY_MARK = "This command will now block forever"


@dataclass(frozen=True, kw_only=True)
class LocalNode:
    """One ``ray start --block`` session: ``name`` is ``head`` or ``worker_<i>`` (i >= 1)."""

    name: str
    group: ProcessGroup
    num_cpus: int
    resources: dict[str, float]
    log_path: str
    num_gpus: int | None = None   # None: what Ray detects

    def to_dict(self) -> dict:
        return {"name": self.name, "group": self.group.to_dict(), "num_cpus": self.num_cpus, "num_gpus": self.num_gpus,
                "resources": dict(self.resources), "log_path": self.log_path}

    @classmethod
    def from_dict(cls, d: dict) -> "LocalNode":
        return cls(name=d["name"], group=ProcessGroup.from_dict(d["group"]), num_cpus=int(d["num_cpus"]), num_gpus=d.get("num_gpus"),
                   resources=dict(d["resources"]), log_path=d["log_path"])


@dataclass(frozen=True, kw_only=True)
class LocalCluster:
    """What ``start_local_cluster`` started: the GCS address (``host:port``) and the node groups."""

    address: str
    state_dir: str
    temp_dir: str
    nodes: tuple[LocalNode, ...]
    started_at: float = field(default_factory=time.time)  # Unix seconds

    @property
    def workers(self) -> tuple[LocalNode, ...]:
        return tuple(n for n in self.nodes if n.name != "head")

    def node(self, name: str) -> LocalNode:
        for n in self.nodes:
            if n.name == name:
                return n
        raise ConfigError(f"no node named {name!r} in this cluster; nodes: {[n.name for n in self.nodes]}")

    def to_dict(self) -> dict:
        return {"version": 1, "address": self.address, "state_dir": self.state_dir,
                "temp_dir": self.temp_dir, "started_at": self.started_at,
                "nodes": [n.to_dict() for n in self.nodes]}

    @classmethod
    def from_dict(cls, d: dict) -> "LocalCluster":
        return cls(address=d["address"], state_dir=d["state_dir"], temp_dir=d["temp_dir"],
                   started_at=float(d["started_at"]), nodes=tuple(LocalNode.from_dict(n) for n in d["nodes"]))


def _ray_executable() -> list[str]:
    """The ``ray`` CLI of this interpreter's environment (so nodes import the same packages)."""
    candidate = Path(sys.executable).parent / "ray"
    if candidate.exists():
        return [str(candidate)]
    found = shutil.which("ray")
    if found:
        return [found]
    return [sys.executable, "-m", "ray.scripts.scripts"]


def _client_server_available() -> bool:
    """Ray Client (``ray://``) needs the grpcio package; ``ray start`` refuses the port without it."""
    try:
        import grpc  # noqa: F401
    except ImportError:
        return False
    return True


def _node_command(*, head: bool, address: str | None, gcs_port: int | None, num_cpus: int, num_gpus: int | None,
                  resources: dict[str, float], temp_dir: str, object_store_mb: int,
                  client_port: int | None) -> list[str]:
    cmd = _ray_executable() + ["start", "--block", "--disable-usage-stats",
                               f"--num-cpus={num_cpus}", f"--resources={json.dumps(resources)}",
                               f"--temp-dir={temp_dir}", f"--object-store-memory={object_store_mb * 2**20}",
                               # several nodes on one host: every per-node agent needs its own port
                               f"--dashboard-agent-listen-port={free_port()}",
                               f"--dashboard-agent-grpc-port={free_port()}",
                               f"--runtime-env-agent-port={free_port()}",
                               f"--metrics-export-port={free_port()}"]
    if num_gpus is not None:
        cmd += [f"--num-gpus={num_gpus}"]
    if head:
        cmd += ["--head", f"--port={gcs_port}", "--include-dashboard=false"]
        if client_port is not None:
            cmd += [f"--ray-client-server-port={client_port}"]
    else:
        cmd += [f"--address={address}"]
    return cmd


def _wait_ready(proc_group: ProcessGroup, log_path: Path, name: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace") if log_path.exists() else ""
        if _READY_MARK in text:
            return
        if not group_members(proc_group.pgid):
            tail = "\n".join(text.strip().splitlines()[-15:])
            raise ClusterError(f"Ray node {name!r} exited during startup; last lines of {log_path}:\n{tail}")
        time.sleep(0.25)
    raise ClusterError(f"Ray node {name!r} did not finish starting in time; see {log_path}.")


def _auth_env() -> dict[str, str]:
    """Ray 2.60 token auth, made explicit for every node.

    ``ray start --head`` turns token auth on by itself when a token exists (``~/.ray/auth_token``,
    which any local ``ray.init`` creates), but a joining ``ray start`` does not, and then fails with
    InvalidAuthToken. So: keep the user's ``RAY_AUTH_MODE`` if set, else use "token" on every node
    (creating the token with ``ray get-auth-token --generate`` if missing). Drivers that join with
    ``ray.init(address=...)`` pick the token file up on their own.
    """
    import subprocess

    mode = os.environ.get("RAY_AUTH_MODE", "token").lower()
    if mode == "token":
        has_token = bool(os.environ.get("RAY_AUTH_TOKEN")) or Path(
            os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token")).exists()
        if not has_token:
            done = subprocess.run(_ray_executable() + ["get-auth-token", "--generate"], capture_output=True,
                                  timeout=60, env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"))
            if done.returncode != 0:
                raise ClusterError("could not create a Ray auth token (`ray get-auth-token --generate` failed: "
                                   f"{done.stderr.decode(errors='replace')[-300:]}); set RAY_AUTH_MODE=disabled "
                                   "to run the local cluster without token authentication.")
    return {"RAY_AUTH_MODE": mode}


def _spawn(cmd: list[str], log_path: Path, name: str, extra_env: dict[str, str]) -> ProcessGroup:
    import subprocess

    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", **extra_env)
    # A local Ray session started earlier in this process (orchestrator.ray_env) sets this to 0 to stay on
    # loopback; inherited by `ray start`, it refuses to join a multi-node cluster. Ray's default applies.
    if env.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0":
        del env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"]
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env, close_fds=True)
    return ProcessGroup(name=name, pgid=proc.pid, start_time=start_time_of(proc.pid))


def detected_gpus() -> int | None:
    """The GPUs a node started here without ``--num-gpus`` advertises, found as ``ray start`` finds them (Ray's
    accelerator manager, capped by ``CUDA_VISIBLE_DEVICES``); None when that cannot be told."""
    try:
        from ray._private.accelerators import get_accelerator_manager_for_resource

        manager = get_accelerator_manager_for_resource("GPU")
        count = int(manager.get_current_node_num_accelerators())
        visible = manager.get_current_process_visible_accelerator_ids()
    except Exception as e:      # a private Ray API: a change there must not stop `gmpq cluster up`
        log.debug("GPU detection failed: %s", e)
        return None
    return count if visible is None else min(count, len(visible))


def load_cluster_state(state_dir: str | os.PathLike | None = None) -> LocalCluster | None:
    """The recorded cluster of ``state_dir`` (default ``~/.cache/gmpq/cluster``), or None."""
    path = Path(state_dir or DEFAULT_STATE_DIR) / STATE_FILE
    if not path.exists():
        return None
    try:
        return LocalCluster.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ClusterError(f"cluster state file '{path}' is unreadable ({record_problem(e)}); if no cluster of it "
                           "runs, delete the file.") from None


def node_status(cluster: LocalCluster) -> dict[str, bool]:
    """``{node name: alive}`` from the recorded sessions (no Ray connection needed)."""
    return {n.name: group_alive(n.group) for n in cluster.nodes}


def start_local_cluster(*, workers: int, cpus_per_node: int | None = None, head_cpus: int | None = None,
                        gpus_per_node: int | None = None, state_dir: str | os.PathLike | None = None,
                        object_store_mb: int = 100, timeout_s: float = 180.0) -> LocalCluster:
    """Start a head and ``workers`` worker nodes on this machine and record them in ``state_dir``.

    ``cpus_per_node`` defaults to ``max(1, os.cpu_count() // workers)`` (oversubscribing a small
    machine on purpose: the point is several nodes, not speed). ``head_cpus`` defaults to 0 when
    there are workers, else to ``cpus_per_node``. Raises ``ClusterError`` when a node fails to
    start within ``timeout_s`` seconds (all nodes started so far are stopped first) or when
    ``state_dir`` already records a running cluster.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ConfigError(f"--workers must be a whole number >= 0 (worker nodes besides the head; 0: the head alone), "
                          f"but got --workers {workers!r}.")
    ncpu = os.cpu_count() or 1
    if cpus_per_node is None:
        cpus_per_node = max(1, ncpu // max(1, workers))
    if head_cpus is None:
        head_cpus = 0 if workers > 0 else cpus_per_node
    for flag, value in (("--cpus-per-node", cpus_per_node), ("--head-cpus", head_cpus),
                        ("--gpus-per-node", 0 if gpus_per_node is None else gpus_per_node)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{flag} must be a whole number >= 0, but got {flag} {value!r}.")
    if workers > 0 and cpus_per_node == 0:
        raise ConfigError("--cpus-per-node 0 leaves the worker nodes unable to run trials; use 1 or more.")
    mb = object_store_mb
    if isinstance(mb, bool) or not isinstance(mb, int) or mb < MIN_OBJECT_STORE_MB:
        raise ConfigError(f"object_store_mb (--object-store-mb) must be an integer >= {MIN_OBJECT_STORE_MB} (MiB per "
                          f"node; Ray refuses an object store under {MIN_OBJECT_STORE_MB} MiB), but got {mb!r}; the "
                          "default is 100.")
    check_timeout(timeout_s, "for all nodes to start", 180)
    state = make_state_dir(Path(state_dir or DEFAULT_STATE_DIR).absolute(),
                           f"the cluster's record (default {DEFAULT_STATE_DIR}), or leave --dir out")
    existing = load_cluster_state(state)
    if existing is not None and any(node_status(existing).values()):
        raise ClusterError(f"a local cluster recorded in '{state}' still runs at {existing.address}; "
                           f"stop it first with `gmpq cluster down --dir {state}` or pick another --dir.")
    temp_dir = tempfile.mkdtemp(prefix="gmpq-ray-", dir="/tmp" if os.path.isdir("/tmp") else None)
    gcs_port = free_port()
    client_port = free_port() if _client_server_available() else None
    deadline = time.monotonic() + timeout_s
    auth_env = _auth_env()
    nodes: list[LocalNode] = []
    try:
        head_gpus = 0 if workers > 0 else gpus_per_node
        specs = [("head", head_cpus, head_gpus)] + [(f"worker_{i}", cpus_per_node, gpus_per_node)
                                                    for i in range(1, workers + 1)]
        address = None
        for index, (name, cpus, gpus) in enumerate(specs):
            resources = {f"node_{index}": 1.0}
            log_path = state / f"{name}.log"
            cmd = _node_command(head=index == 0, address=address, gcs_port=gcs_port, num_cpus=cpus, num_gpus=gpus,
                                resources=resources, temp_dir=temp_dir, object_store_mb=object_store_mb,
                                client_port=client_port)
            group = _spawn(cmd, log_path, name, auth_env)
            nodes.append(LocalNode(name=name, group=group, num_cpus=cpus, num_gpus=gpus, resources=resources,
                                   log_path=str(log_path)))
            _wait_ready(group, log_path, name, deadline)
            if index == 0:
                address_file = Path(temp_dir) / "ray_current_cluster"
                address = address_file.read_text().strip() if address_file.exists() else f"127.0.0.1:{gcs_port}"
            log.info("started Ray node %s (pgid %d, %d CPUs)", name, group.pgid, cpus)
    except BaseException:
        stop_groups([n.group for n in reversed(nodes)], grace_s=5.0)
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    cluster = LocalCluster(address=address, state_dir=str(state), temp_dir=temp_dir, nodes=tuple(nodes))
    atomic_write_json(state / STATE_FILE, cluster.to_dict())
    return cluster


def kill_node(cluster: LocalCluster, name: str) -> dict[str, str]:
    """SIGKILL every process of one node (its session), no SIGTERM first: a machine dying (for tests)."""
    return stop_groups([cluster.node(name).group], grace_s=0.0)


def stop_local_cluster(state_dir: str | os.PathLike | None = None, *, grace_s: float = 5.0,
                       keep_temp: bool = False) -> dict[str, str]:
    """Stop exactly the node groups recorded in ``state_dir`` (SIGTERM, then SIGKILL after ``grace_s``).

    Returns ``{node name: outcome}`` (see :func:`cluster.procs.stop_groups`); an empty dict when
    nothing is recorded. The state file is removed once no recorded process is left, and Ray's
    temp dir (session logs) too unless ``keep_temp``.
    """
    if isinstance(grace_s, bool) or not isinstance(grace_s, (int, float)) or not 0 <= grace_s < math.inf:
        raise ConfigError(f"grace (--grace) must be a number of seconds >= 0 between SIGTERM and SIGKILL, but got "
                          f"{grace_s!r}; the default is 5.")
    state = Path(state_dir or DEFAULT_STATE_DIR).absolute()
    cluster = load_cluster_state(state)
    if cluster is None:
        return {}
    # One SIGTERM round for all nodes (workers signalled first); the head's `ray start --block`
    # often ignores SIGTERM for good, so the grace period is short and SIGKILL follows.
    outcome = stop_groups([n.group for n in cluster.workers] + [cluster.node("head").group], grace_s=grace_s)
    if not any(node_status(cluster).values()):
        (state / STATE_FILE).unlink(missing_ok=True)
        if not keep_temp:
            shutil.rmtree(cluster.temp_dir, ignore_errors=True)
    return outcome
