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


def test_an_address_where_another_service_answers_is_refused_within_seconds(monkeypatch):
    """A mistyped port that lands on another service (the walkthrough's: an MLflow server) hung in ray.init's retries
    for minutes, with Ray's C++ log lines and no gmpq message; a silent service is refused after the probe's wait."""
    import http.server
    import threading

    from orchestrator.ray_env import _speaks_grpc

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    http_srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    silent = socket.create_server(("127.0.0.1", 0))             # accepts, never says anything
    threading.Thread(target=http_srv.serve_forever, daemon=True).start()
    try:
        for port in (http_srv.server_address[1], silent.getsockname()[1]):
            t0 = time.monotonic()
            with pytest.raises(ClusterError, match=rf"Something answers at 127\.0\.0\.1:{port} .* not a Ray cluster.*"
                                                   r"--address local"):
                _join_address(f"127.0.0.1:{port}")
            assert time.monotonic() - t0 < 10
        with socket.create_connection(("127.0.0.1", http_srv.server_address[1])) as conn:
            assert not _speaks_grpc(conn, timeout_s=1)
        monkeypatch.setenv("RAY_USE_TLS", "1")                   # a TLS GCS handshakes first: not probed
        with socket.create_connection(("127.0.0.1", http_srv.server_address[1])) as conn:
            assert _speaks_grpc(conn, timeout_s=1)
    finally:
        http_srv.shutdown()
        silent.close()


def test_a_live_address_is_joined_with_token_auth_when_a_token_exists(tmp_path):
    """gmpq cluster up starts clusters that require Ray's token: the join must send it (RAY_AUTH_MODE).
    In a child process: switching token auth on changes Ray's process-wide config."""
    import os
    import subprocess
    import sys

    import threading

    token = tmp_path / "auth_token"
    token.write_text("secret")
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]

        def answer_like_grpc() -> None:        # every connection gets an HTTP/2 SETTINGS frame, as a GCS sends
            while True:
                try:
                    conn, _ = server.accept()
                except OSError:
                    return
                with conn:
                    conn.sendall(bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))

        threading.Thread(target=answer_like_grpc, daemon=True).start()
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
