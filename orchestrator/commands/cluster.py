"""``gmpq cluster up|down|status``: a multi-node Ray cluster on this machine (development, tests).

``up`` prints the cluster address on its last line (``ADDR=$(gmpq cluster up --workers 2 | tail -1)``).
``down`` stops exactly the processes of the node sessions ``up`` recorded (never ``ray stop``, which would stop
every Ray node of this user, including the ones tests or other tools started).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from . import help_text


def register(subparsers) -> None:
    p = subparsers.add_parser("cluster", help="start/stop/inspect a local multi-node Ray cluster",
                              description=help_text(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cluster_command", metavar="ACTION")
    up = sub.add_parser("up", help="start a head and N worker nodes; prints the address last")
    up.add_argument("--workers", type=int, default=2, help="worker nodes (default 2)")
    up.add_argument("--cpus-per-node", type=int, default=None,
                    help="CPUs each worker advertises (default: this machine's CPUs // workers, at least 1)")
    up.add_argument("--head-cpus", type=int, default=None,
                    help="CPUs of the head node (default 0 with workers: trials run on the workers)")
    up.add_argument("--gpus-per-node", type=int, default=None,
                    help="GPUs each worker advertises (default: what Ray detects; the head gets 0 with workers)")
    up.add_argument("--object-store-mb", type=int, default=100, help="object store per node, MiB (default 100)")
    up.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for all nodes (default 180)")
    down = sub.add_parser("down", help="stop the nodes `up` started")
    down.add_argument("--grace", type=float, default=5.0, help="seconds between SIGTERM and SIGKILL (default 5)")
    down.add_argument("--keep-logs", action="store_true", help="keep Ray's temp dir (session logs)")
    status = sub.add_parser("status", help="show the recorded nodes and what Ray reports")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    for sp in (up, down, status):
        sp.add_argument("--dir", default=None,
                        help="state folder (default ~/.cache/gmpq/cluster or $GMPQ_CLUSTER_DIR)")
    p.set_defaults(func=run, cluster_command=None)
    p.set_defaults(_parser=p)


def run(args) -> int:
    if args.cluster_command == "up":
        return _up(args)
    if args.cluster_command == "down":
        return _down(args)
    if args.cluster_command == "status":
        return _status(args)
    from gmpq_core.errors import ConfigError

    args._parser.print_usage(sys.stderr)
    raise ConfigError("gmpq cluster needs an action: up, down or status (e.g. 'gmpq cluster up --workers 2'); "
                      "'gmpq cluster --help' describes them.")


def gpus_text(num_gpus: int | None, detected: int | None) -> str:
    """A node's GPUs as ``up`` prints them: the number given (``--gpus-per-node``; 0 for the head with workers),
    else what Ray detects on this machine (``detected``; None: unknown), said as such."""
    if num_gpus is not None:
        return f"{num_gpus} GPUs"
    if detected is None:
        return "the GPUs Ray detects"
    return f"{detected} GPUs (detected)" if detected else "0 GPUs (none detected)"


def _up(args) -> int:
    from cluster.local import detected_gpus, start_local_cluster

    c = start_local_cluster(workers=args.workers, cpus_per_node=args.cpus_per_node, head_cpus=args.head_cpus,
                            gpus_per_node=args.gpus_per_node, state_dir=args.dir,
                            object_store_mb=args.object_store_mb, timeout_s=args.timeout)
    detected = detected_gpus() if any(n.num_gpus is None for n in c.nodes) else None
    for n in c.nodes:
        print(f"{n.name}: pgid {n.group.pgid}, {n.num_cpus} CPUs, {gpus_text(n.num_gpus, detected)}, "
              f"resources {json.dumps(n.resources)}, log {n.log_path}")
    print(f"state: {c.state_dir}/cluster.json; stop with: gmpq cluster down --dir {c.state_dir}")
    if os.environ.get("RAY_AUTH_MODE", "token").lower() == "token":
        print("Ray token auth is on: a driver joining with this HOST:PORT needs RAY_AUTH_MODE=token in its "
              "environment (cluster.connect.connect sets it itself)")
    print(c.address, flush=True)
    return 0


def _down(args) -> int:
    from cluster.local import stop_local_cluster

    outcome = stop_local_cluster(args.dir, grace_s=args.grace, keep_temp=args.keep_logs)
    if not outcome:
        print(f"{_nothing_recorded(args.dir)}; nothing to stop")
        return 0
    for name, what in outcome.items():
        print(f"{name}: {what}")
    return 1 if "survived" in outcome.values() else 0


def _status(args) -> int:
    from cluster.connect import alive_nodes, connect, disconnect
    from cluster.local import load_cluster_state, node_status

    c = load_cluster_state(args.dir)
    if c is None:
        print(f"{_nothing_recorded(args.dir)}. Start one with 'gmpq cluster up', or name the folder another was "
              "started with: --dir DIR, or GMPQ_CLUSTER_DIR=DIR")
        return 1
    alive = node_status(c)
    report = {"address": c.address, "processes": alive, "ray_nodes": None}
    if alive.get("head"):
        connect(c.address)
        try:
            report["ray_nodes"] = [{"node_id": n["NodeID"], "ip": n["NodeManagerAddress"],
                                    "resources": n["Resources"]} for n in alive_nodes()]
        finally:
            disconnect()
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"address: {c.address}")
    for name, ok in alive.items():
        print(f"{name}: {'running' if ok else 'not running'}")
    if report["ray_nodes"] is not None:
        print(f"Ray reports {len(report['ray_nodes'])} alive node(s)" + (":" if report["ray_nodes"] else ""))
        for n in report["ray_nodes"]:
            print("  " + node_line(n))
    return 0 if any(alive.values()) else 1


def node_line(node: dict) -> str:
    """One alive node of ``gmpq cluster status``: its id (short), IP, CPUs, GPUs and memory."""
    r = node.get("resources") or {}
    mem = f", {r['memory'] / 2**30:.1f} GiB memory" if r.get("memory") else ""
    return (f"{str(node.get('node_id', ''))[:12]} at {node.get('ip')}: {r.get('CPU', 0):g} CPU, {r.get('GPU', 0):g} "
            f"GPU{mem}")


def _nothing_recorded(state_dir: str | None) -> str:
    """"no local cluster recorded in FOLDER", the folder looked in named (--dir, else $GMPQ_CLUSTER_DIR or the
    default) and what it lacks."""
    from pathlib import Path

    from cluster.local import DEFAULT_STATE_DIR, STATE_FILE

    folder = Path(state_dir or DEFAULT_STATE_DIR).absolute()
    return f"no local cluster recorded in {folder} (no {STATE_FILE} there)"
