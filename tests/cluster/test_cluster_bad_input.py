"""Bad input to gmpq cluster / mlflow-server: exit 2 with one paragraph, before any process starts."""
from __future__ import annotations

import subprocess

import pytest

from orchestrator.cli import main


@pytest.fixture
def no_process(monkeypatch):
    """Starting a process fails the test: every rejection must come before the first one."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a process was started: {args[0] if args else kwargs}")
    monkeypatch.setattr(subprocess, "Popen", refuse)


def _rejected(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("gmpq: error: ") and "Traceback" not in err
    return " ".join(err.split())


@pytest.mark.parametrize("host", ["bad host!", "999.1.1.1", ""])
def test_mlflow_server_rejects_a_host_that_does_not_resolve(tmp_path, capsys, no_process, host):
    err = _rejected(capsys, ["mlflow-server", "--host", host, "--dir", str(tmp_path / "ms")])
    assert f"--host {host!r}" in err and "127.0.0.1" in err
    assert not (tmp_path / "ms").exists()


def test_mlflow_server_rejects_a_host_of_another_machine(tmp_path, capsys, no_process):
    err = _rejected(capsys, ["mlflow-server", "--host", "192.0.2.1", "--dir", str(tmp_path / "ms")])  # TEST-NET-1
    assert "--host '192.0.2.1' cannot be bound on this machine" in err


@pytest.mark.parametrize("sub", ["", "/sub"])
def test_mlflow_server_rejects_a_dir_that_is_a_file(tmp_path, capsys, no_process, sub):
    (tmp_path / "afile").write_text("x")
    err = _rejected(capsys, ["mlflow-server", "--dir", str(tmp_path / "afile") + sub])
    assert f"--dir '{tmp_path / 'afile'}{sub}'" in err
    assert (tmp_path / "afile").read_text() == "x"


@pytest.mark.parametrize("timeout", ["0", "-5", "nan", "inf"])
def test_mlflow_server_rejects_a_timeout_that_is_not_positive(tmp_path, capsys, no_process, timeout):
    err = _rejected(capsys, ["mlflow-server", "--timeout", timeout, "--dir", str(tmp_path / "ms")])
    assert "timeout (--timeout) must be a number of seconds > 0" in err and f"but got {float(timeout)!r}" in err
    assert not (tmp_path / "ms").exists()


def test_mlflow_server_stop_and_detach_together_are_a_usage_error(tmp_path, capsys, no_process):
    with pytest.raises(SystemExit) as e:
        main(["mlflow-server", "--stop", "--detach", "--dir", str(tmp_path)])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("sub", ["", "/sub"])
def test_cluster_up_rejects_a_dir_that_is_a_file(tmp_path, capsys, no_process, sub):
    (tmp_path / "afile").write_text("x")
    err = _rejected(capsys, ["cluster", "up", "--dir", str(tmp_path / "afile") + sub])
    assert f"--dir '{tmp_path / 'afile'}{sub}'" in err


@pytest.mark.parametrize("mb", ["0", "-5", "74"])
def test_cluster_up_rejects_an_object_store_under_rays_minimum(tmp_path, capsys, no_process, mb):
    err = _rejected(capsys, ["cluster", "up", "--object-store-mb", mb, "--dir", str(tmp_path / "cl")])
    assert "object_store_mb (--object-store-mb) must be an integer >= 75" in err and f"but got {mb}" in err
    assert not (tmp_path / "cl").exists()


@pytest.mark.parametrize("timeout", ["0", "-1"])
def test_cluster_up_rejects_a_timeout_that_is_not_positive(tmp_path, capsys, no_process, timeout):
    err = _rejected(capsys, ["cluster", "up", "--timeout", timeout, "--dir", str(tmp_path / "cl")])
    assert "timeout (--timeout) must be a number of seconds > 0" in err and f"but got {float(timeout)!r}" in err
    assert not (tmp_path / "cl").exists()


def test_cluster_without_an_action_is_a_usage_error(capsys):
    assert main(["cluster"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: gmpq cluster") and "needs an action: up, down or status" in err


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0", "localhost"])
def test_the_usual_server_hosts_pass_the_host_check(host):
    from cluster.procs import check_bind_host

    check_bind_host(host)            # no ConfigError: mlflow.yaml serves on 0.0.0.0, the default is 127.0.0.1


@pytest.mark.parametrize("grace", ["-1", "nan", "inf"])
def test_cluster_down_rejects_a_grace_that_is_not_a_duration(tmp_path, capsys, grace):
    rc = main(["cluster", "down", "--dir", str(tmp_path / "none"), "--grace", grace])
    err = capsys.readouterr().err
    assert rc == 2 and "grace (--grace) must be a number of seconds >= 0" in err


@pytest.mark.parametrize("command, record", [(["mlflow-server", "--stop"], "mlflow_server.json"),
                                             (["cluster", "status"], "cluster.json")])
def test_a_record_missing_a_key_says_which(tmp_path, capsys, command, record):
    (tmp_path / record).write_text('{"name": "x"}')
    rc = main([*command, "--dir", str(tmp_path)])
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2 and "is unreadable (it lacks the key" in err


@pytest.mark.parametrize("argv, says", [
    (["mlflow-server", "--port", "70000"], "--port must be a whole number in 0..65535 (0 picks a free port), but got "
                                           "--port 70000"),
    (["mlflow-server", "--port", "-1"], "but got --port -1"),
    (["mlflow-server", "--workers", "0"], "--workers must be a whole number >= 1 (the server's worker processes), "
                                          "but got --workers 0"),
    (["cluster", "up", "--workers", "-1"], "--workers must be a whole number >= 0 (worker nodes besides the head; 0: "
                                           "the head alone), but got --workers -1"),
    (["cluster", "up", "--cpus-per-node", "-2"], "--cpus-per-node must be a whole number >= 0, but got "
                                                 "--cpus-per-node -2"),
    (["cluster", "up", "--head-cpus", "-1"], "--head-cpus must be a whole number >= 0, but got --head-cpus -1"),
    (["cluster", "up", "--gpus-per-node", "-1"], "--gpus-per-node must be a whole number >= 0"),
    (["cluster", "up", "--cpus-per-node", "0"], "--cpus-per-node 0 leaves the worker nodes unable to run trials"),
])
def test_a_bad_count_names_the_flag_typed_not_a_python_key(tmp_path, capsys, no_process, argv, says):
    err = _rejected(capsys, [*argv, "--dir", str(tmp_path / "d")])
    assert says in err
    assert "=" not in err.split("but got", 1)[-1]          # not "workers=-1" / "port=70000"
    assert not (tmp_path / "d").exists()


def test_cluster_status_with_nothing_recorded_names_the_folder_and_how_to_point_elsewhere(tmp_path, capsys,
                                                                                       monkeypatch):
    monkeypatch.setattr("cluster.local.DEFAULT_STATE_DIR", tmp_path / "default")
    for argv, folder in ((["cluster", "status"], tmp_path / "default"),
                         (["cluster", "status", "--dir", str(tmp_path / "mine")], tmp_path / "mine")):
        assert main(argv) == 1
        out = " ".join(capsys.readouterr().out.split())
        assert f"no local cluster recorded in {folder} (no cluster.json there)" in out, out
        assert "gmpq cluster up" in out and "--dir DIR" in out and "GMPQ_CLUSTER_DIR" in out
    assert main(["cluster", "down", "--dir", str(tmp_path / "mine")]) == 0
    assert f"no local cluster recorded in {tmp_path / 'mine'}" in capsys.readouterr().out


def test_cluster_up_says_how_many_gpus_ray_detected_not_gpus_detected(tmp_path, capsys, monkeypatch):
    """On a machine without GPUs `up` printed "GPUs detected" for nodes that advertise what Ray detects (0 here)."""
    from cluster.local import LocalCluster, LocalNode
    from cluster.procs import ProcessGroup

    def node(name: str, gpus: int | None) -> LocalNode:
        return LocalNode(name=name, group=ProcessGroup(name=name, pgid=4242, start_time=1), num_cpus=1,
                         num_gpus=gpus, resources={"node_0": 1.0}, log_path=str(tmp_path / f"{name}.log"))

    cluster = LocalCluster(address="127.0.0.1:6379", state_dir=str(tmp_path), temp_dir=str(tmp_path),
                           nodes=(node("head", 0), node("worker_1", None)))
    monkeypatch.setattr("cluster.local.start_local_cluster", lambda **kwargs: cluster)
    monkeypatch.setattr("cluster.local.detected_gpus", lambda: 0, raising=False)
    assert main(["cluster", "up", "--workers", "1", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "GPUs detected" not in out
    assert "head: pgid 4242, 1 CPUs, 0 GPUs, " in out and "worker_1: pgid 4242, 1 CPUs, 0 GPUs (none detected), " in out


def test_the_gpu_words_of_cluster_up():
    from orchestrator.commands.cluster import gpus_text

    assert [gpus_text(2, None), gpus_text(None, 4), gpus_text(None, 0), gpus_text(None, None)] == \
        ["2 GPUs", "4 GPUs (detected)", "0 GPUs (none detected)", "the GPUs Ray detects"]


def test_down_with_nothing_recorded_is_a_no_op_and_negative_workers_are_refused(tmp_path):
    from cluster.errors import ConfigError
    from cluster.local import start_local_cluster, stop_local_cluster
    assert stop_local_cluster(tmp_path) == {}
    with pytest.raises(ConfigError, match="--workers must be a whole number >= 0"):
        start_local_cluster(workers=-1, state_dir=tmp_path)
