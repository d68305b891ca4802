"""`gmpq cluster up/status/down` with real `ray start` processes on this machine (loopback only)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.errors import ClusterError
from cluster.local import load_cluster_state, start_local_cluster, stop_local_cluster
from cluster.procs import group_members

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]


def gmpq(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that contain ``text`` (independent of the pgid bookkeeping)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                found.append(f"{entry.name}: {cmdline[:120]}")
    return found


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.fixture
def state_dirs(tmp_path, monkeypatch):
    """Two state folders; whatever a test leaves running in them is stopped at the end."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)  # restored after the test (connect may set it)
    # as left by a local sweep earlier in the same process (orchestrator.ray_env): nodes must still join
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    dirs = (tmp_path / "cluster_a", tmp_path / "cluster_b")
    yield dirs
    import ray

    ray.shutdown()
    for d in dirs:
        stop_local_cluster(d, grace_s=2.0)


def test_cluster_up_gives_three_nodes_pinned_tasks_reach_both_workers_and_down_stops_only_them(state_dirs):
    import ray

    from cluster.connect import alive_nodes, connect, disconnect, probe_shared_path
    from cluster.preflight import preflight_sweep
    from cluster.resources import check_trial_resources, train_scaling
    from gmpq_core.errors import ConfigError

    a, b = state_dirs
    # 1 GPU advertised per worker (no physical GPU needed: Ray only accounts for it), 0 on the head
    up = gmpq("cluster", "up", "--workers", "2", "--gpus-per-node", "1", "--dir", str(a))
    assert up.returncode == 0, up.stderr[-2000:]
    address = up.stdout.strip().splitlines()[-1]  # contract: the address is the last line
    state = load_cluster_state(a)
    assert state is not None and state.address == address and len(state.nodes) == 3

    # a second `up` on the same folder refuses instead of orphaning the first cluster
    with pytest.raises(ClusterError, match="still runs"):
        start_local_cluster(workers=1, state_dir=a)

    info = connect(address)
    try:
        nodes = alive_nodes()
        assert len(nodes) == 3 and info.n_nodes == 3 and len(info.hosts) == 1
        assert info.resources["CPU"] == sum(n.num_cpus for n in state.nodes)
        by_marker = {next(k for k in n["Resources"] if k.startswith("node_")): n["NodeID"] for n in nodes}
        assert set(by_marker) == {"node_0", "node_1", "node_2"}
        assert info.resources.get("GPU") == 2.0
        assert [n["Resources"].get("GPU", 0.0) for n in nodes if "node_0" in n["Resources"]] == [0.0]

        # four 0.25-GPU tasks pinned to worker_1 share its one GPU; a whole-GPU trial fits once per worker
        @ray.remote(num_cpus=0, num_gpus=0.25)
        def gpu_ids() -> list:
            return ray.get_gpu_ids()

        ids = ray.get([gpu_ids.options(resources={"node_1": 0.01}).remote() for _ in range(4)], timeout=120)
        assert all(len(i) == 1 and str(i[0]) == "0" for i in ids), ids
        check = check_trial_resources(1, 0.25, nodes)
        assert check.use_gpu and check.max_parallel_trials == 2   # CPU-bound: 1 CPU per worker
        assert train_scaling(2, nodes).use_gpu and train_scaling(2, nodes).backend == "nccl"

        @ray.remote(num_cpus=1)
        def where() -> str:
            return ray.get_runtime_context().get_node_id()

        ran_on = ray.get([where.options(resources={f"node_{i}": 0.01}).remote() for i in (1, 2, 1, 2)], timeout=120)
        assert ran_on == [by_marker["node_1"], by_marker["node_2"]] * 2
        assert by_marker["node_0"] not in ran_on  # the head has 0 CPUs by default: no trial lands there

        # Ray's worker processes leave the node's process group but stay in its session, which is
        # what `down` signals: a detached actor on worker_2 must be found there and must not outlive it
        @ray.remote(num_cpus=0)
        class Survivor:
            def pid(self) -> int:
                return os.getpid()

        survivor = Survivor.options(resources={"node_2": 0.01}, lifetime="detached", name="survivor").remote()
        survivor_pid = ray.get(survivor.pid.remote(), timeout=120)
        assert survivor_pid in group_members(state.node("worker_2").group.pgid)

        # the shared-path probe really runs on the nodes: one host here, and it sees the folder
        assert probe_shared_path(str(a / "probe")) == {info.hosts[0]: True}
        pre = preflight_sweep(storage_path=str(a / "ray_results"), cpu=1, gpu=0, max_concurrent_trials=2)
        assert pre.storage.kind == "local" and pre.resources.max_parallel_trials == 2 and not pre.warnings
        with pytest.raises(ConfigError, match="largest node has CPU=1"):
            preflight_sweep(storage_path=str(a), cpu=2, gpu=0.25)
    finally:
        disconnect()

    status = gmpq("cluster", "status", "--dir", str(a), "--json")
    assert status.returncode == 0, status.stderr[-2000:]
    report = json.loads(status.stdout.strip().splitlines()[-1])
    assert report["processes"] == {"head": True, "worker_1": True, "worker_2": True}
    assert len(report["ray_nodes"]) == 3
    plain = gmpq("cluster", "status", "--dir", str(a))               # each node's resources, not just a count
    assert "Ray reports 3 alive node(s):" in plain.stdout and plain.stdout.count(" CPU, ") == 3, plain.stdout

    # another cluster (head only) that `down` of the first must leave alone
    other = start_local_cluster(workers=0, cpus_per_node=1, state_dir=b)
    down = gmpq("cluster", "down", "--dir", str(a))
    assert down.returncode == 0, down.stderr[-2000:]
    assert all(group_members(n.group.pgid) == [] for n in state.nodes)
    assert not pid_alive(survivor_pid), "a Ray worker process of the cluster outlived `down`"
    assert processes_mentioning(state.temp_dir) == []
    assert load_cluster_state(a) is None and not Path(state.temp_dir).exists()
    assert group_members(other.node("head").group.pgid), "down stopped a cluster it did not start"
    assert stop_local_cluster(b, grace_s=2.0)["head"] in ("stopped", "killed")
    assert processes_mentioning(other.temp_dir) == []
