"""``gmpq mlflow-server``: an MLflow tracking server (SQLite backend, artifacts in a folder).

Foreground by default (Ctrl-C stops it); ``--detach`` leaves it running and records it in
``DIR/mlflow_server.json`` for ``--stop``. Either way the last line printed once it answers is its
URI, for ``gmpq sweep --tracking-uri URI``.

It serves runs, metrics, artifacts and the UI. MLflow's job runner (7 huey consumer processes for GenAI jobs:
scorers, evaluations, periodic trace tasks) is switched off, so with --workers 1 the server is two processes
(``mlflow server`` and one uvicorn worker, ~0.5 GB RSS, measured with MLflow 3.17) instead of 10 (~2 GB); set
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true in the environment to keep MLflow's default.
"""
from __future__ import annotations

import argparse
import signal
import time

from . import help_text


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM to the foreground command stops the server too


def register(subparsers) -> None:
    p = subparsers.add_parser("mlflow-server", help="run an MLflow tracking server bound to 127.0.0.1",
                              description=help_text(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=5000, help="TCP port, 0..65535 (default 5000; 0 picks a free one)")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default 127.0.0.1; 0.0.0.0 exposes it to the network)")
    p.add_argument("--dir", default="runs/mlflow", help="folder for mlflow.db and artifacts/ (default runs/mlflow)")
    p.add_argument("--allowed-hosts", default=None, metavar="LIST",
                   help="Host headers to accept besides localhost/private IPs (e.g. the service DNS name)")
    p.add_argument("--workers", type=int, default=1, help="server worker processes (default 1)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait until it answers (default 120)")
    mode = p.add_mutually_exclusive_group()      # --stop --detach: which one was meant is unclear
    mode.add_argument("--detach", action="store_true", help="start in the background and return")
    mode.add_argument("--stop", action="store_true", help="stop the detached server recorded in --dir")
    p.set_defaults(func=run)


def run(args) -> int:
    from cluster.mlflow_server import start_mlflow_server, stop_mlflow_server

    if args.stop:
        outcome = stop_mlflow_server(args.dir)
        print(f"mlflow server in {args.dir}: {outcome}")
        return 1 if outcome == "survived" else 0
    server = start_mlflow_server(dir=args.dir, host=args.host, port=args.port or None, workers=args.workers,
                                 timeout_s=args.timeout, allowed_hosts=args.allowed_hosts)
    print(f"mlflow server: pgid {server.group.pgid}, store {server.backend_store_uri}, log {server.log_path}")
    if args.detach:
        print(f"stop with: gmpq mlflow-server --stop --dir {server.dir}")
        print(server.uri, flush=True)
        return 0
    print("running in the foreground; Ctrl-C stops it")
    print(server.uri, flush=True)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while server.alive:
            time.sleep(1.0)
        print("the MLflow server exited on its own; see its log", flush=True)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stop_mlflow_server(server)
