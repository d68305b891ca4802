"""``--address auto`` without ``$RAY_ADDRESS`` or a cluster recorded by ``gmpq cluster up``: which Ray runs here.

Ray's own discovery (``ray.init(address="auto")``) reads ``ray_current_cluster`` in Ray's temp dir (``$RAY_TMPDIR/ray``,
else ``$TMPDIR/ray``, else ``/tmp/ray``), and without that file joins the GCS of *any* raylet process it finds
(Ray's source calls it the "legacy" behaviour): a private local session that another process's ``ray.init()`` started
(a pytest run, a notebook) included, so a sweep's trials ran in someone else's session, environment and CPUs.

How Ray tells the two apart, and so do we: only ``ray start`` (head or worker node) writes ``ray_current_cluster``, into
the node's temp dir, naming the cluster's GCS (``ray stop`` removes it); a driver's ``ray.init()`` that starts its
own instance never writes it (and ``ray.init()`` without an address joins only what the file names). So a running
instance was started for joining when the ``ray_current_cluster`` of its temp dir (the raylet's ``--temp_dir``)
names its GCS address (``--gcs-address``); otherwise it is a driver's private session, and the raylet's parent
process is that driver.

``discover_cluster`` returns the address to join and where it came from (the messages name it), or raises
``ClusterError`` naming what runs and the fixes. Linux only (``/proc``); elsewhere Ray's own discovery is kept.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from .errors import ClusterError

log = logging.getLogger(__name__)

__all__ = ["RayInstance", "ray_temp_dir", "recorded_address", "running_instances", "discover_cluster", "PROC_ROOT",
           "ADDRESS_FILE"]

PROC_ROOT = Path("/proc")
ADDRESS_FILE = "ray_current_cluster"
_FIXES = ("Start a cluster to join ('gmpq cluster up', or 'ray start --head'), give a cluster's address "
          "(--address HOST:PORT), or run on this machine alone with --address local.")


@dataclass(frozen=True, kw_only=True)
class RayInstance:
    """One Ray instance with a node on this machine (its raylet processes share ``gcs_address``)."""

    gcs_address: str
    session_dir: str
    temp_dir: str
    joinable: bool                    # its temp dir's ray_current_cluster names it: started by `ray start`
    starter_pid: int | None           # the raylet's parent: for a private session, the driver that called ray.init()
    starter_cmd: str                  # that process's command line ("" once it has exited)


def ray_temp_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Ray's default temp dir, as Ray computes it (``ray._common.utils.get_default_ray_temp_dir``)."""
    env = os.environ if environ is None else environ
    if "RAY_TMPDIR" in env:
        base = env["RAY_TMPDIR"]
    elif sys.platform.startswith("linux") and "TMPDIR" in env:
        base = env["TMPDIR"]
    else:
        base = "/tmp"
    return Path(base) / "ray"


def recorded_address(temp_dir: str | os.PathLike) -> str | None:
    """The GCS address ``ray start`` recorded in ``temp_dir/ray_current_cluster``, or None."""
    try:
        return (Path(temp_dir) / ADDRESS_FILE).read_text().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def _cmdline(pid: int | str, proc: Path) -> list[str]:
    try:
        raw = (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _parent(pid: int | str, proc: Path) -> int | None:
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    rest = stat[stat.rfind(")") + 2:].split()      # comm may hold spaces: split after its ')'
    return int(rest[1]) if len(rest) > 1 else None


def _flag(args: list[str], *names: str) -> str | None:
    for a in args:
        for name in names:
            if a.startswith(name + "="):
                return a.split("=", 1)[1]
    return None


def running_instances(proc: Path | None = None) -> list[RayInstance] | None:
    """The Ray instances with a raylet on this machine, one per GCS address (sorted by it), read from ``/proc``
    (no Ray import, no connection); None where there is no ``/proc`` to read."""
    proc = PROC_ROOT if proc is None else proc
    if not proc.is_dir():
        return None
    found: dict[str, RayInstance] = {}
    for entry in sorted(proc.iterdir(), key=lambda p: (len(p.name), p.name)):   # lowest pid (the head) first
        if not entry.name.isdigit():
            continue
        args = _cmdline(entry.name, proc)
        if not args or "raylet" not in os.path.basename(args[0]):
            continue
        gcs = _flag(args, "--gcs-address", "--gcs_address")
        if not gcs or gcs in found:
            continue
        session = _flag(args, "--session_dir", "--session-dir") or ""
        temp = _flag(args, "--temp_dir", "--temp-dir") or (str(Path(session).parent) if session else "")
        parent = _parent(entry.name, proc)
        found[gcs] = RayInstance(gcs_address=gcs, session_dir=session, temp_dir=temp,
                                 joinable=bool(temp) and recorded_address(temp) == gcs, starter_pid=parent,
                                 starter_cmd=" ".join(_cmdline(parent, proc)) if parent and parent > 1 else "")
    return [found[k] for k in sorted(found)]


def _describe(inst: RayInstance) -> str:
    who = f"pid {inst.starter_pid}: {inst.starter_cmd[:160]}" if inst.starter_cmd else "its starter has exited"
    return f"{inst.gcs_address} (session {inst.session_dir or '?'}; started by {who})"


def discover_cluster(*, state_dir: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None,
                     proc: Path | None = None):
    """What ``--address auto`` joins once ``$RAY_ADDRESS`` and the state file of ``gmpq cluster up`` named nothing:
    a ``ResolvedAddress`` (kind "gcs") of the cluster Ray's ``ray_current_cluster`` names, else of the one
    ``ray start`` cluster running on this machine; ``ClusterError`` when there is none, several, or only private
    sessions of other processes (named, with the fixes). Where ``/proc`` is missing: kind "auto" (Ray's discovery)."""
    from .connect import ResolvedAddress
    from .local import DEFAULT_STATE_DIR, STATE_FILE

    default_file = ray_temp_dir(environ) / ADDRESS_FILE
    address = recorded_address(default_file.parent)
    instances = running_instances(proc)
    if address and (instances is None or any(i.gcs_address == address for i in instances)):
        return ResolvedAddress(kind="gcs", address=address, source=f"{default_file}, written by 'ray start'")
    if address:       # no raylet of that cluster runs here: a 'ray start --block' ended without 'ray stop' left it
        log.warning("%s names %s, where no Ray runs on this machine (left by a 'ray start' that ended without "
                    "'ray stop'; delete it or run 'ray stop'): looking for a running cluster instead",
                    default_file, address)
    if instances is None:
        return ResolvedAddress(kind="auto", address="auto", source="Ray's own discovery")
    joinable = [i for i in instances if i.joinable]
    if len(joinable) == 1:
        found = joinable[0]
        return ResolvedAddress(kind="gcs", address=found.gcs_address,
                               source=f"the 'ray start' cluster running on this machine, recorded in "
                                      f"{Path(found.temp_dir) / ADDRESS_FILE}")
    if len(joinable) > 1:
        shown = "; ".join(f"{i.gcs_address} (temp dir {i.temp_dir})" for i in joinable[:5])
        raise ClusterError(f"--address auto found {len(joinable)} Ray clusters started with 'ray start' on this "
                           f"machine: {shown}. Give the one to join: --address HOST:PORT.")
    state_file = Path(state_dir or DEFAULT_STATE_DIR) / STATE_FILE
    env = os.environ if environ is None else environ
    unset = "is unset" if not env.get("RAY_ADDRESS", "").strip() else f"is {env['RAY_ADDRESS']!r}"
    looked = (f"--address auto found no Ray cluster to join: $RAY_ADDRESS {unset}, no cluster is recorded by "
              f"'gmpq cluster up' in {state_file} (one started with --dir D: GMPQ_CLUSTER_DIR=D finds it), and "
              f"no 'ray start' recorded one in {default_file}")
    if not instances:
        raise ClusterError(f"{looked}; no Ray runs on this machine. {_FIXES}")
    one = len(instances) == 1
    shown = "; ".join(_describe(i) for i in instances[:3]) + (f"; and {len(instances) - 3} more"
                                                              if len(instances) > 3 else "")
    what = ("The Ray instance running on this machine ({}) is the private session of another process's ray.init()"
            if one else "The Ray instances running on this machine ({}) are private sessions of other processes' "
            "ray.init() calls")
    raise ClusterError(
        f"{looked}. {what.format(shown)}, not {'a cluster' if one else 'clusters'} started for joining: joining one "
        "would run this command's work in that process's session, environment and CPUs, and stop when it ends. "
        f"{_FIXES} (--address "
        f"{instances[0].gcs_address} would join {'it' if one else 'the first'} on purpose.)")
