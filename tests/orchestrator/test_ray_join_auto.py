"""``--address auto`` / ``local`` against real Ray instances on this machine: a ``ray start --head`` cluster is joined
with a line naming it and where its address came from; another process's private ``ray.init()`` session is refused,
not joined silently; ``local`` starts its own Ray even with $RAY_ADDRESS set. Slow: each starts Ray processes."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from cluster.discover import running_instances
from cluster.errors import ClusterError

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]
REPO = Path(__file__).resolve().parents[2]


def _short_dir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))   # Ray's socket paths must stay under 107 characters


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR")}
    return dict(env, RAY_USAGE_STATS_ENABLED="0", **extra)


def test_auto_refuses_another_processs_private_session_naming_it(tmp_path, monkeypatch):
    """The walkthrough's case: a pytest run's ray.init() session, started from another checkout's venv. (First in
    the file: the ``ray start`` cluster of the tests below would rightly be joined instead.)"""
    from orchestrator.ray_env import _join_address

    own_tmp, empty = _short_dir("gp-"), _short_dir("gq-")
    code = ("import ray, sys; ray.init(num_cpus=1, include_dashboard=False, logging_level='ERROR'); "
            "print(ray.get_runtime_context().gcs_address, flush=True); sys.stdin.read()")
    driver = subprocess.Popen([sys.executable, "-c", code], env=_env(RAY_TMPDIR=str(own_tmp)), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        gcs = driver.stdout.readline().strip()
        assert gcs, "the other process's ray.init() did not start"
        if any(i.joinable for i in running_instances()):
            pytest.skip("a 'ray start' cluster runs on this machine too: auto would rightly join that one")
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        monkeypatch.setenv("RAY_TMPDIR", str(empty))
        monkeypatch.setattr("cluster.local.DEFAULT_STATE_DIR", tmp_path / "nothing")
        with pytest.raises(ClusterError) as e:
            _join_address("auto")
        text = " ".join(str(e.value).split())
        assert gcs in text and str(own_tmp / "ray" / "session_") in text and f"pid {driver.pid}: " in text, text
        assert "private session" in text and "--address local" in text and "gmpq cluster up" in text
    finally:
        driver.stdin.close()                        # its ray.init() session ends with it
        try:
            driver.wait(timeout=60)
        except subprocess.TimeoutExpired:
            driver.kill()
            driver.wait(timeout=30)
        shutil.rmtree(own_tmp, ignore_errors=True)
        shutil.rmtree(empty, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_start_head():
    """``ray start --head --block`` with its own temp dir ``D/ray`` (so Ray records it in D/ray/ray_current_cluster),
    started and stopped as gmpq cluster up does it; yields (D, address)."""
    from cluster.local import _auth_env, _node_command, _spawn, _wait_ready
    from cluster.procs import free_port, stop_groups

    root = _short_dir("gj-")
    (root / "ray").mkdir()
    cmd = _node_command(head=True, address=None, gcs_port=free_port(), num_cpus=1, num_gpus=0, resources={},
                        temp_dir=str(root / "ray"), object_store_mb=75, client_port=None)
    group = _spawn(cmd, root / "head.log", "head", _auth_env())
    try:
        import time

        _wait_ready(group, root / "head.log", "head", time.monotonic() + 180)
        yield root, (root / "ray" / "ray_current_cluster").read_text().strip()
    finally:
        stop_groups([group], grace_s=2.0)
        shutil.rmtree(root, ignore_errors=True)


_JOIN = ("from orchestrator.ray_env import init_ray; import ray; init_ray({args}); "
         "print('JOINED', ray.get_runtime_context().gcs_address, flush=True); ray.shutdown()")


def _join(address: str, env: dict, args: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _JOIN.format(args=f"{address!r}{args}")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)


def test_auto_joins_the_ray_start_cluster_ray_recorded_and_says_so(ray_start_head, tmp_path):
    root, address = ray_start_head
    done = _join("auto", _env(RAY_TMPDIR=str(root), GMPQ_CLUSTER_DIR=str(tmp_path / "nothing")))
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"JOINED {address}" in done.stdout
    assert (f"--address auto: joining the Ray cluster at {address} (from {root / 'ray' / 'ray_current_cluster'}, "
            "written by 'ray start')") in done.stderr, done.stderr[-3000:]


def test_auto_finds_a_running_ray_start_cluster_by_its_own_record_and_says_so(ray_start_head, tmp_path):
    root, address = ray_start_head
    if [i.gcs_address for i in running_instances() if i.joinable] != [address]:
        pytest.skip("another 'ray start' cluster runs on this machine: auto would rightly ask which one")
    empty = _short_dir("gk-")
    try:
        done = _join("auto", _env(RAY_TMPDIR=str(empty), GMPQ_CLUSTER_DIR=str(tmp_path / "nothing")))
    finally:
        shutil.rmtree(empty, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"JOINED {address}" in done.stdout
    assert (f"--address auto: joining the Ray cluster at {address} (from the 'ray start' cluster running on this "
            f"machine, recorded in {root / 'ray' / 'ray_current_cluster'})") in done.stderr, done.stderr[-3000:]


def test_local_starts_its_own_ray_even_with_ray_address_set(ray_start_head):
    _, address = ray_start_head
    done = _join("local", _env(RAY_ADDRESS=address), args=", num_cpus=1")
    assert done.returncode == 0, done.stderr[-3000:]
    joined = done.stdout.split("JOINED", 1)[1].split()[0]
    assert joined != address                        # its own instance, not the cluster $RAY_ADDRESS names
