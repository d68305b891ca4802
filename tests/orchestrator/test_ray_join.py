"""Joining a cluster (``--address``): the address resolved as cluster.connect does, a dead one refused fast."""
from __future__ import annotations

import socket
import time

import pytest

from cluster.errors import ClusterError
from gmpq_core.errors import ConfigError
from orchestrator.ray_env import _join_address


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_address_where_nothing_runs_is_refused_within_seconds_naming_it_and_the_fix(monkeypatch, tmp_path):
    import os

    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):                  # token auth is switched on only to join
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "auth_token"))
    (tmp_path / "auth_token").write_text("secret")
    port = _free_port()
    t0 = time.monotonic()
    with pytest.raises(ClusterError, match=rf"No Ray cluster answers at 127\.0\.0\.1:{port}.*--address local"):
        _join_address(f"127.0.0.1:{port}")
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")          # "auto" follows $RAY_ADDRESS
    with pytest.raises(ClusterError, match=rf"127\.0\.0\.1:{port} \(--address auto, from RAY_ADDRESS\)"):
        _join_address("auto")
    assert time.monotonic() - t0 < 30                                # ray.init itself retries for minutes
    assert "RAY_AUTH_MODE" not in os.environ                          # a failed join changed nothing
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")       # Ray's Jobs CLI address: named as such
    with pytest.raises(ConfigError, match=r"--address auto follows \$RAY_ADDRESS='http://127\.0\.0\.1:8265'"):
        _join_address("auto")


def test_a_live_address_is_joined_with_token_auth_when_a_token_exists(tmp_path):
    """gmpq cluster up starts clusters that require Ray's token: the join must send it (RAY_AUTH_MODE).
    In a child process: switching token auth on changes Ray's process-wide config."""
    import os
    import subprocess
    import sys

    token = tmp_path / "auth_token"
    token.write_text("secret")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        code = ("import os; from orchestrator.ray_env import _join_address; "
                f"print(_join_address('127.0.0.1:{port}'), _join_address('local'), os.environ.get('RAY_AUTH_MODE'))")
        env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
        out = subprocess.run([sys.executable, "-c", code], env={**env, "RAY_AUTH_TOKEN_PATH": str(token)},
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [f"127.0.0.1:{port}", "None", "token"]


@pytest.mark.parametrize("address, match", [("notanaddress", "HOST:PORT"), ("http://127.0.0.1:8265", "dashboard")])
def test_a_malformed_address_is_a_config_error(address, match):
    with pytest.raises(ConfigError, match=match):
        _join_address(address)
