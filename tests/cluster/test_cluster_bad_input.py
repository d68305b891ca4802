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
