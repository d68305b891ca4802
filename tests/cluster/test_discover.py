"""``--address auto`` past $RAY_ADDRESS and the state file: a ``ray start`` cluster is joined and named, another
process's private ``ray.init()`` session is refused and named (``cluster.discover``, on a /proc tree written here)."""
from __future__ import annotations

from pathlib import Path

import pytest

from cluster.discover import discover_cluster, running_instances
from cluster.errors import ClusterError


def _process(proc: Path, pid: int, ppid: int, args: list[str]) -> None:
    d = proc / str(pid)
    d.mkdir(parents=True)
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in args) + b"\0")
    (d / "stat").write_text(f"{pid} ({Path(args[0]).name[:15]}) S {ppid} {pid} {pid} 0 -1 4194560")


def _raylet(proc: Path, pid: int, ppid: int, gcs: str, temp_dir: Path) -> str:
    """A raylet as Ray starts it (the flags cluster.discover reads, among others it ignores); returns its session."""
    session = f"{temp_dir}/session_2026-11-28_23-02-07_522825_{ppid}"
    _process(proc, pid, ppid, ["/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet",
                               f"--raylet_socket_name={session}/sockets/raylet", f"--temp_dir={temp_dir}",
                               f"--session_dir={session}", f"--gcs-address={gcs}", "--session-name=x"])
    return session


@pytest.fixture
def machine(tmp_path):
    """(proc root, environ whose Ray temp dir is empty, state folder of gmpq cluster up with nothing recorded)."""
    proc = tmp_path / "proc"
    proc.mkdir()
    (tmp_path / "tmp" / "ray").mkdir(parents=True)
    return proc, {"RAY_TMPDIR": str(tmp_path / "tmp")}, tmp_path / "state"


def _one_line(e: pytest.ExceptionInfo) -> str:
    return " ".join(str(e.value).split())


def test_another_processs_private_session_is_refused_naming_it_and_the_fixes(tmp_path, machine):
    proc, env, state = machine
    _process(proc, 100, 1, ["/other/venv/bin/python", "-m", "pytest", "tests/test_x.py"])
    session = _raylet(proc, 130, 100, "192.0.2.2:33199", tmp_path / "tmp" / "ray")     # ray.init(): no record
    with pytest.raises(ClusterError) as e:
        discover_cluster(state_dir=state, environ=env, proc=proc)
    text = _one_line(e)
    assert "192.0.2.2:33199" in text and f"session {session}" in text
    assert "pid 100: /other/venv/bin/python -m pytest tests/test_x.py" in text
    assert "private session of another process's ray.init()" in text
    assert str(state / "cluster.json") in text and str(tmp_path / "tmp" / "ray" / "ray_current_cluster") in text
    for fix in ("gmpq cluster up", "--address HOST:PORT", "--address local", "--address 192.0.2.2:33199"):
        assert fix in text, fix


def test_the_cluster_ray_start_recorded_in_rays_temp_dir_is_joined_and_named(tmp_path, machine):
    proc, env, state = machine
    (tmp_path / "tmp" / "ray" / "ray_current_cluster").write_text("10.0.0.5:6379\n")
    _process(proc, 100, 1, ["python", "-m", "pytest"])
    _raylet(proc, 130, 100, "192.0.2.2:33199", tmp_path / "tmp" / "ray")      # a private one too: not chosen
    _process(proc, 200, 1, ["/venv/bin/ray", "start", "--address", "10.0.0.5:6379"])
    _raylet(proc, 230, 200, "10.0.0.5:6379", tmp_path / "tmp" / "ray")       # this machine's node of that cluster
    got = discover_cluster(state_dir=state, environ=env, proc=proc)
    assert (got.kind, got.address) == ("gcs", "10.0.0.5:6379")
    assert got.source == f"{tmp_path / 'tmp' / 'ray' / 'ray_current_cluster'}, written by 'ray start'"


def test_a_record_no_running_node_matches_is_stale_and_a_running_cluster_is_joined(tmp_path, machine, caplog):
    """The review: a 'ray start --block' ended by Ctrl-C leaves ray_current_cluster; it won over a live cluster
    (a 'gmpq cluster up --dir X' one) and auto ended with "No Ray cluster answers"."""
    proc, env, state = machine
    stale = tmp_path / "tmp" / "ray" / "ray_current_cluster"
    stale.write_text("10.0.0.5:6379\n")
    own = tmp_path / "gmpq-ray-abc"
    own.mkdir()
    (own / "ray_current_cluster").write_text("127.0.0.1:41234\n")
    _process(proc, 300, 1, ["/venv/bin/ray", "start", "--head"])
    _raylet(proc, 330, 300, "127.0.0.1:41234", own)
    got = discover_cluster(state_dir=state, environ=env, proc=proc)
    assert (got.kind, got.address) == ("gcs", "127.0.0.1:41234")
    assert f"{stale} names 10.0.0.5:6379, where no Ray runs on this machine" in caplog.text


def test_a_ray_start_cluster_with_its_own_temp_dir_is_found_running_and_named(tmp_path, machine):
    proc, env, state = machine
    own = tmp_path / "gmpq-ray-abc"            # gmpq cluster up's nodes (or ray start --temp-dir) write it there
    own.mkdir()
    (own / "ray_current_cluster").write_text("127.0.0.1:41000")
    _process(proc, 50, 1, ["/venv/bin/ray", "start", "--block", "--head"])
    _raylet(proc, 60, 50, "127.0.0.1:41000", own)
    _process(proc, 70, 1, ["/venv/bin/ray", "start", "--block", "--address=127.0.0.1:41000"])
    _raylet(proc, 80, 70, "127.0.0.1:41000", own)             # a worker node of it: the same cluster
    _process(proc, 100, 1, ["python", "-m", "pytest"])
    _raylet(proc, 130, 100, "192.0.2.2:33199", tmp_path / "tmp" / "ray")
    got = discover_cluster(state_dir=state, environ=env, proc=proc)
    assert (got.kind, got.address) == ("gcs", "127.0.0.1:41000")
    assert str(own / "ray_current_cluster") in got.source and "'ray start' cluster running on this machine" in got.source
    assert [(i.gcs_address, i.joinable, i.starter_pid) for i in running_instances(proc)] == \
        [("127.0.0.1:41000", True, 50), ("192.0.2.2:33199", False, 100)]


def test_a_stale_record_does_not_make_a_private_session_joinable(tmp_path, machine):
    proc, env, state = machine
    ray_tmp = tmp_path / "tmp2" / "ray"
    ray_tmp.mkdir(parents=True)
    (ray_tmp / "ray_current_cluster").write_text("10.0.0.5:6379")   # a ray start long gone, same temp dir
    _process(proc, 100, 1, ["python", "notebook.py"])
    _raylet(proc, 130, 100, "192.0.2.2:33199", ray_tmp)
    with pytest.raises(ClusterError, match="private session"):
        discover_cluster(state_dir=state, environ=env, proc=proc)


def test_two_ray_start_clusters_are_refused_asking_which(tmp_path, machine):
    proc, env, state = machine
    for i, port in enumerate((41000, 42000)):
        own = tmp_path / f"t{i}"
        own.mkdir()
        (own / "ray_current_cluster").write_text(f"127.0.0.1:{port}")
        _raylet(proc, 60 + i, 1, f"127.0.0.1:{port}", own)
    with pytest.raises(ClusterError, match=r"found 2 Ray clusters started with 'ray start'.*--address HOST:PORT"):
        discover_cluster(state_dir=state, environ=env, proc=proc)


def test_nothing_running_is_refused_with_the_places_looked_at(machine):
    proc, env, state = machine
    _process(proc, 100, 1, ["python", "train.py"])           # no raylet anywhere
    with pytest.raises(ClusterError) as e:
        discover_cluster(state_dir=state, environ=env, proc=proc)
    text = _one_line(e)
    assert "no Ray runs on this machine" in text and "GMPQ_CLUSTER_DIR" in text and "--address local" in text


def test_without_proc_rays_own_discovery_is_kept(tmp_path, machine):
    _, env, state = machine
    got = discover_cluster(state_dir=state, environ=env, proc=tmp_path / "no-proc")
    assert (got.kind, got.address) == ("auto", "auto")
